"""normsweep's Hydra callbacks (conf/hydra/default.yaml): the check before a single run enters an existing folder,
and the aggregation once every job of a sweep has ended. Hydra makes them in every process, jobs included: the
aggregation (pandas, matplotlib) is imported only when a sweep ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normsweep.sweep.resume import ResumeConflict, check_folder_name, check_resumable, refuse, task_config
from normsweep.trackers import end_sweep

log = logging.getLogger("normsweep")


class AggregateCallback(Callback):
    """Aggregates a sweep once its jobs have ended (normsweep.results.write.end_of_sweep), as the launcher's last
    step: in a process started with the sweep, which has imported pandas and matplotlib while the jobs trained
    (results/warm.py), or here when that process is not there or those are imported here already."""

    # The warm process of the sweep this process launches. Not an attribute: launchers pickle the callbacks along
    # with the jobs (joblib, submitit), and a process handle cannot be pickled.
    warm: subprocess.Popen[str] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # One left by an earlier sweep of this process that ended before its end callback (Hydra 1.3 skips it when
        # the launch is refused): started elsewhere, for another sweep.
        stale, AggregateCallback.warm = AggregateCallback.warm, None
        if stale is not None:
            stale.kill()
        if "pandas" in sys.modules and "matplotlib.pyplot" in sys.modules:
            return  # nothing left to import: aggregated here (a test's process, a second sweep in one process)
        with contextlib.suppress(OSError):
            AggregateCallback.warm = subprocess.Popen(
                [sys.executable, "-m", "normsweep.results.warm"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # its own failure is seen as no answer; then the aggregation runs here
                text=True,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The trackers' record of the sweep (MLflow's parent run) gets the report once it is written, however the
        # aggregation ends: not an end callback of its own, which Hydra would skip after this one's sys.exit.
        try:
            self._aggregate(config)
        finally:
            end_sweep(config.get("logger"), Path(str(config.hydra.sweep.dir)), _ended(sys.exc_info()[1]))

    @staticmethod
    def _aggregate(config: DictConfig) -> None:
        warm, AggregateCallback.warm = AggregateCallback.warm, None
        if sys.exc_info()[1] is not None:
            # Hydra 1.4 calls this also while the sweep ends by an exception or an exit (Ctrl-C, a launch refused
            # before any job ran; 1.3 only once the jobs have ended): that ending, and its exit status, stand.
            if warm is not None:
                warm.kill()
            return
        sweep_dir, compare = str(config.hydra.sweep.dir), str(config.get("compare", "norm"))
        code = _aggregated_by(warm, sweep_dir, compare) if warm is not None else None
        if code is None:
            from normsweep.results.write import end_of_sweep

            end_of_sweep(Path(sweep_dir), compare)
        elif code:
            sys.exit(code)


def _ended(err: BaseException | None) -> str:
    """How a sweep ended, as the trackers are told: finished, failed (a job failed or stopped before its last
    epoch: the exit status 1 of end_of_sweep), or stopped (Ctrl-C, SIGTERM)."""
    if err is None or (isinstance(err, SystemExit) and not err.code):
        return "finished"
    return "stopped" if isinstance(err, KeyboardInterrupt) else "failed"


def _aggregated_by(warm: subprocess.Popen[str], sweep_dir: str, compare: str) -> int | None:
    """Have the warm process aggregate: its lines said here, in order, each on its own stream (its log records in
    this process's log); its exit status. None when it cannot (it died, or answered nothing): aggregate here."""
    from normsweep.results.warm import ERR, LOG

    assert warm.stdin is not None and warm.stdout is not None
    try:
        warm.stdin.write(json.dumps([sweep_dir, compare]) + "\n")
        warm.stdin.close()
    except OSError:  # it has ended already (an import failed)
        warm.kill()
        return None
    said = False
    for line in warm.stdout:
        said = True
        tag, text = line[:1], line[1:].rstrip("\n")
        if tag == LOG:
            level, _, message = text.partition(" ")
            log.log(int(level), "%s", message)
        else:
            print(text, file=sys.stderr if tag == ERR else sys.stdout, flush=True)
    code = warm.wait()
    return code if said or code == 0 else None


class ResumeCheck(Callback):
    """The same check for a single run, before Hydra writes into an existing `hydra.run.dir`.

    It also notes, for this process, the folders a single run makes (so that a run refused before training can
    take them away again) and the folder of a run or a sweep (so that one stopped can say how to resume it).
    """

    # The run's folder, then the parents that may have been made for it, absolute; () when the folder was there.
    made: tuple[Path, ...] = ()
    run_dir: str | None = None
    sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ResumeCheck.sweep_dir = str(config.hydra.sweep.dir)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder_name(str(config.hydra.run.dir), "hydra.run.dir")
        ResumeCheck.run_dir = str(config.hydra.run.dir)
        # A default folder is claimed (made) by resolving it; a named one is made later by Hydra, if missing.
        claimed = "normsweep.new_dir" in str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"])
        job_dir = Path(str(config.hydra.run.dir))
        if claimed:  # and maybe its parents below the working folder (outputs/DATE, outputs)
            made = [job_dir, *(job_dir.parents[:-1] if not job_dir.is_absolute() else ())]
        else:
            made = [folder for folder in (job_dir, *job_dir.parents) if not folder.exists()]
        ResumeCheck.made = tuple(Path(os.path.abspath(folder)) for folder in made)  # as Hydra's output_dir
        if job_dir.exists():
            try:
                check_resumable(job_dir, task_config(config), list(config.hydra.overrides.task))
            except ResumeConflict as err:
                refuse(err)
