"""Task: the handle of one registration in a domain, the one every process
adds to (task_work_add), cancels from (task_work_cancel*) and counts.

What register() returns is a Task too: a ``registration.Registration``,
which adds what only the task's own process does (run, wait, checkpoint,
critical, exit, attach_loop). On a plain handle those raise
NotCurrentTaskError naming the process the task belongs to.

Every add goes through one native entry per shape (one work, many works,
a keyed work, a re-queued dead letter); the notification the core found due
but could not send itself is delivered by ``notify.deliver``.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
import weakref
from itertools import accumulate as _accumulate
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import _native, _security, callbacks, errors
from . import keys as _keys
from . import notify as _notify
from ._native import check, ffi, lib
from .constants import TWA_RESUME, TWAF_NO_ALLOC, VALID_MODES
from .errors import InvalidModeError, NotCurrentTaskError, TaskExitedError
from .work import Work, note_cancelled

if TYPE_CHECKING:
    import asyncio
    import contextlib

    from .callbacks import CallbackRef
    from .domain import Domain
    from .keys import KeyRecord

log = logging.getLogger("shm_taskwork")

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_ADD_TRACK = lib.TW_ADD_TRACK
_DUE = lib.TW_DUE_EVENTFD | lib.TW_DUE_SIGNAL
_DONE = lib.TW_DONE_EVENTFD | lib.TW_DONE_SIGNAL
_NO_FDS = (-1, -1)
_MY_PID = [os.getpid()]  # kept right across fork (register_at_fork below)
_mono = time.monotonic_ns
_new_work = object.__new__


class _AddSource:
    """The lazy fields of the Works one handle's add() returns (i: tw_add's
    return value, which carries the work id)."""

    __slots__ = ("domain", "target", "target_gen", "sender_pid", "func_id", "func_name")

    def __init__(self, domain: str, target: int, target_gen: int, func_id: int,
                 func_name: str):
        self.domain, self.target, self.target_gen = domain, target, target_gen
        self.func_id, self.func_name = func_id, func_name
        self.sender_pid = _MY_PID[0]

    def lazy_fields(self, rc: int) -> tuple:
        return (("func_name", self.func_name), ("func_id", self.func_id),
                ("id", ((rc >> 28) << 32) | ((rc >> 4) & 0xFFFFFF)),
                ("sender_pid", self.sender_pid), ("target", self.target),
                ("target_gen", self.target_gen), ("origin", None), ("domain", self.domain),
                ("_state", "pending"), ("reason", None), ("target_name", None),
                ("attempt", 0), ("error", None))


class _ManySource(_AddSource):
    """The same for add_many (i: the index in its list of ids)."""

    __slots__ = ("ids",)

    def __init__(self, domain: str, target: int, target_gen: int, func_id: int,
                 func_name: str, ids: list):
        super().__init__(domain, target, target_gen, func_id, func_name)
        self.ids = ids

    def lazy_fields(self, i: int) -> tuple:
        return (("func_name", self.func_name), ("func_id", self.func_id),
                ("id", self.ids[i]), ("sender_pid", self.sender_pid), ("target", self.target),
                ("target_gen", self.target_gen), ("origin", None), ("domain", self.domain),
                ("_state", "pending"), ("reason", None), ("target_name", None),
                ("attempt", 0), ("error", None))


# every Task handle of this process, by id (equal handles are distinct here)
_HANDLES: "weakref.WeakValueDictionary[int, Task]" = weakref.WeakValueDictionary()


def _origin() -> bytes:
    """``file:line in function (pid N)`` of the first caller outside this package."""
    f = sys._getframe(2)
    while f is not None and os.path.dirname(os.path.abspath(f.f_code.co_filename)) == _PKG_DIR:
        f = f.f_back
    if f is None:
        return b""
    text = f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name} (pid {os.getpid()})"
    raw = text.encode(errors="replace")
    return raw if len(raw) <= lib.TW_ORIGIN_LEN else b"..." + raw[-(lib.TW_ORIGIN_LEN - 3):]


class Task:
    """A handle to one registration (slot id + generation)."""

    def __init__(self, dom: "Domain", slot: int, gen: int, pid: int, name: str,
                 signum: int | None = None):
        self._dom = dom
        self.id = slot
        self.gen = gen
        self.pid = pid
        self.name = name
        self._own = False
        self._exited = False
        self._aio: Any = None  # the asyncio loop binding (_aio.LoopBinding), when attached
        # fixed for the life of a registration, so read once; a number read
        # from the segment that no task may use is never sent (0)
        self._signum = (_security.sendable_signal(int(dom._slot(slot).signum))
                        if signum is None else signum)
        # the lean add: how to reach this registration, shared by every
        # handle of it in this process (Domain._add_handle)
        self._key = (slot, gen)
        self._h = dom._add_handle(slot, gen, self._signum)
        # what this process learned of the task's signal (notify.acquire_peer
        # may have corrected the slot's number) holds for every handle
        self._signum = int(self._h.signum)
        # callback -> (id, name, the lazy fields of its Works): resolved once
        self._fc: dict[Any, tuple[int, str, _AddSource]] = {}
        self._lean = not dom.record_origin
        _HANDLES[id(self)] = self  # its caches are cleared in a forked child

    # ---- identity ---------------------------------------------------------

    @property
    def is_current(self) -> bool:
        return self._own and self.pid == _MY_PID[0] and not self._exited

    @property
    def domain(self) -> "Domain":
        return self._dom

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.name!r} pid={self.pid} gen={self.gen}>"

    def __eq__(self, other):
        return (isinstance(other, Task) and other._dom is self._dom and other.id == self.id
                and other.gen == self.gen)

    def __hash__(self):
        return hash((id(self._dom), self.id, self.gen))

    def _require_current(self, what: str) -> None:
        if not self.is_current:
            if self._own and self._exited:
                raise TaskExitedError(f"{what}: task {self.id} has exited")
            if self.pid == _MY_PID[0]:
                raise NotCurrentTaskError(_security.not_this_handle(self, what))
            raise NotCurrentTaskError(
                f"{what} is only for the task's own process: task {self.id} belongs to pid "
                f"{self.pid}, this is pid {os.getpid()}")

    # ---- add ----------------------------------------------------------------

    def _add_error(self, rc: int, notify, size: int, what: str):
        """Raise an add's error (errors.from_errno, with what this handle
        knows); an adder that finds the task's process dead reaps it first."""
        dom = self._dom
        if rc == -errno.EOWNERDEAD:
            dom._reap(self.id)
        raise errors.from_errno(-rc, what, limit=f"max_procs={dom.max_procs}", notify=notify,
                                valid_modes=VALID_MODES,
                                size=size, payload_size=dom.payload_size, domain=dom.name,
                                pool_size=dom.pool_size, task=f"task {self.id} ({self.name})",
                                pid=self.pid)

    def _resolve(self, func: "CallbackRef") -> "tuple[int, _AddSource]":
        """(signed id, source) of func, its name put into the domain's table;
        cached per handle so a hot add resolves each callback once. The id
        goes to tw_add_h as a signed 64-bit value (the same bits): Python
        converts those without the slow path of an unsigned one."""
        fid, fname = callbacks.resolve(func)
        self._dom._put_name(fid, fname)
        got = (fid - (1 << 64) if fid >= 1 << 63 else fid,
               _AddSource(self._dom.name, self.id, self.gen, fid, fname))
        try:
            if len(self._fc) < 1024 and fid in self._dom._names_put:
                self._fc[func] = got
        except TypeError:  # an unhashable callable: resolved every time
            pass
        return got

    def add(self, func: "CallbackRef", payload: "bytes | bytearray | memoryview" = b"",
            notify: int = TWA_RESUME, *, track: bool = False) -> Work:
        """Queue ``func(work)`` on this task (task_work_add). Lock-free.

        ``track=True`` records the work's outcome in the domain: the Work
        returned can then ``wait()`` for it and read ``outcome``,
        ``result`` and ``error`` (docs/contract.md "Outcomes")."""
        # The lean add (README "Decisions": the add path): one cache lookup,
        # one native call through the registration's shared handle (it
        # carries how to notify; a closed domain's says -EBADF), one light
        # Work. Everything else is the slow path's.
        try:
            got = self._fc.get(func)
        except TypeError:
            got = None
        if got is None:  # (the cache is cleared in a forked child: sender_pid)
            got = self._resolve(func)
        sfid, src = got
        if payload.__class__ is not bytes:
            payload = _as_bytes(payload, self._dom, src.func_id)
        if notify.__class__ is not int:
            raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
        if not self._lean:
            return self._add_origin(src.func_id, src.func_name, payload, notify, track)
        # The Work we return carries the node's enqueued_ns. (Read here, not
        # in C: an out-parameter per call would cost more than the read.)
        now = _mono()
        try:
            rc = lib.tw_add_h(self._h, sfid, payload, len(payload), notify,
                              _ADD_TRACK if track else 0, now)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0 or rc & 3 and not rc & 12:
            rc = self._added(rc, notify, payload)
        w = _new_work(Work)
        w.payload = payload
        w.enqueued_ns = now
        w._src = src
        w._i = rc
        if track:
            w._tracked = True
            w._dom = self._dom
        return w

    def _added(self, rc: int, notify: int, payload: bytes) -> int:
        """The rare ends of a lean add: its error (a closed domain's too),
        or the notification tw_add_h found due but could not send itself
        (TW_DUE_* without TW_DONE_*)."""
        if rc == -errno.EBADF and self._dom._closed:
            self._dom.d  # raises: the domain is closed
        if rc < 0:
            self._add_error(rc, notify, len(payload), "add")
        _notify.deliver(self, rc & 0xF)
        return rc

    def _add_origin(self, fid: int, fname: str, payload: bytes, notify: int,
                    track: bool) -> Work:
        """add() in a domain that records origins (the caller's file:line)."""
        dom = self._dom
        origin = _origin() if not notify & TWAF_NO_ALLOC else b""
        current = self._own and self.pid == _MY_PID[0] and not self._exited
        if current:
            pidfd, efd = -1, self._efd
        else:
            pidfd, efd = dom._peer.get(self._key, _NO_FDS)
        now = _mono()
        try:
            rc = lib.tw_add(dom.d, self.id, self.gen, fid, payload, len(payload), notify, origin,
                            len(origin), efd, pidfd, self._signum, now,
                            current | _ADD_TRACK if track else current)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0:
            self._add_error(rc, notify, len(payload), "add")
        wid, due = _native.unpack_add(rc)
        if due & _DUE and not due & _DONE:
            _notify.deliver(self, due)
        w = Work(fname, fid, payload, sender_pid=_MY_PID[0], target=self.id,
                 target_gen=self.gen, enqueued_ns=now,
                 origin=origin.decode(errors="replace") if origin else None,
                 id=wid, domain=dom.name, state="pending")
        if track:
            w._tracked = True
            w._dom = dom
        return w

    def add_many(self, func: "CallbackRef",
                 payloads: "Iterable[bytes | bytearray | memoryview]",
                 notify: int = TWA_RESUME, *, track: bool = False) -> list[Work]:
        """Queue one work per payload with a single push and one notification.
        The last payload is the newest (it runs first, as if added last).
        ``track=True`` records each work's outcome (see :meth:`add`)."""
        try:
            got = self._fc.get(func)
        except TypeError:
            got = None
        sfid, src = got if got is not None else self._resolve(func)
        fid, fname = src.func_id, src.func_name
        items = [p if p.__class__ is bytes else _as_bytes(p, self._dom, fid) for p in payloads]
        if isinstance(notify, bool) or not isinstance(notify, int):
            raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
        if not items:
            return []
        dom = self._dom
        if not self._lean:
            return self._add_many_origin(fid, fname, items, notify, track)
        if dom._closed:
            dom.d  # raises: the domain is closed
        n = len(items)
        # one flat buffer and the offsets of each payload in it: one native call
        offs = [0, *_accumulate(map(len, items))]
        total = offs[-1]
        if total >= 1 << 32:
            big = max(len(p) for p in items)
            self._add_error(-errno.E2BIG, notify, big, "add_many")
        flat = b"".join(items)
        coffs = ffi.new("uint32_t[]", offs)
        ids = ffi.new("uint64_t[]", n)
        now = _mono()
        try:
            rc = lib.tw_add_many_flat(self._h, sfid, flat, coffs, n, notify,
                                      _ADD_TRACK if track else 0, now, ids)
        except OverflowError:
            _check_notify_range(notify)
            raise
        self._added_many(rc, notify, items)
        src = _ManySource(dom.name, self.id, self.gen, fid, fname, ffi.unpack(ids, n))
        out = []
        append = out.append
        for i, p in enumerate(items):
            w = _new_work(Work)
            w.payload = p
            w.enqueued_ns = now
            w._src = src
            w._i = i
            if track:
                w._tracked = True
                w._dom = dom
            append(w)
        return out

    def _added_many(self, rc: int, notify: int, items: list) -> None:
        """After tw_add_many*: raise its error, or deliver the notification
        it found due but could not send itself."""
        if rc < 0:
            self._add_error(rc, notify, max(len(p) for p in items), "add_many")
        if rc & _DUE and not rc & _DONE:
            _notify.deliver(self, rc)

    def _add_many_origin(self, fid: int, fname: str, items: list, notify: int,
                         track: bool) -> list[Work]:
        dom = self._dom
        origin = _origin() if not notify & TWAF_NO_ALLOC else b""
        keep = [ffi.from_buffer(p) for p in items]
        ptrs = ffi.new("char *[]", keep)
        lens = ffi.new("uint32_t[]", [len(p) for p in items])
        ids = ffi.new("uint64_t[]", len(items))
        current = self.is_current
        pidfd, efd = (-1, self._efd) if current else dom._peer.get(self._key, _NO_FDS)
        now = _mono()
        try:
            rc = lib.tw_add_many(dom.d, self.id, self.gen, fid, ptrs, lens, len(items), notify,
                                 origin, len(origin), efd, pidfd, self._signum, now,
                                 int(current) | (_ADD_TRACK if track else 0), ids)
        except OverflowError:
            _check_notify_range(notify)
            raise
        self._added_many(rc, notify, items)
        o = origin.decode(errors="replace") if origin else None
        out = [Work(fname, fid, p, sender_pid=_MY_PID[0], target=self.id, target_gen=self.gen,
                    enqueued_ns=now, origin=o, id=ids[i], domain=dom.name, state="pending")
               for i, p in enumerate(items)]
        if track:
            for w in out:
                w._tracked = True
                w._dom = dom
        return out

    def _requeue(self, work: Work, notify: int = TWA_RESUME) -> bool:
        """Re-queue dead letter ``work`` on this task (see
        Domain.retry_dead_letters). True if it is now queued here; False if
        another process took it first, or this task accepts no work (then it
        stays a dead letter)."""
        dom = self._dom
        current = self.is_current
        pidfd, efd = (-1, self._efd) if current else dom._peer.get((self.id, self.gen), _NO_FDS)
        rc = lib.tw_requeue(dom.d, work.node, work.id >> 32, self.id, self.gen, notify, efd,
                            pidfd, self._signum, time.monotonic_ns(), int(current))
        if rc == -errno.EOWNERDEAD:
            dom._reap(self.id)
            return False
        if rc in (-errno.ENOENT, -errno.ESRCH):
            return False
        if rc < 0:
            self._add_error(rc, notify, len(work.payload), "retry dead letter")
        _wid, due = _native.unpack_add(rc)
        if due & _DUE and not due & _DONE:
            _notify.deliver(self, due)
        return True

    # ---- cancel -------------------------------------------------------------

    def _cancel(self, mode: int, key: int, what: str) -> Work | None:
        dom = self._dom
        sc = dom._scratch()
        rc = lib.tw_cancel(dom.d, self.id, self.gen, mode, key, sc.wi, sc.payload, sc.origin)
        if rc == -errno.ESRCH:
            return None
        check(rc, what)
        if rc == 0:
            return None
        got = dom._work_from(sc, "cancelled")
        note_cancelled(got.domain, got.id)  # a handle of it says "cancelled" too
        return got

    def cancel(self, work: Work) -> bool:
        """task_work_cancel(): True iff ``work`` was pending and is now removed.
        Matches node *and* generation: never a later work on the same node."""
        if not isinstance(work, Work):
            raise TypeError(f"cancel() takes a Work, got {type(work).__name__}")
        if (work.id is None or work.domain != self._dom.name or work.target != self.id
                or work.target_gen != self.gen):
            return False
        if isinstance(work.id, bool) or not isinstance(work.id, int) or not 0 <= work.id < 1 << 64:
            return False  # no work ever had that id
        if self._cancel(0, work.id, "cancel") is None:
            return False
        work.state = "cancelled"
        return True

    # ---- call: add, wait, result (docs/contract.md "Outcomes") -------------

    def call(self, func: "CallbackRef", payload: Any = b"", *, timeout: float | None = None,
             notify: int = TWA_RESUME) -> bytes | None:
        """Add ``func(work)`` tracked, wait for its outcome and return its
        result (the bytes it returned, or None).

        Raises :class:`~shm_taskwork.errors.CallbackFailedError` (it raised;
        the message is its error), :class:`~shm_taskwork.errors.WorkLostError`
        (``dead_letter``, ``interrupted``, or cancelled by someone else), or
        ``TimeoutError`` at the deadline: the work is then cancelled if it has
        not started, and its handle is the exception's ``work``. On the
        caller's own task the works are run while it waits."""
        w = self.add(func, payload, notify, track=True)
        try:
            outcome = self._await_outcome(w, timeout)
        except TimeoutError:
            took = self.cancel(w)
            state = "cancelled: it had not started" if took else f"it is {w.outcome}"
            exc = TimeoutError(f"call {w.func_name}: no outcome within {timeout} s ({state})")
            exc.work = w  # type: ignore[attr-defined]
            raise exc from None
        if outcome == "ran":
            return w.result
        if outcome == "failed":
            raise errors.CallbackFailedError(w.error or "the callback raised", work=w)
        raise errors.WorkLostError(
            f"call {w.func_name}: work {w.id:#x} ended {outcome}"
            + (f" ({w.reason})" if outcome == "dead_letter" and w.reason else ""),
            work=w, outcome=outcome)

    def _await_outcome(self, w: Work, timeout: float | None) -> str:
        """Wait for w's outcome (the registration runs its own works meanwhile)."""
        return w.wait(timeout)

    def cancel_func(self, func: "CallbackRef") -> Work | None:
        """task_work_cancel_func(): remove the most recently queued pending work
        of ``func``; the removed Work, or None."""
        fid, _ = callbacks.resolve(func)
        return self._cancel(1, fid, "cancel_func")

    def cancel_match(self, pred: Callable[[Work], bool]) -> Work | None:
        """task_work_cancel_match(): remove the newest pending work for which
        ``pred(work)`` is true; the removed Work, or None.

        ``pred`` is Python code, so it is not run under the task's pi_lock (a
        slow predicate must not stall the task's runner): it is evaluated on a
        snapshot taken under the lock, newest first, and the first match is
        then removed by exact node and generation under the lock. If that work
        was run meanwhile, the next match is tried."""
        if not callable(pred):
            raise TypeError("cancel_match() needs a callable predicate")
        dom = self._dom
        n = dom.pool_size
        nodes = ffi.new("uint32_t[]", n)
        gens = ffi.new("uint32_t[]", n)
        cnt = lib.tw_snapshot(dom.d, self.id, self.gen, nodes, gens, n)
        if cnt == -errno.ESRCH:
            return None
        check(cnt, "cancel_match")
        for k in range(min(cnt, n)):
            w = dom._read(nodes[k], gens[k], "pending")
            if w is None or not pred(w):
                continue
            got = self._cancel(0, w.id, "cancel_match")
            if got is not None:
                return got
        return None

    def pending(self) -> int:
        """Works queued now (a snapshot, counted under the task's pi_lock)."""
        rc = lib.tw_pending(self._dom.d, self.id, self.gen)
        if rc == -errno.ESRCH:
            return 0
        return check(rc, "pending")

    # ---- the task's own process only (see registration.Registration) -------
    # On a handle these raise NotCurrentTaskError (or TaskExitedError): what
    # register() returned is the one object that runs the task's works.

    def run(self, *, raise_errors: bool = False) -> int:
        """task_work_run(): run every queued work, newest first, including those
        the callbacks add meanwhile. Returns the number of works run."""
        self._require_current("run")
        raise AssertionError("unreachable: only a registration is current")

    def checkpoint(self) -> int:
        """Cheap: run only if a notify flag is set (or a batch was left over)."""
        self._require_current("checkpoint")
        raise AssertionError("unreachable: only a registration is current")

    def critical(self) -> "contextlib.AbstractContextManager[Task]":
        """Keep TWA_SIGNAL works out of a block of code (see the registration)."""
        self._require_current("critical")
        raise AssertionError("unreachable: only a registration is current")

    def wait(self, timeout: float | None = None) -> int:
        """Block until work is notified (or ``timeout`` seconds pass), run it."""
        self._require_current("wait")
        raise AssertionError("unreachable: only a registration is current")

    def fileno(self) -> int:
        """The task's eventfd (see the registration)."""
        self._require_current("fileno")
        raise AssertionError("unreachable: only a registration is current")

    def attach_loop(self, loop: "asyncio.AbstractEventLoop | None" = None) -> None:
        """Run this task's works from an asyncio loop (see the registration)."""
        self._require_current("attach_loop")
        raise AssertionError("unreachable: only a registration is current")

    def detach_loop(self) -> None:
        """Undo attach_loop(); nothing to undo on a handle."""

    def serve(self, *, stop_signals: "tuple[int, ...] | list[int]" = (signal.SIGTERM,
                                                                      signal.SIGINT),
              drain_timeout: float | None = 30.0, adopt: bool = True,
              watchdog: bool = True) -> int:
        """Run works as they arrive until a stop signal, then drain (see the
        registration: ``Registration.serve``)."""
        self._require_current("serve")
        raise AssertionError("unreachable: only a registration is current")

    def adopt(self) -> int:
        """Re-queue the dead letters left for this task's name (see the registration)."""
        self._require_current("adopt")
        raise AssertionError("unreachable: only a registration is current")

    async def wait_async(self, timeout: float | None = None) -> int:
        """``await``-able wait() (see the registration)."""
        self._require_current("wait_async")
        raise AssertionError("unreachable: only a registration is current")

    def exit(self) -> None:
        """PF_EXITING (see the registration)."""
        self._require_current("exit")
        raise AssertionError("unreachable: only a registration is current")

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_current:
            self.exit()

    # ---- keyed add (README "More than one host": the bridge) -----------------

    def add_keyed(self, func: "CallbackRef", payload: "bytes | bytearray | memoryview" = b"",
                  notify: int = TWA_RESUME, *, key: "str | bytes",
                  track: bool = False) -> "KeyRecord":
        """Queue ``func(work)`` once per ``key`` (see :mod:`shm_taskwork.keys`).

        The key is recorded in the domain before the push. Returns a
        :class:`~shm_taskwork.keys.KeyRecord`: ``fresh`` True if this call
        queued the work; False if the key was recorded before (the work was
        queued, maybe already run, or filed as a dead letter) and nothing was
        queued now. Raises as :meth:`add`, and
        :class:`~shm_taskwork.keys.KeyBusyError` while another live process
        is adding the same key. ``track=True`` records the outcome of a work
        this call queues: ``dom.work(record.work_id)`` reads it."""
        fid, fname = callbacks.resolve(func)
        payload = _as_bytes(payload, self._dom, fid) if payload.__class__ is not bytes else payload
        if notify.__class__ is not int:
            raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
        dom = self._dom
        dom._put_name(fid, fname)
        current = self._own and self.pid == _MY_PID[0] and not self._exited
        if current:
            pidfd, efd = -1, self._efd
        else:
            pidfd, efd = dom._peer.get((self.id, self.gen), _NO_FDS)
        info = ffi.new("struct tw_key_info *")
        try:
            rc = lib.tw_add_keyed(dom.d, _keys.key_id(key), self.id, self.gen, fid, payload,
                                  len(payload), notify, efd, pidfd, self._signum,
                                  time.monotonic_ns(), current | _ADD_TRACK if track else current,
                                  info)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0:
            if rc in (-errno.EBUSY, -errno.ENOSPC):
                raise errors.from_errno(-rc, "add_keyed", key=key)
            self._add_error(rc, notify, len(payload), "add_keyed")
        if info.fresh and rc & _DUE and not rc & _DONE:
            _notify.deliver(self, rc)
        return _keys._record(info)


def _check_notify_range(notify: int) -> None:
    """A notify value too wide for the native int is as invalid as any other."""
    if not -(1 << 31) <= notify < (1 << 31):
        raise InvalidModeError(f"notify={notify!r} is not valid here: use {VALID_MODES}",
                               errno=errno.EINVAL)


def _as_bytes(payload, dom: "Domain", fid: int) -> bytes:
    """The bytes of a payload for callback ``fid`` in ``dom``: a bytes-like
    payload as it is, any other object encoded with the codec the callback
    declared (docs/contract.md "Codecs"); a raw callback's is a TypeError."""
    try:
        return bytes(memoryview(payload))
    except TypeError:
        pass
    return dom._encode_payload(fid, payload)


def _after_fork() -> None:
    _MY_PID[0] = os.getpid()
    for t in list(_HANDLES.values()):
        t._fc.clear()   # their Works' sender_pid is this process now
        t._h.current = 0   # a child is not its parent's task


os.register_at_fork(after_in_child=_after_fork)


