"""`python -m normsweep`: compose the config with Hydra, validate it, run the job; in a sweep, a job that fails
is recorded in its folder and the sweep goes on."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from normsweep.config import ConfigError, config_dir, register_configs, validate
from normsweep.job import record_failure, run_job
from normsweep.resume import ResumeConflict, check_resumable, task_config

log = logging.getLogger("normsweep")
register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    config = task_config(cfg)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        check_resumable(job_dir, config)  # first: a folder that is refused must not be marked failed either
        run = validate(cfg, model_name=hydra_cfg.runtime.choices["model"])
        summary = run_job(run, job_dir, overrides, config)
    except KeyboardInterrupt:
        where = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if in_sweep else f"hydra.run.dir={job_dir}"
        log.warning(
            "interrupted; the checkpoint keeps the last finished epoch. To resume, run the same command with %s", where
        )
        sys.exit(130)
    except ResumeConflict as err:
        # Another job's folder: nothing is written into it, and the launch stops.
        if full_error:
            raise
        log.error("%s", err)
        sys.exit(2)
    except Exception as err:
        record_failure(job_dir, err, overrides, config, dict(hydra_cfg.runtime.choices))
        user_error = isinstance(err, ConfigError)
        if in_sweep:
            # Isolated: Hydra would re-raise at the end of the batch and skip the aggregation.
            log.error("job failed: %s", err, exc_info=full_error or not user_error)
            return None
        if user_error and not full_error:
            log.error("%s", err)
            sys.exit(2)
        raise
    return summary.get("final_val_acc")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
