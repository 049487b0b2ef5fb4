"""What every norm layer does inside the network, measured at the end of each epoch on one fixed probe batch: the
statistics of its input and output, the gradient reaching it, the change of the weight before it, and the gap
between the model's loss in training and in eval mode. Rows in long format, for job.py to write; no files here."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normsweep.job.data import Data, normalize
from normsweep.job.train import Compute, batch_slices

PROBE_IMAGES = 256  # the most images a probe batch holds
PROBE_SHARE = 20  # and at most 1/PROBE_SHARE of the training split, so a small data set's epoch pays ≤ ~5% for it
MIN_PROBE_IMAGES = 32  # but never fewer (or every training image, when there are fewer)
PROBE_SEED = 0x9E37  # the probe's own generator: drawing it leaves the training's random streams untouched
LAYER_METRICS = ("in_mean", "in_std", "out_mean", "out_std", "grad_norm", "weight_norm", "update_ratio")
MODEL_LAYER = "model"  # the `layer` of a row about the whole model (train_eval_gap), at depth 0
COLUMNS = ("epoch", "layer", "depth", "metric", "value")
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def probe_size(train_images: int) -> int:
    """How many training images the probe batch holds: PROBE_IMAGES, or a twentieth of a small training split."""
    return min(train_images, PROBE_IMAGES, max(MIN_PROBE_IMAGES, train_images // PROBE_SHARE))


def _raw_weight(module: nn.Module) -> torch.Tensor:
    """The weight the optimizer steps: under a parametrization (ws_gn's standardization), the original."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations.weight.original
    return module.weight


class _Moments:
    """The count, mean and variance of a tensor's values, per chunk of the probe batch (kept on the device: read
    once, at the end), and combined over the chunks."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        var, mean = torch.var_mean(x, correction=0)
        self.chunks.append(torch.stack([torch.tensor(float(x.numel()), device=x.device), mean, var]))

    def mean_std(self) -> tuple[float, float]:
        if not self.chunks:
            return math.nan, math.nan
        counts, means, variances = torch.stack(self.chunks).double().cpu().unbind(1)
        n = counts.sum()
        mean = (counts * means).sum() / n
        spread = (counts * (variances + (means - mean).square())).sum()  # within and between the chunks
        return mean.item(), math.sqrt(spread.item() / max(n.item() - 1, 1))


@dataclass
class _Slot:
    name: str
    module: nn.Module
    depth: int = 0  # 1 for the first norm layer the forward pass reaches
    weight: str | None = None  # the conv/linear run last before it, whose weight it normalizes
    seen: bool = False
    inputs: _Moments = field(default_factory=_Moments)
    outputs: _Moments = field(default_factory=_Moments)
    grad_squares: list[torch.Tensor] = field(default_factory=list)


class Diagnostics:
    """Measures `slots` (name → norm layer of `model`, as NormFactory.slots gives them) on a fixed probe batch.

    Created before training: the first epoch's update_ratio starts from the weights as they are then, or as in
    `start` (the state_dict of the checkpoint a resumed run continues from). The probe batch holds `images`
    training images (default: probe_size of the training split), drawn by the probe's own generator;
    `measure(epoch)` after each epoch returns that epoch's rows and leaves the model, its buffers (BatchNorm's
    running statistics), its gradients and every random generator exactly as it found them.
    """

    def __init__(
        self,
        model: nn.Module,
        slots: list[tuple[str, nn.Module]],
        data: Data,
        batch_size: int,
        seed: int,
        compute: Compute,
        start: dict[str, torch.Tensor] | None = None,
        images: int | None = None,
    ) -> None:
        self.model = model
        self.slots = [_Slot(name, module) for name, module in slots]
        self.batch_size = batch_size
        self.compute = compute
        self.device = data.train.labels.device
        generator = torch.Generator().manual_seed(seed * 1_000_003 + PROBE_SEED)
        n = len(data.train)
        size = min(n, images or probe_size(n))
        index = torch.randperm(n, generator=generator)[:size].sort().values.to(self.device)
        self.images = normalize(data.train.images[index], data, compute.memory_format)
        self.labels = data.train.labels[index]
        self.weights = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
        self._order_slots()
        self.before = self._weights_now(start)

    def _order_slots(self) -> None:
        """Depth is the order in which one forward pass reaches the slots; each slot's weight is the conv/linear
        that ran last before it."""
        calls: list[tuple[str, str]] = []
        hooks = [m.register_forward_hook(self._note(calls, "weight", n)) for n, m in self.weights.items()]
        hooks += [s.module.register_forward_pre_hook(self._note(calls, "slot", s.name)) for s in self.slots]
        try:
            with self._unchanged(), torch.no_grad():
                self.model.eval()
                self.model(self.images[:2])
        finally:
            for hook in hooks:
                hook.remove()
        by_name = {s.name: s for s in self.slots}
        last_weight, depth = None, 0
        for kind, name in calls:
            if kind == "weight":
                last_weight = name
            elif not by_name[name].seen:
                depth += 1
                slot = by_name[name]
                slot.seen, slot.depth, slot.weight = True, depth, last_weight
        self.slots = sorted((s for s in self.slots if s.seen), key=lambda s: s.depth)

    @staticmethod
    def _note(calls: list[tuple[str, str]], kind: str, name: str) -> Any:
        return lambda *_: calls.append((kind, name))

    def _weights_now(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The raw weight of each conv/linear before a slot, from the model or from a state_dict of it."""
        used = {s.weight for s in self.slots if s.weight is not None}
        keys = {id(p): key for key, p in self.model.named_parameters()}
        weights = {}
        for name in used:
            weight = _raw_weight(self.weights[name])
            weight = weight if state is None else state[keys[id(weight)]]
            weights[name] = weight.detach().to(self.device, torch.float32, copy=True)
        return weights

    @contextlib.contextmanager
    def _unchanged(self) -> Iterator[None]:
        """The model's mode and buffers, and torch's random state (dropout in a user's model), as they were."""
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        training = self.model.training
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])
            self.model.train(training)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.compute.autocast(self.device):
            logits = self.model(images)
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")

    def measure(self, epoch: int) -> list[dict[str, Any]]:
        """This epoch's rows: per slot its LAYER_METRICS, and the model's train_eval_gap."""
        for slot in self.slots:
            slot.inputs, slot.outputs, slot.grad_squares = _Moments(), _Moments(), []
        n = len(self.labels)
        hooks = []
        for slot in self.slots:
            hooks.append(slot.module.register_forward_pre_hook(self._on_input(slot)))
            hooks.append(slot.module.register_forward_hook(self._on_output(slot)))
        try:
            with self._unchanged():
                # Training mode, in chunks of the training batch size: the normalization the training steps saw.
                self.model.train()
                train_loss = torch.zeros((), device=self.device)
                for s in batch_slices(n, self.batch_size):
                    images = self.images[s].detach().requires_grad_()
                    loss = self._loss(images, self.labels[s])
                    # The gradient of the mean loss over the probe batch, taken to the images only: every slot's
                    # tensor hook sees it pass, and no parameter's .grad changes.
                    torch.autograd.grad(loss / n, images)
                    train_loss += loss.detach()
                self.model.eval()
                with torch.no_grad():
                    eval_loss = self._loss(self.images, self.labels)
                gap = (train_loss - eval_loss).item() / n
        finally:
            for hook in hooks:
                hook.remove()
        return self._rows(epoch, gap)

    def _on_input(self, slot: _Slot) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            slot.inputs.add(x)
            if x.requires_grad:
                # Registered before the layer runs: an in-place activation after an identity slot (norm=none) does
                # not change which gradient this hook receives (the one of the slot's input).
                x.register_hook(self._on_grad(slot))

        return hook

    @staticmethod
    def _on_output(slot: _Slot) -> Any:
        return lambda _module, _args, out: slot.outputs.add(out)

    @staticmethod
    def _on_grad(slot: _Slot) -> Any:
        def hook(grad: torch.Tensor) -> None:
            slot.grad_squares.append(grad.detach().float().square().sum())

        return hook

    def _rows(self, epoch: int, gap: float) -> list[dict[str, Any]]:
        now = self._weights_now()
        rows = []
        for slot in self.slots:
            (in_mean, in_std), (out_mean, out_std) = slot.inputs.mean_std(), slot.outputs.mean_std()
            grad = torch.stack(slot.grad_squares).sum().sqrt().item() if slot.grad_squares else math.nan
            values = {"in_mean": in_mean, "in_std": in_std, "out_mean": out_mean, "out_std": out_std, "grad_norm": grad}
            if slot.weight is not None:
                weight, before = now[slot.weight], self.before[slot.weight]
                values["weight_norm"] = weight.norm().item()
                values["update_ratio"] = ((weight - before).norm() / before.norm()).item()
            rows += [
                {"epoch": epoch, "layer": slot.name, "depth": slot.depth, "metric": metric, "value": value}
                for metric, value in values.items()
            ]
        self.before = now
        rows.append({"epoch": epoch, "layer": MODEL_LAYER, "depth": 0, "metric": "train_eval_gap", "value": gap})
        return rows
