"""The value checks every run goes through before training, and a config composed outside a Hydra run."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from normsweep.config import hydra_compat
from normsweep.config.errors import ConfigError
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.norms import norm_record
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.optimizers import optimizer_record
from normsweep.config.records import to_record
from normsweep.config.schema import (
    COMPARE_METRICS,
    MODEL_ARGUMENTS,
    PACK_SETTINGS,
    PRECISIONS,
    Config,
    DatasetConfig,
    SyntheticConfig,
    UserDataset,
    config_dir,
    register_configs,
)
from normsweep.trackers import check_trackers

_ABSENT = object()


_TOP_LEVEL = [f.name for f in fields(Config)]


def check_keys(cfg: DictConfig) -> None:
    """Refuse a top-level key the schema does not know (`+epoch=3`, a typo Hydra's own advice lets through)."""
    for key in cfg:
        if key not in _TOP_LEVEL and key != "hydra":
            raise ConfigError(unknown_key(str(key)))


def unknown_key(key: str) -> str:
    """What to say of a top-level key the schema does not know: the closest one, and the ones there are."""
    close = difflib.get_close_matches(key, _TOP_LEVEL, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: normsweep has no such setting; {hint}The top-level settings are {', '.join(_TOP_LEVEL)}"


def unknown_option_key(path: str, reason: str, chosen: str | None = None) -> str:
    """What to say of a key that an option's schema does not have (`norm.group=2` for norm=gn), from OmegaConf's
    reason (`Key 'group' not in 'GroupNorm'`): the closest key of that option, and the keys it has."""
    named = re.match(r"Key '[^']+' not in '([^']+)'", reason)
    records = [*NORMS.values(), *OPTIMIZERS.values(), DatasetConfig, SyntheticConfig]
    schema = next((r for r in records if named and r.__name__ == named.group(1)), None)
    if schema is None:
        return f"{path}: no such key ({reason})"
    group, key = path.rsplit(".", 1)
    keys = [f.name for f in fields(schema) if not f.name.startswith("_")]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"did you mean {group}.{close[0]}? " if close else ""
    name = chosen or getattr(schema, "name", MISSING)
    option = f"{group}={name}" if name != MISSING else f"this {group}"
    return f"{path}: {option} has no such key; {hint}its keys are {', '.join(keys)}"


def unknown_model_key(path: str, choice: str | None) -> str:
    """What to say of `model.KEY=…` when the model's YAML has no KEY: a model's keys are its class's arguments, so
    the closest argument of the class (its YAML read from conf/model/, the class imported: this is an error's path),
    and how to set an argument the YAML leaves at its default (`+model.KEY=…`)."""
    from normsweep.config.targets import check_arguments, import_target

    key = path.split(".", 1)[1]
    add = f"to set an argument its YAML leaves at its default, add it: +{path}=VALUE"
    try:
        defaults = OmegaConf.load(Path(config_dir()) / "config.yaml")["defaults"]
        choice = choice or next(d["model"] for d in defaults if isinstance(d, DictConfig) and "model" in d)
        target = OmegaConf.load(Path(config_dir()) / "model" / f"{choice}.yaml")["_target_"]
        check_arguments(import_target(target, f"model={choice}"), [key], f"model={choice}", "model", MODEL_ARGUMENTS)
    except ConfigError as err:
        return str(err)  # not an argument of the class: the closest one
    except Exception:  # a model's YAML elsewhere (a user's config folder): what can be said without it
        pass
    return f"{path}: {f'model={choice}' if choice else 'the model'}'s YAML has no such key; {add}"


def _check_added_keys(cfg: DictConfig, group: str) -> None:
    """Refuse a key added with `+` to a built-in option (`+norm.grups=2`): its record has no field for it, and
    OmegaConf would drop it silently. A user's option passes its other keys to its `_target_` instead."""
    node = cfg.get(group)
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    known = {f.name for f in fields(schema)} if schema is not None and dataclasses.is_dataclass(schema) else set()
    if not known or "kwargs" in known:
        return
    for key in node:
        if key not in known:
            reason = f"Key '{key}' not in '{schema.__name__}'"
            raise ConfigError(unknown_option_key(f"{group}.{key}", reason, node.get("name")))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig, choices: dict[str, Any] | None = None) -> Config:
    """The composed config as typed records, after the value checks; raises ConfigError naming the key and the fix.

    Types were checked at composition by the schemas; `choices` are Hydra's runtime choices (option names), the
    default names of a user's norm, optimizer or data set."""
    choices = choices or {}
    check_keys(cfg)
    for group in ("norm", "optimizer", "dataset"):
        _check_added_keys(cfg, group)
    run: Config = OmegaConf.to_object(cfg)
    if isinstance(run, dict):  # a masked copy (check_job) keeps its nodes' types but not the root's
        run = Config(**run)
    run.norm = norm_record(run.norm, choices.get("norm"))
    run.optimizer = optimizer_record(run.optimizer, choices.get("optimizer"))
    run.dataset = to_record(run.dataset, choices.get("dataset"), UserDataset)
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
        dataset.train_size is None or dataset.train_size >= 2,
        f"dataset.train_size={dataset.train_size}: train on at least 2 images (e.g. dataset.train_size=6000), or "
        "leave it out (null) to train on the whole training split",
    )
    _check(
        run.precision in PRECISIONS,
        f"precision={run.precision}: choose fp32, or bf16 (mixed precision on CUDA and on CPUs with native bf16)",
    )
    _check(run.threads >= 0, f"threads={run.threads}: give a thread count, or 0 for a fair share of the CPUs")
    _check(
        run.pack in PACK_SETTINGS,
        f"pack={run.pack}: choose auto (jobs packed on CUDA), true (on any device) or false (each job alone)",
    )
    _check(
        run.progress.after_s >= 0,
        f"progress.after_s={run.progress.after_s:g}: give the seconds an epoch trains before its progress is shown "
        "(0 or more, e.g. progress.after_s=15)",
    )
    _check(
        run.progress.every_s > 0,
        f"progress.every_s={run.progress.every_s:g}: give the seconds between two progress lines (more than 0, e.g. "
        "progress.every_s=30)",
    )
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
    check_trackers(run.logger)
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


