"""The same sweep through Hydra's launchers: joblib (parallel local jobs) and submitit (local, and the SLURM
preset), with failures isolated, results aggregated and killed jobs resumed as under the default launcher; and what
normsweep's SLURM launcher builds on in hydra-submitit-launcher's own launch."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from pathlib import Path

import pandas as pd
import pytest
import submitit
from conftest import ROOT, run_cli, run_cli_here
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf
from test_faults import VALUES, _popen, _wait_for_rows

from hydra_plugins.normsweep_launcher._core import TESTED_UPSTREAM, Request, UpstreamChanged, held_jobs
from hydra_plugins.normsweep_launcher.config import NormsweepSlurmConf
from hydra_plugins.normsweep_launcher.slurm_launcher import SlurmLauncher

# Digits has 1150 training images: job 0 fails when it loads them (what only the data tells: the launch is not
# refused), job 1 runs on.
SWEEP = ["-m", "model=mlp", "dataset.train_size=5000,500", "epochs=2"]


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
    assert "failed: job 0 (model=mlp dataset.train_size=5000 epochs=2 seed=0)" in proc.stdout  # ...after the table
    summary = json.loads((tmp_path / "s" / "1" / "summary.json").read_text())
    assert summary["threads"] == SHARE, "a job side by side with another does not take its share of the CPUs"
    _assert_same_metrics(sequential, tmp_path / "s", ["1"])  # same thread count: the same numbers
    results = pd.read_csv(tmp_path / "s" / "results.csv").set_index("dataset.train_size")
    assert results["status"].sort_index().to_dict() == {500: "completed", 5000: "failed"}


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


# What normsweep's SLURM launcher builds on in hydra-submitit-launcher (hydra_plugins/normsweep_launcher/
# slurm_launcher.py): its launch builds the executor as submitit.AutoExecutor from the launcher's `params`, creates
# the sweep folder and submits the jobs as one array with map_array, then asks each job for results() only. Run
# against a fake sbatch, in a second. To vet a new upstream release: install it in a throwaway venv, run this file
# and the tests marked `slurm`, then raise the pin in pyproject.toml and TESTED_UPSTREAM in _core.py together.


@pytest.fixture
def sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake sbatch first on PATH: takes any script as job 4242 and keeps it in the file returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kept = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{kept}"\necho "Submitted batch job 4242"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return kept


def _fitted_launcher(sweep: Path) -> SlurmLauncher:
    """normsweep's SLURM launcher with its schema's defaults, as its setup leaves it on a CPU partition `debug`."""
    keys = OmegaConf.to_container(OmegaConf.structured(NormsweepSlurmConf))
    keys = {key: value for key, value in keys.items() if key != "_target_"}  # as Hydra instantiates it
    keys.update(
        submitit_folder=str(sweep / ".submitit" / "%j"), name="normsweep", partition="debug", array_parallelism=1
    )
    launcher = SlurmLauncher(**keys)
    launcher.params.update(Request(gpus_per_node=None, cpus_per_task=3, mem_gb=5)._asdict())
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep), "mode": "750"}}})
    return launcher


def test_upstream_launch_submits_the_fitted_request_as_one_array_and_does_not_wait(tmp_path: Path, sbatch) -> None:
    built = submitit.AutoExecutor
    with held_jobs() as held:
        returned = SubmititSlurmLauncher.launch(_fitted_launcher(tmp_path / "s"), [["norm=bn"], ["norm=gn"]], 0)
    assert submitit.AutoExecutor is built  # put back
    assert [job.job_id for job in held] == ["4242_0", "4242_1"]  # one array, through map_array, kept for the wait
    assert returned == [None, None]  # upstream returned without waiting for the jobs
    script = sbatch.read_text()
    for flag in ("--cpus-per-task=3", "--mem=5GB", "--partition=debug", "--array=0-1%1", "--time=60"):
        assert f"#SBATCH {flag}\n" in script, script  # the request as fitted, and the schema's other keys
    assert "--gpus" not in script and "poll" not in script, script  # no GPU asked; normsweep's own key kept out
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o750  # hydra.sweep.mode, applied by upstream


def test_an_upstream_that_launches_otherwise_is_refused_naming_the_tested_range(tmp_path: Path, sbatch) -> None:
    refused = re.escape(f"install a tested release with pip install 'hydra-submitit-launcher{TESTED_UPSTREAM}'")
    with pytest.raises(UpstreamChanged, match=refused), held_jobs():
        submitit.AutoExecutor(folder=tmp_path / "s", cluster="slurm").submit(print, "one by one")
    assert not sbatch.exists()  # refused before anything is submitted
    with pytest.raises(UpstreamChanged, match=r"asks a submitted job for 'result', not results\(\)"), held_jobs():
        executor = submitit.AutoExecutor(folder=tmp_path / "s", cluster="slurm")
        executor.map_array(print, ["a job"])[0].result()


def test_pyproject_pins_the_upstream_range_the_launcher_was_tested_with() -> None:
    assert f'"hydra-submitit-launcher{TESTED_UPSTREAM}"' in (ROOT / "pyproject.toml").read_text()
