"""The ports a launch listens on: checked free before anything starts, and owned by this
launch's own processes before it counts as ready.

Rules:
- every port is checked before launch (``check_ports_free``): a port in use fails at once
  with the flag that set it, instead of a model load that ends in a bind error or, worse, a
  "ready" answered by whatever else listens there;
- port 0 means "pick a free port" (the kernel's choice, on the launch's host);
- readiness counts only if the listening socket on the port belongs to a process of the
  launch's own process group (``owns_listener``): the socket's inode in /proc/net/tcp{,6},
  found among that group's open files.
"""

from __future__ import annotations

import os
import socket
import time

from tritonkv.server.errors import ServerStartError
from tritonkv.server.process_tree import live_group_members

TCP_LISTEN = "0A"  # /proc/net/tcp st column


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR: TIME_WAIT does not count)."""
    with socket.socket(_family(host)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int]) -> dict[str, int]:
    """``{"--http-port": 8000, ...}`` -> the same with every 0 replaced by a free port.
    Raises ``ServerStartError`` naming the first flag whose port is in use (or given twice)."""
    chosen: dict[str, int] = {}
    for flag, port in ports.items():
        if port:
            if not 0 < port < 65536:
                raise ServerStartError(f"{flag} {port}: a port is 1-65535 (0: a free port)")
            twin = next((f for f, p in chosen.items() if p == port), None)
            if twin is not None:
                raise ServerStartError(f"{flag} {port}: the same port as {twin}; give each endpoint its own")
            if not port_free(host, port):
                raise ServerStartError(f"{flag} {port}: {host}:{port} is in use by another process "
                                       f"(choose another port, or 0 for a free one)")
        chosen[flag] = port
    taken = set(chosen.values())
    for flag, port in chosen.items():
        if not port:
            port = free_port(host)
            while port in taken:
                port = free_port(host)
            chosen[flag] = port
            taken.add(port)
    return chosen


def wait_ports_free(host: str, ports, timeout_s: float = 10.0) -> bool:
    """Wait until every port can be bound again (a relaunch on the old ports: tritonserver
    binds only after loading the models, so a port still held would cost a whole load)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [port for port in ports if not port_free(host, port)]
        if not busy or time.monotonic() >= deadline:
            return not busy
        time.sleep(0.1)


def listener_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == TCP_LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except (OSError, StopIteration):
            continue
    return inodes


def owns_listener(pgid: int, port: int, members: list[int] | None = None) -> bool:
    """Whether the socket listening on ``port`` is open in a process of group ``pgid``
    (``members``: that group's live processes, when the caller has them already)."""
    wanted = {f"socket:[{inode}]" for inode in listener_inodes(port)}
    if not wanted:
        return False
    for pid in live_group_members(pgid) if members is None else members:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return False
