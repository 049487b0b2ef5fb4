"""Shared fixtures: Hydra composition, and small data sets written in torchvision's official on-disk layouts."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from normsweep.config import config_dir, register_configs

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that launches normsweep in a new process (run_cli, subprocess), or whose fixtures do, is `slow`:
    `pytest -m "not slow"` leaves them out and answers in under a minute. Tests that train for seconds in-process
    carry the mark themselves. The tests on the SLURM cluster share one xdist worker (`--dist loadgroup`): one
    node, whose queue each of them expects to itself."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        functions = [getattr(item, "function", None)]  # the test, and the fixtures it uses
        info = getattr(item, "_fixtureinfo", None)
        for definitions in info.name2fixturedefs.values() if info else ():
            functions += [definition.func for definition in definitions]
        sources = [inspect.getsource(f) for f in functions if f is not None and not _foreign(f)]
        if any(call in source for source in sources for call in ("run_cli(", "_popen(", "subprocess.")):
            item.add_marker(pytest.mark.slow)


def _foreign(function) -> bool:
    """A fixture of pytest's or a plugin's, not of this test suite."""
    return not str(inspect.getsourcefile(function) or "").startswith(str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Code under test may set torch's thread count (a job does); the next test starts from the original one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg():
    """compose_cfg(["norm=gn", ...]) → the composed DictConfig, as `python -m normsweep` would see it."""
    register_configs()

    def _compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path, timeout: float = 240, module: str = "normsweep") -> subprocess.CompletedProcess:
    """Run `python -m normsweep ARGS` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pattern_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images whose brightness depends on the label, so a model can tell classes apart."""
    noise = rng.integers(0, 60, size=(len(labels), *shape))
    return np.clip(noise + (labels.reshape(-1, *[1] * len(shape)) * 19), 0, 255).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _pattern_images(rng, labels, (28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    # The download also leaves the .gz archives; the loader reads the extracted files.
    for f in list(raw.iterdir()):
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, hundred: bool = False, per_file: int = 30) -> None:
    """CIFAR-10/100 python pickles, and torchvision's md5 table pointed at them."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(1)
    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    files = [name for name, _ in cls.train_list + cls.test_list]
    for name in files:
        labels = rng.integers(0, classes, size=per_file)
        images = _pattern_images(rng, labels % 10, (3, 32, 32)).reshape(per_file, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, label_key: labels.tolist()}, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def make_svhn(root: Path, monkeypatch: pytest.MonkeyPatch, n: int = 60) -> None:
    """SVHN's .mat files (X: 32x32x3xN, y: labels 1..10 where 10 means digit 0), md5 table pointed at them."""
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for split, (url, filename, _) in tvd.SVHN.split_list.items():
        labels = rng.integers(1, 11, size=n)
        images = _pattern_images(rng, labels % 10, (32, 32, 3)).transpose(1, 2, 3, 0)
        scipy.io.savemat(root / filename, {"X": images, "y": labels.reshape(-1, 1).astype(np.uint8)})
        table[split] = [url, filename, _md5(root / filename)]
    monkeypatch.setattr(tvd.SVHN, "split_list", table)
