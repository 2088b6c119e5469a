#!/usr/bin/env bash
# A real two-node SLURM cluster (nodes n1, n2) on this single machine, for tests and CI.
#
#   scripts/slurm_cluster.sh start  [RUNDIR]   install if needed, start, wait until both nodes are idle
#   scripts/slurm_cluster.sh stop   [RUNDIR]   cancel all jobs, stop exactly the daemons `start` started
#   scripts/slurm_cluster.sh status [RUNDIR]   sinfo + squeue (exit 1 if the cluster is not up)
#
# RUNDIR defaults to $LAUNCHER_SLURM_RUNDIR or /tmp/launcher-slurm. It holds slurm.conf, the
# daemons' logs, state and spool folders, and `pids` ("PID NAME" per line, every process started).
#
# stdout of `start` is only shell code, so `eval "$(scripts/slurm_cluster.sh start)"` works:
#   export SLURM_CONF=RUNDIR/slurm.conf
#   # launcher-slurm: started            (or "already running")
# Everything else goes to stderr.
#
# Exit codes: 0 ok, 2 usage, 3 not root, 4 install failed, 5 cluster failed to start / not up.
#
# Needs root (Debian 12 + slurm-wlm 22.05, no systemd). See shared/SLURM_NOTES.md.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

START_TIMEOUT=${LAUNCHER_SLURM_START_TIMEOUT:-60}   # seconds, for the whole daemon start-up
# Lifetime of job-step credentials. Slurm also holds a requeued job PENDING (reason BeginTime)
# for cred_expire+1 seconds, so that the previous run's credentials have expired before it
# restarts: the default 120 s makes every requeue wait ~2 minutes. 5 is Slurm's minimum; 10
# leaves room for a step launch on a loaded 2-core CI machine (a step must reach its slurmd
# within this time or fails with "Credential expired").
CRED_EXPIRE=${LAUNCHER_SLURM_CRED_EXPIRE:-10}

log() { echo "slurm_cluster: $*" >&2; }
die() { local code=$1; shift; log "ERROR: $*"; exit "$code"; }

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd=${1:-}
[ -n "$cmd" ] || usage
RUNDIR=${2:-${LAUNCHER_SLURM_RUNDIR:-/tmp/launcher-slurm}}
RUNDIR=$(realpath -m -- "$RUNDIR")   # slurm.conf needs absolute paths
CONF=$RUNDIR/slurm.conf
PIDS=$RUNDIR/pids
export SLURM_CONF=$CONF

# --- pid bookkeeping -----------------------------------------------------------------------

# True if PID is alive and still the program NAME (guards against pid reuse after a reboot
# or a long time: we never signal a process that is not what we started).
pid_is() {
    local pid=$1 name=$2 comm
    [ -r "/proc/$pid/comm" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ]
}

record_pid() { echo "$1 $2" >>"$PIDS"; }

# True if the pids file exists and every process in it is alive.
all_recorded_alive() {
    [ -s "$PIDS" ] || return 1
    local pid name
    while read -r pid name; do
        [ -n "$pid" ] || continue
        pid_is "$pid" "$name" || return 1
    done <"$PIDS"
}

# Stop the recorded processes, newest first (slurmds, then slurmctld, then munged).
kill_recorded() {
    [ -f "$PIDS" ] || return 0
    local pid name lines=() i
    mapfile -t lines <"$PIDS"
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        read -r pid name <<<"${lines[i]}"
        [ -n "${pid:-}" ] || continue
        pid_is "$pid" "$name" || continue
        kill -TERM "$pid" 2>/dev/null || true
        # Bounded wait, then SIGKILL.
        local t=0
        while pid_is "$pid" "$name" && [ $t -lt 50 ]; do sleep 0.1; t=$((t + 1)); done
        if pid_is "$pid" "$name"; then
            log "$name ($pid) ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$PIDS"
}

# --- start steps ---------------------------------------------------------------------------

require_root() {
    [ "$(id -u)" = 0 ] || die 3 "must run as root (uid is $(id -u)): it installs slurm-wlm/munge," \
        "starts munged/slurmctld/slurmd and edits /etc/hosts"
}

