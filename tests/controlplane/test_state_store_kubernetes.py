"""The Kubernetes state store on a real kube-apiserver, with the CRDs from charts/crds.

First the shared contract (``tests/state_store_contract.py``), exactly as the SQLite store runs
it; then what only Kubernetes has: other writers on the same objects (the operator's status and
finalizer, users' labels and annotations), resourceVersion conflicts between two clients,
deletion held up by a finalizer, the CRD's own validation, and API errors in our vocabulary.

The session shares one control plane, so every test works in a scope of its own: its ids carry
a random prefix and its stores label what they write with it (and list only that), and what it
created is removed at the end, finalizers first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config

from csi_driver.config import PluginConfig, StateStoreKind
from csi_driver.state import KubernetesStateStore, StateStore, open_state_store
from csi_driver.state.kubernetes import (
    ACCESS_MODES_ANNOTATION,
    CREATED_AT_ANNOTATION,
    PHASE_ANNOTATION,
    SCOPE_LABEL,
    SNAPSHOTS,
    SOURCE_VOLUME_LABEL,
    VOLUMES,
)
from sharedsync.core.errors import Aborted, InvalidArgument, Unavailable
from sharedsync.core.records import Phase, SourceKind
from tests.state_store_contract import Names, StateStoreContract, Stores

from .controlplane import ControlPlane

pytestmark = pytest.mark.timeout(300)

GROUP, VERSION = "sharedsync.io", "v1alpha1"
#: The operator's finalizer (any name would do: the API server only counts them).
FINALIZER = "sharedsync.io/replicas"
#: Small pages, so that the contract's ten-object lists take several list requests.
PAGE_SIZE = 3

JsonObject = dict[str, Any]


class _Objects(Protocol):
    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kwargs: Any) -> Awaitable[Any]: ...
    def replace_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                      body: JsonObject, **kwargs: Any) -> Awaitable[Any]: ...
    def replace_cluster_custom_object_status(self, group: str, version: str, plural: str,
                                             name: str, body: JsonObject,
                                             **kwargs: Any) -> Awaitable[Any]: ...
    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **kwargs: Any) -> Awaitable[Any]: ...
    def delete_collection_cluster_custom_object(self, group: str, version: str, plural: str,
                                                **kwargs: Any) -> Awaitable[Any]: ...


class Admin:
    """Someone else writing the same objects (the operator, a user), through the raw API."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.api = cast("_Objects", CustomObjectsApi(client))

    @staticmethod
    async def _patiently(request: Callable[[], Awaitable[Any]]) -> Any:
        """A request, repeated while the server answers 429 (a fresh CRD's storage starting)."""
        for _ in range(30):
            try:
                return await request()
            except ApiException as exc:
                if exc.status != 429:
                    raise
            await asyncio.sleep(1)
        return await request()

    async def get(self, plural: str, name: str) -> JsonObject:
        return cast("JsonObject", await self._patiently(
            lambda: self.api.get_cluster_custom_object(GROUP, VERSION, plural, name)))

    async def edit(self, plural: str, name: str, change: Callable[[JsonObject], Any]) -> None:
        """Read-modify-write the main resource; ``change`` edits the object in place."""
        obj = await self.get(plural, name)
        change(obj)
        await self._patiently(lambda: self.api.replace_cluster_custom_object(
            GROUP, VERSION, plural, name, obj))

    async def set_status(self, name: str, status: JsonObject) -> None:
        obj = await self.get(VOLUMES, name)
        obj["status"] = status
        await self._patiently(lambda: self.api.replace_cluster_custom_object_status(
            GROUP, VERSION, VOLUMES, name, obj))

    async def remove_scope(self, scope: str) -> None:
        """Delete what a test's stores wrote, finalizers first."""
        selector = f"{SCOPE_LABEL}={scope}"
        for plural in (VOLUMES, SNAPSHOTS):
            await self._remove(plural, selector)

    async def _remove(self, plural: str, selector: str) -> None:
        listing = await self._patiently(lambda: self.api.list_cluster_custom_object(
            GROUP, VERSION, plural, label_selector=selector))
        for item in listing["items"]:
            if item["metadata"].get("finalizers"):
                await self.edit(plural, item["metadata"]["name"],
                                lambda o: o["metadata"].update(finalizers=[]))
        await self._patiently(lambda: self.api.delete_collection_cluster_custom_object(
            GROUP, VERSION, plural, label_selector=selector))


def add_finalizer(obj: JsonObject) -> None:
    obj["metadata"].setdefault("finalizers", []).append(FINALIZER)


