"""Start many ``corolla`` processes quickly: fork them from a warm process that has imported their libraries once.

Before it does anything, a ``corolla serve`` spends ~3 s of CPU importing torch, transformers and hivemind (2.4 s of
it is ``import torch``). A test suite or a benchmark that starts hundreds of short-lived peers on two cores pays that
again and again, and peers started together slow each other down. :class:`WarmSpawner` starts one helper process, with
the environment its children will have, that imports those libraries once and then forks a child per request. Each
child runs the ``corolla`` command as ``python -m corolla.cli.main ARGS`` would: its own session (it leads its
process group), the stdin/stdout/stderr and working directory the caller passed, the same exit code (negative for a
signal), its exit handlers run. :class:`WarmProcess` is the caller's handle on a child, with the parts of
``subprocess.Popen`` that :class:`corolla.local_swarm.LocalSwarm` uses.

LocalSwarm uses it when ``COROLLA_WARM_SPAWN=1`` (the test suite sets it). Cold-start measurements must not: a forked
peer skips exactly the imports they measure. When the caller goes away (its end of the socket closes), the helper kills
the children that are still running and exits.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO

from corolla.log import get_logger

logger = get_logger(__name__)

# what every ``corolla`` command imports before its work starts; model code of the families tests use most
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama",
    "hivemind.dht",
    "hivemind.p2p",
    "corolla.cli.main",
    "corolla.cli.serve_cmd",
    "corolla.cli.dht_cmd",
    "corolla.cli.stage_cmd",
    "corolla.server.server",
    "corolla.models.span",
)
ENTRY_MODULE = "corolla.cli.main"  # the `corolla` command
_MAX_MESSAGE = 1 << 16
_START_TIMEOUT_S = 120.0


class WarmSpawner:
    """One warm helper process (started with ``env``) that forks ``corolla`` commands on request."""

    def __init__(self, env: dict[str, str], *, preload: Sequence[str] = PRELOAD) -> None:
        self.env = dict(env)
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        self._exit_codes: dict[int, int] = {}
        self._spawned: list[int] = []
        self._running: set[int] = set()  # children whose exit the helper has not reported yet
        # the helper's own output goes to a file, never to the caller's pipes (a reader waiting for the end of the
        # caller's output must not wait for the helper too)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - read if the helper fails, closed with it
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "corolla.warm_spawn", str(theirs.fileno()), ",".join(preload)],
            env=self.env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,  # the caller's Ctrl-C is not the helper's: it stops when the caller goes
        )
        theirs.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._pump(timeout_s=0.2).get("ready"):
            if self._helper.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                output = self._log.read().decode(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"the warm spawner did not start within {_START_TIMEOUT_S:.0f} s:\n{output}")

    @property
    def alive(self) -> bool:
        return self._helper.poll() is None and self._sock.fileno() >= 0

    @property
    def running(self) -> int:
        """How many of its children have not exited yet (as far as the helper has reported)."""
        with self._lock:
            self._pump_locked(timeout_s=0.0)
            return len(self._running)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        script: str | None = None,
        stdin: int | IO | None = None,
        stdout: int | IO | None = None,
        stderr: int | IO | None = None,
        text: bool = False,
        cwd: str | None = None,
    ) -> WarmProcess:
        """A child running ``corolla ARGV`` with ``env`` as its ``os.environ`` (default: the helper's own). What the
        libraries read at import time (e.g. log levels) comes from the helper's environment: :func:`shared_spawner`
        keeps one helper per environment. ``script``: run this Python file with ARGV (as ``python SCRIPT ARGV``,
        e.g. a test's server that misbehaves on purpose) instead of ``corolla ARGV``. ``stdout=subprocess.PIPE``
        gives ``WarmProcess.stdout`` to read, ``stderr=subprocess.STDOUT`` sends stderr there too, None inherits the
        caller's stream."""
        opened: list[int] = []  # our copies of the child's descriptors, closed once it has its own

        def fd_of(stream, default: int) -> int:
            if stream is None:
                return default
            if stream == subprocess.DEVNULL:
                opened.append(os.open(os.devnull, os.O_RDWR))
                return opened[-1]
            return stream if isinstance(stream, int) else stream.fileno()

        read_end = None
        if stdout == subprocess.PIPE:
            read_end, stdout_fd = os.pipe()
            opened.append(stdout_fd)
        else:
            stdout_fd = fd_of(stdout, 1)
        stderr_fd = stdout_fd if stderr == subprocess.STDOUT else fd_of(stderr, 2)
        request = {"argv": list(argv), "cwd": cwd or os.getcwd(), "env": env or self.env, "script": script}
        try:
            with self._lock:
                socket.send_fds(self._sock, [json.dumps(request).encode()], [fd_of(stdin, 0), stdout_fd, stderr_fd])
                deadline = time.monotonic() + 30
                while not self._spawned:
                    self._pump_locked(timeout_s=0.2)
                    if self._helper.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the warm spawner did not fork the process")
                pid = self._spawned.pop(0)
                self._running.add(pid)
        except BaseException:
            if read_end is not None:
                os.close(read_end)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        pipe = None
        if read_end is not None:
            pipe = open(read_end, "r" if text else "rb")  # noqa: SIM115 - the caller reads and closes it
        return WarmProcess(self, pid, [script or "corolla", *argv], pipe)

    def exit_code(self, pid: int, timeout_s: float = 0.0) -> int | None:
        """The child's exit code once the helper reported it (waiting up to ``timeout_s``), else None."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if pid in self._exit_codes:
                    return self._exit_codes[pid]
                if not self.alive:  # the helper killed its children as it went, unless it was killed itself
                    return None if os.path.exists(f"/proc/{pid}") else self._exit_codes.get(pid, -signal.SIGKILL)
                remaining = deadline - time.monotonic()
                self._pump_locked(timeout_s=max(0.0, min(remaining, 0.1)))
                if pid in self._exit_codes:
                    return self._exit_codes[pid]
            if remaining <= 0:
                return None

    def close(self) -> None:
        """Close the helper: it kills the children still running (their whole groups) and exits."""
        try:
            self._sock.close()
        finally:
            try:
                self._helper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait(timeout=5)
            self._log.close()

    def _pump(self, timeout_s: float) -> dict:
        with self._lock:
            return self._pump_locked(timeout_s)

    def _pump_locked(self, timeout_s: float) -> dict:
        """Read the helper's messages that arrived (waiting up to ``timeout_s`` for the first); returns the last."""
        last: dict = {}
        while True:
            readable, _, _ = select.select([self._sock], [], [], timeout_s)
            if not readable:
                return last
            data = self._sock.recv(_MAX_MESSAGE)
            if not data:
                return last
            last = json.loads(data)
            if "spawned" in last:
                self._spawned.append(last["spawned"])
            elif "exited" in last:
                self._exit_codes[last["exited"]] = last["code"]
                self._running.discard(last["exited"])
            timeout_s = 0.0


# variables that change while the caller runs and mean nothing to a child: not a reason for another helper
_VOLATILE = ("PYTEST_CURRENT_TEST",)
_MAX_HELPERS = 3
_shared: dict[frozenset, WarmSpawner] = {}
_shared_lock = threading.Lock()


def shared_spawner(env: dict[str, str]) -> WarmSpawner:
    """The helper of this process for ``env`` (started on first use, closed at exit). At most a few are kept: an
    older one without running children is closed when another environment needs one."""
    key = frozenset((k, v) for k, v in env.items() if k not in _VOLATILE)
    with _shared_lock:
        spawner = _shared.pop(key, None)
        if spawner is None or not spawner.alive:
            if not _shared:
                atexit.register(_close_shared)
            for old_key, old in list(_shared.items()):
                if len(_shared) < _MAX_HELPERS:
                    break
                if old.running == 0:
                    old.close()
                    del _shared[old_key]
            spawner = WarmSpawner({k: v for k, v in env.items() if k not in _VOLATILE})
        _shared[key] = spawner  # most recently used last
        return spawner


def _close_shared() -> None:
    with _shared_lock:
        for spawner in _shared.values():
            spawner.close()
        _shared.clear()


class WarmProcess:
    """A child of a :class:`WarmSpawner`, driven like ``subprocess.Popen``."""

    def __init__(self, spawner: WarmSpawner, pid: int, args: list[str], stdout: IO | None) -> None:
        self._spawner = spawner
        self.pid = pid
        self.args = args
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._spawner.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self._spawner.exit_code(self.pid, timeout_s=min(remaining, 1.0))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<WarmProcess pid={self.pid} returncode={self.returncode} args={self.args!r}>"


# ---- the helper process ---------------------------------------------------------------------------------------------
def _serve(sock: socket.socket, preload: Sequence[str]) -> None:
    from corolla import startup

    startup.install()
    for name in preload:
        importlib.import_module(name)
    sock.send(json.dumps({"ready": True}).encode())
    children: set[int] = set()
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
                if not data:
                    return  # the caller closed its end (or went away)
                pid = os.fork()
                if pid == 0:
                    _run_child(sock, json.loads(data), fds)  # never returns
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                sock.send(json.dumps({"spawned": pid}).encode())
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        for pid in children:  # the caller is gone: leave nothing behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _run_child(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become ``corolla ARGV`` in a session of its own, then exit with its code."""
    code = 1
    try:
        sock.close()
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds) - {0, 1, 2}:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request.get("script")
        sys.argv = [script or sys.argv[0], *request["argv"]]
        if "numpy" in sys.modules:  # ``random`` reseeds itself after a fork; numpy's global state does not
            sys.modules["numpy"].random.seed()
        if script:
            import runpy

            sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` sets it
            runpy.run_path(script, run_name="__main__")
            code = 0
        else:  # what `python -m corolla.cli.main ARGV` runs, named as that command names it
            code = importlib.import_module(ENTRY_MODULE).main(request["argv"])
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    sys.stderr.write(f"{value}\n")
    return 1


def _exit(code: int) -> None:
    """Leave as the interpreter would: wait for non-daemon threads, run exit handlers, flush, exit."""
    try:
        threading._shutdown()  # what interpreter shutdown does first
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code & 0xFF if code >= 0 else 1)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])), [name for name in sys.argv[2].split(",") if name])
    # its children are gone (``_serve`` killed those still running) and it holds nothing to save: skip the
    # interpreter's teardown of torch & co. (~1-2 s of CPU), which the caller's ``close`` (and its exit) waits for
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
