"""The sweep's figures: curves.png (accuracy and loss per epoch, mean ± std over seeds, and test accuracy against
every swept numeric key), diagnostics.png (each norm layer), and a tuning sweep's search.png (each trial against
the values it tried), each norm in the same colour in every figure."""

from __future__ import annotations

import io
import math
import textwrap
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normsweep.results.tables import (
    Report,
    is_data_key,
    label_of,
    lines_against,
    matching,
    row_keys,
    row_names,
    runs_compared,
    setting,
    settings_text,
    swept_numbers,
)
from normsweep.sweep.files import FINISHED, SEARCH, atomic_write

# tab10, one colour per built-in norm: a norm reads the same in every figure of every sweep.
NORM_COLOURS = {
    "bn": "#1f77b4",
    "ln": "#ff7f0e",
    "in": "#2ca02c",
    "gn": "#d62728",
    "none": "#7f7f7f",
    "ln2d": "#9467bd",
    "rms": "#8c564b",
    "ws_gn": "#e377c2",
    "frn": "#bcbd22",
}
# For a user's own norms: tab10's last colour, then darker ones of tab20b/c, none of them a built-in norm's.
OTHER_COLOURS = (
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#9c9ede",
)
DEFAULT_COLOUR = "#1f77b4"
LINE_STYLES = ("-", "--", ":", "-.")  # a second swept key with up to this many values may be line styles...
MAX_LINES = 6  # ...when a panel then holds at most this many lines; otherwise it gets a panel per value
PANEL_COLUMNS = 5  # epoch panels per row when a swept key is drawn as separate panels
MAX_EPOCH_PANELS = 15  # more settings than this: the epoch panels of this many, evenly spread (report.md has all)
NUMBER_SPAN = 3  # columns a numeric key's panel spans above a grid of epoch panels
FAR_BELOW = 20.0  # a curve ending this many points under its panel's best is left below the y-axis, and named
DODGE = 0.02  # points of different lines at one x are moved apart by this share of the x-range, so bars show
NOTE_WIDTH = 44  # characters per line of a note inside a panel


def palette(names: Iterable[Any]) -> dict[str, str]:
    """The colour of each norm name: a built-in norm has its fixed one; another name gets a colour chosen from its
    text (crc32: the same in every process), or the next free one if another name of `names` took it. Called with
    all the norms of a sweep, it gives every figure of the sweep the same colours."""
    names = {str(n) for n in names}
    colours = {n: NORM_COLOURS[n] for n in names if n in NORM_COLOURS}
    for name in sorted(names - set(colours)):
        start = zlib.crc32(name.encode()) % len(OTHER_COLOURS)
        turn = OTHER_COLOURS[start:] + OTHER_COLOURS[:start]
        colours[name] = next((c for c in turn if c not in colours.values()), turn[0])
    return colours


@dataclass
class Encoding:
    """How the swept keys are drawn: `colour` (the norm when it is swept), `style` (another key with few values)
    and `panels` (the remaining keys: one panel per combination of their values)."""

    colour: str | None = None
    style: str | None = None
    panels: list[str] = field(default_factory=list)
    colours: dict[str, str] = field(default_factory=dict)  # str(value of `colour`) → colour
    styles: dict[str, str] = field(default_factory=dict)  # str(value of `style`) → line style
    legend: list[tuple[str, str, str]] = field(default_factory=list)  # (label, colour, line style)

    def colour_of(self, row: pd.Series) -> str:
        # a job without the key (a folder from another sweep) is drawn plainly instead of failing the figure
        return self.colours.get(str(row[self.colour]), DEFAULT_COLOUR) if self.colour in row.index else DEFAULT_COLOUR

    def style_of(self, row: pd.Series) -> str:
        return self.styles.get(str(row[self.style]), "-") if self.style in row.index else "-"


