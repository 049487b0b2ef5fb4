"""The configs of a sweep's jobs, composed before the first one starts: Hydra composes a job's config in about a
tenth of a second, so a 200-job grid took 16 s. Jobs of a grid differ mostly in plain values (`seed=1`,
`optimizer.lr=0.01`): a job whose overrides differ from an earlier job's only in such values is a copy of that job's
config with its values set the way Hydra sets them. Group choices (`norm=bn`), `+`, `++` and `~` overrides and
`hydra.` keys are composed by Hydra, once per distinct set of them.

Those compositions run beside the first job's imports: a sweep checks every job before launch, and the first check
imports torch (1.2-2 s); composing the jobs of the default sweep takes another 0.5 s. Both are Python holding the
GIL, so a thread does not overlap them (tried): a forked child composes while this process imports, and sends the
configs back pickled (a few milliseconds each)."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import select
import signal
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf

from normsweep.config import hydra_compat
from normsweep.sweep.files import override_key

# The keys whose values differ between the jobs of the sweep being launched, comma-separated: a job's log lines are
# tagged with those only (the launched processes inherit the environment).
SWEPT_KEYS_ENV = "NORMSWEEP_SWEPT_KEYS"
BESIDE_WAIT_S = 30.0  # how long compose_beside waits for its child after the imports (and half a second a config)


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
        self.ready: dict[tuple[str, ...], DictConfig] = {}  # composed by compose_beside's child, by the overrides
        self._keys: dict[tuple[str, ...], tuple[list[Override], list[bool], tuple[str, ...]]] = {}  # _key's, kept

    def _plain(self, override: Override) -> bool:
        return (
            override.type == OverrideType.CHANGE
            and override.value_type == ValueType.ELEMENT
            and override.package is None
            and not override.is_hydra_override()
            and override.key_or_group not in self.groups
        )

    def _key(self, overrides: list[str]) -> tuple[list[Override], list[bool], tuple[str, ...]]:
        """The overrides parsed, which of them are plain values, and the job's key: its other overrides, and the
        keys of its plain ones. Kept: compose_beside and compose ask for each job's (a millisecond a parse)."""
        known = self._keys.get(tuple(overrides))
        if known is None:
            parsed = self.parser.parse_overrides(overrides)
            plain = [self._plain(o) for o in parsed]
            key = tuple(f"={o.key_or_group}" if p else str(o.input_line) for o, p in zip(parsed, plain))
            known = self._keys[tuple(overrides)] = (parsed, plain, key)
        return known

    def compose_beside(self, jobs: list[list[str]], meanwhile: Callable[[], None]) -> None:
        """Run `meanwhile()` here while a forked child composes, with Hydra, the jobs that compose() would give
        Hydra (the first of each key) but the first, composed here before; compose() then takes the configs. The
        child composes nothing where this process cannot fork safely (not Linux, or torch imported already: its
        threads), for fewer than two such jobs, or when it fails: compose() composes them here and says any mistake,
        as without this."""
        firsts: dict[tuple[str, ...], list[str]] = {}
        if sys.platform.startswith("linux") and "torch" not in sys.modules:
            for overrides in jobs:
                key = self._key(overrides)[2]
                if key not in self.composed:
                    firsts.setdefault(key, list(overrides))
        if len(firsts) < 2:
            meanwhile()
            return
        # The first here, before the imports: a mistake in it (norm=nonexistent,bn) is said in half a second.
        first, *rest = firsts.values()
        self.ready[tuple(first)] = self.loader.load_sweep_config(self.master, list(first))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compose until the first job Hydra refuses (the parent composes it, and says why)
            status = 0
            try:
                os.close(read)
                ready = {}
                for overrides in rest:
                    try:
                        ready[tuple(overrides)] = self.loader.load_sweep_config(self.master, list(overrides))
                    except Exception:
                        break
                with os.fdopen(write, "wb") as out:
                    pickle.dump(ready, out, protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException:
                status = 1
            finally:
                os._exit(status)  # nothing of the parent's: no exit handlers, no buffered output written twice
        os.close(write)
        try:
            meanwhile()
            # A child that has not answered in far longer than Hydra takes (a tenth of a second a config) is not
            # waited for: its configs are composed here.
            if select.select([read], [], [], BESIDE_WAIT_S + 0.5 * len(rest))[0]:
                with os.fdopen(read, "rb") as got:
                    read = -1
                    try:
                        self.ready.update(pickle.load(got))
                    except Exception:  # the child ended without sending them: composed here
                        pass
        finally:  # its work is done, or not needed (Ctrl-C, a failed import, no answer)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if read != -1:
                os.close(read)
            os.waitpid(pid, 0)

    def compose(self, overrides: list[str]) -> DictConfig:
        """The job's config, as `loader.load_sweep_config(master, overrides)` gives it."""
        parsed, plain, key = self._key(overrides)
        template = self.composed.get(key)
        if template is None:
            cfg = self.ready.pop(tuple(overrides), None)
            if cfg is None:
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
