"""The SLURM launcher's schema: hydra-submitit-launcher's SLURM keys, `auto` for the resources, and normsweep's own."""

# No `from __future__ import annotations`: Hydra's plugin scan execs this module outside sys.modules, where
# dataclasses with string annotations cannot be built.

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

AUTO = "auto"
OWN_KEYS = ("poll_s",)  # keys of this launcher that submitit does not know: kept from the parameters it is given


@dataclass
class NormsweepSlurmConf(SlurmQueueConf):
    """submitit's SLURM keys (every key upstream adds comes with it), with `auto` (what the partition's nodes offer)
    for the resources, and how often SLURM is asked about the jobs while the sweep waits."""

    _target_: str = "hydra_plugins.normsweep_launcher.slurm_launcher.SlurmLauncher"
    gpus_per_node: Any = AUTO  # auto: 1 on a partition with GPUs, none on a CPU-only one
    cpus_per_task: Any = AUTO  # auto: the job's share of a node (by its GPUs), at most 8
    mem_gb: Any = AUTO  # auto: the memory of the CPUs (or GPUs) the job takes, at most 32
    poll_s: int = 15  # seconds between two questions to squeue while waiting


ConfigStore.instance().store(
    group="hydra/launcher", name="normsweep_slurm", node=NormsweepSlurmConf, provider="normsweep"
)
