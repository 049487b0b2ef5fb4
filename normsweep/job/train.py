"""The training loop: device-resident data, index-sliced batches, one host sync per epoch. No files, no Hydra."""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsweep.config.errors import ConfigError
from normsweep.config.optimizers import OptimizerConfig
from normsweep.job.data import Data, Split, crop_and_flip, normalize, pad_for_crops
from normsweep.job.optim import build_optimizer, build_scheduler, last_lr, step_function, without_dynamo
from normsweep.job.placement import available_cpus

EVAL_BATCH = 1024
# diverge_loss=auto: a run has diverged once an epoch's mean training loss exceeds DIVERGE_FACTOR × ln(classes), the
# loss of a uniform guess times 10: a mean probability of classes^-10 on the true class, far worse than any guess.
DIVERGE_FACTOR = 10
# A finished run is stalled (learned nothing) when its last epoch's training loss is within 10% of ln(classes), the
# loss of a uniform guess, and its validation accuracy at most 1.2 × the largest class's share: EpochMetrics.at_chance.
STALL_LOSS_MARGIN = 0.1
STALL_ACC_FACTOR = 1.2
# ...after at least this many optimizer steps: a run shorter than that may not have begun to learn (three steps of
# a 240-image toy set at batch 64 end at chance too, healthy).
STALL_MIN_STEPS = 50


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

    def diverged(self, diverge_loss: float | None = None) -> bool:
        """Whether the run diverged in this epoch: a loss not finite, or a training loss above `diverge_loss`."""
        return not self.finite or (diverge_loss is not None and self.train_loss > diverge_loss)

    def at_chance(self, classes: int, chance_acc: float) -> bool:
        """Whether the model has learned nothing by this epoch: its training loss still that of a uniform guess
        (within STALL_LOSS_MARGIN of ln(classes)) and its validation accuracy that of always naming one class (at
        most STALL_ACC_FACTOR × `chance_acc`, the share of the validation split's largest class, in percent). Why
        these bounds: docs/results.md, "A job is stalled"."""
        uniform = math.log(classes)
        return (
            abs(self.train_loss - uniform) <= STALL_LOSS_MARGIN * uniform
            and self.val_acc <= STALL_ACC_FACTOR * chance_acc
        )


def diverge_limit(setting: float | str | None, classes: int) -> float | None:
    """The training loss above which a run has diverged: the `diverge_loss` key, its `auto` resolved for the data
    set's number of classes; None: only a loss that is not finite."""
    return DIVERGE_FACTOR * math.log(classes) if setting == "auto" else setting


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


def describe_hardware(device: torch.device) -> str:
    """What a job ran on, for the report: the GPU's name, or the CPU's model name where the system tells it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches; a last batch of one sample joins the one before it, so BatchNorm always sees ≥ 2."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [n])]


def _cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class Compute:
    """How a job's arithmetic runs, resolved once for its device and model: precision, memory layout, compiler."""

    precision: str = "fp32"  # fp32, or bf16 autocast
    channels_last: bool = False
    compile: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_compute(
    precision: str, channels_last: bool | None, compile: bool, model: nn.Module, device: torch.device
) -> Compute:
    """Check that `device` runs `precision` well, and pick the memory layout when `channels_last` is None (auto).

    Auto is channels_last for models with convolutions on the CPU (oneDNN's convolutions are faster in it: 1.2-1.5x
    per step for deep_cnn with every norm, measured by `python -m normsweep.bench`) and on CUDA with bf16 (tensor
    cores want it); the default layout otherwise.
    """
    if precision == "bf16":
        if device.type == "cpu" and not _cpu_has_native_bf16():
            raise ConfigError(
                "precision=bf16: this CPU has no native bf16 instructions (AVX512-BF16 or AMX), where bf16 runs "
                "slower than fp32; use precision=fp32"
            )
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use precision=fp32")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"precision=bf16 runs on cuda and cpu, not {device.type}; use precision=fp32")
    if channels_last is None:
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        channels_last = has_conv and (device.type == "cpu" or (device.type == "cuda" and precision == "bf16"))
    return Compute(precision=precision, channels_last=channels_last, compile=compile)


def set_threads(threads: int) -> int:
    """Use `threads` CPU threads for torch's operators (0: every CPU this process may run on); returns the count."""
    threads = threads or available_cpus()
    torch.set_num_threads(threads)
    return threads


