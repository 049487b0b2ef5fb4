"""Faults injected into real sweeps, run as a user runs them: failing, diverging, killed, resumed, refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ForkedRun, make_mnist, run_cli, run_cli_here, start_cli

from normsweep.aggregate import main as aggregate_main
from normsweep.sweep.files import METRIC_COLUMNS

TIMINGS = ("epoch_seconds", "images_per_second")
VALUES = [column for column in METRIC_COLUMNS if column not in TIMINGS]  # metrics.csv without the timings


def _summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _popen(args: list[str], cwd: Path) -> ForkedRun:
    """`python -m normsweep ARGS` started, its stderr in its stdout: to signal or wait for (conftest.start_cli)."""
    return start_cli(args, cwd)


def _wait_for_rows(path: Path, rows: int, proc: ForkedRun | subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) - 1 >= rows:
            return
        assert proc.poll() is None, proc.communicate()[0].decode()
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {rows} rows")


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # What only the data can tell fails its job, not the launch (the config checks pass): the others run.
    args = ["-m", "model=mlp", "dataset.train_size=100,5000,200", "epochs=1", f"hydra.sweep.dir={tmp_path / 's'}"]
    proc = run_cli_here(args, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    said = "failed: job 1 (model=mlp dataset.train_size=5000 epochs=1 seed=0): dataset.train_size=5000: digits has"
    assert said in output and "1 of 3 jobs failed" in output
    failed = _summary(tmp_path / "s" / "1")
    assert failed["status"] == "failed" and failed["error"].startswith("dataset.train_size=5000")
    assert _summary(tmp_path / "s" / "2")["status"] == "completed"  # the job after the failure ran
    results = pd.read_csv(tmp_path / "s" / "results.csv").set_index("dataset.train_size")
    assert results.loc[5000, "status"] == "failed" and results.loc[5000, "runs"] == 0
    assert (results.loc[[100, 200], "status"] == "completed").all()
    runs = pd.read_csv(tmp_path / "s" / "runs.csv").set_index("dataset.train_size")
    assert runs.loc[5000, "error"].startswith("dataset.train_size=5000")


def test_a_damaged_data_set_fails_its_job_only(tmp_path: Path) -> None:
    make_mnist(tmp_path / "data")
    images = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # a download cut short
    proc = run_cli(
        ["-m", "dataset=digits,mnist", "model=mlp", "epochs=1", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path
    )
    assert proc.returncode == 1
    assert "dataset=mnist: the MNIST files in" in proc.stdout and "may be damaged" in proc.stdout
    assert _summary(tmp_path / "s" / "0")["status"] == "completed"


def test_an_unexpected_error_is_isolated_with_its_traceback_in_the_job_log(tmp_path: Path, monkeypatch) -> None:
    # A CUDA out-of-memory error cannot be provoked on this CPU: the gn job's training raises one instead.
    import normsweep.job.build

    real_fit = normsweep.job.build.fit

    def fit(model, data, optimizer_cfg, *args, **kwargs):
        if any(type(m).__name__ == "GroupNorm" and m.num_groups > 1 for m in model.modules()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(model, data, optimizer_cfg, *args, **kwargs)

    monkeypatch.setattr(normsweep.job.build, "fit", fit)
    proc = run_cli_here(["-m", "norm=gn,bn", "epochs=1", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: job 0 (norm=gn epochs=1 seed=0): OutOfMemoryError: CUDA out of memory" in proc.stdout + proc.stderr
    assert "Traceback" in (tmp_path / "s" / "0" / "normsweep.log").read_text()  # a surprise keeps its traceback
    assert _summary(tmp_path / "s" / "1")["status"] == "completed"


def test_a_diverging_job_is_a_result_not_a_failure(tmp_path: Path) -> None:
    args = ["-m", "norm=none", "optimizer=sgd", "optimizer.lr=0.05,1000", "epochs=3", f"hydra.sweep.dir={tmp_path}/s"]
    proc = run_cli_here(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diverged = _summary(tmp_path / "s" / "1")
    assert diverged["status"] == "diverged" and diverged["diverged_epoch"] == 1 and diverged["epochs_completed"] == 1
    metrics = pd.read_csv(tmp_path / "s" / "1" / "metrics.csv")
    assert len(metrics) == 1 and metrics["train_loss"].isna().all()
    results = pd.read_csv(tmp_path / "s" / "results.csv").set_index("optimizer.lr")
    assert results.loc[1000, "status"] == "diverged" and results.loc[0.05, "status"] == "completed"
    assert results.loc[0.05, "val_acc_mean"] > results.loc[1000, "val_acc_mean"]
    assert "diverged: the loss is not finite in epoch 1" in proc.stdout


def test_killed_mid_epoch_and_resumed_gives_the_uninterrupted_numbers(tmp_path: Path, capsys) -> None:
    # Small batches on the CPU: an epoch lasts long enough to hit (on a GPU, 3 epochs of digits end in a second).
    args = ["-m", "norm=bn,gn", "epochs=3", "batch_size=16", "device=cpu"]
    sweep = tmp_path / "killed"
    proc = _popen([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "1" / "metrics.csv", 1, proc)  # job 0 done, job 1 one epoch in
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _summary(sweep / "1")["status"] == "running"  # what the killed process left
    aggregate_main([str(sweep)])  # `python -m normsweep.aggregate` (its own process: test_resume_by_settings.py)
    assert "incomplete: job 1 (norm=gn" in capsys.readouterr().out
    assert pd.read_csv(sweep / "runs.csv").set_index("norm").loc["gn", "status"] == "incomplete"
    finished = _fingerprint(sweep / "0")
    finished.pop("normsweep.log")  # the resumed sweep logs that it kept the job

    resumed = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "kept from an earlier run (completed, 3 epochs" in resumed.stdout
    assert "resuming from the checkpoint of epoch" in resumed.stdout
    kept = _fingerprint(sweep / "0")
    kept.pop("normsweep.log")
    assert kept == finished, "the finished job was trained again"
    assert 1 <= _summary(sweep / "1")["resumed_from_epoch"] < 3  # it was stopped part-way
    # The killed job, resumed, has the numbers of the same job trained in one go.
    reference = run_cli_here(["norm=gn", "epochs=3", "batch_size=16", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = pd.read_csv(tmp_path / "ref" / "metrics.csv")[VALUES]
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "1" / "metrics.csv")[VALUES], expected)
    assert _summary(sweep / "1")["test_acc"] == _summary(tmp_path / "ref")["test_acc"]


@pytest.mark.parametrize(
    "sig, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")]
)
def test_interrupted_with_ctrl_c_or_kill_says_how_to_resume(tmp_path: Path, monkeypatch, sig, status, said) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # `kill` of a sweep run here (under SLURM: test_slurm_jobs.py)
    sweep = tmp_path / "s"
    proc = _popen(["-m", "norm=bn", "epochs=50", "batch_size=16", "device=cpu", f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "0" / "metrics.csv", 1, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == status and "Traceback" not in output, output
    assert f"{said}; the checkpoint keeps the last finished epoch. To resume, run the same command with " in output
    assert f"hydra.sweep.dir={sweep}" in output and output.count("To resume") == 1
    summary = _summary(sweep / "0")
    assert summary["status"] == "incomplete"
    assert torch.load(sweep / "0" / "checkpoint.pt", weights_only=True)["epoch"] == summary["epochs_completed"]


def test_sigterm_between_jobs_or_while_aggregating_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    import normsweep.results.write

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(normsweep.results.write, "end_of_sweep", lambda *a, **k: signal.raise_signal(signal.SIGTERM))
    # The aggregation must run in this process, where end_of_sweep is replaced: with pandas and pyplot imported here
    # the sweep aggregates here instead of in a warm process of its own (sweep/callbacks.py), whichever tests this
    # worker ran before.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import pandas  # noqa: F401

    sweep = tmp_path / "s"
    proc = run_cli_here(["-m", "norm=bn", "epochs=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert (
        "stopped by SIGTERM; each job's checkpoint keeps its last finished epoch. To resume, run the same command "
        f"with hydra.sweep.dir={sweep}"
    ) in proc.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's own SIGTERM given back


def test_a_run_folder_resumed_with_another_config_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    # (A sweep folder: tests/test_resume_by_settings.py, a folder whose config changed under the same overrides.)
    run = tmp_path / "r"
    assert run_cli_here(["epochs=1", f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = _fingerprint(run)
    longer = run_cli_here(["epochs=2", f"hydra.run.dir={run}"], tmp_path)  # refused before training
    output = longer.stdout + longer.stderr
    assert longer.returncode == 2, output
    assert "holds a job with another config (epochs=1 there, 2 now)" in output and "Traceback" not in output
    assert _fingerprint(run) == before

    again = run_cli_here(["epochs=1", f"hydra.run.dir={run}"], tmp_path)  # the same command: kept, not retrained
    assert again.returncode == 0 and "kept from an earlier run (completed, 1 epoch," in again.stdout


def test_two_sweeps_started_together_get_their_own_folders(tmp_path: Path) -> None:
    procs = [_popen(["-m", f"norm={norm}", "epochs=1"], tmp_path) for norm in ("bn", "gn")]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.communicate()[0].decode()
    sweeps = sorted(p.parent for p in tmp_path.glob("multirun/*/*/results.csv"))
    assert len(sweeps) == 2
    assert sorted(_summary(s / "0")["norm"] for s in sweeps) == ["bn", "gn"]


BAD_VALUES = [
    (["epochs=abc"], "epochs=abc: Value 'abc' of type 'str' could not be converted to Integer", 2),
    (["norm=foo"], "norm=foo: no such option in conf/norm/; choose one of bn, frn, gn", 2),
    (["optimizer.lr=0"], "optimizer.lr=0.0: the learning rate must be a number > 0", 2),
    (["batch_size=0"], "batch_size=0: use a batch size of 1 or more", 2),
    (["val_fraction=1"], "val_fraction=1.0: it is the share of the training set held out", 2),
    (["norm=bn", "batch_size=1"], "norm=bn batch_size=1: this norm takes its statistics over the batch", 2),
    (["epochs=0"], "epochs=0: train for at least one epoch (epochs=1 or more)", 2),
]


def _assert_refused(proc: subprocess.CompletedProcess, cwd: Path, message: str, status: int) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output
    assert message in output and "Traceback" not in output
    if status == 2:  # refused by normsweep: one line, and nothing left behind (no outputs/DATE/TIME, no outputs/)
        assert len(output.strip().splitlines()) == 1, output
        assert list(cwd.iterdir()) == [], "the refused run left files behind"


@pytest.mark.parametrize("args, message, status", BAD_VALUES)
def test_bad_values_are_named_before_training(tmp_path: Path, args: list[str], message: str, status: int) -> None:
    # The command line in this process: the same main(), composition and checks, without a new process's start.
    _assert_refused(run_cli_here(args, cwd=tmp_path), tmp_path, message, status)


@pytest.mark.parametrize("args, message, status", [BAD_VALUES[0], BAD_VALUES[3]])  # Hydra's refusal; normsweep's
def test_bad_values_end_a_real_process_with_their_exit_status(tmp_path: Path, args, message, status) -> None:
    _assert_refused(run_cli(args, cwd=tmp_path), tmp_path, message, status)


@pytest.mark.parametrize(
    "arg, said",  # normsweep's refusal, and Hydra's own: the user asked for the traceback behind either
    [("batch_size=0", "batch_size=0"), ("epochs=abc", "ConfigCompositionException")],
)
def test_hydra_full_error_shows_the_traceback(tmp_path: Path, arg: str, said: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "normsweep", arg, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and said in proc.stderr


def _full_disk_line(folder: Path, sweep: bool) -> str:
    what = "sweep" if sweep else "run"
    option = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    return (
        f"the {what} stopped, and every finished epoch is kept. Once there is space, run the same command with "
        f"{option}={folder} to resume"
    )


@pytest.mark.parametrize("sweep", [True, False])
def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes(tmp_path: Path, monkeypatch, sweep) -> None:
    # The disk fills as job 0 writes its second checkpoint (the test below fills a real one, where mounting is allowed).
    import normsweep.sweep.files

    real_write = normsweep.sweep.files.atomic_write
    written: list[Path] = []

    def full_after_one(path: Path, data: bytes, previous: Path | None = None) -> None:
        if Path(path).name == "checkpoint.pt":
            if written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))  # as atomic_write raises it
            written.append(path)
        real_write(path, data, previous)

    folder = tmp_path / "s"
    args = ["-m", "norm=bn,gn"] if sweep else ["norm=bn"]
    args = [*args, "epochs=3", f"hydra.{'sweep' if sweep else 'run'}.dir={folder}"]
    monkeypatch.setattr(normsweep.sweep.files, "atomic_write", full_after_one)
    proc = run_cli_here(args, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 75, output
    job = folder / "0" if sweep else folder
    said = f"No space left on device (writing {job / 'checkpoint.pt'}): {_full_disk_line(folder, sweep)}"
    assert said in output and output.count("No space left") == 1 and "Traceback" not in output
    assert _summary(job)["status"] == "incomplete" and _summary(job)["epochs_completed"] == 1
    assert not (folder / "1").exists()  # the sweep stopped: the next job did not start, nor was it marked failed

    monkeypatch.setattr(normsweep.sweep.files, "atomic_write", real_write)  # space again
    resumed = run_cli_here(args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint of epoch 1/3" in resumed.stdout
    reference = tmp_path / "ref"
    args[-1] = f"hydra.{'sweep' if sweep else 'run'}.dir={reference}"
    assert run_cli_here(args, tmp_path).returncode == 0
    for name in ["0", "1"] if sweep else ["."]:
        got, expected = pd.read_csv(folder / name / "metrics.csv"), pd.read_csv(reference / name / "metrics.csv")
        pd.testing.assert_frame_equal(got[VALUES], expected[VALUES])
        assert _summary(folder / name)["test_acc"] == _summary(reference / name)["test_acc"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 700 kB file system (tmpfs): the first checkpoint of the default model fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({mounted.stderr.decode().strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_stops_the_sweep_and_resumes_once_there_is_space(tmp_path: Path, small_disk: Path) -> None:
    sweep = small_disk / "s"
    args = ["-m", "norm=bn,gn", "epochs=2"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 75, output
    assert f"No space left on device (writing {sweep / '0' / 'checkpoint.pt'}): {_full_disk_line(sweep, True)}" in (
        output
    )
    assert "Traceback" not in output and output.count("No space left") == 1
    # The last epoch's files are written behind it (job/run.py): its failed checkpoint is said at the job's end, and
    # the summary counts only the epoch whose files were all written.
    assert _summary(sweep / "0")["status"] == "incomplete" and _summary(sweep / "0")["epochs_completed"] == 1
    assert pd.read_csv(sweep / "0" / "metrics.csv")["epoch"].tolist() == [1]

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    resumed = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint of epoch 1/2" in resumed.stdout
    assert run_cli_here([*args, f"hydra.sweep.dir={tmp_path / 'ref'}"], tmp_path).returncode == 0
    for job in ("0", "1"):
        expected = pd.read_csv(tmp_path / "ref" / job / "metrics.csv")[VALUES]
        pd.testing.assert_frame_equal(pd.read_csv(sweep / job / "metrics.csv")[VALUES], expected)


@pytest.mark.parametrize("cut", [("checkpoint.pt",), ("checkpoint.pt", "checkpoint.prev.pt")])
def test_a_checkpoint_cut_in_half_resumes_from_the_one_before_with_the_same_numbers(
    tmp_path: Path, monkeypatch, cut: tuple[str, ...]
) -> None:
    import normsweep.job.run

    real_save = normsweep.job.run.save_checkpoint

    def stopped_in_epoch_3(job_dir: Path, state: dict, write=None) -> None:
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        real_save(job_dir, state, write)

    run = tmp_path / "r"
    monkeypatch.setattr(normsweep.job.run, "save_checkpoint", stopped_in_epoch_3)
    assert run_cli_here(["epochs=4", f"hydra.run.dir={run}"], tmp_path).returncode == 130
    monkeypatch.setattr(normsweep.job.run, "save_checkpoint", real_save)
    for name in cut:  # a copy cut short, a file system that lost its end
        (run / name).write_bytes((run / name).read_bytes()[:300_000])

    resumed = run_cli_here(["epochs=4", f"hydra.run.dir={run}"], tmp_path)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "Traceback" not in output, output
    if len(cut) == 1:
        assert f"checkpoint.pt in {run} cannot be read (" in output
        assert "set aside as checkpoint.pt.unreadable; resuming from the checkpoint before it (epoch 1)" in output
        assert _summary(run)["resumed_from_epoch"] == 1
    else:
        assert "set aside as checkpoint.pt.unreadable and checkpoint.prev.pt.unreadable; training this job again " in (
            output
        )
        assert _summary(run)["resumed_from_epoch"] == 0
    assert not (run / "checkpoint.prev.pt").exists()  # a finished job keeps its last checkpoint only
    reference = run_cli_here(["epochs=4", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert reference.returncode == 0
    expected = pd.read_csv(tmp_path / "ref" / "metrics.csv")[VALUES]
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv")[VALUES], expected)
    assert _summary(run)["test_acc"] == _summary(tmp_path / "ref")["test_acc"]
