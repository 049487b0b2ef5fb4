"""Every option of every config group composes and yields a model that trains; bad values are refused early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cifar, make_mnist, make_svhn
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from normsweep.config.checks import compose_run, options, validate
from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.schema import config_dir
from normsweep.job.build import build
from normsweep.job.data import load, normalize
from normsweep.job.layers import norm_factory
from normsweep.job.models import build_model
from normsweep.job.optim import build_optimizer

CONF = Path(config_dir())


def test_the_groups_offer_what_the_readme_lists() -> None:
    assert options("model") == ["deep_cnn", "mlp", "resnet18", "resnet20", "simple_cnn"]
    assert options("norm") == ["bn", "frn", "gn", "in", "ln", "ln2d", "none", "rms", "ws_gn"]
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("dataset") == ["cifar10", "cifar100", "digits", "fashion_mnist", "mnist", "svhn", "synthetic"]
    assert options("experiment") == ["gn_batch_size", "lr_range", "quick", "seed_cifar10", "tune"]


def forward_backward(run) -> None:
    job = build(run, torch.device("cpu"))
    model, data = job.model, job.data
    optimizer = build_optimizer(model.parameters(), run.optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(normalize(data.train.images[:8], data)), data.train.labels[:8])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("norm", options("norm"))
def test_model_and_norm_compose_and_train(compose_cfg, model: str, norm: str) -> None:
    narrow = {"resnet18": ["model.widths=[8,8,16,16]"], "resnet20": ["model.widths=[8,16,16]"]}  # same structure
    run = compose_run([f"model={model}", f"norm={norm}", *narrow.get(model, [])])
    record = NORMS[norm]()
    if model == "mlp" and (not record.fc_features or record.adapt_model):  # feature maps only; convolutions only
        with pytest.raises(ConfigError, match=f"model=mlp norm={norm}"):
            forward_backward(run)
    else:
        forward_backward(run)


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_optimizer_composes_and_steps(compose_cfg, optimizer: str) -> None:
    run = compose_run([f"optimizer={optimizer}", "optimizer.lr=0.01"])
    assert run.optimizer.name == optimizer and run.optimizer.lr == 0.01
    forward_backward(run)


@pytest.mark.parametrize("dataset", options("dataset"))
def test_dataset_composes_loads_and_trains(compose_cfg, tmp_path, monkeypatch, dataset: str) -> None:
    writers = {
        "mnist": lambda: make_mnist(tmp_path),
        "fashion_mnist": lambda: make_mnist(tmp_path, folder="FashionMNIST"),
        "cifar10": lambda: make_cifar(tmp_path, monkeypatch),
        "cifar100": lambda: make_cifar(tmp_path, monkeypatch, hundred=True),
        "svhn": lambda: make_svhn(tmp_path, monkeypatch),
        "digits": lambda: None,
        "synthetic": lambda: None,
    }
    writers[dataset]()
    on_disk = dataset not in ("digits", "synthetic")
    run = compose_run([f"dataset={dataset}", f"dataset.root={tmp_path}"] if on_disk else [f"dataset={dataset}"])
    forward_backward(run)


def test_shell_overrides_take_effect(compose_cfg) -> None:
    run = compose_run(
        [
            "optimizer=sgd",
            "optimizer.lr=0.05",
            "epochs=3",
            "batch_size=32",
            "model=mlp",
            "norm=gn",
            "norm.groups=4",
            "seed=7",
            "val_fraction=0.1",
            "device=cpu",
        ]
    )
    assert (run.optimizer.name, run.optimizer.lr, run.optimizer.nesterov) == ("sgd", 0.05, True)
    assert (run.epochs, run.batch_size, run.seed, run.val_fraction, run.device) == (3, 32, 7, 0.1, "cpu")
    assert run.model["_target_"] == "normsweep.job.models.MLP" and run.norm.groups == 4


@pytest.mark.parametrize(
    "override",
    [
        "epochs=abc",
        "norm.momentum=abc",
        "norm=gn norm.groups=1.5",
        "optimizer.lr=abc",
        "optimizer=sgd optimizer.nesterov=maybe",
    ],
)
def test_a_wrong_type_fails_at_composition_naming_the_key(compose_cfg, override: str) -> None:
    *choice, key = override.split()
    with pytest.raises((ConfigCompositionException, ValidationError), match=key.split("=")[0].split(".")[-1]):
        compose_cfg([*choice, key])


@pytest.mark.parametrize("override", ["norm.groups=4", "optimizer.nesterov=true", "dataset.shape=[1,8,8]"])
def test_a_key_of_another_option_fails_at_composition(compose_cfg, override: str) -> None:
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0]):
        compose_cfg([override])  # bn, adam and digits have no such key


def test_an_unknown_top_level_key_is_refused_with_the_closest_one(compose_cfg) -> None:
    with pytest.raises(ConfigError, match="epoch: normsweep has no such setting; did you mean epochs"):
        validate(compose_cfg(["+epoch=3"]), {"model": "simple_cnn"})


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=0", "epochs=0"),
        ("batch_size=0", "batch_size=0"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("val_fraction=1", "val_fraction=1"),
        ("norm.eps=-1", "norm.eps"),
        ("norm.momentum=2", "norm.momentum"),
        ("optimizer.schedule=step", "optimizer.schedule"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("batch_size=1", "norm=bn batch_size=1"),
        ("precision=fp16", "precision=fp16: choose fp32, or bf16"),
        ("threads=-1", "threads=-1"),
        ("dataset.shape=[3,32]", "dataset.shape=\\[3, 32\\]: give \\[channels,height,width\\]"),
        ("dataset.classes=1", "dataset.classes=1: a classifier needs at least 2 classes"),
        ("dataset.size=5", "dataset.size=5"),
        ("dataset.train_size=0", "dataset.train_size=0: train on at least 2 images"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(compose_cfg, override: str, message: str) -> None:
    dataset = ["dataset=synthetic"] if override.startswith("dataset.") else []  # keys only synthetic has
    with pytest.raises(ConfigError, match=message):
        compose_run([*dataset, override])


def test_unknown_group_option_lists_the_available_ones(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match=r"(?s)norm/foo.*Available options.*gn"):
        compose_cfg(["norm=foo"])


@pytest.mark.parametrize(
    "dataset, padding, flip",
    [
        ("digits", 1, False),
        ("mnist", 2, False),
        ("fashion_mnist", 2, True),
        ("cifar10", 4, True),
        ("cifar100", 4, True),
        ("svhn", 4, False),
        ("synthetic", 4, True),
    ],
)
def test_each_data_set_declares_its_train_augmentation(compose_cfg, dataset: str, padding: int, flip: bool) -> None:
    run = compose_run([f"dataset={dataset}"])
    assert (run.dataset.crop_padding, run.dataset.hflip) == (padding, flip)
    assert run.dataset.download is False  # nothing is fetched unless the user asks


def test_compute_keys_from_the_shell(compose_cfg) -> None:
    run = compose_run(["precision=bf16", "channels_last=false", "compile=true", "threads=1"])
    assert (run.precision, run.channels_last, run.compile, run.threads) == ("bf16", False, True, 1)
    default = compose_run([])
    assert (default.precision, default.channels_last, default.compile, default.threads) == ("fp32", None, False, 0)
    with pytest.raises((ConfigCompositionException, ValidationError), match="channels_last"):
        compose_cfg(["channels_last=sometimes"])


def test_linear_learning_rate_scaling_with_the_batch_size(compose_cfg) -> None:
    run = compose_run(["optimizer.lr=0.1", "optimizer.lr_batch_size=32", "batch_size=8"])
    assert run.optimizer.lr == pytest.approx(0.025)
    assert compose_run(["optimizer.lr=0.1", "batch_size=8"]).optimizer.lr == 0.1
    with pytest.raises(ConfigError, match="optimizer.lr_batch_size=0: give the batch size optimizer.lr is meant for"):
        compose_run(["optimizer.lr_batch_size=0"])


def test_the_compared_axis_must_be_a_config_key(compose_cfg) -> None:
    for axis in ("norm", "model", "optimizer.lr", "batch_size", "norm.groups"):
        compose_run([f"compare={axis}", "norm=gn"])
    with pytest.raises(ConfigError, match="compare=optimiser.lr: no such config key"):
        compose_run(["compare=optimiser.lr"])


@pytest.mark.parametrize(
    "preset, model, optimizer, dataset, sweep",
    [
        ("quick", "simple_cnn", "adam", "digits", {"norm": "none,bn,ln,in,gn"}),
        ("seed_cifar10", "deep_cnn", "adam", "cifar10", {"norm": "none,bn"}),
        ("gn_batch_size", "resnet20", "sgd", "digits", {"norm": "bn,gn", "batch_size": "2,4,8,16,32"}),
        (
            "lr_range",
            "simple_cnn",
            "adam",
            "digits",
            {"norm": "none,bn,ln,in,gn", "optimizer.lr": "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1"},
        ),
        (
            "tune",
            "simple_cnn",
            "adam",
            "digits",
            {"norm": "none,bn,ln,in,gn", "optimizer.lr": "tag(log, interval(1e-4, 1))"},
        ),
    ],
)
def test_experiment_presets_compose(compose_cfg, preset, model, optimizer, dataset, sweep) -> None:
    cfg = compose_cfg([f"experiment={preset}"], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.optimizer, choices.dataset) == (model, optimizer, dataset)
    assert dict(cfg.hydra.sweeper.params) == sweep
    tuning = str(cfg.hydra.sweeper._target_).endswith("TuningSweeper")
    assert tuning == (preset == "tune")  # the search preset chooses the tuning sweeper, the others the grid's
    run = compose_run([f"experiment={preset}"])
    if preset == "seed_cifar10":  # the article's setup, as it should have been run
        assert (run.optimizer.lr, run.batch_size, run.epochs, run.val_fraction) == (1e-3, 128, 20, 0.2)
        assert (run.dataset.crop_padding, run.dataset.hflip) == (4, True)
    if preset == "gn_batch_size":  # 0.1 at 32 images, scaled linearly with the batch
        assert run.optimizer.lr == pytest.approx(0.1 * 64 / 32)
        small = compose_run([f"experiment={preset}", "batch_size=2"])
        assert small.optimizer.lr == pytest.approx(0.1 * 2 / 32)


def _build(group: str, record) -> None:
    """Build what an option of `group` names, as a job does."""
    if group == "norm":
        norm_factory(record, "mlp")
    elif group == "optimizer":
        build_optimizer(torch.nn.Linear(2, 2).parameters(), record)
    elif group == "dataset":
        load(record, val_fraction=0.2, seed=0)
    else:
        build_model("mine", record, 1, (8, 8), 10, norm_factory(NORMS["bn"](), "mine"))


@pytest.mark.parametrize("group", ["norm", "optimizer", "dataset", "model"])
def test_a_target_that_cannot_be_imported_is_said_the_same_way_in_every_group(tmp_path: Path, group: str) -> None:
    from normsweep.config.norms import norm_record
    from normsweep.config.optimizers import optimizer_record
    from normsweep.config.records import to_record
    from normsweep.config.schema import UserDataset

    node = {"_target_": "nowhere_module.Thing", "lr": 0.1}
    record = {
        "norm": lambda: norm_record({"_target_": node["_target_"]}, "mine"),
        "optimizer": lambda: optimizer_record(dict(node), "mine"),
        "dataset": lambda: to_record(dict(node), "mine", UserDataset),
        "model": lambda: {"_target_": node["_target_"]},
    }[group]()
    with pytest.raises(ConfigError) as err:
        _build(group, record)
    assert str(err.value) == (
        f"{group}=mine: cannot import _target_=nowhere_module.Thing (No module named 'nowhere_module'); the module "
        "must be importable from where normsweep runs (run from its folder, set PYTHONPATH, or pip install it)"
    )


def test_a_built_in_named_by_its_path_before_the_package_split_is_told_the_new_path() -> None:
    from normsweep.config.norms import norm_record

    with pytest.raises(ConfigError, match="normsweep's built-in is now normsweep.job.layers.group_norm"):
        norm_factory(norm_record({"_target_": "normsweep.layers.group_norm"}, "mine"), "mlp")


def test_an_optimizer_is_a_partial_call_as_hydra_means_it(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"optimizer._partial_=false: .* set _partial_: true"):
        validate(compose_cfg(["optimizer._partial_=false"]))
    from normsweep.config.optimizers import optimizer_record

    record = optimizer_record({"_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 0.01, "alpha": 0.9}, "rms")
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), record)
    assert type(optimizer).__name__ == "RMSprop" and optimizer.defaults["alpha"] == 0.9
    with pytest.raises(ConfigError, match="optimizer.lr: its YAML needs lr"):
        optimizer_record({"_target_": "torch.optim.RMSprop"}, "rms")
