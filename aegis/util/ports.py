"""Whether a TCP port is free to serve on, and who holds it when it is not."""
from __future__ import annotations

import socket

import psutil

RENDEZVOUS_OFFSET = 20000  # a spanning instance's rendezvous port (vLLM --master-port, Ray's GCS) is its port + this


def rendezvous_port(port: int) -> int:
    """The port where the nodes of a multi-node instance meet, derived from its serving port."""
    return port + RENDEZVOUS_OFFSET if port + RENDEZVOUS_OFFSET <= 65535 else port - RENDEZVOUS_OFFSET


def holder(port: int) -> str:
    """Who listens on `port` on this machine: 'pid N (name, user U)', or what can be said without it."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        conns = []
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({proc.name()}, user {proc.username()})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "another process"


def taken(host: str, port: int) -> str | None:
    """None when `port` on `host` can be listened on; else who holds it (one phrase)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None  # the engine will report a name it cannot bind to itself
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no holder
        try:
            sock.bind(addr)
        except OSError:
            return holder(port)
    return None
