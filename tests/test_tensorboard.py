"""logger=tensorboard and `python -m normsweep.aggregate --tensorboard`, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli_here

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install -e '.[tensorboard]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, metadata  # noqa: E402

from normsweep.aggregate import main as aggregate_main  # noqa: E402
from normsweep.config.errors import ConfigError  # noqa: E402
from normsweep.config.schema import LoggerConfig, TensorBoardConfig  # noqa: E402
from normsweep.sweep.files import write_diagnostics, write_metrics, write_summary  # noqa: E402
from normsweep.trackers import check_trackers  # noqa: E402
from normsweep.trackers.tensorboard import EPOCH_TAGS, FINAL_TAGS, FOLDER, TABLE_METRICS  # noqa: E402


def runs(sweep: Path) -> dict[str, EventAccumulator]:
    """Each run under `sweep` as `tensorboard --logdir SWEEP` names it, read whole: every event of every file, none
    dropped (TensorBoard's purge of steps written again would hide a duplicate)."""
    found = {}
    for events in sorted(sweep.glob(f"*/{FOLDER}/*/events.out.tfevents.*")):
        everything = {"scalars": 0, "tensors": 0}
        run = EventAccumulator(str(events.parent), size_guidance=everything, purge_orphaned_data=False)
        found[events.parent.relative_to(sweep).as_posix()] = run.Reload()
    return found


def scalars(run: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in run.Scalars(tag)] for tag in run.Tags()["scalars"]}


def hparams(run: EventAccumulator) -> dict[str, object]:
    content = run.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_run_matches_files(run: EventAccumulator, job: Path) -> None:
    """The run's scalars are the job's metrics.csv (step = epoch), diagnostics.csv and summary.json, each step once."""
    found = scalars(run)
    metrics = read_csv(job / "metrics.csv")
    for column, tag in EPOCH_TAGS.items():
        assert [step for step, _ in found[tag]] == [int(row["epoch"]) for row in metrics], tag
        assert [value for _, value in found[tag]] == pytest.approx([float(row[column]) for row in metrics], rel=1e-5)
    diagnostics = read_csv(job / "diagnostics.csv")
    for row in diagnostics:
        (value,) = [v for step, v in found[f"diag/{row['metric']}/{row['layer']}"] if step == int(row["epoch"])]
        assert value == pytest.approx(float(row["value"]), rel=1e-5, abs=1e-6)
    summary = json.loads((job / "summary.json").read_text())
    for key, tag in FINAL_TAGS.items():
        assert found[tag] == [(len(metrics), pytest.approx(summary[key], rel=1e-5))]
    assert len(found) == len(EPOCH_TAGS) + len(FINAL_TAGS) + len({(r["metric"], r["layer"]) for r in diagnostics})


