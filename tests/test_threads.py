"""threads=0: one thread for a step too small to split, the job's share of the CPUs for a large one; decided by the
model's size, not by the load, so the same command gives the same numbers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from normsweep.config.checks import compose_run
from normsweep.job.layers import norm_factory
from normsweep.job.models import build_model
from normsweep.job.threads import (
    SPLIT_MACS,
    ThreadChoice,
    busy_between,
    busy_cpus,
    choose_threads,
    cpu_sample,
    describe,
    step_macs,
    watch_busy,
)


def _model(name: str, shape: tuple[int, int, int]) -> nn.Module:
    run = compose_run([f"model={name}"])
    return build_model(name, run.model, shape[0], shape[1:], 10, norm_factory(run.norm, name))


def test_a_digits_model_trains_on_one_thread_and_deep_cnn_on_32x32_on_its_share() -> None:
    small = step_macs(_model("simple_cnn", (1, 8, 8)), (1, 8, 8), 64)
    large = step_macs(_model("deep_cnn", (3, 32, 32)), (3, 32, 32), 128)
    assert small < SPLIT_MACS <= large
    assert choose_threads(0, 2, small).threads == 1
    assert choose_threads(0, 2, large).threads == 2
    assert choose_threads(0, 1, large).threads == 1  # its share, when jobs run side by side


def test_the_count_is_exact_for_a_known_layer() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 10))
    per_image = 4 * 5 * 5 * 3 * 9 + 10 * 100
    assert step_macs(conv, (3, 5, 5), 16) == 16 * per_image


def test_counting_changes_nothing_of_the_model() -> None:
    model = _model("simple_cnn", (1, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step_macs(model, (1, 8, 8), 64)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm's statistics too


def test_the_users_threads_win_and_a_gpu_job_keeps_its_share() -> None:
    assert choose_threads(3, 2, 10) == ThreadChoice(3, "threads=3")
    assert choose_threads(0, 2, None).threads == 2


def test_a_busy_machine_gets_one_line_saying_what_the_job_did() -> None:
    assert describe(choose_threads(0, 2, 10, busy=0.1), 2) is None  # quiet: nothing to say
    small = describe(choose_threads(0, 2, 10, busy=1.0), 2)
    assert small.startswith("machine busy (1.0 of 2 CPUs used by other processes): training on 1 thread")
    large = describe(choose_threads(0, 2, int(5e9), busy=1.0), 2)
    assert "training on 2 threads" in large and "threads=1" in large


def _spin() -> None:
    while True:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="busy_cpus reads Linux's /proc/stat")
def test_a_process_spinning_beside_the_job_counts_as_a_busy_cpu() -> None:
    # Not a child of this process (its parent, the shell, has exited): other work, as a browser would be.
    shell = subprocess.run(
        ["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    spinner = int(shell.stdout)
    try:
        time.sleep(0.2)
        busy = busy_cpus(seconds=0.3)
    finally:
        os.kill(spinner, signal.SIGKILL)
    assert busy is not None and 0.5 <= busy <= len(os.sched_getaffinity(0)) + 0.01


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")
def test_the_sweeps_own_processes_are_not_other_work() -> None:
    # The sweep's aggregation process is a child of the process that trains: importing and drawing beside the
    # first job, it must not make the job log say the machine is busy.
    spinner = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        before = after = cpu_sample()
        deadline = time.monotonic() + 30
        while after is not None and after.children.get(spinner.pid, 0.0) - before.children.get(spinner.pid, 0.0) < 0.3:
            assert time.monotonic() < deadline, "the child never spun"
            after = cpu_sample()  # however loaded the machine: until the child has spun 0.3 CPU seconds
    finally:
        spinner.terminate()
        spinner.join()
    assert before is not None and after is not None
    spent = after.children[spinner.pid] - before.children.get(spinner.pid, 0.0)
    mine_too = dataclasses.replace(after, children={}, own=before.own)
    everything = busy_between(before, mine_too)  # what the old measure said: the child counted as busy
    assert busy_between(before, after) <= everything - spent / (after.at - before.at) + 0.15  # ticks: 1/100 s


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_the_busy_watch_measures_beside_the_job_and_says_nothing_after_it() -> None:
    # The job does not wait for the measure: it goes on working (here, spinning) while a timer thread takes it.
    said: list[float] = []
    started = time.monotonic()
    stop = watch_busy(cpu_sample(), said.append, seconds=0.1)
    while not said and time.monotonic() - started < 30:
        sum(range(10_000))  # this process's own work is not "other processes"
    stop()
    assert len(said) == 1 and 0.0 <= said[0] <= len(os.sched_getaffinity(0)) + 0.01
    assert said[0] < 0.9 or _others_busy()  # its own spinning is left out

    quick: list[float] = []
    stop = watch_busy(cpu_sample(), quick.append, seconds=5.0)
    begun = time.monotonic()
    stop()  # a job that ends before the window: no line, and no wait for the window
    assert quick == [] and time.monotonic() - begun < 1.0
    watch_busy(None, quick.append)()  # no /proc/stat: nothing measured
    assert quick == []


def _others_busy() -> bool:
    """Whether other processes keep a CPU busy now (a loaded test machine): then the bound above says nothing."""
    busy = busy_cpus(seconds=0.2)
    return busy is not None and busy >= 0.5
