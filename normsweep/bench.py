"""`python -m normsweep.bench`: training images per second of the article's loop, normsweep's trainer and a bare
compute ceiling, side by side on the same model, data, batch size, thread count and step count."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from normsweep.config.checks import compose_run, options
from normsweep.config.errors import ConfigError
from normsweep.config.optimizers import Adam
from normsweep.config.schema import Config, SyntheticConfig
from normsweep.job.build import Job, build, describe_compute
from normsweep.job.data import Data, Split, load, normalize
from normsweep.job.diagnostics import probe_size
from normsweep.job.optim import build_optimizer
from normsweep.job.placement import available_cpus
from normsweep.job.threads import choose_threads, step_macs
from normsweep.job.train import Compute, prepare, resolve_device, set_threads, train_epoch
from normsweep.sweep.files import atomic_write

VARIANTS = ("reference", "normsweep", "ceiling")
CROP_PADDING = 4  # CIFAR's augmentation, in every variant that touches data: crop with padding 4, random flip
EPOCH_IMAGES = 40_000  # CIFAR-10's training split at val_fraction 0.2: the epoch --diagnostics compares with


class ArticleDataset(torch.utils.data.Dataset):
    """The article's input pipeline: one PIL image per sample, through torchvision's transforms."""

    def __init__(self, split: Split, mean: list[float], std: list[float]) -> None:
        from torchvision import transforms

        images = split.images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants it
        self.images = images[..., 0] if images.shape[-1] == 1 else images
        self.labels = split.labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(split.images.shape[-2:], padding=CROP_PADDING),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Setup:
    model: str
    norm: str
    batch_size: int
    steps: int
    warmup: int
    device: torch.device
    precision: str
    data: Data  # on the device; its training split is exactly `steps` batches
    compile: bool = False  # normsweep and ceiling through torch.compile, as a run with compile=true

    def build(self) -> Job:
        """The job of this setting on the device: the model with this norm, from conf/ as a run builds it (every check
        of a run applies), and the compute normsweep and ceiling run in."""
        return build(self.config(), self.device, self.data).to(self.device)

    def config(self) -> Config:
        run = _composed(self.model, self.norm, self.batch_size)
        return dataclasses.replace(run, precision=self.precision, compile=self.compile)

    def rate(self, start: float) -> float:
        """Training images per second of the `steps` batches timed since `start`."""
        return self.batch_size * self.steps / (time.perf_counter() - start)

    def batches(self, n: int) -> Data:
        """The data with only the first `n` batches of its training split."""
        return dataclasses.replace(self.data, train=self.data.train[: n * self.batch_size])


@functools.cache
def _composed(model: str, norm: str, batch_size: int) -> Config:
    """The run config of a setting, composed once (Hydra's composition takes longer than a GPU's timed steps)."""
    return compose_run([f"model={model}", f"norm={norm}", f"batch_size={batch_size}"])


def _trainer(setup: Setup) -> tuple[Job, nn.Module, torch.optim.Optimizer]:
    """The setup's job, the module to call in its compute (train.prepare) and Adam at lr 1e-3 on its model."""
    job = setup.build()
    return job, prepare(job.model, job.compute), build_optimizer(job.model.parameters(), Adam(lr=1e-3))


def run_reference(setup: Setup) -> float:
    """DataLoader over PIL images with per-sample transforms, num_workers=0, fp32 in the default layout, and a
    `.item()` on the loss and the correct count after every batch: the loop most tutorials (and the article) use."""
    model = setup.build().model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cpu_split = Split(setup.data.train.images.cpu(), setup.data.train.labels.cpu())
    dataset = ArticleDataset(cpu_split, setup.data.mean.tolist(), setup.data.std.tolist())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=setup.batch_size, shuffle=True, num_workers=0, drop_last=True
    )

    def steps(n: int) -> None:
        total_loss, correct = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if i == n:
                break
            x, y = x.to(setup.device), y.to(setup.device)
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            correct += (out.argmax(1) == y).sum().item()

    steps(setup.warmup)
    start = time.perf_counter()
    steps(setup.steps)
    return setup.rate(start)


def run_normsweep(setup: Setup) -> float:
    """The project's own epoch: seeded permutation, batched crop and flip on the device, one sync at the end."""
    job, forward, optimizer = _trainer(setup)
    generator = torch.Generator(device=setup.device).manual_seed(0)
    train_epoch(forward, setup.batches(setup.warmup), optimizer, setup.batch_size, generator, job.compute)
    start = time.perf_counter()
    train_epoch(forward, setup.data, optimizer, setup.batch_size, generator, job.compute)
    return setup.rate(start)


