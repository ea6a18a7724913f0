"""Least privilege: each component runs with exactly the rules the chart ships, and no more.

The operator tests (test_operator.py) already run the operator and the agents with these
ServiceAccounts, which proves the rules are enough; here each identity is also refused what it
has no business doing.
"""

from __future__ import annotations

import pytest

from tests.controlplane.controlplane import ControlPlane
from tests.controlplane.operator_harness import NAMESPACE, bind_component

#: (component, a request its role allows (for `kubectl auth can-i`), a request it is refused)
CASES = [
    ("operator", ["patch", "sharedvolumes/status"], ["get", "secrets", "-A"]),
    ("operator", ["watch", "nodes"], ["create", "namespace", "rbac-probe-op"]),
    ("operator", ["update", "leases", "-n", NAMESPACE], ["delete", "node", "rbac-probe"]),
    ("operator", ["list", "leases", "-A"], ["delete", "sharedvolume", "rbac-probe"]),
    ("operator", ["delete", "pods", "-A"], ["patch", "pod", "rbac-probe", "-n", "default",
                                            "--type", "merge", "-p", "{}"]),
    ("agent", ["update", "leases", "-n", NAMESPACE], ["get", "nodes"]),
    ("agent", ["create", "leases", "-n", NAMESPACE], ["get", "sharedvolumes"]),
    ("agent", ["get", "leases", "-n", NAMESPACE], ["get", "secrets", "-n", NAMESPACE]),
    ("agent", ["get", "leases", "-n", NAMESPACE], ["get", "leases", "-n", "default"]),
    ("csi-controller", ["create", "sharedvolumes"], ["get", "secrets", "-A"]),
    ("csi-controller", ["delete", "sharedvolumesnapshots"], ["get", "nodes"]),
    ("csi-controller", ["update", "sharedvolumes"], ["patch", "sharedvolume", "x", "--subresource",
                                                     "status", "--type", "merge", "-p", "{}"]),
]


@pytest.mark.parametrize(("component", "allowed", "refused"), CASES,
                         ids=[f"{c}-refused-{'-'.join(r[:2])}-{i}"
                              for i, (c, _, r) in enumerate(CASES)])
def test_component_is_refused_outside_its_role(control_plane: ControlPlane, component: str,
                                               allowed: list[str], refused: list[str]) -> None:
    kubeconfig = bind_component(control_plane, component)
    ok = control_plane.kubectl("auth", "can-i", *allowed, kubeconfig=kubeconfig, check=False)
    assert ok.stdout.strip() == "yes", (allowed, ok.stdout, ok.stderr)
    denied = control_plane.kubectl(*refused, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower(), denied.stderr
