#!/usr/bin/env bash
# Start a throwaway single-node SLURM cluster on this Debian machine, as root, without an init system:
# our own munged, MariaDB + slurmdbd (accounting: sacct works), slurmctld and slurmd; one partition whose
# only node is this machine, with its real CPU count and memory. For trying normsweep's
# hydra/launcher=slurm locally and in CI. stop.sh stops it and deletes what this wrote.
#
# Usage: scripts/slurm/start.sh [--no-accounting] [--enforce-memory] [--partition NAME | NAME]
#   --no-accounting   no MariaDB/slurmdbd: sacct then fails ("Slurm accounting storage is disabled"), as on
#                     clusters without accounting
#   --enforce-memory  kill a job step that uses more memory than it asked for (JobAcctGatherParams=
#                     OverMemoryKill); without it nothing limits a job's memory (no cgroups here)
#   NAME              the partition (default: debug)
# Environment: NORMSWEEP_SLURM_STATE (state folder, default /tmp/normsweep-slurm),
#   NORMSWEEP_SLURM_TIMEOUT (seconds to wait for each step, default 60),
#   NORMSWEEP_SLURM_KILL_WAIT (seconds from SIGTERM to SIGKILL for a cancelled or timed-out job, default 5)
#
# Idempotent: when the cluster is already up with the same options it says so and exits 0. Installs the
# Debian packages it needs when they are missing. Its last line sums the cluster up, read back from SLURM:
#   slurm up: partition debug, 1 node, 2 CPUs, 23 GB, accounting on, memory not enforced
set -euo pipefail

