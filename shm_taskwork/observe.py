"""Read-only views of a domain for the operator tools.

Everything ``shm-taskwork status``, ``top``, ``list``, ``fsck`` and
``export`` need beyond the public ``Domain`` API, in one place, so that
``tools/`` never reach into the segment themselves (no ``ffi``, no private
attribute). Nothing here writes the segment or takes a lock for longer than
``Domain.READ_LOCK_BUDGET``; every string read from the segment is returned
as it is (escape it with ``domain.printable`` before showing it).
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._layout import LAYOUT_VERSION, MAGIC
from ._native import ffi, lib
from .callbacks import TASK_NAME_PREFIX

if TYPE_CHECKING:
    from .domain import Domain

__all__ = ["LAYOUT_VERSION", "HIST_LE", "Histogram", "SegmentHeader", "open_regular",
           "segment_header", "slot_owner", "dead_letter_count", "table_fill",
           "task_histograms", "callback_histograms", "oldest_pending_ns"]

# The runner's histograms (struct tw_hist): bucket k counts values below
# 2**(k + 10) ns (and at least half that, for k > 0); the last has no bound.
HIST_LE = [2 ** (k + lib.TW_HIST_SHIFT) / 1e9 for k in range(lib.TW_HIST_BUCKETS - 1)] + [
    float("inf")]


@dataclass(frozen=True)
class Histogram:
    """One histogram of the segment: per-bucket counts (not cumulative; the
    bounds are ``HIST_LE``, in seconds) and the sum of the values, in ns."""
    counts: tuple[int, ...]
    sum_ns: int

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for le, c in zip(HIST_LE, self.counts):
            acc += c
            out.append((le, acc))
        return out

    def __add__(self, other: "Histogram") -> "Histogram":
        return Histogram(tuple(a + b for a, b in zip(self.counts, other.counts)),
                         self.sum_ns + other.sum_ns)


def _hist(h) -> Histogram:
    return Histogram(tuple(int(c) for c in h.bucket), int(h.sum_ns))


@dataclass(frozen=True)
class SegmentHeader:
    """What the first bytes of a segment file say, read without mapping it."""
    dev: int
    ino: int
    magic_ok: bool
    layout_version: int | None
    created_ns: int | None


def open_regular(path: str) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file, else None.

    Anyone may make a FIFO, a socket or a device node in /dev/shm: opening a
    FIFO for reading blocks until a writer comes. The path is looked at
    without following a link and skipped unless regular; then opened with
    O_NONBLOCK and O_NOFOLLOW (an open never waits) and checked again on
    the descriptor, as it may have been replaced meanwhile. OSError of the
    open (PermissionError, FileNotFoundError) is the caller's."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):   # a link or a socket now
            return None
        raise
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def segment_header(name: str) -> SegmentHeader | None:
    """The header of the segment behind a domain name, or None when there is
    no regular file by that name (a FIFO there is never opened in a way that
    blocks). OSError of the open is the caller's."""
    fd = open_regular("/dev/shm/" + name.lstrip("/"))
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, 12, 0)
        raw = os.pread(fd, 8, ffi.offsetof("struct tw_header", "created_ns"))
    finally:
        os.close(fd)
    version = struct.unpack_from("<I", head, 8)[0] if len(head) == 12 else None
    created = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
    return SegmentHeader(st.st_dev, st.st_ino, head[:8] == MAGIC, version, created)


def slot_owner(dom: "Domain", slot: int) -> tuple[str, int]:
    """(task name, pid) a slot names now, as the segment says."""
    s = dom._slot(slot)
    return ffi.string(s.name).decode(errors="replace"), int(s.pid)


def dead_letter_count(dom: "Domain") -> int:
    """The dead-letter count of the header (no lock: a figure for a report)."""
    return int(ffi.cast("struct tw_header *", dom.d.base).dl_count)


def table_fill(dom: "Domain") -> dict[str, tuple[int, int]]:
    """Entries in use and the size of the process and the callback-name tables."""
    pid, start = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    procs = 0
    for i in range(dom.max_procs):
        if lib.tw_proc_info(dom.d, i, pid, start) == 0 and pid[0]:
            procs += 1
    d = dom.d
    names = ffi.cast("struct tw_name *", d.base + d.names_off)
    used = sum(1 for i in range(d.names_cap) if names[i].id)
    return {"proc_table": (procs, dom.max_procs), "name_table": (used, int(d.names_cap))}


def task_histograms(dom: "Domain", slot: int) -> tuple[Histogram, Histogram]:
    """(enqueue-to-start latency, callback duration) of a task's registration."""
    s = dom._slot(slot)
    return _hist(s.latency), _hist(s.duration)


def callback_histograms(dom: "Domain") -> list[tuple[str, Histogram, Histogram]]:
    """(callback name, latency, duration) per distinct callback name. A
    name's id is a hash of it, so one name has one entry; but whoever writes
    the segment can write a second entry with the same name: entries of one
    name are summed, so a name is one series."""
    d = dom.d
    names = ffi.cast("struct tw_name *", d.base + d.names_off)
    merged: dict[str, tuple[Histogram, Histogram]] = {}
    for i in range(d.names_cap):
        e = names[i]
        if not e.id or not e.ready:
            continue
        name = ffi.string(e.name, min(int(e.len), len(e.name) - 1)).decode(errors="replace")
        if name.startswith(TASK_NAME_PREFIX):
            continue
        lat, dur = _hist(e.latency), _hist(e.duration)
        have = merged.get(name)
        merged[name] = (lat, dur) if have is None else (have[0] + lat, have[1] + dur)
    return [(name, lat, dur) for name, (lat, dur) in merged.items()]


def oldest_pending_ns(dom: "Domain", task_id: int, gen: int,
                      deadline_ns: int | None = None) -> int | None:
    """``enqueued_ns`` of the oldest pending work of one task, or None (none,
    or its list lock was held by another process until ``deadline_ns``, on
    CLOCK_MONOTONIC; default: ``Domain.READ_LOCK_BUDGET`` from now).

    The list is newest first, so the oldest is the last node of a snapshot:
    one walk in C and one node read, however many works are pending."""
    if deadline_ns is None:
        deadline_ns = time.monotonic_ns() + int(dom.READ_LOCK_BUDGET * 1e9)
    n = dom.pool_size
    nodes = ffi.new("uint32_t[]", n)
    gens = ffi.new("uint32_t[]", n)
    cnt = lib.tw_snapshot_within(dom.d, task_id, gen, nodes, gens, n,
                                 max(0, deadline_ns - time.monotonic_ns()))
    if cnt <= 0:
        return None
    w = dom._read(nodes[min(cnt, n) - 1], gens[min(cnt, n) - 1], "pending")
    return None if w is None else w.enqueued_ns
