#!/usr/bin/env bash
# A single-node Ceph cluster for strata's rbd tests: one monitor, one manager and one OSD,
# run as root from Debian's packages (ceph, ceph-mon, ceph-osd, ceph-mgr), without containers
# or systemd, all in one directory.
#
#   eval "$(scripts/ceph-test-cluster.sh start [DIR])"   # prints export CEPH_CONF=... lines
#   scripts/ceph-test-cluster.sh stop [DIR]              # kills its daemons, removes DIR
#
# DIR defaults to $STRATA_CEPH_DIR or /tmp/strata-ceph; the monitor listens on 127.0.0.1 at
# $STRATA_CEPH_PORT (default 46789). `start` first stops whatever an earlier cluster in DIR
# left running, so it can be run again after a crash.
#
# The OSD is BlueStore on a sparse 12 GiB file in DIR: it survives an OSD kill and restart (the
# tests kill it mid-I/O), which memstore does not (it keeps its data in the OSD's memory), and
# the file takes on disk only what was written (BlueFS's log and RocksDB included, tens of MiB
# on a fresh cluster). 3 GiB was too small: a few minutes of 4k random writes over the bench's
# 1 GiB image made RocksDB's compaction ask BlueFS for 281 MiB more than was free, and the OSD
# aborted. The pool `rbd` has one replica and is initialised for rbd.
set -euo pipefail

cmd="${1:-}"
dir="${2:-${STRATA_CEPH_DIR:-/tmp/strata-ceph}}"
port="${STRATA_CEPH_PORT:-46789}"
conf="$dir/ceph.conf"

die() {
    echo "ceph-test-cluster: $*" >&2
    exit 1
}

# Kills every daemon whose pid file is in DIR/run, waiting for each to go.
stop_daemons() {
    local pidfile pid
    for pidfile in "$dir"/run/*.pid; do
        [[ -e "$pidfile" ]] || continue
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        # Only a ceph daemon started with this cluster's conf: a pid reused since is left alone.
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-c $conf"; then
            kill -9 "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        fi
    done
}

stop() {
    [[ -d "$dir" ]] || return 0
    stop_daemons
    rm -rf "$dir"
}

ceph_cli() {
    timeout 30 ceph -c "$conf" "$@"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "run as root"
    for bin in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd; do
        command -v "$bin" >/dev/null || die "$bin is missing: run scripts/install-deps.sh"
    done
    stop
    mkdir -p "$dir"/{run,log,mon.a,mgr.x,osd.0}
    local fsid
    fsid="$(cat /proc/sys/kernel/random/uuid)"
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
crash dir = $dir/crash
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# Small: the machine and its disk are shared.
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
[client]
keyring = $dir/keyring
[mon]
mon data = $dir/mon.\$id
mon cluster log file = $dir/log/cluster.log
[mgr]
mgr data = $dir/mgr.\$id
keyring = $dir/mgr.\$id/keyring
mgr initial modules =
[osd]
osd data = $dir/osd.\$id
keyring = $dir/osd.\$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 12884901888
bluestore fsck on mount = false
osd op num shards = 1
osd op num threads per shard = 2
EOF
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' \
        --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
    ceph-mon -c "$conf" -i a

    ceph_cli auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$dir/mgr.x/keyring"
    ceph-mgr -c "$conf" -i x

    local uuid id
    uuid="$(cat /proc/sys/kernel/random/uuid)"
    id="$(ceph_cli osd new "$uuid")"
    [[ "$id" == 0 ]] || die "expected osd id 0, got '$id'"
    ceph_cli auth get-or-create osd.0 osd 'allow *' mon 'allow profile osd' \
        mgr 'allow profile osd' -o "$dir/osd.0/keyring"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>"$dir/log/osd-mkfs.log" \
        || die "ceph-osd --mkfs failed: $(tail -5 "$dir/log/osd-mkfs.log")"
    ceph-osd -c "$conf" -i 0

    ceph_cli osd pool create rbd 8 8 >/dev/null 2>&1
    ceph_cli osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
    timeout 60 rbd -c "$conf" pool init rbd
    # Ready when a client can write an image: the OSD is up and the pool's PGs are active.
    local i
    for i in $(seq 1 300); do
        if timeout 10 rbd -c "$conf" create --size 1M rbd/strata-ready 2>/dev/null; then
            timeout 10 rbd -c "$conf" rm rbd/strata-ready >/dev/null 2>&1 || true
            echo "export CEPH_CONF=$conf"
            echo "export CEPH_KEYRING=$dir/keyring"
            echo "export STRATA_CEPH_DIR=$dir"
            return 0
        fi
        sleep 0.2
    done
    die "the cluster did not become ready; logs in $dir/log"
}

case "$cmd" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
