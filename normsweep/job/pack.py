"""Jobs trained together: the models of several jobs that share an architecture, a data set's shapes, a batch size
and a number of epochs, stacked into one set of tensors and trained by one vmapped step (torch.func).

Each member keeps what makes it its own job: its model's weights drawn from its seed, its data split and batch
order, its optimizer with its own state, rate and schedule, its history, its checkpoint and its end (a member that
diverges or whose trial is pruned leaves the pack; the others go on with their numbers unchanged). A member's
module stays an ordinary nn.Module: its parameters and buffers are views of one row of the pack's stacked tensors,
so its optimizer steps them in place, its evaluation, diagnostics and state_dict work as for a job trained alone,
and nothing is copied per step. No files, no Hydra: the caller's `on_epoch` writes each member's files.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from normsweep.job.build import Job
from normsweep.job.data import Data, cut_crops, draw_crops, normalize, pad_for_crops, standardize
from normsweep.job.optim import build_optimizer, build_scheduler, last_lr, step_function, without_dynamo
from normsweep.job.train import EVAL_BATCH, EpochMetrics, Steps, batch_slices, prepare

OnEpoch = Callable[[EpochMetrics, Callable[[], dict[str, Any]]], None]


@dataclass
class Member:
    """One job of a pack: what `fit` takes for a job trained alone (its callbacks and the state it resumes from).
    After packed training, `history` holds its epochs and `ended` what stopped it early (an exception its
    `on_epoch` raised: a pruned trial, a full disk; None when it trained to its end or diverged)."""

    job: Job
    on_epoch: OnEpoch | None = None
    state: dict[str, Any] | None = None
    diagnose: Callable[[int], None] | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    ended: BaseException | None = None


def why_not_packed(jobs: list[Job]) -> str | None:
    """Why these jobs cannot train as one pack (the first reason, in a user's words), or None when they can: the
    same architecture (its modules and their settings, parameter and buffer names and shapes), the same number of
    training and validation images of the same shape, augmentation, batch size, epochs, precision and device, no
    compiled model, and a model torch.func.vmap can batch."""
    first = jobs[0]
    shapes, layers = _shapes(first.model), str(first.model)  # one stateless model runs them all: the same modules
    for job in jobs[1:]:
        run, other = job.run, first.run
        if _shapes(job.model) != shapes or str(job.model) != layers:
            return "their models differ in layers, shapes or settings"
        for key in ("batch_size", "epochs", "precision", "device"):
            if getattr(run, key) != getattr(other, key):
                return f"their {key} differs ({getattr(other, key)} and {getattr(run, key)})"
        for split in ("train", "val"):
            a, b = getattr(first.data, split).images, getattr(job.data, split).images
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"their {split} splits differ in size or shape ({tuple(a.shape)} and {tuple(b.shape)})"
        if (job.data.crop_padding, job.data.hflip) != (first.data.crop_padding, first.data.hflip):
            return "their augmentation differs"
    if any(job.compute.compile for job in jobs):
        return "compile=true compiles each model alone"
    return _unbatched(first)


def _unbatched(job: Job) -> str | None:
    """Why torch.func.vmap cannot run the job's model for a pack (an operation with no batching rule that cannot
    fall back, `.item()` in its forward, an in-place change of its input), tried on two copies and two images, in
    training and in evaluation; None when it can."""
    from torch.func import functional_call, vmap

    model = copy.deepcopy(job.model)
    params = {name: torch.stack([p.detach()] * 2).requires_grad_() for name, p in model.named_parameters()}
    buffers = {name: torch.stack([b] * 2) for name, b in model.named_buffers()}
    base = _stateless(model)
    x = normalize(job.data.train.images[:2], job.data)
    try:
        for training in (True, False):
            base.train(training)
            out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), randomness="different")(
                params, buffers, torch.stack([x, x])
            )
            if training:
                out.sum().backward()
    except Exception as err:  # whatever the model does that vmap refuses
        said = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        return f"torch.func.vmap cannot batch model={job.run.model['name']} ({said[:200]})"
    return None


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(name, tuple(t.shape), t.dtype) for name, t in named]


class _Stack:
    """The members' parameters, their gradients and buffers as stacked tensors (one row per member), the members'
    own tensors pointed at their rows. Parameters keep their identity (their optimizers hold them): their `.data`
    moves. The stacked gradients stay in place (zeroed before each backward, which adds into them), so each
    member's `.grad`, a view of its row, is set once."""

    def __init__(self, models: list[nn.Module]) -> None:
        named = [dict(m.named_parameters()) for m in models]
        self.params = {name: torch.stack([p[name].detach() for p in named]).requires_grad_() for name in named[0]}
        self.grads = {name: torch.zeros_like(stacked) for name, stacked in self.params.items()}
        self.buffers = {
            name: torch.stack([dict(m.named_buffers())[name] for m in models]) for name, _ in models[0].named_buffers()
        }
        for name, stacked in self.params.items():
            stacked.grad = self.grads[name]
        for row, model in enumerate(models):
            for name, p in model.named_parameters():
                p.data = self.params[name].detach()[row]
                p.grad = self.grads[name][row]
            for name, _ in list(model.named_buffers()):
                owner, attr = _owner(model, name)
                owner._buffers[attr] = self.buffers[name][row]

    def zero_grads(self) -> None:
        torch._foreach_zero_(list(self.grads.values()))

    def accumulated_in_place(self) -> bool:
        return all(stacked.grad is self.grads[name] for name, stacked in self.params.items())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _stateless(model: nn.Module) -> nn.Module:
    """The model's structure without its tensors, for functional_call to run with the stacked ones."""
    return copy.deepcopy(model).to("meta")