ensure_installed() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sinfo >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge with apt-get"
    local aptlog=$RUNDIR/apt.log
    export DEBIAN_FRONTEND=noninteractive
    # Bounded: apt waits at most 120 s for the dpkg lock, and the whole step at most 10 minutes.
    if ! timeout 600 apt-get -o DPkg::Lock::Timeout=120 update -qq >"$aptlog" 2>&1; then
        tail -n 20 "$aptlog" >&2
        die 4 "apt-get update failed (log: $aptlog)"
    fi
    if ! timeout 600 apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends \
        slurm-wlm munge >>"$aptlog" 2>&1; then
        tail -n 20 "$aptlog" >&2
        die 4 "apt-get install -y slurm-wlm munge failed (log: $aptlog)"
    fi
    command -v slurmctld >/dev/null && command -v munged >/dev/null ||
        die 4 "slurm-wlm/munge installed but slurmctld/munged not found on PATH"
}

munge_works() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

ensure_munge() {
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        log "creating $key"
        install -d -o munge -g munge -m 700 /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key"
        chmod 400 "$key"
    fi
    munge_works && return 0   # munged already running (ours from before, or the system's)
    # Without systemd nobody creates munged's socket folder.
    install -d -o munge -g munge -m 755 /run/munge
    # setpriv execs munged directly (no su/PAM parent), so $! is munged's own pid; -F keeps it
    # in the foreground so it does not fork away from that pid.
    setsid setpriv --reuid=munge --regid=munge --init-groups munged -F \
        </dev/null >>"$RUNDIR/munged.out" 2>&1 9>&- &
    record_pid $! munged
    local t=0
    until munge_works; do
        [ $t -lt 100 ] || { tail -n 20 "$RUNDIR/munged.out" /var/log/munge/munged.log >&2 2>/dev/null || true
            fail "munged did not come up within 10 s"; }
        sleep 0.1
        t=$((t + 1))
    done
}

ensure_hosts() {
    # Jobs see SLURM_JOB_NODELIST=n[1-2]; code deriving a master address from it must resolve n1/n2.
    if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
        log "adding '127.0.0.1 n1 n2' to /etc/hosts"
        echo "127.0.0.1 n1 n2" >>/etc/hosts
    fi
}

