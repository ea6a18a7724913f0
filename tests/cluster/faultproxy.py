"""A TCP fault-injection proxy (asyncio), in-process or as a process in a node.

Every connection accepted on ``listen`` is forwarded to ``target``. Faults apply per
direction -- ``up`` is client -> target, ``down`` is target -> client, ``both`` is the two:

``latency MS``
    every chunk is delivered MS milliseconds after it was read (order is preserved: a chunk
    never overtakes the one before it, even when the latency is lowered).
``bandwidth BYTES_PER_S``
    a token bucket per direction, shared by all connections like one link (0: unlimited).
``partition``
    a cable cut: nothing is forwarded, connections stay open and silent. Data read meanwhile
    (and data queued in the proxy) is *dropped*, not queued: after ``heal`` the stream
    continues with a gap (``heal reset-damaged`` instead resets connections that lost
    bytes, since real TCP never delivers a stream with a hole). A FIN is held until healing.
    New connections are accepted but not connected to the target until healed.
    ``partition stall`` is the variant that stops reading instead of dropping: senders block
    once socket buffers fill, and after ``heal`` everything arrives intact.
``heal``
    end the partition.
``reset``
    close every current connection, both sides, with RST (``SO_LINGER`` 0).

Bounded: at most ``queue_chunks`` chunks of up to 64 KiB are queued per direction and
connection (the reader waits when the queue is full, and the writer waits on ``drain``), and
every loop ends when the proxy stops.

Control protocol (``control`` address): one command per line, one JSON reply per line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``::

    latency MS [up|down|both]
    bandwidth BYTES_PER_S [up|down|both]      (0 or "off": unlimited)
    partition [up|down|both] [drop|stall]
    heal [up|down|both] [reset-damaged]        -> {"reset": N}
    reset                                      -> {"reset": N}
    clear                                      (heal and remove every fault)
    stats                                      -> {"stats": {...}}
    ping

``stats`` holds, per direction, the settings and ``bytes`` (forwarded) and ``dropped``, and
``connections``: ``active``, ``total`` (accepted), ``failed`` (target unreachable) and
``reset``.

Run as a process (prints one JSON line, ``{"ready": true, "listen": "H:P", ...}`` with the
bound ports, then serves until SIGTERM/SIGINT)::

    python -m tests.cluster.faultproxy --listen 10.77.0.2:7000 --target 10.77.0.3:7000 \\
        --control 10.77.0.2:7001

or in a node with :func:`start_proxy_process`; in-process: ``async with FaultProxy(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tests.cluster.netns import Node, TestNetwork

Address = tuple[str, int]
DirectionName = Literal["up", "down", "both"]

CHUNK = 64 * 1024
#: Chunks queued per direction and connection at most (so at most 2 MiB).
QUEUE_CHUNKS = 32
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
CONTROL_TIMEOUT = 10.0
CONTROL_LINE_LIMIT = 4096
_DIRECTIONS = ("up", "down", "both")


def parse_address(value: str | Address) -> Address:
    """``"host:port"`` (or ``"[v6]:port"``) or a tuple -> ``(host, port)``."""
    if isinstance(value, tuple):
        return str(value[0]), int(value[1])
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FaultProxyError(RuntimeError):
    """The proxy refused a control command."""


# -- the proxy ------------------------------------------------------------------------------------


class _TokenBucket:
    """Bytes/s limit shared by every connection in one direction; tokens may go into debt."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        self.rate = max(0.0, float(rate))
        self._burst = max(self.rate * 0.05, 4096.0) if self.rate > 0 else 0.0
        self._tokens = self._burst
        self._stamp = time.monotonic()

    async def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # first come, first served across connections
            rate = self.rate
            if rate <= 0:
                return
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / rate)