def encoding(report: Report) -> Encoding:
    """Colour by norm (else by the first swept key), line style for the other swept key with the fewest values
    when the panel stays readable (at most four styles, six lines), panels for the rest and for data sets."""
    import matplotlib

    results, varying = report.results, row_keys(report)
    if not varying:
        return Encoding()
    colour = "norm" if "norm" in varying else varying[0]
    # Data sets always get panels of their own: their accuracies are on different scales and never compared.
    others = sorted((k for k in varying if k != colour and not is_data_key(k)), key=lambda k: results[k].nunique())
    styles = results[others[0]].nunique() if others else 0
    few = styles <= len(LINE_STYLES) and styles * results[colour].nunique() <= MAX_LINES
    style = others[0] if others and few else None
    code = Encoding(colour, style, [k for k in varying if k not in (colour, style)])
    in_order = list(dict.fromkeys(results[colour].tolist()))  # best row first, as results.csv
    if colour != "norm" and results[colour].dtype.kind in "iuf":  # an ordered key gets an ordered colour map
        ordered = sorted(in_order)
        shade = matplotlib.colormaps["viridis"]
        code.colours = {
            str(v): matplotlib.colors.to_hex(shade(0.9 * ordered.index(v) / max(1, len(ordered) - 1))) for v in in_order
        }
    else:
        code.colours = palette(in_order)
    labels = [str(v) if colour == "norm" else setting(colour, v) for v in in_order]
    code.legend = [(label, code.colours[str(v)], "-") for label, v in zip(labels, in_order)]
    if style is not None:
        values = sorted(results[style].dropna().unique())
        code.styles = {str(v): LINE_STYLES[i] for i, v in enumerate(values)}
        code.legend += [(setting(style, v), "#333333", code.styles[str(v)]) for v in values]
    return code


