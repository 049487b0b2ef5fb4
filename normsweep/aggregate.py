"""Aggregate a sweep folder: the Hydra end-of-multirun callback and `python -m normsweep.aggregate SWEEP_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep.results import aggregate, format_table, job_dirs


def report(sweep_dir: Path) -> None:
    """Aggregate `sweep_dir` and print the comparison table with the path of results.csv."""
    result = aggregate(sweep_dir)
    print(format_table(result), flush=True)
    print(f"\nresults: {Path(sweep_dir).resolve() / 'results.csv'}  ({len(result.runs)} jobs)", flush=True)


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process once every job of a multirun has ended."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report(Path(config.hydra.sweep.dir))


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
