"""Whole-command timings of normsweep on a quiet machine and beside busy processes, side by side in one run.

    python scripts/measure_load.py                      # every case, 3 repeats, quiet and with 1 busy process
    python scripts/measure_load.py --cases sweep,mlp --repeats 5 --busy 1

Each case runs a normsweep command in a fresh process (as a user types it) in a few variants (threads=0, the
default; threads=1; threads=2, every CPU, the default before 0.3), alternated, quiet and then beside `--busy`
processes that spin on a CPU each (a browser tab, another sweep). It prints the median wall time of each variant,
its ratio to threads=1 under the same load and to its own quiet time, and for the sweeps the ratio of wall time to
the sum of the jobs' epoch_seconds (what is not training: start-up, data, aggregation). Writes nothing else.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["-m", "norm=none,bn,ln,in,gn"]
CASES = {
    "help": (["--help"], False),
    "sweep": (SWEEP, True),
    "mlp": (["model=mlp", "norm=ln", "batch_size=32", "epochs=3"], False),
    "joblib": ([*SWEEP, "hydra/launcher=joblib"], True),
}
VARIANTS = {"threads=0": [], "threads=1": ["threads=1"], "threads=2": ["threads=2"]}


def spin() -> None:
    while True:
        pass


def run(args: list[str], folder: Path) -> tuple[float, float]:
    """Wall seconds of `python -m normsweep ARGS` into `folder`, and the sum of its jobs' epoch_seconds."""
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "normsweep", *args, f"{where}={folder}"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    epochs = 0.0
    for metrics in folder.rglob("metrics.csv"):
        with metrics.open() as f:
            epochs += sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))
    return wall, epochs


def measure(cases: list[str], repeats: int, busy: int) -> list[dict[str, object]]:
    rows = []
    for load in (0, busy) if busy else (0,):
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(load)]
        for p in spinners:
            p.start()
        time.sleep(0.5 if load else 0)
        try:
            for case in cases:
                args, _ = CASES[case]
                variants = {"threads=0": []} if case == "help" else VARIANTS
                times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
                for _ in range(repeats):
                    for variant, extra in variants.items():  # alternated, so drift hits every variant alike
                        with tempfile.TemporaryDirectory() as tmp:
                            times[variant].append(run([*args, *extra], Path(tmp) / "run"))
                for variant, samples in times.items():
                    rows.append(
                        {
                            "case": case,
                            "variant": variant,
                            "busy": load,
                            "wall_s": statistics.median(s[0] for s in samples),
                            "epochs_s": statistics.median(s[1] for s in samples),
                        }
                    )
                    print(f"  {case:7s} {variant:10s} busy={load}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr)
        finally:
            for p in spinners:
                p.terminate()
    return rows


def table(rows: list[dict[str, object]]) -> str:
    index = {(r["case"], r["variant"], r["busy"]): r for r in rows}
    lines = [
        "| case | variant | busy | wall (median) | / threads=1, same load | / own quiet | wall / epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = index.get((r["case"], "threads=1", r["busy"]))
        quiet = index.get((r["case"], r["variant"], 0))
        ratio_one = f"{r['wall_s'] / one['wall_s']:.2f}x" if one and r["variant"] != "threads=1" else ""
        ratio_quiet = f"{r['wall_s'] / quiet['wall_s']:.2f}x" if quiet and r["busy"] else ""
        per_epoch = f"{r['wall_s'] / r['epochs_s']:.2f}x" if r["epochs_s"] else ""
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['busy']} | {r['wall_s']:.2f} s | {ratio_one} | {ratio_quiet} "
            f"| {per_epoch} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="busy processes in the loaded runs (0: quiet only)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(CASES)}")
    print(f"{os.cpu_count()} CPUs; {args.repeats} repeats; busy={args.busy}", file=sys.stderr)
    print(table(measure(cases, args.repeats, args.busy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
