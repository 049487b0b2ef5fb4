"""The trackers a job reports to beside its own files (logger=tensorboard, logger=mlflow; conf/logger/).

A job's files are its results; a tracker is a view of them in a tool researchers already look in. So a tracker that
fails (a library error, a tracking server that is down) costs one warning line and its own output for the rest of
the job, never the training. Each tracker lives in its own module, imported only when chosen: the core install needs
neither library, and a missing one is named before any job starts (check_trackers).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from normsweep.config.errors import ConfigError
from normsweep.sweep.files import override_key

log = logging.getLogger("normsweep")

# logger=NAME → (its module here, the library it needs, the extra that installs it).
TRACKERS = {
    "tensorboard": ("normsweep.trackers.tensorboard", "tensorboard", "tensorboard"),
    "mlflow": ("normsweep.trackers.mlflow", "mlflow", "mlflow"),
}


@dataclass(frozen=True)
class JobInfo:
    """What a tracker knows of the job it follows."""

    job_dir: Path
    config: dict[str, Any]  # the job's resolved config, as summary.json keeps it
    overrides: list[str]  # the job's task overrides (norm=bn seed=1)
    sweep_dir: Path | None = None  # the sweep's folder; None for a single run
    swept: tuple[str, ...] = ()  # the keys the sweep varies (sweep/compose.py): the same hparams in every job
    resumed_from: int = 0  # epochs trained before this process: a resumed job continues after them
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv's rows of those epochs


class Tracker(Protocol):
    """One tracker's view of one job: each epoch as it ends, then the summary once the job has finished."""

    def epoch(self, metrics: dict[str, Any], diagnostics: list[dict[str, Any]]) -> None:
        """An epoch's row of metrics.csv and that epoch's rows of diagnostics.csv (none when diagnostics=false)."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The finished job's summary.json (completed, diverged, stalled or pruned)."""

    def close(self) -> None:
        """Flush and let go; called however the job ends, after finish or instead of it."""


def chosen(settings: Any) -> list[str]:
    """The trackers a config turns on: those whose node under `logger` is set."""
    return [name for name in TRACKERS if getattr(settings, name, None) is not None]


# The schemes of the tracking URIs MLflow's stores take (its error for any other names these); a dialect may follow
# a database's after `+` (postgresql+psycopg2://).
MLFLOW_SCHEMES = (
    "file",
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)


def check_trackers(settings: Any) -> None:
    """Refuse, before any job starts, a tracker whose library is not installed (one line naming the extra), and a
    tracking URI MLflow has no store for (a mistyped scheme: `htp://...`)."""
    for name in chosen(settings):
        if lacking := missing(name):
            raise ConfigError(f"logger={name} {lacking} (or leave logger out)")
    uri = settings.mlflow.tracking_uri if settings.mlflow is not None else None
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if uri and "://" in uri else None
    if scheme is not None and scheme not in MLFLOW_SCHEMES:
        raise ConfigError(
            f"logger.mlflow.tracking_uri={uri}: MLflow has no store for '{scheme}://'; give a tracking server "
            "(http://HOST:PORT), a database (sqlite:////abs/path/runs.db), or null for an SQLite file in the sweep "
            "folder"
        )


def missing(name: str) -> str | None:
    """What tracker `name` lacks, in the words of an error that follows its option ("needs tensorboard, which is not
    installed: pip install 'normsweep[tensorboard]'"); None when its library is installed."""
    _, library, extra = TRACKERS[name]
    if importlib.util.find_spec(library) is None:
        return f"needs {library}, which is not installed: pip install 'normsweep[{extra}]'"
    return None


def unchosen_tracker_key(args: list[str]) -> str | None:
    """The line for a command that sets a key of a tracker it does not choose (`logger.tensorboard.x=1` without
    logger=tensorboard: its node is null, and OmegaConf cannot set a key under it); None when `args` set none."""
    for arg in args:
        name = override_key(arg).split(".")
        if len(name) > 2 and name[0] == "logger" and name[1] in TRACKERS:
            return (
                f"{arg}: logger={name[1]} is not chosen, and its keys exist only once it is: add logger={name[1]} "
                f"(both trackers: 'logger=[tensorboard,mlflow]')"
            )
    return None


class Trackers:
    """The job's trackers as one: a call that fails in one tracker warns once and drops that tracker."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers

    def epoch(self, metrics: dict[str, Any], diagnostics: list[dict[str, Any]]) -> None:
        self._each(lambda tracker: tracker.epoch(metrics, diagnostics))

    def finish(self, summary: dict[str, Any]) -> None:
        self._each(lambda tracker: tracker.finish(summary))

    def close(self) -> None:
        self._each(lambda tracker: tracker.close())
        self.trackers = {}

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as err:  # a tracker's failure is never the job's
                _drop(name, err)
                del self.trackers[name]
                with contextlib.suppress(Exception):  # it has failed already
                    tracker.close()


def open_trackers(settings: Any, job: JobInfo) -> Trackers:
    """The trackers `settings` (the config's `logger` node) turns on, each opened for `job`; one that fails to open
    is warned about and left out, and so is one whose module's `open_tracker` returns None (it has nothing to do
    for this job, and has said why: the sweep's record in it could not be made, and the sweep said so once)."""
    opened: dict[str, Tracker] = {}
    for name in chosen(settings):
        try:  # importing the library may fail too (a broken install): a warning, as any other failure
            module = importlib.import_module(TRACKERS[name][0])
            tracker = module.open_tracker(getattr(settings, name), job)
        except Exception as err:
            _drop(name, err)
            continue
        if tracker is not None:
            opened[name] = tracker
    return Trackers(opened)


def start_sweep(settings: Any, sweep_dir: Path) -> None:
    """What a tracker keeps of a whole sweep (MLflow's parent run), made once by the coordinator before any job
    starts (sweep/callbacks.py), by each chosen tracker that keeps one (its module's `start_sweep`). One that fails
    is warned about; a missing library is left to the sweep's checks, which name it."""
    for name, module in _sweep_trackers(settings, "start_sweep"):
        try:
            module.start_sweep(getattr(settings, name), sweep_dir)
        except Exception as err:
            _warn(name, err, "the jobs log nothing to it, and the sweep's end tries again from their files")


def end_sweep(settings: Any, sweep_dir: Path, ended: str) -> None:
    """The sweep's end, once it is aggregated (`ended`: finished, failed, or stopped), to each tracker that does
    something then (its module's `end_sweep`: MLflow's parent run, TensorBoard's runs of jobs kept from before the
    logger was added). One that fails is warned about."""
    for name, module in _sweep_trackers(settings, "end_sweep"):
        try:
            module.end_sweep(getattr(settings, name), sweep_dir, ended)
        except Exception as err:
            _warn(name, err, f"the sweep's own files in {sweep_dir} are complete")


def _sweep_trackers(settings: Any, hook: str) -> list[tuple[str, Any]]:
    """The chosen trackers whose module has `hook` (start_sweep, end_sweep), with their module."""
    names = [name for name in chosen(settings) if importlib.util.find_spec(TRACKERS[name][1]) is not None]
    modules = [(name, importlib.import_module(TRACKERS[name][0])) for name in names]
    return [(name, module) for name, module in modules if hasattr(module, hook)]


def _drop(name: str, err: Exception) -> None:
    _warn(name, err, "it logs nothing more for this job (the job's own files are complete)")


def _warn(name: str, err: Exception, consequence: str) -> None:
    log.warning(
        "logger=%s: %s: %s; %s",
        name,
        type(err).__name__,
        str(err).splitlines()[0] if str(err) else "",
        consequence,
    )
