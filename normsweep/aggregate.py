"""`python -m normsweep.aggregate SWEEP_DIR`: aggregate a sweep folder again (normsweep/results/write.py), and with
`--mlflow URI` export it to MLflow (normsweep/trackers/mlflow.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from normsweep.results.write import report
from normsweep.sweep.files import DiskFull, disk_full, job_dirs
from normsweep.trackers import missing


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
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each job's TensorBoard run from its files (<job>/tensorboard/, replaced if there): for a "
        "sweep that ran without logger=tensorboard; then `tensorboard --logdir SWEEP_DIR`",
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="also export the sweep to MLflow at this tracking URI (sqlite:///FILE.db, http://HOST:PORT): a parent "
        "run with a child run per job; runs exported before are found again, not duplicated "
        "(pip install 'normsweep[mlflow]')",
    )
    parser.add_argument(
        "--mlflow-experiment", default="normsweep", metavar="NAME", help="the MLflow experiment (default: normsweep)"
    )
    args = parser.parse_args(argv)
    for option, name in (("--tensorboard", args.tensorboard and "tensorboard"), ("--mlflow", args.mlflow and "mlflow")):
        if name and (lacking := missing(name)):
            parser.error(f"{option} {lacking}")
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    if not job_dirs(args.sweep_dir):
        parser.error(
            f"no normsweep jobs in {args.sweep_dir}: a sweep folder holds one folder per job, each with "
            ".hydra/overrides.yaml or summary.json (e.g. multirun/2026-11-27/10-00-00)"
        )
    try:
        if args.tensorboard:
            _export_tensorboard(args.sweep_dir)
        report(args.sweep_dir, args.compare)
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        if not disk_full(err):
            raise
        where = f"writing {err.filename}" if err.filename else f"in {args.sweep_dir}"
        print(f"{os.strerror(err.errno)} ({where}); once there is space, run this command again", file=sys.stderr)
        return DiskFull.status
    if args.mlflow:
        from normsweep.trackers.mlflow import export_sweep

        try:
            print(f"\nmlflow: {export_sweep(args.mlflow, args.sweep_dir, args.mlflow_experiment)}", flush=True)
        except Exception as err:  # the tracking server, its database, the URI: said in one line
            print(f"mlflow: {type(err).__name__}: {str(err).strip().splitlines()[0]} ({args.mlflow})", file=sys.stderr)
            return 1
    return 0


def _export_tensorboard(sweep_dir: Path) -> None:
    from normsweep.trackers.tensorboard import FOLDER, export_sweep  # the library only for this option

    written = export_sweep(sweep_dir)
    print(
        f"tensorboard: a run for each of {len(written)} job folders written (<job>/{FOLDER}/); "
        f"view them with: tensorboard --logdir {sweep_dir}"
    )


if __name__ == "__main__":
    sys.exit(main())
