"""SLURM: what normsweep asks the scheduler, the request fitted to the partition, and, on a real cluster
(scripts/slurm/start.sh; .ci/run starts one), sweeps whose jobs the scheduler cancels, kills or times out.

The tests marked `slurm` skip where no cluster answers; the others read fake squeue/sacct/sinfo output."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, run_cli_here
from test_faults import VALUES, _popen, _wait_for_rows

from hydra_plugins.normsweep_launcher._core import Request, check_time_limit, find_partition, fit
from normsweep.config.errors import ConfigError
from normsweep.sweep import scheduler
from normsweep.sweep.files import Status, record_failure

CPU_NODE = scheduler.Node(cpus=2, mem_mb=24105, gpus=0)
GPU_NODE = scheduler.Node(cpus=64, mem_mb=512000, gpus=4)
AUTO = {"gpus_per_node": "auto", "cpus_per_task": "auto", "mem_gb": "auto", "tasks_per_node": 1}


def _fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, out: str = "", err: str = "", rc: int = 0):
    """A fake SLURM command on PATH that prints `out` and `err` and exits with `rc`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "out").mkdir(exist_ok=True)
    (bin_dir / "out" / name).write_text(out)
    (bin_dir / "out" / f"{name}.err").write_text(err)
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\ncat "{bin_dir}/out/{name}"\ncat "{bin_dir}/out/{name}.err" >&2\nexit {rc}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


# What a partition offers, and what a request becomes.


def test_auto_asks_a_cpu_only_partition_for_no_gpu_and_what_a_node_has() -> None:
    request = fit(scheduler.Partition("debug", (CPU_NODE,)), AUTO)
    assert request == Request(gpus_per_node=None, cpus_per_task=2, mem_gb=23)


def test_auto_asks_a_gpu_partition_for_one_gpu_and_its_share_of_the_node() -> None:
    request = fit(scheduler.Partition("gpu", (GPU_NODE,)), AUTO)
    assert request == Request(gpus_per_node=1, cpus_per_task=8, mem_gb=32)


def test_numbers_are_asked_as_given_and_null_is_left_to_slurm() -> None:
    given = {**AUTO, "gpus_per_node": 2, "cpus_per_task": 16, "mem_gb": None}
    assert fit(scheduler.Partition("gpu", (GPU_NODE,)), given) == Request(2, 16, None)
    assert fit(scheduler.Partition("debug", (CPU_NODE,)), {**AUTO, "mem_per_cpu": "2G"}).mem_gb is None


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("cpus_per_task", 8, "set hydra.launcher.cpus_per_task=2 or less"),
        ("mem_gb", 64, "set hydra.launcher.mem_gb=23 or less"),
        ("gpus_per_node", 1, "set hydra.launcher.gpus_per_node=auto to run on its CPUs"),
        ("cpus_per_task", "two", "hydra.launcher.cpus_per_task=two: give a whole number"),
    ],
)
def test_a_request_no_node_can_satisfy_is_refused_naming_the_key(key: str, value: object, fix: str) -> None:
    with pytest.raises(ConfigError) as refused:
        fit(scheduler.Partition("debug", (CPU_NODE,)), {**AUTO, key: value})
    assert fix in str(refused.value) and "\n" not in str(refused.value)


def test_a_gpu_count_above_every_node_names_the_most_there_is() -> None:
    with pytest.raises(ConfigError, match=r"at most 4 GPUs per node: set hydra.launcher.gpus_per_node=4 or less"):
        fit(scheduler.Partition("gpu", (GPU_NODE,)), {**AUTO, "gpus_per_node": 8})


def test_a_mixed_partition_fits_the_request_to_the_nodes_that_have_the_gpus() -> None:
    mixed = scheduler.Partition("all", (CPU_NODE, GPU_NODE))
    assert fit(mixed, AUTO) == Request(gpus_per_node=1, cpus_per_task=8, mem_gb=32)
    assert fit(mixed, {**AUTO, "gpus_per_node": None, "cpus_per_task": 32}).cpus_per_task == 32


