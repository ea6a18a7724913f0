"""The local cluster's node images: scripts/build-node-images packs them, and they work.

The script packs pause, busybox and the three CSI sidecars, without a container engine, into
image tarballs (OCI layout + docker-archive). Everything here reads them back with tarfile and
json and this file's own code, not the script's; then the images' programs really run: busybox's
shell in a chroot of its unpacked layer, the pause binary taken out of its image (as an ordinary
process and as PID 1 of a PID namespace, where only handled signals count), and, when the tools
bin directory has containerd and ctr (scripts/build-tools), a throwaway containerd imports every
tarball and runs busybox and pause from them.

The binaries come from the tools bin directory (SHAREDSYNC_TOOLS_BIN, default
~/.cache/sharedsync/bin); the tests skip, naming what to build, when one is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import pytest

from tests.integration.test_image import HashingReader
from tests.leaks import force_cleanup

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-node-images"
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))
BUSYBOX = Path("/bin/busybox")
#: image name -> (tools/ wrapper module, upstream module whose pinned version is the tag)
SIDECARS = {
    "csi-provisioner": ("external-provisioner",
                        "github.com/kubernetes-csi/external-provisioner/v6"),
    "csi-resizer": ("external-resizer", "github.com/kubernetes-csi/external-resizer"),
    "csi-snapshotter": ("external-snapshotter",
                        "github.com/kubernetes-csi/external-snapshotter/v8"),
}
#: What e2e tests and deploy/ examples run in the busybox image (a subset of its applets).
BUSYBOX_APPLETS = ("sh", "dd", "sha256sum", "sync", "sleep", "cat", "ls", "mkdir", "rm", "wc",
                   "head", "tail", "date", "echo", "test", "seq", "printf", "md5sum", "stat", "df",
                   "mount", "id", "touch", "mv", "cp", "grep", "sed", "awk", "tr", "cut", "nc",
                   "wget", "true", "false", "env", "hostname")
OCI_ARCH = {"amd64": "amd64", "arm64": "arm64", "armhf": "arm", "i386": "386",
            "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
READY = "ready, stopping on SIGTERM or SIGINT"
NOT_PID_1 = "pause should be the first process"
#: Bound on any one wait for a process here (generous: the machine is shared and busy).
WAIT = 60.0

T = TypeVar("T")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, namespaces)")


def pinned(wrapper: str, module: str) -> str:
    """The module's version in tools/<wrapper>/go.mod (a require line, not a replace)."""
    for line in (REPO / "tools" / wrapper / "go.mod").read_text().splitlines():
        found = re.fullmatch(rf"\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)(\s*//.*)?", line)
        if found:
            return found.group(1)
    raise AssertionError(f"tools/{wrapper}/go.mod does not require {module}")


def expected_tags() -> dict[str, str]:
    """image name -> reference, as the cluster contract names them."""
    tags = {"pause": "localhost/pause:3.10", "busybox": "localhost/busybox:1.35"}
    tags.update({name: f"localhost/{name}:{pinned(*where)}" for name, where in SIDECARS.items()})
    return tags


def run_script(*args: str | Path, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=600,
                          check=False, env=env)


def listed(output_dir: Path) -> dict[str, Path]:
    done = run_script("--output-dir", output_dir, "--list")
    assert done.returncode == 0, done.stderr
    pairs = [line.split("\t") for line in done.stdout.splitlines()]
    assert all(len(pair) == 2 for pair in pairs), done.stdout
    return {tag: Path(path) for tag, path in pairs}


# -- reading an image tarball --------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One entry of the layer."""

    kind: bytes
    mode: int
    uid: int
    gid: int
    uname: str
    mtime: float
    link: str
    sha256: str


@dataclass
class Image:
    tarball: Path
    repo_tags: list[str]
    config: dict[str, Any]
    members: dict[str, Member] = field(default_factory=dict)
    small_files: dict[str, bytes] = field(default_factory=dict)


