"""Where a job runs: its share of the CPU threads and its GPU, from the launcher, the environment and the machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

JOBS_AT_ONCE_ENV = "NORMSWEEP_JOBS_AT_ONCE"  # set by the sweeper for the jobs it launches


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity (what taskset, or a scheduler that binds CPUs, gave it), else
    the machine's; inside a SLURM job no more than SLURM_CPUS_PER_TASK, since a cluster that binds no CPUs
    (TaskPlugin=task/none) leaves the whole node in the affinity."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else cpus


def jobs_at_once(launcher: Mapping[str, Any], batch_size: int, cpus: int) -> int:
    """How many jobs of a batch of `batch_size` share this machine's CPUs at the same time, by launcher.

    Hydra's basic launcher runs one at a time; joblib runs `n_jobs` (negative counts from the CPU count, as in
    joblib); submitit's local executor starts every job of the batch at once; on SLURM each job has its own
    allocation, so none shares.
    """
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or 1)
        n_jobs = n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)
        return max(1, min(n_jobs, batch_size))
    if target.endswith("submitit_launcher.LocalLauncher"):
        return max(1, batch_size)
    return 1


def fair_threads(cpus: int, at_once: int) -> int:
    """Each job's share of the CPUs when `at_once` jobs run together: at least one thread, never oversubscribed."""
    return max(1, cpus // max(1, at_once))


def pinned_gpus(environ: Mapping[str, str]) -> bool:
    """Whether the scheduler or the user already chose this process's GPUs (then it uses what it was given)."""
    return any(environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"))


def job_device(setting: str, job_num: int, cuda_devices: int, pinned: bool) -> str:
    """The device a job asks for: `device=auto` on a machine with K unpinned GPUs spreads jobs over them
    (job N on cuda:(N mod K)); an explicit device, a pinned GPU or a machine without CUDA keeps the setting."""
    if setting != "auto" or cuda_devices == 0 or pinned:
        return setting
    return f"cuda:{job_num % cuda_devices}"
