"""The norm layers and the factory every model receives: `norm(num_features, layer=..., dim=2|1)` makes one layer,
`norm.act(...)` the layer followed by its activation. What each norm is and may do comes from its record (norms.py).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normsweep.config.errors import ConfigError
from normsweep.config.norms import NormConfig
from normsweep.config.targets import import_target

# Added to each filter's variance before weight standardization divides by its square root: a fixed constant,
# not norm.eps (that one belongs to the GroupNorm that follows the convolution).
WS_EPS = 1e-5


class _PerPosition:
    """Mixin for a norm over the last dimension: on (N, C, H, W) it normalizes the C values at each position.

    The permute to (N, H, W, C) is free on channels_last input (the layout the models use on the CPU) and one
    copy otherwise; the result has the input's shape, in channels_last layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return super().forward(x)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2d(_PerPosition, nn.LayerNorm):
    """LayerNorm over the channels alone, at every position (ConvNeXt's), unlike `ln`'s over (C, H, W)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine)


class RMSNorm2d(_PerPosition, nn.RMSNorm):
    """RMSNorm over the channels at every position: scaled by the root mean square, no mean removed, no shift."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine)


class FilterResponseNorm(nn.Module):
    """FRN followed by its thresholded linear unit: max(gamma * x / sqrt(mean_HW(x²) + eps) + beta, tau).

    The TLU is the activation (its record says own_activation), so no ReLU follows it. With affine=false gamma
    and beta go, and tau stays: without it the layer would have no activation."""

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = (1, -1, 1, 1)
        # gamma joins the small (N, C, 1, 1) factor before it meets x: one multiply over x instead of two
        # (forward + backward ~10% faster on the CPU, measured with one thread).
        scale = torch.rsqrt(x.square().mean(dim=(2, 3), keepdim=True) + self.eps)
        if self.weight is None:
            return torch.maximum(x * scale, self.tau.view(per_channel))
        y = torch.addcmul(self.bias.view(per_channel), x, scale * self.weight.view(per_channel))
        return torch.maximum(y, self.tau.view(per_channel))

    def extra_repr(self) -> str:
        return f"{self.tau.numel()}, eps={self.eps}, affine={self.weight is not None}"


