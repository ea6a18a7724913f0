"""The Kubernetes state store: CSI records as SharedVolume and SharedVolumeSnapshot objects.

With the operator, a SharedVolume *is* the desired state it reconciles into replicas, so the CSI
controller keeps its record there instead of in SQLite on one node's disk: there is one source of
truth, and the controller pod can move between nodes without losing anything.

The mapping follows ``operator/API.md``. A SharedVolume's ``metadata.name`` is the volume id; the
store owns these ``spec`` fields: ``capacity`` (integer bytes), ``policy`` (the ``syncPolicy``
parameter, ``""`` when there is none), ``accessModes`` (Kubernetes names), ``volumeMode``
(``Filesystem``/``Block``), ``contentSource`` (``{kind: Snapshot|Volume, name}``, absent when the
volume was made empty), ``requestName``, ``parameters`` and ``accessibleNodes``, plus the
annotations ``sharedsync.io/csi-phase`` and ``sharedsync.io/created-at``; ``consumerNode`` is
written when the controller passes one (the CO's preferred node) and otherwise left alone.
Kubernetes access modes are coarser than CSI's (``SINGLE_NODE_WRITER`` and
``SINGLE_NODE_MULTI_WRITER`` are both ``ReadWriteOnce``), so the record's own modes are also
kept, exactly, in the annotation ``sharedsync.io/csi-access-modes``. A SharedVolumeSnapshot's
``spec`` is ``{requestName, sourceVolume, sizeBytes, createdAtNs, accessibleNodes}`` with the
``csi-phase`` annotation and the label ``sharedsync.io/source-volume``, which lets
``list_snapshots``/``count_snapshots`` of one volume ask the API server for that volume's
snapshots only. Parameters read back sorted by key (a JSON object has no order; the controller
writes them sorted anyway).

Other writers share these objects, and nothing of theirs may be lost: the operator owns
``status`` (a subresource, so the PUT of the main resource that the store issues never changes
it) and puts a finalizer on every SharedVolume; users and the operator may set labels,
annotations, ``spec.desiredReplicas`` and ``spec.consumerNode``. So every update is a
read-modify-write of the whole object that replaces only what the store owns.

Revisions are resourceVersions. Kubernetes calls ``metadata.resourceVersion`` opaque, but
kube-apiserver stores objects in etcd3 and reports the object's etcd modification revision: a
decimal integer that grows with every write anywhere in the cluster. The store relies on that
(and raises ``Internal`` on a resourceVersion that is not an integer). A new record is created
(``revision`` 0; an existing object means ``Aborted``); otherwise the PUT carries the
resourceVersion it read as a precondition, so a write in between is a 409 Conflict.

Every write bumps the resourceVersion, the operator's status updates included. If a put had to
name exactly the current resourceVersion, each one racing a status update (the operator updates
status while a CreateVolume is still waiting for its replicas) would be refused although no
*record* changed. So a put is refused only when another record write happened since the caller
read: each write stores, in the annotation ``sharedsync.io/csi-based-on``, the resourceVersion
the object had just before it (the PUT's precondition). The object went from that version
straight to the write's own, so no version lies between them; a caller holding a revision above
``csi-based-on`` has therefore seen the latest record write, and what changed since was someone
else's (status, finalizers, labels). A create stores the cluster's revision read just before,
when the name was free, so a revision from an earlier object of the same name never qualifies.

Deleting issues the DELETE and returns: with the operator's finalizer the object lingers with a
``deletionTimestamp`` until the replicas are gone, and reads back with phase ``DELETING``.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import aiohttp
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException

from csi_driver.proto import csi_pb2
from sharedsync.core.errors import (
    Aborted,
    Internal,
    InvalidArgument,
    SharedsyncError,
    Unavailable,
)
from sharedsync.core.parameters import SYNC_POLICY
from sharedsync.core.quantity import parse_bytes
from sharedsync.core.records import Phase, SnapshotRecord, SourceKind, VolumeRecord
from sharedsync.kubeclient import api_client

GROUP = "sharedsync.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
VOLUMES = "sharedvolumes"
SNAPSHOTS = "sharedvolumesnapshots"

PHASE_ANNOTATION = "sharedsync.io/csi-phase"
CREATED_AT_ANNOTATION = "sharedsync.io/created-at"
ACCESS_MODES_ANNOTATION = "sharedsync.io/csi-access-modes"
BASED_ON_ANNOTATION = "sharedsync.io/csi-based-on"
SOURCE_VOLUME_LABEL = "sharedsync.io/source-volume"
SCOPE_LABEL = "sharedsync.io/csi-scope"
#: Shown in ``managedFields``: who wrote the record's fields.
FIELD_MANAGER = "sharedsync-csi"

#: Strict: a field the CRD does not know is an error, not silently pruned (a mapping bug, or a
#: CRD older than this store, must not lose part of a record).
_WRITE_OPTIONS = {"field_manager": FIELD_MANAGER, "field_validation": "Strict"}
#: Objects per list request: 10k volumes come in 20 responses, not one giant one.
DEFAULT_PAGE_SIZE = 500
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Repeats of a request the server asked us to retry later, and the longest wait for one.
_RETRIES_AFTER = 3
_MAX_RETRY_AFTER = 5.0
#: Rounds of read-judge-write when other writers keep changing the object under a put.
_PUT_ATTEMPTS = 5
#: Restarts of a paged list whose continue token expired (410 Gone) before giving up.
_LIST_ATTEMPTS = 3

_AccessMode = csi_pb2.VolumeCapability.AccessMode.Mode
#: CSI access mode -> Kubernetes access mode. Kubernetes has no single-node read-only or
#: multi-node single-writer mode; each maps to the mode with the same reach (one node, many).
_KUBE_ACCESS_MODE = {
    "SINGLE_NODE_WRITER": "ReadWriteOnce",
    "SINGLE_NODE_READER_ONLY": "ReadWriteOnce",
    "SINGLE_NODE_MULTI_WRITER": "ReadWriteOnce",
    "SINGLE_NODE_SINGLE_WRITER": "ReadWriteOncePod",
    "MULTI_NODE_READER_ONLY": "ReadOnlyMany",
    "MULTI_NODE_SINGLE_WRITER": "ReadWriteMany",
    "MULTI_NODE_MULTI_WRITER": "ReadWriteMany",
}
#: Kubernetes access mode -> CSI access mode, as the external-provisioner translates them; only
#: for objects that lack the exact modes annotation (written by hand, not by this store).
_CSI_ACCESS_MODE = {
    "ReadWriteOnce": "SINGLE_NODE_MULTI_WRITER",
    "ReadWriteOncePod": "SINGLE_NODE_SINGLE_WRITER",
    "ReadOnlyMany": "MULTI_NODE_READER_ONLY",
    "ReadWriteMany": "MULTI_NODE_MULTI_WRITER",
}
_VOLUME_MODE = {"filesystem": "Filesystem", "block": "Block"}
_SOURCE_KIND = {SourceKind.SNAPSHOT: "Snapshot", SourceKind.VOLUME: "Volume"}
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")

JsonObject = dict[str, Any]
T = TypeVar("T")


class _CustomObjects(Protocol):
    """The typed subset of ``CustomObjectsApi`` we call (the generated client is untyped)."""

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kwargs: Any) -> Awaitable[Any]: ...
    def create_cluster_custom_object(self, group: str, version: str, plural: str,
                                     body: JsonObject, **kwargs: Any) -> Awaitable[Any]: ...
    def replace_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                      body: JsonObject, **kwargs: Any) -> Awaitable[Any]: ...
    def delete_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                     **kwargs: Any) -> Awaitable[Any]: ...
    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **kwargs: Any) -> Awaitable[Any]: ...


class _RefusedError(Exception):
    """An API error status the caller handles itself (404, 409, 410)."""

    def __init__(self, code: int, reason: str, message: str, names_object: bool) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        #: The status names the object (it is missing), not just the URL (the CRD is).
        self.names_object = names_object


def _status_of(exc: ApiException) -> tuple[str, str, bool]:
    """(reason, message, names an object) from the ``Status`` body of an API error."""
    body: Any = exc.body
    try:
        status = json.loads(body) if body else {}
    except (TypeError, ValueError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    details = status.get("details") or {}
    message = str(status.get("message") or exc.reason or "")
    return (str(status.get("reason") or exc.reason or ""), message,
            bool(isinstance(details, dict) and details.get("name")))


def _api_error(exc: ApiException, what: str) -> SharedsyncError:
    """Our exception for an API error status nobody handled."""
    code = int(exc.status or 0)
    reason, message, _ = _status_of(exc)
    text = f"{what}: the Kubernetes API server answered {code} {reason}: {message}"
    if code in (400, 413, 422):
        return InvalidArgument(text)
    if code == 404:
        return Unavailable(f"{text} (are the sharedsync CRDs installed?)")
    if code in (401, 403):
        return Unavailable(f"{text} (check the CSI controller's credentials and RBAC)")
    if code in (409, 410):
        return Aborted(text)
    if code in (408, 429) or code >= 500:
        return Unavailable(text)
    return Internal(text)


def _retry_after(exc: ApiException) -> float | None:
    """How long the server asked us to wait before repeating the request, if it did."""
    code = int(exc.status or 0)
    if code != 429 and code // 100 != 5:
        return None
    headers: Any = exc.headers or {}
    try:
        seconds = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class _Resource:
    """One of our two kinds: where its objects live and what to call them in messages."""

    def __init__(self, plural: str, kind: str) -> None:
        self.plural = plural
        self.kind = kind


_VOLUME = _Resource(VOLUMES, "SharedVolume")
_SNAPSHOT = _Resource(SNAPSHOTS, "SharedVolumeSnapshot")


# -- records <-> objects (pure) -------------------------------------------------------------------


def source_volume_label(volume_id: str) -> str:
    """The label value naming a snapshot's source volume.

    Our volume ids are valid label values; anything longer than a label allows (63 characters)
    or with other characters is hashed instead. Listing always re-checks ``spec.sourceVolume``,
    so a hash collision could never mix two volumes' snapshots.
    """
    if _LABEL_VALUE.fullmatch(volume_id):
        return volume_id
    return "h-" + hashlib.sha256(volume_id.encode()).hexdigest()[:40]


def _kube_access_modes(modes: tuple[str, ...]) -> list[str]:
    """Kubernetes access modes for the record's CSI modes (names, or numbers as the controller
    writes them); a mode we cannot name is left to the exact annotation alone."""
    result: set[str] = set()
    for mode in modes:
        name = mode
        if mode.isdigit() and int(mode) in _AccessMode.values():
            name = _AccessMode.Name(int(mode))  # type: ignore[arg-type]
        if name in _KUBE_ACCESS_MODE:
            result.add(_KUBE_ACCESS_MODE[name])
    return sorted(result)


def _meta(obj: JsonObject) -> JsonObject:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
        obj["metadata"] = meta
    return meta


def _string_map(obj: JsonObject, key: str) -> dict[str, str]:
    """``metadata.annotations`` or ``metadata.labels``, created when absent."""
    meta = _meta(obj)
    values = meta.get(key)
    if not isinstance(values, dict):
        values = {}
        meta[key] = values
    return values


def _spec(obj: JsonObject) -> JsonObject:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        spec = {}
        obj["spec"] = spec
    return spec


def write_volume(obj: JsonObject, record: VolumeRecord) -> None:
    """Set what the store owns of a SharedVolume from ``record``; keep everything else."""
    if record.kind not in _VOLUME_MODE:
        raise InvalidArgument(f"volume {record.volume_id} has kind {record.kind!r}; "
                              f"expected one of {', '.join(sorted(_VOLUME_MODE))}")
    spec = _spec(obj)
    spec.update(
        capacity=record.capacity_bytes,
        policy=record.parameter_map.get(SYNC_POLICY, ""),
        accessModes=_kube_access_modes(record.access_modes),
        volumeMode=_VOLUME_MODE[record.kind],
        requestName=record.name,
        parameters=dict(record.parameters),
        accessibleNodes=list(record.accessible_nodes),
    )
    if record.source_kind is SourceKind.NONE:
        spec.pop("contentSource", None)
    else:
        spec["contentSource"] = {"kind": _SOURCE_KIND[record.source_kind],
                                 "name": record.source_id}
    annotations = _string_map(obj, "annotations")
    annotations[PHASE_ANNOTATION] = str(record.phase)
    annotations[CREATED_AT_ANNOTATION] = repr(float(record.created_at))
    annotations[ACCESS_MODES_ANNOTATION] = json.dumps(list(record.access_modes))


def write_snapshot(obj: JsonObject, record: SnapshotRecord) -> None:
    """Set what the store owns of a SharedVolumeSnapshot from ``record``; keep the rest."""
    _spec(obj).update(
        requestName=record.name,
        sourceVolume=record.source_volume_id,
        sizeBytes=record.size_bytes,
        createdAtNs=record.created_at_ns,
        accessibleNodes=list(record.accessible_nodes),
    )
    _string_map(obj, "annotations")[PHASE_ANNOTATION] = str(record.phase)
    _string_map(obj, "labels")[SOURCE_VOLUME_LABEL] = source_volume_label(
        record.source_volume_id)


def revision_of(obj: JsonObject) -> int:
    """The object's resourceVersion as the integer etcd revision it is."""
    value = _meta(obj).get("resourceVersion")
    if not isinstance(value, str) or not value.isdigit():
        raise Internal(f"the API server reported resourceVersion {value!r} for "
                       f"{_meta(obj).get('name')!r}; this store needs etcd-backed integer "
                       "resourceVersions")
    return int(value)


