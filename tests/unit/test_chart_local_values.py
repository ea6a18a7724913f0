"""charts/ci/*-values.yaml, rendered by the real helm: what the e2e clusters are installed with.

The local cluster (scripts/cluster) has no registry: a pod whose image is not among those
imported into its node's containerd, or that may try a pull, never starts, and the failure
shows only minutes into an e2e run as ErrImagePull. Rendering the chart with the values file
finds that in a second, with no cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sharedsync import __version__
from tests.unit.test_chart import CHART, NAMESPACE, RELEASE, containers, helm, one, pod_spec

LOCAL_VALUES = CHART / "ci" / "local-values.yaml"
KIND_VALUES = CHART / "ci" / "kind-values.yaml"
FULLNAME = f"{RELEASE}-sharedsync"
#: Both e2e clusters serve the VolumeSnapshot API (scripts/cluster installs it; so does the kind
#: provider of tests/e2e), so the chart is rendered as it is installed there.
SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
#: Containers that need an image the local cluster cannot have (not buildable from the Go
#: module proxy).
UNBUILDABLE = {"node-driver-registrar", "liveness-probe"}

Obj = dict[str, Any]


def render_with(values_file: Path) -> list[Obj]:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values",
                str(values_file), "--api-versions", SNAPSHOT_API)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def default_tag(name: str) -> str:
    defaults: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    return str(defaults["image"][name]["tag"])


def test_local_values_name_only_imported_images_never_pulled() -> None:
    docs = render_with(LOCAL_VALUES)
    rendered = list(containers(docs))
    assert rendered
    for workload, c in rendered:
        where = f"{workload['kind']}/{workload['metadata']['name']} container {c['name']}"
        assert c["image"].startswith("localhost/"), f"{where}: {c['image']}"
        assert c["imagePullPolicy"] == "Never", f"{where}: {c['imagePullPolicy']}"
        assert c["name"] not in UNBUILDABLE, where
        assert "livenessprobe" not in c["image"], where
        assert "registrar" not in c["image"], where
        if c["name"] == "csi-plugin":  # its probe is served by the livenessprobe sidecar
            assert "livenessProbe" not in c, f"{where} probes a sidecar that is not there"
    images = {c["image"] for _, c in rendered}
    # what scripts/build-image tags and the CSI sidecars at the versions scripts/build-tools
    # builds (the chart's defaults), as scripts/cluster imports them
    assert images == {
        f"localhost/sharedsync:{__version__}",
        f"localhost/csi-provisioner:{default_tag('csiProvisioner')}",
        f"localhost/csi-resizer:{default_tag('csiResizer')}",
        f"localhost/csi-snapshotter:{default_tag('csiSnapshotter')}",
    }


def test_local_values_register_the_node_plugin_itself() -> None:
    docs = render_with(LOCAL_VALUES)
    plugin = next(c for c in pod_spec(one(docs, "DaemonSet", f"{FULLNAME}-node"))["containers"]
                  if c["name"] == "csi-plugin")
    assert "--kubelet-registration" in plugin["args"]


def test_local_values_fail_over_quickly_and_survive_a_node_loss() -> None:
    """The node-loss scenario kills one of three nodes: the operator and the CSI controller
    must have a standby elsewhere, and the agents' Lease must run out well within 30 s."""
    docs = render_with(LOCAL_VALUES)
    assert one(docs, "Deployment", f"{FULLNAME}-operator")["spec"]["replicas"] >= 2
    assert one(docs, "Deployment", f"{FULLNAME}-csi-controller")["spec"]["replicas"] >= 2
    agent = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-agent")["data"]["agent.yaml"])
    lease = agent["kubernetes"]["leaseDurationSeconds"]
    defaults: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    assert lease < defaults["agent"]["leaseDurationSeconds"]
    assert lease * 2 <= 30


def test_kind_values_load_our_image_and_pull_the_sidecars() -> None:
    """kind can pull from registries but not our unpublished image, which `kind load` puts on
    every node: only that one is localhost/ and Never."""
    docs = render_with(KIND_VALUES)
    names = set()
    for _, c in containers(docs):
        names.add(c["name"])
        if c["image"].startswith("localhost/"):
            assert c["image"] == f"localhost/sharedsync:{__version__}", c["image"]
            assert c["imagePullPolicy"] == "Never", c["name"]
        else:
            assert c["imagePullPolicy"] != "Never", c["name"]
    assert "node-driver-registrar" in names
