#!/usr/bin/env bash
# Stop the single-node test cluster started by start_cluster.sh: cancel every job, then stop
# slurmd and slurmctld by their pid files. munged is left running (harmless, shared with other
# munge users). Safe to run when nothing is running.
set -uo pipefail

RUN_DIR=/run/slurm

stop_daemon() {  # $1: name, $2: pid file
    local pid
    [ -f "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        echo "[stop_cluster] stopping $1 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$2"
}

if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
    scancel --user="$(id -un)" 2>/dev/null || true
fi
stop_daemon slurmd "$RUN_DIR/slurmd.pid"
stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
