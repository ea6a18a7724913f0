"""The Helm chart in charts/, rendered by the real helm binary (built by scripts/build-tools).

What is checked here needs no cluster: lint, rendering in every mode, the values schema
refusing typos, documentation of every value, and agreement with the code the chart runs: the
RBAC files, deploy/csidriver.yaml, the agent's own config loader, the components' own argument
parsers, the metric names the dashboard charts, the TLS code the certificates are used with.
tests/controlplane/test_helm.py installs, upgrades and uninstalls it on a real API server.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import sharedsync_operator.cli
import sharedsync_operator.metrics  # registers the operator's metrics (the dashboard test)
import yaml
from cryptography import x509
from prometheus_client import REGISTRY

import csi_driver.cli
import csi_driver.interceptor  # registers csi_plugin_operations_seconds
import replication_agent.cli
import replication_agent.metrics  # registers the agent's metrics
from csi_driver.config import DRIVER_NAME
from replication_agent.config import AgentConfig, load_config
from replication_agent.tls import (
    CONTROLLER_NAME,
    PEER_SERVER_NAME,
    TlsConfig,
    channel_credentials,
    server_credentials,
)
from sharedsync import __version__
from sharedsync.core.rpc_roles import CallerRole, caller_roles

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts"
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))
HELM = TOOLS_BIN / "helm"
RELEASE = "unit"
NAMESPACE = "sharedsync-unit"
FULLNAME = f"{RELEASE}-sharedsync"
#: Every workload kind that holds a pod template, and the plain Pod (helm test).
WORKLOADS = ("Deployment", "DaemonSet", "Pod")

Obj = dict[str, Any]

#: Non-default modes, each a set of --set flags, checked to render.
MODES: dict[str, list[str]] = {
    "certManager": ["agentTls.mode=certManager"],
    "certManager-issuer": ["agentTls.mode=certManager", "agentTls.certManager.issuerRef.name=ca",
                           "agentTls.certManager.issuerRef.kind=ClusterIssuer"],
    "existingSecret": ["agentTls.mode=existingSecret", "agentTls.existingSecret=my-agent-tls",
                       "agentTls.existingOperatorSecret=my-operator-tls"],
    "registration-builtin": ["node.registration=builtin"],
    "serviceMonitor": ["metrics.serviceMonitor.enabled=true"],
    "dashboard": ["metrics.dashboard.enabled=true"],
    "no-snapshots": ["snapshots.enabled=false"],
    "no-livenessprobe": ["csiLivenessProbe.enabled=false"],
    "default-class": ["storageClasses.default=sync", "snapshots.volumeSnapshotClass.default=true"],
}


def _helm_or_skip() -> Path:
    """Skip without the helm binary, except in CI, where that is a failure."""
    if os.access(HELM, os.X_OK):
        return HELM
    reason = f"helm not built in {TOOLS_BIN} (run scripts/build-tools)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must build it first")
    pytest.skip(reason)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm offline, with its caches and config kept out of the user's home."""
    binary = _helm_or_skip()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "sharedsync-unit-helm"
    env = {**os.environ, "HELM_CACHE_HOME": str(scratch / "cache"),
           "HELM_CONFIG_HOME": str(scratch / "config"), "HELM_DATA_HOME": str(scratch / "data"),
           "KUBECONFIG": str(scratch / "no-kubeconfig")}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@functools.cache
