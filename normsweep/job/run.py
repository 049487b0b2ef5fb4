"""One training job in its folder: data + model → train loop → metrics.csv, checkpoint.pt and summary.json.

A job resumes whatever its folder holds: a finished job is kept as it is, a stopped one continues from its last
checkpoint, and a folder holding another job is refused before anything in it changes.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from normsweep.config.schema import Config
from normsweep.job import data as datasets
from normsweep.job.checkpoint import load_checkpoint, save_checkpoint
from normsweep.job.diagnostics import Diagnostics
from normsweep.job.layers import norm_factory
from normsweep.job.models import build_model
from normsweep.job.optim import no_decay
from normsweep.job.placement import available_cpus
from normsweep.job.threads import ThreadChoice, busy_cpus, choose_threads, describe, step_macs
from normsweep.job.train import (
    EpochMetrics,
    describe_hardware,
    diverge_limit,
    evaluate,
    fit,
    resolve_compute,
    resolve_device,
)
from normsweep.sweep.files import (
    DIAGNOSTICS_FILE,
    FINISHED,
    Status,
    read_diagnostics,
    write_diagnostics,
    write_metrics,
    write_summary,
)
from normsweep.sweep.liveness import load_summary, process_start, slurm_job

log = logging.getLogger("normsweep")


def run_job(
    run: Config, job_dir: Path, overrides: list[str], config: dict[str, Any], cpus: int | None = None
) -> dict[str, Any]:
    """Train one configuration in `job_dir`, or finish it there; returns its summary. `cpus`: the job's share of the
    CPUs when jobs run side by side (default: every CPU it may run on); `threads=0` picks within it (threads.py).

    `config` is the job's resolved config as the user wrote it: summary.json keeps it, and a later run in the
    same folder must bring the same one (the caller checks the folder first, with resume.check_resumable).
    """
    started = time.perf_counter()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    previous = load_summary(job_dir)
    if previous["status"] in FINISHED:
        log.info(
            "%s: kept from an earlier run (%s, %d epoch%s, val_acc %.2f%%)",
            job_dir,
            previous["status"],
            previous.get("epochs_completed", 0),
            "" if previous.get("epochs_completed") == 1 else "s",
            previous.get("final_val_acc", float("nan")),
        )
        return previous

    device = resolve_device(run.device)
    torch.set_num_threads(run.threads or cpus or available_cpus())  # until the choice below
    data = datasets.load(run.dataset, run.val_fraction, run.seed)
    torch.manual_seed(run.seed)
    c, h, w = data.shape
    model_name = run.model["name"]
    factory = norm_factory(run.norm, model_name)
    model = build_model(model_name, run.model, c, (h, w), data.num_classes, factory)
    compute = resolve_compute(run.precision, run.channels_last, run.compile, model, device)
    choice = _threads(run, cpus or available_cpus(), model, data.shape, device, previous)
    threads = choice.threads
    torch.set_num_threads(threads)
    busy_line = describe(choice, available_cpus())
    if busy_line:
        log.info(busy_line)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        f"device {device} ({threads} CPU thread{'s' if threads > 1 else ''}, {compute.precision}"
        f"{', channels_last' if compute.channels_last else ''}{', compiled' if compute.compile else ''}) | "
        f"model={model_name} norm={run.norm.name} optimizer={run.optimizer.name} "
        f"lr={run.optimizer.lr:g} | {run.dataset.name}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {c}x{h}x{w}, {data.num_classes} classes | {params} parameters"
    )
    data, model = data.to(device), model.to(device)
    diverge_loss = diverge_limit(run.diverge_loss, data.num_classes)

    state = load_checkpoint(job_dir)
    resumed_from = state["epoch"] if state else 0
    rows: list[dict[str, Any]] = list(state["history"]) if state else []
    if state:
        log.info("resuming from the checkpoint of epoch %d/%d in %s", resumed_from, run.epochs, job_dir)
        write_metrics(job_dir, rows)  # drops any row written after that checkpoint
    diagnostics_rows = read_diagnostics(job_dir, resumed_from)  # the same for diagnostics.csv
    if diagnostics_rows or (job_dir / DIAGNOSTICS_FILE).is_file():
        write_diagnostics(job_dir, diagnostics_rows)
    probe = None
    if run.diagnostics:  # a resumed run's first update_ratio starts from its checkpoint's weights
        start = state["model"] if state else None
        probe = Diagnostics(model, factory.slots(model), data, run.batch_size, run.seed, compute, start=start)
    identity = {
        "seed": run.seed,
        "model": model_name,
        "norm": run.norm.name,
        "optimizer": run.optimizer.name,
        "dataset": run.dataset.name,
        "overrides": overrides,
        "config": config,
    }
    process = {
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "device": str(device),
        "slurm_job": slurm_job(os.environ),  # as squeue shows it; a requeued job keeps it and may resume itself
        "hardware": describe_hardware(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": threads,
        "threads_why": choice.reason,  # threads=N, or what decided threads=0
        "precision": compute.precision,
        "channels_last": compute.channels_last,
    }

    def mark(status: Status, epochs_completed: int) -> None:  # the summary of a job not (yet) finished
        write_summary(
            job_dir,
            {"status": status, "epochs_completed": epochs_completed, "epochs": run.epochs, **process, **identity},
        )

    mark(Status.RUNNING, resumed_from)

    def record(m: EpochMetrics, snapshot: Any) -> None:
        if probe is not None:  # before the checkpoint: a resume from the one before drops this epoch's rows
            write_diagnostics(job_dir, diagnostics_rows)
        if not m.diverged(diverge_loss):  # the checkpoint first: a kill between the two files loses nothing
            save_checkpoint(job_dir, snapshot())
        rows.append(asdict(m))
        write_metrics(job_dir, rows)
        log.info(
            f"Epoch {m.epoch}/{run.epochs} train_loss {m.train_loss:.4f} train_acc {m.train_acc:.2f}% "
            f"val_loss {m.val_loss:.4f} val_acc {m.val_acc:.2f}% ({m.epoch_seconds:.2f} s, "
            f"{m.images_per_second:.0f} img/s)"
        )

    try:
        history = fit(
            model,
            data,
            run.optimizer,
            run.epochs,
            run.batch_size,
            run.seed,
            record,
            state=state,
            compute=compute,
            diverge_loss=diverge_loss,
            diagnose=(lambda epoch: diagnostics_rows.extend(probe.measure(epoch))) if probe else None,
        )
    except KeyboardInterrupt:
        mark(Status.INCOMPLETE, len(rows))
        raise
    last = history[-1]
    diverged = last.diverged(diverge_loss)
    if diverged and not last.finite:
        log.warning(
            "diverged: the loss is not finite in epoch %d (train_loss %s, val_loss %s); stopped there",
            last.epoch,
            last.train_loss,
            last.val_loss,
        )
    elif diverged:
        log.warning(
            "diverged: train_loss %.4g in epoch %d exceeds diverge_loss=%.4g; stopped there",
            last.train_loss,
            last.epoch,
            diverge_loss,
        )
    test_loss, test_acc = evaluate(model, data.test, data, compute)
    best = max(history, key=lambda m: m.val_acc)
    summary = {
        "status": Status.DIVERGED if diverged else Status.COMPLETED,
        "epochs_completed": len(history),
        "epochs": run.epochs,
        "diverged_epoch": last.epoch if diverged else None,
        "final_val_acc": last.val_acc,
        "final_val_loss": last.val_loss,
        "best_val_acc": best.val_acc,
        "best_epoch": best.epoch,
        "final_train_loss": last.train_loss,
        "final_train_acc": last.train_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "test_images": len(data.test),  # one image is 100 / test_images points: the resolution of test_acc
        "params": params,
        "sec_per_epoch": sum(m.epoch_seconds for m in history) / len(history),
        "wall_seconds": time.perf_counter() - started,
        "resumed_from_epoch": resumed_from,
        "diverge_loss": diverge_loss,  # the training loss above which this job counts as diverged (null: none)
        # Whether norm and bias parameters were decayed, and how many scalars weight decay left alone.
        "decay_norm_and_bias": run.optimizer.decay_norm_and_bias,
        "no_decay_params": 0 if run.optimizer.decay_norm_and_bias else sum(p.numel() for p in no_decay(model)),
        **process,
        **identity,
    }
    write_summary(job_dir, summary)
    log.info("test_acc %.2f%% test_loss %.4f (final model, %d test images)", test_acc, test_loss, len(data.test))
    return summary


def _threads(
    run: Config, budget: int, model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, previous: dict
) -> ThreadChoice:
    """The job's CPU threads (threads.py). A job resumed with threads=0 keeps the count it started with: the rest of
    its epochs give the numbers they would have given, even on a node with more CPUs."""
    if run.threads or device.type != "cpu":
        return choose_threads(run.threads, budget, None)
    if previous.get("threads") and previous.get("epochs_completed"):
        return ThreadChoice(int(previous["threads"]), "as before the resume", busy_cpus(seconds=0.05))
    try:
        macs = step_macs(model, shape, run.batch_size)
    except Exception:  # a model that fails on blank images fails in training, with the error said there
        macs = None
    return choose_threads(0, budget, macs, busy_cpus(seconds=0.05))