def test_a_sweep_with_logger_tensorboard_has_one_run_per_job_with_its_files_and_hparams(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    args = ["-m", "norm=bn,gn", "epochs=2", "logger=tensorboard", f"hydra.sweep.dir={sweep}"]
    proc = run_cli_here(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Which trackers a job reported to is not one of its settings: no `logger` column, nor in the table's text.
    assert "logger" not in (sweep / "runs.csv").read_text().splitlines()[0].split(",")
    (fixed,) = [line for line in proc.stdout.splitlines() if line.startswith("same in every run:")]
    assert "epochs=2" in fixed and "logger" not in fixed

    live = runs(sweep)
    assert list(live) == ["0/tensorboard/norm=bn", "1/tensorboard/norm=gn"]  # one run per job, named by its norm
    for name, run in live.items():
        assert_run_matches_files(run, sweep / name.split("/")[0])
    # The HParams table: the same hparams in every job (the swept key), metrics read from the job's own run.
    assert [hparams(run) for run in live.values()] == [{"norm": "bn"}, {"norm": "gn"}]
    for run in live.values():
        content = run.PluginTagToContent("hparams")
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        assert [info.name for info in experiment.hparam_infos] == ["norm"]
        assert [m.name.tag for m in experiment.metric_infos] == list(TABLE_METRICS)
        assert set(TABLE_METRICS) <= set(run.Tags()["scalars"])
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert end.status == api_pb2.STATUS_SUCCESS

    # Written again from the files (as for a sweep that ran without the logger): the same runs, once each.
    before = {name: scalars(run) for name, run in live.items()}
    for _ in range(2):
        assert aggregate_main(["--tensorboard", str(sweep)]) == 0
        exported = runs(sweep)
        assert list(exported) == list(live)
        assert [len(list((sweep / name).iterdir())) for name in exported] == [1, 1]  # one event file, replaced
        for name, run in exported.items():
            assert scalars(run).keys() == before[name].keys()
            for tag, points in scalars(run).items():
                assert points == [(step, pytest.approx(value, rel=1e-5)) for step, value in before[name][tag]]
            assert hparams(run) == hparams(live[name])


@pytest.mark.slow
def test_every_trial_of_a_tuning_sweep_has_the_same_hparams(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="the tune extra is not installed: pip install -e '.[tune]'")
    sweep = tmp_path / "s"
    # One trial a study a round: both studies' first trials try the same rate (the same sampler seed), so a round
    # alone does not vary optimizer.lr; the sweep does, and every trial's HParams row must have it.
    args = ["-m", "experiment=tune", "norm=bn,gn", "hydra.sweeper.n_trials=2", "epochs=1", "logger=tensorboard"]
    proc = run_cli_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = runs(sweep)
    assert len(found) == 4
    assert {tuple(sorted(hparams(run))) for run in found.values()} == {("norm", "optimizer.lr")}


@pytest.mark.slow
def test_a_sweep_rerun_with_the_logger_added_gets_a_run_for_its_kept_jobs_too(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    first = run_cli_here(["-m", "norm=bn,gn", "epochs=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert first.returncode == 0 and not list(sweep.glob(f"*/{FOLDER}"))
    proc = run_cli_here(["-m", "norm=bn,gn,ln", "epochs=2", "logger=tensorboard", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a run written from its files for 2 jobs kept from before" in proc.stdout + proc.stderr
    found = runs(sweep)  # the two kept jobs' runs, written at the sweep's end, and the new job's, written live
    assert list(found) == ["0/tensorboard/norm=bn", "1/tensorboard/norm=gn", "2/tensorboard/norm=ln"]
    for name, run in found.items():
        assert_run_matches_files(run, sweep / name.split("/")[0])
    assert {tuple(hparams(run)) for run in found.values()} == {("norm",)}


def test_a_resumed_job_has_each_epoch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after its run has epoch 3 but its checkpoint only epoch 2, the job resumes from epoch 2: its run is
    rewritten from its files, and epoch 3 is not in it twice."""
    import normsweep.job.run
    from normsweep.trackers.tensorboard import JobRun

    real_save, real_epoch = normsweep.job.run.save_checkpoint, JobRun.epoch

    def no_checkpoint_of_epoch_3(job_dir: Path, state: dict, write=None) -> None:
        if state["epoch"] != 3:
            real_save(job_dir, state, write)

    def stopped_after_epoch_3(self: JobRun, metrics: dict, diagnostics: list) -> None:
        real_epoch(self, metrics, diagnostics)
        if metrics["epoch"] == 3:
            raise KeyboardInterrupt  # as a kill right after the events were written

    run_dir = tmp_path / "r"
    args = ["epochs=4", "logger=tensorboard", f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(normsweep.job.run, "save_checkpoint", no_checkpoint_of_epoch_3)
    monkeypatch.setattr(JobRun, "epoch", stopped_after_epoch_3)
    assert run_cli_here(args, tmp_path).returncode == 130
    (stopped,) = runs(tmp_path).values()
    assert [step for step, _ in scalars(stopped)["val/acc"]] == [1, 2, 3]

    monkeypatch.undo()
    monkeypatch.setenv("NORMSWEEP_SWEPT_KEYS", "norm,seed")  # left by a sweep: it does not describe a single run
    resumed = run_cli_here(args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint of epoch 2/4" in resumed.stdout
    (name, run), *others = runs(tmp_path).items()
    assert not others and name == "r/tensorboard/epochs=4"  # a single run: named by the keys it was given
    assert_run_matches_files(run, run_dir)  # epochs 1 to 4, each once
    assert hparams(run) == {"epochs": 4.0}
    assert len(list((tmp_path / name).iterdir())) == 1


def test_a_failing_tracker_costs_one_warning_and_the_job_completes(tmp_path: Path, monkeypatch) -> None:
    from normsweep.trackers.tensorboard import JobRun

    def broken(self: JobRun, metrics: dict, diagnostics: list) -> None:
        raise OSError("No space left for events")

    monkeypatch.setattr(JobRun, "epoch", broken)
    proc = run_cli_here(["epochs=2", "logger=tensorboard", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    warnings = [line for line in output.splitlines() if "logger=tensorboard" in line]
    assert len(warnings) == 1 and "OSError: No space left for events; it logs nothing more" in warnings[0], output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(read_csv(tmp_path / "r" / "metrics.csv")) == 2


def make_job(sweep: Path, num: int, overrides: list[str], status: str = "completed", epochs: int = 3) -> Path:
    """A job folder as a sweep run without a logger leaves it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = [
        {"epoch": e, "train_loss": 2 / e, "train_acc": 50 + e, "val_loss": 1 / e, "val_acc": 60 + e + num / 10}
        | {"lr": 0.01 / e, "epoch_seconds": 0.5, "images_per_second": 1000 + e}
        for e in range(1, epochs + 1)
    ]
    write_metrics(job, rows)
    diagnostics = [
        {"epoch": e, "layer": layer, "depth": depth, "metric": metric, "value": e * depth / 3}
        for e in range(1, epochs + 1)
        for depth, layer in enumerate(["features.1", "features.4"], 1)
        for metric in ("in_std", "grad_norm")
    ]
    write_diagnostics(job, diagnostics)
    config = {"norm": {"name": overrides[0].split("=")[1], "eps": 1e-5}, "optimizer": {"name": "adam", "lr": 0.01}}
    config |= {"seed": int(overrides[1].split("=")[1]), "epochs": epochs, "logger": {"tensorboard": None}}
    finals = {"test_acc": 90.0 + num, "test_loss": 0.3, "best_val_acc": 70.0} if status == "completed" else {}
    summary = {"status": status, "epochs_completed": epochs, "overrides": overrides, "config": config}
    write_summary(job, summary | finals)
    return job


def test_export_writes_every_job_that_trained_once_and_again_replaces_it(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for num, (norm, seed) in enumerate([("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1)]):
        make_job(sweep, num, [f"norm={norm}", f"seed={seed}", "epochs=3"])
    make_job(sweep, 4, ["norm=ln", "seed=0", "epochs=3"], status="incomplete", epochs=2)  # stopped: its 2 epochs
    (sweep / "5" / ".hydra").mkdir(parents=True)  # not started: no run
    (sweep / "5" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["norm=in", "seed=0", "epochs=3"]))

    for _ in range(2):
        assert aggregate_main(["--tensorboard", str(sweep)]) == 0
        assert "a run for each of 5 job folders written" in capsys.readouterr().out
        found = runs(sweep)
        assert list(found) == [
            "0/tensorboard/norm=bn,seed=0",
            "1/tensorboard/norm=bn,seed=1",
            "2/tensorboard/norm=gn,seed=0",
            "3/tensorboard/norm=gn,seed=1",
            "4/tensorboard/norm=ln,seed=0",
        ]
        for name, run in list(found.items())[:4]:
            assert_run_matches_files(run, sweep / name.split("/")[0])
        stopped = scalars(found["4/tensorboard/norm=ln,seed=0"])
        assert stopped["val/acc"] == [(1, pytest.approx(61.4)), (2, pytest.approx(62.4))] and "test/acc" not in stopped
        # `epochs` is the same in every job: the hparams are the swept keys, with their types.
        assert [hparams(run) for run in found.values()] == [
            {"norm": norm, "seed": seed} for norm, seed in [("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1), ("ln", 0)]
        ]


def test_a_missing_tensorboard_is_named_with_the_extra_before_anything_runs(tmp_path: Path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        check_trackers(LoggerConfig(tensorboard=TensorBoardConfig()))
    expected = "needs tensorboard, which is not installed: pip install 'normsweep[tensorboard]'"
    assert str(err.value) == f"logger=tensorboard {expected} (or leave logger out)"

    make_job(tmp_path, 0, ["norm=bn", "seed=0"])
    with pytest.raises(SystemExit):
        aggregate_main(["--tensorboard", str(tmp_path)])
    assert f"--tensorboard {expected}" in capsys.readouterr().err
    assert not (tmp_path / "0" / FOLDER).exists()


def test_a_key_of_a_tracker_not_chosen_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run_cli_here(["logger.tensorboard.flush=1", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "logger.tensorboard.flush=1: logger=tensorboard is not chosen, and its keys exist only once it is: add "
        "logger=tensorboard (both trackers: 'logger=[tensorboard,mlflow]')"
    )
    proc = run_cli_here(["logger=tensorboard", "logger.tensorboard.flush=1", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert proc.returncode == 2 and "logger.tensorboard.flush: no such key" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_export_imports_no_torch_and_a_job_with_the_logger_no_pandas(tmp_path: Path) -> None:
    from test_startup import _imported

    make_job(tmp_path / "sweep", 0, ["norm=bn", "seed=0"])
    script = (
        "import sys; from normsweep.aggregate import _export_tensorboard; from pathlib import Path; "
        f"_export_tensorboard(Path({str(tmp_path / 'sweep')!r})); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr
    assert runs(tmp_path / "sweep")
    run = ["epochs=1", "device=cpu", "logger=tensorboard", f"hydra.run.dir={tmp_path / 'run'}"]
    assert _imported(run, tmp_path) == {"torch"}
    assert runs(tmp_path)
