"""The files of one job folder: atomic writes, metrics.csv, summary.json, the job's Status, its liveness, and the
settings by which a saved job is recognised.

What a job writes and what a resume or the aggregator reads back, with no pandas and no torch: a job that writes a
file imports this module alone.
"""

from __future__ import annotations

import copy
import csv
import enum
import io
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.sweep import scheduler

METRICS_FILE = "metrics.csv"
DIAGNOSTICS_FILE = "diagnostics.csv"
DIAGNOSTICS_COLUMNS = ["epoch", "layer", "depth", "metric", "value"]
SUMMARY_FILE = "summary.json"
OVERRIDES_FILE = ".hydra/overrides.yaml"
METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_seconds",
    "images_per_second",
]
GROUPS = ("model", "norm", "optimizer", "dataset")  # the config groups, as named in summary.json
# compare_metric → what it is, in words (a runs.csv column): results.csv sorts by its mean; the best row tops it.
COMPARE_METRICS = {
    "val_acc": "validation accuracy",
    "test_acc": "test accuracy",
    "best_val_acc": "best-epoch validation accuracy",
}
# Keys that say where a job runs or finds its data, how the sweep is aggregated, or what is measured beside the
# training (diagnostics), not what a job computes: a resumed job may change them.
WHERE_KEYS = ("device", "dataset.root", "dataset.download", "compare", "compare_metric", "diagnostics")
# Keys added to the config after normsweep 0.1.0's first sweeps, with the value that computes what those jobs
# computed: a folder saved without the key is the same job when the key has that value now, and resumes with it
# when the command does not give the key (saved_behaviour: an upgrade mid-sweep, whatever today's default).
ADDED_KEYS = {
    "norm.track_running_stats": True,
    "norm.group_size": None,
    "optimizer.lr_batch_size": None,
    # Since the built-in data sets have a schema (0.2): keys that only some of them read, at its defaults.
    "dataset.test_fraction": 0.2,
    "dataset.split_seed": 0,
    # The fair recipe, whose defaults differ from what jobs computed before it: no loss threshold, every parameter
    # decayed, no warm-up, the schedule moved once per epoch.
    "diverge_loss": None,
    "optimizer.decay_norm_and_bias": True,
    "optimizer.warmup_epochs": 0,
    "optimizer.schedule_step": "epoch",
}


# Modules whose classes and functions the built-in configs name in a `_target_` (model._target_, norm._target_,
# norm.adapt_model), as they were named before the package was split into config/, job/, sweep/ and results/: a
# folder saved then names the same code by its old path.
MOVED_MODULES = {"normsweep.models.": "normsweep.job.models.", "normsweep.layers.": "normsweep.job.layers."}


class Status(str, enum.Enum):
    """A job's status, as summary.json and the aggregator report it."""

    NOT_STARTED = "not started"  # no summary.json yet
    # Training now, or about to: SLURM says its job is pending or running (also one stopped and requeued), else its
    # process is alive here (or it ran on another machine and SLURM cannot be asked).
    RUNNING = "running"
    INCOMPLETE = "incomplete"  # stopped before the end (killed, interrupted, preempted): resuming continues it
    COMPLETED = "completed"  # trained every epoch
    DIVERGED = "diverged"  # stopped early on a non-finite loss: a result, not an error
    FAILED = "failed"  # raised an error (message in `error`)
    CORRUPT = "corrupt"  # summary.json cannot be read

    def __str__(self) -> str:
        return self.value


FINISHED = (Status.COMPLETED, Status.DIVERGED)  # the statuses whose results count and are kept on resume
UNFINISHED = (Status.RUNNING, Status.INCOMPLETE, Status.FAILED)
ATTENTION = (Status.FAILED, Status.INCOMPLETE, Status.CORRUPT)  # statuses that get a line of their own under the table


