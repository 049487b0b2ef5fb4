"""hydra/sweeper=tune: the plan read from Hydra's grammar, the studies in real Optuna journal storage (no mocks of
Optuna), a job's trial pruned by its study, the one-coordinator lock, and whole tuning sweeps run as a user runs
them (resumed after a kill, on joblib, refused before launch for each mistake)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, run_cli_here
from hydra.core.override_parser.overrides_parser import OverridesParser

from normsweep.config.errors import ConfigError
from normsweep.sweep.search import Searched, check_settings, override_value, plan
from normsweep.sweep.studies import (
    STORAGE_FILE,
    TRIAL_ENV,
    JobTrial,
    Settings,
    Studies,
    one_coordinator,
    open_storage,
    optuna_module,
    spread,
)

LR = "optimizer.lr=tag(log, interval(1e-4, 1))"


def _plan(*overrides: str):
    return plan(OverridesParser.create().parse_overrides(list(overrides)))


def _settings(**given) -> Settings:
    values = dict(
        n_trials=4,
        n_jobs=1,
        pruner="hyperband",
        min_epochs=1,
        reduction_factor=3,
        sampler="tpe",
        startup_trials=None,
        confirm_seeds=0,
    )
    return Settings(**{**values, **given})


def _studies(folder: Path, the_plan, **given) -> Studies:
    facts = [{"seed": 0, "epochs": 4, "metric": "val_acc"} for _ in the_plan.studies]
    return Studies(folder, the_plan, _settings(**given), facts)


# --- the plan ---------------------------------------------------------------------------------------------------


def test_intervals_and_choices_are_searched_and_lists_are_a_grid_of_studies() -> None:
    the_plan = _plan(
        "norm=bn,gn",
        "seed=0,1",
        LR,
        "optimizer.weight_decay=interval(0, 0.1)",
        "optimizer.warmup_epochs=choice(0, 1, 2)",
        "model.width=int(interval(8, 64))",
        "epochs=3",
    )
    assert [s.key for s in the_plan.space] == [
        "optimizer.lr",
        "optimizer.weight_decay",
        "optimizer.warmup_epochs",
        "model.width",
    ]
    lr, decay, warmup, width = the_plan.space
    assert (lr.low, lr.high, lr.log) == (1e-4, 1.0, True)
    assert (decay.low, decay.high, decay.log) == (0.0, 0.1, False)
    assert warmup.choices == (0, 1, 2)
    assert width.integer and (width.low, width.high) == (8, 64)
    assert len(the_plan.studies) == 4  # one study per norm and seed: each gets the same budget
    assert [the_plan.name(s) for s in the_plan.studies] == [
        "norm=bn seed=0",
        "norm=bn seed=1",
        "norm=gn seed=0",
        "norm=gn seed=1",
    ]
    assert all("epochs=3" in study for study in the_plan.studies)  # a plain value is every study's


def test_the_last_value_given_for_a_key_counts_so_the_command_line_overrides_a_preset() -> None:
    the_plan = _plan("norm=none,bn,ln", LR, "norm=bn", "optimizer.lr=tag(log, interval(1e-3, 1e-1))")
    assert [the_plan.name(s) for s in the_plan.studies] == ["norm=bn"]  # named by the compared key
    assert _plan(LR).name([]) == "all"
    assert the_plan.space == [Searched("optimizer.lr", 1e-3, 0.1, True)]


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["optimizer.lr=interval(1, 0.1)"], "low end must be below its high end"),
        (["optimizer.lr=interval(0.1, 0.1)"], "low end must be below its high end"),
        (["optimizer.lr=tag(log, interval(0, 1))"], "log-scale interval cannot reach 0"),
        (["optimizer.lr=tag(log, interval(-1, 1))"], "log-scale interval cannot reach 0"),
        (["norm=bn,gn", "seed=0"], "searches nothing"),
        (["optimizer.warmup_epochs=choice(1)"], "two values or more"),
        (["optimizer.lr=tag(fast, interval(0.1, 1))"], "unknown tag 'fast'"),
    ],
)
def test_a_space_that_cannot_be_searched_is_refused_naming_the_key(overrides: list[str], said: str) -> None:
    with pytest.raises(ConfigError, match=said) as refused:
        _plan(*overrides)
    assert "\n" not in str(refused.value)
    key = overrides[0].split("=")[0]
    assert key in str(refused.value) or "searches nothing" in said


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"n_trials": 0}, "hydra.sweeper.n_trials=0"),
        ({"n_jobs": 0}, "hydra.sweeper.n_jobs=0"),
        ({"confirm_seeds": -1}, "hydra.sweeper.confirm_seeds=-1"),
        ({"pruner": "asha"}, "no such pruner; choose one of hyperband, successive_halving, median, none"),
        ({"sampler": "grid"}, "no such sampler"),
        ({"min_epochs": 0}, "hydra.sweeper.min_epochs=0"),
        ({"reduction_factor": 1}, "hydra.sweeper.reduction_factor=1: give a whole number of 2 or more"),
    ],
)
def test_the_sweepers_own_keys_are_checked(given: dict, said: str) -> None:
    values = dict(n_trials=4, n_jobs=1, pruner="hyperband", sampler="tpe", confirm_seeds=0, min_epochs=1)
    with pytest.raises(ConfigError, match=said):
        check_settings(**{**values, **given})


def test_values_are_written_as_overrides_hydra_reads_back() -> None:
    parser = OverridesParser.create()
    for value in [0.0031622776601683794, 3, True, "cosine", "a b", "it's"]:
        override = parser.parse_overrides([f"key={override_value(value)}"])[0]
        assert override.value() == value


# --- the studies, in real journal storage -------------------------------------------------------------------------


def _end(studies: Studies, jobs, status="completed", value=90.0) -> None:
    for job in jobs:
        studies.tell(job, {"status": status, "final_val_acc": value})


def test_each_study_asks_n_jobs_trials_a_round_until_it_has_n_trials(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn,gn", LR), n_trials=5, n_jobs=2)
    rounds = []
    while jobs := studies.next_round():
        rounds.append(len(jobs))
        _end(studies, jobs)
    assert rounds == [4, 4, 2]  # two per study, the last round one each
    storage = open_storage(tmp_path)
    for name in ("norm=bn", "norm=gn"):
        trials = optuna.load_study(study_name=name, storage=storage).trials
        assert [t.state.name for t in trials] == ["COMPLETE"] * 5
        assert all(1e-4 <= t.params["optimizer.lr"] <= 1 for t in trials)


def test_a_trials_job_carries_its_values_and_its_trial(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn", LR, "epochs=4"))
    job = studies.next_round()[0]
    lr = job.params["optimizer.lr"]
    assert job.overrides == ["norm=bn", "epochs=4", f"optimizer.lr={lr!r}"]
    record = json.loads(job.env()[TRIAL_ENV])
    assert record["study"] == "norm=bn" and record["number"] == 0 and record["phase"] == "search"
    assert Path(record["storage"]) == (tmp_path / STORAGE_FILE).resolve()


def test_the_sampler_is_seeded_so_the_same_command_proposes_the_same_values(tmp_path: Path) -> None:
    proposed = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        studies = _studies(tmp_path / folder, _plan("norm=bn", LR), n_trials=6, startup_trials=2)
        values = []
        while jobs := studies.next_round():
            values += [j.params["optimizer.lr"] for j in jobs]
            for job in jobs:  # a result that depends on the value, so TPE's proposals depend on what it learned
                studies.tell(
                    job, {"status": "completed", "final_val_acc": 100 - abs(job.params["optimizer.lr"] - 0.01)}
                )
        proposed.append(values)
    assert proposed[0] == proposed[1] and len(set(proposed[0])) == 6


def test_a_small_budget_is_spread_whole_and_a_larger_one_spreads_four_before_tpe() -> None:
    # TPE modelling two results extrapolates to the range's end (docs/tuning.md): four spread trials at least.
    assert [_settings(n_trials=n).startup() for n in (1, 2, 4, 6, 12, 15, 30, 100)] == [1, 2, 4, 4, 4, 5, 10, 10]
    assert _settings(n_trials=12, startup_trials=2).startup() == 2


@pytest.mark.parametrize("seed", range(12))
def test_a_studys_first_trials_cover_the_range_one_in_each_part(tmp_path: Path, seed: int) -> None:
    # Four spread trials over 1e-4..1 (log): one learning rate in each decade, whatever the seed; two: one in each
    # half. Drawn at random instead, two of four often fall in one decade and leave another untried.
    for count in (2, 4):
        folder = tmp_path / str(count)
        folder.mkdir()
        hidden, warmup = "model.hidden=tag(log, int(interval(8, 64)))", "optimizer.warmup_epochs=choice(0, 1)"
        the_plan = _plan("norm=bn", LR, hidden, warmup)
        facts = [{"seed": seed, "epochs": 4, "metric": "val_acc"}]
        studies = Studies(folder, the_plan, _settings(n_trials=count, startup_trials=count, n_jobs=count), facts)
        params = [job.params for job in studies.next_round()]
        parts = sorted(int((math.log10(p["optimizer.lr"]) + 4) / 4 * count) for p in params)
        assert parts == list(range(count)), [p["optimizer.lr"] for p in params]
        widths = sorted(p["model.hidden"] for p in params)  # integers: one below the range's middle, one above
        assert len(set(widths)) == count and 8 <= widths[0] <= 22 < widths[-1] <= 64, widths
        assert sorted(p["optimizer.warmup_epochs"] for p in params) == sorted([0, 1] * (count // 2))


def test_a_study_resumed_with_a_larger_start_goes_on_with_the_same_spread(tmp_path: Path) -> None:
    # Four trials run, then the same command with n_trials=8 startup_trials=8: trials 5-8 are the spread's next
    # four points (which fill the decades' other halves), not TPE's random start (measured on Fashion-MNIST: four
    # draws, all in 1e-2..1e-1). Asked once each: a third run with the same settings queues nothing again.
    hidden = "model.hidden=tag(log, int(interval(8, 64)))"
    the_plan = _plan("norm=bn", LR, hidden)
    first = _studies(tmp_path, the_plan, n_trials=4, startup_trials=4, n_jobs=4)
    _end(first, first.next_round())
    again = _studies(tmp_path, the_plan, n_trials=8, startup_trials=8, n_jobs=4)
    later = [job.params for job in again.next_round()]
    assert later == spread(again.distributions, 8, seed=0)[4:]
    halves = sorted(int((math.log10(p["optimizer.lr"]) + 4) * 2) for p in [*later, *spread(again.distributions, 4, 0)])
    assert halves == list(range(8))  # the eight learning rates: one in each half-decade of 1e-4..1
    _end(again, [])  # the coordinator stops with the four running; the next run resumes them, nothing more
    third = _studies(tmp_path, the_plan, n_trials=8, startup_trials=8, n_jobs=4)
    resumed = third.next_round()
    assert [job.params for job in resumed] == later
    _end(third, resumed)
    assert third.next_round() == []
    waiting = optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path)).get_trials(
        states=(optuna.trial.TrialState.WAITING,)
    )
    assert waiting == []


def test_a_study_stopped_with_spread_trials_still_queued_asks_each_once_on_resume(tmp_path: Path) -> None:
    # Five trials, four spread: one ended and three still queued when the coordinator stopped. The next run asks
    # those three and one of TPE's, and queues none of the three again (a second copy would be a trial that finds
    # the first one's folder: a study of five with four settings).
    the_plan = _plan("norm=bn", LR)
    first = _studies(tmp_path, the_plan, n_trials=5, n_jobs=1)
    _end(first, first.next_round())
    again, asked = _studies(tmp_path, the_plan, n_trials=5, n_jobs=1), []
    while jobs := again.next_round():
        asked += [job.params["optimizer.lr"] for job in jobs]
        _end(again, jobs)
    assert len(asked) == 4 and len(set(asked)) == 4, asked
    assert {p["optimizer.lr"] for p in spread(again.distributions, 4, seed=0)[1:]} <= set(asked)
    study = optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path))
    assert len(study.trials) == 5 and not study.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_a_resumed_sweep_reruns_the_trials_left_running_and_counts_the_ended_ones(tmp_path: Path) -> None:
    the_plan = _plan("norm=bn", LR)
    first = _studies(tmp_path, the_plan, n_trials=4)
    _end(first, first.next_round())
    _end(first, first.next_round(), status="pruned")
    left = first.next_round()  # the coordinator is killed while this trial trains
    again = _studies(tmp_path, the_plan, n_trials=4)
    resumed = again.next_round()
    assert [(j.number, j.params) for j in resumed] == [(left[0].number, left[0].params)]  # the same trial, not new
    _end(again, resumed)
    last = again.next_round()
    assert [j.number for j in last] == [3]
    _end(again, last)
    assert again.next_round() == []
    states = [t.state.name for t in optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path)).trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"]


def test_a_failed_trial_counts_now_and_is_asked_again_once_with_the_same_values_on_the_next_run(
    tmp_path: Path,
) -> None:
    the_plan = _plan("norm=bn", LR)
    first = _studies(tmp_path, the_plan, n_trials=2)
    failed = first.next_round()
    _end(first, failed, status="failed")
    _end(first, first.next_round())
    assert first.next_round() == []  # the failure counted: this run ends
    again = _studies(tmp_path, the_plan, n_trials=2)
    retry = again.next_round()
    assert [j.params for j in retry] == [failed[0].params]
    _end(again, retry)
    assert again.next_round() == []


def test_a_diverged_trial_counts_as_learning_nothing(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn", LR), n_trials=1)
    job = studies.next_round()[0]
    line = studies.tell(job, {"status": "diverged", "final_val_acc": float("nan")})
    assert "diverged" in line and "1 of 1 trials done" in line
    assert optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path)).trials[0].value == 0.0


def test_confirmation_runs_train_each_studys_best_setting_with_fresh_seeds(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn,gn", LR, "seed=0"), n_trials=3)
    while jobs := studies.next_round():
        for job in jobs:
            studies.tell(job, {"status": "completed", "final_val_acc": 50 + 10 * job.number})
    confirm = studies.confirmations(3)
    assert len(confirm) == 6
    for job in confirm:
        best = studies.best(job.study)
        assert best.number == 2 and job.params == best.params and job.phase == "confirm"
        assert json.loads(job.env()[TRIAL_ENV])["phase"] == "confirm"
    assert [o for o in confirm[0].overrides if o.startswith("seed=")] == ["seed=1"]
    assert [j.overrides[-1] for j in confirm[:3]] == ["seed=1", "seed=2", "seed=3"]


# --- a job's side of its trial ------------------------------------------------------------------------------------


def _job_trial(studies: Studies, job) -> JobTrial:
    return JobTrial.from_env({TRIAL_ENV: job.env()[TRIAL_ENV]})


def test_a_job_far_behind_the_studys_better_trials_is_stopped_and_one_ahead_goes_on(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn", LR), n_trials=8, pruner="successive_halving")
    for _ in range(4):  # four good trials, each reporting its epochs as a job does
        job = studies.next_round()[0]
        trial = _job_trial(studies, job)
        assert not any(trial.should_stop(epoch, 80.0 + epoch, final=epoch == 4) for epoch in range(1, 5))
        studies.tell(job, {"status": "completed", "final_val_acc": 84.0})
    poor = _job_trial(studies, studies.next_round()[0])
    assert poor.should_stop(1, 12.0)  # far below every trial at epoch 1
    good = _job_trial(studies, studies.next_round()[0])
    assert not good.should_stop(1, 95.0)


def test_a_trial_at_chance_is_stopped_once_another_trial_of_its_study_learned(tmp_path: Path) -> None:
    # Hyperband's brackets wait up to 3 of 5 epochs before their first cut; a trial no better than naming the largest
    # class (the floor the job passes) is stopped after min_epochs, but only where another trial did better there.
    studies = _studies(tmp_path, _plan("norm=bn,gn", LR), n_trials=3)
    first = [_job_trial(studies, job) for job in studies.next_round()]  # one trial of each study
    assert not first[0].should_stop(1, 9.0, floor=12.0)  # at chance, but nothing in its study learned: goes on
    assert not first[1].should_stop(1, 60.0, floor=12.0)
    jobs = studies.next_round()
    again = {job.study: _job_trial(studies, job) for job in jobs}
    stopped = again["norm=gn"]
    assert stopped.should_stop(1, 11.0, floor=12.0) and "no better than naming the largest class" in stopped.why
    assert not again["norm=bn"].should_stop(1, 11.0, floor=12.0)  # its study's other trial was at chance too
    assert not again["norm=bn"].should_stop(2, 30.0, floor=12.0)  # and above the floor: the pruner decides
    (tmp_path / "off").mkdir()
    off = _studies(tmp_path / "off", _plan("norm=bn", LR), n_trials=2, pruner="none")
    _job_trial(off, off.next_round()[0]).should_stop(1, 60.0, floor=12.0)
    assert not _job_trial(off, off.next_round()[0]).should_stop(1, 5.0, floor=12.0)  # pruner=none: every epoch


def test_a_resumed_job_reports_each_epoch_once_and_the_last_epoch_is_never_pruned(tmp_path: Path) -> None:
    studies = _studies(tmp_path, _plan("norm=bn", LR), n_trials=2)
    job = studies.next_round()[0]
    _job_trial(studies, job).should_stop(1, 50.0)
    again = _job_trial(studies, job)  # the job's process was killed, and its folder resumes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of a step reported twice
        again.should_stop(1, 50.0)
        assert not again.should_stop(2, 1.0, final=True)
    trial = optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path)).trials[0]
    assert trial.intermediate_values == {1: 50.0, 2: 1.0}


def test_with_best_val_acc_a_resumed_job_reports_the_best_of_all_its_epochs(tmp_path: Path) -> None:
    the_plan = _plan("norm=bn", LR)
    studies = Studies(tmp_path, the_plan, _settings(n_trials=1), [{"seed": 0, "epochs": 4, "metric": "best_val_acc"}])
    job = studies.next_round()[0]
    _job_trial(studies, job).should_stop(1, 80.0)
    _job_trial(studies, job).should_stop(2, 70.0)  # resumed in a new process: epoch 1's 80 is still the best
    trial = optuna.load_study(study_name="norm=bn", storage=open_storage(tmp_path)).trials[0]
    assert trial.intermediate_values == {1: 80.0, 2: 80.0}


def test_a_confirmation_run_is_never_stopped() -> None:
    trial = JobTrial({"phase": "confirm", "study": "norm=bn"})
    assert not trial.should_stop(1, 0.0)
    assert trial.record == {"study": "norm=bn", "phase": "confirm", "number": None, "searched": None}


def test_a_second_coordinator_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    with one_coordinator(tmp_path):
        with pytest.raises(
            ConfigError, match=f"another tuning sweep is running in {tmp_path} \\(process {os.getpid()}"
        ):
            with one_coordinator(tmp_path):
                pass
    with one_coordinator(tmp_path):  # released when the first ended
        pass


def test_without_optuna_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"pip install 'normsweep\[tune\]'"):
        optuna_module()


# --- whole sweeps, as a user runs them ----------------------------------------------------------------------------

TUNE = ["-m", "hydra/sweeper=tune", "norm=bn,gn", LR, "dataset.train_size=200", "diagnostics=false"]


def _summaries(sweep: Path) -> list[dict]:
    return [
        json.loads((d / "summary.json").read_text()) for d in sorted(sweep.iterdir()) if (d / "summary.json").is_file()
    ]


def _trials(sweep: Path) -> dict[str, list[str]]:
    storage = open_storage(sweep)
    names = optuna.get_all_study_names(storage)
    return {n: [t.state.name for t in optuna.load_study(study_name=n, storage=storage).trials] for n in names}


def test_a_tuning_sweep_trains_n_trials_per_norm_and_a_rerun_trains_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TUNE, "epochs=3", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"]
    done = run_cli_here(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(sweep)
    assert sorted(trials) == ["norm=bn", "norm=gn"] and all(len(t) == 4 for t in trials.values())
    summaries = _summaries(sweep)
    assert len(summaries) == 8
    assert {s["trial"]["study"] for s in summaries} == {"norm=bn", "norm=gn"}
    assert all(s["status"] in ("completed", "pruned", "diverged", "stalled") for s in summaries)
    pruned = [s for s in summaries if s["status"] == "pruned"]
    assert all(s["epochs_completed"] < 3 and s["test_acc"] is not None for s in pruned)
    assert "study norm=bn: trial 3" in done.stdout + done.stderr
    assert (sweep / "results.csv").is_file() and (sweep / "best_by_norm.csv").is_file()
    again = run_cli_here(args, tmp_path)
    assert again.returncode == 0
    assert "Epoch 1/3" not in again.stdout + again.stderr  # nothing trained twice
    assert _trials(sweep) == trials and len(_summaries(sweep)) == 8


def test_a_killed_tuning_sweep_resumes_to_exactly_n_trials_per_norm(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TUNE, "epochs=6", "hydra.sweeper.n_trials=5", "dataset.train_size=400", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "normsweep", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_finished(sweep)) < 3:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_before = {d: (d / "summary.json").stat().st_mtime_ns for d in _finished(sweep)}
    assert 3 <= len(finished_before) < 10, "the sweep was not killed mid-way"
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(sweep)
    assert {n: len(t) for n, t in trials.items()} == {"norm=bn": 5, "norm=gn": 5}
    assert all(state in ("COMPLETE", "PRUNED") for states in trials.values() for state in states)
    for folder, mtime in finished_before.items():  # the trials that had ended are not trained again
        assert (folder / "summary.json").stat().st_mtime_ns == mtime
    assert len(_summaries(sweep)) == 10


def _finished(sweep: Path) -> list[Path]:
    if not sweep.is_dir():
        return []
    return [
        d
        for d in sweep.iterdir()
        if (d / "summary.json").is_file()
        and json.loads((d / "summary.json").read_text() or "{}").get("status") in ("completed", "pruned", "diverged")
    ]


def test_on_joblib_two_trials_at_once_no_trial_is_counted_twice(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        *TUNE,
        "optimizer.warmup_epochs=choice(0, 1)",  # a second searched key, a choice
        "epochs=2",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lock" not in (done.stdout + done.stderr).lower()
    trials = _trials(sweep)
    assert {n: len(t) for n, t in trials.items()} == {"norm=bn": 4, "norm=gn": 4}
    summaries = _summaries(sweep)
    numbers = sorted((s["trial"]["study"], s["trial"]["number"]) for s in summaries)
    assert numbers == [(n, i) for n in ("norm=bn", "norm=gn") for i in range(4)]  # one folder per trial
    assert {s["config"]["optimizer"]["warmup_epochs"] for s in summaries} <= {0, 1}
    assert all(s["trial"]["searched"] == ["optimizer.lr", "optimizer.warmup_epochs"] for s in summaries)


def test_the_tune_preset_runs_as_documented_with_its_figure_and_tables(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    small = ["norm=bn,gn", "epochs=2", "hydra.sweeper.n_trials=3", "dataset.train_size=200", "diagnostics=false"]
    done = run_cli_here(["-m", "experiment=tune", *small, f"hydra.sweep.dir={sweep}"], tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "tuning: 2 studies (norm=bn, norm=gn), 3 trials each, searching optimizer.lr in [0.0001, 1] (log)" in output
    assert "tuned by search: 2 studies (norm), 3 trials each" in output
    assert (sweep / "search.png").read_bytes()[:4] == b"\x89PNG"
    best = (sweep / "best_by_norm.csv").read_text().splitlines()
    assert best[0].startswith("norm,") and "optimizer.lr" in best[0] and len(best) == 3
    assert "## Search" in (sweep / "report.md").read_text()


def test_confirmation_runs_follow_the_search(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TUNE, "epochs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.confirm_seeds=2", f"hydra.sweep.dir={sweep}"]
    done = run_cli_here(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    confirm = [s for s in _summaries(sweep) if s["trial"]["phase"] == "confirm"]
    assert sorted((s["norm"], s["seed"]) for s in confirm) == [("bn", 1), ("bn", 2), ("gn", 1), ("gn", 2)]
    assert all(s["status"] != "pruned" and s["epochs_completed"] == 2 for s in confirm)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["optimizer.lr=interval(1, 0.1)"], "optimizer.lr=interval(1, 0.1): the interval's low end"),
        (["optimizer.lr=tag(log, interval(0, 1))"], "a log-scale interval cannot reach 0"),
        (["optimizer.lrr=tag(log, interval(1e-4, 1))"], "did you mean optimizer.lr"),
        ([LR, "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0"),
        (["norm=bn,gn"], "searches nothing"),
        ([LR, "hydra.sweeper.pruner=asha"], "hydra.sweeper.pruner=asha: no such pruner"),
        ([LR, "compare_metric=test_acc"], "compare_metric=test_acc"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_folder_is_written(tmp_path: Path, extra: list[str], said: str) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", "hydra/sweeper=tune", *extra, "epochs=1", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=60)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and said in lines[0], lines
    assert not sweep.exists()


def test_an_interval_given_to_the_grid_sweeper_names_the_tuning_sweeper(tmp_path: Path) -> None:
    done = run_cli(["-m", "norm=bn", LR, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=60)
    assert done.returncode == 2 and "hydra/sweeper=tune" in done.stderr


def test_optuna_dashboard_opens_the_sweeps_storage(tmp_path: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install 'normsweep[tune]')")
    import socket
    import urllib.request

    studies = _studies(tmp_path, _plan("norm=bn,gn", LR), n_trials=2)
    while jobs := studies.next_round():
        _end(studies, jobs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),  # the command its docs give
            str(tmp_path / STORAGE_FILE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        answer = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.2)
        assert answer is not None, "optuna-dashboard did not answer"
        assert sorted(s["study_name"] for s in answer["study_summaries"]) == ["norm=bn", "norm=gn"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_sweepers_defaults_are_those_its_yaml_documents() -> None:
    import inspect

    import yaml

    from hydra_plugins.normsweep_sweeper.tuning_sweeper import TuningSweeper
    from normsweep.config.schema import config_dir

    documented = yaml.safe_load((Path(config_dir()) / "hydra" / "sweeper" / "tune.yaml").read_text())
    coded = {k: p.default for k, p in inspect.signature(TuningSweeper.__init__).parameters.items() if k != "self"}
    assert {k: v for k, v in documented.items() if k != "_target_"} == {
        k: coded[k] for k in documented if k != "_target_"
    }


def test_a_second_tuning_sweep_on_a_running_ones_folder_is_refused_and_trains_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with one_coordinator(sweep):  # a first coordinator, running
        done = run_cli([*TUNE, "epochs=1", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=120)
    assert done.returncode == 2
    assert f"another tuning sweep is running in {sweep}" in done.stdout + done.stderr
    assert not (sweep / STORAGE_FILE).exists() and not (sweep / "multirun.yaml").exists()
    assert not any(p.is_dir() for p in sweep.iterdir())  # no job folder
