"""The typed config schema, where the configs live, and the value checks run before any training."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A mistake in the user's config or command line, explained in the user's words."""


def config_dir() -> str:
    """The `conf/` folder: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
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


OmegaConf.register_new_resolver("normsweep.new_dir", new_dir, use_cache=True, replace=True)


@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = 1e-5
    affine: bool = True
    # Optional[...], not `X | None`: OmegaConf reads these annotations at runtime (as Config.channels_last's).
    momentum: Optional[float] = 0.1  # noqa: UP045 (bn only; null: a cumulative average)
    track_running_stats: bool = True  # bn only; false: batch statistics at evaluation too
    groups: int = 8  # gn, ws_gn
    group_size: Optional[int] = None  # noqa: UP045 (gn, ws_gn: channels per group, in place of groups when set)


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    schedule: str = "constant"
    # The batch size `lr` is given for: when set, the job trains at lr × batch_size / lr_batch_size (the linear
    # scaling rule of Goyal et al. 2017), so a batch-size sweep keeps the step per image constant.
    lr_batch_size: Optional[int] = None  # noqa: UP045


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = False
    crop_padding: int = 0
    hflip: bool = False
    test_fraction: float = 0.2  # digits and synthetic: they have no official test split
    split_seed: int = 0
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # synthetic only: (C, H, W)
    classes: int = 10  # synthetic only
    size: int = 6000  # synthetic only: images in all, before the test split
    # A data set of the user's own: `_target_` in its YAML names a callable, its other keys are the callable's
    # arguments (see data.py's _user_data); normsweep's own keys for it are in USER_DATASET_KEYS.
    target: Optional[str] = None  # noqa: UP045
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """The top level. `model` stays a plain mapping: its keys are the model class's own arguments."""

    model: Any = MISSING
    norm: Any = MISSING
    optimizer: Any = MISSING
    dataset: Any = MISSING
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    val_fraction: float = 0.2
    device: str = "auto"
    precision: str = "fp32"
    channels_last: Optional[bool] = None  # noqa: UP045 (OmegaConf reads the annotation at runtime: no `X | None`)
    compile: bool = False
    threads: int = 0
    compare: str = "norm"  # the axis best_by_<compare>.csv compares; only the aggregation reads it


@dataclass
class RunConfig:
    """A validated, typed job config: what the rest of normsweep consumes."""

    model_name: str
    model: dict[str, Any]
    norm: NormConfig
    optimizer: OptimizerConfig
    dataset: DatasetConfig
    seed: int
    epochs: int
    batch_size: int
    val_fraction: float
    device: str
    precision: str
    channels_last: bool | None
    compile: bool
    threads: int


