"""The optimizer records: one per built-in optimizer (its keys and checks), and a user's optimizer from a YAML (any
torch.optim class, or their own). job/optim.py builds the optimizer and its schedule from a record.

An optimizer YAML is a partial call as Hydra's `instantiate` reads it: `_target_` (the class), `_partial_: true`
(normsweep adds the parameters) and the class's arguments, `lr` among them; normsweep's own keys (`name`,
`schedule`, `schedule_step`, `warmup_epochs`, `lr_batch_size`, `decay_norm_and_bias`) are not passed to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from normsweep.config.errors import ConfigError
from normsweep.config.records import Record, to_record

SCHEDULES = ("constant", "cosine")
SCHEDULE_STEPS = ("step", "epoch")  # the schedule moves after every optimizer step, or after every epoch


@dataclass
class OptimizerConfig(Record):
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

    def check(self) -> None:
        if not self._partial_:
            raise ConfigError(
                "optimizer._partial_=false: normsweep makes the optimizer with the model's parameters, so its YAML "
                "must describe a partial call, as Hydra's instantiate means it: remove the key, or set _partial_: true"
            )
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

    GROUP: ClassVar[str] = "optimizer"
    TYPED: ClassVar[tuple[str, ...]] = (*OptimizerConfig.OWN_KEYS, "lr")
    NEEDS: ClassVar[str] = (
        "an optimizer YAML needs a _target_ naming the optimizer class, e.g. _target_: torch.optim.RMSprop, with "
        "_partial_: true and lr"
    )


# The built-in optimizers by option name (conf/optimizer/<name>.yaml); each YAML starts from `/schema_optimizer_<name>`.
BUILT_IN: dict[str, type[OptimizerConfig]] = {record.name: record for record in (Adam, AdamW, SGD)}


def optimizer_record(node: dict[str, Any] | OptimizerConfig, choice: str | None) -> OptimizerConfig:
    """The record of a composed `optimizer` node: a built-in's as it is, or a user YAML's as a UserOptimizer."""
    return to_record(node, choice, UserOptimizer)
