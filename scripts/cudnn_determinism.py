"""What holding cuDNN to deterministic algorithms costs and buys on a GPU (train.prepare sets it for every run).

For deep_cnn and resnet20 with bn, in fp32 and bf16: images per second of forward/backward/step on one in-memory
batch (the benchmark's ceiling) with torch.backends.cudnn.deterministic on and off, alternated, median of the
repeats; and whether two short trainings from the same seed give bit-identical weights with it off (if they do
on this GPU, the setting costs speed for nothing here). Needs CUDA.

    python scripts/cudnn_determinism.py [--out cudnn_determinism.csv]
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch
from torch import nn

from normsweep import bench
from normsweep.bench import Setup, make_data
from normsweep.config.optimizers import Adam
from normsweep.job.data import normalize
from normsweep.job.optim import build_optimizer
from normsweep.job.train import prepare


def images_per_second(setup: Setup, deterministic: bool) -> float:
    """The benchmark's ceiling (bench.run_ceiling), with cuDNN's deterministic setting as given."""

    def prepare_then_set(model: nn.Module, compute) -> nn.Module:
        forward = prepare(model, compute)
        torch.backends.cudnn.deterministic = deterministic  # after prepare, which sets it on
        return forward

    with mock.patch.object(bench, "prepare", prepare_then_set):
        return bench.run_ceiling(setup)


def trained_weights(setup: Setup, deterministic: bool, steps: int = 30) -> list[torch.Tensor]:
    job = setup.build()
    model, compute = job.model, job.compute
    forward = prepare(model, compute)
    torch.backends.cudnn.deterministic = deterministic
    optimizer = build_optimizer(model.parameters(), Adam(lr=1e-3))
    generator = torch.Generator(device=setup.device).manual_seed(0)
    images, labels = setup.data.train.images, setup.data.train.labels
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (setup.batch_size,), device=setup.device, generator=generator)
        with compute.autocast(setup.device):
            logits = forward(normalize(images[idx], setup.data, compute.memory_format))
            loss = nn.functional.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cudnn_determinism.csv")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = make_data((3, 32, 32), 128, 40, device)
    lines = ["model,precision,deterministic_img_s,free_img_s,free/deterministic,identical_when_free"]
    for model in ("deep_cnn", "resnet20"):
        for precision in ("fp32", "bf16"):
            setup = Setup(model, "bn", 128, 40, 5, device, precision, data)
            rates: dict[bool, list[float]] = {True: [], False: []}
            for repeat in range(args.repeats):
                for flag in (True, False) if repeat % 2 == 0 else (False, True):
                    rates[flag].append(images_per_second(setup, flag))
            on, off = statistics.median(rates[True]), statistics.median(rates[False])
            a, b = trained_weights(setup, False), trained_weights(setup, False)
            identical = all(torch.equal(p, q) for p, q in zip(a, b))
            lines.append(f"{model},{precision},{on:.0f},{off:.0f},{off / on:.3f},{identical}")
            print(lines[-1], flush=True)
    torch.backends.cudnn.deterministic = True
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
