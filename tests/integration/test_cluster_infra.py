"""The cluster harness works: nodes talk real TCP, partitions cut, the fault proxy faults.

Proves :mod:`tests.cluster.netns` (namespaces on a bridge, link cuts, teardown without
leftovers, cleanup after a killed run) and :mod:`tests.cluster.faultproxy` (intact forwarding,
latency in order, bandwidth cap, partition/heal, reset) -- in-process on loopback and as a
process inside a node. Timing assertions are lower bounds with a wide margin only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import PYTHON, REPO_ROOT, netns
from tests.cluster.faultproxy import (
    AsyncFaultProxyClient,
    FaultProxy,
    FaultProxyError,
    start_proxy_process,
)
from tests.cluster.netns import (
    LeftoverError,
    Node,
    TestNetwork,
    cleanup_stale,
    netns_unavailable,
    read_line,
    wait_for_tcp,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
PORT = 7000
#: Bound on any single wait in these tests (never a pass/fail timing threshold).
WAIT = 20.0

#: Threaded TCP echo server: ``python -c ECHO_SERVER PORT``; prints "ready" once listening.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
def serve(conn):
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: ``python -c ECHO_CLIENT HOST PORT TIMEOUT``: sends a message, expects it back; prints
#: "ok <local address>" (exit 0) or "error <type>" (exit 1).
ECHO_CLIENT = """
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
message = b"ping " * 100
try:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(message)
        got = b""
        while len(got) < len(message):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        local = sock.getsockname()[0]
except OSError as error:
    print("error", type(error).__name__, error)
    sys.exit(1)
