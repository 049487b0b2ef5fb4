"""Models size themselves to the data set: any channels, image size and class count."""

from __future__ import annotations

import pytest
import torch

from normsweep.config import ConfigError, NormConfig
from normsweep.models import DeepCNN, SimpleCNN, build_model
from normsweep.norms import norm_factory

TARGETS = {
    "simple_cnn": "normsweep.models.SimpleCNN",
    "deep_cnn": "normsweep.models.DeepCNN",
    "mlp": "normsweep.models.MLP",
}


@pytest.mark.parametrize("model", sorted(TARGETS))
@pytest.mark.parametrize("shape, classes", [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 100), ((3, 17, 23), 7)])
def test_any_input_shape(model: str, shape: tuple[int, int, int], classes: int) -> None:
    net = build_model(
        model,
        {"_target_": TARGETS[model]},
        shape[0],
        shape[1:],
        classes,
        norm_factory(NormConfig(name="bn"), model),
    )
    out = net(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    out.sum().backward()


def test_simple_cnn_matches_the_article_layer_for_layer() -> None:
    # The article's SimpleCNN on its 16x16 input flattens 64*6*6 features into fc1.
    net = SimpleCNN(1, (16, 16), 10, norm_factory(NormConfig(name="bn"), "simple_cnn"))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (0, 0)),
        (32, 64, (3, 3), (0, 0)),
    ]
    assert net.classifier[0].in_features == 64 * 6 * 6 and net.classifier[0].out_features == 128


def test_deep_cnn_matches_the_article_layer_for_layer() -> None:
    net = DeepCNN(3, (32, 32), 10, norm_factory(NormConfig(name="bn"), "deep_cnn"))
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 3 + ["Flatten"]
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256] and all(c.padding == (1, 1) for c in convs)
    assert net.classifier[0].in_features == 256 * 4 * 4 and net.classifier[0].out_features == 512


def test_too_small_images_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="model=simple_cnn"):
        build_model(
            "simple_cnn",
            {"_target_": TARGETS["simple_cnn"]},
            1,
            (4, 4),
            10,
            norm_factory(NormConfig(name="none"), "simple_cnn"),
        )


def test_unknown_model_argument_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="model=mlp.*width"):
        build_model(
            "mlp",
            {"_target_": TARGETS["mlp"], "width": 3},
            1,
            (8, 8),
            10,
            norm_factory(NormConfig(name="none"), "mlp"),
        )


@pytest.mark.parametrize(
    "value, message", [("abc", "expects int for hidden"), (2.5, "expects int"), (0, "at least one")]
)
def test_bad_model_argument_values_are_clear_errors(value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(
            "mlp",
            {"_target_": TARGETS["mlp"], "hidden": value},
            1,
            (8, 8),
            10,
            norm_factory(NormConfig(name="bn"), "mlp"),
        )
