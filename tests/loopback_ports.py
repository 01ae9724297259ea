"""Loopback ports for the deployment tests, without the free-port race.

Asking the kernel for a free port (bind to port 0, read it, close) and handing it
to Flower leaves a window in which the port is free again: the kernel can give it to
any outgoing connection on the machine as its source port (the tests' own health
polls and ``flwr`` calls included), and another test run can draw the same number.
Flower then fails to bind and the test times out waiting for a process that
exited.

A :class:`PortLease` closes both gaps:

- it draws from below the kernel's ephemeral range
  (``/proc/sys/net/ipv4/ip_local_port_range``), which the kernel never assigns as a
  source port, so only a process that binds a number explicitly can take one;
- it holds an exclusive ``flock`` on a per-port file in the system's temporary
  folder until the test ends, so concurrent test runs on the machine never lease
  the same port; and it skips a port something already listens on.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "fedgraft-test-ports"
#: How many ports below the ephemeral range the lease draws from.
SPAN = 8_000


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a source port (32768 if unknown)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    """Nothing on the machine holds ``port`` on 127.0.0.1 right now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortLease:
    """Ports reserved for one test until :meth:`release`.

    The search starts at an offset taken from the process id, so that concurrent
    runs seldom even contend for the same lock.
    """

    def __init__(self) -> None:
        self._held: dict[int, int] = {}  # port -> descriptor of its locked file

    def take(self) -> int:
        """A port that no other lease holds and nothing listens on.

        Raises
        ------
        RuntimeError
            When every port of the range is taken.
        """
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        high = _ephemeral_low() - 1
        low = max(1_024, high - SPAN)
        count = high - low + 1
        start = (os.getpid() * 7_919) % count
        for step in range(count):
            port = low + (start + step) % count
            if port in self._held:
                continue
            descriptor = os.open(LOCK_DIR / f"{port}.lock", os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            if not _bindable(port):
                os.close(descriptor)  # closing drops the lock
                continue
            self._held[port] = descriptor
            return port
        raise RuntimeError(f"no free port in {low}..{high} for a loopback deployment")

    def release(self) -> None:
        """Give every port back (closing a descriptor drops its lock)."""
        for descriptor in self._held.values():
            os.close(descriptor)
        self._held.clear()
