"""The DNS sink of Case's sandbox: records every name Case tries to resolve, answers NXDOMAIN.

The sandbox's ``/etc/resolv.conf`` names ``127.0.0.1``; the harness starts this program
in the sandbox's *network* namespace only (``nsenter --net``), so it listens on the
sandbox's loopback port 53 while staying outside Case's user, PID and mount namespaces:
Case can neither kill it nor edit what it records. Nothing is ever resolved or forwarded.
Each query becomes one JSON line in ``--log`` (name, type), read by the report: a name of a
known model-API host counts as a fallback attempt, every other name is listed under
``egress``. The DNS wire format is parsed and built by ``dnslib``.

Usage: ``python -m harness.dns_sink --log FILE [--host 127.0.0.1] [--port 53]``; prints
``DNS_SINK_READY`` once both UDP and TCP listen; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import IO

from dnslib import QTYPE, RCODE, DNSRecord
from dnslib.dns import DNSError

READY_LINE = "DNS_SINK_READY"
MAX_RECORDS = 10_000  # then it still answers, but stops writing (a flood cannot fill the disk)
MAX_NAME = 253
TCP_TIMEOUT_S = 2.0


def answer(packet: bytes) -> tuple[bytes | None, dict[str, str] | None]:
    """(reply, record) for one query: NXDOMAIN for the question it asked, and what to log.
    A packet that is not a DNS query gets no reply and is logged as malformed. Pure; never
    raises (the packets come from Case: whatever dnslib makes of them must not stop the
    sink)."""
    try:
        query = DNSRecord.parse(packet)
        if query.header.qr or not query.questions:
            return None, {"malformed": "true"}
        q = query.questions[0]
        name = str(q.qname).rstrip(".").lower()[:MAX_NAME]
        reply = query.reply()
        reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack(), {"name": name, "type": str(QTYPE.get(q.qtype, str(q.qtype)))}
    except (DNSError, struct.error, IndexError, ValueError, UnicodeError, KeyError, TypeError, AttributeError):
        return None, {"malformed": "true"}


class _Log:
    def __init__(self, path: Path) -> None:
        self._fh: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at exit
        self.count = 0

    def write(self, record: dict[str, str], transport: str) -> None:
        if self.count >= MAX_RECORDS:
            return
        self.count += 1
        self._fh.write(json.dumps({**record, "transport": transport, "time": round(time.time(), 3)},
                                  sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _tcp_query(conn: socket.socket) -> bytes | None:
    conn.settimeout(TCP_TIMEOUT_S)
    head = conn.recv(2, socket.MSG_WAITALL)
    if len(head) != 2:
        return None
    (size,) = struct.unpack("!H", head)
    data = conn.recv(size, socket.MSG_WAITALL)
    return data if len(data) == size else None


def serve(host: str, port: int, log: _Log) -> None:
    """UDP and TCP on ``host:port`` until SIGTERM or the harness that started it is gone
    (a killed harness must not leave it running); one query at a time (Case has no reason
    to resolve much, and nothing here waits on the network)."""
    parent = os.getppid()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(64)
    stop = False

    def on_stop(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    print(READY_LINE, flush=True)
    while not stop and os.getppid() == parent:
        try:
            readable, _, _ = select.select([udp, tcp], [], [], 0.5)
        except InterruptedError:
            continue
        for sock in readable:
            if sock is udp:
                packet, peer = udp.recvfrom(4096)
                reply, record = answer(packet)
                if record is not None:
                    log.write(record, "udp")
                if reply is not None:
                    udp.sendto(reply, peer)
                continue
            conn, _ = tcp.accept()
            try:
                query = _tcp_query(conn)
                if query is not None:
                    reply, record = answer(query)
                    if record is not None:
                        log.write(record, "tcp")
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                pass
            finally:
                conn.close()


def read_queries(path: Path) -> list[dict[str, str]]:
    """The sink's records (a missing file: none; unreadable lines are skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out: list[dict[str, str]] = []
    for line in lines[:MAX_RECORDS]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append({str(k): str(v) for k, v in rec.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dns_sink", description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=53)
    args = p.parse_args(argv)
    log = _Log(args.log)
    try:
        serve(args.host, args.port, log)
    except OSError as exc:
        print(f"dns_sink: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
