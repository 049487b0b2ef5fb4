"""Beyond the defaults, end to end from the shell: a user's own model and data set, and the experiment presets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from conftest import ROOT, run_cli, run_cli_here

from normsweep.config.checks import options

EXAMPLE = ROOT / "examples" / "own_model"


def test_a_users_own_model_and_data_set_take_every_norm(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("multirun", "outputs", "__pycache__"))
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "--config-dir",
            "my_conf",
            "-m",
            "model=tiny_resnet",
            "dataset=stripes",
            "dataset.n=240",
            f"norm={','.join(options('norm'))}",
            "epochs=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = pd.read_csv(sweep / "results.csv")
    assert sorted(results["norm"]) == options("norm")  # every built-in norm, on a model normsweep never saw
    assert (results["status"] == "completed").all() and (results["runs"] == 1).all()
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["model"] == "tiny_resnet" and summary["dataset"] == "stripes"
    assert summary["config"]["dataset"]["n"] == 240  # the function's own argument, from the shell
    report = (sweep / "report.md").read_text()
    assert f"--config-dir {project / 'my_conf'} -m model=tiny_resnet" in report

    # The same files through hydra.searchpath instead of --config-dir, for a single run.
    single = tmp_path / "single"
    result = run_cli_here(
        [
            f"hydra.searchpath=[file://{project / 'my_conf'}]",
            "model=tiny_resnet",
            "dataset=stripes",
            "norm=gn",
            "epochs=1",
            "dataset.n=120",
            f"hydra.run.dir={single}",
        ],
        cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((single / "summary.json").read_text())["status"] == "completed"


def test_a_users_data_set_that_cannot_be_imported_is_explained(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "scans.yaml").write_text("_target_: my_scans.load\n")
    result = run_cli_here(["--config-dir", str(tmp_path / "conf"), "dataset=scans", "epochs=1"], cwd=tmp_path)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    said = "dataset=scans: cannot import _target_=my_scans.load (No module named 'my_scans'); the module must be"
    assert f"{said} importable from where normsweep runs" in output
    assert output.count("cannot import") == 1, output  # said once
    assert "Traceback" not in output


def test_the_quick_preset_takes_a_norm_list_from_the_shell(tmp_path: Path) -> None:
    result = run_cli_here(
        ["-m", "experiment=quick", "norm=bn,gn", "epochs=1", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(pd.read_csv(tmp_path / "results.csv")["norm"]) == ["bn", "gn"]  # the shell's list, not the preset's
    assert "`python -m normsweep -m experiment=quick norm=bn,gn epochs=1" in (tmp_path / "report.md").read_text()


def test_the_batch_size_preset_scales_the_learning_rate_and_plots_by_batch_size(tmp_path: Path) -> None:
    result = run_cli_here(
        [
            "-m",
            "+experiment=gn_batch_size",
            "batch_size=4,16",
            "epochs=1",
            "optimizer.schedule=constant",  # metrics.csv's lr (the epoch's last step) is then the scaled rate itself
            "dataset=synthetic",
            "dataset.size=120",
            "dataset.shape=[1,8,8]",
            "model.blocks=[1,1,1]",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(zip(runs["norm"], runs["batch_size"])) == [("bn", 4), ("bn", 16), ("gn", 4), ("gn", 16)]
    for job in runs["job"]:
        summary = json.loads((tmp_path / str(job) / "summary.json").read_text())
        first_lr = pd.read_csv(tmp_path / str(job) / "metrics.csv")["lr"].iloc[0]
        assert first_lr == 0.1 * summary["config"]["batch_size"] / 32  # the linear scaling rule
    report = (tmp_path / "report.md").read_text()
    assert "Test accuracy (%) by batch_size" in report and "## Best by norm" in report


def test_a_users_own_norm_and_optimizer_sweep_beside_the_built_in_ones(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("multirun", "outputs", "__pycache__"))
    sweep = tmp_path / "sweep"
    args = ["--config-dir", "my_conf", "-m", "norm=bn,myln,torch_in", "optimizer=adam,rmsprop", "epochs=1"]
    result = run_cli_here([*args, "batch_size=256", f"hydra.sweep.dir={sweep}"], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    results = pd.read_csv(sweep / "results.csv")
    assert sorted(zip(results["norm"], results["optimizer"])) == sorted(
        (norm, optimizer) for norm in ("bn", "myln", "torch_in") for optimizer in ("adam", "rmsprop")
    )
    assert (results["status"] == "completed").all()
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    rmsprop = next(s for s in summaries if s["optimizer"] == "rmsprop")
    assert rmsprop["config"]["optimizer"]["_target_"] == "torch.optim.RMSprop"

    # The norm's declared facts are checked like a built-in's: torch_in says it needs feature maps (refused before
    # training).
    single = tmp_path / "single"
    args = ["--config-dir", "my_conf", "model=mlp", "norm=torch_in", f"hydra.run.dir={single}"]
    result = run_cli_here(args, cwd=project)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "model=mlp norm=torch_in: layer fc1 has fc features (N, C)" in output and "Traceback" not in output


def test_a_misspelled_key_of_a_users_model_or_data_set_is_refused_before_any_job(tmp_path: Path) -> None:
    # Their keys are the arguments of the user's class and function: the closest one is named, with or without +.
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("multirun", "outputs", "__pycache__"))
    base = ["--config-dir", "my_conf", "-m", "model=tiny_resnet", "dataset=stripes", "norm=bn,gn", "epochs=1"]
    for typo, line in [
        (
            "+model.widht=8",
            "model.widht: model=tiny_resnet has no such key; did you mean model.width? its keys are width",
        ),
        (
            "+dataset.nn=240",
            "dataset.nn: dataset=stripes has no such key; did you mean dataset.n? its keys are n, size",
        ),
    ]:
        result = run_cli_here([*base, typo, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=project)
        output = result.stdout + result.stderr
        assert result.returncode == 2 and output.count(line) == 1, output
        assert "Traceback" not in output and not (tmp_path / "sweep").exists()
