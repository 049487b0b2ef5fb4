"""Is the difference real: gap_to_best, p_vs_best, within_noise and resolution in results.csv, the sentence that
names the rows tied with the best, sorting by compare_metric; and figures a person can read."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_results import make_job

from normsweep.aggregate import main as aggregate_main
from normsweep.config.checks import compose_run
from normsweep.job.run import run_job
from normsweep.results.plots import NORM_COLOURS, palette
from normsweep.results.tables import format_table, swept_numbers
from normsweep.results.write import aggregate
from normsweep.sweep.files import read_correct, write_predictions

IMAGES = 200  # test images in these fake sweeps: accuracies are multiples of 0.5 points


def job(sweep: Path, num: int, overrides: list[str], seed: int, val: float, test: float, **summary: object) -> None:
    """A finished job with its validation and test accuracy (and any other summary.json keys)."""
    folder = make_job(sweep, num, [*overrides, f"seed={seed}"], val, seed)
    saved = json.loads((folder / "summary.json").read_text())
    saved.update(final_val_acc=val, test_acc=test, **summary)
    (folder / "summary.json").write_text(json.dumps(saved))


def norms(
    sweep: Path,
    tests: dict[str, list[float]],
    seeds: dict[str, list[int]] | None = None,
    metric: str | None = None,
    **summary: object,
) -> Path:
    """One job per (norm, seed) with these test accuracies; the norms' validation accuracies fall in the order
    given, so the first is best by val_acc. `metric`: the sweep's compare_metric."""
    num = 0
    for rank, (norm, accuracies) in enumerate(tests.items()):
        for seed, test in zip((seeds or {}).get(norm, range(len(accuracies))), accuracies):
            config = {"config": {"compare_metric": metric, "seed": seed, "norm": {"name": norm}}} if metric else {}
            job(sweep, num, [f"norm={norm}"], seed, val=99.0 - rank, test=test, **config, **summary)
            num += 1
    return sweep


def test_gap_and_a_paired_p_value_when_the_seeds_match(tmp_path: Path) -> None:
    bn, gn = [97.0, 98.0, 98.5], [96.0, 96.5, 97.5]
    results = aggregate(norms(tmp_path, {"bn": bn, "gn": gn})).results.set_index("norm")
    # By hand: per-seed differences 1.0, 1.5, 1.0; mean 7/6, std 0.2887; t = 7/6 / (0.2887 / √3) = 7.0, 2 dof.
    assert results.loc["gn", "gap_to_best"] == pytest.approx(7 / 6)
    assert results.loc["gn", "p_vs_best"] == pytest.approx(0.019804, rel=1e-4)
    assert results.loc["gn", "p_vs_best"] == pytest.approx(stats.ttest_rel(gn, bn).pvalue)
    assert results.loc["bn", "gap_to_best"] == 0 and pd.isna(results.loc["bn", "p_vs_best"])
    assert results.loc["gn", "within_noise"] == "no" and results.loc["bn", "within_noise"] == "yes"
    assert results.loc["gn", "test"] == "paired-t" and pd.isna(results.loc["bn", "test"])


def test_welchs_p_value_when_the_seeds_differ(tmp_path: Path) -> None:
    bn, gn = [97.0, 98.0, 98.5], [95.0, 96.5]
    sweep = norms(tmp_path, {"bn": bn, "gn": gn}, seeds={"bn": [0, 1, 2], "gn": [3, 4]})
    gn_row = aggregate(sweep).results.set_index("norm").loc["gn"]
    assert gn_row["gap_to_best"] == pytest.approx(sum(bn) / 3 - sum(gn) / 2)
    assert gn_row["p_vs_best"] == pytest.approx(stats.ttest_ind(gn, bn, equal_var=False).pvalue)
    # By hand: t = 2.0833 / √(0.5833/3 + 1.125/2) = 2.395 on Welch–Satterthwaite's 1.709 dof.
    assert gn_row["p_vs_best"] == pytest.approx(0.1600, abs=1e-4)
    assert gn_row["test"] == "welch" and gn_row["within_noise"] == "yes"