def render(*sets: str, api_versions: tuple[str, ...] = ()) -> list[Obj]:
    """`helm template` of the chart with ``--set`` flags; the documents, CRDs included.
    Cached (the machine is small and helm slow): callers must not modify what they get."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
    for value in sets:
        args += ["--set", value]
    for api in api_versions:
        args += ["--api-versions", api]
    done = helm(*args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def render_error(*sets: str) -> str:
    args = ["template", RELEASE, str(CHART)]
    for value in sets:
        args += ["--set", value]
    done = helm(*args)
    assert done.returncode != 0, f"helm template {sets} rendered, it should have failed"
    return done.stderr


def find(docs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Obj], kind: str, name: str) -> Obj:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def containers(docs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, container) for every container and init container rendered."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            spec = pod_spec(doc)
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                yield doc, container


def container(docs: list[Obj], kind: str, name: str, container_name: str) -> Obj:
    spec = pod_spec(one(docs, kind, name))
    by_name: dict[str, Obj] = {c["name"]: c for c in spec["containers"]}
    assert container_name in by_name, f"{kind}/{name} has {sorted(by_name)}"
    return by_name[container_name]


def values() -> Obj:
    loaded: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def default_docs() -> list[Obj]:
    return render()


# -- lint and render -----------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_is_clean(strict: bool) -> None:
    done = helm("lint", str(CHART), *(["--strict"] if strict else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout, done.stdout
    assert "[ERROR]" not in done.stdout, done.stdout


def test_packaged_chart_carries_the_files_it_reads(tmp_path: Path) -> None:
    """`helm package` honours .helmignore: the RBAC files and the dashboard must survive it, or
    the packaged chart renders roles without rules."""
    done = helm("package", str(CHART), "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("sharedsync-*.tgz")
    assert archive.name == f"sharedsync-{__version__}.tgz"
    done = helm("template", RELEASE, str(archive), "--namespace", NAMESPACE,
                "--set", "metrics.dashboard.enabled=true")
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert one(docs, "ClusterRole", f"{FULLNAME}-operator")["rules"] == yaml.safe_load(
        (CHART / "rbac" / "operator-cluster.yaml").read_text())
    dashboard = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert json.loads(dashboard["data"]["sharedsync.json"])["panels"]


def test_defaults_render_every_component(default_docs: list[Obj]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    for expected in [
        ("CustomResourceDefinition", "syncpolicies.sharedsync.io"),
        ("CustomResourceDefinition", "sharedvolumes.sharedsync.io"),
        ("CustomResourceDefinition", "sharedvolumesnapshots.sharedsync.io"),
        ("CSIDriver", DRIVER_NAME),
        ("Deployment", f"{FULLNAME}-csi-controller"),
        ("Deployment", f"{FULLNAME}-operator"),
        ("DaemonSet", f"{FULLNAME}-node"),
        ("ConfigMap", f"{FULLNAME}-agent"),
        ("Secret", f"{FULLNAME}-agent-ca"),
        ("Secret", f"{FULLNAME}-agent-tls"),
        ("Secret", f"{FULLNAME}-operator-tls"),
        ("SyncPolicy", "sharedsync-sync"), ("SyncPolicy", "sharedsync-async"),
        ("SyncPolicy", "sharedsync-scheduled"),
        ("StorageClass", "sharedsync-sync"), ("StorageClass", "sharedsync-async"),
        ("StorageClass", "sharedsync-scheduled"),
        ("PodDisruptionBudget", f"{FULLNAME}-csi-controller"),
        ("PodDisruptionBudget", f"{FULLNAME}-operator"),
        ("Pod", f"{FULLNAME}-test-volume"),
    ]:
        assert expected in kinds, f"{expected} not rendered"
    # no snapshot API in a bare `helm template`: no VolumeSnapshotClass
    assert not find(default_docs, "VolumeSnapshotClass")
    # every namespaced object lands in the release namespace
    for doc in default_docs:
        if doc["kind"] not in ("CustomResourceDefinition", "CSIDriver", "SyncPolicy",
                               "StorageClass", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]


def test_defaults_follow_the_policies_the_issue_asks_for(default_docs: list[Obj]) -> None:
    specs = {d["metadata"]["name"]: d["spec"] for d in find(default_docs, "SyncPolicy")}
    assert specs["sharedsync-sync"] == {"mode": "Synchronous", "replicas": 3, "writeQuorum": 2}
    assert specs["sharedsync-async"]["mode"] == "Asynchronous"
    assert specs["sharedsync-async"]["maxLag"] == "5s"
    assert specs["sharedsync-scheduled"]["schedule"] == "*/15 * * * *"
    for sc in find(default_docs, "StorageClass"):
        assert sc["provisioner"] == DRIVER_NAME
        assert sc["parameters"] == {"syncPolicy": sc["metadata"]["name"]}
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
        assert "annotations" not in sc["metadata"]  # no default class unless asked


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_renders(mode: str) -> None:
    docs = render(*MODES[mode])
    assert find(docs, "DaemonSet")
    assert len(find(docs, "Deployment")) == 2


def test_cert_manager_mode_issues_the_peer_name() -> None:
    docs = render(*MODES["certManager"])
    assert not find(docs, "Secret")
    certs = {c["metadata"]["name"]: c["spec"] for c in find(docs, "Certificate")}
    agent = certs[f"{FULLNAME}-agent-tls"]
    assert agent["commonName"] == PEER_SERVER_NAME
    assert agent["dnsNames"] == [PEER_SERVER_NAME]
    assert {"server auth", "client auth"} <= set(agent["usages"])
    assert "client auth" in certs[f"{FULLNAME}-operator-tls"]["usages"]
    assert certs[f"{FULLNAME}-agent-ca"]["isCA"] is True
    assert {i["metadata"]["name"] for i in find(docs, "Issuer")} == {
        f"{FULLNAME}-selfsigned", f"{FULLNAME}-agent-ca"}
    # with an issuer of the user's, the chart makes no CA of its own
    docs = render(*MODES["certManager-issuer"])
    assert not find(docs, "Issuer")
    for cert in find(docs, "Certificate"):
        assert cert["spec"]["issuerRef"] == {"name": "ca", "kind": "ClusterIssuer"}


def test_existing_secret_mode_mounts_the_named_secrets() -> None:
    docs = render(*MODES["existingSecret"])
    assert not find(docs, "Secret")
    assert not find(docs, "Certificate")

    def secret_of(kind: str, name: str) -> set[str]:
        return {v["secret"]["secretName"] for v in pod_spec(one(docs, kind, name))["volumes"]
                if "secret" in v}
    assert secret_of("DaemonSet", f"{FULLNAME}-node") == {"my-agent-tls"}
    assert secret_of("Deployment", f"{FULLNAME}-operator") == {"my-operator-tls"}
    assert secret_of("Deployment", f"{FULLNAME}-csi-controller") == {"my-operator-tls"}
    assert "agentTls.existingSecret is required" in render_error("agentTls.mode=existingSecret")


def test_registration_modes() -> None:
    sidecar = render()
    builtin = render(*MODES["registration-builtin"])
    name = f"{FULLNAME}-node"
    names = {c["name"] for c in pod_spec(one(sidecar, "DaemonSet", name))["containers"]}
    assert "node-driver-registrar" in names
    registrar = container(sidecar, "DaemonSet", name, "node-driver-registrar")
    assert ("--kubelet-registration-path=/var/lib/kubelet/plugins/csi.sharedsync.io/csi.sock"
            in registrar["args"])
    names = {c["name"] for c in pod_spec(one(builtin, "DaemonSet", name))["containers"]}
    assert "node-driver-registrar" not in names
    plugin = container(builtin, "DaemonSet", name, "csi-plugin")
    # the plugin serves kubelet's registration API itself, under the kubelet dir it mounts as is
    assert "--kubelet-registration" in plugin["args"]
    assert ("--kubelet-endpoint=/var/lib/kubelet/plugins/csi.sharedsync.io/csi.sock"
            in plugin["args"])
    mounts = {m["name"]: m["mountPath"] for m in plugin["volumeMounts"]}
    assert mounts["kubelet-dir"] == "/var/lib/kubelet"
    assert "--kubelet-registration" not in container(sidecar, "DaemonSet", name,
                                                     "csi-plugin")["args"]
    assert "/node/registration" in render_error("node.registration=kubelet")


def test_kubelet_dir_moves_every_kubelet_path() -> None:
    docs = render("node.kubeletDir=/var/snap/microk8s/common/var/lib/kubelet")
    node = one(docs, "DaemonSet", f"{FULLNAME}-node")
    paths = [v["hostPath"]["path"] for v in pod_spec(node)["volumes"] if "hostPath" in v]
    kubelet_paths = [p for p in paths if "kubelet" in p]
    assert len(kubelet_paths) == 3
    assert all(p.startswith("/var/snap/microk8s/common/var/lib/kubelet") for p in kubelet_paths)
    plugin = container(docs, "DaemonSet", f"{FULLNAME}-node", "csi-plugin")
    assert "--kubelet-dir=/var/snap/microk8s/common/var/lib/kubelet" in plugin["args"]
    kubelet_mount = [m for m in plugin["volumeMounts"] if m["name"] == "kubelet-dir"]
    assert kubelet_mount == [{"name": "kubelet-dir", "mountPropagation": "Bidirectional",
                              "mountPath": "/var/snap/microk8s/common/var/lib/kubelet"}]


def test_node_pods_as_the_issue_describes(default_docs: list[Obj]) -> None:
    node = one(default_docs, "DaemonSet", f"{FULLNAME}-node")
    spec = pod_spec(node)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["hostNetwork"] is False
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["tolerations"] == [{"operator": "Exists"}]
    plugin = container(default_docs, "DaemonSet", node["metadata"]["name"], "csi-plugin")
    agent = container(default_docs, "DaemonSet", node["metadata"]["name"], "agent")
    for c in (plugin, agent):
        assert c["securityContext"]["privileged"] is True
    assert plugin["command"] == ["sharedsync-csi"]
    assert agent["command"] == ["sharedsync-agent"]
    assert agent["args"][:2] == ["run", "--config=/etc/sharedsync/agent.yaml"]
    # both see the agent's control socket
    for c in (plugin, agent):
        assert {"name": "agent-socket", "mountPath": "/run/sharedsync"} in c["volumeMounts"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"
    assert env["POD_IP"] == "status.podIP"


def test_snapshot_api_gives_a_volume_snapshot_class() -> None:
    docs = render(api_versions=("snapshot.storage.k8s.io/v1",))
    (vsc,) = find(docs, "VolumeSnapshotClass")
    assert vsc["driver"] == DRIVER_NAME
    assert vsc["deletionPolicy"] == "Delete"
    controller = pod_spec(one(docs, "Deployment", f"{FULLNAME}-csi-controller"))
    assert "csi-snapshotter" in {c["name"] for c in controller["containers"]}
    docs = render("snapshots.enabled=false", api_versions=("snapshot.storage.k8s.io/v1",))
    assert not find(docs, "VolumeSnapshotClass")
    controller = pod_spec(one(docs, "Deployment", f"{FULLNAME}-csi-controller"))
    assert "csi-snapshotter" not in {c["name"] for c in controller["containers"]}
    assert not find(docs, "ClusterRole", f"{FULLNAME}-external-snapshotter")


def test_default_storage_class_and_a_wrong_one() -> None:
    docs = render(*MODES["default-class"], api_versions=("snapshot.storage.k8s.io/v1",))
    defaults = [sc["metadata"]["name"] for sc in find(docs, "StorageClass")
                if sc["metadata"].get("annotations", {}).get(
                    "storageclass.kubernetes.io/is-default-class") == "true"]
    assert defaults == ["sharedsync-sync"]
    (vsc,) = find(docs, "VolumeSnapshotClass")
    assert vsc["metadata"]["annotations"] == {
        "snapshot.storage.kubernetes.io/is-default-class": "true"}
    assert "storageClasses.default" in render_error("storageClasses.default=nosuch")


def test_policies_can_be_dropped_added_and_prefixed() -> None:
    docs = render("syncPolicies.namePrefix=team-a-",
                  "syncPolicies.policies.scheduled.enabled=false",
                  "syncPolicies.policies.zonal.enabled=true",
                  "syncPolicies.policies.zonal.spec.mode=Synchronous",
                  "syncPolicies.policies.zonal.spec.placement.topologyKey="
                  "topology.kubernetes.io/zone")
    assert {p["metadata"]["name"] for p in find(docs, "SyncPolicy")} == {
        "team-a-sync", "team-a-async", "team-a-zonal"}
    assert {s["metadata"]["name"] for s in find(docs, "StorageClass")} == {
        "team-a-sync", "team-a-async", "team-a-zonal"}
    # the helm test pod follows the prefix
    pod = one(docs, "Pod", f"{FULLNAME}-test-volume")
    template = pod["spec"]["volumes"][0]["ephemeral"]["volumeClaimTemplate"]
    assert template["spec"]["storageClassName"] == "team-a-async"


def test_service_monitor_scrapes_ports_the_services_have() -> None:
    docs = render(*MODES["serviceMonitor"], api_versions=("snapshot.storage.k8s.io/v1",))
    (monitor,) = find(docs, "ServiceMonitor")
    wanted = {e["port"] for e in monitor["spec"]["endpoints"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in find(docs, "Service")
                if selector.items() <= s["metadata"]["labels"].items()]
    assert len(services) == 3
    offered = {p["name"] for s in services for p in s["spec"]["ports"]}
    assert offered == wanted
    # each Service port names a container port of the pods it selects
    for service in services:
        pods = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                and service["spec"]["selector"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in pod_spec(pods[0])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert "metrics.enabled" in render_error("metrics.serviceMonitor.enabled=true",
                                             "metrics.enabled=false")


def test_dashboard_charts_metrics_the_components_export() -> None:
    docs = render(*MODES["dashboard"])
    (dashboard,) = [c for c in find(docs, "ConfigMap") if "sharedsync.json" in c["data"]]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["sharedsync.json"])
    titles = " / ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("lag", "latency", "bytes", "rebuild"):
        assert topic in titles
    exported = _exported_metric_names()
    used = {m for p in board["panels"] for t in p["targets"]
            for m in re.findall(r"\b(?:sharedsync|csi_plugin)_[a-z_]+\b", t["expr"])}
    assert used, "no metric in the dashboard"
    assert used <= exported, f"not exported by any component: {sorted(used - exported)}"
    latency = [t["expr"] for p in board["panels"] if "latency" in p["title"].lower()
               for t in p["targets"]]
    assert [q for q in ("0.5", "0.9", "0.99") if any(f"({q}," in e for e in latency)] == [
        "0.5", "0.9", "0.99"]


def _exported_metric_names() -> set[str]:
    """The series names the registered metrics produce (labelled metrics have no sample
    before their first use, so the names come from each family's type)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "summary": ["_sum", "_count", ""], "info": ["_info"]}
    return {family.name + suffix for family in REGISTRY.collect()
            for suffix in suffixes.get(family.type, [""])}


# -- values: schema and documentation ------------------------------------------------------------


@pytest.mark.parametrize(("flags", "named"), [
    (["controller.replcas=3"], "replcas"),
    (["nosuchsection.x=1"], "nosuchsection"),
    (["image.sharedsync.pullpolicy=Never"], "pullpolicy"),
    (["syncPolicies.policies.sync.spec.replica=3"], "replica"),
    (["metrics.serviceMonitor.intervall=1m"], "intervall"),
], ids=["nested", "top-level", "image", "policy-spec", "deep"])
def test_schema_refuses_an_unknown_key(flags: list[str], named: str) -> None:
    error = render_error(*flags)
    assert "additional properties" in error, error
    assert f"'{named}'" in error, error


@pytest.mark.parametrize(("flags", "where"), [
    (["controller.replicas=two"], "/controller/replicas"),
    (["node.registration=kubelet"], "/node/registration"),
    (["agentTls.mode=vault"], "/agentTls/mode"),
    (["syncPolicies.policies.sync.spec.replicas=9"], "/syncPolicies/policies/sync/spec/replicas"),
    (["syncPolicies.policies.sync.spec.mode=Sync"], "/syncPolicies/policies/sync/spec/mode"),
    (["controller.provisionerTimeout=5 minutes"], "/controller/provisionerTimeout"),
    (["agent.port=0"], "/agent/port"),
], ids=["type", "registration", "tls-mode", "policy-range", "policy-enum", "duration", "port"])
def test_schema_refuses_a_wrong_value(flags: list[str], where: str) -> None:
    error = render_error(*flags)
    assert f"'{where}'" in error, error


def _crd_spec_as_json_schema(node: Any) -> Any:
    """The SyncPolicy CRD's spec schema as plain JSON Schema: Kubernetes extensions and
    annotations dropped, every object with fixed properties closed."""
    if isinstance(node, dict):
        out = {k: (v if k == "enum" else _crd_spec_as_json_schema(v)) for k, v in node.items()
               if not k.startswith("x-kubernetes-") and k not in ("default", "format",
                                                                  "nullable")}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_crd_spec_as_json_schema(v) for v in node]
    return node


