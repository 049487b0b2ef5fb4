"""The Hydra callback that aggregates a sweep once every job has ended (conf/hydra/default.yaml). Hydra makes it in
every process, jobs included: the aggregation (pandas, matplotlib) is imported only when a sweep ends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process at the end of a multirun (normsweep.aggregate.end_of_sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if sys.exc_info()[1] is not None:
            # Hydra 1.4 calls this also while the sweep ends by an exception or an exit (Ctrl-C, a launch refused
            # before any job ran; 1.3 only once the jobs have ended): that ending, and its exit status, stand.
            return
        from normsweep.aggregate import end_of_sweep

        end_of_sweep(Path(config.hydra.sweep.dir), str(config.get("compare", "norm")))
