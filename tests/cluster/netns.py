"""A private test network: "nodes" are Linux network namespaces on one bridge.

Layout (everything named after a per-run random suffix ``<sfx>``, 4 hex digits; the default
``prefix`` is ``ss``)::

    root namespace (the test process)
    +-------------------------------------------------------------------+
    |  bridge <prefix>br<sfx>   10.77.0.254/24   (alias: owner pid)     |
    |     |                 |                 |                         |
    |  <prefix>v<sfx>1   <prefix>v<sfx>2   <prefix>v<sfx>3    bridge-side|
    |     |                 |                 |               veth ends |
    +-----|-----------------|-----------------|-------------------------+
          | veth            | veth            | veth
    +-----+------+   +------+-----+    +------+-----+
    | netns      |   | netns      |    | netns      |
    | <p>-<sfx>-a|   | <p>-<sfx>-b|    | <p>-<sfx>-c|   lo up
    | eth0       |   | eth0       |    | eth0       |   eth0 10.77.0.<i>/24
    | 10.77.0.1  |   | 10.77.0.2  |    | 10.77.0.3  |   default via 10.77.0.254
    +------------+   +------------+    +------------+

* Node ``i`` (1-based, in the order added) is namespace ``<prefix>-<sfx>-<name>`` with address
  ``10.77.0.<i>``; its bridge-side veth end is ``<prefix>v<sfx><i>`` in the root namespace.
* The test process reaches every node directly through the bridge address 10.77.0.254 and
  nodes reach it there too (and at the root namespace's other IPv4 addresses, through the
  default route). Nothing from a node may leave the machine, even on a host that forwards
  (``ip_forward`` is left alone): each node also has ``unreachable 0.0.0.0/1`` and
  ``unreachable 128.0.0.0/1`` (more specific than the default route) plus a ``/32`` route
  via the bridge for each address of the root namespace, so any other destination fails
  at once with "no route to host" (EHOSTUNREACH).
* :meth:`TestNetwork.link_down` sets a node's bridge-side veth end down: its ``eth0`` loses
  carrier and nothing passes in either direction (a cut cable) until :meth:`TestNetwork.link_up`.
* Processes run with ``ip netns exec <ns> ...`` (which ``exec``s, so the Popen pid is the
  process itself). They see the host filesystem; only ``/sys`` is remounted for the
  namespace. Each one starts in a new session (its own process group) and, when started
  from the main thread, with a parent-death signal (``setpriv --pdeathsig KILL``) so that it
  dies even if the test process is SIGKILLed.

Exclusivity: the root namespace can only route 10.77.0.0/24 to one bridge, so one network
exists on the host at a time: :class:`TestNetwork` holds an exclusive ``flock`` on
``/run/lock/sharedsync-testnet.lock`` for its lifetime (parallel runs wait, bounded by
``lock_timeout``; one per process). The lock is released by the kernel when the owner dies,
so whoever holds it knows that every namespace or link of our naming scheme not its own is a
leftover of a killed run: :func:`cleanup_stale` (called on every start) removes them, killing
any process still inside those namespaces first.

Teardown (:meth:`TestNetwork.teardown`, also on context-manager exit) stops every process
started (SIGTERM to its process group, then SIGKILL), kills any stray still in a node's
namespace (found by the namespace inode in ``/proc/*/ns/net``), deletes veths, namespaces and
the bridge, and raises :class:`LeftoverError` if :meth:`TestNetwork.leftovers` finds anything
of this run still present.

Usage::

    with TestNetwork() as net:
        a, b = net.add_node("a"), net.add_node("b")
        server = net.run(a, [str(PYTHON), "-m", "some.server", "--listen", f"{a.address}:7000"],
                         stdout=subprocess.PIPE)
        print(read_line(server.stdout, timeout=10))
        net.exec(b, ["ip", "-br", "addr"])  # CompletedProcess[str]
        net.link_down(a); ...; net.link_up(a)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.cluster import PYTHON, REPO_ROOT

SUBNET = "10.77.0.0/24"
#: The bridge's address in the root namespace: the nodes' default gateway, and how the test
#: process reaches them (and they it).
GATEWAY = "10.77.0.254"
PREFIX_LEN = 24
MAX_NODES = 253
DEFAULT_PREFIX = "ss"
LOCK_PATH = Path("/run/lock/sharedsync-testnet.lock")
NETNS_DIR = Path("/run/netns")
#: Bound on one ``ip`` command.
IP_TIMEOUT = 30.0
#: Bound on waiting for another run's network to go away.
LOCK_TIMEOUT = 300.0
#: Grace between SIGTERM and SIGKILL, and bound on reaping after SIGKILL.
STOP_TIMEOUT = 10.0

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_PREFIX_RE = re.compile(r"^[a-z]{1,4}$")

PathArg = str | os.PathLike[str]


class LeftoverError(AssertionError):
    """Teardown found namespaces, links or processes of the run still present."""


@dataclass(frozen=True)
class Node:
    """One node: a network namespace with ``eth0`` at :attr:`address` on the bridge."""

    name: str
    #: The network namespace (``ip netns exec <namespace> ...``).
    namespace: str
    #: IPv4 address of the node's ``eth0`` (10.77.0.<index>).
    address: str
    #: 1-based position in the network (the last octet of the address).
    index: int
    #: The bridge-side veth end in the root namespace (set down by ``link_down``).
    veth: str

    def endpoint(self, port: int) -> str:
        """``"address:port"``."""
        return f"{self.address}:{port}"


# -- host helpers ----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True, timeout: float = IP_TIMEOUT
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout,
                            check=False, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _list_links() -> list[str]:
    out = _ip("-j", "link", "show").stdout
    return [str(link["ifname"]) for link in json.loads(out or "[]")]


def _root_addresses() -> list[str]:
    """IPv4 addresses of this (root) namespace, outside loopback and our subnet."""
    found = []
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for info in link.get("addr_info", []):
            address = str(info.get("local", ""))
            if address and not address.startswith(("127.", "10.77.0.")):
                found.append(address)
    return found


def _netns_id(namespace: str) -> tuple[int, int] | None:
    """(device, inode) identifying a named namespace, or None if it does not exist."""
    try:
        st = os.stat(NETNS_DIR / namespace)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(ident: tuple[int, int]) -> list[int]:
    """Live processes (not zombies) whose network namespace is ``ident`` (see ``_netns_id``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, or a zombie (no namespaces left)
            continue
        if (st.st_dev, st.st_ino) == ident:
            found.append(int(entry))
    return found


def _kill_all_in(ident: tuple[int, int], timeout: float) -> list[int]:
    """SIGKILL every process in a namespace until none is left; return the ones that stay."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids_in_netns(ident) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _ns_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{prefix}-([0-9a-f]{{4}})-[a-z0-9-]+$")


def _link_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{prefix}(?:br([0-9a-f]{{4}})|v([0-9a-f]{{4}})\d{{1,3}})$")


def _link_suffix(prefix: str, link: str) -> str | None:
    match = _link_pattern(prefix).match(link)
    return None if match is None else (match.group(1) or match.group(2))


def _ns_suffix(prefix: str, namespace: str) -> str | None:
    match = _ns_pattern(prefix).match(namespace)
    return None if match is None else match.group(1)


def _remove_run(prefix: str, suffix: str, timeout: float) -> list[str]:
    """Delete every namespace and link of one run (killing processes inside); return them."""
    removed = []
    links = [link for link in _list_links() if _link_suffix(prefix, link) == suffix]
    bridge = f"{prefix}br{suffix}"
    for link in links:
        if link != bridge:
            _ip("link", "del", link, check=False)  # takes the peer in the namespace with it
            removed.append(f"link {link}")
    for namespace in _list_netns():
        if _ns_suffix(prefix, namespace) != suffix:
            continue
        ident = _netns_id(namespace)
        if ident is not None:
            for pid in _kill_all_in(ident, timeout):
                removed.append(f"process {pid} in {namespace} would not die")
        _ip("netns", "del", namespace, check=False)
        removed.append(f"namespace {namespace}")
    if bridge in links:
        _ip("link", "del", bridge, check=False)
        removed.append(f"link {bridge}")
    return removed


# -- the host-wide lock ------------------------------------------------------------------------

_state_lock = threading.Lock()
_active: TestNetwork | None = None


def _acquire_host_lock(timeout: float) -> int:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() > deadline:
            holder = LOCK_PATH.read_text(errors="replace").strip()
            os.close(fd)
            raise TimeoutError(f"another test network holds {LOCK_PATH} after {timeout} s "
                               f"({holder or 'unknown owner'})")
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()}\n".encode())
    return fd


def _release_host_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # releases the flock


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, lock_timeout: float = LOCK_TIMEOUT,
                  timeout: float = STOP_TIMEOUT) -> list[str]:
    """Remove namespaces and links of our naming scheme left by earlier (killed) runs.

    Takes the host lock (so no other live network can exist) unless this process already
    holds it through an active :class:`TestNetwork`, whose own run is then spared. Processes
    still inside stale namespaces are killed. Returns what was removed.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    with _state_lock:
        active = _active
    if active is not None and active._lock_fd is not None:
        return _cleanup_locked(prefix, keep=active.suffix, timeout=timeout)
    fd = _acquire_host_lock(lock_timeout)
    try:
        return _cleanup_locked(prefix, keep=None, timeout=timeout)
    finally:
        _release_host_lock(fd)


def _cleanup_locked(prefix: str, keep: str | None, timeout: float) -> list[str]:
    suffixes = {_link_suffix(prefix, link) for link in _list_links()}
    suffixes |= {_ns_suffix(prefix, ns) for ns in _list_netns()}
    removed = []
    for suffix in sorted(s for s in suffixes if s is not None and s != keep):
        removed += _remove_run(prefix, suffix, timeout)
    return removed


# -- the network -------------------------------------------------------------------------------


class TestNetwork:
    """A bridge with nodes (network namespaces) on it; a context manager.

    ``with TestNetwork() as net:`` builds the bridge (``start``); leaving the block tears
    everything down and raises :class:`LeftoverError` if anything of the run remains.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, prefix: str = DEFAULT_PREFIX, lock_timeout: float = LOCK_TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must be 1-4 lowercase letters, not {prefix!r}")
        self.prefix = prefix
        self.lock_timeout = lock_timeout
        self.stop_timeout = stop_timeout
        #: Per-run random suffix (4 hex digits), set by :meth:`start`.
        self.suffix = ""
        #: The bridge's name in the root namespace, set by :meth:`start`.
        self.bridge = ""
        self.gateway = GATEWAY
        self.nodes: dict[str, Node] = {}
        self._lock_fd: int | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._ns_ids: dict[str, tuple[int, int]] = {}
        self._host_addresses: list[str] = []
        self._guard = threading.Lock()
        self._started = False
        self._closed = False

    # -- lifecycle

    def __enter__(self) -> TestNetwork:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    def start(self) -> TestNetwork:
        """Take the host lock, clear stale leftovers and create the bridge."""
        global _active
        if self._started:
            raise RuntimeError("a TestNetwork starts once")
        with _state_lock:
            if _active is not None:
                raise RuntimeError("only one TestNetwork per process at a time "
                                   f"(active: {_active.bridge or 'starting'})")
            _active = self
        self._started = True
        try:
            self._lock_fd = _acquire_host_lock(self.lock_timeout)
            _cleanup_locked(self.prefix, keep=None, timeout=self.stop_timeout)
            self._check_subnet_free()
            self._host_addresses = _root_addresses()
            self.suffix = self._pick_suffix()
            self.bridge = f"{self.prefix}br{self.suffix}"
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "alias", f"sharedsync-testnet pid={os.getpid()}")
            _ip("addr", "add", f"{GATEWAY}/{PREFIX_LEN}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            atexit.register(self._atexit)
        except BaseException:
            self.teardown(check=False)
            raise
        return self

    def _check_subnet_free(self) -> None:
        routes = json.loads(_ip("-j", "-4", "route", "show", "root", SUBNET).stdout or "[]")
        if routes:
            raise RuntimeError(f"{SUBNET} is already routed on this host ({routes}); "
                               "refusing to build the test network over it")

    def _pick_suffix(self) -> str:
        taken = {_link_suffix(self.prefix, link) for link in _list_links()}
        taken |= {_ns_suffix(self.prefix, ns) for ns in _list_netns()}
        for _ in range(1000):
            suffix = secrets.token_hex(2)
            if suffix not in taken:
                return suffix
        raise RuntimeError("no free network suffix")

    def _atexit(self) -> None:
        self.teardown(check=False)

    def teardown(self, *, check: bool = True) -> None:
        """Stop all processes, delete nodes and bridge; raise LeftoverError if any remain.

        Idempotent. With ``check=False`` leftovers are cleaned up as far as possible but not
        reported.
        """
        global _active
        with self._guard:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        atexit.unregister(self._atexit)
        left: list[str] = []
        try:
            self._stop_processes()
            for ident in self._ns_ids.values():
                _kill_all_in(ident, self.stop_timeout)
            if self.suffix:
                _remove_run(self.prefix, self.suffix, self.stop_timeout)
            left = self.leftovers()
            if left and self.suffix:  # one more try, so that the host is clean regardless
                _remove_run(self.prefix, self.suffix, self.stop_timeout)
        finally:
            if self._lock_fd is not None:
                _release_host_lock(self._lock_fd)
                self._lock_fd = None
            with _state_lock:
                if _active is self:
                    _active = None
        if left and check:
            raise LeftoverError("test network left behind:\n  " + "\n  ".join(left))

    def _stop_processes(self) -> None:
        with self._guard:
            procs = list(self._procs)
        # returncode None: not reaped yet, so the pid (= process group id) is still ours
        signalled = [p for p in procs if p.returncode is None]
        for proc in signalled:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in signalled:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in signalled:
            _signal_group(proc, signal.SIGKILL)  # the leader may be gone, its group not
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def leftovers(self) -> list[str]:
        """Namespaces, links and processes of this run that still exist (empty: clean)."""
        if not self.suffix:
            return []
        found = [f"namespace {ns}" for ns in _list_netns()
                 if _ns_suffix(self.prefix, ns) == self.suffix]
        found += [f"link {link}" for link in _list_links()
                  if _link_suffix(self.prefix, link) == self.suffix]
        with self._guard:
            procs = list(self._procs)
        found += [f"process {p.pid} ({_argv_text(p.args)})" for p in procs if p.poll() is None]
        for namespace, ident in self._ns_ids.items():
            found += [f"process {pid} in {namespace}" for pid in pids_in_netns(ident)]
        return found

    # -- nodes

    def add_node(self, name: str) -> Node:
        """Create node ``name`` (namespace, veth on the bridge, address, default route)."""
        self._require_running()
        if not _NAME_RE.match(name):
            raise ValueError(f"node name must match {_NAME_RE.pattern}, not {name!r}")
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        index = len(self.nodes) + 1
        if index > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes")
        namespace = f"{self.prefix}-{self.suffix}-{name}"
        veth = f"{self.prefix}v{self.suffix}{index}"
        address = f"10.77.0.{index}"
        _ip("netns", "add", namespace)
        ident = _netns_id(namespace)
        if ident is None:
            raise RuntimeError(f"namespace {namespace} did not appear")
        self._ns_ids[namespace] = ident
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", veth, "alias", f"sharedsync-testnet node {name}")
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "add", "default", "via", GATEWAY)
        for block in ("0.0.0.0/1", "128.0.0.0/1"):  # never off the host (see the docstring)
            _ip("-n", namespace, "route", "add", "unreachable", block)
        for host_address in self._host_addresses:
            _ip("-n", namespace, "route", "add", f"{host_address}/32", "via", GATEWAY)
        node = Node(name=name, namespace=namespace, address=address, index=index, veth=veth)
        self.nodes[name] = node
        return node

    def node(self, ref: Node | str) -> Node:
        """The node called ``ref`` (or ``ref`` itself, checked to belong here)."""
        name = ref if isinstance(ref, str) else ref.name
        try:
            node = self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this network") from None
        if not isinstance(ref, str) and ref != node:
            raise ValueError(f"{ref} is not a node of this network")
        return node

    def _require_running(self) -> None:
        if not self._started or self._closed or self._lock_fd is None:
            raise RuntimeError("the test network is not running")

    # -- processes

    def command(self, node: Node | str, argv: Sequence[PathArg], *,
                die_with_parent: bool = False) -> list[str]:
        """The full argv that runs ``argv`` in ``node`` (``ip netns exec <ns> ...``)."""
        full = ["ip", "netns", "exec", self.node(node).namespace]
        if die_with_parent and _SETPRIV is not None:
            full += [_SETPRIV, "--pdeathsig", "KILL", "--"]
        return full + [os.fspath(arg) for arg in argv]

    def run(self, node: Node | str, argv: Sequence[PathArg], *,
            die_with_parent: bool | None = None, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; it is stopped at teardown.

        ``popen_kwargs`` go to :class:`subprocess.Popen` (``stdout=PIPE``, ``env=...``,
        ``text=True``...); defaults: ``stdin=DEVNULL``, ``cwd=REPO_ROOT``. The process always
        gets its own session (``start_new_session=True``) so that teardown can kill its whole
        process group. ``die_with_parent`` (default: only when called from the main thread)
        makes the kernel SIGKILL it when the thread that started it exits -- with the test
        process, normally; from another thread it would be that thread's exit, hence the
        default. (It takes effect once ``setpriv`` has run, a few ms after this returns; a
        process missed by it is still killed by teardown or :func:`cleanup_stale`.)
        """
        self._require_running()
        for key in ("preexec_fn", "process_group"):
            if popen_kwargs.get(key) is not None:
                raise ValueError(f"{key} is not supported (the process needs its own session)")
        if popen_kwargs.get("start_new_session") is False:
            raise ValueError("processes in a node always start a new session")
        if die_with_parent is None:
            die_with_parent = threading.current_thread() is threading.main_thread()
        popen_kwargs["start_new_session"] = True
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("cwd", REPO_ROOT)
        full = self.command(node, argv, die_with_parent=die_with_parent)
        with self._guard:
            if self._closed:
                raise RuntimeError("the test network is torn down")
            proc: subprocess.Popen[Any] = subprocess.Popen(full, **popen_kwargs)
            self._procs.append(proc)
        return proc

    def python(self, node: Node | str, code_or_args: Sequence[PathArg] | str,
               **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """:meth:`run` the venv Python: a ``str`` is ``-c`` code, a sequence its arguments."""
        args: list[PathArg] = (["-c", code_or_args] if isinstance(code_or_args, str)
                               else list(code_or_args))
        return self.run(node, [PYTHON, *args], **popen_kwargs)

    def exec(self, node: Node | str, argv: Sequence[PathArg], *, timeout: float = 60.0,
             check: bool = True, input: str | None = None, cwd: PathArg | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``node`` to completion (bounded by ``timeout``), capturing text.

        On timeout the process group is killed and :class:`subprocess.TimeoutExpired` raised;
        with ``check`` a non-zero exit raises :class:`subprocess.CalledProcessError` (stderr
        attached).
        """
        self._require_running()
        full = self.command(node, argv)
        with self._guard:
            proc = subprocess.Popen(
                full, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True, cwd=cwd if cwd is not None else REPO_ROOT, env=env)
            self._procs.append(proc)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            out, err = proc.communicate(timeout=self.stop_timeout)
            raise subprocess.TimeoutExpired(full, timeout, out, err) from None
        finally:
            if proc.returncode is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout)
        with self._guard:
            self._procs.remove(proc)
        result = subprocess.CompletedProcess(full, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, full, out, err)
        return result

    async def aexec(self, node: Node | str, argv: Sequence[PathArg], *,
                    timeout: float = 60.0,  # noqa: ASYNC109 (bounds the process, as in exec)
                    check: bool = True, input: str | None = None
                    ) -> subprocess.CompletedProcess[str]:
        """:meth:`exec` without blocking the event loop (runs it in a worker thread)."""
        return await asyncio.to_thread(self.exec, node, argv, timeout=timeout, check=check,
                                       input=input)

    def started(self) -> list[subprocess.Popen[Any]]:
        """Every process :meth:`run` started (and :meth:`exec` calls still running)."""
        with self._guard:
            return list(self._procs)

    def processes(self, node: Node | str) -> list[int]:
        """Pids of every live process inside ``node``'s namespace."""
        return pids_in_netns(self._ns_ids[self.node(node).namespace])

    # -- links

    def link_down(self, node: Node | str) -> None:
        """Cut ``node`` off: set its bridge-side veth end down (a real partition)."""
        self._require_running()
        _ip("link", "set", self.node(node).veth, "down")

    def link_up(self, node: Node | str) -> None:
        """Reconnect ``node`` to the bridge."""
        self._require_running()
        _ip("link", "set", self.node(node).veth, "up")

    def link_is_up(self, node: Node | str) -> bool:
        out = _ip("-j", "link", "show", self.node(node).veth).stdout
        return "UP" in json.loads(out)[0].get("flags", [])


_SETPRIV = shutil.which("setpriv")


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _argv_text(args: Any) -> str:
    if isinstance(args, (list, tuple)):
        return " ".join(os.fspath(a) for a in args)[:200]
    return str(args)[:200]


# -- small helpers for tests ---------------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why a :class:`TestNetwork` cannot be built here (None when it can): for pytest.skip."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    if not PYTHON.exists():
        return f"{PYTHON} not found (create the venv)"
    return None


def read_line(stream: IO[bytes] | IO[str] | None, timeout: float) -> str:
    """Read one line from a process pipe within ``timeout`` s (without the newline).

    Reads the file descriptor byte by byte, past Python's buffering, so use it on a pipe
    that is not also read through the file object. Raises TimeoutError, or EOFError if the
    pipe closes first.
    """
    if stream is None:
        raise ValueError("the process has no such pipe (pass stdout=subprocess.PIPE)")
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout} s (got {bytes(data)!r})")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError(f"pipe closed before a line ended (got {bytes(data)!r})")
        if byte == b"\n":
            return data.decode(errors="replace")
        data += byte


def wait_for_tcp(host: str, port: int, timeout: float, *, attempt_timeout: float = 1.0
                 ) -> None:
    """Wait until ``host:port`` accepts a TCP connection (from this process's namespace)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=attempt_timeout):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting after {timeout} s: "
                                   f"{error}") from error
            time.sleep(0.05)


__all__ = [
    "GATEWAY", "SUBNET", "LeftoverError", "Node", "TestNetwork", "cleanup_stale",
    "netns_unavailable", "pids_in_netns", "read_line", "wait_for_tcp",
]
