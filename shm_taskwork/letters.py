"""Death, reaping and dead letters (docs/contract.md "Lifecycle without an
operator").

The :class:`Letters` of a domain reaps the tasks whose process died (their
pending works become ``orphaned`` dead letters, the started ones are
reported ``interrupted`` and given back), reclaims dead processes' entries,
and lists, drops, re-queues and runs the dead letters. The
:class:`~shm_taskwork.Domain` owns one and delegates to it.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import TYPE_CHECKING

from . import _native, callbacks
from ._native import check, ffi, lib
from .errors import NoSuchTaskError
from .names import printable
from .part import DomainPart
from .reader import left, slot_at
from .work import Work

if TYPE_CHECKING:
    from .domain import Domain
    from .reader import WorkReader
    from .task import Task

reap_log = logging.getLogger("shm_taskwork.reap")


def check_reason(reason) -> None:
    if reason is not None and reason not in _native.REASON_CODES:
        raise ValueError(f"reason={reason!r}: use None or one of "
                         f"{', '.join(map(repr, _native.REASON_CODES))}")


@dataclasses.dataclass
class Reaped:
    """What one reap of a dead task did (see :meth:`Letters.reap`)."""

    slot: int
    name: str
    pid: int
    orphaned: list[Work] = dataclasses.field(default_factory=list)
    orphaned_count: int = 0
    interrupted: list[Work] = dataclasses.field(default_factory=list)
    cancelled: int = 0


class Letters(DomainPart):
    """Reaping the dead tasks of one domain, and its dead letters."""

    def __init__(self, dom: "Domain", reader: "WorkReader"):
        super().__init__(dom)
        self._reader = reader

    # ---- death and reaping -------------------------------------------------

    def reap_if_dead(self, slot: int) -> None:
        """Reap task ``slot`` if its process died (a waiter on one of its
        works notices, as an adder would: the death settles the work)."""
        dom = self._dom
        if isinstance(slot, int) and 0 <= slot < dom.max_tasks and \
                lib.tw_slot_dead(dom.d, slot) == 1:
            self.reap(slot)

    def reap(self, slot: int) -> Reaped | None:
        """Reap task ``slot`` if its process is dead: close its list, file its
        pending and not-started works as ``orphaned`` dead letters, take out
        the started ones (``interrupted``: reported on the ``shm_taskwork.reap``
        logger, one record per work with the Work as ``record.work``, then
        given back, never run again). None if it was not dead, or another
        process is reaping it; many processes may race here, each work lands
        once."""
        dom, read = self._dom, self._reader.read
        n = dom.pool_size
        orphans = ffi.new("uint32_t[]", n)
        inter = ffi.new("uint32_t[]", n)
        info = ffi.new("struct tw_reap_info *")
        s = slot_at(dom.d, slot)
        name = ffi.string(s.name).decode(errors="replace")
        shown = printable(name)  # for the log: the name is the segment's, anyone's
        pid = int(s.pid)
        rc = lib.tw_reap(dom.d, slot, orphans, inter, n, info)
        if rc < 0:
            reap_log.error("could not reap dead task %d (%s) of domain %r: %s; the next one to "
                           "notice tries again", slot, shown, dom.name, os.strerror(-rc))
            return None
        if rc != 1:
            return None
        out = Reaped(slot=slot, name=name, pid=pid, cancelled=int(info.cancelled))
        owner = ffi.new("uint64_t *")
        for k in range(min(int(info.orphaned), n)):
            lib.tw_node_state(dom.d, orphans[k], owner)
            w = read(orphans[k], _native.owner_gen(owner[0]), "dead-letter")
            if w is not None:
                out.orphaned.append(w)
        out.orphaned_count = int(info.orphaned)
        for k in range(min(int(info.interrupted), n)):
            # Reported first, then given back: should this process die in
            # between, whoever reclaims its process entry files the node as
            # an "interrupted" dead letter instead (reported twice at worst,
            # never silently lost).
            node = inter[k]
            lib.tw_node_state(dom.d, node, owner)
            w = read(node, _native.owner_gen(owner[0]), "interrupted")
            if w is not None:
                w.target_name = name
                out.interrupted.append(w)
                reap_log.warning("task %d (%s, pid %d) of domain %r died while running work "
                                 "%#x (%s): interrupted, not run again", slot, shown, pid,
                                 dom.name, w.id, printable(w.func_name), extra={"work": w})
            lib.tw_free_node(dom.d, node)
        if out.orphaned_count:
            reap_log.warning("task %d (%s, pid %d) of domain %r died: %d work(s) kept as "
                             "orphaned dead letters", slot, shown, pid, dom.name,
                             out.orphaned_count)
        return out

    def reap_dead(self, deadline_ns: int | None = None) -> list[Reaped]:
        """Reap every dead task this process notices now, and reclaim the
        process-table entries of dead processes (what a dead adder had
        allocated and not pushed goes back to the pool, what it had pushed
        stays queued): nothing waits for fsck.

        A reap takes the task's list lock, waiting up to the lock deadline
        (2 s) while another process holds it, and whoever writes the segment
        can make it look held for ever. So the lock is tried first, waiting
        only until ``deadline_ns`` (default: the domain's READ_LOCK_BUDGET
        from now) for all the slots together; a slot whose lock stays held is
        left to the next one to notice it (README, Security)."""
        dom = self._dom
        out = []
        d = dom.d
        if deadline_ns is None:
            deadline_ns = self._reader.deadline(None)
        for i in range(dom.max_tasks):
            if lib.tw_slot_dead(d, i) == 1:
                probe = lib.tw_snapshot_within(d, i, slot_at(d, i).gen, ffi.NULL, ffi.NULL, 0,
                                               left(deadline_ns))
                if probe == -errno.ETIMEDOUT:
                    continue
                r = self.reap(i)
                if r is not None:
                    out.append(r)
        info = None
        for i in range(dom.max_procs):
            if lib.tw_proc_dead(d, i) == 1:
                if info is None:
                    info = ffi.new("struct tw_reap_info *")
                lib.tw_proc_reclaim(d, i, 0, info)   # -EAGAIN: busy, the next one tries
        return out

    # ---- dead letters ------------------------------------------------------

    def _nodes(self) -> list[int]:
        n = self._dom.pool_size
        buf = ffi.new("uint32_t[]", n)
        cnt = check(lib.tw_dl_list(self._dom.d, buf, n), "dead letters")
        return [buf[k] for k in range(min(cnt, n))]

    def dead_letters(self, reason: str | None = None) -> list[Work]:
        """Domain.dead_letters: the dead letters, newest first (dead tasks
        reaped first)."""
        check_reason(reason)
        self.reap_dead()
        out = []
        o = ffi.new("uint64_t *")
        for node in self._nodes():
            lib.tw_node_state(self._dom.d, node, o)
            w = self._reader.read(node, _native.owner_gen(o[0]), "dead-letter")
            if w is not None and (reason is None or w.reason == reason):
                out.append(w)
        return out

    def drop(self, reason: str | None = None) -> int:
        """Domain.drop_dead_letters: their nodes back to the pool; the count."""
        dropped = 0
        for w in self.dead_letters(reason):
            d = self._dom.d
            if check(lib.tw_dl_take(d, w.node, w.id >> 32), "drop dead letter") == 1:
                check(lib.tw_dl_done(d, w.node, lib.TW_OUT_OK), "drop dead letter")
                dropped += 1
        return dropped

    def retry(self, to: "Task | str | None", reason: str | None, notify: int) -> int:
        """Domain.retry_dead_letters: re-queue each once; the count."""
        from .task import Task
        check_reason(reason)
        if to is not None and not isinstance(to, (Task, str)):
            raise TypeError(f"to must be a Task, a task name or None, got {type(to).__name__}")
        done = 0
        targets: dict[str, object] = {}
        for w in self.dead_letters(reason):
            if w.reason == "interrupted":
                continue       # it may have had effects: never run again
            if isinstance(to, Task):
                t = to
            else:
                want = to if to is not None else w.target_name
                if want is None:
                    continue
                t = targets.get(want)
                if t is None:
                    try:
                        t = targets[want] = self._dom.task(name=want)
                    except NoSuchTaskError:
                        continue
            if t._requeue(w, notify):
                done += 1
        return done

    def run(self) -> int:
        """Domain.run_dead_letters: run here those whose callback is known."""
        from .callbacks import log_callback_error
        ran = 0
        for w in self.dead_letters():
            fn = callbacks.lookup(w.func_id)
            if fn is None:
                continue
            d = self._dom.d
            if check(lib.tw_dl_take(d, w.node, w.id >> 32), "run dead letter") != 1:
                continue
            w.state = "running"
            try:
                fn(w)
            except Exception as exc:
                log_callback_error(w, exc)
            finally:
                check(lib.tw_dl_done(self._dom.d, w.node, lib.TW_OUT_OK), "run dead letter")
            ran += 1
        return ran