def _file_mode() -> int:
    """The permissions `open()` would give a new file: mkstemp's are owner-only, too strict for shared results."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cell(value: Any) -> str:
    """A CSV cell as pandas' `float_format="%.6g", na_rep="nan"` writes it."""
    if value is None:
        return "nan"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(column)) for column in columns] for row in rows)
    atomic_write(path, text.getvalue())


def write_metrics(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per finished epoch, in METRIC_COLUMNS."""
    _write_csv(Path(job_dir) / METRICS_FILE, METRIC_COLUMNS, rows)


def write_diagnostics(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    """diagnostics.csv: the diagnostics of every finished epoch, one row per (epoch, layer, metric)."""
    _write_csv(Path(job_dir) / DIAGNOSTICS_FILE, DIAGNOSTICS_COLUMNS, rows)


def read_diagnostics(job_dir: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """diagnostics.csv's rows of the epochs up to `up_to_epoch` (a resume drops those after its checkpoint), as
    written; none when the file is missing or unreadable."""
    try:
        with open(Path(job_dir) / DIAGNOSTICS_FILE, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [row for row in rows if str(row.get("epoch")).isdigit() and int(row["epoch"]) <= up_to_epoch]


def _json_safe(value: Any) -> Any:
    """NaN and infinity (a diverged loss) become null: summary.json stays standard JSON for any reader."""
    if isinstance(value, Status):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_summary(job_dir: Path, summary: dict[str, Any]) -> None:
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
    atomic_write(Path(job_dir) / SUMMARY_FILE, text + "\n")


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """Hydra override strings (`norm=bn`, `+x=1`, `optimizer.lr=0.01`) → {key: value}; deletions are skipped."""
    parsed = {}
    for line in lines:
        if line.startswith("~") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        parsed[key.lstrip("+")] = value
    return parsed


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders under a sweep folder (any folder with a summary.json or Hydra's overrides.yaml)."""
    markers = list(sweep_dir.rglob(SUMMARY_FILE)) + [p.parent for p in sweep_dir.rglob(OVERRIDES_FILE)]
    dirs = {p.parent for p in markers} - {sweep_dir}
    # Job 10 after job 9: numeric names by value, any other name after them, alphabetically.
    return sorted(
        dirs, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in p.relative_to(sweep_dir).parts]
    )


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc), or None where that is unknown.

    Recorded with a job's pid, it tells the job's own process from a later one that reused the pid.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has finished: no start time to match


def slurm_job(environ: Mapping[str, str]) -> str | None:
    """The SLURM job this process runs in, as squeue, sacct and scancel name it (`12_3` for task 3 of array 12,
    where SLURM_JOB_ID holds the task's own number), or None outside SLURM. A requeued job keeps it."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID") or None


def is_own_slurm_job(job: Any, environ: Mapping[str, str]) -> bool:
    """Whether a summary's `slurm_job` names the SLURM job this process runs in (a requeued job finding its own
    folder). Older summaries hold the raw SLURM_JOB_ID, which differs from `12_3` for an array task."""
    return bool(job) and str(job) in {slurm_job(environ), environ.get("SLURM_JOB_ID")}


def slurm_alive(summary: dict[str, Any]) -> bool | None:
    """What SLURM says of the job a summary names: True while it is pending or running, False once it has ended
    (or SLURM no longer knows it); None when the summary names no SLURM job or SLURM cannot be asked."""
    job = summary.get("slurm_job")
    return scheduler.is_alive(str(job)) if job else None


def process_alive(summary: dict[str, Any]) -> bool:
    """Whether the process that wrote a summary still runs (one on another host is given the benefit of the doubt)."""
    pid = summary.get("pid")
    if summary.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if Path("/proc/self/stat").is_file():  # Linux: a zombie or a newer process under the same pid is not the job
        started = process_start(pid)
        return started is not None and summary.get("pid_start") in (None, started)
    return True


def _alive(summary: dict[str, Any]) -> bool:
    """Whether the job that wrote a `running` summary still runs: SLURM's word for a SLURM job (its process may be on
    a node this machine cannot see, or waiting to run again after a requeue), else its process's."""
    said = slurm_alive(summary)
    return process_alive(summary) if said is None else said


