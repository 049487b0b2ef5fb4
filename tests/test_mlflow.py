"""logger=mlflow and `python -m normsweep.aggregate --mlflow`: what a user finds in MLflow, read back with MLflow's
own client, against a real `mlflow server` (started and stopped here, on 127.0.0.1) and the default SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, run_cli_here
from test_results import make_job

mlflow = pytest.importorskip("mlflow", reason="logger=mlflow needs mlflow: pip install 'normsweep[mlflow]'")

from normsweep.aggregate import main as aggregate_main  # noqa: E402
from normsweep.job import run as job_module  # noqa: E402
from normsweep.sweep.files import write_diagnostics  # noqa: E402
from normsweep.trackers import mlflow as tracker  # noqa: E402

EPOCH_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_second"]
FAST = ["epochs=2", "batch_size=128", "diagnostics=true"]


class Server:
    """`mlflow server` on a free 127.0.0.1 port, its backend an SQLite file in `folder`."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.db = f"http://127.0.0.1:{port}", f"sqlite:///{folder / 'server.db'}"
        self.log = folder / "server.log"
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", self.db, "--artifacts-destination", str(folder / "artifacts")),
        ]
        with open(self.log, "w") as log:  # its own process group: its workers stop with it
            self.process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=log, start_new_session=True)
        self._wait_up(deadline_s=180)  # a busy 2-core machine takes up to a minute

    def _wait_up(self, deadline_s: float) -> None:
        for _ in range(int(deadline_s / 0.25)):
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            try:  # the pause between two polls, which also sees the server die
                self.process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            break
        self.stop()
        pytest.fail(f"mlflow server did not come up at {self.url}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Gone at once, as a server that crashes or loses its machine (a graceful stop takes seconds)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "server"
    folder.mkdir()
    started = Server(folder)
    yield started
    started.stop()


def _runs(uri: str) -> pd.DataFrame:
    """Every run of the normsweep experiment, as a user lists them."""
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=["normsweep"])
    finally:
        mlflow.set_tracking_uri(None)


def _history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def _check_sweep(uri: str, sweep: Path, norms: list[str], epochs: int) -> pd.DataFrame:
    """One parent with the sweep's files, one FINISHED child per job with its params, each epoch metric once per
    epoch, diagnostics per layer, and the summary's numbers."""
    runs = _runs(uri)
    parents = runs[runs["tags.normsweep.sweep"] == str(sweep.resolve())]
    assert len(parents) == 1, runs
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent["run_id"])}
    assert {"report.md", "results.csv", "curves.png", "diagnostics.png"} <= artifacts
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]].sort_values("params.norm.name")
    assert sorted(children["params.norm.name"]) == sorted(norms)
    assert set(children["status"]) == {"FINISHED"} and set(children["tags.normsweep.status"]) == {"completed"}
    assert (children["params.epochs"] == str(epochs)).all() and (children["params.optimizer.name"] == "adam").all()
    assert sorted(children["tags.mlflow.runName"]) == sorted(f"norm={norm}" for norm in norms)
    for _, child in children.iterrows():
        job = sweep / child["tags.normsweep.job"]
        for key in [*EPOCH_METRICS, "diag/grad_norm/features.1", "diag/train_eval_gap"]:
            assert _history(uri, child["run_id"], key) == list(range(1, epochs + 1)), key
        summary = json.loads((job / "summary.json").read_text())
        assert child["metrics.test_acc"] == pytest.approx(summary["test_acc"])
        assert json.loads((job / "mlflow_run.json").read_text())["run_id"] == child["run_id"]
    return children


