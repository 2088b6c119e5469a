#!/usr/bin/env bash
# A real four-node SLURM cluster (nodes n1-n4) on this single machine, for tests and CI.
# Partition `debug` (the default) holds n1 and n2; partition `four` holds all four.
#
#   scripts/slurm_cluster.sh start  [RUNDIR]   install if needed, start, wait until every node is idle
#   scripts/slurm_cluster.sh stop   [RUNDIR]   cancel all jobs, stop exactly the daemons `start` started
#   scripts/slurm_cluster.sh status [RUNDIR]   sinfo + squeue (exit 5 if the cluster is not up)
#   scripts/slurm_cluster.sh node-up NODE [RUNDIR]  start NODE's slurmd again (after a test killed it)
#
# RUNDIR defaults to $LAUNCHER_SLURM_RUNDIR or /tmp/launcher-slurm. It holds slurm.conf, the
# daemons' logs, state and spool folders, and `pids` ("PID COMM LABEL" per line: every process
# that `start` started, and nothing else is ever signalled).
#
# stdout of `start` is only shell code, so `eval "$(scripts/slurm_cluster.sh start)"` works:
#   export SLURM_CONF=RUNDIR/slurm.conf
#   # launcher-slurm: started            (or: already running)
# Progress and errors go to stderr.
#
# Environment: LAUNCHER_SLURM_RUNDIR, LAUNCHER_SLURM_PORT (slurmctld port, default 17000; the
# slurmds use PORT+1 to PORT+4), LAUNCHER_SLURM_CRED_EXPIRE (default 5, see below),
# LAUNCHER_SLURM_START_TIMEOUT (default 60 s).
#
# Exit codes: 0 ok, 2 usage, 3 not root, 4 install failed, 5 cluster failed to start / not up.
#
# Needs root (Debian 12, slurm-wlm 22.05, no systemd). Background: shared/SLURM_NOTES.md.
set -euo pipefail
set +m # no job control: `setsid CMD &` then execs CMD in place, so $! is CMD's pid
export PATH="$PATH:/usr/sbin:/sbin"

START_TIMEOUT=${LAUNCHER_SLURM_START_TIMEOUT:-60}
# AuthInfo=cred_expire: lifetime of job-step credentials. Slurm also holds a requeued job
# PENDING (reason BeginTime) for cred_expire+1 s, so that the previous run's credentials have
# expired before it restarts: with the default 120 every requeue waits ~2 minutes. 5 is Slurm's
# minimum and gives a ~7 s requeue round trip. The cost: a step launch must reach its slurmd
# within 5 s of the controller creating it ("Credential expired" otherwise), which is plenty
# on one machine; raise it if that error ever shows up on a very loaded machine.
CRED_EXPIRE=${LAUNCHER_SLURM_CRED_EXPIRE:-5}
# slurmctld listens on PORT, the slurmds of n1-n4 on PORT+1 to PORT+4. A second cluster (another
# RUNDIR) can run at the same time only with another PORT.
PORT=${LAUNCHER_SLURM_PORT:-17000}
NODES=(n1 n2 n3 n4)

log() { echo "slurm_cluster: $*" >&2; }
die() {
    local code=$1
    shift
    log "ERROR: $*"
    exit "$code"
}
usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd=${1:-}
[ -n "$cmd" ] || usage
if [ "$cmd" = node-up ]; then
    NODE=${2:-}
    [ -n "$NODE" ] || usage
    shift
fi
RUNDIR=${2:-${LAUNCHER_SLURM_RUNDIR:-/tmp/launcher-slurm}}
RUNDIR=$(realpath -m -- "$RUNDIR") # slurm.conf needs absolute paths
CONF=$RUNDIR/slurm.conf
PIDS=$RUNDIR/pids
export SLURM_CONF=$CONF

# --- processes we started ------------------------------------------------------------------

