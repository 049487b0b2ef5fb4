"""A sweep folder's tables, figures and report.md written, the table printed, and what the end of a sweep says
about jobs in trouble."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shlex
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from normsweep.results.plots import plot_curves, plot_diagnostics, plot_search
from normsweep.results.report import DIAGNOSTICS_FIGURE, REPORT_FILE, SEARCH_FIGURE, sweep_command, write_report
from normsweep.results.tables import (
    Report,
    best_by,
    best_file,
    collect,
    diagnostics,
    format_best,
    format_table,
    problems,
)
from normsweep.sweep.files import ATTENTION, Status, atomic_write, disk_full, job_dirs

LOG = "normsweep.log"  # each job's log, as Hydra names it (hydra.job.name + .log)


def aggregate(
    sweep_dir: Path, compare: str | None = "norm", side_by_side: bool = False, with_report: bool = False
) -> Report:
    """Write runs.csv, results.csv, best_by_<compare>.csv (when something besides `compare` was swept or searched)
    and curves.png (and diagnostics.png, when the jobs wrote diagnostics.csv; search.png, for a tuning sweep) into
    `sweep_dir`, and return what was aggregated; `with_report`, report.md too.

    Raises ValueError, before writing anything, if `compare` names no key of the sweep (None: no best-by table).
    `side_by_side` draws the last figure beside the others, at once, and writes report.md meanwhile (see _draw).
    """
    sweep_dir = Path(sweep_dir)
    report = collect(sweep_dir)
    report.compare = compare
    report.best = best_by(report, compare) if compare and len(report.results) else None
    atomic_write(sweep_dir / "runs.csv", report.runs.to_csv(index=False, float_format="%.6g"))
    atomic_write(sweep_dir / "results.csv", report.results.to_csv(index=False, float_format="%.6g"))
    if report.best is not None and compare:
        atomic_write(sweep_dir / best_file(compare), report.best.to_csv(index=False, float_format="%.6g"))
    figures = []
    if len(report.curves):
        figures.append(partial(plot_curves, report, sweep_dir / "curves.png"))
    layers = diagnostics(report, sweep_dir)
    if layers is not None:  # jobs run with diagnostics=true (older sweeps have none: no figure)
        figures.append(partial(plot_diagnostics, report, layers, sweep_dir / DIAGNOSTICS_FIGURE))
    if report.tuning is not None:
        figures.append(partial(plot_search, report, sweep_dir / SEARCH_FIGURE))
    drawn = {draw.args[-1].name for draw in figures}
    _draw(figures, side_by_side, partial(write_report, report, sweep_dir, drawn=drawn) if with_report else None)
    return report


def _draw(figures: list[Callable[[], None]], side_by_side: bool, meanwhile: Callable[[], Any] | None = None) -> None:
    """Draw the figures, then call `meanwhile`; when `side_by_side`, the last figure is drawn in a forked process
    beside this one, while this one draws the others and calls `meanwhile` (the warm aggregation process,
    single-threaded, at the end of a sweep when the cores are free: each figure is about half a second). A figure
    that fails there fails the aggregation too; its traceback is printed by it."""
    if not (side_by_side and (len(figures) > 1 or (meanwhile is not None and figures)) and hasattr(os, "fork")):
        for draw in figures:
            draw()
        if meanwhile is not None:
            meanwhile()
        return
    other = multiprocessing.get_context("fork").Process(target=_draw_apart, args=(figures[-1],), daemon=True)
    other.start()
    try:
        for draw in figures[:-1]:
            draw()
        if meanwhile is not None:
            meanwhile()
    finally:
        other.join()
    path = figures[-1].args[-1]
    if other.exitcode in (errno.ENOSPC, errno.EDQUOT):  # a full disk, said here as the other writes say it
        raise OSError(other.exitcode, os.strerror(other.exitcode), str(path))
    if other.exitcode:
        raise RuntimeError(f"drawing {path} failed (exit status {other.exitcode})")


def _draw_apart(draw: Callable[[], None]) -> None:
    """A figure drawn in the forked process: a full disk ends it with the error's number as its exit status."""
    try:
        draw()
    except OSError as err:
        if not disk_full(err):
            raise
        os._exit(err.errno)


