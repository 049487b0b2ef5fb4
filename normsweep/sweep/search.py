"""A tuning sweep's plan, read from Hydra's override grammar (hydra/sweeper=tune): which keys are searched and over
what, which are a grid, and the studies the grid makes. No Optuna and no torch: the plan is checked, and refused in
the user's words, before anything is imported or written.

    optimizer.lr=tag(log, interval(1e-4, 1))     searched, on a log scale (floats)
    optimizer.weight_decay=interval(0, 0.1)      searched, uniformly
    model.width=int(interval(8, 64))             searched, integers
    optimizer.warmup_epochs=choice(0, 1, 2)      searched among these values
    norm=none,bn,ln,in,gn   seed=0,1   range(3)  a grid: one study per combination of the grid's values
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override

from normsweep.config.errors import ConfigError

PRUNERS = ("hyperband", "successive_halving", "median", "none")
SAMPLERS = ("tpe", "random")
EXAMPLE = "'optimizer.lr=tag(log, interval(1e-4, 1))'"


@dataclass(frozen=True)
class Searched:
    """One searched key: an interval (floats, or integers when both ends are), or a choice among values."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def first(self) -> Any:
        """A value inside the space: what the checks before launch compose the job with."""
        return self.choices[0] if self.choices else self.low

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.key} in [{self.low:g}, {self.high:g}]{' (log)' if self.log else ''}"


@dataclass
class Plan:
    """The studies (each one's grid overrides, e.g. ["norm=bn", "epochs=5"]) and the space each of them searches."""

    studies: list[list[str]]
    space: list[Searched]
    named_by: list[str] = field(default_factory=list)  # the keys whose values name a study

    def name(self, study: list[str]) -> str:
        """A study's name: its values of the grid's swept keys, or of the compared key when only one value is given
        (`norm=bn`); `all` when neither is given."""
        return " ".join(o for o in study if o.split("=", 1)[0] in self.named_by) or "all"


def plan(overrides: list[Override], compare: str = "norm") -> Plan:
    """Split parsed overrides into searched keys and the grid; one study per combination of the grid's values. A
    plain override (`epochs=5`) is part of every study; of a key given twice (a preset's, then the command line's),
    the last counts. Raises ConfigError for a space that cannot be searched."""
    given: dict[str, Searched | list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        value = override.value()
        given.pop(key, None)  # the last one given counts, in its place
        if isinstance(value, IntervalSweep):
            given[key] = _interval(key, value)
        elif isinstance(value, ChoiceSweep) and not value.simple_form:
            given[key] = _choice(key, value)
        elif override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ConfigError(f"{key}: this sweep cannot be searched; give an interval or a choice")
            given[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            given[key] = [f"{key}={override.get_value_element_as_str()}"]
    space = [v for v in given.values() if isinstance(v, Searched)]
    grid = [v for v in given.values() if isinstance(v, list)]
    if not space:
        raise ConfigError(
            f"hydra/sweeper=tune searches nothing: give at least one key a range to search, e.g. {EXAMPLE} or "
            "'optimizer.warmup_epochs=choice(0,1,2)' (a plain list such as norm=bn,gn is a grid: one study per value)"
        )
    studies = [list(combo) for combo in itertools.product(*grid)]
    swept = [k for k, v in given.items() if isinstance(v, list) and len(v) > 1]
    return Plan(studies=studies, space=space, named_by=swept or [compare])


def _interval(key: str, sweep: IntervalSweep) -> Searched:
    low, high = sweep.start, sweep.end
    log = "log" in sweep.tags
    written = f"{'tag(log, ' if log else ''}interval({low:g}, {high:g}){')' if log else ''}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{key}={written}: the interval's ends must be numbers")
    if low >= high:
        raise ConfigError(f"{key}={written}: the interval's low end must be below its high end, e.g. interval(0.1, 1)")
    if log and low <= 0:
        raise ConfigError(
            f"{key}={written}: a log-scale interval cannot reach 0 or below; start it at a small positive value "
            f"(e.g. tag(log, interval(1e-5, {high:g}))), or drop `log` to search it uniformly"
        )
    unknown = sorted(set(sweep.tags) - {"log"})
    if unknown:
        raise ConfigError(f"{key}: unknown tag {unknown[0]!r}; the only tag a search reads is log (tag(log, ...))")
    return Searched(key=key, low=low, high=high, log=log)


def _choice(key: str, sweep: ChoiceSweep) -> Searched:
    values = tuple(sweep.list)
    if len(values) < 2 or any(isinstance(v, (dict, list)) for v in values):
        raise ConfigError(f"{key}=choice(...): give two values or more, each a number or a word, e.g. choice(0, 1, 2)")
    return Searched(key=key, choices=values)


# The sweeper's whole-number keys: the least each takes, and whether null (its default) is allowed.
COUNTS = {
    "n_trials": (1, False),
    "n_jobs": (1, False),
    "confirm_seeds": (0, False),
    "min_epochs": (1, False),
    "reduction_factor": (2, False),  # each cut keeps one trial in this many: 1 would keep every trial
    "startup_trials": (0, True),
}


def check_settings(pruner: Any, sampler: Any, **counts: Any) -> None:
    """The sweeper's own keys (hydra.sweeper.*), each refused with its fix."""
    for key, value in counts.items():
        least, nullable = COUNTS[key]
        if value is None and nullable:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(
                f"hydra.sweeper.{key}={value}: give a whole number of {least} or more"
                + (" (each study trains that many trials)" if key == "n_trials" else "")
            )
    if str(pruner) not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner={pruner}: no such pruner; choose one of {', '.join(PRUNERS)}")
    if str(sampler) not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={sampler}: no such sampler; choose one of {', '.join(SAMPLERS)}")


def override_value(value: Any) -> str:
    """A searched value as an override's value: numbers as Python writes them, words as they are, quoted when
    Hydra's grammar would read them otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w.\-]*", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