# True if PID is alive and is still the program COMM: a pid from a stale pids file that now
# belongs to something else is never signalled. A zombie (exited, not yet reaped; PID 1 here
# may reap late) counts as gone.
pid_is() {
    local pid=$1 name=$2 stat comm state
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "${stat#*(}" != "$stat" ] || return 1 # "PID (COMM) STATE ..."
    comm=${stat#*(}
    comm=${comm%)*}
    state=${stat##*) }
    state=${state%% *}
    [ "$comm" = "$name" ] && [ "$state" != Z ] && [ "$state" != X ]
}

record_pid() { echo "$1 $2 $3" >>"$PIDS"; }

all_recorded_alive() {
    [ -s "$PIDS" ] || return 1
    local pid name label
    while read -r pid name label; do
        [ -n "$pid" ] || continue
        pid_is "$pid" "$name" || return 1
    done <"$PIDS"
}

# Stop the recorded processes, newest first (slurmds, slurmctld, munged): SIGTERM, up to 5 s,
# then SIGKILL.
kill_recorded() {
    [ -f "$PIDS" ] || return 0
    local lines=() i pid name label t
    mapfile -t lines <"$PIDS"
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        read -r pid name label <<<"${lines[i]}"
        [ -n "${pid:-}" ] || continue
        pid_is "$pid" "$name" || continue
        kill -TERM "$pid" 2>/dev/null || true
        t=0
        while pid_is "$pid" "$name" && [ $t -lt 50 ]; do
            sleep 0.1
            t=$((t + 1))
        done
        if pid_is "$pid" "$name"; then
            log "$label (pid $pid) ignored SIGTERM for 5 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$PIDS"
}

# Start a daemon in the foreground mode (-D/-F) in the background, so that $! is the daemon's
# own pid; in its own session; stdio to a file so that no caller's pipe (pytest's
# capture_output) is held open; and without our lock fd 9, which it would otherwise hold forever.
spawn() {
    local name=$1 label=$2 pid t=0
    shift 2
    setsid "$@" </dev/null >>"$RUNDIR/$label.out" 2>&1 9>&- &
    pid=$!
    record_pid "$pid" "$name" "$label"
    # Until the exec chain (setsid, setpriv) reaches the daemon, its comm is not yet NAME.
    while ! pid_is "$pid" "$name" && [ -e "/proc/$pid" ] && [ $t -lt 50 ]; do
        sleep 0.1
        t=$((t + 1))
    done
}

# The last lines of a daemon's log, less the harmless mpi/pmix noise. Its .out (stderr) holds
# errors from before the log file was opened (bad slurm.conf, ...).
show_log() {
    local label=$1 f
    for f in "$RUNDIR/$label.log" "$RUNDIR/$label.out"; do
        [ -s "$f" ] || continue
        echo "----- $f (last lines) -----" >&2
        grep -v -e 'pmix' -e 'MPI: Cannot create context' "$f" | tail -n 15 >&2 || true
        return 0
    done
}

