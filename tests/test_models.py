"""Models size themselves to the data set: any channels, image size and class count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.norms import UserNorm
from normsweep.job.layers import norm_factory
from normsweep.job.models import MLP, DeepCNN, ResNet, SimpleCNN, build_model

TARGETS = {
    "simple_cnn": "normsweep.job.models.SimpleCNN",
    "deep_cnn": "normsweep.job.models.DeepCNN",
    "mlp": "normsweep.job.models.MLP",
    "resnet20": "normsweep.job.models.ResNet",
}
RESNET18 = {"blocks": [2, 2, 2, 2], "widths": [64, 128, 256, 512]}
TINY = {"blocks": [1, 2], "widths": [8, 16]}  # two stages, one stride-2 block with a conv shortcut: quick to train


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("model", sorted(TARGETS))
@pytest.mark.parametrize("shape, classes", [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 100), ((3, 17, 23), 7)])
def test_any_input_shape(model: str, shape: tuple[int, int, int], classes: int) -> None:
    net = build_model(
        model,
        {"_target_": TARGETS[model]},
        shape[0],
        shape[1:],
        classes,
        norm_factory(NORMS["bn"](), model),
    )
    out = net(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    out.sum().backward()


def test_simple_cnn_matches_the_article_layer_for_layer() -> None:
    # The article's SimpleCNN on its 16x16 input flattens 64*6*6 features into fc1.
    net = SimpleCNN(1, (16, 16), 10, norm_factory(NORMS["bn"](), "simple_cnn"))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (0, 0)),
        (32, 64, (3, 3), (0, 0)),
    ]
    assert net.classifier[0].in_features == 64 * 6 * 6 and net.classifier[0].out_features == 128


def test_deep_cnn_matches_the_article_layer_for_layer() -> None:
    net = DeepCNN(3, (32, 32), 10, norm_factory(NORMS["bn"](), "deep_cnn"))
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
            norm_factory(NORMS["none"](), "simple_cnn"),
        )


def test_unknown_model_argument_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="^model.width: model=mlp has no such key; its keys are hidden"):
        build_model(
            "mlp",
            {"_target_": TARGETS["mlp"], "width": 3},
            1,
            (8, 8),
            10,
            norm_factory(NORMS["none"](), "mlp"),
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
            norm_factory(NORMS["bn"](), "mlp"),
        )


def test_resnet20_matches_the_paper() -> None:
    net = ResNet(3, (32, 32), 10, norm_factory(NORMS["bn"](), "resnet20"))
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert [block.branch[0].out_channels for block in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [block.branch[0].stride for block in blocks] == [(1, 1)] * 3 + [(2, 2), (1, 1), (1, 1)] * 2
    # He et al. report 0.27 M; the two conv1x1 -> BN shortcuts (option B) add 2,752 to their option A.
    assert n_params(net) == 272_474


def test_resnet18_is_the_cifar_variant() -> None:
    net = ResNet(3, (32, 32), 10, norm_factory(NORMS["bn"](), "resnet18"), **RESNET18)
    stem = net.features[0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((3, 3), (1, 1), 64)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert n_params(net) == 11_173_962


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 17, 23)])
@pytest.mark.parametrize("keys", [{}, RESNET18], ids=["resnet20", "resnet18"])
def test_resnet_takes_any_image_size(shape: tuple[int, int, int], keys: dict) -> None:
    net = build_model(
        "resnet",
        {"_target_": TARGETS["resnet20"], **keys},
        shape[0],
        shape[1:],
        7,
        norm_factory(NORMS["gn"](), "resnet"),
    )
    out = net(torch.randn(2, *shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_a_conv_has_a_bias_only_without_a_norm(norm: str) -> None:
    net = ResNet(3, (8, 8), 10, norm_factory(NORMS[norm](), "resnet20"), **TINY)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == (norm == "none") for c in convs)


def test_without_a_norm_every_block_starts_as_the_identity_and_its_gain_learns() -> None:
    torch.manual_seed(0)
    net = ResNet(3, (8, 8), 10, norm_factory(NORMS["none"](), "resnet20"), **TINY)
    block = net.features[-2]  # stage 2, block 2: identity shortcut (then the pool)
    x = torch.rand(4, 16, 4, 4)  # a block's input follows a ReLU: non-negative
    assert torch.equal(block(x), x)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    gains = [m.gain for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(gains) == 3 and all(g.item() == 0 and g.grad.abs().item() > 0 for g in gains)


def test_real_norms_keep_the_standard_resnet() -> None:
    net = ResNet(3, (8, 8), 10, norm_factory(NORMS["bn"](), "resnet20"), **TINY)
    assert all(getattr(m, "gain", None) is None for m in net.modules())


def test_zero_init_residual_zeroes_each_blocks_last_norm() -> None:
    factory = norm_factory(NORMS["bn"](), "resnet20")
    net = build_model(
        "resnet20", {"_target_": TARGETS["resnet20"], **TINY, "zero_init_residual": True}, 3, (8, 8), 10, factory
    )
    lasts = [m.branch[-1] for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(lasts) == 3 and all(torch.count_nonzero(n.weight) == 0 for n in lasts)


@pytest.mark.slow  # trains for seconds in-process; `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("norm", ["bn", "gn", "none", "ln", "in"])
def test_resnet_trains_with_each_norm(norm: str) -> None:
    torch.manual_seed(0)
    net = ResNet(3, (8, 8), 4, norm_factory(NORMS[norm](), "resnet20"), **TINY)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"blocks": [3, 3]}, r"model.blocks=\[3,3\] and model.widths=\[16,32,64\].*same length"),
        ({"widths": [16, 0, 64]}, r"model.widths=\[16,0,64\]: give a list with one positive integer per stage"),
        ({"blocks": 3}, r"model.blocks=3: give a list .* e.g. model.blocks=\[3,3,3\]"),
        ({"blocks": []}, r"model.blocks=\[\]: give a list"),
        ({"widths": [16.0, 32, 64]}, r"model.widths=\[16.0,32,64\]"),
    ],
)
def test_bad_resnet_stages_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(
            "resnet20",
            {"_target_": TARGETS["resnet20"], **keys},
            3,
            (8, 8),
            10,
            norm_factory(NORMS["bn"](), "resnet20"),
        )


class PassThrough(nn.Module):
    """Stands in for a user's norm (`_target_: test_models.PassThrough`): any module taking the channel count."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def followed_by_relu(net: nn.Module) -> int:
    """How many of the model's norm layers (PassThrough) a ReLU follows in their Sequential."""
    count = 0
    for seq in net.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            count += sum(isinstance(a, PassThrough) and isinstance(b, nn.ReLU) for a, b in zip(children, children[1:]))
    return count


