"""How many CPU threads a job trains with when `threads=0`: one, unless its training step is large enough to split.

Measured on this project's 2-core machine (docs/performance.md): on a quiet machine a second thread makes a step
1.4-1.9x faster from deep_cnn on digits up (0.16 GMAC per step) and barely (1.1x) for simple_cnn on digits (0.02
GMAC); beside one busy process, with OpenMP's threads sleeping while they wait (normsweep/__init__.py), two threads
are 0.8-1.2x of one for every size, the small ones at the bottom of that range. So a step under SPLIT_MACS trains on
one thread, a larger one on the job's share of the CPUs. The rule is the step's size, counted once from the model
(multiply-accumulates of its convolutions and linear layers for one batch), not a timing: the same command trains
with the same thread count, and gives the same numbers, whatever else the machine is doing."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# A step of at least this many multiply-accumulates (forward, one batch) trains on the job's share of the CPUs.
SPLIT_MACS = 1.0e8


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # for summary.json and the job log: what decided
    busy: float | None = None  # CPUs busy with other processes when the job started (None: not measured)


def busy_cpus(cpus: list[int] | None = None, seconds: float = 0.1) -> float | None:
    """How many of this process's CPUs other processes kept busy over `seconds` (from /proc/stat; this process
    sleeps meanwhile). None where /proc/stat is not there (macOS, Windows)."""
    if cpus is None and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))

    def sample() -> dict[str, tuple[int, int]] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        ticks = {}
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields[:8]]
                ticks[name] = (sum(values), values[3] + values[4])  # all, idle + iowait
        return ticks

    before = sample()
    if before is None:
        return None
    time.sleep(seconds)
    after = sample() or {}
    busy = 0.0
    for name in [f"cpu{c}" for c in cpus] if cpus else list(after):
        if name in before and name in after:
            total = after[name][0] - before[name][0]
            idle = after[name][1] - before[name][1]
            busy += (total - idle) / total if total > 0 else 0.0
    return busy


def step_macs(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int) -> int:
    """Multiply-accumulates of the convolutions and linear layers in one forward pass of a batch: a count, from
    one forward pass of two blank images in eval mode (no statistics updated, no random number drawn)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        per_sample = output.numel() // max(1, output.shape[0])
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += per_sample * (module.in_channels // module.groups) * k
        else:
            total += per_sample * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *sample_shape))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total * batch_size


def choose_threads(setting: int, budget: int, macs: int | None, busy: float | None = None) -> ThreadChoice:
    """`threads=N` is N. `threads=0` is the job's share of the CPUs (`budget`) for a step of at least SPLIT_MACS
    (`macs`; None: a GPU job, where threads only feed the device), and one thread for a smaller step."""
    if setting:
        return ThreadChoice(setting, f"threads={setting}", busy)
    budget = max(1, budget)
    if macs is None or budget == 1:
        return ThreadChoice(budget, "this job's share of the CPUs", busy)
    size = f"{macs / 1e9:.2g} GMAC per step"
    if macs >= SPLIT_MACS:
        return ThreadChoice(budget, f"{size}: large enough to split over this job's {budget} CPUs", busy)
    return ThreadChoice(1, f"{size}: too small to split (under {SPLIT_MACS / 1e9:g})", busy)


def describe(choice: ThreadChoice, cpus: int) -> str | None:
    """The job log's line when the machine is busy at the start (other processes on at least half a CPU), or None."""
    if choice.busy is None or choice.busy < 0.5:
        return None
    what = f"machine busy ({choice.busy:.1f} of {cpus} CPUs used by other processes)"
    if choice.threads == 1:
        return f"{what}: training on 1 thread ({choice.reason}), so it waits for no other CPU"
    return (
        f"{what}: training on {choice.threads} threads ({choice.reason}); they sleep while they wait, so the other "
        "work slows this job by its share only; threads=1 leaves it a CPU"
    )