# Print the logs of LABELS (default: all daemons), stop what this run started, exit 5.
fail() {
    local msg=$1
    shift
    log "ERROR: $msg"
    local labels=("$@") label
    [ ${#labels[@]} -gt 0 ] || labels=(slurmctld "${NODES[@]/#/slurmd-}")
    for label in "${labels[@]}"; do show_log "$label"; done
    kill_recorded
    exit 5
}

check_alive_or_fail() {
    local pid name label
    while read -r pid name label; do
        pid_is "$pid" "$name" || fail "$label (pid $pid) exited during start-up" "$label"
    done <"$PIDS"
}

ctld_pid() { awk '$2 == "slurmctld" { print $1 }' "$PIDS"; }

ctld_up() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# True if sinfo shows every node in one of the states matching the regex $1.
nodes_in() {
    local out
    out=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    local node
    for node in "${NODES[@]}"; do
        grep -qxE "$node ($1)" <<<"$out" || return 1
    done
}

# --- start steps ---------------------------------------------------------------------------

require_root() {
    [ "$(id -u)" = 0 ] || die 3 "must run as root (uid is $(id -u)): it installs slurm-wlm" \
        "and munge, starts munged/slurmctld/slurmd and edits /etc/hosts"
}

ensure_installed() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sinfo >/dev/null; then
        return 0
    fi
    log "slurmctld/munged missing: installing slurm-wlm and munge with apt-get"
    local aptlog=$RUNDIR/apt.log
    export DEBIAN_FRONTEND=noninteractive
    # Bounded: at most 120 s waiting for the dpkg lock, at most 10 minutes per step.
    if ! timeout 600 apt-get -o DPkg::Lock::Timeout=120 update -qq >"$aptlog" 2>&1; then
        tail -n 20 "$aptlog" >&2
        die 4 "apt-get update failed (log: $aptlog)"
    fi
    if ! timeout 600 apt-get -o DPkg::Lock::Timeout=120 install -y -qq slurm-wlm munge \
        >>"$aptlog" 2>&1; then
        tail -n 20 "$aptlog" >&2
        die 4 "apt-get install -y slurm-wlm munge failed (log: $aptlog)"
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        die 4 "slurm-wlm and munge installed, but slurmctld/munged are not on PATH"
    fi
}

munge_works() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

ensure_munge() {
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then # Debian's postinst makes one; a stripped image may not have it
        log "creating $key"
        install -d -o munge -g munge -m 700 /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key"
        chmod 400 "$key"
    fi
    munge_works && return 0 # already running: ours from before, or the system's
    # Without systemd nobody creates munged's socket folder.
    install -d -o munge -g munge -m 755 /run/munge
    # setpriv execs munged as the munge user directly (su would stay as its parent).
    spawn munged munged setpriv --reuid=munge --regid=munge --init-groups munged -F
    local t=0
    until munge_works; do
        if [ $t -ge 100 ]; then
            tail -n 10 /var/log/munge/munged.log >&2 2>/dev/null || true
            fail "munged did not answer within 10 s" munged
        fi
        sleep 0.1
        t=$((t + 1))
    done
}

ensure_hosts() {
    # Jobs see SLURM_JOB_NODELIST=n[1-4]; code that derives a master address from it must be
    # able to resolve every node.
    local node
    for node in "${NODES[@]}"; do
        if ! getent hosts "$node" >/dev/null; then
            log "adding '127.0.0.1 $node' to /etc/hosts"
            echo "127.0.0.1 $node" >>/etc/hosts
        fi
    done
}

# slurm.conf for RUNDIR, on stdout.
render_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
# Written by scripts/slurm_cluster.sh: a four-node test cluster on one machine.
ClusterName=launcher
# "(127.0.0.1)": the host name need not resolve.
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT}
AuthType=auth/munge
CredType=cred/munge
# Also how long a requeued job waits before it may start again (cred_expire+1 s); the
# default 120 would mean ~2 minutes. See CRED_EXPIRE in scripts/slurm_cluster.sh.
AuthInfo=cred_expire=${CRED_EXPIRE}
# linuxproc tracks a job's processes by parent pid and signals them all (scancel -s,
# --signal=USR2@N, submitit's checkpoint/requeue). cgroup would need systemd/cgroupfs setup.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SchedulerType=sched/backfill
# Scheduler passes every 1-2 s instead of 30/60 s: a requeued job starts as soon as its
# BeginTime has passed. Negligible cost with a handful of jobs.
SchedulerParameters=bf_interval=1,sched_interval=2
# Cores are the consumable resource: jobs share a node core by core. Memory is not a
# consumable, so jobs without --mem run (and any --mem up to RealMemory is accepted).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Use the node sizes below as written, whatever the machine has: every slurmd runs on the same
# cores, and a machine with fewer CPUs than declared does not get its nodes set INVALID.
SlurmdParameters=config_overrides
# Processes ignoring SIGTERM get SIGKILL after 10 s instead of 30: cancel and stop stay quick.
KillWait=10
InactiveLimit=0
# Finished jobs stay visible (squeue -t all, scontrol show job) for 5 minutes.
MinJobAge=300
# No slurmdbd: plain sacct fails (submitit: "Bypassing sacct error", state UNKNOWN), but every
# finished job's state is appended to JobCompLoc, and "sacct -c" reads it.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${RUNDIR}/jobcomp.log
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd-%n.pid
SlurmdSpoolDir=${RUNDIR}/slurmd-%n
StateSaveLocation=${RUNDIR}/state
SlurmctldLogFile=${RUNDIR}/slurmctld.log
SlurmdLogFile=${RUNDIR}/slurmd-%n.log
NodeName=n[1-4] NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + 4)) CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
PartitionName=four Nodes=n[1-4] MaxTime=INFINITE State=UP
EOF
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "# launcher-slurm: $1"
}

