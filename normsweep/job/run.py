"""One training job in its folder: data + model → train loop → metrics.csv, checkpoint.pt and summary.json.

A job resumes whatever its folder holds: a finished job is kept as it is, a stopped one continues from its last
checkpoint, and a folder holding another job is refused before anything in it changes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from normsweep.config.schema import Config
from normsweep.job.build import Job, build, describe_compute
from normsweep.job.checkpoint import drop_previous, load_checkpoint, save_checkpoint
from normsweep.job.diagnostics import Diagnostics
from normsweep.job.optim import no_decay
from normsweep.job.placement import available_cpus
from normsweep.job.threads import ThreadChoice, choose_threads, cpu_sample, describe, step_macs, watch_busy
from normsweep.job.train import (
    STALL_ACC_FACTOR,
    STALL_MIN_STEPS,
    EpochMetrics,
    describe_hardware,
    predict,
    resolve_device,
)
from normsweep.sweep.files import (
    DIAGNOSTICS_COLUMNS,
    DIAGNOSTICS_FILE,
    FINISHED,
    METRIC_COLUMNS,
    METRICS_FILE,
    TRIAL_KEY,
    CsvLog,
    Status,
    WriteBehind,
    disk_full,
    read_diagnostics,
    write_diagnostics,
    write_metrics,
    write_predictions,
    write_summary,
)
from normsweep.sweep.liveness import load_summary, process_start, slurm_job
from normsweep.trackers import JobInfo, Trackers, open_trackers

log = logging.getLogger("normsweep")


class Trial(Protocol):
    """A tuning sweep's trial, as a job sees it (sweep/studies.py JobTrial): what summary.json records of it, and
    whether its study stops the job after an epoch."""

    record: dict[str, Any]
    why: str | None  # after should_stop said stop: its reason, when not the pruner's (None)

    def should_stop(self, epoch: int, val_acc: float, final: bool, floor: float | None) -> bool: ...


class _Pruned(Exception):
    """Raised after an epoch's files are written, when the job's trial is stopped there."""


def run_job(
    run: Config,
    job_dir: Path,
    overrides: list[str],
    config: dict[str, Any],
    cpus: int | None = None,
    trial: Trial | None = None,
    sweep_dir: Path | None = None,
    swept: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train one configuration in `job_dir`, or finish it there; returns its summary. `cpus`: the job's share of the
    CPUs when jobs run side by side (default: every CPU it may run on); `threads=0` picks within it (threads.py).
    `trial`: the job is a trial of a tuning sweep, which may stop it early (status pruned). `sweep_dir` and `swept`
    (the keys its sweep varies) are what the trackers of `run.logger` need to know of a job of a sweep.

    `config` is the job's resolved config as the user wrote it: summary.json keeps it, and a later run in the
    same folder must bring the same one (the caller checks the folder first, with resume.check_resumable).
    """
    started = time.perf_counter()
    begun = start_job(run, job_dir, overrides, config, cpus or available_cpus(), trial, sweep_dir, swept)
    if isinstance(begun, dict):
        return begun
    try:
        summary = finish_job(begun, *_train(begun.job, begun.progress), started)
    finally:
        begun.close()  # before the job's log lines end (a sweep's next job has its own tag)
    log_test(summary)
    return summary


@dataclass
class Begun:
    """A job built, restored from its checkpoint, marked running and reporting to its trackers: ready to train."""

    job: Job
    progress: _Progress
    end_watch: Callable[[], None]

    def close(self) -> None:
        """Its trackers closed, its epoch files' writer ended, and the watch of how busy the machine is ended (trained
        or not: a write that failed was raised while it trained, or the job failed before it)."""
        try:
            self.progress.trackers.close()
        finally:
            try:
                with contextlib.suppress(OSError):
                    self.progress.writer.close()
            finally:
                self.end_watch()


