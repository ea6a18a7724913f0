"""A real multi-node Kubernetes cluster on one machine, without Docker (``scripts/cluster``).

The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
snapshot-controller) runs on the host; every node is a network namespace with its own address on
a host bridge, plus a private mount namespace in which its own containerd, kubelet and kube-proxy
run with the standard paths (/var/lib/kubelet, /run/containerd, ...) bound to the node's own
directories. Images are imported into each node's containerd: there is no registry.

Modules: :mod:`.layout` (names, addresses and paths), :mod:`.processes` (detached processes
found again by pid file), :mod:`.network` (bridge, namespaces, routes, partitions),
:mod:`.controlplane`, :mod:`.node` (configs, start, kill), :mod:`.images`, :mod:`.hoststate`
(what ``up`` changes on the host and ``down`` puts back), :mod:`.cluster` (the verbs) and
:mod:`.__main__` (the command line).
"""
