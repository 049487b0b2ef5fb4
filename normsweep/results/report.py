"""report.md: one sweep, readable on its own (pasted into an issue or a chat): the command that produced it, the
environment, the comparison table, the best-by table and the figures, with their numbers in text."""

from __future__ import annotations

import datetime
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from normsweep import __version__
from normsweep.results.recipes import recipe_sentences
from normsweep.results.tables import (
    COMPARE_METRICS,
    MCNEMAR,
    PAIRED_T,
    SIGNIFICANCE,
    WELCH,
    Report,
    best_by_edges,
    best_columns,
    best_file,
    best_row_edges,
    cells,
    diagnostics,
    is_data_key,
    label_of,
    lines_against,
    matching,
    noise_sentences,
    problems,
    resolution_notes,
    row_keys,
    runs_compared,
    setting,
    settings_text,
    stalled_runs,
    swept_numbers,
    table_columns,
    tuned_columns,
)
from normsweep.results.tuned import CONFIRM_OPTION, search_sentence, study_table
from normsweep.sweep.files import atomic_write

REPORT_FILE = "report.md"
DIAGNOSTICS_FIGURE = "diagnostics.png"
SEARCH_FIGURE = "search.png"
DIAGNOSTIC_DEPTHS = 6  # the diagnostics table shows this many norm layers at most: the first, the last, between
MULTIRUN_FILE = "multirun.yaml"


