"""Where a sweep stands: its jobs done, running and left, and the time left, from the files every launcher's jobs
write in their folders (summary.json, metrics.csv): cheap to read every few seconds, and no scheduler is asked."""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from normsweep.sweep.files import FINISHED, Status, read_metrics, read_summary
from normsweep.sweep.liveness import process_alive

log = logging.getLogger("normsweep")

POLL_S = 2.0  # how often the watcher reads the folders: a job's end is said within this
SWEEP_LINE = {"job_tag": ""}  # a log record's `extra` marking it the sweep's own: sweep/tags.JobTag leaves it as it is


@dataclass(frozen=True)
class JobState:
    """One job of a sweep, as its folder shows it."""

    epochs: int  # to train in all
    status: str = Status.NOT_STARTED.value
    seconds: tuple[float, ...] = ()  # each epoch trained so far (metrics.csv's epoch_seconds)
    # A finished job's seconds outside its epochs (building its data and model, testing, its files): summary.json's
    # wall_seconds less its epochs'. None until it has finished.
    overhead: float | None = None

    @property
    def ended(self) -> bool:
        """Finished (completed, diverged, stalled, pruned) or failed: nothing more of it will run."""
        return self.status in (*FINISHED, Status.FAILED)

    @property
    def epochs_left(self) -> int:
        return 0 if self.ended else max(0, self.epochs - len(self.seconds))


def read_job(folder: Path, epochs: int) -> JobState:
    """The state of the job in `folder`, which trains `epochs` epochs in all. One recorded `running` whose process
    here has ended is not running (it waits to be resumed); its scheduler is not asked."""
    summary = read_summary(folder)
    status = summary["status"]
    if status == Status.RUNNING and not process_alive(summary):
        status = Status.INCOMPLETE.value
    seconds = () if status == Status.NOT_STARTED else _epoch_seconds(folder)
    wall = summary.get("wall_seconds") if status in FINISHED else None
    overhead = max(0.0, wall - sum(seconds)) if isinstance(wall, int | float) and math.isfinite(wall) else None
    return JobState(epochs, status, seconds, overhead)


def _epoch_seconds(folder: Path) -> tuple[float, ...]:
    try:
        seconds = [float(row["epoch_seconds"]) for row in read_metrics(folder)]
    except (KeyError, TypeError, ValueError):
        return ()
    return tuple(s for s in seconds if math.isfinite(s))


@dataclass(frozen=True)
class SweepProgress:
    jobs: int
    done: int  # ended: finished or failed
    failed: int
    running: int
    epochs_left: int
    per_epoch: float | None  # the median seconds of the epochs trained so far; None before the first
    per_job: float | None  # the median seconds a finished job spent outside its epochs; None before the first
    seconds_left: float | None
    at_once: int

    def counts(self) -> str:
        failed = f" ({self.failed} failed)" if self.failed else ""
        if self.done == self.jobs:
            return f"all {self.jobs} jobs done{failed}" if self.jobs > 1 else f"its job done{failed}"
        return (
            f"{self.done} of {self.jobs} job{'s' if self.jobs != 1 else ''} done{failed}, {self.running} running, "
            f"{self.jobs - self.done - self.running} to start"
        )

    def time_left(self) -> str:
        """`about 1 min 10 s left (13 epochs to train, a median 4.2 s each, 2 jobs at a time)`; "" when nothing is
        left or no epoch has been measured yet."""
        if self.seconds_left is None or not self.epochs_left:
            return ""
        epochs, jobs = self.epochs_left, self.at_once
        besides = f" and {_seconds(self.per_job)} a job besides" if self.per_job else ""
        return (
            f"about {duration(self.seconds_left)} left ({epochs} epoch{'s' if epochs > 1 else ''} to train, a median "
            f"{_seconds(self.per_epoch)} each{besides}, {jobs} job{'s' if jobs > 1 else ''} at a time)"
        )

    def line(self) -> str:
        left = self.time_left()
        return f"sweep: {self.counts()}" + (f"; {left}" if left else "")


def sweep_progress(jobs: Sequence[JobState], at_once: int) -> SweepProgress:
    """Where the sweep of `jobs` stands, `at_once` of them running at the same time. The time left: each unfinished
    job's epochs to train at its own median seconds per epoch (the sweep's median over every epoch measured, for a
    job that has trained none yet), plus for each the median time a finished job spent outside its epochs
    (building, testing, writing: most of a quick job's time), shared by `at_once` jobs at a time (fewer, once fewer
    are left)."""
    measured = [s for job in jobs for s in job.seconds]
    per_epoch = statistics.median(measured) if measured else None
    overheads = [job.overhead for job in jobs if job.overhead is not None]
    per_job = statistics.median(overheads) if overheads else None
    unfinished = [job for job in jobs if not job.ended]
    at_once = max(1, min(at_once, len(unfinished)))
    seconds_left = None
    if per_epoch is not None:
        work = sum(job.epochs_left * (statistics.median(job.seconds) if job.seconds else per_epoch) for job in jobs)
        seconds_left = (work + len(unfinished) * (per_job or 0.0)) / at_once
    return SweepProgress(
        jobs=len(jobs),
        done=len(jobs) - len(unfinished),
        failed=sum(job.status == Status.FAILED for job in jobs),
        running=sum(job.status == Status.RUNNING for job in jobs),
        epochs_left=sum(job.epochs_left for job in jobs),
        per_epoch=per_epoch,
        per_job=per_job,
        seconds_left=seconds_left,
        at_once=at_once,
    )


def duration(seconds: float) -> str:
    """`42 s`, `12 min 5 s`, `3 h 20 min`; at least `1 s`."""
    seconds = max(1, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _seconds(seconds: float) -> str:
    return duration(seconds) if seconds >= 60 else f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"


@contextmanager
def watching(progress: Callable[[], SweepProgress]) -> Iterator[None]:
    """While the block runs (a sweep's launches), a thread reads `progress()` every POLL_S seconds and logs its line
    each time a job has ended; a last time when the block ends, if one has ended since."""
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(progress, stop), name="normsweep-sweep-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _watch(progress: Callable[[], SweepProgress], stop: threading.Event) -> None:
    shown = progress().done  # jobs that had ended before (a resumed sweep's) are no news
    while True:
        stopped = stop.wait(POLL_S)
        now = progress()
        if now.done != shown:
            log.info(now.line(), extra=SWEEP_LINE)
            shown = now.done
        if stopped:
            return
