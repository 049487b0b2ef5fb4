"""The aggregator turns job folders into runs.csv, results.csv and curves.png (no torch involved)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normsweep.aggregate import main as aggregate_main
from normsweep.results.tables import RESULT_COLUMNS, format_best, format_table, lines_against, problems
from normsweep.results.write import aggregate, report
from normsweep.sweep.files import atomic_write, parse_overrides, write_summary
from normsweep.sweep.liveness import process_start

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
    assert list(results.columns) == ["norm", "epochs", *RESULT_COLUMNS]  # swept and same-in-every-run keys first
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
    (tmp_path / "plain.txt").write_text("x")  # shared as any file the user writes, not owner-only
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


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


def _pid_of_a_finished_process() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _broken_job(sweep: Path, num: int, norm: str, summary_text: str | None, metric_rows: int = 0) -> Path:
    job = make_job(sweep, num, [f"norm={norm}", "seed=0", "epochs=3"], 50.0, seed=0, epochs=3)
    (job / "summary.json").unlink()
    if summary_text is not None:
        (job / "summary.json").write_text(summary_text)
    metrics = pd.read_csv(job / "metrics.csv")
    metrics.head(metric_rows).to_csv(job / "metrics.csv", index=False)
    return job


@pytest.mark.parametrize(
    "summary, rows, status, error",
    [
        (None, 0, "not started", None),
        ({"status": "running", "pid": os.getpid()}, 2, "running", None),  # this very process: alive
        ({"status": "running", "pid": "dead"}, 2, "incomplete", None),
        ({"status": "running", "pid": os.getpid(), "host": "another-machine"}, 1, "running", None),
        ({"status": "incomplete"}, 1, "incomplete", None),
        ({"status": "failed", "error": "CUDA out of memory"}, 0, "failed", "CUDA out of memory"),
        ("", 2, "corrupt", "summary.json cannot be read: it is empty"),
        ('{"status": "compl', 2, "corrupt", "summary.json cannot be read: it is not valid JSON"),
        ("[1, 2]", 0, "corrupt", "summary.json holds no job status"),
    ],
)
def test_every_folder_state_is_reported_in_its_row_and_the_others_are_kept(
    sweep: Path, summary: dict | str | None, rows: int, status: str, error: str | None
) -> None:
    if isinstance(summary, dict):
        pid = _pid_of_a_finished_process() if summary.get("pid") == "dead" else summary.get("pid", os.getpid())
        summary = json.dumps({"host": socket.gethostname(), **summary, "pid": pid, "seed": 0, "norm": "ln"})
    _broken_job(sweep, 9, "ln", summary, metric_rows=rows)
    report = aggregate(sweep)
    run = report.runs.set_index("norm").loc["ln"]
    assert run["status"] == status
    assert pd.isna(run["error"]) if error is None else run["error"].startswith(error)
    if status in ("running", "incomplete"):
        assert run["epochs_completed"] == rows  # progress is counted from metrics.csv
    # The row has no result, so it neither counts as a run nor shows up in the curves or means...
    results = report.results.set_index("norm")
    assert results.loc["ln", "runs"] == 0 and pd.isna(results.loc["ln", "val_acc_mean"])
    assert results.loc["ln", "status"] == status and "ln" not in set(report.curves["norm"])
    # ...and every other job is still aggregated as before.
    assert results.loc["bn", "val_acc_mean"] == pytest.approx(96.0) and results.loc["bn", "runs"] == 2
    assert (sweep / "results.csv").is_file() and (sweep / "curves.png").is_file()


def test_failed_stopped_and_corrupt_jobs_each_get_a_line(sweep: Path) -> None:
    _broken_job(sweep, 7, "ln", json.dumps({"status": "failed", "error": "RuntimeError: boom\nsecond line"}))
    _broken_job(sweep, 8, "in", json.dumps({"status": "incomplete"}), metric_rows=2)
    _broken_job(sweep, 9, "none", "")
    lines = problems(aggregate(sweep))
    assert lines == [
        "failed: job 7 (norm=ln epochs=3 seed=0): RuntimeError: boom",
        "incomplete: job 8 (norm=in epochs=3 seed=0): stopped after epoch 2; "
        "run the same command with its folder to resume it",
        "corrupt: job 9 (norm=none epochs=3 seed=0): summary.json cannot be read: it is empty",
    ]


def test_an_unreadable_metrics_file_keeps_the_job_and_says_why(sweep: Path) -> None:
    (sweep / "0" / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage")
    report = aggregate(sweep)
    run = report.runs.set_index("job").loc["0"]
    assert run["status"] == "completed" and run["val_acc"] == 95.0
    assert run["error"].startswith("metrics.csv")


def test_diverged_jobs_count_as_results_with_their_status(sweep: Path) -> None:
    job = make_job(sweep, 9, ["norm=bn", "seed=2", "epochs=3"], 10.0, seed=2)
    summary = json.loads((job / "summary.json").read_text())
    summary.update(status="diverged", diverged_epoch=2, final_val_loss=None, final_train_loss=None)
    (job / "summary.json").write_text(json.dumps(summary))
    bn = aggregate(sweep).results.set_index("norm").loc["bn"]
    assert bn["runs"] == 3 and bn["status"] == "2 completed, 1 diverged"
    assert bn["val_acc_mean"] == pytest.approx((95 + 97 + 10) / 3)


def test_summary_json_stays_standard_json_when_the_loss_is_nan(tmp_path: Path) -> None:
    write_summary(tmp_path, {"status": "diverged", "final_val_loss": float("nan"), "losses": [1.0, float("inf")]})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["final_val_loss"] is None


def test_jobs_are_listed_by_number_whatever_else_the_folder_holds(tmp_path: Path) -> None:
    for num in (10, 9):
        make_job(tmp_path, num, [f"seed={num}"], 90.0, seed=num)
    make_job(tmp_path / "extra", 0, ["seed=0"], 90.0, seed=0)  # another sweep copied inside, say
    assert list(aggregate(tmp_path).runs["job"]) == ["9", "10", "extra/0"]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_a_reused_pid_or_a_zombie_is_not_the_job_still_running(sweep: Path) -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and stays a zombie until waited for
    deadline = time.monotonic() + 30
    while process_start(zombie.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    me = {"host": socket.gethostname(), "seed": 0, "status": "running"}
    _broken_job(sweep, 7, "ln", json.dumps({**me, "norm": "ln", "pid": os.getpid(), "pid_start": 1}))  # pid reused
    _broken_job(sweep, 8, "in", json.dumps({**me, "norm": "in", "pid": zombie.pid}))
    _broken_job(sweep, 9, "gn", json.dumps({**me, "pid": os.getpid(), "pid_start": process_start(os.getpid())}))
    status = aggregate(sweep).runs.set_index("job")["status"]
    zombie.wait()
    assert (status["7"], status["8"], status["9"]) == ("incomplete", "incomplete", "running")


def test_test_accuracy_gets_a_95_percent_interval_from_students_t(sweep: Path, tmp_path: Path) -> None:
    bn = aggregate(sweep).results.set_index("norm").loc["bn"]
    # Two seeds: test_acc 94 and 96, std √2, t(0.975, 1) = 12.706; mean ± 12.706 · √2 / √2.
    assert bn["test_acc_ci95"] == pytest.approx(12.7062, rel=1e-4)
    single = tmp_path / "single"
    make_job(single, 0, ["norm=bn"], 95.0, 0)
    assert pd.isna(aggregate(single).results.loc[0, "test_acc_ci95"])  # undefined for one run


def lr_sweep(root: Path) -> Path:
    """norm × lr × 2 seeds, where bn is best at lr 1e-3 and gn at 3e-3 (by validation accuracy)."""
    val = {("bn", 0.001): 95.0, ("bn", 0.003): 90.0, ("gn", 0.001): 88.0, ("gn", 0.003): 93.0}
    num = 0
    for (norm, lr), acc in val.items():
        for seed in (0, 1):
            make_job(root, num, [f"norm={norm}", f"optimizer.lr={lr}", f"seed={seed}"], acc + seed, seed)
            num += 1
    return root


def test_best_by_norm_takes_each_norm_at_its_own_best_learning_rate(tmp_path: Path) -> None:
    report = aggregate(lr_sweep(tmp_path))
    best = pd.read_csv(tmp_path / "best_by_norm.csv")
    assert list(best["norm"]) == ["bn", "gn"]
    assert list(best["optimizer.lr"]) == [0.001, 0.003]  # not one learning rate for all
    assert list(best["val_acc_mean"]) == [95.5, 93.5]
    assert list(best["test_acc_mean"]) == [94.5, 92.5]  # the test accuracy at that setting
    assert list(best["settings_tried"]) == [2, 2] and list(best["runs"]) == [2, 2]
    assert best["test_acc_ci95"].notna().all()
    assert report.best is not None and report.compare == "norm"


def test_the_compared_axis_can_be_named(tmp_path: Path) -> None:
    aggregate(lr_sweep(tmp_path), compare="optimizer.lr")
    best = pd.read_csv(tmp_path / "best_by_optimizer.lr.csv").set_index("optimizer.lr")
    assert best.loc[0.001, "norm"] == "bn" and best.loc[0.003, "norm"] == "gn"  # the best norm per learning rate
    with pytest.raises(ValueError, match="compare=foo: the jobs of this sweep have no key 'foo'"):
        aggregate(tmp_path, compare="foo")


def test_no_best_by_table_when_only_the_compared_axis_varies(sweep: Path) -> None:
    assert aggregate(sweep).best is None
    assert not (sweep / "best_by_norm.csv").exists()


def test_swept_data_sets_are_compared_apart_not_picked_from(tmp_path: Path) -> None:
    num = 0
    for dataset, bn_lr in (("digits", 0.001), ("mnist", 0.003)):
        for norm in ("bn", "gn"):
            for lr in (0.001, 0.003):
                acc = 95.0 if (norm == "bn" and lr == bn_lr) else 90.0 + (dataset == "mnist")
                make_job(tmp_path, num, [f"dataset={dataset}", f"norm={norm}", f"optimizer.lr={lr}"], acc, 0)
                num += 1
    best = aggregate(tmp_path).best
    assert best is not None and len(best) == 4  # (data set, norm) pairs
    rows = best.set_index(["dataset", "norm"])
    assert rows.loc[("digits", "bn"), "optimizer.lr"] == 0.001 and rows.loc[("mnist", "bn"), "optimizer.lr"] == 0.003


def test_aggregating_again_with_a_wrong_axis_is_refused_in_the_users_words(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        aggregate_main([str(lr_sweep(tmp_path)), "--compare", "optimzer.lr"])
    assert exit_info.value.code == 2
    assert "compare=optimzer.lr: the jobs of this sweep have no key" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()  # refused before writing anything
    aggregate_main([str(tmp_path), "--compare", "optimizer.lr"])
    assert "best by optimizer.lr (each at its best norm" in capsys.readouterr().out


def test_report_md_stands_on_its_own(tmp_path: Path) -> None:
    sweep = lr_sweep(tmp_path)
    for job in sweep.iterdir():
        summary = json.loads((job / "summary.json").read_text())
        summary.update(torch_version="2.14.1", hardware="Test CPU 9000")
        (job / "summary.json").write_text(json.dumps(summary))
    multirun = {
        "hydra": {
            "overrides": {
                "task": ["norm=bn,gn", "optimizer.lr=1e-3,3e-3", "seed=0,1"],
                "hydra": ["hydra/launcher=joblib", "hydra.mode=MULTIRUN"],
            },
            "runtime": {"config_sources": [{"path": "/home/me/my_conf", "schema": "file", "provider": "command-line"}]},
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    aggregate_main([str(sweep)])
    text = (sweep / "report.md").read_text()
    assert (
        "`python -m normsweep --config-dir /home/me/my_conf -m norm=bn,gn optimizer.lr=1e-3,3e-3 seed=0,1 "
        "hydra/launcher=joblib`" in text
    )
    assert "torch 2.14.1" in text and "device cpu (Test CPU 9000)" in text
    assert "## Results" in text and "## Best by norm" in text and "![" in text and "(curves.png)" in text
    # The tables are there in numbers, not only as pictures: the best bn row and its interval.
    bn_best = next(line for line in text.splitlines() if line.startswith("| bn | 0.001 | 2 | 95.50"))
    assert "| 6.35 |" in bn_best  # t(0.975, 1) · 0.71 / √2
    assert "| configuration | epoch 1 | epoch 2 | epoch 3 |" in text


def test_batch_size_sweeps_plot_test_accuracy_against_batch_size(tmp_path: Path) -> None:
    num = 0
    for norm in ("bn", "gn"):
        for batch in (2, 8, 32):
            acc = (60.0 + batch) if norm == "bn" else 90.0  # bn degrades at small batches, gn does not
            make_job(tmp_path, num, [f"norm={norm}", f"batch_size={batch}"], acc, 0)
            num += 1
    report = aggregate(tmp_path)
    lines = lines_against(report, "batch_size")
    assert list(lines[lines["norm"] == "bn"]["batch_size"]) == [2, 8, 32]
    assert list(lines[lines["norm"] == "bn"]["test_acc_mean"]) == [61.0, 67.0, 91.0]
    text = (tmp_path / "report.md").read_text() if (tmp_path / "report.md").exists() else ""
    assert text == ""  # aggregate() alone writes no report; the CLI and the sweep callback do
    aggregate_main([str(tmp_path)])
    assert "Test accuracy (%) by batch_size (curves.png):" in (tmp_path / "report.md").read_text()


def test_a_norm_with_no_finished_run_keeps_its_row_in_best_by_norm(tmp_path: Path) -> None:
    lr_sweep(tmp_path)
    for num in (4, 5, 6, 7):  # every gn job failed
        (tmp_path / str(num) / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    best = aggregate(tmp_path).best
    assert best is not None and list(best["norm"]) == ["bn", "gn"]
    gn = best.set_index("norm").loc["gn"]
    assert gn["runs"] == 0 and gn["settings_tried"] == 0 and gn["status"] == "failed"
    assert pd.isna(gn["val_acc_mean"]) and pd.isna(gn["optimizer.lr"])


def test_aggregation_asks_slurm_once_for_all_its_running_jobs(sweep: Path, monkeypatch) -> None:
    from normsweep.sweep import scheduler

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    for n, job in enumerate(jobs[:3]):  # three jobs recorded running under SLURM, as a killed allocation leaves them
        summary = json.loads((job / "summary.json").read_text()) | {"status": "running", "slurm_job": f"7_{n}"}
        (job / "summary.json").write_text(json.dumps(summary))
    asked: list[list[str]] = []

    def queue(ids: list[str]) -> dict:
        asked.append(ids)
        return {"7_0": scheduler.QueueEntry("RUNNING", "None")}  # 7_1 and 7_2 have ended (purged)

    monkeypatch.setattr(scheduler, "queue", queue)
    runs = aggregate(sweep).runs
    assert asked == [["7_0", "7_1", "7_2"]]  # one squeue call, not one per folder
    status = dict(zip(runs["job"].astype(str), runs["status"]))
    assert [status[job.name] for job in jobs[:3]] == ["running", "incomplete", "incomplete"]


def test_a_sweep_that_ran_no_job_writes_no_empty_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from normsweep.results.write import end_of_sweep

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra writes before its sweeper fails
    with pytest.raises(SystemExit) as exit_:
        end_of_sweep(tmp_path, "norm")
    assert exit_.value.code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun.yaml"]
    assert "no job ran in" in capsys.readouterr().err


def test_the_sweep_callback_aggregates_a_sweep_that_ended_and_leaves_one_stopped_by_an_exit_alone(sweep: Path) -> None:
    # Hydra 1.4 calls on_multirun_end in a `finally`: also while Ctrl-C or a refused launch ends the sweep, whose
    # exit status (130, 2) and last lines must stand. Hydra 1.3 calls it only after the jobs have ended.
    from omegaconf import OmegaConf

    from normsweep.sweep.callbacks import AggregateCallback

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "compare": "norm"})
    with pytest.raises(SystemExit) as ended:
        try:
            sys.exit(130)
        finally:
            AggregateCallback().on_multirun_end(config)
    assert ended.value.code == 130 and not (sweep / "results.csv").exists()
    AggregateCallback().on_multirun_end(config)
    assert (sweep / "results.csv").is_file()


def test_the_warm_aggregation_says_its_lines_in_order_on_their_streams(sweep: Path, capsys) -> None:
    # What the launcher of a sweep does at its end: the process started with the sweep aggregates, and its lines,
    # log records and exit status come back as if the aggregation had run in the launcher.
    from normsweep.sweep.callbacks import _aggregated_by

    broken = json.loads((sweep / "0" / "summary.json").read_text()) | {"status": "failed", "error": "boom"}
    (sweep / "0" / "summary.json").write_text(json.dumps(broken))
    warm = subprocess.Popen(
        [sys.executable, "-m", "normsweep.results.warm"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert _aggregated_by(warm, str(sweep), "norm") == 1  # a failed job: the end of the sweep says so, exit 1
    out, err = capsys.readouterr()
    assert out.index("norm runs") < out.index("results: ") and "failed: job 0" in out
    assert err.startswith("the job failed") or "jobs failed" in err
    assert (sweep / "results.csv").is_file() and (sweep / "report.md").is_file()


def _write_png(path: Path) -> None:
    atomic_write(path, b"\x89PNG drawn in " + str(os.getpid()).encode())


def _fail_to_draw(path: Path) -> None:
    raise ValueError(f"cannot draw {path.name}")


def test_figures_drawn_side_by_side_are_both_written_and_a_failure_there_is_not_lost(tmp_path: Path, capfd) -> None:
    from functools import partial

    from normsweep.results.write import _draw

    figures = [partial(_write_png, tmp_path / "curves.png"), partial(_write_png, tmp_path / "diagnostics.png")]
    meanwhile: list[tuple[int, bool]] = []  # report.md's turn: here, while the other process may still draw
    _draw(figures, True, lambda: meanwhile.append((os.getpid(), (tmp_path / "curves.png").is_file())))
    drawn_by = {(tmp_path / name).read_bytes().rsplit(b" ", 1)[1] for name in ("curves.png", "diagnostics.png")}
    assert str(os.getpid()).encode() in drawn_by and len(drawn_by) == 2  # the second one in a process of its own
    assert meanwhile == [(os.getpid(), True)]  # after this process's own figures
    with pytest.raises(RuntimeError, match="drawing .*diagnostics.png failed"):
        _draw(
            [partial(_write_png, tmp_path / "curves.png"), partial(_fail_to_draw, tmp_path / "diagnostics.png")], True
        )
    assert "ValueError: cannot draw diagnostics.png" in capfd.readouterr().err  # its traceback, said by it


def test_a_best_at_the_edge_of_its_grid_is_flagged_with_the_value_beyond(tmp_path: Path) -> None:
    # bn is best at the largest lr tried, gn inside the grid: only bn is flagged, in best_by_norm.csv and in words.
    scores = {("bn", 1e-4): 80.0, ("bn", 3e-4): 85.0, ("bn", 1e-3): 90.0}
    scores |= {("gn", 1e-4): 80.0, ("gn", 3e-4): 92.0, ("gn", 1e-3): 70.0}
    for num, ((norm, lr), val) in enumerate(scores.items()):
        make_job(tmp_path, num, [f"norm={norm}", f"optimizer.lr={lr}"], val, seed=0)
    report = aggregate(tmp_path)
    best = pd.read_csv(tmp_path / "best_by_norm.csv", keep_default_na=False)
    assert dict(zip(best["norm"], best["at_edge"])) == {"bn": "optimizer.lr largest", "gn": ""}
    text = format_best(report.best, "norm", report=report)
    assert (
        "the best optimizer.lr of bn is the largest tried (0.001): the best may lie beyond it; extend the grid "
        "(e.g. add optimizer.lr=0.0033)"
    ) in text
    assert "of gn" not in text


def test_two_values_tried_flag_no_edge(tmp_path: Path) -> None:
    for num, (lr, val) in enumerate([(1e-4, 80.0), (1e-3, 90.0)]):
        make_job(tmp_path, num, ["norm=bn", f"optimizer.lr={lr}"], val, seed=0)
    assert "extend the grid" not in format_table(aggregate(tmp_path))  # every best of two is at an edge


@pytest.mark.parametrize("compare", ["norm", "optimizer.lr"])
def test_one_swept_number_whose_best_is_its_smallest_is_flagged(tmp_path: Path, capsys, compare: str) -> None:
    # Under the best-by table (each norm at its best lr), or under the table when the lr is itself compared.
    for num, (lr, val) in enumerate([(1e-4, 95.0), (1e-3, 90.0), (1e-2, 85.0)]):
        make_job(tmp_path, num, ["norm=bn", f"optimizer.lr={lr}"], val, seed=0)
    report(tmp_path, compare)
    whose = " of bn" if compare == "norm" else ""
    said = f"the best optimizer.lr{whose} is the smallest tried (0.0001): the best may lie beyond it; extend the grid"
    assert capsys.readouterr().out.count(said) == 1


def test_rows_trained_under_different_recipes_are_flagged_with_the_keys_that_differ(tmp_path: Path) -> None:
    # An old folder extended today: its bn jobs kept the recipe they started with (saved before the fair recipe's
    # keys existed), the gn job added now trained with today's defaults.
    def config(norm: str, **optimizer: object) -> dict:
        return {"norm": {"name": norm}, "optimizer": {"name": "adam", "lr": 0.001, **optimizer}, "epochs": 3}

    today = {"decay_norm_and_bias": False, "schedule_step": "step", "warmup_epochs": 0}
    jobs = [("bn", 0, config("bn")), ("bn", 1, config("bn")), ("gn", 0, config("gn", **today))]
    for num, (norm, seed, saved) in enumerate(jobs):
        job = make_job(tmp_path, num, [f"norm={norm}", f"seed={seed}"], 90.0 + num, seed)
        summary = json.loads((job / "summary.json").read_text())
        (job / "summary.json").write_text(json.dumps({**summary, "config": saved}))
    report = aggregate(tmp_path)
    assert report.mixed == ["optimizer.decay_norm_and_bias", "optimizer.schedule_step"]  # not norm.*: swept
    recipes = dict(zip(report.results["norm"], report.results["recipe"]))
    assert recipes == {
        "bn": "optimizer.decay_norm_and_bias=true optimizer.schedule_step=epoch",
        "gn": "optimizer.decay_norm_and_bias=false optimizer.schedule_step=step",
    }
    text = format_table(report)
    assert "rows trained under different recipes: optimizer.decay_norm_and_bias, optimizer.schedule_step" in text
    assert pd.read_csv(tmp_path / "results.csv")["recipe"].notna().all()


def test_a_sweep_trained_alike_has_no_recipe_column(five_norm_sweep) -> None:
    sweep, proc = five_norm_sweep
    assert "recipe" not in pd.read_csv(sweep / "results.csv") and "different recipes" not in proc.stdout


def test_a_warm_process_left_by_a_refused_sweep_is_not_used_by_the_next(tmp_path: Path, monkeypatch) -> None:
    # Hydra 1.3 skips the end callback of a sweep refused before launch: its warm process, started in another
    # folder, must not aggregate the next sweep of the same process.
    from omegaconf import OmegaConf

    from normsweep.sweep.callbacks import AggregateCallback

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)  # so that a warm process starts
    AggregateCallback().on_multirun_start(OmegaConf.create({}))
    stale = AggregateCallback.warm
    assert stale is not None
    here = tmp_path / "here"
    make_job(here / "s", 0, ["norm=bn"], 90.0, 0)
    monkeypatch.chdir(here)
    AggregateCallback().on_multirun_start(OmegaConf.create({}))
    assert stale.wait(timeout=30) is not None  # ended, not handed the next sweep
    AggregateCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "s"}}}))
    assert (here / "s" / "results.csv").is_file()
