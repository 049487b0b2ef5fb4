"""Hydra's basic sweeper, plus a check before launch that an existing job folder holds this same job."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import open_dict


class ResumingSweeper(BasicSweeper):
    """Before a batch of jobs launches, every job folder that already exists must hold this same job, so a resumed
    sweep is refused before Hydra rewrites anything in a folder it would mix. Otherwise Hydra's basic sweeper."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._next_job = 0
        self._multirun_yaml: tuple[Path, bytes] | None = None

    def sweep(self, arguments: list[str]) -> Any:
        # Hydra rewrites multirun.yaml before the first batch is checked: keep the old one to put back on refusal.
        from normsweep.resume import check_folder_name

        assert self.config is not None
        check_folder_name(str(self.config.hydra.sweep.dir), "hydra.sweep.dir")
        saved = Path(str(self.config.hydra.sweep.dir)) / "multirun.yaml"
        self._multirun_yaml = (saved, saved.read_bytes()) if saved.is_file() else None
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # Imported here: Hydra imports every plugin module at start-up, for any app; torch loads only for ours.
        from normsweep.jobfiles import atomic_write
        from normsweep.placement import JOBS_AT_ONCE_ENV, available_cpus, jobs_at_once
        from normsweep.resume import ResumeConflict, check_resumable, refuse, task_config

        assert self.hydra_context is not None and self.config is not None
        for offset, overrides in enumerate(batch):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_cfg):
                job_cfg.hydra.job.num = job_cfg.hydra.job.id = self._next_job + offset
            job_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
            if job_dir.exists():
                try:
                    check_resumable(job_dir, task_config(job_cfg))
                except ResumeConflict as err:
                    if self._multirun_yaml is not None:
                        atomic_write(*self._multirun_yaml)
                    refuse(err)
        self._next_job += len(batch)
        # The last step before the batch launches: tell its jobs how many of them share this machine's CPUs,
        # so that each takes its fair share of threads (the launched processes inherit the environment).
        at_once = jobs_at_once(self.config.hydra.launcher, len(batch), available_cpus())
        os.environ[JOBS_AT_ONCE_ENV] = str(at_once)
