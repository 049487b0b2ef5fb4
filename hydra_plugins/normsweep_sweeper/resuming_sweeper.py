"""Hydra's basic sweeper, plus job folders known by their settings: a resumed sweep finds each job it ran, whatever
its position in the new command, and an existing folder that holds another job is refused before launch."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("normsweep")

NUMBERED = "${hydra.job.num}"  # conf/hydra/default.yaml's subdir: then a new job takes the lowest free number


class _Job:
    """A job of a batch about to launch: its overrides, its composed config and its own part (resume.task_config),
    the environment it runs with, its folder's name and its number in the sweep. (Not a dataclass: Hydra imports
    this module outside sys.modules.)"""

    def __init__(
        self, overrides: list[str], config: DictConfig, own: dict, env: dict[str, str], folder: str, num: int
    ) -> None:
        self.overrides, self.config, self.own = overrides, config, own
        self.env, self.folder, self.num = env, folder, num


def _quoted(name: str) -> str:
    """A folder name as a Hydra override value: quoted (a name may hold `,` or `=`), Hydra's and OmegaConf's
    special characters escaped."""
    return "'" + name.replace("'", "\\'").replace("${", "\\${") + "'"


class _Composed:
    """The config loader, holding the job configs the sweeper composed for the launcher to take instead of
    composing each one again (Hydra's basic launcher composes every job; at about a tenth of a second each, that was
    a second per ten jobs). A config is taken once; one not held is composed as before. Pickled (joblib, submitit,
    SLURM) it holds nothing: those launchers compose in their own processes."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._ready: dict[tuple[str, ...], DictConfig] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # while unpickling, before __dict__ is set
            raise AttributeError(name)
        return getattr(self._loader, name)

    def keep(self, overrides: Sequence[str], config: DictConfig) -> None:
        self._ready[tuple(overrides)] = config

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        ready = self._ready.pop(tuple(sweep_overrides), None)
        return ready if ready is not None else self._loader.load_sweep_config(master_config, sweep_overrides)

    def __getstate__(self) -> dict[str, Any]:
        return {"_loader": self._loader, "_ready": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class ResumingSweeper(BasicSweeper):
    """Before the first batch launches, every job of the sweep is given its folder, as a per-job
    `hydra.sweep.subdir=…` override (a Hydra override: not among the job's task overrides), so every launcher
    (basic, joblib, submitit) puts it there; `hydra.job.num` keeps its meaning, the job's position in the sweep.
    Otherwise Hydra's basic sweeper."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._multirun_yaml: tuple[Path, bytes] | None = None
        self._composed: _Composed | None = None
        self._configs: Any = None  # normsweep.sweep.compose.JobConfigs, made on first use
        self._done: dict[str, Any] = {}  # the checks made for one job that others share (imports, model builds)
        self._planned: dict[Path, int] = {}  # each job's folder, given so far, and the epochs it trains
        self._at_once = 1  # how many jobs of the batch launched now run at the same time
        self._tracked = False  # whether the trackers have their record of the sweep (trackers.start_sweep)
        self._folders: list[str] = []  # the folder of each job given one by the last _with_folders, launched or packed

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._composed = _Composed(hydra_context.config_loader)
        hydra_context = dataclasses.replace(hydra_context, config_loader=self._composed)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if not isinstance(self.launcher, BasicLauncher):  # it would not take them: hold none
            self._composed = None

    def sweep(self, arguments: list[str]) -> Any:
        # Hydra rewrites multirun.yaml before the first batch is checked: keep the old one to put back on refusal.
        from normsweep.sweep.resume import check_folder_name

        assert self.config is not None
        check_folder_name(str(self.config.hydra.sweep.dir), "hydra.sweep.dir")
        saved = Path(str(self.config.hydra.sweep.dir)) / "multirun.yaml"
        self._multirun_yaml = (saved, saved.read_bytes()) if saved.is_file() else None
        with self._watching():
            return super().sweep(arguments)

    def _watching(self) -> contextlib.AbstractContextManager:
        """Where the sweep stands, logged each time one of its jobs ends (sweep/progress.py), whichever launcher runs
        them; a launcher that says it itself, with its own progress line, is left to (SLURM's)."""
        from normsweep.sweep.progress import sweep_progress, watching

        if getattr(self.launcher, "reports_progress", False):
            return contextlib.nullcontext()
        return watching(lambda: sweep_progress(self._job_states(), self._at_once))

    def _job_states(self) -> list[Any]:
        """The state of each job given its folder so far (sweep/progress.py's JobState)."""
        from normsweep.sweep.progress import read_job

        return [read_job(folder, epochs) for folder, epochs in list(self._planned.items())]

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        if self.batch_index == 0:  # every batch at once: a refusal comes before any job of the sweep has run
            assert self.overrides is not None
            self.overrides = self._with_folders(self.overrides)
        return super().get_job_batch()

    def _with_folders(
        self,
        batches: Sequence[Sequence[Sequence[str]]],
        env: Sequence[dict[str, str]] = (),
        swept: Sequence[str] | None = None,
    ) -> list[list[list[str]]]:
        """Every job checked, then given its folder (a `hydra.sweep.subdir=` override, last); a refusal is one line
        per mistake and exit status 2, with the sweep folder as it was. `env`: per job (in order), environment
        variables the job runs with (hydra.job.env_set), which do not change its config or its folder. `swept`: the
        keys the whole sweep varies, when these batches are only a part of it (default: those the batches vary)."""
        # Imported here: Hydra imports every plugin module at start-up, for any app; torch loads only for ours.
        from normsweep.config.errors import ConfigError
        from normsweep.sweep.compose import SWEPT_KEYS_ENV, swept_keys
        from normsweep.sweep.resume import SweepFolders, refuse, task_config

        assert self.config is not None
        folders = SweepFolders(Path(str(self.config.hydra.sweep.dir)))
        numbered = OmegaConf.to_container(self.config.hydra.sweep)["subdir"] == NUMBERED
        jobs = [list(o) for batch in batches for o in batch]
        placed: list[list[list[str]]] = []
        self._folders = []
        try:
            configs = iter(self._checked(jobs))
            extra = iter(env or [{}] * len(jobs))
            number = getattr(self, "job_idx", 0)  # the next job's number in the sweep (a tuning sweep's rounds)
            for batch in batches:
                given: list[_Job] = []
                for overrides in batch:
                    job_cfg, variables = next(configs), next(extra)
                    task = list(job_cfg.hydra.overrides.task)
                    own = task_config(job_cfg)
                    name = folders.claim(own, task, None if numbered else str(job_cfg.hydra.sweep.subdir))
                    self._planned[folders.sweep_dir / name] = int(job_cfg.epochs)
                    given.append(_Job(list(overrides), job_cfg, own, dict(variables), name, number))
                    number += 1
                self._folders.extend(job.folder for job in given)
                placed.append(self._launched(given, folders.sweep_dir))
            # For the jobs' log tags, and the hparams every job of the sweep reports (trackers/).
            os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(jobs) if swept is None else swept)
        except ConfigError as err:
            self._put_back()
            refuse(err)
        except BaseException:  # a job that Hydra cannot compose (norm=bn,nonexistent): said by the command line
            self._put_back()
            raise
        if not self._tracked:  # once the sweep is accepted (a refused one leaves its folder as it was)
            from normsweep.trackers import start_sweep

            start_sweep(self.config.get("logger"), folders.sweep_dir)
            self._tracked = True
        return placed

    def _launched(self, batch: list[_Job], sweep_dir: Path) -> list[list[str]]:
        """The overrides each job of a batch is launched with (its environment, then its folder, last). Where jobs
        train together (sweep/packing.py), only a pack's host is launched, told of the others (their configs and
        environments: a tuning sweep's trial each) by the environment variable that names its pack file."""
        from normsweep.sweep.packing import JOB_NUM_ENV, PACK_ENV, Guest, plan, write_pack

        packs = plan([job.own for job in batch])
        if packs.packs:
            for line in packs.lines([job.num for job in batch]):
                log.info(line)
            for pack in packs.packs:
                host, guests = batch[pack[0]], [batch[i] for i in pack[1:]]
                members = [Guest(g.folder, g.num, g.config, list(g.config.hydra.overrides.task), g.env) for g in guests]
                host.env[PACK_ENV] = str(write_pack(sweep_dir, host.folder, members))
            for job in batch:  # the launcher numbers only the jobs it launches: each is told its number in the sweep
                job.env[JOB_NUM_ENV] = str(job.num)
            batch = [job for i, job in enumerate(batch) if not any(i in pack[1:] for pack in packs.packs)]
        launched = []
        for job in batch:
            given = [f"++hydra.job.env_set.{k}={_quoted(v)}" for k, v in job.env.items()]
            launched.append([*job.overrides, *given, f"hydra.sweep.subdir={_quoted(job.folder)}"])
            self._hand_over(job.config, job.folder, launched[-1], job.env, len(given) + 1)
        return launched

    def _checked(self, jobs: list[list[str]]) -> list[DictConfig]:
        """Each job's config, composed and given the checks a single run makes (config/checks.py); ConfigError with
        one line per distinct mistake, naming the jobs that make it when not all do."""
        from normsweep import startup
        from normsweep.config.checks import check_job
        from normsweep.config.errors import ConfigError
        from normsweep.sweep.compose import JobConfigs
        from normsweep.sweep.resume import mistakes_of

        assert self.hydra_context is not None and self.config is not None
        if self._configs is None:
            self._configs = JobConfigs(self.hydra_context.config_loader, self.config)
        # The checks import torch: a forked child composes the jobs meanwhile (sweep/compose.py).
        self._configs.compose_beside(jobs, lambda: importlib.import_module("normsweep.job.build"))
        startup.settle()  # the imports are done (normsweep/startup.py)
        mistakes: dict[str, list[list[str]]] = {}  # what a job's config is refused for -> the jobs' overrides
        checked = []
        for num, overrides in enumerate(jobs):
            job_cfg = self._configs.compose(list(overrides))
            with open_dict(job_cfg):
                job_cfg.hydra.job.num, job_cfg.hydra.job.id = num, str(num)  # as Hydra's launchers: id is a str
            try:  # the checks a single run makes, for every job before any starts: one line per mistake
                check_job(job_cfg, dict(job_cfg.hydra.runtime.choices), self._done)
            except ConfigError as err:
                mistakes.setdefault(str(err), []).append(list(job_cfg.hydra.overrides.task))
            checked.append(job_cfg)
        if mistakes:
            raise ConfigError(mistakes_of(mistakes, jobs))
        return checked

    def _hand_over(
        self, job_cfg: DictConfig, name: str, overrides: list[str], env: dict[str, str], added: int = 1
    ) -> None:
        """Keep the job's config for the launcher, as composing `overrides` (the `added` last ones: its environment,
        then its subdir) makes it."""
        if self._composed is None or any(c in name for c in "$\\'"):  # escapes: leave those to Hydra's parser
            return
        with open_dict(job_cfg):
            job_cfg.hydra.sweep.subdir = name
            job_cfg.hydra.job.env_set.update(env)
            job_cfg.hydra.overrides.hydra.extend(overrides[-added:])
            job_cfg.hydra.job.num, job_cfg.hydra.job.id = "???", "???"  # the launcher's to set, as after composing
        self._composed.keep(overrides, job_cfg)

    def _put_back(self) -> None:
        """Leave the sweep folder as it was before this refused launch: its old multirun.yaml, or no folder at all
        when this launch made it (nothing ran there)."""
        from normsweep.sweep.files import atomic_write

        assert self.config is not None
        folder = Path(str(self.config.hydra.sweep.dir))
        if self._multirun_yaml is not None:
            atomic_write(*self._multirun_yaml)
            return
        (folder / "multirun.yaml").unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # it holds something else: not ours to remove
            pass

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # Each job's config was composed, and its folder checked, when the jobs were given their folders. The last
        # step before the batch launches: tell its jobs how many of them share this machine's CPUs, so that each
        # takes its fair share of threads (the launched processes inherit the environment).
        from normsweep.job.placement import JOBS_AT_ONCE_ENV, available_cpus, jobs_at_once

        assert self.config is not None
        self._at_once = jobs_at_once(self.config.hydra.launcher, len(batch), available_cpus())
        os.environ[JOBS_AT_ONCE_ENV] = str(self._at_once)