def start_job(
    run: Config,
    job_dir: Path,
    overrides: list[str],
    config: dict[str, Any],
    cpus: int,
    trial: Trial | None = None,
    sweep_dir: Path | None = None,
    swept: tuple[str, ...] = (),
) -> Begun | dict[str, Any]:
    """The job in `job_dir` ready to train (run_job's arguments), or its summary when it has finished before."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    previous = load_summary(job_dir)
    if previous["status"] in FINISHED:
        _log_kept(job_dir, previous)
        return previous
    job, device, choice, end_watch = _build(run, cpus, previous)
    try:
        provenance = _provenance(job, device, choice, overrides, config)
        if trial is not None:
            provenance[TRIAL_KEY] = trial.record
        progress = _restore(job_dir, job, provenance, trial)
        info = JobInfo(job_dir, config, overrides, sweep_dir, swept, progress.resumed_from, list(progress.rows))
        progress.trackers = open_trackers(run.logger, info)
    except BaseException:
        end_watch()
        raise
    return Begun(job, progress, end_watch)


def finish_job(begun: Begun, history: list[EpochMetrics], pruned: bool, started: float) -> dict[str, Any]:
    """The trained job's summary written (last: a folder whose summary says finished holds every file of the job),
    the checkpoint before its last dropped, its trackers told; returns the summary."""
    summary = _summarize(begun.job, begun.progress, history, started, pruned)
    write_summary(begun.progress.job_dir, summary)
    drop_previous(begun.progress.job_dir)
    begun.progress.trackers.finish(summary)
    return summary


def log_test(summary: dict[str, Any]) -> None:
    """The job's last line: its final model on the test split."""
    log.info(
        "test_acc %.2f%% test_loss %.4f (final model, %d test images)",
        summary["test_acc"],
        summary["test_loss"],
        summary["test_images"],
    )


def _log_kept(job_dir: Path, previous: dict[str, Any]) -> None:
    log.info(
        "%s: kept from an earlier run (%s, %d epoch%s, val_acc %.2f%%)",
        job_dir,
        previous["status"],
        previous.get("epochs_completed", 0),
        "" if previous.get("epochs_completed") == 1 else "s",
        previous.get("final_val_acc", float("nan")),
    )


def _build(
    run: Config, budget: int, previous: dict[str, Any]
) -> tuple[Job, torch.device, ThreadChoice, Callable[[], None]]:
    """The job on its device, and the CPU threads it trains with (threads.py); the log says what trains where. The
    last item ends the watch of how busy the machine is (a line in the log when it is), which measures over the
    job's first quarter of a second, beside its build and training."""
    device = resolve_device(run.device)
    torch.set_num_threads(run.threads or budget)  # until the choice below, which needs the model
    cpus = cpu_sample() if not run.threads and device.type == "cpu" else None
    job = build(run, device)
    choice = _threads(run, budget, job.model, job.data.shape, device, previous)
    torch.set_num_threads(choice.threads)
    threads, data = choice.threads, job.data
    log.info(
        f"device {device} ({threads} CPU thread{'s' if threads > 1 else ''}, {describe_compute(job.compute)}) | "
        f"model={run.model['name']} norm={run.norm.name} optimizer={run.optimizer.name} "
        f"lr={run.optimizer.lr:g} | {run.dataset.name}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {'x'.join(map(str, data.shape))}, {data.num_classes} classes | "
        f"{job.params} parameters"
    )

    def say_busy(busy: float) -> None:
        line = describe(replace(choice, busy=busy), available_cpus())
        if line:
            log.info(line)

    return job.to(device), device, choice, watch_busy(cpus, say_busy)


def _threads(
    run: Config, budget: int, model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, previous: dict
) -> ThreadChoice:
    """The job's CPU threads (threads.py). A job resumed with threads=0 keeps the count it started with: the rest of
    its epochs give the numbers they would have given, even on a node with more CPUs."""
    if run.threads or device.type != "cpu":
        return choose_threads(run.threads, budget, None)
    if previous.get("threads") and previous.get("epochs_completed"):
        return ThreadChoice(int(previous["threads"]), "as before the resume")
    try:
        macs = step_macs(model, shape, run.batch_size)
    except Exception:  # a model that fails on blank images fails in training, with the error said there
        macs = None
    return choose_threads(0, budget, macs)


