"""The sweeper composes every job before the first one starts (to place it in its folder and refuse a mistake once),
copying a job that differs from an earlier one only in plain values; the basic launcher then trains each job with
that config instead of composing it a second time. Every config must be the one Hydra would have composed."""

from __future__ import annotations

from pathlib import Path

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
