"""The files of one job folder: atomic writes, metrics.csv, diagnostics.csv, summary.json and the job's Status.

What a job writes and what a resume or the aggregator reads back, with no pandas and no torch: a job that writes a
file imports this module alone. Whether a `running` job still runs is liveness.py's; which saved job a config is,
settings.py's.
"""

from __future__ import annotations

import csv
import enum
import errno
import io
import json
import logging
import math
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from normsweep.config.errors import ConfigError

log = logging.getLogger("normsweep")

METRICS_FILE = "metrics.csv"
DIAGNOSTICS_FILE = "diagnostics.csv"
DIAGNOSTICS_COLUMNS = ["epoch", "layer", "depth", "metric", "value"]
SUMMARY_FILE = "summary.json"
# The final model's prediction for each test image, in the test split's order, and the image's label: one byte each
# (two with over 256 classes), compressed. What McNemar's test compares when a row has one run (results/tables.py).
PREDICTIONS_FILE = "predictions.npz"
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
# summary.json's record of a tuning sweep's job (hydra/sweeper=tune): {"study": "norm=bn", "phase": "search" or
# "confirm", "number": the Optuna trial number (search) or null, "searched": the keys the study searches}. Absent
# in a grid's jobs.
TRIAL_KEY = "trial"
SEARCH, CONFIRM = "search", "confirm"  # a trial record's phase


class Status(str, enum.Enum):
    """A job's status, as summary.json and the aggregator report it."""

    NOT_STARTED = "not started"  # no summary.json yet
    # Training now, or about to: SLURM says its job is pending or running (also one stopped and requeued), else its
    # process is alive here (or it ran on another machine and SLURM cannot be asked).
    RUNNING = "running"
    INCOMPLETE = "incomplete"  # stopped before the end (killed, interrupted, preempted): resuming continues it
    COMPLETED = "completed"  # trained every epoch
    DIVERGED = "diverged"  # stopped early on a non-finite loss: a result, not an error
    # Trained every epoch but learned nothing: ended at chance accuracy with the loss of a uniform guess (dead
    # ReLUs, a norm that gets no gradient). A result of the setting, like diverged: kept, not trained again.
    STALLED = "stalled"
    # Stopped early by a tuning sweep's pruner (hydra/sweeper=tune): its validation accuracy could not catch up with
    # the study's better trials. A result of the search, kept and not trained again; its numbers are those of the
    # epoch it stopped at.
    PRUNED = "pruned"
    FAILED = "failed"  # raised an error (message in `error`)
    CORRUPT = "corrupt"  # summary.json cannot be read

    def __str__(self) -> str:
        return self.value


# the statuses whose results count and are kept on resume
FINISHED = (Status.COMPLETED, Status.DIVERGED, Status.STALLED, Status.PRUNED)
UNFINISHED = (Status.RUNNING, Status.INCOMPLETE, Status.FAILED)
ATTENTION = (Status.FAILED, Status.INCOMPLETE, Status.CORRUPT)  # statuses that get a line of their own under the table


