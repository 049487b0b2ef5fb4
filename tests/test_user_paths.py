"""What a user sees around a run: where a single run's files are, a preset run without -m, a refused run that
leaves no folder, a sweep's job lines, and Ctrl-C under joblib. The lines a sweep prints and Ctrl-C are read from a
fresh `python -m normsweep` process; the single runs' last lines from the same main() run in this process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_cli, run_cli_here

pytestmark = pytest.mark.slow  # every test runs normsweep's command line

TINY = ["model=mlp", "batch_size=256", "epochs=1"]


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def test_a_preset_run_without_m_says_it_ran_one_job_how_to_sweep_and_where_its_files_are(tmp_path: Path) -> None:
    proc = run_cli_here(["experiment=quick", *TINY], cwd=tmp_path)
    lines = _lines(proc)
    assert proc.returncode == 0, "\n".join(lines)
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert lines[-2].endswith(
        "ran one job (norm=bn); the config sweeps norm=none,bn,ln,in,gn only with -m: "
        "python -m normsweep -m experiment=quick model=mlp batch_size=256 epochs=1"
    )
    assert lines[-1].endswith(f"results: {run.relative_to(tmp_path)} (summary.json, metrics.csv, diagnostics.csv)")
    assert (run / "summary.json").is_file() and (run / "metrics.csv").is_file()


def test_a_diverged_run_also_ends_with_where_its_files_are(tmp_path: Path) -> None:
    proc = run_cli_here(["optimizer=sgd", "optimizer.lr=1e12", "norm=none", *TINY, "hydra.run.dir=run"], cwd=tmp_path)
    lines = _lines(proc)
    assert proc.returncode == 0, "\n".join(lines)
    assert any("diverged: the loss is not finite in epoch 1" in line for line in lines)
    assert lines[-1].endswith("results: run (summary.json, metrics.csv, diagnostics.csv)")
    assert not any("ran one job" in line for line in lines)  # nothing to sweep: no hint


def test_a_refused_run_leaves_the_folders_it_did_not_make(tmp_path: Path) -> None:
    earlier = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    earlier.mkdir(parents=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    # A real process, then the command line in this process (the same main()) for the folder named by the user.
    for run, args in ((run_cli, ["batch_size=0"]), (run_cli_here, ["batch_size=0", "hydra.run.dir=mine"])):
        proc = run(args, cwd=tmp_path)
        assert proc.returncode == 2 and "batch_size=0: use a batch size of 1 or more" in proc.stdout + proc.stderr
    assert sorted((tmp_path / "outputs").rglob("*")) == [earlier.parent, earlier]
    assert mine.is_dir()  # named by the user and there before: left as it is


def test_a_one_job_sweep_counts_1_job_and_its_lines_name_the_job(tmp_path: Path) -> None:
    proc = run_cli(["-m", "norm=gn", *TINY, "hydra.sweep.dir=s"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results.csv  (1 job)" in proc.stdout  # not "(1 jobs)"
    assert "[job 0] Epoch 1/1 train_loss" in proc.stdout  # one job: nothing to tell it from


def test_a_jobs_lines_are_tagged_with_what_tells_it_from_the_other_jobs(tmp_path: Path) -> None:
    proc = run_cli_here(["-m", "norm=bn,gn", "seed=0,1", *TINY, "hydra.sweep.dir=s"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for num, (norm, seed) in enumerate([("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1)]):
        assert f"[job {num} norm={norm} seed={seed}] Epoch 1/1 train_loss" in proc.stdout  # not model=mlp ...


def test_ctrl_c_under_joblib_ends_with_how_to_resume_and_no_traceback(tmp_path: Path) -> None:
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "norm=bn,gn", "model=mlp", "batch_size=16"]
    args += ["epochs=100", "hydra.sweep.dir=s"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    # A session of its own, as a terminal has: Ctrl-C goes to the launcher and its workers alike.
    proc = subprocess.Popen(
        [sys.executable, "-m", "normsweep", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))  # only if it hangs
    watchdog.start()
    try:
        output = []
        for line in proc.stdout:  # Ctrl-C once a job has trained an epoch: the other may still be starting
            output.append(line)
            if " Epoch 1/100 " in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        output.append(proc.communicate()[0])
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind by a failure
    text = "".join(output)
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    assert lines[-1] == (
        "interrupted; each job's checkpoint keeps its last finished epoch. "
        "To resume, run the same command with hydra.sweep.dir=s"
    )
    job_lines = [line for line in lines if "[normsweep]" in line]
    tag = r"\[job (0 norm=bn|1 norm=gn)\] "  # what tells the jobs apart
    assert job_lines and all(re.search(r"\]\[normsweep\]\[\w+\] - " + tag, line) for line in job_lines), text


def test_the_workers_resource_tracker_keeps_quiet_about_what_ctrl_c_left() -> None:
    # Under joblib, Ctrl-C can end a worker before it gives back its count on a semaphore the launcher then removes:
    # loky's resource tracker, exiting after the launcher, warned in 4 lines below "To resume, ..." (about 1 Ctrl-C
    # in 20 here). The same leftover, made on purpose, in a process set up as a sweep's launcher is.
    leftover = """
import sys
{setup}
from joblib.externals.loky.backend import resource_tracker
resource_tracker.ensure_running()
resource_tracker.register("/normsweep-test-already-removed", "semlock")
"""
    said = {}
    for name, setup in (
        ("plain", ""),
        ("sweep", "from normsweep.job.signals import quiet_worker_cleanup; quiet_worker_cleanup()"),
    ):
        # The tracker holds stderr open until it exits: run() returns once it has said everything.
        proc = subprocess.run([sys.executable, "-c", leftover.format(setup=setup)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        said[name] = proc.stderr
    assert "resource_tracker: /normsweep-test-already-removed: FileNotFoundError" in said["plain"]  # what it says
    assert said["sweep"] == ""