def batch_norm(
    num_features: int,
    dim: int = 2,
    eps: float = 1e-5,
    affine: bool = True,
    momentum: float | None = 0.1,
    track_running_stats: bool = True,
) -> nn.Module:
    cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    return cls(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


def layer_norm(num_features: int, dim: int = 2, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    # On feature maps: the GroupNorm paper's LN, statistics over (C, H, W) with one scale/shift per channel.
    if dim == 2:
        return nn.GroupNorm(1, num_features, eps=eps, affine=affine)
    return nn.LayerNorm(num_features, eps=eps, elementwise_affine=affine)


def instance_norm(num_features: int, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    # Statistics per sample and channel over (H, W), one scale/shift per channel: exactly nn.InstanceNorm2d without
    # running statistics, written as GroupNorm with one channel per group, whose CPU kernel is faster (0.58 vs
    # 0.79 k img/s for deep_cnn, measured) and takes channels_last input.
    return nn.GroupNorm(num_features, num_features, eps=eps, affine=affine)


def group_norm(
    num_features: int, eps: float = 1e-5, affine: bool = True, groups: int = 8, group_size: int | None = None
) -> nn.Module:
    # group_size fixes the channels per group, so the count follows each layer's width.
    count = num_features // group_size if group_size else groups
    return nn.GroupNorm(count, num_features, eps=eps, affine=affine)


class StandardizedWeight(nn.Module):
    """Weight standardization as a parametrization: each output filter of a conv weight to mean 0, variance 1."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (weight - mean) * torch.rsqrt(var + WS_EPS)


def standardize_conv_weights(model: nn.Module) -> nn.Module:
    """Every Conv2d of `model` with a standardized weight (ws_gn). A parametrization, so any model works unchanged
    and the optimizer steps the raw weight underneath."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(
            "weight standardization applies to the weights of convolutions, and this model has none; use norm=gn "
            "(GroupNorm without it) or a convolutional model"
        )
    for conv in convs:
        parametrize.register_parametrization(conv, "weight", StandardizedWeight())
    return model


def _takes(builder: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass only what it must take
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class NormFactory:
    """What every model receives. `norm(num_features, layer=..., dim=...)` makes one norm layer; `norm.act(...)` the
    layer followed by a ReLU, or the layer alone when it brings its own activation (FRN).

    `dim=2` is a conv feature map (N, C, H, W), `dim=1` fc features (N, C); `layer` names the layer in error
    messages (e.g. "conv2"). `adapt` is for what a per-layer factory cannot reach: build_model passes it the
    whole model once, before its first forward pass. `slots(model)` finds every layer it made, by name."""

    def __init__(self, record: NormConfig, model_name: str) -> None:
        self.record = record
        self.model_name = model_name
        self.made: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        where = f"norm={record.name}"
        self.builder = import_target(record._target_, where)
        self.adapter = import_target(record.adapt_model, where, "adapt_model") if record.adapt_model else None
        self.passes_dim = _takes(self.builder, "dim")

    def _where(self, layer: str | None) -> str:
        return f"model={self.model_name} norm={self.record.name}: {f'layer {layer}' if layer else 'a layer'}"

    def __call__(self, num_features: int, *, layer: str | None = None, dim: int = 2) -> nn.Module:
        record = self.record
        if dim not in (1, 2):
            raise ValueError(f"norm factory: dim must be 1 (fc features) or 2 (feature maps), got {dim}")
        if dim == 1 and not record.fc_features:
            raise ConfigError(
                f"{self._where(layer)} has fc features (N, C), and norm={record.name} normalizes feature maps "
                f"(N, C, H, W) only (its statistics need spatial positions); use a convolutional model "
                "(model=simple_cnn, deep_cnn, resnet20 or resnet18) or another norm"
            )
        problem = record.check_width(num_features)
        if problem:
            raise ConfigError(f"{self._where(layer)}: {problem}")
        kwargs = record.arguments()
        if self.passes_dim:
            kwargs["dim"] = dim
        try:
            module = self.builder(num_features, **kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"{self._where(layer)} ({num_features} channels): {record._target_} failed: {err}"
            ) from None
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"norm={record.name}: {record._target_}({num_features}) returned a {type(module).__name__}, "
                "not a torch.nn.Module"
            )
        self.made.add(module)
        return module

    def act(
        self,
        num_features: int,
        *,
        layer: str | None = None,
        dim: int = 2,
        act: type[nn.Module] | Callable[[], nn.Module] | nn.Module | None = None,
    ) -> nn.Module:
        """The norm layer followed by the model's activation, as one module (iterate it to splice both into a
        Sequential): `act` is a module class or a function that makes one (`nn.GELU`, `lambda: nn.SiLU()`), or a
        module; a ReLU when not given. A norm that is its own activation (its record's own_activation: frn's TLU)
        is never followed by a second one."""
        module = self(num_features, layer=layer, dim=dim)
        if self.record.own_activation:
            return nn.Sequential(module)
        if act is None:
            return nn.Sequential(module, nn.ReLU(inplace=True))
        activation = act if isinstance(act, nn.Module) else act()
        if not isinstance(activation, nn.Module):
            where = f"layer {layer}" if layer else "a layer"
            raise ConfigError(
                f"model={self.model_name}: norm.act(..., act={act!r}) at {where} made a {type(activation).__name__}, "
                "not a module; pass a module class such as nn.GELU"
            )
        return nn.Sequential(module, activation)

    def slots(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every norm layer this factory made for `model`, named as in it (`features.1`), in the model's order: the
        layers the diagnostics measure, whatever the model (a user's too). For norm=none the identity in each slot
        counts, so every norm is measured at the same places."""
        return [(name, module) for name, module in model.named_modules() if module in self.made]

    def adapt(self, model: nn.Module) -> nn.Module:
        """The model as this norm needs it (its record's adapt_model), or unchanged."""
        if self.adapter is None:
            return model
        try:
            return self.adapter(model)
        except ConfigError as err:
            raise ConfigError(f"model={self.model_name} norm={self.record.name}: {err}") from None


def norm_factory(record: NormConfig, model_name: str) -> NormFactory:
    """The factory a model uses to create its norm layers, with the user-facing checks built in."""
    return NormFactory(record, model_name)
