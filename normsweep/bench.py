"""`python -m normsweep.bench`: training images per second of the article's loop, normsweep's trainer and a bare
compute ceiling, side by side on the same model, data, batch size, thread count and step count."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from normsweep.config import Config, SyntheticConfig, compose_run, options
from normsweep.data import Data, Split, load, normalize
from normsweep.errors import ConfigError
from normsweep.jobfiles import atomic_write
from normsweep.layers import norm_factory
from normsweep.models import build_model
from normsweep.optimizers import Adam, build_optimizer
from normsweep.train import Compute, prepare, resolve_compute, resolve_device, set_threads, train_epoch

VARIANTS = ("reference", "normsweep", "ceiling")
CROP_PADDING = 4  # CIFAR's augmentation, in every variant that touches data: crop with padding 4, random flip


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

    def build(self) -> nn.Module:
        """The model with this norm, from conf/ as a run would build it (every check of a run applies)."""
        torch.manual_seed(0)
        c, h, w = self.data.shape
        run = self.config()
        factory = norm_factory(run.norm, self.model)
        return build_model(self.model, run.model, c, (h, w), self.data.num_classes, factory).to(self.device)

    def config(self) -> Config:
        return compose_run([f"model={self.model}", f"norm={self.norm}", f"batch_size={self.batch_size}"])

    def compute(self, model: nn.Module) -> Compute:
        return resolve_compute(self.precision, None, False, model, self.device)


def run_reference(setup: Setup) -> float:
    """DataLoader over PIL images with per-sample transforms, num_workers=0, fp32 in the default layout, and a
    `.item()` on the loss and the correct count after every batch: the loop most tutorials (and the article) use."""
    model = setup.build()
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
    return setup.batch_size * setup.steps / (time.perf_counter() - start)


def run_normsweep(setup: Setup) -> float:
    """The project's own epoch: seeded permutation, batched crop and flip on the device, one sync at the end."""
    model = setup.build()
    compute = setup.compute(model)
    forward = prepare(model, compute)
    optimizer = build_optimizer(model.parameters(), Adam(lr=1e-3))
    generator = torch.Generator(device=setup.device).manual_seed(0)
    warm = dataclasses.replace(setup.data, train=setup.data.train[: setup.warmup * setup.batch_size])
    train_epoch(forward, warm, optimizer, setup.batch_size, generator, compute)
    start = time.perf_counter()
    train_epoch(forward, setup.data, optimizer, setup.batch_size, generator, compute)
    return setup.batch_size * setup.steps / (time.perf_counter() - start)


def run_ceiling(setup: Setup) -> float:
    """Forward, backward and step on one batch already normalized in memory, in normsweep's precision and layout:
    no data work at all, the most this hardware gives this model in that setting."""
    model = setup.build()
    compute = setup.compute(model)
    forward = prepare(model, compute)
    optimizer = build_optimizer(model.parameters(), Adam(lr=1e-3))
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
    return setup.batch_size * setup.steps / (time.perf_counter() - start)


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


def bench(setup_args: dict, norms: list[str], repeats: int, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Time every variant `repeats` times per norm, alternating their order; one row per (norm, variant, repeat)."""
    rows = []
    for norm in norms:
        setup = Setup(norm=norm, **setup_args)
        for repeat in range(repeats):
            # Rotate the order each repeat, so drift on a shared machine falls on every variant alike.
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
            for variant in order:
                rate = RUNNERS[variant](setup)
                rows.append({"norm": norm, "variant": variant, "repeat": repeat, "images_per_second": rate})
                log(f"  {norm:>4} {variant:<9} repeat {repeat + 1}/{repeats}: {rate:8.0f} img/s")
    return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Median images per second per (norm, variant), and the two ratios that matter, as ratios of medians."""
    table = runs.pivot_table(index="norm", columns="variant", values="images_per_second", aggfunc="median", sort=False)
    table = table[list(VARIANTS)]
    table["normsweep/reference"] = table["normsweep"] / table["reference"]
    table["normsweep/ceiling"] = table["normsweep"] / table["ceiling"]
    return table.reset_index()


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give channels,height,width, e.g. 3,32,32") from None
    return c, h, w


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: every CPU available)")
    parser.add_argument("--shape", type=_shape, default=(3, 32, 32), help="image shape C,H,W (default: 3,32,32)")
    parser.add_argument("--out", type=Path, default=Path("bench.csv"), help="where to write (default: bench.csv)")
    args = parser.parse_args(argv)
    norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    unknown = [n for n in norms if n not in options("norm")]
    if unknown or not norms:
        parser.error(f"--norm {args.norm}: choose among {', '.join(options('norm'))}")
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.warmup < 0 or args.threads < 0:
        parser.error("--warmup and --threads must be 0 or more")

    try:
        device = resolve_device(args.device)
        threads = set_threads(args.threads)
        data = make_data(args.shape, args.batch_size, args.steps, device)
        setup_args = dict(
            model=args.model,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
            precision=args.precision,
            data=data,
        )
        # Every norm's model is built once before anything is timed: a run's checks (a norm that needs feature
        # maps on the mlp, batch statistics at batch size 1, ...) stop the benchmark here, in one line.
        probes = [Setup(norm=norm, **setup_args) for norm in norms]
        compute = [probe.compute(probe.build()) for probe in probes][0]
    except ConfigError as err:
        message = str(err).replace("device=", "--device ").replace("batch_size=", "--batch-size ")
        parser.error(message.replace("model=", "--model ").replace("norm=", "--norm "))
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device}, {plural(threads, 'thread')}"
    header = (
        f"{args.model}, batch {args.batch_size}, {'x'.join(map(str, args.shape))} synthetic uint8 images, "
        f"{plural(args.steps, 'timed step')} x {plural(args.repeats, 'repeat')}, {where}; normsweep and ceiling in "
        f"{compute.precision}{', channels_last' if compute.channels_last else ''}, reference in fp32"
    )
    print(header, flush=True)
    runs = bench(setup_args, norms, args.repeats, log=lambda line: print(line, flush=True))
    table = summarize(runs)
    settings = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "shape": "x".join(map(str, args.shape)),
        "device": str(device),
        "device_name": where,
        "threads": threads,
        "torch": torch.__version__,
    }
    # What each row ran in: the reference loop always in fp32 and the default (contiguous) layout.
    ran_in = {v: (compute.precision, compute.channels_last) for v in VARIANTS} | {"reference": ("fp32", False)}
    runs = runs.assign(
        **settings,
        precision=runs["variant"].map(lambda v: ran_in[v][0]),
        channels_last=runs["variant"].map(lambda v: ran_in[v][1]),
    )
    atomic_write(args.out, runs.to_csv(index=False, float_format="%.6g"))
    print()
    print(
        table.to_string(
            index=False,
            formatters={
                **{v: "{:.0f}".format for v in VARIANTS},
                "normsweep/reference": "{:.2f}".format,
                "normsweep/ceiling": "{:.2f}".format,
            },
        )
    )
    each = f"median of {args.repeats} runs" if args.repeats > 1 else "one run each"
    print(f"\nimages per second, {each}; every run in {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
