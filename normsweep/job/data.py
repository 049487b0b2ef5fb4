"""Data sets loaded once into uint8 tensors, split into train/val/test, and augmented in batches on the device."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normsweep.config.errors import ConfigError
from normsweep.config.schema import USER_DATASET_KEYS, DatasetConfig, SyntheticConfig, UserDataset
from normsweep.config.targets import check_arguments, import_target


@dataclass
class Split:
    images: torch.Tensor  # uint8 (0..255), or float32 for a user data set given as floats; (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: slice | torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # per channel, on the 0..1 scale (float images: their own scale), from the training split
    std: torch.Tensor
    crop_padding: int
    hflip: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return c, h, w

    def to(self, device: torch.device) -> Data:
        return replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            mean=self.mean.to(device),
            std=self.std.to(device),
        )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: 1797 images of 8×8 pixel counts 0..16, and their labels 0..9. Read from the
    file scikit-learn ships (what its load_digits reads), without importing scikit-learn: that import alone takes
    longer than training the default job."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    pixels, target = digits_arrays()
    # Pixel values are counts 0..16; spread them over 0..255 like any 8-bit image.
    images = torch.from_numpy(np.clip(pixels * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    return (*_fixed_test_split(images, labels, cfg), 10)


def _synthetic(cfg: SyntheticConfig) -> tuple[Split, Split, int]:
    """uint8 images of any shape: each class a smooth random pattern (4×4 cells, bilinearly upsampled, so
    convolutions have a spatial signal to find) at half intensity, plus uniform per-pixel noise at half."""
    c, h, w = cfg.shape
    g = torch.Generator().manual_seed(cfg.split_seed)
    labels = torch.randint(0, cfg.classes, (cfg.size,), generator=g)
    coarse = torch.rand(cfg.classes, c, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    images = torch.empty(cfg.size, c, h, w, dtype=torch.uint8)
    for s in range(0, cfg.size, 1024):  # in chunks: no float copy of the whole set
        noise = torch.rand(len(labels[s : s + 1024]), c, h, w, generator=g)
        images[s : s + 1024] = ((patterns[labels[s : s + 1024]] + noise) * 127.5).round().to(torch.uint8)
    return (*_fixed_test_split(images, labels, cfg), cfg.classes)


def _fixed_test_split(images: torch.Tensor, labels: torch.Tensor, cfg: DatasetConfig) -> tuple[Split, Split]:
    """For sets without an official test split: one drawn with `split_seed`, the same for every `seed`."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_test = round(len(labels) * cfg.test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


