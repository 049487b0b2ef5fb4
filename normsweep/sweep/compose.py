"""The configs of a sweep's jobs, composed before the first one starts: Hydra composes a job's config in about a
tenth of a second, so a 200-job grid took 16 s. Jobs of a grid differ mostly in plain values (`seed=1`,
`optimizer.lr=0.01`): a job whose overrides differ from an earlier job's only in such values is a copy of that job's
config with its values set the way Hydra sets them. Group choices (`norm=bn`), `+`, `++` and `~` overrides and
`hydra.` keys are composed by Hydra, once per distinct set of them."""

from __future__ import annotations

import copy
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf

from normsweep.config import hydra_compat
from normsweep.sweep.files import override_key

# The keys whose values differ between the jobs of the sweep being launched, comma-separated: a job's log lines are
# tagged with those only (the launched processes inherit the environment).
SWEPT_KEYS_ENV = "NORMSWEEP_SWEPT_KEYS"


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys of the jobs' overrides that are not the same in every job, in the order first given."""
    given: dict[str, set[str]] = {}
    jobs_with: dict[str, int] = {}
    for job in jobs:
        for override in job:
            given.setdefault(override_key(override), set()).add(override)
        for key in {override_key(o) for o in job}:
            jobs_with[key] = jobs_with.get(key, 0) + 1
    return [key for key, seen in given.items() if len(seen) > 1 or jobs_with[key] < len(jobs)]


class JobConfigs:
    """A sweep's job configs as Hydra's loader composes them, each distinct set of non-plain overrides composed once
    (see the module's docstring)."""

    def __init__(self, loader: Any, master: DictConfig) -> None:
        self.loader, self.master = loader, master
        self.parser = OverridesParser.create()
        self.groups = set(master.hydra.runtime.choices)
        # by the overrides that are not plain values (and the keys of those that are): a pristine config, or None
        # when one of those keys turned out to be a config group there (then each such job is composed)
        self.composed: dict[tuple[str, ...], DictConfig | None] = {}
        self.copies = 0  # jobs made by copying: for the tests and the log

    def _plain(self, override: Override) -> bool:
        return (
            override.type == OverrideType.CHANGE
            and override.value_type == ValueType.ELEMENT
            and override.package is None
            and not override.is_hydra_override()
            and override.key_or_group not in self.groups
        )

    def compose(self, overrides: list[str]) -> DictConfig:
        """The job's config, as `loader.load_sweep_config(master, overrides)` gives it."""
        parsed = self.parser.parse_overrides(overrides)
        plain = [self._plain(o) for o in parsed]
        key = tuple(f"={o.key_or_group}" if p else str(o.input_line) for o, p in zip(parsed, plain))
        template = self.composed.get(key)
        if template is None:
            cfg = self.loader.load_sweep_config(self.master, list(overrides))
            if key not in self.composed:
                groups = set(cfg.hydra.runtime.choices)
                derivable = not any(p and o.key_or_group in groups for o, p in zip(parsed, plain))
                self.composed[key] = copy.deepcopy(cfg) if derivable and any(plain) else None
            return cfg
        cfg = copy.deepcopy(template)
        task = [o for o in parsed if not o.is_hydra_override()]
        hydra_compat.set_plain_values(cfg, [o for o, p in zip(parsed, plain) if p], task)
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        self.copies += 1
        return cfg
