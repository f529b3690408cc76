"""A tiny TCP probe (standard library only) that the lab runs inside its hosts to check its own shaping.

    python probe.py serve --host 10.77.0.2 --port 7777      # prints "listening" once ready, serves until killed
    python probe.py rtt 10.77.0.2 10.77.0.3 --count 10      # JSON per host: round-trip times of small messages (ms)
    python probe.py bw 10.77.0.2 --seconds 2                # JSON: server -> client goodput (Mbit/s)

``rtt`` sends 64-byte messages one at a time (TCP_NODELAY) and times each echo; the connection set-up is excluded.
``bw`` asks the server to stream data for a while and measures, at the receiver, the rate over the second half of
the transfer (slow start excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time

MSG = 64


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _realtime() -> None:
    """Real-time priority for the calling thread (root only): RTT probes must not wait for a busy CPU."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(5))
    except (OSError, AttributeError):
        pass


def _handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        mode = _recv_exact(conn, 1)
        if mode == b"e":
            _realtime()  # this thread only (Linux schedules threads)
            while True:
                conn.sendall(_recv_exact(conn, MSG))
        elif mode == b"d":
            (seconds,) = struct.unpack("!d", _recv_exact(conn, 8))
            block = b"\0" * (1 << 16)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                conn.sendall(block)
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def serve(host: str, port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(16)
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def rtt(host: str, port: int, count: int, timeout_s: float) -> dict:
    _realtime()
    sock = _connect(host, port, timeout_s)
    sock.sendall(b"e")
    payload = b"x" * MSG
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(payload)
        _recv_exact(sock, MSG)
        samples.append((time.perf_counter() - started) * 1e3)
    sock.close()
    return {"rtt_ms": samples, "median_ms": statistics.median(samples), "min_ms": min(samples)}


def bandwidth(host: str, port: int, seconds: float, timeout_s: float) -> dict:
    sock = _connect(host, port, timeout_s)
    sock.sendall(b"d" + struct.pack("!d", seconds))
    started = time.monotonic()
    half = started + seconds / 2
    total = counted = 0
    counted_since = None
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        now = time.monotonic()
        total += len(chunk)
        if now >= half:
            if counted_since is None:
                counted_since = now
            else:
                counted += len(chunk)
        last = now
    sock.close()
    span = (last - counted_since) if counted_since is not None else 0.0
    mbit = counted * 8 / span / 1e6 if span > 0 else 0.0
    return {"mbit": mbit, "bytes": total, "measured_s": span}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7777)
    for name in ("rtt", "bw"):
        p = sub.add_parser(name)
        p.add_argument("hosts", nargs="+", help="one host for bw; any number for rtt (measured one after another)")
        p.add_argument("--port", type=int, default=7777)
        p.add_argument("--count", type=int, default=10)
        p.add_argument("--seconds", type=float, default=2.0)
        p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port)
    elif args.cmd == "rtt":
        json.dump({host: rtt(host, args.port, args.count, args.timeout) for host in args.hosts}, sys.stdout)
    else:
        json.dump(bandwidth(args.hosts[0], args.port, args.seconds, args.timeout), sys.stdout)


if __name__ == "__main__":
    main()