def _as_split(images: np.ndarray | torch.Tensor, labels: object, channels_last: bool) -> Split:
    x = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    return Split(x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _damaged(cfg: DatasetConfig, class_name: str, root: Path, err: Exception) -> ConfigError:
    """Files that are there but that torchvision cannot parse: truncated, or from another version."""
    return ConfigError(
        f"dataset={cfg.name}: the {class_name} files in {root} cannot be read ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'no detail'}); they may be damaged or partial. Delete them and "
        "download again (dataset.download=true), or point dataset.root at a good copy"
    )


def _download_error(err: BaseException) -> str:
    """The network errors of a failed download, without torchvision's framing: MNIST-likes raise one
    RuntimeError that lists each mirror tried and its error; the others let urllib's URLError through."""
    lines = [line.strip() for line in str(err).splitlines()]
    errors = [line for line in lines if line and not line.startswith(("Error downloading", "Tried "))]
    return "; ".join(dict.fromkeys(errors)) or type(err).__name__


# What torchvision's parsers raise on files they cannot read: truncated, or from another version.
UNREADABLE = (RuntimeError, OSError, ValueError, EOFError, KeyError, IndexError, pickle.UnpicklingError)


def _load_error(cfg: DatasetConfig, class_name: str, root: Path, err: BaseException) -> ConfigError | None:
    """What a torchvision data set that failed to load means to the user; None for an error that is a bug."""
    failed_download = isinstance(err, OSError) or str(err).startswith("Error downloading")
    if cfg.download and failed_download:
        return ConfigError(
            f"dataset={cfg.name}: could not download {class_name} into {root} ({_download_error(err)}); check the "
            "network connection, or put the files there yourself and use dataset.download=false"
        )
    if isinstance(err, RuntimeError) and "download=True" in str(err):
        return ConfigError(
            f"dataset={cfg.name}: {class_name} is not in {root} (or its files are incomplete). "
            f"Either put the data set there or point dataset.root=/path/to/it at the folder that "
            f"holds it, or add dataset.download=true to download it."
        )
    if isinstance(err, UNREADABLE):
        return _damaged(cfg, class_name, root, err)
    return None


def _new_folders(root: Path) -> Callable[[], None]:
    """Note which folders exist at and above `root`; the returned function removes the empty folders made since
    (a failed download leaves `root/MNIST/raw` and the like behind). Only empty ones: another job may be
    downloading into the same folder."""
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    before = set(os.listdir(root)) if root.is_dir() else set()

    def remove_empty() -> None:
        made = [root / name for name in os.listdir(root) if name not in before] if root.is_dir() else []
        for top in made:
            for folder, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        for folder in missing:
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    return remove_empty


def _torchvision(class_name: str, split_kw: str) -> Callable[[DatasetConfig], tuple[Split, Split, int]]:
    """A loader that runs torchvision's own file parsing, then keeps the raw uint8 arrays."""

    def load(cfg: DatasetConfig) -> tuple[Split, Split, int]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)
        root = Path(cfg.root).expanduser().resolve()
        splits = []
        for train in (True, False):
            which = {"train": train} if split_kw == "train" else {"split": "train" if train else "test"}
            remove_new_empty_folders = _new_folders(root)
            try:
                ds = cls(root=str(root), download=cfg.download, **which)
            except BaseException as err:
                remove_new_empty_folders()
                explained = _load_error(cfg, class_name, root, err)
                if explained is None:
                    raise
                raise explained from err
            labels = getattr(ds, "targets", None)
            if labels is None:
                labels = ds.labels
            # CIFAR keeps (N, H, W, C); SVHN (N, C, H, W); MNIST-likes (N, H, W).
            splits.append(_as_split(ds.data, labels, channels_last=class_name.startswith("CIFAR")))
        # SVHN has no `classes` attribute: its labels are the ten digits.
        return splits[0], splits[1], len(getattr(ds, "classes", range(10)))

    return load


def _user_data(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    """A data set of the user's own: `cfg._target_` names a callable, called with its arguments, that returns either
    `(images, labels)` (normsweep then holds out a fixed test split, as for digits) or
    `{"train": (images, labels), "test": (images, labels)}`. Images: uint8 (0..255) or float, (N, C, H, W) or
    (N, H, W), as torch tensors or numpy arrays; labels: integers 0..K-1."""
    make = import_target(cfg._target_, f"dataset={cfg.name}")
    check_arguments(make, cfg.arguments(), f"dataset={cfg.name}", "dataset")
    where = f"dataset={cfg.name} (_target_={cfg._target_})"
    try:
        made = make(**cfg.arguments())
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise ConfigError(
            f"{where}: {err}; its YAML's keys other than {', '.join(USER_DATASET_KEYS)} are passed to it as arguments"
        ) from None
    if isinstance(made, dict) and set(made) == {"train", "test"}:
        train, test = (_user_split(made[part], f"{where}, {part!r}") for part in ("train", "test"))
        if train.images.shape[1:] != test.images.shape[1:] or train.images.dtype != test.images.dtype:
            raise ConfigError(
                f"{where}: its train images are {tuple(train.images.shape[1:])} {train.images.dtype} "
                f"and its test images {tuple(test.images.shape[1:])} {test.images.dtype}; they must match"
            )
    elif isinstance(made, tuple | list) and len(made) == 2:
        full = _user_split(made, where)
        train, test = _fixed_test_split(full.images, full.labels, cfg)
    else:
        raise ConfigError(
            f"{where} returned {type(made).__name__}; return (images, labels), or "
            "{'train': (images, labels), 'test': (images, labels)}"
        )
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    if len(train.labels.unique()) < 2:
        raise ConfigError(f"{where}: its training images carry fewer than 2 distinct labels; a classifier needs 2")
    return train, test, classes


def _user_split(pair: Any, where: str) -> Split:
    try:
        images, labels = pair
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a pair (images, labels), got {type(pair).__name__}") from None
    x, y = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(labels))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or len(x) < 1:
        raise ConfigError(f"{where}: images have shape {tuple(x.shape)}; give (N, C, H, W) or (N, H, W)")
    if y.shape != (len(x),) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ConfigError(f"{where}: labels must be {len(x)} integers (one per image), got {y.dtype} {tuple(y.shape)}")
    if y.min() < 0:
        raise ConfigError(f"{where}: labels must be 0..K-1 for K classes; found {int(y.min())}")
    if x.dtype.is_floating_point:
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise ConfigError(f"{where}: the images hold NaN or infinite values")
    elif x.dtype != torch.uint8:
        if x.min() < 0 or x.max() > 255:
            raise ConfigError(f"{where}: integer images must be 0..255 (uint8); give floats for other ranges")
        x = x.to(torch.uint8)
    return Split(x.contiguous(), y.to(torch.int64))


