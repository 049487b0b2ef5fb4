"""Tuning against the grid, in one session: experiment=lr_range (5 norms x 9 learning rates) and experiment=tune
(5 norms x n_trials, pruned) on the same setup, then each norm's best setting and its test accuracy from each, the
epochs each spent (the sum of runs.csv's epochs_completed) and its wall time (docs/tuning.md).

    python scripts/tune_vs_grid.py                                   # on digits
    python scripts/tune_vs_grid.py dataset=fashion_mnist dataset.download=false dataset.root=/tmp/fmnist epochs=3
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def sweep(preset: str, extra: list[str], folder: Path) -> tuple[pd.DataFrame, float]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "normsweep", "-m", f"experiment={preset}", *extra, f"hydra.sweep.dir={folder}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"{preset} failed:\n{done.stderr[-2000:]}")
    return pd.read_csv(folder / "runs.csv"), wall


def best_per_norm(runs: pd.DataFrame) -> pd.DataFrame:
    """Each norm's run with the best final val_acc among those that trained every epoch (not pruned)."""
    done = runs[runs["status"].isin(["completed", "stalled", "diverged"])]
    best = done.loc[done.groupby("norm")["val_acc"].idxmax()]
    return best.set_index("norm")[["optimizer.lr", "val_acc", "test_acc"]]


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        grid, grid_wall = sweep("lr_range", extra, Path(tmp) / "grid")
        tune, tune_wall = sweep("tune", extra, Path(tmp) / "tune")
    grid_best, tune_best = best_per_norm(grid), best_per_norm(tune)
    table = grid_best.join(tune_best, lsuffix="_grid", rsuffix="_tune")
    table["test_gap"] = table["test_acc_tune"] - table["test_acc_grid"]
    print(table.sort_values("val_acc_grid", ascending=False).round(4).to_string())
    rank = [list(t.sort_values(["val_acc", "test_acc"], ascending=False).index) for t in (grid_best, tune_best)]
    print(f"ranking by val_acc: grid {' > '.join(rank[0])}; tune {' > '.join(rank[1])}")
    epochs = int(grid["epochs_completed"].sum()), int(tune["epochs_completed"].sum())
    pruned = int((tune["status"] == "pruned").sum())
    print(
        f"epochs: grid {epochs[0]} ({len(grid)} jobs), tune {epochs[1]} ({len(tune)} trials, {pruned} pruned): "
        f"{epochs[1] / epochs[0]:.2f} of the grid's; wall: grid {grid_wall:.0f} s, tune {tune_wall:.0f} s "
        f"({tune_wall / grid_wall:.2f})"
    )


if __name__ == "__main__":
    main()
