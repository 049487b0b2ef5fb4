"""Jobs trained together (job/pack.py): each member gets the numbers it gets alone, ends alone, resumes alone.

The tolerance, and why it is not zero: a packed step runs the members' convolutions as one grouped convolution,
which sums in another order than a job's own, so each step differs from the job's by float rounding (about 1e-7
relative). Over a few steps at a stable rate that stays small for every norm, model and optimizer: every loss within
1e-3 relative (measured: at most 4e-4). Over epochs, with SGD it stays small on simple_cnn. Adam and AdamW
divide each gradient by its running size, so a parameter whose true gradient is zero (a convolution's bias before
BatchNorm, whose mean the norm removes) takes full-size steps driven by rounding alone, and the run drifts: a job
alone drifts as far when only its memory layout changes (channels_last true against false, bn, 3 epochs: 1.0e-2
relative; gn: 8.6e-3). Those members are held to 3e-2. Deeper models amplify rounding more with any optimizer:
resnet20 with bn alone drifts 1.7e-3 relative in 2 epochs of SGD when only its memory layout changes, so deep_cnn
and resnet20 members are held to 1e-2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli_here, start_cli
from test_faults import _wait_for_rows

from normsweep.config.checks import compose_run
from normsweep.job.build import Job, build
from normsweep.job.pack import Member, _shapes, fit_packed, why_not_packed
from normsweep.job.train import EpochMetrics, Steps, fit

pytestmark = pytest.mark.slow  # each trains a few jobs twice, for seconds

CPU = torch.device("cpu")
DIGITS = ("dataset.train_size=256", "epochs=2", "optimizer=sgd")
# 32x32 colour images, few of them: deep_cnn and resnet20 in seconds.
SYNTHETIC = ("dataset=synthetic", "dataset.size=300", "dataset.shape=[3,16,16]", "batch_size=32", "epochs=2")
# Two jobs that differ in their seed (weights, split, batch order) and learning rate.
TWO = (("seed=0", "optimizer.lr=0.05"), ("seed=1", "optimizer.lr=0.02"))
SGD_REL, DEEP_REL, ADAM_REL = 1e-3, 1e-2, 3e-2


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jobs(common: tuple[str, ...], settings: tuple[tuple[str, ...], ...]) -> list[Job]:
    return [build(compose_run([*common, *own]), CPU) for own in settings]


def _alone(common: tuple[str, ...], settings: tuple[tuple[str, ...], ...]) -> list[list[EpochMetrics]]:
    return [job.train() for job in _jobs(common, settings)]


def _packed(common: tuple[str, ...], settings: tuple[tuple[str, ...], ...], **kw) -> list[Member]:
    members = [Member(job) for job in _jobs(common, settings)]
    fit_packed(members, **kw)
    return members


def _assert_same(alone: list[EpochMetrics], packed: list[EpochMetrics], rel: float, images: int) -> None:
    assert [m.epoch for m in packed] == [m.epoch for m in alone]
    for a, b in zip(alone, packed):
        assert b.train_loss == pytest.approx(a.train_loss, rel=rel), (a, b)
        assert b.val_loss == pytest.approx(a.val_loss, rel=rel), (a, b)
        assert b.lr == a.lr
        if rel == SGD_REL:  # losses this close: the same images right, or one more or fewer
            assert abs(b.train_acc - a.train_acc) <= 100 / images + 1e-9
            assert abs(b.val_acc - a.val_acc) <= 100 / 64 + 1e-9


NORMS = ["none", "bn", "ln", "in", "gn", "ln2d", "rms", "ws_gn", "frn"]
# One member per optimizer (members may differ in it), each at a rate in its stable regime: a short run whose
# numbers rounding cannot yet have moved apart.
MEMBERS = (
    ("optimizer=sgd", "optimizer.lr=0.005"),
    ("optimizer=adam", "optimizer.lr=0.0003"),
    ("optimizer=adamw", "optimizer.lr=0.0001"),
)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model", ["simple_cnn", "deep_cnn", "resnet20"])
def test_every_norm_model_and_optimizer_packed_trains_as_alone(model, norm):
    """Every combination, for a few steps (measured: all within 4e-4 relative, most within 1e-5); the tests below
    follow fewer of them for longer, where rounding has had time to move runs apart."""
    common = ("dataset.train_size=96", "epochs=1", "batch_size=32", f"model={model}", f"norm={norm}")
    runs = [compose_run([*common, *own, f"seed={i}"]) for i, own in enumerate(MEMBERS)]
    alone = [build(run, CPU).train() for run in runs]
    members = [Member(build(run, CPU)) for run in runs]
    fit_packed(members)
    for a, member in zip(alone, members):
        assert member.ended is None
        _assert_same(a, member.history, SGD_REL, 96)


@pytest.mark.parametrize("model, norm", [("deep_cnn", "gn"), ("resnet20", "bn")])
def test_bigger_models_packed_train_as_alone(model, norm):
    common = (*SYNTHETIC, f"model={model}", f"norm={norm}", "optimizer=sgd")
    settings = (("seed=0", "optimizer.lr=0.01"), ("seed=1", "optimizer.lr=0.005"))
    alone = _alone(common, settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = _packed(common, settings)
    # Every layer batched by vmap: none run member by member (torch warns "not yet implemented the batching rule").
    assert not [w for w in caught if "batching rule" in str(w.message)]
    for a, member in zip(alone, packed):
        _assert_same(a, member.history, DEEP_REL, 240)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adaptive_optimizers_packed_drift_no_further_than_a_job_alone(optimizer):
    common = ("dataset.train_size=256", "epochs=2", "norm=bn", f"optimizer={optimizer}")
    settings = (("seed=0", "optimizer.lr=0.001"), ("seed=1", "optimizer.lr=0.003"))
    for a, member in zip(_alone(common, settings), _packed(common, settings)):
        _assert_same(a, member.history, ADAM_REL, 256)


def test_a_diverging_member_leaves_the_pack_and_the_others_train_on_unchanged():
    common = (*DIGITS, "epochs=3", "norm=bn")
    settings = (TWO[0], ("seed=1", "optimizer.lr=10000"), TWO[1])
    alone, packed = _alone(common, settings), _packed(common, settings)
    diverged = packed[1].history
    assert len(diverged) < 3 and diverged[-1].diverged(packed[1].job.diverge_loss)
    assert len(diverged) == len(alone[1])  # alone it diverges in the same epoch
    for i in (0, 2):
        assert packed[i].ended is None
        _assert_same(alone[i], packed[i].history, SGD_REL, 256)


def test_a_member_stopped_by_its_callback_ends_alone():
    class Pruned(Exception):
        pass

    def prune(metrics: EpochMetrics, snapshot) -> None:
        raise Pruned

    members = [Member(job) for job in _jobs((*DIGITS, "epochs=3"), TWO)]
    members[1].on_epoch = prune
    fit_packed(members)
    assert isinstance(members[1].ended, Pruned) and len(members[1].history) == 1
    assert members[0].ended is None and len(members[0].history) == 3


def _until(epoch: int):
    """A watch that interrupts the pack as `epoch` begins, as Ctrl-C or a scheduler's SIGTERM would."""

    def watch(steps: Steps):
        if steps.epoch == epoch:
            raise KeyboardInterrupt
        from contextlib import nullcontext

        return nullcontext()

    return watch