def load_summary(job_dir: Path) -> dict[str, Any]:
    """A job's summary.json, or what can be said without one; never raises, whatever state the folder is in."""
    path = Path(job_dir) / SUMMARY_FILE
    if not path.is_file():
        return {"status": Status.NOT_STARTED.value}
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = "it is empty" if not path.stat().st_size else f"it is not valid JSON ({err})"
        return {"status": Status.CORRUPT.value, "error": f"{SUMMARY_FILE} cannot be read: {reason}"}
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return {"status": Status.CORRUPT.value, "error": f"{SUMMARY_FILE} holds no job status"}
    if summary["status"] == Status.RUNNING and not _alive(summary):
        summary["status"] = Status.INCOMPLETE.value
    elif summary["status"] == Status.INCOMPLETE and slurm_alive(summary):
        # Stopped by SIGTERM, then requeued (scontrol requeue, preemption, submitit at the time limit): SLURM will run
        # it again, and it resumes itself; a second copy must not.
        summary["status"] = Status.RUNNING.value
    return summary


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def _upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved before norms and optimizers were records with a `_target_` (normsweep 0.1): a built-in's
    norm and optimizer get the keys their record has now, at the values that compute what they computed then."""
    config = dict(config)
    for group, records in (("norm", NORMS), ("optimizer", OPTIMIZERS)):
        node = config.get(group)
        if isinstance(node, dict) and "_target_" not in node and node.get("name") in records:
            record = records[node["name"]]()
            own = [key for key in record.OWN_KEYS if f"{group}.{key}" not in ADDED_KEYS]  # those it had then
            config[group] = {**{key: getattr(record, key) for key in own}, **node}
    return config


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """A job's config as two jobs are compared: flat (`norm.name`), without the where-keys, and without an added
    key at the value that keeps the old behaviour (so a folder saved before the key existed is the same job)."""
    return {
        key: value
        for key, value in ((k, _moved(v)) for k, v in _flatten(_upgraded(config)).items())
        if key not in WHERE_KEYS and not (key in ADDED_KEYS and value == ADDED_KEYS[key])
    }


def _moved(value: Any) -> Any:
    """A `_target_` path of a module that has moved (MOVED_MODULES), by its path now; any other value as it is."""
    if isinstance(value, str):
        for old, new in MOVED_MODULES.items():
            if value.startswith(old):
                return new + value[len(old) :]
    return value


def lacking_added_keys(saved: dict[str, Any]) -> frozenset[str]:
    """The added keys a saved job's settings lack: it was saved before them, or with their old value."""
    return frozenset(ADDED_KEYS.keys() - settings(saved).keys())


def saved_behaviour(config: dict[str, Any], lacking: Iterable[str], given: Iterable[str]) -> dict[str, Any]:
    """The added keys a job resumed in a folder takes at their old value (ADDED_KEYS): each one the saved job
    lacks (`lacking`, see lacking_added_keys) that `config` has and the command does not give (`given`: the keys of
    its overrides). The values saved in the folder win over today's defaults; a key given on the command line is
    compared as it is."""
    flat, given = _flatten(config), set(given)
    return {key: ADDED_KEYS[key] for key in lacking if key in flat and key not in given}


def with_values(config: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) config with some flat keys (`optimizer.warmup_epochs`) set."""
    config = copy.deepcopy(config)
    for key, value in values.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def settings_key(config: dict[str, Any]) -> str:
    """One text for configs config_differences finds nothing between (as JSON: a 1 saved as 1.0 would differ)."""
    return json.dumps(settings(config), sort_keys=True, default=repr)


def preferred_copy(job_dir: Path, status: str) -> tuple[bool, int]:
    """Of several folders holding one job, the one to keep sorts last: a finished one, then the latest summary."""
    summary = Path(job_dir) / SUMMARY_FILE
    return status in FINISHED, summary.stat().st_mtime_ns if summary.is_file() else 0
