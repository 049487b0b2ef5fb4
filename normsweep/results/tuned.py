"""A tuning sweep's tables (hydra/sweeper=tune), from its jobs' trial records: which runs results.csv compares (each
study's confirmation runs, else its best completed search trial), how many trials each study ran and how many were
pruned, each study's best setting, and the sentence that says what the search did. pandas only: nothing here knows
Optuna, and a grid's jobs (no trial record) never come here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from normsweep.sweep.files import CONFIRM, SEARCH, TRIAL_KEY, Status

TRIAL_COLUMNS = ("study", "phase", "trial")  # runs.csv's columns from the trial record
COUNT_COLUMNS = ("trials", "pruned")  # results.csv's columns per study
# A study's best search trial is its best completed one; a diverged or stalled one only when none completed. A pruned
# trial is never a candidate: its accuracy is that of the epoch it was stopped at, not of a trained model.
CANDIDATES = ((Status.COMPLETED,), (Status.DIVERGED, Status.STALLED))
CONFIRM_OPTION = "hydra.sweeper.confirm_seeds"


def trial_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """runs.csv's study, phase and trial (the Optuna trial number; none for a confirmation run) of a job's
    summary.json; nothing for a grid's job."""
    record = summary.get(TRIAL_KEY)
    if not isinstance(record, dict):
        return {}
    return {"study": record.get("study"), "phase": record.get("phase"), "trial": record.get("number")}


def searched_keys(summary: dict[str, Any]) -> list[str]:
    """The keys the job's study searched (optimizer.lr, ...); none for a grid's job."""
    record = summary.get(TRIAL_KEY)
    searched = record.get("searched") if isinstance(record, dict) else None
    return [str(key) for key in searched] if isinstance(searched, list) else []


@dataclass
class Tuning:
    """What a tuning sweep's jobs say beyond a grid's."""

    searched: list[str]  # the keys the studies searched
    grid: list[str]  # the other keys: one study per combination of their values
    studies: pd.DataFrame  # one row per study: its grid values, trials, pruned, completed, and its best search trial
    compared: pd.DataFrame  # the runs results.csv compares, and a row without a result for a study that has none
    confirmed: bool  # whether any confirmation run exists: then results.csv compares those only

    def shown_grid(self) -> list[str]:
        """The grid keys whose value differs between the studies: what names a study (norm)."""
        return [key for key in self.grid if self.studies[key].nunique(dropna=False) > 1]


def tuning(runs: pd.DataFrame, keys: list[str], searched: list[str], metric: str) -> Tuning | None:
    """A tuning sweep's studies and compared runs from runs.csv's rows (`keys`: the override keys, `metric`: the
    compared one); None for a grid's jobs."""
    if "phase" not in runs or not runs["phase"].notna().any():
        return None
    searched = [key for key in searched if key in keys]
    grid = [key for key in keys if key not in searched]
    studies = study_rows(runs, grid, searched, metric)
    confirmed = bool((runs["phase"] == CONFIRM).any())
    return Tuning(searched, grid, studies, compared_runs(runs, studies, grid, searched, confirmed), confirmed)


def best_trial(trials: pd.DataFrame, metric: str) -> pd.Series | None:
    """The search trial with the best `metric` among the completed ones (else the diverged or stalled ones); None
    when no trial qualifies (all pruned, failed or not yet done)."""
    for statuses in CANDIDATES:
        pool = trials[trials["status"].isin(statuses) & trials[metric].notna()]
        if len(pool):
            return pool.loc[pd.to_numeric(pool[metric]).idxmax()]
    return None


def study_rows(runs: pd.DataFrame, grid: list[str], searched: list[str], metric: str) -> pd.DataFrame:
    """One row per study, in the order of its first job: its grid values; its search trials, how many were pruned
    and how many completed; and its best search trial's searched values, trial number, accuracies, status and job."""
    figures = list(dict.fromkeys([metric, "val_acc", "test_acc"]))
    best_columns = [*searched, "trial", *figures, "status", "job"]
    rows = []
    for study, jobs in runs[runs["study"].notna()].groupby("study", sort=False):
        trials = jobs[jobs["phase"] == SEARCH]
        best = best_trial(trials, metric)
        rows.append(
            {
                "study": study,
                **{key: jobs[key].iloc[0] for key in grid},
                "trials": len(trials),
                "pruned": int((trials["status"] == Status.PRUNED).sum()),
                "completed": int((trials["status"] == Status.COMPLETED).sum()),
                **{column: None if best is None else best[column] for column in best_columns},
            }
        )
    studies = pd.DataFrame(rows, columns=["study", *grid, "trials", "pruned", "completed", *best_columns])
    studies["trial"] = studies["trial"].astype("Int64")
    return studies


