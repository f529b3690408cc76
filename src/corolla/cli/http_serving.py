"""Serving an ASGI app (the API, the monitor) on uvicorn from a command: bind first (a taken port is a one-line
error), then print the URLs (tests and scripts read them from stdout), then serve until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import socket
import sys


def bind(host: str, port: int, *, prog: str) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise SystemExit(f"{prog}: cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def serve(app, sock: socket.socket, lines: list[str]) -> None:
    """Print ``lines`` (each may contain ``{base}``, the server's http://host:port) and serve ``app`` on ``sock``."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    text = "".join(line.format(base=f"http://{host}:{port}") + "\n" for line in lines)
    try:  # one write: a parent that reads the first line and closes the pipe cannot break a second one
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # whoever started us stopped reading after the address; serve on regardless
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, log_config=None, access_log=False)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    uvicorn.Server(config).run(sockets=[sock])