def report(sweep_dir: Path, compare: str | None = "norm", side_by_side: bool = False) -> Report:
    """Aggregate `sweep_dir` and write its report.md; print the comparison table, the best-by table when there is
    one, where the files are, and a line per job in trouble. A `compare` naming no key of the sweep raises
    ValueError before any file is written."""
    result = aggregate(sweep_dir, compare, side_by_side, with_report=True)
    best = result.best
    written = Path(sweep_dir) / REPORT_FILE
    where = Path(sweep_dir).resolve()
    print(format_table(result), flush=True)
    if best is not None and compare:
        print("\n" + format_best(best, compare, result.metric, result), flush=True)
    files = ["results.csv", best_file(compare) if best is not None and compare else None, "curves.png"]
    files += [DIAGNOSTICS_FIGURE, SEARCH_FIGURE]
    shown = ", ".join(f for f in files if f and (where / f).is_file())
    jobs = len(result.runs)
    print(f"\nresults: {where / 'results.csv'}  ({jobs} job{'s' if jobs != 1 else ''})", flush=True)
    print(f"report:  {written.resolve()}  ({shown})", flush=True)
    lines = problems(result)
    if lines:
        print("\n" + "\n".join(lines), flush=True)
    return result


def end_of_sweep(sweep_dir: Path, compare: str, side_by_side: bool = False) -> None:
    """What a multirun does once every job has ended (normsweep.sweep.callbacks.AggregateCallback): aggregate, then exit
    with status 1 if any job failed or stopped before its last epoch (a diverged or stalled job is a result, not a
    failure), after the command that resumes them. A sweep that ended before its first job (its launcher or sweeper
    failed, and said why) has nothing to compare: no tables are written, and it exits with status 1."""
    if not job_dirs(sweep_dir):
        print(f"no job ran in {sweep_dir}: nothing to aggregate", file=sys.stderr, flush=True)
        sys.exit(1)
    try:
        result = report(sweep_dir, compare, side_by_side)
    except ValueError as err:  # the jobs check `compare` names a config key; this is the sweep's keys
        print(f"{err}; aggregated without a best-by table", file=sys.stderr, flush=True)
        result = report(sweep_dir, None, side_by_side)
    statuses = result.runs["status"]
    unfinished = int(statuses.isin(ATTENTION).sum())
    if not unfinished:
        return
    print(trouble_line(statuses, sweep_dir, result.runs["job"].iloc[0]), file=sys.stderr, flush=True)
    command = resume_command(sweep_dir)
    if command:
        print(f"to resume the jobs that did not complete (the others are kept): {command}", flush=True)
    sys.exit(1)


def trouble_line(statuses: pd.Series, sweep_dir: Path, first_job: str) -> str:
    """`1 of 3 jobs failed, 1 incomplete; each job's log is ...`: how many jobs need another run, and where to look."""
    counts = statuses[statuses.isin(ATTENTION)].value_counts()
    failed = int(counts.get(Status.FAILED, 0))
    others = ", ".join(f"{n} {status}" for status, n in counts.items() if status != Status.FAILED)
    if len(statuses) == 1:
        return f"the job {'failed' if failed else 'did not complete'}; its log is {sweep_dir / first_job / LOG}"
    total = int(counts.sum())
    what = f"{failed} of {len(statuses)} jobs failed" + (f", {others}" if others else "")
    if not failed:
        what = f"{total} of {len(statuses)} jobs did not complete ({others})"
    return f"{what}; each job's log is {sweep_dir}/JOB/{LOG}"


def resume_command(sweep_dir: Path) -> str | None:
    """The sweep's own command line with its folder named (absolute), which resumes it; None without multirun.yaml."""
    command = sweep_command(sweep_dir)
    if command is None:
        return None
    args = [arg for arg in shlex.split(command) if not arg.startswith("hydra.sweep.dir=")]
    return shlex.join([*args, f"hydra.sweep.dir={Path(sweep_dir).resolve()}"])
