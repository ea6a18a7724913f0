"""The plugin's only door to the API server, and the one place API failures become messages.

It runs where kubectl runs, so credentials come from a kubeconfig file (``--kubeconfig``, else
``$KUBECONFIG``, else ``~/.kube/config``), never from a pod's service account. Objects come back
as plain dicts (the JSON the API server sent, camelCase keys), the same shape for custom and core
resources, so the rest of the plugin reads them the way the docs and ``kubectl get -o json``
show them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, list_kube_config_contexts

from sharedsync.kubeclient import api_client

GROUP = "sharedsync.io"
VERSION = "v1alpha1"
SHARED_VOLUMES = "sharedvolumes"
#: The CSI driver's name (csi_driver.config.DRIVER_NAME; not imported: the plugin needs none of
#: the driver's dependencies). PersistentVolumes of other drivers are not ours.
DRIVER_NAME = "csi.sharedsync.io"
FIELD_MANAGER = "kubectl-sharedsync"
#: Bound on each request, so that a dead API server ends in a message rather than a hang.
REQUEST_TIMEOUT = 30.0
#: The generated client would pick JSON Patch for a dict body, which custom resources refuse
#: (passed as ** because the client's stubs do not declare the option).
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}
#: Objects per list request.
PAGE_SIZE = 500

Obj = dict[str, Any]


class PluginError(Exception):
    """Something the user must hear about; the message is printed as is, and the exit is 1."""


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """The PersistentVolumeClaim a volume is bound to."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def kubeconfig_path(flag: str | None) -> Path:
    """Where the credentials are, the way kubectl looks: the flag, ``$KUBECONFIG`` (which may
    list several files, merged as kubectl merges them), then ``~/.kube/config``."""
    chosen = flag or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    paths = [p for p in chosen.split(os.pathsep) if p]
    if not any(Path(p).expanduser().is_file() for p in paths):
        source = "--kubeconfig" if flag else "KUBECONFIG" if os.environ.get("KUBECONFIG") \
            else "the default"
        raise PluginError(f"error: no kubeconfig file at {chosen} ({source}); "
                          "pass --kubeconfig or set KUBECONFIG")
    return Path(chosen)


def context_namespace(kubeconfig: Path) -> str:
    """The current context's namespace, where ``pvc/NAME`` is looked up without ``-n``."""
    try:
        _, active = list_kube_config_contexts(config_file=str(kubeconfig))
    except (ConfigException, OSError, ValueError) as exc:
        raise PluginError(f"error: cannot read kubeconfig {kubeconfig}: {exc}") from exc
    namespace = ((active or {}).get("context") or {}).get("namespace")
    return str(namespace or "default")


def describe_api_error(exc: ApiException) -> str:
    """The API server's own message (it names the object and the reason), not the raw body."""
    message = ""
    try:
        body = json.loads(exc.body or "{}")
        message = str(body.get("message") or "")
    except (ValueError, AttributeError):
        message = str(exc.body or "")
    return f"error: the API server answered {exc.status} {exc.reason}: " \
           f"{message or 'no details'}"


class Cluster:
    """The few reads and writes the plugin makes. Use as ``async with Cluster.connect(...)``."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    @classmethod
    async def connect(cls, kubeconfig: Path) -> Cluster:
        try:
            return cls(await api_client(kubeconfig))
        except (ConfigException, OSError, ValueError) as exc:
            raise PluginError(f"error: cannot use kubeconfig {kubeconfig}: {exc}") from exc

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.api.close()

    def _plain(self, model: Any) -> Obj:
        plain: Obj = self.api.sanitize_for_serialization(model)
        return plain

    # -- SharedVolumes -------------------------------------------------------------------------

    async def volume(self, name: str) -> Obj | None:
        """The SharedVolume ``name``, or None when there is none."""
        try:
            found: Obj = await self.custom.get_cluster_custom_object(
                GROUP, VERSION, SHARED_VOLUMES, name, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def volumes(self) -> list[Obj]:
        """Every SharedVolume, sorted by name (listed in pages: clusters can hold thousands)."""
        items: list[Obj] = []
        paging: dict[str, Any] = {}
        while True:
            page = await self.custom.list_cluster_custom_object(
                GROUP, VERSION, SHARED_VOLUMES, limit=PAGE_SIZE,
                _request_timeout=REQUEST_TIMEOUT, **paging)
            items += page.get("items") or []
            paging = {"_continue": (page.get("metadata") or {}).get("continue")}
            if not paging["_continue"]:
                return sorted(items, key=lambda v: str(v["metadata"]["name"]))

    async def annotate(self, name: str, annotations: Mapping[str, str | None]) -> Obj:
        """Merge ``annotations`` into the SharedVolume's (None removes one); the result."""
        patched: Obj = await self.custom.patch_cluster_custom_object(
            GROUP, VERSION, SHARED_VOLUMES, name,
            {"metadata": {"annotations": dict(annotations)}},
            field_manager=FIELD_MANAGER, _request_timeout=REQUEST_TIMEOUT, **_MERGE_PATCH)
        return patched

    # -- claims --------------------------------------------------------------------------------

    async def claims(self) -> dict[str, ClaimRef]:
        """Volume id -> the claim of the PersistentVolume whose csi.volumeHandle it is."""
        found: dict[str, ClaimRef] = {}
        paging: dict[str, Any] = {}
        while True:
            page = self._plain(await self.core.list_persistent_volume(
                limit=PAGE_SIZE, _request_timeout=REQUEST_TIMEOUT, **paging))
            for pv in page.get("items") or []:
                spec = pv.get("spec") or {}
                csi, ref = spec.get("csi") or {}, spec.get("claimRef") or {}
                if csi.get("driver") == DRIVER_NAME and ref.get("name"):
                    found[str(csi["volumeHandle"])] = ClaimRef(str(ref.get("namespace") or ""),
                                                               str(ref["name"]))
            paging = {"_continue": (page.get("metadata") or {}).get("continue")}
            if not paging["_continue"]:
                return found

    async def claim(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._plain(await self.core.read_namespaced_persistent_volume_claim(
                name, namespace, _request_timeout=REQUEST_TIMEOUT))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def persistent_volume(self, name: str) -> Obj | None:
        try:
            return self._plain(await self.core.read_persistent_volume(
                name, _request_timeout=REQUEST_TIMEOUT))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # -- events --------------------------------------------------------------------------------

    async def events(self, uid: str) -> list[Obj] | None:
        """The events about the object ``uid``, in any namespace (the operator posts those of a
        cluster-scoped object in its own); None when this user may not list events."""
        try:
            listed = self._plain(await self.core.list_event_for_all_namespaces(
                field_selector=f"involvedObject.uid={uid}", _request_timeout=REQUEST_TIMEOUT))
        except ApiException as exc:
            if exc.status in (401, 403):
                return None
            raise
        items: list[Obj] = listed.get("items") or []
        return items


#: What a failed request can raise besides ApiException: no route, TLS, a dropped connection.
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
