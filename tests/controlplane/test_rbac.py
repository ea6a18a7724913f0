"""Least privilege: each component runs with exactly the rules the chart ships, and no more.

The operator tests (test_operator.py) already run the operator and the agents with these
ServiceAccounts, which proves the rules are enough; here each identity is also refused what it
has no business doing.
"""

from __future__ import annotations

import pytest

from tests.controlplane.controlplane import ControlPlane
from tests.controlplane.operator_harness import NAMESPACE, bind_component

#: (component, allowed kubectl arguments, refused kubectl arguments)
CASES = [
    ("operator", ["get", "sharedvolumes"], ["get", "secrets", "-A"]),
    ("operator", ["get", "nodes"], ["create", "namespace", "rbac-probe-op"]),
    ("operator", ["get", "leases", "-n", NAMESPACE], ["delete", "nodes", "--all"]),
    ("agent", ["get", "leases", "-n", NAMESPACE], ["get", "nodes"]),
    ("agent", ["get", "leases", "-n", NAMESPACE], ["get", "sharedvolumes"]),
    ("agent", ["get", "leases", "-n", NAMESPACE], ["get", "secrets", "-n", NAMESPACE]),
    ("csi-controller", ["get", "sharedvolumes"], ["get", "secrets", "-A"]),
    ("csi-controller", ["get", "sharedvolumesnapshots"], ["get", "nodes"]),
    ("csi-controller", ["get", "sharedvolumes"], ["patch", "sharedvolume", "x", "--subresource",
                                                  "status", "--type", "merge", "-p", "{}"]),
]


@pytest.mark.parametrize(("component", "allowed", "refused"), CASES,
                         ids=[f"{c}-refused-{'-'.join(r[:2])}" for c, _, r in CASES])
def test_component_is_refused_outside_its_role(control_plane: ControlPlane, component: str,
                                               allowed: list[str], refused: list[str]) -> None:
    kubeconfig = bind_component(control_plane, component)
    ok = control_plane.kubectl(*allowed, kubeconfig=kubeconfig, check=False)
    assert ok.returncode == 0, ok.stderr
    denied = control_plane.kubectl(*refused, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower(), denied.stderr
