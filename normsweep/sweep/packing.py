"""Which jobs of a sweep train together (job/pack.py), decided by the sweeper before launch from the jobs' configs.

Jobs pack when their configs differ only in what each member keeps for itself (`seed`: its weights, split and
batch order; `optimizer`: its class, rate, decay and schedule) and in keys that say where a job runs or how it is
watched (sweep/settings.py's where-keys). The first job of a pack, its host, is launched as any job, with the
others' configs in a file of the sweep folder named by the environment variable PACK_ENV; the host trains them all
and writes each one's folder. `pack=auto` packs jobs that train on CUDA (on the CPU a packed step is slower than the
jobs one after another: measured in docs/performance.md), `pack=true` on any device, `pack=false` never.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from normsweep.sweep.files import atomic_write
from normsweep.sweep.settings import WHERE_KEYS, flatten, where_group

PACK_ENV = "NORMSWEEP_PACK"  # the pack file of the job launched as a pack's host
JOB_NUM_ENV = "NORMSWEEP_JOB_NUM"  # a launched job's number in the sweep, where packs make it differ from the launch's
PACK_DIR = ".packs"  # in the sweep folder: one file per pack, written at launch
MEMBERS_KEPT = ("seed", "optimizer")  # the keys in which a pack's members may differ
MAX_MEMBERS = 16  # a pack's size at most: each member holds its own copy of the data on the device


@dataclass
class Plan:
    """The packs of a sweep (job indices, host first) and why each job not in one trains alone."""

    packs: list[list[int]] = field(default_factory=list)
    alone: dict[int, str] = field(default_factory=dict)

    def lines(self, nums: Sequence[int]) -> list[str]:
        """What the sweep's log says of it: one line per pack, one per reason jobs train alone."""
        said = [
            f"pack: jobs {', '.join(str(nums[i]) for i in pack)} train together (one model, data set, batch size and "
            "epochs; each its own seed and optimizer)"
            for pack in self.packs
        ]
        reasons: dict[str, list[int]] = {}
        for i, why in self.alone.items():
            reasons.setdefault(why, []).append(nums[i])
        for why, jobs in reasons.items():
            said.append(f"pack: job{'s' if len(jobs) > 1 else ''} {', '.join(map(str, jobs))} alone: {why}")
        return said


def packing(setting: Any, device: str) -> str | None:
    """None when a job with this `pack` and `device` setting may be packed; else why not, in a user's words."""
    if setting is False:
        return "pack=false"
    if setting is True:
        return None
    if device.startswith("cuda"):
        return None
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    return (
        f"pack=auto packs jobs on CUDA only (here device={device} trains on the CPU, where one job at a time is faster)"
    )


def signature(config: dict[str, Any]) -> str:
    """What jobs of one pack share: the config without the members' own keys and the where-keys (device stays:
    a pack trains on one device)."""
    shared = {
        key: value
        for key, value in flatten(config).items()
        if key.split(".", 1)[0] not in MEMBERS_KEPT
        and (key == "device" or key not in WHERE_KEYS)
        and not where_group(key)
    }
    return json.dumps(shared, sort_keys=True, default=str)


def plan(configs: Sequence[dict[str, Any]]) -> Plan:
    """The packs of jobs whose task configs are `configs` (in launch order): jobs with the same signature, at most
    MAX_MEMBERS each, in order; a job alone where packing is off for it or no other job shares its signature."""
    result = Plan()
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        why = packing(config.get("pack", "auto"), str(config.get("device", "auto")))
        if why:
            result.alone[i] = why
        else:
            groups.setdefault(signature(config), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), MAX_MEMBERS):
            chunk = members[start : start + MAX_MEMBERS]
            if len(chunk) > 1:
                result.packs.append(chunk)
            else:
                result.alone[chunk[0]] = "no other job differs from it only in seed or optimizer"
    result.packs.sort()
    return result


@dataclass
class Guest:
    """A member of a pack other than its host, as the host's process needs it: its folder's name in the sweep
    folder, its job number, its config as the sweeper composed it (Hydra's node included), its task overrides and
    the environment variables it would have been launched with (a tuning sweep's trial)."""

    name: str
    num: int
    config: DictConfig
    overrides: list[str]
    env: dict[str, str] = field(default_factory=dict)


def write_pack(sweep_dir: Path, host: str, guests: list[Guest]) -> Path:
    """The pack file of the job in folder `host`: its guests, pickled (a DictConfig keeps its types so)."""
    path = Path(sweep_dir) / PACK_DIR / f"{host}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pickle.dumps(guests))
    return path


def read_pack(path: str | None) -> list[Guest]:
    """The guests of the pack file at `path` (PACK_ENV's value); none for an empty value."""
    if not path:
        return []
    with open(path, "rb") as f:
        return pickle.load(f)
