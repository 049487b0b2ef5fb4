"""The benchmark runs end to end (tiny step counts: correctness, not timing) and writes bench.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from normsweep.bench import VARIANTS, ArticleDataset, main, make_data, summarize

TINY = [
    "--device",
    "cpu",
    "--threads",
    "1",
    "--model",
    "simple_cnn",
    "--shape",
    "3,12,12",
    "--batch-size",
    "8",
    "--steps",
    "2",
    "--warmup",
    "1",
]


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
def test_bench_times_every_variant_and_writes_bench_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.csv"
    assert main([*TINY, "--norm", "bn,gn", "--repeats", "2", "--out", str(out)]) == 0
    runs = pd.read_csv(out)
    assert len(runs) == 2 * 2 * len(VARIANTS)
    assert set(runs["variant"]) == set(VARIANTS) and set(runs["norm"]) == {"bn", "gn"}
    assert (runs["images_per_second"] > 0).all()
    assert (runs[["model", "batch_size", "steps", "device", "threads"]].iloc[0] == ["simple_cnn", 8, 2, "cpu", 1]).all()
    assert (runs["busy"] == 0).all()
    # The order of the variants rotates between repeats, so drift on the machine falls on all of them.
    first = runs[runs["repeat"] == 0].groupby("norm")["variant"].first()
    second = runs[runs["repeat"] == 1].groupby("norm")["variant"].first()
    assert (first != second).all()
    printed = capsys.readouterr().out
    assert "normsweep/reference" in printed and "normsweep/ceiling" in printed and str(out) in printed


def test_ratios_are_ratios_of_medians() -> None:
    runs = pd.DataFrame(
        [
            {"norm": "bn", "variant": v, "repeat": r, "images_per_second": rate}
            for v, rates in {"reference": [100, 110, 90], "normsweep": [200, 150, 250], "ceiling": [400] * 3}.items()
            for r, rate in enumerate(rates)
        ]
    )
    row = summarize(runs).iloc[0]
    assert row["normsweep/reference"] == pytest.approx(2.0) and row["normsweep/ceiling"] == pytest.approx(0.5)


def test_the_reference_sees_the_same_images_through_pil() -> None:
    data = make_data((3, 12, 12), batch_size=4, steps=2, device=torch.device("cpu"))
    assert len(data.train) == 8 and data.hflip and data.crop_padding == 4
    dataset = ArticleDataset(data.train, data.mean.tolist(), data.std.tolist())
    x, y = dataset[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y == int(data.train.labels[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--norm", "bn,foo"], "--norm bn,foo: choose among bn, frn, gn, in, ln, ln2d, none, rms, ws_gn"),
        (["--steps", "0"], "--steps must be 1 or more"),
        (["--model", "mlp", "--norm", "bn,frn"], "--model mlp --norm frn: layer fc1 has fc features (N, C)"),
        (["--norm", "gn,bn", "--batch-size", "1"], "--norm bn --batch-size 1: this norm takes its statistics"),
        (["--shape", "3x32x32"], "give channels,height,width"),
    ],
)
def test_wrong_arguments_are_explained(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_csv_records_what_each_variant_ran_in(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.csv"
    assert main([*TINY, "--norm", "gn", "--repeats", "1", "--out", str(out)]) == 0
    runs = pd.read_csv(out).set_index("variant")
    # On the CPU a conv model trains channels_last in normsweep's loop; the article's loop keeps the default layout.
    assert runs.loc["reference", ["precision", "channels_last"]].tolist() == ["fp32", False]
    for variant in ("normsweep", "ceiling"):
        assert runs.loc[variant, ["precision", "channels_last"]].tolist() == ["fp32", True]
    printed = capsys.readouterr().out
    assert "2 timed steps x 1 repeat, cpu, 1 thread;" in printed and "one run each" in printed
    assert "1 repeats" not in printed and "1 threads" not in printed and "1 runs" not in printed


@pytest.mark.slow  # trains for seconds in-process
def test_busy_times_each_thread_count_again_beside_busy_processes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.csv"
    assert main([*TINY, "--threads", "1,2", "--norm", "bn", "--repeats", "1", "--busy", "1", "--out", str(out)]) == 0
    runs = pd.read_csv(out)
    assert sorted(runs.groupby(["threads", "busy"]).size().index) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    printed = capsys.readouterr().out
    assert "cpu, 1 thread / 2 threads;" in printed
    assert "slowdown beside 1 busy process (quiet images/s over busy images/s):" in printed
    table = printed.split("slowdown beside")[1].splitlines()[2:4]
    assert [line.split()[:2] for line in table] == [["bn", "1"], ["bn", "2"]] and all("x" in line for line in table)


def test_thread_counts_are_checked(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--threads", "1,-2"])
    assert exit_.value.code == 2 and "give thread counts, 0 or more" in capsys.readouterr().err