@pytest.fixture
async def admin(control_plane: ControlPlane) -> AsyncIterator[Admin]:
    client = await new_client_from_config(config_file=str(control_plane.kubeconfig),
                                          persist_config=False)
    try:
        yield Admin(client)
    finally:
        await client.close()


@pytest.fixture
async def stores(control_plane: ControlPlane, admin: Admin) -> AsyncIterator[Stores]:
    scope = secrets.token_hex(4)

    async def connect() -> StateStore:
        return await KubernetesStateStore.connect(control_plane.kubeconfig, scope=scope,
                                                  page_size=PAGE_SIZE)

    opened = Stores(connect, Names(prefix=scope))
    try:
        yield opened
    finally:
        await opened.close_all()
        await admin.remove_scope(scope)


class TestKubernetesStateStore(StateStoreContract):
    """The shared contract, on SharedVolume and SharedVolumeSnapshot objects."""


# -- the objects are what operator/API.md says ---------------------------------------------------


async def test_objects_follow_the_api_contract(store: StateStore, names: Names,
                                               admin: Admin) -> None:
    record = names.volume(1, access_modes=("5", "7"),
                          parameters=(("syncPolicy", "fast-sync"),), created_at=1234.5)
    await store.put_volume(record)
    obj = await admin.get(VOLUMES, names.vid(1))
    assert (obj["apiVersion"], obj["kind"]) == ("sharedsync.io/v1alpha1", "SharedVolume")
    assert obj["spec"] == {
        "capacity": record.capacity_bytes, "policy": "fast-sync",
        "accessModes": ["ReadWriteMany", "ReadWriteOnce"], "volumeMode": "Filesystem",
        "contentSource": {"kind": "Snapshot", "name": names.sid(1001)},
        "requestName": "pvc-1", "parameters": {"syncPolicy": "fast-sync"},
        "accessibleNodes": ["node-a", "node-b"]}
    annotations = obj["metadata"]["annotations"]
    assert annotations[PHASE_ANNOTATION] == "Creating"
    assert float(annotations[CREATED_AT_ANNOTATION]) == 1234.5
    assert "status" not in obj  # the operator's, and nobody wrote it yet

    plain = names.volume(2, kind="block", parameters=(), source_kind=SourceKind.NONE,
                         source_id="", access_modes=("SINGLE_NODE_SINGLE_WRITER",),
                         phase=Phase.READY)
    await store.put_volume(plain)
    spec = (await admin.get(VOLUMES, names.vid(2)))["spec"]
    assert (spec["policy"], spec["volumeMode"], spec["accessModes"]) == (
        "", "Block", ["ReadWriteOncePod"])
    assert "contentSource" not in spec

    clone = names.volume(3, source_kind=SourceKind.VOLUME, source_id=names.vid(2))
    await store.put_volume(clone)
    assert (await admin.get(VOLUMES, names.vid(3)))["spec"]["contentSource"] == {
        "kind": "Volume", "name": names.vid(2)}

    snap = names.snapshot(1, 2, phase=Phase.READY)
    await store.put_snapshot(snap)
    obj = await admin.get(SNAPSHOTS, names.sid(1))
    assert obj["kind"] == "SharedVolumeSnapshot"
    assert obj["spec"] == {"requestName": "snapshot-1", "sourceVolume": names.vid(2),
                           "sizeBytes": snap.size_bytes, "createdAtNs": snap.created_at_ns,
                           "accessibleNodes": ["node-a"]}
    assert obj["metadata"]["annotations"][PHASE_ANNOTATION] == "Ready"
    assert obj["metadata"]["labels"][SOURCE_VOLUME_LABEL] == names.vid(2)


async def test_an_object_written_by_hand_reads_as_a_record(store: StateStore, names: Names,
                                                           admin: Admin) -> None:
    """Without the store's own annotations, the spec alone gives the record."""
    await store.put_volume(names.volume(1))

    def bare(obj: JsonObject) -> None:
        annotations = obj["metadata"]["annotations"]
        for key in (ACCESS_MODES_ANNOTATION, CREATED_AT_ANNOTATION, PHASE_ANNOTATION):
            del annotations[key]
        obj["spec"]["capacity"] = "1Gi"

    await admin.edit(VOLUMES, names.vid(1), bare)
    record = await store.get_volume(names.vid(1))
    assert record is not None
    assert record.capacity_bytes == 1 << 30
    assert record.access_modes == ("5", "7")  # ReadWriteMany, ReadWriteOnce
    assert (record.phase, record.created_at) == (Phase.CREATING, 0.0)


# -- other writers -------------------------------------------------------------------------------


