"""A key the command sets that is also a field every job records (device=cuda, the first GPU run's sweep): one
column, holding where the job ran, and the aggregation goes through."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from test_results import make_job

from normsweep.results.write import aggregate


def test_a_sweep_that_sets_device_is_aggregated_with_one_device_column(tmp_path: Path) -> None:
    for num, (norm, acc) in enumerate([("bn", 95.0), ("gn", 90.0)]):
        job = make_job(tmp_path, num, [f"norm={norm}", "device=cuda"], acc, seed=0)
        summary = json.loads((job / "summary.json").read_text())
        (job / "summary.json").write_text(json.dumps({**summary, "norm": norm, "device": "cuda:0"}))
    aggregate(tmp_path)
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert list(runs.columns).count("device") == 1
    assert runs["device"].tolist() == ["cuda:0", "cuda:0"]
    results = pd.read_csv(tmp_path / "results.csv")
    assert results["norm"].tolist() == ["bn", "gn"]
