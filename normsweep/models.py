"""Image classifiers that take (in_channels, image_size, num_classes, norm) and size themselves to the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_type_hints

import torch
from hydra.utils import get_class
from torch import nn

from normsweep.config import ConfigError
from normsweep.norms import NormFactory


def _conv_out(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


def _check_width(hidden: int, model: str) -> None:
    if hidden < 1:
        raise ConfigError(f"model.hidden={hidden}: model={model} needs at least one hidden unit")


def _flat_features(channels: int, height: int, width: int, model: str) -> int:
    if height < 1 or width < 1:
        raise ConfigError(f"model={model}: the input images are too small for its convolutions and poolings")
    return channels * height * width


class SimpleCNN(nn.Module):
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
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3),
            norm(32, layer="conv1"),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3),
            norm(64, layer="conv2"),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(64, h, w, "simple_cnn"), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DeepCNN(nn.Module):
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
                norm(width, layer=f"conv{i}"),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(channels, h, w, "deep_cnn"), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


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
            norm(hidden, layer="fc1", dim=1),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(
    name: str,
    spec: dict[str, Any],
    in_channels: int,
    image_size: Sequence[int],
    num_classes: int,
    norm: NormFactory,
) -> nn.Module:
    """Instantiate the model named by `spec["_target_"]` and prove it runs on one input of the data's shape."""
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    try:
        cls = get_class(spec["_target_"])
    except Exception as err:
        raise ConfigError(f"model={name}: cannot import _target_={spec['_target_']!r} ({err})") from None
    hints = get_type_hints(cls.__init__)
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
