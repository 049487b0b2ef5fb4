"""The sweep's tables (pandas, no torch): runs.csv, results.csv, best_by_<axis>.csv, and their text forms."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from normsweep.config.schema import COMPARE_METRICS
from normsweep.results.recipes import mixed_keys, recipe_column, recipe_sentences
from normsweep.results.tuned import (
    CONFIRM_OPTION,
    COUNT_COLUMNS,
    TRIAL_COLUMNS,
    Tuning,
    best_table,
    search_sentence,
    searched_keys,
    trial_columns,
    tuning,
    with_counts,
)
from normsweep.sweep.files import (
    ATTENTION,
    DIAGNOSTICS_COLUMNS,
    DIAGNOSTICS_FILE,
    FINISHED,
    GROUPS,
    METRIC_COLUMNS,
    METRICS_FILE,
    UNFINISHED,
    Status,
    job_dirs,
    parse_overrides,
    read_correct,
    read_overrides,
)
from normsweep.sweep.liveness import load_summaries
from normsweep.sweep.settings import copies_by_settings, recipe, where_group

log = logging.getLogger("normsweep")
# Overrides that do not define a configuration: seeds are averaged over, the others only steer the aggregation; nor
# does a key of a where-group (settings.where_group: which trackers a job reported to, how it showed its progress).
NOT_SETTINGS = ("seed", "compare", "compare_metric")
DEFAULT_METRIC = "val_acc"
SIGNIFICANCE = 0.05  # p_vs_best at or above it: the row cannot be told apart from the best
TIES_NAMED = 8  # the tie sentence names this many rows at most
# The test behind each row's p_vs_best (results.csv's `test`): over seeds when both rows have two runs or more, else
# McNemar's on the test images both rows' runs were scored on.
PAIRED_T, WELCH, MCNEMAR = "paired-t", "welch", "mcnemar"
MAX_TEST_IMAGES = 100_000  # the largest test set whose size is inferred from its accuracies
RESULT_COLUMNS = [
    "runs",
    "val_acc_mean",
    "val_acc_std",
    "best_val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
    "test_acc_ci95",
    "gap_to_best",
    "p_vs_best",
    "test",
    "within_noise",
    "resolution",
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
    "test_images": "test_images",
    "train_images": "train_images",
    "classes": "classes",
    "chance_acc": "chance_acc",
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


def _read_job(job_dir: Path, summary: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any], pd.DataFrame | None]:
    metrics, metrics_error = _read_metrics(job_dir)
    if metrics_error and not summary.get("error"):
        summary["error"] = metrics_error
    if metrics is not None and (summary.get("epochs_completed") is None or summary["status"] in UNFINISHED):
        summary["epochs_completed"] = len(metrics)  # a job still going (or stopped) counts its metrics rows
    return parse_overrides(read_overrides(job_dir, summary) or []), summary, metrics


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
    metric: str = DEFAULT_METRIC  # compare_metric: rows sort by its mean, and the best row tops it
    # job → whether its final model got each test image right (predictions.npz); absent for jobs saved without it
    correct: dict[str, Any] = field(default_factory=dict)
    mixed: list[str] = field(default_factory=list)  # keys the jobs were trained with differently, unswept (recipes.py)
    tuning: Tuning | None = None  # a tuning sweep's studies and the runs its results.csv compares (tuned.py)


def compare_metric(config: dict[str, Any], metric: str | None = None) -> str:
    """The metric the user compares: `metric` if given, else the sweep's `compare_metric` (val_acc by default).
    The jobs have run by now, so an unknown name is warned about and the default used, not refused."""
    chosen = metric if metric is not None else config.get("compare_metric", DEFAULT_METRIC)
    if chosen in COMPARE_METRICS:
        return str(chosen)
    log.warning(
        "compare_metric=%s: not a metric of results.csv; sorted by %s instead (choose %s)",
        chosen,
        DEFAULT_METRIC,
        ", ".join(COMPARE_METRICS),
    )
    return DEFAULT_METRIC


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
    folders = job_dirs(sweep_dir)
    jobs = [(job_dir, _read_job(job_dir, summary)) for job_dir, summary in zip(folders, load_summaries(folders))]
    repeats: dict[Path, list[Path]] = {}
    for same in copies_by_settings((job_dir, summary) for job_dir, (_, summary, _) in jobs).values():
        kept, *others = [job_dir for _, job_dir in same]
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


def collect(sweep_dir: Path, metric: str | None = None) -> Report:
    """Read every job folder of a sweep into tidy tables, one row per job. `metric` (val_acc, test_acc or
    best_val_acc) overrides the sweep's compare_metric."""
    sweep_dir = Path(sweep_dir)
    rows, curves, keys, choices, config, correct, recipes, searched = [], [], [], [], {}, {}, {}, []
    for job_dir, (overrides, summary, metrics), duplicates in _distinct_jobs(sweep_dir):
        choices.append({group: summary.get(group) for group in GROUPS})
        keys += [k for k in overrides if _setting(k) and k not in keys]
        searched += [k for k in searched_keys(summary) if k not in searched]
        if not config and isinstance(summary.get("config"), dict):
            config = summary["config"]
        row = {"job": str(job_dir.relative_to(sweep_dir)), **overrides}
        if isinstance(summary.get("config"), dict):
            recipes[row["job"]] = recipe(summary["config"])
        row["seed"] = summary.get("seed", overrides.get("seed"))
        row.update(trial_columns(summary))
        for column, recorded in RUN_FIELDS.items():  # a key the command set (device=cuda) shows what the job recorded
            if summary.get(recorded) is not None or column not in row:
                row[column] = summary.get(recorded)
        row["duplicates"] = " ".join(str(d.relative_to(sweep_dir)) for d in duplicates) or None
        rows.append(row)
        # Curves, like the results, come from finished jobs only: a partial run would drag the late epochs.
        if metrics is not None and summary["status"] in FINISHED:
            curves.append(metrics.assign(job=row["job"]))
        if summary["status"] in FINISHED and (right := read_correct(job_dir)) is not None:
            correct[row["job"]] = right
    trial = [c for c in TRIAL_COLUMNS if any(c in row for row in rows)]  # a tuning sweep's jobs only
    runs = pd.DataFrame(rows, columns=list(dict.fromkeys(["job", *keys, "seed", *trial, *RUN_FIELDS, "duplicates"])))
    for key in [*keys, "seed"]:
        runs[key] = _numeric(runs[key])
    if "trial" in runs:
        runs["trial"] = pd.to_numeric(runs["trial"], errors="coerce").astype("Int64")
    varying = [k for k in keys if runs[k].nunique(dropna=False) > 1]
    shared = pd.DataFrame(choices, columns=list(GROUPS))
    fixed = {g: shared[g].dropna().iloc[0] for g in GROUPS if g not in keys and shared[g].nunique() == 1}
    fixed.update({k: runs[k].iloc[0] for k in keys if k not in varying})
    chosen = compare_metric(config, metric)
    tuned = tuning(runs, keys, searched, chosen)
    # A tuning sweep compares its confirmation runs (else each study's best trial), one row per study.
    compared, by = (tuned.compared, [*keys, "study"]) if tuned else (runs, keys)
    results = (
        summarize(compared, by, chosen, correct) if len(compared) else pd.DataFrame(columns=[*by, *RESULT_COLUMNS])
    )
    if tuned:
        results = with_counts(results, tuned)
    mixed = mixed_keys(runs, keys, recipes)
    if mixed:
        jobs_by_row = [list(compared.loc[matching(compared, row, by), "job"]) for _, row in results.iterrows()]
        results["recipe"] = recipe_column(jobs_by_row, recipes, mixed)
    return Report(
        runs=runs,
        results=results,
        keys=keys,
        varying=varying,
        fixed=fixed,
        curves=mean_curves(curves, compared, keys),
        config=config,
        metric=chosen,
        correct=correct,
        mixed=mixed,
        tuning=tuned,
    )