SCHEDULES = ("constant", "cosine")
# The keys normsweep itself reads from a user data set's YAML; every other key goes to its `_target_` callable.
USER_DATASET_KEYS = ("name", "crop_padding", "hflip", "test_fraction", "split_seed")
_ABSENT = object()
PRECISIONS = ("fp32", "bf16")


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def _typed(node: Any, schema: type, group: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        key = f"{group}.{err.key}" if getattr(err, "key", None) else group
        # OmegaConf appends "full_key: … object_type=…" lines: the first line is the message.
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _dataset(node: Any, choice: str | None) -> DatasetConfig:
    """A built-in data set's typed config; or, for a YAML with a `_target_`, normsweep's keys typed and the rest
    kept as the callable's arguments."""
    if "_target_" not in node:
        return _typed(node, DatasetConfig, "dataset")
    raw = OmegaConf.to_container(node, resolve=True)
    own = {k: raw[k] for k in USER_DATASET_KEYS if k in raw}
    own.setdefault("name", choice or str(raw["_target_"]).rsplit(".", 1)[-1])
    kwargs = {k: v for k, v in raw.items() if k not in USER_DATASET_KEYS and k != "_target_"}
    typed = _typed(OmegaConf.create(own), DatasetConfig, "dataset")
    typed.target, typed.kwargs = str(raw["_target_"]), kwargs
    return typed


def validate(cfg: DictConfig, model_name: str, dataset_name: str | None = None) -> RunConfig:
    """Type and range checks on a composed config; raises ConfigError naming the key and the fix.

    `dataset_name` is the dataset option chosen (Hydra's runtime choice): a user data set's default name."""
    norm = _typed(cfg.norm, NormConfig, "norm")
    optimizer = _typed(cfg.optimizer, OptimizerConfig, "optimizer")
    dataset = _dataset(cfg.dataset, dataset_name)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    run = RunConfig(
        model_name=model_name,
        model=model,
        norm=norm,
        optimizer=optimizer,
        dataset=dataset,
        seed=int(cfg.seed),
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        val_fraction=float(cfg.val_fraction),
        device=str(cfg.device),
        precision=str(cfg.precision),
        channels_last=None if cfg.channels_last is None else bool(cfg.channels_last),
        compile=bool(cfg.compile),
        threads=int(cfg.threads),
    )
    _check(run.epochs >= 1, f"epochs={run.epochs}: train for at least one epoch (epochs=1 or more)")
    _check(run.batch_size >= 1, f"batch_size={run.batch_size}: use a batch size of 1 or more")
    _check(
        0 < run.val_fraction < 1,
        f"val_fraction={run.val_fraction}: it is the share of the training set held out for validation, "
        "strictly between 0 and 1 (e.g. val_fraction=0.2)",
    )
    _check(
        norm.name != "bn" or run.batch_size >= 2,
        f"norm=bn batch_size={run.batch_size}: BatchNorm takes its statistics over the batch and needs at least "
        "2 images per batch; use batch_size=2 or more, or a per-sample norm (ln, ln2d, rms, in, gn)",
    )
    _check(norm.eps > 0, f"norm.eps={norm.eps}: must be > 0")
    _check(
        norm.momentum is None or 0 <= norm.momentum <= 1,
        f"norm.momentum={norm.momentum}: must be between 0 and 1, or null for a cumulative average",
    )
    _check(norm.groups >= 1, f"norm.groups={norm.groups}: must be 1 or more")
    _check(
        norm.group_size is None or norm.group_size >= 1,
        f"norm.group_size={norm.group_size}: must be 1 or more, or null to use norm.groups",
    )
    _check(optimizer.lr > 0, f"optimizer.lr={optimizer.lr}: the learning rate must be > 0")
    _check(
        len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
        f"optimizer.betas={optimizer.betas}: give two values in [0, 1), e.g. optimizer.betas=[0.9,0.999]",
    )
    _check(0 <= optimizer.momentum < 1, f"optimizer.momentum={optimizer.momentum}: must be in [0, 1)")
    _check(optimizer.weight_decay >= 0, f"optimizer.weight_decay={optimizer.weight_decay}: must be >= 0")
    _check(
        optimizer.schedule in SCHEDULES,
        f"optimizer.schedule={optimizer.schedule!r}: choose one of {', '.join(SCHEDULES)}",
    )
    _check(dataset.crop_padding >= 0, f"dataset.crop_padding={dataset.crop_padding}: must be >= 0")
    _check(
        0 < dataset.test_fraction < 1,
        f"dataset.test_fraction={dataset.test_fraction}: must be strictly between 0 and 1",
    )
    _check(
        run.precision in PRECISIONS,
        f"precision={run.precision}: choose fp32, or bf16 (mixed precision on CUDA and on CPUs with native bf16)",
    )
    _check(run.threads >= 0, f"threads={run.threads}: give a thread count, or 0 for a fair share of the CPUs")
    _check(
        len(dataset.shape) == 3 and all(d >= 1 for d in dataset.shape),
        f"dataset.shape={dataset.shape}: give [channels,height,width], e.g. dataset.shape=[3,32,32]",
    )
    _check(dataset.classes >= 2, f"dataset.classes={dataset.classes}: a classifier needs at least 2 classes")
    _check(dataset.size >= 10, f"dataset.size={dataset.size}: generate at least 10 images")
    _check("_target_" in model, f"model={model_name}: its YAML needs a _target_ naming the model class")
    compare = str(cfg.get("compare", "norm"))
    _check(
        OmegaConf.select(cfg, compare, default=_ABSENT) is not _ABSENT,
        f"compare={compare}: no such config key; name the axis to compare best settings on, e.g. compare=norm, "
        "compare=model or compare=optimizer.lr",
    )
    if optimizer.lr_batch_size is not None:
        _check(
            optimizer.lr_batch_size >= 1,
            f"optimizer.lr_batch_size={optimizer.lr_batch_size}: give the batch size optimizer.lr is meant for "
            "(e.g. 32), or null to use optimizer.lr as it is",
        )
        run.optimizer.lr = optimizer.lr * run.batch_size / optimizer.lr_batch_size
    return run
