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
import threading
import time
from collections.abc import Callable
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


@dataclass(frozen=True)
class CpuSample:
    """Where the CPUs stood at one moment: per CPU (all ticks, idle ticks) from /proc/stat, and the CPU seconds of
    this process and of each of its children (the sweep's own aggregation process is one: not "other work")."""

    at: float
    cpus: dict[str, tuple[int, int]]
    own: float
    children: dict[int, float]


def cpu_sample() -> CpuSample | None:
    """The CPUs now, or None where /proc/stat is not there (macOS, Windows)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    cpus = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            cpus[name] = (sum(values), values[3] + values[4])  # all, idle + iowait
    return CpuSample(time.monotonic(), cpus, time.process_time(), _children_seconds())


def _children_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of each child of this process, from /proc (empty where it cannot be read)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = {}
    try:
        pids = [int(p) for task in Path("/proc/self/task").iterdir() for p in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return seconds
    for pid in pids:
        try:  # the fields after the command's name, which may hold spaces: utime and stime are the 12th and 13th
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return seconds


def busy_since(before: CpuSample | None, cpus: list[int] | None = None, at_least: float = 0.05) -> float | None:
    """How many of this process's CPUs other processes kept busy since `before` (this process and its children
    left out, so the window may hold the job's own set-up; it is made `at_least` seconds long by sleeping the
    rest: /proc/stat counts in hundredths of a second). None where /proc/stat is not there."""
    if before is None:
        return None
    if cpus is None and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
    time.sleep(max(0.0, at_least - (time.monotonic() - before.at)))
    after = cpu_sample()
    return None if after is None else busy_between(before, after, cpus)


def watch_busy(before: CpuSample | None, say: Callable[[float], None], seconds: float = 0.25) -> Callable[[], None]:
    """Measure, `seconds` after `before`, how many of this process's CPUs other processes kept busy meanwhile, and
    call `say(busy)` with it, from a timer thread: the job builds and trains in the meantime instead of sleeping
    (busy_between leaves its own CPU time out). Returns the function that ends the watch, to call before the job
    ends: it waits for a `say` under way, and a job that ended sooner says nothing."""
    if before is None:
        return lambda: None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def measure() -> None:
        after = cpu_sample()
        if after is not None:
            say(busy_between(before, after, cpus))

    timer = threading.Timer(max(0.0, seconds - (time.monotonic() - before.at)), measure)
    timer.daemon = True
    timer.start()

    def stop() -> None:
        timer.cancel()
        timer.join()

    return stop


def busy_between(before: CpuSample, after: CpuSample, cpus: list[int] | None = None) -> float:
    """CPUs busy between two samples (`cpus`: of these only; None: all), less what this process and its children
    spent."""
    busy = 0.0
    for name in [f"cpu{c}" for c in cpus] if cpus else list(after.cpus):
        if name in before.cpus and name in after.cpus:
            total = after.cpus[name][0] - before.cpus[name][0]
            idle = after.cpus[name][1] - before.cpus[name][1]
            busy += (total - idle) / total if total > 0 else 0.0
    ours = after.own - before.own
    ours += sum(spent - before.children.get(pid, 0.0) for pid, spent in after.children.items())
    return max(0.0, busy - ours / max(after.at - before.at, 1e-9))


def busy_cpus(cpus: list[int] | None = None, seconds: float = 0.1) -> float | None:
    """How many of this process's CPUs other processes keep busy over the next `seconds`."""
    return busy_since(cpu_sample(), cpus, at_least=seconds)


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
