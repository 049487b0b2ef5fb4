"""logger=tensorboard: each job's curves, diagnostics and hparams as TensorBoard event files in its folder, one run
per job; and the same written afterwards from a sweep's saved folders (`python -m normsweep.aggregate --tensorboard`).

Written with TensorBoard's own event writer and protos, not torch's SummaryWriter: the export runs in the aggregator,
which never imports torch. A job's run is `<job folder>/tensorboard/<its swept settings>/` (`0/tensorboard/norm=bn`
under `tensorboard --logdir SWEEP`), and it holds the hparams too: TensorBoard's HParams table reads each job's
metrics from the job's own run, not from the extra run torch's `add_hparams` makes.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from normsweep.config.schema import TensorBoardConfig
from normsweep.sweep.compose import swept_keys
from normsweep.sweep.files import (
    FINISHED,
    Status,
    job_dirs,
    override_key,
    parse_overrides,
    read_diagnostics,
    read_metrics,
    read_overrides,
)
from normsweep.sweep.liveness import load_summaries
from normsweep.sweep.settings import where_group
from normsweep.trackers import JobInfo

log = logging.getLogger("normsweep")

FOLDER = "tensorboard"  # in each job's folder: the job's run, rewritten whole when the job resumes or is exported

# metrics.csv's columns → the tags of their scalars, at step = epoch.
EPOCH_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "lr": "lr",
    "images_per_second": "speed/images_per_second",
    "epoch_seconds": "speed/epoch_seconds",
}
# summary.json's final numbers → their scalars, at the last epoch's step.
FINAL_TAGS = {"test_acc": "test/acc", "test_loss": "test/loss", "best_val_acc": "val/best_acc"}
# The HParams table's metric columns: a scalar's last value, named as summary.json names it.
TABLE_METRICS = {
    "test/acc": "test_acc",
    "val/acc": "final_val_acc",
    "val/best_acc": "best_val_acc",
    "test/loss": "test_loss",
    "train/loss": "final_train_loss",
}


def diagnostics_tag(row: dict[str, Any]) -> str:
    """A row of diagnostics.csv → its scalar's tag: `diag/in_std/features.1`."""
    return f"diag/{row['metric']}/{row['layer']}"


class JobRun:
    """One job's run: a new event file in `<job_dir>/tensorboard/<name>/` (what the folder held before is replaced),
    opened with the job's hparams, then each epoch as it ends, then the final numbers. The live tracker and the
    export both write through it."""

    def __init__(self, job_dir: Path, overrides: list[str], config: dict[str, Any], swept: Iterable[str]) -> None:
        keys = hparam_keys(swept, overrides)
        name = run_name(overrides, keys)
        folder = Path(job_dir) / FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        self.writer = EventFileWriter(str(folder / name))
        values = hparam_values(config, overrides, keys)
        metrics = [hp.Metric(tag, display_name=column) for tag, column in TABLE_METRICS.items()]
        # Every job writes the same experiment (the hparams' names and the metric columns): TensorBoard takes the
        # first it finds, and the table then has one row per job.
        self._write(0, hp.hparams_config_pb([hp.HParam(key) for key in keys], metrics))
        self._write(0, hp.hparams_pb(values, trial_id=name))

    def epoch(self, metrics: dict[str, Any], diagnostics: list[dict[str, Any]]) -> None:
        """An epoch's row of metrics.csv and its rows of diagnostics.csv, as numbers or as the files' text."""
        values = {tag: metrics[column] for column, tag in EPOCH_TAGS.items() if column in metrics}
        values.update({diagnostics_tag(row): row["value"] for row in diagnostics})
        self._scalars(int(float(metrics["epoch"])), values)
        self.writer.flush()  # each epoch visible to a TensorBoard that watches the sweep

    def finish(self, summary: dict[str, Any]) -> None:
        """The finished job's summary.json: its final numbers, and the end of its HParams session."""
        final = {tag: summary.get(key) for key, tag in FINAL_TAGS.items()}
        self._scalars(int(summary.get("epochs_completed") or 0), {k: v for k, v in final.items() if _finite(v)})
        status = api_pb2.STATUS_FAILURE if summary.get("status") == Status.DIVERGED else api_pb2.STATUS_SUCCESS
        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status))
        ended = summary_pb2.Summary()
        ended.value.add(
            tag=metadata.SESSION_END_INFO_TAG,
            metadata=metadata.create_summary_metadata(end),
            tensor=metadata.NULL_TENSOR,
        )
        self._write(0, ended)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        scalars = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()]
        self._write(step, summary_pb2.Summary(value=scalars))

    def _write(self, step: int, summary: summary_pb2.Summary) -> None:
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))