def plot_curves(report: Report, path: Path) -> None:
    """Validation accuracy and training loss per epoch, mean ± std over seeds, one line per configuration (colour:
    the norm; line style or separate panels: the other swept keys), and for every swept numeric key a panel of
    test accuracy against it, one line per norm with 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    code = encoding(report)
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    panels = configs[code.panels].drop_duplicates() if code.panels else pd.DataFrame(index=[0])
    panels = panels.sort_values(code.panels, kind="stable") if code.panels else panels  # lr=1e-4 before 1e-3
    shown = _spread(panels, MAX_EPOCH_PANELS)
    numbers = swept_numbers(report)
    if len(panels) == 1:
        fig, acc_axes, loss_axes, number_axes = _one_row(plt, len(numbers))
    else:
        fig, acc_axes, loss_axes, number_axes = _grid(plt, len(shown), len(numbers))
    for (_, panel), ax_acc, ax_loss in zip(shown.iterrows(), acc_axes, loss_axes):
        subset = configs[matching(configs, panel, code.panels)] if code.panels else configs
        _plot_epochs(ax_acc, ax_loss, report, subset, code)
        if len(panels) == 1:
            where = f" ({label_of(panel, code.panels)})" if code.panels else ""
            ax_acc.set_title(f"Validation accuracy{where}", fontsize="medium")
            ax_loss.set_title(f"Training loss{where}", fontsize="medium")
        else:  # a grid: the setting as the title, the quantity once per row (left), the epoch axis under the loss
            ax_acc.set_title(_short_label(panel, code.panels), fontsize="medium")
            ax_acc.set_xlabel("")
            if not ax_acc.get_subplotspec().is_first_col():
                ax_acc.set_ylabel("")
                ax_loss.set_ylabel("")
    n_seeds = runs_compared(report)["seed"].nunique()
    for key, ax in zip(numbers, number_axes):
        _plot_against(ax, lines_against(report, key), key, code, n_seeds)
    if code.legend:
        handles = [Line2D([], [], color=c, ls=s, lw=2.2, label=label) for label, c, s in code.legend]
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 9), fontsize="small", frameon=False
        )
    title = [settings_text(report.fixed)] if report.fixed else []
    if n_seeds > 1:
        title.append(f"curves: mean ± std (band) over {n_seeds} seeds")
    if len(shown) < len(panels):
        title.append(
            f"epoch curves of {len(shown)} of the {len(panels)} settings of {', '.join(code.panels)}, evenly spread "
            "(report.md lists them all)"
        )
    if title:
        _suptitle(fig, title)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, image.getvalue())


def _suptitle(fig: Any, lines: list[str]) -> Any:
    """The figure's title, each line wrapped to the figure's width (a long "same in every run" list was cut off at
    both edges): about 12 characters of the medium font per inch. Returns it (a Text)."""
    width = max(40, int(fig.get_figwidth() * 12))
    return fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize="medium")


def _one_row(plt: Any, numbers: int) -> tuple[Any, list[Any], list[Any], list[Any]]:
    """One setting of the panel keys: accuracy, loss, then a panel per numeric key, side by side."""
    width = 4.8 if numbers <= 2 else 4.2  # inches per panel
    fig = plt.figure(figsize=(width * (2 + numbers), 0.8 * width + 1.0), layout="constrained")
    grid = fig.add_gridspec(1, 2 + numbers)
    axes = [fig.add_subplot(grid[0, i]) for i in range(2 + numbers)]
    return fig, axes[:1], axes[1:2], axes[2:]


def _grid(plt: Any, panels: int, numbers: int) -> tuple[Any, list[Any], list[Any], list[Any]]:
    """Several settings of the panel keys: the numeric keys' panels on top, the sweep's main view (test accuracy
    against the learning rate, say), each over several columns; under them, rows of accuracy panels, each above
    the loss panel of the same setting, every epoch panel on the same epoch axis."""
    columns = min(panels, PANEL_COLUMNS)
    span = min(columns, NUMBER_SPAN, max(2, columns // max(1, numbers)))  # two numeric keys side by side in 5 columns
    per_row = max(1, columns // span)
    number_rows, pairs = math.ceil(numbers / per_row), math.ceil(panels / columns)
    ratios = [1.3] * number_rows + [1.0] * (2 * pairs)
    width = 4.6 if columns <= 3 else 3.7  # inches per column
    fig = plt.figure(figsize=(width * columns, 0.7 * width * sum(ratios) + 1.2), layout="constrained")
    grid = fig.add_gridspec(len(ratios), columns, height_ratios=ratios)
    start = (columns - per_row * span) // 2  # centred
    number_axes = [
        fig.add_subplot(grid[i // per_row, start + (i % per_row) * span : start + (i % per_row + 1) * span])
        for i in range(numbers)
    ]
    places = [(number_rows + 2 * (i // columns), i % columns) for i in range(panels)]
    acc_axes = [fig.add_subplot(grid[row, column]) for row, column in places]
    loss_axes = [fig.add_subplot(grid[row + 1, column]) for row, column in places]
    return fig, acc_axes, loss_axes, number_axes


def _spread(panels: pd.DataFrame, most: int) -> pd.DataFrame:
    """`panels`, or `most` of them evenly spread over their order (the first and the last among them)."""
    if len(panels) <= most:
        return panels
    return panels.iloc[np.unique(np.linspace(0, len(panels) - 1, most).round().astype(int))]


def _short_label(panel: pd.Series, keys: list[str]) -> str:
    """A grid panel's title: its setting with each key's last part (`lr=0.001`), unless two keys would then read
    the same; the full names are under the numeric keys' panels and in report.md."""
    names = [key.rsplit(".", 1)[-1] for key in keys]
    if len(set(names)) < len(names):
        names = list(keys)
    return ", ".join(setting(name, panel[key]) for name, key in zip(names, keys))