@pytest.mark.parametrize(
    "model, norm_relu_layers",
    [
        (SimpleCNN, ["conv1", "conv2"]),
        (DeepCNN, ["conv1", "conv2", "conv3"]),
        (MLP, ["fc1"]),
        (ResNet, ["stem", "stage1.block1.conv1", "stage2.block1.conv1", "stage2.block2.conv1"]),
    ],
)
@pytest.mark.parametrize("own_activation", [True, False])
def test_a_norm_with_its_own_activation_replaces_norm_relu(model, norm_relu_layers: list[str], own_activation) -> None:
    record = UserNorm(_target_="test_models.PassThrough", name="mine", fc_features=True, own_activation=own_activation)
    kwargs = TINY if model is ResNet else {}
    net = model(1, (8, 8), 10, norm_factory(record, model.__name__), **kwargs)
    assert followed_by_relu(net) == (0 if own_activation else len(norm_relu_layers))


class Counting(nn.Module):
    """What `adapt_model: test_models.counting` turns a model into: the model, counting its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def counting(model: nn.Module) -> nn.Module:
    return Counting(model)


def refusing(model: nn.Module) -> nn.Module:
    raise ConfigError("has no convolution to standardize")


def test_a_norm_can_adapt_the_model_before_its_trial_run() -> None:
    record = NORMS["gn"](groups=4, adapt_model="test_models.counting")
    net = build_model("resnet20", {"_target_": TARGETS["resnet20"], **TINY}, 3, (8, 8), 10, norm_factory(record, "r"))
    assert isinstance(net, Counting) and net.calls == 1  # the trial forward pass ran through the adapted model
    assert net.training


def test_a_norm_that_refuses_the_model_is_a_config_error() -> None:
    record = UserNorm(_target_="torch.nn.Identity", name="mine", fc_features=True, adapt_model="test_models.refusing")
    with pytest.raises(ConfigError, match="model=mlp norm=mine: has no convolution to standardize"):
        build_model("mlp", {"_target_": TARGETS["mlp"]}, 1, (8, 8), 10, norm_factory(record, "mlp"))