def test_a_warning_signal_that_may_come_at_the_start_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Set hydra.launcher.signal_delay_s=0 or less, or raise"):
        check_time_limit({"timeout_min": 1, "signal_delay_s": 120})
    check_time_limit({"timeout_min": 240, "signal_delay_s": 120})


def test_the_partition_is_found_by_name_or_as_the_default() -> None:
    known = scheduler.parse_sinfo("debug*|2|24105|(null)\ngpu|64|512000|gpu:a100:4(S:0-1)\n")
    assert find_partition(None, known).nodes == (CPU_NODE,)
    assert find_partition("gpu", known).nodes == (GPU_NODE,)
    with pytest.raises(ConfigError, match=r"partition gpus does not exist on this cluster \(sinfo lists debug, gpu\)"):
        find_partition("gpus", known)


# What a job that ended without its result leaves in its folder: one shape, whoever records it.


def test_a_job_slurm_ended_is_recorded_in_the_shape_of_a_job_that_raised(tmp_path: Path) -> None:
    identity = (["norm=bn"], {"seed": 0, "epochs": 9}, {"model": "mlp", "norm": "bn"})
    raised = record_failure(tmp_path / "raised", ValueError("boom"), *identity)  # in the job's own process
    ran = {"status": "running", "host": "node-17", "pid": 4242, "threads": 2, "slurm_job": "12_3", "seed": 0}
    cancelled = record_failure(
        tmp_path / "cancelled",
        "SLURM job 12_3 ended without a result: CANCELLED by 0",
        *identity,
        status=Status.INCOMPLETE,
        recorded=ran,  # what the job wrote while it ran is kept...
        epochs_completed=2,
    )
    never = record_failure(tmp_path / "never", "SLURM cannot start job 12_4", *identity, recorded={}, slurm_job="12_4")
    assert raised["error"] == "ValueError: boom" and raised["host"] == socket.gethostname()
    assert json.loads((tmp_path / "cancelled" / "summary.json").read_text()) == {
        "status": "incomplete",
        "error": "SLURM job 12_3 ended without a result: CANCELLED by 0",
        "seed": 0,
        "model": "mlp",
        "norm": "bn",
        "optimizer": None,
        "dataset": None,
        "overrides": ["norm=bn"],
        "config": {"seed": 0, "epochs": 9},
        "host": "node-17",  # ...where it ran, not the machine that noticed the end
        "pid": 4242,
        "threads": 2,
        "slurm_job": "12_3",
        "epochs_completed": 2,
    }
    assert never["status"] == "failed" and "host" not in never and never["slurm_job"] == "12_4"
    assert set(raised) - {"host"} <= set(cancelled) & set(never)


# What squeue, sacct and sinfo print, read back.


def test_squeue_lines_give_each_job_its_state_and_reason() -> None:
    text = "5_0 6 RUNNING None\n5_1 5 PENDING ReqNodeNotAvail, UnavailableNodes:vm\n7 7 CANCELLED None\n"
    entries = scheduler.parse_squeue(text, ["5_0", "5"])
    assert {job: entry.state for job, entry in entries.items()} == {
        "5_0": "RUNNING",
        "5_1": "PENDING",
        "5": "PENDING",  # asked by the task's own id (SLURM_JOB_ID inside it)
        "7": "CANCELLED",
    }
    assert entries["5_1"].hopeless and scheduler.patience_s(entries["5_1"].reason) > 0
    assert entries["5_0"].alive and not entries["7"].alive


def test_sacct_lines_give_each_ended_job_its_state_and_why() -> None:
    text = "5_0|CANCELLED by 0|0:0|None\n5_1|FAILED|9:0|None\n6|TIMEOUT|0:0|None\n6|PENDING|0:0|Dependency\n"
    assert scheduler.parse_sacct(text) == {
        "5_0": ("CANCELLED by 0", ""),
        "5_1": ("FAILED", "9:0"),
        "6": ("PENDING", "Dependency"),  # a requeued job: the last line is its latest run
    }


