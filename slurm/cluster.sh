#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for tests: two nodes (n1, n2) on one host.
#   slurm/cluster.sh start     # writes $DBOT_SLURM_DIR/env.sh: source it for SLURM_CONF
#   slurm/cluster.sh stop      # cancels jobs, stops the daemons, removes the /etc/hosts lines
# Needs root and Debian's slurmctld, slurmd and slurm-client (`slurm/cluster.sh install`).
# Everything (config, state, spool, logs, pids, a munge key) lives in $DBOT_SLURM_DIR, nothing in
# /etc. The daemons listen on 127.0.0.1 only, and every request needs a credential from this
# cluster's own munged (a fresh random key): no other host or key can submit jobs, which run as root.
set -euo pipefail
DIR="${DBOT_SLURM_DIR:-/tmp/dbot-slurm}"
MARK="# dbot-ds test cluster"
CPUS="${DBOT_SLURM_CPUS:-$(nproc)}"

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  mkdir -p "$DIR"/{state,spool,log,run}
  cat > "$DIR/slurm.conf" <<CONF
ClusterName=dbot
SlurmctldHost=$(hostname -s)(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n1 NodeHostname=n1 NodeAddr=127.0.0.1 Port=6818 CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=127.0.0.1 Port=6819 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  echo "CgroupPlugin=cgroup/v1" > "$DIR/cgroup.conf"
  echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"
}

start_munge() {
  mkdir -p -m 700 "$DIR/munge"
  head -c 1024 /dev/urandom > "$DIR/munge/munge.key" && chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
}

start() {
  install
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "slurm daemons are already running (pids $(pgrep -x 'slurmctld|slurmd' | tr '\n' ' ')): " \
         "stop that cluster first (DBOT_SLURM_DIR=<its dir> $0 stop)" >&2
    return 1
  fi
  write_config
  start_munge
  export SLURM_CONF="$DIR/slurm.conf"
  grep -q "$MARK" /etc/hosts || echo "127.0.0.1 n1 n2 $MARK" >> /etc/hosts
  slurmctld -c -f "$SLURM_CONF"
  mkdir -p "$DIR/spool/n1" "$DIR/spool/n2"
  slurmd -N n1 -f "$SLURM_CONF"
  slurmd -N n2 -f "$SLURM_CONF"
  for _ in $(seq 100); do
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "idle " ] && { echo "slurm test cluster up: source $DIR/env.sh"; return 0; }
    sleep 0.2
  done
  echo "slurm test cluster did not come up (node states: ${states:-none}); see $DIR/log" >&2
  stop
  return 1
}

stop() {
  export SLURM_CONF="$DIR/slurm.conf"
  if [ -f "$SLURM_CONF" ]; then
    scancel --quiet --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    scontrol shutdown 2>/dev/null || true
  fi
  for pidfile in "$DIR"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ -S "$DIR/munge/munge.socket" ] && munged --stop --socket="$DIR/munge/munge.socket" >/dev/null 2>&1 || true
  sed -i "/$MARK/d" /etc/hosts
  [ -f "$DIR/slurm.conf" ] && rm -rf "$DIR"  # only a directory this script set up
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
