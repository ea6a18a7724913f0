"""Which SharedVolume a user means: its name, or the PersistentVolumeClaim that uses it.

Users know their claims, not the generated volume ids, so every command takes either:
``vol-...`` or ``sv/vol-...`` (a SharedVolume), ``pvc/NAME`` (a claim in the namespace of
``-n`` or of the kubeconfig's context), or a bare name that is tried as a SharedVolume first and
then as a claim. The way from a claim to its volume is the one Kubernetes records: the claim's
``spec.volumeName`` is a PersistentVolume whose ``spec.csi.volumeHandle`` is the volume id.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kube import DRIVER_NAME, Cluster, Obj, PluginError

_VOLUME_PREFIXES = ("sv/", "sharedvolume/", "sharedvolumes/",
                    "sharedvolume.sharedsync.io/", "sharedvolumes.sharedsync.io/")
_CLAIM_PREFIXES = ("pvc/", "persistentvolumeclaim/", "persistentvolumeclaims/")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed command-line argument."""

    kind: str  # "volume", "claim" or "either"
    name: str


def parse_target(text: str) -> Target:
    lowered = text.lower()
    for prefix in _VOLUME_PREFIXES:
        if lowered.startswith(prefix):
            return Target("volume", _nonempty(text[len(prefix):], text))
    for prefix in _CLAIM_PREFIXES:
        if lowered.startswith(prefix):
            return Target("claim", _nonempty(text[len(prefix):], text))
    if "/" in text:
        raise PluginError(f"error: {text!r} is neither a SharedVolume (vol-..., sv/NAME) nor a "
                          "claim (pvc/NAME)")
    return Target("either", _nonempty(text, text))


def _nonempty(name: str, text: str) -> str:
    if not name:
        raise PluginError(f"error: {text!r} names nothing")
    return name


async def volume_of_claim(cluster: Cluster, namespace: str, name: str) -> Obj:
    """The SharedVolume bound to claim ``namespace/name``; a PluginError says why there is
    none (no such claim, not bound yet, bound to another driver's volume)."""
    pvc = await cluster.claim(namespace, name)
    if pvc is None:
        raise PluginError(f"error: PersistentVolumeClaim {namespace}/{name} not found")
    pv_name = (pvc.get("spec") or {}).get("volumeName")
    if not pv_name:
        raise PluginError(f"error: PersistentVolumeClaim {namespace}/{name} is not bound to a "
                          "volume yet (with WaitForFirstConsumer, a pod must use it first)")
    pv = await cluster.persistent_volume(str(pv_name))
    csi = ((pv or {}).get("spec") or {}).get("csi") or {}
    if pv is None or csi.get("driver") != DRIVER_NAME:
        raise PluginError(f"error: PersistentVolumeClaim {namespace}/{name} is bound to "
                          f"PersistentVolume {pv_name}, which is not a sharedsync volume")
    handle = str(csi.get("volumeHandle") or "")
    volume = await cluster.volume(handle)
    if volume is None:
        raise PluginError(f"error: SharedVolume {handle} (of PersistentVolumeClaim "
                          f"{namespace}/{name}) not found")
    return volume


async def resolve(cluster: Cluster, text: str, namespace: str) -> Obj:
    """The SharedVolume ``text`` designates, as the API server holds it now."""
    target = parse_target(text)
    if target.kind == "claim":
        return await volume_of_claim(cluster, namespace, target.name)
    volume = await cluster.volume(target.name)
    if volume is not None:
        return volume
    if target.kind == "either" and await cluster.claim(namespace, target.name) is not None:
        return await volume_of_claim(cluster, namespace, target.name)
    if target.kind == "volume":
        raise PluginError(f"error: SharedVolume {target.name} not found")
    raise PluginError(f"error: SharedVolume {target.name} not found (nor a "
                      f"PersistentVolumeClaim {target.name} in namespace {namespace})")
