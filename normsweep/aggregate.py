"""Aggregate a sweep folder: the Hydra end-of-multirun callback and `python -m normsweep.aggregate SWEEP_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep.results import Report, aggregate, format_table, job_dirs, problems


def report(sweep_dir: Path) -> Report:
    """Aggregate `sweep_dir`; print the comparison table, where results.csv is, and a line per job in trouble."""
    result = aggregate(sweep_dir)
    print(format_table(result), flush=True)
    print(f"\nresults: {Path(sweep_dir).resolve() / 'results.csv'}  ({len(result.runs)} jobs)", flush=True)
    lines = problems(result)
    if lines:
        print("\n" + "\n".join(lines), flush=True)
    return result


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process once every job of a multirun has ended; the sweep then exits
    with status 1 if any job failed (a diverged job is a result, not a failure)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        result = report(sweep_dir)
        failed = int((result.runs["status"] == "failed").sum())
        if failed:
            print(
                f"{failed} of {len(result.runs)} jobs failed; each job's log is {sweep_dir}/JOB/normsweep.log",
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
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    if not job_dirs(args.sweep_dir):
        parser.error(
            f"no normsweep jobs in {args.sweep_dir}: a sweep folder holds one folder per job, each with "
            ".hydra/overrides.yaml or summary.json (e.g. multirun/2026-11-27/10-00-00)"
        )
    report(args.sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
