"""What the options of the norm, optimizer and dataset groups share: normsweep's own keys beside the arguments of
their `_target_`, and the one conversion of a composed YAML node into its typed record."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normsweep.config.errors import ConfigError

R = TypeVar("R", bound="Record")


class Record:
    """A mixin for an option's dataclass. OWN_KEYS are the keys normsweep reads itself; every other field, and a
    user's record's `kwargs` (the keys of a YAML normsweep has no schema for), are passed to its `_target_`.

    A user's record (UserNorm, UserOptimizer, UserDataset) also says what to_record needs: its GROUP, the keys of
    a user's YAML its schema types (TYPED; the others become `kwargs`) and what such a YAML NEEDS at least."""

    OWN_KEYS: ClassVar[tuple[str, ...]] = ()
    GROUP: ClassVar[str] = ""
    TYPED: ClassVar[tuple[str, ...]] = ()
    NEEDS: ClassVar[str] = ""

    def arguments(self) -> dict[str, Any]:
        """The `_target_`'s keyword arguments: every field that is not normsweep's own, then a user's `kwargs`."""
        passed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self.OWN_KEYS and f.name != "kwargs"
        }
        return {**passed, **getattr(self, "kwargs", {})}

    def check(self) -> None:
        """Raise ConfigError for a value out of range (types were checked at composition)."""


def to_record(node: Any, choice: str | None, user: type[R]) -> R:
    """The record of a composed node of the `user` record's group: a built-in option's record as it is, or, for a
    user's YAML (a mapping with a `_target_`), a `user` record whose TYPED keys are checked against its schema and
    whose other keys become its `kwargs`. Checked either way; raises ConfigError naming the key, or saying what the
    YAML NEEDS."""
    group, typed = user.GROUP, user.TYPED
    if isinstance(node, Record):
        node.check()
        return node  # type: ignore[return-value]
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{group}={choice}: {user.NEEDS}")
    own = {k: v for k, v in node.items() if k in typed}
    own.setdefault("name", choice or str(node["_target_"]).rsplit(".", 1)[-1])
    try:
        record = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(user), own))
    except OmegaConfBaseException as err:
        key = getattr(err, "key", None) or ""
        reason = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        if type(err).__name__ == "MissingMandatoryValue":
            reason = f"its YAML needs {key} (e.g. {key}: …)"
        raise ConfigError(f"{group}.{key}: {reason}".replace(".: ", ": ")) from None
    record.kwargs = {k: v for k, v in node.items() if k not in typed}
    record.check()
    return record
