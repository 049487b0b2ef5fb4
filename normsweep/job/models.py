"""Image classifiers that take (in_channels, image_size, num_classes, norm) and size themselves to the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_type_hints

import torch
from torch import nn

from normsweep.config.errors import ConfigError
from normsweep.config.schema import MODEL_ARGUMENTS
from normsweep.config.targets import check_arguments, import_target
from normsweep.job.layers import NormFactory


def _conv_out(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


def _check_width(hidden: int, model: str) -> None:
    if hidden < 1:
        raise ConfigError(f"model.hidden={hidden}: model={model} needs at least one hidden unit")


def _flat_features(channels: int, height: int, width: int, model: str) -> int:
    if height < 1 or width < 1:
        raise ConfigError(f"model={model}: the input images are too small for its convolutions and poolings")
    return channels * height * width


class _FeaturesThenHead(nn.Module):
    """`features` (convolutions, flattened) then the head: fc(hidden) → ReLU → fc(classes)."""

    def _head(self, features: nn.Sequential, flat: int, hidden: int, num_classes: int) -> None:
        self.features = features
        self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SimpleCNN(_FeaturesThenHead):
    """conv3x3(32) → norm → ReLU → conv3x3(64) → norm → ReLU → maxpool 2 → fc(hidden) → ReLU → fc(classes)."""

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        num_classes: int,
        norm: NormFactory,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        _check_width(hidden, "simple_cnn")
        h, w = (_conv_out(_conv_out(s, 3, 0), 3, 0) // 2 for s in image_size)
        features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3),
            *norm.act(32, layer="conv1"),
            nn.Conv2d(32, 64, kernel_size=3),
            *norm.act(64, layer="conv2"),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self._head(features, _flat_features(64, h, w, "simple_cnn"), hidden, num_classes)


class DeepCNN(_FeaturesThenHead):
    """Three stages of conv3x3(pad 1) → norm → ReLU → maxpool 2 (64, 128, 256), fc(hidden) → ReLU → fc(classes)."""

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        num_classes: int,
        norm: NormFactory,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        _check_width(hidden, "deep_cnn")
        layers: list[nn.Module] = []
        channels = in_channels
        h, w = image_size
        for i, width in enumerate((64, 128, 256), start=1):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                *norm.act(width, layer=f"conv{i}"),
                nn.MaxPool2d(2),
            ]
            channels, h, w = width, h // 2, w // 2
        self._head(
            nn.Sequential(*layers, nn.Flatten()), _flat_features(channels, h, w, "deep_cnn"), hidden, num_classes
        )


class MLP(nn.Module):
    """flatten → fc(hidden) → norm → ReLU → fc(classes)."""

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        num_classes: int,
        norm: NormFactory,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        _check_width(hidden, "mlp")
        h, w = image_size
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * h * w, hidden),
            *norm.act(hidden, layer="fc1", dim=1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_before(
    after: list[nn.Module], in_channels: int, out_channels: int, kernel: int, stride: int
) -> list[nn.Module]:
    """conv (kernel×kernel, "same" padding) followed by `after`, a norm first; the norm's shift takes the place of the
    conv's bias, so the conv has one only when there is no norm (nn.Identity)."""
    bias = isinstance(after[0], nn.Identity)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)
    return [conv, *after]