def _setting(key: str) -> bool:
    """Whether an override's key is a setting the tables compare jobs by."""
    return key not in NOT_SETTINGS and not where_group(key)


def mean_curves(frames: list[pd.DataFrame], compared: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per configuration and epoch, the metrics.csv of the `compared` runs among `frames` (each with its `job`)
    averaged over seeds."""
    per_epoch = pd.concat(frames) if frames else pd.DataFrame(columns=["job", *METRIC_COLUMNS])
    per_epoch = per_epoch.merge(compared[["job", *keys]], on="job")
    curves = per_epoch.groupby([*keys, "epoch"] if keys else "epoch", dropna=False).agg(
        runs=("job", "count"),
        val_acc_mean=("val_acc", "mean"),
        val_acc_std=("val_acc", "std"),
        train_loss_mean=("train_loss", "mean"),
        train_loss_std=("train_loss", "std"),
    )
    return curves.reset_index()


def runs_compared(report: Report) -> pd.DataFrame:
    """The jobs behind results.csv: every job of a grid; a tuning sweep's confirmation runs, else each study's best
    search trial (the other trials are the search's, in runs.csv and search.png)."""
    if report.tuning is None:
        return report.runs
    return report.runs[report.runs["job"].isin(report.tuning.compared["job"])]


def row_keys(report: Report) -> list[str]:
    """The swept keys that tell results.csv's rows apart and name them: every varying key of a grid; a tuning
    sweep's grid keys (its studies), not the values each study's search found."""
    searched = report.tuning.searched if report.tuning else []
    return [k for k in report.varying if k not in searched]


def _status(statuses: pd.Series) -> str:
    counts = statuses.fillna("unknown").value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def summarize(
    runs: pd.DataFrame, keys: list[str], metric: str = DEFAULT_METRIC, correct: dict[str, Any] | None = None
) -> pd.DataFrame:
    """One row per configuration (the jobs that differ only by seed), best mean `metric` first, each compared with
    the best row (of its data set, when data sets were swept): gap_to_best, p_vs_best, test, within_noise,
    resolution. `correct`: each job's right and wrong test images (Report.correct), for McNemar's test."""
    correct = correct or {}
    frame = runs.assign(_all="all")
    by = keys or ["_all"]
    grouped = frame.groupby(by, dropna=False, sort=False)
    results = grouped.agg(
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
    # Each configuration's test accuracies by seed, in the groups' order (the results' order before sorting).
    results["_scores"] = [group.dropna(subset="test_acc").set_index("seed")["test_acc"] for _, group in grouped]
    results["_correct"] = [
        {seed: correct[job] for seed, job in zip(group["seed"], group["job"]) if job in correct} for _, group in grouped
    ]
    results = results.drop(columns="_tests").reset_index().drop(columns="_all", errors="ignore")
    results = results.sort_values(f"{metric}_mean", ascending=False, na_position="last", kind="stable")
    context = [k for k in keys if is_data_key(k) and runs[k].nunique(dropna=False) > 1]
    if context:  # each data set's rows together, best first: they are compared with each other only
        results = results.sort_values(context, kind="stable")
    results = results.reset_index(drop=True)
    at = results.columns.get_loc("test_acc_ci95") + 1
    judged = versus_best(results, runs, context, metric)
    for offset, column in enumerate(judged.columns):
        results.insert(at + offset, column, judged[column])
    return results.drop(columns=["_scores", "_correct"])


def is_data_key(key: str) -> bool:
    """Keys that choose the data (and so the test set): rows of different data sets are compared apart."""
    return key == "dataset" or key.startswith("dataset.")


def versus_best(results: pd.DataFrame, runs: pd.DataFrame, context: list[str], metric: str) -> pd.DataFrame:
    """gap_to_best, p_vs_best, test, within_noise and resolution of each row of `results` (sorted, best first, with
    each row's test accuracies by seed in `_scores` and its runs' right and wrong test images in `_correct`),
    against the row with the best mean `metric` of its data set.

    within_noise is `yes` for a gap under one test image or p ≥ SIGNIFICANCE, `no` below it (or for a gap that is
    the same in every seed), `unknown` where no test applies: one run on a side and no predictions to compare."""
    judged = pd.DataFrame(
        {
            "gap_to_best": float("nan"),
            "p_vs_best": float("nan"),
            "test": pd.array([pd.NA] * len(results), dtype="string"),
            "within_noise": pd.array([pd.NA] * len(results), dtype="string"),
            "resolution": float("nan"),
        },
        index=results.index,
    )
    groups = results.groupby(context, dropna=False, sort=False) if context else [((), results)]
    for _, group in groups:
        images = test_image_count(runs[matching(runs, group.iloc[0], context)])
        resolution = 100.0 / images if images else float("nan")
        judged.loc[group.index, "resolution"] = resolution
        # A gap under one image (less 1e-9 for the rounding of means of image counts); none if the size is unknown.
        under = resolution * (1 - 1e-9) if images else 1e-9
        tried = group[group[f"{metric}_mean"].notna() & group["test_acc_mean"].notna()]
        if not len(tried):
            continue
        best = tried.iloc[0]
        judged.loc[best.name, ["gap_to_best", "within_noise"]] = [0.0, "yes"]
        for index, row in tried.iloc[1:].iterrows():
            gap = best["test_acc_mean"] - row["test_acc_mean"]
            test, p = compare_rows(row, best)
            if abs(gap) < under or (not math.isnan(p) and p >= SIGNIFICANCE):
                within = "yes"
            elif not math.isnan(p) or test in (PAIRED_T, WELCH):  # a t-test's NaN: the same gap in every seed
                within = "no"
            else:
                within = "unknown"
            judged.loc[index, ["gap_to_best", "p_vs_best", "test", "within_noise"]] = [gap, p, test, within]
    return judged


def compare_rows(row: pd.Series, best: pd.Series) -> tuple[str | None, float]:
    """The test that compares a row with the best one, and its two-sided p: over the seeds when both have two runs
    or more (paired-t when their seeds match, else welch); else McNemar's on the same test images, one run of each
    (of the same seed when they share one); (None, NaN) when neither applies."""
    scores, best_scores = row["_scores"], best["_scores"]
    if min(len(scores), len(best_scores)) >= 2:
        return (PAIRED_T if paired(scores, best_scores) else WELCH), p_value(scores, best_scores)
    ours, theirs = row["_correct"], best["_correct"]
    shared = sorted(set(ours) & set(theirs))
    seeds = (shared[0], shared[0]) if shared else (min(ours, default=None), min(theirs, default=None))
    if seeds[0] is None or seeds[1] is None or len(ours[seeds[0]]) != len(theirs[seeds[1]]):
        return None, float("nan")
    return MCNEMAR, mcnemar(ours[seeds[0]], theirs[seeds[1]])


def mcnemar(right_a: Any, right_b: Any) -> float:
    """Two-sided p of McNemar's exact test: do two models, scored on the same images (`right_a`, `right_b`: bool
    arrays, True where the model got the image right), differ in accuracy? Only the images one got right and the
    other wrong count: b (only a right) and c (only b right); under no difference each is a fair coin's toss, so
    p = min(1, 2 · P(Binomial(b + c, 1/2) ≤ min(b, c)))."""
    from scipy.special import bdtr  # the binomial CDF; scipy.stats would add 0.4 s of imports to every sweep

    only_a = int((right_a & ~right_b).sum())
    only_b = int((~right_a & right_b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(min(1.0, 2 * bdtr(min(only_a, only_b), only_a + only_b, 0.5)))


def paired(scores: pd.Series, best: pd.Series) -> bool:
    """Whether two rows' accuracies by seed pair up: both ran the same seeds, each once."""
    return scores.index.is_unique and best.index.is_unique and set(scores.index) == set(best.index)


def p_value(scores: pd.Series, best: pd.Series) -> float:
    """Two-sided p of a difference in mean test accuracy between two rows (each a Series of accuracies by seed):
    a paired t-test when both ran the same seeds (a sweep's seeds match), else Welch's. NaN when undefined: fewer
    than two runs on a side, or differences (or spreads) that do not vary."""
    from scipy.special import stdtr  # Student's t CDF; scipy.stats would add 0.4 s of imports to every sweep

    if len(scores) < 2 or len(best) < 2:
        return float("nan")
    if paired(scores, best):
        diffs = scores - best.reindex(scores.index)
        spread = diffs.std()
        if spread < 1e-9:  # the same difference in every seed: no variance to test against
            return float("nan")
        t, dof = diffs.mean() / (spread / math.sqrt(len(diffs))), len(diffs) - 1.0
    else:
        var_a, var_b = scores.var() / len(scores), best.var() / len(best)
        if var_a + var_b < 1e-18:
            return float("nan")
        t = (scores.mean() - best.mean()) / math.sqrt(var_a + var_b)
        # Welch–Satterthwaite degrees of freedom
        dof = (var_a + var_b) ** 2 / (var_a**2 / (len(scores) - 1) + var_b**2 / (len(best) - 1))
    return float(2 * stdtr(dof, -abs(t)))


def test_image_count(runs: pd.DataFrame) -> int | None:
    """The size of the test set behind these runs: as summary.json records it, else inferred from the test
    accuracies (each is 100·k/n: the smallest n that fits them all, at most MAX_TEST_IMAGES); None if neither."""
    recorded = pd.to_numeric(runs["test_images"], errors="coerce").dropna().unique()
    if len(recorded) == 1:
        return int(recorded[0])
    n = 1
    for accuracy in pd.to_numeric(runs["test_acc"], errors="coerce").dropna():
        share = Fraction(float(accuracy) / 100).limit_denominator(MAX_TEST_IMAGES)
        if abs(float(share) * 100 - accuracy) > 1e-6:
            return None
        n = math.lcm(n, share.denominator)
        if n > MAX_TEST_IMAGES:  # accuracies of different test sets, or not counts of images
            return None
    return n if n > 1 else None


def ci95(results: pd.DataFrame) -> pd.Series:
    """Half-width of the 95% confidence interval of the mean test accuracy, from Student's t over the seeds
    (mean ± t(0.975, n-1) · std / √n); undefined (NaN) with fewer than two runs."""
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would add 0.4 s of imports to every sweep

    n = results["_tests"].astype(float)
    half = stdtrit((n - 1).clip(lower=1), 0.975) * results["test_acc_std"] / n.clip(lower=1) ** 0.5
    return half.where(n >= 2)


def settings_text(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def setting(key: str, value: Any) -> str:
    """`optimizer.lr=0.001`: a swept value as the user typed it (%g), not as Python prints a float."""
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def label_of(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(setting(k, row[k]) for k in keys) or "all runs"


def best_by(report: Report, axis: str = "norm") -> pd.DataFrame | None:
    """For each value of the compared `axis`: the setting of the other swept hyperparameters with the best mean
    compared metric (validation accuracy unless compare_metric says otherwise), and the test accuracy at that
    setting (so each norm is judged at its own best learning rate, say). Swept data sets are kept apart, never
    picked from. None when nothing else was swept: results.csv is then the comparison already."""
    if axis not in report.keys and axis_value(report, axis) is None:
        swept = ", ".join(report.keys) or "none"
        raise ValueError(
            f"compare={axis}: the jobs of this sweep have no key {axis!r}; compare one of the swept keys ({swept}), "
            "or a config key such as norm, model or optimizer.lr"
        )
    if report.tuning is not None:  # each study at its best search trial: tuned.py
        data_keys = [k for k in report.varying if is_data_key(k)]
        return best_table(report.tuning, report.metric, data_keys, axis, axis_value(report, axis))
    context = [k for k in report.varying if k != axis and is_data_key(k)]
    tuned = [k for k in report.varying if k != axis and k not in context]
    if not tuned:
        return None
    results, compared = report.results, f"{report.metric}_mean"
    by = [*context, axis] if axis in report.keys else context
    groups = results.groupby(by, dropna=False, sort=False) if by else [((), results)]
    figures = ["runs", *dict.fromkeys([compared, "val_acc_mean", "val_acc_std"])]
    figures += ["test_acc_mean", "test_acc_std", "test_acc_ci95"]
    rows = []
    for _, group in groups:
        tried = group[(group["runs"] > 0) & group[compared].notna()]
        best = tried.loc[tried[compared].idxmax()] if len(tried) else group.iloc[0]
        row = {axis: best[axis] if axis in report.keys else axis_value(report, axis)}
        row.update({k: best[k] for k in context})
        row.update({k: best[k] if len(tried) else None for k in tuned})
        row.update({c: best[c] if len(tried) else (0 if c == "runs" else None) for c in figures})
        row["settings_tried"] = len(tried)
        row["status"] = best["status"] if len(tried) else "; ".join(group["status"].unique())
        rows.append(row)
    table = pd.DataFrame(rows)
    edges = grid_edges(report, tuned)
    table["at_edge"] = [
        ", ".join(f"{key} {side}" for key, side, _ in edges_of(row, edges)) for _, row in table.iterrows()
    ]
    order = [*context, compared] if context else [compared]
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


def swept_numbers(report: Report) -> list[str]:
    """The swept keys whose values are numbers (optimizer.lr, batch_size, epochs, ...): each gets a figure of test
    accuracy against it."""
    results = report.results
    return [k for k in row_keys(report) if results[k].dtype.kind in "iuf" and results[k].nunique() > 1]


def lines_against(report: Report, key: str) -> pd.DataFrame:
    """Mean test accuracy against the swept numeric `key`, one line per setting of the other swept keys (e.g. the
    GroupNorm paper's batch-size study, or each norm over a learning-rate range)."""
    others = [k for k in row_keys(report) if k != key]
    table = report.results[[*others, key, "test_acc_mean", "test_acc_ci95", "test_acc_std", "runs"]]
    return table.sort_values([*others, key], kind="stable").reset_index(drop=True)


def _show(value: Any, column: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column == "p_vs_best":
        return "<0.001" if value < 0.001 else f"{value:.2g}" if value < 0.01 else f"{value:.2f}"
    if isinstance(value, float) and column.endswith(("_acc", "_mean", "_std", "_ci95", "gap_to_best", "resolution")):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cells(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`frame[columns]` as text: two decimals for the figures, p to two digits, yes/no for within_noise, swept
    values as typed (%g), `-` for none."""
    return pd.DataFrame({c: [_show(v, c) for v in frame[c].tolist()] for c in columns}, index=frame.index)


def table_columns(report: Report) -> list[str]:
    """The columns shown for results.csv: swept keys, the compared metric with the test accuracy beside it, the
    comparison with the best row, then time, size and status (losses, best-epoch accuracy unless compared, and the
    resolution stay in the CSV; the resolution gets a note). Spreads and intervals only with several runs, p and
    the test only when a row was tested."""
    compared = [f"{report.metric}_mean", f"{report.metric}_std"]
    test = ["test_acc_mean", "test_acc_std", "test_acc_ci95", "gap_to_best", "p_vs_best", "test", "within_noise"]
    rest = ["val_acc_mean", "val_acc_std", "sec_per_epoch_mean", "params", "status"]
    counts = [c for c in COUNT_COLUMNS if c in report.results]  # a tuning sweep's trials and pruned per study
    shown = [
        *report.varying,
        *counts,
        "runs",
        *dict.fromkeys(c for c in [*compared, *test, *rest] if c in RESULT_COLUMNS),
    ]
    if report.results["runs"].max() <= 1:
        shown = [c for c in shown if not c.endswith(("_std", "_ci95"))]
    if report.results["test"].isna().all():  # no row was tested (one row, or old folders of one run each)
        shown = [c for c in shown if c not in ("p_vs_best", "test")]
    return [*shown, "recipe"] if "recipe" in report.results else shown


def best_columns(best: pd.DataFrame) -> list[str]:
    """The columns shown of a best-by table: a tuning sweep's without the trial's job (its folder, in the CSV)."""
    columns = [c for c in best.columns if c != "job"]
    if "at_edge" in best and not best["at_edge"].astype(bool).any():
        columns.remove("at_edge")  # no best at an edge of its grid: nothing to flag
    if "runs" in best and best["runs"].max() <= 1:
        columns = [c for c in columns if not c.endswith(("_std", "_ci95"))]
    return columns


def row_names(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """Short names of result rows: the value of the one swept key (`bn`), else `norm=bn optimizer.lr=0.001`."""
    if len(keys) == 1:
        return [_show(v, keys[0]) for v in rows[keys[0]].tolist()]
    return [" ".join(f"{k}={_show(v, k)}" for k, v in zip(keys, values)) for values in rows[keys].itertuples(False)]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def noise_sentences(report: Report) -> list[str]:
    """Which rows are tied with the best, and by which test (one sentence per data set when data sets were swept),
    e.g. `bn and gn are within noise of the best (ln by val_acc_mean): a test-accuracy gap under one test image
    (0.28 points) or p ≥ 0.05 in a paired t-test over 3 seeds.`; then the rows no test could judge. Nothing when
    fewer than two rows have a result."""
    context = [k for k in report.varying if is_data_key(k)]
    named = [k for k in row_keys(report) if k not in context]
    seeds = f"{CONFIRM_OPTION}=3" if report.tuning else "seed=0,1,2"  # a tuning sweep's seeds confirm its best
    results = report.results
    groups = results.groupby(context, dropna=False, sort=False) if context else [((), results)]
    sentences = []
    for _, group in groups:
        judged = group[group["within_noise"].notna()]
        if len(judged) < 2:
            continue
        others = judged.iloc[1:]
        where = f"{label_of(judged.iloc[0], context)}: " if context else ""
        best = row_names(judged.head(1), named)[0] if named else "all runs"
        the_best = f"the best ({best} by {report.metric}_mean)"
        rule = " or ".join(_rules(others, judged["resolution"].iloc[0], seeds))
        tied = others[others["within_noise"] == "yes"]
        if len(tied):
            names = row_names(tied, named)
            if len(names) > TIES_NAMED:
                names = [*names[: TIES_NAMED - 1], f"{len(names) - TIES_NAMED + 1} more rows (within_noise)"]
            tested = tied[tied["test"].isin([PAIRED_T, WELCH])]
            caution = (
                "; two seeds tell only large, steady gaps apart: more seeds sharpen the test"
                if len(tested) and tested["runs"].min() == 2
                else ""
            )
            sentences.append(f"{where}{_listed(names)} {_are(names)} within noise of {the_best}: {rule}{caution}.")
        else:
            sentences.append(f"{where}no other row is within noise of {the_best}: none has {rule}.")
        unknown = others[others["within_noise"] == "unknown"]
        if len(unknown):
            names = row_names(unknown, named)
            sentences.append(
                f"{where}{_listed(names)} cannot be told from the best or not (within_noise unknown): one run on a "
                "side and no predictions.npz to compare (jobs saved before normsweep kept their test predictions); "
                f"run them again, or add seeds ({seeds})."
            )
    return sentences


def _are(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _rules(others: pd.DataFrame, resolution: float, seeds: str) -> list[str]:
    """What makes a row within noise, for the tests these rows were judged by; `seeds`: how to add seeds."""
    rules = [
        f"a test-accuracy gap under one test image ({resolution:.2f} points)"
        if pd.notna(resolution)
        else "the same test accuracy"
    ]
    over_seeds = others[others["test"].isin([PAIRED_T, WELCH])]
    if len(over_seeds):
        tests = {PAIRED_T: "a paired t-test", WELCH: "Welch's t-test"}
        used = " or ".join(tests[t] for t in tests if t in set(over_seeds["test"]))
        runs = sorted({int(n) for n in over_seeds["runs"]})
        seeds = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        rules.append(f"p ≥ {SIGNIFICANCE:g} in {used} over {seeds} seeds")
    if (others["test"] == MCNEMAR).any():
        images = f" {round(100 / resolution)}" if pd.notna(resolution) else ""
        rules.append(
            f"p ≥ {SIGNIFICANCE:g} in McNemar's exact test on the same{images} test images (one run on a side: it "
            f"tells these trained models apart, not the settings; add seeds for that: {seeds})"
        )
    return rules


def resolution_notes(report: Report) -> list[str]:
    """A line for the rows whose test accuracy did not vary over n ≥ 2 seeds: a spread of 0 means the seeds agree
    to within one test image, the finest step the test set can show, not that the result is certain."""
    results = report.results
    still = results[(results["runs"] >= 2) & (results["test_acc_std"] == 0)]
    if not len(still):
        return []
    keys = row_keys(report)
    names = row_names(still, keys) if keys else ["all runs"]
    resolution = still["resolution"].dropna()
    step = "one test image"
    if len(resolution) and resolution.nunique() == 1:
        step += f" = {resolution.iloc[0]:.2f} points ({round(100 / resolution.iloc[0])} test images)"
    return [f"test_acc_std 0.00 for {_listed(names)}: every seed scored the same; the test set's resolution is {step}"]


def format_table(report: Report) -> str:
    """The comparison table as printed at the end of a sweep, with which rows are tied with the best."""
    lines = [cells(report.results, table_columns(report)).to_string(index=False)]
    lines += [search_sentence(report.tuning)] if report.tuning else []
    lines += resolution_notes(report)
    if report.fixed:
        lines.append("same in every run: " + settings_text(report.fixed))
    lines += noise_sentences(report)
    lines += stalled_sentences(report)
    lines += recipe_sentences(report.mixed)
    if report.best is None:  # with a best-by table, its own lines say it (format_best)
        lines += best_row_edges(report)
    return "\n".join(lines)


def best_row_edges(report: Report) -> list[str]:
    """The edge sentences of the best row of results.csv, for a sweep without a best-by table; none for a tuning
    sweep (a search has an interval, not a grid's edge)."""
    if report.tuning is not None:
        return []
    return edge_sentences(report.results.head(1), None, grid_edges(report, report.varying))


def best_by_edges(report: Report, best: pd.DataFrame, axis: str) -> list[str]:
    """The edge sentences of a best-by table: one per swept number whose best, for some value of `axis`, lies at
    the edge of the values tried; none for a tuning sweep's."""
    if report.tuning is not None:
        return []
    return edge_sentences(best, axis, grid_edges(report, tuned_columns(best, axis)))


def tuned_columns(best: pd.DataFrame, axis: str) -> list[str]:
    """The keys a best-by table picked the best setting of (optimizer.lr, ...)."""
    own = (axis, "runs", "settings_tried", "status", "at_edge")
    return [c for c in best.columns if c not in own and "_acc" not in c]


def format_best(best: pd.DataFrame, axis: str, metric: str = DEFAULT_METRIC, report: Report | None = None) -> str:
    """The best-by table as printed, and, given the sweep's `report`, a line per swept number whose best lies at
    the edge of the values tried."""
    if report is not None and report.tuning is not None:
        return (
            f"best by {axis} (each study at its best completed search trial by {COMPARE_METRICS[metric]}; pruned "
            f"trials are not candidates):\n{cells(best, best_columns(best)).to_string(index=False)}"
        )
    tuned = tuned_columns(best, axis)
    lines = [
        f"best by {axis} (each at its best {', '.join(tuned)} by mean {COMPARE_METRICS[metric]}):",
        cells(best, best_columns(best)).to_string(index=False),
    ]
    if report is not None:
        lines += best_by_edges(report, best, axis)
    return "\n".join(lines)


EDGE_VALUES = 3  # with two values tried, every best is at an edge: nothing worth saying


def grid_edges(report: Report, keys: list[str]) -> dict[str, list[float]]:
    """The values tried of each swept number among `keys` that has at least EDGE_VALUES of them, sorted."""
    numbers = set(swept_numbers(report))
    tried = report.results[report.results["runs"] > 0]
    edges = {}
    for key in keys:
        values = sorted(tried[key].dropna().unique()) if key in numbers else []
        if len(values) >= EDGE_VALUES:
            edges[key] = [float(v) for v in values]
    return edges


def edges_of(row: pd.Series, edges: dict[str, list[float]]) -> list[tuple[str, str, float]]:
    """(key, "largest" or "smallest", the value just beyond) for each key whose value in `row` is at an edge of the
    values tried; a smallest value of 0 or less is no edge (a weight decay of 0 cannot go lower)."""
    found = []
    for key, values in edges.items():
        value = row.get(key)
        if value is None or pd.isna(value):
            continue
        if float(value) == values[-1]:
            found.append((key, "largest", _beyond(values[-2], values[-1])))
        elif float(value) == values[0] and values[0] > 0:
            found.append((key, "smallest", _beyond(values[1], values[0])))
    return found


def _beyond(inner: float, edge: float) -> float:
    """The next value past `edge`, on the grid's own spacing: the same ratio where the grid grows by factors of 1.5
    or more (learning rates, batch sizes), else the same step."""
    if inner > 0 and edge > 0 and max(edge / inner, inner / edge) >= 1.5:
        return edge * (edge / inner)
    return edge + (edge - inner)


def edge_sentences(rows: pd.DataFrame, axis: str | None, edges: dict[str, list[float]]) -> list[str]:
    """`the best optimizer.lr of bn and gn is the largest tried (0.003): ...; extend the grid (e.g. add 0.01)`."""
    named: dict[tuple[str, str, float, float], list[str]] = {}
    for _, row in rows.iterrows():
        for key, side, beyond in edges_of(row, edges):
            named.setdefault((key, side, float(row[key]), beyond), []).append(str(row[axis]) if axis else "")
    lines = []
    for (key, side, value, beyond), names in named.items():
        whose = f" of {_listed(names)}" if axis else ""
        lines.append(
            f"the best {key}{whose} is the {side} tried ({value:g}): the best may lie beyond it; extend the grid "
            f"(e.g. add {key}={beyond:.2g})"
        )
    return lines


def job_settings(row: pd.Series, keys: list[str], seed: bool = True) -> str:
    """A job's settings as typed: `norm=bn batch_size=2 seed=0` (without the seed when not `seed`)."""
    return " ".join(setting(k, row[k]) for k in [*keys, *(["seed"] if seed else [])] if pd.notna(row[k]))


def stalled_sentences(report: Report) -> list[str]:
    """`2 runs stalled at chance: ...`, naming them (up to TIES_NAMED), when any job behind results.csv ended with
    status stalled (a tuning sweep's other trials are the search's: search.png)."""
    compared = runs_compared(report)
    stalled = compared[compared["status"] == Status.STALLED]
    if not len(stalled):
        return []
    seeds = compared["seed"].nunique() > 1
    names = [job_settings(row, report.varying, seeds) or "all runs" for _, row in stalled.iterrows()]
    if len(names) > TIES_NAMED:
        names = [*names[: TIES_NAMED - 1], f"{len(names) - TIES_NAMED + 1} more"]
    runs = f"{len(stalled)} run{'s' if len(stalled) > 1 else ''}"
    return [
        f"{runs} stalled at chance ({_listed(names)}): trained every epoch and learned nothing, the training loss "
        "still that of a uniform guess (ln(classes)) and the validation accuracy that of naming one class; their "
        "numbers count in the table as the result of their setting (report.md shows what reached their norm layers)."
    ]


def stalled_runs(report: Report, sweep_dir: Path) -> pd.DataFrame | None:
    """The stalled jobs beside the best row's, per norm layer at their last epoch: training loss against ln(classes),
    validation accuracy against chance, the gradient reaching each norm layer and the std of its input (from each
    job's diagnostics.csv). None when no job stalled."""
    runs = runs_compared(report)
    stalled = runs[runs["status"] == Status.STALLED]
    if not len(stalled):
        return None
    best = report.results.iloc[0]
    reference = runs[matching(runs, best, report.keys) & runs["status"].isin([Status.COMPLETED, Status.DIVERGED])]
    shown = [("stalled", run) for _, run in stalled.iterrows()] + [
        ("best", run) for _, run in reference.head(1).iterrows()
    ]
    rows = []
    for label, run in shown:
        figures = {
            "run": f"{job_settings(run, report.varying, runs['seed'].nunique() > 1) or 'all runs'} ({label})",
            "train_loss": run["train_loss"],
            "ln(classes)": math.log(run["classes"]) if pd.notna(run["classes"]) else float("nan"),
            "val_acc": run["val_acc"],
            "chance_acc": run["chance_acc"],
        }
        layers = _last_epoch_layers(Path(sweep_dir) / str(run["job"]))
        if layers is None:  # run with diagnostics=false
            layers = pd.DataFrame({"grad_norm": [float("nan")], "in_std": [float("nan")]}, index=["-"])
        for layer, values in layers.iterrows():
            rows.append({**figures, "layer": layer, "grad_norm": values["grad_norm"], "in_std": values["in_std"]})
    return pd.DataFrame(rows)


def _last_epoch_layers(job_dir: Path) -> pd.DataFrame | None:
    """A job's grad_norm and in_std per norm layer (in depth order) at its last epoch; None without diagnostics."""
    try:
        frame = pd.read_csv(job_dir / DIAGNOSTICS_FILE)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not set(DIAGNOSTICS_COLUMNS) <= set(frame.columns) or not len(frame):
        return None
    last = frame[(frame["epoch"] == frame["epoch"].max()) & (frame["depth"] > 0)]
    table = last.pivot_table(index=["depth", "layer"], columns="metric", values="value", aggfunc="first")
    return table.set_axis([f"{d} {name}" for d, name in table.index])


def problems(report: Report) -> list[str]:
    """One line per job that failed, stopped early or cannot be read: status, folder, settings, error."""
    lines = []
    for _, row in report.runs[report.runs["status"].isin(ATTENTION)].iterrows():
        settings = job_settings(row, report.keys)
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


def diagnostics(report: Report, sweep_dir: Path) -> pd.DataFrame | None:
    """Every finished job's diagnostics.csv, averaged over seeds: one row per (configuration, epoch, layer, metric)
    with `value` (the mean) and `runs`; None when no job has the file (diagnostics=false, or an older sweep)."""
    frames, compared = [], runs_compared(report)
    for job, status in zip(compared["job"], compared["status"]):
        path = Path(sweep_dir) / str(job) / DIAGNOSTICS_FILE
        if status not in FINISHED or not path.is_file():
            continue
        try:
            frame = pd.read_csv(path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("%s cannot be read (%s); left out of diagnostics.png", path, str(err).splitlines()[0])
            continue
        if set(DIAGNOSTICS_COLUMNS) <= set(frame.columns):
            frames.append(frame[DIAGNOSTICS_COLUMNS].assign(job=job))
    if not frames:
        return None
    rows = pd.concat(frames).merge(compared[["job", *report.keys]], on="job")
    by = [*report.keys, "epoch", "depth", "layer", "metric"]
    return rows.groupby(by, dropna=False, sort=False).agg(value=("value", "mean"), runs=("job", "count")).reset_index()
