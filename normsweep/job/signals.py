"""Ctrl-C and SIGTERM for a job: a SLURM job's SIGTERM stops it as Ctrl-C does, and the workers a sweep starts
hold Ctrl-C back until their job runs, so that it always ends them with the message saying how to resume."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker


class Terminated(KeyboardInterrupt):
    """SIGTERM in a SLURM job: taken as Ctrl-C is, so the job stops at once and its folder is marked `incomplete`."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside a SLURM job, SIGTERM (scancel, a requeue, the time limit, a preemption) stops the job now.

    SLURM sends SIGKILL KillWait seconds after SIGTERM; submitit only logs "Bypassing signal SIGTERM", so the job would
    train on, and a job that finished inside that window would be counted done after its cancel. Submitit's own
    pre-emption signal (SIGUSR2 before the time limit: checkpoint and requeue) stays with submitit.
    """
    preempt = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    if not os.environ.get("SLURM_JOB_ID") or preempt == "TERM" or threading.current_thread() != threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut short the summary
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
