"""Progress and the time left: a long epoch's lines (or bar) and none in a quick one; the sweep's line when a job
ends, counted from the job folders' files."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli_here

from normsweep.config.checks import compose_run
from normsweep.config.errors import ConfigError
from normsweep.job.build import build
from normsweep.sweep.files import Status, write_metrics, write_summary
from normsweep.sweep.progress import read_job, sweep_progress

NO_SUCH_PID = 2**22 + 1  # above Linux's largest pid_max: no process has it
# `[job 0 norm=bn] epoch 1/1: 48% (1,216/2,560 images), 2 s, ~2 s left` (the time left once images are counted)
PROGRESS_LINE = re.compile(
    r"(?P<tag>\[job \d norm=\w+\] )?epoch (?P<epoch>\d+)/(?P<epochs>\d+): (?P<percent>\d+)% "
    r"\((?P<images>[\d,]+)/(?P<total>[\d,]+) images\), \d+ s(, ~\d+ s left)?$"
)


def _job(folder: Path, status: Status | None, seconds: list[float], pid: int | None = None) -> Path:
    """A job folder as a job leaves it: summary.json with `status` (none: not started) and metrics.csv's rows."""
    folder.mkdir(parents=True)
    if status is not None:
        write_summary(folder, {"status": status, "pid": pid or os.getpid(), "host": socket.gethostname()})
        write_metrics(folder, [{"epoch": i + 1, "epoch_seconds": s} for i, s in enumerate(seconds)])
    return folder


def _progress_lines(output: str) -> list[re.Match]:
    return [m for line in output.splitlines() if (m := PROGRESS_LINE.search(line))]


def test_the_time_left_is_each_jobs_epochs_to_train_at_the_median_epoch_shared_by_the_jobs_at_once(
    tmp_path: Path,
) -> None:
    jobs = [
        read_job(_job(tmp_path / "0", Status.COMPLETED, [2.0, 2.0, 2.0]), 3),
        read_job(_job(tmp_path / "1", Status.RUNNING, [4.0]), 3),  # this process: it runs; 2 epochs at its own 4 s
        read_job(_job(tmp_path / "2", None, []), 3),  # not started: 3 epochs at the sweep's median, 2 s
        read_job(_job(tmp_path / "3", Status.FAILED, []), 3),  # nothing more of it runs
    ]
    progress = sweep_progress(jobs, at_once=2)
    assert progress.line() == (
        "sweep: 2 of 4 jobs done (1 failed), 1 running, 1 to start; about 7 s left (5 epochs to train, a median "
        "2.0 s each, 2 jobs at a time)"
    )
    # One job at a time, all of it waits: (2 × 4 + 3 × 2) s.
    assert sweep_progress(jobs, at_once=1).seconds_left == pytest.approx(14.0)


def test_the_time_left_counts_what_a_finished_job_spent_outside_its_epochs(tmp_path: Path) -> None:
    done = _job(tmp_path / "0", Status.COMPLETED, [0.5, 0.5])
    write_summary(done, {"status": Status.COMPLETED, "wall_seconds": 3.0})  # 2 s building, testing, writing
    jobs = [read_job(done, 2), read_job(tmp_path / "1", 2), read_job(tmp_path / "2", 2)]
    # Two jobs to come, each 2 epochs of 0.5 s and 2 s besides, one at a time: 6 s (the epochs alone said 2 s).
    assert sweep_progress(jobs, at_once=1).line() == (
        "sweep: 1 of 3 jobs done, 0 running, 2 to start; about 6 s left (4 epochs to train, a median 0.5 s each and "
        "2.0 s a job besides, 1 job at a time)"
    )


def test_a_job_recorded_running_whose_process_has_ended_is_not_counted_running(tmp_path: Path) -> None:
    stopped = read_job(_job(tmp_path / "0", Status.RUNNING, [3.0], pid=NO_SUCH_PID), 4)
    progress = sweep_progress([stopped], at_once=1)
    assert (progress.done, progress.running) == (0, 0)
    assert progress.line() == (
        "sweep: 0 of 1 job done, 0 running, 1 to start; about 9 s left (3 epochs to train, a median 3.0 s each, 1 job "
        "at a time)"
    )


def test_before_any_epoch_is_measured_there_is_no_time_left_and_at_the_end_the_line_says_all_done(
    tmp_path: Path,
) -> None:
    started = [read_job(_job(tmp_path / "0", Status.RUNNING, []), 2), read_job(tmp_path / "1", 2)]
    assert sweep_progress(started, at_once=2).line() == "sweep: 0 of 2 jobs done, 1 running, 1 to start"
    ended = [read_job(_job(tmp_path / n, status, [1.0]), 1) for n, status in (("2", Status.COMPLETED), ("3", "pruned"))]
    assert sweep_progress(ended, at_once=2).line() == "sweep: all 2 jobs done"


def _train(overrides: list[str]) -> None:
    run = compose_run(["device=cpu", "diagnostics=false", *overrides])
    build(run, torch.device("cpu")).train()


def test_a_quick_epoch_shows_no_progress(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="normsweep"):
        _train(["epochs=2"])  # digits: a tenth of a second an epoch, under the default progress.after_s=15
    assert not _progress_lines(caplog.text)
    assert capsys.readouterr().err == ""


def test_an_epoch_longer_than_after_s_logs_its_progress_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="normsweep"):
        _train(["dataset=synthetic", "dataset.size=400", "epochs=1", "progress.after_s=0"])
    first = _progress_lines(caplog.text)[0]
    assert (first["epoch"], first["epochs"], first["total"]) == ("1", "1", "256")  # 400 - 20% test - 20% val


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_drawn_instead_of_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with caplog.at_level(logging.INFO, logger="normsweep"):
        _train(["dataset=synthetic", "dataset.size=400", "epochs=1", "progress.after_s=0"])
    assert not _progress_lines(caplog.text)
    drawn = terminal.getvalue()
    assert "epoch 1/1:" in drawn and "/256 [" in drawn  # tqdm's bar: `epoch 1/1:  25%|##   | 64.0/256 [00:00<...`
    assert drawn.endswith("\r")  # gone when the epoch ends: the epoch's line is written on a clean line


