"""A sweep's job in the log: `[job N overrides]` before each of its lines, naming the keys its sweep varies."""

from __future__ import annotations

import contextlib
import logging
import os

from normsweep.sweep.compose import SWEPT_KEYS_ENV
from normsweep.sweep.files import override_key


class JobTag(logging.Filter):
    """Puts `[job N overrides]` before every log line of a sweep's job, so that the lines of jobs run side by
    side (joblib) tell which job they come from. On the root logger's handlers, for as long as the job runs."""

    def __init__(self, num: int, overrides: list[str]) -> None:
        super().__init__()
        self.tag = f"[job {num}{''.join(' ' + o for o in overrides)}]"

    def filter(self, record: logging.LogRecord) -> bool:
        # Once, though it passes through several handlers; a line of the sweep's own (sweep/progress.py) is given an
        # empty tag, and stays as it is.
        if getattr(record, "job_tag", None) is None:
            with contextlib.suppress(Exception):  # a malformed message stays as it is, for logging to report
                record.msg, record.args, record.job_tag = f"{self.tag} {record.getMessage()}", (), self.tag
        return True

    def attach(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)

    def detach(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)


def job_swept_keys(overrides: list[str], in_sweep: bool) -> tuple[str, ...]:
    """The keys the job's sweep varies (what its launcher said, sweep/compose.py); those of all its overrides when
    not said (a job launched otherwise) or for a single run (which a sweep's environment does not describe)."""
    swept = os.environ.get(SWEPT_KEYS_ENV) if in_sweep else None
    keys = [override_key(o) for o in overrides] if swept is None else swept.split(",")
    return tuple(sorted(set(keys) - {""}))


def telling_apart(overrides: list[str]) -> list[str]:
    """A job's overrides of the keys its sweep varies: what tells its log lines from the other jobs'."""
    keys = set(job_swept_keys(overrides, in_sweep=True))  # only a sweep's jobs are tagged
    return [o for o in overrides if override_key(o) in keys]
