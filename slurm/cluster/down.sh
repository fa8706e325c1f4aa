#!/usr/bin/env bash
# Stop the local cluster that up.sh started: cancel jobs, then slurmd daemons and slurmctld.
# munged stays up (other tools on the host may use it). Idempotent: nothing running is fine.
set -euo pipefail

STATE=${MVEB_SLURM_STATE:-/var/lib/mveb-slurm}

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm/cluster/down.sh: error: run as root" >&2; exit 1; }
    exec sudo -E bash "$0" "$@"
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/slurmctld.pid"; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    scancel --full --quiet 2>/dev/null || true
fi
stopped=0
shopt -s nullglob
for pidfile in "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid"; do
    if alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        stopped=$((stopped + 1))
    fi
    rm -f "$pidfile"
done
echo "local SLURM cluster down ($stopped daemons stopped)"
