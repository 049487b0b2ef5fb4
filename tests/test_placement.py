"""Where jobs run: CPU threads shared fairly between jobs that run together, and one GPU per job."""

from __future__ import annotations

import os

import pytest

from normsweep.job.placement import available_cpus, fair_threads, job_device, jobs_at_once, pinned_gpus
from normsweep.job.train import set_threads

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.parametrize(
    "launcher, batch, cpus, expected",
    [
        ({"_target_": BASIC}, 10, 16, 1),  # one job after another
        ({"_target_": JOBLIB, "n_jobs": 4}, 10, 16, 4),
        ({"_target_": JOBLIB, "n_jobs": 4}, 3, 16, 3),  # never more than the jobs there are
        ({"_target_": JOBLIB, "n_jobs": -1}, 10, 16, 10),  # -1: as many as CPUs (joblib's convention)
        ({"_target_": JOBLIB, "n_jobs": -2}, 20, 16, 15),
        ({"_target_": LOCAL}, 5, 16, 5),  # submitit's local executor starts the whole batch
        ({"_target_": SLURM}, 50, 16, 1),  # each SLURM job has its own allocation
    ],
)
def test_jobs_at_once_per_launcher(launcher: dict, batch: int, cpus: int, expected: int) -> None:
    assert jobs_at_once(launcher, batch, cpus) == expected


def test_threads_are_a_fair_share_and_never_zero() -> None:
    assert fair_threads(16, 1) == 16
    assert fair_threads(16, 4) == 4
    assert fair_threads(16, 5) == 3  # 5 x 3 = 15 threads on 16 CPUs: no oversubscription
    assert fair_threads(2, 8) == 1


def test_threads_follow_the_slurm_allocation_where_slurm_binds_no_cpus(monkeypatch) -> None:
    # TaskPlugin=task/none: a job that asked for one CPU still has the whole 2-CPU node in its affinity.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert set_threads(0) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert set_threads(0) == 1 and available_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # never more than the CPUs it may run on
    assert set_threads(0) == 2
    assert set_threads(3) == 3  # threads=3 is the user's choice


def test_jobs_spread_over_unpinned_gpus() -> None:
    assert [job_device("auto", n, 4, pinned=False) for n in range(6)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
        "cuda:1",
    ]


def test_a_pinned_gpu_an_explicit_device_or_no_gpu_keep_the_setting() -> None:
    assert job_device("auto", 3, 4, pinned=True) == "auto"  # uses the GPU it was given, as cuda:0
    assert job_device("cuda:1", 3, 4, pinned=False) == "cuda:1"
    assert job_device("cpu", 3, 4, pinned=False) == "cpu"
    assert job_device("auto", 3, 0, pinned=False) == "auto"


def test_gpus_count_as_pinned_when_the_scheduler_or_user_chose_them() -> None:
    assert pinned_gpus({"CUDA_VISIBLE_DEVICES": "2"})
    assert pinned_gpus({"SLURM_STEP_GPUS": "0,1"})
    assert not pinned_gpus({"CUDA_VISIBLE_DEVICES": "", "HOME": "/root"})
    assert not pinned_gpus({})
