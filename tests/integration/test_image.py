"""The one container image: the Dockerfile and scripts/build-image build the same thing.

There is no container engine here, so the image is built the engine-less way:
``scripts/build-image --engine rootfs`` (mmdebstrap, a venv filled in a chroot, one layer packed
with an image config). The build is cached by its inputs: only the first run after a change to
the source, the Dockerfile or the package list pays for it (on the development machine about a
minute, two and a half when the package list changed and mmdebstrap runs again). Nothing is
mocked: the image's commands run in its real root filesystem as its real user, and the tarball
is read back with tarfile and json by this file's own code, not the script's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import pytest

from csi_driver.backend import REQUIRED_TOOLS
from sharedsync import __version__
from sharedsync.storage import ext4

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGE = REPO / "scripts" / "build-image"
DOCKERFILE = REPO / "Dockerfile"
PACKAGES_FILE = REPO / "packaging" / "runtime-packages.txt"
IMAGE_DIR = REPO / "build" / "image"
TAG = f"localhost/sharedsync:{__version__}"
#: scripts/build-image's exit code when mmdebstrap is missing and cannot be installed.
EXIT_NO_MMDEBSTRAP = 3
#: What the rootfs installs besides the package list: the stand-in for the Python base image.
ROOTFS_BASE_PACKAGES = {"python3", "python3-venv"}
APT_TOOLS = {"apt-get", "apt", "aptitude", "dpkg"}
BUILD_TIMEOUT = 1700

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the image build needs root (mmdebstrap, chroot)"),
    pytest.mark.timeout(BUILD_TIMEOUT + 100),
]


# -- reading the two recipes (this file's own parsers, independent of the script's) -------------


def package_list(path: Path = PACKAGES_FILE) -> list[str]:
    return [word for line in path.read_text().splitlines() for word in line.split("#")[0].split()]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ; and |), as words."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", script) if part.strip()]


def program(words: Sequence[str]) -> list[str]:
    """The command that really runs: without leading VAR=value words and an xargs in front."""
    rest = list(words)
    while rest and re.fullmatch(r"\w+=.*", rest[0]):
        rest.pop(0)
    if rest and rest[0] == "xargs":
        rest.pop(0)
        while rest and rest[0].startswith("-"):
            rest.pop(0)
    return rest


def installs_packages(words: Sequence[str]) -> bool:
    return bool(words) and words[0] in APT_TOOLS and any(
        word in ("install", "-i", "--install") for word in words[1:])


def dry_run(script: Path = BUILD_IMAGE) -> list[list[str]]:
    """The commands a full rootfs build runs, from the script's own --dry-run."""
    done = subprocess.run([script, "--engine", "rootfs", "--dry-run"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def mmdebstrap_includes(plan: list[list[str]]) -> list[str]:
    runs = [argv for argv in plan if argv[0] == "mmdebstrap"]
    assert len(runs) == 1, plan
    includes = [arg.removeprefix("--include=") for arg in runs[0] if arg.startswith("--include=")]
    assert len(includes) == 1, runs[0]
    assert "--variant=minbase" in runs[0]  # nothing more than Debian's required set besides
    return includes[0].split(",")


# -- (a) one package list, and nothing else installs Debian packages ------------------------------


def test_the_dockerfile_installs_exactly_the_package_list() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    installs = []
    for number, stage in enumerate(stages):
        for instruction, args in stage:
            if instruction != "RUN":
                continue
            commands = [program(words) for words in shell_commands(args)]
            for position, words in enumerate(commands):
                if installs_packages(words):
                    installs.append((number, words, commands[position - 1] if position else []))
    assert len(installs) == 1, f"exactly one apt-get install, found {installs}"
    number, words, feeder = installs[0]
    assert number == len(stages) - 1, "only the runtime stage installs Debian packages"
    assert words[:2] == ["apt-get", "install"]
    assert all(word.startswith("-") for word in words[2:]), f"packages named inline: {words}"
    # the package names come, through xargs, from the list file the stage copied in
    copied = [shlex.split(args) for instruction, args in stages[-1] if instruction == "COPY"]
    assert ["packaging/runtime-packages.txt", "/tmp/runtime-packages.txt"] in copied
    assert "/tmp/runtime-packages.txt" in feeder, feeder


def test_build_image_installs_exactly_the_package_list() -> None:
    plan = dry_run()
    includes = mmdebstrap_includes(plan)
    assert len(includes) == len(set(includes))
    assert set(includes) == ROOTFS_BASE_PACKAGES | set(package_list())
    for argv in plan:
        words = program(argv[2:] if argv[0] == "chroot" else argv)
        if argv[0] == "chroot":
            assert words[0] not in APT_TOOLS, f"a package installed inside the rootfs: {argv}"
        elif installs_packages(words):  # the host's own tool, never the image's packages
            assert [w for w in words[2:] if not w.startswith("-")] == ["mmdebstrap"], argv


def test_build_image_reads_the_list_file_itself(tmp_path: Path) -> None:
    """A copy of the script in a tree whose list names one more package plans to install it."""
    for rel in ("scripts/build-image", "scripts/oci_image.py", "Dockerfile",
                "sharedsync/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    (tmp_path / "packaging").mkdir()
    (tmp_path / "packaging" / "runtime-packages.txt").write_text(
        PACKAGES_FILE.read_text() + "\nsharedsync-canary  # only in this copy\n")
    includes = mmdebstrap_includes(dry_run(tmp_path / "scripts" / "build-image"))
    assert set(includes) == ROOTFS_BASE_PACKAGES | set(package_list()) | {"sharedsync-canary"}


def test_both_recipes_create_the_same_user() -> None:
    runtime_commands = [program(words) for instruction, args in dockerfile_stages()[-1]
                        if instruction == "RUN" for words in shell_commands(args)]
    in_dockerfile = [words for words in runtime_commands if words[0] in ("groupadd", "useradd")]
    in_script = [argv[2:] for argv in dry_run()
                 if argv[0] == "chroot" and argv[2] in ("groupadd", "useradd")]
    assert in_dockerfile == in_script
    assert len(in_script) == 2


def test_the_dockerfile_version_default_is_the_package_version() -> None:
    """A plain `docker build .` (no --build-arg) labels the image with the right version."""
    args = [args for instruction, args in dockerfile_stages()[-1] if instruction == "ARG"]
    assert f"VERSION={__version__}" in args


# -- building it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    tarball: Path
    rootfs: Path


@pytest.fixture(scope="module")
def built() -> Built:
    done = subprocess.run([BUILD_IMAGE, "--engine", "rootfs"], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False)
    if done.returncode == EXIT_NO_MMDEBSTRAP:
        pytest.skip(f"mmdebstrap cannot be installed or run here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    tarball = IMAGE_DIR / f"sharedsync-{__version__}.tar"
    assert f"image {TAG}: {tarball}" in done.stdout, done.stdout
    return Built(tarball=tarball, rootfs=IMAGE_DIR / "rootfs")


def read_member(archive: tarfile.TarFile, name: str | tarfile.TarInfo) -> bytes:
    member = archive.extractfile(name)
    assert member is not None, name
    return member.read()


def image_config(built: Built) -> dict[str, Any]:
    with tarfile.open(built.tarball) as archive:
        (entry,) = json.loads(read_member(archive, "manifest.json"))
        config: dict[str, Any] = json.loads(read_member(archive, entry["Config"]))
    return config


# -- (b) the image's commands run in its rootfs, as its user ---------------------------------------


def run_in_image(built: Built, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run argv in the rootfs as a container runtime would: the config's user and Env, and HOME
    from the image's /etc/passwd (runtimes set it from there)."""
    runtime = image_config(built)["config"]
    uid = runtime["User"].partition(":")[0]
    homes = {fields[2]: fields[5] for line in (built.rootfs / "etc/passwd").read_text().splitlines()
             if len(fields := line.split(":")) == 7}
    env = dict(entry.split("=", 1) for entry in runtime["Env"])
    env["HOME"] = homes.get(uid, "/")
    return subprocess.run(["chroot", f"--userspec={runtime['User']}", built.rootfs, *argv],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


COMMANDS = [
    (["sharedsync-csi", "--help"], "usage: sharedsync-csi"),
    (["sharedsync-agent", "--help"], "usage: sharedsync-agent"),
    (["sharedsync-operator", "--help"], "usage: sharedsync-operator"),
    (["sharedsync", "--help"], "usage: sharedsync"),
    # the venv's python, and the standard library's operator module (ours is sharedsync_operator)
    (["python", "-c", "import sys, kopf, operator; "
      "print(sys.prefix, 'site-packages' in operator.__file__)"], "/opt/sharedsync False"),
    (["btrfs", "--version"], "btrfs-progs"),
    (["mkfs.btrfs", "-V"], "btrfs-progs"),
    (["fusermount3", "-V"], "fusermount3 version"),
    (["losetup", "--version"], "util-linux"),
    (["blockdev", "--version"], "util-linux"),
]


@pytest.mark.parametrize(("argv", "expected"), COMMANDS, ids=[argv[0] for argv, _ in COMMANDS])
def test_commands_run_in_the_image(built: Built, argv: list[str], expected: str) -> None:
    done = run_in_image(built, argv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout + done.stderr


def test_runs_as_the_unprivileged_user_sharedsync(built: Built) -> None:
    done = run_in_image(built, ["sh", "-c", 'echo "$(id -u):$(id -g) $(id -un):$(id -gn) $HOME"'])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["65532:65532", "sharedsync:sharedsync", "/home/sharedsync"]


def test_every_tool_the_node_plugin_requires_is_on_path(built: Built) -> None:
    done = run_in_image(built, ["sh", "-c", 'for t; do command -v "$t" || exit 1; done', "sh",
                                *REQUIRED_TOOLS, *ext4.TOOLS])
    assert done.returncode == 0, f"missing from the image: {done.stdout}{done.stderr}"


def test_no_build_tools_in_the_image(built: Built) -> None:
    done = run_in_image(built, ["sh", "-c", "command -v gcc cc make git"])
    assert done.stdout == ""


# -- (c) the tarball is an image: OCI layout and docker-archive, one layer -------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HashingReader:
    """Hashes what a reader reads, so the layer is checked and listed in one pass."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def dockerfile_runtime_settings() -> tuple[dict[str, str], str, list[str]]:
    """The runtime stage's LABELs (with VERSION filled in), USER and CMD."""
    labels: dict[str, str] = {}
    user, cmd = "", []
    for instruction, args in dockerfile_stages()[-1]:
        if instruction == "LABEL":
            for word in shlex.split(args.replace("${VERSION}", __version__)):
                key, _, value = word.partition("=")
                labels[key] = value
        elif instruction == "USER":
            user = args
        elif instruction == "CMD":
            cmd = json.loads(args)
    return labels, user, cmd


def test_the_tarball_is_a_valid_image(built: Built) -> None:
    with tarfile.open(built.tarball) as archive:
        assert json.loads(read_member(archive, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}

        # docker-archive view
        (entry,) = json.loads(read_member(archive, "manifest.json"))
        assert entry["RepoTags"] == [TAG]
        assert len(entry["Layers"]) == 1

        # OCI view: index -> manifest -> config and layer, every digest checked
        index = json.loads(read_member(archive, "index.json"))
        (described,) = index["manifests"]
        assert described["annotations"]["io.containerd.image.name"] == TAG
        manifest_blob = read_member(archive, "blobs/sha256/" + described["digest"].split(":")[1])
        assert described["digest"] == "sha256:" + sha256_hex(manifest_blob)
        assert described["size"] == len(manifest_blob)
        manifest = json.loads(manifest_blob)
        config_blob = read_member(archive, entry["Config"])
        assert manifest["config"]["digest"] == "sha256:" + sha256_hex(config_blob)
        assert entry["Config"] == "blobs/sha256/" + sha256_hex(config_blob)
        (layer,) = manifest["layers"]
        assert entry["Layers"] == ["blobs/sha256/" + layer["digest"].split(":")[1]]

        source = archive.extractfile(entry["Layers"][0])
        assert source is not None
        reader = HashingReader(source)
        names: set[str] = set()
        passwd = b""
        stream = cast("IO[bytes]", reader)  # tarfile only calls read() in "r|" mode
        with tarfile.open(fileobj=stream, mode="r|") as layer_tar:
            for member in layer_tar:
                names.add(member.name)
                assert (member.uname, member.gname) == ("", ""), member.name
                if member.name == "etc/passwd":
                    passwd = read_member(layer_tar, member)
        while reader.read(1 << 20):
            pass
    assert layer["digest"] == "sha256:" + reader.digest.hexdigest()
    assert layer["size"] == reader.size

    config = json.loads(config_blob)
    assert config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}
    runtime = config["config"]
    labels, user, cmd = dockerfile_runtime_settings()
    assert runtime["Labels"] == labels
    assert runtime["Labels"]["org.opencontainers.image.version"] == __version__
    for key in ("title", "description", "source", "licenses"):
        assert runtime["Labels"][f"org.opencontainers.image.{key}"]
    assert runtime["User"] == user == "65532:65532"
    assert runtime["Cmd"] == cmd == ["sharedsync-operator", "--help"]
    env = dict(entry.split("=", 1) for entry in runtime["Env"])
    assert env["PATH"].startswith("/opt/sharedsync/bin:")

    assert {"opt/sharedsync/bin/sharedsync-operator", "usr/sbin/mkfs.btrfs", "sbin", "dev"} <= names
    assert not [name for name in names if name.startswith("dev/")], "device nodes packed"
    assert b"\nsharedsync:x:65532:65532:" in b"\n" + passwd
