"""A long epoch's progress while it trains: a bar on a terminal, a line every so often in a log; nothing in a quick
epoch. Read from the training loop's step counter (train.Steps) by a thread of its own: the loop never waits for it."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from normsweep.job.train import Steps

log = logging.getLogger("normsweep")

TICK_S = 1.0  # how often the reporter reads the counter: the bar moves once a second


def on_terminal(stream: TextIO) -> bool:
    """Whether a bar can be drawn on `stream`: a terminal, and not a worker process of a launcher (joblib's), whose
    bars would be drawn over each other's."""
    return stream.isatty() and multiprocessing.parent_process() is None


def progress_line(steps: Steps, epochs: int, seconds: float) -> str:
    """`epoch 2/5: 48% (23,040/48,000 images), 31 s, ~34 s left`: how far the epoch's training is, by its counter."""
    done, total = steps.images, max(1, steps.total)
    left = f", ~{seconds * (total - done) / done:.0f} s left" if done else ""
    return f"epoch {steps.epoch}/{epochs}: {100 * done // total}% ({done:,}/{total:,} images), {seconds:.0f} s{left}"


class EpochProgress:
    """Reports an epoch's progress once it has trained `after_s` seconds: on a terminal, a tqdm bar that is gone
    when the epoch ends; elsewhere a line through the normsweep logger (which a sweep's job tags) then every
    `every_s` seconds."""

    def __init__(self, epochs: int, after_s: float, every_s: float, stream: TextIO | None = None) -> None:
        self.epochs, self.after_s, self.every_s = epochs, after_s, every_s
        self.stream = stream or sys.stderr

    @contextmanager
    def watch(self, steps: Steps) -> Iterator[None]:
        """Report `steps` while the block trains; stopped, and its bar closed, when the block ends, however."""
        stop = threading.Event()
        reporter = threading.Thread(target=self._report, args=(steps, stop), name="normsweep-progress", daemon=True)
        reporter.start()
        try:
            yield
        finally:
            stop.set()
            reporter.join()

    def _report(self, steps: Steps, stop: threading.Event) -> None:
        start = time.perf_counter()
        if stop.wait(self.after_s):  # a quick epoch: nothing to say
            return
        if on_terminal(self.stream):
            self._bar(steps, stop)
            return
        while True:
            log.info(progress_line(steps, self.epochs, time.perf_counter() - start))
            if stop.wait(self.every_s):
                return

    def _bar(self, steps: Steps, stop: threading.Event) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=steps.total,
            initial=steps.images,
            desc=f"epoch {steps.epoch}/{self.epochs}",
            unit="img",
            unit_scale=True,
            leave=False,  # the epoch's line says the rest
            file=self.stream,
            dynamic_ncols=True,
        )
        try:
            while not stop.wait(TICK_S):
                bar.update(steps.images - bar.n)
        finally:
            bar.close()
