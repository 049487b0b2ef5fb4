"""compile=true: a graph torch's compiler fails on trains eagerly, with the numbers of an eager run, instead of
ending the run (inductor in torch 2.11 fails on FRN's backward in bf16 on an H200; injected here on a small mlp)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from normsweep.config.checks import compose_run
from normsweep.job.build import build

TIMINGS = ("epoch_seconds", "images_per_second")


def _fit(compile: bool) -> list[dict]:
    overrides = ["model=mlp", "norm=ln", "dataset=synthetic", "dataset.shape=[1,4,4]", "dataset.size=160", "epochs=2"]
    run = compose_run([*overrides, "batch_size=32", f"compile={str(compile).lower()}"])
    history = build(run, torch.device("cpu")).train()
    return [{k: v for k, v in asdict(m).items() if k not in TIMINGS} for m in history]


@pytest.mark.slow  # compiles for tens of seconds on a CPU
def test_a_backward_the_compiler_fails_on_trains_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo
    import torch._inductor.compile_fx as compile_fx

    def fails(*args, **kwargs):
        raise AssertionError("64 v.s. 8192")  # what inductor raised on the H200

    torch.set_num_threads(1)
    eager = _fit(compile=False)
    torch._dynamo.reset()
    monkeypatch.setattr(compile_fx, "compile_fx_backward", fails)
    try:
        compiled = _fit(compile=True)
    finally:
        torch._dynamo.reset()
    assert compiled == eager
