"""Job result files (written atomically) and the sweep aggregation into runs.csv, results.csv and curves.png."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
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
# A job's status, as summary.json and the aggregator report it:
#   not started   no summary.json yet
#   running       training now (its process is alive, or it runs on another machine)
#   incomplete    stopped before the end (killed, interrupted, preempted): resuming continues it
#   completed     trained every epoch
#   diverged      stopped early on a non-finite loss: a result, not an error
#   failed        raised an error (message in `error`)
#   corrupt       summary.json cannot be read
FINISHED = ("completed", "diverged")  # the statuses whose results count and are kept on resume
UNFINISHED = ("running", "incomplete", "failed")
ATTENTION = ("failed", "incomplete", "corrupt")  # statuses that get a line of their own under the table
RESULT_COLUMNS = [
    "runs",
    "val_acc_mean",
    "val_acc_std",
    "best_val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
    "val_loss_mean",
    "train_loss_mean",
    "sec_per_epoch_mean",
    "params",
    "status",
]
# runs.csv column ← summary.json key
RUN_FIELDS = {
    "status": "status",
    "epochs_completed": "epochs_completed",
    "diverged_epoch": "diverged_epoch",
    "val_acc": "final_val_acc",
    "best_val_acc": "best_val_acc",
    "test_acc": "test_acc",
    "val_loss": "final_val_loss",
    "test_loss": "test_loss",
    "train_loss": "final_train_loss",
    "train_acc": "final_train_acc",
    "sec_per_epoch": "sec_per_epoch",
    "params": "params",
    "device": "device",
    "wall_seconds": "wall_seconds",
    "error": "error",
}


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


def write_metrics(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(
        Path(job_dir) / METRICS_FILE,
        pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(index=False, float_format="%.6g", na_rep="nan"),
    )


def _json_safe(value: Any) -> Any:
    """NaN and infinity (a diverged loss) become null: summary.json stays standard JSON for any reader."""
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
    markers = list(sweep_dir.rglob(SUMMARY_FILE)) + [p.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
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


def _alive(summary: dict[str, Any]) -> bool:
    """Whether the process that wrote a `running` summary still runs (a job on another host is given the benefit)."""
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


def load_summary(job_dir: Path) -> dict[str, Any]:
    """A job's summary.json, or what can be said without one; never raises, whatever state the folder is in."""
    path = Path(job_dir) / SUMMARY_FILE
    if not path.is_file():
        return {"status": "not started"}
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = "it is empty" if not path.stat().st_size else f"it is not valid JSON ({err})"
        return {"status": "corrupt", "error": f"{SUMMARY_FILE} cannot be read: {reason}"}
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return {"status": "corrupt", "error": f"{SUMMARY_FILE} holds no job status"}
    if summary["status"] == "running" and not _alive(summary):
        summary["status"] = "incomplete"
    return summary


def _read_metrics(job_dir: Path) -> tuple[pd.DataFrame | None, str | None]:
    path = job_dir / METRICS_FILE
    if not path.is_file():
        return None, None
    try:
        metrics = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # pandas' parser errors are ValueErrors
        return None, f"{METRICS_FILE} cannot be read: {str(err).splitlines()[0] if str(err) else 'it is empty'}"
    if not set(METRIC_COLUMNS) <= set(metrics.columns):
        return None, f"{METRICS_FILE} lacks the columns {', '.join(sorted(set(METRIC_COLUMNS) - set(metrics.columns)))}"
    return metrics, None


def _read_job(job_dir: Path) -> tuple[dict[str, str], dict[str, Any], pd.DataFrame | None]:
    summary = load_summary(job_dir)
    metrics, metrics_error = _read_metrics(job_dir)
    if metrics_error and not summary.get("error"):
        summary["error"] = metrics_error
    if metrics is not None and (summary.get("epochs_completed") is None or summary["status"] in UNFINISHED):
        summary["epochs_completed"] = len(metrics)  # a job still going (or stopped) counts its metrics rows
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides_list: Any = summary.get("overrides") if isinstance(summary.get("overrides"), list) else []
    if overrides_file.is_file():
        try:
            overrides_list = yaml.safe_load(overrides_file.read_text()) or []
        except (OSError, yaml.YAMLError):
            pass
    return parse_overrides([str(o) for o in overrides_list]), summary, metrics


@dataclass
class Report:
    runs: pd.DataFrame  # one row per job
    results: pd.DataFrame  # one row per configuration, best first
    keys: list[str]  # the override keys that define a configuration (all but seed)
    varying: list[str]  # the keys among them that take more than one value in this sweep
    fixed: dict[str, Any]  # what every job shared: group choices (model=…) and overrides that did not vary
    curves: pd.DataFrame  # per configuration and epoch, metrics averaged over seeds


def _numeric(values: pd.Series) -> pd.Series:
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().sum() == values.notna().sum() else values