def _plot_epochs(ax_acc: Any, ax_loss: Any, report: Report, configs: pd.DataFrame, code: Encoding) -> None:
    """One panel pair: validation accuracy and training loss per epoch of `configs`, mean ± std bands, y-limits
    from the data (accuracy over the last two-thirds of training), x over every epoch of the sweep (a run that
    stopped in epoch 1 shows where it stopped)."""
    from matplotlib.ticker import MaxNLocator

    curves = report.curves
    epochs = curves["epoch"]
    late_from = epochs.min() + (epochs.max() - epochs.min()) / 3
    margin = max(0.3, 0.02 * (epochs.max() - epochs.min()))
    drawn = []
    for _, config in configs.iterrows():
        line = curves[matching(curves, config, report.keys)].sort_values("epoch")
        if not len(line):
            continue
        style = {"color": code.colour_of(config), "ls": code.style_of(config), "lw": 1.8}
        marker = {"marker": "o", "markersize": 2.5} if len(line) <= 20 else {}
        for ax, metric in ((ax_acc, "val_acc"), (ax_loss, "train_loss")):
            mean, std = line[f"{metric}_mean"], line[f"{metric}_std"].fillna(0)
            ax.plot(line["epoch"], mean, **style, **marker)
            ax.fill_between(line["epoch"], mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)
        drawn.append((config, line))
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(epochs.min() - margin, epochs.max() + margin)
        ax.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_loss.set_ylabel("training loss")
    if drawn:
        named = [key for key in row_keys(report) if key not in code.panels]  # the panel's title says the rest
        _accuracy_limits(ax_acc, drawn, late_from, named)
        _loss_limits(ax_loss, [line for _, line in drawn])


def _accuracy_limits(ax: Any, drawn: list[tuple[pd.Series, pd.DataFrame]], late_from: float, keys: list[str]) -> None:
    """y from the mean ± std of the last two-thirds of training; a curve that ends far below the best (a run at
    chance, say) is left under the axis and named in the panel, so the curves that compete stay readable."""
    finals = {
        i: line["val_acc_mean"].dropna().iloc[-1]
        for i, (_, line) in enumerate(drawn)
        if line["val_acc_mean"].notna().any()
    }
    if not finals:
        return
    top = max(finals.values())
    kept = [i for i, final in finals.items() if final >= top - FAR_BELOW]
    late = pd.concat([drawn[i][1][drawn[i][1]["epoch"] >= late_from] for i in kept])
    spread = late["val_acc_std"].fillna(0)
    lo, hi = (late["val_acc_mean"] - spread).min(), (late["val_acc_mean"] + spread).max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return
    pad = max(0.08 * (hi - lo), 0.25)
    ax.set_ylim(max(lo - pad, 0), min(hi + pad, 100 + pad / 2))
    _no_ticks_over_100(ax)
    below = [i for i in finals if i not in kept]
    if below:
        names = [f"{label_of(drawn[i][0], keys)} ({finals[i]:.1f}%)" for i in below]
        note = ax.text(
            0.02,
            0.03,
            textwrap.fill("below the axis: " + ", ".join(names), NOTE_WIDTH),
            transform=ax.transAxes,
            fontsize="x-small",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
        note.set_in_layout(False)  # a long note must not narrow its panel


def _no_ticks_over_100(ax: Any) -> None:
    """An accuracy axis leaves room above 100% for the line at 100, but labels no tick there."""
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}" if value <= 100 else ""))


def _loss_limits(ax: Any, lines: list[pd.DataFrame]) -> None:
    """Log scale when the losses span more than 10x; a loss above the highest first-epoch loss (a run blowing
    up) is left above the axis."""
    from matplotlib.ticker import FuncFormatter

    means = pd.concat([line["train_loss_mean"] for line in lines])
    means = means[np.isfinite(means) & (means > 0)]
    starts = [line["train_loss_mean"].iloc[0] for line in lines]
    starts = [start for start in starts if np.isfinite(start)]
    if not len(means):
        return
    lo, hi = means.min(), min(means.max(), max(starts, default=means.max()))
    hi = max(hi, lo * 1.01)
    if hi / lo > 10:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.3, hi * 1.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.3, not 3 × 10⁻¹
        if hi / lo < 100:  # within two decades, label the 2s and 5s between them too
            ax.yaxis.set_minor_formatter(FuncFormatter(_twos_and_fives))
    else:
        pad = max(0.05 * (hi - lo), 1e-3)
        ax.set_ylim(max(lo - pad, 0), hi + pad)


def _twos_and_fives(value: float, _: Any) -> str:
    leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(leading) in (2, 5) else ""


