"""Image tarballs without a container engine, shared by scripts/build-image and build-node-images.

A root filesystem directory is packed as one uncompressed layer, with an image config, into one
tarball that is at once an OCI image layout and a docker-archive (as `docker save` writes them
since Docker 25), so `ctr -n k8s.io images import`, `docker load` and `podman load` all take it.
One packer for every image means one set of layout rules to get right (and to test). The few
helpers both scripts' builds need (input digests for their stamps, the build lock) live here too.

scripts/ is not a package: the scripts put their own directory on sys.path to import this.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

#: Debian architecture -> OCI architecture.
OCI_ARCH = {"amd64": "amd64", "arm64": "arm64", "armhf": "arm", "i386": "386",
            "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class BuildError(Exception):
    """A step failed; the message says which and why."""


@dataclass
class ImageConfig:
    """What the image config says about running the image (the OCI config's `config`)."""

    labels: dict[str, str]
    env: dict[str, str]
    user: str
    cmd: list[str]
    entrypoint: list[str] | None
    workdir: str


class _DigestingWriter:
    """A write-only file that counts and hashes what passes through it."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.sink.write(data)


def _rootfs_entries(root: Path, rel: str = "") -> Iterator[str]:
    """Every path under root, parents first, in name order; nothing inside /dev, /proc, /sys.

    The runtime mounts those; device nodes that mmdebstrap made for its chroot are not image
    content.
    """
    with os.scandir(root / rel if rel else root) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        yield path
        if entry.is_dir(follow_symlinks=False) and path not in ("dev", "proc", "sys"):
            yield from _rootfs_entries(root, path)


def write_layer(rootfs: Path, dest: Path, *, mtime: int | None = None,
                owner: tuple[int, int] | None = None) -> tuple[str, int]:
    """Pack rootfs as one uncompressed layer; returns its sha256 and size.

    Uncompressed, the layer's digest is also its diff_id, and importing it costs no
    decompression; nothing here crosses a network. Entries keep the files' mtimes and owners
    unless mtime or owner (uid, gid) say otherwise: fixed ones make the same files the same
    layer byte for byte, whoever staged them and when.
    """
    with open(dest, "wb") as sink:
        writer = _DigestingWriter(sink)
        stream = cast("IO[bytes]", writer)  # tarfile only calls write() in "w|" mode
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in _rootfs_entries(rootfs):
                if stat.S_ISSOCK((rootfs / rel).lstat().st_mode):  # a tar cannot hold one
                    continue
                info = tar.gettarinfo(os.fspath(rootfs / rel), arcname=rel)
                info.uname = info.gname = ""  # numeric ids only: the host's names mean nothing
                info.mtime = int(info.mtime) if mtime is None else mtime  # no pax header per file
                if owner is not None:
                    info.uid, info.gid = owner
                if info.isreg():
                    with open(rootfs / rel, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return writer.digest.hexdigest(), writer.size


def json_blob(document: object) -> bytes:
    """The one JSON encoding of every blob (sorted keys, no spaces): same document, same digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def pack_image(rootfs: Path, config: ImageConfig, tag: str, output: Path, *,
               architecture: str, created_by: str, layer_file: Path | None = None,
               epoch: int | None = None, owner: tuple[int, int] | None = None) -> None:
    """Write rootfs + config as an image tarball: an OCI layout that is also a docker-archive.

    created_by is the history entry's account of how the rootfs was made. The layer is staged
    in layer_file (default: beside output). With epoch (seconds since 1970) the config's
    creation time and every mtime in both tarballs are that instant, and with owner every layer
    entry belongs to that uid/gid: the tarball is then reproducible. Without them the image is
    dated now and the files keep their mtimes and owners.
    """
    layer_file = layer_file or output.with_name(output.name + ".layer")
    layer_hex, layer_size = write_layer(rootfs, layer_file, mtime=epoch, owner=owner)
    layer = f"sha256:{layer_hex}"
    when = (datetime.datetime.now(datetime.UTC) if epoch is None
            else datetime.datetime.fromtimestamp(epoch, datetime.UTC))
    created = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    runtime: dict[str, object] = {
        "User": config.user,
        "Env": [f"{key}={value}" for key, value in config.env.items()],
        "Cmd": config.cmd,
        "Labels": config.labels,
    }
    if config.entrypoint is not None:
        runtime["Entrypoint"] = config.entrypoint
    if config.workdir:
        runtime["WorkingDir"] = config.workdir
    config_blob = json_blob({
        "created": created, "architecture": architecture, "os": "linux", "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer]},
        "history": [{"created": created, "created_by": created_by}],
    })
    config_hex = hashlib.sha256(config_blob).hexdigest()
    manifest_blob = json_blob({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{config_hex}", "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer, "size": layer_size}],
    })
    manifest_hex = hashlib.sha256(manifest_blob).hexdigest()
    index_blob = json_blob({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{manifest_hex}", "size": len(manifest_blob),
            "annotations": {"io.containerd.image.name": tag,
                            "org.opencontainers.image.ref.name": tag.rpartition(":")[2]},
        }],
    })
    docker_manifest = json_blob([{"Config": f"blobs/sha256/{config_hex}", "RepoTags": [tag],
                                  "Layers": [f"blobs/sha256/{layer_hex}"]}])

    partial = output.with_name(output.name + ".partial")
    # the time of writing (as build-image always had it), or the fixed instant
    mtime = int(datetime.datetime.now(datetime.UTC).timestamp()) if epoch is None else epoch
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        files = [("oci-layout", json_blob({"imageLayoutVersion": "1.0.0"})),
                 ("index.json", index_blob), ("manifest.json", docker_manifest),
                 (f"blobs/sha256/{config_hex}", config_blob),
                 (f"blobs/sha256/{manifest_hex}", manifest_blob)]
        for name, blob in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, mtime
            tar.addfile(info, io.BytesIO(blob))
        info = tarfile.TarInfo(f"blobs/sha256/{layer_hex}")
        info.size, info.mode, info.mtime = layer_size, 0o644, mtime
        with open(layer_file, "rb") as f:
            tar.addfile(info, f)
    layer_file.unlink()
    os.replace(partial, output)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_build(lock_path: Path, who: str) -> Iterator[None]:
    """One build at a time per lock file (builds share build/image and two CPU cores); who
    names the script in the message of one that waits."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"==> waiting for another {who} to finish", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def debian_to_oci_arch() -> str:
    """This machine's architecture as OCI names it (the images hold this machine's binaries)."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if arch not in OCI_ARCH:
        raise BuildError(f"no OCI name known for the Debian architecture {arch}")
    return OCI_ARCH[arch]
