"""The sweep's figures: curves.png (accuracy and loss per epoch, and accuracy against batch size when swept)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from normsweep.jobfiles import atomic_write
from normsweep.tables import Report, batch_size_lines, label_of, matching, settings_text


def plot_curves(report: Report, path: Path) -> None:
    """Validation accuracy and training loss per epoch, one line per configuration (mean over seeds); when the
    batch size was swept, a third panel with test accuracy against batch size per setting of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_batch = batch_size_lines(report)
    panels = 3 if by_batch is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    ax_acc, ax_loss = axes[0], axes[1]
    label_keys = report.varying or report.keys
    curves = report.curves
    # Legend in the order of results.csv: best first.
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    for _, config in configs.iterrows():
        line = curves[matching(curves, config, report.keys)].sort_values("epoch")
        label = label_of(config, label_keys)
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
    if by_batch is not None:
        _plot_batch_sizes(axes[2], by_batch, [k for k in report.varying if k != "batch_size"], n_seeds)
    if report.fixed:
        fig.suptitle(settings_text(report.fixed), fontsize="medium")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, image.getvalue())


def _plot_batch_sizes(ax: Any, table: pd.DataFrame, others: list[str], n_seeds: int) -> None:
    groups = table.groupby(others, dropna=False, sort=False) if others else [((), table)]
    for _, line in groups:
        errors = line["test_acc_ci95"] if line["test_acc_ci95"].notna().any() else None
        label = label_of(line.iloc[0], others) if others else "test accuracy"
        ax.errorbar(
            line["batch_size"], line["test_acc_mean"], yerr=errors, marker="o", markersize=4, capsize=3, label=label
        )
    sizes = sorted(table["batch_size"].dropna().unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    bars = " ± 95% CI" if n_seeds > 1 else ""
    ax.set(xlabel="batch size", ylabel="test accuracy (%)", title=f"Test accuracy by batch size{bars}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
