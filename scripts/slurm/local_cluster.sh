#!/usr/bin/env bash
# Start (or stop) a one-node SLURM cluster on this machine for the SLURM end-to-end check.
#
#   source scripts/slurm/local_cluster.sh start DIR    # exports SLURM_CONF; slurmctld + slurmd + munged running
#   scripts/slurm/local_cluster.sh stop DIR
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (scripts/slurm/ci_check.sh installs them
# with apt-get when it can). Everything it writes lives under DIR (config, state, logs); nothing else is touched
# but the munge daemon, which it starts if none runs.
set -euo pipefail

local_cluster_start() {
  local dir="$1"
  mkdir -p "$dir"/{state,spool,log}
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=megatron-ral-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$(( 17817 + RANDOM % 1000 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmdTimeout=120
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF="$dir/slurm.conf"
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
  fi
  /usr/sbin/slurmctld -f "$SLURM_CONF"
  /usr/sbin/slurmd -f "$SLURM_CONF"
  local i
  for i in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "[slurm] local cluster up: $(sinfo -h -o '%N %c CPUs %T')"
      return 0
    fi
    sleep 1
  done
  echo "[slurm] error: the node did not come up; logs in $dir/log" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  return 1
}

local_cluster_stop() {
  local dir="$1"
  for f in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" || $# -gt 0 ]]; then
  case "${1:-}" in
    start) local_cluster_start "$2" ;;
    stop) local_cluster_stop "$2" ;;
    *) echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2 ;;
  esac
fi