def prepare(model: nn.Module, compute: Compute) -> nn.Module:
    """Put the model's weights in the compute's memory layout; the module to call (compiled, if asked).

    On CUDA, cuDNN is held to its deterministic algorithms (and does not benchmark to pick others): the same seed
    gives the same numbers on the same GPU, and a resumed run the numbers of an uninterrupted one."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    model.to(memory_format=compute.memory_format)
    if not compute.compile:
        return model
    from torch._dynamo import config as dynamo_config
    from torch._functorch import config as functorch_config

    # A graph torch's compiler fails on runs eagerly, with torch's warning ("WON'T CONVERT ... due to"), instead of
    # ending the run: inductor in torch 2.11 fails on FRN's backward in bf16 on an H200, for one. The backward is
    # compiled with the forward, so that its failure falls back too (compiled lazily, it would raise mid-step).
    functorch_config.force_non_lazy_backward_lowering = True
    dynamo_config.suppress_errors = True
    return torch.compile(model)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, data: Data, compute: Compute = Compute()) -> tuple[float, float]:
    """Mean loss and accuracy (percent) of `model` on an un-augmented split."""
    loss, predicted = predict(model, split, data, compute)
    return loss, 100.0 * (predicted == split.labels).sum().item() / len(split)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, data: Data, compute: Compute = Compute()) -> tuple[float, torch.Tensor]:
    """Mean loss of `model` on an un-augmented split, and its predicted class for each image (on the device)."""
    was_training = model.training
    model.eval()
    device = split.labels.device
    loss_sum = torch.zeros((), device=device)
    predicted = torch.empty_like(split.labels)
    for s in batch_slices(len(split), EVAL_BATCH):
        with compute.autocast(device):
            logits = model(normalize(split.images[s], data, compute.memory_format))
        loss_sum += nn.functional.cross_entropy(logits.float(), split.labels[s], reduction="sum")
        predicted[s] = logits.argmax(1)
    model.train(was_training)
    return loss_sum.item() / len(split), predicted


@dataclass
class Steps:
    """How far the running epoch has trained, for a progress reporter to read from another thread: plain ints the
    loop sets after each batch, with no device sync (on a GPU they count the batches queued, a few ahead of those
    computed)."""

    epoch: int = 0
    images: int = 0  # trained so far in this epoch
    total: int = 0  # in the epoch


def train_epoch(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    compute: Compute = Compute(),
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    steps: Steps | None = None,
) -> tuple[float, int]:
    """One pass over the training split in a seeded order, augmented on the device; (mean loss, correct count).
    A `scheduler`, when given, steps after every optimizer step; `steps`, when given, counts the images trained.

    The loss and the correct count accumulate on the device and are read once, at the end: no host sync per batch.
    The training split is put in the epoch's order (and padded for its crops) once per epoch, so that a batch is a
    slice of it and its crop and flip one gather: few kernel launches per step, which is what bounds a small
    model on a GPU.
    """
    device = data.train.labels.device
    n = len(data.train)
    model.train()
    step = optimizer.step if compute.compile else step_function(optimizer)  # the same step, without torch._dynamo
    order = torch.randperm(n, device=device, generator=generator)
    canvas = pad_for_crops(data.train.images[order], data.crop_padding)
    ordered_labels = data.train.labels[order]
    predictions = torch.empty(n, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device)
    for s in batch_slices(n, batch_size):
        images = crop_and_flip(canvas[s], data.crop_padding, data.hflip, generator)
        labels = ordered_labels[s]
        with compute.autocast(device):
            logits = model(normalize(images, data, compute.memory_format))
            loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(labels)
        torch.argmax(logits.detach(), 1, out=predictions[s])
        if steps is not None:
            steps.images = s.stop
    correct = (predictions == ordered_labels).sum()
    return loss_sum.item() / n, int(correct.item())


def fit(
    model: nn.Module,
    data: Data,
    optimizer_cfg: OptimizerConfig,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochMetrics, Callable[[], dict[str, Any]]], None] | None = None,
    state: dict[str, Any] | None = None,
    compute: Compute = Compute(),
    diverge_loss: float | None = None,
    diagnose: Callable[[int], None] | None = None,
    watch: Callable[[Steps], contextlib.AbstractContextManager] | None = None,
) -> list[EpochMetrics]:
    """Train `model` on `data` (both already on the device); returns one EpochMetrics per epoch.

    After each epoch's validation `diagnose(epoch)` measures the model (diagnostics.py), then
    `on_epoch(metrics, snapshot)` is called; `snapshot()` returns everything needed to continue
    exactly from there (weights, optimizer, scheduler, random state, history), and passing that back as `state`
    resumes the run: the remaining epochs give the same numbers as an uninterrupted run. Training stops after
    the first epoch whose loss is not finite or whose training loss exceeds `diverge_loss` (the run diverged);
    that epoch is the last one returned. The schedule steps per optimizer step, or per epoch
    (`optimizer_cfg.schedule_step`); each epoch's `lr` is the rate of its last step. Each epoch's training runs
    inside `watch(steps)`, which may report its progress from another thread (job/progress.py).
    """
    device = data.train.labels.device
    forward = prepare(model, compute)
    generator = torch.Generator(device=device).manual_seed(seed)
    if not compute.compile:
        without_dynamo()
    optimizer = build_optimizer(model.parameters(), optimizer_cfg)
    per_step = optimizer_cfg.schedule_step == "step"
    steps = len(batch_slices(len(data.train), batch_size)) if per_step else 1
    scheduler = build_scheduler(optimizer, optimizer_cfg.schedule, epochs, optimizer_cfg.warmup_epochs, steps)
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
        steps = Steps(epoch=epoch, total=n)
        with watch(steps) if watch is not None else contextlib.nullcontext():
            train_loss, train_correct = train_epoch(
                forward, data, optimizer, batch_size, generator, compute, scheduler if per_step else None, steps
            )
        train_seconds = time.perf_counter() - start
        if not per_step:
            scheduler.step()
        lr = last_lr(scheduler)
        val_loss, val_acc = evaluate(forward, data.val, data, compute)
        if diagnose is not None:  # inside the epoch's time: sec_per_epoch includes what the diagnostics cost
            diagnose(epoch)
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
        if metrics.diverged(diverge_loss):
            break
    return history
