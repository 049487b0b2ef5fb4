"""What normsweep knows about each norm, one record per norm: its builder, its keys, and the facts the checks use.

A record is the structured config of one `norm=` option (registered in Hydra's ConfigStore as `schema_norm_<name>`,
so a wrong key or type fails at composition). Its `_target_` names the builder, a class or function called as
`builder(num_features, dim=2|1, **keys)` (normsweep/job/layers.py holds the built-in ones). A user's norm is a YAML
with a `_target_` of its own and, optionally, the same facts: it becomes a `UserNorm` record with safe defaults.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from normsweep.config.errors import ConfigError
from normsweep.config.records import Record, to_record


@dataclass
class NormConfig(Record):
    """The keys every norm has. The facts' defaults are the safe ones for a norm normsweep knows nothing about."""

    _target_: str = MISSING  # the builder: builder(num_features, **keys) returns the layer
    name: str = MISSING  # the label in logs and tables; a user's norm defaults to its option name
    # Normalizes fc features (N, C) too; false: feature maps (N, C, H, W) only, and fc models refuse it.
    fc_features: bool = False
    # Takes statistics over the batch: batch_size must then be 2 or more.
    batch_stats: bool = True
    # Brings its own activation (FRN's thresholded linear unit): models put no ReLU after it.
    own_activation: bool = False
    # A function model -> model applied once to the whole model (ws_gn standardizes every conv's weight).
    adapt_model: Optional[str] = None  # noqa: UP045 (OmegaConf reads the annotation at runtime: no `X | None`)

    # normsweep's own keys: the builder gets every other one.
    OWN_KEYS: ClassVar[tuple[str, ...]] = (
        "_target_",
        "name",
        "fc_features",
        "batch_stats",
        "own_activation",
        "adapt_model",
    )

    def check_width(self, num_features: int) -> str | None:
        """Why a layer of `num_features` channels cannot take this norm (named as the user would fix it), or None."""
        return None


@dataclass
class _EpsAffine(NormConfig):
    """A built-in norm: per sample and defined on fc features unless its record says otherwise."""

    fc_features: bool = True
    batch_stats: bool = False
    eps: float = 1e-5
    affine: bool = True  # a learned per-channel scale (and shift, where the norm has one)

    def check(self) -> None:
        if self.eps <= 0:
            raise ConfigError(f"norm.eps={self.eps}: must be > 0 (it keeps the division away from zero)")


@dataclass
class NoNorm(NormConfig):
    """No normalization: the identity (torch's Identity ignores the channel count)."""

    _target_: str = "torch.nn.Identity"
    name: str = "none"
    fc_features: bool = True
    batch_stats: bool = False


@dataclass
class BatchNorm(_EpsAffine):
    """BatchNorm: per channel over (N, H, W); BatchNorm1d over N on fc features."""

    _target_: str = "normsweep.job.layers.batch_norm"
    name: str = "bn"
    batch_stats: bool = True
    momentum: Optional[float] = 0.1  # noqa: UP045 (null: a cumulative average)
    track_running_stats: bool = True

    def check(self) -> None:
        super().check()
        if self.momentum is not None and not 0 <= self.momentum <= 1:
            raise ConfigError(
                f"norm.momentum={self.momentum}: must be between 0 and 1, or null for a cumulative average"
            )


@dataclass
class LayerNorm(_EpsAffine):
    """LayerNorm: per sample over (C, H, W), one scale and shift per channel (GroupNorm with one group)."""

    _target_: str = "normsweep.job.layers.layer_norm"
    name: str = "ln"


@dataclass
class LayerNorm2d(_EpsAffine):
    """LayerNorm over the channels alone, at every position (ConvNeXt's)."""

    _target_: str = "normsweep.job.layers.LayerNorm2d"
    name: str = "ln2d"


@dataclass
class RMSNorm(_EpsAffine):
    """RMSNorm over the channels at every position: a scale, no mean removed, no shift."""

    _target_: str = "normsweep.job.layers.RMSNorm2d"
    name: str = "rms"


@dataclass
class InstanceNorm(_EpsAffine):
    """InstanceNorm: per sample and channel over (H, W); undefined on fc features."""

    _target_: str = "normsweep.job.layers.instance_norm"
    name: str = "in"
    fc_features: bool = False


@dataclass
class GroupNorm(_EpsAffine):
    """GroupNorm: per sample over (C/groups, H, W), in `groups` groups of channels (or channels per group)."""

    _target_: str = "normsweep.job.layers.group_norm"
    name: str = "gn"
    groups: int = 8
    group_size: Optional[int] = None  # noqa: UP045 (channels per group, in place of groups when set)

    def check(self) -> None:
        super().check()
        if self.groups < 1:
            raise ConfigError(f"norm.groups={self.groups}: must be 1 or more")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"norm.group_size={self.group_size}: must be 1 or more, or null to use norm.groups")

    def check_width(self, num_features: int) -> str | None:
        key, value = ("norm.group_size", self.group_size) if self.group_size else ("norm.groups", self.groups)
        if num_features % value == 0:
            return None
        divisors = ", ".join(str(g) for g in range(1, num_features + 1) if num_features % g == 0)
        return (
            f"{key}={value} does not divide its {num_features} channels; pick {key} among the divisors of every "
            f"normalized layer ({num_features} allows {divisors})"
        )


@dataclass
class WSGroupNorm(GroupNorm):
    """GroupNorm after weight-standardized convolutions (each filter to mean 0, variance 1); needs convolutions."""

    name: str = "ws_gn"
    adapt_model: Optional[str] = "normsweep.job.layers.standardize_conv_weights"  # noqa: UP045


@dataclass
class FilterResponseNorm(_EpsAffine):
    """FRN and its thresholded linear unit: per sample and channel, x / sqrt(mean_HW(x²) + eps), then max(y, tau)."""

    _target_: str = "normsweep.job.layers.FilterResponseNorm"
    name: str = "frn"
    fc_features: bool = False
    own_activation: bool = True
    eps: float = 1e-6


@dataclass
class UserNorm(NormConfig):
    """A norm from a user's YAML: its own keys typed as above, every other key passed to its `_target_`."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    GROUP: ClassVar[str] = "norm"
    TYPED: ClassVar[tuple[str, ...]] = NormConfig.OWN_KEYS
    NEEDS: ClassVar[str] = (
        "a norm YAML needs a _target_ naming the class or function that makes the layer (called with the number of "
        "channels), e.g. _target_: my_norms.MyNorm"
    )


# The built-in norms, by option name (conf/norm/<name>.yaml); their YAMLs start from `/schema_norm_<name>`.
_RECORDS = (
    NoNorm,
    BatchNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    InstanceNorm,
    GroupNorm,
    WSGroupNorm,
    FilterResponseNorm,
)
BUILT_IN: dict[str, type[NormConfig]] = {record.name: record for record in _RECORDS}


def norm_record(node: dict[str, Any] | NormConfig, choice: str | None) -> NormConfig:
    """The record of a composed `norm` node: a built-in's typed record as it is, or a user YAML's as a UserNorm."""
    return to_record(node, choice, UserNorm)
