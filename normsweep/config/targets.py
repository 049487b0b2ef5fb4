"""The one way normsweep imports what a config names by path (a `_target_`, a norm's `adapt_model`): Hydra's own
`get_object`, and one error text for a name that cannot be imported."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from hydra.utils import get_object

from normsweep.config.errors import ConfigError

# normsweep's own modules that configs named before the package was split by phase, and where they are now: a
# user's YAML that still names the old path is told the new one (saved job folders are read by sweep/settings.py).
MOVED_MODULES = {"normsweep.models.": "normsweep.job.models.", "normsweep.layers.": "normsweep.job.layers."}


def _quiet(record: logging.LogRecord) -> bool:
    return False


def import_target(path: str, where: str, key: str = "_target_") -> Callable[..., Any]:
    """The class or function `path` names, for the option `where` (e.g. "norm=mine") under `key`.

    Raises ConfigError naming the option, the key and the fix when it cannot be imported or is not callable."""
    hydra_log = logging.getLogger("hydra.utils")  # get_object logs the error it raises: it would be said twice
    hydra_log.addFilter(_quiet)
    try:
        target = get_object(path)
    except Exception as err:  # Hydra wraps whatever the import raised (ImportError, a SyntaxError in the module, …)
        said = str(err.__cause__ or err).strip()
        reason = said.splitlines()[0] if said else ""
        moved = next((new + path[len(old) :] for old, new in MOVED_MODULES.items() if path.startswith(old)), None)
        fix = (
            f"normsweep's built-in is now {moved}"
            if moved
            else "the module must be importable from where normsweep runs (run from its folder, set PYTHONPATH, "
            "or pip install it)"
        )
        raise ConfigError(f"{where}: cannot import {key}={path}{f' ({reason})' if reason else ''}; {fix}") from None
    finally:
        hydra_log.removeFilter(_quiet)
    if not callable(target):
        raise ConfigError(f"{where}: {key}={path} is a {type(target).__name__}, not a class or function")
    return target


def check_arguments(
    target: Callable[..., Any], keys: Iterable[str], where: str, group: str, given: Iterable[str] = ()
) -> None:
    """Refuse a key of the option `where` (e.g. "model=simple_cnn") that `target` takes no argument for: a typo, with
    or without `+`, named with the closest argument and the ones there are (those normsweep passes itself,
    `given`, left out). A target taking **kwargs accepts any key; one whose signature cannot be read is not checked."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [n for n, p in parameters.items() if p.kind in named and n not in set(given)]
    for key in keys:
        if key not in parameters:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {group}.{close[0]}? " if close else ""
            known = f"its keys are {', '.join(accepted)}" if accepted else "it takes no keys"
            raise ConfigError(f"{group}.{key}: {where} has no such key; {hint}{known}")