def _as_override(value: Any) -> str:
    """A value as the user would type it on the command line: [3,3,3], not [3, 3, 3]."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_as_override, value)) + "]"
    return str(value)


def _check_stages(blocks: Sequence[int], widths: Sequence[int]) -> None:
    for key, values, example in (("blocks", blocks, [3, 3, 3]), ("widths", widths, [16, 32, 64])):
        if not (
            isinstance(values, Sequence)
            and not isinstance(values, str)
            and values
            and all(type(v) is int and v >= 1 for v in values)
        ):
            raise ConfigError(
                f"model.{key}={_as_override(values)}: give a list with one positive integer per stage, "
                f"e.g. model.{key}={_as_override(example)}"
            )
    if len(blocks) != len(widths):
        raise ConfigError(
            f"model.blocks={_as_override(blocks)} and model.widths={_as_override(widths)}: each stage needs a block "
            f"count and a width; give both lists the same length"
        )


class BasicBlock(nn.Module):
    """conv3x3 → norm → ReLU → conv3x3 → norm, added to the shortcut, then ReLU (He et al. 2016).

    The shortcut is the identity, or conv1x1 → norm where the shape changes (the paper's option B). Without a norm
    (norm=none) the branch is scaled by a learned gain that starts at 0 (SkipInit, De & Smith 2020): every block
    starts as the identity, so the signal does not grow with depth and the un-normalized net still trains.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: NormFactory,
        name: str,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        first = _conv_before([*norm.act(out_channels, layer=f"{name}.conv1")], in_channels, out_channels, 3, stride)
        last = norm(out_channels, layer=f"{name}.conv2")
        self.branch = nn.Sequential(*first, *_conv_before([last], out_channels, out_channels, 3, 1))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            shortcut_norm = norm(out_channels, layer=f"{name}.shortcut")
            self.shortcut = nn.Sequential(*_conv_before([shortcut_norm], in_channels, out_channels, 1, stride))
        self.gain = nn.Parameter(torch.zeros(())) if isinstance(last, nn.Identity) else None
        if zero_init_residual and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)  # Goyal et al. 2017: the block starts as the identity with a real norm too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.gain is not None:
            out = out * self.gain
        return torch.relu(out + self.shortcut(x))


class GlobalAvgPool(nn.Module):
    """Each channel's mean over its positions, (N, C, H, W) → (N, C): an adaptive average pool to 1x1 and a flatten
    in one reduction that torch.func.vmap batches (the pool has no batching rule: in a packed step, job/pack.py, it
    would run one member at a time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class ResNet(nn.Module):
    """conv3x3 stem → norm → ReLU, stages of BasicBlocks (stride 2 from the second stage on), global average pool, fc.

    `blocks` and `widths` give each stage's block count and channels; the stem has the first stage's width. The
    global average pool lets it run on any image size: a stride-2 conv (3x3, pad 1) still gives 1x1 from 1x1.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        num_classes: int,
        norm: NormFactory,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_stages(blocks, widths)
        layers = _conv_before([*norm.act(widths[0], layer="stem")], in_channels, widths[0], 3, 1)
        channels = widths[0]
        for s, (count, width) in enumerate(zip(blocks, widths), start=1):
            for b in range(1, count + 1):
                stride = 2 if s > 1 and b == 1 else 1
                layers.append(BasicBlock(channels, width, stride, norm, f"stage{s}.block{b}", zero_init_residual))
                channels = width
        self.features = nn.Sequential(*layers, GlobalAvgPool())
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the paper's init (He et al. 2015), not PyTorch's smaller default
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str,
    spec: dict[str, Any],
    in_channels: int,
    image_size: Sequence[int],
    num_classes: int,
    norm: NormFactory,
) -> nn.Module:
    """Instantiate the model named by `spec["_target_"]` and prove it runs on one input of the data's shape."""
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "name")}  # name: normsweep's label
    cls = import_target(spec["_target_"], f"model={name}")
    check_arguments(cls, kwargs, f"model={name}", "model", MODEL_ARGUMENTS)
    try:
        hints = get_type_hints(cls.__init__)
    except Exception:  # a user's class may annotate with names that do not resolve at runtime: no checks then
        hints = {}
    for key, value in kwargs.items():
        expected = hints.get(key)
        if expected in (int, float, bool) and not (
            type(value) is expected or (expected is float and type(value) is int)
        ):
            raise ConfigError(f"model.{key}={value!r}: model={name} expects {expected.__name__} for {key}")
    try:
        model = cls(
            in_channels=in_channels,
            image_size=tuple(image_size),
            num_classes=num_classes,
            norm=norm,
            **kwargs,
        )
    except TypeError as err:
        raise ConfigError(f"model={name}: {err}") from None
    adapt = getattr(norm, "adapt", None)
    if adapt is not None:  # a norm that changes other layers too (weight standardization of every conv for ws_gn)
        model = adapt(model)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, *image_size))
    except RuntimeError as err:
        size = "x".join(map(str, (in_channels, *image_size)))
        raise ConfigError(f"model={name} cannot run on {size} images: {err}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"model={name} returns shape {tuple(out.shape)} for 2 images, expected (2, {num_classes})")
    return model.train()
