"""A tuning sweep's tables: one row per study in results.csv (its confirmation runs, else its best completed search
trial), each study's best setting in best_by_norm.csv, every trial in runs.csv, the sentence under the table,
report.md's search section and search.png."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_results import make_job

from normsweep.results.tables import Report, best_by, collect, format_table
from normsweep.results.write import aggregate, report
from normsweep.sweep.files import write_predictions

IMAGES = 200  # test images: accuracies are multiples of 0.5 points
EPOCHS = 4
# Each study's search: (optimizer.lr, final val_acc, status). bn's pruned trial has the highest validation accuracy
# of its study, reached at the epoch it was stopped at; gn's best completed trial is its lr=0.01.
SEARCH = {
    "bn": [(1e-4, 90.0, "completed"), (1e-3, 95.0, "completed"), (1e-2, 97.0, "pruned"), (1e-1, 10.0, "diverged")],
    "gn": [(1e-4, 88.0, "completed"), (1e-3, 80.0, "pruned"), (1e-2, 93.0, "completed"), (1e-1, 20.0, "pruned")],
}
BEST_LR = {"bn": 1e-3, "gn": 1e-2}
CONFIRMED = {"bn": [94.0, 95.0, 94.5], "gn": [92.0, 91.5, 92.5]}  # test accuracies of seeds 1-3


def right(accuracy: float, shift: int = 0) -> np.ndarray:
    """Which of the IMAGES test images a model got right: `accuracy` % of them, starting at image `shift`."""
    hits = np.zeros(IMAGES, dtype=bool)
    hits[: round(accuracy * IMAGES / 100)] = True
    return np.roll(hits, shift)


def trial(
    sweep: Path, num: int, norm: str, lr: float, val: float, test: float, status: str = "completed", **record: object
) -> Path:
    """A tuning sweep's job: a search trial (number `num`) unless `record` says otherwise, on seed 0 (confirmation
    runs: the `seed` given), with its predictions.npz. A pruned trial stopped after epoch 1: one metrics row."""
    seed = int(record.pop("seed", 0))
    phase = record.get("phase", "search")
    epochs = 1 if status == "pruned" else EPOCHS
    overrides = [f"norm={norm}", f"optimizer.lr={lr:g}", *([f"seed={seed}"] if phase == "confirm" else [])]
    job = make_job(sweep, num, overrides, val, seed, epochs=epochs)
    summary = json.loads((job / "summary.json").read_text())
    summary.update(status=status, final_val_acc=val, best_val_acc=val, test_acc=test, test_images=IMAGES)
    summary["trial"] = {"study": f"norm={norm}", "phase": phase, "number": num, "searched": ["optimizer.lr"]}
    summary["trial"].update(record)
    (job / "summary.json").write_text(json.dumps(summary))
    labels = np.arange(IMAGES) % 10
    write_predictions(job, np.where(right(test, shift=num), labels, (labels + 1) % 10), labels)
    return job


def search(sweep: Path, studies: dict[str, list[tuple[float, float, str]]] = SEARCH) -> Path:
    """Every study's search trials, numbered within the study; test accuracy one point under validation."""
    num = 0
    for norm, trials in studies.items():
        for number, (lr, val, status) in enumerate(trials):
            trial(sweep, num, norm, lr, val, val - 1, status, number=number)
            num += 1
    return sweep


def confirm(sweep: Path, tests: dict[str, list[float]], first: int = 100) -> Path:
    """Each study's best setting trained again with seeds 1, 2, ... (one job per test accuracy)."""
    num = first
    for norm, accuracies in tests.items():
        for seed, test in enumerate(accuracies, start=1):
            trial(sweep, num, norm, BEST_LR[norm], test + 1, test, phase="confirm", number=None, seed=seed)
            num += 1
    return sweep


@dataclass
class Aggregated:
    folder: Path
    report: Report
    printed: str  # what the end of the sweep printed


def aggregated(sweep: Path) -> Aggregated:
    """`sweep` aggregated as the end of a sweep (or python -m normsweep.aggregate) does it, its output kept."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = report(sweep)
    return Aggregated(sweep, result, out.getvalue())


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Aggregated:
    """The search alone: no confirmation run."""
    return aggregated(search(tmp_path_factory.mktemp("searched")))


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory: pytest.TempPathFactory) -> Aggregated:
    """The search, then each study's best setting trained with seeds 1-3."""
    return aggregated(confirm(search(tmp_path_factory.mktemp("confirmed")), CONFIRMED))