def read_member(archive: tarfile.TarFile, name: str | tarfile.TarInfo) -> bytes:
    member = archive.extractfile(name)
    assert member is not None, name
    return member.read()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image(tarball: Path) -> Image:
    """The image in tarball, after checking that its two views agree and every digest holds."""
    with tarfile.open(tarball) as archive:
        assert json.loads(read_member(archive, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        (entry,) = json.loads(read_member(archive, "manifest.json"))  # docker-archive view
        index = json.loads(read_member(archive, "index.json"))  # OCI view
        assert index["schemaVersion"] == 2
        (described,) = index["manifests"]
        assert described["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert described["annotations"]["io.containerd.image.name"] == entry["RepoTags"][0]
        assert (described["annotations"]["org.opencontainers.image.ref.name"]
                == entry["RepoTags"][0].rpartition(":")[2])
        manifest_blob = read_member(archive, "blobs/sha256/" + described["digest"][7:])
        assert described["digest"] == "sha256:" + sha256_hex(manifest_blob)
        assert described["size"] == len(manifest_blob)
        manifest = json.loads(manifest_blob)
        assert manifest["schemaVersion"] == 2
        config_blob = read_member(archive, entry["Config"])
        assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        assert manifest["config"]["digest"] == "sha256:" + sha256_hex(config_blob)
        assert manifest["config"]["size"] == len(config_blob)
        assert entry["Config"] == "blobs/sha256/" + sha256_hex(config_blob)
        (layer,) = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        assert entry["Layers"] == ["blobs/sha256/" + layer["digest"][7:]]
        config = json.loads(config_blob)
        image = Image(tarball, entry["RepoTags"], config)

        source = archive.extractfile(entry["Layers"][0])
        assert source is not None
        reader = HashingReader(source)
        stream = cast("IO[bytes]", reader)  # tarfile only calls read() in "r|" mode
        with tarfile.open(fileobj=stream, mode="r|") as layer_tar:
            for info in layer_tar:
                content = read_member(layer_tar, info) if info.isreg() else b""
                image.members[info.name] = Member(
                    info.type, info.mode, info.uid, info.gid, info.uname + info.gname,
                    info.mtime, info.linkname, sha256_hex(content))
                if info.isreg() and info.size < 65536:
                    image.small_files[info.name] = content
        while reader.read(1 << 20):
            pass
    assert layer["digest"] == "sha256:" + reader.digest.hexdigest()
    assert layer["size"] == reader.size
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}
    return image


def extract_layer(tarball: Path, dest: Path) -> Path:
    """The image's one layer unpacked into dest (as a runtime's snapshotter would)."""
    with tarfile.open(tarball) as archive:
        (entry,) = json.loads(read_member(archive, "manifest.json"))
        source = archive.extractfile(entry["Layers"][0])
        assert source is not None
        with tarfile.open(fileobj=source, mode="r|") as layer_tar:
            layer_tar.extractall(dest, filter="fully_trusted")  # our own tarball
    return dest


def users(image: Image) -> dict[str, list[str]]:
    """/etc/passwd of the image: uid -> fields."""
    text = image.small_files["etc/passwd"].decode()
    return {fields[2]: fields for line in text.splitlines() if len(fields := line.split(":")) == 7}


def groups(image: Image) -> dict[str, str]:
    text = image.small_files["etc/group"].decode()
    return {fields[2]: fields[0] for line in text.splitlines()
            if len(fields := line.split(":")) == 4}


# -- building ------------------------------------------------------------------------------------


def missing_inputs() -> list[str]:
    missing = [name for name in ("pause", *SIDECARS) if not (TOOLS_BIN / name).is_file()]
    return missing


@dataclass(frozen=True)
class Built:
    output_dir: Path
    tarballs: dict[str, Path]  # image name -> tarball
    stdout: str

    def image(self, name: str) -> Image:
        return read_image(self.tarballs[name])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = missing_inputs()
    if missing:
        pytest.skip(f"not in the tools bin {TOOLS_BIN}: {', '.join(missing)} "
                    f"(run scripts/build-tools {' '.join(missing)})")
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing (scripts/setup installs busybox-static)")
    output_dir = tmp_path_factory.mktemp("node-images")
    done = run_script("--output-dir", output_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    tags = expected_tags()
    by_tag = listed(output_dir)
    assert set(by_tag) == set(tags.values())
    yield Built(output_dir, {name: by_tag[tag] for name, tag in tags.items()}, done.stdout)
    shutil.rmtree(output_dir, ignore_errors=True)  # a few hundred MB


# -- the script ------------------------------------------------------------------------------------


def test_list_names_each_image_and_its_tarball_without_building(tmp_path: Path) -> None:
    by_tag = listed(tmp_path / "out")
    tags = expected_tags()
    assert list(by_tag) == list(tags.values())  # one line each, in a stable order
    for name, tag in tags.items():
        assert by_tag[tag] == tmp_path / "out" / f"{name}-{tag.rpartition(':')[2]}.tar"
    assert not (tmp_path / "out").exists(), "--list built something"


def test_a_missing_binary_is_named_with_the_command_that_builds_it(tmp_path: Path) -> None:
    done = run_script("--output-dir", tmp_path / "out", "pause",
                      env={**os.environ, "SHAREDSYNC_TOOLS_BIN": os.fspath(tmp_path / "empty")})
    assert done.returncode == 1
    assert "scripts/build-tools pause" in done.stderr
    assert not list((tmp_path / "out").glob("*.tar"))


def test_every_image_is_built_and_listed(built: Built) -> None:
    for name, tarball in built.tarballs.items():
        assert tarball.is_file(), name
        assert f"image {expected_tags()[name]}: {tarball}" in built.stdout


def test_an_unchanged_image_is_not_rebuilt_and_a_forced_one_is_the_same_bytes(
        built: Built) -> None:
    before = {name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
              for name, path in built.tarballs.items() if name in ("pause", "busybox")}
    again = run_script("--output-dir", built.output_dir, "pause", "busybox")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("up to date") == 2, again.stdout
    assert {name: built.tarballs[name].stat().st_mtime_ns for name in before} == {
        name: mtime for name, (mtime, _) in before.items()}
    forced = run_script("--output-dir", built.output_dir, "--force", "pause", "busybox")
    assert forced.returncode == 0, forced.stderr
    assert "up to date" not in forced.stdout
    assert {name: hashlib.sha256(built.tarballs[name].read_bytes()).hexdigest()
            for name in before} == {name: digest for name, (_, digest) in before.items()}


# -- the tarballs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pause", "busybox", *SIDECARS])
def test_each_tarball_is_a_consistent_image(built: Built, name: str) -> None:
    image = built.image(name)  # checks the digests, sizes and the two views on the way
    assert image.repo_tags == [expected_tags()[name]]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert image.config["architecture"] == OCI_ARCH[arch]
    assert image.config["os"] == "linux"
    assert image.config["created"] == "1970-01-01T00:00:00Z"  # reproducible
    for path, member in image.members.items():
        assert (member.uid, member.gid, member.uname) == (0, 0, ""), path
        assert member.mtime == 0, path
        assert not path.startswith(("/", "./")), path


def test_pause_image_holds_only_the_pause_binary(built: Built) -> None:
    image = built.image("pause")
    assert set(image.members) == {"pause"}
    member = image.members["pause"]
    assert (member.kind, member.mode) == (tarfile.REGTYPE, 0o755)
    assert member.sha256 == hashlib.sha256((TOOLS_BIN / "pause").read_bytes()).hexdigest()
    runtime = image.config["config"]
    assert runtime["Entrypoint"] == ["/pause"]
    assert runtime["User"] == "65535:65535"  # numeric: the image has no /etc/passwd


def test_busybox_image_has_every_applet_linked_in_bin(built: Built) -> None:
    image = built.image("busybox")
    binary = image.members["bin/busybox"]
    assert (binary.kind, binary.mode) == (tarfile.REGTYPE, 0o755)
    assert binary.sha256 == hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
    applets = set(subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()) - {"busybox"}
    assert set(BUSYBOX_APPLETS) <= applets
    links = {path.removeprefix("bin/") for path, member in image.members.items()
             if member.kind == tarfile.SYMTYPE}
    assert links == applets
    assert all(image.members[f"bin/{applet}"].link == "busybox" for applet in applets)
    assert image.members["tmp"].kind == tarfile.DIRTYPE
    assert image.members["tmp"].mode == 0o1777
    assert users(image)["0"][0] == "root"
    assert users(image)["65534"][0] == "nobody"
    assert groups(image) == {"0": "root", "65534": "nobody"}
    runtime = image.config["config"]
    assert runtime["Cmd"] == ["/bin/sh"]
    assert "Entrypoint" not in runtime
    assert runtime["User"] == ""
    assert "/bin" in dict(entry.split("=", 1) for entry in runtime["Env"])["PATH"].split(":")


@pytest.mark.parametrize("name", list(SIDECARS))
def test_sidecar_image_runs_its_binary_as_65532(built: Built, name: str) -> None:
    image = built.image(name)
    assert image.repo_tags == [f"localhost/{name}:{pinned(*SIDECARS[name])}"]
    binary = image.members[name]
    assert (binary.kind, binary.mode) == (tarfile.REGTYPE, 0o755)
    assert binary.sha256 == hashlib.sha256((TOOLS_BIN / name).read_bytes()).hexdigest()
    assert {"etc/passwd", "etc/group", "tmp"} <= set(image.members)
    assert image.members["tmp"].mode == 0o1777
    runtime = image.config["config"]
    assert runtime["Entrypoint"] == [f"/{name}"]
    assert runtime["User"] == "65532:65532"
    assert users(image)["65532"][3] == "65532"
    assert groups(image)["65532"]


# -- the programs in them --------------------------------------------------------------------------


@needs_root
def test_busybox_shell_runs_in_a_chroot_of_the_image(built: Built, tmp_path: Path) -> None:
    rootfs = extract_layer(built.tarballs["busybox"], tmp_path / "rootfs")
    runtime = built.image("busybox").config["config"]
    env = dict(entry.split("=", 1) for entry in runtime["Env"])
    done = subprocess.run(["chroot", rootfs, *runtime["Cmd"], "-c", "echo ok | sha256sum"],
                          env=env, capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hashlib.sha256(b"ok\n").hexdigest(), "-"]


@pytest.fixture
def pause_binary(built: Built, tmp_path: Path) -> Path:
    """The /pause of the pause image, taken out of the tarball."""
    return extract_layer(built.tarballs["pause"], tmp_path / "rootfs") / "pause"


def wait_ready(process: subprocess.Popen[str]) -> list[str]:
    """pause's stderr up to its ready line (printed once its signal handlers are in place)."""
    assert process.stderr is not None
    lines: list[str] = []
    while not lines or READY not in lines[-1]:
        line = process.stderr.readline()
        assert line, f"pause ended before it was ready: {lines}"
        lines.append(line)
    return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pause_exits_cleanly_on_a_stop_signal(pause_binary: Path, sig: signal.Signals) -> None:
    with subprocess.Popen([pause_binary], stderr=subprocess.PIPE, text=True) as process:
        try:
            assert NOT_PID_1 in "".join(wait_ready(process))
            process.send_signal(sig)
            assert process.wait(WAIT) == 0  # its own handler: killed by sig it would be -sig
            assert process.stderr is not None
            assert "Shutting down, got signal" in process.stderr.read()
        finally:
            process.kill()


def children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(what: str, check: Callable[[], T], within: float = WAIT) -> T:
    """check()'s first true result, polled; fails naming what never happened."""
    deadline = time.monotonic() + within
    while not (result := check()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)
    return result


@needs_root
def test_pause_as_pid_1_reaps_orphans_and_stops_on_sigterm(pause_binary: Path,
                                                            tmp_path: Path) -> None:
    """As PID 1 the kernel drops the signals pause has no handler for, and the namespace's
    orphans become its children: both must be handled, or pods stop only by SIGKILL and leave
    zombies."""
    with subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", pause_binary],
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stop_pid_1_pause(process, tmp_path)
        finally:
            process.kill()


def stop_pid_1_pause(process: subprocess.Popen[str], tmp_path: Path) -> None:
    """Orphan a process into pause's namespace, see it reaped, then stop pause."""
    assert NOT_PID_1 not in "".join(wait_ready(process)), "pause is not PID 1"
    (pause,) = children(process.pid)

    # an orphan in pause's namespace: a cat blocked opening a FIFO, whose shell has exited
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    subprocess.run(["nsenter", f"--target={pause}", "--pid", "--", "sh", "-c",
                    f"cat {fifo} >/dev/null & exit 0"], check=True, timeout=WAIT)
    (orphan,) = wait_for("the orphan becomes pause's child", lambda: children(pause))
    with open(fifo, "w"):  # cat reads EOF and exits: a zombie until pause reaps it
        pass
    wait_for("pause reaps the orphan", lambda: orphan not in children(pause))
    assert not Path(f"/proc/{orphan}").exists()

    os.kill(pause, signal.SIGTERM)
    assert process.wait(WAIT) == 0  # unshare exits with pause's status
    assert process.stderr is not None
    assert "Shutting down, got signal: terminated" in process.stderr.read()


# -- a real containerd -----------------------------------------------------------------------------


@dataclass
class Containerd:
    """A throwaway containerd (its own root, state and socket) and a ctr talking to it."""

    root: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def address(self) -> Path:
        return self.root / "containerd.sock"

    def ctr_argv(self, *args: str | Path) -> list[str | Path]:
        return [TOOLS_BIN / "ctr", "--address", self.address, "--namespace", "k8s.io", *args]

    def ctr(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.ctr_argv(*args), capture_output=True, text=True,
                              timeout=WAIT * 2, check=False, env=self.env)
        if check:
            assert done.returncode == 0, f"ctr {' '.join(map(str, args))}: {done.stderr}"
        return done


def containerd_config(root: Path) -> str:
    """No CRI (nothing here is a kubelet) and no NRI (its socket is a host-wide path), nothing
    read from /etc/containerd: only what importing and running images needs."""
    return "\n".join([
        "version = 3",
        f'root = "{root / "root"}"',
        f'state = "{root / "state"}"',
        "imports = []",
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", '
        '"io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]',
        "[grpc]",
        f'  address = "{root / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{root / "containerd.sock.ttrpc"}"',
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
        # the opt plugin would otherwise create /opt/containerd on the host
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{root / "opt"}"',
        "",
    ])


def require_tools(names: Sequence[str]) -> None:
    missing = [name for name in names if not (TOOLS_BIN / name).is_file()]
    if missing:
        pytest.skip(f"not in the tools bin {TOOLS_BIN}: {', '.join(missing)} "
                    f"(run scripts/build-tools {' '.join(missing)})")


@pytest.fixture(scope="module")
def containerd(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    require_tools(["containerd", "ctr"])
    root = tmp_path_factory.mktemp("ctrd")
    (root / "config.toml").write_text(containerd_config(root))
    # the runtime's shim and runc are found on containerd's PATH
    env = {**os.environ, "PATH": f"{TOOLS_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    with open(root / "containerd.log", "wb") as log:
        process = subprocess.Popen([TOOLS_BIN / "containerd", "--config", root / "config.toml"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Containerd(root, process, env)
    try:
        wait_for("containerd answers", lambda: process.poll() is not None
                 or daemon.ctr("version", check=False).returncode == 0)
        assert process.poll() is None, (root / "containerd.log").read_text()[-3000:]
        yield daemon
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            for line in daemon.ctr("tasks", "ls", "-q", check=False).stdout.split():
                daemon.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False)
                daemon.ctr("tasks", "delete", "--force", line, check=False)
            for line in daemon.ctr("containers", "ls", "-q", check=False).stdout.split():
                daemon.ctr("containers", "delete", line, check=False)
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        force_cleanup(root)
        shutil.rmtree(root, ignore_errors=True)


def test_containerd_imports_every_tarball(built: Built, containerd: Containerd) -> None:
    for tarball in built.tarballs.values():
        containerd.ctr("images", "import", tarball)
    listing = containerd.ctr("images", "list", "--quiet").stdout.split()
    assert set(expected_tags().values()) <= set(listing)
    # every blob is in the content store and every layer unpacked into a snapshot
    check = containerd.ctr("images", "check").stdout
    for tag in expected_tags().values():
        (line,) = [line for line in check.splitlines() if line.startswith(tag + " ")]
        assert "complete" in line, line
        assert line.split()[-1] == "true", line  # unpacked


def imported(containerd: Containerd, built: Built, name: str) -> str:
    tag = expected_tags()[name]
    if tag not in containerd.ctr("images", "list", "--quiet").stdout.split():
        containerd.ctr("images", "import", built.tarballs[name])
    return tag


def test_busybox_and_pause_run_under_containerd(built: Built, containerd: Containerd) -> None:
    """The images as the nodes' runtime runs them: runc, the image's config, PID 1."""
    require_tools(["runc", "containerd-shim-runc-v2"])
    busybox = imported(containerd, built, "busybox")
    done = containerd.ctr("run", "--rm", busybox, "nodeimg-busybox",
                          "sh", "-c", "echo ok | sha256sum; id -u; stat -c %a /tmp")
    assert done.stdout.split() == [hashlib.sha256(b"ok\n").hexdigest(), "-", "0", "1777"]

    pause = imported(containerd, built, "pause")
    with subprocess.Popen(containerd.ctr_argv("run", "--rm", pause, "nodeimg-pause"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=containerd.env) as process:
        try:
            assert NOT_PID_1 not in "".join(wait_ready(process)), "pause is not PID 1"
            containerd.ctr("tasks", "kill", "--signal", "SIGTERM", "nodeimg-pause")
            assert process.wait(WAIT) == 0  # ctr run exits with the task's status
        finally:
            process.kill()
