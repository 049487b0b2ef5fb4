"""On a CUDA GPU: training learns, repeats itself exactly, resumes exactly after a kill, uses bf16 and channels_last
when asked, and a sweep's jobs land on the GPUs as documented. Skipped where torch sees no CUDA device
(scripts/gpu_check.sh runs them on a GPU machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli
from test_faults import _popen, _wait_for_rows
from torch import nn

from normsweep.config.checks import compose_run
from normsweep.config.norms import BUILT_IN as NORMS
from normsweep.job.build import Job, build
from normsweep.job.optim import build_optimizer
from normsweep.job.train import Compute, EpochMetrics, prepare, resolve_compute, resolve_device

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")
VALUES = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]  # metrics.csv without the timings
TIMINGS = ("epoch_seconds", "images_per_second")


def _setup(overrides: list[str]) -> Job:
    """A run's job on the GPU: its data and a freshly seeded model."""
    return build(compose_run(overrides), CUDA).to(CUDA)


def _train(overrides: list[str], diagnose: bool = False) -> tuple[nn.Module, list[EpochMetrics]]:
    job = _setup(overrides)
    probe = job.probe() if diagnose else None
    return job.model, job.train(diagnose=probe.measure if probe else None)


def _numbers(history) -> list[dict]:
    return [{k: v for k, v in asdict(m).items() if k not in TIMINGS} for m in history]


