"""Reading a domain's works and slots (snapshots; nothing here writes the
segment), and the lock budget of a reading call.

A :class:`WorkReader` belongs to one :class:`~shm_taskwork.Domain`: it turns
a node read by the compiled core into a :class:`~shm_taskwork.Work` (names
through the domain's :class:`~shm_taskwork.names.NameTable`), lists a task's
pending and running works, and opens a tracked work by id. A reading call
waits at most the domain's ``READ_LOCK_BUDGET`` in all on locks other
processes hold (README, Security).
"""
from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any

from . import _native, errors
from ._native import check, ffi, lib
from .errors import NoSuchTaskError
from .part import DomainPart
from .work import Work

if TYPE_CHECKING:
    from .domain import Domain
    from .names import NameTable


def lock_deadline(lock_timeout: float | None, budget: float) -> int:
    """CLOCK_MONOTONIC deadline (ns) of a reading call's lock waits
    (``lock_timeout`` None: ``budget``, the domain's READ_LOCK_BUDGET)."""
    if lock_timeout is None:
        lock_timeout = budget
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or \
            not 0 <= lock_timeout <= 3600:
        raise ValueError(f"lock_timeout must be seconds between 0 and 3600 (or None: "
                         f"Domain.READ_LOCK_BUDGET), got {lock_timeout!r}")
    return time.monotonic_ns() + int(lock_timeout * 1e9)


def left(deadline_ns: int) -> int:
    """What is left of a lock deadline (0: only try)."""
    return max(0, deadline_ns - time.monotonic_ns())


def slot_at(d: Any, i: int) -> Any:
    """The ``struct tw_slot`` of task ``i`` in the mapping ``d`` (the caller
    has checked ``0 <= i < max_tasks``)."""
    return ffi.cast("struct tw_slot *", d.base + d.slots_off + i * ffi.sizeof("struct tw_slot"))


class WorkReader(DomainPart):
    """Works read from one domain's segment."""

    def __init__(self, dom: "Domain", names: "NameTable"):
        super().__init__(dom)
        self._names = names

    def deadline(self, lock_timeout: float | None) -> int:
        """The lock deadline of a reading call of this domain."""
        return lock_deadline(lock_timeout, type(self._dom).READ_LOCK_BUDGET)

    def scratch(self) -> _native.Scratch:
        return _native.Scratch(self._dom.payload_size)

    def read(self, node: int, gen: int, state: str) -> Work | None:
        """Work ``node`` of generation ``gen`` as a Work in ``state``; None
        if the node no longer holds that work."""
        sc = self.scratch()
        rc = lib.tw_read_work(self._dom.d, node, gen, sc.wi, sc.payload, sc.origin)
        if rc < 0:
            return None
        return self.work_from(sc, state)

    def work_from(self, sc: _native.Scratch, state: str) -> Work:
        """The Work a scratch filled by the core describes (a dead letter's
        reason, target name, attempt and error too)."""
        dom = self._dom
        wi = sc.wi
        origin = None
        if wi.origin_len:
            origin = ffi.unpack(sc.origin, wi.origin_len).decode(errors="replace")
        w = Work(self._names.func_name(wi.func_id), wi.func_id,
                 ffi.unpack(sc.payload, wi.payload_len) if wi.payload_len else b"",
                 sender_pid=wi.sender_pid, target=wi.target, target_gen=wi.target_gen,
                 enqueued_ns=wi.enqueued_ns, origin=origin,
                 id=(wi.gen << 32) | wi.node, domain=dom.name, state=state)
        if state == "dead-letter":
            w.reason = _native.REASONS.get(wi.reason, "orphaned")
            w.target_name = self._names.name_of(wi.name_id)
            note = lib.tw_node_note(dom.d, wi.node)
            w.attempt = max(0, note) >> 16
            if w.reason == "failed" and note > 0 and note & 0xFFFF:
                buf = ffi.new("char[]", dom.payload_size or 1)
                n = lib.tw_node_error(dom.d, wi.node, wi.gen, buf, dom.payload_size)
                if n > 0:
                    w.error = ffi.unpack(buf, n).decode(errors="replace")
        return w

    def tracked(self, work_id: int) -> Work:
        """Domain.work: a handle on the tracked work ``work_id``."""
        dom = self._dom
        if isinstance(work_id, bool) or not isinstance(work_id, int):
            raise TypeError(f"work() takes a work id (int), got {type(work_id).__name__}")
        if not 0 <= work_id < 1 << 64 or (work_id & 0xFFFFFFFF) >= dom.pool_size:
            raise errors.OutcomeUnknownError(
                f"no work {work_id:#x} in domain {dom.name!r}: its node part must be below "
                f"pool_size={dom.pool_size}")
        oi = ffi.new("struct tw_outcome_info *")
        rc = lib.tw_outcome_read(dom.d, work_id, oi, ffi.NULL, 0)
        if rc == -errno.ENOENT:
            raise errors.OutcomeUnknownError(
                f"no outcome is recorded for work {work_id:#x} in domain {dom.name!r}: it "
                f"was not added with track=True, or its record was reused after "
                f"outcomes={dom.outcomes} newer tracked works settled")
        check(rc, "work")
        node, gen = work_id & 0xFFFFFFFF, work_id >> 32
        w = None
        if rc in (lib.TW_O_PENDING, lib.TW_O_RUNNING):
            w = self.read(node, gen, "pending" if rc == lib.TW_O_PENDING else "running")
        if w is None:   # settled: the node is gone; what the record says
            w = Work("", 0, b"", id=work_id, domain=dom.name, target=int(oi.slot),
                     state="unqueued")
        w._tracked = True
        w._dom = dom
        return w

    def pending(self, task_id: int, lock_timeout: float | None) -> list[Work]:
        """Domain.pending_works: one task's pending works, newest first."""
        dom = self._dom
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"a task id is an int, got {type(task_id).__name__}")
        s = slot_at(dom.d, task_id) if 0 <= task_id < dom.max_tasks else None
        if s is None:
            raise NoSuchTaskError(f"no task {task_id}: ids are 0..{dom.max_tasks - 1}")
        n = dom.pool_size
        nodes = ffi.new("uint32_t[]", n)
        gens = ffi.new("uint32_t[]", n)
        cnt = lib.tw_snapshot_within(dom.d, task_id, s.gen, nodes, gens, n,
                                     left(self.deadline(lock_timeout)))
        if cnt < 0:
            if -cnt == errno.ESRCH:
                return []
            check(cnt, "pending_works")
        out = []
        for k in range(min(cnt, n)):
            w = self.read(nodes[k], gens[k], "pending")
            if w is not None:
                out.append(w)
        return out

    def running(self, task_id: int, lock_timeout: float | None) -> list[Work]:
        """Domain.running_works: the works a run of one task has taken."""
        dom = self._dom
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"a task id is an int, got {type(task_id).__name__}")
        if not 0 <= task_id < dom.max_tasks:
            raise NoSuchTaskError(f"no task {task_id}: ids are 0..{dom.max_tasks - 1}")
        self.deadline(lock_timeout)   # the same check of the argument
        n = dom.pool_size
        nodes = ffi.new("uint32_t[]", n)
        gens = ffi.new("uint32_t[]", n)
        cnt = check(lib.tw_running_nodes(dom.d, task_id, nodes, gens, n), "running_works")
        out = []
        for k in range(cnt):
            w = self.read(nodes[k], gens[k], "running")
            if w is not None:
                out.append(w)
        return out