@dataclass
class _Running:
    """A member while it trains: its optimizer, schedule, batch order generator and global random state."""

    member: Member
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    torch_rng: torch.Tensor
    step: Callable[[], Any]


def fit_packed(
    members: list[Member], watch: Callable[[Steps], contextlib.AbstractContextManager] | None = None
) -> None:
    """Train the members together, epoch by epoch, as `train.fit` trains each alone (the same order of batches,
    crops and flips from each member's seed, the same optimizer and schedule steps), each member's `diagnose` and
    `on_epoch` called after each epoch as `fit` calls them. Each epoch's `epoch_seconds` is the pack's (all its
    members' training and validation); `images_per_second` is each member's own. A member leaves the pack after
    the epoch in which it diverges or in which its `on_epoch` raises (kept in its `ended`); KeyboardInterrupt and
    SystemExit end the whole pack. Every member resumes from its `state` (all at the same epoch) or none does."""
    from torch.func import functional_call, vmap

    epochs_done = {len(m.state["history"]) if m.state else 0 for m in members}
    if len(epochs_done) > 1:
        raise ValueError(f"members resume from different epochs ({sorted(epochs_done)}): pack those at one epoch")
    first = members[0].job
    run, data, compute = first.run, first.data, first.compute
    if not compute.compile:
        without_dynamo()
    running = [_start(m) for m in members]
    stack = _Stack([r.member.job.model for r in running])
    splits = _Splits.of([r.member.job.data for r in running])
    base = _stateless(first.model)

    def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (params, buffers), (x,))

    batched = vmap(one, in_dims=(0, 0, 0), randomness="different")
    n = len(data.train)
    per_step = run.optimizer.schedule_step == "step"
    for epoch in range(epochs_done.pop() + 1, run.epochs + 1):
        start = time.perf_counter()
        steps = Steps(epoch=epoch, total=n)
        with watch(steps) if watch is not None else contextlib.nullcontext():
            losses, correct = _train_epoch(running, stack, splits, batched, per_step, steps)
        train_seconds = time.perf_counter() - start
        for r in running:
            if not per_step:
                r.scheduler.step()
        validation = _evaluate(running, stack, splits, base, batched)
        ends: list[tuple[_Running, EpochMetrics]] = []
        for r, loss, right, (val_loss, val_acc) in zip(running, losses, correct, validation):
            if r.member.diagnose is not None:
                r.member.diagnose(epoch)
            rate = n / train_seconds
            metrics = EpochMetrics(epoch, loss, 100.0 * right / n, val_loss, val_acc, last_lr(r.scheduler), 0.0, rate)
            ends.append((r, metrics))
        seconds = time.perf_counter() - start
        leaving = []
        for r, metrics in ends:
            metrics.epoch_seconds = seconds
            r.member.history.append(metrics)
            if r.member.on_epoch is not None:
                try:
                    r.member.on_epoch(metrics, _snapshot(r))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:  # this member ends here; the others go on
                    r.member.ended = err
                    leaving.append(r)
                    continue
            if metrics.diverged(r.member.job.diverge_loss):
                leaving.append(r)
        if leaving:
            running = [r for r in running if r not in leaving]
            if not running:
                return
            stack = _Stack([r.member.job.model for r in running])
            splits = _Splits.of([r.member.job.data for r in running])


@torch.inference_mode()
def _evaluate(
    running: list[_Running], stack: _Stack, splits: _Splits, base: nn.Module, batched: Callable[..., torch.Tensor]
) -> list[tuple[float, float]]:
    """Each member's mean loss and accuracy (percent) on its own validation split, in one vmapped pass per batch
    (train.evaluate's for each member alone, with the model in eval mode: BatchNorm's running statistics)."""
    compute, labels = running[0].member.job.compute, splits.val_labels
    k, n = labels.shape
    loss_sums = torch.zeros(k, device=labels.device)
    predicted = torch.empty_like(labels)
    base.eval()
    try:
        for s in batch_slices(n, EVAL_BATCH):
            with compute.autocast(labels.device):
                logits = batched(stack.params, stack.buffers, splits.scale(splits.val_images[:, s]))
            losses = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, s].flatten(), reduction="none")
            loss_sums += losses.view(k, -1).sum(1)
            predicted[:, s] = logits.argmax(2)
    finally:
        base.train()
    right = (predicted == labels).sum(1)
    return [(loss / n, 100.0 * int(c) / n) for loss, c in zip(loss_sums.tolist(), right.tolist())]


