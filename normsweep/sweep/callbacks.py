"""The Hydra callback that aggregates a sweep once every job has ended (conf/hydra/default.yaml). Hydra makes it in
every process, jobs included: the aggregation (pandas, matplotlib) is imported only when a sweep ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class AggregateCallback(Callback):
    """Runs the aggregator in the launcher process at the end of a multirun (normsweep.aggregate.end_of_sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from normsweep.aggregate import end_of_sweep

        end_of_sweep(Path(config.hydra.sweep.dir), str(config.get("compare", "norm")))
