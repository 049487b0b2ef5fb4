"""Jobs are known by their settings, not their position: a resumed sweep finds each job it ran whatever the order
or the number of values in the new command, runs only what is new, refuses a folder holding another config, and a
job found in two folders is counted once."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli, run_cli_here

from normsweep.results.write import aggregate
from normsweep.sweep.files import write_summary
from normsweep.sweep.resume import ResumeConflict, SweepFolders

TINY = ["model=mlp", "epochs=1", "batch_size=256", "diagnostics=false"]  # a job in about a second on digits, no figure


def _config(norm: str = "bn", seed: int = 0, epochs: int = 1) -> dict:
    return {
        "model": {"_target_": "normsweep.job.models.MLP", "hidden": 128},
        "norm": {"name": norm, "eps": 1e-5},
        "dataset": {"name": "digits", "root": "data"},
        "seed": seed,
        "epochs": epochs,
        "device": "auto",
    }


def _job(folder: Path, status: str = "completed", val_acc: float = 90.0, **config: object) -> Path:
    config = _config(**config)
    overrides = [f"norm={config['norm']['name']}", f"seed={config['seed']}"]
    folder.mkdir(parents=True)
    write_summary(
        folder,
        {"status": status, "seed": config["seed"], "overrides": overrides, "config": config}
        | ({"final_val_acc": val_acc, "test_acc": val_acc} if status == "completed" else {}),
    )
    return folder


def _summaries(sweep: Path) -> dict[str, tuple[bytes, int]]:
    """Each job folder's summary.json, with its modification time: unchanged means not trained again."""
    return {
        str(p.parent.relative_to(sweep)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/summary.json")
    }


def _norms(sweep: Path) -> dict[str, str]:
    return {folder: json.loads(text)["norm"] for folder, (text, _) in _summaries(sweep).items()}


def test_jobs_find_their_folders_by_settings_and_new_jobs_take_the_lowest_free_number(tmp_path: Path) -> None:
    _job(tmp_path / "0", norm="bn")
    _job(tmp_path / "1", norm="gn")
    _job(tmp_path / "3", norm="ln")
    folders = SweepFolders(tmp_path)
    # `norm=gn,bn seed=0,1`: the saved jobs wherever they are, the new ones in folders no job has used.
    assert folders.claim(_config("gn"), ["norm=gn", "seed=0"]) == "1"
    assert folders.claim(_config("gn", seed=1), ["norm=gn", "seed=1"]) == "2"
    assert folders.claim(_config("bn"), ["norm=bn", "seed=0"]) == "0"
    assert folders.claim(_config("bn", seed=1), ["norm=bn", "seed=1"]) == "4"
    # The same settings twice in one launch: two folders, never one shared by two processes.
    assert folders.claim(_config("bn"), ["norm=bn", "seed=0"]) == "5"


def test_a_folder_made_but_never_started_is_found_by_its_overrides(tmp_path: Path) -> None:
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["norm=bn", "seed=1"]))
    assert SweepFolders(tmp_path).claim(_config("bn", seed=1), ["seed=1", "norm=bn"]) == "0"


def test_of_two_folders_with_the_same_job_the_finished_one_is_resumed(tmp_path: Path) -> None:
    _job(tmp_path / "0", "completed")
    _job(tmp_path / "1", "incomplete")
    assert SweepFolders(tmp_path).claim(_config(), ["norm=bn", "seed=0"]) == "0"


def test_the_same_overrides_with_another_config_are_refused_naming_the_keys(tmp_path: Path) -> None:
    _job(tmp_path / "0", epochs=1)
    changed = _config(epochs=2) | {"norm": {"name": "bn", "momentum": 0.1}}  # a YAML file changed since
    with pytest.raises(ResumeConflict) as err:
        SweepFolders(tmp_path).claim(changed, ["norm=bn", "seed=0"])
    message = str(err.value)
    assert "(epochs=1 there, 2 now; 1 key only the saved job has: norm.eps; and 1 key only this job has: " in message
    assert "(absent)" not in message


def test_a_job_in_two_folders_counts_once_finished_first_then_the_latest(tmp_path: Path, caplog) -> None:
    _job(tmp_path / "a" / "0", "completed", 90.0, norm="bn")
    _job(tmp_path / "b" / "0", "incomplete", norm="bn")  # written later, but not finished
    older = _job(tmp_path / "a" / "1", "completed", 80.0, norm="gn")
    _job(tmp_path / "b" / "1", "completed", 85.0, norm="gn")
    os.utime(older / "summary.json", ns=(0, 0))
    with caplog.at_level(logging.WARNING, logger="normsweep"):
        report = aggregate(tmp_path)
    runs = report.runs.set_index("job")
    assert list(runs.index) == ["a/0", "b/1"] and list(runs["duplicates"]) == ["b/0", "a/1"]
    results = report.results.set_index("norm")
    assert list(results["runs"]) == [1, 1] and results.loc["gn", "val_acc_mean"] == 85.0
    assert "2 jobs found in more than one folder, counted once: a/0 (also in b/0), b/1 (also in a/1)" in caplog.text


