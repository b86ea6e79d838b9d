"""Task: one registration of a process in a domain, and the notifications.

Why no lock is needed on the add path: a work is pushed onto the task's list
with one compare-and-swap in the native core (a Treiber push), and the
notification that follows is decided by a fetch-or on the slot's flag word:
only the adder that turns NOTIFY_RESUME (or NOTIFY_SIGNAL) from 0 to 1 writes
the eventfd (or sends the signal). The runner keeps the flags set while it
runs (adders meanwhile notify nobody) and clears them on its way out, then
detaches once more: an adder whose push lands after that detach finds the
flag clear and notifies again: coalescing never loses a wake-up.

Getting at another process's eventfd: ``pidfd_getfd(2)`` where the kernel
allows it (same user, ptrace access); otherwise the task's own process hands
the descriptor over a Unix socket with SCM_RIGHTS, both ends checking the
other's SO_PEERCRED (hosts with Yama ptrace_scope >= 1). Setting
``SHM_TASKWORK_FD_PASSING=scm`` in the sender forces the socket path.

Signals: SIGNAL sends the task's signal (SIGUSR1) through a pidfd whose
process was proven, after it was opened, to map this domain's segment and to
still be the registered process (pid plus start time): a corrupt or forged
slot can never make us signal a stranger, nor take an fd from one (see
_security.py). The handler
runs in the main thread between bytecodes; it runs the works, never nests a
run (a run in progress picks the new works up) and wakes a concurrent wait().
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import platform
import select
import signal
import socket
import sys
import threading
import time
import weakref
from itertools import accumulate as _accumulate
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import _native, _security, callbacks
from ._native import check, ffi, lib
from .constants import TWA_RESUME, TWAF_NO_ALLOC, VALID_MODES
from .errors import (InvalidModeError, NotCurrentTaskError, PayloadTooLargeError,
                     PoolExhaustedError, TaskExitedError, TaskWorkError)
from .work import Work, note_cancelled

if TYPE_CHECKING:
    from .keys import KeyRecord
    import asyncio

    from .callbacks import CallbackRef
    from .domain import Domain

log = logging.getLogger("shm_taskwork")

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_F_NOTIFY = lib.TW_F_NOTIFY_RESUME | lib.TW_F_NOTIFY_SIGNAL
_F_SIGNAL = lib.TW_F_NOTIFY_SIGNAL
_DUE = lib.TW_DUE_EVENTFD | lib.TW_DUE_SIGNAL
_DONE = lib.TW_DONE_EVENTFD | lib.TW_DONE_SIGNAL
_NO_FDS = (-1, -1)
# fault injection: SHM_TASKWORK_KILLPOINT=in_callback[:n] (read once)
_KP_IN_CALLBACK = lib.tw_killpoint_get() == lib.TW_KP_IN_CALLBACK
_MY_PID = [os.getpid()]  # kept right across fork (register_at_fork below)

# signum -> tasks of this process that want it; signum -> the handler we replaced
_mono = time.monotonic_ns
_new_work = object.__new__
# the batch run path (see native/taskwork.h, tw_run_load)
_REC = lib.TW_REC_WORDS
_POFF, _OWNER_AT, _RUNNING = lib.TW_REC_POFF, lib.TW_REC_OWNER_AT, lib.TW_REC_RUNNING
_RUN_CHUNK = 1024
_NIL = lib.TW_NIL
_DONE_DELTA = lib.TW_DONE_DELTA
# chunks up to this size time each callback (two clock reads a work would cost
# more than the rest of the loop); larger ones count each the chunk's mean
_TIMED_CHUNK = 8
# A work is started by one aligned 8-byte store into its owner word: a release
# store on x86 (total store order). Elsewhere a native call makes it.
_STORE_STARTS = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# wait(): spin (yielding the CPU) this long before blocking; never on one CPU
_SPIN = (os.cpu_count() or 1) > 1
_SPIN_MAX_NS = 50_000
_SPIN_MIN_NS = 2_000


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
                ("_state", "pending"), ("reason", None), ("target_name", None))


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
                ("_state", "pending"), ("reason", None), ("target_name", None))


class _Chunk:
    """What the run loop keeps of a loaded chunk: owner-word positions and
    RUNNING values, and the raw arrays (for node indices)."""

    __slots__ = ("k", "ats", "runs", "raw")

    def __init__(self, k: int, ats: list, runs: list, raw: bytes):
        self.k, self.ats, self.runs, self.raw = k, ats, runs, raw

    def node(self, i: int) -> int:
        return memoryview(self.raw).cast("Q")[lib.TW_REC_ID * self.k + i] & 0xFFFFFFFF


class _RunSource:
    """The lazy fields of the Works of one loaded run chunk: a copy of the
    chunk's id, func, enqueued and sender arrays (i: the work's index)."""

    __slots__ = ("domain", "target", "target_gen", "raw", "k", "origins", "func_name")

    def __init__(self, dom: "Domain", target: int, target_gen: int, raw: bytes, k: int,
                 origins: bytes | None):
        self.domain, self.target, self.target_gen = dom.name, target, target_gen
        self.raw, self.k, self.origins = raw, k, origins
        self.func_name = dom.func_name

    def lazy_fields(self, i: int) -> tuple:
        mv, k = memoryview(self.raw).cast("Q"), self.k
        fid = mv[lib.TW_REC_FUNC * k + i]
        sender = mv[lib.TW_REC_SENDER * k + i]
        pid, olen = sender & 0xFFFFFFFF, sender >> 32
        origin = None
        if olen and self.origins is not None:
            at = i * lib.TW_ORIGIN_LEN
            origin = self.origins[at:at + olen].decode(errors="replace")
        return (("func_name", callbacks.name_of(fid) or self.func_name(fid)), ("func_id", fid),
                ("id", mv[lib.TW_REC_ID * k + i]),
                ("sender_pid", pid - (1 << 32) if pid >= 1 << 31 else pid),
                ("target", self.target), ("target_gen", self.target_gen),
                ("enqueued_ns", mv[lib.TW_REC_ENQ * k + i]), ("origin", origin),
                ("domain", self.domain), ("_state", "running"), ("reason", None),
                ("target_name", None))


_SIGNAL_TASKS: dict[int, list["Task"]] = {}
# every Task handle of this process, by id (equal handles are distinct here)
_HANDLES: "weakref.WeakValueDictionary[int, Task]" = weakref.WeakValueDictionary()
_PREV_HANDLERS: dict[int, object] = {}


def log_callback_error(work: Work, exc: BaseException) -> None:
    where = f" (queued at {work.origin})" if work.origin else ""
    log.error("callback %s failed for work %#x%s: %r", work.func_name, work.id or 0, where, exc,
              exc_info=exc)


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


class _FdServer(threading.Thread):
    """Hands the task's eventfd to local peers of the same uid (SCM_RIGHTS).

    It listens on an abstract socket whose name nobody can predict (a random
    token, published in the task's slot), so no other user can bind it first;
    a name found taken is logged and another one tried. Should the socket ever
    fail, the server logs it and listens on a fresh name: it never stops
    quietly while the task lives."""

    def __init__(self, dom, slot: int, efd: int, signum: int):
        super().__init__(name="shm_taskwork-fd-server", daemon=True)
        self.efd = efd
        # The task's own word on its signal: a member may rewrite the slot's
        # signum, not what this process answers (README "Security").
        self.hello = b"E" + bytes([signum])
        self._dom = dom
        self._slot_index = slot
        # not `_stop`: threading.Thread has a method of that name (join, fork)
        self._stopping = False
        # Held while the slot's token is written, so that once stop() returns
        # the thread never touches the segment again (it may be unmapped).
        self._lock = threading.RLock()
        self.sock = self._listen()

    def _listen(self) -> socket.socket:
        for _ in range(16):
            token = _security.new_fd_token()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(_security.fd_socket_name(self._dom.name, token))
                sock.listen(16)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("task %d of domain %s: fd-passing socket name %s is taken; "
                            "trying another", self._slot_index, self._dom.name, token.hex())
                continue
            _security.write_fd_token(self._dom._slot(self._slot_index), token)
            return sock
        raise OSError(errno.EADDRINUSE, "16 random fd-passing socket names in a row were taken")

    def run(self):
        # The task's signal must go to the main thread: Python runs handlers
        # there, the blocking call to interrupt is there, and a signal the
        # main thread blocks must stay pending instead of landing here.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if not self._renew(exc):
                    return
                continue
            with conn:
                try:
                    _pid, uid, _gid = _security.peer_cred(conn)
                    if uid != os.getuid() and uid != 0:
                        conn.sendall(b"N")
                        continue
                    socket.send_fds(conn, [self.hello], [self.efd])
                except OSError:
                    pass

    def _renew(self, exc: OSError) -> bool:
        """After a failed accept: False if stopping; else wait out a lack of
        descriptors or memory, or listen on a new name. Never silent."""
        with self._lock:
            if self._stopping:
                return False
            log.warning("task %d of domain %s: fd server: %r", self._slot_index,
                        self._dom.name, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)  # back off; the same socket still listens
                return True
            try:
                self.sock.close()
                self.sock = self._listen()
            except (OSError, ValueError) as again:
                log.error("task %d of domain %s: the fd server cannot listen any more, peers "
                          "that need SCM_RIGHTS cannot wake it: %r", self._slot_index,
                          self._dom.name, again)
                return False
            return True

    def stop(self):
        with self._lock:
            self._stopping = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _is_eventfd(fd: int) -> bool:
    """True if fd is an eventfd opened non-blocking. A peer's descriptor that
    could block us is never written to (README "Security": a member never
    blocks on another member's descriptors; a full eventfd counts as notified)."""
    try:
        return (os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
                and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK))
    except OSError:
        return False


def _handles_signal(pid: int, signum: int) -> bool:
    """True if process pid catches, blocks or ignores signum (/proc/PID/status)."""
    if not 0 < signum < signal.NSIG or signum in (signal.SIGKILL, signal.SIGSTOP):
        return False
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigBlk:", "SigIgn:", "SigCgt:")):
                    mask |= int(line.split()[1], 16)
    except (OSError, ValueError):
        return False
    return bool(mask >> (signum - 1) & 1)


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
        # the lean add: what never changes for this handle, packed once
        self._key = (slot, gen)
        h = ffi.new("struct tw_handle *")
        h.d, h.slot, h.gen, h.signum, h.own_efd = dom._d, slot, gen, self._signum, -1
        self._h = h
        # callback -> (id, name, the lazy fields of its Works): resolved once
        self._fc: dict[Any, tuple[int, str, _AddSource]] = {}
        self._lean = not dom.record_origin
        _HANDLES[id(self)] = self  # its caches are cleared in a forked child

    # ---- registration -----------------------------------------------------

    @classmethod
    def _register(cls, dom, name, signum, install_handler, exit_signals=()):
        if dom.current is not None:
            raise TaskWorkError(
                f"this process is already task {dom.current.id} of domain {dom.name!r}; "
                "a process plays one task per domain")
        if name is not None:
            _security.check_text(name, "a task name", lib.TW_NAME_LEN - 1)
        signum = _security.task_signal(signum)
        exits = _exit_signal_set(exit_signals, signum)
        if (install_handler or exits) and threading.current_thread() is not threading.main_thread():
            raise ValueError("register(install_handler=True) and exit_signals need the main "
                             "thread (Python runs signal handlers there)")
        pid = os.getpid()
        name = name or f"pid{pid}"
        from .domain import TASK_NAME_PREFIX, task_name_id
        name_id = task_name_id(name)
        label = (TASK_NAME_PREFIX + name).encode()
        lib.tw_name_put(dom.d, name_id, label, len(label))  # ENOSPC: dead letters show no name
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        gen = ffi.new("uint32_t *")
        if install_handler:
            # Handler first: a peer may send TWA_SIGNAL the moment tw_register
            # publishes the slot, and the default action would kill us.
            _ensure_handler(int(signum))
        # Slots of dead tasks are free once reaped: this registrant notices.
        dom._reap_dead()
        rc = lib.tw_register(dom.d, name.encode(), name_id, int(signum), efd, os.getuid(),
                             time.monotonic_ns(), gen)
        if rc == -errno.ENOSPC and dom._reap_dead():
            rc = lib.tw_register(dom.d, name.encode(), name_id, int(signum), efd, os.getuid(),
                                 time.monotonic_ns(), gen)
        if rc < 0:
            os.close(efd)
            if install_handler and not _SIGNAL_TASKS.get(signum):
                signal.signal(signum, _PREV_HANDLERS.pop(signum, signal.SIG_DFL) or signal.SIG_DFL)
            if -rc == errno.ENOSPC:
                raise TaskWorkError(
                    f"all {dom.max_tasks} task slots of domain {dom.name!r} are in use by live "
                    f"tasks (max_tasks={dom.max_tasks})", errno=errno.ENOSPC)
            check(rc, "register")
        t = cls(dom, rc, gen[0], pid, name, int(signum))
        t._own = True
        t._efd = efd
        t._in_run = False
        t._rerun = False
        t._waiting = False
        t._exit_after_run = False
        t._ran_total = 0
        t._unfinished: list[tuple[int, int]] = []   # (node, outcome) to finish again
        t._critical = 0
        t._deferred = False
        t._terminate_with = 0
        t._out = ffi.new("uint32_t[]", dom.pool_size)
        t._bpos = t._bend = 0   # the detached batch: _out[_bpos:_bend], newest first
        t._sc = _native.Scratch(dom.payload_size)
        t._h.own_efd = efd
        # the batch run path: records, payloads and origins of up to _chunk works
        # per native call (at most ~1 MiB of payload buffer)
        t._chunk = max(1, min(_RUN_CHUNK, (1 << 20) // max(1, dom.payload_size)))
        t._rec = ffi.new("uint64_t[]", t._chunk * lib.TW_REC_WORDS)
        t._parea = ffi.new("char[]", t._chunk * max(1, dom.payload_size))
        t._oarea = (ffi.new("char[]", t._chunk * lib.TW_ORIGIN_LEN) if dom.record_origin
                    else ffi.NULL)
        t._outc = ffi.new("uint8_t[]", t._chunk)
        t._ends = ffi.new("uint64_t[]", t._chunk)
        # the segment as 64-bit words: the run loop's stores into owner words
        t._seg = memoryview(ffi.buffer(dom._d.base, dom._d.size & ~7)).cast("Q")
        t._flagsp = ffi.cast("uint32_t *", ffi.addressof(dom._slot(t.id), "flags"))
        slot_at = int(dom._d.slots_off) + t.id * ffi.sizeof("struct tw_slot")
        t._head_at = (slot_at + ffi.offsetof("struct tw_slot", "head")) // 8
        t._spin_ns = _SPIN_MAX_NS if _SPIN else 0
        try:
            t._server = _FdServer(dom, t.id, efd, int(signum))
            t._server.start()
        except OSError as exc:
            log.error("task %d of domain %s: no fd server (%r): peers that cannot use "
                      "pidfd_getfd will not wake it through its eventfd", t.id, dom.name, exc)
            t._server = None
        if install_handler:
            _SIGNAL_TASKS.setdefault(t._signum, []).append(t)
            # TWA_SIGNAL is never stranded (README): a signal our handler has
            # not taken while works wait is sent again to the main thread.
            rc = lib.tw_sigwatch_add(dom.d, t.id, t.gen, t._signum,
                                     threading.main_thread().native_id)
            if rc < 0:
                log.error("task %d of domain %s: no signal watcher (%s): a TWA_SIGNAL "
                          "deferred by the interpreter may wait for the next signal",
                          t.id, dom.name, os.strerror(-rc))
        t._handler = install_handler
        t._exit_signals = exits
        for sig in exits:
            _install_exit_signal(sig, t)
        atexit.register(t._atexit)
        dom._current = t
        return t

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

    # ---- notification plumbing (sender side) --------------------------------


    def _acquire_peer(self) -> tuple[int, int]:
        dom = self._dom
        key = (self.id, self.gen)
        got = dom._peer.get(key)
        if got is not None and got[0] >= 0 and got[1] >= 0:
            return got
        if got is not None:  # half of it failed last time: start afresh
            for fd in dom._peer.pop(key):
                if fd >= 0:
                    os.close(fd)
        for old in [k for k in dom._peer if k[0] == self.id and k[1] != self.gen]:
            for fd in dom._peer.pop(old):  # an earlier registration of this slot
                if fd >= 0:
                    os.close(fd)
        s = dom._slot(self.id)
        pid, start, efd_num = int(s.pid), int(s.start_ticks), int(s.efd)
        if s.gen != self.gen or pid <= 0:
            return -1, -1
        if _security.refused_before(dom, self.id, self.gen, pid, start):
            return -1, -1
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return -1, -1
        # The pidfd pins the process. Before anything is sent to it or taken
        # from it, prove that it joined this domain (it maps this segment),
        # then that it is the registrant (start time). See _security.
        why = _security.prove_joined(dom, self.id, self.gen, pidfd, pid, start)
        if why is not None:
            os.close(pidfd)
            _security.refuse(dom, self.id, self.gen, why)
            return -1, -1
        efd = -1
        if os.environ.get("SHM_TASKWORK_FD_PASSING") != "scm":
            rc = lib.tw_pidfd_getfd(pidfd, efd_num)
            efd = rc if rc >= 0 else -1
            # The number came from the segment: make sure it is the task's
            # eventfd, not some other descriptor we would write 8 bytes into.
            if efd >= 0 and not _is_eventfd(efd):
                os.close(efd)
                efd = -1
                log.warning("task %d of domain %s: fd %d of its process is not a "
                            "non-blocking eventfd; asking the task itself",
                            self.id, dom.name, efd_num)
        # The task's own server hands over its eventfd (if we have none yet)
        # and says which signal it takes: the slot's number is a member's to
        # rewrite, and a switched number would trigger another handler of
        # the task's process.
        got_efd, told, why = _security.fetch_eventfd(dom, s, pid)
        if why is not None:
            _security.refuse(dom, self.id, self.gen, why)
        if efd < 0:
            efd = got_efd
            if efd >= 0 and not _is_eventfd(efd):
                os.close(efd)
                efd = -1
                _security.refuse(dom, self.id, self.gen,
                                 "not a non-blocking eventfd: the task's fd server sent another kind of fd")
        elif got_efd >= 0:
            os.close(got_efd)
        if told is not None and told != self._signum:
            _security.refuse(dom, self.id, self.gen,
                             f"signal: the slot says signal {int(s.signum)}, the task itself "
                             f"says {told}: sending {told}")
            self._signum = self._h.signum = _security.sendable_signal(told)
        elif told is None and self._signum != signal.SIGUSR1:
            # No word from the task (its server is not up yet, or gone): only
            # the default signal is sent on the slot's say-so; this add
            # leaves the work queued and the next one asks again.
            os.close(pidfd)
            return -1, efd
        # The signal number came from the segment too: send it only if it is
        # one a task may use and the task handles (or blocks, or ignores) it.
        # Any other would meet its default action and kill or stop the task.
        if not self._signum:
            _security.refuse(dom, self.id, self.gen,
                             f"signal: signal {int(s.signum)} of the slot is not a task signal")
            os.close(pidfd)
            pidfd = -1
        elif not _handles_signal(pid, self._signum):
            log.debug("task %d does not handle signal %d: not signalling it", self.id,
                      self._signum)
            os.close(pidfd)
            pidfd = -1
        dom._peer[key] = (pidfd, efd)
        return pidfd, efd

    def _deliver(self, due: int) -> None:
        """Perform the notification tw_add found due but could not do itself."""
        if self.is_current:
            if due & lib.TW_DUE_EVENTFD and not due & lib.TW_DONE_EVENTFD:
                lib.tw_eventfd_write(self._efd)
            if due & lib.TW_DUE_SIGNAL and not due & lib.TW_DONE_SIGNAL:
                os.kill(self.pid, self._signum)
            return
        pidfd, efd = self._acquire_peer()
        if due & lib.TW_DUE_EVENTFD and not due & lib.TW_DONE_EVENTFD and efd >= 0:
            lib.tw_eventfd_write(efd)
        if due & lib.TW_DUE_SIGNAL and not due & lib.TW_DONE_SIGNAL and pidfd >= 0:
            lib.tw_pidfd_send(pidfd, self._signum)

    # ---- add ----------------------------------------------------------------

    def _add_error(self, rc: int, notify, size: int, what: str):
        e = -rc
        dom = self._dom
        if e == errno.EINVAL:
            raise InvalidModeError(
                f"{what}: notify={notify!r} is not valid here: use {VALID_MODES}", errno=e)
        if e == errno.E2BIG:
            raise PayloadTooLargeError(
                f"{what}: payload of {size} bytes is larger than the domain's payload_size "
                f"({dom.payload_size} bytes); nothing was queued", errno=e)
        if e == errno.ENOMEM:
            raise PoolExhaustedError(
                f"{what}: the work pool of domain {dom.name!r} is empty (pool_size="
                f"{dom.pool_size}); nothing was queued", errno=e)
        if e == errno.EOWNERDEAD:
            # The task's process died: this adder noticed, so it reaps it.
            dom._reap(self.id)
            raise TaskExitedError(
                f"{what}: task {self.id} ({self.name}) is dead (its process {self.pid} died) "
                "and accepts no more work (ESRCH)")
        if e == errno.ESRCH:
            raise TaskExitedError(
                f"{what}: task {self.id} ({self.name}) has exited and accepts no more work (ESRCH)")
        check(rc, what, limit=f"max_procs={dom.max_procs}")

    def _resolve(self, func: "CallbackRef") -> "tuple[int, str, _AddSource]":
        """(id, name, source) of func, its name put into the domain's table;
        cached per handle so a hot add resolves each callback once."""
        fid, fname = callbacks.resolve(func)
        self._dom._put_name(fid, fname)
        got = (fid, fname, _AddSource(self._dom.name, self.id, self.gen, fid, fname))
        try:
            if len(self._fc) < 1024 and fid in self._dom._names_put:
                self._fc[func] = got
        except TypeError:  # an unhashable callable: resolved every time
            pass
        return got

    def add(self, func: "CallbackRef", payload: "bytes | bytearray | memoryview" = b"",
            notify: int = TWA_RESUME) -> Work:
        """Queue ``func(work)`` on this task (task_work_add). Lock-free."""
        try:
            got = self._fc.get(func)
        except TypeError:
            got = None
        if got is None:  # (the cache is cleared in a forked child: sender_pid)
            got = self._resolve(func)
        fid, fname, src = got
        if payload.__class__ is not bytes:
            payload = _as_bytes(payload)
        if notify.__class__ is not int:
            raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
        dom = self._dom
        if dom._closed:
            dom.d  # raises: the domain is closed
        if not self._lean:
            return self._add_origin(fid, fname, payload, notify)
        current = self._own and self.pid == _MY_PID[0] and not self._exited
        pidfd, efd = _NO_FDS if current else dom._peer.get(self._key, _NO_FDS)
        now = _mono()  # the Work we return carries the node's enqueued_ns
        try:
            rc = lib.tw_add_h(self._h, fid, payload, len(payload), notify, efd, pidfd, current,
                              now)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0:
            self._add_error(rc, notify, len(payload), "add")
        if rc & 3 and not rc & 12:  # TW_DUE_* without TW_DONE_*: ours to deliver
            self._deliver(rc & 0xF)
        w = _new_work(Work)
        w.payload = payload
        w.enqueued_ns = now
        w._src = src
        w._i = rc
        return w

    def _add_origin(self, fid: int, fname: str, payload: bytes, notify: int) -> Work:
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
                            len(origin), efd, pidfd, self._signum, now, current)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0:
            self._add_error(rc, notify, len(payload), "add")
        wid, due = _native.unpack_add(rc)
        if due & _DUE and not due & _DONE:
            self._deliver(due)
        return Work(fname, fid, payload, sender_pid=_MY_PID[0], target=self.id,
                    target_gen=self.gen, enqueued_ns=now,
                    origin=origin.decode(errors="replace") if origin else None,
                    id=wid, domain=dom.name, state="pending")

    def add_many(self, func: "CallbackRef",
                 payloads: "Iterable[bytes | bytearray | memoryview]",
                 notify: int = TWA_RESUME) -> list[Work]:
        """Queue one work per payload with a single push and one notification.
        The last payload is the newest (it runs first, as if added last)."""
        try:
            got = self._fc.get(func)
        except TypeError:
            got = None
        fid, fname, _ = got if got is not None else self._resolve(func)
        items = [p if p.__class__ is bytes else _as_bytes(p) for p in payloads]
        if isinstance(notify, bool) or not isinstance(notify, int):
            raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
        if not items:
            return []
        dom = self._dom
        if not self._lean:
            return self._add_many_origin(fid, fname, items, notify)
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
        current = self._own and self.pid == _MY_PID[0] and not self._exited
        pidfd, efd = _NO_FDS if current else dom._peer.get(self._key, _NO_FDS)
        now = _mono()
        try:
            rc = lib.tw_add_many_flat(self._h, fid, flat, coffs, n, notify, efd, pidfd, current,
                                      now, ids)
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
            append(w)
        return out

    def _added_many(self, rc: int, notify: int, items: list) -> None:
        """After tw_add_many*: raise its error, or deliver the notification
        it found due but could not send itself."""
        if rc < 0:
            self._add_error(rc, notify, max(len(p) for p in items), "add_many")
        if rc & _DUE and not rc & _DONE:
            self._deliver(rc)

    def _add_many_origin(self, fid: int, fname: str, items: list, notify: int) -> list[Work]:
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
                                 int(current), ids)
        except OverflowError:
            _check_notify_range(notify)
            raise
        self._added_many(rc, notify, items)
        o = origin.decode(errors="replace") if origin else None
        return [Work(fname, fid, p, sender_pid=_MY_PID[0], target=self.id, target_gen=self.gen,
                     enqueued_ns=now, origin=o, id=ids[i], domain=dom.name, state="pending")
                for i, p in enumerate(items)]

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
            self._deliver(due)
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

    # ---- run (own task only) --------------------------------------------------

    @property
    def _batch(self) -> int:
        """Works detached by a run and not started yet (left by an interrupted run)."""
        return self._bend - self._bpos

    def run(self, *, raise_errors: bool = False) -> int:
        """task_work_run(): run every queued work, newest first, including those
        the callbacks add meanwhile. Returns the number of works run."""
        self._require_current("run")
        return self._run(raise_errors, False)

    def _run(self, raise_errors: bool, keep_resume: bool) -> int:
        """run(); with keep_resume (wait() only), NOTIFY_RESUME stays set on the
        way out: adders keep not writing the eventfd while wait() spins, and
        wait() clears it on its way to sleep."""
        if self._in_run:
            # A signal arrived while a callback ran: the outer run picks the
            # new works up (its loop detaches until the list is empty).
            self._rerun = True
            return 0
        self._in_run = True
        errs: list[BaseException] = []
        ran = 0
        dom = self._dom
        try:
            if self._unfinished:
                self._finish_unfinished()
            # A wake-up is consumed once per run, not once per batch.
            if not keep_resume:
                lib.tw_eventfd_drain(self._efd)
            bits = _F_SIGNAL if keep_resume else _F_NOTIFY
            cleared = False
            while True:
                if self._bpos >= self._bend:
                    self._rerun = False
                    n = self._detach()
                    if n == 0:
                        if self._rerun:
                            continue
                        if cleared:
                            break
                        # The lazy clear: NOTIFY_* stayed set while we ran, so
                        # adders did not notify. Clear on the way out, then
                        # look once more: an adder whose push came after our
                        # last detach either is seen by this look or finds
                        # the flag clear and notifies (no lost wake-up).
                        cleared = True
                        if self._flagsp[0] & bits:
                            lib.tw_flags_clear(dom.d, self.id, bits)
                            continue
                        break
                    cleared = False
                ran += self._run_batch(errs)
        finally:
            self._in_run = False
        self._ran_total += ran
        if self._exit_after_run:  # a callback called exit(): finish it now
            self._exit_after_run = False
            self.exit()
        if self._terminate_with:  # an exit signal arrived during the run
            _terminate(self)
        if raise_errors and errs:
            raise ExceptionGroup(f"{len(errs)} task-work callback(s) raised", errs)
        return ran

    def _detach(self) -> int:
        dom = self._dom
        if (self._seg[self._head_at] & 0xFFFFFFFF) == _NIL and not (
                self._flagsp[0] & lib.TW_F_EXITING):
            return 0  # an empty list (one load): no native call, as in tw_detach
        n = lib.tw_detach(dom.d, self.id, self.gen, self._out, dom.pool_size)
        if n == -errno.ESRCH:
            return 0
        check(n, "run")  # a lock timeout took nothing: the works wait for the next run
        self._bpos, self._bend = 0, n   # _out[0:n], newest first
        return n

    def _finish_unfinished(self) -> None:
        """Finish works whose end could not be recorded before (a dead-letter
        filing whose lock timed out): they stay ours until it succeeds."""
        dom, sc = self._dom, self._sc
        while self._unfinished:
            node, outcome = self._unfinished[-1]
            check(lib.tw_step(dom.d, self.id, node, outcome, lib.TW_NIL, sc.wi, sc.payload,
                              sc.origin), "run")
            self._unfinished.pop()

    def _run_batch(self, errs: list) -> int:
        """Run the detached batch, a chunk at a time: one native call loads a
        chunk (records, payloads), the loop below starts and runs each work
        with no native call (one store into the node's owner word makes it
        RUNNING: from then on it counts as started), one native call finishes
        the chunk (frees the nodes, counts, histograms)."""
        ran = 0
        dom = self._dom
        while self._bpos < self._bend:
            k = min(self._chunk, self._bend - self._bpos)
            nodes = self._out + self._bpos
            rc = lib.tw_run_load(dom.d, self.id, nodes, k, self._rec, self._parea, self._oarea,
                                 self._outc)
            check(rc, "run")
            ran += self._run_chunk(nodes, k, errs)
        return ran

    def _run_chunk(self, nodes: Any, k: int, errs: list) -> int:
        dom, rec = self._dom, self._rec
        # ids, funcs, enqueued, senders: kept as bytes for the lazy fields
        raw = ffi.buffer(rec, 8 * 4 * k)[:]
        fids = raw[8 * k:16 * k]
        homogeneous = fids == fids[:8] * k
        offs = ffi.unpack(rec + _POFF * k, k + 1)
        pl = ffi.buffer(self._parea, offs[k])[:]
        src = _RunSource(dom, self.id, self.gen, raw, k,
                         ffi.buffer(self._oarea, k * lib.TW_ORIGIN_LEN)[:] if self._oarea
                         else None)
        fid0 = int.from_bytes(fids[:8], sys.byteorder)
        fn = callbacks._BY_ID.get(fid0)
        if homogeneous and fn is not None and fn.__shm_taskwork_batch__:
            return self._run_whole_batch(fn, nodes, k, offs, pl, src, errs)
        chunk = _Chunk(k, ffi.unpack(rec + _OWNER_AT * k, k), ffi.unpack(rec + _RUNNING * k, k),
                       raw)
        if (homogeneous and fn is not None and not fn.__shm_taskwork_async__ and _STORE_STARTS
                and not _KP_IN_CALLBACK):
            return self._run_plain(fn, nodes, chunk, offs, pl, src, errs)
        return self._run_mixed(nodes, chunk, memoryview(fids).cast("Q").tolist(), offs, pl,
                               src, errs)

    def _run_plain(self, fn: Any, nodes: Any, c: "_Chunk", offs: list, pl: bytes,
                   src: _RunSource, errs: list) -> int:
        """The common case: every work of the chunk is for one synchronous
        per-work callback. Per work: a light Work, one store (started), the
        call, one store (done). No native call."""
        seg, outc, ends = self._seg, self._outc, self._ends
        k = c.k
        timed = k <= _TIMED_CHUNK
        new, mono = _new_work, _mono
        started = done = -1     # works 0..started have started, 0..done returned
        try:
            for i, at, running, off, end in zip(range(k), c.ats, c.runs, offs,
                                                 islice(offs, 1, None)):
                w = new(Work)
                w.payload = pl[off:end]
                w._src = src
                w._i = i
                # DETACHED -> RUNNING: from this store on the work has started
                # (a reaper reports it interrupted, never runs it again)
                seg[at] = running
                started = i
                try:
                    fn(w)
                except Exception as exc:
                    outc[i] = lib.TW_OUT_ERROR
                    log_callback_error(w, exc)
                    errs.append(exc)
                if timed:
                    ends[i] = mono()
                # RUNNING -> DONE: it ran; counted free from here on
                seg[at] = running + _DONE_DELTA
                done = i
        except BaseException:
            started = self._interrupted(c, started, done, set(), [])
            raise
        finally:
            self._end_chunk(nodes, c, started, set(), [], timed)
        return k

    def _interrupted(self, c: "_Chunk", started: int, done: int, taken: set,
                     unknown: list) -> int:
        """After a BaseException (KeyboardInterrupt, SystemExit...) left the
        loop: the work in progress is finished as an error (as before); the
        rest stays for the next run. A work whose start was stored but not
        yet noted counts as started. Returns the last started index."""
        nxt = started + 1
        if nxt < c.k and nxt not in taken and self._seg[c.ats[nxt]] == c.runs[nxt]:
            started = nxt
        if done < started < c.k and started not in taken and started not in unknown:
            self._outc[started] = lib.TW_OUT_ERROR
            self._ends[started] = _mono()
        return started

    def _run_mixed(self, nodes: Any, c: "_Chunk", fids: list, offs: list, pl: bytes,
                   src: _RunSource, errs: list) -> int:
        """Any chunk: several callbacks, unknown ones, async ones, batch
        callbacks among others, a kill point, or no starting by stores."""
        dom = self._dom
        seg, outc, ends = self._seg, self._outc, self._ends
        k = c.k
        timed = k <= _TIMED_CHUNK
        by_id = callbacks._BY_ID
        mono = _mono
        ran = 0
        started = done = -1
        taken: set[int] = set()  # started out of order: a batch callback's works
        unknown: list[int] = []
        try:
            for i in range(k):
                if i in taken:
                    continue
                fid = fids[i]
                fn = by_id.get(fid)
                if fn is not None and fn.__shm_taskwork_batch__:
                    ran += self._run_batch_callback(fn, fid, i, c, fids, offs, pl, src, taken,
                                                    errs, timed)
                    started = done = i
                    continue
                w = _new_work(Work)
                w.payload = pl[offs[i]:offs[i + 1]]
                w._src = src
                w._i = i
                at, running = c.ats[i], c.runs[i]
                if _STORE_STARTS:
                    seg[at] = running
                else:
                    check(lib.tw_run_start(dom.d, self.id, nodes[i]), "run")
                started = i
                if fn is None:
                    outc[i] = lib.TW_OUT_UNKNOWN
                    unknown.append(i)
                    w._state = "dead-letter"
                    log.warning("work %#x for unknown callback %s kept as a dead letter",
                                w.id, w.func_name)
                    done = i
                    continue
                if _KP_IN_CALLBACK:
                    lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
                if fn.__shm_taskwork_async__:
                    node = nodes[i]
                    ran += self._begin_async(w, fn, node, errs)
                    outc[i] = lib.TW_OUT_SKIP if self._aio_took(node) else lib.TW_OUT_ERROR
                    ends[i] = mono()
                    done = i
                    continue
                try:
                    fn(w)
                except Exception as exc:
                    outc[i] = lib.TW_OUT_ERROR
                    log_callback_error(w, exc)
                    errs.append(exc)
                if timed:
                    ends[i] = mono()
                if _STORE_STARTS:
                    seg[at] = running + _DONE_DELTA
                done = i
                ran += 1
        except BaseException:
            started = self._interrupted(c, started, done, taken, unknown)
            raise
        finally:
            self._end_chunk(nodes, c, started, taken, unknown, timed)
        return ran

    def _run_whole_batch(self, fn: Any, nodes: Any, k: int, offs: list, pl: bytes,
                         src: _RunSource, errs: list) -> int:
        """The whole chunk is one batch callback's (its common case): its
        works are started by one native call, the callback is called once,
        and tw_run_finish frees them right after."""
        outc = self._outc
        new = _new_work
        works = []
        append = works.append
        for i, off, end in zip(range(k), offs, islice(offs, 1, None)):
            w = new(Work)
            w.payload = pl[off:end]
            w._src = src
            w._i = i
            append(w)
        check(lib.tw_run_start_many(self._dom.d, self.id, nodes, k), "run")
        try:
            if _KP_IN_CALLBACK:
                lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
            try:
                fn(works)
            except Exception as exc:
                # one error per work of the list
                ffi.memmove(outc, bytes([lib.TW_OUT_ERROR]) * k, k)
                log_callback_error(works[0], exc)
                errs.extend([exc] * k)
            except BaseException:
                ffi.memmove(outc, bytes([lib.TW_OUT_ERROR]) * k, k)
                raise
        finally:
            rc = lib.tw_run_finish(self._dom.d, self.id, nodes, k, outc, ffi.NULL)
            if rc < 0:
                log.error("task %d: finishing a run batch: %s", self.id, os.strerror(-rc))
            self._bpos += k
        return k

    def _run_batch_callback(self, fn: Any, fid: int, i: int, c: "_Chunk", fids: list,
                            offs: list, pl: bytes, src: _RunSource, taken: set, errs: list,
                            timed: bool) -> int:
        """A batch callback in a mixed chunk: its works of this chunk (i and
        later), newest first, all started, then one call."""
        seg, outc, ends = self._seg, self._outc, self._ends
        works = []
        idx = []
        for j in range(i, c.k):
            if fids[j] != fid or j in taken:
                continue
            w = _new_work(Work)
            w.payload = pl[offs[j]:offs[j + 1]]
            w._src = src
            w._i = j
            works.append(w)
            idx.append(j)
        for j in idx:
            if _STORE_STARTS:
                seg[c.ats[j]] = c.runs[j]
            else:
                check(lib.tw_run_start(self._dom.d, self.id, c.node(j)), "run")
            taken.add(j)
        if _KP_IN_CALLBACK:
            lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
        try:
            fn(works)
        except Exception as exc:
            for j in idx:   # one error per work of the list
                outc[j] = lib.TW_OUT_ERROR
            log_callback_error(works[0], exc)
            errs.extend([exc] * len(idx))
        except BaseException:
            now = _mono()
            for j in idx:
                outc[j] = lib.TW_OUT_ERROR
                ends[j] = now
            raise
        now = _mono() if timed else 0
        for j in idx:
            if timed:
                ends[j] = now
            if _STORE_STARTS:
                seg[c.ats[j]] = c.runs[j] + _DONE_DELTA
        return len(idx)

    def _end_chunk(self, nodes: Any, c: "_Chunk", started: int, taken: set, unknown: list,
                   timed: bool) -> None:
        """Finish the started works of a chunk (0..started, and those taken
        by batch callbacks); keep the others, detached, for the next run."""
        dom, outc, ends, k = self._dom, self._outc, self._ends, c.k
        hi = max(started, max(taken) if taken else -1) + 1
        left = [j for j in range(started + 1, k) if j not in taken]
        for j in left:
            if j < hi:
                outc[j] = lib.TW_OUT_SKIP   # not started: not finished here
        rc = lib.tw_run_finish(dom.d, self.id, nodes, hi, outc, ends if timed else ffi.NULL)
        if rc < 0:
            log.error("task %d: finishing a run batch: %s", self.id, os.strerror(-rc))
        for j in unknown:
            node = c.node(j)
            sc = self._sc
            rc = lib.tw_step(dom.d, self.id, node, lib.TW_OUT_UNKNOWN, lib.TW_NIL, sc.wi,
                             ffi.NULL, ffi.NULL)
            if rc < 0:
                self._unfinished.append((node, lib.TW_OUT_UNKNOWN))
                log.error("task %d: could not finish work at node %d (%s); it is finished "
                          "at the next run", self.id, node, os.strerror(-rc))
        # The works not started stay detached, newest first, for the next run.
        if left:
            keep = [c.node(j) for j in left]
            base = self._bpos + k - len(keep)
            for n_, node in enumerate(keep):
                self._out[base + n_] = node
            self._bpos = base
        else:
            self._bpos += k

    def checkpoint(self) -> int:
        """Cheap: run only if a notify flag is set (or a batch was left over)."""
        self._require_current("checkpoint")
        if self._bend > self._bpos or (not self._dom._closed and self._flagsp[0] & _F_NOTIFY):
            return self.run()
        return 0

    @contextlib.contextmanager
    def critical(self) -> "Iterator[Task]":
        """Keep TWA_SIGNAL works out of a block of code.

        Those works run from the signal handler, between two bytecodes of
        the main thread: a callback that takes a lock this block holds would
        deadlock the task. Inside ``with task.critical():`` the handler only
        notes that works arrived; they run when the outermost block ends.
        Blocks nest. (RESUME works never run in a handler anyway.)"""
        self._require_current("critical")
        self._critical += 1
        try:
            yield self
        finally:
            self._critical -= 1
            if self._critical == 0 and (self._deferred or self._terminate_with):
                self._deferred = False
                if self._terminate_with:
                    _terminate(self)
                elif not self._in_run:
                    self.run()

    def wait(self, timeout: float | None = None) -> int:
        """Block until work is notified (or ``timeout`` seconds pass), run it.
        Returns the works run during the call, those the signal handler ran
        included. Never runs anything inside a signal handler for RESUME.

        Before it blocks it spins a little (at most ~50 us, yielding the CPU
        with sched_yield at each turn; adaptive: the budget halves after a
        spin that found nothing and doubles after one that did; no spin on a
        machine with one CPU), watching the task's notify flags: a work that
        arrives meanwhile runs without a sleep and a wake-up."""
        self._require_current("wait")
        timeout = _security.timeout_seconds(timeout)
        start = self._ran_total
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiting = True
        flagsp, seg, head_at = self._flagsp, self._seg, self._head_at
        try:
            while True:
                # Every turn ends by the deadline, whatever the segment says
                # (a forged head or flag must not keep us spinning).
                if deadline is not None and self._ran_total == start and \
                        time.monotonic() >= deadline:
                    return 0
                # Run what was notified. NOTIFY_RESUME stays set (lazy clear):
                # adders do not write the eventfd while we run and spin.
                if self._bend > self._bpos or flagsp[0] & _F_NOTIFY:
                    self._run(False, True)
                if self._ran_total > start:
                    # On the way out: clear, then look once more (a push
                    # before the clear is run now; an adder after it finds
                    # the flag clear and notifies, as after any run).
                    if flagsp[0] & lib.TW_F_NOTIFY_RESUME:
                        lib.tw_flags_clear(self._dom.d, self.id, lib.TW_F_NOTIFY_RESUME)
                        lib.tw_eventfd_drain(self._efd)
                        if (seg[head_at] & 0xFFFFFFFF) != _NIL:
                            self._run(False, False)
                    return self._ran_total - start
                resume = flagsp[0] & lib.TW_F_NOTIFY_RESUME
                budget = self._spin_ns
                if budget:
                    # Spin: with NOTIFY_RESUME still set, a new work shows
                    # in the head, not in the flag; without it, in the flag.
                    t0 = _mono()
                    until = t0 + budget
                    if deadline is not None:
                        until = min(until, t0 + int((deadline - time.monotonic()) * 1e9))
                    yield_ = os.sched_yield
                    found = False
                    while True:
                        if (seg[head_at] & 0xFFFFFFFF) != _NIL if resume else flagsp[0] & _F_NOTIFY:
                            found = True
                            break
                        if _mono() >= until:
                            break
                        yield_()
                    if found:
                        self._spin_ns = min(_SPIN_MAX_NS, budget * 2)
                        continue
                    # a spin that found nothing: spin a little less next time
                    self._spin_ns = max(_SPIN_MIN_NS, budget - (budget >> 3))
                if resume:
                    # On the way to sleep: clear, drain, look once more. A push
                    # before the clear is seen by this look; an adder after it
                    # finds the flag clear and writes the eventfd.
                    lib.tw_flags_clear(self._dom.d, self.id, lib.TW_F_NOTIFY_RESUME)
                    lib.tw_eventfd_drain(self._efd)
                    if (seg[head_at] & 0xFFFFFFFF) != _NIL:
                        self._run(False, False)
                        continue
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return 0
                    remaining = min(remaining, 3600.0)  # a bound select() accepts
                # SIGNAL works get RESUME's guarantee: WAITING is set on the
                # flags word before this last look, so an adder that arms
                # NOTIFY_SIGNAL after it sees WAITING and writes the eventfd
                # too (the signal's handler may be deferred by the
                # interpreter; README "TWA_SIGNAL is never stranded").
                if lib.tw_flags_set(self._dom.d, self.id, lib.TW_F_WAITING) & _F_SIGNAL:
                    lib.tw_flags_clear(self._dom.d, self.id, lib.TW_F_WAITING)
                    continue
                try:
                    ready = select.select([self._efd], [], [], remaining)[0]
                finally:
                    lib.tw_flags_clear(self._dom.d, self.id, lib.TW_F_WAITING)
                if ready:
                    # Drain before the next checkpoint (the flag, not the
                    # eventfd, says whether work waits): an adder whose write
                    # landed after a run took its work leaves the eventfd
                    # readable with no flag set, and select would not block.
                    lib.tw_eventfd_drain(self._efd)
        finally:
            self._waiting = False

    def fileno(self) -> int:
        """The task's eventfd: readable when RESUME work waits. When it
        reports readable, call run() (it drains the eventfd), not checkpoint():
        a wake-up can arrive for work an earlier run already took, and only
        run() consumes it (``loop.add_reader(task.fileno(), task.run)``)."""
        self._require_current("fileno")
        return self._efd

    # ---- asyncio ------------------------------------------------------------

    def attach_loop(self, loop: "asyncio.AbstractEventLoop | None" = None) -> None:
        """Run this task's works from an asyncio loop (the running one by
        default): RESUME works from the loop's reader on ``fileno()``, SIGNAL
        works through ``loop.add_signal_handler``, i.e. at a safe point of the
        loop, never between two bytecodes of a coroutine; ``async def``
        callbacks are scheduled on it. Call from the main thread (signal
        handlers live there). Attaching to the loop already attached does
        nothing; to another one, detaches first."""
        from . import _aio

        self._require_current("attach_loop")
        loop = _aio.require_loop(loop)
        if self._aio is not None:
            if self._aio.loop is loop:
                return
            self.detach_loop()
        b = _aio.LoopBinding(self, loop)
        b.attach()
        self._aio = b

    def detach_loop(self) -> None:
        """Undo attach_loop(): the task's own wait()/checkpoint() and the
        Python-level signal handler take the notifications again. Async
        callbacks already scheduled keep running on the loop. Idempotent."""
        from . import _aio

        _aio.LoopBinding.detach_from(self)

    async def wait_async(self, timeout: float | None = None) -> int:
        """``await``-able wait(): until work is notified (or ``timeout``
        seconds pass), run it; the number of works run meanwhile. Other
        coroutines run while it waits."""
        from . import _aio

        self._require_current("wait_async")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
        return await _aio.wait_async(self, timeout)

    def _begin_async(self, work: Work, fn, node: int, errs: list) -> int:
        """An async callback's work: schedule it on the attached loop (1), or
        count it an error without calling it (0: not run)."""
        from . import _aio

        b = self._aio
        if b is None or b.loop.is_closed():
            exc = TaskWorkError(f"callback {work.func_name}: {_aio.NEEDS_LOOP}")
            log.error("work %#x not run: %s", work.id or 0, exc)
            errs.append(exc)
            return 0
        try:
            b.schedule(work, fn, node)
        except Exception as exc:  # the function raised instead of returning a coroutine
            log_callback_error(work, exc)
            errs.append(exc)
            return 0
        return 1

    def _aio_took(self, node: int) -> bool:
        b = self._aio
        return b is not None and node in b.outstanding

    # ---- exit ---------------------------------------------------------------

    def exit(self) -> None:
        """PF_EXITING: run until the list is empty and holds the exited
        sentinel; from then on every add raises TaskExitedError. Idempotent.
        Called from one of the task's own callbacks, it marks the task exiting
        and returns; the run in progress drains the list and completes the exit."""
        if self._own and self._exited:
            return
        self._require_current("exit")
        dom = self._dom
        lib.tw_flags_set(dom.d, self.id, lib.TW_F_EXITING)
        if self._in_run:
            # Called by a callback of this task's own run: a nested run would
            # return at once. The run in progress goes on until the list is
            # empty (PF_EXITING makes its last detach leave the sentinel) and
            # completes the exit when it returns.
            self._exit_after_run = True
            return
        for _ in range(1 << 20):
            self.run()
            if lib.tw_slot_check(dom.d, self.id, self.gen) == -errno.ESRCH:
                break
        else:  # pragma: no cover - adders outpaced the exit for a million rounds
            raise TaskWorkError(f"task {self.id} could not drain its list to exit")
        self._exited = True
        b = self._aio
        if b is not None and b.outstanding and not b.loop.is_closed():
            # async callbacks still running hold RUNNING nodes of this slot:
            # the slot is released when the last of them ends
            b.release_when_idle = True
            return
        self._finish_exit()

    def _finish_exit(self) -> None:
        if not self._dom._closed:
            lib.tw_release_slot(self._dom.d, self.id, self.gen)
        self._release_local()

    def _release_local(self) -> None:
        """Give back what the registration holds in this process: the fd
        server, the signal handler, the atexit hook, the eventfd. Also used
        by Domain.close() when exit() failed (a corrupt segment), so nothing
        of ours outlives the mapping. Idempotent."""
        self._exited = True
        if self._aio is not None and not self._aio.outstanding:
            self.detach_loop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._handler:
            # Before the mapping may go: the watcher reads our slot.
            lib.tw_sigwatch_del(self._dom.d, self.id)
            _uninstall_handler(self._signum, self)
            self._handler = False
        for sig in getattr(self, "_exit_signals", ()):
            _uninstall_exit_signal(sig, self)
        self._exit_signals = ()
        try:
            atexit.unregister(self._atexit)
        except Exception:
            pass
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._dom._current is self:
            self._dom._current = None

    def _atexit(self) -> None:
        if self.is_current and not self._dom._closed:
            try:
                self.exit()
            except TaskWorkError:
                pass

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_current:
            self.exit()

    # ---- keyed add (SPEC §10: the bridge) ------------------------------------

    def add_keyed(self, func: "CallbackRef", payload: "bytes | bytearray | memoryview" = b"",
                  notify: int = TWA_RESUME, *, key: "str | bytes") -> "KeyRecord":
        """Queue ``func(work)`` once per ``key`` (see :mod:`shm_taskwork.keys`).

        The key is recorded in the domain before the push. Returns a
        :class:`~shm_taskwork.keys.KeyRecord`: ``fresh`` True if this call
        queued the work; False if the key was recorded before (the work was
        queued, maybe already run, or filed as a dead letter) and nothing was
        queued now. Raises as :meth:`add`, and
        :class:`~shm_taskwork.keys.KeyBusyError` while another live process
        is adding the same key."""
        from . import keys as _keys
        fid, fname = callbacks.resolve(func)
        payload = _as_bytes(payload) if payload.__class__ is not bytes else payload
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
                                  time.monotonic_ns(), current, info)
        except OverflowError:
            _check_notify_range(notify)
            raise
        if rc < 0:
            _keys._busy(rc, key)
            self._add_error(rc, notify, len(payload), "add_keyed")
        if info.fresh and rc & _DUE and not rc & _DONE:
            self._deliver(rc)
        return _keys._record(info)