def _summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def _env() -> dict[str, str]:
    """The user's environment without a GPU pinned by a scheduler: `device=auto` spreads the jobs itself."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_training_on_cuda_learns_with_a_finite_falling_loss(norm: str) -> None:
    model, history = _train([f"norm={norm}", "epochs=4", "diagnostics=false"])
    assert all(p.is_cuda for p in model.parameters())
    assert all(m.finite for m in history), _numbers(history)
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_acc > 80  # digits: chance is 10%


@pytest.mark.slow
@pytest.mark.parametrize("model", ["simple_cnn", "deep_cnn", "resnet20"])
def test_same_seed_same_numbers_on_the_same_gpu(model: str) -> None:
    args = [f"model={model}", "norm=bn", "epochs=2", "diagnostics=false"]
    first = _numbers(_train([*args, "seed=3"])[1])
    again = _numbers(_train([*args, "seed=3"])[1])
    other = _numbers(_train([*args, "seed=4"])[1])
    assert first == again
    assert first != other


@pytest.mark.slow
def test_diagnostics_on_cuda_leave_the_numbers_unchanged() -> None:
    args = ["norm=bn", "epochs=2"]
    without = _numbers(_train(args)[1])
    with_ = _numbers(_train(args, diagnose=True)[1])
    assert with_ == without


def test_device_auto_picks_cuda_and_an_absent_gpu_is_refused() -> None:
    assert resolve_device("auto").type == "cuda"
    from normsweep.config.errors import ConfigError

    with pytest.raises(ConfigError, match="no such CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_the_data_stays_on_the_gpu_as_uint8() -> None:
    data = _setup(["dataset=synthetic", "dataset.shape=[3,32,32]", "dataset.size=200"]).data
    assert data.train.images.is_cuda and data.train.images.dtype == torch.uint8
    assert data.test.labels.is_cuda


def test_adam_adamw_and_sgd_use_their_fused_kernels_on_cuda() -> None:
    from normsweep.config.optimizers import BUILT_IN as OPTIMIZERS

    params = [nn.Parameter(torch.randn(4, 4, device=CUDA)), nn.Parameter(torch.randn(4, device=CUDA))]
    for name, record in OPTIMIZERS.items():
        optimizer = build_optimizer(params, record(lr=0.01))
        assert optimizer.defaults.get("fused") is True, name


@pytest.mark.parametrize("model_name", ["simple_cnn", "deep_cnn", "resnet20"])
def test_bf16_autocast_and_channels_last_take_effect(model_name: str) -> None:
    job = _setup([f"model={model_name}", "dataset=synthetic", "dataset.shape=[3,32,32]"])
    data, model = job.data, job.model
    compute = resolve_compute("bf16", None, False, model, CUDA)
    assert compute == Compute(precision="bf16", channels_last=True, compile=False)  # auto: channels_last with bf16
    assert resolve_compute("fp32", None, False, model, CUDA).channels_last is False
    forward = prepare(model, compute)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append(o)) for c in convs]
    from normsweep.job.data import normalize

    with compute.autocast(CUDA):
        logits = forward(normalize(data.train.images[:16], data, compute.memory_format))
    for hook in hooks:
        hook.remove()
    assert logits.dtype == torch.bfloat16
    assert all(o.dtype == torch.bfloat16 for o in seen)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in seen if o.shape[-1] > 1)


@pytest.mark.slow
def test_bf16_training_learns() -> None:
    _, history = _train(["model=deep_cnn", "precision=bf16", "epochs=4", "diagnostics=false"])
    assert all(m.finite for m in history)
    assert history[-1].train_loss < history[0].train_loss and history[-1].val_acc > 70


@pytest.mark.slow
def test_compiled_training_on_cuda_learns() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    _, history = _train(["norm=gn", "compile=true", "epochs=3", "diagnostics=false"])
    assert all(m.finite for m in history)
    assert history[-1].train_loss < history[0].train_loss and history[-1].val_acc > 70


def _run_unpinned(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m normsweep ARGS` in a new process with no GPU pinned by the environment (see _env)."""
    return subprocess.run(
        [sys.executable, "-m", "normsweep", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def test_a_single_run_with_device_auto_trains_on_the_gpu(tmp_path: Path) -> None:
    result = _run_unpinned(["epochs=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(tmp_path / "run")
    assert summary["device"] == "cuda:0"
    assert summary["hardware"] == torch.cuda.get_device_name(0)
    assert "device cuda:0" in result.stdout + result.stderr


def test_job_n_of_a_sweep_uses_gpu_n_mod_k(tmp_path: Path) -> None:
    gpus = torch.cuda.device_count()
    seeds = ",".join(str(s) for s in range(gpus + 1))  # K+1 jobs: one GPU takes two
    result = _run_unpinned(["-m", f"seed={seeds}", "epochs=1", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for job in range(gpus + 1):
        assert _summary(tmp_path / "s" / str(job))["device"] == f"cuda:{job % gpus}"


def test_killed_on_cuda_and_resumed_gives_the_uninterrupted_numbers(tmp_path: Path) -> None:
    args = ["norm=gn", "device=cuda", "epochs=8", "batch_size=8", "diagnostics=true"]
    reference = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert reference.returncode == 0, reference.stdout + reference.stderr

    killed = tmp_path / "killed"
    proc = _popen([*args, f"hydra.run.dir={killed}"], tmp_path)
    _wait_for_rows(killed / "metrics.csv", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _summary(killed)["status"] == "running"  # what the killed process left

    resumed = run_cli([*args, f"hydra.run.dir={killed}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint of epoch" in resumed.stdout + resumed.stderr
    expected = pd.read_csv(tmp_path / "ref" / "metrics.csv")[VALUES]
    pd.testing.assert_frame_equal(pd.read_csv(killed / "metrics.csv")[VALUES], expected)
    assert _summary(killed)["test_acc"] == _summary(tmp_path / "ref")["test_acc"]
    assert 3 <= _summary(killed)["resumed_from_epoch"] < 8
    diagnostics = pd.read_csv(killed / "diagnostics.csv")
    pd.testing.assert_frame_equal(diagnostics, pd.read_csv(tmp_path / "ref" / "diagnostics.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["simple_cnn", "resnet20"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_jobs_on_cuda_train_as_alone(model: str, precision: str) -> None:
    """job/pack.py on the GPU: cuDNN's batch norm and grouped convolutions under vmap, fused optimizers on the
    members' views; each member's numbers those of the job alone, within the CPU tests' tolerance for SGD (bf16:
    ten times it, its rounding being coarser)."""
    from normsweep.job.pack import Member, fit_packed, why_not_packed

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16")
    common = [f"model={model}", "optimizer=sgd", f"precision={precision}", "epochs=2", "dataset.train_size=512"]
    settings = [["seed=0", "optimizer.lr=0.02"], ["seed=1", "optimizer.lr=0.01"], ["seed=2", "optimizer.lr=0.02"]]
    alone = [_setup([*common, *own]).train() for own in settings]
    jobs = [_setup([*common, *own]) for own in settings]
    assert why_not_packed(jobs) is None
    members = [Member(job) for job in jobs]
    fit_packed(members)
    rel = 1e-2 if precision == "fp32" else 1e-1
    for a, member in zip(alone, members):
        assert member.ended is None and len(member.history) == 2
        for x, y in zip(a, member.history):
            assert y.train_loss == pytest.approx(x.train_loss, rel=rel)
            assert y.val_loss == pytest.approx(x.val_loss, rel=rel)
