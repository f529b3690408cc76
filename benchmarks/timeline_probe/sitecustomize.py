"""Timeline probe for ``bench_step_timeline.py``: with ``COROLLA_TIMELINE_DIR`` set, every Python process that
starts with this folder on ``PYTHONPATH`` (the servers of a local swarm) notes when it enters and leaves the
functions of a step's path, as ``<perf_counter_ns> <pid> <event>`` lines in ``<dir>/timeline_<pid>.txt``.

``perf_counter`` is CLOCK_MONOTONIC on Linux, shared by the processes of one machine, so the events of the client
and of the servers line up on one time axis. Each event costs a few microseconds (one ``write``).
"""

from __future__ import annotations

import functools
import os
import time

_fd: int | None = None

# (module, object path, event name): where a step's time goes, client side (C.) and server side (S.)
PROBES = (
    ("corolla.client.inference_session", "InferenceSession.step", "C.step"),
    ("corolla.client.inference_session", "_ServerStream.step", "C.hop"),
    ("corolla.server.handler", "BlockServicer._step", "S.step"),
    ("corolla.server.handler", "pack", "S.pack_push"),
    ("corolla.server.handler", "pack_response", "S.pack_answer"),
    ("corolla.server.backend", "SpanBackend.step", "S.backend"),
    ("corolla.server.backend", "_run_steps", "S.model"),
)


def note(event: str) -> None:
    global _fd
    if _fd is None:
        folder = os.environ["COROLLA_TIMELINE_DIR"]
        _fd = os.open(f"{folder}/timeline_{os.getpid()}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(_fd, f"{time.perf_counter_ns()} {os.getpid()} {event}\n".encode())


def _wrapped(function, event: str):
    import inspect

    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args, **kwargs):
            note(event + ">")
            try:
                return await function(*args, **kwargs)
            finally:
                note(event + "<")

        return timed_async

    @functools.wraps(function)
    def timed(*args, **kwargs):
        note(event + ">")
        try:
            return function(*args, **kwargs)
        finally:
            note(event + "<")

    return timed


def install() -> None:
    """Wrap the functions of ``PROBES`` (the server's are wrapped before it builds its backend)."""
    import importlib

    for module_name, path, event in PROBES:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, _wrapped(getattr(owner, name), event))


if os.environ.get("COROLLA_TIMELINE_DIR"):
    install()
