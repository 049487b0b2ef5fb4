"""One training job from a validated config: data + model → train loop → metrics.csv and summary.json."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from normsweep import data as datasets
from normsweep.config import RunConfig
from normsweep.models import build_model
from normsweep.norms import norm_factory
from normsweep.results import write_metrics, write_summary
from normsweep.train import EpochMetrics, evaluate, fit, resolve_device

log = logging.getLogger("normsweep")


def run_job(run: RunConfig, job_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one configuration, writing metrics.csv after every epoch and summary.json at the end."""
    started = time.perf_counter()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(run.device)
    data = datasets.load(run.dataset, run.val_fraction, run.seed)
    torch.manual_seed(run.seed)
    model = build_model(
        run.model_name,
        run.model,
        *data.shape[:1],
        data.shape[1:],
        data.num_classes,
        norm_factory(run.norm, run.model_name),
    )
    params = sum(p.numel() for p in model.parameters())
    c, h, w = data.shape
    log.info(
        "device %s | model=%s norm=%s optimizer=%s lr=%g | %s: %d train / %d val / %d test images, %dx%dx%d, "
        "%d classes | %d parameters",
        device,
        run.model_name,
        run.norm.name,
        run.optimizer.name,
        run.optimizer.lr,
        run.dataset.name,
        len(data.train),
        len(data.val),
        len(data.test),
        c,
        h,
        w,
        data.num_classes,
        params,
    )
    data, model = data.to(device), model.to(device)
    rows: list[dict[str, Any]] = []

    def record(m: EpochMetrics) -> None:
        rows.append(asdict(m))
        write_metrics(job_dir, rows)
        log.info(
            "Epoch %d/%d train_loss %.4f train_acc %.2f%% val_loss %.4f val_acc %.2f%% (%.2f s, %.0f img/s)",
            m.epoch,
            run.epochs,
            m.train_loss,
            m.train_acc,
            m.val_loss,
            m.val_acc,
            m.epoch_seconds,
            m.images_per_second,
        )

    history = fit(model, data, run.optimizer, run.epochs, run.batch_size, run.seed, on_epoch=record)
    test_loss, test_acc = evaluate(model, data.test, data)
    best = max(history, key=lambda m: m.val_acc)
    last = history[-1]
    summary = {
        "status": "completed",
        "epochs_completed": len(history),
        "epochs": run.epochs,
        "final_val_acc": last.val_acc,
        "final_val_loss": last.val_loss,
        "best_val_acc": best.val_acc,
        "best_epoch": best.epoch,
        "final_train_loss": last.train_loss,
        "final_train_acc": last.train_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "params": params,
        "device": str(device),
        "sec_per_epoch": sum(m.epoch_seconds for m in history) / len(history),
        "wall_seconds": time.perf_counter() - started,
        "seed": run.seed,
        "model": run.model_name,
        "norm": run.norm.name,
        "optimizer": run.optimizer.name,
        "dataset": run.dataset.name,
        "overrides": overrides,
    }
    write_summary(job_dir, summary)
    log.info("test_acc %.2f%% test_loss %.4f (final model, %d test images)", test_acc, test_loss, len(data.test))
    return summary
