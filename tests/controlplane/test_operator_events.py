"""Events the operator posts outside kopf's handlers (its background loop: policy resync).

kopf can post an event only from the task handling that object; the loop that keeps policies'
status current runs beside kopf and once crashed on every warning it tried to post. Its events
go through :meth:`Kube.post_event`, with the operator's own ServiceAccount and RBAC.
"""

from __future__ import annotations

import asyncio
import json

from sharedsync_operator.kube import Kube

from sharedsync.kubeclient import api_client
from tests.controlplane.controlplane import ControlPlane
from tests.controlplane.operator_harness import bind_component


def test_background_events_are_posted_with_the_operators_rights(
        control_plane: ControlPlane) -> None:
    control_plane.apply({"apiVersion": "sharedsync.io/v1alpha1", "kind": "SyncPolicy",
                         "metadata": {"name": "events-probe"},
                         "spec": {"mode": "Asynchronous", "replicas": 2}})
    policy = json.loads(control_plane.kubectl("get", "sp", "events-probe", "-o", "json").stdout)
    kubeconfig = bind_component(control_plane, "operator")

    async def post() -> None:
        client = await api_client(kubeconfig)
        try:
            await Kube(client).post_event(policy, "Warning", "ProbeReason",
                                          "a message from the background loop",
                                          namespace="default")
        finally:
            await client.close()

    asyncio.run(post())
    events = json.loads(control_plane.kubectl(
        "get", "events", "-n", "default", "-o", "json",
        "--field-selector", "involvedObject.name=events-probe").stdout)["items"]
    assert [(e["type"], e["reason"], e["message"]) for e in events] == [
        ("Warning", "ProbeReason", "a message from the background loop")]
    involved = events[0]["involvedObject"]
    assert (involved["kind"], involved["uid"]) == ("SyncPolicy", policy["metadata"]["uid"])
    # what a user sees: `kubectl describe sp` lists it
    assert "ProbeReason" in control_plane.kubectl("describe", "sp", "events-probe").stdout
    control_plane.kubectl("delete", "sp", "events-probe")