write_conf() {
    local host
    host=$(hostname -s)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a two-node test cluster on one machine.
ClusterName=launcher
# "(127.0.0.1)" so that the host name need not resolve.
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# See CRED_EXPIRE in the script: this also sets how long a requeued job waits (cred_expire+1 s).
AuthInfo=cred_expire=${CRED_EXPIRE}
# linuxproc tracks a job's processes by parent pid and can signal them all
# (scancel -s, --signal=USR2@N, submitit's preemption/timeout handling).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SchedulerType=sched/backfill
# Short scheduler periods: a requeued job starts as soon as its BeginTime has passed instead of
# waiting for the next 30 s backfill / 60 s main-loop pass. Negligible cost with a few jobs.
SchedulerParameters=bf_interval=1,sched_interval=2
# Cores are the consumable: jobs share a node core by core; memory is not tracked, so jobs
# without --mem run (and --mem up to RealMemory is accepted).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Both slurmds see the machine's real CPUs; the slurm.conf values below are taken as they are
# (a smaller CI machine does not drain the nodes as INVALID).
SlurmdParameters=config_overrides
# Jobs ignoring SIGTERM are killed after 10 s (default 30) so cancel/stop stay quick.
KillWait=10
InactiveLimit=0
# Finished jobs stay visible in squeue -t all / scontrol show job for 5 minutes (the default).
MinJobAge=300
# No slurmdbd: sacct fails (submitit says "Bypassing sacct error"), but every job's end state
# is written to JobCompLoc, and "sacct -c" reads it.
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
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

# Print the relevant logs, stop whatever this run started, and exit 5.
fail() {
    log "ERROR: $*"
    local f
    for f in "$RUNDIR"/slurmctld.log "$RUNDIR"/slurmctld.out "$RUNDIR"/slurmd-n1.log \
        "$RUNDIR"/slurmd-n2.log "$RUNDIR"/slurmd-n*.out; do
        [ -s "$f" ] || continue
        echo "----- tail of $f -----" >&2
        tail -n 15 "$f" >&2
    done
    kill_recorded
    exit 5
}

# Start DAEMON ARGS... in the background, in its own session, in the foreground mode (-D) so
# that $! is the daemon's pid; stdio to a file so that no caller's pipe is held open, and
# without our lock fd 9 (else the daemons would hold the RUNDIR lock forever).
spawn() {
    local name=$1 out=$2
    shift 2
    setsid "$@" </dev/null >>"$out" 2>&1 9>&- &
    record_pid $! "$name"
}

check_alive_or_fail() {
    local pid name
    while read -r pid name; do
        pid_is "$pid" "$name" || fail "$name (pid $pid) exited during start-up"
    done <"$PIDS"
}

nodes_idle() {
    # "idle" exactly: not idle* (not responding), idle~ (powered down) or drain/down.
    local out
    out=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    grep -qx 'n1 idle' <<<"$out" && grep -qx 'n2 idle' <<<"$out"
}

do_start() {
    require_root
    mkdir -p "$RUNDIR"
    # Serialise concurrent starts/stops (e.g. two test sessions) on the same RUNDIR.
    exec 9>"$RUNDIR/lock"
    flock -w 120 9 || die 5 "another slurm_cluster.sh holds $RUNDIR/lock"

    if all_recorded_alive && nodes_idle_or_busy; then
        log "already running (RUNDIR=$RUNDIR)"
        echo "export SLURM_CONF=$CONF"
        echo "# launcher-slurm: already running"
        return 0
    fi

    ensure_installed
    local t0=$SECONDS
    # Stale RUNDIR: stop any survivor of an earlier run that we recorded, start from clean state.
    kill_recorded
    rm -rf "$RUNDIR/state" "$RUNDIR"/slurmd-n[12] "$RUNDIR"/*.log "$RUNDIR"/*.out "$RUNDIR"/*.pid
    mkdir -p "$RUNDIR/state" "$RUNDIR/slurmd-n1" "$RUNDIR/slurmd-n2"
    : >"$PIDS"

    ensure_munge
    ensure_hosts
    write_conf

    # -c: no job/node state from any earlier run. -i: ignore state-file errors.
    spawn slurmctld "$RUNDIR/slurmctld.out" slurmctld -D -c -i -f "$CONF"
    local deadline=$((t0 + START_TIMEOUT))
    until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
        check_alive_or_fail
        [ $SECONDS -lt $deadline ] || fail "slurmctld did not answer within ${START_TIMEOUT} s"
        sleep 0.2
    done
    spawn slurmd "$RUNDIR/slurmd-n1.out" slurmd -D -N n1 -f "$CONF"
    spawn slurmd "$RUNDIR/slurmd-n2.out" slurmd -D -N n2 -f "$CONF"
    until nodes_idle; do
        check_alive_or_fail
        [ $SECONDS -lt $deadline ] || {
            timeout 5 sinfo -N -l >&2 || true
            fail "nodes n1, n2 not idle within ${START_TIMEOUT} s"
        }
        sleep 0.2
    done
    log "up in $((SECONDS - t0)) s: 2 nodes (n1, n2) x 2 CPUs; RUNDIR=$RUNDIR"
    echo "export SLURM_CONF=$CONF"
    echo "# launcher-slurm: started"
}

# For "already running": the controller answers and both nodes are in a usable state.
nodes_idle_or_busy() {
    local out
    out=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    grep -qxE 'n1 (idle|mix|alloc|comp)' <<<"$out" && grep -qxE 'n2 (idle|mix|alloc|comp)' <<<"$out"
}

do_stop() {
    [ -d "$RUNDIR" ] || { log "nothing to stop ($RUNDIR does not exist)"; return 0; }
    exec 9>"$RUNDIR/lock"
    flock -w 120 9 || die 5 "another slurm_cluster.sh holds $RUNDIR/lock"
    if [ ! -s "$PIDS" ]; then
        log "nothing to stop (no $PIDS)"
        return 0
    fi
    if [ -f "$CONF" ] && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        local jobs
        jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | tr '\n' ' ') || true
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            # Let slurmd end the jobs' processes before slurmd itself goes (bounded: KillWait+5 s).
            local t=0
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
    if [ ! -f "$CONF" ] || ! timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        log "not running (RUNDIR=$RUNDIR)"
        exit 5
    fi
    echo "SLURM_CONF=$CONF"
    [ -f "$PIDS" ] && { echo "pids:"; sed 's/^/  /' "$PIDS"; }
    timeout 10 sinfo -N -l
    timeout 10 squeue
}

case "$cmd" in
start) do_start ;;
stop) do_stop ;;
status) do_status ;;
-h | --help | help) usage ;;
*) usage ;;
esac
