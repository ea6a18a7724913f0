"""The daemon's request handling without a kernel.

A SOCK_SEQPACKET socket pair stands in for /dev/fuse (one message per reply, like the device),
and requests are fed straight to the server's dispatcher. No mount, no root: this covers what a
real kernel rarely or never sends (malformed requests, unknown opcodes, races, a reply the
kernel no longer wants) and the bookkeeping behind LOOKUP/FORGET.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from replication_agent.fuse import protocol as p
from replication_agent.fuse.daemon import FuseServer, NullHooks

ROOT = p.ROOT_ID


class ExplodingHooks(NullHooks):
    def on_write(self, path: str, offset: int, length: int) -> None:
        raise RuntimeError("replication layer down")


class FakeKernel:
    """Feeds requests to a prepared (unmounted) server and reads its replies."""

    def __init__(self, server: FuseServer) -> None:
        self.server = server
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server._fd = self.ours.fileno()
        self.unique = itertools.count(1)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()

    def send(self, opcode: int, nodeid: int = ROOT, body: bytes = b"", *, uid: int = 0,
             gid: int = 0) -> int:
        unique = next(self.unique)
        raw = bytearray(p.InHeader(p.IN_HEADER_SIZE + len(body), opcode, unique, nodeid, uid,
                                   gid, 4242).pack() + body)
        view = memoryview(raw)
        self.server._serve(p.InHeader.parse(view), view[p.IN_HEADER_SIZE:])
        return unique

    def call(self, opcode: int, nodeid: int = ROOT, body: bytes = b"", *, uid: int = 0,
             gid: int = 0) -> tuple[int, bytes]:
        """(errno, payload) of the reply; errno is positive, 0 for success."""
        unique = self.send(opcode, nodeid, body, uid=uid, gid=gid)
        message = self.theirs.recv(1 << 21)
        out = p.OutHeader.parse(message)
        assert out.unique == unique
        assert out.len == len(message)
        return -out.error, message[p.OUT_HEADER_SIZE:]

    def no_reply(self) -> bool:
        try:
            self.theirs.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False

    def lookup(self, name: str, parent: int = ROOT) -> p.EntryOut:
        error, payload = self.call(p.Opcode.LOOKUP, parent, name.encode() + b"\0")
        assert error == 0, os.strerror(error)
        return p.EntryOut.parse(payload)


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    folder = tmp_path / "backing"
    folder.mkdir()
    return folder


def _kernel(backing: Path, tmp_path: Path, **kwargs: object) -> Iterator[FakeKernel]:
    server = FuseServer(backing, tmp_path, kwargs.pop("hooks", NullHooks()),  # type: ignore[arg-type]
                        passthrough=False, **kwargs)  # type: ignore[arg-type]
    server._prepare()
    kernel = FakeKernel(server)
    try:
        yield kernel
    finally:
        kernel.close()


@pytest.fixture
def kernel(backing: Path, tmp_path: Path) -> Iterator[FakeKernel]:
    yield from _kernel(backing, tmp_path)


def test_unknown_and_unsupported_opcodes_are_enosys(kernel: FakeKernel) -> None:
    assert kernel.call(9999)[0] == errno.ENOSYS
    assert kernel.call(p.Opcode.LSEEK, ROOT, p.LseekIn(1, 0, 3).pack())[0] == errno.ENOSYS
    assert kernel.call(p.Opcode.GETLK)[0] == errno.ENOSYS
    assert kernel.call(p.Opcode.IOCTL)[0] == errno.ENOTTY


def test_malformed_requests_are_einval_and_the_loop_survives(kernel: FakeKernel,
                                                             backing: Path) -> None:
    assert kernel.call(p.Opcode.LOOKUP, ROOT, b"no-terminator")[0] == errno.EINVAL
    assert kernel.call(p.Opcode.WRITE, ROOT, b"\0" * 10)[0] == errno.EINVAL
    assert kernel.call(p.Opcode.LOOKUP, ROOT, b"a/b\0")[0] == errno.EINVAL
    assert kernel.call(p.Opcode.LOOKUP, ROOT, b"..\0")[0] == errno.EINVAL
    (backing / "still").write_text("here")
    assert kernel.lookup("still").attr.size == 4


def test_oserrors_become_errnos(kernel: FakeKernel) -> None:
    assert kernel.call(p.Opcode.LOOKUP, ROOT, b"missing\0")[0] == errno.ENOENT
    assert kernel.call(p.Opcode.GETATTR, 12345, p.GetattrIn(0, 0, 0).pack())[0] == errno.ESTALE
    assert kernel.call(p.Opcode.READ, ROOT, p.ReadIn(777, 0, 10).pack())[0] == errno.EBADF
    assert kernel.call(p.Opcode.RMDIR, ROOT, b"missing\0")[0] == errno.ENOENT


def test_interrupt_and_forget_get_no_reply(kernel: FakeKernel) -> None:
    kernel.send(p.Opcode.INTERRUPT, ROOT, p.InterruptIn(1).pack())
    kernel.send(p.Opcode.FORGET, 999, p.ForgetIn(1).pack())
    kernel.send(p.Opcode.BATCH_FORGET, 0, p.pack_batch_forget([p.ForgetOne(998, 1)]))
    assert kernel.no_reply()


def test_lookup_counts_and_forget(kernel: FakeKernel, backing: Path) -> None:
    (backing / "f").write_bytes(b"x")
    first = kernel.lookup("f")
    second = kernel.lookup("f")
    assert first.nodeid == second.nodeid != ROOT
    assert first.attr.ino == os.stat(backing / "f").st_ino
    assert kernel.server.known_nodes() == 2
    kernel.send(p.Opcode.FORGET, first.nodeid, p.ForgetIn(1).pack())
    assert kernel.server.known_nodes() == 2  # one reference left
    kernel.send(p.Opcode.BATCH_FORGET, 0, p.pack_batch_forget([p.ForgetOne(first.nodeid, 1)]))
    assert kernel.server.known_nodes() == 1
    # a forgotten node id is stale; a new lookup makes a new one
    assert kernel.call(p.Opcode.GETATTR, first.nodeid, p.GetattrIn(0, 0, 0).pack())[0] == \
        errno.ESTALE
    assert kernel.lookup("f").nodeid != first.nodeid
    kernel.send(p.Opcode.FORGET, ROOT, p.ForgetIn(100).pack())  # the root is never forgotten
    assert kernel.lookup("f").attr.size == 1


def test_a_reply_the_kernel_never_got_does_not_count(kernel: FakeKernel, backing: Path) -> None:
    (backing / "f").write_bytes(b"x")
    kernel.theirs.close()  # every reply now fails (EPIPE/ECONNREFUSED)
    kernel.send(p.Opcode.LOOKUP, ROOT, b"f\0")
    kernel.send(p.Opcode.MKDIR, ROOT, p.MkdirIn(0o755, 0).pack() + b"d\0")
    assert kernel.server.known_nodes() == 1  # both lookups rolled back
    assert (backing / "d").is_dir()  # the mkdir itself happened


def test_node_paths_follow_renames_and_links(kernel: FakeKernel, backing: Path) -> None:
    error, payload = kernel.call(p.Opcode.MKDIR, ROOT, p.MkdirIn(0o755, 0).pack() + b"a\0")
    assert error == 0
    a = p.EntryOut.parse(payload).nodeid
    error, payload = kernel.call(p.Opcode.MKNOD, a,
                                 p.MknodIn(stat.S_IFREG | 0o644, 0, 0).pack() + b"f\0")
    assert error == 0
    f = p.EntryOut.parse(payload).nodeid
    server = kernel.server
    assert server._rel(server._node(f)) == "a/f"
    assert kernel.call(p.Opcode.RENAME, ROOT, p.RenameIn(ROOT).pack() + b"a\0b\0")[0] == 0
    assert server._rel(server._node(f)) == "b/f"
    error, payload = kernel.call(p.Opcode.LINK, ROOT, p.LinkIn(f).pack() + b"hard\0")
    assert error == 0
    assert p.EntryOut.parse(payload).nodeid == f
    assert p.EntryOut.parse(payload).attr.nlink == 2
    assert server._rel(server._node(f)) == "hard"  # the newest name
    assert kernel.call(p.Opcode.UNLINK, ROOT, b"hard\0")[0] == 0
    assert server._rel(server._node(f)) == "b/f"  # falls back to the other known name
    assert kernel.call(p.Opcode.UNLINK, a, b"f\0")[0] == 0
    assert server._rel(server._node(f)) is None  # no name left
    assert server._hook_path(server._node(f)) == "b/f"  # its last one, for hooks
    # exchange swaps what the two names point at
    for name in (b"x", b"y"):
        assert kernel.call(p.Opcode.MKNOD, ROOT,
                           p.MknodIn(stat.S_IFREG | 0o644, 0, 0).pack() + name + b"\0")[0] == 0
    x, y = kernel.lookup("x").nodeid, kernel.lookup("y").nodeid
    assert kernel.call(p.Opcode.RENAME2, ROOT,
                       p.Rename2In(ROOT, p.RENAME_EXCHANGE).pack() + b"x\0y\0")[0] == 0
    assert (server._rel(server._node(x)), server._rel(server._node(y))) == ("y", "x")
    assert kernel.call(p.Opcode.RENAME2, ROOT,
                       p.Rename2In(ROOT, p.RENAME_WHITEOUT).pack() + b"x\0z\0")[0] == errno.EINVAL


def test_create_of_a_name_that_appeared_meanwhile(kernel: FakeKernel, backing: Path) -> None:
    # The kernel sends CREATE after a negative lookup; the file may exist by now.
    (backing / "raced").write_bytes(b"theirs")
    os.chmod(backing / "raced", 0o600)
    body = p.CreateIn(os.O_WRONLY, 0o644, 0).pack() + b"raced\0"
    error, payload = kernel.call(p.Opcode.CREATE, ROOT, body, uid=1000, gid=1000)
    assert error == 0
    entry = p.EntryOut.parse(payload)
    opened = p.OpenOut.parse(payload, p.EntryOut.SIZE)
    st = os.stat(backing / "raced")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # not taken over
    assert entry.attr.size == 6
    kernel.call(p.Opcode.RELEASE, entry.nodeid, p.ReleaseIn(opened.fh, 0, 0, 0).pack())
    excl = p.CreateIn(os.O_WRONLY | os.O_EXCL, 0o644, 0).pack() + b"raced\0"
    assert kernel.call(p.Opcode.CREATE, ROOT, excl)[0] == errno.EEXIST


def test_create_gives_the_caller_ownership_and_exact_mode(kernel: FakeKernel,
                                                          backing: Path) -> None:
    body = p.CreateIn(os.O_RDWR, 0o6750, 0o022).pack() + b"new\0"
    error, payload = kernel.call(p.Opcode.CREATE, ROOT, body, uid=1234, gid=5678)
    if os.geteuid() != 0:
        assert error == errno.EPERM  # chown needs root; the daemon runs as root
        return
    assert error == 0
    st = os.stat(backing / "new")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o6750)
    opened = p.OpenOut.parse(payload, p.EntryOut.SIZE)
    kernel.call(p.Opcode.RELEASE, p.EntryOut.parse(payload).nodeid,
                p.ReleaseIn(opened.fh, 0, 0, 0).pack())


def _open(kernel: FakeKernel, name: str, flags: int = os.O_RDWR) -> tuple[int, int]:
    node = kernel.lookup(name).nodeid
    error, payload = kernel.call(p.Opcode.OPEN, node, p.OpenIn(flags).pack())
    assert error == 0
    out = p.OpenOut.parse(payload)
    assert out.open_flags & p.FOPEN_PASSTHROUGH == 0  # not negotiated here
    return node, out.fh


def test_python_write_path_read_write_and_hooks(backing: Path, tmp_path: Path) -> None:
    writes: list[tuple[str, int, int]] = []

    class Recording(NullHooks):
        def on_write(self, path: str, offset: int, length: int) -> None:
            writes.append((path, offset, length))

    for kernel in _kernel(backing, tmp_path, hooks=Recording()):
        (backing / "w").write_bytes(b"")
        node, fh = _open(kernel, "w")
        error, payload = kernel.call(p.Opcode.WRITE, node, p.WriteIn(fh, 3, 5).pack() + b"hello")
        assert error == 0
        assert p.WriteOut.parse(payload).size == 5
        assert writes == [("w", 3, 5)]
        error, payload = kernel.call(p.Opcode.READ, node, p.ReadIn(fh, 0, 100).pack())
        assert (error, payload) == (0, b"\0\0\0hello")
        kernel.call(p.Opcode.RELEASE, node, p.ReleaseIn(fh, 0, 0, 0).pack())
        assert kernel.server.open_handles() == 0


def test_a_failing_on_write_hook_fails_the_write(backing: Path, tmp_path: Path) -> None:
    for kernel in _kernel(backing, tmp_path, hooks=ExplodingHooks()):
        (backing / "w").write_bytes(b"")
        node, fh = _open(kernel, "w")
        error, _ = kernel.call(p.Opcode.WRITE, node, p.WriteIn(fh, 0, 3).pack() + b"abc")
        assert error == errno.EIO
        kernel.call(p.Opcode.RELEASE, node, p.ReleaseIn(fh, 0, 0, 0).pack())


def test_xattr_requests(kernel: FakeKernel, backing: Path) -> None:
    (backing / "x").write_bytes(b"")
    node = kernel.lookup("x").nodeid
    name = b"user.k\0"
    assert kernel.call(p.Opcode.SETXATTR, node, p.SetxattrIn(3, 0).pack() + name + b"val")[0] == 0
    error, payload = kernel.call(p.Opcode.GETXATTR, node, p.GetxattrIn(0).pack() + name)
    assert (error, p.GetxattrOut.parse(payload).size) == (0, 3)  # size probe
    assert kernel.call(p.Opcode.GETXATTR, node, p.GetxattrIn(100).pack() + name) == (0, b"val")
    assert kernel.call(p.Opcode.GETXATTR, node, p.GetxattrIn(2).pack() + name)[0] == errno.ERANGE
    error, payload = kernel.call(p.Opcode.LISTXATTR, node, p.GetxattrIn(4096).pack())
    assert b"user.k\0" in payload
    assert kernel.call(p.Opcode.REMOVEXATTR, node, name)[0] == 0
    assert kernel.call(p.Opcode.GETXATTR, node, p.GetxattrIn(100).pack() + name)[0] == \
        errno.ENODATA


def test_missing_capabilities_are_remembered_until_set(kernel: FakeKernel,
                                                       backing: Path) -> None:
    (backing / "c").write_bytes(b"")
    node = kernel.lookup("c").nodeid
    caps = p.GetxattrIn(0).pack() + b"security.capability\0"
    server = kernel.server
    assert kernel.call(p.Opcode.GETXATTR, node, caps)[0] == errno.ENODATA
    assert server._node(node).no_caps
    # the reader answers from the cache without a worker (and without touching the disk)
    raw = bytearray(p.InHeader(p.IN_HEADER_SIZE + len(caps), p.Opcode.GETXATTR, 77, node, 0, 0,
                               1).pack() + caps)
    assert server._cached_no_caps(p.InHeader.parse(raw), memoryview(raw)[p.IN_HEADER_SIZE:])
    assert p.OutHeader.parse(kernel.theirs.recv(100)) == p.OutHeader(16, -errno.ENODATA, 77)
    # setting any xattr through us drops the cached answer
    kernel.call(p.Opcode.SETXATTR, node, p.SetxattrIn(1, 0).pack() + b"user.a\0" + b"1")
    assert not server._node(node).no_caps


def test_without_xattrs_every_xattr_request_is_enosys(backing: Path, tmp_path: Path) -> None:
    for kernel in _kernel(backing, tmp_path, xattrs=False):
        (backing / "x").write_bytes(b"")
        node = kernel.lookup("x").nodeid
        body = p.GetxattrIn(0).pack() + b"security.capability\0"
        assert kernel.call(p.Opcode.GETXATTR, node, body)[0] == errno.ENOSYS
        assert kernel.call(p.Opcode.LISTXATTR, node, p.GetxattrIn(0).pack())[0] == errno.ENOSYS


def _init(kernel: FakeKernel, minor: int = 45, flags2: int = 0x20) -> tuple[int, p.InitOut]:
    offered = (p.FUSE_ASYNC_READ | p.FUSE_ATOMIC_O_TRUNC | p.FUSE_BIG_WRITES | p.FUSE_MAX_PAGES
               | p.FUSE_DO_READDIRPLUS | p.FUSE_READDIRPLUS_AUTO | p.FUSE_WRITEBACK_CACHE
               | p.FUSE_INIT_EXT | p.FUSE_POSIX_LOCKS | p.FUSE_PARALLEL_DIROPS)
    error, payload = kernel.call(p.Opcode.INIT, 0, p.InitIn(7, minor, 131072, offered,
                                                            flags2).pack())
    return error, (p.InitOut.parse(payload) if not error else p.InitOut(*[0] * 12))


def test_init_negotiates_passthrough_when_asked(backing: Path, tmp_path: Path) -> None:
    server = FuseServer(backing, tmp_path, NullHooks(), passthrough=True)
    server._prepare()
    kernel = FakeKernel(server)
    try:
        error, out = _init(kernel)
        assert error == 0
        assert (out.major, out.minor, out.max_write, out.max_pages) == (7, 45, 1 << 20, 256)
        assert out.capabilities & p.FUSE_PASSTHROUGH
        assert out.max_stack_depth == 1
        assert not out.capabilities & p.FUSE_WRITEBACK_CACHE  # refused with passthrough
        assert not out.capabilities & p.FUSE_POSIX_LOCKS  # locks stay local to the kernel
        assert out.capabilities & p.FUSE_DO_READDIRPLUS
        assert server.passthrough_active
        assert server.protocol_minor == 45
    finally:
        kernel.close()


def test_init_without_passthrough(kernel: FakeKernel) -> None:
    error, out = _init(kernel)
    assert error == 0
    assert not out.capabilities & p.FUSE_PASSTHROUGH
    assert out.max_stack_depth == 0
    assert not kernel.server.passthrough_active


def test_init_on_a_kernel_without_passthrough(backing: Path, tmp_path: Path) -> None:
    server = FuseServer(backing, tmp_path, NullHooks(), passthrough=True)
    server._prepare()
    kernel = FakeKernel(server)
    try:
        error, out = _init(kernel, minor=38, flags2=0)
        assert error == 0
        assert out.minor == 38  # never above what the kernel speaks
        assert not server.passthrough_active  # falls back to the Python write path
    finally:
        kernel.close()


def test_init_refuses_an_ancient_kernel(kernel: FakeKernel) -> None:
    error, _ = _init(kernel, minor=20)
    assert error == errno.EPROTO


def test_readdir_offsets_and_alignment(kernel: FakeKernel, backing: Path) -> None:
    names = [f"n{i:03d}{'x' * (i % 9)}" for i in range(300)]
    for name in names:
        (backing / name).write_bytes(b"")
    error, payload = kernel.call(p.Opcode.OPENDIR, ROOT, p.OpenIn(os.O_RDONLY).pack())
    fh = p.OpenOut.parse(payload).fh
    seen: list[bytes] = []
    offset = 0
    while True:
        error, payload = kernel.call(p.Opcode.READDIR, ROOT, p.ReadIn(fh, offset, 4096).pack())
        assert error == 0
        assert len(payload) <= 4096
        if not payload:
            break
        entries = p.parse_dirents(payload)
        seen.extend(e.name for e in entries)
        offset = entries[-1].off
    assert sorted(seen) == sorted([b".", b"..", *(n.encode() for n in names)])
    # plus: every entry (but . and ..) counts as a lookup the kernel will forget
    error, payload = kernel.call(p.Opcode.READDIRPLUS, ROOT, p.ReadIn(fh, 0, 1 << 16).pack())
    plus = p.parse_direntplus(payload)
    with_nodes = [d for d in plus if d.entry.nodeid]
    assert {d.dirent.name for d in plus if not d.entry.nodeid} == {b".", b".."}
    assert kernel.server.known_nodes() == 1 + len(with_nodes)
    kernel.send(p.Opcode.BATCH_FORGET, 0, p.pack_batch_forget(
        [p.ForgetOne(d.entry.nodeid, 1) for d in with_nodes]))
    assert kernel.server.known_nodes() == 1
    assert kernel.call(p.Opcode.RELEASEDIR, ROOT, p.ReleaseIn(fh, 0, 0, 0).pack())[0] == 0
    assert kernel.server.open_handles() == 0
