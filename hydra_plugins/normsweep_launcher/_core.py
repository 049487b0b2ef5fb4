"""The SLURM launcher's logic: the request fitted to the partition, upstream's launch held from waiting, the wait."""

from __future__ import annotations  # imported as any module is, not exec'd by Hydra's plugin scan (see `_` names)

import contextlib
import importlib.metadata
import io
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict

from hydra_plugins.normsweep_launcher.config import AUTO
from normsweep.config.errors import ConfigError
from normsweep.job.signals import stopped_by
from normsweep.sweep import scheduler

if TYPE_CHECKING:
    from hydra_plugins.normsweep_launcher.slurm_launcher import SlurmLauncher

log = logging.getLogger(__name__)

CPUS_AT_MOST = 8  # what `auto` asks for per job at most: a GPU job's data pipeline needs no more
MEM_GB_AT_MOST = 32
CHECK_RESULTS_S = 2  # how often the result files are looked for (a file test); squeue is asked every poll_s
HEARTBEAT_S = 300  # the progress line is printed when a count changes, and at least this often
TESTED_UPSTREAM = ">=1.2,<1.3"  # the hydra-submitit-launcher releases whose launch this module builds on

Launch = Callable[[Sequence[Sequence[str]], int], Any]  # upstream's launch(job_overrides, initial_job_idx)


class Request(NamedTuple):
    """What each job asks SLURM for, `auto` resolved; None: the key is not passed to sbatch."""

    gpus_per_node: int | None
    cpus_per_task: int | None
    mem_gb: int | None


# The request, fitted to the partition.


def _count(params: Mapping[str, Any], key: str, least: int) -> Any:
    value = params.get(key)
    if value is None or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(
            f"hydra.launcher.{key}={value}: give a whole number ({least} or more), auto (what the partition's nodes "
            "offer) or null (leave it to SLURM)"
        )
    return value


