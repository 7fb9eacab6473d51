#!/usr/bin/env bash
# A real Slurm for the tests, munge on a private socket, no systemd. Two shapes:
# On this one machine: two slurmd "nodes" (n1, n2) beside one slurmctld, everything under DIR.
#   tests/slurm/cluster.sh start DIR   install (apt) if needed, write configs, start, wait until idle
#   tests/slurm/cluster.sh stop DIR    stop exactly the daemons started here (by their pid files)
# Clients need SLURM_CONF=DIR/etc/slurm.conf. Node names n1/n2 are added to /etc/hosts while up.
# On separate hosts (tests/hosts.py namespaces; DIR is visible on all of them, /tmp is each host's own):
#   tests/slurm/cluster.sh hosts-conf DIR HEAD=ADDR NODE=ADDR...   (here) one munge key, one slurm.conf:
#                                      HEAD runs slurmctld, each NODE a slurmd; partitions "low"
#                                      (default, preempted by requeue) and "high" on every node
#   tests/slurm/cluster.sh daemon DIR munged|slurmctld|slurmd       (on a host) start that daemon there
#   tests/slurm/cluster.sh wait-idle N                              (on any host) until N nodes are idle
# Those daemons end with their host (its PID namespace): there is nothing to stop.
set -euo pipefail
cmd=${1:?start|stop|install|hosts-conf|daemon|wait-idle}
HOSTS_TAG="# mnist-dist test cluster ${2:-}"

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
    local policy=/usr/sbin/policy-rc.d made=""
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; made=1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1; apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null; }
    [ -n "$made" ] && rm -f $policy
    return 0
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

munged_at() {  # SOCKET_DIR KEY: munged as the munge user (it refuses root-owned socket dirs)
    local dir=$1 key=$2
    mkdir -p "$dir"; [ "$key" -ef "$dir/munge.key" ] || cp "$key" "$dir/munge.key"
    chown -R munge:munge "$dir"; chmod 0755 "$dir"; chmod 0600 "$dir/munge.key"
    runuser -u munge -- munged --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"
}

common_conf() {  # MUNGE_SOCKET: the settings both shapes share
    cat <<CONF
ClusterName=mnisttest
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$1
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=batch_sched_delay=0
MinJobAge=5
KillWait=10
ReturnToService=2
SlurmdParameters=config_overrides
CONF
}

wait_idle() {  # N: until N nodes are idle (30 s)
    for _ in $(seq 1 150); do
        [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$')" = "$1" ] && return 0  # a line per partition
        sleep 0.2
    done
    echo "slurm did not come up" >&2; sinfo >&2 || true; return 1
}

hosts_conf() {  # DIR HEAD=ADDR NODE=ADDR...
    local dir=$1 head=${2%%=*} head_addr=${2#*=} node names=()
    shift 2
    mkdir -p "$dir/log"
    [ -f "$dir/munge.key" ] || mungekey -c -k "$dir/munge.key"  # one key, copied to every host
    {
        common_conf /tmp/munge/munge.socket
        cat <<CONF
SlurmctldHost=$head($head_addr)
StateSaveLocation=/tmp/slurmctld
SlurmctldPidFile=/tmp/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdSpoolDir=/tmp/slurmd
SlurmdPidFile=/tmp/slurmd.pid
SlurmdLogFile=$dir/log/slurmd-%n.log
# a node that stops answering is DOWN after 10 s and its jobs are requeued (the default is 300 s)
SlurmdTimeout=10
MessageTimeout=5
# scheduler preemption: a job in "high" requeues the "low" jobs in its way (SIGTERM, then
# SIGKILL after GraceTime)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
CONF
        for node in "$@"; do
            names+=("${node%%=*}")
            echo "NodeName=${node%%=*} NodeAddr=${node#*=} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000"
        done
        local all; all=$(IFS=,; echo "${names[*]}")
        echo "PartitionName=low Nodes=$all Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30"
        echo "PartitionName=high Nodes=$all MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"
    } > "$dir/slurm.conf"
    echo "SLURM_CONF=$dir/slurm.conf"
}

daemon() {  # DIR munged|slurmctld|slurmd, on the host it is to run on
    local dir=$1
    case $2 in
        munged) munged_at /tmp/munge "$dir/munge.key" ;;
        slurmctld|slurmd) mkdir -p /tmp/slurmctld /tmp/slurmd; "$2" -f "$dir/slurm.conf" ;;
        *) echo "unknown daemon $2" >&2; return 2 ;;
    esac
}

start() {
    install
    mkdir -p "$DIR"/{etc,munge,log,run,spool,state}
    DIR=$(cd "$DIR" && pwd)
    local host; host=$(hostname -s)
    [ -f "$DIR/munge/munge.key" ] || { if [ -f /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$DIR/munge/munge.key"; else mungekey -c -k "$DIR/munge/munge.key"; fi; }
    munged_at "$DIR/munge" "$DIR/munge/munge.key"
    # nodes: each half of this machine's memory (RealMemory must not exceed what slurmd measures)
    local mem; mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); mem=$((mem * 95 / 100 / 2))
    # three free ports (controller, node 1, node 2): another Slurm on this machine must not answer for us
    local ports; ports=($(python3 -c 'import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])'))
    { common_conf "$DIR/munge/munge.socket"; cat <<CONF
SlurmctldHost=$host(127.0.0.1)
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[1]} CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=$mem
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[2]} CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=$mem
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    } > "$DIR/etc/slurm.conf"
    export SLURM_CONF="$DIR/etc/slurm.conf"
    # real clusters resolve node names; here they are added to /etc/hosts for as long as the cluster runs
    grep -qF "$HOSTS_TAG" /etc/hosts || printf '127.0.0.1 n1 n2 %s\n' "$HOSTS_TAG" >> /etc/hosts
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    wait_idle 2 || { echo "logs in $DIR/log" >&2; return 1; }
    local f
    for f in "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd-n1.pid "$DIR"/run/slurmd-n2.pid; do
        alive "$f" || { echo "a daemon died at start ($f); logs in $DIR/log" >&2; return 1; }
    done
    echo "slurm up: SLURM_CONF=$SLURM_CONF"
}

stop() {
    DIR=$(cd "$DIR" 2>/dev/null && pwd) || return 0
    local pids=() f
    # cancel what still runs first: slurmstepd and the job's processes would outlive the daemons
    if alive "$DIR/run/slurmctld.pid"; then
        SLURM_CONF="$DIR/etc/slurm.conf" scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(SLURM_CONF="$DIR/etc/slurm.conf" squeue -h -t running,completing 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for f in "$DIR"/run/slurmd-n1.pid "$DIR"/run/slurmd-n2.pid "$DIR"/run/slurmctld.pid "$DIR"/munge/munged.pid; do
        if alive "$f"; then pids+=("$(cat "$f")"); kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
    done
    for _ in $(seq 1 100); do
        local left=0 p
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
        [ $left = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    local tmp; tmp=$(mktemp); grep -vF "$HOSTS_TAG" /etc/hosts > "$tmp" || true; cat "$tmp" > /etc/hosts; rm -f "$tmp"
    echo "slurm stopped"
}

case $cmd in
    start) DIR=${2:?directory (keep it short: the munge socket path must stay < 108 bytes)}; start ;;
    stop) DIR=${2:?directory}; stop ;;
    install) install ;;
    hosts-conf) install; hosts_conf "${@:2}" ;;
    daemon) daemon "${@:2}" ;;
    wait-idle) wait_idle "${2:?number of nodes}" ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