def _keep_snapshots(members: list[Member]) -> list[dict]:
    kept: list[dict] = [None] * len(members)  # type: ignore[list-item]

    def keeper(i: int):
        def on_epoch(metrics: EpochMetrics, snapshot) -> None:
            kept[i] = snapshot()

        return on_epoch

    for i, member in enumerate(members):
        member.on_epoch = keeper(i)
    return kept


def test_a_killed_pack_resumes_to_the_numbers_of_one_never_stopped():
    common = (*DIGITS, "epochs=3", "norm=bn")
    whole = _packed(common, TWO)
    members = [Member(job) for job in _jobs(common, TWO)]
    kept = _keep_snapshots(members)
    with pytest.raises(KeyboardInterrupt):
        fit_packed(members, watch=_until(2))
    assert [s["epoch"] for s in kept] == [1, 1]
    resumed = [Member(job, state=state) for job, state in zip(_jobs(common, TWO), kept)]
    fit_packed(resumed)
    for w, r in zip(whole, resumed):
        assert [m.epoch for m in r.history] == [1, 2, 3]
        for a, b in zip(w.history, r.history):
            numbers = (a.train_loss, a.val_loss, a.val_acc)
            assert (b.train_loss, b.val_loss, b.val_acc) == pytest.approx(numbers, rel=1e-6)