# One start/stop at a time per RUNDIR (e.g. two test sessions starting together). Opened
# read-only, so that a non-root user can still find a running cluster.
take_lock() {
    [ -e "$RUNDIR/lock" ] || : >"$RUNDIR/lock"
    exec 9<"$RUNDIR/lock"
    flock -w 120 9 || die 5 "another slurm_cluster.sh has held $RUNDIR/lock for 120 s"
}

# Our daemons are alive and both nodes usable. A slurm.conf that differs from what this
# script would write now (script edited, other LAUNCHER_SLURM_* values) only gets a warning:
# restarting would kill the jobs of whoever uses the cluster. `stop` then `start` applies it.
running() {
    all_recorded_alive && [ -f "$CONF" ] && nodes_in 'idle|mix|alloc|comp'
}

report_running() {
    if ! cmp -s "$CONF" <(render_conf); then
        log "WARNING: $CONF differs from what this script writes now;" \
            "run 'scripts/slurm_cluster.sh stop $RUNDIR' and start again to apply it"
    fi
    log "already running (RUNDIR=$RUNDIR)"
    print_env "already running"
}

port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

do_start() {
    # Anyone may use a running cluster; only root can start one.
    if [ -e "$RUNDIR/lock" ] && running; then
        report_running
        return 0
    fi
    require_root
    mkdir -p "$RUNDIR"
    take_lock
    if running; then # another start finished while we waited for the lock
        report_running
        return 0
    fi

    ensure_installed
    local t0=$SECONDS
    # Whatever is left of an earlier run in RUNDIR (a crashed daemon, another slurm.conf):
    # stop the processes it recorded and start from clean state.
    if [ -s "$PIDS" ]; then
        log "restarting: the cluster in $RUNDIR is not (fully) up"
        kill_recorded
    fi
    # Another cluster (other RUNDIR, same PORT) would answer our scontrol/sinfo and look
    # like ours: refuse instead.
    local p
    for p in "$PORT" $((PORT + 1)) $((PORT + 2)) $((PORT + 3)) $((PORT + 4)); do
        if port_in_use "$p"; then
            die 5 "port $p on 127.0.0.1 is in use (another SLURM cluster?): stop it, or set" \
                "LAUNCHER_SLURM_PORT to a free base port (this cluster uses PORT..PORT+4)"
        fi
    done
    # (pytest-owned: tests/slurm_fixtures.py sets it when a test session started the cluster.)
    rm -rf "$RUNDIR/state" "$RUNDIR"/slurmd-n[1-4] "$RUNDIR"/*.log "$RUNDIR"/*.out \
        "$RUNDIR"/*.pid "$RUNDIR/pytest-owned"
    mkdir -p "$RUNDIR/state" "${NODES[@]/#/$RUNDIR/slurmd-}"
    : >"$PIDS"

    ensure_munge
    ensure_hosts
    render_conf >"$CONF"

    # -c: no job or node state from an earlier run; -i: ignore missing state files.
    spawn slurmctld slurmctld slurmctld -D -c -i -f "$CONF"
    local deadline=$((t0 + START_TIMEOUT))
    until ctld_up && [ "$(cat "$RUNDIR/slurmctld.pid" 2>/dev/null)" = "$(ctld_pid)" ]; do
        check_alive_or_fail
        [ $SECONDS -lt $deadline ] || fail "slurmctld did not answer within ${START_TIMEOUT} s" slurmctld
        sleep 0.2
    done
    local node
    for node in "${NODES[@]}"; do
        spawn slurmd "slurmd-$node" slurmd -D -N "$node" -f "$CONF"
    done
    until nodes_in idle; do # exactly idle: not idle* (no answer), drain, down, inval
        check_alive_or_fail
        if [ $SECONDS -ge $deadline ]; then
            timeout 5 sinfo -N -l >&2 || true
            fail "nodes ${NODES[*]} not all idle within ${START_TIMEOUT} s"
        fi
        sleep 0.2
    done
    check_alive_or_fail
    log "up in $((SECONDS - t0)) s: nodes ${NODES[*]} with 2 CPUs each; RUNDIR=$RUNDIR"
    print_env started
}

do_stop() {
    [ -d "$RUNDIR" ] || {
        log "nothing to stop: no $RUNDIR"
        return 0
    }
    [ -s "$PIDS" ] || {
        log "nothing to stop: no $PIDS"
        return 0
    }
    require_root
    take_lock
    if [ -f "$CONF" ] && ctld_up; then
        local jobs t=0
        jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | tr '\n' ' ') || true
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            # Let the slurmds end the jobs' processes before they go themselves (KillWait + 5 s).
            while [ $t -lt 75 ] && [ -n "$(timeout 5 squeue -h -o '%A' 2>/dev/null)" ]; do
                sleep 0.2
                t=$((t + 1))
            done
        fi
    fi
    kill_recorded
    log "stopped (logs kept in $RUNDIR)"
}

do_status() {
    if [ ! -f "$CONF" ] || ! ctld_up; then
        log "not running (RUNDIR=$RUNDIR)"
        exit 5
    fi
    echo "SLURM_CONF=$CONF"
    if [ -f "$PIDS" ]; then
        echo "processes started by slurm_cluster.sh (pid comm label):"
        sed 's/^/  /' "$PIDS"
    fi
    timeout 10 sinfo -N -l
    timeout 10 squeue
}

# A lost node comes back: its slurmd starts again (ReturnToService=2 makes it usable once it
# registers) and replaces the dead one's line in the pids file.
do_node_up() {
    require_root
    take_lock
    printf '%s\n' "${NODES[@]}" | grep -qx -- "$NODE" || die 2 "no node $NODE (nodes: ${NODES[*]})"
    local pid name label
    if [ -f "$PIDS" ]; then
        while read -r pid name label; do
            if [ "$label" = "slurmd-$NODE" ] && pid_is "$pid" "$name"; then
                log "slurmd of $NODE is running (pid $pid)"
                return 0
            fi
        done <"$PIDS"
        grep -v " slurmd-$NODE\$" "$PIDS" >"$PIDS.new" || true
        mv "$PIDS.new" "$PIDS"
    fi
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    spawn slurmd "slurmd-$NODE" slurmd -D -N "$NODE" -f "$CONF"
    local t=0
    until timeout 5 sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | grep -qxE 'idle|mix|alloc'; do
        [ $t -lt 300 ] || die 5 "$NODE not idle within 60 s after its slurmd started"
        sleep 0.2
        t=$((t + 1))
    done
    log "$NODE is up"
}

case "$cmd" in
start) do_start ;;
node-up) do_node_up ;;
stop) do_stop ;;
status) do_status ;;
*) usage ;;
esac
