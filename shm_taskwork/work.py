"""Work: what a callback receives and what ``add`` returns, and the outcome
of a tracked work (docs/contract.md "Outcomes")."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from . import outcomes as _outcomes
from .outcomes import FINAL

# A waiter sleeps on a futex in slices of at most this long, so that a
# Python signal handler the interpreter owes runs within it (a signal that
# arrives during the sleep ends it at once). Not a poll: the settler wakes it.
_WAIT_SLICE_S = 0.25

# (domain, work id) of the works this process cancelled, newest last and
# bounded: a handle still saying "pending" looks here when its state is read,
# so a cancel_func / cancel_match that removed its work makes it say
# "cancelled" too, at no cost to add().
_CANCELLED: dict[tuple[str | None, int], None] = {}
_CANCELLED_MAX = 1 << 16


def note_cancelled(domain: str | None, work_id: int) -> None:
    """Remember that this process cancelled the work ``work_id``."""
    _CANCELLED[(domain, work_id)] = None
    if len(_CANCELLED) > _CANCELLED_MAX:
        del _CANCELLED[next(iter(_CANCELLED))]


class Work:
    """One queued (or queueable) work.

    ``id`` is unique per add within a domain: the pool node's generation in the
    upper 32 bits and the node index in the lower, so a handle never matches a
    later work that reuses the same node. ``enqueued_ns`` is CLOCK_MONOTONIC.

    ``state`` is one of ``"unqueued"``, ``"pending"``, ``"running"``,
    ``"cancelled"``, ``"dead-letter"``, ``"orphaned"``, ``"interrupted"``. A
    handle returned by ``add`` says ``"cancelled"`` once this process cancelled
    its work, by ``cancel()``, ``cancel_func()`` or ``cancel_match()``; that it
    ran elsewhere is not tracked (it keeps saying ``"pending"``).
    """

    # A Work made by add() or by a run is light: it is built with only the
    # fields a callback reads at once (func_name, func_id, payload, ...) and a
    # source (_src, _i) from which the others are filled in on first access
    # (__getattr__ runs only for a slot that was never set). One made with
    # Work(...) has every field from the start.
    __slots__ = ("func_name", "func_id", "payload", "sender_pid", "target", "target_gen",
                 "enqueued_ns", "origin", "id", "domain", "_state", "reason", "target_name",
                 "attempt", "error", "_src", "_i", "_tracked", "_dom", "_out")

    def __init__(self, func_name: str, func_id: int, payload: bytes, *, sender_pid: int = 0,
                 target: int = -1, target_gen: int = 0, enqueued_ns: int = 0,
                 origin: str | None = None, id: int | None = None, domain: str | None = None,
                 state: str = "unqueued", reason: str | None = None,
                 target_name: str | None = None, attempt: int = 0, error: str | None = None):
        self.func_name = func_name
        self.func_id = func_id
        self.payload = payload
        self.sender_pid = sender_pid
        self.target = target
        self.target_gen = target_gen
        self.enqueued_ns = enqueued_ns
        self.origin = origin
        self.id = id
        self.domain = domain
        self._state = state
        # dead letters (docs/contract.md "Lifecycle without an operator"): why it is one ("unknown_callback" or
        # "orphaned"), and the name of the task it was for
        self.reason = reason
        self.target_name = target_name
        # a callback that raised (README "Workers in production"): the run
        # it is in (0 first), and, for a "failed" dead letter, the error
        self.attempt = attempt
        self.error = error

    def __getattr__(self, name: str) -> Any:
        # Only reached for a slot never set: a light Work's lazy field, or
        # the outcome fields of a work that is not tracked.
        if name in _UNTRACKED:
            object.__setattr__(self, name, None if name != "_tracked" else False)
            return object.__getattribute__(self, name)
        if name not in _LAZY:
            raise AttributeError(f"'Work' object has no attribute {name!r}")
        get = object.__getattribute__
        try:
            src, i = get(self, "_src"), get(self, "_i")
        except AttributeError:
            raise AttributeError(f"'Work' object has no attribute {name!r}") from None
        for key, value in src.lazy_fields(i):
            try:
                get(self, key)
            except AttributeError:  # not set yet (a value set by hand is kept)
                object.__setattr__(self, key, value)
        return get(self, name)

    def __reduce__(self) -> Any:
        return (_rebuild, (self.func_name, self.func_id, self.payload, self.sender_pid,
                           self.target, self.target_gen, self.enqueued_ns, self.origin, self.id,
                           self.domain, self._state, self.reason, self.target_name,
                           self.attempt, self.error))

    @property
    def state(self) -> str:
        if self._state == "pending" and (self.domain, self.id) in _CANCELLED:
            self._state = "cancelled"
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    # ---- the outcome of a tracked work (docs/contract.md "Outcomes") ------

    @property
    def tracked(self) -> bool:
        """Whether this work's outcome is recorded (``add(..., track=True)``)."""
        return bool(self._tracked)

    @property
    def outcome(self) -> str | None:
        """``pending``, ``running``, or a final outcome: ``ran``, ``failed``,
        ``cancelled``, ``dead_letter``, ``interrupted``. None for a work
        that is not tracked. Read from the domain each time until final."""
        if not self._tracked:
            return None
        if self._out is not None:
            return self._out[0]
        return self._look(0)

    @property
    def result(self) -> bytes | None:
        """The bytes the callback returned, once the outcome is ``ran``
        (None for any other return value, or any other outcome)."""
        if self._tracked and self._out is None:
            self._look(0)
        out = self._out
        return out[1] if out is not None and out[0] == "ran" else None

    @property
    def retried_as(self) -> int | None:
        """The id this dead letter was queued again as (``retry_dead_letters``,
        a worker's adoption), or None: follow it with ``dom.work(id)``."""
        if self._tracked and self._out is None:
            self._look(0)
        out = self._out
        return out[2] if out is not None else None

    def wait(self, timeout: float | None = None) -> str:
        """Block until the outcome is final and return it; ``TimeoutError``
        at the deadline (the work is left as it is). The waiter sleeps in
        the kernel, woken by whoever settles the work."""
        return self._wait(timeout, None)

    async def wait_async(self, timeout: float | None = None) -> str:
        """``wait()`` for asyncio: the sleep happens in a worker thread; a
        cancelled await stops it within one slice."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._wait, timeout, stop)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _wait(self, timeout: float | None, stop: "threading.Event | None") -> str:
        if not self._tracked:
            raise ValueError(f"work {self._ident()} is not tracked: add it with track=True "
                             "to wait for its outcome")
        if timeout is not None and (timeout != timeout or timeout < 0):
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._out is not None:
                return self._out[0]
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError()
            left = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                now = self._look(0)
                if now in FINAL:
                    return now
                raise TimeoutError(f"work {self._ident()} is still {now} after {timeout} s")
            if self._look(int(min(left, _WAIT_SLICE_S) * 1e9)) not in FINAL:
                # Still pending or running after a slice: if its task's
                # process died, the waiter reaps it (as an adder would), which
                # settles the work (dead_letter, or interrupted if it had
                # started); otherwise nothing.
                self._dom._reap_if_dead(self.target)

    def _look(self, sleep_ns: int) -> str:
        """Read the outcome (sleeping at most sleep_ns first if it is not
        final); cache it once final."""
        name, result, error, retried_as = _outcomes.look(self._dom, self.id, sleep_ns,
                                                         self._ident())
        if name in FINAL:
            if error is not None:
                self.error = error
            self._out = (name, result, retried_as)
        return name

    def _ident(self) -> str:
        return f"{self.id:#x}" if isinstance(self.id, int) else repr(self.id)

    @property
    def node(self) -> int | None:
        return None if self.id is None else self.id & 0xFFFFFFFF

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "func_name": self.func_name, "payload": self.payload.hex(),
                "sender_pid": self.sender_pid, "target": self.target,
                "enqueued_ns": self.enqueued_ns, "origin": self.origin, "state": self.state,
                "reason": self.reason, "target_name": self.target_name,
                "attempt": self.attempt, "error": self.error}

    @property
    def value(self) -> Any:
        """The object the payload holds, decoded with the codec recorded for
        its callback in the work's domain (docs/contract.md "Codecs"); for a
        raw callback (no codec) the payload bytes themselves. Decoded on each
        read. ValueError if the payload is not valid in that codec, or the
        process declared another codec for the callback; PermissionError for
        pickle in a domain another user can write."""
        return _value(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Work):
            return NotImplemented
        return (self.id is not None and self.id == other.id and self.domain == other.domain
                and self.target == other.target)

    def __hash__(self) -> int:
        return hash((self.domain, self.target, self.id))

    def __repr__(self) -> str:
        if self.id is None:
            ident = "unqueued"
        else:  # a handle built by hand may carry anything
            ident = f"id={self.id:#x}" if isinstance(self.id, int) else f"id={self.id!r}"
        why = f", reason={self.reason}" if self.reason else ""
        return (f"Work({self.func_name!r}, {ident}, target={self.target}, "
                f"payload={len(self.payload)}B, state={self.state}{why})")


_UNTRACKED = frozenset(("_tracked", "_dom", "_out"))
_LAZY = frozenset(("func_name", "func_id", "sender_pid", "target", "target_gen", "enqueued_ns",
                   "origin", "id", "domain", "_state", "reason", "target_name", "attempt",
                   "error"))


def _rebuild(func_name: str, func_id: int, payload: bytes, sender_pid: int, target: int,
             target_gen: int, enqueued_ns: int, origin: str | None, id: int | None,
             domain: str | None, state: str, reason: str | None,
             target_name: str | None, attempt: int = 0, error: str | None = None) -> Work:
    return Work(func_name, func_id, payload, sender_pid=sender_pid, target=target,
                target_gen=target_gen, enqueued_ns=enqueued_ns, origin=origin, id=id,
                domain=domain, state=state, reason=reason, target_name=target_name,
                attempt=attempt, error=error)


import typing  # noqa: E402  (for the hook's type, with the codec helpers below)

#: set by the domain layer (domain.py): (domain name, callback id) -> the
#: codec name Work.value decodes with (None: raw bytes); a low layer cannot
#: read the name table itself
CODEC_OF: "list[typing.Callable[[str | None, int], str | None]]" = []


def _value(work: Work) -> Any:
    from . import codec  # a lower layer; imported here to keep this one self-contained

    name = CODEC_OF[0](work.domain, work.func_id) if CODEC_OF else None
    if name is None:
        return work.payload
    return codec.decode(name, work.payload, f"the payload of work {work.func_name!r}")
