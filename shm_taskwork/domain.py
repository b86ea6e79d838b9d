"""Domain: one named POSIX shared-memory segment holding the task table, the
work pool, the callback-name table and the dead-letter list.

The segment is mapped by the native core (``tw_map``), which validates the
header once and keeps the sizes in a process-local view; nothing later re-reads
them from shared memory. ``close()`` and ``unlink()`` are separate and both are
safe to call more than once; a half-built domain cleans up after itself.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import signal
import weakref
from typing import TYPE_CHECKING, Any

import posix_ipc

from . import _native, _security, callbacks
from . import segment as _segment
from . import work as _work
from .callbacks import task_name_id
from ._native import ffi, lib
from .constants import TWA_RESUME
from .errors import TaskWorkError
# The facade's parts. What was defined here before they had modules of their
# own stays importable from here: printable (the tools use it), TaskInfo,
# DomainStats, COUNTERS, Reaped, reap_log, LIMITS, SHM_DIR.
from .letters import Letters, Reaped, reap_log  # noqa: F401
from .names import NameTable, printable  # noqa: F401
from .reader import WorkReader, slot_at
from .segment import LIMITS, SHM_DIR  # noqa: F401
from .table import COUNTERS, DomainStats, TaskInfo, TaskTable, _Counters  # noqa: F401
from .work import Work

if TYPE_CHECKING:
    from .fsck import FsckReport
    from .task import Task

log = logging.getLogger("shm_taskwork")

_OPEN = _native.OPEN   # every Domain this process maps


def normalize_name(name: str) -> str:
    """A domain name as the system names its segment (a leading ``/``);
    ValueError, before any system call, for a name that cannot be one."""
    return _security.domain_name(name)


class Domain:
    """A mapped task-work domain. Use :meth:`create`, :meth:`open` or
    :meth:`open_or_create`; a context manager that closes (never unlinks)."""

    #: The longest one reading call (:meth:`tasks`, :meth:`stats`,
    #: :meth:`pending_works`) waits in all on locks other processes hold, in
    #: seconds; past it the call only tries each lock and reports what it
    #: could not read (``TaskInfo.unreadable``). Whoever can write the
    #: segment can make a lock look held for ever (README, Security).
    READ_LOCK_BUDGET = 1.0

    # class defaults: a half-built object can still be closed and unlinked
    _d: Any = None
    _closed = True
    name: str = None  # type: ignore[assignment]

    def __init__(self, name: str, d: Any, *, created: bool):
        self.name = name
        self._d = d
        self._closed = False
        self.created = created
        self.max_tasks: int = d.max_tasks
        self.pool_size: int = d.pool_size
        self.payload_size: int = d.payload_size
        self.max_procs: int = d.max_procs
        self.record_origin = bool(d.record_origin)
        self.outcomes: int = d.out_cap   # outcome records kept (create's outcomes=)
        self._names = NameTable(self)
        self._names_put = self._names.put_ids   # the same set (task.Task.add reads it)
        self._reader = WorkReader(self, self._names)
        self._letters = Letters(self, self._reader)
        self._table = TaskTable(self, self._reader, self._letters)
        self._peer: dict[tuple[int, int], tuple[int, int]] = {}  # (slot, gen) -> (pidfd, efd)
        # (slot, gen) -> the one struct tw_handle of this process for that
        # registration, shared by every Task object of it: it carries how to
        # notify the task (its descriptors in _peer, or the own eventfd), so
        # the lean add passes nothing else (task.Task.add; Domain._add_handle)
        self._handles: dict[tuple[int, int], Any] = {}
        self._all_handles: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every one made
        self._current = None
        _OPEN.add(self)
        for fid, cb_name, cb_codec in callbacks.declared_codecs():
            self._names.record_declared(fid, cb_name, cb_codec)

    # ---- life cycle -------------------------------------------------------

    @classmethod
    def create(cls, name: str, *, max_tasks: int = 64, pool_size: int = 65536,
               payload_size: int = 224, mode: int = 0o600, record_origin: bool = False,
               max_procs: int | None = None, names_cap: int = 1024,
               outcomes: int = 4096) -> "Domain":
        """Create a domain; ``FileExistsError`` if the name is taken.

        ``max_procs`` bounds the processes that may allocate works at once
        (adders and tasks); it defaults to ``4 * max_tasks + 64``.
        ``outcomes`` is how many outcome records of tracked works the domain
        keeps: a record stays readable until that many newer tracked works
        have settled (docs/contract.md "Outcomes")."""
        name = normalize_name(name)
        d = _segment.create(name, max_tasks=max_tasks, pool_size=pool_size,
                            payload_size=payload_size, mode=mode, record_origin=record_origin,
                            max_procs=max_procs, names_cap=names_cap, outcomes=outcomes)
        return cls(name, d, created=True)

    @classmethod
    def open(cls, name: str, *, mode: int | None = None) -> "Domain":
        """Map an existing domain; ``FileNotFoundError`` if there is none,
        ``DomainCorruptError`` if its header is not one this build can use.

        ``mode``: the segment must belong to this process's effective user
        and grant no permission bit outside ``mode``, else
        ``PermissionError`` naming its owner and mode - a name another user
        took first (with mode 0666, say) is not joined silently. Without
        ``mode`` nothing is checked but what the system checks (whoever may
        open the segment may join it): that is how users share a domain
        another one made."""
        name = normalize_name(name)
        return cls(name, _segment.open_existing(name, mode), created=False)

    @classmethod
    def open_or_create(cls, name: str, **create_options: Any) -> "Domain":
        """Open the domain, or create it with ``create_options`` if there is
        none. Any number of processes may call this at the same instant:
        exactly one creates it (a segment gets its name only once it is whole),
        the others open what it made.

        With ``mode=M`` an existing segment is joined only if it belongs to
        this process's effective user and grants nothing outside ``M`` (see
        :meth:`open`); without ``mode`` (created 0600) any domain the system
        lets this process open is joined."""
        check_mode = create_options.get("mode")
        for _ in range(20):
            try:
                return cls.open(name, mode=check_mode)
            except FileNotFoundError:
                pass
            try:
                return cls.create(name, **create_options)
            except FileExistsError:
                pass
        raise TaskWorkError(f"domain {name!r} was created and removed repeatedly meanwhile")

    def unlink(self) -> None:
        """Remove the name. Mappings (this one included) stay valid until closed."""
        if self.name is None:
            return
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
        except posix_ipc.PermissionsError:
            raise _security.permission_error(self.name, "remove") from None

    def close(self) -> None:
        """Exit this process's task here (if any) and unmap. Idempotent."""
        if self._closed:
            return
        cur = self._current
        if cur is not None and cur.is_current:
            try:
                cur.exit()
            except TaskWorkError:
                cur._release_local()  # the slot is the segment's problem now
        for h in list(self._all_handles):
            # before the descriptors close and the mapping goes: no add may
            # use them any more (tw_add_h says -EBADF for a NULL domain)
            h.current, h.own_efd, h.efd, h.pidfd = 0, -1, -1, -1
            h.d = ffi.NULL
        for pidfd, efd in self._peer.values():
            for fd in (pidfd, efd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self._peer.clear()
        self._closed = True
        lib.tw_sigwatch_del(self._d, 0xFFFFFFFF)  # the watcher reads slots: before unmap
        lib.tw_proc_release(self._d)
        lib.tw_unmap(self._d)
        _OPEN.discard(self)

    def __enter__(self) -> "Domain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.max_tasks} tasks, {self.pool_size} nodes"
        return f"<Domain {self.name!r} {state}>"

    @property
    def d(self) -> Any:
        if self._closed:
            raise ValueError(f"domain {self.name!r} is closed")
        return self._d

    # ---- names and codecs (names.NameTable) -------------------------------

    def func_name(self, fid: int) -> str:
        """The name of callback ``fid``: the one this process knows, else the
        domain's name table's, else ``<unknown 0x...>``."""
        return self._names.func_name(fid)

    def _put_name(self, fid: int, name: str) -> None:
        self._names.put(fid, name)

    def _codec(self, fid: int) -> str | None:
        return self._names.codec(fid)

    def _encode_payload(self, fid: int, obj: Any) -> bytes:
        return self._names.encode_payload(fid, obj)

    # ---- slots ------------------------------------------------------------

    def _slot(self, i: int):
        return slot_at(self.d, i)

    def _slot_state(self, i: int, s) -> str:
        return self._table.slot_state(i, s)

    # ---- add handles (task.Task.add; notify) -------------------------------

    def _add_handle(self, slot: int, gen: int, signum: int) -> Any:
        """The shared struct tw_handle of registration (slot, gen)."""
        h = self._handles.get((slot, gen))
        if h is None:
            if len(self._handles) >= 4 * self.max_tasks:
                # registrations come and go: forget those with no descriptors
                # (a Task object may still hold one: close() finds it in
                # _all_handles, a weak set, and clears its domain)
                for k in [k for k, v in self._handles.items()
                          if not v.current and v.efd < 0 and v.pidfd < 0]:
                    del self._handles[k]
            h = ffi.new("struct tw_handle *")
            self._all_handles.add(h)
            h.d, h.slot, h.gen, h.signum = self._d, slot, gen, signum
            h.own_efd = h.efd = h.pidfd = -1
            h.current = 0
            pidfd, efd = self._peer.get((slot, gen), (-1, -1))
            h.pidfd, h.efd = pidfd, efd
            self._handles[(slot, gen)] = h
        return h

    # ---- death and reaping (letters.Letters) -------------------------------

    def _reap_if_dead(self, slot: int) -> None:
        self._letters.reap_if_dead(slot)

    def _reap(self, slot: int) -> "Reaped | None":
        return self._letters.reap(slot)

    def _reap_dead(self, deadline_ns: int | None = None) -> list["Reaped"]:
        return self._letters.reap_dead(deadline_ns)

    # ---- registration -----------------------------------------------------

    def register(self, name: str | None = None, *, signum: int = signal.SIGUSR1,
                 install_handler: bool = True,
                 exit_signals: "tuple[int, ...] | list[int]" = (),
                 adopt: bool = False) -> "Task":
        """Register this process as a task of the domain; returns its Task.

        ``exit_signals`` (e.g. ``(signal.SIGTERM,)``): those signals make the
        task exit as the kernel's do_exit() would - its pending works run -
        and then end the process with the status the signal's default action
        gives. Without it the library does not touch those signals, and a
        task killed by one leaves its works as orphaned dead letters.

        ``adopt=True``: re-queue to the new task the ``orphaned`` and
        ``shutdown`` dead letters left for its name, each exactly once
        (``Task.adopt``), for code that keeps its own loop instead of
        ``serve()``."""
        from .registration import Registration
        t = Registration._register(self, name, signum, install_handler, exit_signals)
        if adopt:
            t.adopt()
        return t

    @property
    def current(self) -> "Task | None":
        """This process's task in this domain, or None."""
        cur = self._current
        if cur is not None and cur.pid == os.getpid() and not cur._exited:
            return cur
        return None

    def task(self, key: int | None = None, *, pid: int | None = None,
             name: str | None = None) -> "Task":
        """A handle to a registered task: by id (slot), ``pid=`` or ``name=``.

        By name: a live task of that name - the one with the fewest pending
        works when several share it (a pool of workers) - never a dead one.
        Dead tasks met on the way are reaped. ``NoSuchTaskError`` when none."""
        i, s = self._table.find(key, pid, name)
        return self._handle(i, s)

    def _live_slots(self, *, pid: int | None = None, name: str | None = None) -> list[int]:
        return self._table.live_slots(pid=pid, name=name)

    def _handle(self, i: int, s):
        from .task import Task
        cur = self.current
        if cur is not None and cur.id == i and cur.gen == s.gen:
            return cur  # this process's own registration: run(), exit() ... work on it
        return Task(self, i, s.gen, s.pid, ffi.string(s.name).decode(errors="replace"))

    # ---- observability ----------------------------------------------------

    def tasks(self, name: str | None = None, *, reap: bool = True,
              lock_timeout: float | None = None) -> list[TaskInfo]:
        """A snapshot of every used slot (with ``name``: of the tasks of that
        name). Dead tasks are reaped first (``reap=False``: only read, as the
        continuous observers top and export do): a dead task shows as
        ``dead``, with the works it left counted ``orphaned``/``interrupted``
        and kept as dead letters.

        Counting a task's pending works takes its list lock. The call waits
        at most ``lock_timeout`` seconds in all (default
        :attr:`READ_LOCK_BUDGET`; 0: only try) on locks other processes
        hold; a task whose lock it could not get is reported with
        ``unreadable=True`` instead of being waited for."""
        return self._table.tasks(name, reap=reap, lock_timeout=lock_timeout)

    def stats(self, *, reap: bool = True, lock_timeout: float | None = None,
              infos: "list[TaskInfo] | None" = None) -> DomainStats:
        """The pool and the counters of every task summed; the lock budget
        is that of :meth:`tasks` (a task it could not read adds 0 pending).
        ``infos``: a list :meth:`tasks` just returned, summed instead of
        reading the table again (``reap`` and ``lock_timeout`` then do not
        apply)."""
        return self._table.stats(reap=reap, lock_timeout=lock_timeout, infos=infos)

    # ---- reading works (reader.WorkReader) --------------------------------

    def _scratch(self) -> _native.Scratch:
        return self._reader.scratch()

    def work(self, work_id: int) -> Work:
        """A handle on the tracked work ``work_id`` (from any process): wait
        on it, read its outcome, result and error (docs/contract.md
        "Outcomes"). ``OutcomeUnknownError`` if no outcome is recorded for
        that id: not tracked, or its record was reused after ``outcomes``
        newer tracked works settled."""
        return self._reader.tracked(work_id)

    def _read(self, node: int, gen: int, state: str) -> Work | None:
        return self._reader.read(node, gen, state)

    def _work_from(self, sc: _native.Scratch, state: str) -> Work:
        return self._reader.work_from(sc, state)

    def pending_works(self, task_id: int, *, lock_timeout: float | None = None) -> list[Work]:
        """The pending works of one task, newest first (a snapshot). Waits at
        most ``lock_timeout`` seconds (default :attr:`READ_LOCK_BUDGET`) for
        the task's list lock while another process holds it, then raises
        ``DomainCorruptError`` (ETIMEDOUT)."""
        return self._reader.pending(task_id, lock_timeout)

    def pool_free(self) -> int:
        """Nodes whose owner word says free now (one pass, no lock): the
        room left for adds and dead letters."""
        return lib.tw_pool_free_count(self.d)

    def task_name_known(self, name: str) -> bool:
        """True if a task of this name was ever registered in the domain
        (the name table keeps every task name it had room for)."""
        return self._names.known(task_name_id(name))

    def running_works(self, task_id: int, *, lock_timeout: float | None = None) -> list[Work]:
        """The works a run of one task has taken and not finished (detached
        or started), state ``"running"``, in no particular order: a snapshot
        read from the works' owner words, without a lock (``lock_timeout``
        is accepted for symmetry with :meth:`pending_works`)."""
        return self._reader.running(task_id, lock_timeout)

    # ---- dead letters (letters.Letters; docs/contract.md "Lifecycle without an operator")

    def dead_letters(self, reason: str | None = None) -> list[Work]:
        """The dead letters, newest first: works whose callback was unknown
        to the process that ran them (``reason="unknown_callback"``) and
        works left by tasks that died (``"orphaned"``). ``Work.target_name``
        is the name of the task each was for. Dead tasks not yet reaped are
        reaped first, so their works are here too."""
        return self._letters.dead_letters(reason)

    def drop_dead_letters(self, reason: str | None = None) -> int:
        """Return dead letters' nodes to the pool (all, or those of one
        reason); the count dropped."""
        return self._letters.drop(reason)

    def retry_dead_letters(self, to: "Task | str | None" = None, reason: str | None = None, *,
                           notify: int = TWA_RESUME) -> int:
        """Re-queue dead letters, each exactly once; the count re-queued.

        ``to``: a Task, or a task name (a live task of that name); None: a
        live task with the name of the task each work was for. A dead letter
        with no live target stays where it is. The work keeps its callback
        and payload and gets a new id."""
        return self._letters.retry(to, reason, notify)

    def run_dead_letters(self) -> int:
        """Run, in this process, the dead letters whose callback it knows;
        the count run. A callback that raises is logged and its node freed,
        as in run(). (What ``retry_dead_letters()`` did before dead letters
        could be re-queued.)"""
        return self._letters.run()

    # ---- fsck -------------------------------------------------------------

    def fsck(self, *, repair: bool = False) -> "FsckReport":
        """Find (and with ``repair=True`` reclaim) what dead processes held. (docs/contract.md "Faults: dead processes")."""
        from .fsck import fsck
        return fsck(self, repair=repair)


def _after_fork_in_child() -> None:
    # The child is another process: its own process-table entry, pid and
    # start time; the parent's task is not the child's.
    pid = os.getpid()
    for dom in list(_OPEN):
        if not dom._closed:
            dom._d.my_proc = -1
            dom._d.my_pid = pid
            dom._d.my_start = _native.start_ticks(pid)
            dom._current = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _record_in_open_domains(fid: int, name: str, codec: str) -> None:
    """A callback declared a codec: record it in every domain open here."""
    for dom in list(_OPEN):
        dom._names.record_declared(fid, name, codec)


def _work_codec(domain: str | None, fid: int) -> str | None:
    """The codec ``Work.value`` decodes with: the one recorded in the work's
    domain when it is open here, else the one this process declared (then
    pickle is refused: who can write the domain cannot be checked)."""
    for dom in list(_OPEN):
        if dom.name == domain and not dom._closed:
            return dom._names.codec(fid)
    codec = callbacks.codec_of(fid)
    if codec == "pickle":
        raise PermissionError(errno.EACCES, f"codec 'pickle' is refused for a work of domain "
                              f"{domain!r}: it is not open in this process, so who can write it "
                              "cannot be checked")
    return codec


callbacks.ON_DECLARE.append(_record_in_open_domains)
_work.CODEC_OF[:] = [_work_codec]


@atexit.register
def _close_all() -> None:
    # A process that ends without closing its domains would leave its
    # process-table entries to be reclaimed as a dead process's.
    for dom in list(_OPEN):
        try:
            dom.close()
        except Exception:
            pass
