"""The typed config schema, where the configs live, and the value checks run before any training."""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from normsweep.config import hydra_compat
from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.norms import norm_record
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.optimizers import optimizer_record
from normsweep.sweep.jobfiles import COMPARE_METRICS


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


@dataclass
class DatasetConfig:
    """A built-in data set: its YAML starts from `/schema_dataset` (synthetic's from `/schema_dataset_synthetic`)."""

    name: str = MISSING
    root: str = "data"
    download: bool = False
    crop_padding: int = 0
    hflip: bool = False
    test_fraction: float = 0.2  # digits and synthetic: they have no official test split
    split_seed: int = 0


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

    target: Optional[str] = None  # noqa: UP045
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    threads: int = 0
    compare: str = "norm"  # the axis best_by_<compare>.csv compares; only the aggregation reads it
    compare_metric: str = "val_acc"  # what results.csv sorts by and "best" means; only the aggregation reads it
    # A run has diverged once an epoch's training loss exceeds it (or any loss is not finite): a number, `auto`
    # (train.DIVERGE_FACTOR × ln(classes), resolved when the data set is known), or null (non-finite losses only).
    diverge_loss: Any = "auto"
    diagnostics: bool = True  # each norm layer measured on a probe batch every epoch: diagnostics.csv (diagnostics.py)


# The keys normsweep itself reads from a user data set's YAML; every other key goes to its `_target_` callable.
USER_DATASET_KEYS = ("name", "crop_padding", "hflip", "test_fraction", "split_seed")
_ABSENT = object()
PRECISIONS = ("fp32", "bf16")


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


def check_keys(cfg: DictConfig) -> None:
    """Refuse a top-level key the schema does not know (`+epoch=3`, a typo Hydra's own advice lets through)."""
    known = [f.name for f in fields(Config)]
    for key in cfg:
        if key not in known and key != "hydra":
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{key}: normsweep has no such setting; {hint}The top-level settings are {', '.join(known)}"
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _dataset(node: Any, choice: str | None) -> DatasetConfig:
    """A built-in data set's typed config; or, for a YAML with a `_target_`, normsweep's keys typed and the rest
    kept as the callable's arguments."""
    if isinstance(node, DatasetConfig):
        return node
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"dataset={choice}: a data set YAML needs a _target_ naming a function that returns your images and labels"
        )
    own = {k: node[k] for k in USER_DATASET_KEYS if k in node}
    own.setdefault("name", choice or str(node["_target_"]).rsplit(".", 1)[-1])
    kwargs = {k: v for k, v in node.items() if k not in USER_DATASET_KEYS and k != "_target_"}
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(UserDataset), own))
    except OmegaConfBaseException as err:
        reason = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        raise ConfigError(f"dataset.{getattr(err, 'key', None) or ''}: {reason}".replace(".: ", ": ")) from None
    typed.target, typed.kwargs = str(node["_target_"]), kwargs
    return typed


def validate(cfg: DictConfig, choices: dict[str, Any] | None = None) -> Config:
    """The composed config as typed records, after the value checks; raises ConfigError naming the key and the fix.

    Types were checked at composition by the schemas; `choices` are Hydra's runtime choices (option names), the
    default names of a user's norm, optimizer or data set."""
    choices = choices or {}
    check_keys(cfg)
    run: Config = OmegaConf.to_object(cfg)
    run.norm = norm_record(run.norm, choices.get("norm"))
    run.optimizer = optimizer_record(run.optimizer, choices.get("optimizer"))
    run.dataset = _dataset(run.dataset, choices.get("dataset"))
    _check(
        isinstance(run.model, dict) and "_target_" in run.model,
        f"model={choices.get('model')}: its YAML needs a _target_ naming the model class",
    )
    run.model.setdefault("name", choices.get("model") or str(run.model["_target_"]).rsplit(".", 1)[-1])
    dataset, norm = run.dataset, run.norm
    _check(run.epochs >= 1, f"epochs={run.epochs}: train for at least one epoch (epochs=1 or more)")
    _check(run.batch_size >= 1, f"batch_size={run.batch_size}: use a batch size of 1 or more")
    _check(
        0 < run.val_fraction < 1,
        f"val_fraction={run.val_fraction}: it is the share of the training set held out for validation, "
        "strictly between 0 and 1 (e.g. val_fraction=0.2)",
    )
    per_sample = ", ".join(name for name, record in NORMS.items() if not record.batch_stats and name != "none")
    _check(
        not norm.batch_stats or run.batch_size >= 2,
        f"norm={norm.name} batch_size={run.batch_size}: this norm takes its statistics over the batch and needs at "
        f"least 2 images per batch; use batch_size=2 or more, or a per-sample norm ({per_sample})",
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
    if isinstance(dataset, SyntheticConfig):
        _check(
            len(dataset.shape) == 3 and all(d >= 1 for d in dataset.shape),
            f"dataset.shape={dataset.shape}: give [channels,height,width], e.g. dataset.shape=[3,32,32]",
        )
        _check(dataset.classes >= 2, f"dataset.classes={dataset.classes}: a classifier needs at least 2 classes")
        _check(dataset.size >= 10, f"dataset.size={dataset.size}: generate at least 10 images")
    _check(
        OmegaConf.select(cfg, run.compare, default=_ABSENT) is not _ABSENT,
        f"compare={run.compare}: no such config key; name the axis to compare best settings on, e.g. compare=norm, "
        "compare=model or compare=optimizer.lr",
    )
    _check(
        run.compare_metric in COMPARE_METRICS,
        f"compare_metric={run.compare_metric}: choose val_acc (the last epoch's validation accuracy, the default), "
        "test_acc or best_val_acc",
    )
    limit = run.diverge_loss
    _check(
        limit is None or limit == "auto" or (type(limit) in (int, float) and limit > 0),  # type(): a bool is no limit
        f"diverge_loss={run.diverge_loss}: give the training loss above which a run has diverged (a number > 0, e.g. "
        "diverge_loss=20), auto (10 × ln(classes)), or null to stop only on a loss that is not finite",
    )
    _check(
        run.optimizer.warmup_epochs <= run.epochs,
        f"optimizer.warmup_epochs={run.optimizer.warmup_epochs:g} epochs={run.epochs}: the warm-up must fit in the "
        "training; use fewer warm-up epochs",
    )
    if run.optimizer.lr_batch_size is not None:
        run.optimizer.lr = run.optimizer.lr * run.batch_size / run.optimizer.lr_batch_size
    return run


def options(group: str) -> list[str]:
    """The built-in options of a config group (conf/<group>/*.yaml), e.g. options("norm")."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def compose_run(overrides: list[str]) -> Config:
    """The validated config `python -m normsweep OVERRIDES` would train, composed outside a Hydra run (the benchmark,
    tests). Raises ConfigError for a value a run would refuse."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), **hydra_compat.version_base()):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            choices = dict(cfg.hydra.runtime.choices)
            with open_dict(cfg):
                del cfg["hydra"]
            return validate(cfg, choices)
    finally:
        GlobalHydra.instance().clear()
