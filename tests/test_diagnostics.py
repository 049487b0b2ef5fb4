"""Diagnostics of every norm layer: found and named in any model, measured without disturbing training, written per
job (and cut back on resume), and drawn by the aggregator."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT
from test_results import make_job

from normsweep.config.checks import compose_run
from normsweep.config.norms import norm_record
from normsweep.job import run as job_module
from normsweep.job.build import Job, build
from normsweep.job.data import load
from normsweep.job.diagnostics import LAYER_METRICS, Diagnostics
from normsweep.job.layers import norm_factory
from normsweep.job.train import Compute
from normsweep.results.write import report as aggregate_report
from normsweep.sweep.files import DIAGNOSTICS_COLUMNS, write_diagnostics

SMALL = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.size=240", "dataset.classes=4"]
TIMINGS = ("epoch_seconds", "images_per_second")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models: threads only add overhead (conftest restores the count)


def _setup(overrides: list[str]) -> Job:
    return build(compose_run([*SMALL, *overrides]), torch.device("cpu"))


def _values(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["layer"], r["metric"]): r["value"] for r in rows}


@pytest.mark.parametrize(
    "model, norm, layers",
    [
        ("simple_cnn", "none", ["features.1", "features.4"]),
        ("simple_cnn", "bn", ["features.1", "features.4"]),
        ("simple_cnn", "frn", ["features.1", "features.3"]),  # FRN brings its own activation: no ReLU between
        ("deep_cnn", "gn", ["features.1", "features.5", "features.9"]),
        ("mlp", "ln", ["net.2"]),
        (
            "resnet20",
            "none",  # SkipInit's identities count as slots too, in forward order (branch, then shortcut)
            ["features.1", "features.3.branch.1", "features.3.branch.4", "features.4.branch.1",
             "features.4.branch.4", "features.4.shortcut.1"],
        ),
    ],
)  # fmt: skip
def test_every_norm_layer_is_found_named_and_measured(model: str, norm: str, layers: list[str]) -> None:
    extra = ["model.blocks=[1,1]", "model.widths=[4,8]"] if model == "resnet20" else []
    rows = _setup([f"model={model}", f"norm={norm}", *extra]).probe().measure(epoch=1)
    per_layer = [r for r in rows if r["depth"] > 0]
    assert list(dict.fromkeys(r["layer"] for r in per_layer)) == layers
    assert [r["depth"] for r in per_layer[:: len(LAYER_METRICS)]] == list(range(1, len(layers) + 1))
    assert {r["metric"] for r in per_layer} == set(LAYER_METRICS)
    assert all(math.isfinite(r["value"]) for r in rows)
    values = _values(rows)
    assert values[(layers[0], "grad_norm")] > 0 and values[(layers[0], "update_ratio")] == 0  # no step taken yet
    if norm == "none":  # the identity passes its input through unchanged
        assert values[(layers[0], "out_std")] == pytest.approx(values[(layers[0], "in_std")])


def test_a_users_model_and_norm_are_measured_without_changing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "own_model"))
    from my_models import TinyResNet

    data = load(compose_run(SMALL).dataset, 0.2, 0)
    factory = norm_factory(norm_record({"_target_": "my_norms.MyLayerNorm"}, "myln"), "tiny_resnet")
    model = TinyResNet(1, (8, 8), 4, factory, width=4)
    rows = Diagnostics(model, factory.slots(model), data, 64, seed=0, compute=Compute()).measure(epoch=1)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    assert layers == ["stem.1.0", "blocks.0.1.0", "blocks.0.3", "blocks.1.1.0", "blocks.1.3", "model"]
    assert all(math.isfinite(r["value"]) for r in rows)
    sys.modules.pop("my_models", None)


def test_the_norm_layer_sees_the_gradient_of_its_input_even_before_an_inplace_relu() -> None:
    # norm=none: the identity's output is its input, and the in-place ReLU after it overwrites that tensor.
    job = _setup(["norm=none"])
    probe = job.probe()
    values = _values(probe.measure(epoch=1))
    f = job.model.features
    first = f[0](probe.images)
    first.retain_grad()
    logits = job.model.classifier(f[7](f[6](torch.relu(f[3](torch.relu(first))))))
    (torch.nn.functional.cross_entropy(logits, probe.labels, reduction="sum") / len(probe.labels)).backward()
    assert values[("features.1", "grad_norm")] == pytest.approx(first.grad.norm().item(), rel=1e-4)


def _train(norm: str, batch_size: int, epochs: int = 1, diagnose: bool = False):
    """(the job, its history, its diagnostics rows) of a short training on the small data set."""
    job = _setup([f"norm={norm}", f"batch_size={batch_size}", f"epochs={epochs}"])
    probe = job.probe() if diagnose else None
    rows: list[dict] = []
    history = job.train(diagnose=(lambda epoch: rows.extend(probe.measure(epoch))) if probe else None)
    return job, history, rows


@pytest.mark.slow  # trains at batch size 2 for seconds
def test_train_eval_gap_is_zero_for_layernorm_and_not_for_batchnorm_at_a_tiny_batch() -> None:
    gaps = {}
    for norm in ("ln", "bn"):
        rows = _train(norm, batch_size=2, diagnose=True)[-1]
        gaps[norm] = _values(rows)[("model", "train_eval_gap")]
    assert abs(gaps["ln"]) < 1e-5  # LayerNorm normalizes each image alone: the same in both modes
    assert abs(gaps["bn"]) > 0.01  # batch statistics of 2 images vs running statistics


def test_the_probe_changes_no_state() -> None:
    job = _train("bn", batch_size=16)[0]  # running statistics away from their initial values
    model, probe = job.model, job.probe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]  # the last training step's
    rng = torch.get_rng_state()
    probe.measure(epoch=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm's running statistics
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state()) and model.training


def test_training_with_diagnostics_gives_the_same_numbers_as_without() -> None:
    without = _train("bn", batch_size=32, epochs=2)[1]
    with_, rows = _train("bn", batch_size=32, epochs=2, diagnose=True)[1:]
    strip = lambda history: [{k: v for k, v in asdict(m).items() if k not in TIMINGS} for m in history]  # noqa: E731
    assert strip(with_) == strip(without)
    ratios = [r["value"] for r in rows if r["metric"] == "update_ratio"]
    assert len({r["epoch"] for r in rows}) == 2 and all(0 < r < 10 for r in ratios)  # the weights moved


def _run_job(job_dir: Path, epochs: int = 3) -> dict:
    run = replace(compose_run([*SMALL, f"epochs={epochs}", "batch_size=32"]), threads=1)
    return job_module.run_job(run, job_dir, [], {"epochs": epochs})


def test_diagnostics_csv_is_written_and_cut_back_to_the_checkpoint_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_job(tmp_path / "whole")
    whole = pd.read_csv(tmp_path / "whole" / "diagnostics.csv")
    assert list(whole.columns) == DIAGNOSTICS_COLUMNS
    assert sorted(whole["epoch"].unique()) == [1, 2, 3] and set(whole["layer"]) == {"features.1", "features.4", "model"}

    real_save = job_module.save_checkpoint

    def killed_in_epoch_3(
        job_dir: Path, state: dict, write=None
    ) -> None:  # after epoch 3's diagnostics, before its checkpoint
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        real_save(job_dir, state, write)

    monkeypatch.setattr(job_module, "save_checkpoint", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run_job(tmp_path / "killed")
    left = pd.read_csv(tmp_path / "killed" / "diagnostics.csv")
    assert sorted(left["epoch"].unique()) == [1, 2, 3]  # epoch 3's rows were written, its checkpoint was not
    monkeypatch.setattr(job_module, "save_checkpoint", real_save)
    assert _run_job(tmp_path / "killed")["resumed_from_epoch"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / "diagnostics.csv"), whole)  # once, and equal


@pytest.mark.parametrize("side_by_side", [False, True])  # True: report.md written while diagnostics.png is drawn
def test_the_aggregator_draws_diagnostics_png_and_reports_its_numbers(tmp_path: Path, side_by_side: bool) -> None:
    for num, (norm, seed) in enumerate([("bn", 0), ("bn", 1), ("none", 0), ("none", 1)]):
        job = make_job(tmp_path, num, [f"norm={norm}", f"seed={seed}", "epochs=3"], 90.0 + num, seed)
        rows = [
            {"epoch": e, "layer": layer, "depth": d, "metric": m, "value": (1 + d) * e * (2 if norm == "none" else 1)}
            for e in (1, 2, 3)
            for d, layer in ((1, "features.1"), (2, "features.4"))
            for m in LAYER_METRICS
        ]
        gap = {"layer": "model", "depth": 0, "metric": "train_eval_gap", "value": 0.1 * seed}
        rows += [{"epoch": e, **gap} for e in (1, 2, 3)]
        write_diagnostics(job, rows)
    aggregate_report(tmp_path, side_by_side=side_by_side)
    assert (tmp_path / "diagnostics.png").stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "![input std, gradient norm and update ratio" in report
    # none's input std at depth 2 in epoch 3: (1 + 2) * 3 * 2, the mean over its two seeds; its gap 0.05
    assert "| norm=none | 2 features.4 | 6 | 18 | 6 | 18 | 18 |" in report
    assert "| norm=bn | 0.05 | 0.05 |" in report


def test_a_sweep_without_diagnostics_has_no_figure_and_no_section(tmp_path: Path) -> None:
    make_job(tmp_path, 0, ["norm=bn", "seed=0"], 90.0, 0)
    aggregate_report(tmp_path)
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "diagnostics.png").exists()
    assert "Inside the network" not in (tmp_path / "report.md").read_text()


def test_a_sweep_writes_diagnostics_in_every_job_and_the_figure(five_norm_sweep) -> None:
    sweep, proc = five_norm_sweep  # the quickstart's norms, two seeds, two epochs (conftest.py)
    jobs = sorted(d for d in sweep.iterdir() if (d / "summary.json").is_file())
    assert len(jobs) == 10
    for job in jobs:
        rows = pd.read_csv(job / "diagnostics.csv")
        assert list(rows.columns) == DIAGNOSTICS_COLUMNS
        assert set(rows["epoch"]) == {1, 2} and rows["value"].notna().all()
    assert (sweep / "diagnostics.png").is_file() and "diagnostics.png" in proc.stdout


@pytest.mark.slow  # trains for seconds in-process
def test_the_benchmark_gives_the_diagnostics_cost_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_bench import TINY

    from normsweep.bench import main as bench_main

    assert (
        bench_main([*TINY, "--norm", "bn", "--repeats", "1", "--diagnostics", "4000", "--out", str(tmp_path / "b")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "diagnostics_s diagnostics/epoch" in printed and "over a 4000-image training epoch" in printed
    runs = pd.read_csv(tmp_path / "b").set_index("variant")
    assert runs.loc["diagnostics", "seconds"] > 0
