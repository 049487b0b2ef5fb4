"""`python -m normsweep`: compose the config with Hydra, validate it, run the job; in a sweep, a job that fails
is recorded in its folder and the sweep goes on."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from normsweep.config import ConfigError, RunConfig, config_dir, register_configs, validate
from normsweep.job import record_failure, run_job
from normsweep.placement import JOBS_AT_ONCE_ENV, available_cpus, fair_threads, job_device, pinned_gpus
from normsweep.resume import ResumeConflict, check_resumable, refuse, task_config

log = logging.getLogger("normsweep")
register_configs()


def place(run: RunConfig, job_num: int, in_sweep: bool) -> RunConfig:
    """The job's CPU threads (its fair share when jobs run side by side) and its GPU (spread over the GPUs)."""
    at_once = int(os.environ.get(JOBS_AT_ONCE_ENV, "1")) if in_sweep else 1
    threads = run.threads or fair_threads(available_cpus(), at_once)
    device = job_device(run.device, job_num, torch.cuda.device_count(), pinned_gpus(os.environ))
    return dataclasses.replace(run, threads=threads, device=device)


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
        job_num = hydra_cfg.job.num if in_sweep else 0  # a single run has no job number
        choices = hydra_cfg.runtime.choices
        run = place(validate(cfg, choices["model"], choices.get("dataset")), job_num, in_sweep)
        summary = run_job(run, job_dir, overrides, config)
    except KeyboardInterrupt:
        where = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if in_sweep else f"hydra.run.dir={job_dir}"
        log.warning(
            "interrupted; the checkpoint keeps the last finished epoch. To resume, run the same command with %s", where
        )
        sys.exit(130)
    except ResumeConflict as err:
        refuse(err)  # another job's folder: nothing is written into it, and the launch stops
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
