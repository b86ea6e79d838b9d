"""Reading a tracked work's outcome from the domain (docs/contract.md
"Outcomes"): the one module below ``work`` that calls the core for it.

The records and the wake-up rule are the core's (native/tw_layout.h,
"outcome records"): a waiter sleeps on a futex word of the work's node and
is woken by whoever settles the work - the runner, a canceller, a filer, a
reaper. A retry of a callback that raised is queued again under a new id;
``look`` follows it, so a handle's outcome is that of its last attempt.
"""
from __future__ import annotations

import errno
from typing import Any

from . import errors
from ._native import check, ffi, lib

# TW_O_* -> the outcome's name
NAMES = {lib.TW_O_PENDING: "pending", lib.TW_O_RUNNING: "running", lib.TW_O_RAN: "ran",
         lib.TW_O_FAILED: "failed", lib.TW_O_CANCELLED: "cancelled",
         lib.TW_O_DEAD_LETTER: "dead_letter", lib.TW_O_INTERRUPTED: "interrupted"}
FINAL = frozenset(("ran", "failed", "cancelled", "dead_letter", "interrupted"))
# at most this many retries followed from one id (a callback's retries= is
# far below it): a forged chain of records cannot keep a reader looping
MAX_HOPS = 1 << 16


def look(dom: Any, work_id: int, sleep_ns: int, ident: str
         ) -> "tuple[str, bytes | None, str | None, int | None]":
    """(outcome, result, error, retried_as) of work ``work_id`` in ``dom``,
    sleeping at most ``sleep_ns`` first while it is not final (0: only look).
    A signal ends the sleep early: the outcome is then what it was."""
    d = dom.d
    cap = max(1, dom.payload_size)
    oi = ffi.new("struct tw_outcome_info *")
    data = ffi.new("char[]", cap)
    wid = work_id
    for _ in range(MAX_HOPS):
        rc = (lib.tw_outcome_wait(d, wid, sleep_ns, oi, data, cap) if sleep_ns > 0
              else lib.tw_outcome_read(d, wid, oi, data, cap))
        if rc == -errno.EINTR:
            rc = oi.outcome
        if rc == -errno.ENOENT:
            raise errors.OutcomeUnknownError(
                f"no outcome is recorded for work {ident}: it was not added with "
                f"track=True, or its record was reused after outcomes={dom.outcomes} newer "
                "tracked works settled")
        check(rc, "outcome")
        if rc == lib.TW_O_RETRIED:
            wid = int(oi.retried_as)   # a retry of its callback: follow it
            continue
        name = NAMES.get(rc)
        if name is None:
            raise errors.DomainCorruptError(f"work {ident}: outcome record says {rc}")
        result = error = None
        if rc == lib.TW_O_RAN and oi.reason:
            result = ffi.unpack(data, oi.len)
        elif rc == lib.TW_O_FAILED:
            error = ffi.unpack(data, oi.len).decode(errors="replace")
        return name, result, error, (int(oi.retried_as) or None)
    raise errors.DomainCorruptError(f"work {ident}: more than {MAX_HOPS} retries recorded")