def test_gpus_are_counted_from_any_gres_spelling() -> None:
    assert [scheduler.gpus_in_gres(g) for g in ("(null)", "gpu:4", "gpu:a100:2(S:0-1),mps:100", "mps:100")] == [
        0,
        4,
        2,
        0,
    ]


def test_liveness_is_what_squeue_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(tmp_path, monkeypatch, "squeue", "12_0 13 RUNNING None\n")
    assert scheduler.job_states(["12_0"]) == {"12_0": "RUNNING"}
    assert scheduler.is_alive("12_0") is True
    _fake(tmp_path, monkeypatch, "squeue", "12_0 13 CANCELLED None\n")
    assert scheduler.is_alive("12_0") is False
    _fake(tmp_path, monkeypatch, "squeue", err="slurm_load_jobs error: Invalid job id specified\n", rc=1)
    assert scheduler.job_states(["12_0"]) == {} and scheduler.is_alive("12_0") is False  # purged: long ended
    _fake(tmp_path, monkeypatch, "squeue", err="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    assert scheduler.is_alive("12_0") is None
    with pytest.raises(scheduler.SchedulerUnavailable, match="Unable to contact slurm controller"):
        scheduler.job_states(["12_0"])


def test_without_accounting_sacct_gives_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(tmp_path, monkeypatch, "sacct", err="Slurm accounting storage is disabled\n", rc=1)
    assert scheduler.accounting_available() is False
    assert scheduler.job_end("12_0") is None
    _fake(tmp_path, monkeypatch, "sacct", "12_0|CANCELLED by 0|0:0|None\n")
    assert scheduler.accounting_available() is True
    assert scheduler.job_end("12_0") == ("CANCELLED by 0", "")


# On a real cluster.


def _cluster() -> tuple[str | None, str]:
    """(default partition, "") when a SLURM cluster answers, else (None, why not)."""
    if shutil.which("sinfo") is None:
        return None, "no SLURM here (sinfo not found); scripts/slurm/start.sh starts a one-node cluster"
    try:
        known = scheduler.partitions()
    except scheduler.SchedulerUnavailable as err:
        return None, f"no SLURM cluster answers ({err}); scripts/slurm/start.sh starts one"
    default = known.get("")
    return (default.name if default else next(iter(known), None)), "sinfo lists no partition"


PARTITION, WHY_NOT = _cluster()
needs_cluster = pytest.mark.skipif(PARTITION is None, reason=WHY_NOT)
TINY = ["model=simple_cnn", "batch_size=256", "threads=1"]  # digits: a few seconds per job
# Side by side; squeue asked every 2 s, not 15 (the default, kind to a shared cluster): a job that ended without its
# result is noticed after two polls, 4 s instead of 30.
ONE_CPU = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.poll_s=2",
]


@pytest.fixture
def partition(monkeypatch: pytest.MonkeyPatch) -> str:
    assert PARTITION is not None
    monkeypatch.setenv("NORMSWEEP_SLURM_PARTITION", PARTITION)
    return PARTITION


def _problem_line(output: str, job: str) -> str:
    lines = [line for line in output.splitlines() if f": job {job} (" in line]
    assert lines, output
    return lines[0]


