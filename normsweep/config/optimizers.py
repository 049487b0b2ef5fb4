"""Optimizers by `_target_`: one record per built-in optimizer (its keys and checks), any torch.optim class or a
user's from a YAML, and the learning-rate schedule.

An optimizer YAML holds `_target_` (the class), `_partial_: true` (normsweep passes the parameters) and the class's
arguments, `lr` among them; normsweep's own keys (`name`, `schedule`, `schedule_step`, `warmup_epochs`,
`lr_batch_size`, `decay_norm_and_bias`) are not passed to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from omegaconf import MISSING

from normsweep.config.errors import ConfigError

if TYPE_CHECKING:
    import torch

SCHEDULES = ("constant", "cosine")
SCHEDULE_STEPS = ("step", "epoch")  # the schedule moves after every optimizer step, or after every epoch


@dataclass
class OptimizerConfig:
    """The keys every optimizer has: the class, its learning rate, and normsweep's own schedule keys."""

    _target_: str = MISSING  # the optimizer class, e.g. torch.optim.Adam
    _partial_: bool = True  # normsweep calls it with the model's parameters
    name: str = MISSING  # the label in logs and tables; a user's optimizer defaults to its option name
    lr: float = MISSING
    schedule: str = "constant"  # constant | cosine (down to 0 after the last step)
    schedule_step: str = "step"  # step: the schedule moves after every optimizer step; epoch: after every epoch
    warmup_epochs: float = 0.0  # linear warm-up from lr / warm-up steps to lr, then the schedule
    # The batch size `lr` is given for: when set, the job trains at lr × batch_size / lr_batch_size (the linear
    # scaling rule of Goyal et al. 2017), so a batch-size sweep keeps the step per image constant.
    lr_batch_size: Optional[int] = None  # noqa: UP045 (OmegaConf reads the annotation at runtime: no `X | None`)
    # False keeps 1-D parameters (norm scales and shifts, FRN's tau, biases, SkipInit gains) out of weight decay,
    # as timm, nanoGPT and airbench do: decay pulls a norm's scale toward 0, which no later layer asks for.
    decay_norm_and_bias: bool = False

    OWN_KEYS: ClassVar[tuple[str, ...]] = (
        "_target_",
        "_partial_",
        "name",
        "schedule",
        "schedule_step",
        "warmup_epochs",
        "lr_batch_size",
        "decay_norm_and_bias",
    )

    def arguments(self) -> dict[str, Any]:
        """The optimizer's keyword arguments (lr included): every key that is not normsweep's own."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.OWN_KEYS}

    def check(self) -> None:
        if not isinstance(self.lr, int | float) or self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr}: the learning rate must be a number > 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.schedule_step not in SCHEDULE_STEPS:
            raise ConfigError(
                f"optimizer.schedule_step={self.schedule_step!r}: choose step (the schedule moves after every "
                "optimizer step) or epoch (after every epoch, as in job folders saved before this key)"
            )
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int | float):
            raise ConfigError(f"optimizer.warmup_epochs={self.warmup_epochs!r}: give a number of epochs, e.g. 1")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optimizer.warmup_epochs={self.warmup_epochs}: must be >= 0 (0: no warm-up)")
        if not isinstance(self.decay_norm_and_bias, bool):
            raise ConfigError(f"optimizer.decay_norm_and_bias={self.decay_norm_and_bias!r}: give true or false")
        if self.lr_batch_size is not None and self.lr_batch_size < 1:
            raise ConfigError(
                f"optimizer.lr_batch_size={self.lr_batch_size}: give the batch size optimizer.lr is meant for "
                "(e.g. 32), or null to use optimizer.lr as it is"
            )


@dataclass
class _WeightDecay(OptimizerConfig):
    weight_decay: float = 0.0

    def check(self) -> None:
        super().check()
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay}: must be >= 0")


@dataclass
class Adam(_WeightDecay):
    _target_: str = "torch.optim.Adam"
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def check(self) -> None:
        super().check()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(
                f"optimizer.betas={self.betas}: give two values in [0, 1), e.g. optimizer.betas=[0.9,0.999]"
            )

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "betas": tuple(self.betas)}


@dataclass
class AdamW(Adam):
    _target_: str = "torch.optim.AdamW"
    name: str = "adamw"
    weight_decay: float = 0.01


@dataclass
class SGD(_WeightDecay):
    _target_: str = "torch.optim.SGD"
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True  # applies when momentum > 0
    weight_decay: float = 5e-4

    def check(self) -> None:
        super().check()
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum={self.momentum}: must be in [0, 1)")

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "nesterov": self.nesterov and self.momentum > 0}


@dataclass
class UserOptimizer(OptimizerConfig):
    """An optimizer from a user's YAML: normsweep's keys typed, every other key passed to its `_target_`."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def arguments(self) -> dict[str, Any]:
        return {"lr": self.lr, **self.kwargs}


# The built-in optimizers by option name (conf/optimizer/<name>.yaml); each YAML starts from `/schema_optimizer_<name>`.
BUILT_IN: dict[str, type[OptimizerConfig]] = {record.name: record for record in (Adam, AdamW, SGD)}


