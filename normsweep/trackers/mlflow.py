"""logger=mlflow: a sweep as one MLflow parent run with a child run per job, logged live by the jobs or exported
afterwards from their files (`python -m normsweep.aggregate --mlflow URI DIR`), with the same functions.

Who writes what: the coordinator makes the experiment and the parent run once, before any job starts (start_sweep:
several processes creating one SQLite database at once is a known failure), and records them in the sweep folder
(mlflow.json); each job, wherever it runs, attaches its child run to that parent and records the child in its own
folder (mlflow_run.json), so that a resumed job continues its own run; once the sweep is aggregated, the
coordinator logs report.md, the tables and the figures as the parent's artifacts (end_sweep). Runs are also found
by their tags, so an export of a sweep logged before adds nothing twice.

Every call goes through MlflowClient with explicit run ids (the fluent API's global active run would leak between
jobs run in one process), and under short HTTP timeouts and retries: a tracking server that is down costs each
caller one warning within seconds (normsweep.trackers), never the training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from normsweep.config.schema import MlflowConfig
from normsweep.sweep.compose import swept_keys
from normsweep.sweep.files import (
    FINISHED,
    Status,
    atomic_write,
    disk_full,
    job_dirs,
    override_key,
    read_diagnostics,
    read_metrics,
    read_overrides,
    read_summary,
)
from normsweep.sweep.settings import recipe, where_group
from normsweep.trackers import JobInfo

log = logging.getLogger("normsweep")

SWEEP_RECORD = "mlflow.json"  # in the sweep folder: the URI, experiment and parent run each job attaches to
RUN_RECORD = "mlflow_run.json"  # in a job folder: the job's own run, which its resume continues
DEFAULT_DB = "mlflow.db"  # the default backend: sqlite:///<sweep or run folder>/mlflow.db
ARTIFACTS = "mlartifacts"  # beside an SQLite database: the artifacts of the experiments normsweep creates there

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child under its parent
SWEEP_TAG = "normsweep.sweep"  # the parent's: the sweep folder, absolute
JOB_TAG = "normsweep.job"  # a child's: its job folder within the sweep folder (0, 1, ...)
RUN_TAG = "normsweep.run"  # a single run's: its folder, absolute (a single run has no parent)
STATUS_TAG = "normsweep.status"  # completed, diverged, stalled, pruned, failed, incomplete
ERROR_TAG = "normsweep.error"

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")
FINAL_METRICS = (  # summary.json's numbers, at step 0: one value each, which MLflow's charts draw as bars
    "test_acc",
    "test_loss",
    "best_val_acc",
    "best_epoch",
    "final_val_acc",
    "final_val_loss",
    "final_train_loss",
    "final_train_acc",
    "epochs_completed",
    "sec_per_epoch",
    "wall_seconds",
    "params",
)
SWEEP_FILES = ("report.md", "results.csv", "runs.csv", "best_by_*.csv", "*.png")  # the parent's artifacts

# For normsweep's calls only, where the user has not set them: MLflow's defaults (7 retries with exponential
# backoff, 120 s timeouts) would hold a job for minutes on a server that is down.
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # one line per run otherwise; normsweep says it once
}
PARAM_LENGTH = 500  # the longest param value MLflow 1.x took (2.x and 3.x: 6000); a config's values fit in it
KEY = re.compile(r"[^/\w.\- ]")  # what MLflow refuses in a metric name
# MLflow's words for a request that got no answer: the server's URL, and why (refused, timed out, unknown host).
UNREACHABLE = re.compile(r"API request to (\S+?)/api/.*?(\[Errno -?\d+\] [^'\")]*|Read timed out)", re.DOTALL)


@contextlib.contextmanager
def _calling() -> Iterator[None]:
    """normsweep's calls into MLflow: quick HTTP (QUICK_HTTP) without a line per retry, a new database made without
    MLflow's lines about its tables, and a server that does not answer said in a few words."""
    added = {key: value for key, value in QUICK_HTTP.items() if key not in os.environ}
    os.environ.update(added)
    quiet = [logging.getLogger(name) for name in ("urllib3.connectionpool", "mlflow.store.db.utils")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    except MlflowException as err:
        found = UNREACHABLE.search(str(err))
        if found is None:
            raise
        raise MlflowException(f"no answer from the tracking server {found[1]} ({found[2]})") from err
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        for key in added:
            os.environ.pop(key, None)


def default_uri(folder: Path) -> str:
    """The tracking URI when logger.mlflow.tracking_uri is null: an SQLite file in the sweep's (or run's) folder."""
    return f"sqlite:///{Path(folder).resolve() / DEFAULT_DB}"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of the experiment `name`, created when missing (with its artifacts beside an SQLite database, not in
    MLflow's default ./mlruns of whatever folder the command runs in)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS)
        return client.create_experiment(name, artifact_location=location)
    if found.lifecycle_stage != "active":
        raise MlflowException(
            f"the experiment {name!r} is deleted in {uri}; restore it (mlflow experiments restore) or choose another "
            "name with logger.mlflow.experiment_name"
        )
    return found.experiment_id


def _find_or_create(
    client: MlflowClient, experiment_id: str, tags: dict[str, str], name: str, params: dict[str, Any] | None = None
) -> str:
    """The active run of the experiment that has all of `tags`, or a new one with them (and `params`: a run's
    params are set once, at its creation)."""
    query = " and ".join(f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items())
    found = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    logged = [Param(key, _param_value(value)) for key, value in (params or {}).items()]
    for start in range(0, len(logged), 100):  # MLflow takes at most 100 params in one batch
        client.log_batch(run_id, params=logged[start : start + 100])
    return run_id


def _quoted(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)  # true, null, [1, 2] as in YAML
    return text if len(text) <= PARAM_LENGTH else text[: PARAM_LENGTH - 1] + "…"


def _epoch_metrics(rows: Iterable[dict[str, Any]], diagnostics: Iterable[dict[str, Any]]) -> list[Metric]:
    """metrics.csv's rows and diagnostics.csv's, each value at its epoch as the step. A diagnostic is
    diag/<metric>/<layer> (diag/<metric> for the whole model's), so MLflow's charts group each metric's layers."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(row[key]), now, int(row["epoch"]))
        for row in rows
        for key in EPOCH_METRICS
        if row.get(key) is not None
    ]
    for row in diagnostics:
        layer = "" if row["layer"] == "model" else f"/{row['layer']}"
        key = KEY.sub("_", f"diag/{row['metric']}{layer}")
        metrics.append(Metric(key, float(row["value"]), now, int(row["epoch"])))
    return metrics


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics in one batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _logged_epochs(client: MlflowClient, run_id: str) -> int:
    """The last epoch the run holds (0: none)."""
    return max((m.step for m in client.get_metric_history(run_id, "val_acc")), default=0)


def _catch_up(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], diagnostics: list[dict[str, Any]]) -> None:
    """Log the epochs of the job's files that the run does not hold yet: a run is never given an epoch twice by a
    resume or an export."""
    logged = _logged_epochs(client, run_id)
    _log_metrics(
        client,
        run_id,
        _epoch_metrics(
            [row for row in rows if int(row["epoch"]) > logged],
            [row for row in diagnostics if int(row["epoch"]) > logged],
        ),
    )


def _end(client: MlflowClient, run_id: str, summary: dict[str, Any]) -> None:
    """The job's ending on its run: its normsweep status as a tag (and its error), the summary's numbers, and the
    run's MLflow status: FINISHED for every finished job (a diverged, stalled or pruned job is a result), FAILED or
    KILLED (incomplete) otherwise."""
    status = str(summary["status"])
    tags = [RunTag(STATUS_TAG, status)]
    if summary.get("error"):
        tags.append(RunTag(ERROR_TAG, str(summary["error"])[:PARAM_LENGTH]))
    now = int(time.time() * 1000)
    final = [Metric(key, float(summary[key]), now, 0) for key in FINAL_METRICS if summary.get(key) is not None]
    client.log_batch(run_id, metrics=final if status in FINISHED else [], tags=tags)
    client.set_terminated(run_id, _run_status(status))


def _run_status(status: str) -> str:
    if status in FINISHED:
        return RunStatus.to_string(RunStatus.FINISHED)
    if status == Status.FAILED:
        return RunStatus.to_string(RunStatus.FAILED)
    return RunStatus.to_string(RunStatus.KILLED)


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _run_name(job: JobInfo) -> str:
    """The job's swept overrides (norm=bn seed=1), what tells it from the sweep's other jobs; its folder's name
    when none."""
    swept = [o for o in job.overrides if override_key(o) in job.swept]
    return " ".join(swept) or job.job_dir.name


def _job_key(job_dir: Path, sweep_dir: Path) -> str:
    return Path(job_dir).resolve().relative_to(Path(sweep_dir).resolve()).as_posix()


def _sweep_name(sweep_dir: Path) -> str:
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


# ---- the sweep: the coordinator (normsweep.trackers.start_sweep, end_sweep) and the export


@_calling()
def start_sweep(settings: MlflowConfig, sweep_dir: Path) -> None:
    """Make (or find again, for a resumed sweep) the experiment and the sweep's parent run, once the sweep is
    accepted and before any job starts, and record them in the sweep folder for the jobs."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = settings.tracking_uri or default_uri(sweep_dir)
    try:
        client = _client(uri)
        experiment_id = _experiment(client, settings.experiment_name, uri)
        parent = _parent(client, experiment_id, sweep_dir)
        client.update_run(parent, status=RunStatus.to_string(RunStatus.RUNNING))  # a resumed sweep runs again
    except BaseException:
        # No parent: the jobs log nothing rather than each paying for the same failure; the sweep's end tries again.
        atomic_write(sweep_dir / SWEEP_RECORD, json.dumps({"tracking_uri": uri, "parent_run_id": None}) + "\n")
        raise
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent}
    atomic_write(sweep_dir / SWEEP_RECORD, json.dumps(record, indent=2) + "\n")
    log.info("logger=mlflow: %s, experiment %s, parent run %s", uri, settings.experiment_name, parent)


def end_sweep(settings: MlflowConfig, sweep_dir: Path, ended: str) -> None:
    """Once the sweep is aggregated: the sweep exported from its files into the runs its jobs logged (which adds
    only what they lack: the jobs kept from before logger=mlflow was added, the epochs of a job whose server was
    down a while), its report, tables and figures on the parent, which ends as the sweep did (`ended`: finished,
    failed or stopped)."""
    uri = _read(Path(sweep_dir) / SWEEP_RECORD).get("tracking_uri") or settings.tracking_uri or default_uri(sweep_dir)
    log.info("logger=mlflow: %s", export_sweep(uri, sweep_dir, settings.experiment_name, ended))


@_calling()
def export_sweep(uri: str, sweep_dir: Path, experiment_name: str = "normsweep", ended: str = "finished") -> str:
    """A sweep folder's jobs into MLflow from their files, as the live logger logs them: the parent, a child per
    job (found again by their tags: a second export adds nothing), the epochs a run lacks, each ended job's ending,
    and the sweep's files on the parent, which ends FINISHED (FAILED or KILLED when `ended` says failed or
    stopped). Returns where to look."""
    sweep_dir = Path(sweep_dir)
    client = _client(uri)
    experiment_id = _experiment(client, experiment_name, uri)
    parent = _parent(client, experiment_id, sweep_dir)
    summaries = {job_dir: read_summary(job_dir) for job_dir in job_dirs(sweep_dir)}
    summaries = {job_dir: s for job_dir, s in summaries.items() if isinstance(s.get("config"), dict)}  # started
    overrides = {job_dir: read_overrides(job_dir, summary) or [] for job_dir, summary in summaries.items()}
    swept = tuple(key for key in swept_keys(list(overrides.values())) if not where_group(key))
    for job_dir, summary in summaries.items():
        job = JobInfo(job_dir, summary["config"], overrides[job_dir], sweep_dir, swept)
        tags = {PARENT_TAG: parent, JOB_TAG: _job_key(job_dir, sweep_dir)}
        run_id = _find_or_create(client, experiment_id, tags, _run_name(job), recipe(job.config))
        rows = read_metrics(job_dir)
        _catch_up(client, run_id, rows, read_diagnostics(job_dir, len(rows) and int(rows[-1]["epoch"])))
        status = summary["status"]
        if status != Status.RUNNING and client.get_run(run_id).data.tags.get(STATUS_TAG) != status:
            _end(client, run_id, summary)
    for path in sorted({path for pattern in SWEEP_FILES for path in sweep_dir.glob(pattern) if path.is_file()}):
        client.log_artifact(parent, str(path))
    status = {"finished": RunStatus.FINISHED, "failed": RunStatus.FAILED}.get(ended, RunStatus.KILLED)
    client.set_terminated(parent, RunStatus.to_string(status))
    return f"the sweep is {_see(uri, experiment_id, parent)}"


def _see(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: its page on a tracking server, or the command that serves its database."""
    if uri.startswith(("http://", "https://")):
        return f"the run {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"the run {run_id}; to see it: mlflow ui --backend-store-uri {uri}"


def _parent(client: MlflowClient, experiment_id: str, sweep_dir: Path) -> str:
    return _find_or_create(client, experiment_id, {SWEEP_TAG: str(sweep_dir.resolve())}, _sweep_name(sweep_dir))


# ---- a job's run (normsweep.trackers.open_trackers)


class MlflowTracker:
    """A job's run: each epoch as it ends, then its ending. A run closed without one (the job failed, or was
    stopped) ends FAILED or KILLED, and a resume of the job continues it."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id, self.ended = client, run_id, False

    @_calling()
    def epoch(self, metrics: dict[str, Any], diagnostics: list[dict[str, Any]]) -> None:
        _log_metrics(self.client, self.run_id, _epoch_metrics([metrics], diagnostics))

    @_calling()
    def finish(self, summary: dict[str, Any]) -> None:
        self.ended = True
        _end(self.client, self.run_id, summary)

    @_calling()
    def close(self) -> None:
        if self.ended:
            return
        self.ended = True
        err = sys.exc_info()[1]  # what ends the job, closing its trackers on its way out (job/run.py)
        stopped = isinstance(err, KeyboardInterrupt) or disk_full(err)  # Ctrl-C, SIGTERM, a full disk: resumable
        status = Status.INCOMPLETE if stopped else Status.FAILED
        self.client.set_tag(self.run_id, STATUS_TAG, str(status))
        self.client.set_terminated(self.run_id, _run_status(status))


@_calling()
def open_tracker(settings: MlflowConfig, job: JobInfo) -> MlflowTracker | None:
    """The job's run, found again or made: in a sweep, a child of the parent the coordinator recorded; a single
    run's own run otherwise. It gets the epochs trained before this process that it lacks (a resumed job). None in
    a sweep whose parent run the coordinator could not make."""
    tags: dict[str, str]
    if job.sweep_dir is None:
        uri = settings.tracking_uri or default_uri(job.job_dir)
        client = _client(uri)
        experiment_id = _experiment(client, settings.experiment_name, uri)
        tags = {RUN_TAG: str(Path(job.job_dir).resolve())}
    else:
        sweep = _read(Path(job.sweep_dir) / SWEEP_RECORD)
        if not sweep.get("parent_run_id"):  # the coordinator could not make it, and warned: each job does not
            log.info("logger=mlflow: the sweep has no parent run; its end logs this job from its files if it can")
            return None
        uri, experiment_id = sweep["tracking_uri"], sweep["experiment_id"]
        client = _client(uri)
        tags = {PARENT_TAG: sweep["parent_run_id"], JOB_TAG: _job_key(job.job_dir, job.sweep_dir)}
    run_id = _recorded_run(client, uri, job.job_dir, tags)
    if run_id is None:
        run_id = _find_or_create(client, experiment_id, tags, _run_name(job), recipe(job.config))
        record = {"tracking_uri": uri, "run_id": run_id}
        atomic_write(Path(job.job_dir) / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    _catch_up(client, run_id, job.history, read_diagnostics(job.job_dir, job.resumed_from))
    if job.sweep_dir is None:  # a sweep says where it is once, at its end
        log.info("logger=mlflow: this job is %s", _see(uri, experiment_id, run_id))
    return MlflowTracker(client, run_id)


def _recorded_run(client: MlflowClient, uri: str, job_dir: Path, tags: dict[str, str]) -> str | None:
    """The run the job's folder records for this URI, if MLflow still has it, with these tags (the same parent)."""
    record = _read(Path(job_dir) / RUN_RECORD)
    if record.get("tracking_uri") != uri or not record.get("run_id"):
        return None
    try:
        run = client.get_run(record["run_id"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    same = run.info.lifecycle_stage == "active" and all(run.data.tags.get(k) == v for k, v in tags.items())
    return run.info.run_id if same else None