def time_diagnostics(setup: Setup, epoch_images: int) -> float:
    """Seconds one epoch's diagnostics take (diagnostics.py, with the probe batch of an `epoch_images`-image
    training split), on the model after its warm-up steps; the first measurement warms up, the second is timed."""
    job, forward, optimizer = _trainer(setup)
    generator = torch.Generator(device=setup.device).manual_seed(0)
    probe = job.probe(images=probe_size(epoch_images))
    train_epoch(forward, setup.batches(max(1, setup.warmup)), optimizer, setup.batch_size, generator, job.compute)
    probe.measure(1)
    _sync(setup.device)
    start = time.perf_counter()
    probe.measure(2)
    _sync(setup.device)
    return time.perf_counter() - start


def run_ceiling(setup: Setup) -> float:
    """Forward, backward and step on one batch already normalized in memory, in normsweep's precision and layout:
    no data work at all, the most this hardware gives this model in that setting."""
    job, forward, optimizer = _trainer(setup)
    compute = job.compute
    x = normalize(setup.data.train.images[: setup.batch_size], setup.data, compute.memory_format)
    y = setup.data.train.labels[: setup.batch_size]

    def steps(n: int) -> None:
        for _ in range(n):
            with compute.autocast(setup.device):
                loss = nn.functional.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(setup.device)

    steps(setup.warmup)
    start = time.perf_counter()
    steps(setup.steps)
    return setup.rate(start)


RUNNERS: dict[str, Callable[[Setup], float]] = {
    "reference": run_reference,
    "normsweep": run_normsweep,
    "ceiling": run_ceiling,
}


def make_data(shape: tuple[int, int, int], batch_size: int, steps: int, device: torch.device) -> Data:
    """The `synthetic` data set (CIFAR-shaped by default), trimmed to exactly `steps` training batches."""
    n = batch_size * steps
    cfg = SyntheticConfig(
        name="synthetic", shape=list(shape), size=int(n / 0.72) + 16, test_fraction=0.1, crop_padding=CROP_PADDING
    )
    data = load(cfg, val_fraction=0.2, seed=0)
    data = dataclasses.replace(data, train=data.train[:n], hflip=True)
    return data.to(device)


def bench(
    setups: list[Setup],
    repeats: int,
    log: Callable[[str], None] = print,
    diagnostics_epoch: int | None = None,
) -> pd.DataFrame:
    """Time every variant `repeats` times per setup (one per norm), alternating their order; one row per (norm,
    variant, repeat). With `diagnostics_epoch` (training images per epoch), each repeat also times one epoch's
    diagnostics: a row of variant `diagnostics` with its `seconds`."""
    rows = []
    for setup in setups:
        norm = setup.norm
        if setup.compile:  # each norm is another graph: start from an empty cache, below dynamo's recompile limit
            import torch._dynamo

            torch._dynamo.reset()
        for repeat in range(repeats):
            # Rotate the order each repeat, so drift on a shared machine falls on every variant alike.
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
            for variant in order:
                rate = RUNNERS[variant](setup)
                rows.append({"norm": norm, "variant": variant, "repeat": repeat, "images_per_second": rate})
                log(f"  {norm:>4} {variant:<9} repeat {repeat + 1}/{repeats}: {rate:8.0f} img/s")
            if diagnostics_epoch:
                seconds = time_diagnostics(setup, diagnostics_epoch)
                rows.append({"norm": norm, "variant": "diagnostics", "repeat": repeat, "seconds": seconds})
                log(f"  {norm:>4} {'diagnostics':<11} repeat {repeat + 1}/{repeats}: {seconds * 1000:8.1f} ms")
    return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame, epoch_images: int = EPOCH_IMAGES) -> pd.DataFrame:
    """Median images per second per (norm, variant), and the two ratios that matter, as ratios of medians. With
    diagnostics rows: their median seconds, and that as a share of an `epoch_images`-image epoch of normsweep's
    training at its median rate (validation left out, so the share is an upper bound)."""
    index = ["norm", *(key for key in ("threads", "busy") if key in runs and runs[key].nunique() > 1)]
    table = runs.pivot_table(index=index, columns="variant", values="images_per_second", aggfunc="median", sort=False)
    table = table[list(VARIANTS)]
    table["normsweep/reference"] = table["normsweep"] / table["reference"]
    table["normsweep/ceiling"] = table["normsweep"] / table["ceiling"]
    if "seconds" in runs and (runs["variant"] == "diagnostics").any():
        probe = runs[runs["variant"] == "diagnostics"].groupby(index, sort=False)["seconds"].median()
        table["diagnostics_s"] = probe
        table["diagnostics/epoch"] = probe / (epoch_images / table["normsweep"])
    return table.reset_index()


