"""The operator's writes to the API server that kopf does not make for it: status patches of
our custom resources, the removal of handled day-2 annotations, and what the release of pods
stranded on a lost node reads and deletes (``stranded_pods``)."""

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

GROUP = "sharedsync.io"
VERSION = "v1alpha1"
SYNC_POLICIES = "syncpolicies"
SHARED_VOLUMES = "sharedvolumes"
SHARED_VOLUME_SNAPSHOTS = "sharedvolumesnapshots"
#: The generated client would pick JSON Patch for a dict body, which custom resources refuse.
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}


@dataclass(frozen=True, slots=True)
class Listing:
    """Everything the operator's view holds, read once (objects as the API's JSON)."""

    nodes: list[dict[str, Any]]
    agent_leases: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]


class Kube:
    """A thin adapter over CustomObjectsApi for cluster-scoped sharedsync objects."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    async def list_all(self, namespace: str, lease_selector: str) -> Listing:
        """Nodes, the agents' Leases in ``namespace`` and every sharedsync object: what a new
        leader reads before it decides anything (see ``handlers.prime_view``)."""
        def plain(items: Any) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = self.api_client.sanitize_for_serialization(items)
            return found

        async def custom(plural: str) -> list[dict[str, Any]]:
            listed = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
            return list(listed.get("items") or ())

        nodes = await self.core.list_node()
        leases = await self.coordination.list_namespaced_lease(
            namespace, label_selector=lease_selector)
        return Listing(nodes=plain(nodes.items), agent_leases=plain(leases.items),
                       policies=await custom(SYNC_POLICIES),
                       volumes=await custom(SHARED_VOLUMES),
                       snapshots=await custom(SHARED_VOLUME_SNAPSHOTS))

    async def post_event(self, body: Mapping[str, Any], type_: str, reason: str,
                         message: str, *, namespace: str) -> None:
        """An Event about an object (cluster-scoped, or a pod), from work outside kopf's
        handlers (kopf posts events only from the task of the object being handled)."""
        metadata = body.get("metadata", {})
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{metadata.get('name', 'object')}.",
                                         namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion"), kind=body.get("kind"),
                name=metadata.get("name"), namespace=metadata.get("namespace"),
                uid=metadata.get("uid"),
                resource_version=metadata.get("resourceVersion")),
            type=type_, reason=reason, message=message[:1024],
            first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component="sharedsync-operator"),
            reporting_component="sharedsync-operator")
        try:
            await self.core.create_namespaced_event(namespace, event)
        except ApiException as exc:
            if exc.status not in (403, 404, 409, 422):
                raise

    async def patch_status(self, plural: str, name: str, status: Mapping[str, Any]) -> bool:
        """Merge ``status`` into the object's status; False when the object is gone."""
        try:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, plural, name, {"status": dict(status)}, **_MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def set_finalizer(self, plural: str, name: str, finalizer: str,
                            present: bool) -> None:
        """Add or remove one finalizer, keeping everyone else's; a conflict (the object
        changed since we read it) is left to the next round, which reads it anew."""
        try:
            current = await self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        metadata = current.get("metadata", {})
        finalizers = [f for f in metadata.get("finalizers") or () if f != finalizer]
        if present:
            finalizers.append(finalizer)
        if finalizers == list(metadata.get("finalizers") or ()):
            return
        patch = {"metadata": {"finalizers": finalizers,
                              "resourceVersion": metadata.get("resourceVersion")}}
        try:
            await self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, patch,
                                                          **_MERGE_PATCH)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    async def remove_annotation(self, plural: str, name: str, key: str) -> None:
        try:
            await self.custom.patch_cluster_custom_object(
                GROUP, VERSION, plural, name, {"metadata": {"annotations": {key: None}}},
                **_MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def pods_on_node(self, node: str) -> list[dict[str, Any]]:
        """Every pod bound to ``node``, in every namespace (as the API's JSON)."""
        listed = await self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
        pods: list[dict[str, Any]] = self.api_client.sanitize_for_serialization(listed.items)
        return pods

    async def claim_volume_handle(self, namespace: str, claim: str) -> str | None:
        """The CSI volume handle behind PersistentVolumeClaim ``claim``; None when the claim
        is not bound (yet, or any more) or its volume is not a CSI one."""
        try:
            pvc = await self.core.read_namespaced_persistent_volume_claim(claim, namespace)
            if not pvc.spec or not pvc.spec.volume_name:
                return None
            pv = await self.core.read_persistent_volume(pvc.spec.volume_name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        csi = pv.spec.csi if pv.spec else None
        return str(csi.volume_handle) if csi and csi.volume_handle else None

    async def delete_pod(self, namespace: str, name: str, uid: str, *, force: bool) -> bool:
        """Delete the pod, only if it is still the pod with ``uid`` (not a replacement of the
        same name): at once with ``force`` (grace period 0: its kubelet is not there to
        confirm), else gracefully (its kubelet stops it). False when it was already gone or
        replaced."""
        options = client.V1DeleteOptions(grace_period_seconds=0 if force else None,
                                         preconditions=client.V1Preconditions(uid=uid))
        try:
            await self.core.delete_namespaced_pod(name, namespace, body=options)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def close(self) -> None:
        await self.api_client.close()
