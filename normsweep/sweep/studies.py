"""A tuning sweep's Optuna studies (hydra/sweeper=tune): their storage in the sweep folder, the trials the sweeper
asks for and is told about, and a job's side of its trial (each epoch's validation accuracy reported to the pruner).

The studies live in Optuna's journal file (STORAGE_FILE): an append-only log that several processes, on one machine
or on the nodes of a cluster sharing the folder, write safely, where an SQLite file breaks under parallel writers and
on network file systems. Optuna is imported here only; it is an extra (`pip install 'normsweep[tune]'`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normsweep.config.errors import ConfigError
from normsweep.sweep.files import CONFIRM, SEARCH
from normsweep.sweep.search import Plan, Searched, override_value

log = logging.getLogger("normsweep")

STORAGE_FILE = "optuna.journal"
LOCK_FILE = "tune.lock"  # held by the sweep's one coordinator while it runs
TRIAL_ENV = "NORMSWEEP_TRIAL"  # a tuning job's trial, set by the sweeper through hydra.job.env_set (JSON)


def optuna_module() -> Any:
    """Optuna, or the one line naming the extra that brings it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "hydra/sweeper=tune needs Optuna, which is not installed: pip install 'normsweep[tune]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own lines say what each trial did
    return optuna


def open_storage(sweep_dir: Path) -> Any:
    optuna = optuna_module()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(sweep_dir) / STORAGE_FILE)))


@contextlib.contextmanager
def one_coordinator(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep folder's tuning lock while the block runs: a second tuning sweep on the same folder (another
    shell, another node of a shared file system) is refused instead of training the same trials."""
    import fcntl

    path = Path(sweep_dir) / LOCK_FILE
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"another tuning sweep is running in {sweep_dir} ({holder}); wait for it to end, or stop it and run "
                "the same command again to resume the studies"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def pruner_spec(name: str, epochs: int, min_epochs: int, reduction_factor: int) -> dict[str, Any]:
    return {"name": name, "min_epochs": min_epochs, "max_epochs": epochs, "reduction_factor": reduction_factor}


def make_pruner(spec: Mapping[str, Any]) -> Any:
    """The study's pruner. Hyperband by default: successive halving run in several brackets, each waiting a different
    number of epochs before its first cut, so that a norm slow to start (none, in) is not judged on its first epoch
    alone; Optuna's benchmarks found it the best partner of TPE."""
    pruners = optuna_module().pruners
    name, low, high, factor = spec["name"], spec["min_epochs"], spec["max_epochs"], spec["reduction_factor"]
    if name == "hyperband":
        return pruners.HyperbandPruner(min_resource=low, max_resource=max(high, low), reduction_factor=factor)
    if name == "successive_halving":
        return pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=factor)
    if name == "median":
        return pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=low - 1)
    return pruners.NopPruner()


