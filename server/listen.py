"""Take the listening socket before the model loads, so a busy port fails at once with a sentence.

uvicorn would only bind after the (slow) model load and the "serving … at :PORT" line; binding first and
handing the socket to uvicorn fails fast, and no other process can take the port while the model loads.

Several API processes (--api-server-count) each get a socket of their own on the one port (SO_REUSEPORT), and the
kernel spreads new connections evenly over them. One shared socket does not spread them: every process's event
loop wakes on a burst of connections and the first to run accepts all that are queued (asyncio accepts up to
uvicorn's backlog at a time), so one process ends up with most of the streams and becomes the bottleneck while
the others idle (seen on an H200 host: one API process at 0.9 of a core, three at 0.5-0.6). This is how nginx's
`reuseport` and gunicorn's `--reuse-port` spread load too. Elsewhere than Linux, SO_REUSEPORT does not balance
(on macOS the last socket bound takes every connection), so the processes share one socket there.
"""

from __future__ import annotations

import errno
import socket
import sys

from server.settings import SettingsError


def bind_port(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEADDR, as uvicorn sets it; SO_REUSEPORT too if asked, for a socket
    of `bind_ports`' group); SettingsError naming the fix if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def bind_ports(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to host:port for `count` API processes (see the module docstring): one socket each
    on Linux, one socket for all of them elsewhere. A busy port fails as `bind_port` says, including a port that
    another server holds with SO_REUSEPORT (a socket without the option may not join its group)."""
    first = bind_port(host, port)
    if count == 1 or not sys.platform.startswith("linux"):
        return [first]
    first.close()  # it proved the port free; the group's sockets all need SO_REUSEPORT from before their bind
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            group.append(bind_port(host, port, reuse_port=True))
    except SettingsError:  # another process took the port meanwhile: the same sentence as for a busy port
        for sock in group:
            sock.close()
        raise
    return group