def test_policy_spec_schema_is_the_crds() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    crd = yaml.safe_load((CHART / "crds" / "sharedsync.io_syncpolicies.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    expected = _crd_spec_as_json_schema(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    assert schema["definitions"]["syncPolicySpec"] == expected, (
        "values.schema.json's syncPolicySpec drifted from charts/crds: regenerate it")


def _closed_objects(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield path, node.get("additionalProperties")
        for key, sub in node.items():
            yield from _closed_objects(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _closed_objects(sub, f"{path}/{i}")


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_ones = [p for p, extra in _closed_objects(schema) if extra is not False]
    assert not open_ones, f"objects with fixed keys that accept unknown ones: {open_ones}"


def _documented_keys(value: Any, schema: Obj, root: Obj, path: str = "") -> Iterator[str]:
    """Every key a user sets: down to scalars, lists, empty maps and free-form maps (maps of
    names, Kubernetes types given by $ref), whose keys are the user's, not the chart's."""
    if "$ref" in schema:
        yield path
        return
    if not isinstance(value, dict) or "properties" not in schema or not value:
        yield path
        return
    for key, sub in value.items():
        yield from _documented_keys(sub, schema["properties"][key], root,
                                    f"{path}.{key}" if path else key)


def test_every_value_is_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    commented = (CHART / "values.yaml").read_text()
    keys = list(_documented_keys(values(), schema, schema))
    assert len(keys) > 60
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"values not documented in charts/README.md: {missing}"
    # and every key of values.yaml has a comment right above it
    lines = commented.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][A-Za-z0-9]*:", line) and not line.lstrip().startswith("-"):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") or _inside_spec(lines, i), (
                f"values.yaml line {i + 1} has no comment: {line.strip()}")


def _inside_spec(lines: list[str], i: int) -> bool:
    """Keys inside a policy's `spec:` are the SyncPolicy API's (documented in operator/API.md),
    and the keys of resources blocks are Kubernetes'."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        line = lines[j]
        if line.strip() and not line.lstrip().startswith("#"):
            own = len(line) - len(line.lstrip())
            if own < indent:
                return line.strip() in ("spec:", "resources:", "sidecarResources:", "labels:",
                                        "nodeSelector:", "tolerations:")
    return False


def test_chart_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "sharedsync"
    assert chart["version"] == __version__
    assert chart["appVersion"] == __version__


# -- agreement with the code the chart runs ------------------------------------------------------


def test_cluster_roles_are_exactly_the_rbac_files(default_docs: list[Obj]) -> None:
    """Every rbac/<component>-<cluster|namespace>.yaml becomes exactly one ClusterRole or Role,
    with exactly its rules, bound to the ServiceAccount the component's pods run as."""
    service_account = {
        "operator": pod_spec(one(default_docs, "Deployment", f"{FULLNAME}-operator")),
        "agent": pod_spec(one(default_docs, "DaemonSet", f"{FULLNAME}-node")),
        "csi-controller": pod_spec(one(default_docs, "Deployment", f"{FULLNAME}-csi-controller")),
    }
    files = sorted((CHART / "rbac").glob("*.yaml"))
    assert files
    for path in files:
        component, scope = path.stem.rsplit("-", 1)
        kind = {"cluster": "ClusterRole", "namespace": "Role"}[scope]
        role = one(default_docs, kind, f"{FULLNAME}-{component}")
        assert role["rules"] == yaml.safe_load(path.read_text()), path.name
        assert role["metadata"]["annotations"]["sharedsync.io/rules-from"] == f"rbac/{path.name}"
        binding = one(default_docs, f"{kind}Binding", f"{FULLNAME}-{component}")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{
            "kind": "ServiceAccount", "namespace": NAMESPACE,
            "name": service_account[component]["serviceAccountName"]}]
    # and no other role carries the components' names
    sourced = [d for d in default_docs if d["kind"] in ("ClusterRole", "Role")
               and "sharedsync.io/rules-from" in d["metadata"].get("annotations", {})]
    assert len(sourced) == len(files)