def _check_notify_range(notify: int) -> None:
    """A notify value too wide for the native int is as invalid as any other."""
    if not -(1 << 31) <= notify < (1 << 31):
        raise InvalidModeError(f"notify={notify!r} is not valid here: use {VALID_MODES}",
                               errno=errno.EINVAL)


def _as_bytes(payload) -> bytes:
    try:
        return bytes(memoryview(payload))
    except TypeError:
        raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}; "
                        "encode objects first (see shm_taskwork.codec)") from None


# ---- the signal handler ----------------------------------------------------

def _on_signal(signum, frame):
    for t in list(_SIGNAL_TASKS.get(signum, ())):
        if not t.is_current:
            continue
        d = t._dom.d
        # Take the signals sent so far (README "TWA_SIGNAL is never
        # stranded"): until this store the signal is owed, and the watcher
        # thread sends it again. Inside a callback or critical() it is taken
        # too: the works run when those end.
        lib.tw_sig_ack(d, t.id, 1)
        try:
            if t._critical:
                t._deferred = True   # runs when the outermost critical block ends
            elif t._in_run:
                t._rerun = True
            elif t._batch or lib.tw_flags_get(d, t.id) & lib.TW_F_NOTIFY_SIGNAL:
                t.run()
            if t._waiting:
                lib.tw_eventfd_write(t._efd)  # make a concurrent wait() return
        except TaskWorkError as exc:
            # The list could not be run (a lock timeout, a corrupt list): the
            # flag stays armed and the signal owed, so the watcher sends it
            # again and the works run at the next chance.
            lib.tw_flags_set(d, t.id, lib.TW_F_NOTIFY_SIGNAL)
            lib.tw_sig_ack(d, t.id, 0)
            log.error("task-work signal handler: %r (the works stay queued; the signal "
                      "will be sent again)", exc)
    prev = _PREV_HANDLERS.get(signum)
    if callable(prev):
        prev(signum, frame)