def test_within_noise_under_one_test_image_or_at_p_above_five_percent(tmp_path: Path) -> None:
    averaged = norms(tmp_path / "mean", {"bn": [97.0, 97.5], "gn": [97.0, 97.0]})  # gap 0.25: half an image
    results = aggregate(averaged).results.set_index("norm")
    assert results.loc["gn", "gap_to_best"] == pytest.approx(0.25) and results.loc["gn", "within_noise"] == "yes"
    noisy = norms(tmp_path / "noisy", {"bn": [97.0, 98.0, 96.0], "gn": [96.5, 95.0, 97.0], "none": [90.0, 90.5, 89.5]})
    results = aggregate(noisy).results.set_index("norm")
    assert results.loc["gn", "gap_to_best"] == pytest.approx(5 / 6)  # more than an image, but p = 0.47
    assert results.loc["gn", "p_vs_best"] >= 0.05 and results.loc["gn", "within_noise"] == "yes"
    assert results.loc["none", "p_vs_best"] < 0.05 and results.loc["none", "within_noise"] == "no"  # a clear gap


def test_the_printed_table_and_report_say_which_rows_are_tied_with_the_best(tmp_path: Path, capsys) -> None:
    sweep = norms(
        tmp_path,
        {"ln": [97.0, 98.0, 96.0], "bn": [96.5, 95.0, 97.0], "gn": [97.0, 97.0, 97.0], "none": [90.0, 90.5, 89.5]},
    )
    aggregate_main([str(sweep)])
    sentence = (
        "bn and gn are within noise of the best (ln by val_acc_mean): a test-accuracy gap under one test image "
        "(0.50 points) or p ≥ 0.05 in a paired t-test over 3 seeds."
    )
    printed = capsys.readouterr().out
    assert sentence in printed
    assert sentence in (sweep / "report.md").read_text()
    header = printed.splitlines()[0].split()
    assert header[:8] == [
        "norm",
        "runs",
        "val_acc_mean",
        "val_acc_std",
        "test_acc_mean",
        "test_acc_std",
        "test_acc_ci95",
        "gap_to_best",
    ]
    assert header[8:11] == ["p_vs_best", "test", "within_noise"]


def test_a_spread_of_zero_over_seeds_is_shown_with_the_resolution_of_the_test_set(tmp_path: Path) -> None:
    sweep = norms(tmp_path, {"bn": [97.5, 98.0, 98.5], "gn": [97.0, 97.0, 97.0]})
    report = aggregate(sweep)
    results = pd.read_csv(sweep / "results.csv").set_index("norm")
    assert results.loc["gn", "test_acc_std"] == 0 and results.loc["gn", "resolution"] == pytest.approx(100 / IMAGES)
    note = (
        "test_acc_std 0.00 for gn: every seed scored the same; the test set's resolution is one test image "
        "= 0.50 points (200 test images)"
    )
    assert note in format_table(report)
    assert "test_acc_std 0.00" not in format_table(aggregate(norms(tmp_path / "spread", {"bn": [97.0, 97.5]})))


def test_the_resolution_comes_from_the_recorded_test_set_size_else_from_the_accuracies(tmp_path: Path) -> None:
    counted = norms(tmp_path / "counted", {"bn": [97.0, 98.0], "gn": [96.0, 96.5]}, test_images=400)
    assert (aggregate(counted).results["resolution"] == 0.25).all()
    digits = 100 / 359  # 359 test images, as the digits data set holds
    inferred = norms(tmp_path / "digits", {"bn": [352 * digits, 354 * digits], "gn": [350 * digits, 351 * digits]})
    assert aggregate(inferred).results["resolution"].tolist() == pytest.approx([digits, digits])


def test_rows_sort_by_the_compared_metric_with_the_test_accuracy_beside_it(tmp_path: Path, caplog) -> None:
    sweep = norms(tmp_path, {"bn": [95.0, 95.5], "gn": [98.0, 98.5]}, metric="test_acc")
    report = aggregate(sweep)
    assert list(report.results["norm"]) == ["gn", "bn"]  # bn has the better validation accuracy
    assert list(pd.read_csv(sweep / "results.csv")["norm"]) == ["gn", "bn"]
    assert report.results.set_index("norm").loc["bn", "gap_to_best"] == pytest.approx(3.0)
    assert format_table(report).splitlines()[0].split()[:4] == ["norm", "runs", "test_acc_mean", "test_acc_std"]
    assert "within noise of the best (gn by test_acc_mean)" in format_table(report)
    best_epoch = norms(tmp_path / "b", {"bn": [95.0], "gn": [98.0]}, metric="best_val_acc")
    assert format_table(aggregate(best_epoch)).splitlines()[0].split()[2:4] == ["best_val_acc_mean", "test_acc_mean"]
    typo = norms(tmp_path / "typo", {"bn": [95.0], "gn": [98.0]}, metric="val_accuracy")
    assert list(aggregate(typo).results["norm"]) == ["bn", "gn"]  # the default, val_acc, with a warning
    assert "compare_metric=val_accuracy: not a metric of results.csv; sorted by val_acc" in caplog.text


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk's width