@pytest.mark.parametrize(
    "override, message",
    [
        ("progress.after_s=-1", "progress.after_s=-1: give the seconds an epoch trains before its progress is shown"),
        ("progress.every_s=0", "progress.every_s=0: give the seconds between two progress lines"),
    ],
)
def test_bad_progress_settings_are_refused_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_run([override])


@pytest.mark.parametrize(
    "args, line",
    [
        (["-m", "norm=bn,gn", "progress.every_s=-5"], "progress.every_s=-5: give the seconds between two progress"),
        (["progress.after_s=soon"], "progress.after_s=soon: Value 'soon' of type 'str' could not be converted"),
    ],
)
def test_bad_progress_settings_from_the_shell_are_one_line_and_exit_2(tmp_path: Path, args: list[str], line: str):
    proc = run_cli_here([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    lines = [text for text in (proc.stdout + proc.stderr).splitlines() if text.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and line in lines[0], lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_a_sweep_of_long_epochs_shows_each_jobs_progress_and_the_time_left_when_a_job_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Epochs of a couple of seconds (2,560 images of 1x16x16 on the CPU), their progress from the start, four lines
    # a second; the sweep's folders read ten times a second.
    monkeypatch.setattr("normsweep.sweep.progress.POLL_S", 0.1)
    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn,gn", "dataset=synthetic", "dataset.shape=[1,16,16]", "dataset.size=4000", "epochs=1"]
    settings = ["device=cpu", "threads=1", "progress.after_s=0", "progress.every_s=0.25", f"hydra.sweep.dir={sweep}"]
    proc = run_cli_here([*args, *settings], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    for job, norm in enumerate(["bn", "gn"]):
        tag = f"[job {job} norm={norm}] "
        shown = [m for m in _progress_lines(output) if m["tag"] == tag]
        assert shown and all((m["epoch"], m["total"]) == ("1", "2,560") for m in shown), output
        epoch_line = next(i for i, line in enumerate(lines) if f"{tag}Epoch 1/1 " in line)
        assert all(lines.index(m.string) < epoch_line for m in shown)  # each line comes before the epoch's own
    assert any(m["images"] != "0" for m in _progress_lines(output))  # they count the images trained
    # Job 0's end, seen as job 1 starts: the time left is job 1's epoch at the median of those measured (job 0's).
    assert re.search(
        r"sweep: 1 of 2 jobs done, [01] running, [01] to start; about [\w ]+ left \(1 epoch to train, a median "
        r"[\d.]+ s each and [\d.]+ s a job besides, 1 job at a time\)$",  # job 0's time outside its epoch
        output,
        re.MULTILINE,
    ), output
    assert re.search(r"sweep: all 2 jobs done$", output, re.MULTILINE)


def test_a_growing_csv_is_written_whole_each_time_and_a_failed_write_loses_no_row(tmp_path: Path, monkeypatch) -> None:
    import errno

    import normsweep.sweep.files as files

    rows = [{"epoch": i + 1, "epoch_seconds": 0.5 * i, "val_acc": 90.0 + i} for i in range(4)]
    log = files.CsvLog(tmp_path / "metrics.csv", files.METRIC_COLUMNS)
    log.write(rows[:1])
    log.write(rows[:2])
    real_write = files.atomic_write

    def full(path: Path, data: str, previous: Path | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files, "atomic_write", full)
    with pytest.raises(OSError):
        log.write(rows[:3])
    monkeypatch.setattr(files, "atomic_write", real_write)
    log.write(rows)  # after the failed write: rows 3 and 4 both, once each
    (tmp_path / "whole").mkdir()
    files.write_metrics(tmp_path / "whole", rows)  # the same rows in one write
    assert (tmp_path / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()
    log.write(rows[:2])  # fewer rows (a resume): the file holds those only
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_files_written_behind_keep_their_order_and_a_failed_write_drops_what_follows(
    tmp_path: Path, monkeypatch
) -> None:
    import errno
    import threading

    import normsweep.sweep.files as files

    real_write, order = files.atomic_write, []
    may_write = threading.Event()

    def slow(path: Path, data: str, previous: Path | None = None) -> None:
        may_write.wait()  # the caller goes on meanwhile
        if path.name == "full.txt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        order.append(path.name)
        real_write(path, data, previous)

    monkeypatch.setattr(files, "atomic_write", slow)
    writer = files.WriteBehind()
    for name in ("a.txt", "b.txt", "c.txt"):
        writer.write(tmp_path / name, name)
    writer.then(lambda: order.append("then"))
    assert order == [] and not (tmp_path / "a.txt").exists()  # queued, not written: the caller did not wait
    may_write.set()
    writer.flush()
    assert order == ["a.txt", "b.txt", "c.txt", "then"] and (tmp_path / "c.txt").read_text() == "c.txt"

    writer.write(tmp_path / "full.txt", "x")
    writer.write(tmp_path / "after.txt", "x")  # queued after the failure: dropped with it
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert not (tmp_path / "after.txt").exists() and not list(tmp_path.glob(".*.tmp"))
    writer.write(tmp_path / "d.txt", "d")  # the error was said once; writing goes on
    writer.close()
    threads = [t.name for t in threading.enumerate()]
    assert (tmp_path / "d.txt").read_text() == "d" and "normsweep write-behind" not in threads
