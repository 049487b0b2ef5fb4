"""The training loop: it learns, it is reproducible, and it never trips on a one-sample batch."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.schema import DatasetConfig
from normsweep.job.data import Data, Split, load
from normsweep.job.layers import norm_factory
from normsweep.job.models import MLP, SimpleCNN
from normsweep.job.optim import build_optimizer, build_scheduler
from normsweep.job.train import (
    Compute,
    _cpu_has_native_bf16,
    batch_slices,
    evaluate,
    fit,
    resolve_compute,
)

ADAM = OPTIMIZERS["adam"](lr=1e-3)


@pytest.fixture(scope="module")
def digits() -> Data:
    return load(DatasetConfig(name="digits", crop_padding=1), val_fraction=0.2, seed=0)


def train(data: Data, norm: str = "bn", epochs: int = 3, batch_size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS[norm](), "simple_cnn"))
    return model, fit(model, data, ADAM, epochs=epochs, batch_size=batch_size, seed=seed)


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
def test_it_learns_digits_well_above_chance(digits: Data) -> None:
    model, history = train(digits, epochs=5)
    assert [m.epoch for m in history] == [1, 2, 3, 4, 5]
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_acc > 80  # chance is 10%
    assert evaluate(model, digits.test, digits)[1] > 80


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
def test_same_seed_same_numbers_other_seed_other_numbers(digits: Data) -> None:
    def numbers(h):
        return [(m.train_loss, m.train_acc, m.val_loss, m.val_acc) for m in h]

    _, a = train(digits, seed=3)
    _, b = train(digits, seed=3)
    _, c = train(digits, seed=4)
    assert numbers(a) == numbers(b)
    assert numbers(a) != numbers(c)


def test_last_batch_of_one_sample_with_batchnorm(digits: Data) -> None:
    # 65 training images in batches of 64 would leave one image alone in the last batch; BatchNorm on fc
    # features (the MLP) cannot normalize a batch of one, and raises if it is ever given one.
    small = dataclasses.replace(digits, train=Split(digits.train.images[:65], digits.train.labels[:65]))
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 10, norm_factory(NORMS["bn"](), "mlp"))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.zeros(1, 1, 8, 8))
    history = fit(model, small, ADAM, epochs=2, batch_size=64, seed=0)
    assert len(history) == 2 and all(m.finite for m in history)


def test_resuming_from_a_snapshot_gives_the_uninterrupted_numbers(digits: Data) -> None:
    def numbers(h):
        return [(m.epoch, m.train_loss, m.train_acc, m.val_loss, m.val_acc, m.lr) for m in h]

    saved = {}

    def keep_epoch_2(m, snapshot):
        if m.epoch == 2:  # serialized as the job does, so later steps cannot alter it
            buffer = io.BytesIO()
            torch.save(snapshot(), buffer)
            saved["state"] = buffer.getvalue()

    cosine_sgd = OPTIMIZERS["sgd"](lr=0.05, schedule="cosine")  # momentum and a schedule to restore
    torch.manual_seed(0)
    model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    full = fit(model, digits, cosine_sgd, epochs=4, batch_size=64, seed=0, on_epoch=keep_epoch_2)

    torch.manual_seed(123)  # a fresh model with other weights: everything must come from the snapshot
    fresh = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed = fit(fresh, digits, cosine_sgd, epochs=4, batch_size=64, seed=0, state=state)
    assert numbers(resumed) == numbers(full)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_a_diverging_run_stops_at_its_first_non_finite_epoch(digits: Data) -> None:
    torch.manual_seed(0)
    model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["none"](), "simple_cnn"))
    seen = []
    history = fit(model, digits, OPTIMIZERS["sgd"](lr=1000.0), 5, 64, 0, on_epoch=lambda m, _: seen.append(m))
    assert len(history) < 5 and not history[-1].finite and all(m.finite for m in history[:-1])
    assert seen == history  # the diverged epoch is reported too


def test_batches_cover_every_sample_once() -> None:
    for n, bs in [(65, 64), (128, 64), (1, 8), (130, 64), (7, 1)]:
        slices = batch_slices(n, bs)
        covered = [i for s in slices for i in range(n)[s]]
        assert covered == list(range(n))
        assert n == 1 or bs == 1 or all(s.stop - s.start >= 2 for s in slices)


def test_evaluation_is_never_augmented(digits: Data) -> None:
    model, _ = train(digits, epochs=1)
    plain = dataclasses.replace(digits, crop_padding=0, hflip=False)
    heavy = dataclasses.replace(digits, crop_padding=4, hflip=True)
    assert evaluate(model, digits.val, plain) == evaluate(model, digits.val, heavy)


def test_cosine_schedule_decays_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, "cosine", epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
def test_metrics_report_the_epoch_learning_rate(digits: Data) -> None:
    torch.manual_seed(0)
    model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["none"](), "simple_cnn"))
    per_epoch = OPTIMIZERS["sgd"](lr=0.1, schedule="cosine", schedule_step="epoch")  # per step: tests/test_recipe.py
    history = fit(model, digits, per_epoch, 2, 64, 0)
    assert history[0].lr == pytest.approx(0.1) and history[1].lr == pytest.approx(0.05)
    assert all(m.epoch_seconds > 0 and m.images_per_second > 0 for m in history)


def test_auto_layout_is_channels_last_for_conv_models_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    cnn = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    mlp = MLP(1, (8, 8), 10, norm_factory(NORMS["bn"](), "mlp"))
    assert resolve_compute("fp32", None, False, cnn, cpu).channels_last
    assert not resolve_compute("fp32", None, False, mlp, cpu).channels_last  # nothing to gain without convolutions
    assert not resolve_compute("fp32", False, False, cnn, cpu).channels_last  # the user's choice wins


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("normsweep.job.train._cpu_has_native_bf16", lambda: False)
    cnn = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    with pytest.raises(ConfigError, match="precision=bf16: this CPU has no native bf16"):
        resolve_compute("bf16", None, False, cnn, torch.device("cpu"))


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("norm", ["bn", "in"])
def test_channels_last_changes_speed_not_results(digits: Data, norm: str) -> None:
    def run(channels_last: bool):
        torch.manual_seed(0)
        model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS[norm](), "simple_cnn"))
        return fit(model, digits, ADAM, 3, 64, 0, compute=Compute(channels_last=channels_last))

    plain, fast, again = run(False), run(True), run(True)
    assert [m.val_acc for m in fast] == [m.val_acc for m in again]  # still reproducible, run after run
    for a, b in zip(plain, fast):  # the same training up to float rounding
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-3)
        assert abs(b.val_acc - a.val_acc) <= 1.0


@pytest.mark.skipif(not _cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_trains_as_well_as_fp32_on_digits(digits: Data) -> None:
    def final_val_acc(precision: str) -> float:
        torch.manual_seed(0)
        model = SimpleCNN(1, (8, 8), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
        compute = resolve_compute(precision, None, False, model, torch.device("cpu"))
        return fit(model, digits, ADAM, 4, 64, 0, compute=compute)[-1].val_acc

    assert abs(final_val_acc("bf16") - final_val_acc("fp32")) <= 2.0


def test_the_optimizer_is_fused_where_torch_has_a_kernel() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    for cfg in (ADAM, OPTIMIZERS["sgd"](lr=0.1)):
        optimizer = build_optimizer(params, cfg)
        assert optimizer.defaults.get("fused") is True and optimizer.defaults["lr"] == cfg.lr


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
def test_compile_gives_the_same_training(digits: Data) -> None:
    def val_accs(compile: bool) -> list[float]:
        torch.manual_seed(0)
        model = MLP(1, (8, 8), 10, norm_factory(NORMS["bn"](), "mlp"))  # the quickest model to compile
        return [m.val_acc for m in fit(model, digits, ADAM, 2, 64, 0, compute=Compute(compile=compile))]

    assert val_accs(True) == pytest.approx(val_accs(False), abs=0.5)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (torch.optim.Adam, {"lr": 1e-2, "fused": True}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
        (torch.optim.RMSprop, {"lr": 1e-2}),
    ],
)
def test_the_step_without_torchs_wrappers_is_the_same_step(cls, kwargs) -> None:
    from normsweep.job.optim import step_function

    def trained(plain: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        optimizer = cls(model.parameters(), **kwargs)
        step = step_function(optimizer) if plain else optimizer.step
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 6)).square().mean().backward()
            step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(trained(True), trained(False)))


def test_a_step_hook_keeps_torchs_own_step() -> None:
    from normsweep.job.optim import step_function

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    assert step_function(optimizer) != optimizer.step
    optimizer.register_step_post_hook(lambda *args: None)
    assert step_function(optimizer) == optimizer.step
