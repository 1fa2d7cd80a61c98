#!/usr/bin/env bash
# A single-node SLURM on this machine (Debian/Ubuntu, as root, no systemd needed), to try the cluster path of
# the workflow (workflow/profiles/slurm) for real: munge, slurmctld and slurmd, one node with this machine's
# CPUs and memory, one partition, no accounting database.
#
#   bash scripts/slurm_local.sh up        # install slurm-wlm + munge if missing (apt-get), write the config, start
#   eval "$(bash scripts/slurm_local.sh env)"   # SLURM_CONF and the profile's account/partition for this shell
#   bash scripts/slurm_local.sh status    # the daemons, the node, the queue
#   bash scripts/slurm_local.sh down      # stop the daemons (the state folder is kept; `purge` removes it too)
#
# The config goes where every SLURM command looks, /etc/slurm/slurm.conf (the SLURM executor's job step drops
# SLURM_CONF from the environment of its `srun`, so a config elsewhere is not found inside the jobs); `up`
# refuses to replace a slurm.conf it did not write. Spool, state and logs live under $HDPO_SLURM_HOME
# (default /tmp/hdpo-slurm); munge uses the key its package made. Running `up` again is harmless: it starts only
# what is not running.
set -euo pipefail

HOME_DIR="${HDPO_SLURM_HOME:-/tmp/hdpo-slurm}"
CONF="${HDPO_SLURM_CONF:-/etc/slurm/slurm.conf}"
MARK="# written by scripts/slurm_local.sh"
PARTITION="${HDPO_SLURM_PARTITION:-cpu}"
export SLURM_CONF="$CONF"

say() { echo "slurm_local: $*" >&2; }
die() { say "$*"; exit 1; }
running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed; run as root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "no apt-get here: install slurm-wlm (slurmctld, slurmd) and munge yourself"
    say "installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$HOME_DIR/apt.log" 2>&1 \
        || { apt-get update -q >>"$HOME_DIR/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$HOME_DIR/apt.log" 2>&1; } \
        || die "apt-get install slurm-wlm munge failed: see $HOME_DIR/apt.log"
}

write_conf() {
    local node cpus mem_mb
    node="$(hostname -s)"
    cpus="$(nproc)"
    # what slurmd will report, less 10% for the system (a node that reports less memory than slurm.conf
    # declares is drained)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$HOME_DIR"/{spool,state,log} "$(dirname "$CONF")"
    if [[ -f "$CONF" ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script: not replacing it (HDPO_SLURM_CONF=<path> for another)"
    fi
    cat >"$CONF.new" <<EOF
$MARK: a single-node cluster for trying the workflow's SLURM profile
ClusterName=hdpo-local
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$HOME_DIR/state
SlurmdSpoolDir=$HOME_DIR/spool
SlurmctldPidFile=$HOME_DIR/slurmctld.pid
SlurmdPidFile=$HOME_DIR/slurmd.pid
SlurmctldLogFile=$HOME_DIR/log/slurmctld.log
SlurmdLogFile=$HOME_DIR/log/slurmd.log
SlurmctldPort=${HDPO_SLURMCTLD_PORT:-6817}
SlurmdPort=${HDPO_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# finished jobs stay visible to squeue for 10 minutes (the workflow's profile polls squeue: no sacct here)
MinJobAge=600
# a job past its time limit gets SIGTERM, then SIGKILL 5 s later
KillWait=5
SchedulerType=sched/backfill
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f "$CONF" ]] && cmp -s "$CONF" "$CONF.new"; then
        rm "$CONF.new"
    else
        mv "$CONF.new" "$CONF"
        if running "$HOME_DIR/slurmctld.pid"; then  # a changed machine: restart with the new config
            say "config changed: restarting the daemons"
            stop
        fi
    fi
}

start() {
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
        if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
            runuser -u munge -- munged
        else
            munged --force
        fi
    fi
    munge -n | unmunge >/dev/null || die "munge does not work: see /var/log/munge/munged.log"
    running "$HOME_DIR/slurmctld.pid" || slurmctld -f "$CONF"
    running "$HOME_DIR/slurmd.pid" || slurmd -f "$CONF"
    local node
    node="$(hostname -s)"
    for _ in $(seq 60); do
        if sinfo -h -n "$node" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
            say "up: node $node, partition $PARTITION ($(sinfo -h -o '%c CPUs, %m MB' -n "$node"))"
            return
        fi
        sleep 1
    done
    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
    sinfo -h -n "$node" -o %t | grep -Eq '^(idle|mix|alloc)' \
        || die "the node did not come up: see $HOME_DIR/log/slurmctld.log and slurmd.log ($(sinfo -h -o '%t %E' 2>&1))"
}

stop() {
    local pidfile
    for pidfile in "$HOME_DIR/slurmd.pid" "$HOME_DIR/slurmctld.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 20); do running "$pidfile" || break; sleep 0.5; done
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    up)
        mkdir -p "$HOME_DIR"
        install
        write_conf
        start
        ;;
    down)
        stop
        say "down (state kept in $HOME_DIR; munged left running)"
        ;;
    purge)
        stop
        if [[ -f "$CONF" ]] && head -1 "$CONF" | grep -qF "$MARK"; then rm -f "$CONF"; fi
        rm -rf "$HOME_DIR"
        say "down, $HOME_DIR and $CONF removed"
        ;;
    status)
        for d in slurmctld slurmd; do
            if running "$HOME_DIR/$d.pid"; then echo "$d: running"; else echo "$d: stopped"; fi
        done
        sinfo 2>&1 || true
        squeue 2>&1 || true
        ;;
    env)
        echo "export SLURM_CONF=$(printf %q "$CONF")"
        echo "export HDPO_SLURM_ACCOUNT=\${HDPO_SLURM_ACCOUNT:-root} HDPO_SLURM_PARTITION=$(printf %q "$PARTITION")"
        ;;
    *)
        echo "usage: $0 up|down|purge|status|env" >&2
        exit 2
        ;;
esac