def _start(member: Member) -> _Running:
    """A member ready to train: its optimizer and schedule built, and restored from its state when it has one."""
    job, run = member.job, member.job.run
    model = job.model
    prepare(model, job.compute)  # its layout and cuDNN's settings, as fit's; never compiled (why_not_packed)
    model.train()
    optimizer = build_optimizer(model.parameters(), run.optimizer)
    steps = len(batch_slices(len(job.data.train), run.batch_size)) if run.optimizer.schedule_step == "step" else 1
    scheduler = build_scheduler(optimizer, run.optimizer.schedule, run.epochs, run.optimizer.warmup_epochs, steps)
    generator = torch.Generator(device=job.data.train.labels.device).manual_seed(run.seed)
    torch_rng = torch.get_rng_state()
    if member.state is not None:
        state = member.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["generator"])
        torch_rng = state["rng"]["torch"]
        member.history = [EpochMetrics(**m) for m in state["history"]]
    return _Running(member, optimizer, scheduler, generator, torch_rng, step_function(optimizer))


def _snapshot(r: _Running) -> Callable[[], dict[str, Any]]:
    def snapshot() -> dict[str, Any]:
        return {
            "epoch": len(r.member.history),
            "model": {name: t.clone() for name, t in r.member.job.model.state_dict().items()},
            "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(),
            "rng": {"generator": r.generator.get_state(), "torch": r.torch_rng},
            "history": [asdict(m) for m in r.member.history],
        }

    return snapshot


def _crops(padded: torch.Tensor, padding: int, hflip: bool, generators: list[torch.Generator]) -> torch.Tensor:
    """Every member's batch (K, B, C, H, W) cropped and flipped as data.crop_and_flip would cut it alone (each
    member's draws from its own generator, in its order), in one gather for all of them."""
    if not padding and not hflip:
        return padded
    k, b = padded.shape[:2]
    draws = [draw_crops(b, padding, hflip, g, padded.device) for g in generators]
    joined = [torch.cat(column) if column[0] is not None else None for column in zip(*draws)]
    return cut_crops(padded.flatten(0, 1), padding, *joined).unflatten(0, (k, b))


@dataclass
class _Splits:
    """What the running members' data stacks into, made once and again only when a member leaves: the training
    statistics of each (K, 1, C, 1, 1), and the validation images and labels of all (K, N, ...)."""

    mean: torch.Tensor
    std: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor

    @classmethod
    def of(cls, datas: list[Data]) -> _Splits:
        shape = (len(datas), 1, -1, 1, 1)
        return cls(
            torch.stack([d.mean for d in datas]).view(shape),
            torch.stack([d.std for d in datas]).view(shape),
            torch.stack([d.val.images for d in datas]),
            torch.stack([d.val.labels for d in datas]),
        )

    def scale(self, images: torch.Tensor) -> torch.Tensor:
        """data.normalize of every member's batch (K, B, C, H, W) with its own statistics."""
        return standardize(images, self.mean, self.std)


def _train_epoch(
    running: list[_Running],
    stack: _Stack,
    splits: _Splits,
    batched: Callable[..., torch.Tensor],
    per_step: bool,
    steps: Steps,
) -> tuple[list[float], list[int]]:
    """One epoch of every member, each over its own training split in its own seeded order; per member its mean
    loss and correct count."""
    first = running[0].member.job
    data, compute, batch_size = first.data, first.compute, first.run.batch_size
    device = data.train.labels.device
    n = len(data.train)
    k = len(running)
    canvases, labels = [], []
    for r in running:
        train = r.member.job.data.train
        order = torch.randperm(n, device=device, generator=r.generator)
        canvases.append(pad_for_crops(train.images[order], data.crop_padding))
        labels.append(train.labels[order])
    canvas, ordered_labels = torch.stack(canvases), torch.stack(labels)
    del canvases
    predictions = torch.empty(k, n, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(k, device=device)
    for s in batch_slices(n, batch_size):
        x = splits.scale(_crops(canvas[:, s], data.crop_padding, data.hflip, [r.generator for r in running]))
        y = ordered_labels[:, s]
        with compute.autocast(device):
            logits = batched(stack.params, stack.buffers, x)
            losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            losses = losses.view(k, -1).mean(1)
        stack.zero_grads()
        losses.sum().backward()
        if not stack.accumulated_in_place():  # the members' .grad would be stale views: never train on those
            raise RuntimeError("the packed backward replaced the stacked gradients instead of adding into them")
        for r in running:
            r.step()
            if per_step:
                r.scheduler.step()
        loss_sums += losses.detach() * (s.stop - s.start)
        torch.argmax(logits.detach(), 2, out=predictions[:, s])
        steps.images = s.stop
    correct = (predictions == ordered_labels).sum(1)
    return [v / n for v in loss_sums.tolist()], [int(c) for c in correct.tolist()]
