"""Keyed adds: a work queued at most once per key (docs/contract.md "Beyond one host: the bridge", the bridge).

``task.add_keyed(func, payload, notify, key=...)`` records the key in the
domain's key table before the push, so a caller that died after the push and
is started again (or another process with the same key) learns that the work
was queued - maybe already run - instead of queueing it twice; a key whose
adder died before the push is known as never pushed and may be added anew.

The table is a ring of ``KEYS_CAP`` (4096) entries per domain: a key is
remembered until that many newer keyed adds were made in the domain. Keys are
strings (or bytes), hashed to 64 bits (BLAKE2b).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import time
from typing import TYPE_CHECKING

from . import callbacks
from ._native import check, ffi, lib
from .callbacks import task_name_id
from .errors import KeyBusyError, from_errno

__all__ = ["KeyBusyError", "KeyRecord", "lookup", "dead_letter", "used", "key_id"]

if TYPE_CHECKING:
    from .domain import Domain

KEYS_CAP: int = lib.TW_KEYS_CAP
STATES = {lib.TW_K_QUEUED: "queued", lib.TW_K_DEADLETTER: "dead_letter"}


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What the key table says of a key."""
    state: str        # "queued" or "dead_letter"
    work_id: int      # the work's id in its domain (gen << 32 | node)
    slot: int         # the task slot it was queued on ("queued")
    fresh: bool       # True: this call queued it


def key_id(key: "str | bytes") -> int:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    v = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return v or 1


def _record(info) -> KeyRecord:
    return KeyRecord(STATES.get(info.state, "queued"), int(info.work), int(info.slot),
                     bool(info.fresh))


def _busy(rc: int, key) -> None:
    """A keyed call's EBUSY/ENOSPC as errors.from_errno raises them."""
    if rc in (-errno.EBUSY, -errno.ENOSPC):
        raise from_errno(-rc, "add_keyed", key=key)


def lookup(dom: "Domain", key: "str | bytes") -> KeyRecord | None:
    """The record of ``key``, or None if it is unknown (or was never pushed)."""
    info = ffi.new("struct tw_key_info *")
    rc = lib.tw_key_lookup(dom.d, key_id(key), info)
    _busy(rc, key)
    check(rc, "key lookup")
    return _record(info) if rc == 1 else None


def dead_letter(dom: "Domain", key: "str | bytes", func_name: str, payload: bytes,
                target_name: str) -> KeyRecord:
    """File a work for ``target_name`` (no live task of that name) as an
    orphaned dead letter, once per key."""
    fid = callbacks.func_id(func_name)
    dom._put_name(fid, func_name)
    nid = task_name_id(target_name)
    dom._put_name(nid, "task:" + target_name)
    info = ffi.new("struct tw_key_info *")
    rc = lib.tw_deadletter_keyed(dom.d, key_id(key), fid, payload, len(payload), nid,
                                 time.monotonic_ns(), info)
    _busy(rc, key)
    check(rc, "dead letter", limit=f"payload_size={dom.payload_size}")
    return _record(info)


def used(dom: "Domain") -> int:
    return int(lib.tw_keys_used(dom.d))
