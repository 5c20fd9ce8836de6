#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests of `nnunet-selfreg sweep`:
#
#   sudo .ci/slurm_cluster.sh install  # Debian's packages, where one of their programs is missing
#   sudo .ci/slurm_cluster.sh up       # munged, slurmctld, slurmd; waits until the node is idle
#   sudo .ci/slurm_cluster.sh status   # daemons and sinfo
#   sudo .ci/slurm_cluster.sh down     # scontrol shutdown, munged stopped
#
# Needs Debian's packages (`apt-get install -y slurmctld slurmd slurm-client munge`) and root: munged
# runs as user munge, slurmctld and slurmd as root, without systemd or cgroups (proctrack/linuxproc,
# task/none, no accounting: `sacct` does not work, read job states with squeue). `up` on a running
# cluster does nothing. The node gets CPUs=$(nproc), so jobs asking for 1 CPU run nproc at a time.
# State, spool and logs live in $SLURM_CLUSTER_DIR (default /var/tmp/nnunet-selfreg-slurm).
# /etc/slurm/slurm.conf is written only if it is absent or was written by this script: an existing
# cluster's configuration is never touched.
set -euo pipefail

DIR="${SLURM_CLUSTER_DIR:-/var/tmp/nnunet-selfreg-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by nnunet-selfreg .ci/slurm_cluster.sh"
HOST="$(hostname -s)"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

PACKAGES="slurmctld slurmd slurm-client munge"
EXES="munged slurmctld slurmd sbatch scontrol sinfo"

missing_exe() {
    for exe in $EXES; do command -v "$exe" >/dev/null || { echo "$exe"; return; }; done
}

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (munged runs as user munge, slurmctld and slurmd as root)"
    local exe
    exe="$(missing_exe)"
    [ -z "$exe" ] || die "$exe not found: apt-get install -y $PACKAGES (or: $0 install)"
}

install_packages() {
    [ "$(id -u)" = 0 ] || die "run as root to install Debian's packages"
    [ -n "$(missing_exe)" ] || return 0
    echo "installing Debian's $PACKAGES"
    # shellcheck disable=SC2086
    apt-get install -y -q $PACKAGES >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $PACKAGES >/dev/null; }
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
node_idle() { sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; }

start_munge() {
    if munge_ok; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    su -s /bin/sh munge -c "munged --force"
    for _ in $(seq 20); do munge_ok && return; sleep 0.5; done
    die "munged did not start (munge -n | unmunge fails)"
}

write_conf() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
    fi
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    cat >"$CONF" <<EOF
$MARK
ClusterName=nnunetselfreg
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$HOST CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -s "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

up() {
    need_root
    start_munge
    if running slurmctld && running slurmd && node_idle; then
        echo "slurm cluster already up"; sinfo; return
    fi
    write_conf
    running slurmctld || slurmctld
    running slurmd || slurmd
    for _ in $(seq 60); do
        if node_idle; then echo "slurm cluster up"; sinfo; return; fi
        sleep 0.5
    done
    sinfo || true
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not become idle within 30 s (logs above)"
}

down() {
    need_root
    if running slurmctld; then scontrol shutdown >/dev/null 2>&1 || true; fi
    for d in slurmctld slurmd; do
        for _ in $(seq 20); do running "$d" || break; sleep 0.5; done
        if running "$d"; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; fi
    done
    if [ -s /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
    echo "slurm cluster down"
}

status() {
    for d in slurmctld slurmd; do
        if running "$d"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: not running"; fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: not running"; fi
    sinfo 2>/dev/null || true
    running slurmctld && running slurmd && node_idle
}

case "${1:-}" in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 install|up|down|status" ;;
esac
