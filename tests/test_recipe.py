"""A fair recipe, recorded: divergence above a loss threshold, no weight decay on norm and bias parameters, a
linear warm-up and a schedule stepped per optimizer step, the lr_range preset, and old job folders that resume
the way they were started."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import run_cli_here
from omegaconf import OmegaConf

from normsweep.config.checks import compose_run
from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.optimizers import optimizer_record
from normsweep.config.schema import DatasetConfig
from normsweep.job.data import Data, load
from normsweep.job.layers import norm_factory
from normsweep.job.models import MLP, SimpleCNN
from normsweep.job.optim import build_optimizer, build_scheduler
from normsweep.job.train import batch_slices, diverge_limit, fit
from normsweep.sweep.resume import ResumeConflict, SweepFolders, check_resumable, keep_saved_behaviour, task_config

# The keys this recipe added, at the values that compute what jobs saved before them computed.
OLD_WAY = {
    "diverge_loss": None,
    "optimizer.decay_norm_and_bias": True,
    "optimizer.warmup_epochs": 0,
    "optimizer.schedule_step": "epoch",
}


@pytest.fixture(scope="module")
def digits() -> Data:
    return load(DatasetConfig(name="digits", crop_padding=1), val_fraction=0.2, seed=0)


def _mlp(norm: str = "bn") -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(1, (8, 8), 10, norm_factory(NORMS[norm](), "mlp"), hidden=32)


# Divergence


def test_auto_divergence_is_ten_times_the_loss_of_a_uniform_guess() -> None:
    assert diverge_limit("auto", 10) == pytest.approx(10 * math.log(10))
    assert diverge_limit("auto", 100) == pytest.approx(10 * math.log(100))
    assert diverge_limit(5.0, 10) == 5.0 and diverge_limit(None, 10) is None


def test_a_run_whose_training_loss_exceeds_diverge_loss_stops_there(digits: Data) -> None:
    adam = OPTIMIZERS["adam"](lr=1e-3)
    low = fit(_mlp(), digits, adam, 3, 256, 0, diverge_loss=0.5)  # digits' first-epoch loss is above 0.5
    assert len(low) == 1 and low[0].finite and low[0].diverged(0.5)
    assert len(fit(_mlp(), digits, adam, 3, 256, 0, diverge_loss=None)) == 3  # null: only a non-finite loss stops


@pytest.mark.parametrize("value", ["-1", "0", "abc", "true", "nan"])
def test_a_diverge_loss_that_is_no_loss_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=f"(?i)^diverge_loss={value}: give the training loss above which a run"):
        compose_run([f"diverge_loss={value}"])


def test_diverge_loss_takes_a_number_auto_or_null() -> None:
    assert compose_run([]).diverge_loss == "auto"
    assert compose_run(["diverge_loss=20"]).diverge_loss == 20
    assert compose_run(["diverge_loss=null"]).diverge_loss is None


# Weight decay on norm and bias parameters


def _decayed(optimizer_node: dict, model: torch.nn.Module) -> dict[str, bool]:
    """Which parameters one step of weight decay alone (zero gradients) changes, by name."""
    record = optimizer_record(optimizer_node, "opt")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model.parameters(), record)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {name: not torch.equal(before[name], p) for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "torch.optim.SGD", "lr": 0.1, "weight_decay": 0.5},
        {"_target_": "torch.optim.AdamW", "lr": 0.1, "weight_decay": 0.5},
        {"_target_": "torch.optim.RMSprop", "lr": 0.1, "weight_decay": 0.5},  # a user's optimizer, by _target_
    ],
)
def test_norm_and_bias_parameters_are_not_decayed_unless_asked(node: dict) -> None:
    model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    for p in model.parameters():
        torch.nn.init.uniform_(p, 0.5, 1.5)  # nonzero everywhere: decay shows as a change
    decayed = _decayed(node, model)
    norm_or_bias = {
        name for name in decayed if name.endswith(".bias") or name.startswith(("features.1.", "features.4."))
    }
    assert {name for name, changed in decayed.items() if not changed} == norm_or_bias  # BN layers 1 and 4, biases
    assert all(_decayed({**node, "decay_norm_and_bias": True}, model).values())  # everything, as before the key


def test_frn_tau_and_skipinit_gains_count_as_norm_parameters() -> None:
    from normsweep.job.models import build_model

    run = compose_run(["model=resnet20", "norm=none", "model.blocks=[1,1,1]", "model.widths=[4,8,8]"])
    model = build_model("resnet20", run.model, 1, (8, 8), 10, norm_factory(run.norm, "resnet20"))
    optimizer = build_optimizer(model.parameters(), OPTIMIZERS["sgd"](lr=0.1))
    kept = {id(p) for p in optimizer.param_groups[1]["params"]}
    gains = [p for name, p in model.named_parameters() if p.ndim <= 1 and "bias" not in name]
    assert gains and all(id(p) in kept for p in gains) and optimizer.param_groups[1]["weight_decay"] == 0.0
    frn = norm_factory(NORMS["frn"](), "simple_cnn")(4)
    optimizer = build_optimizer(frn.parameters(), OPTIMIZERS["sgd"](lr=0.1))
    assert any(p is frn.tau for p in optimizer.param_groups[-1]["params"])
    assert optimizer.param_groups[-1]["weight_decay"] == 0.0


# Warm-up and the per-step schedule


def test_warm_up_rises_linearly_per_step_then_the_cosine_decays_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, "cosine", epochs=3, warmup_epochs=1, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # the first epoch, step by step
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[4] == pytest.approx(0.1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow  # trains for seconds in-process
def test_the_lr_column_is_the_rate_of_each_epochs_last_step(digits: Data) -> None:
    steps = len(batch_slices(len(digits.train), 256))
    sgd = OPTIMIZERS["sgd"](lr=0.1, schedule="cosine", warmup_epochs=1)
    history = fit(_mlp(), digits, sgd, 3, 256, 0)
    assert history[0].lr == pytest.approx(0.1)  # the end of the warm-up
    assert history[1].lr == pytest.approx(0.05 * (1 + math.cos(math.pi * (steps - 1) / (2 * steps))))
    assert history[2].lr == pytest.approx(0.05 * (1 + math.cos(math.pi * (2 * steps - 1) / (2 * steps))))


@pytest.mark.slow  # trains for seconds in-process
def test_resuming_in_the_middle_of_the_warm_up_gives_the_uninterrupted_numbers(digits: Data) -> None:
    sgd = OPTIMIZERS["sgd"](lr=0.1, schedule="cosine", warmup_epochs=2.5)
    states = []
    full = fit(_mlp(), digits, sgd, 4, 256, 0, on_epoch=lambda m, snapshot: states.append(copy.deepcopy(snapshot())))
    resumed = fit(_mlp(), digits, sgd, 4, 256, 0, state=states[1])  # after epoch 2 of the 2.5 warm-up epochs
    assert [(m.train_loss, m.val_acc, m.lr) for m in resumed] == [(m.train_loss, m.val_acc, m.lr) for m in full]


def test_a_warm_up_longer_than_the_training_is_refused() -> None:
    with pytest.raises(ConfigError, match="optimizer.warmup_epochs=5 epochs=3: the warm-up must fit"):
        compose_run(["optimizer.warmup_epochs=5", "epochs=3"])
    for override, message in [
        ("optimizer.warmup_epochs=-1", "must be >= 0"),
        ("optimizer.schedule_step=batch", "choose step"),
    ]:
        with pytest.raises(ConfigError, match=message):
            compose_run([override])


# Old job folders


def _old_form(config: dict) -> dict:
    """A job's config as a folder saved before the recipe's keys existed holds it."""
    config = json.loads(json.dumps(config))
    del config["diverge_loss"]
    for key in ("decay_norm_and_bias", "warmup_epochs", "schedule_step"):
        del config["optimizer"][key]
    return config


def _saved_job(folder: Path, config: dict, overrides: list[str], status: str = "incomplete") -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {"status": status, "overrides": overrides, "config": config, "epochs_completed": 1}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_an_old_folder_is_the_same_job_unless_the_command_gives_a_new_key_another_value(
    compose_cfg, tmp_path: Path
) -> None:
    config = task_config(compose_cfg(["norm=gn"]))
    old = _saved_job(tmp_path / "0", _old_form(config), ["norm=gn"])
    check_resumable(old, config, ["norm=gn"])  # today's defaults, not given: the folder's behaviour wins
    old_way = ["norm=gn", "optimizer.decay_norm_and_bias=true", "optimizer.schedule_step=epoch"]
    given = json.loads(json.dumps(config))
    given["optimizer"] |= {"decay_norm_and_bias": True, "schedule_step": "epoch"}
    check_resumable(old, given, old_way)  # given at the old values: the same job
    given["optimizer"]["decay_norm_and_bias"] = False
    with pytest.raises(ResumeConflict, match="1 key only this job has: optimizer.decay_norm_and_bias"):
        check_resumable(old, given, ["norm=gn", "optimizer.decay_norm_and_bias=false"])
    assert SweepFolders(tmp_path).claim(config, ["norm=gn"]) == "0"  # a resumed sweep finds it by its settings


def test_a_folder_saved_before_the_package_split_names_the_same_model_and_norm(compose_cfg, tmp_path: Path) -> None:
    # Before normsweep/ was split into config/, job/, sweep/ and results/, the built-in models and norm layers were
    # normsweep.models.* and normsweep.layers.*; a folder saved then holds those paths for the same code.
    config = task_config(compose_cfg(["norm=ws_gn", "model=resnet20"]))
    saved = json.loads(json.dumps(config).replace("normsweep.job.models.", "normsweep.models."))
    saved = json.loads(json.dumps(saved).replace("normsweep.job.layers.", "normsweep.layers."))
    assert saved["model"]["_target_"] == "normsweep.models.ResNet"
    assert saved["norm"]["adapt_model"] == "normsweep.layers.standardize_conv_weights"
    old = _saved_job(tmp_path / "0", saved, ["norm=ws_gn", "model=resnet20"])
    check_resumable(old, config, ["norm=ws_gn", "model=resnet20"])
    assert SweepFolders(tmp_path).claim(config, ["model=resnet20", "norm=ws_gn"]) == "0"


def test_a_job_resumed_in_an_old_folder_runs_the_old_way(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(["norm=gn", "optimizer.warmup_epochs=1"])
    old = _saved_job(tmp_path / "0", _old_form(task_config(cfg)), ["norm=gn"])
    keep_saved_behaviour(old, cfg, ["norm=gn", "optimizer.warmup_epochs=1"])
    assert {key: OmegaConf.select(cfg, key) for key in OLD_WAY} == OLD_WAY | {"optimizer.warmup_epochs": 1}
    new = compose_cfg(["norm=gn"])
    keep_saved_behaviour(tmp_path / "never-used", new, [])
    assert OmegaConf.select(new, "optimizer.decay_norm_and_bias") is False  # a new folder: today's recipe


# End to end, as a user runs them


def test_adam_at_lr_1e6_is_diverged_and_the_summary_records_the_recipe(tmp_path: Path) -> None:
    run = tmp_path / "r"
    result = run_cli_here(["norm=none", "optimizer.lr=1e6", "epochs=3", f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 1
    assert summary["diverge_loss"] == pytest.approx(10 * math.log(10))
    assert summary["decay_norm_and_bias"] is False and summary["no_decay_params"] > 0
    assert "exceeds diverge_loss=23.03; stopped there" in result.stdout
    refused = run_cli_here(["diverge_loss=-1", f"hydra.run.dir={tmp_path / 'no'}"], tmp_path)  # before training
    output = (refused.stdout + refused.stderr).strip()
    assert refused.returncode == 2 and len(output.splitlines()) == 1, output  # one line, before training
    assert "diverge_loss=-1: give the training loss above which a run has diverged" in output
    assert not (tmp_path / "no").exists()


def test_the_lr_range_preset_compares_each_norm_at_its_best_learning_rate(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    args = ["-m", "experiment=lr_range", "norm=none,bn", "optimizer.lr=1e-3,1e3", "model=mlp", "epochs=2"]
    result = run_cli_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = pd.read_csv(sweep / "runs.csv").set_index(["norm", "optimizer.lr"])
    assert (runs.xs(1000.0, level="optimizer.lr")["status"] == "diverged").all()
    best = pd.read_csv(sweep / "best_by_norm.csv").set_index("norm")
    assert sorted(best.index) == ["bn", "none"] and (best["optimizer.lr"] == 0.001).all()


def test_old_folders_resume_the_old_way_as_a_run_and_in_a_sweep(tmp_path: Path) -> None:
    # The reference: a job trained the old way, every added key given at its old value.
    args = ["model=mlp", "optimizer=sgd", "optimizer.schedule=cosine", "optimizer.weight_decay=0.05", "epochs=3"]
    old_way = [f"{key}={'null' if value is None else str(value).lower()}" for key, value in OLD_WAY.items()]
    reference = tmp_path / "reference"
    result = run_cli_here([*args, *old_way, f"hydra.run.dir={reference}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = pd.read_csv(reference / "metrics.csv")[["epoch", "train_loss", "val_acc", "lr"]]

    def as_saved_before_the_keys(folder: Path, checkpoint: bool) -> None:
        shutil.copytree(reference, folder)
        summary = json.loads((folder / "summary.json").read_text())
        overrides = [o for o in summary["overrides"] if o not in old_way]
        summary |= {"status": "incomplete", "config": _old_form(summary["config"]), "overrides": overrides}
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(summary["config"]))
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if not checkpoint:  # stopped before its first epoch ended: every epoch runs again, the old way
            (folder / "checkpoint.pt").unlink()
            (folder / "metrics.csv").unlink()

    # A run stopped after its last epoch's checkpoint: the old optimizer state loads (one parameter group).
    run = tmp_path / "run"
    as_saved_before_the_keys(run, checkpoint=True)
    result = run_cli_here([*args, f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["decay_norm_and_bias"] is True
    assert resumed["test_acc"] == json.loads((reference / "summary.json").read_text())["test_acc"]

    sweep = tmp_path / "sweep"
    as_saved_before_the_keys(sweep / "0", checkpoint=False)
    result = run_cli_here(["-m", *args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]  # its own folder, not a new one
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "0" / "metrics.csv")[expected.columns], expected)
