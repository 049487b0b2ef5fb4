"""The end-of-sweep aggregation in a process of its own, started with the sweep: pandas, matplotlib and the tables
are imported while the jobs train (on another core), not after the last one. The launcher sends one line, the
sweep folder and the compared axis; what the aggregation prints and logs comes back tagged, one line each, for the
launcher to say in its own streams and log (sweep/callbacks.py); its exit status is the aggregation's."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

OUT, ERR, LOG = "O", "E", "L"  # the tag before each line sent back: stdout, stderr, a log record (level first)


class _Tagged(io.TextIOBase):
    """A text stream that sends every complete line to the real stdout behind its tag."""

    def __init__(self, tag: str, sink: io.TextIOBase) -> None:
        self.tag, self.sink, self.pending = tag, sink, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.sink.write(f"{self.tag}{line}\n")
        return len(text)

    def flush(self) -> None:
        self.sink.flush()


class _Relay(logging.Handler):
    def __init__(self, sink: io.TextIOBase) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        for line in record.getMessage().splitlines() or [""]:
            self.sink.write(f"{LOG}{record.levelno} {line}\n")
        self.sink.flush()


def warm_up() -> None:
    """Import what the aggregation imports only when it runs (matplotlib.pyplot, scipy.special: plots.py and
    tables.py keep them out of `python -m normsweep.aggregate --help`) and draw one small figure with the elements
    the real ones have, so that the fonts, the constrained layout and the PNG writer are loaded too. Measured: the
    first aggregation in a process took about twice as long as the next one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scipy.special  # noqa: F401  (the t-test's and the intervals' distributions, in tables.py)

    fig, (ax, other) = plt.subplots(1, 2, figsize=(3, 2), layout="constrained")
    ax.plot([1, 2], [0, 1], label="a")
    ax.fill_between([1, 2], [0, 1], [1, 2], alpha=0.2)
    other.errorbar([1, 2], [0, 1], yerr=[0.5, 0.5], marker="o", capsize=2)
    other.set_xscale("log")
    ax.set_title("title", fontsize="medium")
    ax.set_xlabel("epoch")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    fig.suptitle("warm-up", fontsize="medium")
    fig.savefig(io.BytesIO(), format="png", dpi=40)
    plt.close(fig)


def main() -> int:
    # Ctrl-C is the launcher's to handle (it says how to resume); this process ends when the launcher does, as its
    # stdin then closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from normsweep.results.write import end_of_sweep
    from normsweep.sweep.files import DiskFull, disk_full, full_disk_line

    warm_up()
    request = sys.stdin.readline()
    if not request:
        return 0
    sweep_dir, compare = json.loads(request)
    sink = sys.stdout
    sys.stdout, sys.stderr = _Tagged(OUT, sink), _Tagged(ERR, sink)
    logging.getLogger("normsweep").addHandler(_Relay(sink))
    logging.getLogger("normsweep").propagate = False
    try:
        end_of_sweep(Path(sweep_dir), compare, side_by_side=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except Exception as err:
        if disk_full(err):  # the sweep's own line for it, as the launcher says it (cli.stop_on_full_disk)
            print(full_disk_line(err, sweep_dir, sweep=True), file=sys.stderr)
            code = DiskFull.status
        else:  # a bug stays loud: its traceback goes back with the rest
            traceback.print_exc()
            code = 1
    for stream in (sys.stdout, sys.stderr):
        if stream.pending:  # a last line without its newline
            stream.write("\n")
    sink.flush()
    return code


if __name__ == "__main__":
    status = main()
    sys.__stdout__.flush()
    # Without the interpreter's teardown of pandas, matplotlib and scipy (measured: a quarter of a second the
    # launcher would wait for): every file was written and every line sent.
    os._exit(status)
