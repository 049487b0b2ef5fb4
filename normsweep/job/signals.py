"""Ctrl-C and SIGTERM for a job: SIGTERM (`kill`, a SLURM job's end) stops it as Ctrl-C does, and the workers a
sweep starts hold Ctrl-C back until their job runs, so that it always ends them with the message saying how to
resume."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker


class Terminated(KeyboardInterrupt):
    """SIGTERM: taken as Ctrl-C is, so the job stops at once and its folder is marked `incomplete`."""


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut short the summary
    for worker in multiprocessing.active_children():  # joblib's workers: each stops its own job the same way
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGTERM)
    raise Terminated


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops what runs inside (a sweep, between its jobs too, or one job) now, as Ctrl-C does: the job is
    marked `incomplete` and the line saying how to resume is printed, where the default would end the process with
    its summary.json still `running`. Nested, the outer one holds.

    Inside a SLURM job (scancel, a requeue, the time limit, a preemption), SLURM sends SIGKILL KillWait seconds after
    SIGTERM; submitit only logs "Bypassing signal SIGTERM", so the job would train on, and a job that finished inside
    that window would be counted done after its cancel. Submitit's own pre-emption signal (SIGUSR2 before the time
    limit: checkpoint and requeue) stays with submitit, and so does SIGTERM when it is that signal.
    """
    preempt = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    if (
        preempt == "TERM"
        or threading.current_thread() != threading.main_thread()
        or signal.getsignal(signal.SIGTERM) in (_stop, signal.SIG_IGN)
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(err: KeyboardInterrupt) -> tuple[str, int]:
    """How a stop is said, and the exit status it ends the process with (128 + the signal, as the shell has it)."""
    if not isinstance(err, Terminated):
        return "interrupted", 130
    return (
        "stopped by SIGTERM (SLURM ended or requeued the job)"
        if os.environ.get("SLURM_JOB_ID")
        else "stopped by SIGTERM"
    ), 143


def hold_ctrl_c(hold: bool) -> None:
    """Block (hold back) or unblock SIGINT in this thread; processes started from it inherit that. POSIX only."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK, {signal.SIGINT})


def hold_ctrl_c_in_workers() -> Callable[[], None]:
    """Start the processes this one launches (joblib's workers) with SIGINT held back until their job starts
    (app lets it through): Ctrl-C reaches them too, and ends one still starting up (importing torch) with a
    traceback. This process hears Ctrl-C through a thread that does not hold it back. Returns the undo."""
    # Started with the first worker otherwise, the stdlib's resource tracker lets SIGINT through again: start it now.
    resource_tracker.ensure_running()
    listening = threading.Event()
    threading.Thread(target=listening.wait, name="ctrl-c", daemon=True).start()
    hold_ctrl_c(True)

    def undo() -> None:
        hold_ctrl_c(False)
        listening.set()

    return undo


# What loky's resource tracker says when it exits after the sweep: a worker that Ctrl-C ended mid-job leaves its
# count on a semaphore the launcher has already removed, and the tracker warns, below the line saying how to resume,
# that it "leaked" and then that it cannot be found. It cleans up either way; the user has nothing to do.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def quiet_worker_cleanup() -> None:
    """Keep the resource trackers of the processes this one launches (joblib's) from warning about the leftovers of
    workers Ctrl-C ended. A tracker is a child process started with this interpreter's -W options (sys.warnoptions);
    the filter ignores only warnings that begin with "resource_tracker"."""
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