@pytest.mark.slow
def test_the_default_is_an_sqlite_file_in_the_sweep_folder_written_by_two_jobs_at_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn,gn", *FAST, "logger=mlflow", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "WARNING" not in output and "locked" not in output
    uri = f"sqlite:///{sweep.resolve() / 'mlflow.db'}"
    _check_sweep(uri, sweep, ["bn", "gn"], epochs=2)
    assert f"to see it: mlflow ui --backend-store-uri {uri}" in output
    assert (sweep / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()  # nothing in the working folder


@pytest.mark.slow
def test_a_tracking_server_gets_a_sweep_and_one_that_stops_mid_sweep_costs_the_sweep_nothing(
    tmp_path: Path, server, monkeypatch
) -> None:
    # One server for both (it takes 15-40 s to start here): first a 2-job sweep logged to it (jobs in processes of
    # their own attaching to the coordinator's parent run: the joblib test above, on the default SQLite file)...
    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn,gn", *FAST, "logger=mlflow", f"logger.mlflow.tracking_uri={server.url}"]
    proc = run_cli_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr
    _check_sweep(server.url, sweep, ["bn", "gn"], epochs=2)
    assert f"the sweep is the run {server.url}/#/experiments/" in proc.stdout + proc.stderr
    assert not (sweep / "mlflow.db").exists()

    # ...then a sweep during which the server goes down, after job 0's first epoch.
    logged = tracker.MlflowTracker.epoch

    def stop_after_the_first_epoch(self, metrics, diagnostics) -> None:
        logged(self, metrics, diagnostics)
        server.stop()  # job 0's epoch 2, job 1 and the sweep's end find it gone

    monkeypatch.setattr(tracker.MlflowTracker, "epoch", stop_after_the_first_epoch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a user's setting, used as it is: no 3 s of retries
    sweep = tmp_path / "stopped"
    proc = run_cli_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    results = pd.read_csv(sweep / "results.csv")
    assert sorted(results["norm"]) == ["bn", "gn"] and set(results["status"]) == {"completed"}
    warnings = [line for line in output.splitlines() if "WARNING" in line or "logger=mlflow: MlflowException" in line]
    assert len(warnings) == 3, output  # job 0's epoch 2, job 1's start, the sweep's end: one line each
    assert all(f"no answer from the tracking server {server.url}" in line for line in warnings), warnings
    assert "Traceback" not in output and "Retrying" not in output
    runs = _runs(server.db)  # the server's database, read directly
    parent = runs[runs["tags.normsweep.sweep"] == str(sweep.resolve())].iloc[0]
    children = runs[(runs["tags.mlflow.parentRunId"] == parent["run_id"]) & (runs["tags.normsweep.job"] == "0")]
    assert _history(server.db, children.iloc[0]["run_id"], "val_acc") == [1]


@pytest.mark.slow
def test_a_resumed_job_continues_its_own_run(tmp_path: Path, monkeypatch) -> None:
    real_save = job_module.save_checkpoint

    def stopped_in_epoch_3(job_dir: Path, state: dict, write=None) -> None:
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        real_save(job_dir, state, write)

    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn", "epochs=4", "batch_size=128", "logger=mlflow", f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(job_module, "save_checkpoint", stopped_in_epoch_3)
    assert run_cli_here(args, tmp_path).returncode == 130
    uri = f"sqlite:///{sweep.resolve() / 'mlflow.db'}"
    first = json.loads((sweep / "0" / "mlflow_run.json").read_text())["run_id"]
    stopped = mlflow.MlflowClient(uri).get_run(first)
    assert stopped.info.status == "KILLED" and stopped.data.tags["normsweep.status"] == "incomplete"
    assert _history(uri, first, "val_acc") == [1, 2]

    monkeypatch.setattr(job_module, "save_checkpoint", real_save)
    resumed = run_cli_here(args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint of epoch 2/4" in resumed.stdout + resumed.stderr
    runs = _runs(uri)
    assert len(runs) == 2  # the parent and its one child: the same run, continued
    assert json.loads((sweep / "0" / "mlflow_run.json").read_text())["run_id"] == first
    for key in ("val_acc", "lr", "diag/grad_norm/features.1"):
        assert _history(uri, first, key) == [1, 2, 3, 4], key
    assert mlflow.MlflowClient(uri).get_run(first).info.status == "FINISHED"


@pytest.mark.slow
def test_a_single_run_is_one_run_in_its_own_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli_here([*FAST, "logger=mlflow", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = _runs(f"sqlite:///{run.resolve() / 'mlflow.db'}")
    assert len(runs) == 1 and runs.iloc[0]["tags.normsweep.run"] == str(run.resolve())
    assert runs.iloc[0]["status"] == "FINISHED" and runs.iloc[0]["params.norm.name"] == "bn"


def _job_folders(sweep: Path) -> None:
    """Two finished jobs as normsweep writes them (metrics.csv, diagnostics.csv, summary.json with the config)."""
    for num, norm in enumerate(["bn", "gn"]):
        job = make_job(sweep, num, [f"norm={norm}", "seed=0"], 90.0 + num, seed=0)
        summary = json.loads((job / "summary.json").read_text())
        config = {"seed": 0, "epochs": 3, "norm": {"name": norm, "groups": 2}, "logger": {"mlflow": {}}}
        (job / "summary.json").write_text(json.dumps({**summary, "norm": norm, "config": config}))
        rows = [
            {"epoch": e, "layer": layer, "depth": d, "metric": "m", "value": e}
            for e in (1, 2, 3)
            for layer, d in (("features.1", 1), ("model", 0))
        ]
        write_diagnostics(job, rows)


def test_an_export_from_job_folders_is_idempotent(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    _job_folders(sweep)
    uri = f"sqlite:///{tmp_path / 'export.db'}"
    for _ in range(2):  # the second export finds every run again
        assert aggregate_main(["--mlflow", uri, str(sweep)]) == 0
        assert f"to see it: mlflow ui --backend-store-uri {uri}" in capsys.readouterr().out
        runs = _runs(uri)
        assert len(runs) == 3
        children = runs[runs["tags.mlflow.parentRunId"].notna()].sort_values("params.norm.name")
        assert list(children["params.norm.name"]) == ["bn", "gn"] and list(children["params.norm.groups"]) == ["2", "2"]
        assert "params.logger.mlflow" not in runs  # where it was logged is not a param
        assert list(children["tags.mlflow.runName"]) == ["norm=bn", "norm=gn"]  # what the jobs' overrides vary
        assert list(children["metrics.test_acc"]) == [89.0, 90.0]
        for run_id in children["run_id"]:
            for key in ("val_acc", "diag/m/features.1", "diag/m"):
                assert _history(uri, run_id, key) == [1, 2, 3]
            assert _history(uri, run_id, "test_acc") == [0]  # a single value: step 0, a bar in MLflow's charts
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database


def test_an_export_to_a_server_that_is_not_there_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a user's setting, used as it is: no retries to wait
    sweep = tmp_path / "sweep"
    _job_folders(sweep)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert aggregate_main(["--mlflow", f"http://127.0.0.1:{port}", str(sweep)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no answer from the tracking server http://127.0.0.1:{port}" in err[0]
    assert (sweep / "results.csv").is_file()  # aggregated all the same


IMPORTS = """
import contextlib, sys
from normsweep.cli import main
sys.argv = ["normsweep", "--help"]
with contextlib.suppress(SystemExit):
    main()
import normsweep.aggregate, normsweep.job.run, normsweep.results.write, normsweep.sweep.callbacks
import normsweep.trackers, normsweep.trackers.tensorboard
import hydra_plugins.normsweep_sweeper.resuming_sweeper, hydra_plugins.normsweep_sweeper.tuning_sweeper
print("MLFLOW=" + str("mlflow" in sys.modules))
"""


@pytest.mark.slow
def test_mlflow_is_imported_only_for_logger_mlflow(tmp_path: Path) -> None:
    # --help, then every module a sweep without logger=mlflow loads (the coordinator's, a job's, the aggregation's)
    proc = subprocess.run([sys.executable, "-c", IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "usage" in proc.stdout.lower() or "normsweep" in proc.stdout, proc.stdout + proc.stderr
    assert "MLFLOW=False" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "sqlite3:///runs.db", "s3://bucket/runs"])
def test_a_tracking_uri_mlflow_has_no_store_for_is_refused_before_anything_runs(tmp_path: Path, uri: str) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "norm=bn,gn", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={sweep}"]
    proc = run_cli_here(args, tmp_path)
    assert proc.returncode == 2
    (line,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "tracking_uri" in line and "store" in line]
    assert f"logger.mlflow.tracking_uri={uri}: MLflow has no store for" in line and "http://HOST:PORT" in line
    assert not sweep.exists()


@pytest.mark.parametrize(
    "uri", [None, "http://127.0.0.1:5000", "HTTPS://mlflow.example", "postgresql+psycopg2://u@h/db"]
)
def test_the_tracking_uris_mlflow_takes_pass_the_check(uri: str | None) -> None:
    from normsweep.config.schema import LoggerConfig, MlflowConfig
    from normsweep.trackers import check_trackers

    check_trackers(LoggerConfig(mlflow=MlflowConfig(tracking_uri=uri)))
