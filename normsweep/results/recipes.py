"""Rows trained under different recipes: a sweep folder extended later (more seeds, another norm) trains its new
jobs with today's defaults while the jobs it resumes keep the recipe they started with. The keys that differ
between the jobs without the sweep's overrides saying so are named, per row."""

from __future__ import annotations

from typing import Any

import pandas as pd

from normsweep.sweep.files import GROUPS


def mixed_keys(runs: pd.DataFrame, keys: list[str], recipes: dict[str, dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between the jobs of `runs` (their recipes by job) that neither a swept
    key nor a swept group choice explains (norm.eps differs between norm=bn and norm=gn: that is the sweep)."""
    known = [recipes[job] for job in runs["job"] if job in recipes]
    if len(known) < 2:
        return []
    swept_groups = {g for g in GROUPS if g in keys or len({r.get(f"{g}.name", r.get(g)) for r in known}) > 1}
    mixed = []
    for key in dict.fromkeys(k for r in known for k in r):
        if key in keys or key == "seed" or key.split(".", 1)[0] in swept_groups:
            continue
        if len({repr(r.get(key)) for r in known}) > 1:
            mixed.append(key)
    return mixed


def recipe_column(jobs_by_row: list[list[str]], recipes: dict[str, dict[str, Any]], mixed: list[str]) -> list[str]:
    """Each row's values of the `mixed` keys, from the recipes of its jobs: `key=value`, or `key=a|b` where the
    row's own runs differ."""
    column = []
    for jobs in jobs_by_row:
        known = [recipes[job] for job in jobs if job in recipes]
        values = {key: "|".join(dict.fromkeys(_shown(r.get(key)) for r in known)) for key in mixed}
        column.append(" ".join(f"{key}={shown}" for key, shown in values.items()))
    return column


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def recipe_sentences(mixed: list[str]) -> list[str]:
    """What the table says under it when its rows were not trained alike."""
    if not mixed:
        return []
    return [
        f"rows trained under different recipes: {', '.join(mixed)} differ between the jobs (column recipe), which "
        "the sweep's overrides do not explain (e.g. a folder extended after a default changed: each resumed job keeps "
        "its own); they are not a like-for-like comparison: run the sweep again in a new folder"
    ]