@pytest.fixture(scope="module")
def bn_gn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sweep `norm=bn,gn seed=0`, copied by each test that resumes it."""
    cwd = tmp_path_factory.mktemp("bn_gn")
    proc = run_cli_here(["-m", "norm=bn,gn", *TINY, f"hydra.sweep.dir={cwd / 's'}"], cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _norms(cwd / "s") == {"0": "bn", "1": "gn"}
    return cwd / "s"


def _copy(sweep: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sweep, tmp_path / "s"))


@pytest.mark.slow
def test_more_seeds_train_only_the_new_seed(bn_gn: Path, tmp_path: Path) -> None:
    sweep = _copy(bn_gn, tmp_path)
    before = _summaries(sweep)
    proc = run_cli_here(["-m", "norm=bn,gn", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = _summaries(sweep)
    assert {k: after[k] for k in before} == before  # seed 0 kept as it was
    assert proc.stdout.count("kept from an earlier run") == 2 and proc.stdout.count("(final model") == 2
    assert _norms(sweep) == {"0": "bn", "1": "gn", "2": "bn", "3": "gn"}
    results = pd.read_csv(sweep / "results.csv").set_index("norm")
    assert results.loc["bn", "runs"] == 2 and results.loc["gn", "runs"] == 2


@pytest.mark.slow
def test_the_norms_in_another_order_resume_every_job_as_it_is(bn_gn: Path, tmp_path: Path) -> None:
    sweep = _copy(bn_gn, tmp_path)
    before = _summaries(sweep)
    proc = run_cli_here(["-m", "norm=gn,bn", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)  # trains nothing
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summaries(sweep) == before and proc.stdout.count("kept from an earlier run") == 2
    assert len(pd.read_csv(sweep / "runs.csv")) == 2


@pytest.mark.slow
def test_an_added_norm_is_the_only_job_trained_with_parallel_jobs_too(bn_gn: Path, tmp_path: Path) -> None:
    # joblib composes each job's config in its own worker: the folder chosen for a job holds there as well.
    sweep = _copy(bn_gn, tmp_path)
    before = _summaries(sweep)
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli(["-m", "norm=ln,bn,gn", *TINY, *launcher, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = _summaries(sweep)
    assert {k: after[k] for k in before} == before
    assert _norms(sweep) == {"0": "bn", "1": "gn", "2": "ln"}  # ln is job #0 of this launch, in a new folder
    assert json.loads(after["2"][0])["status"] == "completed"


@pytest.mark.slow
def test_a_folder_whose_config_changed_under_the_same_overrides_is_refused(tmp_path: Path) -> None:
    # A preset of the user's own (like experiment/), edited between the two launches: the same command line.
    preset = tmp_path / "conf" / "mine" / "tiny.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text("# @package _global_\nepochs: 1\n")
    args = ["--config-dir", str(tmp_path / "conf"), "-m", "+mine=tiny", "norm=bn", "model=mlp"]
    sweep = tmp_path / "s"
    assert run_cli_here([*args, "batch_size=256", f"hydra.sweep.dir={sweep}"], tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}

    preset.write_text("# @package _global_\ndefaults:\n  - override /optimizer: sgd\nepochs: 2\n")
    proc = run_cli_here([*args, "batch_size=256", f"hydra.sweep.dir={sweep}"], tmp_path)  # refused before any job
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"{sweep / '0'} holds a job with another config (epochs=1 there, 2 now; " in output
    assert "; optimizer.lr=0.001 there, 0.05 now; " in output
    only = "1 key only the saved job has: optimizer.betas; and 2 keys only this job has: optimizer.momentum, optimizer"
    assert f"{only}.nesterov). Resume it with the command that started it" in output
    assert "(absent)" not in output and "Traceback" not in output
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before  # multirun.yaml too


@pytest.mark.slow
def test_a_parent_folder_of_two_sweeps_of_the_same_jobs_counts_each_job_once(bn_gn: Path, tmp_path: Path) -> None:
    for name in ("10-00-00", "10-05-00"):
        shutil.copytree(bn_gn, tmp_path / "2026-11-28" / name)
    proc = run_cli([str(tmp_path / "2026-11-28")], tmp_path, module="normsweep.aggregate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 jobs found in more than one folder, counted once" in proc.stderr
    results = pd.read_csv(tmp_path / "2026-11-28" / "results.csv")
    assert sorted(results["norm"]) == ["bn", "gn"] and list(results["runs"]) == [1, 1]
    runs = pd.read_csv(tmp_path / "2026-11-28" / "runs.csv")
    assert len(runs) == 2 and runs["duplicates"].str.startswith("10-0").all()
