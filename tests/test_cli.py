"""End to end, as a user runs it: `python -m normsweep ...` in a fresh process, files checked on disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import NORMS, make_mnist, run_cli, run_cli_here

from normsweep.config.checks import options
from normsweep.sweep.files import METRIC_COLUMNS


def test_sweep_writes_results_with_one_row_per_norm(five_norm_sweep) -> None:
    sweep, _ = five_norm_sweep
    results = pd.read_csv(sweep / "results.csv")
    assert sorted(results["norm"]) == sorted(NORMS)
    assert list(results["runs"]) == [2] * 5
    assert (results["status"] == "completed").all()
    assert results["val_acc_mean"].is_monotonic_decreasing
    assert results.set_index("norm").loc["bn", "test_acc_mean"] > 50  # chance is 10%
    assert results["val_acc_std"].notna().all()


def test_sweep_writes_runs_curves_and_per_job_files(five_norm_sweep) -> None:
    sweep, _ = five_norm_sweep
    runs = pd.read_csv(sweep / "runs.csv")
    assert len(runs) == 10 and set(runs["seed"]) == {0, 1}
    assert (sweep / "curves.png").stat().st_size > 10_000
    for num in range(10):
        job = sweep / str(num)
        metrics = pd.read_csv(job / "metrics.csv")
        assert list(metrics.columns) == METRIC_COLUMNS
        assert list(metrics["epoch"]) == [1, 2]
        assert metrics["val_acc"].between(0, 100).all()
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["epochs_completed"] == 2
        assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and summary["params"] > 0
        assert 0 <= summary["test_acc"] <= 100 and summary["test_loss"] > 0
        assert summary["final_val_acc"] == pytest.approx(metrics["val_acc"].iloc[-1], rel=1e-5)
        assert "Epoch 2/2 train_loss" in (job / "normsweep.log").read_text()


def test_sweep_prints_the_table_and_where_it_is(five_norm_sweep) -> None:
    sweep, proc = five_norm_sweep
    assert "val_acc_mean" in proc.stdout and str(sweep / "results.csv") in proc.stdout
    table = proc.stdout[proc.stdout.index("val_acc_mean") - 40 :]
    for norm in NORMS:
        assert f" {norm} " in table or f"\n{norm} " in table


def test_overrides_from_the_shell_take_effect(tmp_path: Path) -> None:
    proc = run_cli_here(
        [
            "optimizer=sgd",
            "optimizer.lr=0.05",
            "epochs=3",
            "batch_size=32",
            "model=mlp",
            "norm=bn",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["optimizer"]["name"] == "sgd" and saved["optimizer"]["lr"] == 0.05
    assert (saved["epochs"], saved["batch_size"]) == (3, 32)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3] and (metrics["lr"] == 0.05).all()
    summary = json.loads((run / "summary.json").read_text())
    # MLP on 8x8 digits: 64→128 linear, BatchNorm1d(128), 128→10 linear.
    assert summary["params"] == (64 * 128 + 128) + 2 * 128 + (128 * 10 + 10)
    assert summary["model"] == "mlp" and summary["optimizer"] == "sgd"


def test_same_seed_same_metrics_run_after_run(five_norm_sweep, tmp_path: Path) -> None:
    sweep, _ = five_norm_sweep
    # The sweep's job norm=gn seed=0 ran in another process: the same command again gives the same numbers.
    (job,) = [d for d in sweep.iterdir() if (d / "summary.json").is_file() and _is(d, norm="gn", seed=0)]
    proc = run_cli(["epochs=2", "norm=gn", "seed=0", f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def metrics(folder: Path) -> pd.DataFrame:
        return pd.read_csv(folder / "metrics.csv").drop(columns=["epoch_seconds", "images_per_second"])

    pd.testing.assert_frame_equal(metrics(tmp_path / "again"), metrics(job))


def _is(job: Path, **settings: object) -> bool:
    summary = json.loads((job / "summary.json").read_text())
    return all(summary[key] == value for key, value in settings.items())


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=mlp", "norm=in"], "model=mlp norm=in"),
        (["norm=gn", "norm.groups=5"], "layer conv1: norm.groups=5 does not divide its 32 channels"),
        (["epochs=0"], "epochs=0"),
        (["dataset=cifar10"], "dataset.download=true"),
    ],
)
def test_user_errors_are_one_clear_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    # In this process: refused before any job starts (a real process's refusal: test_faults.py, test_user_paths.py).
    proc = run_cli_here([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert message in output and "Traceback" not in output
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize(
    "args, line",
    [
        (["epochs=abc"], "epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["-m", "norm=bn,gn", "epochs=abc"], "epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["epoch=2"], "epoch: normsweep has no such setting; did you mean epochs?"),
        (["-m", "norm=bn,gn", "epoch=2"], "epoch: normsweep has no such setting; did you mean epochs?"),
        (["norm=gn", "norm.group=2"], "norm.group: norm=gn has no such key; did you mean norm.groups?"),
        (["optimizer.lrr=0.1"], "optimizer.lrr: optimizer=adam has no such key; did you mean optimizer.lr?"),
        (["model.hiden=32"], "model.hiden: model=simple_cnn has no such key; did you mean model.hidden?"),
        (["+model.hiden=32"], "model.hiden: model=simple_cnn has no such key; did you mean model.hidden?"),
        (["-m", "norm=bn,gn", "+model.hiden=32"], "model.hiden: model=simple_cnn has no such key; did you mean"),
        (["norm=gn", "+norm.grups=2"], "norm.grups: norm=gn has no such key; did you mean norm.groups?"),
        (["+dataset.rooot=/x"], "dataset.rooot: dataset=digits has no such key; did you mean dataset.root?"),
        (["-m", "norm=bn,nonexistent"], "norm=nonexistent: no such option in conf/norm/; choose one of bn, frn, gn"),
        (["optimizer.lr=[1"], "cannot read the command line (no viable alternative at input '[1')"),
    ],
)
def test_what_hydra_refuses_is_one_line_exit_2_and_no_folder(tmp_path: Path, args: list[str], line: str) -> None:
    proc = run_cli_here([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    lines = [_without_log_prefix(text) for text in (proc.stdout + proc.stderr).splitlines() if text.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def _without_log_prefix(line: str) -> str:
    """A log line's text: `[2026-12-04 21:40:57,849][normsweep][ERROR] - ` or `[...][HYDRA] ` taken off."""
    return re.sub(r"^(\[[^\]]*\])+( - )?\s*", "", line)