def test_sidecar_roles_cover_what_the_sidecars_need(default_docs: list[Obj]) -> None:
    docs = render(api_versions=("snapshot.storage.k8s.io/v1",))

    def allowed(role: str) -> set[tuple[str, str, str]]:
        rules = one(docs, "ClusterRole", f"{FULLNAME}-{role}")["rules"]
        return {(g, r, v) for rule in rules for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}
    provisioner = allowed("external-provisioner")
    for need in [("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
                 ("", "persistentvolumeclaims", "update"), ("storage.k8s.io", "storageclasses",
                                                            "list"),
                 ("", "events", "create"), ("storage.k8s.io", "csinodes", "get"),
                 ("", "nodes", "get"), ("storage.k8s.io", "volumeattachments", "list"),
                 ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
                 ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get")]:
        assert need in provisioner, need
    resizer = allowed("external-resizer")
    assert ("", "persistentvolumeclaims/status", "patch") in resizer
    assert ("", "persistentvolumes", "patch") in resizer
    snapshotter = allowed("external-snapshotter")
    for need in [("snapshot.storage.k8s.io", "volumesnapshotclasses", "list"),
                 ("snapshot.storage.k8s.io", "volumesnapshotcontents", "update"),
                 ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch"),
                 ("", "events", "create")]:
        assert need in snapshotter, need
    leader = one(docs, "Role", f"{FULLNAME}-csi-sidecars")["rules"]
    assert leader == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["get", "watch", "list", "delete", "update", "create"]}]
    # every leader-electing sidecar names the namespace its Role is in
    for c in pod_spec(one(docs, "Deployment", f"{FULLNAME}-csi-controller"))["containers"]:
        if "--leader-election" in c.get("args", []):
            assert "--leader-election-namespace=$(NAMESPACE)" in c["args"]
            assert {"name": "NAMESPACE", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.namespace"}}} in c["env"]


def test_every_image_comes_from_values() -> None:
    image_values = values()["image"]
    allowed = {f"{v['repository']}:{v['tag'] or __version__}": v["pullPolicy"]
               for v in image_values.values()}
    seen = set()
    for mode in [[], *MODES.values()]:
        for _, c in containers(render(*mode)):
            assert c["image"] in allowed, f"{c['name']}: {c['image']} is not an image value"
            assert c["imagePullPolicy"] == allowed[c["image"]]
            seen.add(c["image"])
    assert seen == set(allowed), f"image values never used: {set(allowed) - seen}"
    # a cluster without a registry: every image local, never pulled
    local = []
    for key in image_values:
        local += [f"image.{key}.repository=localhost/{key}", f"image.{key}.tag=dev",
                  f"image.{key}.pullPolicy=Never"]
    for _, c in containers(render(*local, "node.registration=builtin")):
        assert c["image"].startswith("localhost/"), c["image"]
        assert c["image"].endswith(":dev"), c["image"]
        assert c["imagePullPolicy"] == "Never"


def test_csidriver_is_the_deploy_manifest(default_docs: list[Obj]) -> None:
    deployed = yaml.safe_load((REPO_ROOT / "deploy" / "csidriver.yaml").read_text())
    chart = one(default_docs, "CSIDriver", DRIVER_NAME)
    assert chart["apiVersion"] == deployed["apiVersion"]
    assert chart["metadata"]["name"] == deployed["metadata"]["name"] == DRIVER_NAME
    assert chart["spec"] == deployed["spec"]
    assert chart["spec"]["attachRequired"] is False
    assert chart["spec"]["volumeLifecycleModes"] == ["Persistent"]


def load_agent_config(docs: list[Obj], tmp_path: Path) -> AgentConfig:
    """The rendered agent ConfigMap's config, read by the agent's own loader on node-a."""
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-agent")
    path = tmp_path / "agent.yaml"
    path.write_text(config_map["data"]["agent.yaml"])
    return load_config(path, environ={"NODE_NAME": "node-a", "POD_IP": "10.1.2.3"})


def test_agent_config_loads_with_the_agents_own_loader(default_docs: list[Obj],
                                                       tmp_path: Path) -> None:
    config_map = one(default_docs, "ConfigMap", f"{FULLNAME}-agent")
    config = load_agent_config(default_docs, tmp_path)
    assert config.node == "node-a"
    assert config.listen == "10.1.2.3:7400"
    assert str(config.control_socket) == "/run/sharedsync/agent.sock"
    assert str(config.data_dir) == "/var/lib/sharedsync"
    assert config.kubernetes is not None
    assert config.kubernetes.namespace == NAMESPACE
    assert config.kubernetes.lease_duration_seconds == 15
    assert config.tls is not None
    # the files the config names are where the node pod mounts the agent's Secret
    agent = container(default_docs, "DaemonSet", f"{FULLNAME}-node", "agent")
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    for file in (config.tls.ca, config.tls.cert, config.tls.key):
        assert str(file.parent) == mounts["agent-tls"]
    assert mounts["agent-config"] == "/etc/sharedsync"
    # the config must not name a variable the pod does not set
    env = {e["name"] for e in agent["env"]}
    assert set(re.findall(r"\$\{(\w+)\}", config_map["data"]["agent.yaml"])) <= env


@pytest.mark.parametrize(("sets", "expected"), [
    ([], [CONTROLLER_NAME]),
    (MODES["certManager"], [CONTROLLER_NAME]),
    (["agentTls.controllerNames={ops-tool}"], ["ops-tool", CONTROLLER_NAME]),
    # the operator's own Secret: only the names listed
    (MODES["existingSecret"] + ["agentTls.controllerNames={my-operator}"], ["my-operator"]),
    # the operator presents the agents' certificate: its name must be accepted as well
    (["agentTls.mode=existingSecret", "agentTls.existingSecret=my-agent-tls"],
     [PEER_SERVER_NAME]),
])
def test_agent_config_names_the_controllers_the_operator_certificate_carries(
        sets: list[str], expected: list[str], tmp_path: Path) -> None:
    assert load_agent_config(render(*sets), tmp_path).controller_names == expected


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{parser.prog} refuses the chart's arguments {args}") from exc


def test_our_containers_arguments_parse_with_our_parsers(default_docs: list[Obj]) -> None:
    env = {"NODE_NAME": "node-a", "POD_NAMESPACE": NAMESPACE, "POD_NAME": "op-0",
           "NAMESPACE": NAMESPACE}
    controller = container(default_docs, "Deployment", f"{FULLNAME}-csi-controller",
                           "csi-plugin")
    args = _parse(csi_driver.cli.build_parser(), _expand(controller["args"], env))
    assert (args.role, args.state_store) == ("controller", "kubernetes")
    assert args.endpoint == "unix:///csi/csi.sock"
    node = container(default_docs, "DaemonSet", f"{FULLNAME}-node", "csi-plugin")
    args = _parse(csi_driver.cli.build_parser(), _expand(node["args"], env))
    assert args.role == "node"
    assert args.node_id == "node-a"
    assert str(args.agent_socket) == "/run/sharedsync/agent.sock"
    operator = container(default_docs, "Deployment", f"{FULLNAME}-operator", "operator")
    assert operator["command"] == ["sharedsync-operator"]
    args = _parse(sharedsync_operator.cli.build_parser(), _expand(operator["args"], env))
    assert args.namespace == NAMESPACE
    assert args.identity == "op-0"
    assert args.health_address == "0.0.0.0:8080"
    assert args.metrics_address == "0.0.0.0:9820"
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    agent = container(default_docs, "DaemonSet", f"{FULLNAME}-node", "agent")
    _parse(replication_agent.cli.build_parser(), _expand(agent["args"], env))


def test_sidecar_arguments(default_docs: list[Obj]) -> None:
    provisioner = container(default_docs, "Deployment", f"{FULLNAME}-csi-controller",
                            "csi-provisioner")
    for flag in ("--csi-address=/csi/csi.sock", "--feature-gates=Topology=true",
                 "--extra-create-metadata", "--leader-election", "--timeout=300s"):
        assert flag in provisioner["args"]
    plugin = container(default_docs, "Deployment", f"{FULLNAME}-csi-controller", "csi-plugin")
    # the provisioner waits longer than the plugin waits for the operator
    assert "--operator-timeout=120" in plugin["args"]
    controller = pod_spec(one(default_docs, "Deployment", f"{FULLNAME}-csi-controller"))
    assert controller["securityContext"]["runAsNonRoot"] is True
    assert one(default_docs, "Deployment", f"{FULLNAME}-csi-controller")["spec"]["replicas"] == 2
    assert {"name": "socket-dir", "emptyDir": {}} in controller["volumes"]


# -- the certificates the chart generates --------------------------------------------------------


def test_generated_certificates_carry_a_mutual_tls_connection(default_docs: list[Obj],
                                                              tmp_path: Path) -> None:
    """The agent certificate serves and the operator certificate dials, through the agents'
    own TLS code (replication_agent/tls.py), verifying the peer name every agent dials."""
    secrets = {s["metadata"]["name"]: s["data"] for s in find(default_docs, "Secret")}

    def files(name: str) -> TlsConfig:
        data = secrets[name]
        out = tmp_path / name
        out.mkdir()
        for key in ("ca.crt", "tls.crt", "tls.key"):
            (out / key).write_bytes(base64.b64decode(data[key]))
        return TlsConfig(ca=out / "ca.crt", cert=out / "tls.crt", key=out / "tls.key")
    agent, operator = files(f"{FULLNAME}-agent-tls"), files(f"{FULLNAME}-operator-tls")
    ca = x509.load_pem_x509_certificate(base64.b64decode(
        secrets[f"{FULLNAME}-agent-ca"]["tls.crt"]))
    for tls in (agent, operator):
        assert tls.ca.read_bytes() == base64.b64decode(secrets[f"{FULLNAME}-agent-ca"]["tls.crt"])
        x509.load_pem_x509_certificate(tls.cert.read_bytes()).verify_directly_issued_by(ca)
    names = x509.load_pem_x509_certificate(agent.cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    assert PEER_SERVER_NAME in names
    # what the agents make of each (the rendered config's controllerNames): the operator's
    # certificate calls the control API, the agents' one only the replication protocol
    controllers = load_agent_config(default_docs, tmp_path).controller_names

    def roles(tls: TlsConfig) -> frozenset[CallerRole]:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        common = [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME)]
        return caller_roles([*common, *alt.get_values_for_type(x509.DNSName)],
                            peer_name=PEER_SERVER_NAME, controller_names=controllers)
    assert roles(operator) == {CallerRole.CONTROLLER}
    assert roles(agent) == {CallerRole.PEER}

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(agent))
    server.start()
    try:
        for client in (operator, agent):  # the operator and the CSI controller; a peer agent
            with grpc.secure_channel(
                    f"127.0.0.1:{port}", channel_credentials(client),
                    options=[("grpc.ssl_target_name_override", PEER_SERVER_NAME)]) as channel:
                call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    "/sharedsync.Probe/Nothing")
                with pytest.raises(grpc.RpcError) as raised:
                    call(b"", timeout=10)
                # UNIMPLEMENTED comes from the server: the handshake itself went through
                assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, raised.value
    finally:
        server.stop(None)