def _provenance(
    job: Job, device: torch.device, choice: ThreadChoice, overrides: list[str], config: dict[str, Any]
) -> dict[str, Any]:
    """What every summary.json of the job records, finished or not: the process and where it runs (what tells
    whether a job marked running still runs), and the job's identity (the aggregation's columns)."""
    run = job.run
    return {
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "device": str(device),
        "slurm_job": slurm_job(os.environ),  # as squeue shows it; a requeued job keeps it and may resume itself
        "hardware": describe_hardware(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": choice.threads,
        "threads_why": choice.reason,  # threads=N, or what decided threads=0
        "precision": job.compute.precision,
        "channels_last": job.compute.channels_last,
        "seed": run.seed,
        "model": run.model["name"],
        "norm": run.norm.name,
        "optimizer": run.optimizer.name,
        "dataset": run.dataset.name,
        "overrides": overrides,
        "config": config,
    }


@dataclass
class _Progress:
    """A job's files while it trains: metrics.csv and diagnostics.csv up to its last epoch, that epoch's checkpoint,
    and a summary.json that says how far it got."""

    job_dir: Path
    job: Job
    provenance: dict[str, Any]
    state: dict[str, Any] | None  # the checkpoint the job resumes from
    resumed_from: int  # its epoch
    rows: list[dict[str, Any]]  # metrics.csv
    diagnostics_rows: list[dict[str, Any]]  # diagnostics.csv
    probe: Diagnostics | None
    trial: Trial | None = None
    trackers: Trackers = field(default_factory=lambda: Trackers({}))
    writer: WriteBehind = field(default_factory=WriteBehind)  # the epoch files, written while the next one trains
    metrics_file: CsvLog = field(init=False)
    diagnostics_file: CsvLog = field(init=False)
    written: int = field(init=False)  # the epochs whose files are all written (the others may be queued)

    def __post_init__(self) -> None:
        self.written = len(self.rows)
        self.metrics_file = CsvLog(self.job_dir / METRICS_FILE, METRIC_COLUMNS, self.writer.write)
        self.diagnostics_file = CsvLog(self.job_dir / DIAGNOSTICS_FILE, DIAGNOSTICS_COLUMNS, self.writer.write)

    def mark(self, status: Status, epochs_completed: int) -> None:  # the summary of a job not (yet) finished
        summary = {"status": status, "epochs_completed": epochs_completed, "epochs": self.job.run.epochs}
        write_summary(self.job_dir, {**summary, **self.provenance})

    def record(self, m: EpochMetrics, snapshot: Callable[[], dict[str, Any]]) -> None:
        """An epoch's files (train.fit's on_epoch): its diagnostics, its checkpoint, its row of metrics.csv, queued
        in that order (written while the next epoch trains: `flush` waits for them)."""
        if self.probe is not None:  # before the checkpoint: a resume from the one before drops this epoch's rows
            self.diagnostics_file.write(self.diagnostics_rows)
        if not m.diverged(self.job.diverge_loss):  # the checkpoint first: a kill between the two files loses nothing
            save_checkpoint(self.job_dir, snapshot(), self.writer.write)
        self.rows.append(asdict(m))
        self.metrics_file.write(self.rows)
        self.writer.then(partial(setattr, self, "written", len(self.rows)))
        log.info(
            f"Epoch {m.epoch}/{self.job.run.epochs} train_loss {m.train_loss:.4f} train_acc {m.train_acc:.2f}% "
            f"val_loss {m.val_loss:.4f} val_acc {m.val_acc:.2f}% ({m.epoch_seconds:.2f} s, "
            f"{m.images_per_second:.0f} img/s)"
        )
        self.trackers.epoch(self.rows[-1], [row for row in self.diagnostics_rows if row["epoch"] == m.epoch])
        if self.trial is not None and not m.diverged(self.job.diverge_loss):
            floor = STALL_ACC_FACTOR * self.job.chance_acc  # what a model that learned nothing scores
            if self.trial.should_stop(m.epoch, m.val_acc, final=m.epoch >= self.job.run.epochs, floor=floor):
                if self.trial.why:
                    log.info(self.trial.why)
                raise _Pruned

    def diagnose(self, epoch: int) -> None:
        self.diagnostics_rows.extend(self.probe.measure(epoch))

    def flush(self) -> None:
        """Every epoch's files written (a failed write raised here, if no later epoch raised it)."""
        self.writer.flush()

    def mark_incomplete(self) -> None:
        """A job stopped before its end (interrupted, or by a full disk): what its epochs queued is written first,
        then its summary says how many epochs' files are all written; a write that fails here (the disk still full)
        leaves it `running`, incomplete once its process ends."""
        with contextlib.suppress(OSError):
            self.flush()
        with contextlib.suppress(OSError):
            self.mark(Status.INCOMPLETE, self.written)


def _restore(job_dir: Path, job: Job, provenance: dict[str, Any], trial: Trial | None = None) -> _Progress:
    """The job's files as of its last checkpoint (or its start), and summary.json marked running."""
    state = load_checkpoint(job_dir)
    resumed_from = state["epoch"] if state else 0
    rows: list[dict[str, Any]] = list(state["history"]) if state else []
    if state:
        log.info("resuming from the checkpoint of epoch %d/%d in %s", resumed_from, job.run.epochs, job_dir)
    if state or (job_dir / METRICS_FILE).is_file():  # drops any row written after that checkpoint (all: no checkpoint)
        write_metrics(job_dir, rows)
    diagnostics_rows = read_diagnostics(job_dir, resumed_from)  # the same for diagnostics.csv
    if diagnostics_rows or (job_dir / DIAGNOSTICS_FILE).is_file():
        write_diagnostics(job_dir, diagnostics_rows)
    # A resumed run's first update_ratio starts from its checkpoint's weights.
    probe = job.probe(start=state["model"] if state else None) if job.run.diagnostics else None
    progress = _Progress(job_dir, job, provenance, state, resumed_from, rows, diagnostics_rows, probe, trial)
    progress.mark(Status.RUNNING, resumed_from)
    return progress


def _train(job: Job, progress: _Progress) -> tuple[list[EpochMetrics], bool]:
    """The job's epochs after its checkpoint, each one's files written as it ends, and whether its trial stopped it
    early (pruned); interrupted, or stopped by a full disk, it is incomplete (on a disk still full, its summary stays
    `running`: incomplete once its process ends)."""
    try:
        try:
            history = job.train(progress.record, progress.state, progress.diagnose if progress.probe else None)
            pruned = False
        except _Pruned:
            history, pruned = [EpochMetrics(**row) for row in progress.rows], True
        progress.flush()  # the last epoch's files
        return history, pruned
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or disk_full(err):
            progress.mark_incomplete()
        raise


def _summarize(
    job: Job, progress: _Progress, history: list[EpochMetrics], started: float, pruned: bool = False
) -> dict[str, Any]:
    """The finished job's summary.json: how it ended, its numbers (on the test split: the final model's, whose
    predictions it writes to predictions.npz), its time."""
    run, last = job.run, history[-1]
    status, chance_acc = _ending(job, last, pruned)
    test = job.data.test
    test_loss, predicted = predict(job.model, test, job.data, job.compute)
    test_acc = 100.0 * (predicted == test.labels).sum().item() / len(test)
    write_predictions(progress.job_dir, predicted.cpu().numpy(), test.labels.cpu().numpy())
    best = max(history, key=lambda m: m.val_acc)
    return {
        "status": status,
        "epochs_completed": len(history),
        "epochs": run.epochs,
        "diverged_epoch": last.epoch if status == Status.DIVERGED else None,
        "final_val_acc": last.val_acc,
        "final_val_loss": last.val_loss,
        "best_val_acc": best.val_acc,
        "best_epoch": best.epoch,
        "final_train_loss": last.train_loss,
        "final_train_acc": last.train_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_images": len(job.data.train),  # dataset.train_size, or the training split less the validation
        "test_images": len(job.data.test),  # one image is 100 / test_images points: the resolution of test_acc
        "classes": job.data.num_classes,
        "chance_acc": chance_acc,  # validation accuracy of always naming the largest class: where `stalled` is judged
        "params": job.params,
        "sec_per_epoch": sum(m.epoch_seconds for m in history) / len(history),
        "wall_seconds": time.perf_counter() - started,
        "resumed_from_epoch": progress.resumed_from,
        "diverge_loss": job.diverge_loss,  # the training loss above which this job counts as diverged (null: none)
        # Whether norm and bias parameters were decayed, and how many scalars weight decay left alone.
        "decay_norm_and_bias": run.optimizer.decay_norm_and_bias,
        "no_decay_params": 0 if run.optimizer.decay_norm_and_bias else sum(p.numel() for p in no_decay(job.model)),
        **progress.provenance,
    }


def _ending(job: Job, last: EpochMetrics, pruned: bool = False) -> tuple[Status, float]:
    """How the finished training ended (completed, diverged, stalled or pruned: the log says why), and the
    validation accuracy of a model that learned nothing (Job.chance_acc)."""
    chance_acc = job.chance_acc
    if pruned:
        log.info(
            "pruned after epoch %d/%d: val_acc %.2f%% cannot catch up with the study's better trials at this epoch; "
            "stopped there (a result of the search, kept)",
            last.epoch,
            job.run.epochs,
            last.val_acc,
        )
        return Status.PRUNED, chance_acc
    if last.diverged(job.diverge_loss):
        if not last.finite:
            log.warning(
                "diverged: the loss is not finite in epoch %d (train_loss %s, val_loss %s); stopped there",
                last.epoch,
                last.train_loss,
                last.val_loss,
            )
        else:
            log.warning(
                "diverged: train_loss %.4g in epoch %d exceeds diverge_loss=%.4g; stopped there",
                last.train_loss,
                last.epoch,
                job.diverge_loss,
            )
        return Status.DIVERGED, chance_acc
    classes = job.data.num_classes
    steps = last.epoch * math.ceil(len(job.data.train) / job.run.batch_size)
    if steps >= STALL_MIN_STEPS and last.at_chance(classes, chance_acc):
        log.warning(
            "stalled: train_loss %.4f is still about ln(%d) = %.4f, the loss of a uniform guess, and val_acc %.2f%% is "
            "at chance (%.2f%%, the largest class): the model learned nothing; diagnostics.csv's grad_norm shows "
            "whether any gradient reaches the norm layers",
            last.train_loss,
            classes,
            math.log(classes),
            last.val_acc,
            chance_acc,
        )
        return Status.STALLED, chance_acc
    return Status.COMPLETED, chance_acc
