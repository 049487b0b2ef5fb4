"""Jobs under SLURM: whether a job still runs is SLURM's word, a job's threads follow its allocation, and SIGTERM
(scancel, a requeue, the time limit) stops a job at once with its folder resumable.

The unit tests put a fake `squeue` first on PATH. The tests marked `slurm` run sweeps on a real cluster
(scripts/slurm/start.sh) and are skipped where `sinfo` is missing or does not answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_faults import _popen, _wait_for_rows
from test_resume import CONFIG, _job

from normsweep.job.checkpoint import load_checkpoint
from normsweep.job.signals import stop_on_sigterm
from normsweep.sweep.liveness import load_summary
from normsweep.sweep.resume import ResumeConflict, check_resumable

SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK")


def _summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


@pytest.fixture
def squeue(tmp_path: Path, monkeypatch):
    """squeue(stdout, rc, stderr): what a fake `squeue`, first on PATH, answers from now on (as `%i %A %T %r`).
    The test runs outside any SLURM job, whatever the machine running it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key in SLURM_ENV:
        monkeypatch.delenv(key, raising=False)

    def answer(stdout: str = "", rc: int = 0, stderr: str = "") -> None:
        script = bin_dir / "squeue"
        script.write_text(
            f"#!/bin/sh\nprintf '%s' {shlex.quote(stdout)}\nprintf '%s' {shlex.quote(stderr)} >&2\nexit {rc}\n"
        )
        script.chmod(0o755)

    return answer


@pytest.mark.parametrize("said", ["12_3 15 RUNNING None\n", "12_3 15 PENDING Resources\n", "12_3 15 COMPLETING None\n"])
@pytest.mark.parametrize("where", ["another node", "this machine, its process gone"])
@pytest.mark.parametrize("status", ["running", "incomplete"])  # incomplete: stopped by SIGTERM, then requeued
def test_a_job_slurm_still_runs_or_queues_is_refused_on_resume(tmp_path: Path, squeue, said, where, status) -> None:
    # On this machine with a dead process: a requeued job waiting to run again, or a one-node cluster.
    host, pid = ("node-17", 4242) if where == "another node" else (socket.gethostname(), 2**22 + 1)  # > pid_max
    job = _job(tmp_path, status, slurm_job="12_3", host=host, pid=pid)
    squeue(said)
    assert load_summary(job)["status"] == "running"
    with pytest.raises(ResumeConflict) as err:
        check_resumable(job, CONFIG)
    assert str(err.value) == (
        f"job 0 (SLURM 12_3) is still queued or running on the cluster ({job}); wait for it or scancel 12_3, then "
        "run the same command again"
    )


@pytest.mark.parametrize(
    "said",
    [
        ("", 0, ""),  # ended: gone from squeue's active states
        ("12_3 15 CANCELLED None\n", 0, ""),  # ended, still listed with -t all (for MinJobAge)
        ("", 1, "slurm_load_jobs error: Invalid job id specified\n"),  # purged: SLURM no longer knows it
    ],
)
@pytest.mark.parametrize("status", ["running", "incomplete"])
def test_a_job_slurm_says_has_ended_is_incomplete_and_resumed(tmp_path: Path, squeue, said, status, caplog) -> None:
    job = _job(tmp_path, status, slurm_job="12_3", host="node-17", pid=4242)
    squeue(*said)
    assert load_summary(job)["status"] == "incomplete"
    check_resumable(job, CONFIG)
    assert "cannot be checked from here" not in caplog.text


