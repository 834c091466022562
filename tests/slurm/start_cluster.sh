#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, for tests and CI.
#
# Idempotent: installs the Debian packages (slurmctld slurmd slurm-client munge) when missing,
# writes /etc/slurm/slurm.conf sized from this machine, starts munged, slurmctld and slurmd
# directly (no systemd in the container) unless they already run, and waits until the node
# accepts jobs. Re-running on a healthy cluster only checks it.
#
# Known to work: Debian 12, slurm 22.05, as root. proctrack/linuxproc and task/none because
# the container has no usable cgroup hierarchy for slurmd; no accounting storage (no slurmdbd).
# MaxArraySize is raised so the sweep launcher's chunking can use large arrays; the launcher
# reads the value back through `scontrol show config` and never assumes it.
set -euo pipefail

SLURM_ETC=/etc/slurm
SLURM_CONF="$SLURM_ETC/slurm.conf"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MAX_ARRAY_SIZE=${EM_SWEEP_SLURM_MAX_ARRAY_SIZE:-100001}
READY_TIMEOUT_S=${EM_SWEEP_SLURM_READY_TIMEOUT_S:-60}

log() { echo "[start_cluster] $*"; }
die() { echo "[start_cluster] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating munge key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        runuser -u munge -- munged --force
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
        die "munged did not start (see /var/log/munge/munged.log)"
    fi
}

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave ~1 GiB to the OS so slurmd does not drain the node for "Low RealMemory".
    mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
    mkdir -p "$SLURM_ETC" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    local new_conf
    new_conf=$(cat <<EOF
# Written by em-sweep tests/slurm/start_cluster.sh; single-node test cluster.
ClusterName=emsweep
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmdSpoolDir=$SPOOL_DIR
StateSaveLocation=$STATE_DIR
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=200000
# Fast turnaround for tests: short scheduling interval, quick cleanup of finished jobs.
SchedulerParameters=sched_interval=2,bf_interval=5
MinJobAge=60
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)
    if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$new_conf" ]; then
        log "writing $SLURM_CONF (node $host: $cpus CPUs, ${mem_mb} MB)"
        printf '%s\n' "$new_conf" > "$SLURM_CONF"
        CONFIG_CHANGED=1
    fi
}

daemon_running() {  # $1: pid file
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_slurm() {
    if daemon_running "$RUN_DIR/slurmctld.pid"; then
        if [ "${CONFIG_CHANGED:-0}" = 1 ]; then log "reconfiguring slurmctld"; scontrol reconfigure; fi
    else
        log "starting slurmctld"
        slurmctld
    fi
    if ! daemon_running "$RUN_DIR/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
}

wait_ready() {
    local host state
    host=$(hostname -s)
    for _ in $(seq $((READY_TIMEOUT_S * 5))); do
        state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null || true)
        case "$state" in
            idle*|mixed*|allocated*|completing*) log "node $host is $state"; return ;;
            drain*|down*)
                # A node left down/drained by an earlier session (e.g. after a reboot) is fine to resume.
                scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "node $host not ready after ${READY_TIMEOUT_S}s (state '$state'); see $LOG_DIR/"
}

started=$(date +%s.%N)
install_packages
start_munge
write_config
start_slurm
wait_ready
log "ready in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $started}")s"