def _file_mode() -> int:
    """The permissions `open()` would give a new file: mkstemp's are owner-only, too strict for shared results."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: str | bytes, previous: Path | None = None) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place. With `previous`, the
    file in place is first renamed to that name: a rename, not a second write, and at every instant one of the two
    names holds a whole file. An error names `path` (a full disk, a write refused)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        err.filename = err.filename or str(path)
        raise
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not err.filename:  # a failed write says which file it was
            err.filename = str(path)
        raise


class WriteBehind:
    """atomic_write done in order by a thread of its own: a job's per-epoch files (checkpoint, metrics.csv,
    diagnostics.csv) are written while its next epoch trains, instead of the job waiting for each file's flush to
    disk (three an epoch: a twentieth of a small model's epoch). The order is kept: a file is renamed into place only
    after every file queued before it, so metrics.csv never holds an epoch whose checkpoint is not written; `then`
    queues a call made once the files queued before it are written.

    A failed write (a full disk) drops what was queued after it and is raised by the next `write` or by `flush`,
    which waits until everything queued is done; `close` ends the thread."""

    def __init__(self) -> None:
        self._queue: list[Callable[[], None]] = []
        self._ready = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def write(self, path: Path, data: str | bytes, previous: Path | None = None) -> None:
        self.then(lambda: atomic_write(path, data, previous))

    def then(self, call: Callable[[], None]) -> None:
        with self._ready:
            self._raise()
            self._queue.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="normsweep write-behind", daemon=True)
                self._thread.start()
            self._ready.notify_all()

    def flush(self) -> None:
        """Wait until everything queued is done; raise the error of a write that failed."""
        with self._ready:
            self._ready.wait_for(lambda: not self._queue and not self._busy)
            self._raise()

    def close(self) -> None:
        """Flush, then end the thread (a later `write` starts another)."""
        try:
            self.flush()
        finally:
            with self._ready:
                self._closed = True
                self._ready.notify_all()
            if self._thread is not None:
                self._thread.join()
            self._thread, self._closed = None, False

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                call = self._queue.pop(0)
                self._busy = True
            try:
                call()
            except BaseException as err:  # raised in the job's thread; what was queued after it is dropped
                with self._ready:
                    self._error = err
                    self._queue.clear()
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()


def disk_full(err: BaseException) -> bool:
    """Whether an error is a write that found its disk full, or the user's disk quota used up."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskFull(BaseException):
    """A job's write found the disk full (the OSError is its argument): the sweep stops, since every job after it
    would fail the same way. A BaseException, as KeyboardInterrupt is: Hydra's launchers record an Exception as the
    job's failure and go on to the next job."""

    status = 75  # the exit status: sysexits.h's EX_TEMPFAIL, a failure that the same command, run later, gets past


def full_disk_line(err: OSError, folder: str | Path, sweep: bool) -> str:
    """What a full disk says: where, that nothing finished is lost, and how to resume once there is space."""
    what = os.strerror(err.errno) if err.errno else str(err)
    where = f"writing {err.filename}" if err.filename else f"in {folder}"
    option = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    return (
        f"{what} ({where}): the {'sweep' if sweep else 'run'} stopped, and every finished epoch is kept. Once there "
        f"is space, run the same command with {option}={folder} to resume"
    )


def _cell(value: Any) -> str:
    """A CSV cell as pandas' `float_format="%.6g", na_rep="nan"` writes it."""
    if value is None:
        return "nan"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _csv_text(rows: Iterable[Iterable[Any]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def _write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> None:
    CsvLog(path, columns).write(rows)


class CsvLog:
    """A job's CSV file whose rows only grow as it trains (metrics.csv, diagnostics.csv), written whole and
    atomically each time: the rows written before are kept formatted, so that an epoch formats only its own
    (diagnostics.csv grows by a row per norm layer and metric every epoch)."""

    def __init__(
        self, path: Path, columns: tuple[str, ...] | list[str], write: Callable[[Path, str], None] | None = None
    ) -> None:
        """`write`: atomic_write (None) or a WriteBehind's."""
        self.path, self.columns, self._write = Path(path), tuple(columns), write
        self._header = _csv_text([self.columns])
        self._text, self._rows = self._header, 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Write the file with `rows`: the same rows as the last write, and new ones after them."""
        if len(rows) < self._rows:  # fewer than before: not a continuation, formatted again
            self._text, self._rows = self._header, 0
        text = self._text + _csv_text([_cell(row.get(c)) for c in self.columns] for row in rows[self._rows :])
        (self._write or atomic_write)(self.path, text)
        self._text, self._rows = text, len(rows)


def write_metrics(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per finished epoch, in METRIC_COLUMNS."""
    _write_csv(Path(job_dir) / METRICS_FILE, METRIC_COLUMNS, rows)


def _read_rows(path: Path) -> list[dict[str, str]]:
    """A job's CSV file's rows that have an epoch, as written (strings); none when the file is missing or
    unreadable."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [row for row in rows if str(row.get("epoch")).isdigit()]


def read_metrics(job_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows as written: the finished epochs (an export reads them, normsweep/trackers/)."""
    return _read_rows(Path(job_dir) / METRICS_FILE)


def write_diagnostics(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    """diagnostics.csv: the diagnostics of every finished epoch, one row per (epoch, layer, metric)."""
    _write_csv(Path(job_dir) / DIAGNOSTICS_FILE, DIAGNOSTICS_COLUMNS, rows)


def read_diagnostics(job_dir: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """diagnostics.csv's rows of the epochs up to `up_to_epoch` (a resume drops those after its checkpoint), as
    written; none when the file is missing or unreadable."""
    return [row for row in _read_rows(Path(job_dir) / DIAGNOSTICS_FILE) if int(row["epoch"]) <= up_to_epoch]


def write_predictions(job_dir: Path, predicted: Any, labels: Any) -> None:
    """predictions.npz: `predicted` (the class the final model gives each test image) and `labels` (its label),
    numpy arrays of equal length, stored in the smallest unsigned type that holds the classes."""
    import numpy as np  # here, not at the top: a refusal or --help imports this module and needs no numpy

    predicted, labels = np.asarray(predicted), np.asarray(labels)
    dtype = np.min_scalar_type(max(int(predicted.max(initial=0)), int(labels.max(initial=0))))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, predicted=predicted.astype(dtype), labels=labels.astype(dtype))
    atomic_write(Path(job_dir) / PREDICTIONS_FILE, buffer.getvalue())


def read_correct(job_dir: Path) -> Any:
    """Whether the job's final model got each test image right (a numpy bool array, in the test split's order), from
    predictions.npz; None when the file is missing (a job saved before normsweep kept it) or cannot be read."""
    import numpy as np

    path = Path(job_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            predicted, labels = saved["predicted"], saved["labels"]
    except (OSError, ValueError, KeyError, EOFError) as err:
        log.warning("%s cannot be read (%s); its job is compared without it", path, err)
        return None
    return predicted == labels if predicted.shape == labels.shape else None


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


def read_summary(job_dir: Path) -> dict[str, Any]:
    """A job's summary.json as it was written, or what can be said without one (`not started`, `corrupt`); never
    raises. Whether a job recorded `running` still runs is for sweep/liveness.py's load_summaries to say."""
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
    return summary


def override_key(line: str) -> str:
    """The key a Hydra override string sets or deletes: `norm` of `norm=bn`, `model.width` of `+model.width=8`."""
    return line.split("=", 1)[0].lstrip("+~")


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """Hydra override strings (`norm=bn`, `+x=1`, `optimizer.lr=0.01`) → {key: value}; deletions are skipped."""
    return {override_key(line): line.split("=", 1)[1] for line in lines if not line.startswith("~") and "=" in line}


def read_overrides(job_dir: Path, summary: dict[str, Any]) -> list[str] | None:
    """The task overrides a job folder was made with: Hydra's overrides.yaml, else its `summary`'s; None when
    neither holds a list."""
    try:
        saved = yaml.safe_load((Path(job_dir) / OVERRIDES_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, list):
        saved = summary.get("overrides")
    return [str(o) for o in saved] if isinstance(saved, list) else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders under a sweep folder (any folder with a summary.json or Hydra's overrides.yaml)."""
    markers = list(sweep_dir.rglob(SUMMARY_FILE)) + [p.parent for p in sweep_dir.rglob(OVERRIDES_FILE)]
    dirs = {p.parent for p in markers} - {sweep_dir}
    # Job 10 after job 9: numeric names by value, any other name after them, alphabetically.
    return sorted(
        dirs, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in p.relative_to(sweep_dir).parts]
    )


CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before: resumed from when checkpoint.pt cannot be read


def record_failure(
    job_dir: Path,
    error: BaseException | str,
    overrides: list[str],
    config: dict[str, Any],
    choices: Mapping[str, Any],
    *,
    status: Status = Status.FAILED,
    recorded: Mapping[str, Any] | None = None,
    **ended: Any,
) -> dict[str, Any]:
    """Write summary.json for a job that ended without a result: `status`, the error, and what the job was.

    The job's own process gives the exception it raised: the summary names this host. A launcher that saw the job
    end from outside (SLURM cancelled, killed or never started it) gives SLURM's reason as a string, `incomplete`
    for a job that finished epochs (a resume continues it), `recorded`: what the job wrote while it ran (its host,
    process and threads are kept; nothing for a job that never started), and what it knows of the end as keywords
    (`slurm_job`, `epochs_completed`)."""
    if isinstance(error, str):
        message = error
    else:
        message = str(error).strip() or type(error).__name__
        if not isinstance(error, ConfigError):  # a ConfigError speaks for itself; anything else is named
            message = f"{type(error).__name__}: {message}"
    summary: dict[str, Any] = {
        "status": status,
        "error": message,
        "seed": config.get("seed"),
        **{group: choices.get(group) for group in GROUPS},
        **({"host": socket.gethostname()} if recorded is None else {}),
        "overrides": list(overrides),
        "config": config,
    }
    summary.update({key: value for key, value in (recorded or {}).items() if key not in ("status", "error")})
    summary.update(ended)
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    write_summary(job_dir, summary)
    return summary
