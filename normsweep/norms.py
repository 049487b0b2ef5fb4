"""Normalization layers by name, behind one factory signature: norm(num_features, layer=..., dim=2|1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from normsweep.config import ConfigError, NormConfig

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


class RMSNorm2d(_PerPosition, nn.RMSNorm):
    """RMSNorm over the channels at every position: scaled by the root mean square, no mean removed, no shift."""


class FilterResponseNorm(nn.Module):
    """FRN followed by its thresholded linear unit: max(gamma * x / sqrt(mean_HW(x²) + eps) + beta, tau).

    The TLU is the activation, so the models leave out the ReLU they would put after a norm. With affine=false
    gamma and beta go, and tau stays: without it the layer would have no activation."""

    includes_activation = True

    def __init__(self, num_features: int, eps: float, affine: bool) -> None:
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


class StandardizedWeight(nn.Module):
    """Weight standardization as a parametrization: each output filter of a conv weight to mean 0, variance 1."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (weight - mean) * torch.rsqrt(var + WS_EPS)


def _group_count(cfg: NormConfig, c: int) -> int:
    # norm.group_size fixes the channels per group, so the count follows each layer's width.
    return c // cfg.group_size if cfg.group_size else cfg.groups


def _none(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    return nn.Identity()


def _bn(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    return cls(c, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine, track_running_stats=cfg.track_running_stats)


def _ln(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    # On feature maps: the GroupNorm paper's LN, statistics over (C, H, W) with one scale/shift per channel.
    if dim == 2:
        return nn.GroupNorm(1, c, eps=cfg.eps, affine=cfg.affine)
    return nn.LayerNorm(c, eps=cfg.eps, elementwise_affine=cfg.affine)


def _ln2d(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    return LayerNorm2d(c, eps=cfg.eps, elementwise_affine=cfg.affine)


def _rms(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    return RMSNorm2d(c, eps=cfg.eps, elementwise_affine=cfg.affine)


def _in(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    # Statistics per sample and channel over (H, W), one scale/shift per channel: exactly nn.InstanceNorm2d without
    # running statistics, written as GroupNorm with one channel per group, whose CPU kernel is faster (0.58 vs
    # 0.79 k img/s for deep_cnn, measured) and takes channels_last input.
    return nn.GroupNorm(c, c, eps=cfg.eps, affine=cfg.affine)


def _gn(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    return nn.GroupNorm(_group_count(cfg, c), c, eps=cfg.eps, affine=cfg.affine)


def _frn(cfg: NormConfig, c: int, dim: int) -> nn.Module:
    return FilterResponseNorm(c, eps=cfg.eps, affine=cfg.affine)


NORM_LAYERS: dict[str, Callable[[NormConfig, int, int], nn.Module]] = {
    "none": _none,
    "bn": _bn,
    "ln": _ln,
    "ln2d": _ln2d,
    "rms": _rms,
    "in": _in,
    "gn": _gn,
    "ws_gn": _gn,  # the layer is GroupNorm; NormFactory.adapt standardizes the model's conv weights
    "frn": _frn,
}
# Norms with statistics over spatial positions only, by their full name: undefined on fc features.
SPATIAL_ONLY = {"in": "InstanceNorm", "frn": "Filter Response Normalization"}


class NormFactory:
    """What every model receives: `norm(num_features, layer=..., dim=...)` makes one norm layer.

    `dim=2` is a conv feature map (N, C, H, W), `dim=1` fc features (N, C); `layer` names the layer in error
    messages (e.g. "conv2"). `adapt` is for what a per-layer factory cannot reach: build_model passes it the
    whole model once, before its first forward pass."""

    def __init__(self, cfg: NormConfig, model_name: str) -> None:
        if cfg.name not in NORM_LAYERS:
            raise ConfigError(f"norm={cfg.name}: unknown norm; choose one of {', '.join(NORM_LAYERS)}")
        self.cfg = cfg
        self.model_name = model_name

    def __call__(self, num_features: int, *, layer: str | None = None, dim: int = 2) -> nn.Module:
        cfg, model_name = self.cfg, self.model_name
        where = f"layer {layer}" if layer else "a layer"
        if dim not in (1, 2):
            raise ValueError(f"norm factory: dim must be 1 (fc features) or 2 (feature maps), got {dim}")
        if cfg.name in SPATIAL_ONLY and dim == 1:
            raise ConfigError(
                f"model={model_name} norm={cfg.name}: {SPATIAL_ONLY[cfg.name]} normalizes each channel over its "
                f"spatial positions, and {where} of model={model_name} has fc features with no spatial extent; "
                "use a convolutional model (model=simple_cnn, deep_cnn, resnet20 or resnet18) or another norm"
            )
        if cfg.name in ("gn", "ws_gn") and num_features % (cfg.group_size or cfg.groups):
            key, value = ("norm.group_size", cfg.group_size) if cfg.group_size else ("norm.groups", cfg.groups)
            divisors = ", ".join(str(g) for g in range(1, num_features + 1) if num_features % g == 0)
            raise ConfigError(
                f"model={model_name} norm={cfg.name}: {key}={value} does not divide the {num_features} channels "
                f"of {where}; pick {key} among the divisors of every normalized layer ({num_features} allows "
                f"{divisors})"
            )
        return NORM_LAYERS[cfg.name](cfg, num_features, dim)

    def adapt(self, model: nn.Module, model_name: str) -> nn.Module:
        """The model as this norm needs it: for ws_gn, every Conv2d with a standardized weight; others unchanged.

        A parametrization, so any model works unchanged and the optimizer steps the raw weight underneath."""
        if self.cfg.name != "ws_gn":
            return model
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConfigError(
                f"model={model_name} norm=ws_gn: weight standardization applies to the weights of convolutions, "
                f"and model={model_name} has none; use norm=gn (GroupNorm without it) or a convolutional model"
            )
        for conv in convs:
            parametrize.register_parametrization(conv, "weight", StandardizedWeight())
        return model


def norm_factory(cfg: NormConfig, model_name: str) -> NormFactory:
    """The factory a model uses to create its norm layers, with the user-facing checks built in."""
    return NormFactory(cfg, model_name)