# ---- exit signals: the kernel's do_exit() -> exit_task_work() ---------------

_EXIT_TASKS: dict[int, list["Task"]] = {}
# uncatchable; synchronous faults (a Python handler turns a crash into a hang);
# default action ignore or stop/continue (no exit status to give)
_NOT_EXIT_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS,
                     signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
                     signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                     signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_EXIT_PREV: dict[int, object] = {}


def _exit_signal_set(exit_signals, signum: int) -> tuple[int, ...]:
    try:
        sigs = tuple(signal.Signals(s) for s in exit_signals)
    except (TypeError, ValueError):
        raise ValueError(f"exit_signals must be signal numbers, got {exit_signals!r}") from None
    for s in sigs:
        if s in _NOT_EXIT_SIGNALS or s == signum:
            raise ValueError(
                f"exit_signals: {s.name} cannot be an exit signal (uncatchable, a fault, one "
                "whose default action does not end the process, or the task's own "
                "notification signal); use e.g. SIGTERM, SIGINT, SIGHUP")
    return tuple(int(s) for s in sigs)


def _on_exit_signal(signum, frame):
    deferred = False
    for t in list(_EXIT_TASKS.get(signum, ())):
        if not t.is_current:
            continue
        if t._critical or t._in_run:
            t._terminate_with = signum   # the run or critical block in progress ends first
            deferred = True
            continue
        try:
            t.exit()
        except TaskWorkError as exc:
            log.error("exit on signal %d: %r", signum, exc)
    if not deferred:
        _die_of(signum)


