"""The calls whose form differs between Hydra 1.3 / OmegaConf 2.3 and Hydra 1.4 / OmegaConf 2.4, in one place."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import hydra
import omegaconf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "1.4.0rc3" -> (1, 4)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    return int(found[1]), int(found[2])


HYDRA_14 = _release(hydra.__version__) >= (1, 4)
OMEGACONF_24 = _release(omegaconf.__version__) >= (2, 4)

# The `_target_`s Hydra instantiates from normsweep's config: the callbacks of conf/hydra/default.yaml. Hydra 1.4
# checks them against this list (its sweeper and launcher plugins, and Python's logging, need no entry).
EXECUTION_WHITELIST = ("normsweep.sweep.*",)


def version_base() -> dict[str, Any]:
    """Keyword arguments for initialize_config_dir(): Hydra 1.3 warns unless given version_base ("1.3": its
    current behaviour); Hydra 1.4 deprecates the parameter, and its own defaults are those."""
    return {} if HYDRA_14 else {"version_base": "1.3"}


def main_options() -> dict[str, Any]:
    """Keyword arguments for @hydra.main() besides the config's path and name: version_base as for
    initialize_config_dir(), and in Hydra 1.4 the targets that config may instantiate (without a whitelist 1.4 warns
    for each one, and 1.5 will refuse them)."""
    if HYDRA_14:
        return {"execution_whitelist": list(EXECUTION_WHITELIST)}
    return version_base()


def register_resolver(name: str, resolver: Callable[..., Any], use_cache: bool = False) -> None:
    """OmegaConf.register_resolver in 2.4, which deprecates register_new_resolver; in 2.3 register_resolver is the
    old string-only API (itself deprecated there), so register_new_resolver it is. Replaces one of that name."""
    if OMEGACONF_24:
        OmegaConf.register_resolver(name, resolver, replace=True, use_cache=use_cache)
    else:
        OmegaConf.register_new_resolver(name, resolver, replace=True, use_cache=use_cache)


def store(name: str, node: Any, **where: Any) -> None:
    """ConfigStore.store(), replacing a config of that name: normsweep registers its schemas again before each
    composition. Hydra 1.3 replaces silently and has no `replace`; 1.4 warns unless told (and 1.5 will refuse)."""
    ConfigStore.instance().store(name=name, node=node, **where, **({"replace": True} if HYDRA_14 else {}))


def instantiate(config: dict[str, Any], **kwargs: Any) -> Any:
    """hydra.utils.instantiate() of a config the user wrote (an optimizer's record): under Hydra 1.4 its own
    `_target_` is whitelisted for the call, since the app's whitelist names only normsweep's callbacks and 1.4
    refuses any other target inside the app; Hydra 1.3 has no whitelist (and would pass the key on as an argument)."""
    from hydra.utils import instantiate as hydra_instantiate

    if HYDRA_14:
        kwargs["_execution_whitelist_"] = [str(config["_target_"])]
    return hydra_instantiate(config, **kwargs)


def set_plain_values(cfg: DictConfig, values: list[Override], task: list[Override]) -> None:
    """What Hydra's config loader does, after composing the defaults, with plain `key=value` overrides (`values`) and
    the job's overrides (`task`, in the order given): set each value, record the overrides, name the job's override
    dirname. Done on a copy of a job's config composed with other values for the same keys, it gives the config
    Hydra composes (tests/test_sweeper.py checks that). Hydra 1.4 computes the dirname from the recorded overrides."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    cfg.hydra.overrides.task = [o.input_line for o in task]
    if not HYDRA_14:
        from hydra._internal.config_loader_impl import get_overrides_dirname

        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
        )
