"""The task table as the observers read it: each used slot's state and
counters (:class:`TaskInfo`), their sums with the pool's figures
(:class:`DomainStats`), and finding a task by id, pid or name
(docs/contract.md "Observability").

The :class:`TaskTable` of a domain reads slots without writing them; the dead
tasks it meets are reaped through the domain's :class:`~shm_taskwork.letters.Letters`,
and its lock waits keep to the reading call's budget (README, Security).
"""
from __future__ import annotations

import dataclasses
import errno
import time
from typing import TYPE_CHECKING, Any

from . import _native, _security
from ._native import ffi, lib
from .errors import NoSuchTaskError
from .part import DomainPart
from .reader import left, slot_at

if TYPE_CHECKING:
    from .domain import Domain
    from .letters import Letters
    from .reader import WorkReader


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Counters:
    """The counters each task slot keeps in shared memory (docs/contract.md "Observability")."""

    added: int
    run: int
    cancelled: int
    orphaned: int
    errors: int
    unknown: int
    signals_sent: int
    resumes_sent: int
    interrupted: int
    pending: int
    max_pending: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


COUNTERS = tuple(f.name for f in dataclasses.fields(_Counters))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskInfo(_Counters):
    """A snapshot of one used task slot (docs/contract.md "Observability"): the counters plus these."""

    id: int
    pid: int
    name: str
    #: ``running``, ``exiting``, ``exited``, ``dead`` (its process died and
    #: nobody has reaped it yet) or ``reaped`` (reaped: its works are dead
    #: letters or were given back, the slot is free for reuse; the row stays
    #: until the slot is reused)
    state: str
    registered_ns: int
    generation: int
    flags: int
    #: True when the task's list could not be read: its lock was held by
    #: another process past the reading call's lock budget, or the list is
    #: inconsistent. ``pending`` then says 0, not what is queued.
    unreadable: bool = False
    #: Works a run has taken and not finished (started or not): with
    #: ``pending``, the task's whole backlog.
    running: int = 0
    #: Age in seconds, since it was queued, of the oldest running work (None: none).
    oldest_running_s: float | None = None
    #: Signals the task's watcher sent again because the handler had not
    #: taken them while works waited (README "TWA_SIGNAL is never stranded").
    signals_resent: int = 0
    #: A TWA_SIGNAL is owed right now: NOTIFY_SIGNAL is set, the task's
    #: handler has not taken the signal that armed it, and works are queued
    #: (its watcher's verdict).
    signal_owed: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DomainStats(_Counters):
    """Pool figures and the counters of every task summed (docs/contract.md "Observability").

    ``pool_free`` counts nodes whose owner word says free: exact once nothing
    is in flight (every added work run, cancelled, reclaimed or dropped)."""

    pool_size: int
    pool_free: int
    pool_used: int
    tasks: int
    dead_letters: int
    #: works runs have taken and not finished, every task summed
    running: int = 0