def slowdowns(runs: pd.DataFrame) -> pd.DataFrame:
    """Per norm, thread count and variant: the median images per second of the quiet runs over the busy ones."""
    timed = runs[runs["variant"].isin(VARIANTS)]
    medians = timed.groupby(["norm", "threads", "variant", "busy"], sort=False)["images_per_second"].median()
    table = medians.unstack("busy")
    quiet, busy = table.columns.min(), table.columns.max()
    out = (table[quiet] / table[busy]).unstack("variant")[list(VARIANTS)]
    return out.reset_index()


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` processes that each keep a CPU busy (a browser tab, another sweep), for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # scheduled and running before anything is timed
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def job_threads(setting: int, setup: Setup, device: torch.device) -> int:
    """The threads a job would train this setup with: `threads=N`, or what threads=0 picks for its model."""
    if setting or device.type != "cpu":
        return setting or available_cpus()
    macs = step_macs(setup.build().model, setup.data.shape, setup.batch_size)
    return choose_threads(0, available_cpus(), macs).threads


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give thread counts, 0 or more, e.g. 0 or 1,2")
    return list(dict.fromkeys(counts))


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give channels,height,width, e.g. 3,32,32") from None
    return c, h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m normsweep.bench",
        description="Training images per second: the article's DataLoader loop (reference), normsweep's trainer, "
        "and forward/backward/step on one batch in memory (ceiling). Writes bench.csv.",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    parser.add_argument("--model", default="deep_cnn", choices=options("model"))
    parser.add_argument("--norm", default="bn", help=f"one norm or a comma list of {','.join(options('norm'))}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per run (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each run (default: 3)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, alternated (default: 5)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="normsweep and ceiling")
    parser.add_argument(
        "--threads",
        type=_counts,
        default=[0],
        help="CPU threads, or a comma list to compare (default 0: what a job with threads=0 uses)",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="time everything again beside N processes that each keep a CPU busy, and give each variant's slowdown "
        "against its quiet run (default 0: quiet only)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="normsweep and ceiling through torch.compile (compile=true); the untimed warm-up steps compile",
    )
    parser.add_argument("--shape", type=_shape, default=(3, 32, 32), help="image shape C,H,W (default: 3,32,32)")
    parser.add_argument("--out", type=Path, default=Path("bench.csv"), help="where to write (default: bench.csv)")
    parser.add_argument(
        "--diagnostics",
        type=int,
        nargs="?",
        const=EPOCH_IMAGES,
        metavar="EPOCH_IMAGES",
        help="also time one epoch's diagnostics (diagnostics=true) and give it as a share of an epoch of this many "
        f"training images at normsweep's rate (default {EPOCH_IMAGES}: CIFAR-10 at val_fraction 0.2)",
    )
    return parser


def _norms(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The norms to time, once the arguments are checked; a wrong one ends the benchmark with the parser's message."""
    norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    unknown = [n for n in norms if n not in options("norm")]
    if unknown or not norms:
        parser.error(f"--norm {args.norm}: choose among {', '.join(options('norm'))}")
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.warmup < 0 or args.busy < 0:
        parser.error("--warmup and --busy must be 0 or more")
    if args.diagnostics is not None and args.diagnostics < 1:
        parser.error("--diagnostics: give the training images of one epoch, 1 or more (e.g. --diagnostics 40000)")
    return norms


def _setups(parser: argparse.ArgumentParser, args: argparse.Namespace, norms: list[str]) -> tuple[list[Setup], Compute]:
    """One setup per norm on the same data, and the compute normsweep and ceiling run in. Every norm's model is built
    once before anything is timed: a run's checks (a norm that needs feature maps on the mlp, batch statistics at
    batch size 1, ...) stop the benchmark here, in one line, in the benchmark's words."""
    try:
        device = resolve_device(args.device)
        set_threads(max(args.threads) or available_cpus())
        data = make_data(args.shape, args.batch_size, args.steps, device)
        same = (args.batch_size, args.steps, args.warmup, device, args.precision, data, args.compile)
        setups = [Setup(args.model, norm, *same) for norm in norms]
        return setups, [setup.build().compute for setup in setups][0]
    except ConfigError as err:
        message = str(err).replace("device=", "--device ").replace("batch_size=", "--batch-size ")
        parser.error(message.replace("model=", "--model ").replace("norm=", "--norm "))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _header(args: argparse.Namespace, device: torch.device, counts: dict[int, int], compute: Compute) -> str:
    """The first line: what is timed, on what, in which threads and compute."""
    shown = " / ".join(_plural(n, "thread") + (" (threads=0)" if t == 0 else "") for t, n in counts.items())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device}, {shown}"
    return (
        f"{args.model}, batch {args.batch_size}, {'x'.join(map(str, args.shape))} synthetic uint8 images, "
        f"{_plural(args.steps, 'timed step')} x {_plural(args.repeats, 'repeat')}, {where}; normsweep and ceiling in "
        f"{describe_compute(compute)}, reference in fp32"
    )


def _time_all(setups: list[Setup], args: argparse.Namespace, counts: dict[int, int]) -> pd.DataFrame:
    """Every setup timed at each thread count, quiet and then (with --busy) beside busy processes."""
    parts = []
    for busy in (0, args.busy) if args.busy else (0,):
        with busy_processes(busy):
            for setting, threads in counts.items():
                torch.set_num_threads(threads)
                say = (
                    f"threads={setting}"
                    + (f" ({threads})" if setting == 0 else "")
                    + (f", busy {busy}" if busy else "")
                )
                part = bench(
                    setups,
                    args.repeats,
                    log=lambda line, say=say: print(f"{line}  [{say}]", flush=True),
                    diagnostics_epoch=args.diagnostics,
                )
                parts.append(part.assign(threads=threads, thread_setting=setting, busy=busy))
    return pd.concat(parts, ignore_index=True)


def _recorded(runs: pd.DataFrame, args: argparse.Namespace, device: torch.device, compute: Compute) -> pd.DataFrame:
    """The rows of bench.csv: every run with the settings and what it ran in (the reference loop always in fp32, the
    default (contiguous) layout, and eagerly)."""
    settings = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "shape": "x".join(map(str, args.shape)),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
    }
    ran_in = {v: (compute.precision, compute.channels_last, compute.compile) for v in (*VARIANTS, "diagnostics")}
    ran_in["reference"] = ("fp32", False, False)
    return runs.assign(
        **settings,
        precision=runs["variant"].map(lambda v: ran_in[v][0]),
        channels_last=runs["variant"].map(lambda v: ran_in[v][1]),
        compile=runs["variant"].map(lambda v: ran_in[v][2]),
    )


def _report(table: pd.DataFrame, runs: pd.DataFrame, args: argparse.Namespace) -> None:
    """The table of medians and ratios, what it shows, and the slowdowns beside busy processes."""
    print()
    print(
        table.to_string(
            index=False,
            formatters={
                **{v: "{:.0f}".format for v in VARIANTS},
                "normsweep/reference": "{:.2f}".format,
                "normsweep/ceiling": "{:.2f}".format,
                "diagnostics_s": "{:.3f}".format,
                "diagnostics/epoch": "{:.2%}".format,
            },
        )
    )
    each = f"median of {args.repeats} runs" if args.repeats > 1 else "one run each"
    print(f"\nimages per second, {each}; every run in {args.out.resolve()}")
    if args.busy:
        print(f"\nslowdown beside {_plural(args.busy, 'busy process')} (quiet images/s over busy images/s):")
        print(slowdowns(runs).to_string(index=False, float_format="{:.2f}x".format))
    if args.diagnostics:
        probe = min(probe_size(args.diagnostics), args.steps * args.batch_size)
        print(
            f"diagnostics_s: one epoch's diagnostics ({probe}-image probe batch), seconds; "
            f"diagnostics/epoch: that over a {args.diagnostics}-image training epoch at the normsweep rate"
        )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setups, compute = _setups(parser, args, _norms(parser, args))
    device = setups[0].device
    counts = {t: job_threads(t, setups[0], device) for t in args.threads}
    print(_header(args, device, counts, compute), flush=True)
    runs = _time_all(setups, args, counts)
    table = summarize(runs, args.diagnostics or EPOCH_IMAGES)
    runs = _recorded(runs, args, device, compute)
    atomic_write(args.out, runs.to_csv(index=False, float_format="%.6g"))
    _report(table, runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