def fit(partition: scheduler.Partition, params: Mapping[str, Any]) -> Request:
    """Resolve `auto` against what the partition's nodes offer, and refuse a request no node can ever satisfy,
    naming the key to change. `params` are the launcher's keys (gpus_per_node, cpus_per_task, mem_gb, ...)."""
    where = f"partition {partition.name}" if partition.name else "the default partition"
    gpus = _count(params, "gpus_per_node", 0)
    cpus = _count(params, "cpus_per_task", 1)
    mem_gb = _count(params, "mem_gb", 1)
    tasks = int(params.get("tasks_per_node") or 1)

    if gpus == AUTO:
        gpus = 1 if not params.get("gres") and any(node.gpus for node in partition.nodes) else None
    nodes = [node for node in partition.nodes if node.gpus >= (gpus or 0)]
    if not nodes:
        most = max(node.gpus for node in partition.nodes)
        fix = f"at most {most} GPUs per node: set hydra.launcher.gpus_per_node={most} or less" if most else "no GPUs"
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus}, but {where} has {fix}"
            + (
                ""
                if most
                else ": set hydra.launcher.gpus_per_node=auto to run on its CPUs, or name a partition with "
                "GPUs in NORMSWEEP_SLURM_PARTITION"
            )
        )

    if cpus == AUTO:
        shares = [node.cpus * gpus // node.gpus if gpus else node.cpus for node in nodes]
        cpus = None if params.get("cpus_per_gpu") else max(1, min(CPUS_AT_MOST, *shares) // tasks)
    elif cpus is not None:
        fitting = [node for node in nodes if node.cpus >= cpus * tasks]
        if not fitting:
            most = max(node.cpus for node in nodes) // tasks
            raise ConfigError(
                f"hydra.launcher.cpus_per_task={cpus}, but {where} has at most {most} CPUs per node"
                f"{' with ' + str(gpus) + ' GPU(s)' if gpus else ''}: set hydra.launcher.cpus_per_task={most} or "
                "less, or auto"
            )
        nodes = fitting

    if mem_gb == AUTO:
        if params.get("mem_per_cpu") or params.get("mem_per_gpu"):
            mem_gb = None
        else:
            taken = [max((cpus or 1) * tasks / node.cpus, gpus / node.gpus if gpus else 0) for node in nodes]
            most = min(MEM_GB_AT_MOST, *(int(node.mem_mb * share) // 1024 for node, share in zip(nodes, taken)))
            mem_gb = most if most >= 1 else None  # a node without a memory figure: let SLURM decide
    elif mem_gb is not None and not any(node.mem_mb >= mem_gb * 1024 for node in nodes):
        most = max(node.mem_mb for node in nodes) // 1024
        raise ConfigError(
            f"hydra.launcher.mem_gb={mem_gb}, but {where} has at most {most} GB per node: set "
            f"hydra.launcher.mem_gb={most} or less, or auto"
        )
    return Request(gpus_per_node=gpus, cpus_per_task=cpus, mem_gb=mem_gb)


def check_time_limit(params: Mapping[str, Any]) -> None:
    """Refuse a warning signal that may arrive as the job starts: SLURM sends it up to 60 s before its time, and
    submitit answers it by requeueing the job (or, past max_num_timeout, by stopping it)."""
    limit_s, delay_s = int(params.get("timeout_min") or 0) * 60, int(params.get("signal_delay_s") or 0)
    if limit_s and limit_s - delay_s < 60:
        raise ConfigError(
            f"hydra.launcher.signal_delay_s={delay_s} leaves less than a minute of the time limit "
            f"(hydra.launcher.timeout_min={limit_s // 60}), and SLURM may send the signal up to 60 s early: the job "
            f"would be stopped as it starts. Set hydra.launcher.signal_delay_s={max(0, limit_s - 60)} or less, or "
            "raise hydra.launcher.timeout_min"
        )


def find_partition(name: str | None, known: Mapping[str, scheduler.Partition]) -> scheduler.Partition:
    """The partition the jobs go to (None: the cluster's default); a comma list is one partition of all its nodes."""
    listed = ", ".join(sorted(p for p in known if p)) or "none"
    if not name:
        if "" not in known:
            raise ConfigError(
                f"this cluster has no default partition: name one with NORMSWEEP_SLURM_PARTITION (sinfo lists {listed})"
            )
        return known[""]
    names = [part.strip() for part in name.split(",") if part.strip()]
    unknown = [part for part in names if part not in known]
    if unknown:
        raise ConfigError(
            f"partition {unknown[0]} does not exist on this cluster (sinfo lists {listed}): set "
            "NORMSWEEP_SLURM_PARTITION or hydra.launcher.partition to one of them"
        )
    return scheduler.Partition(name, tuple(node for part in names for node in known[part].nodes))


def setup(launcher: SlurmLauncher) -> None:
    """Fit the request to the partition, before the sweeper writes anything: a request that cannot run leaves no
    sweep folder behind. The fitted request goes into `launcher.params`, which upstream's launch hands to submitit."""
    from normsweep.sweep.resume import refuse

    try:
        try:
            known = scheduler.partitions()
        except scheduler.SchedulerUnavailable as err:
            raise ConfigError(f"hydra/launcher=slurm submits to a SLURM cluster, but {err}") from None
        check_time_limit(launcher.asked)
        partition = find_partition(launcher.asked.get("partition"), known)
        launcher.partition, launcher.request = partition.name, fit(partition, launcher.asked)
    except ConfigError as err:
        refuse(err)
    launcher.params.update(launcher.request._asdict())


# Submission: upstream's own launch, held from waiting.


class UpstreamChanged(ConfigError):
    """The installed hydra-submitit-launcher launches otherwise than the releases this module was tested with."""

    def __init__(self, what: str) -> None:
        try:
            version = importlib.metadata.version("hydra-submitit-launcher")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        super().__init__(
            f"hydra-submitit-launcher {version} launches otherwise than normsweep's SLURM launcher builds on ({what}): "
            f"install a tested release with pip install 'hydra-submitit-launcher{TESTED_UPSTREAM}'"
        )


class _Handed:
    """What upstream's launch gets back for each job it submits: `results()` answers at once (normsweep waits for
    the real job itself); anything else upstream asks of it is a change this module has not been tested with."""

    def results(self) -> list[None]:
        return [None]

    def __getattr__(self, name: str) -> Any:
        raise UpstreamChanged(f"its launch asks a submitted job for {name!r}, not results()")


@contextlib.contextmanager
def held_jobs() -> Iterator[list[Any]]:
    """While upstream's launch runs inside: the executor it builds (`submitit.AutoExecutor`, looked up as it
    launches) is submitit's own, but the jobs its `map_array` submits are kept in the list yielded, and upstream is
    handed stand-ins whose `results()` does not wait."""
    import submitit

    held: list[Any] = []
    built = submitit.AutoExecutor

    class Holding(built):
        def map_array(self, fn: Callable[..., Any], *iterable: Any) -> list[Any]:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too: said once, later
                jobs = super().map_array(fn, *iterable)
            held.extend(jobs)
            return [_Handed() for _ in jobs]

        def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            raise UpstreamChanged("its launch submits each job with submit(), not map_array()")

    submitit.AutoExecutor = Holding
    try:
        yield held
    finally:
        submitit.AutoExecutor = built


@dataclass
class _Job:
    """One submitted job while the launcher waits for it."""

    num: int
    cfg: DictConfig  # the job's config as the job composes it, composed once at submission
    submitted: Any  # submitit's Job
    result: JobReturn | None = None
    state: str = "PENDING"
    raw_id: str = ""
    gone_since: float | None = None  # when SLURM first said it had ended with no result file yet
    stuck_since: float | None = None  # when it was first seen pending for a reason that does not resolve
    failed: bool = False

    @property
    def job_id(self) -> str:
        return str(self.submitted.job_id)

    @property
    def job_dir(self) -> Path:
        return Path(str(self.cfg.hydra.sweep.dir)) / str(self.cfg.hydra.sweep.subdir)


def _job_config(launcher: SlurmLauncher, overrides: list[str], num: int) -> DictConfig:
    """The job's config as the job itself composes it: where its folder is, and what to record there."""
    assert launcher.hydra_context is not None and launcher.config is not None
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
    return cfg


def _submit(
    launcher: SlurmLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, submit: Launch
) -> list[_Job]:
    """Submit the jobs through upstream's launch (one array, with the fitted request), without its wait."""
    from submitit.core.utils import FailedJobError

    from normsweep.sweep.resume import refuse

    gpus, cpus, mem_gb = launcher.request
    log.info(
        "slurm: submitting %d job%s to partition %s, %sasking for %s, %s and %s",
        len(job_overrides),
        "s" if len(job_overrides) > 1 else "",
        launcher.partition,
        "each " if len(job_overrides) > 1 else "",
        f"{cpus} CPU{'s' if cpus > 1 else ''}" if cpus else "SLURM's default CPUs",
        f"{mem_gb} GB" if mem_gb else "SLURM's default memory",
        f"{gpus} GPU{'s' if gpus > 1 else ''}" if gpus else "no GPU",
    )
    cfgs = [_job_config(launcher, list(o), num) for num, o in enumerate(job_overrides, start=initial_job_idx)]
    with held_jobs() as submitted:
        try:
            submit(job_overrides, initial_job_idx)
            if len(submitted) != len(job_overrides):
                raise UpstreamChanged(
                    f"its launch submitted {len(submitted)} of {len(job_overrides)} jobs through map_array()"
                )
        except FailedJobError as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            refuse(ConfigError(f"sbatch refused the jobs: {lines[-1] if lines else err}"))
        except UpstreamChanged as err:
            if submitted:  # nothing left queued that no one waits for
                scheduler.cancel([str(job.job_id) for job in submitted])
            refuse(err)
    return [_Job(cfg.hydra.job.num, cfg, job) for cfg, job in zip(cfgs, submitted)]


# The wait.


def _metric_rows(job_dir: Path) -> int:
    from normsweep.sweep.files import METRICS_FILE

    try:
        lines = (job_dir / METRICS_FILE).read_text().splitlines()
    except OSError:
        return 0
    return max(0, len([line for line in lines if line.strip()]) - 1)


class _SacctFilter(logging.Filter):
    """submitit logs `Bypassing sacct error` at each of its polls when accounting is off; this launcher says it
    once, and does not ask through submitit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


SACCT_FILTER = _SacctFilter()


def launch(
    launcher: SlurmLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, submit: Launch
) -> list[JobReturn]:
    """Submit through `submit` (upstream's launch), then wait for every job; a JobReturn for each."""
    logging.getLogger("submitit").addFilter(SACCT_FILTER)
    accounting = scheduler.accounting_available()
    if not accounting:
        log.warning(
            "slurm: accounting is off on this cluster (sacct does not answer): a job that ends without its "
            "result is noticed from squeue, without SLURM's reason"
        )
    jobs = _submit(launcher, job_overrides, initial_job_idx, submit)
    try:
        _Wait(launcher, jobs, accounting).run()
    except KeyboardInterrupt as err:
        left = [job for job in jobs if job.result is None]
        arrays = sorted({job.job_id.split("_")[0] for job in left})
        assert launcher.config is not None
        sweep_dir = launcher.config.hydra.sweep.dir
        log.warning(
            "stopped waiting; %d job%s go on in SLURM (scancel %s stops them). Once they have ended, "
            "python -m normsweep.aggregate %s writes the tables, and the same command with hydra.sweep.dir=%s "
            "resumes any that did not complete",
            len(left),
            "s" if len(left) > 1 else "",
            " ".join(arrays),
            sweep_dir,
            sweep_dir,
        )
        sys.exit(stopped_by(err)[1])
    return [job.result for job in jobs]  # every job has one once the wait is over


class _Wait:
    """Waits for the submitted jobs: asks squeue every `poll_s`, records a job that ended without its result in its
    folder, prints the progress."""

    def __init__(self, launcher: SlurmLauncher, jobs: list[_Job], accounting: bool) -> None:
        self.jobs, self.accounting = jobs, accounting
        self.params = launcher.params  # as submitted: the fitted request
        self.poll_s = max(1, int(launcher.own.get("poll_s") or 15))

    def run(self) -> None:
        shown: tuple[Any, ...] = ()
        shown_at = next_poll = 0.0
        unanswered = False
        while True:
            for job in self.jobs:
                if job.result is None and job.submitted.paths.result_pickle.exists():
                    self._collect(job)
            waiting = [job for job in self.jobs if job.result is None]
            now = time.monotonic()
            if waiting and now >= next_poll:
                next_poll = now + self.poll_s
                try:
                    entries = scheduler.queue(sorted({job.job_id.split("_")[0] for job in waiting}))
                    unanswered = False
                except scheduler.SchedulerUnavailable as err:
                    if not unanswered:
                        log.warning("slurm: %s; still waiting for the jobs", err)
                    unanswered = True
                else:
                    self._follow(waiting, entries, now)
            counts = self._counts()
            if counts != shown or now - shown_at >= HEARTBEAT_S:
                log.info("slurm: %s%s", ", ".join(f"{n} {what}" for what, n in counts), self._time_left(counts))
                shown, shown_at = counts, now
            if all(job.result is not None for job in self.jobs):
                return
            time.sleep(CHECK_RESULTS_S)

    def _follow(self, waiting: list[_Job], entries: dict[str, scheduler.QueueEntry], now: float) -> None:
        """Update each waiting job from squeue; record the ones that ended without a result or can never start."""
        ended: list[_Job] = []
        for job in waiting:
            entry = entries.get(job.job_id)
            if entry is not None:
                job.state, job.raw_id = entry.state, entry.raw_id or job.raw_id
            if entry is None or not entry.alive:
                # The result file can reach a shared file system after the job has left the queue: one more poll.
                job.gone_since = job.gone_since or now
                if now - job.gone_since >= self.poll_s:
                    ended.append(job)
                continue
            job.gone_since = None
            if entry.hopeless:
                job.stuck_since = job.stuck_since or now
                if now - job.stuck_since >= scheduler.patience_s(entry.reason):
                    scheduler.cancel([job.job_id])
                    self._record_end(
                        job,
                        f"SLURM cannot start job {job.job_id}: it is pending with reason {entry.reason}, which does "
                        "not resolve by itself (cancelled)",
                    )
            else:
                job.stuck_since = None
        if not ended:
            return
        ends = scheduler.job_ends([job.job_id for job in ended]) if self.accounting else {}
        for job in ended:
            if job.submitted.paths.result_pickle.exists():
                self._collect(job)
                continue
            if job.job_id in ends:
                how = scheduler.describe_end(*ends[job.job_id])
            elif job.job_id in entries:
                how = entries[job.job_id].state
            else:
                how = "it left the queue" + ("" if self.accounting else " (accounting is off: SLURM keeps no reason)")
            self._record_end(job, f"SLURM job {job.job_id} ended without a result: {how}{self._hint(job, how)}")

    def _hint(self, job: _Job, how: str) -> str:
        """What to change, for the ends a setting can prevent."""
        if how.startswith("TIMEOUT"):
            return (
                f" (time limit hydra.launcher.timeout_min={self.params.get('timeout_min')}, requeued at most "
                f"hydra.launcher.max_num_timeout={self.params.get('max_num_timeout')} times)"
            )
        try:
            stderr = job.submitted.paths.stderr.read_text(errors="replace")[-20000:]
        except OSError:
            stderr = ""
        asked = f"mem_gb, now {self.params['mem_gb']}" if self.params.get("mem_gb") else "mem_gb"
        for key in ("mem_per_cpu", "mem_per_gpu"):
            if self.params.get(key):
                asked = f"{key}, now {self.params[key]}"
        if how.startswith("OUT_OF_MEMORY") or "exceeded memory limit" in stderr or "oom-kill" in stderr.lower():
            return f" (out of memory: raise hydra.launcher.{asked})"
        if how.endswith((" 0:9", " 9:0")) or ": Killed" in stderr:  # SIGKILL: the OOM killer, or an administrator
            return f" (killed by SIGKILL; if it ran out of memory, raise hydra.launcher.{asked})"
        return ""

    def _collect(self, job: _Job) -> None:
        """The job's own return value, from submitit's result file."""
        from submitit.core.utils import pickle_load

        from normsweep.sweep.files import FINISHED
        from normsweep.sweep.liveness import load_summary

        outcome, value = pickle_load(job.submitted.paths.result_pickle)
        if outcome == "success" and isinstance(value, JobReturn):
            job.result = value
            job.failed = load_summary(job.job_dir)["status"] not in FINISHED
            job.state = "DONE"
            return
        lines = [line for line in str(value).splitlines() if line.strip()]
        self._record_end(job, f"SLURM job {job.job_id} raised outside training: {lines[-1] if lines else outcome}")

    def _record_end(self, job: _Job, reason: str) -> None:
        """Record the scheduler's reason in the job's folder (`incomplete` when it finished epochs, else `failed`)
        and give the job a JobReturn, unless the folder holds a finished result or another live job."""
        from normsweep.sweep.files import FINISHED, Status, record_failure
        from normsweep.sweep.liveness import load_summary
        from normsweep.sweep.resume import task_config

        cfg, job_dir = job.cfg, job.job_dir
        task_overrides = list(cfg.hydra.overrides.task)
        summary = load_summary(job_dir)
        status = summary["status"]
        ours = str(summary.get("slurm_job")) in {job.job_id, job.raw_id}
        job.state, job.failed = "ENDED", True
        job.result = JobReturn(
            overrides=task_overrides,
            working_dir=str(job_dir),
            task_name=str(cfg.hydra.job.name),
            status=JobStatus.COMPLETED,  # as a job that fails inside normsweep: its folder says what happened
            _return_value=None,
        )
        if status in FINISHED:
            job.failed = False  # it finished, though its result file went missing: the folder has the result
            return
        if status == Status.RUNNING and not ours:
            log.warning("%s: %s; the folder is left to the job that runs there now", job_dir, reason)
            return
        recorded = {} if status in (Status.NOT_STARTED, Status.CORRUPT) else summary  # what the job wrote itself
        epochs = _metric_rows(job_dir)
        record_failure(
            job_dir,
            reason,
            task_overrides,
            task_config(cfg),
            cfg.hydra.runtime.choices,
            status=Status.INCOMPLETE if epochs else Status.FAILED,
            recorded=recorded,
            slurm_job=recorded.get("slurm_job") or job.job_id,  # the SLURM job that trained there, else this one
            epochs_completed=epochs,
        )
        log.error("%s: %s", job_dir, reason)

    def _time_left(self, counts: tuple[tuple[str, int], ...]) -> str:
        """`; about 5 min 10 s left (...)`, from the epochs the jobs' folders hold (sweep/progress.py), with as many
        jobs at a time as run now; "" before the first epoch ends."""
        from normsweep.sweep.progress import read_job, sweep_progress

        states = [read_job(job.job_dir, int(job.cfg.epochs)) for job in self.jobs]
        left = sweep_progress(states, dict(counts)["running"]).time_left()
        return f"; {left}" if left else ""

    def _counts(self) -> tuple[tuple[str, int], ...]:
        def what(job: _Job) -> str:
            if job.result is not None:
                return "failed" if job.failed else "done"
            return "pending" if job.state in scheduler.WAITING_STATES else "running"  # or ending, not yet recorded

        states = Counter(what(job) for job in self.jobs)
        return tuple((what, states[what]) for what in ("pending", "running", "done", "failed"))
