"""systemd's notification protocol (sd_notify(3)), for ``Task.serve()``.

When ``$NOTIFY_SOCKET`` names a datagram socket (a path, or ``@name`` for an
abstract one), a ``Type=notify`` service tells systemd it is ready
(``READY=1``), what it is doing (``STATUS=...``), that it is alive
(``WATCHDOG=1``, at least every half of ``$WATCHDOG_USEC`` when the unit sets
``WatchdogSec=``) and that it is stopping (``STOPPING=1``). Without the
variable every call does nothing. A send that fails is ignored: systemd's
own timeouts then say what went wrong, and a worker never stops over it.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    """One service's channel to systemd (or nothing, outside systemd)."""

    def __init__(self, address: str | None, watchdog_usec: int | None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls) -> "Notifier":
        """From ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` (honoured only when
        ``$WATCHDOG_PID`` is unset or this process, as sd_watchdog_enabled)."""
        addr = os.environ.get("NOTIFY_SOCKET") or None
        usec = None
        raw = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if raw and (not pid or pid == str(os.getpid())):
            try:
                usec = int(raw)
            except ValueError:
                usec = None
            if usec is not None and usec <= 0:
                usec = None
        return cls(addr, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1: half of WATCHDOG_USEC (None: no watchdog)."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), addr)
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