def test_every_swept_number_gets_a_panel_of_test_accuracy_against_it(tmp_path: Path) -> None:
    num = 0
    for norm in ("bn", "gn"):
        for lr in (1e-4, 1e-3, 1e-2):
            for seed in (0, 1):
                job(tmp_path / "lr", num, [f"norm={norm}", f"optimizer.lr={lr}"], seed, 90.0 + seed, 89.0 + seed)
                num += 1
    report = aggregate(tmp_path / "lr")
    assert swept_numbers(report) == ["optimizer.lr"]
    only_norms = norms(tmp_path / "norms", {"bn": [97.0, 98.0], "gn": [96.0, 96.5]})
    aggregate(only_norms)
    assert _png_width(tmp_path / "lr" / "curves.png") > _png_width(only_norms / "curves.png")  # one panel more
    aggregate_main([str(tmp_path / "lr")])
    text = (tmp_path / "lr" / "report.md").read_text()
    assert "Test accuracy (%) by optimizer.lr ± 95% CI (curves.png):" in text
    assert "| configuration | optimizer.lr=0.0001 | optimizer.lr=0.001 | optimizer.lr=0.01 |" in text
    assert swept_numbers(aggregate(only_norms)) == []


def test_a_norm_has_the_same_colour_in_every_figure() -> None:
    assert palette(["bn", "gn"])["bn"] == palette(["none", "ln", "bn", "my_norm"])["bn"] == NORM_COLOURS["bn"]
    assert len(set(NORM_COLOURS.values())) == len(NORM_COLOURS)  # built-in norms never share a colour
    mine = [f"my_norm_{i}" for i in range(12)]
    colours = palette(["bn", *mine])
    assert palette(["bn", *mine]) == colours  # the same names, the same colours, in any process (crc32)
    assert len({colours[name] for name in mine}) == 12 and colours["bn"] not in {colours[name] for name in mine}
    assert palette(["my_norm_3", "bn"])["my_norm_3"] == palette(["my_norm_3", "gn", "ln"])["my_norm_3"]


def test_a_run_that_blew_up_still_leaves_a_readable_figure(tmp_path: Path) -> None:
    sweep = norms(tmp_path, {"bn": [97.0, 98.0], "none": [10.0, 9.5]})
    for job_dir in (sweep / "2", sweep / "3"):  # none diverged: infinite loss, chance accuracy, NaN at the end
        metrics = pd.read_csv(job_dir / "metrics.csv")
        metrics["train_loss"] = [3e4, float("inf"), float("nan")]
        metrics["val_acc"] = [10.0, 9.0, float("nan")]
        metrics.to_csv(job_dir / "metrics.csv", index=False)
    report = aggregate(sweep)
    assert (sweep / "curves.png").stat().st_size > 10_000
    assert report.results.set_index("norm").loc["none", "within_noise"] == "no"


def predicted(sweep: Path, rights: dict[str, np.ndarray], seeds: dict[str, int] | None = None) -> Path:
    """One job per norm (seed 0, or as given) whose final model got the test images where `rights` is True right,
    with its predictions.npz as a job writes it; the norms' validation accuracies fall in the order given."""
    for num, (norm, right) in enumerate(rights.items()):
        seed = (seeds or {}).get(norm, 0)
        job(sweep, num, [f"norm={norm}"], seed, val=99.0 - num, test=100 * right.mean(), test_images=len(right))
        labels = np.arange(len(right)) % 10
        write_predictions(sweep / str(num), np.where(right, labels, (labels + 1) % 10), labels)
    return sweep


def right_on(n: int, first: int, last: int | None = None) -> np.ndarray:
    """Right on images first..last-1 of n (all from `first` on when last is None)."""
    right = np.zeros(n, dtype=bool)
    right[first:last] = True
    return right