def _phase(obj: JsonObject) -> Phase:
    """DELETING once Kubernetes is deleting the object, else the phase the store wrote."""
    meta = _meta(obj)
    if meta.get("deletionTimestamp"):
        return Phase.DELETING
    written = (meta.get("annotations") or {}).get(PHASE_ANNOTATION, "")
    try:
        return Phase(written)
    except ValueError:
        return Phase.CREATING  # not (yet) a record we finished: never reported as ready


def _decoding(kind: str, obj: JsonObject, decode: Callable[[], T]) -> T:
    try:
        return decode()
    except (KeyError, TypeError, ValueError, InvalidArgument) as exc:
        raise Internal(f"{kind} {_meta(obj).get('name')!r} is malformed "
                       f"({type(exc).__name__}: {exc})") from exc


def read_volume(obj: JsonObject) -> VolumeRecord:
    """The record a SharedVolume holds."""

    def decode() -> VolumeRecord:
        meta, spec = _meta(obj), obj.get("spec") or {}
        annotations = meta.get("annotations") or {}
        source = spec.get("contentSource") or {}
        source_kind = {v: k for k, v in _SOURCE_KIND.items()}.get(
            str(source.get("kind", "")), SourceKind.NONE)
        if ACCESS_MODES_ANNOTATION in annotations:
            modes = tuple(str(m) for m in json.loads(annotations[ACCESS_MODES_ANNOTATION]))
        else:  # the controller records modes as the numbers of CSI's enum
            modes = tuple(sorted(str(_AccessMode.Value(_CSI_ACCESS_MODE[m]))
                                 for m in spec.get("accessModes") or ()))
        parameters = spec.get("parameters") or {}
        return VolumeRecord(
            volume_id=meta["name"], name=str(spec.get("requestName", "")),
            capacity_bytes=parse_bytes(spec["capacity"]),
            kind={v: k for k, v in _VOLUME_MODE.items()}[spec.get("volumeMode", "Filesystem")],
            access_modes=modes,
            parameters=tuple(sorted((str(k), str(v)) for k, v in parameters.items())),
            source_kind=source_kind,
            source_id=str(source.get("name", "")) if source_kind is not SourceKind.NONE else "",
            accessible_nodes=tuple(str(n) for n in spec.get("accessibleNodes") or ()),
            phase=_phase(obj), created_at=float(annotations.get(CREATED_AT_ANNOTATION, 0.0)),
            revision=revision_of(obj))

    return _decoding(_VOLUME.kind, obj, decode)