def _plot_against(ax: Any, table: pd.DataFrame, key: str, code: Encoding, n_seeds: int) -> None:
    """Test accuracy against the swept numeric `key`, one line per setting of the other swept keys (coloured by
    norm) with 95% CI bars; log x when the values span more than 10x."""
    others = [c for c in table.columns if c not in (key, "test_acc_mean", "test_acc_ci95", "test_acc_std", "runs")]
    groups = list(table.groupby(others, dropna=False, sort=False)) if others else [((), table)]
    values = sorted(float(v) for v in table[key].dropna().unique())
    logarithmic = values[0] > 0 and values[-1] / values[0] > 10
    for i, (_, line) in enumerate(groups):
        first = line.iloc[0]
        shift = (i - (len(groups) - 1) / 2) * DODGE
        x = line[key].astype(float)
        x = x * (values[-1] / values[0]) ** shift if logarithmic else x + shift * (values[-1] - values[0])
        bars = line["test_acc_ci95"] if line["test_acc_ci95"].notna().any() else None
        colour = code.colour_of(first) if code.colour != key else DEFAULT_COLOUR
        style = code.style_of(first) if code.style != key else "-"
        ax.errorbar(x, line["test_acc_mean"], yerr=bars, color=colour, ls=style, marker="o", ms=4, capsize=3, lw=1.6)
    if logarithmic:
        powers_of_two = all(v.is_integer() and int(v) & (int(v) - 1) == 0 for v in values)
        ax.set_xscale("log", base=2 if powers_of_two else 10)
    if len(values) <= 12:
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
    means = table["test_acc_mean"]
    half = table["test_acc_ci95"].fillna(0)
    if means.notna().any():
        lo, hi = max((means - half).min(), 0), min((means + half).max(), 100)
        pad = max(0.08 * (hi - lo), 0.25)
        ax.set_ylim(lo - pad, hi + pad)
        _no_ticks_over_100(ax)
    bars_note = " ± 95% CI" if n_seeds > 1 else ""
    scale = " (log scale)" if logarithmic else ""
    ax.set(xlabel=f"{key}{scale}", ylabel="test accuracy (%)")
    ax.set_title(f"Test accuracy by {key}{bars_note}", fontsize="medium")
    ax.grid(alpha=0.3)


# diagnostics.png: (metric, epoch "first"/"last" or None for every epoch, panel title), in reading order.
DIAGNOSTIC_PANELS = (
    ("in_std", "first", "Input std of each norm layer, epoch {first}"),
    ("in_std", "last", "Input std of each norm layer, epoch {last}"),
    ("train_eval_gap", None, "Probe loss, train mode − eval mode"),
    ("grad_norm", "first", "Gradient norm at each norm layer, epoch {first}"),
    ("grad_norm", "last", "Gradient norm at each norm layer, epoch {last}"),
    ("update_ratio", "last", "Weight update ‖Δw‖/‖w‖ before each norm layer, epoch {last}"),
)
MAX_DEPTH_LABELS = 8  # up to this many norm layers, the depth axis names them (features.1, ...)
MAX_DIAGNOSTIC_BLOCKS = 4  # more settings of the panel keys than this: the rows of this many, evenly spread