def sweep_command(sweep_dir: Path) -> str | None:
    """The command line of the sweep, rebuilt from the multirun.yaml Hydra writes at its start; None without it."""
    try:
        saved = yaml.safe_load((Path(sweep_dir) / MULTIRUN_FILE).read_text())
        hydra = saved["hydra"]
        task, hydra_overrides = list(hydra["overrides"]["task"]), list(hydra["overrides"]["hydra"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    args = []
    for source in hydra.get("runtime", {}).get("config_sources", []) or []:
        if isinstance(source, dict) and source.get("provider") == "command-line" and source.get("schema") == "file":
            args += ["--config-dir", str(source.get("path"))]
    args += ["-m", *(str(o) for o in task)]
    args += [str(o) for o in hydra_overrides if not str(o).startswith("hydra.mode=")]
    return "python -m normsweep " + shlex.join(args)


def markdown(frame: pd.DataFrame) -> str:
    """A text table as GitHub-flavoured markdown; numbers right-aligned."""

    def numeric(column: str) -> bool:
        return all(v == "-" or v.lstrip("-").replace(".", "", 1).replace("e", "", 1).isdigit() for v in frame[column])

    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---:" if numeric(c) else "---" for c in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _values(runs: pd.DataFrame, column: str) -> str:
    return ", ".join(sorted({str(v) for v in runs[column].dropna()})) or "unknown"


def environment(report: Report) -> str:
    runs = report.runs
    return (
        f"normsweep {__version__}, torch {_values(runs, 'torch')}, device {_values(runs, 'device')} "
        f"({_values(runs, 'hardware')})"
    )


def setup(report: Report) -> dict[str, Any]:
    """What every job shared: the groups and keys that did not vary, and the training settings they used."""
    shared = dict(report.fixed)
    config = report.config
    optimizer = config.get("optimizer", {}) if isinstance(config.get("optimizer"), dict) else {}
    for key, value in (
        ("optimizer.lr", optimizer.get("lr")),
        ("optimizer.schedule", optimizer.get("schedule")),
        *((k, config.get(k)) for k in ("epochs", "batch_size", "val_fraction", "precision")),
    ):
        if key not in report.varying and key not in shared and value is not None:
            shared[key] = value
    return shared


def epoch_table(report: Report, width: int = 6) -> pd.DataFrame | None:
    """curves.png's validation accuracy in text: mean (± std over seeds) at up to `width` epochs, first and last
    kept."""
    curves = report.curves
    if not len(curves):
        return None
    epochs = sorted(int(e) for e in curves["epoch"].unique())
    step = max(1, round((len(epochs) - 1) / (width - 1))) if len(epochs) > 1 else 1
    shown = sorted(set(epochs[::step]) | {epochs[-1]})
    label_keys = row_keys(report) or report.keys
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    rows = []
    for _, config in configs.iterrows():
        line = curves[matching(curves, config, report.keys)].set_index("epoch")
        rows.append(
            {
                "configuration": label_of(config, label_keys),
                **{f"epoch {e}": _mean_std(line, e) for e in shown},
            }
        )
    return pd.DataFrame(rows)


def _mean_std(line: pd.DataFrame, epoch: int) -> str:
    if epoch not in line.index:
        return "-"
    mean, std = line.loc[epoch, "val_acc_mean"], line.loc[epoch, "val_acc_std"]
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def against_table(report: Report, key: str) -> pd.DataFrame:
    """A numeric key's panel of curves.png in text: a row per line (the other swept keys), a column per value of
    `key`, each cell the mean test accuracy ± its 95% interval."""
    table = lines_against(report, key)
    others = [k for k in row_keys(report) if k != key]
    values = sorted(table[key].dropna().unique())
    rows = []
    groups = table.groupby(others, dropna=False, sort=False) if others else [((), table)]
    for _, line in groups:
        row = {"configuration": label_of(line.iloc[0], others) if others else "all runs"}
        for value in values:
            at = line[line[key] == value]
            mean = at["test_acc_mean"].iloc[0] if len(at) else float("nan")
            half = at["test_acc_ci95"].iloc[0] if len(at) else float("nan")
            text = "-" if pd.isna(mean) else f"{mean:.2f}" if pd.isna(half) else f"{mean:.2f} ± {half:.2f}"
            row[setting(key, value)] = text
        rows.append(row)
    return pd.DataFrame(rows)


def _number(value: Any) -> str:
    return "-" if pd.isna(value) else f"{value:.3g}"


def diagnostics_tables(report: Report, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """diagnostics.png in text: per configuration and norm layer (up to DIAGNOSTIC_DEPTHS of them), input std and
    gradient norm at the first and last epoch and the last epoch's update ratio; and train_eval_gap per
    configuration at the first and last epoch. Means over seeds."""
    first, last = int(table["epoch"].min()), int(table["epoch"].max())
    label_keys = row_keys(report) or report.keys
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    layers, gaps = [], []
    for _, config in configs.iterrows():
        rows = table[matching(table, config, report.keys)]
        name = label_of(config, label_keys)
        values = rows.set_index(["epoch", "depth", "metric"])["value"]
        values = values[~values.index.duplicated()]
        depths = sorted(d for d in rows["depth"].unique() if d > 0)
        step = max(1, round((len(depths) - 1) / (DIAGNOSTIC_DEPTHS - 1))) if len(depths) > 1 else 1
        names = rows.groupby("depth")["layer"].first()
        for depth in sorted(set(depths[::step]) | set(depths[-1:])):
            layers.append(
                {
                    "configuration": name,
                    "layer": f"{depth} {names[depth]}",
                    **{
                        f"{metric} {label}".strip(): _number(values.get((epoch, depth, metric)))
                        for metric in ("in_std", "grad_norm")
                        for label, epoch in ((("first", first), ("last", last)) if first < last else (("", last),))
                    },
                    "update_ratio last": _number(values.get((last, depth, "update_ratio"))),
                }
            )
        gaps.append(
            {
                "configuration": name,
                **{f"epoch {e}": _number(values.get((e, 0, "train_eval_gap"))) for e in sorted({first, last})},
            }
        )
    return pd.DataFrame(layers), pd.DataFrame(gaps)


def diagnostics_section(report: Report, sweep_dir: Path, drawn: bool) -> list[str]:
    """report.md's diagnostics: the figure (`drawn`: diagnostics.png is written), how to read it, and its numbers;
    nothing when no job measured them."""
    table = diagnostics(report, sweep_dir) if drawn else None
    if table is None:
        return []
    layers, gaps = diagnostics_tables(report, table)
    first, last = int(table["epoch"].min()), int(table["epoch"].max())
    return [
        "## Inside the network",
        "",
        f"![input std, gradient norm and update ratio at each norm layer, and train_eval_gap]({DIAGNOSTICS_FIGURE})",
        "",
        "Each norm layer measured at the end of every epoch on one fixed probe batch of training images "
        "(diagnostics.csv in each job folder; what each quantity shows: docs/diagnostics.md). `in_std`: the spread "
        "of the layer's input (with norm=none, what the layer would have normalized); `grad_norm`: the loss "
        "gradient reaching it, over depth the gradient flow; `update_ratio`: how far the preceding conv/linear "
        "weight moved in the epoch, relative to its size (the effective learning rate).",
        "",
        f"Per norm layer (depth, name), at epoch {first} (first) and {last} (last):"
        if first < last
        else f"Per norm layer (depth, name), at epoch {last}, the only one:",
        "",
        markdown(layers),
        "",
        "`train_eval_gap`: the probe loss in train mode (batch statistics, in batches of the training batch size) "
        "minus in eval mode (running statistics, Dropout off); far from 0, the model evaluates differently from how "
        "it trained: BatchNorm's running statistics, or a model's Dropout (which raises the train-mode loss "
        "whatever the norm):",
        "",
        markdown(gaps),
        "",
    ]


def stalled_section(report: Report, sweep_dir: Path) -> list[str]:
    """report.md's runs that learned nothing, with what their diagnostics show; nothing when none stalled."""
    table = stalled_runs(report, sweep_dir)
    if table is None:
        return []
    losses = {c: ["-" if pd.isna(v) else f"{v:.4f}" for v in table[c]] for c in ("train_loss", "ln(classes)")}
    others = {c: [_number(v) for v in table[c]] for c in ("val_acc", "chance_acc", "grad_norm", "in_std")}
    shown = table.assign(**losses, **others)
    return [
        "## Stalled runs",
        "",
        "These runs trained every epoch and learned nothing (status `stalled`): their last epoch's training loss is "
        "within 10% of ln(classes), the loss of a uniform guess, and their validation accuracy at most 1.2 × "
        "`chance_acc`, the share of the validation split's largest class (what always naming one class scores). "
        "They count in the table as the result of their setting, and are not trained again on resume. Below, at "
        "their last epoch, the gradient reaching each norm layer (`grad_norm`, on the probe batch: 0 means no "
        "gradient flows back to it, as when the units of a layer above it are all dead) and the std of the layer's "
        "input "
        '(`in_std`), beside the best row\'s run for comparison (docs/results.md, "A job is stalled"):',
        "",
        markdown(shown),
        "",
    ]


def search_section(report: Report, drawn: bool) -> list[str]:
    """report.md's search of a tuning sweep: per study its trials, pruned and completed ones and its best setting,
    then search.png (`drawn`: it is written); nothing for a grid."""
    tuning = report.tuning
    if tuning is None:
        return []
    metric = COMPARE_METRICS[report.metric]
    table = study_table(tuning, report.metric, [k for k in report.varying if is_data_key(k)])
    written = f" ({best_file(report.compare)})" if report.best is not None and report.compare else ""
    searched = ", ".join(f"`{key}`" for key in tuning.searched)
    out = [
        "## Search",
        "",
        f"Each study searched {searched} over trials of its own. `pruned` counts the trials the pruner stopped early "
        "(their validation accuracy fell behind the study's better trials), `completed` those that trained every "
        f"epoch. Each study's best setting is its best completed trial by {metric}{written}: a pruned trial is never "
        "chosen, its accuracy being that of the epoch it was stopped at, not of a model trained for every epoch.",
        "",
        markdown(cells(table, [c for c in table.columns if c != "job"])),
        "",
        "The best trial was picked among many on its own seed, so its accuracy is biased upward (the winner's curse): "
        + (
            "results.csv compares each best setting trained again with fresh seeds, and only those."
            if tuning.confirmed
            else f"results.csv compares these trials as they are; {CONFIRM_OPTION}=3 trains each best setting again "
            "with fresh seeds and compares those."
        ),
        "",
    ]
    if drawn:
        out += [
            f"![each search trial's validation accuracy against the values it tried]({SEARCH_FIGURE})",
            "",
            "A panel per searched key: each point a search trial, at the value it tried and the validation accuracy "
            "it reached, coloured by study; crosses are pruned trials, hollow circles diverged or stalled ones, and "
            "the star is each study's best completed trial.",
            "",
        ]
    return out


def results_text(report: Report) -> str:
    """What the results table's columns mean, for the metric this sweep compares."""
    metric, several = report.metric, report.results["runs"].max() > 1
    parts = [
        f"One row per configuration, best mean {COMPARE_METRICS[metric]} (`{metric}_mean`: compare_metric) first, "
        "the test accuracy beside it. Accuracies in %; `val_acc` is the last epoch's validation accuracy and "
        "`test_acc` the final model's on the held-out test split."
    ]
    if several:
        parts.append(
            "`_std` is the spread over seeds and `test_acc_ci95` the half-width of the 95% confidence interval of "
            "the mean (Student's t)."
        )
    parts.append("`gap_to_best` is the best row's test accuracy minus this row's, in points.")
    tests = set(report.results["test"].dropna())
    if tests:
        named = {
            PAIRED_T: "a paired t-test over the seeds (`paired-t`)",
            WELCH: "Welch's t-test over the seeds (`welch`, when the seeds differ)",
            MCNEMAR: "McNemar's exact test on the test images both rows' runs were scored on (`mcnemar`, one run on "
            "a side: it says whether these two trained models differ, not whether their settings do; only seeds say "
            "that)",
        }
        parts.append(
            "`p_vs_best` is the two-sided p of that gap by the `test` named beside it: "
            + "; ".join(text for test, text in named.items() if test in tests)
            + ". `-` for the best row itself and where the gap is the same in every seed."
        )
    parts.append(
        f"`within_noise`: `yes` when the row cannot be told from the best (a gap under one test image, or p ≥ "
        f"{SIGNIFICANCE:g}), `no` when it can, `unknown` when no test applies (one run on a side and no saved "
        "predictions); one test image, in points, is results.csv's `resolution`."
    )
    return " ".join(parts)


def render(report: Report, sweep_dir: Path, command: str | None, drawn: set[str] | None = None) -> str:
    """report.md's text. `drawn`: the names of the figures written with it (default: those in the folder)."""
    sweep_dir = Path(sweep_dir).resolve()
    if drawn is None:
        drawn = {f.name for f in (sweep_dir / DIAGNOSTICS_FIGURE, sweep_dir / SEARCH_FIGURE) if f.is_file()}
    best, compare = report.best, report.compare
    finished = report.runs["status"].value_counts()
    counts = ", ".join(f"{n} {status}" for status, n in finished.items())
    seeds = ", ".join(str(s) for s in sorted(report.runs["seed"].dropna().unique()))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# normsweep report: {sweep_dir.name}",
        "",
        f"- **Command:** `{command}`" if command else "- **Command:** unknown (multirun.yaml is missing)",
        f"- **Environment:** {environment(report)}",
        f"- **Jobs:** {len(report.runs)} ({counts}); seeds {seeds or '-'}; aggregated {now} in `{sweep_dir}`",
        f"- **Same in every run:** {settings_text(setup(report)) or '-'}",
        "",
        "## Results",
        "",
        results_text(report),
        "",
        markdown(cells(report.results, table_columns(report))),
        "",
    ]
    said = [*([search_sentence(report.tuning)] if report.tuning else []), *noise_sentences(report)]
    said += recipe_sentences(report.mixed)
    for line in [*resolution_notes(report), *(f"**{sentence}**" for sentence in said)]:
        out += [line, ""]
    out += search_section(report, SEARCH_FIGURE in drawn)
    if best is not None and compare and report.tuning is None:  # a tuning sweep's is its search table
        tuned = tuned_columns(best, compare)
        out += [
            f"## Best by {compare}",
            "",
            f"Each {compare} at its own best {', '.join(f'`{k}`' for k in tuned)} (by mean "
            f"{COMPARE_METRICS[report.metric]}), "
            f"and the test accuracy there; `settings_tried` counts the settings with a result ({best_file(compare)}).",
            "",
            markdown(cells(best, best_columns(best))),
            "",
            *(f"**{edge}**\n" for edge in best_by_edges(report, best, compare)),
        ]
    else:
        out += [f"**{edge}**\n" for edge in best_row_edges(report)]
    trouble = problems(report)
    if trouble:
        out += ["## Jobs that need attention", "", *(f"- {line}" for line in trouble), ""]
    out += stalled_section(report, sweep_dir)
    figures = epoch_table(report)
    if figures is not None:
        spread = " ± std over seeds" if runs_compared(report)["seed"].nunique() > 1 else ""
        out += [
            "## Figures",
            "",
            "![validation accuracy and training loss per epoch, and test accuracy against each swept number]"
            "(curves.png)",
            "",
            f"Validation accuracy (%) by epoch, mean{spread}, as plotted in curves.png (whose y-axis is fitted "
            "to the last two-thirds of training):",
            "",
            markdown(figures),
            "",
        ]
    for key in swept_numbers(report):
        bars = " ± 95% CI" if report.results["runs"].max() > 1 else ""
        out += [f"Test accuracy (%) by {key}{bars} (curves.png):", "", markdown(against_table(report, key)), ""]
    out += diagnostics_section(report, sweep_dir, DIAGNOSTICS_FIGURE in drawn)
    return "\n".join(out)


def write_report(report: Report, sweep_dir: Path, command: str | None = None, drawn: set[str] | None = None) -> Path:
    """Write report.md into the sweep folder; the command defaults to the one rebuilt from multirun.yaml. `drawn`:
    the names of the figures the aggregation writes (it may still be drawing them); default: those in the folder."""
    path = Path(sweep_dir) / REPORT_FILE
    atomic_write(path, render(report, sweep_dir, command or sweep_command(sweep_dir), drawn))
    return path
