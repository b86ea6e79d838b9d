"""The one module that touches the compiled core (``lib``).

Everything else calls the thin wrappers here; each return code is checked on
the line after the call and mapped to the exceptions of docs/contract.md "Errors" in one place
(:func:`check`). The layout version compiled into the extension is checked at
import, so a stale build fails loudly instead of misreading a segment.
"""
from __future__ import annotations

import weakref
from typing import Any

from . import errors

try:
    from ._taskwork_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - a build problem, said plainly
    raise ImportError(
        "shm_taskwork's native core is not built: run `make build` (or "
        "`pip install .`) in the source tree"
    ) from exc

from ._layout import LAYOUT_VERSION  # noqa: E402  (one number, in _layout)
if lib.tw_layout_version() != LAYOUT_VERSION:  # pragma: no cover
    raise ImportError(
        f"shm_taskwork native core has layout version {lib.tw_layout_version()}, "
        f"the Python package expects {LAYOUT_VERSION}: rebuild with `make build`"
    )

NIL = lib.TW_NIL
EXITED = lib.TW_EXITED

# node owner word
N_FREE, N_ALLOC, N_QUEUED, N_CANCELLING, N_DETACHED, N_RUNNING, N_DEADLETTER, N_DONE = (
    lib.TW_N_FREE, lib.TW_N_ALLOC, lib.TW_N_QUEUED, lib.TW_N_CANCELLING,
    lib.TW_N_DETACHED, lib.TW_N_RUNNING, lib.TW_N_DEADLETTER, lib.TW_N_DONE)

def owner_gen(o: int) -> int:
    return o >> 32


def owner_state(o: int) -> int:
    return (o >> 24) & 0xFF


def owner_aux(o: int) -> int:
    return o & 0xFFFFFF


SLOT_STATES = {lib.TW_SLOT_FREE: "free", lib.TW_SLOT_CLAIMING: "claiming",
               lib.TW_SLOT_RUNNING: "running", lib.TW_SLOT_EXITING: "exiting",
               lib.TW_SLOT_EXITED: "exited", lib.TW_SLOT_REAPING: "reaping"}

# why a node is a dead letter (node.reason)
REASONS = {lib.TW_R_UNKNOWN: "unknown_callback", lib.TW_R_ORPHANED: "orphaned",
           lib.TW_R_SHUTDOWN: "shutdown", lib.TW_R_FAILED: "failed",
           lib.TW_R_INTERRUPTED: "interrupted"}
REASON_CODES = {v: k for k, v in REASONS.items()}
#: every reason a dead letter may have, for ``dead_letters(reason=)``
DEAD_LETTER_REASONS = tuple(REASONS.values())

KILLPOINTS = {"after_alloc": lib.TW_KP_AFTER_ALLOC, "after_push": lib.TW_KP_AFTER_PUSH,
              "after_detach": lib.TW_KP_AFTER_DETACH, "in_pi_lock": lib.TW_KP_IN_PI_LOCK,
              "mid_pop": lib.TW_KP_MID_POP, "in_callback": lib.TW_KP_IN_CALLBACK,
              "in_claim": lib.TW_KP_IN_CLAIM, "in_register": lib.TW_KP_IN_REGISTER,
              "in_reap": lib.TW_KP_IN_REAP, "in_dl_file": lib.TW_KP_IN_DL_FILE,
              "in_detach": lib.TW_KP_IN_DETACH, "key_reserved": lib.TW_KP_KEY_RESERVED,
              "key_pushed": lib.TW_KP_KEY_PUSHED, "mid_batch_pop": lib.TW_KP_MID_BATCH_POP,
              "mid_batch_push": lib.TW_KP_MID_BATCH_PUSH,
              "in_notify": lib.TW_KP_IN_NOTIFY}


def check(rc: int, what: str, *, limit: str = "") -> int:
    """A native return code: >= 0 is returned, -errno raised as
    ``errors.from_errno`` says (README "Errors")."""
    if rc >= 0:
        return rc
    raise errors.from_errno(-rc, what, limit=limit)


class Scratch:
    """Buffers one native call copies a work into. Each user owns its own (a
    task's run loop, one call of cancel/read): a signal handler that runs
    between two bytecodes must never find them half-used by the code it
    interrupted, nor may another thread (cffi releases the GIL in calls)."""

    __slots__ = ("wi", "payload", "origin")

    def __init__(self, payload_size: int):
        self.wi = ffi.new("struct tw_work_info *")
        self.payload = ffi.new("char[]", max(1, payload_size))
        self.origin = ffi.new("char[]", lib.TW_ORIGIN_LEN)


def unpack_add(rc: int) -> tuple[int, int]:
    """tw_add's result -> (work id, due/done bits)."""
    return ((rc >> 28) << 32) | ((rc >> 4) & 0xFFFFFF), rc & 0xF


def start_ticks(pid: int) -> int:
    """Start time of a process in clock ticks since boot (/proc/PID/stat field
    22), 0 if it does not exist. With the pid it names one process for ever.
    A pid read from the segment may be anything: outside 1..2**31-1 it names
    no process."""
    if not 0 < pid <= 0x7FFFFFFF:
        return 0
    return lib.tw_proc_start_ticks(pid)


#: Every Domain this process maps (weak): the mapped core of this process,
#: for the calls that must find a process's other views of a segment.
OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()