def read_snapshot(obj: JsonObject) -> SnapshotRecord:
    """The record a SharedVolumeSnapshot holds."""

    def decode() -> SnapshotRecord:
        spec = obj.get("spec") or {}
        return SnapshotRecord(
            snapshot_id=_meta(obj)["name"], name=str(spec.get("requestName", "")),
            source_volume_id=str(spec["sourceVolume"]), size_bytes=int(spec["sizeBytes"]),
            created_at_ns=int(spec["createdAtNs"]), phase=_phase(obj),
            accessible_nodes=tuple(str(n) for n in spec.get("accessibleNodes") or ()),
            revision=revision_of(obj))

    return _decoding(_SNAPSHOT.kind, obj, decode)


def _based_on(obj: JsonObject) -> int:
    """The resourceVersion the last record write was made against (see the module doc)."""
    value = (_meta(obj).get("annotations") or {}).get(BASED_ON_ANNOTATION, "")
    # An object without it was not written by this store: any revision it gave out is fine.
    return int(value) if isinstance(value, str) and value.isdigit() else 0


# -- the store ------------------------------------------------------------------------------------


class KubernetesStateStore:
    """A :class:`csi_driver.state.StateStore` in SharedVolume and SharedVolumeSnapshot objects.

    Built on an ``ApiClient`` (closed by :meth:`close` only if the store owns it), or by
    :meth:`connect` from in-cluster credentials or a kubeconfig file.

    ``scope``, when given, is a label value put on every object the store writes
    (``sharedsync.io/csi-scope``) and required of every object it lists, so that several
    stores can share a cluster without listing each other's records (tests on one control
    plane, say). Names stay cluster-wide: gets, puts and deletes go by name alone.
    """

    def __init__(self, api_client: ApiClient, *, owns_client: bool = False,
                 scope: str = "", page_size: int = DEFAULT_PAGE_SIZE,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        if page_size < 1:
            raise InvalidArgument(f"page_size must be positive, got {page_size}")
        if not _LABEL_VALUE.fullmatch(scope):
            raise InvalidArgument(f"scope must be a label value, got {scope!r}")
        self._scope = scope
        self._client = api_client
        self._owns_client = owns_client
        self._api = cast("_CustomObjects", CustomObjectsApi(api_client))
        self._page_size = page_size
        self._timeout = request_timeout

    @classmethod
    async def connect(cls, kubeconfig: Path | None = None, *, scope: str = "",
                      page_size: int = DEFAULT_PAGE_SIZE,
                      request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> KubernetesStateStore:
        """A store with its own client: from ``kubeconfig``, else the pod's service account."""
        try:
            client = await api_client(kubeconfig)
        except ConfigException as exc:
            if kubeconfig is None:
                raise Unavailable(f"no in-cluster Kubernetes credentials ({exc}); outside a "
                                  "pod, pass --kubeconfig") from exc
            raise InvalidArgument(f"cannot use kubeconfig {kubeconfig}: {exc}") from exc
        except OSError as exc:
            raise InvalidArgument(f"cannot read kubeconfig {kubeconfig}: {exc}") from exc
        return cls(client, owns_client=True, scope=scope, page_size=page_size,
                   request_timeout=request_timeout)

    # -- API calls, with errors in our vocabulary --------------------------------------------

    async def _call(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                    handled: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """One API request; statuses in ``handled`` raise :class:`_RefusedError` for the caller.

        Like client-go, a request the server asks us to repeat (429 or 5xx with Retry-After:
        API priority and fairness, a resource's storage still initialising) is repeated a few
        times after the delay it names, capped; after that it is ``Unavailable``.
        """
        attempt = 0
        while True:
            try:
                return await call(GROUP, VERSION, *args, _request_timeout=self._timeout,
                                  **kwargs)
            except ApiException as exc:
                code = int(exc.status or 0)
                if code in handled:
                    raise _RefusedError(code, *_status_of(exc)) from exc
                delay = _retry_after(exc)
                if delay is None or attempt == _RETRIES_AFTER:
                    raise _api_error(exc, what) from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise Unavailable(f"{what}: cannot reach the Kubernetes API server "
                                  f"({type(exc).__name__}: {exc})") from exc
            except ConfigException as exc:  # credentials that could not be refreshed
                raise Unavailable(f"{what}: Kubernetes credentials unusable: {exc}") from exc
            attempt += 1
            await asyncio.sleep(delay)

    async def _get(self, res: _Resource, name: str) -> JsonObject | None:
        try:
            obj = await self._call(f"get {res.kind} {name}", self._api.get_cluster_custom_object,
                                   res.plural, name, handled=(404,))
        except _RefusedError as refused:
            if refused.names_object:
                return None
            raise Unavailable(f"get {res.kind} {name}: {refused} "
                              "(are the sharedsync CRDs installed?)") from refused
        return cast("JsonObject", obj)

    async def _delete(self, res: _Resource, name: str) -> None:
        try:
            await self._call(f"delete {res.kind} {name}", self._api.delete_cluster_custom_object,
                             res.plural, name, handled=(404,))
        except _RefusedError as refused:
            if not refused.names_object:
                raise Unavailable(f"delete {res.kind} {name}: {refused} "
                                  "(are the sharedsync CRDs installed?)") from refused

    async def _list_page(self, res: _Resource, cont: str | None, limit: int,
                         **selectors: str) -> JsonObject:
        args: dict[str, Any] = {"limit": limit, **selectors}
        if cont:
            args["_continue"] = cont
        return cast("JsonObject", await self._call(
            f"list {res.plural}", self._api.list_cluster_custom_object, res.plural,
            handled=(410,), **args))

    async def _fold(self, res: _Resource, start: T, step: Callable[[T, list[JsonObject]], T],
                    **selectors: str) -> T:
        """Fold ``step`` over every object (matching ``selectors``), one page at a time.

        Pages keep memory bounded whatever the number of objects. A continue token expires after
        a few minutes (410 Gone); the fold then starts over from ``start`` (which ``step`` must
        not mutate), since only a fresh list is a consistent one.
        """
        labels = [s for s in (selectors.pop("label_selector", ""),
                              f"{SCOPE_LABEL}={self._scope}" if self._scope else "") if s]
        if labels:
            selectors["label_selector"] = ",".join(labels)
        for _ in range(_LIST_ATTEMPTS):
            acc, cont = start, None
            try:
                while True:
                    page = await self._list_page(res, cont, self._page_size, **selectors)
                    acc = step(acc, list(page.get("items") or ()))
                    cont = (page.get("metadata") or {}).get("continue") or None
                    if not cont:
                        return acc
            except _RefusedError:
                continue
        raise Unavailable(f"list {res.plural}: the listing kept expiring; retry")

    async def _first(self, res: _Resource, after: str | None, limit: int,
                     keep: Callable[[JsonObject], bool] = lambda _: True,
                     **selectors: str) -> list[JsonObject]:
        """The ``limit`` objects with the smallest names above ``after`` that ``keep`` likes.

        The API server cannot start a list at a name, so every object is read; only ``limit``
        of them are held at a time.
        """

        def step(kept: list[JsonObject], items: list[JsonObject]) -> list[JsonObject]:
            fresh = [o for o in items
                     if (after is None or str(_meta(o).get("name", "")) > after) and keep(o)]
            return heapq.nsmallest(limit, kept + fresh, key=lambda o: str(_meta(o)["name"]))

        if limit <= 0:
            return []
        return await self._fold(res, [], step, **selectors)

    async def _put(self, res: _Resource, name: str, revision: int,
                   write: Callable[[JsonObject], None]) -> JsonObject:
        """Create (revision 0) or update the object holding one record; return it as stored."""
        if revision == 0:
            return await self._create(res, name, write)
        for _ in range(_PUT_ATTEMPTS):
            current = await self._get(res, name)
            if current is None:
                raise Aborted(f"{res.kind} {name} was deleted concurrently; retry")
            now = revision_of(current)
            if revision != now and not _based_on(current) < revision < now:
                raise Aborted(f"{res.kind} {name} changed concurrently (revision {now}, "
                              f"expected {revision}); retry")
            body = dict(current)
            meta = body["metadata"] = dict(_meta(current))
            meta.pop("managedFields", None)  # omitted: the server keeps them
            for key in ("annotations", "labels"):
                if isinstance(meta.get(key), dict):
                    meta[key] = dict(meta[key])
            body["spec"] = dict(current.get("spec") or {})
            self._write(body, write)
            meta["resourceVersion"] = str(now)
            _string_map(body, "annotations")[BASED_ON_ANNOTATION] = str(now)
            try:
                return cast("JsonObject", await self._call(
                    f"update {res.kind} {name}", self._api.replace_cluster_custom_object,
                    res.plural, name, body, handled=(404, 409), **_WRITE_OPTIONS))
            except _RefusedError as refused:
                if refused.code == 404:
                    raise Aborted(f"{res.kind} {name} was deleted concurrently; "
                                  "retry") from refused
                continue  # written between our read and our write: judge again
        raise Aborted(f"{res.kind} {name} kept changing under the update; retry")

    def _write(self, body: JsonObject, write: Callable[[JsonObject], None]) -> None:
        write(body)
        if self._scope:
            _string_map(body, "labels")[SCOPE_LABEL] = self._scope

    async def _create(self, res: _Resource, name: str,
                      write: Callable[[JsonObject], None]) -> JsonObject:
        # The cluster's revision while the name is free: any revision of an earlier object
        # of this name is at most this, so none of them can pass as one of the new object's.
        free = await self._list_page(res, None, 1, field_selector=f"metadata.name={name}")
        if free.get("items"):
            raise Aborted(f"{res.kind} {name} already exists; retry with its revision")
        body: JsonObject = {"apiVersion": API_VERSION, "kind": res.kind,
                            "metadata": {"name": name}}
        self._write(body, write)
        _string_map(body, "annotations")[BASED_ON_ANNOTATION] = str(revision_of(free))
        try:
            return cast("JsonObject", await self._call(
                f"create {res.kind} {name}", self._api.create_cluster_custom_object,
                res.plural, body, handled=(409,), **_WRITE_OPTIONS))
        except _RefusedError as refused:
            raise Aborted(f"{res.kind} {name} was created concurrently; retry") from refused

    # -- volumes -----------------------------------------------------------------------------

    async def get_volume(self, volume_id: str) -> VolumeRecord | None:
        obj = await self._get(_VOLUME, volume_id)
        return read_volume(obj) if obj is not None else None

    async def put_volume(self, record: VolumeRecord, *,
                         consumer_node: str = "") -> VolumeRecord:
        def write(obj: JsonObject) -> None:
            write_volume(obj, record)
            if consumer_node:  # in the object that is created, so placement sees it at once
                _spec(obj)["consumerNode"] = consumer_node

        return read_volume(await self._put(_VOLUME, record.volume_id, record.revision, write))

    async def delete_volume(self, volume_id: str) -> None:
        await self._delete(_VOLUME, volume_id)

    async def list_volumes(self, after: str | None, limit: int) -> list[VolumeRecord]:
        return [read_volume(o) for o in await self._first(_VOLUME, after, limit)]

    # -- snapshots ---------------------------------------------------------------------------

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        obj = await self._get(_SNAPSHOT, snapshot_id)
        return read_snapshot(obj) if obj is not None else None

    async def put_snapshot(self, record: SnapshotRecord) -> SnapshotRecord:
        return read_snapshot(await self._put(_SNAPSHOT, record.snapshot_id, record.revision,
                                             lambda obj: write_snapshot(obj, record)))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self._delete(_SNAPSHOT, snapshot_id)

    async def list_snapshots(self, after: str | None, limit: int,
                             source_volume_id: str | None = None) -> list[SnapshotRecord]:
        if source_volume_id is None:
            return [read_snapshot(o) for o in await self._first(_SNAPSHOT, after, limit)]
        return [read_snapshot(o) for o in await self._first(
            _SNAPSHOT, after, limit, keep=self._is_of(source_volume_id),
            label_selector=self._of_volume(source_volume_id))]

    async def count_snapshots(self, source_volume_id: str) -> int:
        of_volume = self._is_of(source_volume_id)
        return await self._fold(
            _SNAPSHOT, 0, lambda n, items: n + sum(1 for o in items if of_volume(o)),
            label_selector=self._of_volume(source_volume_id))

    @staticmethod
    def _is_of(volume_id: str) -> Callable[[JsonObject], bool]:
        """The label is only a (possibly hashed) index; ``spec.sourceVolume`` is the truth."""
        return lambda o: (o.get("spec") or {}).get("sourceVolume") == volume_id

    @staticmethod
    def _of_volume(volume_id: str) -> str:
        return f"{SOURCE_VOLUME_LABEL}={source_volume_label(volume_id)}"

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()