def _resume_command(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith("to resume the jobs that did not complete")]
    assert len(lines) == 1, output
    args = shlex.split(lines[0].split(": ", 1)[1])
    assert args[:3] == ["python", "-m", "normsweep"]
    return [sys.executable, *args[1:]]


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_the_documented_command_runs_on_the_partition_with_the_basic_launchers_results(tmp_path: Path) -> None:
    documented = ["-m", "hydra/launcher=slurm", "norm=none,bn", "epochs=2"]  # README: only the partition named
    proc = run_cli([*documented, f"hydra.sweep.dir={tmp_path / 'slurm'}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Bypassing" not in output
    assert "slurm: 0 pending, 0 running, 2 done, 0 failed" in output
    results = pd.read_csv(tmp_path / "slurm" / "results.csv")
    assert sorted(results["norm"]) == ["bn", "none"] and set(results["status"]) == {"completed"}
    threads = json.loads((tmp_path / "slurm" / "0" / "summary.json").read_text())["threads"]
    basic = run_cli_here(
        ["-m", "norm=none,bn", "epochs=2", f"threads={threads}", f"hydra.sweep.dir={tmp_path / 'b'}"], tmp_path
    )
    assert basic.returncode == 0, basic.stdout + basic.stderr
    for job in ("0", "1"):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "b" / job / "metrics.csv")[VALUES],
            pd.read_csv(tmp_path / "slurm" / job / "metrics.csv")[VALUES],
        )


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_a_job_cancelled_mid_training_ends_the_sweep_and_its_resume_command_completes_it(tmp_path: Path) -> None:
    args = ["-m", "norm=none,bn", "epochs=30", *TINY]  # seconds left to cancel in after 2 epochs, short to redo
    sweep = tmp_path / "s"
    proc = _popen([*args, *ONE_CPU, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "0" / "metrics.csv", 2, proc, timeout=600)
    job = json.loads((sweep / "0" / "summary.json").read_text())["slurm_job"]
    subprocess.run(["scancel", job], check=True, timeout=30)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert f"SLURM job {job} ended without a result: CANCELLED" in _problem_line(output, "0")
    runs = pd.read_csv(sweep / "runs.csv").set_index("norm")
    assert runs.loc["none", "status"] == "incomplete" and runs.loc["bn", "status"] == "completed"
    assert (sweep / "report.md").is_file()

    resumed = subprocess.run(_resume_command(output), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert set(pd.read_csv(sweep / "runs.csv")["status"]) == {"completed"}
    reference = run_cli_here(
        ["norm=none", "epochs=30", *TINY, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path
    )  # in one go
    assert reference.returncode == 0, reference.stdout + reference.stderr
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ref" / "metrics.csv")[VALUES], pd.read_csv(sweep / "0" / "metrics.csv")[VALUES]
    )


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_a_job_killed_like_the_out_of_memory_killer_does_is_a_result_with_the_fix(tmp_path: Path) -> None:
    # The kernel's OOM killer sends SIGKILL to the job's process: no handler runs, nothing is written.
    sweep = tmp_path / "s"
    proc = _popen(["-m", "norm=bn", "epochs=150", *TINY, *ONE_CPU, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "0" / "metrics.csv", 2, proc, timeout=600)
    os.kill(json.loads((sweep / "0" / "summary.json").read_text())["pid"], signal.SIGKILL)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 1, output
    line = _problem_line(output, "0")
    assert line.startswith("incomplete: job 0") and "FAILED" in line and "raise hydra.launcher.mem_gb, now 2" in line
    assert pd.read_csv(sweep / "runs.csv")["status"].tolist() == ["incomplete"]


def _memory_enforced() -> bool:
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "OverMemoryKill" in config or "task/cgroup" in config


@pytest.mark.slurm
@needs_cluster
@pytest.mark.skipif(
    PARTITION is None or not _memory_enforced(), reason="the cluster does not enforce memory: start.sh --enforce-memory"
)
@pytest.mark.usefixtures("partition")
def test_a_job_over_its_memory_is_killed_and_the_line_says_which_key_to_raise(tmp_path: Path) -> None:
    memory = ["hydra.launcher.mem_gb=null", "hydra.launcher.mem_per_cpu=300M"]  # less than torch takes to start
    sweep = tmp_path / "s"
    proc = run_cli(["-m", "norm=bn", "epochs=2", *TINY, *ONE_CPU, *memory, f"hydra.sweep.dir={sweep}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "out of memory: raise hydra.launcher.mem_per_cpu, now 300M" in _problem_line(output, "0")
    assert pd.read_csv(sweep / "runs.csv")["status"].tolist() == ["failed"]


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_a_job_past_its_time_limit_and_requeues_is_a_result(tmp_path: Path) -> None:
    # Submitted with 2 minutes and a warning 30 s before the end, as a user would. SLURM checks time limits (and
    # sends the warning, up to 60 s early) only every 30 s, and a limit is whole minutes: left alone, the warning
    # comes 30 to 90 s into the job. Once the job trains, its limit is cut to 1 minute (`scontrol update`, which a
    # user may do to their own job), which puts it inside the warning window: SLURM signals it at its next check,
    # within 30 s, as it does at any time limit.
    limits = ["hydra.launcher.timeout_min=2", "hydra.launcher.max_num_timeout=0", "hydra.launcher.signal_delay_s=30"]
    sweep = tmp_path / "s"
    proc = _popen(["-m", "norm=bn", "epochs=2000", *TINY, *ONE_CPU, *limits, f"hydra.sweep.dir={sweep}"], tmp_path)
    job = ""
    try:
        _wait_for_rows(sweep / "0" / "metrics.csv", 1, proc, timeout=600)  # submitit's signal handlers are set
        job = json.loads((sweep / "0" / "summary.json").read_text())["slurm_job"]
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True, timeout=30)
        output = proc.communicate(timeout=600)[0].decode()
    finally:
        if proc.poll() is None:  # a failure above: nothing left training for the next test
            if job:
                subprocess.run(["scancel", job], timeout=30)
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    line = _problem_line(output, "0")
    assert "timed-out" in line or "TIMEOUT" in line, line
    assert pd.read_csv(sweep / "runs.csv")["status"].tolist()[0] in ("failed", "incomplete")
    assert _resume_command(output)[-1] == f"hydra.sweep.dir={sweep}"


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_without_accounting_the_sweep_says_so_once_and_still_notices_a_cancelled_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sacct as it answers on a cluster without slurmdbd (scripts/slurm/start.sh --no-accounting)
    _fake(tmp_path, monkeypatch, "sacct", err="Slurm accounting storage is disabled\n", rc=1)
    sweep = tmp_path / "s"
    proc = _popen(["-m", "norm=bn", "epochs=150", *TINY, *ONE_CPU, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "0" / "metrics.csv", 2, proc, timeout=600)
    job = json.loads((sweep / "0" / "summary.json").read_text())["slurm_job"]
    subprocess.run(["scancel", job], check=True, timeout=30)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 1, output
    assert output.count("accounting is off") == 1 and "Bypassing" not in output
    assert f"SLURM job {job} ended without a result: CANCELLED" in _problem_line(output, "0")


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_an_impossible_request_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    cpus = max(node.cpus for node in scheduler.partitions()[PARTITION].nodes)
    sweep = tmp_path / "s"
    proc = run_cli_here(
        ["-m", "norm=none,bn", "epochs=1", "hydra/launcher=slurm", f"hydra.launcher.cpus_per_task={cpus + 1}"]
        + [f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert f"set hydra.launcher.cpus_per_task={cpus} or less" in output
    assert not sweep.exists()  # nothing written, nothing queued


@pytest.mark.slurm
@needs_cluster
@pytest.mark.usefixtures("partition")
def test_a_tuning_sweep_on_slurm_trains_each_trial_once_and_prunes_on_the_nodes(tmp_path: Path) -> None:
    """Trials run as SLURM jobs, two of a study at once: each reports its epochs to the journal storage in the
    sweep folder, which the coordinator reads; no lock error, no trial counted twice."""
    import optuna

    from normsweep.sweep.studies import open_storage

    sweep = tmp_path / "tune"
    tune = ["-m", "hydra/sweeper=tune", "norm=bn,gn", "optimizer.lr=tag(log, interval(1e-4, 1))"]
    extra = ["epochs=3", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "dataset.train_size=200"]
    proc = run_cli([*tune, *extra, *TINY, *ONE_CPU, f"hydra.sweep.dir={sweep}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "lock" not in output.lower()
    storage = open_storage(sweep)
    for name in ("norm=bn", "norm=gn"):
        trials = optuna.load_study(study_name=name, storage=storage).trials
        assert [t.number for t in trials] == [0, 1, 2, 3]
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        assert all(t.intermediate_values for t in trials)  # reported from the nodes
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert sorted((s["trial"]["study"], s["trial"]["number"]) for s in summaries) == [
        (n, i) for n in ("norm=bn", "norm=gn") for i in range(4)
    ]
