"""A job's per-epoch checkpoint, and the one before it: written atomically, read back on the CPU to resume."""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from normsweep.config.errors import ConfigError
from normsweep.sweep.files import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, atomic_write

log = logging.getLogger("normsweep")


def save_checkpoint(job_dir: Path, state: dict[str, Any], write: Callable[..., None] | None = None) -> None:
    """checkpoint.pt, and the one it replaces kept as checkpoint.prev.pt: renamed, not written again. At every instant
    one of the two is whole; metrics.csv, written after, never holds an epoch that neither has. `write`: atomic_write
    or a WriteBehind's (files.py), which keeps that order."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    job_dir = Path(job_dir)
    (write or atomic_write)(job_dir / CHECKPOINT_FILE, buffer.getvalue(), previous=job_dir / PREVIOUS_CHECKPOINT_FILE)


def load_checkpoint(job_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of a job folder that can be read (tensors on the CPU), or None when it has none.

    checkpoint.pt, else the one before it (checkpoint.prev.pt, which becomes checkpoint.pt); a file that cannot be
    read (cut short, damaged) is set aside as NAME.unreadable and a warning says so; when neither can be read, the job
    trains again from epoch 1. A file this process may not read is the user's to fix: a ConfigError names it."""
    job_dir = Path(job_dir)
    damaged: list[tuple[Path, str]] = []
    for path in (job_dir / CHECKPOINT_FILE, job_dir / PREVIOUS_CHECKPOINT_FILE):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as err:
            raise ConfigError(f"{path} cannot be read ({err.strerror or err}); make it readable to resume") from None
        except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
            damaged.append((path, reason))  # torch's first sentence: its advice goes on for four more
            continue
        _set_aside(damaged, f"resuming from the checkpoint before it (epoch {state['epoch']})")
        if path.name != CHECKPOINT_FILE:  # the next save keeps it as the one before
            os.replace(path, job_dir / CHECKPOINT_FILE)
        return state
    _set_aside(damaged, "training this job again from epoch 1")
    return None


def _set_aside(damaged: list[tuple[Path, str]], then: str) -> None:
    if not damaged:
        return
    for path, _ in damaged:
        os.replace(path, path.with_name(path.name + ".unreadable"))
    names = " and ".join(path.name for path, _ in damaged)
    log.warning(
        "%s in %s cannot be read (%s): set aside as %s; %s",
        names,
        damaged[0][0].parent,
        damaged[0][1],
        " and ".join(f"{path.name}.unreadable" for path, _ in damaged),
        then,
    )


def drop_previous(job_dir: Path) -> None:
    """A finished job is never resumed: the checkpoint before its last one goes."""
    (Path(job_dir) / PREVIOUS_CHECKPOINT_FILE).unlink(missing_ok=True)