@pytest.mark.parametrize(
    "args, lines",
    [
        (["norm=bn,gn", "optimizer.lr=-0.01"], ["optimizer.lr=-0.01: the learning rate must be a number > 0"]),
        (
            ["norm=bn,in", "batch_size=1", "val_fraction=0.2,1.5"],
            [
                "norm=bn batch_size=1: this norm takes its statistics over the batch and needs at least 2 images per "
                "batch; use batch_size=2 or more, or a per-sample norm (ln, ln2d, rms, in, gn, ws_gn, frn) (1 of 4 "
                "jobs: norm=bn val_fraction=0.2)",
                "val_fraction=1.5: it is the share of the training set held out for validation, strictly between 0 "
                "and 1 (e.g. val_fraction=0.2) (2 of 4 jobs: norm=bn val_fraction=1.5, norm=in val_fraction=1.5)",
            ],
        ),
        (
            ["model=mlp,simple_cnn", "norm=bn,in"],
            [
                "model=mlp norm=in: layer fc1 has fc features (N, C), and norm=in normalizes feature maps (N, C, H, W) "
                "only (its statistics need spatial positions); use a convolutional model (model=simple_cnn, deep_cnn, "
                "resnet20 or resnet18) or another norm (1 of 4 jobs: model=mlp norm=in)"
            ],
        ),
        (
            ["norm=bn,gn", "model._target_=nosuchpackage.Net"],
            [
                "model=simple_cnn: cannot import _target_=nosuchpackage.Net (No module named 'nosuchpackage'); the "
                "module must be importable from where normsweep runs (run from its folder, set PYTHONPATH, or pip "
                "install it)"
            ],
        ),
    ],
)
def test_a_sweep_is_checked_whole_before_any_job_starts(tmp_path: Path, args: list[str], lines: list[str]) -> None:
    # Every job's config goes through a single run's checks first: each mistake said once, in the order of the jobs
    # (naming the jobs it affects when not all), exit 2, and no sweep folder.
    proc = run_cli_here(["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    said = [_without_log_prefix(text) for text in (proc.stdout + proc.stderr).splitlines() if text.strip()]
    assert proc.returncode == 2
    assert said == lines
    assert not (tmp_path / "sweep").exists()


def test_torchvision_data_set_end_to_end(tmp_path: Path) -> None:
    make_mnist(tmp_path / "data")
    proc = run_cli_here(
        ["dataset=mnist", "epochs=1", "model=deep_cnn", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "mnist" and summary["epochs_completed"] == 1
    assert "96 train / 24 val / 40 test images, 1x28x28, 10 classes" in proc.stdout


def test_help_lists_every_preset_in_conf_experiment(tmp_path: Path) -> None:
    proc = run_cli_here(["--help"], tmp_path)
    presets = re.search(r"# presets: (.+)", proc.stdout)
    assert proc.returncode == 0 and presets is not None, proc.stdout
    assert presets.group(1).strip().split(", ") == options("experiment")  # a preset added is a preset shown
