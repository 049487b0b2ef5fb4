"""Everything normsweep asks SLURM (squeue, sacct, sinfo, scancel), with a timeout on each call, in SLURM's words.

Job ids are strings as SLURM prints them: `123` for a job, `123_4` for task 4 of array 123. No torch, pandas or
Hydra here: the job, the launcher and resume all import this module.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT_S = 30  # slurmctld answers in well under a second; a hung controller must not hang the caller

# States in which a job may still start, run or write files (squeue's %T). Any other state is an end.
ALIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)

# The alive states in which a job is not running: it waits to start (again).
WAITING_STATES = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT", "SUSPENDED", "STOPPED"}
)

# Reasons a pending job gives when it will not start unless someone changes the job or the cluster, with how long
# to see it before giving up: a request over the partition's limits never changes; a node that is down (the
# nodes the job can use are all unavailable) may come back after a reboot.
HOPELESS_REASONS = {
    "PartitionConfig": 0,
    "PartitionNodeLimit": 0,
    "PartitionTimeLimit": 0,
    "DependencyNeverSatisfied": 0,
    "InvalidAccount": 0,
    "InvalidQOS": 0,
    "QOSMaxCpuPerJobLimit": 0,
    "QOSMaxGRESPerJob": 0,
    "QOSMaxMemoryPerJob": 0,
    "QOSMaxWallDurationPerJobLimit": 0,
    "AssocMaxCpuPerJobLimit": 0,
    "AssocMaxWallDurationPerJobLimit": 0,
    "BadConstraints": 0,
    "ReqNodeNotAvail": 600,
}


class SchedulerUnavailable(RuntimeError):
    """SLURM cannot be asked: its command is missing, hangs or fails (not the same as "the job has ended")."""


@dataclass(frozen=True)
class QueueEntry:
    """One job as squeue shows it: its state (RUNNING, CANCELLED, ...) and squeue's reason (Resources, None, ...)."""

    state: str
    reason: str
    raw_id: str = ""  # the task's own job id (%A, SLURM_JOB_ID inside it); `123_4` is its name as squeue shows it

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def hopeless(self) -> bool:
        """Pending for a reason that will never resolve by itself (e.g. it asks for more than any node has)."""
        return self.state == "PENDING" and _reason_name(self.reason) in HOPELESS_REASONS


def _reason_name(reason: str) -> str:
    return reason.split(",")[0].strip()


def patience_s(reason: str) -> int:
    """How long a job pending for this hopeless reason is waited for before it is given up (seconds)."""
    return HOPELESS_REASONS.get(_reason_name(reason), 0)


@dataclass(frozen=True)
class Node:
    """What one node of a partition offers a job: CPUs, memory (MB) and GPUs."""

    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    """A partition by the kinds of node in it (sinfo groups identical nodes into one line)."""

    name: str
    nodes: tuple[Node, ...]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        raise SchedulerUnavailable(f"{args[0]} not found: is this a SLURM login node?")
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SchedulerUnavailable(f"{args[0]} did not answer within {TIMEOUT_S} s") from exc
    except OSError as exc:
        raise SchedulerUnavailable(f"{args[0]} could not run: {exc}") from exc


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def parse_squeue(text: str, asked: list[str] | None = None) -> dict[str, QueueEntry]:
    """Parse `squeue -h -r -o '%i %A %T %r'` lines into {job id: entry}.

    An array task is keyed by `123_4`; when the caller asked by the task's own numeric job id (`%A`, what
    SLURM_JOB_ID holds inside the job), the entry is keyed by that id as well.
    """
    asked_set = set(asked or ())
    entries: dict[str, QueueEntry] = {}
    for line in text.splitlines():
        fields = line.split(maxsplit=3)
        if len(fields) < 3:
            continue
        job_id, raw_id, state = fields[:3]
        reason = fields[3].strip() if len(fields) == 4 else "None"
        entry = QueueEntry(state=state.rstrip("+"), reason=reason, raw_id=raw_id)
        entries[job_id] = entry
        if raw_id != job_id and raw_id in asked_set:
            entries[raw_id] = entry
    return entries


def queue(ids: list[str]) -> dict[str, QueueEntry]:
    """squeue's state and reason for each job it still knows (ended jobs stay listed for MinJobAge, ~5 min).

    A job squeue no longer knows is absent. Raises SchedulerUnavailable when squeue cannot be asked.
    """
    if not ids:
        return {}
    result = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i %A %T %r"])
    if result.returncode != 0:
        # Every id asked has been purged: squeue refuses the whole list rather than printing nothing.
        if "Invalid job id" in result.stderr:
            return {}
        raise SchedulerUnavailable(f"squeue failed: {_first_line(result.stderr)}")
    return parse_squeue(result.stdout, ids)


