"""A run that learned nothing is `stalled`: named by the job from its last epoch, kept on resume, shown in the table,
counted under it, explained in report.md with what reached its norm layers, and visible in diagnostics.png."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_results import make_job

from normsweep.config.checks import compose_run
from normsweep.job.run import run_job
from normsweep.job.train import EpochMetrics
from normsweep.results.tables import format_table
from normsweep.results.write import report as aggregate_report
from normsweep.sweep.files import write_diagnostics

SMALL = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.size=300", "dataset.classes=4", "epochs=1"]


def epoch(train_loss: float, val_acc: float) -> EpochMetrics:
    return EpochMetrics(1, train_loss, 10.0, 2.3, val_acc, 0.1, 1.0, 1.0)


@pytest.mark.parametrize(
    "train_loss, val_acc, stalled",
    [
        # Real first epochs on Fashion-MNIST (dataset.train_size=6000, simple_cnn; docs/results.md, "A job is stalled").
        (2.3117, 9.475, True),  # experiment=gn_batch_size norm=bn batch_size=2: no gradient at the norm layers
        (2.2916, 9.475, True),  # ... norm=gn batch_size=8
        (2.2706, 15.89, False),  # ... norm=bn batch_size=8: a slow start, its val_loss already 2.12
        (2.2983, 66.94, False),  # ... norm=bn batch_size=32: the loss averaged over a first epoch still near ln(10)
        (4.2871, 58.91, False),  # norm=bn optimizer.lr=0.01 (Adam): a rough first epoch
        (2.2874, 30.43, False),  # norm=none optimizer=sgd optimizer.lr=0.0001: slow, the loss near ln(10)
    ],
)
def test_a_run_is_stalled_only_at_both_the_loss_of_a_guess_and_chance_accuracy(
    train_loss: float, val_acc: float, stalled: bool
) -> None:
    assert epoch(train_loss, val_acc).at_chance(10, chance_acc=10.47) is stalled


def test_a_job_that_learned_nothing_ends_stalled_and_is_kept_on_resume(tmp_path: Path, caplog) -> None:
    # The weights barely move, over more than STALL_MIN_STEPS steps (~190 images at batch 2).
    run = replace(compose_run([*SMALL, "optimizer.lr=1e-9", "batch_size=2"]), threads=1, diagnostics=False)
    summary = run_job(run, tmp_path, [], {})
    assert summary["status"] == "stalled" and summary["classes"] == 4
    assert summary["final_val_acc"] <= 1.2 * summary["chance_acc"]
    assert "stalled: train_loss" in caplog.text and "the model learned nothing" in caplog.text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["status"] == "stalled"
    assert run_job(run, tmp_path, [], {})["wall_seconds"] == summary["wall_seconds"]  # kept, not trained again


def test_a_run_too_short_to_have_started_is_not_called_stalled(tmp_path: Path) -> None:
    run = replace(compose_run([*SMALL, "optimizer.lr=1e-9"]), threads=1, diagnostics=False)  # 3 steps at batch 64
    summary = run_job(run, tmp_path, [], {})
    assert summary["final_val_acc"] <= 1.2 * summary["chance_acc"] and summary["status"] == "completed"


def test_a_job_that_learns_is_completed(tmp_path: Path) -> None:
    run = replace(compose_run([*SMALL, "epochs=3"]), threads=1, diagnostics=False)
    assert run_job(run, tmp_path, [], {})["status"] == "completed"


def _sweep(tmp_path: Path, epochs: int = 3) -> Path:
    """bn at batch 32 learns; bn and gn at batch 2 stall: no gradient reaches their norm layers."""
    for num, (norm, batch, stalled) in enumerate([("bn", 32, False), ("bn", 2, True), ("gn", 2, True)]):
        job = make_job(tmp_path, num, [f"norm={norm}", f"batch_size={batch}", "seed=0"], 10.0 if stalled else 80.0, 0)
        summary = json.loads((job / "summary.json").read_text())
        summary.update(classes=10, chance_acc=10.3, status="stalled" if stalled else "completed")
        summary.update(final_train_loss=2.3117 if stalled else 0.9)
        (job / "summary.json").write_text(json.dumps(summary))
        rows = [
            {"epoch": e, "layer": layer, "depth": d, "metric": m, "value": 0.0 if stalled and m == "grad_norm" else d}
            for e in range(1, epochs + 1)
            for d, layer in ((1, "features.1"), (2, "features.4"))
            for m in ("in_std", "grad_norm", "update_ratio")
        ]
        write_diagnostics(job, rows)
    return tmp_path


def test_stalled_runs_are_shown_counted_and_explained(tmp_path: Path) -> None:
    report = aggregate_report(_sweep(tmp_path))
    results = report.results.set_index(["norm", "batch_size"])
    assert results.loc[("bn", 2), "status"] == "stalled" and results.loc[("bn", 2), "runs"] == 1
    table = format_table(report)
    assert "2 runs stalled at chance (norm=bn batch_size=2 and norm=gn batch_size=2)" in table
    text = (tmp_path / "report.md").read_text()
    assert "## Stalled runs" in text
    assert "| norm=bn batch_size=2 (stalled) | 2.3117 | 2.3026 | 10 | 10.3 | 1 features.1 | 0 | 1 |" in text
    assert "| norm=bn batch_size=32 (best) | 0.9000 | 2.3026 | 80 | 10.3 | 2 features.4 | 2 | 2 |" in text


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk's width and height


def test_diagnostics_png_keeps_a_zero_gradient_and_draws_a_single_epoch_once(tmp_path: Path) -> None:
    aggregate_report(_sweep(tmp_path / "three"))
    aggregate_report(_sweep(tmp_path / "one", epochs=1))
    three, one = _png_size(tmp_path / "three" / "diagnostics.png"), _png_size(tmp_path / "one" / "diagnostics.png")
    assert one[0] == pytest.approx(three[0] * 2 / 3, rel=0.01) and one[1] == three[1]  # two panels a row, not three
    assert "at epoch 1, the only one" in (tmp_path / "one" / "report.md").read_text()


def test_the_chance_accuracy_is_the_largest_class_share_of_the_validation_split(tmp_path: Path) -> None:
    run = replace(compose_run(SMALL), threads=1, diagnostics=False)
    summary = run_job(run, tmp_path, [], {})
    from normsweep.job.data import load

    val = load(run.dataset, run.val_fraction, run.seed).val.labels
    assert summary["chance_acc"] == pytest.approx(100 * torch.bincount(val).max().item() / len(val))
    assert math.isclose(summary["train_images"] + len(val), 240)
