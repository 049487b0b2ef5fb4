"""A pack's host (sweep/packing.py): the job launched for a pack checks its guests as a launched job is checked,
gives each its folder (Hydra's files, its own log under its own tag), trains them all with it (job/run_pack.py)
and records each guest's failure in its folder, as a job alone would be recorded."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from normsweep.config.checks import validate
from normsweep.config.errors import ConfigError, full_error
from normsweep.config.schema import Config
from normsweep.sweep.files import TRIAL_KEY, atomic_write, record_failure
from normsweep.sweep.packing import Guest
from normsweep.sweep.resume import check_resumable, keep_saved_behaviour, task_config
from normsweep.sweep.studies import JobTrial
from normsweep.sweep.tags import JobTag, telling_apart

log = logging.getLogger("normsweep")


def run_packed(
    run: Config,
    cpus: int,
    sweep_dir: Path,
    job_dir: Path,
    overrides: list[str],
    config: dict,
    guests: list[Guest],
    host_tag: JobTag | None,
    swept: tuple[str, ...],
    trial: JobTrial | None = None,
) -> dict:
    """Train this job and its pack's guests together (job/run_pack.py), each guest checked and given its folder as
    this job was (its Hydra files, its log); a guest that fails is recorded failed in its folder, as a job alone
    would be. Returns this job's summary, or raises what it failed with."""
    from normsweep.job.run_pack import PackedJob, run_pack

    entries = [PackedJob(run, job_dir, overrides, config, trial=trial)]
    choices, voices = [], []
    for guest in guests:
        cfg, guest_dir = copy.deepcopy(guest.config), sweep_dir / guest.name
        with open_dict(cfg):
            hydra_node = cfg.pop("hydra")
        keep_saved_behaviour(guest_dir, cfg, guest.overrides)
        guest_config = task_config(cfg)
        check_resumable(guest_dir, guest_config)
        choices.append(dict(hydra_node.runtime.choices))
        guest_run = dataclasses.replace(validate(cfg, choices[-1]), device=run.device, threads=run.threads)
        _hydra_files(guest_dir, cfg, hydra_node, guest.overrides)
        voices.append(_Voice(guest_dir / LOG_NAME, JobTag(guest.num, telling_apart(guest.overrides)), host_tag))
        guest_trial = JobTrial.from_env(guest.env)  # a tuning sweep's trial: its study may prune it alone
        entries.append(PackedJob(guest_run, guest_dir, guest.overrides, guest_config, voices[-1].speaking, guest_trial))
    try:
        results = run_pack(entries, cpus, sweep_dir, swept)
        for entry, result, chosen in zip(entries[1:], results[1:], choices):
            if isinstance(result, BaseException):
                with entry.speaking():
                    recorded = {TRIAL_KEY: entry.trial.record} if entry.trial else {}  # still its study's trial
                    record_failure(entry.job_dir, result, entry.overrides, entry.config, chosen, **recorded)
                    shown = full_error() or not isinstance(result, ConfigError)
                    log.error("job failed: %s", result, exc_info=result if shown else None)
    finally:
        for voice in voices:
            voice.close()
    if isinstance(results[0], BaseException):
        raise results[0]
    return results[0]


LOG_NAME = "normsweep.log"  # a job's log in its folder, as Hydra names it (hydra.job.name + .log)


class _Voice:
    """A guest's log lines: under its own tag (instead of its host's), into its folder's log and not its host's
    (the console shows every job's lines, as for jobs run one after another)."""

    def __init__(self, path: Path, tag: JobTag, host_tag: JobTag | None) -> None:
        self.tag, self.host_tag = tag, host_tag
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, delay=True)
        self.handler.addFilter(tag)
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        if files and files[0].formatter is not None:
            self.handler.setFormatter(files[0].formatter)

    @staticmethod
    def _elsewhere(record: logging.LogRecord) -> bool:
        return False  # a guest's line, kept out of the host's log file

    @contextlib.contextmanager
    def speaking(self):
        root = logging.getLogger()
        hosts = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        if self.host_tag:
            self.host_tag.detach()
        self.tag.attach()
        for handler in hosts:
            handler.addFilter(self._elsewhere)
        root.addHandler(self.handler)
        try:
            yield
        finally:
            root.removeHandler(self.handler)
            for handler in hosts:
                handler.removeFilter(self._elsewhere)
            self.tag.detach()
            if self.host_tag:
                self.host_tag.attach()

    def close(self) -> None:
        self.handler.close()


def _hydra_files(job_dir: Path, cfg: DictConfig, hydra_node: DictConfig, overrides: list[str]) -> None:
    """A guest's .hydra/ folder, as Hydra writes a launched job's: its config, Hydra's node and its overrides."""
    folder = job_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_node})))
    atomic_write(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