class TaskTable(DomainPart):
    """Reading one domain's task slots."""

    def __init__(self, dom: "Domain", reader: "WorkReader", letters: "Letters"):
        super().__init__(dom)
        self._reader = reader
        self._letters = letters

    def slot_state(self, i: int, s) -> str:
        """running, exiting, exited, dead (its process died, not reaped yet)
        or reaped (a reaped one keeps saying so until its slot is reused)."""
        dom = self._dom
        st = _native.SLOT_STATES.get(s.state, "corrupt")
        if st == "exited" and s.flags & lib.TW_F_DIED:
            return "reaped"
        if st in ("running", "exiting", "claiming", "reaping") and lib.tw_slot_dead(dom.d, i) == 1:
            return "dead"
        if st == "running" and s.flags & lib.TW_F_EXITING:
            return "exiting"
        return st

    def find(self, key: int | None, pid: int | None, name: str | None) -> tuple[int, Any]:
        """Domain.task: the slot and ``struct tw_slot`` of the task asked for
        (by id, pid or name; dead ones met are reaped)."""
        dom = self._dom
        given = sum(x is not None for x in (key, pid, name))
        if given != 1:
            raise TypeError("task() takes exactly one of: a task id, pid=..., name=...")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            raise TypeError(f"pid= is an int, got {type(pid).__name__}")
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"name= is a str, got {type(name).__name__}")
            try:
                _security.check_text(name, "a task name", lib.TW_NAME_LEN - 1)
            except ValueError as exc:  # no task can have it (register refuses it)
                raise NoSuchTaskError(f"no task named {name!r} in domain {dom.name!r}: "
                                      f"{exc}") from None
        if key is not None:
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"a task id is an int, got {type(key).__name__}")
            if not 0 <= key < dom.max_tasks:
                raise NoSuchTaskError(
                    f"no task {key}: task ids are 0..{dom.max_tasks - 1} in domain {dom.name!r}")
            if lib.tw_slot_dead(dom.d, key) == 1:
                self._letters.reap(key)
            s = slot_at(dom.d, key)
            if s.state in (lib.TW_SLOT_RUNNING, lib.TW_SLOT_EXITING, lib.TW_SLOT_EXITED,
                           lib.TW_SLOT_REAPING) and s.gen:
                return key, s
            raise NoSuchTaskError(f"no task {key} in domain {dom.name!r} (the slot is free)")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            raise TypeError(f"pid must be an int, got {type(pid).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        live = self.live_slots(pid=pid, name=name)
        if len(live) == 1 or (live and pid is not None):
            # one candidate: nothing to compare, so its list is not counted
            # (counting walks it under its lock: a cost that grows with the
            # backlog, paid by every add of a bridge)
            return live[0], slot_at(dom.d, live[0])
        best = None
        deadline = self._reader.deadline(None)
        for i in live:
            s = slot_at(dom.d, i)
            n = lib.tw_snapshot_within(dom.d, i, s.gen, ffi.NULL, ffi.NULL, 0, left(deadline))
            if n == -errno.ETIMEDOUT:
                n = 1 << 40          # its list is held by someone: the last choice
            if n >= 0 and (best is None or n < best[0]):
                best = (n, i, s)
        if best is not None:
            return best[1], best[2]
        what = f"pid={pid}" if pid is not None else f"name={name!r}"
        raise NoSuchTaskError(f"no live task with {what} in domain {dom.name!r}")

    def live_slots(self, *, pid: int | None = None, name: str | None = None) -> list[int]:
        """Slots of live running tasks matching pid or name (dead ones met are
        reaped, never returned)."""
        dom = self._dom
        raw = name.encode() if name is not None else None
        out = []
        for i in range(dom.max_tasks):
            s = slot_at(dom.d, i)
            if s.state not in (lib.TW_SLOT_RUNNING, lib.TW_SLOT_EXITING,
                               lib.TW_SLOT_REAPING):
                continue
            if pid is not None and s.pid != pid:
                continue
            if raw is not None and ffi.string(s.name) != raw:
                continue
            if lib.tw_slot_dead(dom.d, i) == 1:
                self._letters.reap(i)
                continue
            if s.state == lib.TW_SLOT_RUNNING and not s.flags & lib.TW_F_EXITING:
                out.append(i)
        return out

    def tasks(self, name: str | None = None, *, reap: bool = True,
              lock_timeout: float | None = None) -> list[TaskInfo]:
        """Domain.tasks: a TaskInfo per used slot (of the tasks named
        ``name``), dead tasks reaped first unless ``reap=False``."""
        dom = self._dom
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        deadline = self._reader.deadline(lock_timeout)
        if reap:
            self._letters.reap_dead(deadline)
        raw = name.encode() if name is not None else None
        out = []
        # Works in progress: a run counts a chunk's works when it frees it,
        # and the owner words say which of them returned before that. The
        # two are read as one snapshot (seqlock-like, on the run counters):
        # a chunk freed during the scan is scanned again, so ``run`` never
        # counts a work twice nor drops one it showed, and never goes back.
        nt = dom.max_tasks
        running, done = ffi.new("uint32_t[]", nt), ffi.new("uint32_t[]", nt)
        oldest = ffi.new("uint64_t[]", nt)
        slots = [slot_at(dom.d, i) for i in range(nt)]
        for _ in range(4):
            before = [s.c.run for s in slots]
            lib.tw_progress(dom.d, nt, running, done, oldest)
            if all(s.c.run == b for s, b in zip(slots, before)):
                break
        now = time.monotonic_ns()
        for i, s in enumerate(slots):
            if s.state == lib.TW_SLOT_FREE or s.gen == 0:
                continue
            if raw is not None and ffi.string(s.name) != raw:
                continue
            c = s.c
            # waits only for what is left of this call's budget
            pending = lib.tw_snapshot_within(dom.d, i, s.gen, ffi.NULL, ffi.NULL, 0,
                                             left(deadline))
            out.append(TaskInfo(
                id=i, pid=s.pid, name=ffi.string(s.name).decode(errors="replace"),
                state=self.slot_state(i, s), registered_ns=s.registered_ns, generation=s.gen,
                added=c.added, run=before[i] + done[i], cancelled=c.cancelled,
                orphaned=c.orphaned,
                errors=c.errors, unknown=c.unknown, signals_sent=c.signals_sent,
                resumes_sent=c.resumes_sent, interrupted=c.interrupted,
                pending=max(0, pending), max_pending=c.max_pending, flags=s.flags & lib.TW_F_BITS,
                unreadable=pending in (-errno.ETIMEDOUT, -errno.EUCLEAN),
                running=running[i],
                oldest_running_s=(max(0, now - oldest[i]) / 1e9 if running[i] and oldest[i]
                                  else None),
                signals_resent=c.signals_resent,
                signal_owed=lib.tw_sig_owed(dom.d, i) == 1))
        return out

    def stats(self, *, reap: bool = True, lock_timeout: float | None = None,
              infos: "list[TaskInfo] | None" = None) -> DomainStats:
        """Domain.stats: the pool and the counters of ``infos`` (default:
        :meth:`tasks`) summed."""
        dom = self._dom
        if infos is None:
            infos = self.tasks(reap=reap, lock_timeout=lock_timeout)
        free = lib.tw_pool_free_count(dom.d)
        hdr = ffi.cast("struct tw_header *", dom.d.base)
        sums = {k: sum(getattr(t, k) for t in infos) for k in COUNTERS}
        return DomainStats(pool_size=dom.pool_size, pool_free=free,
                           pool_used=dom.pool_size - free,
                           tasks=sum(1 for t in infos if t.state != "exited"),
                           dead_letters=int(hdr.dl_count),
                           running=sum(t.running for t in infos), **sums)
