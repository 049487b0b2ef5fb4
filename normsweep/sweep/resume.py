"""Resuming a job folder: the check that a folder holds this same job, and which folder of a sweep holds a job (known
by its settings, not by its position in the sweep)."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from normsweep.config.errors import ConfigError, full_error
from normsweep.sweep.files import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    Status,
    job_dirs,
    parse_overrides,
    read_overrides,
)
from normsweep.sweep.liveness import is_own_slurm_job, load_summaries, load_summary, process_alive, slurm_alive
from normsweep.sweep.settings import (
    config_differences,
    copies_by_settings,
    lacking_added_keys,
    saved_behaviour,
    settings_key,
    with_values,
)

log = logging.getLogger("normsweep")


class ResumeConflict(ConfigError):
    """The folder holds another job, or one still running: it is refused and nothing in it is touched."""


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """A job's own config, resolved, without Hydra's node: what summary.json keeps to recognise the job."""
    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_container(own, resolve=True)


def check_resumable(job_dir: Path, config: dict[str, Any], overrides: Sequence[str] = ()) -> None:
    """Raise ResumeConflict unless `job_dir` is new, or holds this same job with nothing still running it (no
    SLURM job queued or running for it, no process of it on this machine). A key added since the folder was saved
    and not among the task `overrides` is compared at the value the saved job ran with (see saved_behaviour)."""
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
    if status == Status.RUNNING:
        _check_stopped(job_dir, summary)
    saved = summary.get("config")
    if not isinstance(saved, dict):
        raise ResumeConflict(f"{job_dir}: {SUMMARY_FILE} does not record the job's config; {fix}")
    behaviour = saved_behaviour(config, lacking_added_keys(saved), _given(overrides))
    differences = config_differences(saved, with_values(config, behaviour))
    if differences:
        listed = "; ".join(differences[:-1]) + "; and " + differences[-1] if len(differences) > 1 else differences[0]
        raise ResumeConflict(
            f"{job_dir} holds a job with another config ({listed}). Resume it with the command that started it, or "
            f"{fix}"
        )


def _given(overrides: Sequence[str]) -> set[str]:
    """The keys the task overrides set (`optimizer.warmup_epochs=1` → optimizer.warmup_epochs)."""
    return set(parse_overrides(list(overrides)))


def keep_saved_behaviour(job_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Set, in a job's composed config, each key added since its folder was saved that the command does not give
    to the value the saved job ran with (ADDED_KEYS), so that its remaining epochs compute what its first ones did:
    an old folder resumes the old way, whatever today's defaults are."""
    saved = load_summary(job_dir).get("config")
    if isinstance(saved, dict):
        for key, value in saved_behaviour(task_config(cfg), lacking_added_keys(saved), _given(overrides)).items():
            OmegaConf.update(cfg, key, value)


def _check_stopped(job_dir: Path, summary: dict[str, Any]) -> None:
    """Refuse a job recorded `running` that load_summary found alive (SLURM says its job is queued or running, else
    its process runs here), unless it is this very SLURM job, requeued and finding its own folder. A job recorded on
    another host that SLURM cannot vouch for is taken as stopped, with a warning: it cannot be checked from here."""
    job = summary.get("slurm_job")
    here = summary.get("host") == socket.gethostname()
    busy = (
        f"{job_dir} is being trained right now (process {summary.get('pid')} on {summary.get('host')}); "
        "wait for it to end, or stop it and run the same command again to resume it"
    )
    if is_own_slurm_job(job, os.environ):
        if here and summary.get("pid") != os.getpid() and process_alive(summary):  # another copy in this allocation
            raise ResumeConflict(busy)
        log.info("%s: SLURM requeued job %s; resuming it", job_dir, job)
        return
    said = slurm_alive(summary)
    if said:  # never a second copy beside the one SLURM runs or will run
        raise ResumeConflict(
            f"job {job_dir.name} (SLURM {job}) is still queued or running on the cluster ({job_dir}); wait for it or "
            f"scancel {job}, then run the same command again"
        )
    if said is False:  # it ended since load_summary asked
        return
    if not here:
        log.warning(
            "%s was last recorded running on %s (process %s%s), which cannot be checked from here; taking it as "
            "stopped and resuming it",
            job_dir,
            summary.get("host"),
            summary.get("pid"),
            f", SLURM job {job}: squeue does not answer" if job else "",
        )
    elif summary.get("pid") != os.getpid():
        raise ResumeConflict(busy)


