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

from normsweep import data as datasets
from normsweep.config import Config
from normsweep.errors import ConfigError
from normsweep.jobfiles import (
    FINISHED,
    GROUPS,
    Status,
    load_summary,
    process_start,
    slurm_job,
    write_metrics,
    write_summary,
)
from normsweep.layers import norm_factory
from normsweep.models import build_model
from normsweep.resume import load_checkpoint, save_checkpoint
from normsweep.train import (
    EpochMetrics,
    describe_hardware,
    evaluate,
    fit,
    resolve_compute,
    resolve_device,
    set_threads,
)

log = logging.getLogger("normsweep")


def run_job(run: Config, job_dir: Path, overrides: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in `job_dir`, or finish it there; returns its summary.

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
    threads = set_threads(run.threads)
    data = datasets.load(run.dataset, run.val_fraction, run.seed)
    torch.manual_seed(run.seed)
    c, h, w = data.shape
    model_name = run.model["name"]
    model = build_model(model_name, run.model, c, (h, w), data.num_classes, norm_factory(run.norm, model_name))
    compute = resolve_compute(run.precision, run.channels_last, run.compile, model, device)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        f"device {device} ({threads} CPU thread{'s' if threads > 1 else ''}, {compute.precision}"
        f"{', channels_last' if compute.channels_last else ''}{', compiled' if compute.compile else ''}) | "
        f"model={model_name} norm={run.norm.name} optimizer={run.optimizer.name} "
        f"lr={run.optimizer.lr:g} | {run.dataset.name}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {c}x{h}x{w}, {data.num_classes} classes | {params} parameters"
    )
    data, model = data.to(device), model.to(device)

    state = load_checkpoint(job_dir)
    resumed_from = state["epoch"] if state else 0
    rows: list[dict[str, Any]] = list(state["history"]) if state else []
    if state:
        log.info("resuming from the checkpoint of epoch %d/%d in %s", resumed_from, run.epochs, job_dir)
        write_metrics(job_dir, rows)  # drops any row written after that checkpoint
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
        if m.finite:  # the checkpoint first: a kill between the two files loses nothing
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
            model, data, run.optimizer, run.epochs, run.batch_size, run.seed, record, state=state, compute=compute
        )
    except KeyboardInterrupt:
        mark(Status.INCOMPLETE, len(rows))
        raise
    last = history[-1]
    diverged = not last.finite
    if diverged:
        log.warning(
            "diverged: the loss is not finite in epoch %d (train_loss %s, val_loss %s); stopped there",
            last.epoch,
            last.train_loss,
            last.val_loss,
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
        **process,
        **identity,
    }
    write_summary(job_dir, summary)
    log.info("test_acc %.2f%% test_loss %.4f (final model, %d test images)", test_acc, test_loss, len(data.test))
    return summary


def record_failure(
    job_dir: Path, error: Exception, overrides: list[str], config: dict[str, Any], choices: dict[str, str]
) -> dict[str, Any]:
    """Write summary.json for a job that raised: status `failed`, the error, and what the job was."""
    message = str(error).strip() or type(error).__name__
    if not isinstance(error, ConfigError):  # a ConfigError speaks for itself; anything else is named
        message = f"{type(error).__name__}: {message}"
    summary = {
        "status": Status.FAILED,
        "error": message,
        "seed": config.get("seed"),
        **{group: choices.get(group) for group in GROUPS},
        "host": socket.gethostname(),
        "overrides": overrides,
        "config": config,
    }
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    write_summary(job_dir, summary)
    return summary
