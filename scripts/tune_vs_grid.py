"""Tuning against the grid, in one session: experiment=lr_range (5 norms x 9 learning rates) and experiment=tune
(5 norms x n_trials, pruned) on the same setup, then each norm's best setting and its test accuracy from each, the
epochs each spent (the sum of runs.csv's epochs_completed) and its wall time (docs/tuning.md).

    python scripts/tune_vs_grid.py                                   # on digits
    python scripts/tune_vs_grid.py --confirm 3 --keep /tmp/fm dataset=fashion_mnist dataset.root=/tmp/fmnist epochs=2

--tune OVERRIDE: an override for the tuning sweep only (hydra.sweeper.n_trials=6), repeatable.
--confirm N: the tuning sweep then confirms each norm's best setting with N fresh seeds (its table is printed; its
epochs are counted apart from the search's), and the grid's best setting of each norm is trained with the same
seeds: the two methods' settings compared on runs neither was chosen on (a single run's best flatters the method
that tried more settings, the grid). --keep DIR: the two sweep folders are kept in DIR (grid/, tune/).
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
    return best.set_index("norm")[["optimizer.lr", "val_acc", "test_acc", "job"]]


def confirm_grid(best: pd.DataFrame, seeds: list[int], extra: list[str], root: Path) -> pd.DataFrame:
    """Each norm's best grid setting trained with `seeds`: test_acc by norm and seed."""
    rows = []
    for norm, row in best.iterrows():
        folder = root / f"grid_confirm_{norm}"
        lr, seeds_given = f"optimizer.lr={float(row['optimizer.lr'])!r}", f"seed={','.join(map(str, seeds))}"
        sweep("lr_range", [*extra, f"norm={norm}", lr, seeds_given], folder)
        runs = pd.read_csv(folder / "runs.csv")
        rows += [{"norm": norm, "seed": r.seed, "test_acc": r.test_acc} for r in runs.itertuples()]
    return pd.DataFrame(rows)


def compare_confirmed(grid: pd.DataFrame, tune: pd.DataFrame) -> None:
    """Per norm: the grid's and the search's best setting, each over the same fresh seeds; paired t-test."""
    from scipy.stats import ttest_rel

    both = grid.merge(tune, on=["norm", "seed"], suffixes=("_grid", "_tune"))
    lines = []
    for norm, pairs in both.groupby("norm"):
        diff = pairs["test_acc_tune"] - pairs["test_acc_grid"]
        p = ttest_rel(pairs["test_acc_tune"], pairs["test_acc_grid"]).pvalue if diff.std() > 0 else 1.0
        lines.append(
            f"{norm:>5}: grid {pairs['test_acc_grid'].mean():.2f}, tune {pairs['test_acc_tune'].mean():.2f} "
            f"(tune - grid {diff.mean():+.2f}, paired t p={p:.2f}, {len(pairs)} seeds)"
        )
    print("each method's best setting on the same fresh seeds (test_acc mean):\n" + "\n".join(lines))


def mcnemar_p(grid_job: Path, tune_job: Path) -> float:
    """McNemar's exact test on the two final models' test predictions, as results.csv's own test."""
    from normsweep.results.tables import mcnemar
    from normsweep.sweep.files import read_correct

    return mcnemar(read_correct(grid_job), read_correct(tune_job))


def main() -> None:
    args = sys.argv[1:]
    confirm, keep, trials = 0, None, []
    while args and args[0] in ("--confirm", "--keep", "--tune"):
        option, value, args = args[0], args[1], args[2:]
        if option == "--confirm":
            confirm = int(value)
        elif option == "--keep":
            keep = value
        else:
            trials.append(value)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp)
        grid, grid_wall = sweep("lr_range", args, root / "grid")
        tuned = [*args, *trials, *([f"hydra.sweeper.confirm_seeds={confirm}"] if confirm else [])]
        tune, tune_wall = sweep("tune", tuned, root / "tune")
        confirmed = pd.read_csv(root / "tune" / "results.csv") if confirm else None
        grid_best, tune_best = best_per_norm(grid), best_per_norm(tune)
        table = grid_best.add_suffix("_grid").join(tune_best.add_suffix("_tune"))
        table["test_gap"] = table["test_acc_tune"] - table["test_acc_grid"]
        pairs = zip(table["job_grid"], table["job_tune"])
        table["p_mcnemar"] = [mcnemar_p(root / "grid" / str(g), root / "tune" / str(t)) for g, t in pairs]
        if confirm:
            confirmed_tune = tune[tune["phase"] == "confirm"][["norm", "seed", "test_acc"]]
            seeds = sorted(int(x) for x in confirmed_tune["seed"].unique())
            confirmed_grid = confirm_grid(grid_best, seeds, args, root)
    table = table.drop(columns=["job_grid", "job_tune"])
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
        compare_confirmed(confirmed_grid, confirmed_tune)
        extra = int(tune["epochs_completed"].sum()) - epochs[1]
        print(f"confirmation: {extra} epochs; results.csv of the tuning sweep:")
        columns = ["norm", "optimizer.lr", "runs", "val_acc_mean", "test_acc_mean", "test_acc_std"]
        columns += ["gap_to_best", "p_vs_best", "test", "within_noise"]
        shown = confirmed[[c for c in columns if c in confirmed]].round(3)
        if "optimizer.lr" in shown:  # a learning rate of 0.00041 is not 0.0
            shown["optimizer.lr"] = confirmed["optimizer.lr"].map(lambda lr: f"{lr:.3g}")
        print(shown.to_string(index=False))


if __name__ == "__main__":
    main()