def _saved_overrides(job_dir: Path, summary: dict[str, Any]) -> tuple[str, ...] | None:
    """The task overrides a job folder was made with (Hydra's overrides.yaml, else summary.json's), in any order."""
    saved = read_overrides(job_dir, summary)
    return tuple(sorted(saved)) if saved is not None else None


class SweepFolders:
    """The job folders of a sweep folder, known by their settings, and the folder each job of a launch gets.

    A job goes to the folder that saved its settings (the same config, compared as config_differences compares),
    so a sweep resumed with more seeds, another norm or its lists in another order finds every job it ran; else to
    a folder made with its task overrides but never started; else to a new folder. A folder made with the same
    overrides that saved another config (a default changed in a YAML file since) is refused, before any launch.
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = Path(sweep_dir)
        self._by_overrides: dict[tuple[str, ...], list[Path]] = {}
        # The sets of added keys saved jobs lack (saved before them): a job is looked up with each set at old values.
        self._lacking: set[frozenset[str]] = {frozenset()}
        self._claimed: set[Path] = set()  # one folder per job of a launch, even for two jobs with the same settings
        self._numbers = itertools.count()
        folders = job_dirs(self.sweep_dir) if self.sweep_dir.is_dir() else []
        saved = list(zip(folders, load_summaries(folders)))
        self._by_settings = copies_by_settings(saved)
        for job_dir, summary in saved:
            if isinstance(summary.get("config"), dict):
                self._lacking.add(lacking_added_keys(summary["config"]))
            overrides = _saved_overrides(job_dir, summary)
            if overrides is not None:
                self._by_overrides.setdefault(overrides, []).append(job_dir)

    def claim(self, config: dict[str, Any], overrides: list[str], new_name: str | None = None) -> str:
        """The folder for the job with this resolved config and these task overrides, relative to the sweep folder.

        A new job gets `new_name`, or with None the lowest number no folder has. Raises ResumeConflict for a folder
        that cannot be taken (another config, a job running now, a summary.json that cannot be read).
        """
        given = _given(overrides)
        keys = {settings_key(with_values(config, saved_behaviour(config, lacking, given))) for lacking in self._lacking}
        same = [d for _, d in sorted(sum((self._by_settings.get(k, []) for k in keys), []), reverse=True)]
        made = self._by_overrides.get(tuple(sorted(overrides)), [])
        job_dir = next((d for d in [*same, *made] if d not in self._claimed), None)
        if job_dir is None:
            job_dir = self.sweep_dir / new_name if new_name is not None else self._free()
        if job_dir.exists():
            check_resumable(job_dir, config, overrides)
        self._claimed.add(job_dir)
        return str(job_dir.relative_to(self.sweep_dir))

    def _free(self) -> Path:
        numbered = (self.sweep_dir / str(n) for n in self._numbers)
        return next(path for path in numbered if not path.exists() and path not in self._claimed)


def mistakes_of(mistakes: dict[str, list[list[str]]], jobs: Sequence[Sequence[str]], named: int = 3) -> str:
    """One line per distinct mistake found in a sweep's jobs, in the order met; one that not every job makes names
    the jobs that make it, by the overrides that tell them apart (`2 of 10 jobs: norm=bn batch_size=1, ...`)."""
    common = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    lines = []
    for message, affected in mistakes.items():
        if len(affected) == len(jobs):
            lines.append(message)
            continue
        labels = [" ".join(o for o in job if o not in common) or "(no overrides)" for job in affected]
        shown = ", ".join(labels[:named]) + (f" and {len(labels) - named} more" if len(labels) > named else "")
        lines.append(f"{message} ({len(affected)} of {len(jobs)} jobs: {shown})")
    return "\n".join(lines)


def refuse(err: ConfigError) -> NoReturn:
    """Stop the launch with the refusal in one message (exit status 2), before any job starts.

    An exit, not an exception: Hydra turns exceptions raised in callbacks into warnings and carries on.
    """
    log.error("%s", err, exc_info=err if full_error() else None)
    sys.exit(2)


def check_folder_name(folder: str, key: str) -> None:
    if not folder.strip():
        refuse(ResumeConflict(f"{key} is empty; name a folder, or leave {key} out to get a new one"))
