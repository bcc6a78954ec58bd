"""Take the listening socket before the model loads, so a busy port fails at once with a sentence.

uvicorn would only bind after the (slow) model load and the "serving … at :PORT" line; binding first and
handing the socket to uvicorn fails fast, and no other process can take the port while the model loads.
"""

from __future__ import annotations

import errno
import socket

from server.settings import SettingsError


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEADDR, as uvicorn sets it); SettingsError naming the fix if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise SettingsError(
                f"port {port} on {host} is already in use (another server?): stop that process "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another port with --port N or MINIMIND_PORT"
            ) from None
        if err.errno == errno.EACCES:
            raise SettingsError(
                f"no permission to listen on port {port}: ports below 1024 need root; choose --port 1024 or above"
            ) from None
        raise SettingsError(f"cannot listen on {host}:{port} ({err.strerror}); check --host and --port") from None
    return sock