def _assert_gates_accepted(binary: Path, arg: str) -> None:
    """Feature gates are checked when the sidecar starts (``--help`` exits before): start it
    against nothing and look for the refusal, which comes first. A gate that graduated is
    accepted without being listed, so the help text cannot tell."""
    try:
        done = subprocess.run([str(binary), arg, "--kubeconfig=/nonexistent/kubeconfig",
                               "--csi-address=/nonexistent/csi.sock"],
                              capture_output=True, text=True, timeout=15, check=False)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # still running: it got past the gates
        output = (exc.stdout or b"").decode() + (exc.stderr or b"").decode() \
            if isinstance(exc.stdout, bytes) else str(exc.stdout or "") + str(exc.stderr or "")
    assert "unrecognized feature gate" not in output, \
        f"{binary.name} refuses {arg}: {output[-500:]}"


#: chart image repository (last path part) -> the binary scripts/build-tools makes of it
SIDECAR_BINARIES = {"csi-provisioner": "csi-provisioner", "csi-resizer": "csi-resizer",
                    "csi-snapshotter": "csi-snapshotter"}


def test_sidecar_flags_exist_in_the_pinned_sidecars(default_docs: list[Obj]) -> None:
    """Every flag the chart passes an upstream sidecar is one the binary of the pinned version
    knows (an unknown flag or feature gate makes it exit at start, in every cluster)."""
    checked = 0
    for _, spec in containers(default_docs):
        name = spec["image"].rsplit("/", 1)[-1].split(":")[0]
        binary = SIDECAR_BINARIES.get(name)
        if binary is None:
            continue
        path = TOOLS_BIN / binary
        if not path.exists():
            if os.environ.get("CI"):
                pytest.fail(f"{binary} not built in {TOOLS_BIN}; CI must build it first")
            pytest.skip(f"{binary} not built in {TOOLS_BIN} (run scripts/build-tools)")
        usage = subprocess.run([str(path), "--help"], capture_output=True, text=True,
                               timeout=60, check=False)
        text = usage.stdout + usage.stderr
        for arg in spec.get("args", []):
            flag = arg.split("=", 1)[0]
            bare = re.escape(flag.lstrip("-"))
            assert re.search(rf"^\s+--?{bare}\b", text, re.M), f"{name} does not know {flag}"
            if flag == "--feature-gates":
                _assert_gates_accepted(path, arg)
        checked += 1
    assert checked >= 2


def test_rendered_manifests_are_current() -> None:
    """deploy/install/sharedsync.yaml is what the chart renders now (scripts/render-manifests)."""
    _helm_or_skip()
    done = subprocess.run([str(REPO_ROOT / "scripts" / "render-manifests"), "--check"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    text = (REPO_ROOT / "deploy" / "install" / "sharedsync.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    # no private key is baked into a file everyone applies: TLS comes from the user's Secret
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert {d["kind"] for d in docs} >= {"Namespace", "CustomResourceDefinition", "CSIDriver",
                                         "Deployment", "DaemonSet", "SyncPolicy"}
