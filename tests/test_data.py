"""Data sets load into uint8 tensors through their real loaders; splits are seeded; augmentation is batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_cifar, make_mnist, make_svhn

from normsweep.config.errors import ConfigError
from normsweep.config.schema import DatasetConfig, SyntheticConfig, UserDataset
from normsweep.job.data import augment, channel_stats, known_shape, load, normalize


def test_digits_has_a_fixed_test_split_and_a_seeded_val_split() -> None:
    a = load(DatasetConfig(name="digits"), val_fraction=0.2, seed=0)
    b = load(DatasetConfig(name="digits"), val_fraction=0.2, seed=1)
    assert a.shape == (1, 8, 8) and a.num_classes == 10
    assert a.train.images.dtype == torch.uint8 and int(a.train.images.max()) > 200
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == round(1797 * 0.2) and len(a.val) == round((1797 - len(a.test)) * 0.2)
    # The test split does not move with the seed; the validation split does.
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.labels, b.val.labels)
    again = load(DatasetConfig(name="digits"), val_fraction=0.2, seed=0)
    assert torch.equal(a.val.images, again.val.images)


def test_normalization_uses_training_statistics_only() -> None:
    data = load(DatasetConfig(name="digits"), val_fraction=0.2, seed=0)
    x = normalize(data.train.images, data)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
    pixels = data.train.images.double() / 255
    assert float(data.mean[0]) == pytest.approx(float(pixels.mean()), rel=1e-6)
    assert float(data.std[0]) == pytest.approx(float(pixels.std()), rel=1e-6)


def test_channel_statistics_are_per_channel() -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    images[:2, 2] = 51
    stats = channel_stats(images)
    torch.testing.assert_close(stats["mean"], torch.tensor([0.0, 1.0, 0.1]))
    assert float(stats["std"][2]) == pytest.approx(float((images[:, 2].double() / 255).std()), rel=1e-5)


def test_digits_and_synthetic_images_have_the_shape_a_sweep_checks_its_models_with() -> None:
    for cfg in (DatasetConfig(name="digits"), SyntheticConfig(name="synthetic", shape=[3, 12, 10], classes=4)):
        data = load(cfg, val_fraction=0.2, seed=0)
        assert known_shape(cfg) == (data.shape, data.num_classes)


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    cfg = DatasetConfig(name="mnist", root=str(tmp_path))
    data = load(cfg, val_fraction=0.25, seed=0)
    assert data.shape == (1, 28, 28) and known_shape(cfg) == (data.shape, data.num_classes)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 40)
    assert data.crop_padding == 0 and data.hflip is False


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    make_mnist(tmp_path, folder="FashionMNIST", n_train=50, n_test=20)
    cfg = DatasetConfig(name="fashion_mnist", root=str(tmp_path))
    data = load(cfg, val_fraction=0.2, seed=0)
    assert data.shape == (1, 28, 28) and len(data.test) == 20 and known_shape(cfg) == (data.shape, data.num_classes)


@pytest.mark.parametrize("name, hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar_from_python_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, hundred: bool) -> None:
    make_cifar(tmp_path, monkeypatch, hundred=hundred)
    cfg = DatasetConfig(name=name, root=str(tmp_path))
    data = load(cfg, val_fraction=0.2, seed=0)
    assert data.shape == (3, 32, 32) and data.num_classes == (100 if hundred else 10)
    assert known_shape(cfg) == (data.shape, data.num_classes)  # what a sweep builds its models for before launch
    assert len(data.train) + len(data.val) == (1 if hundred else 5) * 30 and len(data.test) == 30
    # Channels come out in (N, C, H, W) order: the stored rows are R plane, G plane, B plane.
    import pickle

    with open(tmp_path / ("cifar-100-python/test" if hundred else "cifar-10-batches-py/test_batch"), "rb") as f:
        raw = pickle.load(f)["data"]
    assert torch.equal(data.test.images[0, 1].flatten(), torch.from_numpy(raw[0, 1024:2048]))


def test_svhn_from_mat_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_svhn(tmp_path, monkeypatch)
    cfg = DatasetConfig(name="svhn", root=str(tmp_path))
    data = load(cfg, val_fraction=0.2, seed=0)
    assert data.shape == (3, 32, 32) and len(data.test) == 60 and known_shape(cfg) == (data.shape, data.num_classes)
    assert int(data.train.labels.max()) <= 9 and int(data.train.labels.min()) >= 0


def test_missing_data_set_names_the_folder_and_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(DatasetConfig(name="cifar10", root=str(tmp_path / "nowhere")), val_fraction=0.2, seed=0)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "dataset.root=" in message and "dataset.download=true" in message


def test_val_fraction_that_empties_a_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="val_fraction=0.0001"):
        load(DatasetConfig(name="digits"), val_fraction=0.0001, seed=0)


def test_train_size_trains_on_a_seeded_subset_and_leaves_validation_and_test_alone() -> None:
    whole = load(DatasetConfig(name="digits"), val_fraction=0.2, seed=0)
    cfg = DatasetConfig(name="digits", train_size=300)
    part, again, other = load(cfg, 0.2, seed=0), load(cfg, 0.2, seed=0), load(cfg, 0.2, seed=1)
    assert len(part.train) == 300 and len(whole.train) > 1000
    assert torch.equal(part.val.images, whole.val.images) and torch.equal(part.test.images, whole.test.images)
    assert torch.equal(part.train.images, again.train.images)  # the same command, the same images
    assert not torch.equal(part.train.labels, other.train.labels)  # drawn with the seed
    # Drawn from the training images, so every class is there, in about its share.
    assert set(part.train.labels.tolist()) == set(range(10))


def test_a_train_size_larger_than_the_training_split_is_refused_with_the_most_it_can_be() -> None:
    with pytest.raises(ConfigError) as err:
        load(DatasetConfig(name="digits", train_size=5000), val_fraction=0.2, seed=0)
    assert str(err.value).startswith("dataset.train_size=5000: digits has 1150 training images once val_fraction=0.2")
    assert "choose dataset.train_size=1150 or fewer" in str(err.value)


def test_crop_is_a_shifted_window_of_the_padded_image() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).reshape(2, 3, 6, 6).to(torch.uint8)
    out = augment(images, padding=2, hflip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[n], w) for w in windows)


def test_flip_mirrors_about_half_the_images() -> None:
    images = torch.randint(0, 255, (400, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(images, padding=0, hflip=True, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) and not torch.equal(o, i) for o, i in zip(out, images)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | same).all()) and 150 < int(flipped.sum()) < 250


def test_augmentation_is_seeded() -> None:
    images = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    a = augment(images, 2, True, torch.Generator().manual_seed(3))
    b = augment(images, 2, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_synthetic_data_has_the_asked_shape_and_a_learnable_signal() -> None:
    cfg = SyntheticConfig(name="synthetic", shape=[2, 12, 20], classes=5, size=600, test_fraction=0.2)
    data = load(cfg, val_fraction=0.25, seed=0)
    assert data.shape == (2, 12, 20) and data.num_classes == 5 and data.train.images.dtype == torch.uint8
    assert (len(data.train), len(data.val), len(data.test)) == (360, 120, 120)
    again = load(cfg, val_fraction=0.25, seed=0)
    assert torch.equal(data.test.images, again.test.images)  # the set is a function of split_seed
    # Class means differ far more than the noise of a mean over ~70 images: a model has something to learn.
    means = torch.stack([data.train.images[data.train.labels == k].float().mean(0) for k in range(5)])
    gaps = (means[:, None] - means[None]).abs().mean((2, 3, 4))
    assert gaps[~torch.eye(5, dtype=torch.bool)].min() > 5


def test_a_data_set_is_loaded_once_per_process_and_never_shared_mutably(monkeypatch: pytest.MonkeyPatch) -> None:
    from normsweep.job import data as datasets

    calls = []
    real = datasets.LOADERS["synthetic"]
    monkeypatch.setitem(datasets.LOADERS, "synthetic", lambda cfg: calls.append(cfg.size) or real(cfg))
    monkeypatch.setattr(datasets, "_LAST", {})
    cfg = SyntheticConfig(name="synthetic", shape=[1, 6, 6], size=200)
    first = load(cfg, val_fraction=0.2, seed=0)
    first.train.images.zero_()  # a job that scribbles on its data...
    first.test.images.zero_()
    second = load(cfg, val_fraction=0.2, seed=1)  # ...the next job with the same data set, another seed
    assert calls == [200]  # generated once
    assert second.train.images.any() and second.test.images.any()  # ...does not see the scribbles
    assert not torch.equal(first.val.labels, second.val.labels)  # its own seeded validation split
    load(SyntheticConfig(name="synthetic", shape=[1, 6, 6], size=300), val_fraction=0.2, seed=0)
    assert calls == [200, 300]  # another data set is loaded anew


USER_DATA = """
import numpy as np
import torch


