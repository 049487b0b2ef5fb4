"""Several jobs of a sweep trained in one process as one pack (job/pack.py), each in its own folder exactly as
job/run.py leaves a job trained alone: its metrics.csv, diagnostics.csv, checkpoint.pt, predictions and summary.json,
its log lines under its own tag. A member already finished is kept; members that cannot train together (resumed
from different epochs, or a model vmap cannot batch) train one after another instead, and the log says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normsweep.config.schema import Config
from normsweep.job.build import Job
from normsweep.job.pack import Member, fit_packed, why_not_packed
from normsweep.job.progress import EpochProgress
from normsweep.job.run import Begun, Trial, _Progress, _Pruned, _train, finish_job, log_test, start_job
from normsweep.job.train import EpochMetrics
from normsweep.sweep.files import disk_full

log = logging.getLogger("normsweep")


@dataclass
class PackedJob:
    """A job of the pack as its caller knows it: what run_job takes, and the context in which its log lines are its
    own (its tag; its folder's log)."""

    run: Config
    job_dir: Path
    overrides: list[str]
    config: dict[str, Any]
    speaking: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    trial: Trial | None = None  # a tuning sweep's trial, whose study may stop this job alone (pruned)


@dataclass
class _Ready:
    """A job of the pack ready to train (run.start_job), and where it stands in the pack's list."""

    index: int
    packed: PackedJob
    begun: Begun

    @property
    def job(self) -> Job:
        return self.begun.job

    @property
    def progress(self) -> _Progress:
        return self.begun.progress


def run_pack(
    jobs: list[PackedJob], cpus: int, sweep_dir: Path | None = None, swept: tuple[str, ...] = ()
) -> list[dict[str, Any] | BaseException]:
    """Train the jobs as one pack where they can be, each in its folder; per job its summary, or the exception it
    failed with (for the caller to record, as for a job alone). A full disk or an interruption stops them all,
    each job marked incomplete, and is raised."""
    started = time.perf_counter()
    results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)
    ready: list[_Ready] = []
    try:
        for i, packed in enumerate(jobs):
            with packed.speaking():
                try:
                    prepared = _prepare(i, packed, cpus, sweep_dir, swept)
                except Exception as err:
                    if disk_full(err):
                        raise
                    results[i] = err
                    continue
            if isinstance(prepared, dict):
                results[i] = prepared
            else:
                ready.append(prepared)
        for group, why in _groups(ready):
            if why:
                log.info("pack: %s train one after another: %s", ", ".join(r.packed.job_dir.name for r in group), why)
            if len(group) == 1 or why:
                for r in group:
                    with r.packed.speaking():
                        results[r.index] = _alone(r, started)
            else:
                _train_together(group, results, started)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or disk_full(err):  # every job not ended yet resumes from its checkpoint
            for r in ready:
                if results[r.index] is None:
                    r.progress.mark_incomplete()
        raise
    finally:
        for r in ready:
            with contextlib.suppress(Exception):
                r.begun.close()
    return [r if r is not None else RuntimeError("not trained") for r in results]


def _prepare(i: int, packed: PackedJob, cpus: int, sweep_dir: Path | None, swept: tuple[str, ...]) -> Any:
    """The job ready to train, as run_job starts one; or its summary, when it is finished."""
    begun = start_job(packed.run, packed.job_dir, packed.overrides, packed.config, cpus, packed.trial, sweep_dir, swept)
    return begun if isinstance(begun, dict) else _Ready(i, packed, begun)


def _groups(ready: list[_Ready]) -> Iterator[tuple[list[_Ready], str | None]]:
    """The jobs that train together: those resumed from the same epoch, when vmap can batch their models (else
    each alone, with the reason)."""
    by_epoch: dict[int, list[_Ready]] = {}
    for r in ready:
        by_epoch.setdefault(r.progress.resumed_from, []).append(r)
    if len(by_epoch) > 1:
        log.info(
            "pack: its jobs resume from different epochs (%s): those at the same epoch train together",
            ", ".join(f"{r.packed.job_dir.name} from {r.progress.resumed_from}" for r in ready),
        )
    for group in by_epoch.values():
        yield group, why_not_packed([r.job for r in group]) if len(group) > 1 else None


def _train_together(group: list[_Ready], results: list[Any], started: float) -> None:
    def speaking(r: _Ready, call: Callable[..., Any]) -> Callable[..., Any]:
        def said(*args: Any) -> Any:
            with r.packed.speaking():
                return call(*args)

        return said

    members = [
        Member(
            r.job,
            speaking(r, r.progress.record),
            r.progress.state,
            speaking(r, r.progress.diagnose) if r.progress.probe else None,
        )
        for r in group
    ]
    run = group[0].job.run
    progress = EpochProgress(run.epochs, run.progress.after_s, run.progress.every_s)
    try:
        fit_packed(members, watch=progress.watch)
    except Exception as err:  # the packed step itself failed: every member with it (an interruption: run_pack)
        if disk_full(err):
            raise
        for r in group:
            results[r.index] = err
        return
    for r, member in zip(group, members):  # each member's last epoch's files (job/run.py: _Progress.flush)
        try:
            r.progress.flush()
        except Exception as err:
            if member.ended is None or isinstance(member.ended, _Pruned):
                member.ended = err
    full = [m.ended for m in members if m.ended is not None and disk_full(m.ended)]
    for r, member in zip(group, members):
        with r.packed.speaking():
            if member.ended is not None and not isinstance(member.ended, _Pruned):
                results[r.index] = member.ended
                continue
            history = member.history or [EpochMetrics(**row) for row in r.progress.rows]
            try:
                results[r.index] = _finish(r, history, isinstance(member.ended, _Pruned), started)
            except Exception as err:  # its test evaluation or its files: this job fails, the others end as they did
                if disk_full(err):
                    raise
                results[r.index] = err
    if full:
        raise full[0]


def _alone(r: _Ready, started: float) -> dict[str, Any] | BaseException:
    """A job of the pack trained by itself: its summary, or what it failed with (the others go on)."""
    try:
        return _finish(r, *_train(r.job, r.progress), started)
    except Exception as err:
        if disk_full(err):
            raise
        return err


def _finish(r: _Ready, history: list[EpochMetrics], pruned: bool, started: float) -> dict[str, Any]:
    """The job ended as run_job ends one (run.finish_job), and its last line said."""
    summary = finish_job(r.begun, history, pruned, started)
    log_test(summary)
    return summary
