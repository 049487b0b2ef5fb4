"""SLURM through hydra-submitit-launcher, fitted to the partition before submission and waited for by normsweep.

How it composes with upstream (hydra-submitit-launcher's `SlurmLauncher`, subclassed here):

- Upstream does what it does: its own `launch` builds the submitit executor from `self.params` (it knows which
  keys go to the executor's constructor, `max_num_timeout` and, where upstream has it, `python`, and which get the
  `slurm_` prefix), creates the sweep folder (applying `hydra.sweep.mode`), logs the jobs and submits them as one
  array with `executor.map_array`; in the job, upstream's `__call__` runs it and its `checkpoint` requeues it.
- normsweep adds only its own: before submission, `auto` resolved against what the partition offers and a request
  no node can satisfy refused (`self.params` then holds the fitted request, which upstream's launch hands to
  submitit); after it, the waiting. Upstream's launch ends in each job's `results()`, which blocks until every job
  has ended and raises at the first one that ended without a result, so the sweep would end without its tables;
  while upstream launches, the executor it builds hands it stand-ins that answer at once, and normsweep waits for
  the real jobs itself (asking squeue, recording in the job's folder a job SLURM cancelled, killed, timed out or
  could not start, through `record_failure`). The seam is upstream's launch building its executor as
  `submitit.AutoExecutor` and submitting with `map_array`, then asking each job for `results()` alone:
  `tests/test_launchers.py` runs upstream's launch against a fake sbatch to check exactly that, pyproject.toml pins
  the releases it passed with (`hydra-submitit-launcher>=1.2,<1.3`; raising the pin is running those tests on the
  new release), and a release that submits or asks otherwise while it launches is refused at launch in one line.

Copying upstream's launch instead (as this module once did) would miss what upstream adds to it; delegating all
of it is not possible, since it would wait in `results()`.

The logic is in `_core.py`, imported when a sweep launches: Hydra's plugin scan, run at every start of the app,
skips modules whose names start with `_`.
"""

# No `from __future__ import annotations`: Hydra's plugin scan execs this module outside sys.modules.

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig

from hydra_plugins.normsweep_launcher.config import OWN_KEYS


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, which checks the request against the partition before submitting
    and, instead of submitit's `results()`, waits for every job itself and returns a JobReturn for each, so that the
    sweep's aggregation runs even when SLURM ended some of them."""

    reports_progress = True  # its wait's line says where the sweep stands, with the time left: the sweeper says none

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.asked = dict(self.params)  # the keys as given, `auto` included
        # What upstream hands to submitit: normsweep's own keys out, the resources fitted once setup knows the
        # partition.
        self.own = {key: self.params.pop(key) for key in OWN_KEYS if key in self.params}
        self.partition: Any = None  # the partition's name ("": the cluster's default)
        self.request: Any = None  # _core.Request

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.normsweep_launcher import _core

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        _core.setup(self)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.normsweep_launcher import _core

        return _core.launch(self, job_overrides, initial_job_idx, submit=super().launch)