print("ok" if got == message else "mismatch", local)
sys.exit(0 if got == message else 2)
"""


# -- helpers -------------------------------------------------------------------------------------


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def process_gone(pid: int) -> bool:
    """Gone, or a zombie (dead; its reaper is outside our control)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], within: float = WAIT) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        alive = [pid for pid in pids if not process_gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def assert_nothing_left(net: TestNetwork, pids: list[int]) -> None:
    """Independent of the harness's own check: ip netns list, ip link, /proc."""
    assert net.suffix
    assert [n for n in netns_names() if f"-{net.suffix}-" in n] == []
    assert [link for link in link_names() if net.suffix in link] == []
    assert wait_gone(pids, 5.0) == []
    assert net.leftovers() == []


def start_echo(net: TestNetwork, node: Node, port: int = PORT) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = net.python(node, ["-c", ECHO_SERVER, str(port)],
                                               stdout=subprocess.PIPE)
    assert read_line(proc.stdout, WAIT) == "ready"
    return proc


def echo_client(net: TestNetwork, src: Node, dst: Node, *, timeout: float = 5.0
                ) -> subprocess.CompletedProcess[str]:
    return net.exec(src, [PYTHON, "-c", ECHO_CLIENT, dst.address, str(PORT), str(timeout)],
                    check=False, timeout=timeout + WAIT)


def _require_netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def net() -> Iterator[TestNetwork]:
    """A running test network; torn down (and checked for leftovers) after the test."""
    _require_netns()
    network = TestNetwork(stop_timeout=5.0)
    pids: list[int] = []
    with network:
        yield network
        pids = [p.pid for p in network.started()]
        for node in network.nodes.values():
            pids += network.processes(node)
    assert_nothing_left(network, pids)


# -- the network ---------------------------------------------------------------------------------


def test_nodes_reach_each_other_over_tcp(net: TestNetwork) -> None:
    nodes = [net.add_node(name) for name in ("a", "b", "c")]
    assert [n.address for n in nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    for node in nodes:
        addrs = json.loads(net.exec(node, ["ip", "-j", "-4", "addr", "show", "eth0"]).stdout)
        assert addrs[0]["addr_info"][0]["local"] == node.address
        route = net.exec(node, ["ip", "route", "show", "default"]).stdout
        assert "via 10.77.0.254" in route
        start_echo(net, node)
    for src in nodes:
        for dst in nodes:
            if src is dst:
                continue
            result = echo_client(net, src, dst)
            # the connection really came from the source node's address
            assert result.stdout.split() == ["ok", src.address], (src, dst, result)
    for node in nodes:  # and the test process reaches every node through the bridge
        wait_for_tcp(node.address, PORT, WAIT)
    # nothing leaves the host: any address but ours and the host's is unreachable
    for outside in ("11.0.0.1", "198.51.100.7"):  # a route lookup only: nothing is sent
        probe = net.exec(nodes[0], ["ip", "route", "get", outside], check=False)
        assert probe.returncode != 0
        assert "no route to host" in probe.stderr.lower()
    # the processes see the host filesystem and start in the repo
    out = net.exec(nodes[0], [PYTHON, "-c", "import os; print(os.getcwd())"]).stdout
    assert out.strip() == str(REPO_ROOT)


def test_exec_timeout_kills_the_process(net: TestNetwork) -> None:
    a = net.add_node("a")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        net.exec(a, ["sleep", "60"], timeout=1.0)
    assert time.monotonic() - started < 30  # did not wait for sleep to finish
    assert net.processes(a) == []


def test_link_down_partitions_and_link_up_heals(net: TestNetwork) -> None:
    a, b = net.add_node("a"), net.add_node("b")
    start_echo(net, a)
    start_echo(net, b)
    assert echo_client(net, b, a).returncode == 0
    held = socket.create_connection((a.address, PORT), timeout=WAIT)  # from the root netns
    try:
        held.sendall(b"before")
        assert held.recv(100) == b"before"

        net.link_down(a)
        assert not net.link_is_up(a)
        for src, dst in ((b, a), (a, b)):  # cut in both directions
            result = echo_client(net, src, dst, timeout=1.0)
            assert result.returncode == 1, result.stdout
            assert result.stdout.startswith("error"), result.stdout
        with pytest.raises(OSError, match=r"timed out|[Nn]o route"):  # or EHOSTUNREACH
            socket.create_connection((a.address, PORT), timeout=1.0).close()
        # an open connection is not reset, it just goes silent (a cable cut)
        held.settimeout(1.0)
        held.sendall(b"during")
        with pytest.raises(TimeoutError):
            held.recv(100)

        net.link_up(a)
        assert net.link_is_up(a)
        deadline = time.monotonic() + WAIT
        while (result := echo_client(net, b, a, timeout=1.0)).returncode != 0:
            assert time.monotonic() < deadline, result.stdout
        # TCP retransmits what was sent during the cut: it arrives after healing (the
        # retransmission timer has backed off by then, so allow for a long wait)
        held.settimeout(60)
        got = b""
        while len(got) < len(b"during"):
            chunk = held.recv(100)
            assert chunk, "connection closed"
            got += chunk
        assert got == b"during"
    finally:
        held.close()


def test_one_network_at_a_time_and_cleanup_spares_it(net: TestNetwork) -> None:
    a = net.add_node("a")
    with pytest.raises(RuntimeError, match="one TestNetwork per process"):
        TestNetwork().start()
    assert cleanup_stale() == []  # the live network is not stale
    start_echo(net, a)
    wait_for_tcp(a.address, PORT, WAIT)
    with pytest.raises(ValueError, match="node name"):
        net.add_node("Bad Name")
    with pytest.raises(ValueError, match="exists"):
        net.add_node("a")


def test_teardown_raises_on_leftovers(monkeypatch: pytest.MonkeyPatch) -> None:
    """If deleting fails, teardown reports what is left (and cleanup_stale still works)."""
    _require_netns()
    monkeypatch.setattr(netns, "_remove_run", lambda prefix, suffix, timeout: [])
    network = TestNetwork(stop_timeout=2.0)
    try:
        with pytest.raises(LeftoverError, match=r"namespace ss-[0-9a-f]{4}-a"), network:
            network.add_node("a")
    finally:
        monkeypatch.undo()
        removed = cleanup_stale()
    assert f"link {network.bridge}" in removed
    assert network.leftovers() == []


def test_teardown_leaves_nothing() -> None:
    _require_netns()
    network = TestNetwork(stop_timeout=2.0)
    with network:
        a, b = network.add_node("a"), network.add_node("b")
        assert network.bridge in link_names()
        assert {a.namespace, b.namespace} <= set(netns_names())
        stubborn = network.python(a, "import signal, sys, time\n"
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                     "print('ready', flush=True)\n"
                                     "time.sleep(600)", stdout=subprocess.PIPE)
        assert read_line(stubborn.stdout, WAIT) == "ready"
        # a grandchild in its own session: not in the process group teardown signals
        escaper = network.run(b, ["sh", "-c", "setsid sleep 600 & echo $!; wait"],
                              stdout=subprocess.PIPE)
        grandchild = int(read_line(escaper.stdout, WAIT))
        start_echo(network, b)
        pids = [p.pid for p in network.started()] + [grandchild]
        assert grandchild in network.processes(b)
        assert len(network.processes(a)) == 1
    assert_nothing_left(network, pids)
    assert stubborn.returncode == -signal.SIGKILL  # ignored SIGTERM, so it was killed
    network.teardown()  # idempotent


def test_cleanup_stale_removes_a_killed_run() -> None:
    """A run SIGKILLed mid-test leaves namespaces, links and processes; cleanup removes them."""
    _require_netns()
    script = """
import os, signal, subprocess, time
from tests.cluster.netns import TestNetwork
net = TestNetwork().start()
node = net.add_node("x")
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
orphan = net.run(node, ["sleep", "600"], die_with_parent=False, **quiet)
dies = net.run(node, ["sleep", "600"], die_with_parent=True, **quiet)
deadline = time.monotonic() + 20
for pid in (orphan.pid, dies.pid):  # until both exec'd sleep (after setpriv's prctl)
    while not open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"sleep"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
print(net.suffix, net.bridge, node.namespace, orphan.pid, dies.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    child = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    suffix, bridge, namespace, orphan_s, dies_s = child.stdout.split()
    orphan, dies = int(orphan_s), int(dies_s)
    try:
        assert namespace in netns_names()
        assert bridge in link_names()
        assert wait_gone([dies]) == []  # parent-death signal: died with its test process
        assert not process_gone(orphan)  # started without it: survives
    finally:
        removed = cleanup_stale()
    assert f"namespace {namespace}" in removed
    assert f"link {bridge}" in removed
    assert namespace not in netns_names()
    assert [link for link in link_names() if suffix in link] == []
    assert wait_gone([orphan]) == []


# -- the fault proxy, as a process in a node -------------------------------------------------------


async def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` to an echo service while reading the echo; return what came back."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), WAIT)
    try:
        async def send() -> None:
            for offset in range(0, len(payload), 256 * 1024):
                writer.write(payload[offset:offset + 256 * 1024])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.read(-1), 120)  # until the echo's EOF
        await sender
        return got
    finally:
        writer.close()
        await writer.wait_closed()


async def test_fault_proxy_process_in_a_node_forwards_8_mib_intact(net: TestNetwork) -> None:
    b, c = net.add_node("b"), net.add_node("c")
    start_echo(net, c)
    proxy = start_proxy_process(net, b, listen=(b.address, 0), target=(c.address, PORT),
                                control=(b.address, 0))
    assert proxy.listen[0] == b.address
    assert proxy.listen[1] > 0
    payload = random.randbytes(8 * MiB)
    # the echo server closes its side only when the client does; EOF travels both ways
    got = await exchange(proxy.listen, payload)
    assert len(got) == len(payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    stats = await asyncio.to_thread(proxy.client.stats)
    assert stats["up"]["bytes"] == 8 * MiB
    assert stats["down"]["bytes"] == 8 * MiB
    assert stats["connections"]["total"] == 1

    # faults over the control port of the process
    reader, writer = await asyncio.open_connection(*proxy.listen)
    try:
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), WAIT) == b"one"
        await asyncio.to_thread(proxy.client.partition)
        writer.write(b"lost")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.5)
        await asyncio.to_thread(proxy.client.heal)
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), WAIT) == b"two"
        assert await asyncio.to_thread(proxy.client.reset) == 1
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), WAIT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    proxy.process.terminate()
    assert await asyncio.to_thread(proxy.process.wait, WAIT) == 0  # clean SIGTERM exit


# -- the fault proxy, in-process on loopback -----------------------------------------------------


@dataclass
class EchoServer:
    """In-process echo server recording how its connections ended."""

    server: asyncio.Server | None = None
    accepted: int = 0
    endings: list[str] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.accepted += 1
        ending = "eof"
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()  # FIN back, like the client did
            await asyncio.wait_for(writer.wait_closed(), WAIT)
        except ConnectionResetError:
            ending = "reset"
        except asyncio.CancelledError:
            ending = "cancelled"
        finally:
            self.endings.append(ending)
            writer.transport.abort()
            self.handlers.discard(task)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    yield echo
    echo.server.close()
    for task in list(echo.handlers):
        task.cancel()
    if echo.handlers:
        await asyncio.wait(echo.handlers, timeout=WAIT)
    await asyncio.wait_for(echo.server.wait_closed(), WAIT)


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(("127.0.0.1", 0), echo.address, ("127.0.0.1", 0)) as proxy:
        yield proxy
    assert proxy.stats()["connections"]["active"] == 0


@pytest.fixture
def control(proxy: FaultProxy) -> AsyncFaultProxyClient:
    """Faults go through the control protocol, to exercise it."""
    address = proxy.control_address
    assert address is not None
    return AsyncFaultProxyClient(address)


async def eventually(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def connection(address: tuple[str, int]
                     ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), WAIT)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def test_proxy_forwards_intact_in_process(proxy: FaultProxy) -> None:
    payload = random.randbytes(8 * MiB)
    got = await exchange(proxy.listen_address, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    stats = proxy.stats()
    assert (stats["up"]["bytes"], stats["down"]["bytes"]) == (8 * MiB, 8 * MiB)
    assert stats["up"]["dropped"] == stats["down"]["dropped"] == 0


async def test_latency_delays_and_keeps_order(proxy: FaultProxy,
                                              control: AsyncFaultProxyClient) -> None:
    await control.latency(100)  # each way
    async with connection(proxy.listen_address) as (reader, writer):
        started = time.monotonic()
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
        assert time.monotonic() - started >= 0.15  # 200 ms in theory

        # many small chunks while the latency drops to 0 midway: none may overtake another
        lines = [f"{i}\n".encode() for i in range(400)]
        for i, line in enumerate(lines):
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0)
            if i == 200:
                await control.latency(0)
        got = await asyncio.wait_for(reader.readexactly(sum(map(len, lines))), WAIT)
        assert got == b"".join(lines)

        await control.latency(20, "down")
        stats = await control.stats()
        assert (stats["up"]["latency_ms"], stats["down"]["latency_ms"]) == (0, 20)
    payload = random.randbytes(2 * MiB)
    got = await exchange(proxy.listen_address, payload)
    assert got == payload


async def test_bandwidth_cap_limits_throughput(echo: EchoServer, proxy: FaultProxy,
                                               control: AsyncFaultProxyClient) -> None:
    await control.bandwidth(MiB, "up")
    payload = random.randbytes(2 * MiB)
    started = time.monotonic()
    got = await exchange(proxy.listen_address, payload)
    elapsed = time.monotonic() - started
    assert got == payload
    assert elapsed >= 1.5, elapsed  # ~2 s at 1 MiB/s; a lower bound only
    stats = await control.stats()
    assert stats["up"]["bandwidth"] == MiB
    assert stats["down"]["bandwidth"] == 0
    await control.bandwidth(0)
    assert (await control.stats())["up"]["bandwidth"] == 0


async def test_partition_drops_and_heal_resumes(echo: EchoServer, proxy: FaultProxy,
                                                control: AsyncFaultProxyClient) -> None:
    async with connection(proxy.listen_address) as (reader, writer):
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"before"
        await control.partition()
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):  # silent: no data, no EOF, no reset
            await asyncio.wait_for(reader.read(100), 0.5)
        # a new connection is accepted but does not reach the target while cut
        async with connection(proxy.listen_address) as (late_reader, late_writer):
            late_writer.write(b"dropped")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(late_reader.read(100), 0.5)
            assert echo.accepted == 1
            stats = await control.stats()
            assert stats["up"]["partitioned"]
            assert stats["down"]["partitioned"]
            lost = len(b"lost") + len(b"dropped")
            await eventually(lambda: proxy.stats()["up"]["dropped"] == lost)

            assert await control.heal() == 0
            writer.write(b"after")  # dropped data is gone, not queued
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"after"
            late_writer.write(b"late")  # connected to the target once healed
            assert await asyncio.wait_for(late_reader.readexactly(4), WAIT) == b"late"
            assert echo.accepted == 2
            # a connection that lost bytes can be reset on healing instead
            await control.partition("up")
            late_writer.write(b"gap")
            await asyncio.sleep(0.2)
            assert await control.heal(reset_damaged=True) == 2  # both lost bytes by now
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(late_reader.readexactly(1), WAIT)


async def test_partition_stall_holds_and_heal_delivers(proxy: FaultProxy,
                                                       control: AsyncFaultProxyClient) -> None:
    async with connection(proxy.listen_address) as (reader, writer):
        await control.partition("down", stall=True)
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.5)
        stats = await control.stats()
        assert stats["down"]["mode"] == "stall"
        assert not stats["up"]["partitioned"]
        await control.heal("down")
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"held"
        assert (await control.stats())["down"]["dropped"] == 0


async def test_reset_breaks_open_connections(echo: EchoServer, proxy: FaultProxy,
                                             control: AsyncFaultProxyClient) -> None:
    async with connection(proxy.listen_address) as (r1, w1), \
            connection(proxy.listen_address) as (r2, w2):
        for reader, writer in ((r1, w1), (r2, w2)):
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"hi"
        assert await control.reset() == 2
        for reader in (r1, r2):
            try:
                data = await asyncio.wait_for(reader.read(100), WAIT)
            except ConnectionResetError:
                data = b""
            assert data == b""  # RST (or at least EOF), never more data
    await eventually(lambda: len(echo.endings) == 2)  # the target side was reset too
    assert echo.endings == ["reset", "reset"]
    # the proxy itself keeps serving
    async with connection(proxy.listen_address) as (reader, writer):
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"again"
    assert proxy.stats()["connections"]["reset"] == 2


async def test_control_protocol_rejects_bad_commands(proxy: FaultProxy,
                                                     control: AsyncFaultProxyClient) -> None:
    for line in ("", "latency", "latency -5", "bandwidth fast", "partition sideways",
                 "heal up down", "reset now", "explode"):
        with pytest.raises(FaultProxyError):
            await control.command(line)
    assert proxy.command("latency 5 up") == {"ok": True}
    assert proxy.stats()["up"]["latency_ms"] == 5
    await control.clear()
    assert proxy.stats()["up"]["latency_ms"] == 0
    await control.ping()


async def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    async with FaultProxy(("127.0.0.1", 0), ("127.0.0.1", closed_port)) as proxy, \
            connection(proxy.listen_address) as (reader, _):
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        await eventually(lambda: proxy.stats()["connections"]["failed"] == 1)


async def test_proxy_stop_is_bounded_with_held_connections(echo: EchoServer) -> None:
    proxy = FaultProxy(("127.0.0.1", 0), echo.address)
    await proxy.start()
    async with connection(proxy.listen_address) as (reader, writer):
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
        proxy.partition(stall=True)
        proxy.set_latency(10_000)
        writer.write(b"y" * MiB)
        started = time.monotonic()
        await asyncio.wait_for(proxy.stop(), WAIT)
        assert time.monotonic() - started < WAIT
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert proxy.stats()["connections"]["active"] == 0
