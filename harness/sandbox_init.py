"""The first program inside Case's sandbox: relay, fresh HOME, then Case.

The harness copies this file (standard library only) into a read-only directory of the
run and starts it with bubblewrap. It

1. copies the profile's ``home_seed`` (bound read-only) into the fresh tmpfs ``HOME``;
2. listens on ``127.0.0.1:<port>`` of the sandbox's own loopback and relays every
   connection, byte for byte, to the run's proxy on its unix socket (bind-mounted in):
   the only way out of a network namespace that has nothing but loopback, so
   ``OPENAI_BASE_URL=http://127.0.0.1:<port>/v1`` stays a plain URL every client takes;
3. runs Case's argv and exits with its exit code (128 + signal number if a signal ended
   it). When this process ends, bubblewrap's init ends and the kernel kills every
   process left in the sandbox's PID namespace.

It holds nothing Case does not already have (the socket is reachable to Case anyway), so
Case tampering with it gains nothing. Usage::

    sandbox_init.py --relay-port N --socket PATH [--home-seed DIR] -- ARGV...
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

MAX_CONNECTIONS = 256
CHUNK = 65536
EXIT_SETUP = 125  # the sandbox could not be set up (like env(1)'s 125)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction until EOF or error, then half-close the other side."""
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _serve_one(client: socket.socket, socket_path: str, slots: threading.BoundedSemaphore) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(socket_path)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
    except OSError:
        pass
    finally:
        upstream.close()
        client.close()
        slots.release()


def _relay(listener: socket.socket, socket_path: str) -> None:
    """Accept forever (bounded concurrency: a client past the limit waits in the backlog)."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        slots.acquire()
        try:
            client, _ = listener.accept()
        except OSError:
            slots.release()
            return
        threading.Thread(target=_serve_one, args=(client, socket_path, slots), daemon=True).start()


def start_relay(port: int, socket_path: str) -> socket.socket:
    """Listen before Case starts, so its first request finds the relay."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)
    threading.Thread(target=_relay, args=(listener, socket_path), daemon=True).start()
    return listener


def seed_home(seed: Path, home: Path) -> None:
    """Copy the seed's content into HOME (symlinks copied as links, never followed)."""
    shutil.copytree(seed, home, symlinks=True, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sandbox_init")
    p.add_argument("--relay-port", type=int, required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--home-seed", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("sandbox_init: no command", file=sys.stderr)
        return EXIT_SETUP
    try:
        if args.home_seed:
            seed_home(Path(args.home_seed), Path(os.environ.get("HOME", "/home/case")))
        start_relay(args.relay_port, args.socket)
    except OSError as exc:
        print(f"sandbox_init: cannot set up the sandbox: {exc}", file=sys.stderr)
        return EXIT_SETUP
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"sandbox_init: cannot start {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
