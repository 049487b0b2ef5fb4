"""The sweeper composes every job before the first one starts (to place it in its folder and refuse a mistake once),
copying a job that differs from an earlier one only in plain values; the basic launcher then trains each job with
that config instead of composing it a second time. Every config must be the one Hydra would have composed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf

from normsweep.config import hydra_compat
from normsweep.config.schema import config_dir, register_configs
from normsweep.sweep.compose import JobConfigs


def test_the_launcher_trains_each_job_with_the_config_it_would_have_composed(tmp_path: Path, monkeypatch) -> None:
    register_configs()
    GlobalHydra.instance().clear()
    handed: list[str] = []
    seen: list[dict] = []

    def compare(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        held = tuple(sweep_overrides) in self._ready
        config = real(self, master_config, sweep_overrides)
        fresh = self._loader.load_sweep_config(master_config, sweep_overrides)
        assert OmegaConf.to_yaml(config) == OmegaConf.to_yaml(fresh)  # every key, hydra's too, in its order
        if held:
            handed.append(sweep_overrides[0])
        return config

    made: list[JobConfigs] = []
    real_init = JobConfigs.__init__

    def keep(self, *args) -> None:
        real_init(self, *args)
        made.append(self)

    monkeypatch.setattr(JobConfigs, "__init__", keep)

    def task(cfg: DictConfig) -> None:
        seen.append({"norm": cfg.norm.name, "seed": cfg.seed, "lr": cfg.optimizer.lr})
        assert list(cfg.optimizer.betas) == [0.8, 0.9]

    overrides = [
        "norm=bn,gn",
        "seed=0,1",
        "optimizer.lr=0.01,1e-3",
        "optimizer.betas=[0.8,0.9]",
        "epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    try:
        with initialize_config_dir(config_dir=config_dir(), **hydra_compat.version_base()):
            loader = GlobalHydra.instance().config_loader()
            master = loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)
            context = HydraContext(config_loader=loader, callbacks=_NoCallbacks())
            sweeper = Plugins.instance().instantiate_sweeper(config=master, hydra_context=context, task_function=task)
            # Hydra imports its plugins anew when it scans them: the class to patch is the one it made.
            held_by = type(sweeper._composed)
            real = held_by.load_sweep_config
            monkeypatch.setattr(held_by, "load_sweep_config", compare)
            returns = sweeper.sweep(arguments=overrides[:-1])
    finally:
        GlobalHydra.instance().clear()
    assert type(sweeper).__name__ == "ResumingSweeper"
    assert all(isinstance(r, JobReturn) for batch in returns for r in batch)
    assert sorted(handed) == ["norm=bn"] * 4 + ["norm=gn"] * 4  # every job: none composed twice
    assert made[0].copies == 6  # composed by Hydra once per norm, the other values set on a copy
    assert sorted((s["norm"], s["seed"], s["lr"]) for s in seen) == [
        (norm, seed, lr) for norm in ("bn", "gn") for seed in (0, 1) for lr in (0.001, 0.01)
    ]
    assert sorted(int(p.name) for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == list(range(8))


class _NoCallbacks:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


# Composed beside the first job's torch import: in a forked child of a process that has not imported torch (a new
# interpreter, as `python -m normsweep -m ...` is); the configs it sends back must be the ones composed here.
_BESIDE = r"""
import os, sys
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf
from normsweep.config import hydra_compat
from normsweep.config.schema import config_dir, register_configs
from normsweep.sweep.compose import JobConfigs

register_configs()
stuck = sys.argv[1] == "stuck"  # the child never answers: the sweep composes here after the wait
jobs = [o.split() for o in sys.argv[2:]]
with initialize_config_dir(config_dir=config_dir(), **hydra_compat.version_base()):
    loader = GlobalHydra.instance().config_loader()
    if stuck:
        import time
        import normsweep.sweep.compose as compose
        compose.BESIDE_WAIT_S, parent, real = 0.0, os.getpid(), type(loader).load_sweep_config
        type(loader).load_sweep_config = lambda *a: time.sleep(600) if os.getpid() != parent else real(*a)
    master = loader.load_configuration("config", ["epochs=1"], run_mode=RunMode.MULTIRUN)
    beside, here = JobConfigs(loader, master), JobConfigs(loader, master)
    meanwhile = []
    try:
        beside.compose_beside(jobs, lambda: meanwhile.append(os.getpid()))
    except Exception as err:  # the first job: refused before the imports, as composing it here refuses it
        print("refused", type(err).__name__, str(err).splitlines()[0])
        try:
            here.compose(jobs[0])
        except Exception as same:
            assert type(same) is type(err) and str(same) == str(err) and meanwhile == []
        sys.exit(0)
    assert meanwhile == [os.getpid()] and "torch" not in sys.modules
    print("taken", len(beside.ready))
    for job in jobs:
        try:
            got = OmegaConf.to_yaml(beside.compose(job))
        except Exception as err:
            print("refused", type(err).__name__, str(err).splitlines()[0])
            try:
                here.compose(job)
            except Exception as same:
                assert type(same) is type(err) and str(same) == str(err)
            break
        assert got == OmegaConf.to_yaml(here.compose(job)), job  # every key, hydra's too, in its order
    assert beside.copies == here.copies
    print("copies", beside.copies, "left", len(beside.ready))
"""


def _composed_beside(jobs: list[str], stuck: bool = False) -> list[str]:
    import subprocess
    import sys

    command = [sys.executable, "-c", _BESIDE, "stuck" if stuck else "-", *jobs]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)  # this checkout's normsweep
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@pytest.mark.slow  # a new interpreter each
def test_a_forked_child_composes_the_jobs_while_the_first_one_imports_torch() -> None:
    jobs = ["norm=bn seed=0", "norm=gn seed=0", "norm=bn seed=1", "norm=ln optimizer.lr=0.1"]
    # bn here, gn and ln by Hydra in the child, the second bn job a copy of the first
    assert _composed_beside(jobs) == ["taken 3", "copies 1 left 0"]


@pytest.mark.slow  # a new interpreter each
def test_a_child_that_does_not_answer_is_not_waited_for() -> None:
    started = time.monotonic()
    assert _composed_beside(["norm=bn", "norm=gn"], stuck=True) == ["taken 1", "copies 0 left 0"]  # bn, here
    assert time.monotonic() - started < 60  # not the child's 600 s: killed after the wait, composed here


@pytest.mark.slow  # a new interpreter each
def test_a_job_that_hydra_refuses_is_refused_as_without_the_child() -> None:
    first = _composed_beside(["norm=nonexistent", "norm=bn"])  # the first: here, before anything is imported
    assert first[0].startswith("refused MissingConfigException") and "nonexistent" in first[0]
    said = _composed_beside(["norm=bn", "norm=gn", "norm=nonexistent", "norm=ln"])
    assert said[0] == "taken 2"  # the child stops at the job Hydra refuses: that one is composed here
    assert said[1].startswith("refused ") and "nonexistent" in said[1]


def test_with_torch_imported_the_jobs_are_composed_here() -> None:
    import torch  # noqa: F401  (a test process has it: forking it would copy its threads)
    from hydra.types import RunMode

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), **hydra_compat.version_base()):
            loader = GlobalHydra.instance().config_loader()
            master = loader.load_configuration("config", [], run_mode=RunMode.MULTIRUN)
            configs, called = JobConfigs(loader, master), []
            configs.compose_beside([["norm=bn"], ["norm=gn"]], lambda: called.append(True))
    finally:
        GlobalHydra.instance().clear()
    assert called == [True] and configs.ready == {}
