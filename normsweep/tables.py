"""The sweep's tables (pandas, no torch): runs.csv, results.csv, best_by_<axis>.csv, and their text forms."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from normsweep.jobfiles import (
    ATTENTION,
    FINISHED,
    GROUPS,
    METRIC_COLUMNS,
    METRICS_FILE,
    OVERRIDES_FILE,
    UNFINISHED,
    Status,
    job_dirs,
    load_summary,
    parse_overrides,
    preferred_copy,
    settings_key,
)

log = logging.getLogger("normsweep")
NOT_SETTINGS = ("seed", "compare")  # overrides that do not define a configuration: seeds are averaged over
RESULT_COLUMNS = [
    "runs",
    "val_acc_mean",
    "val_acc_std",
    "best_val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
    "test_acc_ci95",
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
    "hardware": "hardware",
    "torch": "torch_version",
    "wall_seconds": "wall_seconds",
    "error": "error",
}


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
    overrides_file = job_dir / OVERRIDES_FILE
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
    config: dict[str, Any] = field(default_factory=dict)  # one job's resolved config: the settings not swept
    compare: str | None = None  # the compared axis of `best`
    best: pd.DataFrame | None = None  # best_by(compare): None when nothing besides the axis was swept


def _numeric(values: pd.Series) -> pd.Series:
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().sum() == values.notna().sum() else values


JobFiles = tuple[dict[str, str], dict[str, Any], pd.DataFrame | None]


def _distinct_jobs(sweep_dir: Path) -> list[tuple[Path, JobFiles, list[Path]]]:
    """Every job folder under `sweep_dir` once per job, with the other folders that hold the same job.

    Folders that saved the same settings (the config, seed included, compared as a resume compares it) hold one
    job: a sweep folder resumed twice, or a parent folder of several sweeps. The finished copy, else the one whose
    summary.json was written last, stands for the job; the others are named in its `duplicates` and not counted.
    """
    jobs = [(job_dir, _read_job(job_dir)) for job_dir in job_dirs(sweep_dir)]
    copies: dict[str, list[tuple[tuple[bool, int], Path]]] = {}
    for job_dir, (_, summary, _) in jobs:
        if isinstance(summary.get("config"), dict):
            copy = (preferred_copy(job_dir, summary["status"]), job_dir)
            copies.setdefault(settings_key(summary["config"]), []).append(copy)
    repeats: dict[Path, list[Path]] = {}
    for same in copies.values():
        kept, *others = [job_dir for _, job_dir in sorted(same, reverse=True)]
        if others:
            repeats[kept] = others
    if repeats:
        shown = [
            f"{kept.relative_to(sweep_dir)} (also in {', '.join(str(d.relative_to(sweep_dir)) for d in others)})"
            for kept, others in list(repeats.items())[:5]
        ]
        log.warning(
            "%d job%s found in more than one folder, counted once: %s%s; runs.csv lists the others under duplicates",
            len(repeats),
            "s" if len(repeats) > 1 else "",
            ", ".join(shown),
            f" and {len(repeats) - 5} more" if len(repeats) > 5 else "",
        )
    dropped = {job_dir for others in repeats.values() for job_dir in others}
    return [(job_dir, files, repeats.get(job_dir, [])) for job_dir, files in jobs if job_dir not in dropped]


def collect(sweep_dir: Path) -> Report:
    """Read every job folder of a sweep into tidy tables, one row per job."""
    sweep_dir = Path(sweep_dir)
    rows, curves, keys, choices, config = [], [], [], [], {}
    for job_dir, (overrides, summary, metrics), duplicates in _distinct_jobs(sweep_dir):
        choices.append({group: summary.get(group) for group in GROUPS})
        keys += [k for k in overrides if k not in NOT_SETTINGS and k not in keys]
        if not config and isinstance(summary.get("config"), dict):
            config = summary["config"]
        row = {"job": str(job_dir.relative_to(sweep_dir)), **overrides}
        row["seed"] = summary.get("seed", overrides.get("seed"))
        row.update({column: summary.get(field) for column, field in RUN_FIELDS.items()})
        row["duplicates"] = " ".join(str(d.relative_to(sweep_dir)) for d in duplicates) or None
        rows.append(row)
        # Curves, like the results, come from finished jobs only: a partial run would drag the late epochs.
        if metrics is not None and summary["status"] in FINISHED:
            curves.append(metrics.assign(job=row["job"]))
    runs = pd.DataFrame(rows, columns=["job", *keys, "seed", *RUN_FIELDS, "duplicates"])
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
    return Report(
        runs=runs, results=results, keys=keys, varying=varying, fixed=fixed, curves=curve_means, config=config
    )


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
        _tests=("test_acc", "count"),
    )
    results.insert(results.columns.get_loc("test_acc_std") + 1, "test_acc_ci95", ci95(results))
    results = results.drop(columns="_tests").reset_index().drop(columns="_all", errors="ignore")
    return results.sort_values("val_acc_mean", ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )


def ci95(results: pd.DataFrame) -> pd.Series:
    """Half-width of the 95% confidence interval of the mean test accuracy, from Student's t over the seeds
    (mean ± t(0.975, n-1) · std / √n); undefined (NaN) with fewer than two runs."""
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would add 0.4 s of imports to every sweep

    n = results["_tests"].astype(float)
    half = stdtrit((n - 1).clip(lower=1), 0.975) * results["test_acc_std"] / n.clip(lower=1) ** 0.5
    return half.where(n >= 2)


def settings_text(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def label_of(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys) or "all runs"


def best_by(report: Report, axis: str = "norm") -> pd.DataFrame | None:
    """For each value of the compared `axis`: the setting of the other swept hyperparameters with the best mean
    validation accuracy, and the test accuracy at that setting (so each norm is judged at its own best learning
    rate, say). Swept data sets are kept apart, never picked from. None when nothing else was swept: results.csv
    is then the comparison already."""
    if axis not in report.keys and axis_value(report, axis) is None:
        swept = ", ".join(report.keys) or "none"
        raise ValueError(
            f"compare={axis}: the jobs of this sweep have no key {axis!r}; compare one of the swept keys ({swept}), "
            "or a config key such as norm, model or optimizer.lr"
        )
    context = [k for k in report.varying if k != axis and (k == "dataset" or k.startswith("dataset."))]
    tuned = [k for k in report.varying if k != axis and k not in context]
    if not tuned:
        return None
    results = report.results
    by = [*context, axis] if axis in report.keys else context
    groups = results.groupby(by, dropna=False, sort=False) if by else [((), results)]
    rows = []
    for _, group in groups:
        tried = group[group["runs"] > 0]
        best = tried.loc[tried["val_acc_mean"].idxmax()] if len(tried) else group.iloc[0]
        row = {axis: best[axis] if axis in report.keys else axis_value(report, axis)}
        row.update({k: best[k] for k in context})
        row.update({k: best[k] if len(tried) else None for k in tuned})
        figures = ("runs", "val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std", "test_acc_ci95")
        row.update({c: best[c] if len(tried) else (0 if c == "runs" else None) for c in figures})
        row["settings_tried"] = len(tried)
        row["status"] = best["status"] if len(tried) else "; ".join(group["status"].unique())
        rows.append(row)
    table = pd.DataFrame(rows)
    order = [*context, "val_acc_mean"] if context else ["val_acc_mean"]
    ascending = [True] * len(context) + [False]
    return table.sort_values(order, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def axis_value(report: Report, axis: str) -> Any:
    """The one value a key took in the whole sweep: a group choice, an override, or the config's own value."""
    if axis in report.fixed:
        return report.fixed[axis]
    node: Any = report.config
    for part in axis.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):  # a group (norm=…) that was not overridden: its name is what tells it
        return node.get("name", "")
    return node