def plot_diagnostics(report: Report, table: pd.DataFrame, path: Path) -> None:
    """diagnostics.png from tables.diagnostics: input std and gradient norm of every norm layer against depth at the
    first and last epoch, the last epoch's update ratio of the weight before each, and train_eval_gap per epoch;
    one line per configuration (mean over seeds), coloured as in curves.png. Swept keys drawn as panels there get
    a pair of rows per setting here (of at most MAX_DIAGNOSTIC_BLOCKS settings, evenly spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    code = encoding(report)
    configs = report.results[report.keys] if report.keys else pd.DataFrame(index=[0])
    blocks = configs[code.panels].drop_duplicates().sort_values(code.panels) if code.panels else pd.DataFrame(index=[0])
    shown_blocks = _spread(blocks, MAX_DIAGNOSTIC_BLOCKS)
    first, last = int(table["epoch"].min()), int(table["epoch"].max())
    epochs = {"first": first, "last": last}
    # One epoch: its first is its last, drawn once (two panels a row, not the same picture twice).
    panels = [panel for panel in DIAGNOSTIC_PANELS if first < last or panel[1] != "first"]
    columns = len(panels) // 2
    # A fixed layout (_fixed_margins), not constrained: its extra drawing pass was a third of this figure's time,
    # and this figure is the last thing a sweep waits for.
    fig, axes = plt.subplots(
        2 * len(shown_blocks), columns, figsize=(5 * columns, 7.2 * len(shown_blocks) + 0.8), squeeze=False
    )
    title_lines = 1  # of the panels' titles, wrapped to about the panel's width and the gap beside it
    for b, (_, block) in enumerate(shown_blocks.iterrows()):
        shown = configs[matching(configs, block, code.panels)] if code.panels else configs
        where = f" ({_short_label(block, code.panels)})" if code.panels else ""
        drawn: dict[str, list[Any]] = {}
        of_config = [(config, table[matching(table, config, report.keys)]) for _, config in shown.iterrows()]
        for i, (metric, when, title) in enumerate(panels):
            ax = axes[2 * b + i // columns, i % columns]
            drawn.setdefault(metric, []).append(ax)
            for config, rows in of_config:
                rows = rows[rows["metric"] == metric]
                rows = rows[rows["epoch"] == epochs[when]] if when else rows
                x = "depth" if when else "epoch"
                rows = rows.groupby(x)["value"].mean().sort_index()
                style = {"color": code.colour_of(config), "ls": code.style_of(config), "lw": 1.8}
                ax.plot(rows.index, rows.values, marker="o", markersize=3.5, **style)
            text = textwrap.fill(title.format(first=first, last=last) + where, TITLE_CHARS)
            title_lines = max(title_lines, text.count("\n") + 1)
            ax.set_title(text, fontsize="medium", y=1.0)  # a fixed place: no search for ticks above the panel
            ax.grid(alpha=0.3)
            ax.margins(x=0.06)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if when:
                _depth_axis(ax, table)
            else:
                ax.axhline(0, color="#333333", lw=0.8)
                ax.set(xlabel="epoch", ylabel="loss difference")
        for metric in ("in_std", "grad_norm"):
            _share_y(drawn[metric], table[table["metric"] == metric]["value"])
        drawn["in_std"][0].set_ylabel("std of the layer's input")
        drawn["grad_norm"][0].set_ylabel("‖∂loss/∂input‖ (0: no gradient)")
        drawn["update_ratio"][0].set_ylabel("‖Δw‖ / ‖w‖ over the epoch")
        _log_if_wide(drawn["update_ratio"][0])
    legend_rows = 0
    if code.legend:
        handles = [Line2D([], [], color=c, ls=s, lw=2.2, label=label) for label, c, s in code.legend]
        legend_rows = math.ceil(len(handles) / 9)
        fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 9), frameon=False)
    n_seeds = runs_compared(report)["seed"].nunique()
    title = [settings_text(report.fixed)] if report.fixed else []
    title.append(
        "each norm layer on a fixed probe batch of training images"
        + (f", mean over {n_seeds} seeds" if n_seeds > 1 else "")
    )
    if len(shown_blocks) < len(blocks):
        title.append(
            f"the rows of {len(shown_blocks)} of the {len(blocks)} settings of {', '.join(code.panels)}, evenly spread "
            "(report.md lists them all)"
        )
    _fixed_margins(fig, axes.shape, _suptitle(fig, title), legend_rows, title_lines)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, image.getvalue())


# diagnostics.png's margins, in inches: every panel (5 inches a column, margins included) has a title of a line or
# two above it, tick labels (the depth axis's in two lines) and an x label below, and y labels of at most about 30
# characters of the default font beside it. A title may reach into the gap beside its panel: TITLE_CHARS at about
# 12 characters of the medium font an inch.
PANEL_BOTTOM, PANEL_LEFT, PANEL_RIGHT = 0.72, 0.88, 0.2
TEXT_LINE, LEGEND_ROW = 0.2, 0.3
TITLE_CHARS = int((5 - PANEL_LEFT - PANEL_RIGHT + 0.9) * 12)


def _fixed_margins(fig: Any, shape: tuple[int, int], title: Any, legend_rows: int, title_lines: int) -> None:
    """Place a grid of panels by fixed margins around each (their titles of up to `title_lines` lines), the
    figure's `title` (a Text) above them and its legend (of `legend_rows` rows) below."""
    width, height = fig.get_size_inches()
    rows, columns = shape
    title.set(y=1 - 0.08 / height, verticalalignment="top")
    panel_top = 0.12 + TEXT_LINE * title_lines
    top = 0.12 + TEXT_LINE * (title.get_text().count("\n") + 1) + panel_top
    bottom = PANEL_BOTTOM + LEGEND_ROW * legend_rows
    gap_x, gap_y = PANEL_LEFT + PANEL_RIGHT, panel_top + PANEL_BOTTOM
    panel_w = (width - PANEL_LEFT - PANEL_RIGHT - gap_x * (columns - 1)) / columns
    panel_h = (height - top - bottom - gap_y * (rows - 1)) / rows
    fig.subplots_adjust(
        left=PANEL_LEFT / width,
        right=1 - PANEL_RIGHT / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=gap_x / panel_w,
        hspace=gap_y / panel_h,
    )