def test_without_confirmation_each_study_is_its_best_completed_trial(searched: Aggregated) -> None:
    results = pd.read_csv(searched.folder / "results.csv").set_index("norm")
    assert list(results.index) == ["bn", "gn"]
    # bn's pruned trial reached 97% at the epoch it stopped: not a candidate; its best completed trial is lr=0.001.
    assert results.loc["bn", "optimizer.lr"] == pytest.approx(1e-3) and results.loc["bn", "val_acc_mean"] == 95.0
    assert results.loc["gn", "optimizer.lr"] == pytest.approx(1e-2) and results.loc["gn", "val_acc_mean"] == 93.0
    assert list(results["trials"]) == [4, 4] and list(results["pruned"]) == [1, 2] and list(results["runs"]) == [1, 1]
    assert results.loc["gn", "test"] == "mcnemar"
    printed = searched.printed
    assert (
        "tuned by search: 2 studies (norm), 4 trials each, 3 pruned; each row is the study's best completed trial "
        "(one run: McNemar's test); confirm with hydra.sweeper.confirm_seeds=3"
    ) in printed
    header = printed.splitlines()[0].split()
    assert header[:6] == ["norm", "optimizer.lr", "trials", "pruned", "runs", "val_acc_mean"]
    assert "add seeds for that: hydra.sweeper.confirm_seeds=3" in printed  # not seed=0,1,2: that would search again


def test_with_confirmation_the_rows_are_the_fresh_seeds_of_each_best_setting(confirmed: Aggregated) -> None:
    results = pd.read_csv(confirmed.folder / "results.csv").set_index("norm")
    assert list(results["runs"]) == [3, 3] and list(results["trials"]) == [4, 4] and list(results["pruned"]) == [1, 2]
    assert results.loc["bn", "test_acc_mean"] == pytest.approx(94.5)  # the seeds', not the search trial's 94
    assert results.loc["gn", "test"] == "paired-t" and results.loc["gn", "gap_to_best"] == pytest.approx(2.5)
    assert (
        "tuned by search: 2 studies (norm), 4 trials each, 3 pruned; each row is the study's best setting, "
        "confirmed with 3 seeds (seed 1-3)"
    ) in confirmed.printed
    assert "in a paired t-test over 3 seeds" in confirmed.printed
    # curves.png in numbers (report.md): each row's three seeds (95, 96, 95.5), without its search trial's 95
    figures = (confirmed.folder / "report.md").read_text().split("## Figures")[1]
    assert "| norm=bn | 65.50 ± 0.50 | 75.50 ± 0.50 | 85.50 ± 0.50 | 95.50 ± 0.50 |" in figures
    assert figures.count("| norm=") == 2


def test_every_trial_stays_in_runs_csv_with_its_study_phase_and_number(confirmed: Aggregated) -> None:
    runs = pd.read_csv(confirmed.folder / "runs.csv")
    assert len(runs) == 8 + 6
    assert {"study", "phase", "trial"} <= set(runs.columns)
    trials = runs[runs["phase"] == "search"]
    assert sorted(trials["status"].value_counts().items()) == [("completed", 4), ("diverged", 1), ("pruned", 3)]
    assert list(trials[trials["study"] == "norm=gn"]["trial"]) == [0, 1, 2, 3]
    assert runs[runs["phase"] == "confirm"]["trial"].isna().all()


def test_best_by_norm_gives_each_studys_best_completed_trial(confirmed: Aggregated) -> None:
    best = pd.read_csv(confirmed.folder / "best_by_norm.csv").set_index("norm")
    assert list(best.index) == ["bn", "gn"]
    assert best.loc["bn", "optimizer.lr"] == pytest.approx(1e-3) and best.loc["bn", "trial"] == 1
    assert best.loc["bn", "val_acc"] == 95.0 and best.loc["bn", "test_acc"] == 94.0  # the trial's, not the seeds'
    assert best.loc["gn", "optimizer.lr"] == pytest.approx(1e-2) and best.loc["gn", "trial"] == 2
    assert list(best["trials"]) == [4, 4] and list(best["pruned"]) == [1, 2] and list(best["completed"]) == [2, 2]
    assert "at_edge" not in best and "the best optimizer.lr" not in confirmed.printed  # no grid, no grid's edge


