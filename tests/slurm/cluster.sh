#!/usr/bin/env bash
# A real Slurm on this one machine for the tests: two slurmd "nodes" (n1, n2) beside one slurmctld,
# munge on a private socket, everything under DIR, no systemd.
#   tests/slurm/cluster.sh start DIR   install (apt) if needed, write configs, start, wait until idle
#   tests/slurm/cluster.sh stop DIR    stop exactly the daemons started here (by their pid files)
# Clients need SLURM_CONF=DIR/etc/slurm.conf. Node names n1/n2 are added to /etc/hosts while up.
set -euo pipefail
cmd=${1:?start|stop}; DIR=${2:?directory (keep it short: the munge socket path must stay < 108 bytes)}
HOSTS_TAG="# mnist-dist test cluster $DIR"

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

start() {
    install
    mkdir -p "$DIR"/{etc,munge,log,run,spool,state}
    DIR=$(cd "$DIR" && pwd)
    local host; host=$(hostname -s)
    # munge: its own key and socket, run as the munge user (it refuses root-owned socket dirs)
    [ -f "$DIR/munge/munge.key" ] || { if [ -f /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$DIR/munge/munge.key"; else mungekey -c -k "$DIR/munge/munge.key"; fi; }
    chown -R munge:munge "$DIR/munge"; chmod 0755 "$DIR/munge"; chmod 0600 "$DIR/munge/munge.key"
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munge.seed"
    # nodes: each half of this machine's memory (RealMemory must not exceed what slurmd measures)
    local mem; mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); mem=$((mem * 95 / 100 / 2))
    # three free ports (controller, node 1, node 2): another Slurm on this machine must not answer for us
    local ports; ports=($(python3 -c 'import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])'))
    cat > "$DIR/etc/slurm.conf" <<CONF
ClusterName=mnisttest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
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
    export SLURM_CONF="$DIR/etc/slurm.conf"
    # real clusters resolve node names; here they are added to /etc/hosts for as long as the cluster runs
    grep -qF "$HOSTS_TAG" /etc/hosts || printf '127.0.0.1 n1 n2 %s\n' "$HOSTS_TAG" >> /etc/hosts
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    for _ in $(seq 1 150); do
        if [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')" = "idle " ]; then
            local f
            for f in "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd-n1.pid "$DIR"/run/slurmd-n2.pid; do
                alive "$f" || { echo "a daemon died at start ($f); logs in $DIR/log" >&2; return 1; }
            done
            echo "slurm up: SLURM_CONF=$SLURM_CONF"; return 0
        fi
        sleep 0.2
    done
    echo "slurm did not come up; logs in $DIR/log" >&2; sinfo >&2 || true; return 1
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

"$cmd"
