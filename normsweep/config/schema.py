"""The typed config schema (one dataclass per built-in option, registered in Hydra's ConfigStore) and where the
configs live."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from normsweep.config import hydra_compat
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.records import Record


def config_dir() -> str:
    """The `conf/` folder: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parents[1]  # the normsweep package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"normsweep's conf/ folder is missing next to {here}; the installation is broken")


def new_dir(path: str) -> str:
    """Claim a folder no other run has: `path` itself, or else `path-2`, `path-3`, … (an atomic mkdir decides).

    The default run and sweep folders go through it (`${normsweep.new_dir:multirun/DATE/TIME}`), so two runs
    started in the same second never share a folder, and a folder that already exists is only ever entered by
    naming it (to resume it). Registered as a cached resolver, like Hydra's `now`: one claim per launch.
    """
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise AssertionError("unreachable")


hydra_compat.register_resolver("normsweep.new_dir", new_dir, use_cache=True)


# The keys normsweep itself reads from a user data set's YAML; every other key goes to its `_target_` callable.
USER_DATASET_KEYS = ("name", "crop_padding", "hflip", "test_fraction", "split_seed", "train_size")


@dataclass
class DatasetConfig(Record):
    """A built-in data set: its YAML starts from `/schema_dataset` (synthetic's from `/schema_dataset_synthetic`)."""

    name: str = MISSING
    root: str = "data"
    download: bool = False
    crop_padding: int = 0
    hflip: bool = False
    test_fraction: float = 0.2  # digits and synthetic: they have no official test split
    split_seed: int = 0
    # Train on this many images of the training split (after the validation hold-out), drawn with `seed`; null = all.
    train_size: Optional[int] = None  # noqa: UP045 (OmegaConf reads the annotation at runtime: no `X | None`)


@dataclass
class SyntheticConfig(DatasetConfig):
    """Generated images of any shape (dataset=synthetic)."""

    shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # (C, H, W)
    classes: int = 10
    size: int = 6000  # images in all, before the test split


@dataclass
class UserDataset(DatasetConfig):
    """A data set of the user's own: `_target_` in its YAML names a callable, its other keys are the callable's
    arguments (see data.py's _user_data); normsweep's own keys for it are in USER_DATASET_KEYS."""

    _target_: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)

    OWN_KEYS: ClassVar[tuple[str, ...]] = ("_target_", *(f.name for f in fields(DatasetConfig)))
    GROUP: ClassVar[str] = "dataset"
    TYPED: ClassVar[tuple[str, ...]] = ("_target_", *USER_DATASET_KEYS)
    NEEDS: ClassVar[str] = "a data set YAML needs a _target_ naming a function that returns your images and labels"


@dataclass
class TensorBoardConfig:
    """logger=tensorboard: event files in each job's folder (normsweep/trackers/tensorboard.py)."""


@dataclass
class MlflowConfig:
    """logger=mlflow: one parent run per sweep, one child run per job (normsweep/trackers/mlflow.py)."""

    tracking_uri: Optional[str] = None  # noqa: UP045 (null: an sqlite:/// file in the sweep's or run's folder)
    experiment_name: str = "normsweep"


@dataclass
class LoggerConfig:
    """Where a job reports beside its own files: each tracker is on when its node is set (conf/logger/)."""

    tensorboard: Optional[TensorBoardConfig] = None  # noqa: UP045
    mlflow: Optional[MlflowConfig] = None  # noqa: UP045


@dataclass
class ProgressConfig:
    """A long epoch's progress (job/progress.py): shown once an epoch has trained `after_s` seconds; where the output
    is not a terminal, as a line then and every `every_s` seconds."""

    after_s: float = 15.0
    every_s: float = 30.0


@dataclass
class Config:
    """The top level. `model` stays a plain mapping: its keys are the model class's own arguments."""

    model: Any = MISSING
    norm: Any = MISSING  # a record of norms.py
    optimizer: Any = MISSING  # a record of optimizers.py
    dataset: Any = MISSING
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    val_fraction: float = 0.2
    device: str = "auto"
    precision: str = "fp32"
    channels_last: Optional[bool] = None  # noqa: UP045 (OmegaConf reads the annotation at runtime: no `X | None`)
    compile: bool = False
    # A sweep's jobs that differ only in seed or optimizer trained together, their models stacked (job/pack.py):
    # auto (on when the jobs train on CUDA), true (on any device) or false. Read by the sweeper, before launch.
    pack: Any = "auto"
    threads: int = 0
    compare: str = "norm"  # the axis best_by_<compare>.csv compares; only the aggregation reads it
    compare_metric: str = "val_acc"  # what results.csv sorts by and "best" means; only the aggregation reads it
    # A run has diverged once an epoch's training loss exceeds it (or any loss is not finite): a number, `auto`
    # (train.DIVERGE_FACTOR × ln(classes), resolved when the data set is known), or null (non-finite losses only).
    diverge_loss: Any = "auto"
    diagnostics: bool = True  # each norm layer measured on a probe batch every epoch: diagnostics.csv (diagnostics.py)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=tensorboard, logger=mlflow (trackers/)
    progress: ProgressConfig = field(default_factory=ProgressConfig)


MODEL_ARGUMENTS = ("in_channels", "image_size", "num_classes", "norm")  # what normsweep passes every model class
PRECISIONS = ("fp32", "bf16")
PACK_SETTINGS = ("auto", True, False)
# compare_metric → what it is, in words (a runs.csv column): results.csv sorts by its mean; the best row tops it.
COMPARE_METRICS = {
    "val_acc": "validation accuracy",
    "test_acc": "test accuracy",
    "best_val_acc": "best-epoch validation accuracy",
}


def _share_the_config_store() -> None:
    """Hydra 1.3 deep-copies its ConfigStore singleton, every schema in it, each time it makes a config repository:
    75 times for `--help`, once per job of a sweep; most of `--help`'s time. Nothing writes to the copy (the store's
    load() returns a copy of the node), so a copy of the singleton is the singleton itself, as Hydra has it since
    facebookresearch/hydra#2928 (which refetches the singleton instead of keeping a copy)."""
    if "__deepcopy__" not in vars(ConfigStore):
        ConfigStore.__deepcopy__ = lambda self, memo: self


def register_configs() -> None:
    """The schemas, in Hydra's ConfigStore: the top level, and one per built-in option, outside the groups so that
    neither `--help` nor an unknown option's error lists them (its YAML starts from it:
    `defaults: [/schema_norm_bn@_here_, _self_]`)."""
    _share_the_config_store()
    hydra_compat.store(name="base_config", node=Config)
    for name, record in NORMS.items():
        hydra_compat.store(name=f"schema_norm_{name}", node=record)
    for name, record in OPTIMIZERS.items():
        hydra_compat.store(name=f"schema_optimizer_{name}", node=record)
    hydra_compat.store(name="schema_dataset", node=DatasetConfig)
    hydra_compat.store(name="schema_dataset_synthetic", node=SyntheticConfig)
