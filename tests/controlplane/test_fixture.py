"""The control-plane fixture does what later tiers rely on: identities, RBAC, nodes, controllers."""

from __future__ import annotations

import json
import secrets
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml

from .controlplane import ControlPlane


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def cp(control_plane: ControlPlane) -> ControlPlane:
    return control_plane


def http_status(cp: ControlPlane, path: str, token: str) -> int:
    """The apiserver's HTTP status for a GET of ``path`` with ``token``, verified by the CA."""
    request = urllib.request.Request(cp.server + path,
                                     headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(cp.ca_file))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        with error:
            return error.code


def test_service_account_without_rbac_is_forbidden(cp: ControlPlane) -> None:
    namespace, name = unique("sa-test"), "nobody"
    kubeconfig = cp.service_account_kubeconfig(namespace, name)
    try:
        user = f"system:serviceaccount:{namespace}:{name}"
        whoami = cp.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                            kubeconfig=kubeconfig)
        assert whoami.stdout == user  # the token authenticates, as the ServiceAccount

        denied = cp.kubectl("get", "secrets", kubeconfig=kubeconfig, check=False)
        assert denied.returncode != 0
        assert "Forbidden" in denied.stderr, denied.stderr
        assert user in denied.stderr, denied.stderr
        token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        secrets_path = f"/api/v1/namespaces/{namespace}/secrets"
        assert http_status(cp, secrets_path, token) == 403

        # the refusal is RBAC's: a Role that allows it makes the same request succeed
        cp.kubectl("create", "role", "read-secrets", f"--namespace={namespace}",
                   "--verb=get,list", "--resource=secrets")
        cp.kubectl("create", "rolebinding", "read-secrets", f"--namespace={namespace}",
                   "--role=read-secrets", f"--serviceaccount={namespace}:{name}")
        assert http_status(cp, secrets_path, token) == 200
        assert cp.kubectl("get", "secrets", kubeconfig=kubeconfig).returncode == 0
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false")


def node(cp: ControlPlane, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(cp.kubectl("get", "node", name, "-o", "json").stdout)
    return found


def node_status_column(cp: ControlPlane, name: str) -> str:
    lines = cp.kubectl("get", "nodes", name).stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"], lines
    return lines[1].split()[1]


def test_register_node_makes_a_ready_node(cp: ControlPlane) -> None:
    name = unique("node")
    try:
        cp.register_node(name, {"topology.kubernetes.io/zone": "zone-a"}, address="10.77.0.9")
        assert node_status_column(cp, name) == "Ready"
        got = node(cp, name)
        assert got["metadata"]["labels"]["kubernetes.io/hostname"] == name
        assert got["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-a"
        assert {"type": "InternalIP", "address": "10.77.0.9"} in got["status"]["addresses"]
        assert not got["spec"].get("taints")
        selected = cp.kubectl("get", "nodes", "-l", "topology.kubernetes.io/zone=zone-a",
                              "-o", "name").stdout.split()
        assert f"node/{name}" in selected

        # idempotent, and the status follows what the test says
        cp.register_node(name, {"topology.kubernetes.io/zone": "zone-a"}, ready=False)
        assert node_status_column(cp, name) == "NotReady"
        cp.register_node(name, ready=True, unschedulable=True)
        assert node_status_column(cp, name) == "Ready,SchedulingDisabled"
        assert "topology.kubernetes.io/zone" not in node(cp, name)["metadata"]["labels"]
        cp.register_node(name)
        assert node_status_column(cp, name) == "Ready"
        assert not node(cp, name)["spec"].get("taints")
    finally:
        cp.kubectl("delete", "node", name, "--ignore-not-found")


def test_controller_manager_runs_namespaces_and_garbage_collection(cp: ControlPlane) -> None:
    namespace = unique("gc")
    cp.kubectl("create", "namespace", namespace)
    owner = json.loads(cp.kubectl("create", "configmap", "owner", f"--namespace={namespace}",
                                  "-o", "json").stdout)
    dependent = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "dependent", "namespace": namespace,
                              "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                                   "name": "owner",
                                                   "uid": owner["metadata"]["uid"]}]}}
    cp.kubectl("create", "-f", "-", input=json.dumps(dependent))
    # the garbage collector removes what the owner owned
    cp.kubectl("delete", "configmap", "owner", f"--namespace={namespace}",
               "--cascade=foreground", "--wait=true", "--timeout=60s", timeout=90)
    cp.kubectl("wait", "--for=delete", "configmap/dependent", f"--namespace={namespace}",
               "--timeout=60s", timeout=90)
    # the namespace controller empties and removes a deleted namespace
    cp.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", timeout=150)
    assert "NotFound" in cp.kubectl("get", "namespace", namespace, check=False).stderr


def test_server_on_names_an_address_the_certificate_covers(cp: ControlPlane) -> None:
    assert cp.server_on("127.0.0.1") == cp.server
    with pytest.raises(ValueError, match="certificate"):
        cp.server_on("192.0.2.1")
