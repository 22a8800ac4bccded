#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by slurm/start-cluster.sh. Idempotent; run as root.
# Stops slurmd, slurmctld and, if start-cluster.sh started it, munged. Keeps configuration and logs.
set -euo pipefail

STATE=${HSBENCH_SLURM_STATE:-/var/spool/hsbench-slurm}

stop() {  # stop <pid file>: SIGTERM the process it names, wait up to 10 s
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { echo "stop-cluster: pid $pid ($pidfile) did not exit" >&2; return 1; }
    fi
    rm -f "$pidfile"
}

stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
if [ -f "$STATE/munged.pid" ]; then
    stop "$STATE/munged.pid"
    rm -f /run/munge/munged.pid
fi
echo "stop-cluster: stopped"
