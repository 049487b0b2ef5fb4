"""The settings by which a saved job is recognised: its config without the keys that say where it ran, read the
way it was saved (keys added since at their old values, modules moved since at their new paths)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS
from normsweep.config.targets import MOVED_MODULES
from normsweep.sweep.files import FINISHED, SUMMARY_FILE

# Keys that say where a job runs or finds its data, how the sweep is aggregated, what is measured beside the
# training (diagnostics), whether it trains packed with others, which trackers a job reports to or how its progress
# is shown (every key below WHERE_GROUPS), not what a job computes: a resumed job may change them.
WHERE_KEYS = ("device", "dataset.root", "dataset.download", "compare", "compare_metric", "diagnostics", "pack")
WHERE_GROUPS = ("logger", "progress")


def where_group(key: str) -> bool:
    """Whether `key` (`logger`, `logger.mlflow.tracking_uri`, `progress.after_s`) is in a where-group: not a
    setting of the job, for resume and for the tables alike."""
    return key.split(".", 1)[0] in WHERE_GROUPS


def _where(key: str) -> bool:
    return key in WHERE_KEYS or where_group(key)


# Keys added to the config after normsweep 0.1.0's first sweeps, with the value that computes what those jobs
# computed: a folder saved without the key is the same job when the key has that value now, and resumes with it
# when the command does not give the key (saved_behaviour: an upgrade mid-sweep, whatever today's default).
ADDED_KEYS = {
    "norm.track_running_stats": True,
    "norm.group_size": None,
    "optimizer.lr_batch_size": None,
    # Since the built-in data sets have a schema (0.2): keys that only some of them read, at its defaults.
    "dataset.test_fraction": 0.2,
    "dataset.split_seed": 0,
    "dataset.train_size": None,  # the whole training split
    # The fair recipe, whose defaults differ from what jobs computed before it: no loss threshold, every parameter
    # decayed, no warm-up, the schedule moved once per epoch.
    "diverge_loss": None,
    "optimizer.decay_norm_and_bias": True,
    "optimizer.warmup_epochs": 0,
    "optimizer.schedule_step": "epoch",
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def _upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved before norms and optimizers were records with a `_target_` (normsweep 0.1): a built-in's
    norm and optimizer get the keys their record has now, at the values that compute what they computed then."""
    config = dict(config)
    for group, records in (("norm", NORMS), ("optimizer", OPTIMIZERS)):
        node = config.get(group)
        if isinstance(node, dict) and "_target_" not in node and node.get("name") in records:
            record = records[node["name"]]()
            own = [key for key in record.OWN_KEYS if f"{group}.{key}" not in ADDED_KEYS]  # those it had then
            config[group] = {**{key: getattr(record, key) for key in own}, **node}
    return config


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """A job's config as two jobs are compared: flat (`norm.name`), without the where-keys, and without an added
    key at the value that keeps the old behaviour (so a folder saved before the key existed is the same job)."""
    return {
        key: value
        for key, value in ((k, _moved(v)) for k, v in flatten(_upgraded(config)).items())
        if not _where(key) and not (key in ADDED_KEYS and value == ADDED_KEYS[key])
    }


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """What a job computed with, flat: its config with every added key at the value it ran with (the old value
    where the config was saved without the key), without the where-keys. Two jobs with different recipes were not
    trained alike, whatever their overrides say."""
    flat = {k: _moved(v) for k, v in flatten(_upgraded(config)).items()}
    return {key: value for key, value in {**ADDED_KEYS, **flat}.items() if not _where(key)}


def _moved(value: Any) -> Any:
    """A `_target_` path of a module that has moved (MOVED_MODULES), by its path now; any other value as it is."""
    if isinstance(value, str):
        for old, new in MOVED_MODULES.items():
            if value.startswith(old):
                return new + value[len(old) :]
    return value


def lacking_added_keys(saved: dict[str, Any]) -> frozenset[str]:
    """The added keys a saved job's settings lack: it was saved before them, or with their old value."""
    return frozenset(ADDED_KEYS.keys() - settings(saved).keys())


def saved_behaviour(config: dict[str, Any], lacking: Iterable[str], given: Iterable[str]) -> dict[str, Any]:
    """The added keys a job resumed in a folder takes at their old value (ADDED_KEYS): each one the saved job
    lacks (`lacking`, see lacking_added_keys) that `config` has and the command does not give (`given`: the keys of
    its overrides). The values saved in the folder win over today's defaults; a key given on the command line is
    compared as it is."""
    flat, given = flatten(config), set(given)
    return {key: ADDED_KEYS[key] for key in lacking if key in flat and key not in given}


def with_values(config: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) config with some flat keys (`optimizer.warmup_epochs`) set."""
    config = copy.deepcopy(config)
    for key, value in values.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def settings_key(config: dict[str, Any]) -> str:
    """One text for configs config_differences finds nothing between (as JSON: a 1 saved as 1.0 would differ)."""
    return json.dumps(settings(config), sort_keys=True, default=repr)


def copies_by_settings(saved: Iterable[tuple[Path, dict[str, Any]]]) -> dict[str, list[tuple[tuple[bool, int], Path]]]:
    """The folders that hold each saved job, by settings_key, from (job folder, summary) pairs, each with its rank
    and the one to keep first: a finished copy, then the one whose summary.json was written last. A folder whose
    summary records no config is left out (it cannot be recognised)."""
    copies: dict[str, list[tuple[tuple[bool, int], Path]]] = {}
    for job_dir, summary in saved:
        if isinstance(summary.get("config"), dict):
            path = Path(job_dir) / SUMMARY_FILE
            rank = (summary["status"] in FINISHED, path.stat().st_mtime_ns if path.is_file() else 0)
            copies.setdefault(settings_key(summary["config"]), []).append((rank, Path(job_dir)))
    return {key: sorted(same, reverse=True) for key, same in copies.items()}


def _keys(n: int) -> str:
    return f"{n} key{'s' if n > 1 else ''}"


def config_differences(saved: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """What differs between a saved job's config and this one, where-keys aside: `key=old there, new now` for each
    key both have (the first `limit`, then a count), then one line per side naming the keys only that side has."""
    old, now = settings(saved), settings(new)
    changed = [f"{k}={old[k]!r} there, {now[k]!r} now" for k in sorted(old.keys() & now.keys()) if old[k] != now[k]]
    lines = changed[:limit] + ([f"{_keys(len(changed) - limit)} more with other values"] if changed[limit:] else [])
    for keys, side in (
        (sorted(old.keys() - now.keys()), "the saved job"),
        (sorted(now.keys() - old.keys()), "this job"),
    ):
        if keys:
            more = f" and {len(keys) - limit} more" if keys[limit:] else ""
            lines.append(f"{_keys(len(keys))} only {side} has: {', '.join(keys[:limit])}{more}")
    return lines