def test_mcnemar_tells_apart_one_run_each_that_learned_nothing(tmp_path: Path) -> None:
    # The sweep: 10,000 test images, the best at 77.6%, two rows at chance, one run each.
    best, dead = right_on(10_000, 0, 7_760), right_on(10_000, 7_000, 8_000)
    sweep = predicted(tmp_path, {"gn": best, "bn": dead, "none": dead.copy()})
    report = aggregate(sweep)
    results = pd.read_csv(sweep / "results.csv").set_index("norm")
    assert results.loc["bn", "gap_to_best"] == pytest.approx(67.6)
    assert results.loc["bn", "test"] == "mcnemar" and results.loc["bn", "within_noise"] == "no"
    assert results.loc["bn", "p_vs_best"] < 1e-300 and results.loc["gn", "within_noise"] == "yes"
    table = format_table(report)
    assert "no other row is within noise of the best (gn by val_acc_mean)" in table
    assert "McNemar's exact test on the same 10000 test images" in table
    assert " mcnemar           no " in table


def test_mcnemar_keeps_gaps_of_one_or_two_images_within_noise(tmp_path: Path) -> None:
    # The quickstart's digits: 359 test images, rows one or two images behind, mostly on different images.
    n = 359
    best = right_on(n, 0, 352)
    one_behind, two_behind = right_on(n, 4, 355), right_on(n, 0, 350)
    sweep = predicted(tmp_path, {"bn": best, "ln": one_behind, "gn": two_behind})
    results = aggregate(sweep).results.set_index("norm")
    assert results.loc["ln", "gap_to_best"] == pytest.approx(100 / n)
    # ln: 4 images only bn got right, 3 only ln did; gn: 2 and 0.
    assert results.loc["ln", "p_vs_best"] == pytest.approx(stats.binomtest(3, 7).pvalue)
    assert results.loc["gn", "p_vs_best"] == pytest.approx(0.5)
    assert list(results["test"].iloc[1:]) == ["mcnemar", "mcnemar"]
    assert list(results["within_noise"]) == ["yes", "yes", "yes"]
    assert "ln and gn are within noise of the best (bn by val_acc_mean)" in format_table(aggregate(sweep))


def test_mcnemar_compares_runs_of_the_same_seed_when_one_row_has_several(tmp_path: Path) -> None:
    n = 1000
    sweep = predicted(tmp_path, {"bn": right_on(n, 0, 900), "gn": right_on(n, 0, 800)}, seeds={"gn": 1})
    job(sweep, 2, ["norm=bn"], 1, val=99.0, test=90.0, test_images=n)  # bn's seed 1: no predictions saved
    write_predictions(sweep / "2", np.zeros(n), np.where(right_on(n, 0, 790), 0, 1))  # 79% right
    results = aggregate(sweep).results.set_index("norm")
    # gn's one run (seed 1) against bn's seed 1: 10 images only gn got right, none only bn did.
    assert results.loc["gn", "test"] == "mcnemar"
    assert results.loc["gn", "p_vs_best"] == pytest.approx(stats.binomtest(0, 10).pvalue)


def test_one_run_each_saved_without_predictions_is_unknown_not_within_noise(tmp_path: Path) -> None:
    sweep = norms(tmp_path, {"bn": [97.5], "gn": [97.0], "ln": [97.5]})  # folders from before predictions.npz
    report = aggregate(sweep)
    results = pd.read_csv(sweep / "results.csv").set_index("norm")
    assert list(results["within_noise"]) == ["yes", "unknown", "yes"]  # ln: the same accuracy as bn
    assert results["test"].isna().all()
    table = format_table(report)
    assert "gn cannot be told from the best or not (within_noise unknown)" in table
    assert "p_vs_best" not in table.splitlines()[0]


def test_a_job_keeps_its_final_models_prediction_for_every_test_image(tmp_path: Path) -> None:
    small = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.size=300", "epochs=1"]
    run = replace(compose_run(small), threads=1, diagnostics=False)
    summary = run_job(run, tmp_path, small, {})
    right = read_correct(tmp_path)
    assert len(right) == summary["test_images"] == 60
    assert 100 * right.mean() == pytest.approx(summary["test_acc"])
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