@pytest.mark.parametrize("slurm", ["squeue missing", "squeue failing"])
def test_when_slurm_cannot_be_asked_the_process_checks_apply(tmp_path: Path, monkeypatch, squeue, slurm, caplog):
    if slurm == "squeue missing":
        monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    else:
        squeue("", 1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    elsewhere = _job(tmp_path, "running", slurm_job="12_3", host="node-17", pid=4242)
    check_resumable(elsewhere, CONFIG)  # the benefit of the doubt, as without SLURM
    assert "node-17 (process 4242, SLURM job 12_3: squeue does not answer), which cannot be checked" in caplog.text

    parent = os.getppid()  # alive for the whole test, and not this process
    here = _job(tmp_path, "running", slurm_job="12_3", host=socket.gethostname(), pid=parent)
    with pytest.raises(ResumeConflict, match=f"being trained right now \\(process {parent}"):
        check_resumable(here, CONFIG)
    dead = _job(tmp_path, "running", slurm_job="12_3", host=socket.gethostname(), pid=2**22 + 1)  # above pid_max
    assert load_summary(dead)["status"] == "incomplete"


@pytest.mark.parametrize("recorded", ["12_3", "15"])  # as squeue shows it; the raw SLURM_JOB_ID of older summaries
@pytest.mark.parametrize("status", ["running", "incomplete"])  # killed outright, or stopped by SIGTERM
def test_a_requeued_job_resumes_its_own_folder(tmp_path: Path, monkeypatch, squeue, recorded, status, caplog) -> None:
    caplog.set_level(logging.INFO, logger="normsweep")
    squeue("12_3 15 RUNNING None\n")  # SLURM runs it: it is this very process, requeued
    for key, value in {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(key, value)
    check_resumable(_job(tmp_path, status, slurm_job=recorded, host="node-17", pid=4242), CONFIG)
    assert f"SLURM requeued job {recorded}; resuming it" in caplog.text
    # Another process of this same allocation still training in the folder (a local launcher inside salloc) is not.
    parent = os.getppid()
    copy = _job(tmp_path, "running", slurm_job=recorded, host=socket.gethostname(), pid=parent)
    with pytest.raises(ResumeConflict, match=f"being trained right now \\(process {parent}"):
        check_resumable(copy, CONFIG)


def test_sigterm_stops_a_slurm_job_and_leaves_submitits_requeue_signal_alone(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "15")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    caught: list[int] = []

    def submitit(signum: int, frame: object) -> None:  # stands for submitit's handlers: bypass, checkpoint-requeue
        caught.append(signum)

    saved = {sig: signal.signal(sig, submitit) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        with pytest.raises(KeyboardInterrupt), stop_on_sigterm():
            signal.raise_signal(signal.SIGUSR2)  # before the time limit: submitit checkpoints and requeues
            assert caught == [signal.SIGUSR2]
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not stop the job")
        assert signal.getsignal(signal.SIGTERM) is submitit  # given back once the job has ended
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_sigterm_in_a_slurm_job_stops_it_at_once_incomplete_with_its_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # As inside task 0 of array 4 (SLURM_JOB_ID is the task's own number), allocated one CPU of this machine.
    slurm = {"SLURM_JOB_ID": "5", "SLURM_ARRAY_JOB_ID": "4", "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1"}
    env = {**os.environ, **slurm, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "normsweep", "epochs=50", "batch_size=16", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Epoch 1/50" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM (SLURM ended or requeued the job); the checkpoint keeps the last finished epoch" in (
        output
    )
    assert f"To resume, run the same command with hydra.run.dir={run_dir}" in output and "Traceback" not in output
    summary = _summary(run_dir)
    done = summary["epochs_completed"]
    assert summary["status"] == "incomplete" and 1 <= done < 50  # it did not train on until SIGKILL
    assert load_checkpoint(run_dir)["epoch"] == done  # what a resume continues from
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + done
    assert summary["slurm_job"] == "4_0" and summary["threads"] == 1  # squeue's id; the allocation's one CPU


# --- On a real cluster --------------------------------------------------------------------------------------------

# What a CPU-only partition of small nodes accepts, for as long as the preset asks for a GPU, 8 CPUs and 32 GB.
CPU_JOB = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


@pytest.fixture
def partition(monkeypatch) -> str:
    """The partition the sweeps go to (NORMSWEEP_SLURM_PARTITION, else the cluster's default), after checking that
    SLURM answers."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM here (sinfo not found); scripts/slurm/start.sh starts a one-node cluster")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer within 30 s: is slurmctld up? (scripts/slurm/start.sh)")
    names = proc.stdout.split()
    if proc.returncode != 0 or not names:
        reason = (proc.stderr.strip().splitlines() or ["no partition"])[0]
        pytest.skip(f"SLURM does not answer (sinfo: {reason}); scripts/slurm/start.sh starts a one-node cluster")
    default = next((name for name in names if name.endswith("*")), names[0]).rstrip("*")
    chosen = os.environ.get("NORMSWEEP_SLURM_PARTITION") or default
    monkeypatch.setenv("NORMSWEEP_SLURM_PARTITION", chosen)
    return chosen


def _queued_from(folder: Path) -> set[str]:
    """The jobs SLURM has queued or running that were submitted from `folder` (other users' jobs aside)."""
    listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30)
    rows = (line.partition("|") for line in listed.stdout.splitlines())
    return {job for job, _, workdir in rows if workdir == str(folder)}


def _wait_until(found, timeout: float, failure):
    """Poll `found()` every 0.1 s until it gives something true, and return that; else fail with `failure()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(failure())


def _wait_for_status(job: Path, status: str, timeout: float = 60) -> dict:
    return _wait_until(
        lambda: (summary := _summary(job))["status"] == status and summary,
        timeout,
        lambda: f"{job}/summary.json still says {_summary(job)['status']!r}, not {status!r}",
    )


def _wait_for_log(job: Path, text: str, timeout: float = 30) -> None:
    """The job's log line, which comes just after its summary is written."""
    log = job / "normsweep.log"
    _wait_until(lambda: text in log.read_text(), timeout, lambda: f"{log} never said {text!r}:\n{log.read_text()}")


@pytest.mark.slurm
def test_a_sweep_run_again_while_its_slurm_jobs_run_is_refused_and_a_cancel_stops_them(partition, tmp_path):
    sweep = tmp_path / "s"
    args = ["-m", "hydra/launcher=slurm", "norm=bn,gn", "epochs=300", "batch_size=16", *CPU_JOB]
    first = _popen([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    ids: dict[str, str] = {}
    try:
        for job in ("0", "1"):  # both running, one CPU each
            _wait_for_rows(sweep / job / "metrics.csv", 1, first, timeout=180)
            ids[job] = _summary(sweep / job)["slurm_job"]
            assert _summary(sweep / job)["threads"] == 1
        array = ids["0"].split("_")[0]
        assert ids == {"0": f"{array}_0", "1": f"{array}_1"}  # as squeue shows them
        assert re.fullmatch(r"\d+", array)

        again = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
        output = again.stdout + again.stderr
        assert again.returncode == 2, output
        assert f"job 0 (SLURM {ids['0']}) is still queued or running on the cluster" in output
        assert "Traceback" not in output
        assert _queued_from(tmp_path) == set(ids.values())  # no second copy queued
        assert {job: _summary(sweep / job)["slurm_job"] for job in ids} == ids  # nor training in their folders

        subprocess.run(["scancel", *ids.values()], check=True, timeout=30)
        for job in ids:  # SIGTERM stops each at once: no SIGKILL KillWait seconds later
            summary = _wait_for_status(sweep / job, "incomplete")
            assert 1 <= summary["epochs_completed"] < 300
            _wait_for_log(sweep / job, "stopped by SIGTERM")  # written just after the summary
    finally:
        left = _queued_from(tmp_path)  # this test's jobs only: others may share the cluster
        if left:
            subprocess.run(["scancel", *left], timeout=30)
        first.kill()
        first.wait()