def collect(sweep_dir: Path) -> Report:
    """Read every job folder of a sweep into tidy tables."""
    sweep_dir = Path(sweep_dir)
    rows, curves, keys, choices = [], [], [], []
    for job_dir in job_dirs(sweep_dir):
        overrides, summary, metrics = _read_job(job_dir)
        choices.append({group: summary.get(group) for group in GROUPS})
        keys += [k for k in overrides if k != "seed" and k not in keys]
        row = {"job": str(job_dir.relative_to(sweep_dir)), **overrides}
        row["seed"] = summary.get("seed", overrides.get("seed"))
        row.update({column: summary.get(field) for column, field in RUN_FIELDS.items()})
        rows.append(row)
        # Curves, like the results, come from finished jobs only: a partial run would drag the late epochs.
        if metrics is not None and summary["status"] in FINISHED:
            curves.append(metrics.assign(job=row["job"]))
    runs = pd.DataFrame(rows, columns=["job", *keys, "seed", *RUN_FIELDS])
    for key in [*keys, "seed"]:
        runs[key] = _numeric(runs[key])
    varying = [k for k in keys if runs[k].nunique(dropna=False) > 1]
    shared = pd.DataFrame(choices, columns=list(GROUPS))
    fixed = {g: shared[g].dropna().iloc[0] for g in GROUPS if g not in keys and shared[g].nunique() == 1}
    fixed.update({k: runs[k].iloc[0] for k in keys if k not in varying})
    per_epoch = pd.concat(curves) if curves else pd.DataFrame(columns=["job", *METRIC_COLUMNS])
    per_epoch = per_epoch.merge(runs[["job", *keys]], on="job")
    curve_means = (
        per_epoch.groupby([*keys, "epoch"] if keys else "epoch", dropna=False)[["val_acc", "train_loss"]]
        .mean()
        .reset_index()
    )
    results = summarize(runs, keys) if len(runs) else pd.DataFrame(columns=[*keys, *RESULT_COLUMNS])
    return Report(runs=runs, results=results, keys=keys, varying=varying, fixed=fixed, curves=curve_means)


def _status(statuses: pd.Series) -> str:
    counts = statuses.fillna("unknown").value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def summarize(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per configuration (the jobs that differ only by seed), best mean validation accuracy first."""
    frame = runs.assign(_all="all")
    by = keys or ["_all"]
    results = frame.groupby(by, dropna=False, sort=False).agg(
        runs=("val_acc", "count"),  # jobs with a result: completed or diverged
        val_acc_mean=("val_acc", "mean"),
        val_acc_std=("val_acc", "std"),
        best_val_acc_mean=("best_val_acc", "mean"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        val_loss_mean=("val_loss", "mean"),
        train_loss_mean=("train_loss", "mean"),
        sec_per_epoch_mean=("sec_per_epoch", "mean"),
        params=("params", "first"),
        status=("status", _status),
    )
    results = results.reset_index().drop(columns="_all", errors="ignore")
    return results.sort_values("val_acc_mean", ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )


def _settings(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def _label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all runs"


def plot_curves(report: Report, path: Path) -> None:
    """Validation accuracy and training loss per epoch, one line per configuration (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    label_keys = report.varying or report.keys
    curves = report.curves
    # Legend in the order of results.csv: best first.
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    for _, config in configs.iterrows():
        mask = pd.Series(True, index=curves.index)
        for key in report.keys:
            mask &= (curves[key] == config[key]) | (curves[key].isna() & pd.isna(config[key]))
        line = curves[mask].sort_values("epoch")
        label = _label(config, label_keys)
        ax_acc.plot(line["epoch"], line["val_acc"], marker="o", markersize=3, label=label)
        ax_loss.plot(line["epoch"], line["train_loss"], marker="o", markersize=3, label=label)
    n_seeds = report.runs["seed"].nunique()
    suffix = f" (mean over {n_seeds} seeds)" if n_seeds > 1 else ""
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy" + suffix)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss" + suffix)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize="small")
    if report.fixed:
        fig.suptitle(_settings(report.fixed), fontsize="medium")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, image.getvalue())


def format_table(report: Report) -> str:
    """The comparison table as printed at the end of a sweep: swept keys and the figures that matter."""
    results = report.results
    # The losses stay in results.csv; the printed table keeps to what decides between configurations.
    shown = [*report.varying, *(c for c in RESULT_COLUMNS if c not in ("val_loss_mean", "train_loss_mean"))]
    if results["runs"].max() <= 1:
        shown = [c for c in shown if not c.endswith("_std")]
    # Two decimals for the figures; swept values (a learning rate of 0.0003, say) as typed, in %g.
    formats = {c: "{:.2f}" if c.endswith(("_mean", "_std")) else "{:g}" for c in shown}
    formatters = {
        c: (lambda v, f=f: "" if pd.isna(v) else f.format(v))
        for c, f in formats.items()
        if results[c].dtype.kind == "f"
    }
    lines = [results[shown].to_string(index=False, formatters=formatters, na_rep="-")]
    if report.fixed:
        lines.append("same in every run: " + _settings(report.fixed))
    return "\n".join(lines)


def problems(report: Report) -> list[str]:
    """One line per job that failed, stopped early or cannot be read: status, folder, settings, error."""
    lines = []
    for _, row in report.runs[report.runs["status"].isin(ATTENTION)].iterrows():
        settings = " ".join(
            f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}"
            for k in [*report.keys, "seed"]
            if pd.notna(row[k])
        )
        if pd.notna(row["error"]) and str(row["error"]).strip():
            detail = str(row["error"]).strip().splitlines()[0]
        elif row["status"] == "incomplete":
            done = int(row["epochs_completed"]) if pd.notna(row["epochs_completed"]) else 0
            detail = f"stopped after epoch {done}; run the same command with its folder to resume it"
        else:
            detail = "no error recorded"
        lines.append(f"{row['status']}: job {row['job']} ({settings}): {detail}")
    return lines


def aggregate(sweep_dir: Path) -> Report:
    """Write runs.csv, results.csv and curves.png into `sweep_dir` and return what was aggregated."""
    sweep_dir = Path(sweep_dir)
    report = collect(sweep_dir)
    atomic_write(sweep_dir / "runs.csv", report.runs.to_csv(index=False, float_format="%.6g"))
    atomic_write(sweep_dir / "results.csv", report.results.to_csv(index=False, float_format="%.6g"))
    if len(report.curves):
        plot_curves(report, sweep_dir / "curves.png")
    return report
