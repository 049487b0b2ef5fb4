"""What `python -m normsweep` imports: `--help` and `--cfg job` need no torch, a job no pandas, matplotlib or
scikit-learn (the aggregation and the figures import theirs when a sweep ends; digits is read from its file), and
no torch._dynamo unless it compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normsweep.job.data import digits_arrays

HEAVY = ("torch", "pandas", "matplotlib", "sklearn", "scipy")
SCRIPT = """
import json, sys
sys.argv = ["normsweep", *json.loads(sys.argv[1])]
from normsweep.cli import main
try:
    main()
finally:
    print("MODULES=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy} or m == "torch._dynamo")))
"""


def _imported(args: list[str], cwd: Path) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("{heavy}", repr(set(HEAVY))), json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("MODULES="))
    modules = json.loads(line.removeprefix("MODULES="))
    return {m.split(".")[0] for m in modules} | ({"torch._dynamo"} & set(modules))


@pytest.mark.slow
def test_help_and_the_composed_config_do_not_import_torch(tmp_path: Path) -> None:
    assert _imported(["--help"], tmp_path) == set()
    assert _imported(["--cfg", "job", "norm=gn"], tmp_path) == set()


@pytest.mark.slow
def test_a_run_refused_for_a_value_imports_no_torch(tmp_path: Path) -> None:
    assert _imported(["batch_size=0"], tmp_path) == set()  # named before training, without torch's import
    assert not (tmp_path / "outputs").exists()  # and its folder removed, as before


@pytest.mark.slow
def test_a_digits_job_imports_torch_alone_without_its_compiler(tmp_path: Path) -> None:
    run = ["epochs=2", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    assert _imported(run, tmp_path) == {"torch"}  # no torch._dynamo
    assert (tmp_path / "run" / "summary.json").is_file()


def test_digits_read_from_its_file_are_scikit_learns_digits() -> None:
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(labels, bunch.target)


@pytest.mark.slow
def test_a_sweep_whose_first_job_hydra_refuses_imports_no_torch(tmp_path: Path) -> None:
    # The sweep composes its other jobs beside torch's import (sweep/compose.py); the first one comes before it.
    assert _imported(["-m", "norm=nonexistent,bn,gn", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path) == set()
    assert not (tmp_path / "s").exists()


def test_the_collector_waits_for_the_imports_and_runs_again_for_the_jobs(tmp_path: Path) -> None:
    # A fresh `python -m normsweep` process: the collector is off while it starts, and on (with what start-up made
    # frozen) when the job trains; a refused run turns it back on too.
    script = """
import gc, json, sys
sys.argv = ["normsweep", *json.loads(sys.argv[1])]
import normsweep.job.train as train
real_fit = train.fit
def fit(*args, **kwargs):
    print("GC=" + json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}), flush=True)
    return real_fit(*args, **kwargs)
train.fit = fit
import runpy
runpy.run_module("normsweep", run_name="__main__")
"""
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(["epochs=1", "dataset.train_size=200", f"hydra.run.dir={tmp_path}"])],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    seen = json.loads(run.stdout.rsplit("GC=", 1)[1].splitlines()[0])
    assert run.returncode == 0 and seen["enabled"] and seen["frozen"] > 10_000, run.stderr


def test_the_collector_is_held_until_settled_and_turned_on_unfrozen_if_no_job_ran() -> None:
    import gc

    from normsweep import startup

    assert gc.isenabled()
    try:
        startup.hold()
        assert not gc.isenabled()
        startup.settle()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        gc.unfreeze()
        startup.hold()
        startup.settle(freeze=False)  # never settled (a refused command): on again, nothing frozen
        assert gc.isenabled() and gc.get_freeze_count() == 0
        gc.disable()  # off by someone else: not turned on by settle
        startup.hold()
        startup.settle()
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
