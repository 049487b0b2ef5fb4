"""Resuming a job folder: the per-epoch checkpoint, and the check that a folder holds this same job."""

from __future__ import annotations

import io
import logging
import os
import pickle
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normsweep.config import ConfigError
from normsweep.jobfiles import METRICS_FILE, SUMMARY_FILE, Status, atomic_write, load_summary

log = logging.getLogger("normsweep")

CHECKPOINT_FILE = "checkpoint.pt"
SLURM_ID = "SLURM_JOB_ID"
# Keys that say where a job runs or finds its data, or how the sweep is aggregated, not what a job computes: a
# resumed job may change them.
WHERE_KEYS = ("device", "dataset.root", "dataset.download", "compare")
# Keys added to the config after normsweep 0.1.0's first sweeps, with the value that computes what those jobs
# computed: a folder saved without the key resumes when the key has that value now (an upgrade mid-sweep).
ADDED_KEYS = {"norm.track_running_stats": True, "norm.group_size": None, "optimizer.lr_batch_size": None}
_ABSENT = object()


class ResumeConflict(ConfigError):
    """The folder holds another job, or one still running: it is refused and nothing in it is touched."""


def save_checkpoint(job_dir: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(job_dir) / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(job_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of a job folder (tensors on the CPU), or None when it has none."""
    path = Path(job_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"{path} cannot be read ({str(err).splitlines()[0]}); delete it to train this job again from epoch 1"
        ) from None


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """A job's own config, resolved, without Hydra's node: what summary.json keeps to recognise the job."""
    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_container(own, resolve=True)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: saved vs new` for every key whose value differs, ignoring where-keys (device, data root)."""
    old, now = _flatten(saved), _flatten(new)
    show = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
    keys = [
        k
        for k in old.keys() | now.keys()
        if k not in WHERE_KEYS
        and old.get(k, _ABSENT) != now.get(k, _ABSENT)
        and not (k not in old and k in ADDED_KEYS and now[k] == ADDED_KEYS[k])
    ]
    # Values changed on both sides first (norm.name='bn' there, 'gn' now), then keys only one side has.
    keys.sort(key=lambda k: (k not in old or k not in now, k))
    return [f"{key}={show(old.get(key, _ABSENT))} there, {show(now.get(key, _ABSENT))} now" for key in keys]


def check_resumable(job_dir: Path, config: dict[str, Any]) -> None:
    """Raise ResumeConflict unless `job_dir` is new, or holds this same job with no process still running it."""
    job_dir = Path(job_dir)
    summary = load_summary(job_dir)
    status = summary["status"]
    fix = "move that folder away, or leave out hydra.sweep.dir / hydra.run.dir to start in a new folder"
    if status == Status.NOT_STARTED:
        leftovers = [name for name in (METRICS_FILE, CHECKPOINT_FILE) if (job_dir / name).exists()]
        if leftovers:
            raise ResumeConflict(
                f"{job_dir} holds {' and '.join(leftovers)} but no {SUMMARY_FILE}, so what ran there cannot be "
                f"checked; {fix}"
            )
        return
    if status == Status.CORRUPT:
        raise ResumeConflict(f"{job_dir}: {summary['error']}, so what ran there cannot be checked; {fix}")
    # load_summary has already turned `running` into `incomplete` if its process is gone from this machine. A job
    # recorded on another host cannot be checked from here: it is taken as stopped (a requeued or resubmitted
    # cluster job must be able to resume), with a warning in case it is in fact still running there.
    if status == Status.RUNNING and summary.get("host") != socket.gethostname():
        log.warning(
            "%s was last recorded running on %s (process %s); taking it as stopped and resuming it",
            job_dir,
            summary.get("host"),
            summary.get("pid"),
        )
    elif status == Status.RUNNING and summary.get("slurm_job") and summary["slurm_job"] == os.environ.get(SLURM_ID):
        log.info("%s: SLURM requeued job %s; resuming it", job_dir, summary["slurm_job"])
    elif status == Status.RUNNING and summary.get("pid") != os.getpid():
        raise ResumeConflict(
            f"{job_dir} is being trained right now (process {summary.get('pid')} on {summary.get('host')}); "
            "wait for it to end, or stop it and run the same command again to resume it"
        )
    saved = summary.get("config")
    if not isinstance(saved, dict):
        raise ResumeConflict(f"{job_dir}: {SUMMARY_FILE} does not record the job's config; {fix}")
    differences = config_differences(saved, config)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ResumeConflict(
            f"{job_dir} holds a job with another config ({shown}). Resume it with the command that started it, or {fix}"
        )


def refuse(err: ResumeConflict) -> None:
    """Stop the launch with the conflict in one message (exit status 2), before any job starts.

    An exit, not an exception: Hydra turns exceptions raised in callbacks into warnings and carries on.
    """
    log.error("%s", err, exc_info=err if os.environ.get("HYDRA_FULL_ERROR") == "1" else None)
    sys.exit(2)


def check_folder_name(folder: str, key: str) -> None:
    if not folder.strip():
        refuse(ResumeConflict(f"{key} is empty; name a folder, or leave {key} out to get a new one"))


class ResumeCheck(Callback):
    """The same check for a single run, before Hydra writes into an existing `hydra.run.dir`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder_name(str(config.hydra.run.dir), "hydra.run.dir")
        job_dir = Path(str(config.hydra.run.dir))
        if job_dir.exists():
            try:
                check_resumable(job_dir, task_config(config))
            except ResumeConflict as err:
                refuse(err)
