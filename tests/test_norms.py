"""Each norm normalizes over the axes the README's table says, checked against a direct computation."""

from __future__ import annotations

import pytest
import torch

from normsweep.config import ConfigError, NormConfig
from normsweep.norms import NORM_LAYERS, norm_factory


def standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, *rest = x.shape
    g = x.reshape(n, groups, c // groups, *rest)
    return standardize(g, tuple(range(2, g.ndim))).reshape(x.shape)


@pytest.fixture
def feature_map() -> torch.Tensor:
    torch.manual_seed(0)
    # Different scale and offset per channel and per sample, so each choice of axes gives a different answer.
    return torch.randn(6, 8, 5, 7) * torch.linspace(0.5, 3, 8).view(1, 8, 1, 1) + torch.arange(6.0).view(6, 1, 1, 1)


EXPECTED_2D = {
    "none": lambda x: x,
    "bn": lambda x: standardize(x, (0, 2, 3)),  # per channel over (N, H, W)
    "ln": lambda x: standardize(x, (1, 2, 3)),  # per sample over (C, H, W)
    "in": lambda x: standardize(x, (2, 3)),  # per sample and channel over (H, W)
    "gn": lambda x: grouped(x, 4),  # per sample over each group of 2 channels and (H, W)
}


@pytest.mark.parametrize("name", sorted(EXPECTED_2D))
def test_feature_map_axes(name: str, feature_map: torch.Tensor) -> None:
    layer = norm_factory(NormConfig(name=name, groups=4), "test")(8, layer="conv1")
    layer.train()
    out = layer(feature_map)
    torch.testing.assert_close(out, EXPECTED_2D[name](feature_map), atol=1e-4, rtol=1e-4)


def test_the_axes_really_differ(feature_map: torch.Tensor) -> None:
    # Guards the test above: if two norms agreed on this input, it could not tell them apart.
    outputs = {name: f(feature_map) for name, f in EXPECTED_2D.items()}
    names = sorted(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-3), (a, b)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bn", lambda x: standardize(x, (0,))),  # BatchNorm1d: per feature over the batch
        ("ln", lambda x: standardize(x, (1,))),  # LayerNorm: per sample over the features
        ("gn", lambda x: grouped(x, 4)),  # per sample over groups of features
        ("none", lambda x: x),
    ],
)
def test_fc_features_axes(name, expected) -> None:
    torch.manual_seed(1)
    x = torch.randn(10, 16) * 2 + torch.arange(16.0)
    layer = norm_factory(NormConfig(name=name, groups=4), "mlp")(16, layer="fc1", dim=1)
    torch.testing.assert_close(layer(x), expected(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bn", "ln", "in", "gn"])
def test_affine_is_one_scale_and_shift_per_channel(name: str) -> None:
    layer = norm_factory(NormConfig(name=name, groups=4), "test")(8)
    assert sorted(p.shape for p in layer.parameters()) == [torch.Size([8]), torch.Size([8])]
    no_affine = norm_factory(NormConfig(name=name, groups=4, affine=False), "test")(8)
    assert list(no_affine.parameters()) == []


def test_bn_momentum_and_eps_are_used(feature_map: torch.Tensor) -> None:
    layer = norm_factory(NormConfig(name="bn", momentum=0.25, eps=0.5), "test")(8)
    layer(feature_map)
    torch.testing.assert_close(layer.running_mean, 0.25 * feature_map.mean(dim=(0, 2, 3)))
    assert layer.eps == 0.5


def test_in_on_fc_features_is_a_clear_error() -> None:
    factory = norm_factory(NormConfig(name="in"), "mlp")
    with pytest.raises(ConfigError, match=r"model=mlp norm=in.*layer fc1"):
        factory(128, layer="fc1", dim=1)


def test_gn_groups_must_divide_channels() -> None:
    factory = norm_factory(NormConfig(name="gn", groups=5), "simple_cnn")
    with pytest.raises(ConfigError, match=r"norm.groups=5 does not divide the 32 channels of layer conv1"):
        factory(32, layer="conv1")


def test_registry_has_the_five_norms() -> None:
    assert set(NORM_LAYERS) == {"none", "bn", "ln", "in", "gn"}
