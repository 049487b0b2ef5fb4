"""Shared fixtures: Hydra composition, and small data sets written in torchvision's official on-disk layouts."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import io
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from normsweep.config import hydra_compat
from normsweep.config.schema import config_dir, register_configs

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal delivers it, whatever started the suite. A shell without job control (a script, a CI
    step) starts a command put in the background with `&` with SIGINT ignored, an ignored signal stays ignored in
    every process started from it, and Python then installs no Ctrl-C handler: the tests that press Ctrl-C on a
    sweep would see it trained to the end. With a handler here (in pytest and in each xdist worker), the processes
    the tests start get SIGINT's default, as a user's terminal gives it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that runs normsweep's command line (run_cli, run_cli_here, subprocess), or whose fixtures do, is
    `slow`: `pytest -m "not slow"` leaves them out and answers in under a minute. Tests that train for seconds
    in-process carry the mark themselves.

    Groups for pytest-xdist (`--dist loadgroup`): the tests on the SLURM cluster share one worker (one node, whose
    queue each of them expects to itself); so do the tests that read one module- or session-scoped sweep, which
    each worker would otherwise launch again."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        functions = [getattr(item, "function", None)]  # the test, and the fixtures it uses
        info = getattr(item, "_fixtureinfo", None)
        shared = []
        for name, definitions in info.name2fixturedefs.items() if info else ():
            functions += [definition.func for definition in definitions]
            shared += [
                f"{Path(inspect.getsourcefile(definition.func) or '').stem}.{name}"
                for definition in definitions
                if definition.scope in ("module", "session")
                and not _foreign(definition.func)
                and _launches(inspect.getsource(definition.func))
            ]
        sources = [inspect.getsource(f) for f in functions if f is not None and not _foreign(f)]
        if any(_launches(source) for source in sources):
            item.add_marker(pytest.mark.slow)
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(shared[0]))
        group = item.get_closest_marker("xdist_group")
        loadgroup = config.getoption("dist", None) == "loadgroup" or config.getoption("loadgroup", False)
        if group and loadgroup and hasattr(item, "_id") and not hasattr(item, "_nodeid"):
            # pytest-xdist 3.8 groups by the suffix `@group` it writes into `item._nodeid`, which pytest 9 no longer
            # reads (it keeps the id in `item._id`): without this every test would be scheduled on its own.
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(f"{item.nodeid}@{group.args[0]}")


def _launches(source: str) -> bool:
    return any(call in source for call in ("run_cli(", "run_cli_here(", "_popen(", "subprocess."))


def _foreign(function) -> bool:
    """A fixture of pytest's or a plugin's, not of this test suite."""
    return not str(inspect.getsourcefile(function) or "").startswith(str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _keep_environment():
    """Code under test may set environment variables (a sweeper tells its jobs the swept keys and how many run at
    once); the next test starts from the environment before."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Code under test may set torch's thread count (a job does); the next test starts from the original one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg():
    """compose_cfg(["norm=gn", ...]) → the composed DictConfig, as `python -m normsweep` would see it."""
    register_configs()

    def _compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), **hydra_compat.version_base()):
            return compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


NORMS = ["none", "bn", "ln", "in", "gn"]  # the quickstart's five (the article's), as the README runs them


@pytest.fixture(scope="session")
def five_norm_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The quickstart's sweep with two seeds and two epochs, run once (as a user runs it) for the tests that read
    what it wrote and printed: (its folder, the finished process)."""
    cwd = tmp_path_factory.mktemp("user")
    sweep = cwd / "sweep"
    proc = run_cli(["-m", f"norm={','.join(NORMS)}", "seed=0,1", "epochs=2", f"hydra.sweep.dir={sweep}"], cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep, proc


def run_cli(args: list[str], cwd: Path, timeout: float = 240, module: str = "normsweep") -> subprocess.CompletedProcess:
    """Run `python -m normsweep ARGS` in a process of its own, as a user would (forked from one that has imported
    torch, Hydra and normsweep's command line once: tests/forked_cli.py). Tests about a new interpreter's imports
    start `python` themselves (tests/test_startup.py)."""
    run = start_cli(args, cwd, module, separate_stderr=True)
    try:
        run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
        raise subprocess.TimeoutExpired([module, *args], timeout, run.output, run.errors) from None
    return subprocess.CompletedProcess(["python", "-m", module, *args], run.returncode, run.output, run.errors)


class ForkedRun:
    """A started `python -m MODULE ARGS` (start_cli), used as a subprocess.Popen with stdout=PIPE and
    stderr=STDOUT is: pid, poll(), wait(), send_signal(), kill(), communicate() (its output as bytes)."""

    def __init__(self, process, folder: Path, separate_stderr: bool) -> None:
        self.process, self.folder = process, folder
        self.out, self.err = folder / "out", (folder / "err" if separate_stderr else None)
        self.pid: int = process.pid
        self.output = self.errors = ""

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        if self.folder.is_dir():  # what it wrote, read once it has ended; the files go
            self.output, self.errors = _read(self.out), _read(self.err)
            shutil.rmtree(self.folder)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[bytes, None]:
        self.wait(timeout)
        return self.output.encode(), None


def start_cli(args: list[str], cwd: Path, module: str = "normsweep", separate_stderr: bool = False) -> ForkedRun:
    """`python -m MODULE ARGS` started in `cwd`, forked from the fork server (tests/forked_cli.py); its stderr in
    its stdout unless `separate_stderr`. What it writes goes to files in a folder of its own until it has ended."""
    import tempfile

    import forked_cli

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    folder = Path(tempfile.mkdtemp(prefix="normsweep-run-"))
    out, err = folder / "out", (str(folder / "err") if separate_stderr else None)
    process = _fork_server().Process(target=forked_cli.run_module, args=(module, args, str(cwd), env, str(out), err))
    process.start()
    return ForkedRun(process, folder, separate_stderr)


def _read(path: Path | None) -> str:
    """What a run wrote to `path`; nothing when it died before it began."""
    return path.read_text() if path is not None and path.is_file() else ""


_FORK_SERVER = None


def _fork_server():
    """multiprocessing's fork server for this test process, its process having imported tests/forked_cli.py (the
    folder of the tests on its path: the server imports what it preloads before it takes the parent's sys.path)."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        import multiprocessing.forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["forked_cli"])
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), *([path] if path else [])])
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if path is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = path
        _FORK_SERVER = context
    return _FORK_SERVER