def open_tracker(settings: TensorBoardConfig, job: JobInfo) -> JobRun:
    """The job's run, rewritten from its files up to the epoch it resumes from (events a stopped job wrote after
    its checkpoint are gone: each epoch is in the run once), then continued live."""
    run = JobRun(job.job_dir, job.overrides, job.config, job.swept)
    _replay(run, job.history, read_diagnostics(job.job_dir, job.resumed_from))
    return run


def end_sweep(settings: TensorBoardConfig, sweep_dir: Path, ended: str) -> None:
    """Once the sweep is aggregated: a run for each job kept from before logger=tensorboard was added (a finished
    job is kept as it is, and writes nothing), so that every job of the sweep is in TensorBoard."""
    written = export_sweep(sweep_dir, missing_only=True)
    if written:
        log.info("tensorboard: a run written from its files for %d job%s kept from before", *_count(written))


def export_sweep(sweep_dir: Path, missing_only: bool = False) -> list[Path]:
    """Write the run of every job folder of a sweep that has trained an epoch, from its files (metrics.csv,
    diagnostics.csv, summary.json), replacing the one it had (`missing_only`: only the jobs that have none); returns
    those folders. A job still running is left to its own process."""
    folders = job_dirs(Path(sweep_dir))
    summaries = load_summaries(folders)
    overrides = [read_overrides(job_dir, summary) or [] for job_dir, summary in zip(folders, summaries)]
    swept = swept_keys(overrides)
    written = []
    for job_dir, summary, given in zip(folders, summaries, overrides):
        rows = read_metrics(job_dir)
        if not rows or summary["status"] == Status.RUNNING or (missing_only and (job_dir / FOLDER).is_dir()):
            continue
        config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
        run = JobRun(job_dir, given, config, swept)
        try:
            _replay(run, rows, read_diagnostics(job_dir, len(rows)))
            if summary["status"] in FINISHED:
                run.finish(summary)
        finally:
            run.close()
        written.append(job_dir)
    return written


def _count(items: list[Any]) -> tuple[int, str]:
    return len(items), "" if len(items) == 1 else "s"


def _replay(run: JobRun, rows: list[dict[str, Any]], diagnostics: list[dict[str, Any]]) -> None:
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for row in diagnostics:
        by_epoch.setdefault(int(row["epoch"]), []).append(row)
    for row in rows:
        run.epoch(row, by_epoch.get(int(float(row["epoch"])), []))


def hparam_keys(swept: Iterable[str], overrides: list[str]) -> list[str]:
    """The hparams of a job of a sweep: the keys its sweep varies (the same in every job), else those the command
    gave (a single run)."""
    keys = list(swept) or [override_key(o) for o in overrides]
    # Not hydra's keys, nor a where-group's (logger, progress): they say where things go, not what a job computes.
    return sorted({key for key in keys if not key.startswith("hydra.") and not where_group(key)})


def run_name(overrides: list[str], keys: list[str]) -> str:
    """The run's folder name: the job's settings of `keys` as the command gave them (`norm=bn,seed=1`), `run` when
    there are none."""
    name = ",".join(o.lstrip("+") for o in overrides if override_key(o) in keys and not o.startswith("~"))
    return re.sub(r"[^\w.=,+-]", "_", name)[:120] or "run"


def hparam_values(config: dict[str, Any], overrides: list[str], keys: list[str]) -> dict[str, bool | float | str]:
    """Each hparam's value in the job's config (a group's by its choice: `norm` is `bn`), else as the command gave
    it; as a bool, a number or a string, the types TensorBoard's HParams table has."""
    given = parse_overrides(overrides)
    values: dict[str, bool | float | str] = {}
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            value = value.get("name")
        if value is None:
            value = _typed(given.get(key, "null"))
        values[key] = value if isinstance(value, bool | int | float | str) else str(value)
    return values


def _typed(text: str) -> bool | float | str:
    """An override's value as its type: `0.01` a number, `true` a bool, anything else the text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
