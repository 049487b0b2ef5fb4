"""Tuning against the grid, in one session: experiment=lr_range (5 norms x 9 learning rates) and experiment=tune
(5 norms x n_trials, pruned) on the same setup, then each norm's best setting and its test accuracy from each, the
epochs each spent (the sum of runs.csv's epochs_completed) and its wall time (docs/tuning.md).

    python scripts/tune_vs_grid.py                                   # on digits
    python scripts/tune_vs_grid.py --confirm 3 --keep /tmp/fm dataset=fashion_mnist dataset.root=/tmp/fmnist epochs=2

--confirm N: the tuning sweep then confirms each norm's best setting with N fresh seeds (its table is printed; its
epochs are counted apart from the search's). --keep DIR: the two sweep folders are kept in DIR (grid/, tune/).
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
    """Each norm's run with the best final val_acc among those that trained every epoch (not pruned), searched."""
    done = runs[runs["status"].isin(["completed", "stalled", "diverged"])]
    if "phase" in done:
        done = done[done["phase"] == "search"]
    best = done.loc[done.groupby("norm")["val_acc"].idxmax()]
    return best.set_index("norm")[["optimizer.lr", "val_acc", "test_acc"]]


def main() -> None:
    args = sys.argv[1:]
    confirm, keep = 0, None
    while args and args[0] in ("--confirm", "--keep"):
        option, value, args = args[0], args[1], args[2:]
        confirm, keep = (int(value), keep) if option == "--confirm" else (confirm, value)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp)
        grid, grid_wall = sweep("lr_range", args, root / "grid")
        tuned = [*args, f"hydra.sweeper.confirm_seeds={confirm}"] if confirm else args
        tune, tune_wall = sweep("tune", tuned, root / "tune")
        confirmed = pd.read_csv(root / "tune" / "results.csv") if confirm else None
    grid_best, tune_best = best_per_norm(grid), best_per_norm(tune)
    table = grid_best.add_suffix("_grid").join(tune_best.add_suffix("_tune"))
    table["test_gap"] = table["test_acc_tune"] - table["test_acc_grid"]
    print(table.sort_values("val_acc_grid", ascending=False).round(4).to_string())
    rank = [list(t.sort_values(["val_acc", "test_acc"], ascending=False).index) for t in (grid_best, tune_best)]
    print(f"ranking by val_acc: grid {' > '.join(rank[0])}; tune {' > '.join(rank[1])}")
    search = tune[tune["phase"] == "search"] if "phase" in tune else tune
    epochs = int(grid["epochs_completed"].sum()), int(search["epochs_completed"].sum())
    pruned = int((search["status"] == "pruned").sum())
    print(
        f"epochs: grid {epochs[0]} ({len(grid)} jobs), tune {epochs[1]} ({len(search)} trials, {pruned} pruned): "
        f"{epochs[1] / epochs[0]:.2f} of the grid's; wall: grid {grid_wall:.0f} s, tune {tune_wall:.0f} s "
        f"({tune_wall / grid_wall:.2f}{', with its confirmation' if confirm else ''})"
    )
    if confirmed is not None:
        extra = int(tune["epochs_completed"].sum()) - epochs[1]
        print(f"confirmation: {extra} epochs; results.csv of the tuning sweep:")
        columns = ["norm", "optimizer.lr", "runs", "val_acc_mean", "test_acc_mean", "test_acc_std"]
        columns += ["gap_to_best", "p_vs_best", "test", "within_noise"]
        print(confirmed[[c for c in columns if c in confirmed]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
