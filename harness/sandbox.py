"""Case's sandbox: bubblewrap, with the run's proxy as the only way out.

Case is untrusted code (a reward-hacking model may have written it). It runs in new
user, PID, network, IPC and UTS namespaces (``--unshare-all``), as uid/gid 1000, dying
with the harness (``--die-with-parent``), in a new session (no terminal injection), and
sees only: a read-only system (``/usr`` and the merged-/usr links, ``ld.so.cache``), a
generated ``/etc`` (passwd, group, hosts), a fresh tmpfs ``HOME`` and ``/tmp``, its own
``/proc``, the task file read-only, the paths the run profile exposes read-only
(``[case.sandbox].ro_paths``; the harness adds its interpreter's prefix so the relay and
the reference agent run), the run's tools (``sandbox_init.py`` and the reference agent)
read-only, the proxy's unix socket, and the fixture repository, the only persistent
writable place. Its network namespace has loopback only; ``sandbox_init`` relays
``127.0.0.1:RELAY_PORT`` to the proxy's socket.

The interface is small: :func:`build_command` (pure: what bubblewrap is asked to do),
:func:`start`, :meth:`SandboxProcess.kill_all`, :meth:`SandboxProcess.survivors` (every
process still in the sandbox's PID namespace: the proof that nothing Case started
outlives it).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "case"
SANDBOX_HOME = "/home/case"
# Inside the sandbox's own network namespace, so no other run or service can hold it.
RELAY_PORT = 8787
INSIDE_RUN = "/run/case"
INSIDE_SOCKET = f"{INSIDE_RUN}/proxy.sock"
INSIDE_TOOLS = f"{INSIDE_RUN}/tools"
INSIDE_LIB = f"{INSIDE_TOOLS}/lib"
INSIDE_HOME_SEED = f"{INSIDE_RUN}/home-seed"
INIT_NAME = "sandbox_init.py"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Top-level system paths Case may see read-only (directories are bound, symlinks copied as
# symlinks: /bin -> usr/bin on a merged-/usr system).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Single files of the host's /etc a dynamically linked program needs; nothing else of /etc.
SYSTEM_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
SYSTEM_ETC_DIRS = ("/etc/alternatives",)
ETC_FILES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf")
NSENTER = "/usr/bin/nsenter"
INFO_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 10.0


class SandboxError(RuntimeError):
    """The sandbox could not be started; the message says why (no secrets in it)."""


class BwrapInfo(BaseModel):
    """A bubblewrap that was found and shown to work on this machine."""

    model_config = ConfigDict(frozen=True)

    path: str
    version: str


@dataclass(frozen=True)
class SystemEntry:
    """One top-level system path: a directory to bind read-only, or a symlink to copy."""

    path: str
    symlink_to: str | None = None


class SandboxSpec(BaseModel):
    """Everything :func:`build_command` needs; paths are host paths."""

    model_config = ConfigDict(frozen=True)

    bwrap: str
    python: str = Field(description="interpreter that runs sandbox_init (its prefix must be in ro_paths)")
    repo_dir: Path
    task_file: Path
    tools_dir: Path = Field(description="host dir holding sandbox_init.py and lib/ (bound read-only)")
    etc_dir: Path = Field(description="host dir holding the generated passwd, group, hosts")
    socket_path: Path = Field(description="the proxy's unix socket (in a harness-private dir)")
    ro_paths: tuple[Path, ...] = ()
    home_seed: Path | None = None
    system: tuple[SystemEntry, ...] = ()
    relay_port: int = RELAY_PORT
    masked: tuple[Path, ...] = Field(default=(), description="directories inside ro_paths covered by an empty "
                                                              "tmpfs (see masked_paths)")


def host_system() -> tuple[SystemEntry, ...]:
    """The system paths of this host that exist, as bind or symlink entries."""
    out: list[SystemEntry] = []
    for p in SYSTEM_PATHS:
        if os.path.islink(p):
            out.append(SystemEntry(p, os.readlink(p)))
        elif os.path.isdir(p):
            out.append(SystemEntry(p))
    for p in SYSTEM_ETC_FILES:
        if os.path.isfile(p):
            out.append(SystemEntry(p))
    for p in SYSTEM_ETC_DIRS:
        if os.path.isdir(p) and not os.path.islink(p):
            out.append(SystemEntry(p))
    return tuple(out)


def masked_paths(exposed: Sequence[Path], protected: Sequence[Path]) -> tuple[Path, ...]:
    """The protected directories that lie strictly inside an exposed one and exist: an
    installed wheel keeps the fixtures (acceptance tests, recorded sessions) in the
    site-packages that the interpreter prefix exposes. Each gets an empty tmpfs on top
    of the read-only bind, so Case sees an empty directory there. Pure but for
    resolving symlinks and checking that the directory exists."""
    roots = [Path(os.path.realpath(p)) for p in exposed]
    out: dict[Path, None] = {}
    for raw in protected:
        real = Path(os.path.realpath(raw))
        if real.is_dir() and any(real != r and real.is_relative_to(r) for r in roots):
            out[real] = None
    return tuple(out)


def interpreter_paths() -> tuple[Path, ...]:
    """The harness interpreter's prefixes (a virtualenv and the Python it was made from),
    read-only: the relay and the reference agent run on them. Read-only matters: a
    ``.pth`` file dropped into a writable site-packages would run in every later harness
    process."""
    seen: dict[Path, None] = {}
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        seen[Path(p).resolve()] = None
    return tuple(seen)


def build_command(spec: SandboxSpec, argv: Sequence[str], *, info_fd: int | None = None,
                  block_fd: int | None = None) -> list[str]:
    """The bubblewrap argv that runs ``argv`` (Case's command) under ``sandbox_init``.

    Pure: reads nothing and starts nothing. Order matters to bubblewrap: later mounts go
    on top of earlier ones, so the tmpfs ``/tmp`` and ``HOME`` come before anything bound
    below them, and the writable repository last but for the tools and the socket.
    No environment value is ever put in argv (the environment passes through bwrap).
    """
    cmd: list[str] = [spec.bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
                      "--gid", str(SANDBOX_GID), "--hostname", "case-sandbox", "--die-with-parent",
                      "--new-session", "--cap-drop", "ALL"]
    for entry in spec.system:
        if entry.symlink_to is not None:
            cmd += ["--symlink", entry.symlink_to, entry.path]
        else:
            cmd += ["--ro-bind", entry.path, entry.path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", SANDBOX_HOME,
            "--dir", INSIDE_RUN]
    for name in ETC_FILES:
        cmd += ["--ro-bind", str(spec.etc_dir / name), f"/etc/{name}"]
    for path in spec.ro_paths:
        cmd += ["--ro-bind", str(path), str(path)]
    for path in spec.masked:
        cmd += ["--tmpfs", str(path)]
    if spec.home_seed is not None:
        cmd += ["--ro-bind", str(spec.home_seed), INSIDE_HOME_SEED]
    cmd += ["--ro-bind", str(spec.task_file), str(spec.task_file),
            "--bind", str(spec.repo_dir), str(spec.repo_dir),
            "--ro-bind", str(spec.tools_dir), INSIDE_TOOLS,
            "--bind", str(spec.socket_path), INSIDE_SOCKET,
            "--chdir", str(spec.repo_dir)]
    if info_fd is not None:
        cmd += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        cmd += ["--block-fd", str(block_fd)]
    cmd += ["--", spec.python, f"{INSIDE_TOOLS}/{INIT_NAME}", "--relay-port", str(spec.relay_port),
            "--socket", INSIDE_SOCKET]
    if spec.home_seed is not None:
        cmd += ["--home-seed", INSIDE_HOME_SEED]
    return [*cmd, "--", *argv]


def isolated_command(bwrap: str, argv: Sequence[str], *, cwd: Path, writable: Sequence[Path],
                     read_only: Sequence[Path], system: Sequence[SystemEntry],
                     masked: Sequence[Path] = ()) -> list[str]:
    """A plain sandbox for a program that runs Case's code but is not Case (the
    acceptance tests import Case's commit): the same namespaces, uid and read-only
    system, no network at all (not even the relay), only ``writable`` and ``read_only``
    of the host. Pure."""
    cmd: list[str] = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
                      "--hostname", "case-sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for entry in system:
        cmd += ["--symlink", entry.symlink_to, entry.path] if entry.symlink_to else ["--ro-bind", entry.path,
                                                                                      entry.path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in read_only:
        cmd += ["--ro-bind", str(path), str(path)]
    for path in masked:
        cmd += ["--tmpfs", str(path)]
    for path in writable:
        cmd += ["--bind", str(path), str(path)]
    return [*cmd, "--chdir", str(cwd), "--", *argv]


def sandbox_environment(env: Mapping[str, str], visible: Sequence[Path] = ()) -> dict[str, str]:
    """Case's environment adjusted to the sandbox: its own HOME and TMPDIR (never the
    operator's), the run's tools on PYTHONPATH (the reference agent lives there), and a
    PATH of the harness interpreter's bin, the entries of the given PATH that lie in a
    ``visible`` (read-only exposed) path, and the system directories: an agent installed
    under a profile's ``ro_paths`` is found by name; nothing else of the host's PATH is."""
    out = dict(env)
    out["HOME"] = SANDBOX_HOME
    out["USER"] = out["LOGNAME"] = SANDBOX_USER
    out["TMPDIR"] = "/tmp"
    kept = [entry for entry in (env.get("PATH") or "").split(":")
            if entry.startswith("/") and any(Path(entry).is_relative_to(v) for v in visible)]
    parts = [os.path.dirname(sys.executable), *kept, *DEFAULT_PATH.split(":")]
    out["PATH"] = ":".join(dict.fromkeys(parts))
    out["PYTHONPATH"] = INSIDE_LIB
    return out


def prepare_tools(tools_dir: Path, lib_files: Mapping[str, bytes]) -> None:
    """Write ``sandbox_init.py`` and ``lib_files`` (name under lib/ -> content) into
    ``tools_dir``, which the harness binds read-only: copies of single files, never the
    project tree itself."""
    (tools_dir / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name(INIT_NAME), tools_dir / INIT_NAME)
    for rel, content in lib_files.items():
        dest = tools_dir / "lib" / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"tool file name {rel!r} must be relative, without '..'")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)


def prepare_etc(etc_dir: Path) -> None:
    """A minimal /etc: one user (Case), its group, loopback names, and a resolver that
    asks the DNS sink on the sandbox's loopback; nothing of the host's."""
    etc_dir.mkdir(parents=True, exist_ok=True)
    (etc_dir / "passwd").write_text(
        f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:Case:{SANDBOX_HOME}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", encoding="utf-8")
    (etc_dir / "group").write_text(f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
                                   encoding="utf-8")
    (etc_dir / "hosts").write_text("127.0.0.1\tlocalhost case-sandbox\n::1\tlocalhost ip6-localhost\n",
                                   encoding="utf-8")
    (etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n", encoding="utf-8")
    (etc_dir / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n", encoding="utf-8")


# --------------------------------------------------------------------------- bubblewrap on this host


def find_bwrap() -> str | None:
    """bubblewrap on the harness's PATH (``scripts/install-system-deps.sh`` installs it)."""
    return shutil.which("bwrap")


def probe_bwrap(path: str | None = None) -> BwrapInfo | str:
    """Show that bubblewrap exists *and* can build this sandbox here (user namespaces may
    be disabled); returns its version, or one line saying why not."""
    path = path or find_bwrap()
    if path is None:
        return "bubblewrap (bwrap) is not installed; run scripts/install-system-deps.sh"
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        version = ver.stdout.strip().removeprefix("bubblewrap").strip() or "unknown"
        cmd = [path, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
               "--die-with-parent"]
        for entry in host_system():
            cmd += ["--symlink", entry.symlink_to, entry.path] if entry.symlink_to else ["--ro-bind", entry.path,
                                                                                          entry.path]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--", "true"]
        smoke = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap at {path} cannot run: {type(exc).__name__}"
    if smoke.returncode != 0:
        why = (smoke.stderr.strip().splitlines() or ["no message"])[-1][:200]
        return f"bubblewrap {version} cannot create the sandbox here: {why}"
    return BwrapInfo(path=path, version=version)


# --------------------------------------------------------------------------- a running sandbox


def _ns_inode(pid: int, kind: str = "pid") -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def own_pid_namespace() -> int | None:
    """The harness's own PID namespace: never a sandbox's (killing its members would kill
    every process of the machine's namespace)."""
    return _ns_inode(os.getpid())


def hold_namespace(pid: int, pid_ns: int) -> int | None:
    """An open descriptor on ``pid``'s PID namespace if it is ``pid_ns``, else None.

    The kernel numbers namespaces from a pool it reuses at once: when a sandbox's
    namespace ends, the next namespace anyone creates (another run's sandbox, the
    acceptance sandbox) may get the same number, and a later look for "members of
    ``pid_ns``" would find, and kill, that stranger's processes. While a descriptor is
    open the namespace is not freed, so its number stays this sandbox's."""
    try:
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(fd).st_ino != pid_ns:
        os.close(fd)
        return None
    return fd


def namespace_members(pid_ns: int) -> list[int]:
    """Host pids of every process whose PID namespace is ``pid_ns`` (bounded by /proc).
    Refuses the harness's own namespace."""
    if pid_ns == own_pid_namespace():
        raise SandboxError("refusing to treat the harness's own PID namespace as a sandbox's")
    out: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit() and _ns_inode(int(name)) == pid_ns:
            out.append(int(name))
    return out


def _read_info(fd: int, timeout_s: float) -> dict[str, Any]:
    """bubblewrap's ``--info-fd`` JSON (child pid, namespace ids), read to EOF with a deadline."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    data: Any = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        try:  # complete as soon as it parses (the fd may stay open while bwrap blocks)
            data = json.loads(buf)
            break
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if len(buf) > 1024 * 1024:
            break
    return data if isinstance(data, dict) else {}


@dataclass
class SandboxProcess:
    """A started sandbox: ``proc`` is bubblewrap's outer process (its exit code is
    Case's), ``child_pid`` the host pid of the namespace's init, ``pid_ns`` its PID
    namespace (the set :meth:`survivors` looks in)."""

    proc: subprocess.Popen[bytes]
    child_pid: int
    pid_ns: int
    # Keeps pid_ns from being reused while the harness may still look for its members
    # (see hold_namespace); closed by release().
    ns_fd: int | None = None

    def survivors(self) -> list[int]:
        """Every process still in the sandbox's PID namespace (host pids). Once
        released, the number may be another namespace's: nothing is looked up then."""
        if self.pid_ns == own_pid_namespace():
            raise SandboxError("refusing to treat the harness's own PID namespace as a sandbox's")
        return namespace_members(self.pid_ns) if self.ns_fd is not None else []

    def release(self) -> None:
        """Let the namespace go (its number may then be reused): after the last look."""
        if self.ns_fd is not None:
            os.close(self.ns_fd)
            self.ns_fd = None

    def kill_all(self, timeout_s: float = KILL_TIMEOUT_S) -> list[int]:
        """SIGKILL the namespace's init (the kernel then kills every member) and any
        member still seen, until none is left or ``timeout_s``; returns the survivors
        (an empty list is the proof). A pid is only signalled while it is still in this
        namespace, so a reused pid is never hit."""
        deadline = time.monotonic() + timeout_s
        while True:
            members = self.survivors()
            for pid in ([self.child_pid] if self.child_pid in members else []) + members:
                if _ns_inode(pid) == self.pid_ns:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if self.proc.poll() is None and not members:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
            if not members or time.monotonic() >= deadline:
                if not members:
                    try:
                        self.proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                return self.survivors()
            time.sleep(0.02)


def netns_command(child_pid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` in the sandbox's network namespace only (the harness's helper on the
    sandbox's loopback; its other namespaces stay the harness's)."""
    return [NSENTER, f"--net=/proc/{child_pid}/ns/net", "--", *argv]


def start(spec: SandboxSpec, argv: Sequence[str], env: Mapping[str, str], *, stdout: IO[bytes] | int | None,
          stderr: IO[bytes] | int | None,
          before_case: Callable[[SandboxProcess], None] | None = None) -> SandboxProcess:
    """Start Case in the sandbox. The environment reaches Case through bubblewrap's own
    (never argv). bubblewrap holds Case back (``--block-fd``) until ``before_case`` (e.g.
    starting the DNS sink in its network namespace) has run. Raises
    :class:`SandboxError` if bubblewrap does not report a namespace of its own or
    ``before_case`` raises it (bubblewrap is then killed, Case never ran)."""
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    try:
        proc = subprocess.Popen(build_command(spec, argv, info_fd=info_w, block_fd=block_r), env=dict(env),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                pass_fds=(info_w, block_r), start_new_session=True)
    except OSError as exc:
        for fd in (info_r, info_w, block_r, block_w):
            os.close(fd)
        raise SandboxError(f"cannot start bubblewrap: {exc.strerror}") from None
    os.close(info_w)
    os.close(block_r)
    try:
        try:
            info = _read_info(info_r, INFO_TIMEOUT_S)
        finally:
            os.close(info_r)
        box = _started(proc, info)
        if before_case is not None:
            before_case(box)
        os.write(block_w, b"1")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(KILL_TIMEOUT_S)
        raise
    finally:
        os.close(block_w)
    return box


def _started(proc: subprocess.Popen[bytes], info: dict[str, Any]) -> SandboxProcess:
    """The running sandbox from bubblewrap's info, or bubblewrap killed and an error."""
    child = info.get("child-pid")
    pid_ns = info.get("pid-namespace")
    if isinstance(child, int) and not isinstance(pid_ns, int):
        pid_ns = _ns_inode(child)
    if not isinstance(child, int) or not isinstance(pid_ns, int) or pid_ns == own_pid_namespace():
        proc.kill()
        proc.wait(KILL_TIMEOUT_S)
        raise SandboxError(f"bubblewrap did not report a PID namespace of its own (exit code {proc.poll()})")
    # bubblewrap holds Case back (--block-fd): the namespace's init is alive here.
    ns_fd = hold_namespace(child, pid_ns)
    if ns_fd is None:
        proc.kill()
        proc.wait(KILL_TIMEOUT_S)
        raise SandboxError("the sandbox's PID namespace ended before Case started")
    return SandboxProcess(proc=proc, child_pid=child, pid_ns=pid_ns, ns_fd=ns_fd)
