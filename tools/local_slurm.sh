#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (no systemd, no cgroups), for the test suite and for trying
# the slurm/ scripts by hand.
#
#   bash tools/local_slurm.sh ensure-installed   # apt-get the Debian packages if missing (idempotent, fast)
#   eval "$(bash tools/local_slurm.sh start DIR)" # conf + state under DIR; prints `export SLURM_CONF=...`
#   bash tools/local_slurm.sh status DIR          # which daemons of DIR are alive; exit 1 if any is not
#   bash tools/local_slurm.sh stop DIR            # stops only the daemons started for DIR (by PID file)
#
# Everything a cluster needs lives under DIR (or a munge dir it names), ports are picked free at start, so two
# clusters (two test sessions) can run side by side. Needs root (munged runs as the munge user).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge tini)
# binaries that prove the packages are there
BINARIES=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged munge unmunge tini)
START_TIMEOUT=${LOCAL_SLURM_START_TIMEOUT:-60}

die() { echo "local_slurm: $*" >&2; exit 1; }
log() { echo "local_slurm: $*" >&2; }

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ----------------------------------------------------------------------------------------------- install
missing_binaries() {
    local b
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || echo "$b"; done
}

ensure_installed() {
    [[ -z "$(missing_binaries)" ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "SLURM is not installed and installing needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is not available (need: ${PACKAGES[*]})"
    # two `make test` runs at once: the second waits for the first's install instead of failing on apt's lock
    mkdir -p /run/lock && exec 9>/run/lock/mmcat-local-slurm-install.lock
    flock -w 900 9 || die "another install of ${PACKAGES[*]} is still running after 900 s"
    [[ -z "$(missing_binaries)" ]] && return 0
    log "installing ${PACKAGES[*]} (missing: $(missing_binaries | tr '\n' ' '))"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed; cannot install ${PACKAGES[*]}"
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" >&2 \
        || die "apt-get install ${PACKAGES[*]} failed"
    local still
    still=$(missing_binaries | tr '\n' ' ')
    [[ -z "$still" ]] || die "installed ${PACKAGES[*]} but still missing: $still"
}

# ----------------------------------------------------------------------------------------------- process helpers
# A PID counts as alive only if /proc/PID/stat exists, is not a zombie/dead, and its command name matches
# (kill -0 succeeds on zombies, and a recycled PID may belong to someone else).
pid_alive() {  # pid expected_comm
    local pid=$1 want=$2 stat comm state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    comm=${stat#*(}; comm=${comm%%)*}
    state=${stat##*) }; state=${state%% *}
    [[ "$state" != Z && "$state" != X && "$comm" == "$want"* ]]
}

read_pid() { [[ -f "$1" ]] && tr -dc '0-9' <"$1" || true; }

wait_until() {  # timeout_s description command...
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

free_port() {
    python3 - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# daemons: name -> pid file (relative to DIR), expected comm
# munged writes its own pid file; slurmctld/slurmd run in the foreground (-D) and we record $!
DAEMONS=("munged:run/munged.pid:munged" "slurmctld:run/slurmctld.pid:slurmctld" "slurmd:run/tini-slurmd.pid:tini" "slurmd-child:run/slurmd.pid:slurmd")

stop_pid() {  # pid comm
    local pid=$1 comm=$2
    pid_alive "$pid" "$comm" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 15 "$comm exit" bash -c "! { s=\$(cat /proc/$pid/stat 2>/dev/null) && s=\${s##*) } && [[ \${s%% *} != Z ]]; }"; then
        log "$comm ($pid) ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

kill_descendants() {  # tini_pid slurmd_pid: SIGKILL every process below tini except slurmd itself
    local root=$1 keep=$2 pid ppid stat
    pid_alive "$root" tini || return 0
    local -A parent=()
    for stat in /proc/[0-9]*/stat; do
        { read -r pid _ <"$stat"; } 2>/dev/null || continue
        ppid=$(sed -E 's/^.*\) [A-Za-z] ([0-9]+) .*/\1/' "$stat" 2>/dev/null) || continue
        parent[$pid]=$ppid
    done
    local victims=() p
    for pid in "${!parent[@]}"; do
        p=${parent[$pid]}
        while [[ -n "$p" && "$p" != 0 && "$p" != 1 ]]; do
            if [[ "$p" == "$root" ]]; then [[ "$pid" != "$keep" ]] && victims+=("$pid"); break; fi
            p=${parent[$p]:-}
        done
    done
    if ((${#victims[@]})); then
        log "killing ${#victims[@]} leftover job process(es): ${victims[*]}"
        kill -KILL "${victims[@]}" 2>/dev/null || true
    fi
}

# ----------------------------------------------------------------------------------------------- start
write_conf() {  # dir host ctld_port slurmd_port munge_socket
    local dir=$1 host=$2 cport=$3 dport=$4 msock=$5 node
    # node line from the hardware as slurmd sees it (CPUs, sockets, RealMemory); rename it to our host name
    node=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/; s/ UpTime=.*//")
    cat >"$dir/slurm.conf" <<EOF
# generated by tools/local_slurm.sh for a throw-away single-node test cluster
ClusterName=mmcat-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$cport
SlurmdPort=$dport
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: otherwise a requeued job is held ~121 s before it may start again
AuthInfo=socket=$msock,cred_expire=5
# no cgroups here; linuxproc leaks orphans, pgid does not
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid.daemon
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_idle() {
    local state
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    [[ "$state" == idle ]]
}

start() {
    local dir=$1
    [[ $(id -u) -eq 0 ]] || die "start needs root (munged must be started as the munge user)"
    [[ -z "$(missing_binaries)" ]] || die "SLURM is not installed; run: bash $0 ensure-installed"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if status "$dir" >/dev/null 2>&1; then
        log "cluster in $dir already running"
        echo "export SLURM_CONF=$dir/slurm.conf"
        return 0
    fi
    stop "$dir" >/dev/null 2>&1 || true  # leftovers of a half-started cluster
    mkdir -p "$dir"/{state,spool,run,log}

    # munge: its dir must be reachable by the munge user (DIR may sit under a 0700 pytest tmp dir), so it lives
    # in a fresh 0755 dir under /run whose path is recorded in DIR
    local mdir
    mdir=$(mktemp -d /run/mmcat-munge.XXXXXX)
    echo "$mdir" >"$dir/run/munge_dir"
    chmod 0755 "$mdir"
    head -c 1024 /dev/urandom >"$mdir/munge.key"
    chmod 0400 "$mdir/munge.key"
    chown -R munge:munge "$mdir"
    local msock="$mdir/munge.socket"
    runuser -u munge -- munged --socket="$msock" --key-file="$mdir/munge.key" --pid-file="$mdir/munged.pid" \
        --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed" \
        || die "munged failed to start (see $mdir/munged.log)"
    wait_until 10 "munged pid" test -s "$mdir/munged.pid" || die "munged wrote no pid file"
    cp "$mdir/munged.pid" "$dir/run/munged.pid"
    munge -S "$msock" -n | unmunge -S "$msock" >/dev/null || die "munge self-test failed (see $mdir/munged.log)"

    local host cport dport
    host=$(hostname -s)
    cport=$(free_port)
    dport=$(free_port)
    while [[ "$dport" == "$cport" ]]; do dport=$(free_port); done
    write_conf "$dir" "$host" "$cport" "$dport" "$msock"
    export SLURM_CONF="$dir/slurm.conf"

    # -c: start from a clean state (this cluster is throw-away); setsid: not in the caller's process group
    setsid slurmctld -D -c -f "$SLURM_CONF" >>"$dir/log/slurmctld.stdout" 2>&1 </dev/null &
    echo $! >"$dir/run/slurmctld.pid"
    # tini -s reaps slurmstepd/job orphans at once (PID 1 here reaps late, adding seconds to every job)
    setsid tini -s -- slurmd -D -N "$host" -f "$SLURM_CONF" >>"$dir/log/slurmd.stdout" 2>&1 </dev/null &
    echo $! >"$dir/run/tini-slurmd.pid"

    if ! wait_until "$START_TIMEOUT" "node idle" node_idle; then
        log "node did not become idle within ${START_TIMEOUT}s; sinfo: $(sinfo -h -N -o '%T %E' 2>&1 | head -n1)"
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null || true
        stop "$dir" >/dev/null 2>&1 || true
        exit 1
    fi
    echo "export SLURM_CONF=$dir/slurm.conf"
}

# ----------------------------------------------------------------------------------------------- status / stop
status() {
    local dir=$1 entry name rel comm pid ok=0
    [[ -f "$dir/slurm.conf" ]] || { echo "no cluster in $dir"; return 1; }
    for entry in "${DAEMONS[@]}"; do
        IFS=: read -r name rel comm <<<"$entry"
        pid=$(read_pid "$dir/$rel")
        if pid_alive "$pid" "$comm"; then echo "$name running (pid $pid)"; else echo "$name not running"; ok=1; fi
    done
    return $ok
}

stop() {
    local dir=$1 pid mdir
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/slurm.conf" ]] && pid_alive "$(read_pid "$dir/run/slurmctld.pid")" slurmctld; then
        # cancel this cluster's jobs first so that no slurmstepd/job processes outlive the daemons
        export SLURM_CONF="$dir/slurm.conf"
        if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
            scancel --full --signal=KILL $(squeue -h -o %i) 2>/dev/null || true
            scancel $(squeue -h -o %i) 2>/dev/null || true
            wait_until 15 "jobs gone" bash -c '[[ -z "$(squeue -h -o %i 2>/dev/null)" ]]' || true
        fi
    fi
    # job processes that left their step's process group (torch launchers start trainers in new sessions) are
    # invisible to proctrack/pgid; tini -s reparents them to itself, so kill what is still below it
    kill_descendants "$(read_pid "$dir/run/tini-slurmd.pid")" "$(read_pid "$dir/run/slurmd.pid")"
    # slurmd first (tini exits with it), then the controller, then munge
    stop_pid "$(read_pid "$dir/run/slurmd.pid")" slurmd
    stop_pid "$(read_pid "$dir/run/tini-slurmd.pid")" tini
    stop_pid "$(read_pid "$dir/run/slurmctld.pid")" slurmctld
    stop_pid "$(read_pid "$dir/run/munged.pid")" munged
    mdir=$(cat "$dir/run/munge_dir" 2>/dev/null || true)
    if [[ "$mdir" == /run/mmcat-munge.* && -d "$mdir" ]]; then rm -rf "$mdir"; fi
    rm -f "$dir"/run/*.pid "$dir/run/munge_dir"
}

cmd=${1:-}
case "$cmd" in
    ensure-installed) ensure_installed ;;
    start) [[ $# -eq 2 ]] || usage; start "$2" ;;
    stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
    status) [[ $# -eq 2 ]] || usage; status "$2" ;;
    *) usage ;;
esac