def test_a_packed_members_checkpoint_is_a_job_alone_and_resumes_alone():
    common = (*DIGITS, "epochs=3", "norm=bn")
    members = [Member(job) for job in _jobs(common, TWO)]
    kept = _keep_snapshots(members)
    with pytest.raises(KeyboardInterrupt):
        fit_packed(members, watch=_until(2))
    job = _jobs(common, TWO[:1])[0]
    alone_state = {}

    def keep(metrics, snapshot):
        alone_state.update(snapshot())

    fit(job.model, job.data, job.run.optimizer, 1, job.run.batch_size, job.run.seed, keep, compute=job.compute)
    state = kept[0]
    assert state.keys() == alone_state.keys()
    for name, tensor in state["model"].items():  # its own tensors, not rows of the pack's
        assert tensor.shape == alone_state["model"][name].shape
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert state["optimizer"]["param_groups"] == alone_state["optimizer"]["param_groups"]
    # Resumed alone, it continues as the pack would have: the epochs after it as a job never packed.
    alone = _alone(common, TWO[:1])[0]
    job = _jobs(common, TWO[:1])[0]
    rest = job.train(state=state)
    _assert_same(alone, rest, SGD_REL, 256)


def test_why_jobs_cannot_be_packed():
    jobs = _jobs(DIGITS, TWO)
    assert why_not_packed(jobs) is None
    other_batch = _jobs(DIGITS, (("batch_size=32",),))
    assert "batch_size" in why_not_packed([jobs[0], *other_batch])
    other_norm = _jobs(DIGITS, (("norm=gn",),))  # no running statistics: other buffers
    assert "differ in layers" in why_not_packed([jobs[0], *other_norm])
    # The same shapes, parameter for parameter, but other layers or other settings of a layer.
    gn, ln2d, gn_eps = _jobs(DIGITS, (("norm=gn",), ("norm=ln2d",), ("norm=gn", "norm.eps=0.001")))
    assert _shapes(gn.model) == _shapes(ln2d.model) == _shapes(gn_eps.model)
    assert "differ in layers" in why_not_packed([gn, ln2d])
    assert "differ in layers" in why_not_packed([gn, gn_eps])


# A sweep with `pack`: what a user sees and finds in the sweep folder.
SWEEP = ("epochs=3", "dataset.train_size=256", "optimizer=sgd", "device=cpu")


def _metrics(job: Path) -> pd.DataFrame:
    return pd.read_csv(job / "metrics.csv")[["epoch", "train_loss", "val_loss", "val_acc", "lr"]]


