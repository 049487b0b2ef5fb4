"""A run's data, model and compute, built from its config: the one way the job, the benchmark and the tests build."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from normsweep.config.schema import Config
from normsweep.job.data import Data, known_shape, load
from normsweep.job.diagnostics import Diagnostics
from normsweep.job.layers import NormFactory, norm_factory
from normsweep.job.models import build_model
from normsweep.job.progress import EpochProgress
from normsweep.job.train import Compute, EpochMetrics, diverge_limit, fit, resolve_compute


@dataclass(frozen=True)
class Job:
    """A run's data and model, ready to train: the model's weights drawn from the run's seed, its norm layers made by
    `factory` (where the diagnostics find them), its arithmetic as `compute` says."""

    run: Config
    data: Data
    model: nn.Module
    factory: NormFactory
    compute: Compute

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @cached_property
    def chance_acc(self) -> float:
        """The validation accuracy of a model that learned nothing, in percent: always naming the split's largest
        class scores its share (where `stalled` is judged, and a search's trial at chance: job/run.py)."""
        return 100.0 * torch.bincount(self.data.val.labels).max().item() / len(self.data.val)

    @property
    def diverge_loss(self) -> float | None:
        """The training loss above which this run has diverged: its `diverge_loss` for its data set's classes."""
        return diverge_limit(self.run.diverge_loss, self.data.num_classes)

    def to(self, device: torch.device) -> Job:
        """The job with its data and model on `device`."""
        return replace(self, data=self.data.to(device), model=self.model.to(device))

    def probe(self, start: dict[str, torch.Tensor] | None = None, images: int | None = None) -> Diagnostics:
        """The diagnostics of the model's norm layers (diagnostics.py), on the probe batch of the run's seed."""
        run, slots = self.run, self.factory.slots(self.model)
        return Diagnostics(self.model, slots, self.data, run.batch_size, run.seed, self.compute, start, images)

    def train(
        self,
        on_epoch: Callable[[EpochMetrics, Callable[[], dict[str, Any]]], None] | None = None,
        state: dict[str, Any] | None = None,
        diagnose: Callable[[int], None] | None = None,
    ) -> list[EpochMetrics]:
        """Train as the run says (train.fit: its optimizer, epochs, batch size and seed; a long epoch's progress
        shown as its `progress` keys say), from `state` when given, up to the first epoch in which it diverges."""
        run = self.run
        progress = EpochProgress(run.epochs, run.progress.after_s, run.progress.every_s)
        return fit(
            self.model,
            self.data,
            run.optimizer,
            run.epochs,
            run.batch_size,
            run.seed,
            on_epoch,
            state=state,
            compute=self.compute,
            diverge_loss=self.diverge_loss,
            diagnose=diagnose,
            watch=progress.watch,
        )


def build(run: Config, device: torch.device, data: Data | None = None) -> Job:
    """The run's data set (or `data`, when given) and its model for those images, seeded and built on the CPU, with the
    compute `device` runs it in (train.resolve_compute; `.to(device)` moves the job there). Every check of a run on
    the model and its norm applies: a ConfigError names the key and the fix."""
    data = load(run.dataset, run.val_fraction, run.seed) if data is None else data
    torch.manual_seed(run.seed)
    c, h, w = data.shape
    name = run.model["name"]
    factory = norm_factory(run.norm, name)
    model = build_model(name, run.model, c, (h, w), data.num_classes, factory)
    return Job(run, data, model, factory, resolve_compute(run.precision, run.channels_last, run.compile, model, device))


def check_model(run: Config) -> None:
    """Build the run's model for its data set's images without loading them (data.known_shape), on the CPU: what the
    model and the norm must agree on (a norm that needs feature maps on an fc layer, groups that do not divide a
    layer's channels, ...) raises the ConfigError its job would. A user's data set is checked when its job loads it."""
    known = known_shape(run.dataset)
    if known is None:
        return
    (c, h, w), classes = known
    name = run.model["name"]
    build_model(name, run.model, c, (h, w), classes, norm_factory(run.norm, name))


def describe_compute(compute: Compute) -> str:
    """How a job's arithmetic runs, in the words of its log line: `fp32`, or `bf16, channels_last, compiled`."""
    layout = ", channels_last" if compute.channels_last else ""
    return f"{compute.precision}{layout}{', compiled' if compute.compile else ''}"
