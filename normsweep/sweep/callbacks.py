"""normsweep's Hydra callbacks (conf/hydra/default.yaml): the check before a single run enters an existing folder,
and the aggregation once every job of a sweep has ended. Hydra makes them in every process, jobs included: the
aggregation (pandas, matplotlib) is imported only when a sweep ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normsweep.sweep.resume import ResumeConflict, check_folder_name, check_resumable, refuse, task_config


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process at the end of a multirun (normsweep.results.write.end_of_sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if sys.exc_info()[1] is not None:
            # Hydra 1.4 calls this also while the sweep ends by an exception or an exit (Ctrl-C, a launch refused
            # before any job ran; 1.3 only once the jobs have ended): that ending, and its exit status, stand.
            return
        from normsweep.results.write import end_of_sweep

        end_of_sweep(Path(config.hydra.sweep.dir), str(config.get("compare", "norm")))


class ResumeCheck(Callback):
    """The same check for a single run, before Hydra writes into an existing `hydra.run.dir`.

    It also notes, for this process, the folders a single run makes (so that a run refused before training can
    take them away again) and the folder of a sweep (so that an interrupted sweep can say how to resume it).
    """

    # The run's folder, then the parents that may have been made for it, absolute; () when the folder was there.
    made: tuple[Path, ...] = ()
    sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ResumeCheck.sweep_dir = str(config.hydra.sweep.dir)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder_name(str(config.hydra.run.dir), "hydra.run.dir")
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
