"""The training loop: device-resident data, index-sliced batches, one host sync per epoch. No files, no Hydra."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from normsweep.config import ConfigError, OptimizerConfig
from normsweep.data import Data, Split, augment, normalize

EVAL_BATCH = 1024


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float  # percent
    val_loss: float
    val_acc: float  # percent
    lr: float
    epoch_seconds: float  # training and validation of this epoch
    images_per_second: float  # training images per second of training time

    @property
    def finite(self) -> bool:
        """False once the run has diverged: a NaN or infinite loss."""
        return math.isfinite(self.train_loss) and math.isfinite(self.val_loss)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            f"device={name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
            "use device=auto or device=cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name}: MPS is not available here; use device=auto or device=cpu")
    return device


OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(params: object, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer.name={cfg.name!r}: normsweep builds {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches; a last batch of one sample joins the one before it, so BatchNorm always sees ≥ 2."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [n])]


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, data: Data) -> tuple[float, float]:
    """Mean loss and accuracy (percent) of `model` on an un-augmented split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    for s in batch_slices(len(split), EVAL_BATCH):
        logits = model(normalize(split.images[s], data))
        loss_sum += nn.functional.cross_entropy(logits, split.labels[s], reduction="sum")
        correct += (logits.argmax(1) == split.labels[s]).sum()
    model.train(was_training)
    n = len(split)
    return loss_sum.item() / n, 100.0 * correct.item() / n


def fit(
    model: nn.Module,
    data: Data,
    optimizer_cfg: OptimizerConfig,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochMetrics, Callable[[], dict[str, Any]]], None] | None = None,
    state: dict[str, Any] | None = None,
) -> list[EpochMetrics]:
    """Train `model` on `data` (both already on the device); returns one EpochMetrics per epoch.

    After each epoch `on_epoch(metrics, snapshot)` is called; `snapshot()` returns everything needed to continue
    exactly from there (weights, optimizer, scheduler, random state, history), and passing that back as `state`
    resumes the run: the remaining epochs give the same numbers as an uninterrupted run. Training stops after
    the first epoch whose loss is not finite (the run diverged); that epoch is the last one returned.
    """
    device = data.train.labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = build_optimizer(model.parameters(), optimizer_cfg)
    scheduler = build_scheduler(optimizer, optimizer_cfg.schedule, epochs)
    history: list[EpochMetrics] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        history = [EpochMetrics(**m) for m in state["history"]]

    def snapshot() -> dict[str, Any]:
        return {
            "epoch": len(history),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            "history": [asdict(m) for m in history],
        }

    n = len(data.train)
    for epoch in range(len(history) + 1, epochs + 1):
        start = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for s in batch_slices(n, batch_size):
            idx = order[s]
            images = augment(data.train.images[idx], data.crop_padding, data.hflip, generator)
            labels = data.train.labels[idx]
            logits = model(normalize(images, data))
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
        train_loss, train_correct = loss_sum.item() / n, correct.item()
        train_seconds = time.perf_counter() - start
        scheduler.step()
        val_loss, val_acc = evaluate(model, data.val, data)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=100.0 * train_correct / n,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=lr,
            epoch_seconds=time.perf_counter() - start,
            images_per_second=n / train_seconds,
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, snapshot)
        if not metrics.finite:
            break
    return history