def _terminate(t: "Task") -> None:
    """Exit the task (its pending works run), then die of the exit signal
    that arrived while a run or a critical block was in progress."""
    signum, t._terminate_with = t._terminate_with, 0
    try:
        t.exit()
    except TaskWorkError as exc:
        log.error("exit on signal %d: %r", signum, exc)
    _die_of(signum)


def _die_of(signum: int) -> None:
    """End the process with the status signum's default action gives (the
    exit status a shell or supervisor sees: killed by that signal)."""
    sys.stdout.flush() if sys.stdout else None
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    # Only reached if the default action does not end the process.
    os._exit(128 + signum)


def _install_exit_signal(signum: int, task: "Task") -> None:
    prev = signal.signal(signum, _on_exit_signal)
    if prev is not _on_exit_signal:
        _EXIT_PREV[signum] = prev
    _EXIT_TASKS.setdefault(signum, []).append(task)


def _uninstall_exit_signal(signum: int, task: "Task") -> None:
    tasks = _EXIT_TASKS.get(signum, [])
    if task in tasks:
        tasks.remove(task)
    if not tasks and threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signum, _EXIT_PREV.pop(signum, signal.SIG_DFL) or signal.SIG_DFL)
        except (ValueError, TypeError):
            pass


def _after_fork() -> None:
    _MY_PID[0] = os.getpid()
    for t in list(_HANDLES.values()):
        t._fc.clear()   # their Works' sender_pid is this process now


os.register_at_fork(after_in_child=_after_fork)


def _ensure_handler(signum: int) -> None:
    """Install _on_signal for signum, remembering the handler it replaces."""
    prev = signal.signal(signum, _on_signal)
    if prev is not _on_signal:
        _PREV_HANDLERS[signum] = prev


def _uninstall_handler(signum: int, task: Task) -> None:
    tasks = _SIGNAL_TASKS.get(signum, [])
    if task in tasks:
        tasks.remove(task)
    if not tasks and threading.current_thread() is threading.main_thread():
        prev = _PREV_HANDLERS.pop(signum, signal.SIG_DFL)
        try:
            # Keep ignoring a straggling signal instead of dying of it.
            signal.signal(signum, prev if prev not in (None, signal.SIG_DFL) else signal.SIG_IGN)
        except (ValueError, TypeError):
            pass