class _Direction:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latency = 0.0  # seconds
        self.bucket = _TokenBucket()
        self.partitioned = False
        self.stall = False
        self.healed = asyncio.Event()
        self.healed.set()
        self.forwarded = 0
        self.dropped = 0

    def set_partition(self, on: bool, stall: bool = False) -> None:
        self.partitioned = on
        self.stall = stall if on else False
        if on:
            self.healed.clear()
        else:
            self.healed.set()

    def is_cut(self) -> bool:
        return self.partitioned

    def stats(self) -> dict[str, Any]:
        return {"latency_ms": self.latency * 1000.0, "bandwidth": self.bucket.rate,
                "partitioned": self.partitioned, "mode": "stall" if self.stall else "drop",
                "bytes": self.forwarded, "dropped": self.dropped}


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST: SO_LINGER 0, then drop the transport without flushing."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


_Item = tuple[bytes, float] | None  # (chunk, due time) or None for EOF


class _Connection:
    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.damaged = False  # lost bytes in a partition
        self.task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._tasks.add(asyncio.ensure_future(coro))

    async def run(self) -> None:
        up = self.proxy.up
        queue: asyncio.Queue[_Item] = asyncio.Queue(self.proxy.queue_chunks)
        self._spawn(self._pump(up, self.client_reader, queue))
        self._spawn(self._deliver(up, queue, self._upstream))
        self._spawn(self._connect())
        clean = False
        try:
            while self._tasks:
                done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                self._tasks -= done
                if any(t.cancelled() or t.exception() is not None for t in done):
                    break
            else:
                clean = True
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if clean:
                await _close(self.client_writer)
                await _close(self.upstream_writer)
            else:
                _abort(self.client_writer)
                _abort(self.upstream_writer)

    def reset(self) -> None:
        """RST both sides now and end the connection."""
        _abort(self.client_writer)
        _abort(self.upstream_writer)
        if self.task is not None:
            self.task.cancel()

    async def _upstream(self) -> asyncio.StreamWriter:
        await self.connected.wait()
        assert self.upstream_writer is not None
        return self.upstream_writer

    async def _client(self) -> asyncio.StreamWriter:
        return self.client_writer

    async def _connect(self) -> None:
        up, down = self.proxy.up, self.proxy.down
        while up.partitioned or down.partitioned:  # a SYN does not cross a cut cable
            await up.healed.wait()
            await down.healed.wait()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*self.proxy.target), self.proxy.connect_timeout)
        except (OSError, TimeoutError):
            self.proxy.failed += 1
            raise
        self.upstream_writer = writer
        self.connected.set()
        queue: asyncio.Queue[_Item] = asyncio.Queue(self.proxy.queue_chunks)
        self._spawn(self._pump(down, reader, queue))
        self._spawn(self._deliver(down, queue, self._client))

    async def _pump(self, d: _Direction, source: asyncio.StreamReader,
                    queue: asyncio.Queue[_Item]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if d.partitioned and d.stall:
                await d.healed.wait()
                continue
            data = await source.read(CHUNK)
            if not data:
                await queue.put(None)
                return
            if d.partitioned and not d.stall:
                d.dropped += len(data)
                self.damaged = True
                continue
            await queue.put((data, loop.time() + d.latency))

    async def _deliver(self, d: _Direction, queue: asyncio.Queue[_Item],
                       dest: Callable[[], Awaitable[asyncio.StreamWriter]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None:
                await d.healed.wait()  # a FIN is retransmitted until the cut heals
                writer = await dest()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            data, due = item
            while True:  # until delivered or dropped
                if d.partitioned:
                    if not d.stall:
                        d.dropped += len(data)
                        self.damaged = True
                        break
                    await d.healed.wait()
                    continue
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                await d.bucket.take(len(data))
                if d.is_cut():  # the partition may have started meanwhile
                    continue
                writer = await dest()
                writer.write(data)
                await writer.drain()
                d.forwarded += len(data)
                break


class FaultProxy:
    """The proxy, in-process: ``async with FaultProxy(listen, target, control) as proxy``.

    Addresses are ``(host, port)`` or ``"host:port"``; port 0 binds any free port (see
    :attr:`listen_address`, :attr:`control_address`). The fault methods are plain methods
    to call from the event loop's thread; the same faults are reachable over the control
    port (:meth:`command` is its interpreter).
    """

    def __init__(self, listen: str | Address, target: str | Address,
                 control: str | Address | None = None, *,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 queue_chunks: int = QUEUE_CHUNKS) -> None:
        self.listen = parse_address(listen)
        self.target = parse_address(target)
        self.control = parse_address(control) if control is not None else None
        self.connect_timeout = connect_timeout
        self.queue_chunks = max(1, queue_chunks)
        self.up = _Direction("up")
        self.down = _Direction("down")
        self.total = 0
        self.failed = 0
        self.resets = 0
        self._server: asyncio.Server | None = None
        self._control_server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._control_writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = await asyncio.start_server(self._on_client, *self.listen,
                                                  reuse_address=True)
        if self.control is not None:
            try:
                self._control_server = await asyncio.start_server(
                    self._on_control, *self.control, limit=CONTROL_LINE_LIMIT,
                    reuse_address=True)
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Stop listening, RST every connection, close control connections; bounded."""
        self._stopping = True
        servers = [s for s in (self._server, self._control_server) if s is not None]
        for server in servers:
            server.close()
        for conn in list(self._connections):
            conn.reset()
        for writer in list(self._control_writers):
            writer.transport.abort()
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT)
        for server in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)

    @property
    def listen_address(self) -> Address:
        return self._bound(self._server)

    @property
    def control_address(self) -> Address | None:
        return self._bound(self._control_server) if self._control_server else None

    @staticmethod
    def _bound(server: asyncio.Server | None) -> Address:
        if server is None or not server.sockets:
            raise RuntimeError("not listening")
        host, port = server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    # -- faults

    def _dirs(self, direction: str) -> list[_Direction]:
        if direction == "up":
            return [self.up]
        if direction == "down":
            return [self.down]
        if direction == "both":
            return [self.up, self.down]
        raise ValueError(f"direction must be up, down or both, not {direction!r}")

    def set_latency(self, ms: float, direction: DirectionName = "both") -> None:
        if ms < 0:
            raise ValueError("latency must be >= 0")
        for d in self._dirs(direction):
            d.latency = ms / 1000.0

    def set_bandwidth(self, bytes_per_second: float, direction: DirectionName = "both"
                      ) -> None:
        """Cap throughput (bytes/s; 0 removes the cap)."""
        if bytes_per_second < 0:
            raise ValueError("bandwidth must be >= 0")
        for d in self._dirs(direction):
            d.bucket.set_rate(bytes_per_second)

    def partition(self, direction: DirectionName = "both", *, stall: bool = False) -> None:
        for d in self._dirs(direction):
            d.set_partition(True, stall)

    def heal(self, direction: DirectionName = "both", *, reset_damaged: bool = False) -> int:
        """End the partition; optionally RST connections that lost bytes. Returns resets."""
        for d in self._dirs(direction):
            d.set_partition(False)
        if not reset_damaged:
            return 0
        damaged = [c for c in self._connections if c.damaged]
        for conn in damaged:
            conn.reset()
        self.resets += len(damaged)
        return len(damaged)

    def reset(self) -> int:
        """RST every current connection (both sides); returns how many."""
        conns = list(self._connections)
        for conn in conns:
            conn.reset()
        self.resets += len(conns)
        return len(conns)

    def clear(self) -> None:
        """Heal and remove every fault."""
        for d in (self.up, self.down):
            d.set_partition(False)
            d.latency = 0.0
            d.bucket.set_rate(0)

    def stats(self) -> dict[str, Any]:
        return {"up": self.up.stats(), "down": self.down.stats(),
                "connections": {"active": len(self._connections), "total": self.total,
                                "failed": self.failed, "reset": self.resets}}

    def command(self, line: str) -> dict[str, Any]:
        """Execute one control-protocol line; return the reply (never raises)."""
        try:
            return {"ok": True, **self._command(line.split())}
        except (ValueError, IndexError) as error:
            return {"ok": False, "error": str(error) or type(error).__name__}

    def _command(self, words: list[str]) -> dict[str, Any]:
        if not words:
            raise ValueError("empty command")
        verb, args = words[0].lower(), [w.lower() for w in words[1:]]
        dirs = [a for a in args if a in _DIRECTIONS]
        direction: DirectionName = "both"
        if len(dirs) > 1:
            raise ValueError("more than one direction")
        if dirs:
            direction = dirs[0]  # type: ignore[assignment]  # checked against _DIRECTIONS
        rest = [a for a in args if a not in _DIRECTIONS]
        if verb == "latency" and len(rest) == 1:
            self.set_latency(float(rest[0]), direction)
        elif verb == "bandwidth" and len(rest) == 1:
            self.set_bandwidth(0 if rest[0] == "off" else float(rest[0]), direction)
        elif verb == "partition" and set(rest) <= {"drop", "stall"} and len(rest) <= 1:
            self.partition(direction, stall=rest == ["stall"])
        elif verb == "heal" and set(rest) <= {"reset-damaged"}:
            return {"reset": self.heal(direction, reset_damaged=bool(rest))}
        elif verb == "reset" and not args:
            return {"reset": self.reset()}
        elif verb == "clear" and not args:
            self.clear()
        elif verb == "stats" and not args:
            return {"stats": self.stats()}
        elif verb == "ping" and not args:
            pass
        else:
            raise ValueError(f"bad command: {' '.join(words)!r}")
        return {}

    # -- serving

    def _track(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        return task

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            _abort(writer)
            return
        task = self._track()
        conn = _Connection(self, reader, writer)
        conn.task = task
        self.total += 1
        self._connections.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # reset or stop: the handler is done
        finally:
            self._connections.discard(conn)
            if task is not None:
                self._handlers.discard(task)

    async def _on_control(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.transport.abort()
            return
        task = self._track()
        self._control_writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than CONTROL_LINE_LIMIT
                    writer.write(b'{"ok": false, "error": "line too long"}\n')
                    break
                if not line:
                    break
                reply = self.command(line.decode(errors="replace"))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._control_writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            await _close(writer)  # immediate if stop() aborted it


# -- control clients ------------------------------------------------------------------------------


def _line(verb: str, *args: object) -> str:
    return " ".join([verb, *(str(a) for a in args)])


def _reply(raw: bytes) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(raw)
    if not reply.get("ok"):
        raise FaultProxyError(str(reply.get("error", reply)))
    return reply


class FaultProxyClient:
    """Blocking client for the control port (one short connection per command, bounded)."""

    def __init__(self, address: str | Address, *, timeout: float = CONTROL_TIMEOUT) -> None:
        self.address = parse_address(address)
        self.timeout = timeout

    def command(self, line: str) -> dict[str, Any]:
        """Send one command line; return the reply; raise FaultProxyError if refused."""
        deadline = time.monotonic() + self.timeout
        with socket.create_connection(self.address, timeout=self.timeout) as sock:
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply to {line!r} within {self.timeout} s")
                sock.settimeout(remaining)
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"control connection closed after {line!r}")
                data += chunk
        return _reply(data)

    def latency(self, ms: float, direction: DirectionName = "both") -> None:
        self.command(_line("latency", ms, direction))

    def bandwidth(self, bytes_per_second: float, direction: DirectionName = "both") -> None:
        self.command(_line("bandwidth", bytes_per_second, direction))

    def partition(self, direction: DirectionName = "both", *, stall: bool = False) -> None:
        self.command(_line("partition", direction, "stall" if stall else "drop"))

    def heal(self, direction: DirectionName = "both", *, reset_damaged: bool = False) -> int:
        extra = ["reset-damaged"] if reset_damaged else []
        return int(self.command(_line("heal", direction, *extra))["reset"])

    def reset(self) -> int:
        return int(self.command("reset")["reset"])

    def clear(self) -> None:
        self.command("clear")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.command("stats")["stats"]
        return stats

    def ping(self) -> None:
        self.command("ping")

    def wait_ready(self, timeout: float) -> None:
        """Retry ``ping`` until the proxy answers, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ping()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class AsyncFaultProxyClient:
    """:class:`FaultProxyClient` for coroutines (safe against an in-process proxy)."""

    def __init__(self, address: str | Address, *, timeout: float = CONTROL_TIMEOUT) -> None:
        self.address = parse_address(address)
        self.timeout = timeout

    async def command(self, line: str) -> dict[str, Any]:
        return await asyncio.wait_for(self._command(line), self.timeout)

    async def _command(self, line: str) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(*self.address)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            raw = await reader.readline()
            if not raw.endswith(b"\n"):
                raise ConnectionError(f"control connection closed after {line!r}")
        finally:
            await _close(writer)
        return _reply(raw)

    async def latency(self, ms: float, direction: DirectionName = "both") -> None:
        await self.command(_line("latency", ms, direction))

    async def bandwidth(self, bytes_per_second: float, direction: DirectionName = "both"
                        ) -> None:
        await self.command(_line("bandwidth", bytes_per_second, direction))

    async def partition(self, direction: DirectionName = "both", *, stall: bool = False
                        ) -> None:
        await self.command(_line("partition", direction, "stall" if stall else "drop"))

    async def heal(self, direction: DirectionName = "both", *, reset_damaged: bool = False
                   ) -> int:
        extra = ["reset-damaged"] if reset_damaged else []
        return int((await self.command(_line("heal", direction, *extra)))["reset"])

    async def reset(self) -> int:
        return int((await self.command("reset"))["reset"])

    async def clear(self) -> None:
        await self.command("clear")

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self.command("stats"))["stats"]
        return stats

    async def ping(self) -> None:
        await self.command("ping")


# -- as a process ---------------------------------------------------------------------------------


@dataclass
class ProxyProcess:
    """A proxy process running in a node (see :func:`start_proxy_process`)."""

    process: subprocess.Popen[bytes]
    listen: Address
    target: Address
    control: Address
    client: FaultProxyClient


def proxy_argv(listen: str | Address, target: str | Address, control: str | Address
               ) -> list[str]:
    """Arguments after ``python`` that run the proxy module."""
    return ["-m", "tests.cluster.faultproxy",
            "--listen", format_address(parse_address(listen)),
            "--target", format_address(parse_address(target)),
            "--control", format_address(parse_address(control))]


def start_proxy_process(net: TestNetwork, node: Node | str, *, listen: str | Address,
                        target: str | Address, control: str | Address,
                        timeout: float = 20.0) -> ProxyProcess:
    """Run the proxy in ``node`` (stopped with the network) and wait until it serves.

    Port 0 in ``listen``/``control`` picks free ports; the bound ones are returned.
    """
    from tests.cluster.netns import read_line

    process: subprocess.Popen[bytes] = net.python(
        node, proxy_argv(listen, target, control), stdout=subprocess.PIPE)
    try:
        ready = json.loads(read_line(process.stdout, timeout))
    except (TimeoutError, EOFError, ValueError) as error:
        raise RuntimeError(f"fault proxy in {node} did not start: {error}") from error
    control_address = parse_address(ready["control"])
    client = FaultProxyClient(control_address)
    return ProxyProcess(process=process, listen=parse_address(ready["listen"]),
                        target=parse_address(ready["target"]), control=control_address,
                        client=client)


async def _serve(args: argparse.Namespace) -> None:
    proxy = FaultProxy(args.listen, args.target, args.control,
                       connect_timeout=args.connect_timeout)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        control = proxy.control_address
        print(json.dumps({"ready": True, "listen": format_address(proxy.listen_address),
                          "target": format_address(proxy.target),
                          "control": format_address(control) if control else None}),
              flush=True)
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.faultproxy",
                                     description="TCP fault-injection proxy")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", default=None, help="HOST:PORT of the control port")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Address", "AsyncFaultProxyClient", "DirectionName", "FaultProxy", "FaultProxyClient",
    "FaultProxyError", "ProxyProcess", "format_address", "parse_address", "proxy_argv",
    "start_proxy_process",
]
