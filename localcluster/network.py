"""The cluster's network: a host bridge, one network namespace per node, routes for pods.

Node ``i`` is namespace ``sscl-node-i`` with ``eth0`` = 10.78.0.i/24 on bridge ``sscl0``
(10.78.0.254 on the host, where the apiserver listens). Pod CIDRs are routed by address, with
no overlay: every node and the host route 10.244.j.0/24 via 10.78.0.j, so pods reach pods on
other nodes, the apiserver reaches pods (``kubectl logs``, proxied metrics) and pods reach the
apiserver. The host's ``ip_forward`` is left as it is: only node namespaces forward (between
their eth0 and their pod bridge), so nothing of the cluster's leaves the machine.

A partition sets the node's bridge-side veth end down: the cable is cut in both directions.
Every function is idempotent (``up`` after a half-done ``up`` carries on).
"""

from __future__ import annotations

from pathlib import Path

from localcluster.layout import BRIDGE, HOST_ADDRESS, PREFIX_LEN, NodeLayout
from localcluster.processes import run


def _links() -> set[str]:
    out = run(["ip", "-o", "link", "show"]).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}


def namespaces() -> set[str]:
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ensure_bridge() -> None:
    if BRIDGE not in _links():
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addresses = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f" {HOST_ADDRESS}/" not in addresses:
        run(["ip", "addr", "add", f"{HOST_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def _in_node(node: NodeLayout, *argv: str, check: bool = True) -> str:
    return run(["ip", "netns", "exec", node.netns, *argv], check=check).stdout


def ensure_node(node: NodeLayout, peers: list[NodeLayout]) -> None:
    """The node's namespace, its cable into the bridge, its address and its routes."""
    if node.netns not in namespaces():
        run(["ip", "netns", "add", node.netns])
    links = _links()
    if node.host_veth not in links:
        if node.peer_veth in links:  # half-made by an interrupted run
            run(["ip", "link", "del", node.peer_veth])
        run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", node.peer_veth])
        run(["ip", "link", "set", node.peer_veth, "netns", node.netns])
        _in_node(node, "ip", "link", "set", node.peer_veth, "name", "eth0")
    run(["ip", "link", "set", node.host_veth, "master", BRIDGE])
    run(["ip", "link", "set", node.host_veth, "up"])
    if f" {node.address}/" not in _in_node(node, "ip", "-o", "-4", "addr", "show", "dev", "eth0"):
        _in_node(node, "ip", "addr", "add", f"{node.address}/{PREFIX_LEN}", "dev", "eth0")
    _in_node(node, "ip", "link", "set", "lo", "up")
    _in_node(node, "ip", "link", "set", "eth0", "up")
    _in_node(node, "ip", "route", "replace", "default", "via", HOST_ADDRESS)
    # the node routes between eth0 and its pods' bridge (a per-namespace setting)
    _in_node(node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    for peer in peers:
        if peer.index != node.index:
            _in_node(node, "ip", "route", "replace", peer.pod_cidr, "via", peer.address)
    run(["ip", "route", "replace", node.pod_cidr, "via", node.address])


def remove_node(node: NodeLayout) -> None:
    run(["ip", "route", "del", node.pod_cidr], check=False)
    if node.host_veth in _links():
        run(["ip", "link", "del", node.host_veth])
    if node.netns in namespaces():
        run(["ip", "netns", "del", node.netns])


def remove_bridge() -> None:
    if BRIDGE in _links():
        run(["ip", "link", "del", BRIDGE])


def set_partitioned(node: NodeLayout, partitioned: bool) -> None:
    run(["ip", "link", "set", node.host_veth, "down" if partitioned else "up"])


def partitioned(node: NodeLayout) -> bool:
    out = run(["ip", "-o", "link", "show", node.host_veth], check=False).stdout
    return bool(out) and "state UP" not in out and ",UP" not in out.split(">")[0]


def netns_pids(node: NodeLayout) -> list[int]:
    """Every process whose network namespace is the node's (strays included)."""
    target = Path("/run/netns") / node.netns
    try:
        ident = (target.stat().st_dev, target.stat().st_ino)
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = (entry / "ns" / "net").stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            pids.append(int(entry.name))
    return pids