def test_report_md_has_a_search_section_and_search_png(searched: Aggregated) -> None:
    assert "best by norm (each study at its best completed search trial by validation accuracy" in searched.printed
    assert "search.png" in searched.printed.splitlines()[-1]
    text = (searched.folder / "report.md").read_text()
    assert "## Search" in text and "## Best by norm" not in text
    assert "| norm | trials | pruned | completed | optimizer.lr | trial |" in text
    assert "| bn | 4 | 1 | 2 | 0.001 | 1 |" in text
    assert "![each search trial's validation accuracy against the values it tried](search.png)" in text
    assert "winner's curse" in text and "hydra.sweeper.confirm_seeds=3" in text
    assert "**tuned by search: 2 studies (norm), 4 trials each, 3 pruned;" in text
    png = (searched.folder / "search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_study_left_unconfirmed_gets_a_row_without_a_result(tmp_path: Path) -> None:
    result = collect(confirm(search(tmp_path), {"bn": CONFIRMED["bn"]}))
    results = result.results.set_index("norm")
    assert results.loc["bn", "runs"] == 3 and results.loc["gn", "runs"] == 0
    assert results.loc["gn", "status"] == "not confirmed" and results.loc["gn", "trials"] == 4
    assert "confirmed with 3 seeds (seed 1-3)" in format_table(result)


def test_a_confirmation_of_a_setting_a_resumed_study_has_since_beaten_leaves_the_table(tmp_path: Path) -> None:
    # gn confirmed at lr 0.01, then resumed with more trials: 0.003 beats it. The table's gn row is not the old
    # setting's fresh seeds (a second gn row, or the wrong rate under "the study's best"); runs.csv keeps them.
    sweep = confirm(search(tmp_path), CONFIRMED)
    trial(sweep, 8, "gn", 3e-3, 96.0, 95.0, number=4)
    result = collect(sweep)
    results = result.results.set_index("norm")
    assert list(result.results["norm"]).count("gn") == 1
    assert results.loc["gn", "status"] == "not confirmed" and results.loc["gn", "runs"] == 0
    assert results.loc["bn", "runs"] == 3 and results.loc["bn", "optimizer.lr"] == BEST_LR["bn"]
    for seed, test in enumerate([95.5, 96.0, 95.0], start=1):
        trial(sweep, 200 + seed, "gn", 3e-3, test + 1, test, phase="confirm", number=None, seed=seed)
    result = collect(sweep)
    results = result.results.set_index("norm")
    assert results.loc["gn", "optimizer.lr"] == 3e-3 and results.loc["gn", "runs"] == 3
    assert results.loc["gn", "test_acc_mean"] == pytest.approx(95.5)
    assert len(result.runs) == 8 + 1 + 6 + 3  # runs.csv: every job, the superseded confirmations too


def test_a_diverged_or_stalled_trial_is_best_only_when_none_completed_and_a_pruned_one_never(tmp_path: Path) -> None:
    studies = {
        "bn": [(1e-3, 95.0, "completed"), (1e-2, 96.0, "pruned")],
        "none": [(1e-4, 11.0, "stalled"), (1e-3, 60.0, "pruned"), (1e-2, 10.0, "diverged")],
        "ln": [(1e-3, 70.0, "pruned"), (1e-2, 40.0, "pruned")],
    }
    result = collect(search(tmp_path, studies))
    best = best_by(result, "norm").set_index("norm")
    assert best.loc["none", "optimizer.lr"] == pytest.approx(1e-4) and best.loc["none", "status"] == "stalled"
    assert pd.isna(best.loc["ln", "optimizer.lr"]) and best.loc["ln", "pruned"] == 2
    results = result.results.set_index("norm")
    assert results.loc["ln", "runs"] == 0 and results.loc["ln", "status"] == "no trial completed"
    assert list(results.index) == ["bn", "none", "ln"]


def test_a_grid_sweep_has_no_trial_columns_and_no_search_figure(tmp_path: Path) -> None:
    for num, (norm, lr) in enumerate([("bn", 0.001), ("bn", 0.01), ("gn", 0.001), ("gn", 0.01)]):
        make_job(tmp_path, num, [f"norm={norm}", f"optimizer.lr={lr}"], 90.0 + num, 0)
    aggregate(tmp_path)
    assert not {"study", "phase", "trial"} & set(pd.read_csv(tmp_path / "runs.csv").columns)
    assert not {"trials", "pruned"} & set(pd.read_csv(tmp_path / "results.csv").columns)
    assert not (tmp_path / "search.png").exists()
