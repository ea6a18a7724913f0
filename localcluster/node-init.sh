#!/usr/bin/env bash
# The first process of a local-cluster node. It is started (by localcluster/node.py) as
#   ip netns exec sscl-node-N unshare --mount --propagation private -- node-init.sh ...
# so it already runs in the node's network namespace and in a fresh private mount namespace.
# It gives the node its own standard paths, cgroup mounts and cgroup, then runs containerd,
# kube-proxy and kubelet, restarting any that exits (as systemd would), until it is killed.
# Mounts made here and below (kubelet's volume mounts, the CSI plugin's staging) stay in this
# node's mount namespace and vanish with it: nothing reaches the host's mount table.
set -euo pipefail
node=$1 root=$2 logs=$3 bin=$4 cgroup=$5

# 1. the node's own directories over the standard paths (the mount points exist: node.py made
#    them on the host and records which it created, for `down` to remove)
while read -r dir; do
    [[ -n $dir ]] && mount --bind "$root/$dir" "/$dir"
done < "$root/.node-dirs"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/netns

# 2. cgroups: `ip netns exec` remounted /sys, which has no cgroup mounts: mount the host's
#    hierarchies again, as the host has them (cgroup v1 here, with the unified one beside)
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
while read -r _ target fstype options _; do
    case $fstype in cgroup|cgroup2) ;; *) continue ;; esac
    [[ $target == /sys/fs/cgroup/* ]] || continue
    mkdir -p "$target"
    # keep the controller selection (cpu, name=systemd, ...) and drop the generic flags
    opts=$(tr ',' '\n' <<<"$options" | { grep -Ev '^(rw|ro|relatime|nosuid|nodev|noexec|seclabel)$' || true; } | paste -sd, -)
    mount -t "$fstype" ${opts:+-o "$opts"} "$fstype" "$target"
done < /proc/1/mounts

# 3. this process (and so everything of the node) into the node's own cgroup in every v1
#    hierarchy: `kill-node` freezes that subtree and kills all of it, pods included
for hierarchy in /sys/fs/cgroup/*/; do
    [[ -f $hierarchy/cgroup.procs && ! -f $hierarchy/cgroup.controllers ]] || continue
    mkdir -p "$hierarchy$cgroup/system"
    if [[ -f $hierarchy/cpuset.cpus ]]; then   # cpuset children start empty
        for d in "$hierarchy${cgroup%/*}" "$hierarchy$cgroup" "$hierarchy$cgroup/system"; do
            [[ -s $d/cpuset.cpus && $(cat "$d/cpuset.cpus") ]] || cat "$hierarchy/cpuset.cpus" > "$d/cpuset.cpus"
            [[ -s $d/cpuset.mems && $(cat "$d/cpuset.mems") ]] || cat "$hierarchy/cpuset.mems" > "$d/cpuset.mems"
        done
    fi
    echo $$ > "$hierarchy$cgroup/system/cgroup.procs"
done

# 4. kubelet's mount propagation (Bidirectional volumes, the CSI plugin's mounts) needs shared
#    mounts, within this namespace only
mount --make-rshared /

export PATH="$bin:$PATH"
supervise() {  # name argv...: run, and run again after it exits
    local name=$1; shift
    while true; do
        "$@" >>"$logs/$name.log" 2>&1 || true
        echo "$(date -u +%FT%TZ) node-init: $name exited; restarting in 1s" >>"$logs/$name.log"
        sleep 1
    done
}
trap 'kill 0' TERM INT

supervise containerd containerd --config /etc/containerd/config.toml &
for _ in $(seq 600); do [[ -S /run/containerd/containerd.sock ]] && break; sleep 0.1; done
supervise kube-proxy kube-proxy --config=/etc/kubernetes/kube-proxy.yaml &
supervise kubelet kubelet --config=/etc/kubernetes/kubelet.yaml \
    --kubeconfig=/etc/kubernetes/kubelet.kubeconfig \
    --hostname-override="$node" --node-ip="$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)" \
    --node-labels="$(cat /etc/kubernetes/node-labels)" &
echo "node-init: $node up"
wait