def make_sampler(name: str, seed: int, startup: int) -> Any:
    samplers = optuna_module().samplers
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    return samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def spread(distributions: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` settings spread evenly over the space: the first points of a scrambled Sobol sequence (seeded), each
    mapped onto its key's range (on the log scale where the key is searched on one). TPE's first trials, which it
    would otherwise draw at random: with a budget of a few trials per study, random draws often leave a decade of
    learning rates untried. The first two points lie in the two halves of each key's range, the first four in its
    four quarters (one each), and so on.

    Not Optuna's QMCSampler: it draws a study's first trial at random, and asked without results (as here) it draws
    every one so (measured: two of four points within 0.3 decades of each other over 1e-4..1 on 5 seeds of 8)."""
    if count < 1:
        return []
    from scipy.stats import qmc

    keys = list(distributions)
    with warnings.catch_warnings():  # "the balance properties of Sobol' points require n to be a power of 2"
        warnings.simplefilter("ignore", UserWarning)
        try:
            sobol = qmc.Sobol(d=len(keys), scramble=True, rng=seed)
        except TypeError:  # scipy before 1.15 calls it `seed`
            sobol = qmc.Sobol(d=len(keys), scramble=True, seed=seed)
        points = sobol.random(count)
    return [{key: _placed(distributions[key], float(u)) for key, u in zip(keys, row)} for row in points]


def _placed(dist: Any, u: float) -> Any:
    """The value of an Optuna distribution at the fraction `u` (0 <= u < 1) of its range (of its log, on a log
    scale); each integer or choice gets an equal share of it."""
    d = optuna_module().distributions
    if isinstance(dist, d.CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    if isinstance(dist, d.IntDistribution):
        if dist.log:
            value = math.floor(math.exp(math.log(dist.low) + u * (math.log(dist.high + 1) - math.log(dist.low))))
        else:
            value = dist.low + math.floor(u * ((dist.high - dist.low) // dist.step + 1)) * dist.step
        return int(min(max(value, dist.low), dist.high))
    if dist.log:  # floats: distribution() makes them without a step
        value = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        value = dist.low + u * (dist.high - dist.low)
    return float(min(max(value, dist.low), dist.high))


def distribution(searched: Searched) -> Any:
    d = optuna_module().distributions
    if searched.choices:
        return d.CategoricalDistribution(list(searched.choices))
    if searched.integer:
        return d.IntDistribution(int(searched.low), int(searched.high), log=searched.log)
    return d.FloatDistribution(float(searched.low), float(searched.high), log=searched.log)


@dataclass
class Job:
    """One job the sweeper launches for a study: a search trial (its Optuna number) or a confirmation run."""

    study: str
    phase: str
    overrides: list[str]  # the study's grid overrides and the values tried
    params: dict[str, Any]
    number: int | None = None
    record: dict[str, Any] = field(default_factory=dict)  # what the job is told (TRIAL_ENV)

    def env(self) -> dict[str, str]:
        """The environment the job runs with (hydra.job.env_set: every launcher applies it): its trial."""
        return {TRIAL_ENV: json.dumps(self.record, separators=(",", ":"))}


@dataclass
class Settings:
    n_trials: int
    n_jobs: int
    pruner: str
    min_epochs: int
    reduction_factor: int
    sampler: str
    startup_trials: int | None
    confirm_seeds: int

    def startup(self) -> int:
        """Trials of a study spread over the space (spread()) before TPE models the results: four, one in each
        quarter of each key's range (all of a budget of four or fewer); a third of a budget over 12, at most 10.
        From fewer results TPE extrapolates: after a good low learning rate and a diverged high one, it proposed
        lower ones still and never the decade between (digits, seed 3: every norm 2-15 points below the grid)."""
        if self.startup_trials is not None:
            return self.startup_trials
        return min(self.n_trials, max(4, min(10, self.n_trials // 3)))


class Studies:
    """The coordinator's side: one study per combination of the grid, each asked for its trials in rounds of
    `n_jobs` and told how each ended (from its job folder's summary.json, whatever launcher ran it)."""

    def __init__(self, sweep_dir: Path, plan: Plan, settings: Settings, studies: list[dict[str, Any]]) -> None:
        """`studies`: per study of the plan, in order, {"seed", "epochs", "metric"} of its composed config."""
        optuna = optuna_module()
        self.sweep_dir, self.plan, self.settings = Path(sweep_dir), plan, settings
        self.storage = open_storage(sweep_dir)
        self.distributions = {s.key: distribution(s) for s in plan.space}
        self.studies: dict[str, Any] = {}
        self.grid: dict[str, list[str]] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.told: set[tuple[str, int]] = set()  # (study, trial number) of the trials ended in this session
        for overrides, facts in zip(plan.studies, studies):
            name = plan.name(overrides)
            spec = pruner_spec(settings.pruner, facts["epochs"], settings.min_epochs, settings.reduction_factor)
            self.studies[name] = optuna.create_study(
                study_name=name,
                storage=self.storage,
                direction="maximize",
                sampler=make_sampler(settings.sampler, int(facts["seed"]), settings.startup()),
                pruner=make_pruner(spec),
                load_if_exists=True,
            )
            self.grid[name] = overrides
            self.info[name] = {**facts, "pruner": spec}
            if not self.studies[name].metric_names:  # what optuna-dashboard calls the objective
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.studies[name].set_metric_names([facts["metric"]])
            if settings.sampler == "tpe":
                self._spread(name, int(facts["seed"]))
        self._started = False  # whether the first round (which resumes stopped trials) was asked

    def _spread(self, name: str, seed: int) -> None:
        """Queue study `name`'s spread trials (spread()) that it has not had yet, as many as it has trials left:
        all of them in a new study; on a resumed one given a larger start (`startup_trials`, or `n_trials` that
        raises it), the next points of the same sequence, not TPE's own random start. A point the study has had
        (at any state, queued included) is not queued again."""
        study, settings, state = self.studies[name], self.settings, optuna_module().trial.TrialState
        trials = study.get_trials(deepcopy=False)
        had = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials]  # a queued one's are its fixed
        room = settings.n_trials - sum(t.state != state.FAIL for t in trials)  # a failed trial's retry is queued
        points = spread(self.distributions, min(settings.startup(), settings.n_trials), seed)
        for params in [p for p in points if p not in had][: max(0, room)]:
            study.enqueue_trial(params)

    def _record(self, name: str, phase: str, number: int | None) -> dict[str, Any]:
        info = self.info[name]
        return {
            "storage": str((self.sweep_dir / STORAGE_FILE).resolve()),
            "study": name,
            "phase": phase,
            "number": number,
            "searched": [s.key for s in self.plan.space],
            "metric": info["metric"],
            "pruner": info["pruner"],
        }

    def _job(self, name: str, trial: Any) -> Job:
        params = dict(trial.params)
        values = [f"{key}={override_value(params[key])}" for key in self.distributions if key in params]
        return Job(
            name, SEARCH, [*self.grid[name], *values], params, trial.number, self._record(name, SEARCH, trial.number)
        )

    def left(self, name: str) -> int:
        """How many trials study `name` has yet to end: n_trials, less those completed or pruned."""
        state = optuna_module().trial.TrialState
        ended = sum(t.state in (state.COMPLETE, state.PRUNED) for t in self.studies[name].get_trials(deepcopy=False))
        return max(0, self.settings.n_trials - ended)

    def next_round(self) -> list[Job]:
        """The trials to launch now: on a resumed sweep's first round, the trials a stopped coordinator left running
        (their job folders resume from their checkpoints); then new ones, up to n_jobs per study in the round, while
        the study has fewer than n_trials trials ended or running. Empty once every study has its n_trials."""
        state = optuna_module().trial.TrialState
        jobs: list[Job] = []
        for name, study in self.studies.items():
            resumed = [] if self._started else self._resumed(name, study)
            jobs += resumed
            counted = sum(
                t.state in (state.COMPLETE, state.PRUNED, state.RUNNING)
                or (t.state == state.FAIL and (name, t.number) in self.told)
                for t in study.get_trials(deepcopy=False)
            )
            for _ in range(self.settings.n_jobs - len(resumed)):
                if counted >= self.settings.n_trials:
                    break
                jobs.append(self._job(name, study.ask(self.distributions)))
                counted += 1
        self._started = True
        return jobs

    def _resumed(self, name: str, study: Any) -> list[Job]:
        """The trials of `study` an earlier, stopped run of the sweep left running, to run again (their folders
        resume); a trial whose job failed in an earlier run is asked again once, with the same values."""
        state = optuna_module().trial.TrialState
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for trial in trials:
            if trial.state == state.FAIL and trial.number not in retried and "retry_of" not in trial.user_attrs:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        running = [t for t in trials if t.state == state.RUNNING]
        if running:
            log.info("study %s: %d trial(s) stopped mid-way in an earlier run; resuming them", name, len(running))
        return [self._job(name, t) for t in running]

    def tell(self, job: Job, summary: Mapping[str, Any]) -> str:
        """End the job's trial by how its job ended; the line the sweep's log says of it."""
        optuna = optuna_module()
        state = optuna.trial.TrialState
        study = self.studies[job.study]
        study_id = self.storage.get_study_id_from_name(job.study)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, job.number)
        if self.storage.get_trial(trial_id).state.is_finished():
            return ""
        status = str(summary.get("status"))
        metric = self.info[job.study]["metric"]
        value = summary.get(f"final_{metric}" if metric == "val_acc" else metric)
        if status == "pruned":
            study.tell(job.number, state=state.PRUNED)
        elif status in ("completed", "diverged", "stalled"):
            # A diverged run's accuracy may be NaN: it counts as learning nothing, so the sampler avoids its region.
            score = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
            study.tell(job.number, score)
        else:
            study.tell(job.number, state=state.FAIL)
        self.told.add((job.study, job.number))
        return self._line(job, status, value)

    def _line(self, job: Job, status: str, value: Any) -> str:
        state = optuna_module().trial.TrialState
        study = self.studies[job.study]
        trials = study.get_trials(deepcopy=False)
        ended = [t for t in trials if t.state.is_finished()]
        pruned = sum(t.state == state.PRUNED for t in trials)
        tried = " ".join(f"{k}={_short(v)}" for k, v in job.params.items())
        shown = f"{value:.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
        best = self.best(job.study)
        lead = f"; best {best.value:.2f}% (trial {best.number})" if best is not None else ""
        return (
            f"study {job.study}: trial {job.number} ({tried}) {status}, {self.info[job.study]['metric']} {shown}"
            f"{lead}; {len(ended)} of {self.settings.n_trials} trials done, {pruned} pruned"
        )

    def best(self, name: str) -> Any:
        """The study's best completed trial, or None."""
        state = optuna_module().trial.TrialState
        done = [t for t in self.studies[name].get_trials(deepcopy=False) if t.state == state.COMPLETE]
        return max(done, key=lambda t: t.value) if done else None

    def confirmations(self, seeds: int) -> list[Job]:
        """Each study's best setting, trained with `seeds` fresh seeds (the study's seed + 1, + 2, ...) for all its
        epochs, unpruned. Fresh: the best trial was chosen for its score on its own seed, so that run flatters it."""
        jobs = []
        for name in self.studies:
            best = self.best(name)
            if best is None:
                log.warning("study %s: no trial completed, so there is no setting to confirm", name)
                continue
            first = int(self.info[name]["seed"]) + 1
            values = [f"{key}={override_value(best.params[key])}" for key in self.distributions if key in best.params]
            grid = [o for o in self.grid[name] if not o.startswith("seed=")]
            for seed in range(first, first + seeds):
                jobs.append(
                    Job(
                        name,
                        CONFIRM,
                        [*grid, *values, f"seed={seed}"],
                        dict(best.params),
                        None,
                        self._record(name, CONFIRM, None),
                    )
                )
        return jobs


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class JobTrial:
    """A tuning job's side of its trial: each epoch's compare metric reported to the study, and whether the
    study's pruner stops the job there. A confirmation run reports nothing and is never stopped."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = {k: record.get(k) for k in ("study", "phase", "number", "searched")}
        self._given = record
        self._trial: Any = None
        self._reported: set[int] = set()  # the epochs the study holds a value of (a resumed job's earlier ones)
        self._best = -math.inf  # the best value so far, for compare_metric=best_val_acc
        self.why: str | None = None  # why should_stop stopped the job, when not the pruner's own reason

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> JobTrial | None:
        text = environ.get(TRIAL_ENV)
        return cls(json.loads(text)) if text else None

    def _open(self) -> Any:
        """The trial, once: its study loaded from the journal with the sweep's pruner, and what it already holds."""
        if self._trial is None:
            optuna = optuna_module()
            given = self._given
            storage = open_storage(Path(given["storage"]).parent)
            study = optuna.load_study(study_name=given["study"], storage=storage, pruner=make_pruner(given["pruner"]))
            study_id = storage.get_study_id_from_name(given["study"])
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, given["number"])
            reported = storage.get_trial(trial_id).intermediate_values
            self._reported = set(reported)
            self._best = max([self._best, *reported.values()])  # a resumed job's best of its earlier epochs
            self._trial = optuna.Trial(study, trial_id)
        return self._trial

    def should_stop(self, epoch: int, val_acc: float, final: bool = False, floor: float | None = None) -> bool:
        """Report the epoch's value (once: a resumed job skips the epochs it reported before); whether to stop there
        (never after the `final` epoch: the trial has completed). `floor`: the accuracy of a model that learned
        nothing (the job's own bound for `stalled`); a trial no better than it, where another trial of its study did
        better at the same epoch, is stopped whatever the pruner's brackets wait for (`learned_nothing`)."""
        if self._given.get("phase") != SEARCH or not math.isfinite(val_acc):
            return False  # a confirmation run is never stopped; a diverged one stops as diverged, not pruned
        trial = self._open()
        self._best = max(self._best, val_acc)
        value = self._best if self._given.get("metric") == "best_val_acc" else val_acc
        if epoch not in self._reported:
            trial.report(value, epoch)
            self._reported.add(epoch)
        if final:
            return False
        self.why = None
        if floor is not None and self.learned_nothing(trial, epoch, value, floor):
            self.why = (
                f"pruned: {value:.2f}% after epoch {epoch} is no better than naming the largest class "
                f"({floor:.2f}% at most), where another trial of the study learned"
            )
            return True
        return bool(trial.should_prune())

    def learned_nothing(self, trial: Any, epoch: int, value: float, floor: float) -> bool:
        """Whether the trial is at chance (`value` at most `floor`) after the pruner's first `min_epochs`, while
        another trial of its study reported more than `floor` at this epoch. Such a trial cannot become its study's
        best: in experiment=lr_range on digits, 16 of 45 runs were at chance after their first epoch, and the 3 of
        them that learned later ended at 40-53% against their norm's 97-99% (docs/tuning.md). No pruner: never."""
        spec = self._given.get("pruner") or {}
        if spec.get("name", "none") == "none" or epoch < int(spec.get("min_epochs", 1)) or value > floor:
            return False
        others = trial.study.get_trials(deepcopy=False)
        return any(t.number != trial.number and t.intermediate_values.get(epoch, -math.inf) > floor for t in others)
