"""The local cluster's pure parts: names and addresses, generated configs, the command line.
(The cluster itself is exercised by tests/e2e, which brings it up and down for real.)"""

from __future__ import annotations

import ipaddress
import json
import tomllib

import pytest

from localcluster.__main__ import parse
from localcluster.layout import (
    CLUSTER_CIDR,
    HOST_ADDRESS,
    MAX_NODES,
    NODE_DIRS,
    node_layout,
    parse_node,
)
from localcluster.node import (
    SANDBOX_IMAGE,
    cni_conflist,
    containerd_config,
    kube_proxy_config,
    kubelet_config,
)


def test_nodes_have_distinct_addresses_namespaces_cgroups_and_pod_ranges() -> None:
    nodes = [node_layout(i) for i in range(1, 11)]
    for attribute in ("name", "address", "netns", "host_veth", "peer_veth", "cgroup",
                      "pod_cidr", "zone", "root"):
        values = [getattr(n, attribute) for n in nodes]
        assert len(set(values)) == len(values), attribute
    cluster = ipaddress.ip_network(CLUSTER_CIDR)
    for n in nodes:
        assert ipaddress.ip_network(n.pod_cidr).subnet_of(cluster)  # type: ignore[arg-type]
        assert n.address != HOST_ADDRESS
        assert len(n.host_veth) <= 15
        assert len(n.peer_veth) <= 15


def test_node_names_parse_and_bad_ones_are_refused() -> None:
    assert parse_node("node-2") == node_layout(2)
    assert parse_node("3") == node_layout(3)
    for bad in ("node-x", "", "master", "node--1"):
        with pytest.raises(ValueError, match="nodes are named"):
            parse_node(bad)
    for number in (0, MAX_NODES + 1):
        with pytest.raises(ValueError, match="out of range"):
            node_layout(number)


def test_containerd_config_is_valid_toml_with_the_settings_this_host_needs() -> None:
    config = tomllib.loads(containerd_config())
    assert config["version"] == 3
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    options = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert options["SystemdCgroup"] is False
    assert options["BinaryName"].endswith("/runc")
    assert runtime["cni"] == {"bin_dirs": ["/opt/cni/bin"], "conf_dir": "/etc/cni/net.d"}
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == SANDBOX_IMAGE


def test_kubelet_and_kube_proxy_configs_keep_nodes_apart() -> None:
    one, two = node_layout(1), node_layout(2)
    a, b = kubelet_config(one), kubelet_config(two)
    assert a["failCgroupV1"] is False
    assert a["cgroupDriver"] == "cgroupfs"
    assert a["cgroupRoot"] != b["cgroupRoot"]
    assert a["address"] == one.address
    assert a["podCIDR"] == one.pod_cidr
    # images cannot be pulled again here: never garbage-collected
    assert a["imageGCHighThresholdPercent"] == 100
    proxy = kube_proxy_config(one)
    assert proxy["hostnameOverride"] == one.name
    assert proxy["clusterCIDR"] == CLUSTER_CIDR
    # the host's conntrack sysctls are left alone
    assert proxy["conntrack"]["maxPerCore"] == 0  # type: ignore[index]


def test_cni_conflist_gives_each_node_its_own_pod_range() -> None:
    config = json.loads(json.dumps(cni_conflist(node_layout(4))))
    bridge = config["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"] == [[{"subnet": node_layout(4).pod_cidr}]]


def test_node_dirs_are_relative_standard_paths() -> None:
    assert all(not d.startswith("/") for d in NODE_DIRS)
    assert {"var/lib/kubelet", "var/lib/containerd", "etc/cni", "var/lib/sharedsync"} <= set(
        NODE_DIRS)


def test_command_line() -> None:
    assert parse(["up"]).nodes == 3
    assert parse(["up", "--nodes", "5"]).nodes == 5
    assert parse(["kill-node", "node-2"]).node == "node-2"
    assert parse(["exec", "node-1", "--", "ip", "addr"]).command == ["ip", "addr"]
    for bad in (["up", "--nodes", "0"], ["frobnicate"], ["kill-node"]):
        with pytest.raises(SystemExit):
            parse(bad)