async def test_status_written_by_the_operator_survives(store: StateStore, names: Names,
                                                       admin: Admin) -> None:
    stored = await store.put_volume(names.volume(1))
    status = {"phase": "Ready", "primary": "node-a", "epoch": 3, "readyReplicas": 2,
              "desiredReplicas": 2, "replicasReady": "2/2"}
    await admin.set_status(names.vid(1), status)
    # a status update is not a record write: the put from before it is not a conflict
    ready = await store.put_volume(dataclasses.replace(stored, phase=Phase.READY))
    assert ready.revision > stored.revision
    assert (await admin.get(VOLUMES, names.vid(1)))["status"] == status
    # what the store relies on: a PUT of the main resource ignores the status it carries
    await admin.edit(VOLUMES, names.vid(1), lambda o: o.update(status={"phase": "Failed"}))
    assert (await admin.get(VOLUMES, names.vid(1)))["status"] == status
    current = await store.get_volume(names.vid(1))
    assert current is not None
    assert current == dataclasses.replace(ready, revision=current.revision)
    bigger = await store.put_volume(dataclasses.replace(current, capacity_bytes=2 << 30))
    obj = await admin.get(VOLUMES, names.vid(1))
    assert obj["status"] == status
    assert obj["spec"]["capacity"] == 2 << 30
    assert await store.get_volume(names.vid(1)) == bigger


async def test_finalizers_labels_annotations_and_spec_of_others_survive(
        store: StateStore, names: Names, admin: Admin) -> None:
    stored = await store.put_volume(names.volume(1))

    def others(obj: JsonObject) -> None:
        add_finalizer(obj)
        obj["metadata"].setdefault("labels", {})["team"] = "storage"
        obj["metadata"]["annotations"]["sharedsync.io/sync-now"] = "1"
        obj["spec"].update(desiredReplicas=3, consumerNode="node-b")

    await admin.edit(VOLUMES, names.vid(1), others)
    ready = await store.put_volume(dataclasses.replace(stored, phase=Phase.READY))
    again = await store.put_volume(dataclasses.replace(ready, accessible_nodes=("node-c",)))
    obj = await admin.get(VOLUMES, names.vid(1))
    assert obj["metadata"]["finalizers"] == [FINALIZER]
    assert obj["metadata"]["labels"]["team"] == "storage"
    assert obj["metadata"]["annotations"]["sharedsync.io/sync-now"] == "1"
    assert (obj["spec"]["desiredReplicas"], obj["spec"]["consumerNode"]) == (3, "node-b")
    assert obj["spec"]["accessibleNodes"] == ["node-c"]
    assert await store.get_volume(names.vid(1)) == again
    await admin.edit(VOLUMES, names.vid(1), lambda o: o["metadata"].update(finalizers=[]))


async def test_resource_version_conflicts_between_two_stores(stores: Stores, names: Names,
                                                             admin: Admin) -> None:
    one, two = await stores.open(), await stores.open()
    first = await one.put_volume(names.volume(1))
    seen_by_two = await two.get_volume(names.vid(1))
    assert seen_by_two == first
    second = await one.put_volume(dataclasses.replace(first, phase=Phase.READY))
    with pytest.raises(Aborted):
        await two.put_volume(dataclasses.replace(seen_by_two, capacity_bytes=1 << 30))
    # a status update after a record write does not hide that record write
    await admin.set_status(names.vid(1), {"phase": "Placing"})
    with pytest.raises(Aborted):
        await two.put_volume(dataclasses.replace(seen_by_two, capacity_bytes=1 << 30))
    # many writers on two clients, all from one revision: exactly one wins
    attempts = [(one if i % 2 else two).put_volume(
        dataclasses.replace(second, capacity_bytes=(400 + i) << 20)) for i in range(12)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Aborted) for r in results if isinstance(r, BaseException))
    assert await one.get_volume(names.vid(1)) == winners[0]
    assert await two.get_volume(names.vid(1)) == winners[0]


async def test_a_revision_of_a_deleted_object_does_not_fit_its_successor(
        store: StateStore, names: Names) -> None:
    old = await store.put_volume(names.volume(1))
    await store.delete_volume(names.vid(1))
    new = await store.put_volume(names.volume(1, capacity_bytes=1 << 30))
    with pytest.raises(Aborted):
        await store.put_volume(dataclasses.replace(old, phase=Phase.READY))
    assert await store.get_volume(names.vid(1)) == new


async def test_a_long_parameter_value_round_trips(stores: Stores, names: Names,
                                                  admin: Admin) -> None:
    store = await stores.open()
    long_value = "".join(secrets.choice("abcdefghij-0123456789") for _ in range(10_000))
    record = names.volume(1, parameters=(("example.com/long", long_value),
                                         ("syncPolicy", "fast-sync")))
    stored = await store.put_volume(record)
    store = await stores.reopen(store)
    assert await store.get_volume(names.vid(1)) == stored
    assert stored.parameter_map["example.com/long"] == long_value
    obj = await admin.get(VOLUMES, names.vid(1))
    assert obj["spec"]["parameters"]["example.com/long"] == long_value
    assert obj["spec"]["policy"] == "fast-sync"