def job_states(ids: list[str]) -> dict[str, str]:
    """{job id: SLURM state} (PENDING, RUNNING, COMPLETING, CANCELLED, ...); a job squeue no longer knows is absent.

    Works without accounting. Raises SchedulerUnavailable when squeue cannot be asked.
    """
    return {job_id: entry.state for job_id, entry in queue(ids).items()}


def alive(ids: list[str]) -> dict[str, bool] | None:
    """{job id: True while SLURM may still run it (pending, running, completing, requeued), False once it has ended
    or SLURM no longer knows it}, in one squeue call for all; None when SLURM cannot be asked."""
    if not ids:
        return {}
    try:
        entries = queue(ids)
    except SchedulerUnavailable:
        return None
    return {job_id: job_id in entries and entries[job_id].alive for job_id in ids}


def is_alive(job_id: str) -> bool | None:
    """alive() for one job: True, False, or None when SLURM cannot be asked."""
    said = alive([job_id])
    return None if said is None else said[job_id]


def accounting_available() -> bool:
    """Whether sacct answers (slurmdbd is configured and up): only then do ended jobs keep their end reason."""
    try:
        return _run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "now"]).returncode == 0
    except SchedulerUnavailable:
        return False


def parse_sacct(text: str) -> dict[str, tuple[str, str]]:
    """Parse `sacct -n -X -P -o JobID,State,ExitCode,Reason` into {job id: (state, detail)}.

    The detail is the exit code when it is not 0:0 (`FAILED` + `0:9`: killed by signal 9), else the reason when
    there is one, else empty. A requeued job has one line per run: the last one counts.
    """
    ends: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 4:
            continue
        job_id, state, exit_code, reason = fields[:4]
        detail = exit_code if exit_code not in ("", "0:0") else ("" if reason in ("", "None") else reason)
        ends[job_id] = (state, detail)
    return ends


def job_ends(ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (sacct State, exit code or reason)} for the jobs accounting knows; {} when accounting is off."""
    if not ids:
        return {}
    try:
        result = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State,ExitCode,Reason"])
    except SchedulerUnavailable:
        return {}
    if result.returncode != 0:
        return {}
    return parse_sacct(result.stdout)


def job_end(job_id: str) -> tuple[str, str] | None:
    """sacct's (State, exit code or reason) for one job, e.g. ("CANCELLED by 0", ""), ("FAILED", "0:9"),
    ("TIMEOUT", ""); None when accounting is off or does not know the job."""
    ends = job_ends([job_id])
    if job_id in ends:
        return ends[job_id]
    # Asked by the raw id of an array task (SLURM_JOB_ID): sacct answers with the task's `123_4` name.
    return next(iter(ends.values())) if len(ends) == 1 else None


def describe_end(state: str, detail: str = "") -> str:
    """One phrase for an ended job, as SLURM says it: `CANCELLED by 0`, `TIMEOUT`, `FAILED 0:9`."""
    return f"{state} {detail}".strip()


_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's %G: `(null)` → 0, `gpu:4` → 4, `gpu:a100:4(S:0-1),mps:100` → 4."""
    return sum(int(count) for count in _GPU_GRES.findall(gres))


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Parse `sinfo -h -o '%P|%c|%m|%G'` into {partition: Partition}; the default partition (`debug*`) is also
    keyed by "" so that a job without a partition is checked against it."""
    nodes: dict[str, list[Node]] = {}
    default = ""
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 4:
            continue
        name, cpus, mem, gres = fields[:4]
        if name.endswith("*"):
            name = default = name[:-1]
        node = Node(cpus=int(cpus.rstrip("+")), mem_mb=int(mem.rstrip("+")), gpus=gpus_in_gres(gres))
        nodes.setdefault(name, []).append(node)
    partitions = {name: Partition(name, tuple(group)) for name, group in nodes.items()}
    if default:
        partitions[""] = partitions[default]
    return partitions


def partitions() -> dict[str, Partition]:
    """Every partition this user may submit to, with what its nodes offer. Raises SchedulerUnavailable."""
    result = _run(["sinfo", "-h", "-o", "%P|%c|%m|%G"])
    if result.returncode != 0:
        raise SchedulerUnavailable(f"sinfo failed: {_first_line(result.stderr)}")
    return parse_sinfo(result.stdout)


def cancel(ids: list[str]) -> None:
    """scancel the jobs (best effort: a job that has already ended is not an error)."""
    if ids:
        try:
            _run(["scancel", *ids])
        except SchedulerUnavailable:
            pass
