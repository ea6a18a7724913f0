"""Tiny TCP tools run inside the cluster's nodes (``python -m bench.netprobe MODE ...``).

- ``sink --listen HOST:PORT``: print ``{"port": N}``, accept one connection, read until EOF,
  print ``{"bytes": N, "seconds": T}`` (T from accept to EOF) and exit.
- ``source --target HOST:PORT --bytes N``: send N bytes (1 MiB sends from memory), then close.
- ``echo --listen HOST:PORT``: print ``{"port": N}``, echo one connection until EOF.
- ``ping --target HOST:PORT --count N --size S``: S-byte request/response round trips; print
  ``{"rtt": [seconds, ...]}``.

Only ever pointed at addresses of the benchmark's own namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

CHUNK = 1 << 20


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _listen(address: str) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(_addr(address))
    srv.listen(1)
    srv.settimeout(120)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    return srv


def sink(address: str) -> None:
    with _listen(address) as srv:
        conn, _ = srv.accept()
        start = time.perf_counter()
        total = 0
        buf = bytearray(CHUNK)
        with conn:
            conn.settimeout(300)
            while n := conn.recv_into(buf):
                total += n
        print(json.dumps({"bytes": total, "seconds": time.perf_counter() - start}), flush=True)


def source(target: str, nbytes: int) -> None:
    data = os.urandom(CHUNK)
    view = memoryview(data)
    with socket.create_connection(_addr(target), timeout=60) as sock:
        sock.settimeout(300)
        left = nbytes
        while left:
            n = min(left, CHUNK)
            sock.sendall(view[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the sink to close: everything was read


def echo(address: str) -> None:
    with _listen(address) as srv:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def ping(target: str, count: int, size: int) -> None:
    msg = b"x" * size
    rtts = []
    with socket.create_connection(_addr(target), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t = time.perf_counter()
            sock.sendall(msg)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise ConnectionError("echo closed")
                got += len(chunk)
            rtts.append(time.perf_counter() - t)
    print(json.dumps({"rtt": rtts}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.netprobe")
    parser.add_argument("mode", choices=["sink", "source", "echo", "ping"])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", default="")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.mode == "sink":
        sink(args.listen)
    elif args.mode == "source":
        source(args.target, args.bytes)
    elif args.mode == "echo":
        echo(args.listen)
    else:
        ping(args.target, args.count, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