async def test_deletion_held_by_a_finalizer_reads_back_deleting(
        store: StateStore, names: Names, admin: Admin) -> None:
    ready = await store.put_volume(names.volume(1, phase=Phase.READY))
    await store.put_volume(names.volume(2, phase=Phase.READY))
    await admin.edit(VOLUMES, names.vid(1), add_finalizer)
    await store.delete_volume(names.vid(1))  # returns at once; the operator finishes it
    lingering = await store.get_volume(names.vid(1))
    assert lingering is not None
    assert lingering == dataclasses.replace(ready, phase=Phase.DELETING,
                                            revision=lingering.revision)
    assert [(r.volume_id, r.phase) for r in await store.list_volumes(None, 10)] == [
        (names.vid(1), Phase.DELETING), (names.vid(2), Phase.READY)]
    await store.delete_volume(names.vid(1))  # again: still a no-op
    with pytest.raises(Aborted):
        await store.put_volume(names.volume(1))  # the name is not free yet
    # the controller may still write the record while it goes; it stays DELETING
    written = await store.put_volume(dataclasses.replace(lingering, accessible_nodes=()))
    assert written.phase is Phase.DELETING
    # the operator is done: it removes its finalizer, and the object is gone
    await admin.edit(VOLUMES, names.vid(1), lambda o: o["metadata"].update(finalizers=[]))
    assert await store.get_volume(names.vid(1)) is None
    assert [r.volume_id for r in await store.list_volumes(None, 10)] == [names.vid(2)]


# -- the API server's answers in our vocabulary --------------------------------------------------


async def test_refusals_by_the_api_server_are_invalid_arguments(store: StateStore,
                                                                names: Names) -> None:
    with pytest.raises(InvalidArgument, match=r"(?i)invalid"):
        await store.put_volume(names.volume(1, volume_id="vol-NOT_A_NAME"))
    stored = await store.put_volume(names.volume(1, capacity_bytes=1 << 30))
    with pytest.raises(InvalidArgument, match="never shrink"):  # the CRD's own rule
        await store.put_volume(dataclasses.replace(stored, capacity_bytes=512 << 20))
    with pytest.raises(InvalidArgument, match="kind"):
        await store.put_volume(names.volume(2, kind="tape"))
    assert await store.get_volume(names.vid(1)) == stored


async def test_no_rbac_is_unavailable(control_plane: ControlPlane, names: Names) -> None:
    kubeconfig = control_plane.service_account_kubeconfig("sharedsync-tests", "no-rbac")
    store = await KubernetesStateStore.connect(kubeconfig)
    try:
        with pytest.raises(Unavailable, match="RBAC"):
            await store.get_volume(names.vid(1))
        with pytest.raises(Unavailable, match="RBAC"):
            await store.list_volumes(None, 10)
    finally:
        await store.close()


async def test_an_unreachable_api_server_is_unavailable(control_plane: ControlPlane,
                                                        names: Names, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    kubeconfig = tmp_path / "unreachable.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    store = await KubernetesStateStore.connect(kubeconfig, request_timeout=10)
    try:
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get_volume(names.vid(1)), lambda: store.put_volume(names.volume(1)),
            lambda: store.list_snapshots(None, 5), lambda: store.delete_volume(names.vid(1))]
        for attempt in attempts:
            with pytest.raises(Unavailable, match="cannot reach"):
                await attempt()
    finally:
        await store.close()


async def test_a_bad_kubeconfig_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="kubeconfig"):
        await KubernetesStateStore.connect(tmp_path / "missing.kubeconfig")


async def test_the_plugin_config_opens_it(control_plane: ControlPlane, names: Names,
                                          tmp_path: Path) -> None:
    config = PluginConfig(endpoint="unix:///unused", node_id="n", data_dir=tmp_path,
                          state_store=StateStoreKind.KUBERNETES,
                          kubeconfig=control_plane.kubeconfig)
    store = await open_state_store(config)
    try:
        assert isinstance(store, KubernetesStateStore)
        assert await store.get_volume(names.vid(1)) is None
    finally:
        await store.close()
    assert not (tmp_path / "state").exists()  # nothing local


@pytest.fixture
def names(stores: Stores) -> Names:
    return stores.names


@pytest.fixture
async def store(stores: Stores) -> StateStore:
    return await stores.open()
