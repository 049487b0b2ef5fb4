"""The aggregator turns job folders into runs.csv, results.csv and curves.png (no torch involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normsweep.aggregate import main as aggregate_main
from normsweep.results import aggregate, atomic_write, format_table, parse_overrides

# val_acc per (norm, seed): bn is best on average, none worst.
VAL = {
    ("bn", 0): 95.0,
    ("bn", 1): 97.0,
    ("none", 0): 80.0,
    ("none", 1): 84.0,
    ("gn", 0): 90.0,
    ("gn", 1): 92.0,
}


def make_job(sweep: Path, num: int, overrides: list[str], val_acc: float, seed: int, epochs: int = 3) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    metrics = pd.DataFrame(
        {
            "epoch": range(1, epochs + 1),
            "train_loss": [1.0 / e for e in range(1, epochs + 1)],
            "train_acc": [val_acc - 5] * epochs,
            "val_loss": [0.5] * epochs,
            "val_acc": [val_acc - 10 * (epochs - e) for e in range(1, epochs + 1)],
            "lr": [1e-3] * epochs,
            "epoch_seconds": [0.5] * epochs,
            "images_per_second": [1000.0] * epochs,
        }
    )
    metrics.to_csv(job / "metrics.csv", index=False)
    summary = {
        "status": "completed",
        "epochs_completed": epochs,
        "final_val_acc": val_acc,
        "final_val_loss": 0.5,
        "best_val_acc": val_acc + 1,
        "final_train_loss": 1.0 / epochs,
        "final_train_acc": val_acc - 5,
        "test_acc": val_acc - 1,
        "test_loss": 0.6,
        "params": 1234,
        "device": "cpu",
        "sec_per_epoch": 0.5,
        "wall_seconds": 2.0,
        "seed": seed,
        "overrides": overrides,
        "model": "simple_cnn",
        "norm": "bn",
        "optimizer": "adam",
        "dataset": "digits",
    }
    (job / "summary.json").write_text(json.dumps(summary))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for num, ((norm, seed), val) in enumerate(VAL.items()):
        make_job(tmp_path, num, [f"norm={norm}", f"seed={seed}", "epochs=3"], val, seed)
    return tmp_path


def test_results_has_one_row_per_norm_with_seeds_averaged(sweep: Path) -> None:
    report = aggregate(sweep)
    results = pd.read_csv(sweep / "results.csv")
    assert list(results["norm"]) == ["bn", "gn", "none"]  # best mean validation accuracy first
    assert list(results["runs"]) == [2, 2, 2]
    bn = results.iloc[0]
    assert bn["val_acc_mean"] == pytest.approx(96.0)
    assert bn["val_acc_std"] == pytest.approx(pd.Series([95.0, 97.0]).std(), rel=1e-5)
    assert bn["test_acc_mean"] == pytest.approx(95.0) and bn["best_val_acc_mean"] == pytest.approx(97.0)
    assert bn["status"] == "completed" and bn["params"] == 1234
    assert list(results.columns) == [
        "norm",
        "epochs",
        "runs",
        "val_acc_mean",
        "val_acc_std",
        "best_val_acc_mean",
        "test_acc_mean",
        "test_acc_std",
        "val_loss_mean",
        "train_loss_mean",
        "sec_per_epoch_mean",
        "params",
        "status",
    ]
    assert report.varying == ["norm"]


def test_runs_csv_has_one_row_per_job(sweep: Path) -> None:
    aggregate(sweep)
    runs = pd.read_csv(sweep / "runs.csv")
    assert len(runs) == 6
    assert set(zip(runs["norm"], runs["seed"])) == set(VAL)
    assert {"status", "val_acc", "test_acc", "best_val_acc", "train_loss", "params"} <= set(runs.columns)


def test_curves_png_is_written(sweep: Path) -> None:
    aggregate(sweep)
    png = (sweep / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_printed_table_shows_swept_keys_and_fixed_ones(sweep: Path) -> None:
    text = format_table(aggregate(sweep))
    header = text.splitlines()[0].split()
    assert header[:2] == ["norm", "runs"] and "val_acc_std" in header and "epochs" not in header
    # Group choices every job shared, then overrides that did not vary; the swept norm is not among them.
    assert "same in every run: model=simple_cnn optimizer=adam dataset=digits epochs=3" in text
    assert text.index("bn") < text.index("none")


def test_two_swept_keys_give_one_row_per_pair(tmp_path: Path) -> None:
    num = 0
    for norm in ("bn", "gn"):
        for bs in (16, 64):
            make_job(tmp_path, num, [f"norm={norm}", f"batch_size={bs}"], 90 + num, seed=0)
            num += 1
    results = aggregate(tmp_path).results
    assert len(results) == 4 and set(zip(results["norm"], results["batch_size"])) == {
        ("bn", 16),
        ("bn", 64),
        ("gn", 16),
        ("gn", 64),
    }
    assert results["batch_size"].dtype.kind == "i"


def test_a_job_that_has_not_started_is_reported_not_dropped(sweep: Path) -> None:
    (sweep / "9" / ".hydra").mkdir(parents=True)
    (sweep / "9" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["norm=ln", "seed=0", "epochs=3"]))
    results = aggregate(sweep).results
    assert len(results) == 4
    assert results.set_index("norm").loc["ln", "status"] == "not started"


def test_overrides_parsing() -> None:
    assert parse_overrides(["norm=bn", "+extra=1", "optimizer.lr=0.01", "~dataset.root", "x=a=b"]) == {
        "norm": "bn",
        "extra": "1",
        "optimizer.lr": "0.01",
        "x": "a=b",
    }


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    atomic_write(target, "old\n")
    atomic_write(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_aggregate_command_on_an_existing_sweep(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert aggregate_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "val_acc_mean" in out and str(sweep / "results.csv") in out
    assert (sweep / "results.csv").is_file()


def test_aggregate_command_on_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        aggregate_main([str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_printed_table_keeps_small_swept_values(tmp_path: Path) -> None:
    for num, lr in enumerate(("1e-3", "1e-2", "3e-4")):
        make_job(tmp_path, num, [f"optimizer.lr={lr}"], 90.0 + num, seed=0)
    text = format_table(aggregate(tmp_path))
    assert "0.001 " in text and "0.0003 " in text and "0.01 " in text
    assert "92.00" in text


def test_aggregate_command_on_a_folder_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        aggregate_main([str(tmp_path)])
    assert exit_.value.code == 2 and "no normsweep jobs in" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()
