"""The sweeper composes every job before the first one starts (to place it in its folder and refuse a mistake once);
the basic launcher then trains each job with that config instead of composing it a second time."""

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

    def task(cfg: DictConfig) -> None:
        seen.append({"norm": cfg.norm.name, "seed": cfg.seed})

    overrides = ["norm=bn,gn", "seed=0,1", "epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
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
            returns = sweeper.sweep(arguments=overrides[:3])
    finally:
        GlobalHydra.instance().clear()
    assert type(sweeper).__name__ == "ResumingSweeper"
    assert all(isinstance(r, JobReturn) for batch in returns for r in batch)
    assert sorted(handed) == ["norm=bn", "norm=bn", "norm=gn", "norm=gn"]  # every job: none composed twice
    assert sorted((s["norm"], s["seed"]) for s in seen) == [("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1)]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


class _NoCallbacks:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
