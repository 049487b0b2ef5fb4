"""`python -m normsweep`: compose the config with Hydra, validate it, run the job."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from normsweep.config import ConfigError, config_dir, register_configs, validate
from normsweep.job import run_job

log = logging.getLogger("normsweep")
register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        run = validate(cfg, model_name=hydra_cfg.runtime.choices["model"])
        summary = run_job(run, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    return summary["final_val_acc"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