PROG=start
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t0=${EPOCHREALTIME//[.,]/}  # microseconds
# since_start: seconds since this script started, to a tenth.
since_start() { local d=$((${EPOCHREALTIME//[.,]/} - t0)); printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10)); }

usage() { sed -n '7,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

ACCOUNTING=1
ENFORCE_MEMORY=0
PARTITION=debug
while [ $# -gt 0 ]; do
    case $1 in
        --no-accounting) ACCOUNTING=0 ;;
        --enforce-memory) ENFORCE_MEMORY=1 ;;
        --partition) [ $# -ge 2 ] || die "--partition needs a name"; PARTITION=$2; shift ;;
        --partition=*) PARTITION=${1#--partition=} ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) PARTITION=$1 ;;
    esac
    shift
done
[[ $PARTITION =~ ^[A-Za-z0-9_-]+$ ]] || die "partition name '$PARTITION': letters, digits, _ and - only"
KILL_WAIT=${NORMSWEEP_SLURM_KILL_WAIT:-5}
[[ $KILL_WAIT =~ ^[0-9]+$ ]] || die "NORMSWEEP_SLURM_KILL_WAIT must be a number of seconds (got '$KILL_WAIT')"
OPTIONS="accounting=$ACCOUNTING partition=$PARTITION enforce_memory=$ENFORCE_MEMORY kill_wait=$KILL_WAIT"
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons as their users)"
lock
# A failed start leaves what it started running, and its logs, for a look; stop.sh then cleans up.
FRESH=0  # 1 once this run starts writing a new cluster's state
on_exit() {
    local rc=$?
    [ "$rc" = 0 ] || [ "$FRESH" = 0 ] || log "failed; logs in $STATE/log; scripts/slurm/stop.sh cleans up" >&2
}
trap on_exit EXIT

# summary: the final line, from what SLURM itself reports.
summary() {
    local part nodes cpus mem acct gather
    part=$(scontrol show partition "$PARTITION" -o) || die "partition $PARTITION not found: $(scontrol show partition -o)"
    nodes=$(grep -o 'TotalNodes=[0-9]*' <<<"$part" | cut -d= -f2)
    cpus=$(grep -o 'TotalCPUs=[0-9]*' <<<"$part" | cut -d= -f2)
    mem=$(sinfo -h -p "$PARTITION" -o %m | head -1)  # MB per node
    acct=$(scontrol show config | awk '$1 == "AccountingStorageType" {print $3}')
    gather=$(scontrol show config | awk '$1 == "JobAcctGatherParams" {print $3}')
    printf 'slurm up: partition %s, %s node%s, %s CPUs, %s GB, accounting %s, memory %s\n' \
        "$PARTITION" "$nodes" "$([ "$nodes" = 1 ] || echo s)" "$cpus" "$((mem / 1024))" \
        "$([ "$acct" = accounting_storage/slurmdbd ] && echo on || echo off)" \
        "$([[ $gather == *OverMemoryKill* ]] && echo enforced || echo 'not enforced')"
}

# 0. Already up? ---------------------------------------------------------------------------------------
if [ -e "$STATE" ] && [ ! -e "$MARKER" ]; then
    die "$STATE exists but was not made by start.sh; remove it or set NORMSWEEP_SLURM_STATE"
fi
if [ -e "$MARKER" ]; then
    up=() down=()
    for name in "${DAEMONS[@]}"; do
        [ -e "$PIDS/$name" ] || continue
        if alive "$name"; then up+=("$name"); else down+=("$name"); fi
    done
    if [ ${#up[@]} -gt 0 ] && [ ${#down[@]} -eq 0 ]; then
        [ "$(cat "$MARKER")" = "$OPTIONS" ] ||
            die "the cluster is up with other options ($(cat "$MARKER")); run stop.sh first to get $OPTIONS"
        log "already up (${up[*]} running, state in $STATE)"
        summary
        exit 0
    fi
    if [ ${#up[@]} -gt 0 ]; then
        for name in "${down[@]}"; do log_tail "$name" >&2; done
        die "the cluster is half up: ${down[*]} stopped, ${up[*]} still running; run stop.sh, then start.sh"
    fi
    # Nothing of it runs (a killed container, a reboot): what is left is stale.
    log "removing the stale state of a cluster that no longer runs ($STATE)"
    rm -rf -- "$STATE"
fi
if [ -e "$CONF_LINK" ] || [ -L "$CONF_LINK" ]; then
    # A dangling link of ours (state removed by hand) is replaced; anything else belongs to someone else.
    [[ $(readlink "$CONF_LINK" 2>/dev/null) == "$SLURM_CONF" ]] ||
        die "$CONF_LINK exists and is not ours: another SLURM setup is on this machine; not touching it"
fi

FRESH=1

# 1. Packages ---------------------------------------------------------------------------------------------
pkgs=(munge slurmctld slurmd slurm-client)
[ "$ACCOUNTING" = 0 ] || pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Their postinst scripts try to start the services; with no init system that fails, harmlessly (this
    # script starts each daemon itself). Try the package lists as they are first; refresh them if that fails
    # (none yet on a fresh machine, or stale ones naming versions the mirror no longer has).
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >"$1" 2>&1; }
    aptlog=$(mktemp)
    if ! apt_install "$aptlog"; then
        apt-get update -q </dev/null >"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
        apt_install "$aptlog" || { tail -n 20 "$aptlog" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
    rm -f "$aptlog"
    log "installed in $(since_start) s"
fi
for user in munge slurm; do id "$user" >/dev/null 2>&1 || die "user $user missing after the install"; done

# 2. State folder -----------------------------------------------------------------------------------------
# Left world-readable: the daemons run as munge, slurm and mysql and must reach their own subfolders.
mkdir -p "$STATE"
chmod 0755 "$STATE"
mkdir -p "$PIDS" "$STATE/etc" "$STATE/munge" "$STATE/ctld" "$STATE/slurmd" "$STATE/run" "$STATE/log"
echo "$OPTIONS" >"$MARKER"
chown munge:munge "$STATE/munge"
# munged refuses a key or socket folder that others can write, and a socket folder that others cannot enter.
chmod 0755 "$STATE/munge"
chown slurm:slurm "$STATE/ctld" "$STATE/run" "$STATE/log"  # slurmctld and slurmdbd run as slurm

# start_daemon NAME PIDFILE COMMAND...: run COMMAND (a daemon that detaches itself and writes PIDFILE), wait
# for PIDFILE to name a live NAME, and record that pid and its start time in $PIDS/NAME. The daemon's
# stdin/stdout/stderr are never this script's: a daemon holding the pipe a CI runner reads from would keep
# the step from ending.
start_daemon() {
    local name=$1 pidfile=$2 pid='' deadline=$((SECONDS + TIMEOUT))
    shift 2
    rm -f "$pidfile"
    # 9<&-: nor the lock on lib.sh (fd 9), which would stay held as long as the daemon runs.
    "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9<&- || { log_tail "$name" >&2; die "$name failed to start"; }
    until [ -s "$pidfile" ] && pid=$(head -1 "$pidfile") && running "$pid" "$name"; do
        [ "$SECONDS" -lt "$deadline" ] || { log_tail "$name" >&2; die "$name did not start within ${TIMEOUT}s"; }
        sleep 0.2
    done
    echo "$pid $(proc_field "$pid" 22)" >"$PIDS/$name"
    log "started $name (pid $pid)"
}

# wait_ready NAME WHAT COMMAND...: retry COMMAND until it succeeds; fail at once, with the log's end, if
# daemon NAME has died meanwhile, and after TIMEOUT seconds.
wait_ready() {
    local name=$1 what=$2 deadline=$((SECONDS + TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        alive "$name" || { log_tail "$name" >&2; die "$name stopped while waiting for $what"; }
        [ "$SECONDS" -lt "$deadline" ] || { log_tail "$name" >&2; die "no $what after ${TIMEOUT}s"; }
        sleep 0.2
    done
}

# 3. munge: our own munged, key and socket (a system munged, if any, is left alone) ----------------------
MUNGE_SOCKET=$STATE/munge/munge.socket
runuser -u munge -- mungekey --create --keyfile="$STATE/munge/munge.key" </dev/null
start_daemon munged "$STATE/munge/munged.pid" \
    runuser -u munge -- munged --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
wait_ready munged "munge credentials" sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"

# 4. Configuration ----------------------------------------------------------------------------------------
NODE=$(hostname -s)
if ! getent hosts "$NODE" >/dev/null; then
    # slurmd finds its NodeName from `hostname -s`; some SLURM calls also resolve it.
    echo "127.0.0.1 $NODE $HOSTS_TAG" >>/etc/hosts
    log "added $NODE to /etc/hosts"
fi
# The node as slurmd sees it: CPUs, sockets/cores/threads and RealMemory (MB), e.g.
#   NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24032
# (SLURM_CONF names no file yet: -C needs none.)
hw=$(SLURM_CONF=/dev/null slurmd -C 2>/dev/null | grep '^NodeName=') || die "slurmd -C printed no node"
CPUS=$(grep -o ' CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)
MEM_MB=$(grep -o ' RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
if [ -z "$CPUS" ] || [ -z "$MEM_MB" ]; then die "cannot read CPUs and RealMemory from: $hw"; fi
if [ "$ENFORCE_MEMORY" = 1 ]; then
    gather_params="JobAcctGatherParams=OverMemoryKill
# Sample each step's memory every second (default 30 s): the kill comes at most ~1 s late.
JobAcctGatherFrequency=task=1"
else
    gather_params="# Memory is counted (sacct MaxRSS) but not enforced: a job may use more than its --mem.
JobAcctGatherFrequency=task=5"
fi
if [ "$ACCOUNTING" = 1 ]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# The munge socket for talking to slurmdbd: AuthInfo is not used for that, and the default is /run/munge's.
AccountingStoragePass=$MUNGE_SOCKET"
else
    accounting="# No slurmdbd: sacct fails with \"Slurm accounting storage is disabled\".
AccountingStorageType=accounting_storage/none"
fi
cat >"$SLURM_CONF" <<EOF
# Written by normsweep's scripts/slurm/start.sh ($OPTIONS); stop.sh deletes it.
# One node, this machine ($NODE), is both the controller and the only compute node.
ClusterName=normsweep
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged's socket (not the system's /run/munge); the client commands read it from here too.
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups (containers, gVisor, no systemd): a job's processes are tracked through /proc, and nothing
# binds a task to its CPUs or memory. A job therefore sees every CPU of the node: a program must read
# SLURM_CPUS_PER_TASK to keep to what it asked for.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Per-job memory and CPU use from /proc (sacct MaxRSS, and OverMemoryKill when memory is enforced).
JobAcctGatherType=jobacct_gather/linux
$gather_params
SelectType=select/cons_tres
# CPUs and memory are both consumable: --mem is checked against the node and counted, as on real clusters.
SelectTypeParameters=CR_CPU_Memory
# A job that asks no memory gets its CPUs' share; the default (the whole node) would run one job at a time.
DefMemPerCPU=$((MEM_MB / CPUS))
# Seconds from SIGTERM to SIGKILL when a job is cancelled or reaches its time limit (default 30): short, so
# that a cancelled job ends quickly in tests. Real clusters keep 30 s or more.
KillWait=$KILL_WAIT
# MinJobAge is left at its default (300 s): a finished job stays in squeue -j / scontrol for 5 minutes.
# A node that was down comes back as soon as its slurmd registers again.
ReturnToService=2
MpiDefault=none
# No mail on this machine; silences "Configured MailProg is invalid".
MailProg=/bin/true
$accounting
NodeName=$NODE NodeAddr=127.0.0.1 ${hw#NodeName="$NODE" } State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
chmod 0644 "$SLURM_CONF"
# The client commands (sbatch, squeue, sacct, scancel: what submitit runs) look in /etc/slurm by default.
mkdir -p "$(dirname "$CONF_LINK")"
ln -sfn "$SLURM_CONF" "$CONF_LINK"

# 5. Accounting: MariaDB + slurmdbd ------------------------------------------------------------------------
if [ "$ACCOUNTING" = 1 ]; then
    id mysql >/dev/null 2>&1 || die "user mysql missing after the install"
    DB_SOCKET=$STATE/mysql-run/mysqld.sock
    DB_PORT=16819  # not 3306, to leave a system MariaDB alone; slurmdbd talks TCP (it has no socket setting)
    mkdir -p "$STATE/mysql" "$STATE/mysql-run"
    chown mysql:mysql "$STATE/mysql" "$STATE/mysql-run"
    # --no-defaults everywhere: /etc/mysql's settings (its datadir, socket, port) are the system MariaDB's.
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
        --auth-root-authentication-method=socket </dev/null >>"$STATE/log/mariadbd.out" 2>&1 ||
        { tail -n 20 "$STATE/log/mariadbd.out" >&2; die "mariadb-install-db failed"; }
    # mariadbd itself, detached with setsid -f (not mysqld_safe, which restarts it when stop.sh stops it).
    # skip-name-resolve: the slurm user is 'slurm'@'127.0.0.1', without a DNS look-up per connection.
    # innodb_lock_wait_timeout=900 is what slurmdbd asks for; flushing the log once a second (not at every
    # commit) is enough for a throwaway database, and faster. slurmdbd still logs "Database settings not
    # recommended values: innodb_buffer_pool_size" (it wants 512 MB or more): harmless at this size.
    start_daemon mariadbd "$STATE/mysql-run/mysqld.pid" \
        setsid -f mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
        --pid-file="$STATE/mysql-run/mysqld.pid" --log-error="$STATE/mysql-run/mariadb.log" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2
    wait_ready mariadbd "answer from MariaDB" mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
    # A password that never leaves this machine: in slurmdbd.conf only (mode 600, owner slurm).
    pass=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    mariadb --no-defaults --socket="$DB_SOCKET" -u root </dev/null -e "
        CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    (
        umask 077  # slurmdbd refuses a slurmdbd.conf that others can read
        cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Written by normsweep's scripts/slurm/start.sh; stop.sh deletes it.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=$(log_file slurmdbd)
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    )
    chown slurm:slurm "$STATE/etc/slurmdbd.conf"
    # slurmdbd finds slurmdbd.conf beside $SLURM_CONF.
    start_daemon slurmdbd "$STATE/run/slurmdbd.pid" slurmdbd
    wait_ready slurmdbd "answer from slurmdbd" sacctmgr -n show cluster
    # The cluster must be registered before slurmctld starts, or slurmctld does not send it its jobs.
    sacctmgr -i add cluster normsweep </dev/null >/dev/null
fi

# 6. slurmctld and slurmd ---------------------------------------------------------------------------------
start_daemon slurmctld "$STATE/run/slurmctld.pid" slurmctld
wait_ready slurmctld "answer from slurmctld" sh -c 'scontrol ping | grep -q UP'
# slurmd is started once, after slurm.conf is final: a slurmd started before a change keeps the old config
# (slurmctld then logs "appears to have a different slurm.conf") until it is restarted.
start_daemon slurmd "$STATE/run/slurmd.pid" slurmd

# 7. Wait until the node is idle ----------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
until [ "$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)" = idle ]; do
    for name in slurmctld slurmd; do alive "$name" || { log_tail "$name" >&2; die "$name stopped"; }; done
    if [ "$SECONDS" -ge "$deadline" ]; then
        scontrol show node "$NODE" >&2 || true
        log_tail slurmd >&2
        log_tail slurmctld >&2
        die "node $NODE is not idle after ${TIMEOUT}s"
    fi
    sleep 0.2
done
log "up in $(since_start) s; state in $STATE, logs in $STATE/log"
summary