def _depth_axis(ax: Any, table: pd.DataFrame) -> None:
    """Depth on x; the layers' names under it when there are few (a sweep of one model: the same at every depth)."""
    layers = table[table["depth"] > 0].groupby("depth")["layer"].agg(lambda names: "/".join(sorted(set(names))))
    if 0 < len(layers) <= MAX_DEPTH_LABELS:
        ax.set_xticks(layers.index, [f"{d}\n{name}" for d, name in layers.items()], fontsize="small")
    ax.set_xlabel("depth (norm layer, in forward order)")


def _share_y(axes: list[Any], values: pd.Series) -> None:
    """The first and last epoch on one y-range, so they compare; log-scaled when the values span over 10x. A 0 (a
    layer no gradient reaches: a stalled run) stays in sight: at the foot of a linear axis, or of a symlog one
    (linear below the smallest value above 0)."""
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    if not len(positive):
        return
    lo, hi, zero = positive.min(), positive.max(), bool((values <= 0).any())
    for ax in axes:
        if hi / lo > 10 and zero:
            ax.set_yscale("symlog", linthresh=lo)
            ax.set_ylim(-lo / 3, hi * 1.3)
        elif hi / lo > 10:
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.3, hi * 1.3)
        else:
            pad = max(0.08 * (hi - lo), 0.02 * hi)
            ax.set_ylim(-pad if zero else max(lo - pad, 0), hi + pad)


def _log_if_wide(ax: Any) -> None:
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()]) if ax.get_lines() else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 10:
        ax.set_yscale("log")


# search.png: how each search trial ended → (marker, filled, legend label)
TRIAL_MARKERS = {
    "completed": ("o", True, "completed"),
    "ended": ("o", False, "diverged or stalled"),
    "pruned": ("x", True, "pruned (accuracy at the epoch\nit was stopped at)"),
}


