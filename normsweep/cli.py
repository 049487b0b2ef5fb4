"""The command line: compose the config with Hydra, validate it, run the job; in a sweep, a job that fails is
recorded in its folder and the sweep goes on. A user's error is one line and exit status 2.

Only Hydra and the torch-free config records are imported at start-up: `--help` and `--cfg job` do not pay for torch;
a job imports the training code when it runs."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normsweep import startup
from normsweep.config import hydra_compat
from normsweep.config.checks import unknown_key, unknown_model_key, unknown_option_key, validate
from normsweep.config.errors import USER_FULL_ERROR, ConfigError, full_error
from normsweep.config.schema import Config, config_dir, register_configs
from normsweep.job.placement import JOBS_AT_ONCE_ENV, available_cpus, fair_threads, job_device, pinned_gpus
from normsweep.job.signals import (
    hold_ctrl_c,
    hold_ctrl_c_in_workers,
    quiet_worker_cleanup,
    stop_on_sigterm,
    stopped_by,
)
from normsweep.sweep.callbacks import ResumeCheck
from normsweep.sweep.files import (
    TRIAL_KEY,
    DiskFull,
    disk_full,
    full_disk_line,
    override_key,
    record_failure,
)
from normsweep.sweep.hosting import run_packed
from normsweep.sweep.packing import JOB_NUM_ENV, PACK_ENV, read_pack
from normsweep.sweep.resume import ResumeConflict, check_resumable, keep_saved_behaviour, refuse, task_config
from normsweep.sweep.studies import JobTrial
from normsweep.sweep.tags import JobTag, job_swept_keys, telling_apart
from normsweep.trackers import unchosen_tracker_key

log = logging.getLogger("normsweep")
register_configs()


def discard_unused_run_dir(job_dir: Path, log_name: str) -> bool:
    """Remove the folder of a single run refused before training, and the parents made for it that are left
    empty, if this run made the folder and it holds nothing but Hydra's .hydra/ and the empty log. True if so."""
    made = ResumeCheck.made
    log_file = job_dir / log_name
    if not made or made[0] != job_dir or not set(os.listdir(job_dir)) <= {".hydra", log_name}:
        return False
    if (log_file.is_file() and log_file.stat().st_size) or not _only_hydra_files(job_dir / ".hydra"):
        return False
    root = logging.getLogger()
    for handler in list(root.handlers):  # the log file goes with its folder
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == job_dir:
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(job_dir)
    for parent in made[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty: another run's, or the user's
            break
    return True


def _only_hydra_files(folder: Path) -> bool:
    return not folder.exists() or set(os.listdir(folder)) <= {"config.yaml", "hydra.yaml", "overrides.yaml"}


def report_single_run(job_dir: Path, hydra_cfg: DictConfig, cfg: DictConfig) -> None:
    """The last lines of a single run: what the config sweeps only with -m (a preset's sweeper params), and where
    the run's files are."""
    given = {override_key(o) for o in hydra_cfg.overrides.task}
    unswept = {k: v for k, v in (hydra_cfg.sweeper.get("params") or {}).items() if k not in given}
    if unswept:
        choices = hydra_cfg.runtime.choices
        ran = " ".join(f"{k}={choices[k] if k in choices else OmegaConf.select(cfg, k)}" for k in unswept)
        log.info(
            "ran one job (%s); the config sweeps %s only with -m: python -m normsweep -m %s",
            ran,
            " ".join(f"{k}={v}" for k, v in unswept.items()),
            " ".join(shlex.quote(a) for a in sys.argv[1:]),
        )
    files = ", ".join(f for f in ("summary.json", "metrics.csv", "diagnostics.csv") if (job_dir / f).is_file())
    shown = os.path.relpath(job_dir) if job_dir.is_relative_to(Path.cwd()) else str(job_dir)
    log.info("results: %s (%s)", shown, files)


def place(run: Config, job_num: int, in_sweep: bool) -> tuple[Config, int]:
    """The job's GPU (spread over the GPUs) and its share of the CPUs (when jobs run side by side), within which
    `threads=0` picks its thread count (threads.py)."""
    import torch

    at_once = int(os.environ.get(JOBS_AT_ONCE_ENV, "1")) if in_sweep else 1
    device = job_device(run.device, job_num, torch.cuda.device_count(), pinned_gpus(os.environ))
    return dataclasses.replace(run, device=device), fair_threads(available_cpus(), at_once)


@hydra.main(config_path=config_dir(), config_name="config", **hydra_compat.main_options())
def app(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    keep_saved_behaviour(job_dir, cfg, overrides)  # a folder saved before a key was added resumes the old way
    config = task_config(cfg)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # A sweep whose jobs train in packs launches fewer jobs than it has: its launcher numbers them in launch order,
    # the sweeper says each one's own number (its position in the sweep, as its folder and its tag name it).
    job_num = int(os.environ.get(JOB_NUM_ENV) or hydra_cfg.job.num) if in_sweep else 0  # a single run has none
    tag = JobTag(job_num, telling_apart(overrides)) if in_sweep else None
    if tag:
        tag.attach()
    trial = JobTrial.from_env(os.environ) if in_sweep else None  # a tuning sweep's trial (sweep/studies.py)
    try:
        hold_ctrl_c(False)  # a Ctrl-C held back while this (worker) process started up arrives here
        with stop_on_sigterm():
            check_resumable(job_dir, config)  # first: a folder that is refused must not be marked failed either
            choices = hydra_cfg.runtime.choices
            checked = validate(cfg, dict(choices))  # a mistake is named before torch is imported: in ~1 s, not ~4
            from normsweep.job.run import run_job  # torch: only once a job runs

            startup.settle()

            run, cpus = place(checked, job_num, in_sweep)
            sweep_dir = Path(hydra_cfg.sweep.dir) if in_sweep else None
            swept = job_swept_keys(overrides, in_sweep)
            guests = read_pack(os.environ.get(PACK_ENV)) if in_sweep else []
            if guests:  # this job hosts a pack (sweep/packing.py): it trains the others with it
                summary = run_packed(
                    run, cpus, Path(hydra_cfg.sweep.dir), job_dir, overrides, config, guests, tag, swept, trial
                )
            else:
                summary = run_job(run, job_dir, overrides, config, cpus, trial, sweep_dir, swept)
    except KeyboardInterrupt as err:
        what, status = stopped_by(err)
        if multiprocessing.parent_process() is not None:  # a joblib worker: its launcher says how to resume
            log.warning("%s; the checkpoint keeps the last finished epoch", what)
            raise
        where = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if in_sweep else f"hydra.run.dir={job_dir}"
        log.warning(
            "%s; the checkpoint keeps the last finished epoch. To resume, run the same command with %s", what, where
        )
        sys.exit(status)
    except ResumeConflict as err:
        refuse(err)  # another job's folder: nothing is written into it, and the launch stops
    except Exception as err:
        if disk_full(err):  # not this job's failure: the sweep stops (main), and the same command resumes the job
            raise DiskFull(err) from err
        user_error = isinstance(err, ConfigError)
        if in_sweep or not (user_error and discard_unused_run_dir(job_dir, f"{hydra_cfg.job.name}.log")):
            recorded = {TRIAL_KEY: trial.record} if trial else {}  # a failed trial is still its study's
            record_failure(job_dir, err, overrides, config, dict(hydra_cfg.runtime.choices), **recorded)
        if in_sweep:
            # Isolated: Hydra would re-raise at the end of the batch and skip the aggregation.
            log.error("job failed: %s", err, exc_info=full_error() or not user_error)
            return None
        if user_error and not full_error():
            log.error("%s", err)
            sys.exit(2)
        raise
    finally:
        if tag:
            tag.detach()
    if not in_sweep:
        report_single_run(job_dir, hydra_cfg, cfg)
    return summary.get("final_val_acc")


def main() -> None:
    # `experiment` is a group of the defaults list (experiment=quick); `+experiment=quick`, the form of Hydra's
    # docs and of normsweep 0.1, would be refused by Hydra as a second value: it means the same thing.
    sys.argv = [arg[1:] if arg.startswith("+experiment=") else arg for arg in sys.argv]
    sweep = any(arg in ("-m", "--multirun") for arg in sys.argv[1:])
    if sweep:
        quiet_worker_cleanup()  # before the first worker, and its resource tracker, starts
    undo = hold_ctrl_c_in_workers() if sweep and hasattr(signal, "pthread_sigmask") else None
    saved_env = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", USER_FULL_ERROR)}
    os.environ[USER_FULL_ERROR] = "1" if full_error() else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its composition errors here instead of printing them
    try:
        with stop_on_sigterm():  # `kill` of the sweep stops it as Ctrl-C does, between its jobs too
            app()
    except (HydraException, OmegaConfBaseException) as err:
        if full_error():
            raise
        print(hydra_error_line(err), file=sys.stderr)
        sys.exit(2)
    except AssertionError:  # OmegaConf's, setting a key under a node that is null: a tracker not chosen
        if full_error() or not (line := unchosen_tracker_key(sys.argv[1:])):
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        # Jobs that run in this process say how to resume themselves (app); this is the launcher of jobs run in
        # other processes (joblib), or a sweep stopped before its first job or between two, or while it aggregates.
        what, status = stopped_by(err)
        if ResumeCheck.sweep_dir is None:
            print(f"{what} before any job started", file=sys.stderr)
        else:
            print(
                f"{what}; each job's checkpoint keeps its last finished epoch. To resume, run the same command "
                f"with hydra.sweep.dir={ResumeCheck.sweep_dir}",
                file=sys.stderr,
            )
        sys.exit(status)
    except (DiskFull, OSError) as err:
        stop_on_full_disk(err, sweep)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if undo:
            undo()


def stop_on_full_disk(err: DiskFull | OSError, sweep: bool) -> None:
    """A full disk, met by a job or by Hydra writing its files: one line naming where, with how to resume once there
    is space, and exit status DiskFull.status. Any other OSError is not this: it goes on as it was raised."""
    cause = err.args[0] if isinstance(err, DiskFull) else err
    if not disk_full(cause):
        raise err
    folder = (ResumeCheck.sweep_dir if sweep else ResumeCheck.run_dir) or os.path.dirname(cause.filename or "")
    if full_error():
        traceback.print_exception(err)
    print(full_disk_line(cause, folder or os.getcwd(), sweep), file=sys.stderr)
    sys.exit(DiskFull.status)


def hydra_error_line(err: Exception) -> str:
    """A mistake Hydra found while composing the config (a wrong type, an unknown key or option, an override it
    cannot parse), in one line naming what the user typed and the fix."""
    said = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    reason = str(getattr(cause, "msg", cause) or "").splitlines()[0] if cause else ""
    first = said[0] if said else type(err).__name__
    merging = re.match(r"Error merging override (\S+)", first)
    override = re.match(r"Could not (?:override|append to) '([^']+)'", first)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", first)
    if override and "." not in override.group(1):
        return unknown_key(override.group(1))  # not Hydra's hint to add it with +: a typo is not a new key
    if override and override.group(1).startswith("model."):
        return unknown_model_key(override.group(1), _chosen("model"))
    if override:
        return unknown_option_key(override.group(1), reason)
    if merging:
        return f"{merging.group(1)}: {reason or first}"
    if missing:
        group, option = missing.groups()
        offered = [line for line in said[1:] if not line.startswith(("Available", "Config search path", "provider"))]
        choices = f"; choose one of {', '.join(offered)}" if offered else ""
        return f"{group}={option}: no such option in conf/{group}/{choices}"
    if re.search(r"does not support sweep type : INTERVAL_SWEEP", first):
        return (
            "an interval (interval(...)) is searched, not swept as a grid: add hydra/sweeper=tune to search it with "
            "Optuna (docs/tuning.md), or give a list of values (optimizer.lr=1e-3,1e-2)"
        )
    if isinstance(err, OverrideParseException):
        return f"cannot read the command line ({first}); see python -m normsweep --help for the override syntax"
    return f"{first}{f': {reason}' if reason and reason not in first else ''}"


def _chosen(group: str) -> str | None:
    """The option of `group` the command line names (the first, for a sweep over several), or None."""
    given = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith(f"{group}=")]
    return given[-1].split(",")[0] if given else None


def console() -> None:
    """The process's entry (`python -m normsweep`, the `normsweep` script): main(), and an exit without the
    interpreter's teardown. Freeing torch's, pandas' and matplotlib's modules takes 0.5-1 s after the last line of a
    sweep (measured in docs/performance.md). The interpreter's own shutdown still runs up to that point (threads
    joined, joblib's workers ended, exit handlers registered since start-up run); only the freeing is skipped."""
    status = [1]  # until main() ends: an exception that escapes it is exit status 1, as the interpreter has it

    def end_now() -> None:  # the first exit handler registered here runs after those registered later
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status[0])

    atexit.register(end_now)
    startup.hold()
    try:
        main()
        status[0] = 0
    except SystemExit as exit_:
        status[0] = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    finally:
        startup.settle(freeze=False)
