"""Aggregate a sweep folder into its tables, figures and report.md: the Hydra end-of-multirun callback and
`python -m normsweep.aggregate SWEEP_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep.jobfiles import Status, atomic_write, job_dirs
from normsweep.plots import plot_curves
from normsweep.report import write_report
from normsweep.tables import Report, best_by, best_file, collect, format_best, format_table, problems


def aggregate(sweep_dir: Path, compare: str | None = "norm") -> Report:
    """Write runs.csv, results.csv, best_by_<compare>.csv (when something besides `compare` was swept) and
    curves.png into `sweep_dir`, and return what was aggregated.

    Raises ValueError, before writing anything, if `compare` names no key of the sweep (None: no best-by table).
    """
    sweep_dir = Path(sweep_dir)
    report = collect(sweep_dir)
    report.compare = compare
    report.best = best_by(report, compare) if compare and len(report.results) else None
    atomic_write(sweep_dir / "runs.csv", report.runs.to_csv(index=False, float_format="%.6g"))
    atomic_write(sweep_dir / "results.csv", report.results.to_csv(index=False, float_format="%.6g"))
    if report.best is not None and compare:
        atomic_write(sweep_dir / best_file(compare), report.best.to_csv(index=False, float_format="%.6g"))
    if len(report.curves):
        plot_curves(report, sweep_dir / "curves.png")
    return report


def report(sweep_dir: Path, compare: str | None = "norm") -> Report:
    """Aggregate `sweep_dir` and write its report.md; print the comparison table, the best-by table when there is
    one, where the files are, and a line per job in trouble. A `compare` naming no key of the sweep raises
    ValueError before any file is written."""
    result = aggregate(sweep_dir, compare)
    best = result.best
    written = write_report(result, sweep_dir)
    where = Path(sweep_dir).resolve()
    print(format_table(result), flush=True)
    if best is not None and compare:
        print("\n" + format_best(best, compare), flush=True)
    files = ["results.csv", best_file(compare) if best is not None and compare else None, "curves.png"]
    shown = ", ".join(f for f in files if f and (where / f).is_file())
    jobs = len(result.runs)
    print(f"\nresults: {where / 'results.csv'}  ({jobs} job{'s' if jobs != 1 else ''})", flush=True)
    print(f"report:  {written.resolve()}  ({shown})", flush=True)
    lines = problems(result)
    if lines:
        print("\n" + "\n".join(lines), flush=True)
    return result


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process once every job of a multirun has ended; the sweep then exits
    with status 1 if any job failed (a diverged job is a result, not a failure)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        compare = str(config.get("compare", "norm"))
        try:
            result = report(sweep_dir, compare)
        except ValueError as err:  # the jobs check `compare` names a config key; this is the sweep's keys
            print(f"{err}; aggregated without a best-by table", file=sys.stderr, flush=True)
            result = report(sweep_dir, None)
        failed = int((result.runs["status"] == Status.FAILED).sum())
        if failed:
            print(
                f"{failed} of {len(result.runs)} jobs failed; each job's log is {sweep_dir}/JOB/normsweep.log"
                if len(result.runs) > 1
                else f"the job failed; its log is {sweep_dir / result.runs['job'].iloc[0] / 'normsweep.log'}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normsweep.aggregate",
        description="Write runs.csv, results.csv and curves.png for a normsweep sweep folder and print the table.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder, e.g. multirun/2026-11-27/10-00-00")
    parser.add_argument(
        "--compare",
        default="norm",
        help="the compared axis of best_by_<axis>.csv: each of its values at the best setting of the other swept "
        "keys (default: norm; e.g. model, optimizer)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    if not job_dirs(args.sweep_dir):
        parser.error(
            f"no normsweep jobs in {args.sweep_dir}: a sweep folder holds one folder per job, each with "
            ".hydra/overrides.yaml or summary.json (e.g. multirun/2026-11-27/10-00-00)"
        )
    try:
        report(args.sweep_dir, args.compare)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