def optimizer_record(node: dict[str, Any] | OptimizerConfig, choice: str | None) -> OptimizerConfig:
    """The record of a composed `optimizer` node: a built-in's as it is, or a user YAML's as a UserOptimizer."""
    if isinstance(node, OptimizerConfig):
        node.check()
        return node
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"optimizer={choice}: an optimizer YAML needs a _target_ naming the optimizer class, "
            "e.g. _target_: torch.optim.RMSprop, with _partial_: true and lr"
        )
    if "lr" not in node:
        raise ConfigError(f"optimizer={choice}: its YAML needs an lr (e.g. lr: 1.0e-3)")
    own = {k: v for k, v in node.items() if k in OptimizerConfig.OWN_KEYS and k != "_partial_"}
    own.setdefault("name", choice or str(node["_target_"]).rsplit(".", 1)[-1])
    if isinstance(node["lr"], bool) or not isinstance(node["lr"], int | float):
        raise ConfigError(f"optimizer.lr={node['lr']!r}: the learning rate must be a number > 0")
    kwargs = {k: v for k, v in node.items() if k not in OptimizerConfig.OWN_KEYS and k != "lr"}
    record = UserOptimizer(**own, lr=float(node["lr"]), kwargs=kwargs)
    record.check()
    return record


def no_decay(params: Iterable[torch.nn.Parameter] | torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters `decay_norm_and_bias: false` keeps out of weight decay (of a model, or from a list): every one
    with at most one dimension (norm scales and shifts, FRN's tau, biases, SkipInit gains), whatever module holds
    it, in a user's model too."""
    return [p for p in (params.parameters() if hasattr(params, "parameters") else params) if p.ndim <= 1]


def build_optimizer(params: Any, record: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer, in its fused single-kernel form where the class has one for the parameters'
    device (torch's Adam, AdamW and SGD on CPU and CUDA since torch 2.4: 3% faster per deep_cnn step on this CPU),
    else its default implementation.

    Unless `record.decay_norm_and_bias`, the 1-D parameters form a second parameter group with weight decay 0 (for
    any class whose defaults have a `weight_decay`); otherwise there is one group, as before the key existed, so
    a checkpoint saved then loads."""
    import inspect

    from hydra.utils import get_object

    params = list(params)
    try:
        cls = get_object(record._target_)
    except Exception as err:
        raise ConfigError(
            f"optimizer={record.name}: cannot import _target_={record._target_!r} ({str(err).splitlines()[0]})"
        ) from None
    kwargs = record.arguments()
    kept = [] if record.decay_norm_and_bias else no_decay(params)
    groups: Any = params
    if kept and len(kept) < len(params):
        kept_ids = {id(p) for p in kept}
        groups = [{"params": [p for p in params if id(p) not in kept_ids]}, {"params": kept}]
    elif kept:
        groups = [{"params": kept}]
    try:
        fused = "fused" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        fused = False
    optimizer = None
    if fused:
        try:
            optimizer = cls(groups, **kwargs, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or torch version
            pass
    if optimizer is None:
        try:
            optimizer = cls(groups, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"optimizer={record.name}: {record._target_} refused its arguments: {err}") from None
    if kept and "weight_decay" in optimizer.defaults:
        optimizer.param_groups[-1]["weight_decay"] = 0.0
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    epochs: int,
    warmup_epochs: float = 0.0,
    steps_per_epoch: int = 1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped `steps_per_epoch` times an epoch (1: per epoch): a linear warm-up over
    the first `warmup_epochs` (from lr / its steps up to lr), then `schedule`: constant, or cosine from lr down to 0
    after the last step. Without warm-up and per epoch, the schedule of job folders saved before either existed."""
    import torch

    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:  # step: the steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def last_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate of the last step taken (of the first parameter group): what metrics.csv's `lr` shows."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(scheduler.last_epoch - 1, 0))


# torch.optim's wrappers import torch._dynamo (1-3 s here: more than the default job's training) the first time
# they run: add_param_group, zero_grad, state_dict and load_state_dict through torch._disable_dynamo, and step()
# through _use_grad_for_differentiable, which imports it at every call to mark a graph break for torch.compile.
# A job that compiles nothing has no use for either: it calls the plain functions (without_dynamo, step_function).
_DYNAMO_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def without_dynamo() -> None:
    """Let torch.optim.Optimizer's methods that torch.compile must skip run as the plain methods they wrap, unless
    torch._dynamo is loaded already (compile=true ran in this process). Call before building the optimizer."""
    import sys

    import torch

    if "torch._dynamo" in sys.modules:
        return
    for name in _DYNAMO_WRAPPED:
        plain = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if plain is not None and not hasattr(plain, "__dynamo_disable"):
            setattr(plain, "__dynamo_disable", plain)  # the wrapper's own cache of what it calls


def step_function(optimizer: torch.optim.Optimizer) -> Any:
    """`optimizer.step`, or for torch's own optimizers (whose step is only wrapped by the profiler's hook and by
    the grad-mode guard for torch.compile) the step itself under that grad mode, when no step hook is registered:
    the same arithmetic without importing torch._dynamo. Anything else: `optimizer.step`, untouched. Not for a
    compiled model's training (train_epoch then calls `optimizer.step`)."""
    import torch
    from torch.optim import optimizer as base

    hooks = (
        optimizer._optimizer_step_pre_hooks,
        optimizer._optimizer_step_post_hooks,
        base._global_optimizer_pre_hooks,
        base._global_optimizer_post_hooks,
    )
    function, codes = type(optimizer).step, []
    while hasattr(function, "__wrapped__"):
        codes.append(function.__code__.co_name)
        function = function.__wrapped__
    if any(hooks) or "_use_grad" not in codes or not set(codes) <= {"_use_grad", "wrapper"}:
        return optimizer.step
    differentiable = bool(optimizer.defaults.get("differentiable", False))

    def step() -> None:
        with torch.set_grad_enabled(differentiable):
            function(optimizer)
        optimizer._opt_called = True  # what the lr scheduler's own wrapper of step records

    return step
