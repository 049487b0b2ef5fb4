"""hydra/sweeper=tune: one Optuna study per combination of the grid's values (one per norm by default), each
searching the keys given an interval or a choice, its trials launched in rounds through the configured launcher,
pruned trials stopped by their jobs, and the sweep resumable from its folder (normsweep/sweep/studies.py). Every
trial is an ordinary job folder: the aggregation at the end works as for a grid."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hydra_plugins.normsweep_sweeper.resuming_sweeper import ResumingSweeper

log = logging.getLogger("normsweep")


class TuningSweeper(ResumingSweeper):
    """The grid sweeper's checks and folders (ResumingSweeper), with the jobs chosen by the studies. Its keys are
    conf/hydra/sweeper/tune.yaml's (documented in docs/tuning.md); the defaults below are the same ones, for a
    sweeper configured without that file."""

    def __init__(
        self,
        n_trials: Any = 12,
        n_jobs: Any = 1,
        sampler: Any = "tpe",
        startup_trials: Any = None,
        pruner: Any = "hyperband",
        min_epochs: Any = 1,
        reduction_factor: Any = 3,
        confirm_seeds: Any = 0,
        params: dict[str, str] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.given = {
            "n_trials": n_trials,
            "n_jobs": n_jobs,
            "pruner": pruner,
            "sampler": sampler,
            "confirm_seeds": confirm_seeds,
            "min_epochs": min_epochs,
            "reduction_factor": reduction_factor,
            "startup_trials": startup_trials,
        }
        self.job_idx = 0
        self._swept: list[str] | None = None  # the keys the sweep varies: its studies' names and the searched keys
        self._unplaced: list[int] = []  # the epochs of each trial this run of the sweep has yet to give a folder

    def sweep(self, arguments: list[str]) -> Any:
        from normsweep.config.errors import ConfigError
        from normsweep.sweep.resume import check_folder_name, refuse
        from normsweep.sweep.search import check_settings, override_value, plan
        from normsweep.sweep.studies import optuna_module

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        check_folder_name(str(sweep_dir), "hydra.sweep.dir")
        saved = sweep_dir / "multirun.yaml"
        self._multirun_yaml = (saved, saved.read_bytes()) if saved.is_file() else None
        try:  # every mistake said before anything is written or trained
            check_settings(**self.given)
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            compare = str(self.config.get("compare") or "norm")
            the_plan = plan(parser.parse_overrides([*self._parse_config(), *arguments]), compare)
            self._refuse_test_metric()
            optuna_module()
        except ConfigError as err:
            self._put_back()
            refuse(err)
        inside = [f"{s.key}={override_value(s.first())}" for s in the_plan.space]  # a value of each searched key
        firsts = [[*study, *inside] for study in the_plan.studies]
        try:
            facts = [self._facts(cfg) for cfg in self._checked(firsts)]
        except ConfigError as err:
            self._put_back()
            refuse(err)
        except BaseException:
            self._put_back()
            raise
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(sweep_dir, the_plan, facts)
        except ConfigError as err:  # another coordinator holds the folder: nothing of it was touched
            refuse(err)

    def _refuse_test_metric(self) -> None:
        from normsweep.config.errors import ConfigError

        assert self.config is not None
        if str(self.config.get("compare_metric")) == "test_acc":
            raise ConfigError(
                "compare_metric=test_acc: a search that picks settings by their test accuracy reports a test "
                "accuracy that flatters them; tune on val_acc (the default) or best_val_acc"
            )

    @staticmethod
    def _facts(cfg: Any) -> dict[str, Any]:
        metric = str(cfg.get("compare_metric") or "val_acc")
        return {"seed": int(cfg.seed), "epochs": int(cfg.epochs), "metric": metric}

    def _run(self, sweep_dir: Path, the_plan: Any, facts: list[dict[str, Any]]) -> list[Any]:
        from normsweep.sweep.studies import Settings, Studies, one_coordinator

        settings = Settings(**self.given)
        returns: list[Any] = []
        with one_coordinator(sweep_dir), self._watching():
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # the command, for report.md and the resume line
            studies = Studies(sweep_dir, the_plan, settings, facts)
            # What the whole sweep varies, whichever round runs: each job's log tag and hparams name the same keys.
            searched = [s.key for s in the_plan.space]
            self._swept = [*the_plan.named_by, *searched, *(["seed"] if settings.confirm_seeds else [])]
            self._unplaced = [info["epochs"] for name, info in studies.info.items() for _ in range(studies.left(name))]
            log.info(
                f"tuning: {len(studies.studies)} stud{'ies' if len(studies.studies) > 1 else 'y'} "
                f"({', '.join(studies.studies)}), {settings.n_trials} trials each, searching "
                f"{'; '.join(s.describe() for s in the_plan.space)}; pruner {settings.pruner}, sampler "
                f"{settings.sampler}; storage {sweep_dir / 'optuna.journal'}"
            )
            while jobs := studies.next_round():
                results, folders = self._launch(jobs)
                returns.append(results)
                for job, folder in zip(jobs, folders):  # each trial ended as its job folder says, whoever ran it
                    line = studies.tell(job, _summary(sweep_dir / folder))
                    if line:
                        log.info(line)
            if settings.confirm_seeds:
                jobs = studies.confirmations(settings.confirm_seeds)
                if jobs:
                    log.info(
                        f"confirming each study's best setting with {settings.confirm_seeds} fresh seed"
                        f"{'s' if settings.confirm_seeds > 1 else ''}: {len(jobs)} jobs"
                    )
                    returns.append(self._launch(jobs)[0])
        return returns

    def _job_states(self) -> list[Any]:
        """The trials given their folders, and the ones still to come: what the sweep's progress line counts (its
        confirmations once they are launched)."""
        from normsweep.sweep.progress import JobState

        placed = super()._job_states()
        return placed + [JobState(epochs) for epochs in self._unplaced[len(placed) :]]

    def _launch(self, jobs: list[Any]) -> tuple[Any, list[str]]:
        """One round: the jobs checked and given their folders (a trial asked again finds its folder), launched;
        Hydra's returns, and each job's folder name."""
        assert self.launcher is not None
        placed = self._with_folders([[job.overrides for job in jobs]], [job.env() for job in jobs], self._swept)[0]
        self.validate_batch_is_legal(placed)
        results = self.launcher.launch(placed, initial_job_idx=self.job_idx)
        self.job_idx += len(self._folders)  # every job of the round, launched or trained in a pack by its host
        return results, list(self._folders)  # every job's, those trained in a pack by its host included


def _summary(job_dir: Path) -> dict[str, Any]:
    from normsweep.sweep.liveness import load_summary

    with contextlib.suppress(OSError):
        return load_summary(job_dir)
    return {"status": "failed"}
