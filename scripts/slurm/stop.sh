#!/usr/bin/env bash
# Stop the SLURM cluster that start.sh started, and delete what it wrote.
#
# Usage: scripts/slurm/stop.sh            (same NORMSWEEP_SLURM_STATE as start.sh, if it was set)
#
# Jobs still queued or running are cancelled first, while slurmd still runs to end them (with
# proctrack/linuxproc a job's processes would outlive slurmd). Then the daemons start.sh recorded in
# $STATE/pids are stopped, in reverse start order (slurmd, slurmctld, slurmdbd, MariaDB, munged): SIGTERM,
# then SIGKILL after NORMSWEEP_SLURM_TIMEOUT seconds (default 60). A process is stopped only if its pid,
# name and start time are the ones recorded: a daemon this script did not start, or a pid reused since,
# is left alone. Then the state folder, the /etc/slurm/slurm.conf link and the /etc/hosts line go.
# Safe to run twice: with nothing to stop it says so and exits 0. Exits 1 if a daemon could not be stopped.
set -euo pipefail

PROG=stop
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t0=${EPOCHREALTIME//[.,]/}
since_start() { local d=$((${EPOCHREALTIME//[.,]/} - t0)); printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10)); }

case ${1:-} in
    '') ;;
    -h | --help) sed -n '4,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "no arguments expected (got $1)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root"
lock

remove_links() {
    if [ -L "$CONF_LINK" ] && [ "$(readlink "$CONF_LINK")" = "$SLURM_CONF" ]; then
        rm -f "$CONF_LINK"
        rmdir --ignore-fail-on-non-empty "$(dirname "$CONF_LINK")"
    fi
    if grep -qF "$HOSTS_TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite it in place rather than replace the file.
        local kept
        kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

if [ ! -e "$MARKER" ]; then
    [ ! -e "$STATE" ] || die "$STATE was not made by start.sh; not touching it"
    remove_links
    log "not running (no $STATE)"
    exit 0
fi

# 1. Cancel the jobs, and wait until slurmd has ended them ---------------------------------------------------
if alive slurmctld && alive slurmd; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || jobs=''
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        # SIGTERM now, SIGKILL after KillWait; then the job leaves squeue's default (active) states.
        deadline=$((SECONDS + TIMEOUT))
        while [ -n "$(squeue -h 2>/dev/null)" ]; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                warn "jobs still there after ${TIMEOUT}s: sending SIGKILL"
                squeue >&2 || true
                # shellcheck disable=SC2086
                scancel --signal=KILL --full $jobs 2>/dev/null || true
                sleep 2
                break
            fi
            sleep 0.5
        done
    fi
fi

# 2. Stop the daemons start.sh started, newest first --------------------------------------------------------
status=0
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    [ -s "$PIDS/$name" ] || continue
    pid=$(recorded_pid "$name")
    if ! alive "$name"; then
        log "$name (pid $pid) was not running"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while alive "$name" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if alive "$name"; then
        warn "$name (pid $pid) still runs ${TIMEOUT}s after SIGTERM: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while alive "$name" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    fi
    if alive "$name"; then
        warn "$name (pid $pid) could not be stopped"
        status=1
    else
        log "stopped $name (pid $pid)"
    fi
done

# 3. What is left? A job's step daemon (slurmstepd) outlives slurmd; name it rather than guess it is ours. ----
left=()
for comm_file in /proc/[0-9]*/comm; do
    comm=$(cat "$comm_file" 2>/dev/null) || continue
    case $comm in
        slurmstepd | slurmd | slurmctld | slurmdbd | munged | mariadbd | mysqld)
            pid=${comm_file#/proc/}
            pid=${pid%/comm}
            running "$pid" "$comm" && left+=("$comm($pid)")
            ;;
    esac
done
[ ${#left[@]} -eq 0 ] || warn "still running, not stopped by this script: ${left[*]}"

# 4. Delete the state ----------------------------------------------------------------------------------------
if [ "$status" = 0 ]; then
    rm -rf -- "$STATE"
    remove_links
    log "stopped in $(since_start) s; removed $STATE"
else
    warn "keeping $STATE (pid files and logs) since a daemon still runs"
fi
exit "$status"
