# shellcheck shell=bash disable=SC2034  # (its variables are used by start.sh and stop.sh)
# Shared by start.sh and stop.sh (sourced, not run): where the cluster's state lives, how a daemon that
# start.sh started is recognised, logging.
#
# Everything the cluster writes lives under one state folder, $NORMSWEEP_SLURM_STATE
# (default /tmp/normsweep-slurm):
#   .normsweep-slurm    marker: this folder is ours (stop.sh deletes nothing without it); the start options
#   etc/                slurm.conf, slurmdbd.conf (SLURM_CONF points here; /etc/slurm/slurm.conf links to it)
#   munge/              our own munged: key, socket, pid, seed and log
#   mysql/, mysql-run/  MariaDB's data, and its socket, pid file and log (accounting only)
#   ctld/, slurmd/      slurmctld's StateSaveLocation, slurmd's spool
#   run/, log/          the SLURM daemons' pid files and logs
#   pids/NAME           "PID STARTTIME" of each daemon start.sh started: the only processes stop.sh stops
# Outside it, start.sh may add /etc/slurm/slurm.conf (a symlink, so that sbatch/squeue/sacct in any shell
# find the cluster) and a "# normsweep-slurm" line in /etc/hosts; stop.sh removes both.

STATE=${NORMSWEEP_SLURM_STATE:-/tmp/normsweep-slurm}
STATE=${STATE%/}
TIMEOUT=${NORMSWEEP_SLURM_TIMEOUT:-60}  # seconds to wait for each daemon, the node, and the jobs at stop
MARKER=$STATE/.normsweep-slurm
PIDS=$STATE/pids
CONF_LINK=/etc/slurm/slurm.conf
HOSTS_TAG="# normsweep-slurm"
# Daemons in start order (stop.sh stops them in reverse order).
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
# Every SLURM command and daemon these scripts run reads this config, whatever /etc/slurm holds.
export SLURM_CONF=$STATE/etc/slurm.conf

log() { printf '[%s %s] %s\n' "$PROG" "$(date +%T)" "$*"; }
warn() { printf '[%s %s] WARNING: %s\n' "$PROG" "$(date +%T)" "$*" >&2; }
die() { printf '[%s %s] ERROR: %s\n' "$PROG" "$(date +%T)" "$*" >&2; exit 1; }

case $STATE in
    /?*) ;;
    *) die "NORMSWEEP_SLURM_STATE must be an absolute path other than / (got '$STATE')" ;;
esac
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "NORMSWEEP_SLURM_TIMEOUT must be a number of seconds (got '$TIMEOUT')"

# One start.sh or stop.sh at a time (whatever the state folder): the lock is on this file, which stays put.
lock() {
    exec 9<"${BASH_SOURCE[0]}"
    flock -w "$TIMEOUT" 9 || die "another start.sh/stop.sh still runs after ${TIMEOUT}s"
}

# proc_field PID N: field N of /proc/PID/stat (3 = state, 22 = start time in clock ticks since boot). The
# command name (field 2) may hold spaces, so fields are counted after its closing parenthesis.
proc_field() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    local -a fields
    read -r -a fields <<<"$stat"
    printf '%s\n' "${fields[$(($2 - 3))]}"
}

# running PID COMM [STARTTIME]: PID is a live process (not a zombie) named COMM, started at STARTTIME if
# given (a pid reused by another process after ours ended does not pass).
running() {
    local comm state
    comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
    [ "$comm" = "$2" ] || return 1
    state=$(proc_field "$1" 3) || return 1
    [ "$state" != Z ] || return 1
    [ -z "${3:-}" ] || [ "$(proc_field "$1" 22)" = "$3" ]
}

# alive NAME: the daemon NAME that start.sh recorded still runs.
alive() {
    local pid start
    [ -s "$PIDS/$1" ] || return 1
    read -r pid start <"$PIDS/$1"
    running "$pid" "$1" "$start"
}

# recorded_pid NAME: the pid start.sh recorded for NAME.
recorded_pid() { local pid _; read -r pid _ <"$PIDS/$1"; echo "$pid"; }

# log_file NAME: where daemon NAME writes its log.
log_file() {
    case $1 in
        munged) echo "$STATE/munge/munged.log" ;;
        mariadbd) echo "$STATE/mysql-run/mariadb.log" ;;
        *) echo "$STATE/log/$1.log" ;;
    esac
}

# log_tail NAME: the end of daemon NAME's log (and of what it printed while starting), for error messages.
log_tail() {
    local f
    for f in "$(log_file "$1")" "$STATE/log/$1.out"; do
        [ -s "$f" ] || continue
        printf -- '--- last lines of %s ---\n' "$f"
        tail -n 15 "$f"
    done
}
