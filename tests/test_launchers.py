"""The same sweep through Hydra's launchers: joblib (parallel local jobs) and submitit (local, and the SLURM
preset), with failures isolated, results aggregated and killed jobs resumed as under the default launcher."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, run_cli_here
from test_faults import VALUES, _popen, _wait_for_rows

SWEEP = ["-m", "model=mlp", "norm=in,bn", "epochs=2"]  # norm=in cannot run on the MLP: job 0 fails, job 1 runs on


def _assert_same_metrics(a: Path, b: Path, jobs: list[str]) -> None:
    for job in jobs:
        pd.testing.assert_frame_equal(
            pd.read_csv(a / job / "metrics.csv")[VALUES], pd.read_csv(b / job / "metrics.csv")[VALUES]
        )


# What each of two jobs side by side takes by default (threads=0): its share of this machine's CPUs. The sequential
# sweep is given the same count, so that the launchers can be held to the same numbers.
SHARE = max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("sequential")
    proc = run_cli_here([*SWEEP, f"threads={SHARE}", f"hydra.sweep.dir={cwd / 's'}"], cwd)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return cwd / "s"


def test_joblib_runs_jobs_side_by_side_sharing_the_cpus_with_the_same_results(sequential: Path, tmp_path) -> None:
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli([*SWEEP, *launcher, f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed job still fails the sweep...
    assert "failed: job 0 (model=mlp norm=in epochs=2 seed=0)" in proc.stdout  # ...after the table
    summary = json.loads((tmp_path / "s" / "1" / "summary.json").read_text())
    assert summary["threads"] == SHARE, "a job side by side with another does not take its share of the CPUs"
    _assert_same_metrics(sequential, tmp_path / "s", ["1"])  # same thread count: the same numbers
    results = pd.read_csv(tmp_path / "s" / "results.csv").set_index("norm")
    assert results["status"].sort_index().to_dict() == {"bn": "completed", "in": "failed"}


def test_submitit_local_runs_the_sweep_isolates_the_failure_and_aggregates(sequential: Path, tmp_path: Path) -> None:
    proc = run_cli(
        [*SWEEP, f"threads={SHARE}", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    sweep = tmp_path / "s"
    assert (sweep / "1" / "metrics.csv").is_file()  # the job after the failure ran
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "failed"
    assert (sweep / "results.csv").is_file() and "failed: job 0" in proc.stdout
    _assert_same_metrics(sequential, sweep, ["1"])


def test_a_submitit_job_killed_mid_way_resumes_when_the_sweep_is_run_again(tmp_path: Path) -> None:
    # What SLURM does to a preempted or timed-out job: the job's process dies mid-epoch; the rerun (submitit's
    # requeue, or the user's) continues it from its last checkpoint.
    settings = ["norm=bn", "epochs=3", "batch_size=16", "threads=1", "device=cpu"]  # an epoch lasts long enough
    args = ["-m", *settings, "hydra/launcher=submitit_local"]
    sweep = tmp_path / "s"
    proc = _popen([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "0" / "metrics.csv", 1, proc)
    job_pid = json.loads((sweep / "0" / "summary.json").read_text())["pid"]
    assert job_pid != proc.pid  # submitit runs the job in a process of its own
    os.kill(job_pid, signal.SIGKILL)
    proc.kill()  # and the launcher with it, as when the whole allocation goes
    proc.wait()
    resumed = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "completed" and 1 <= summary["resumed_from_epoch"] < 3
    # The uninterrupted numbers: the same job in one go (the same thread count; any launcher gives the same numbers,
    # as the tests above show).
    reference = run_cli_here([*settings, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ref" / "metrics.csv")[VALUES], pd.read_csv(sweep / "0" / "metrics.csv")[VALUES]
    )


def test_the_slurm_preset_composes_with_site_settings_from_the_environment(compose_cfg, monkeypatch) -> None:
    monkeypatch.setenv("NORMSWEEP_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("NORMSWEEP_SLURM_ACCOUNT", "my-lab")
    launcher = compose_cfg(["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.tasks_per_node) == ("gpu", "my-lab", 1)
    # Resources are read from the partition at launch: one GPU where its nodes have GPUs, none where they have not.
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == ("auto", "auto", "auto")
    assert launcher.timeout_min >= 1
    assert launcher.max_num_timeout >= 1  # a job that hits the limit is requeued and resumes
    monkeypatch.delenv("NORMSWEEP_SLURM_ACCOUNT")
    assert compose_cfg(["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher.account is None