def plot_search(report: Report, path: Path) -> None:
    """search.png, for a tuning sweep: a panel per searched key, each search trial's validation accuracy at the
    last epoch it trained (the best epoch's, when that is the compared metric) against the value it tried; one
    colour per study, pruned trials as crosses, diverged or stalled ones hollow, and each study's best completed
    trial (its row in best_by_<axis>.csv) as a large star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tuning = report.tuning
    assert tuning is not None, "search.png is drawn for a tuning sweep only"
    y = "best_val_acc" if report.metric == "best_val_acc" else "val_acc"
    runs = report.runs
    trials = runs[(runs["phase"] == SEARCH) & runs["status"].isin(FINISHED) & runs[y].notna()]
    studies = tuning.studies
    shown = tuning.shown_grid()
    labels = dict(zip(studies["study"], row_names(studies, shown) if shown else ["all trials"] * len(studies)))
    colours = _study_colours(report, labels)
    keys = tuning.searched
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys) + 2.6, 5.0), layout="constrained", squeeze=False)
    for key, ax in zip(keys, axes[0]):
        _plot_trials(ax, trials, key, y, colours, set(studies["job"].dropna()))
    what = "best-epoch validation accuracy" if y == "best_val_acc" else "validation accuracy, last epoch trained"
    axes[0][0].set_ylabel(f"{what} (%)")
    studies_legend = [Line2D([], [], color=colours[s], marker="o", ls="", label=labels[s]) for s in labels]
    kinds = {_kind(status) for status in trials["status"]}
    marks = [
        Line2D([], [], color="black", marker=m, ls="", mfc="black" if filled else "none", label=text)
        for kind, (m, filled, text) in TRIAL_MARKERS.items()
        if kind in kinds
    ]
    marks.append(Line2D([], [], color="#999999", marker="*", ms=12, mec="black", ls="", label="best of its study"))
    legend = {"fontsize": "small", "title_fontsize": "small", "frameon": False, "alignment": "left"}
    fig.legend(handles=studies_legend, loc="outside right center", title=", ".join(shown) or "study", **legend)
    fig.legend(handles=marks, loc="outside right lower", title="trial", **legend)
    title = [settings_text(report.fixed)] if report.fixed else []
    title.append(f"Search: {len(trials)} trials of {len(studies)} stud{'ies' if len(studies) != 1 else 'y'}")
    _suptitle(fig, title)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, image.getvalue())


def _kind(status: str) -> str:
    return status if status in ("completed", "pruned") else "ended"


def _study_colours(report: Report, labels: dict[str, str]) -> dict[str, str]:
    """Each study's colour: its norm's (or its value's of the one grid key that differs, as in curves.png), else one
    per study."""
    tuning = report.tuning
    code = encoding(report)
    if tuning is not None and tuning.shown_grid() == [code.colour]:
        return {row["study"]: code.colour_of(row) for _, row in tuning.studies.iterrows()}
    colours = palette(labels.values())
    return {study: colours[label] for study, label in labels.items()}


def _plot_trials(ax: Any, trials: pd.DataFrame, key: str, y: str, colours: dict[str, str], best: set[str]) -> None:
    """One searched key's panel of search.png: a point per trial, x its value of `key` (log when the values span
    10x or more; a position per value, each study's points side by side, for a key of names), y its `y`; the `best`
    jobs starred."""
    values = trials[key].dropna()
    if values.dtype.kind in "iuf":
        x = trials[key].astype(float)
        if len(values) and values.min() > 0 and values.max() / values.min() >= 10:
            _log_x(ax, values.max() / values.min())
    else:  # a categorical search (optimizer=adam,sgd): one position per value
        order = sorted(values.astype(str).unique())
        place = {study: i for i, study in enumerate(colours)}
        shift = trials["study"].map(lambda study: (place[study] - (len(place) - 1) / 2) * 0.6 / max(1, len(place)))
        x = trials[key].astype(str).map({v: i for i, v in enumerate(order)}) + shift
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, len(order) - 0.5)
    shown = trials.assign(_x=x, _kind=trials["status"].map(_kind))
    for (study, kind), points in shown.groupby(["study", "_kind"], sort=False):
        marker, filled, _ = TRIAL_MARKERS[kind]
        colour = colours[study]
        ax.plot(points["_x"], points[y], ls="", marker=marker, ms=6, color=colour, mfc=colour if filled else "none")
    for _, trial in shown[shown["job"].isin(best)].iterrows():
        ax.plot(trial["_x"], trial[y], marker="*", ms=16, color=colours[trial["study"]], mec="black", ls="", zorder=3)
    scale = " (log scale)" if ax.get_xscale() == "log" else ""
    ax.set(xlabel=f"{key}{scale}")
    ax.set_title(f"Validation accuracy by {key}", fontsize="medium")
    ax.grid(alpha=0.3)
    _no_ticks_over_100(ax)


def _log_x(ax: Any, span: float) -> None:
    """A log x-axis labelled as values are typed (0.001, not 10⁻³); within two decades, its 2s and 5s too."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(_twos_and_fives) if span < 100 else NullFormatter())
