"""What the scenarios run in pods: the record writer and verifier, and manifest builders.

Data is checked where users see it, inside pods, with nothing but busybox: each record is one
line ``<id> <payload> <sha256 of payload>``, appended and fsync'd (``sync FILE``) before the
writer prints ``ack <id>``; the verifier recomputes every checksum in the pod. An id is
``<tag>-<n>``, the tag naming the writer session, so sessions never collide in one file. A
record is written as one ``write(2)`` of a newline and the line, so the unacknowledged tail of
a writer cut off by a dead node (a torn line: too few fields, or a short checksum) can never
glue itself to the next session's first record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

DRIVER = "csi.sharedsync.io"
WORKLOAD_UID = 10001

#: $1 file, $2 tag, $3 count (0: until stopped), $4 pause between records in seconds.
WRITE_SCRIPT = r"""
f=$1; tag=$2; count=$3; pause=$4
i=0
while [ "$count" -eq 0 ] || [ "$i" -lt "$count" ]; do
  i=$((i + 1))
  p="$tag.$i.$RANDOM$RANDOM$RANDOM"
  s=$(printf '%s' "$p" | sha256sum | cut -d' ' -f1)
  printf '\n%s %s %s' "$tag-$i" "$p" "$s" >> "$f" || exit 1
  sync "$f" || exit 1
  echo "ack $tag-$i"
  [ "$pause" = 0 ] || sleep "$pause"
done
echo "done"
"""

#: $1 file. Prints "ok <id>", "bad <id>", "torn <line>" per line, "missing" if there is no
#: file, and "end" last.
VERIFY_SCRIPT = r"""
f=$1
if [ ! -f "$f" ]; then echo missing; echo end; exit 0; fi
while IFS= read -r line || [ -n "$line" ]; do
  [ -n "$line" ] || continue
  set -f; set -- $line; set +f
  if [ "$#" -ne 3 ] || [ "${#3}" -ne 64 ]; then echo "torn $line"; continue; fi
  got=$(printf '%s' "$2" | sha256sum | cut -d' ' -f1)
  if [ "$got" = "$3" ]; then echo "ok $1"; else echo "bad $1"; fi
done < "$f"
echo end
"""

#: The container's main process: idle until told to stop (the scenarios drive it by exec).
IDLE = "trap 'exit 0' TERM INT; while true; do sleep 1; done"


@dataclass(frozen=True)
class Image:
    """The workload image a cluster's nodes have (busybox), and how to get it."""

    ref: str
    pull_policy: str


def labels(app: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "sharedsync-e2e"}


def pod_spec(image: Image, volumes: dict[str, str], *,
             anti_affinity_with: str | None = None,
             node_selector: dict[str, str] | None = None) -> Obj:
    """A non-root busybox pod mounting each claim of ``volumes`` (mount path -> claim; a
    claim of "" means the volumeClaimTemplate named "data")."""
    spec: Obj = {
        "terminationGracePeriodSeconds": 5,
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKLOAD_UID,
                            "runAsGroup": WORKLOAD_UID, "fsGroup": WORKLOAD_UID},
        "containers": [{
            "name": "app", "image": image.ref, "imagePullPolicy": image.pull_policy,
            "command": ["sh", "-c", IDLE],
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "5m", "memory": "8Mi"},
                          "limits": {"memory": "64Mi"}},
            "volumeMounts": [{"name": _volume_name(path, claim), "mountPath": path}
                             for path, claim in volumes.items()],
        }],
        "volumes": [{"name": _volume_name(path, claim),
                     "persistentVolumeClaim": {"claimName": claim}}
                    for path, claim in volumes.items() if claim],
    }
    if anti_affinity_with:
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": anti_affinity_with}},
             "topologyKey": "kubernetes.io/hostname"}]}}
    if node_selector:
        spec["nodeSelector"] = node_selector
    return spec


def _volume_name(path: str, claim: str) -> str:
    return "data" if not claim else "v-" + path.strip("/").replace("/", "-")


def statefulset(name: str, namespace: str, storage_class: str, *, replicas: int, image: Image,
                size: str = "1Gi", spread: bool = True) -> list[Obj]:
    """A StatefulSet with a volumeClaimTemplate "data" mounted at /data, and its headless
    Service; ``spread`` puts its pods on distinct nodes."""
    spec = pod_spec(image, {"/data": ""},
                    anti_affinity_with=name if spread else None)
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
         "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": name},
                  "ports": [{"name": "unused", "port": 80}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
         "spec": {
             "serviceName": name, "replicas": replicas,
             "podManagementPolicy": "Parallel",
             "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
             "template": {"metadata": {"labels": labels(name)}, "spec": spec},
             "volumeClaimTemplates": [{
                 "metadata": {"name": "data"},
                 "spec": {"storageClassName": storage_class, "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": size}}}}],
         }},
    ]


def claim(name: str, namespace: str, storage_class: str, *, size: str = "1Gi",
          access_mode: str = "ReadWriteOnce", snapshot: str | None = None) -> Obj:
    spec: Obj = {"storageClassName": storage_class, "accessModes": [access_mode],
                 "resources": {"requests": {"storage": size}}}
    if snapshot:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                              "name": snapshot}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
            "spec": spec}


def pod(name: str, namespace: str, volumes: dict[str, str], *, image: Image,
        app: str | None = None, anti_affinity_with: str | None = None) -> Obj:
    """A plain pod mounting claims (mount path -> claim name)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(app or name)},
            "spec": pod_spec(image, volumes,
                             anti_affinity_with=anti_affinity_with)}


def sync_policy(name: str, spec: Obj) -> Obj:
    return {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SyncPolicy",
            "metadata": {"name": name, "labels": labels("policies")}, "spec": spec}


def storage_class(name: str, policy: str) -> Obj:
    """A StorageClass for a SyncPolicy, as the chart makes them."""
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "labels": labels("policies")},
            "provisioner": DRIVER, "parameters": {"syncPolicy": policy},
            "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": True}


def volume_snapshot(name: str, namespace: str, claim_name: str, snapshot_class: str) -> Obj:
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
            "spec": {"volumeSnapshotClassName": snapshot_class,
                     "source": {"persistentVolumeClaimName": claim_name}}}