def named_targets(run: Config) -> list[tuple[str, str, str]]:
    """(path, option, key) of each class or function a validated config names outside normsweep and torch: a
    user's model, norm (and its adapt_model), optimizer or data set, which must be importable where jobs run."""
    named = [
        (run.model.get("_target_"), f"model={run.model.get('name')}", "_target_"),
        (getattr(run.norm, "_target_", None), f"norm={run.norm.name}", "_target_"),
        (getattr(run.norm, "adapt_model", None), f"norm={run.norm.name}", "adapt_model"),
        (getattr(run.optimizer, "_target_", None), f"optimizer={run.optimizer.name}", "_target_"),
        (getattr(run.dataset, "_target_", None), f"dataset={run.dataset.name}", "_target_"),
    ]
    own = ("normsweep.", "torch.", "torchvision.")
    return [(str(path), where, key) for path, where, key in named if path and not str(path).startswith(own)]


def check_job(cfg: DictConfig, choices: dict[str, Any], done: dict[str, Any]) -> Config:
    """What a single run checks before training, for one job of a sweep before any job starts: the values (validate),
    that the classes its config names can be imported, that a model or a user data set takes the keys its
    overrides set, and that its model can be built with its norm for its data set's images (job/build.check_model).
    `done` holds what other jobs checked already (the classes imported, the models built), so that each is done
    once per sweep."""
    from normsweep.config.targets import check_arguments, import_target
    from normsweep.job.build import check_model  # torch: a job in this process would import it anyway
    from normsweep.sweep.files import override_key

    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what a job gets (a third of a deepcopy)
    run = validate(own, choices)
    for path, where, key in named_targets(run):
        if path not in done:
            done[path] = import_target(path, where, key)
    touched = {override_key(o).split(".", 1)[0] for o in cfg.hydra.overrides.task if "." in override_key(o)}
    if "model" in touched:  # a typo on the command line; the model's own YAML is checked when the job builds it
        path = run.model["_target_"]
        if path not in done:
            done[path] = import_target(path, f"model={run.model['name']}")
        keys = [k for k in run.model if k not in ("_target_", "name")]
        check_arguments(done[path], keys, f"model={run.model['name']}", "model", MODEL_ARGUMENTS)
    if "dataset" in touched and isinstance(run.dataset, UserDataset):
        make = done[run.dataset._target_]
        check_arguments(make, run.dataset.arguments(), f"dataset={run.dataset.name}", "dataset")
    built = repr(("model", run.model, run.norm, run.dataset))
    if built not in done:
        check_model(run)
        done[built] = True
    return run
