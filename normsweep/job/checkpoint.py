"""A job's per-epoch checkpoint: written atomically, read back on the CPU to resume."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from normsweep.config.errors import ConfigError
from normsweep.sweep.files import CHECKPOINT_FILE, atomic_write


def save_checkpoint(job_dir: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(job_dir) / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(job_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint of a job folder (tensors on the CPU), or None when it has none."""
    path = Path(job_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"{path} cannot be read ({str(err).splitlines()[0]}); delete it to train this job again from epoch 1"
        ) from None
