"""Whether the job that wrote a summary still runs: its process on this machine, or SLURM's word for a SLURM job."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normsweep.sweep import scheduler
from normsweep.sweep.files import Status, read_summary


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc), or None where that is unknown.

    Recorded with a job's pid, it tells the job's own process from a later one that reused the pid.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has finished: no start time to match


def slurm_job(environ: Mapping[str, str]) -> str | None:
    """The SLURM job this process runs in, as squeue, sacct and scancel name it (`12_3` for task 3 of array 12,
    where SLURM_JOB_ID holds the task's own number), or None outside SLURM. A requeued job keeps it."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID") or None


def is_own_slurm_job(job: Any, environ: Mapping[str, str]) -> bool:
    """Whether a summary's `slurm_job` names the SLURM job this process runs in (a requeued job finding its own
    folder). Older summaries hold the raw SLURM_JOB_ID, which differs from `12_3` for an array task."""
    return bool(job) and str(job) in {slurm_job(environ), environ.get("SLURM_JOB_ID")}


def slurm_alive(summary: dict[str, Any]) -> bool | None:
    """What SLURM says of the job a summary names: True while it is pending or running, False once it has ended
    (or SLURM no longer knows it); None when the summary names no SLURM job or SLURM cannot be asked."""
    job = summary.get("slurm_job")
    return scheduler.is_alive(str(job)) if job else None


def process_alive(summary: dict[str, Any]) -> bool:
    """Whether the process that wrote a summary still runs (one on another host is given the benefit of the doubt)."""
    pid = summary.get("pid")
    if summary.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if Path("/proc/self/stat").is_file():  # Linux: a zombie or a newer process under the same pid is not the job
        started = process_start(pid)
        return started is not None and summary.get("pid_start") in (None, started)
    return True


def load_summaries(job_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Each folder's summary.json (files.read_summary) with its status as it stands now: a job recorded `running`
    whose SLURM job or process has ended is `incomplete`; one recorded `incomplete` that SLURM has requeued is
    `running` (it resumes itself; a second copy must not). SLURM is asked once, about every folder's job recorded
    running or incomplete together, never once per folder; its word decides for a SLURM job (whose process may be on
    a node this machine cannot see), else the process's."""
    summaries = [read_summary(job_dir) for job_dir in job_dirs]
    asked = {
        str(summary["slurm_job"])
        for summary in summaries
        if summary.get("slurm_job") and summary["status"] in (Status.RUNNING, Status.INCOMPLETE)
    }
    said = scheduler.alive(sorted(asked))
    for summary in summaries:
        job = str(summary.get("slurm_job") or "")
        alive = said.get(job) if said is not None and job in asked else None
        if summary["status"] == Status.RUNNING and not (process_alive(summary) if alive is None else alive):
            summary["status"] = Status.INCOMPLETE.value
        elif summary["status"] == Status.INCOMPLETE and alive:
            summary["status"] = Status.RUNNING.value
    return summaries


def load_summary(job_dir: Path) -> dict[str, Any]:
    """One folder's summary as load_summaries gives it; never raises, whatever state the folder is in."""
    return load_summaries([job_dir])[0]
