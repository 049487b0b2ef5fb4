"""Resuming job folders: checkpoints, the same-job check, and run and sweep folders that are never shared."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from normsweep.config.schema import new_dir
from normsweep.job.checkpoint import load_checkpoint, save_checkpoint
from normsweep.sweep.files import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, write_summary
from normsweep.sweep.resume import ResumeConflict, check_resumable, task_config
from normsweep.sweep.settings import config_differences, lacking_added_keys, saved_behaviour, with_values

CONFIG = {
    "model": {"_target_": "normsweep.job.models.SimpleCNN", "hidden": 128},
    "norm": {"name": "bn", "eps": 1e-5, "affine": True, "momentum": 0.1},
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999]},
    "dataset": {"name": "digits", "root": "data", "download": False},
    "seed": 0,
    "epochs": 15,
    "device": "auto",
}


def _with(**changes: object) -> dict:
    """CONFIG with `norm__groups=8` set (a keyword for `norm.groups`)."""
    return with_values(CONFIG, {dotted.replace("__", "."): value for dotted, value in changes.items()})


def _job(tmp_path: Path, status: str = "completed", config: dict | None = None, **fields: object) -> Path:
    job = tmp_path / "0"
    job.mkdir(exist_ok=True)
    write_summary(job, {"status": status, "config": CONFIG if config is None else config, **fields})
    return job


def test_a_new_folder_and_the_same_job_may_be_resumed(tmp_path: Path) -> None:
    check_resumable(tmp_path / "never-used", CONFIG)
    for status in ("completed", "diverged", "failed", "incomplete"):
        check_resumable(_job(tmp_path, status), _with())


def test_where_a_job_runs_may_change_on_resume(tmp_path: Path) -> None:
    job = _job(tmp_path)
    where = {"device": "cuda:1", "dataset__root": "/scratch/data", "dataset__download": True}
    check_resumable(job, _with(**where))


def test_another_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with pytest.raises(ResumeConflict) as err:
        check_resumable(job, _with(norm__name="gn", optimizer__lr=0.01))
    message = str(err.value)
    assert "norm.name='bn' there, 'gn' now" in message and "optimizer.lr=0.001 there, 0.01 now" in message
    assert "hydra.sweep.dir" in message  # and how to start afresh instead


def test_config_differences_lists_changed_values_then_the_keys_one_side_lacks() -> None:
    saved = {"norm": {"_target_": "my_norms.Norm", "name": "mine", "eps": 1e-5, "momentum": 0.1}, "seed": 0}
    new = {"norm": {"_target_": "my_norms.Norm", "name": "other", "eps": 1e-5, "groups": 8, "group_size": 4}}
    assert config_differences(saved, {**new, "seed": 0}) == [
        "norm.name='mine' there, 'other' now",
        "1 key only the saved job has: norm.momentum",
        "2 keys only this job has: norm.group_size, norm.groups",
    ]


def test_a_folder_saved_before_norms_and_optimizers_had_records_is_the_same_job() -> None:
    from normsweep.config.checks import compose_run

    run = compose_run([])  # bn and adam, as a 0.1 folder saved them: without _target_ and the records' facts
    now = {"norm": dataclasses.asdict(run.norm), "optimizer": dataclasses.asdict(run.optimizer)}
    saved = {"norm": CONFIG["norm"] | {"track_running_stats": True}, "optimizer": CONFIG["optimizer"]}
    saved["optimizer"] |= {"weight_decay": 0.0, "schedule": "constant", "lr_batch_size": None}
    # Resumed by a command that does not give the keys added since, it runs them the old way (see test_recipe.py).
    now = with_values(now, saved_behaviour(now, lacking_added_keys(saved), given=()))
    assert config_differences(saved, now) == []


def test_a_folder_from_before_a_key_was_added_resumes_when_the_key_keeps_the_old_behaviour() -> None:
    new = _with(norm__track_running_stats=True, compare="model")
    new["optimizer"]["lr_batch_size"] = None
    assert config_differences(CONFIG, new) == []  # what the saved job computed is what this config computes
    changed = _with(norm__track_running_stats=False)
    assert config_differences(CONFIG, changed) == ["1 key only this job has: norm.track_running_stats"]


def test_a_job_still_running_in_another_process_is_refused(tmp_path: Path) -> None:
    parent = os.getppid()  # alive for the whole test, and not this process
    job = _job(tmp_path, "running", pid=parent, host=socket.gethostname())
    with pytest.raises(ResumeConflict, match=f"being trained right now \\(process {parent}"):
        check_resumable(job, CONFIG)


def test_a_job_recorded_running_on_another_host_may_be_resumed(tmp_path: Path, caplog) -> None:
    # No scheduler to ask (no SLURM id): a job on another machine cannot be checked from here; a warning says so.
    check_resumable(_job(tmp_path, "running", pid=os.getppid(), host="node-17"), CONFIG)
    assert "last recorded running on node-17" in caplog.text


def test_a_job_whose_process_died_may_be_resumed(tmp_path: Path) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    check_resumable(_job(tmp_path, "running", pid=dead, host=socket.gethostname()), CONFIG)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda job: (job / "summary.json").write_text(""), "summary.json cannot be read: it is empty"),
        (lambda job: (job / "summary.json").unlink(), "holds checkpoint.pt but no summary.json"),
        (lambda job: write_summary(job, {"status": "completed"}), "does not record the job's config"),
    ],
)
def test_a_folder_that_cannot_be_checked_is_refused(tmp_path: Path, damage, message: str) -> None:
    job = _job(tmp_path)
    (job / CHECKPOINT_FILE).write_bytes(b"weights")
    damage(job)
    with pytest.raises(ResumeConflict, match=message):
        check_resumable(job, CONFIG)


def test_checkpoint_round_trip_is_atomic_and_safe_to_load(tmp_path: Path) -> None:
    state = {"epoch": 2, "model": {"w": torch.arange(4.0)}, "rng": {"torch": torch.get_rng_state()}, "history": []}
    save_checkpoint(tmp_path, state)
    save_checkpoint(tmp_path, {**state, "epoch": 3})
    # No temporary file left behind; the one before is kept beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE])
    assert torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["epoch"] == 2
    loaded = load_checkpoint(tmp_path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert load_checkpoint(tmp_path / "elsewhere") is None


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    for epoch in (1, 2):
        save_checkpoint(tmp_path, {"epoch": epoch, "w": torch.arange(4.0)})
    _cut(tmp_path / CHECKPOINT_FILE)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    assert (
        f"checkpoint.pt in {tmp_path} cannot be read (" in caplog.text
        and "set aside as checkpoint.pt.unreadable; resuming from the checkpoint before it (epoch 1)" in caplog.text
    )
    # The one before is the checkpoint now: the next save keeps it as the one before.
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, "checkpoint.pt.unreadable"]
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_a_kill_between_the_two_renames_resumes_from_the_one_before(tmp_path: Path, caplog) -> None:
    save_checkpoint(tmp_path, {"epoch": 1})
    (tmp_path / CHECKPOINT_FILE).rename(tmp_path / PREVIOUS_CHECKPOINT_FILE)  # the new one not yet in place
    assert load_checkpoint(tmp_path)["epoch"] == 1 and not caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_no_readable_checkpoint_trains_again_from_epoch_1(tmp_path: Path, caplog) -> None:
    for epoch in (1, 2):
        save_checkpoint(tmp_path, {"epoch": epoch})
    _cut(tmp_path / CHECKPOINT_FILE)
    (tmp_path / PREVIOUS_CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    assert load_checkpoint(tmp_path) is None
    assert (
        "checkpoint.pt and checkpoint.prev.pt in" in caplog.text
        and "set aside as checkpoint.pt.unreadable and checkpoint.prev.pt.unreadable; training this job again from "
        "epoch 1"
        in caplog.text
    )


def test_new_dir_never_hands_out_a_folder_twice(tmp_path: Path) -> None:
    base = str(tmp_path / "multirun" / "2026-11-27" / "10-00-00")
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: new_dir(base), range(16)))
    assert len(set(claimed)) == 16 and base in claimed and f"{base}-16" in claimed
    assert all(Path(p).is_dir() for p in claimed)


def test_default_folders_are_claimed_once_per_launch(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["hydra.sweep.dir=${normsweep.new_dir:sweeps/a}"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == cfg.hydra.sweep.dir == "sweeps/a"  # cached: one folder per launch
    again = compose_cfg(["hydra.sweep.dir=${normsweep.new_dir:sweeps/a}"], return_hydra_config=True)
    assert again.hydra.sweep.dir == "sweeps/a-2"
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["a", "a-2"]


def test_the_saved_config_is_the_job_config_without_hydra(compose_cfg) -> None:
    config = task_config(compose_cfg(["norm=gn", "optimizer.lr=0.01"], return_hydra_config=True))
    assert "hydra" not in config and config["norm"]["name"] == "gn" and config["optimizer"]["lr"] == 0.01
    assert config == task_config(compose_cfg(["norm=gn", "optimizer.lr=0.01"]))