def run_cli_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m normsweep ARGS` run in this process: the same main(), Hydra, jobs, aggregation and exit status,
    without a new process's seconds-long start (importing torch, pandas, matplotlib), which is most of a small
    job's time. Its output is what it writes through sys.stdout and sys.stderr (print, logging), which is all a run
    with Hydra's basic launcher writes. As `python -m` does, the working folder comes first on sys.path (a user's
    own norm or model module beside their configs); the modules imported from it are forgotten afterwards.
    For tests that read a run's files and lines. What only a process shows stays tested by run_cli: every exit
    status, signals (Ctrl-C, SIGTERM, a kill), the console entry, and the joblib, submitit and SLURM launchers."""
    from normsweep import cli
    from normsweep.sweep.callbacks import ResumeCheck

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    saved_loggers = [(lg, lg.level, lg.disabled, lg.propagate, lg.handlers[:]) for lg in loggers]
    saved = (sys.argv, os.getcwd(), ResumeCheck.made, ResumeCheck.run_dir, ResumeCheck.sweep_dir, dict(os.environ))
    saved_path, modules_before, warnoptions = sys.path[:], set(sys.modules), sys.warnoptions[:]
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        os.chdir(cwd)
        sys.path.insert(0, str(Path(cwd).resolve()))
        sys.argv = ["normsweep", *args]
        os.environ.pop("HYDRA_FULL_ERROR", None)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exit_:
                code = exit_.code
                if isinstance(code, str):  # as the interpreter prints it
                    print(code, file=sys.stderr)
    finally:
        GlobalHydra.instance().clear()
        sys.argv, cwd_before, ResumeCheck.made, ResumeCheck.run_dir, ResumeCheck.sweep_dir, environ = saved
        sys.path[:], sys.warnoptions[:] = saved_path, warnoptions
        here = Path(cwd).resolve()
        for name in set(sys.modules) - modules_before:  # a user's module: the next test may bring its own of that name
            if Path(getattr(sys.modules[name], "__file__", None) or "/").resolve().is_relative_to(here):
                del sys.modules[name]
        os.chdir(cwd_before)
        os.environ.clear()  # what the run set (a sweep tells its jobs how many run at once) is not for the next
        os.environ.update(environ)
        # Hydra configured logging for the run: its handlers (the console, the run's log file) go, the ones before
        # (pytest's) come back.
        before = {id(handler) for *_, handlers in saved_loggers for handler in handlers}
        for logger in [logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)]:
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
                if id(handler) not in before:
                    handler.close()
        for logger, level, disabled, propagate, handlers in saved_loggers:
            logger.setLevel(level)
            logger.disabled, logger.propagate = disabled, propagate
            for handler in handlers:
                logger.addHandler(handler)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)  # as the interpreter exits
    return subprocess.CompletedProcess(["normsweep", *args], returncode, out.getvalue(), err.getvalue())


def _pattern_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images whose brightness depends on the label, so a model can tell classes apart."""
    noise = rng.integers(0, 60, size=(len(labels), *shape))
    return np.clip(noise + (labels.reshape(-1, *[1] * len(shape)) * 19), 0, 255).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _pattern_images(rng, labels, (28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    # The download also leaves the .gz archives; the loader reads the extracted files.
    for f in list(raw.iterdir()):
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, hundred: bool = False, per_file: int = 30) -> None:
    """CIFAR-10/100 python pickles, and torchvision's md5 table pointed at them."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(1)
    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    files = [name for name, _ in cls.train_list + cls.test_list]
    for name in files:
        labels = rng.integers(0, classes, size=per_file)
        images = _pattern_images(rng, labels % 10, (3, 32, 32)).reshape(per_file, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, label_key: labels.tolist()}, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def make_svhn(root: Path, monkeypatch: pytest.MonkeyPatch, n: int = 60) -> None:
    """SVHN's .mat files (X: 32x32x3xN, y: labels 1..10 where 10 means digit 0), md5 table pointed at them."""
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for split, (url, filename, _) in tvd.SVHN.split_list.items():
        labels = rng.integers(1, 11, size=n)
        images = _pattern_images(rng, labels % 10, (32, 32, 3)).transpose(1, 2, 3, 0)
        scipy.io.savemat(root / filename, {"X": images, "y": labels.reshape(-1, 1).astype(np.uint8)})
        table[split] = [url, filename, _md5(root / filename)]
    monkeypatch.setattr(tvd.SVHN, "split_list", table)