# name → loader returning (full training split, test split, number of classes)
LOADERS: dict[str, Callable[[DatasetConfig], tuple[Split, Split, int]]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _torchvision("MNIST", "train"),
    "fashion_mnist": _torchvision("FashionMNIST", "train"),
    "cifar10": _torchvision("CIFAR10", "train"),
    "cifar100": _torchvision("CIFAR100", "train"),
    "svhn": _torchvision("SVHN", "split"),
}


# name → (channels, height, width) and classes of a built-in data set's images, as its loader gives them: what a
# sweep's models are built for before any job loads the data (tests/test_data.py checks them against the loaders).
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
}


def known_shape(cfg: DatasetConfig) -> tuple[tuple[int, int, int], int] | None:
    """The shape and class count of the data set's images without loading it; None for a user's data set."""
    if isinstance(cfg, SyntheticConfig):
        c, h, w = cfg.shape
        return (c, h, w), cfg.classes
    return None if isinstance(cfg, UserDataset) else SHAPES.get(cfg.name)


# The data set a process loaded last, reused by its next job if that asks for the same one: a sequential sweep,
# or a joblib worker, loads it once. Only read from (splits are new tensors), so one job never changes another's.
_LAST: dict[str, tuple[Split, Split, int]] = {}


def _source(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    root = str(Path(cfg.root).expanduser().resolve())
    # Every key that decides which images are loaded (a user data set's target and arguments included); the
    # augmentation keys only act on training batches.
    key = repr(replace(cfg, root=root, download=False, crop_padding=0, hflip=False, train_size=None))
    if key not in _LAST:
        loaded = _user_data(cfg) if isinstance(cfg, UserDataset) else LOADERS[cfg.name](cfg)
        _LAST.clear()
        _LAST[key] = loaded
    return _LAST[key]


def load(cfg: DatasetConfig, val_fraction: float, seed: int) -> Data:
    """Load a data set and hold out a seeded `val_fraction` of its training split for validation; with
    `cfg.train_size`, train on that many of the images left (drawn with `seed`: the same images for the same seed;
    the validation and test splits do not change)."""
    if cfg.name not in LOADERS and not isinstance(cfg, UserDataset):
        raise ConfigError(
            f"dataset={cfg.name}: unknown data set; choose one of {', '.join(LOADERS)}, or give its YAML a _target_ "
            "naming a function that returns your images and labels"
        )
    full_train, test, num_classes = _source(cfg)
    n_val = round(len(full_train) * val_fraction)
    if n_val < 1 or len(full_train) - n_val < 2:
        raise ConfigError(
            f"val_fraction={val_fraction} leaves {len(full_train) - n_val} training and {n_val} validation "
            f"images out of {len(full_train)}; choose a value that keeps at least two of each"
        )
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.train_size is not None:
        if cfg.train_size > len(train_idx):
            raise ConfigError(
                f"dataset.train_size={cfg.train_size}: {cfg.name} has {len(train_idx)} training images once "
                f"val_fraction={val_fraction} holds out {n_val} of its {len(full_train)} for validation; choose "
                f"dataset.train_size={len(train_idx)} or fewer, or leave it out to train on all of them"
            )
        train_idx = train_idx[: cfg.train_size]  # a prefix of a seeded permutation: a seeded subset
    train = Split(full_train.images[train_idx], full_train.labels[train_idx])
    val = Split(full_train.images[val_idx], full_train.labels[val_idx])
    return Data(
        train=train,
        val=val,
        test=Split(test.images.clone(), test.labels.clone()),  # its own copy: the loaded set may serve another job
        num_classes=num_classes,
        **channel_stats(train.images),
        crop_padding=cfg.crop_padding,
        hflip=cfg.hflip,
    )


def channel_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and standard deviation on the 0..1 scale, exact, from a histogram of the uint8 values
    (no float copy of the whole split: CIFAR's would be 0.5 GB). Float images: on their own scale."""
    if images.dtype.is_floating_point:
        per_channel = [images[:, c].double() for c in range(images.shape[1])]  # one channel at a time
        mean = torch.stack([x.mean() for x in per_channel])
        std = torch.stack([x.std() if x.numel() > 1 else x.new_tensor(0.0) for x in per_channel])
        return {"mean": mean.float(), "std": std.float().clamp_min(1e-6)}
    levels = torch.arange(256, dtype=torch.float64) / 255
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])])
    counts = counts.double()
    n = counts.sum(dim=1)
    mean = (counts * levels).sum(dim=1) / n
    var = (counts * (levels - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    return {"mean": mean.float(), "std": var.sqrt().float().clamp_min(1e-6)}


def normalize(
    images: torch.Tensor, data: Data, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """Images (N, C, H, W) → a new float32 tensor in `memory_format`, standardized per channel with the training
    statistics (uint8 first brought to 0..1)."""
    return standardize(images, data.mean.view(1, -1, 1, 1), data.std.view(1, -1, 1, 1), memory_format)


def standardize(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """normalize's arithmetic with `mean` and `std` given as tensors that broadcast against the images (a pack's
    stacked batches, each member with its own statistics: job/pack.py)."""
    x = images.to(torch.float32, memory_format=memory_format, copy=True)
    if images.dtype == torch.uint8:
        x.div_(255)
    return x.sub_(mean).div_(std)


def augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip for a whole uint8 batch, on its device."""
    return crop_and_flip(pad_for_crops(images, padding), padding, hflip, generator)


def pad_for_crops(images: torch.Tensor, padding: int) -> torch.Tensor:
    """The images with `padding` zeros on every side, the canvas `crop_and_flip` cuts from (the same tensor when 0)."""
    return torch.nn.functional.pad(images, (padding,) * 4) if padding else images


_GRIDS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _grids(n: int, c: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index grids for a batch shape, made once: image and channel numbers, row and column offsets, and the
    columns mirrored."""
    key = (n, c, h, w, str(device))
    if key not in _GRIDS:
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = (
            torch.arange(n, device=device).view(n, 1, 1, 1),
            torch.arange(c, device=device).view(1, c, 1, 1),
            torch.arange(h, device=device),
            torch.arange(w, device=device),
            torch.arange(w - 1, -1, -1, device=device),
        )
    return _GRIDS[key]


def crop_and_flip(padded: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """A random crop (offsets 0..2·padding) and, with `hflip`, a random horizontal flip of each image of a batch
    already padded by `padding`, in one gather on its device. Draws, in this order, the row offsets, the column
    offsets and the flips from `generator` (only those that apply)."""
    if not padding and not hflip:
        return padded
    return cut_crops(padded, padding, *draw_crops(len(padded), padding, hflip, generator, padded.device))


Draws = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def draw_crops(n: int, padding: int, hflip: bool, generator: torch.Generator, device: torch.device) -> Draws:
    """What crop_and_flip draws for `n` images: each one's row offset, column offset (0..2·padding) and whether it
    is mirrored, in that order from `generator`; None for what does not apply."""
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator) if padding else None
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator) if padding else None
    flip = torch.rand(n, 1, device=device, generator=generator) < 0.5 if hflip else None
    return dy, dx, flip


def cut_crops(padded: torch.Tensor, padding: int, dy: Tensor | None, dx: Tensor | None, flip: Tensor | None) -> Tensor:
    """Each image's crop and flip as drawn (draw_crops), cut from the padded batch in one gather."""
    n, c, ph, pw = padded.shape
    h, w = ph - 2 * padding, pw - 2 * padding
    batch, chans, rows, cols, mirrored = _grids(n, c, h, w, padded.device)
    if dy is not None:
        rows = dy + rows
    if flip is not None:
        cols = torch.where(flip, mirrored, cols)  # a mirrored image reads its window's columns right to left
    if dx is not None:
        cols = dx + cols
    return padded[batch, chans, rows.view(-1, 1, h, 1), cols.view(-1, 1, 1, w)]
