"""`python -m normsweep ARGS` in a process of its own, forked from one that has already imported what a run
imports (torch, Hydra, normsweep's command line, pandas and matplotlib): conftest.run_cli's way to start a run.

The suite is CPU-bound on a 2-core machine, and a fresh interpreter spends 2-3 CPU-seconds importing before its
first line of work, once per command a test runs. Forked from multiprocessing's fork server, whose process
imported this module once, a command starts in milliseconds and is otherwise what a user's is: a process of its
own (its own pid, exit status, signals, stdout and stderr, environment, working folder and `sys.path[0]`), running
`normsweep/__main__.py` as `__main__`, whose Hydra, callbacks and job state start fresh (the fork server never ran
any of it). What it cannot show is a fresh interpreter's imports: tests about those (tests/test_startup.py, the
installed wheel's run in tests/test_install.py, test_mlflow's import check) start `python` themselves.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import multiprocessing.process
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

# What every command imports before its first job, and what the end of a sweep imports and loads (pandas,
# matplotlib with its fonts: results/warm.py's warm_up), imported once, here, in the fork server. With those
# imported a sweep aggregates in its own process, as run_cli_here's do, instead of starting a warm process to do it
# (sweep/callbacks.py): that process's way is run end to end by the installed wheel's sweep (tests/test_install.py,
# a new interpreter) and tested in tests/test_results.py.
import hydra  # noqa: F401
import torch  # noqa: F401

import normsweep.cli  # noqa: F401
import normsweep.job.run  # noqa: F401
import normsweep.results.write  # noqa: F401
from normsweep.results.warm import warm_up

warm_up()


def run_module(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str | None) -> None:
    """The forked process: as `python -m MODULE ARGS` started in `cwd` with `env`, its stdout written to the file
    `out` and its stderr to `err` (None: to `out` as well); its exit status is the interpreter's for the same
    ending."""
    # A user's process is the main one: no multiprocessing parent (a joblib worker's Ctrl-C is said otherwise,
    # cli.py), and its own name.
    multiprocessing.process._parent_process = None  # type: ignore[attr-defined]
    this = multiprocessing.current_process()
    this._name, this._parent_pid, this._parent_name = "MainProcess", None, None  # type: ignore[attr-defined]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        if path is None:
            os.dup2(1, 2)  # one file, one offset: the lines in the order they were written
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)  # noqa: SIM115 (PYTHONUNBUFFERED)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace")  # noqa: SIM115
    sys.argv = [module, *args]
    sys.path.insert(0, str(Path(cwd).resolve()))
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _end(130, signal.SIGINT)  # as the interpreter ends on an uncaught Ctrl-C: killed by SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    _end(code)


def _end(code: int, sig: signal.Signals | None = None) -> None:
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if sig is not None:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(code)