def compared_runs(
    runs: pd.DataFrame, studies: pd.DataFrame, grid: list[str], searched: list[str], confirmed: bool
) -> pd.DataFrame:
    """The runs results.csv compares: the confirmation runs of each study's best setting when any confirmation
    exists (trained again with fresh seeds), else each study's best search trial; a study with none of them gets a
    row of its grid values and no result, which says why (its status). A confirmation of a setting that is no
    longer its study's best (the study was resumed with more trials and found a better one) stays in runs.csv and
    out of the table."""
    if confirmed:
        bests = studies[["study", *searched]].dropna(subset=searched, how="all")
        chosen = runs[runs["phase"] == CONFIRM].merge(bests, on=["study", *searched])  # in runs' order
    else:
        chosen = runs[runs["job"].isin(studies["job"].dropna())]
    missing = studies[~studies["study"].isin(chosen["study"])]
    if not len(missing):
        return chosen
    why = "not confirmed" if confirmed else "no trial completed"
    empty = missing[["study", *grid]].assign(phase=CONFIRM if confirmed else SEARCH, status=why)
    return pd.concat([chosen, empty.reindex(columns=runs.columns)], ignore_index=True)


def with_counts(results: pd.DataFrame, tuning: Tuning) -> pd.DataFrame:
    """results.csv (one row per study, with its `study`) with each study's `trials` and `pruned` before `runs`."""
    counts = tuning.studies.set_index("study")
    at = results.columns.get_loc("runs")
    for offset, column in enumerate(COUNT_COLUMNS):
        results.insert(at + offset, column, results["study"].map(counts[column]).astype("Int64"))
    return results


def study_table(tuning: Tuning, metric: str, data_keys: list[str]) -> pd.DataFrame:
    """Each study (by the grid keys that tell them apart) with its trials, pruned and completed ones, and its best
    completed search trial: the values found, the trial's number, accuracies, status and job; best `metric` first
    (within each data set of `data_keys`)."""
    figures = [metric, "val_acc", "test_acc"]
    counts = ["trials", "pruned", "completed"]
    columns = [*tuning.shown_grid(), *counts, *tuning.searched, "trial", *figures, "status", "job"]
    table = tuning.studies[list(dict.fromkeys(columns))]
    context = [key for key in data_keys if key in table]
    order, ascending = [*context, metric], [True] * len(context) + [False]
    return table.sort_values(order, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def best_table(tuning: Tuning, metric: str, data_keys: list[str], axis: str, value: Any) -> pd.DataFrame:
    """best_by_<axis>.csv of a tuning sweep: the study table with each study's value of the compared `axis` first
    (`value` when the studies do not set it)."""
    table = study_table(tuning, metric, data_keys)
    if axis not in table:
        table.insert(0, axis, value)
    return table[[axis, *(c for c in table.columns if c != axis)]]


def _span(counts: list[int]) -> str:
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _seeds(seeds: list[int]) -> str:
    """`seed 1-3`, `seed 4` or `seeds 1, 5, 9`."""
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seed {seeds[0]}-{seeds[-1]}"
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(str(s) for s in seeds)


def confirmation(tuning: Tuning) -> str:
    """What each row of results.csv is: the confirmed best setting (how many seeds, which), or the best trial."""
    if not tuning.confirmed:
        return (
            f"each row is the study's best completed trial (one run: McNemar's test); confirm with {CONFIRM_OPTION}=3"
        )
    runs = tuning.compared[tuning.compared["seed"].notna()]
    by_study = [tuple(sorted({int(s) for s in jobs["seed"]})) for _, jobs in runs.groupby("study", sort=False)]
    if not by_study:
        return "each row is the study's best setting; no confirmation run has a result yet"
    most = max(len(seeds) for seeds in by_study)
    which = _seeds(list(by_study[0])) if len(set(by_study)) == 1 else "each study's own fresh seeds"
    return f"each row is the study's best setting, confirmed with {most} seed{'s' if most > 1 else ''} ({which})"


def search_sentence(tuning: Tuning) -> str:
    """`tuned by search: 5 studies (norm), 12 trials each, 31 pruned; each row is ...`."""
    studies = tuning.studies
    shown = tuning.shown_grid()
    count = f"{len(studies)} stud{'ies' if len(studies) != 1 else 'y'}" + (f" ({', '.join(shown)})" if shown else "")
    trials = _span([int(n) for n in studies["trials"]])
    each = " each" if len(studies) > 1 else ""
    return (
        f"tuned by search: {count}, {trials} trials{each}, {int(studies['pruned'].sum())} pruned; "
        f"{confirmation(tuning)}"
    )