def test_a_packed_sweep_leaves_each_job_as_alone(tmp_path: Path) -> None:
    packed = run_cli_here(["-m", "pack=true", "seed=0,1,2", *SWEEP, f"hydra.sweep.dir={tmp_path / 'p'}"], tmp_path)
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert "pack: jobs 0, 1, 2 train together" in packed.stdout and "Launching 1 jobs" in packed.stdout
    # The default, pack=auto, on the CPU: each job alone, and not a word of packs.
    alone = run_cli_here(["-m", "seed=0,1,2", *SWEEP, f"hydra.sweep.dir={tmp_path / 'a'}"], tmp_path)
    assert alone.returncode == 0 and "pack:" not in alone.stdout and "Launching 3 jobs" in alone.stdout
    for job in ("0", "1", "2"):
        p, a = tmp_path / "p" / job, tmp_path / "a" / job
        files = {"summary.json", "metrics.csv", "diagnostics.csv", "checkpoint.pt", "predictions.npz", "normsweep.log"}
        assert files <= {f.name for f in p.iterdir()} and (p / ".hydra" / "overrides.yaml").is_file()
        pd.testing.assert_frame_equal(_metrics(p), _metrics(a), rtol=SGD_REL)
        summary = json.loads((p / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["seed"] == int(job)
        log = (p / "normsweep.log").read_text()  # each job's log holds its own lines
        assert f"[job {job} seed={job}] Epoch 3/3" in log and "test_acc" in log
        assert all(f"[job {other} " not in log for other in "012" if other != job)  # its own lines, as alone
    runs = pd.read_csv(tmp_path / "p" / "runs.csv")
    assert sorted(runs["seed"]) == [0, 1, 2] and set(runs["status"]) == {"completed"}


def test_pack_auto_leaves_cpu_jobs_alone_and_true_packs_them() -> None:
    from normsweep.sweep.packing import plan

    config = {"seed": 0, "norm": {"name": "bn"}, "optimizer": {"lr": 0.001}, "pack": "auto", "device": "cpu"}
    seeds = [{**config, "seed": seed} for seed in range(3)]
    alone = plan(seeds)  # on the CPU a pack is slower than its jobs one after another (docs/performance.md)
    assert alone.packs == [] and set(alone.alone) == {0, 1, 2}
    assert all("pack=auto packs jobs on CUDA only" in why for why in alone.alone.values())
    assert plan([{**c, "pack": True} for c in seeds]).packs == [[0, 1, 2]]
    assert plan([{**c, "pack": "auto", "device": "cuda:1"} for c in seeds]).packs == [[0, 1, 2]]
    rates = [{**config, "pack": True, "optimizer": {"lr": lr}} for lr in (0.1, 0.01)]
    assert plan(rates).packs == [[0, 1]]  # an optimizer setting is a member's own
    norms = [{**config, "pack": True, "norm": {"name": name}} for name in ("bn", "gn")]
    assert plan(norms).packs == [] and "only in seed or optimizer" in plan(norms).alone[0]


def test_jobs_that_differ_in_more_than_seed_and_optimizer_pack_apart(tmp_path: Path) -> None:
    args = ["-m", "pack=true", "norm=bn,gn", "seed=0,1", "batch_size=32,64", "epochs=1", "dataset.train_size=64"]
    run = run_cli_here([*args, f"hydra.sweep.dir={tmp_path}/s"], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    packs = [line for line in run.stdout.splitlines() if "train together" in line]
    assert len(packs) == 4 and "Launching 4 jobs" in run.stdout  # one per norm and batch size, each of 2 seeds
    assert len(pd.read_csv(tmp_path / "s" / "runs.csv")) == 8
    # Each job's lines under its number in the sweep, as its folder is named (the launcher numbers the 4 it launched).
    tested = {int(n): float(acc) for n, acc in re.findall(r"\[job (\d+) [^\]]*\] test_acc ([\d.]+)%", run.stdout)}
    assert set(tested) == set(range(8))
    for n, acc in tested.items():
        summary = json.loads((tmp_path / "s" / str(n) / "summary.json").read_text())
        assert summary["test_acc"] == pytest.approx(acc, abs=0.01)


def test_a_tuning_sweeps_trials_train_packed_and_are_pruned_alone(tmp_path: Path) -> None:
    searched = "optimizer.lr=tag(log, interval(1e-4, 1e-1))"
    args = ["-m", "hydra/sweeper=tune", searched, "norm=bn,gn", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2"]
    run = run_cli_here(
        [*args, "pack=true", "epochs=3", "dataset.train_size=256", f"hydra.sweep.dir={tmp_path}/s"], tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Two rounds of 2 trials per study: each round's trials of one study train together, numbered on across rounds.
    assert [line.split("pack: ")[1][:12] for line in run.stdout.splitlines() if "train together" in line] == [
        "jobs 0, 1 tr",
        "jobs 2, 3 tr",
        "jobs 4, 5 tr",
        "jobs 6, 7 tr",
    ]
    summaries = [json.loads(f.read_text()) for f in (tmp_path / "s").glob("*/summary.json")]
    trials = sorted((s["trial"]["study"], s["trial"]["number"]) for s in summaries)
    assert trials == [(study, n) for study in ("norm=bn", "norm=gn") for n in range(4)]  # one folder per trial
    statuses = {s["status"] for s in summaries}
    assert statuses <= {"completed", "pruned"} and "pruned" in statuses  # a pruned trial ended alone
    assert "4 of 4 trials done" in run.stdout


def test_a_killed_packed_sweep_resumes_to_the_numbers_of_one_never_stopped(tmp_path: Path) -> None:
    args = ["-m", "pack=true", "seed=0,1", "epochs=4", "batch_size=16", "device=cpu"]
    sweep = tmp_path / "killed"
    proc = start_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for_rows(sweep / "1" / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143 and "To resume, run the same command" in said, said
    stopped = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1")]
    assert [s["status"] for s in stopped] == ["incomplete", "incomplete"]
    assert 1 <= stopped[1]["epochs_completed"] < 4
    resumed = run_cli_here([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.count("resuming from the checkpoint of epoch") == 2
    whole = run_cli_here([*args, f"hydra.sweep.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0
    for job in ("0", "1"):
        pd.testing.assert_frame_equal(_metrics(sweep / job), _metrics(tmp_path / "whole" / job), rtol=1e-6)


class _ReadsAScalar(torch.nn.Module):
    """A user's model that reads a value out of its input mid-forward: vmap cannot batch that."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().max().item()
        return self.fc(x.flatten(1)) / max(scale, 1.0)


def test_a_model_vmap_cannot_batch_is_not_packed_and_says_why():
    jobs = [dataclasses.replace(job, model=_ReadsAScalar()) for job in _jobs(DIGITS, TWO)]
    why = why_not_packed(jobs)
    assert why is not None and why.startswith("torch.func.vmap cannot batch model=simple_cnn (") and ".item()" in why


@pytest.mark.parametrize("padding, hflip", [(2, True), (0, True), (2, False), (0, False)])
def test_a_packed_batch_is_each_members_batch_alone_bit_for_bit(padding, hflip):
    from normsweep.job.data import crop_and_flip, normalize, pad_for_crops
    from normsweep.job.pack import _crops, _Splits

    datas = [job.data for job in _jobs(DIGITS, TWO)]
    canvas = torch.stack([pad_for_crops(d.train.images[:16], padding) for d in datas])
    seeds = [torch.Generator().manual_seed(i) for i in (3, 4)]
    alone = [torch.Generator().manual_seed(i) for i in (3, 4)]
    for _ in range(2):  # the generators go on as they would alone, batch after batch
        packed = _Splits.of(datas).scale(_crops(canvas, padding, hflip, seeds))
        each = [normalize(crop_and_flip(c, padding, hflip, g), d) for c, g, d in zip(canvas, alone, datas)]
        assert torch.equal(packed, torch.stack(each))


def test_a_packed_job_that_fails_is_recorded_failed_and_the_others_finish(tmp_path: Path, monkeypatch) -> None:
    from normsweep.job import run

    record = run._Progress.record

    def failing(self, metrics, snapshot):
        if self.job_dir.name == "1" and metrics.epoch == 2:
            raise RuntimeError("the tracker of job 1 broke")
        return record(self, metrics, snapshot)

    monkeypatch.setattr(run._Progress, "record", failing)
    done = run_cli_here(["-m", "pack=true", "seed=0,1,2", *SWEEP, f"hydra.sweep.dir={tmp_path}/s"], tmp_path)
    assert done.returncode == 1 and "1 of 3 jobs failed" in done.stdout + done.stderr
    summaries = {job: json.loads((tmp_path / "s" / job / "summary.json").read_text()) for job in "012"}
    assert summaries["1"]["status"] == "failed" and "the tracker of job 1 broke" in summaries["1"]["error"]
    assert summaries["0"]["status"] == summaries["2"]["status"] == "completed"
    assert summaries["0"]["epochs_completed"] == summaries["2"]["epochs_completed"] == 3
    assert len(pd.read_csv(tmp_path / "s" / "1" / "metrics.csv")) == 1  # its epochs before the failure, kept
