"""The bridge's wake-up: a sender publishes on its stream's wake channel in
the same round trip as its XADD, and a bridge waiting for entries wakes at
once instead of at its next poll (docs/contract.md "Beyond one host: the
bridge", "Wake-ups").

A wake-up is only a hint that carries nothing: the bridge still reads the
entries with its capped read script, and without wake-ups (a sender that does
not publish, a channel lost) it finds them at its next poll, as before. So a
member that publishes on a wake channel can make a bridge read more often,
never read anything else. What a subscriber receives is bounded by Redis
itself: a subscriber whose output buffer passes the server's
``client-output-buffer-limit pubsub`` (32 MiB by default) is disconnected, so
a huge message ends this connection, not the bridge; the channels are
subscribed again at the next ``follow()``.

Invariant (no lost wake-up): a channel is subscribed before the read that
decides to wait, and every message is drained before each read. A message
published after that read waits in the subscription's socket, so the wait
that follows returns at once.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

#: the suffix of a stream's wake channel
SUFFIX = ":wake"
#: messages read from the socket in one drain at most (a flood is cut off)
DRAIN_MAX = 1024


def channel(stream: str) -> str:
    """The wake channel of a work or control stream."""
    return stream + SUFFIX


class Wake:
    """One subscription connection of a bridge's read loop."""

    def __init__(self, r: Any, log: Callable[[str], None]):
        self.r, self.log = r, log
        self.ps: Any = None
        self.channels: set[str] = set()
        self.failures = 0

    @property
    def up(self) -> bool:
        """Subscribed: a wait() can end early."""
        return self.ps is not None

    def follow(self, streams: Iterable[str]) -> None:
        """Subscribe to the wake channels of ``streams`` (and only those);
        after a failure, the connection is made again here."""
        want = {channel(s) for s in streams}
        try:
            if self.ps is None:
                self.ps = self.r.pubsub(ignore_subscribe_messages=True)
                self.channels = set()
            gone, new = self.channels - want, want - self.channels
            if gone:
                self.ps.unsubscribe(*sorted(gone))
            if new:
                self.ps.subscribe(*sorted(new))
            self.channels = want
        except Exception as exc:    # never fatal: the read loop polls instead
            self._fail(exc)

    def drain(self) -> None:
        """Drop the wake-ups received so far (the read about to start covers
        them)."""
        if self.ps is None:
            return
        try:
            for _ in range(DRAIN_MAX):
                if self.ps.get_message(timeout=0.0) is None:
                    return
        except Exception as exc:
            self._fail(exc)

    def wait(self, timeout: float) -> bool:
        """Sleep until a wake-up arrives or ``timeout`` seconds pass; True if
        woken. Without a subscription, this is a plain sleep."""
        if self.ps is None:
            time.sleep(timeout)
            return False
        try:
            return self.ps.get_message(timeout=timeout) is not None
        except Exception as exc:
            self._fail(exc)
            return False

    def close(self) -> None:
        if self.ps is not None:
            try:
                self.ps.close()
            except Exception:
                pass
            self.ps = None

    def _fail(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures <= 10 or self.failures % 1000 == 0:
            self.log(f"wake-up channel: {type(exc).__name__}; polling until it is "
                     "subscribed again")
        self.close()
