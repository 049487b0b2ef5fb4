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
    c, h, w = data.shape
    model = build_model(run.model_name, run.model, c, (h, w), data.num_classes, norm_factory(run.norm, run.model_name))
    params = sum(p.numel() for p in model.parameters())
    log.info(
        f"device {device} | model={run.model_name} norm={run.norm.name} optimizer={run.optimizer.name} "
        f"lr={run.optimizer.lr:g} | {run.dataset.name}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {c}x{h}x{w}, {data.num_classes} classes | {params} parameters"
    )
    data, model = data.to(device), model.to(device)
    rows: list[dict[str, Any]] = []

    def record(m: EpochMetrics) -> None:
        rows.append(asdict(m))
        write_metrics(job_dir, rows)
        log.info(
            f"Epoch {m.epoch}/{run.epochs} train_loss {m.train_loss:.4f} train_acc {m.train_acc:.2f}% "
            f"val_loss {m.val_loss:.4f} val_acc {m.val_acc:.2f}% ({m.epoch_seconds:.2f} s, "
            f"{m.images_per_second:.0f} img/s)"
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
