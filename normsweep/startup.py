"""The command line's start-up and the garbage collector. Start-up imports Hydra, torch and the job's modules: some
200,000 objects that live as long as the process, and little garbage (each full collection during start-up freed 0
to 4,800 objects among up to 160,000). The collector still ran over them all: 4 full collections before the first
job and one in the second, 20-90 ms each as their number grew, about a quarter of a second of the default sweep
(docs/performance.md).

So the collector is held from the entry until the job's modules are imported (`hold`), and `settle` then freezes
what exists (gc.freeze: never scanned again) and lets it run again for what the jobs allocate. Where the job is not
reached (`--help`, a refused config), the command line's end turns it back on (`settle(freeze=False)`)."""

from __future__ import annotations

import gc

_held = False  # whether hold() turned the collector off, and settle() has not turned it back on yet


def hold() -> None:
    """No garbage collection until settle(); nothing when the collector is off already."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def settle(freeze: bool = True) -> None:
    """The collector on again, if hold() turned it off; with `freeze`, the objects made so far frozen first (a
    command that ends before its job, such as `--help` or a refused config, only turns it on)."""
    global _held
    if _held:
        if freeze:
            gc.freeze()
        gc.enable()
        _held = False