def pairs(n=200, float_images=False):
    g = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = (g.random((n, 2, 6, 5)) * 50 + labels[:, None, None, None] * 60).astype(np.uint8)
    if float_images:
        return images.astype(np.float32) / 10 - 7, labels  # any scale: normsweep standardizes
    return images, labels


def official_split():
    train = (torch.randint(0, 256, (40, 9, 9), dtype=torch.uint8), torch.arange(40) % 4)
    test = (torch.randint(0, 256, (12, 9, 9), dtype=torch.uint8), torch.arange(12) % 4)
    return {"train": train, "test": test}


def float_labels():
    return np.zeros((10, 1, 4, 4), np.uint8), np.linspace(0, 1, 10)


def wide_ints():
    return np.full((10, 1, 4, 4), 300), np.arange(10) % 2


def one_class():
    return np.zeros((10, 1, 4, 4), np.uint8), np.zeros(10, int)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "user_data_mod.py").write_text(USER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_data_mod"


def user(target: str, **kwargs) -> DatasetConfig:
    return UserDataset(name="mine", _target_=target, kwargs=kwargs, test_fraction=0.25)


def test_a_user_data_set_gets_a_fixed_test_split_and_the_usual_validation_split(user_module: str) -> None:
    a = load(user(f"{user_module}.pairs", n=200), val_fraction=0.2, seed=0)
    b = load(user(f"{user_module}.pairs", n=200), val_fraction=0.2, seed=1)
    assert a.shape == (2, 6, 5) and a.num_classes == 3 and a.train.images.dtype == torch.uint8
    assert len(a.test) == 50 and len(a.train) + len(a.val) == 150
    assert torch.equal(a.test.images, b.test.images) and not torch.equal(a.val.labels, b.val.labels)


def test_a_user_data_set_with_its_own_test_split_keeps_it(user_module: str) -> None:
    data = load(user(f"{user_module}.official_split"), val_fraction=0.25, seed=0)
    assert data.shape == (1, 9, 9) and data.num_classes == 4
    assert len(data.test) == 12 and len(data.train) + len(data.val) == 40


def test_float_images_are_standardized_on_their_own_scale(user_module: str) -> None:
    data = load(user(f"{user_module}.pairs", float_images=True), val_fraction=0.2, seed=0)
    assert data.train.images.dtype == torch.float32
    x = normalize(data.train.images, data)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-3)
    before = data.train.images.clone()
    normalize(data.train.images, data)
    assert torch.equal(data.train.images, before)  # a new tensor: the data set is not changed in place
    crops = augment(data.train.images[:4], padding=1, hflip=True, generator=torch.Generator().manual_seed(0))
    assert crops.dtype == torch.float32 and crops.shape == (4, 2, 6, 5)


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        ("float_labels", {}, "labels must be 10 integers"),
        ("wide_ints", {}, "integer images must be 0..255"),
        ("one_class", {}, "fewer than 2 distinct labels"),
        ("pairs", {"colour": True}, "^dataset.colour: dataset=mine has no such key; its keys are "),
        ("nowhere", {}, "cannot import _target_=.*nowhere"),
    ],
)
def test_a_broken_user_data_set_is_explained(user_module: str, target: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(user(f"{user_module}.{target}", **kwargs), val_fraction=0.2, seed=0)
    if not message.startswith("^"):  # the others name the data set and its function first
        assert str(err.value).startswith(
            f"dataset=mine{'' if target == 'nowhere' else f' (_target_={user_module}.{target})'}"
        )


@pytest.mark.parametrize("existing_root", [False, True])
def test_a_failed_download_says_so_and_leaves_no_empty_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing_root: bool
) -> None:
    import socket
    import urllib.error

    import torchvision.datasets.mnist as tv_mnist

    # Offline: torchvision's real download path runs (its folders, its retries over the mirrors, its error), and
    # the fetch itself fails as a refused connection does; no socket is opened.
    def refused(url: str, **kwargs: object) -> None:
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", refused)

    def no_network(*args: object, **kwargs: object) -> None:  # whatever path torchvision takes, nothing leaves
        raise AssertionError("the test opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    root = tmp_path / "data" if existing_root else tmp_path / "new" / "data"
    if existing_root:
        root.mkdir()
        (root / "notes.txt").write_text("the user's own file")
    with pytest.raises(ConfigError) as refused:
        load(DatasetConfig(name="mnist", root=str(root), download=True), val_fraction=0.2, seed=0)
    message = str(refused.value)
    assert message.startswith(f"dataset=mnist: could not download MNIST into {root} (<urlopen error")
    assert "check the network connection" in message and "damaged" not in message
    # torchvision made root/MNIST/raw before it failed: all of it is gone, and nothing of the user's.
    if existing_root:
        assert [p.name for p in root.iterdir()] == ["notes.txt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_jobs_train_size_is_recorded_and_shown_in_the_table(tmp_path: Path) -> None:
    from dataclasses import replace

    from normsweep.config.checks import compose_run
    from normsweep.job.run import run_job
    from normsweep.results.tables import format_table
    from normsweep.results.write import aggregate

    small = ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.size=400", "epochs=1", "dataset.train_size=100"]
    run = replace(compose_run(small), threads=1, diagnostics=False)
    summary = run_job(run, tmp_path / "0", small, {"dataset": {"name": "synthetic", "train_size": 100}})
    assert summary["train_images"] == 100
    assert "dataset.train_size=100" in format_table(aggregate(tmp_path))
