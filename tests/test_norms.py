"""Each norm normalizes over the axes the README's table says, checked against a direct computation."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsweep.config.checks import compose_run, options
from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.job.layers import norm_factory
from normsweep.job.models import MLP


def record(name: str, **keys):
    """The record of a built-in norm with those of `keys` it has (groups only for gn and ws_gn)."""
    cls = NORMS[name]
    return cls(**{k: v for k, v in keys.items() if k in {f.name for f in dataclasses.fields(cls)}})


def standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(dim=dims, keepdim=True) + eps)


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
    "ln2d": lambda x: standardize(x, (1,)),  # per sample and position over C
    "rms": lambda x: rms(x, (1,)),  # per sample and position over C, no mean removed
    "in": lambda x: standardize(x, (2, 3)),  # per sample and channel over (H, W)
    "gn": lambda x: grouped(x, 4),  # per sample over each group of 2 channels and (H, W)
    "frn": lambda x: rms(x, (2, 3)).clamp(min=0),  # per sample and channel over (H, W), then max(y, tau=0)
}  # ws_gn's layer is gn's: test_ws_gn_* below check what it adds


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", sorted(EXPECTED_2D))
def test_feature_map_axes(name: str, memory_format: torch.memory_format, feature_map: torch.Tensor) -> None:
    layer = norm_factory(record(name, groups=4), "test")(8, layer="conv1")
    layer.train()
    out = layer(feature_map.contiguous(memory_format=memory_format))
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
        ("ln2d", lambda x: standardize(x, (1,))),  # the same LayerNorm
        ("rms", lambda x: rms(x, (1,))),  # RMSNorm: per sample over the features
        ("gn", lambda x: grouped(x, 4)),  # per sample over groups of features
        ("ws_gn", lambda x: grouped(x, 4)),
        ("none", lambda x: x),
    ],
)
def test_fc_features_axes(name, expected) -> None:
    torch.manual_seed(1)
    x = torch.randn(10, 16) * 2 + torch.arange(16.0)
    layer = norm_factory(record(name, groups=4), "mlp")(16, layer="fc1", dim=1)
    torch.testing.assert_close(layer(x), expected(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name, affine, without",
    [
        ("bn", 2, 0),
        ("ln", 2, 0),
        ("ln2d", 2, 0),
        ("in", 2, 0),
        ("gn", 2, 0),
        ("ws_gn", 2, 0),
        ("rms", 1, 0),  # a scale, no shift
        ("frn", 3, 1),  # scale, shift and the TLU's threshold, which stays: it is the activation
    ],
)
def test_affine_is_a_scale_and_shift_per_channel(name: str, affine: int, without: int) -> None:
    layer = norm_factory(record(name, groups=4), "test")(8)
    assert [p.shape for p in layer.parameters()] == [torch.Size([8])] * affine
    no_affine = norm_factory(record(name, groups=4, affine=False), "test")(8)
    assert [p.shape for p in no_affine.parameters()] == [torch.Size([8])] * without


def test_bn_momentum_and_eps_are_used(feature_map: torch.Tensor) -> None:
    layer = norm_factory(NORMS["bn"](momentum=0.25, eps=0.5), "test")(8)
    layer(feature_map)
    torch.testing.assert_close(layer.running_mean, 0.25 * feature_map.mean(dim=(0, 2, 3)))
    assert layer.eps == 0.5


def test_bn_without_running_stats_evaluates_with_batch_statistics(feature_map: torch.Tensor) -> None:
    layer = norm_factory(NORMS["bn"](track_running_stats=False), "test")(8)
    layer(feature_map)
    assert list(layer.buffers()) == []
    layer.eval()
    torch.testing.assert_close(layer(feature_map), standardize(feature_map, (0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_bn_momentum_null_keeps_a_cumulative_average(compose_cfg, feature_map: torch.Tensor) -> None:
    cfg = compose_run(["norm=bn", "norm.momentum=null"]).norm
    assert cfg.momentum is None
    layer = norm_factory(cfg, "test")(8)
    for shift in (0.0, 1.0, 5.0):
        layer(feature_map + shift)
    torch.testing.assert_close(layer.running_mean, feature_map.mean(dim=(0, 2, 3)) + 2.0)


def test_frn_uses_its_learned_scale_shift_and_threshold(feature_map: torch.Tensor) -> None:
    layer = norm_factory(NORMS["frn"](eps=1e-6), "test")(8)
    gamma, beta, tau = torch.randn(3, 8).unbind()
    with torch.no_grad():
        layer.weight.copy_(gamma), layer.bias.copy_(beta), layer.tau.copy_(tau)
    per_channel = (1, 8, 1, 1)
    y = gamma.view(per_channel) * rms(feature_map, (2, 3), eps=1e-6) + beta.view(per_channel)
    torch.testing.assert_close(layer(feature_map), torch.maximum(y, tau.view(per_channel)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_the_factory_puts_a_relu_after_a_norm_unless_it_brings_its_own(name: str) -> None:
    factory = norm_factory(record(name, groups=4), "test")
    layers = [type(m) for m in factory.act(8, layer="conv1")]
    assert layers[0] is type(factory(8))
    assert layers[1:] == ([] if NORMS[name].own_activation else [nn.ReLU])
    assert NORMS["frn"].own_activation and not NORMS["bn"].own_activation  # FRN's TLU is its activation


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("act", [nn.GELU, lambda: nn.SiLU(), nn.Tanh()])
def test_the_factory_takes_the_models_activation_and_never_adds_a_second(name: str, act) -> None:
    factory = norm_factory(record(name, groups=4), "test")
    layers = list(factory.act(8, layer="conv1", act=act))
    expected = (act if isinstance(act, nn.Module) else act()).__class__
    assert type(layers[0]) is type(factory(8))
    assert [type(m) for m in layers[1:]] == ([] if NORMS[name].own_activation else [expected])


def test_an_activation_that_makes_no_module_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"model=test: norm.act\(\.\.\., act=.*\) at layer conv1 made a str"):
        norm_factory(record("bn"), "test").act(8, layer="conv1", act=lambda: "gelu")


@pytest.mark.parametrize("name", [name for name, norm in NORMS.items() if not norm.fc_features])
def test_spatial_norms_on_fc_features_are_a_clear_error(name: str) -> None:
    factory = norm_factory(NORMS[name](), "mlp")
    with pytest.raises(ConfigError, match=rf"model=mlp norm={name}: layer fc1 has fc features .* feature maps"):
        factory(128, layer="fc1", dim=1)


@pytest.mark.parametrize("name", ["gn", "ws_gn"])
def test_gn_groups_must_divide_channels(name: str) -> None:
    factory = norm_factory(record(name, groups=5), "simple_cnn")
    with pytest.raises(ConfigError, match=r"layer conv1: norm.groups=5 does not divide its 32 channels"):
        factory(32, layer="conv1")


def test_gn_group_size_fixes_the_channels_per_group(feature_map: torch.Tensor) -> None:
    factory = norm_factory(NORMS["gn"](groups=8, group_size=2), "test")
    assert [factory(c).num_groups for c in (8, 16, 64)] == [4, 8, 32]
    torch.testing.assert_close(factory(8)(feature_map), grouped(feature_map, 4), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"layer conv1: norm.group_size=5 does not divide its 32 channels"):
        norm_factory(NORMS["gn"](group_size=5), "simple_cnn")(32, layer="conv1")


@pytest.mark.parametrize("name", ["gn", "ws_gn"])
def test_group_size_below_one_is_refused(compose_cfg, name: str) -> None:
    with pytest.raises(ConfigError, match=r"norm.group_size=0: must be 1 or more"):
        compose_run([f"norm={name}", "norm.group_size=0"])


def ws_gn_net() -> nn.Module:
    torch.manual_seed(0)
    factory = norm_factory(NORMS["ws_gn"](groups=4), "test")
    net = factory.adapt(nn.Sequential(nn.Conv2d(3, 8, 3), factory(8, layer="conv1")))
    with torch.no_grad():
        net[0].parametrizations.weight.original.mul_(10).add_(0.5)  # far from standardized to begin with
    return net


def test_ws_gn_standardizes_each_conv_filter_then_group_norms() -> None:
    net = ws_gn_net()
    conv = net[0]
    raw = conv.parametrizations.weight.original
    var, mean = torch.var_mean(conv.weight, dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(8), atol=1e-4, rtol=0)
    x = torch.randn(4, 3, 9, 9)
    expected = grouped(F.conv2d(x, standardize(raw, (1, 2, 3)), conv.bias), 4)
    torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=1e-4)
    net(x).square().sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # the optimizer steps the raw weight


def test_ws_gn_survives_a_checkpoint_and_channels_last() -> None:
    net, x = ws_gn_net(), torch.randn(4, 3, 9, 9)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = norm_factory(NORMS["ws_gn"](groups=4), "test")
    restored = fresh.adapt(nn.Sequential(nn.Conv2d(3, 8, 3), fresh(8)))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored(x), net(x))
    restored.to(memory_format=torch.channels_last)
    torch.testing.assert_close(restored(x.contiguous(memory_format=torch.channels_last)), net(x), atol=1e-5, rtol=1e-5)


def test_ws_gn_without_convolutions_is_a_clear_error() -> None:
    factory = norm_factory(NORMS["ws_gn"](), "mlp")
    with pytest.raises(ConfigError, match=r"model=mlp norm=ws_gn: weight standardization .* use norm=gn"):
        factory.adapt(MLP(1, (8, 8), 10, factory))


@pytest.mark.parametrize("name", [name for name, norm in NORMS.items() if not norm.adapt_model])
def test_other_norms_leave_the_model_as_it_is(name: str) -> None:
    conv = nn.Conv2d(3, 8, 3)
    weight = conv.weight
    assert norm_factory(NORMS[name](), "test").adapt(conv) is conv and conv.weight is weight


def test_every_norm_yaml_has_its_record_and_back() -> None:
    assert sorted(NORMS) == options("norm")
    for name in NORMS:
        assert compose_run([f"norm={name}"]).norm == NORMS[name]()  # the YAML's values are the record's defaults
