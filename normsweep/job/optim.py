"""The optimizer and learning-rate schedule a job trains with, built from its record (config/optimizers.py)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

import torch

from normsweep.config.errors import ConfigError
from normsweep.config.optimizers import OptimizerConfig
from normsweep.config.targets import import_target


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

    from normsweep.config import hydra_compat

    params = list(params)
    cls = import_target(record._target_, f"optimizer={record.name}")  # the one error text for a wrong name
    # The record is a partial call (its `_partial_`, as Hydra means it): the parameters are the argument left.
    make = hydra_compat.instantiate(
        {"_target_": record._target_, "_partial_": record._partial_, **record.arguments()}, _convert_="all"
    )
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
            optimizer = make(groups, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or torch version
            pass
    if optimizer is None:
        try:
            optimizer = make(groups)
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
