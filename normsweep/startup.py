"""The command line's start-up and the garbage collector. Start-up imports Hydra, torch and the job's modules: some
200,000 objects that live as long as the process, and almost no garbage (a full collection during the imports
freed 0 to 15 objects). The collector still ran over them: 4 full collections before the first job and one in the
second, 20-90 ms each as their number grew, about a quarter of a second of the default sweep (docs/performance.md).

So the collector is held from the entry until the job's modules are imported (`hold`), and `settle` then freezes
what exists (gc.freeze: never scanned again) and lets it run again for what the jobs allocate. Where settle is not
reached (`--help`, a refused config), `release` turns it back on at the end."""

from __future__ import annotations

import gc

_held = False  # whether hold() turned the collector off, and settle() or release() has not turned it back on


def hold() -> None:
    """No garbage collection until settle() (or release()); nothing when the collector is off already."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def settle() -> None:
    """The objects made so far frozen, and the collector on again, if hold() turned it off."""
    global _held
    if _held:
        gc.freeze()
        gc.enable()
        _held = False


def release() -> None:
    """The collector on again, if hold() turned it off (nothing frozen)."""
    global _held
    if _held:
        gc.enable()
        _held = False