def matching(frame: pd.DataFrame, config: pd.Series, keys: list[str]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key in keys:
        mask &= (frame[key] == config[key]) | (frame[key].isna() & pd.isna(config[key]))
    return mask


def batch_size_lines(report: Report) -> pd.DataFrame | None:
    """Mean test accuracy against batch size, one line per setting of the other swept keys (the GroupNorm
    paper's batch-size study); None unless batch_size was swept."""
    if "batch_size" not in report.varying:
        return None
    others = [k for k in report.varying if k != "batch_size"]
    table = report.results[[*others, "batch_size", "test_acc_mean", "test_acc_ci95", "test_acc_std", "runs"]]
    return table.sort_values([*others, "batch_size"], kind="stable").reset_index(drop=True)


def cells(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`frame[columns]` as text: two decimals for the figures, swept values as typed (%g), `-` for none."""

    def show(value: Any, column: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float) and column.endswith(("_mean", "_std", "_ci95")):
            return f"{value:.2f}"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    return pd.DataFrame({c: [show(v, c) for v in frame[c].tolist()] for c in columns}, index=frame.index)


def table_columns(report: Report) -> list[str]:
    """The columns shown for results.csv: swept keys and the figures that matter (the losses stay in the CSV);
    spreads and intervals only when some configuration has more than one run."""
    shown = [*report.varying, *(c for c in RESULT_COLUMNS if c not in ("val_loss_mean", "train_loss_mean"))]
    if report.results["runs"].max() <= 1:
        shown = [c for c in shown if not c.endswith(("_std", "_ci95"))]
    return shown


def best_columns(best: pd.DataFrame) -> list[str]:
    columns = list(best.columns)
    if best["runs"].max() <= 1:
        columns = [c for c in columns if not c.endswith(("_std", "_ci95"))]
    return columns


def format_table(report: Report) -> str:
    """The comparison table as printed at the end of a sweep."""
    lines = [cells(report.results, table_columns(report)).to_string(index=False)]
    if report.fixed:
        lines.append("same in every run: " + settings_text(report.fixed))
    return "\n".join(lines)


def format_best(best: pd.DataFrame, axis: str) -> str:
    tuned = [c for c in best.columns if c not in (axis, "runs", "settings_tried", "status") and "_acc_" not in c]
    title = f"best by {axis} (each at its best {', '.join(tuned)} by mean validation accuracy):"
    return title + "\n" + cells(best, best_columns(best)).to_string(index=False)


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
        elif row["status"] == Status.INCOMPLETE:
            done = int(row["epochs_completed"]) if pd.notna(row["epochs_completed"]) else 0
            detail = f"stopped after epoch {done}; run the same command with its folder to resume it"
        else:
            detail = "no error recorded"
        lines.append(f"{row['status']}: job {row['job']} ({settings}): {detail}")
    return lines


def best_file(axis: str) -> str:
    return f"best_by_{axis}.csv"
