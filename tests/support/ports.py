"""Free loopback TCP ports for test servers.

``free_port()`` binds port 0 on 127.0.0.1 and returns what the kernel chose; ``free_ports(n)``
returns n distinct ports. Ports handed out in this process are remembered and never handed
out twice, so two fixtures started in the same test cannot collide with each other (another
process can still race for a port in the short window before the server binds it; callers
that start daemons retry on a bind failure where that matters).
``wait_port(port)`` polls until something accepts on it.

Security: only ever binds or connects to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time

LOOPBACK = "127.0.0.1"
_given: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that is free now and not handed out before in this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _lock:
            if port not in _given:
                _given.add(port)
                return port
    raise RuntimeError("no free loopback port found")


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    return [free_port(host) for _ in range(n)]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, host: str = LOOPBACK, deadline: float = 30.0, proc=None) -> None:
    """Poll until ``host:port`` accepts a connection; raise TimeoutError after ``deadline`` s.

    If ``proc`` (a ``subprocess.Popen``) exits meanwhile, raise RuntimeError at once.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if port_open(port, host):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        time.sleep(0.05)
    raise TimeoutError(f"nothing accepts on {host}:{port} after {deadline} s")


def wait_closed(port: int, host: str = LOOPBACK, deadline: float = 30.0) -> None:
    """Poll until ``host:port`` refuses connections."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not port_open(port, host):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still accepts after {deadline} s")


def wait_greeting(
    port: int, host: str = LOOPBACK, deadline: float = 30.0, what: str = "SMTP"
) -> None:
    """Wait until a server on ``host:port`` answers with a ``220`` greeting, then QUIT."""
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} greeting on {host}:{port}")
        time.sleep(0.1)
