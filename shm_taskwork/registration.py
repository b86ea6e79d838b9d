"""Registration: the current process's own task (what ``Domain.register``
returns, a :class:`~shm_taskwork.task.Task`).

A handle (``Task``) is what other processes add to; the registration is the
same handle plus what only the task's own process does: run its works
(task_work_run), wait for them, keep TWA_SIGNAL works out of a critical
block, exit (PF_EXITING and the exited sentinel), bind to an asyncio loop,
and take its notification signal.

Why no lock is needed on the add path: a work is pushed onto the task's list
with one compare-and-swap in the native core (a Treiber push), and the
notification that follows is decided by a fetch-or on the slot's flag word:
only the adder that turns NOTIFY_RESUME (or NOTIFY_SIGNAL) from 0 to 1 writes
the eventfd (or sends the signal). The runner keeps the flags set while it
runs (adders meanwhile notify nobody) and clears them on its way out, then
detaches once more: an adder whose push lands after that detach finds the
flag clear and notifies again: coalescing never loses a wake-up.

The signal handler (a subscriber of the ``signals`` router) runs in the main
thread between bytecodes; it takes the signal (README "TWA_SIGNAL is never
stranded"), runs the works, never nests a run (a run in progress picks the
new works up) and wakes a concurrent wait().
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from . import _aio, _security, notify, signals, systemd
from ._native import check, ffi, lib
from ._run import RunLoop, _NIL
from .callbacks import TASK_NAME_PREFIX, log_callback_error, task_name_id
from .constants import TWA_RESUME
from .errors import TaskWorkError
from .task import Task
from .work import FINAL, Work

if TYPE_CHECKING:
    import asyncio

    from .domain import Domain

log = logging.getLogger("shm_taskwork")
# serve() sleeps at most this long at a time, so that a stop signal whose
# Python handler CPython still owes (caught just before select()) is taken
# within it (README "Workers in production")
_STOP_SLICE_S = 0.2

_mono = time.monotonic_ns
_F_NOTIFY = lib.TW_F_NOTIFY_RESUME | lib.TW_F_NOTIFY_SIGNAL
_F_SIGNAL = lib.TW_F_NOTIFY_SIGNAL
# A run's looks in a row that found its list empty and its flag armed again:
# beyond this many it returns (README "TWA_SIGNAL is never stranded").
_REARM_MAX = 64
# wait(): spin (yielding the CPU) this long before blocking; never on one CPU
_SPIN = (os.cpu_count() or 1) > 1
_SPIN_MAX_NS = 50_000
_SPIN_MIN_NS = 2_000


class Registration(RunLoop, Task):
    """This process's task in a domain (see the module's doc)."""

    @classmethod
    def _register(cls, dom: "Domain", name: str | None, signum: int, install_handler: bool,
                  exit_signals=()) -> "Registration":
        if dom.current is not None:
            raise TaskWorkError(
                f"this process is already task {dom.current.id} of domain {dom.name!r}; "
                "a process plays one task per domain")
        if name is not None:
            _security.check_text(name, "a task name", lib.TW_NAME_LEN - 1)
        signum = _security.task_signal(signum)
        exits = signals.exit_signal_set(exit_signals, signum)
        if (install_handler or exits) and threading.current_thread() is not threading.main_thread():
            raise ValueError("register(install_handler=True) and exit_signals need the main "
                             "thread (Python runs signal handlers there)")
        pid = os.getpid()
        name = name or f"pid{pid}"
        name_id = task_name_id(name)
        label = (TASK_NAME_PREFIX + name).encode()
        lib.tw_name_put(dom.d, name_id, label, len(label))  # ENOSPC: dead letters show no name
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        gen = ffi.new("uint32_t *")
        if install_handler:
            # Handler first: a peer may send TWA_SIGNAL the moment tw_register
            # publishes the slot, and the default action would kill us.
            signals.subscribe(signum, _registering, signals.NOTIFY)
        try:
            # Slots of dead tasks are free once reaped: this registrant notices.
            dom._reap_dead()
            rc = lib.tw_register(dom.d, name.encode(), name_id, int(signum), efd, os.getuid(),
                                 time.monotonic_ns(), gen)
            if rc == -errno.ENOSPC and dom._reap_dead():
                rc = lib.tw_register(dom.d, name.encode(), name_id, int(signum), efd,
                                     os.getuid(), time.monotonic_ns(), gen)
            if rc < 0:
                os.close(efd)
                if -rc == errno.ENOSPC:
                    raise TaskWorkError(
                        f"all {dom.max_tasks} task slots of domain {dom.name!r} are in use by "
                        f"live tasks (max_tasks={dom.max_tasks})", errno=errno.ENOSPC)
                check(rc, "register")
            t = cls(dom, rc, gen[0], pid, name, int(signum))
            t._init_registration(dom, efd, install_handler, exits)
        finally:
            if install_handler:
                signals.unsubscribe(signum, _registering)
        return t

    def _init_registration(self, dom: "Domain", efd: int, install_handler: bool,
                           exits: tuple[int, ...]) -> None:
        self._own = True
        self._efd = efd
        self._in_run = False
        self._rerun = False
        self._waiting = False
        self._exit_after_run = False
        self._ran_total = 0
        self._critical = 0
        self._deferred = False
        self._terminate_with = 0
        self._interrupt = False   # set by serve()'s stop signal: wait() returns
        self._stops = 0           # stop signals serve() has seen
        self._drain_s: float | None = None   # serve()'s drain_timeout
        self._h.own_efd = efd
        self._h.current = 1   # the lean add notifies through own_efd
        self._init_run_loop(dom)
        self._spin_ns = _SPIN_MAX_NS if _SPIN else 0
        try:
            self._server: notify.FdServer | None = notify.FdServer(dom, self.id, efd,
                                                                   self._signum)
            self._server.start()
        except OSError as exc:
            log.error("task %d of domain %s: no fd server (%r): peers that cannot use "
                      "pidfd_getfd will not wake it through its eventfd", self.id, dom.name, exc)
            self._server = None
        if install_handler:
            signals.subscribe(self._signum, self._on_signal, signals.NOTIFY)
            # TWA_SIGNAL is never stranded (README): a signal our handler has
            # not taken while works wait is sent again to the main thread.
            rc = lib.tw_sigwatch_add(dom.d, self.id, self.gen, self._signum,
                                     threading.main_thread().native_id)
            if rc < 0:
                log.error("task %d of domain %s: no signal watcher (%s): a TWA_SIGNAL "
                          "deferred by the interpreter may wait for the next signal",
                          self.id, dom.name, os.strerror(-rc))
        self._handler = install_handler
        self._exit_signals = exits
        for sig in exits:
            signals.subscribe(sig, self._on_exit_signal, signals.EXIT)
        atexit.register(self._atexit)
        dom._current = self

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
        errs: list[BaseException] = []
        ran = 0
        dom = self._dom
        again = True
        while again:
            self._in_run = True
            try:
                if self._unfinished or self._failed_later:
                    self._finish_unfinished()
                # A wake-up is consumed once per run, not once per batch.
                if not keep_resume:
                    lib.tw_eventfd_drain(self._efd)
                bits = _F_SIGNAL if keep_resume else _F_NOTIFY
                rearmed = 0   # looks in a row that found the list empty, the flag re-armed
                while not self._halted:
                    if self._bpos >= self._bend:
                        self._rerun = False
                        n = self._detach()
                        if n == 0:
                            if self._rerun:
                                continue
                            # The lazy clear: NOTIFY_* stayed set while we
                            # ran, so adders did not notify. Clear on the way
                            # out, then look once more: an adder whose push
                            # came after our last detach either is seen by
                            # this look or finds the flag clear and notifies.
                            # We return only from a look that found the list
                            # empty *and* the flag clear: a flag armed again
                            # after our clear, its work cancelled before our
                            # look, is cleared again. Left armed, every later
                            # add would coalesce into it and send nothing,
                            # while its signal was already taken (README
                            # "TWA_SIGNAL is never stranded"). Each turn
                            # needs a new arming whose work vanished before
                            # our look; a member that only sets the flag, in
                            # a loop, gets _REARM_MAX turns and no more (a
                            # shared domain never hangs its members).
                            if self._flagsp[0] & bits and rearmed < _REARM_MAX:
                                rearmed += 1
                                lib.tw_flags_clear(dom.d, self.id, bits)
                                continue
                            break
                        rearmed = 0
                    ran += self._run_batch(errs)
            finally:
                self._in_run = False
            # A signal handler that came in after our last look, while
            # _in_run was still set, took its signal and left the works to us
            # (README "TWA_SIGNAL is never stranded"): look again. One that
            # comes in from here on sees _in_run clear and runs them itself.
            again = self._rerun and not self._halted
            self._rerun = False
        self._ran_total += ran
        if self._exit_after_run:  # a callback called exit(): finish it now
            self._exit_after_run = False
            self.exit()
        if self._terminate_with:  # an exit signal arrived during the run
            self._terminate()
        if raise_errors and errs:
            raise ExceptionGroup(f"{len(errs)} task-work callback(s) raised", errs)
        return ran

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
                    self._terminate()
                elif not self._in_run:
                    self.run()

    def _await_outcome(self, w: "Work", timeout: float | None) -> str:
        """call() on the task's own process: its works cannot run while it
        sleeps, so it runs them (wait) until w's outcome is final."""
        if not self.is_current or w.target != self.id:
            return w.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.run()
            now = w.outcome
            if now in FINAL:
                return now
            left = 0.25 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"work {w.id:#x} is still {now} after {timeout} s")
            self.wait(min(left, 0.25))

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
                if self._interrupt:   # serve()'s stop signal: back to serve
                    self._interrupt = False
                    return self._ran_total - start
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

    # ---- a worker: serve until stopped (README "Workers in production") -----

    def serve(self, *, stop_signals: "tuple[int, ...] | list[int]" = (signal.SIGTERM,
                                                                      signal.SIGINT),
              drain_timeout: float | None = 30.0, adopt: bool = True,
              watchdog: bool = True) -> int:
        """Run works as they arrive (every notify mode, as wait() does) until
        a stop signal; return the number of works run.

        On the first stop signal it drains in the kernel's exit order: the
        task is marked exiting; the works already queued run (works added
        meanwhile too) until the list stays empty or ``drain_timeout``
        seconds pass; what is still queued then becomes dead letters with
        ``reason="shutdown"`` (never lost, never run twice); the exited
        sentinel is installed and serve() returns, so a worker script ends
        with status 0. A second stop signal ends the drain at once, the same
        way. ``drain_timeout=None`` waits for the whole list.

        ``adopt``: first re-queue to this task the dead letters left for its
        name (``orphaned`` or ``shutdown``), each exactly once (see
        :meth:`adopt`). Under systemd (``$NOTIFY_SOCKET``) it sends
        ``READY=1`` once registered and adopted, ``STATUS=`` at most once a
        second, ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (``watchdog``),
        waking for it by itself, and ``STOPPING=1`` when the drain begins.
        Main thread only (signal handlers live there)."""
        self._require_current("serve")
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("serve() needs the main thread (Python runs signal handlers there)")
        stops = signals.exit_signal_set(stop_signals, self._signum)
        clash = set(stops) & set(self._exit_signals)
        if clash:
            raise ValueError(f"serve(): {', '.join(signal.Signals(s).name for s in clash)} "
                             "is one of this task's exit_signals; give it to one of the two")
        drain = _security.timeout_seconds(drain_timeout)
        start = self._ran_total
        self._stops = 0
        self._drain_s = drain
        for sig in stops:
            signals.subscribe(sig, self._on_stop, signals.PLAIN)
        # A caller may block the stop signals until serve() takes them (the
        # worker command does, from its start): one that came meanwhile is
        # delivered now, to the subscriber, and starts the drain.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        sd = systemd.Notifier.from_env()
        try:
            adopted = self.adopt() if adopt else 0
            sd.ready(self._serve_status(start, adopted))
            every = sd.watchdog_interval() if watchdog else None
            next_wd = time.monotonic() + every if every else None
            next_status = time.monotonic() + 1.0
            while not self._stops:
                now = time.monotonic()
                if next_wd is not None and now >= next_wd:
                    sd.watchdog()
                    next_wd = now + every
                if sd.enabled and now >= next_status:
                    sd.status(self._serve_status(start, adopted))
                    next_status = now + 1.0
                wake = [t for t in (next_wd, next_status if sd.enabled else None) if t]
                # In slices: a stop signal caught just before the sleep's
                # select() leaves its Python handler owed until the select
                # returns, and only the task's own signal is sent again by
                # the watcher. A slice bounds how late the drain starts.
                self.wait(_STOP_SLICE_S if not wake
                          else max(0.0, min(min(wake) - now, _STOP_SLICE_S)))
            sd.stopping("draining")
            left = self._drain(drain)
            sd.status(f"stopped: ran {self._ran_total - start}, {left} left as shutdown "
                      "dead letters")
        finally:
            for sig in stops:
                signals.unsubscribe(sig, self._on_stop)
            sd.close()
        return self._ran_total - start

    def _serve_status(self, start: int, adopted: int) -> str:
        text = f"serving: ran {self._ran_total - start}"
        return text + (f", adopted {adopted}" if adopted else "")

    def _on_stop(self, signum: int, frame: Any) -> None:
        """serve()'s stop signal (a subscriber of ``signals``): the first
        starts the drain, a second ends it at once."""
        self._stops += 1
        if self._stops > 1:
            self._halt_at = 1          # in the past: no work starts any more
        elif self._drain_s is not None:
            # the drain's deadline counts from the first stop signal, also for
            # a batch that is running now
            self._halt_at = _mono() + int(self._drain_s * 1e9)
        self._interrupt = True
        if self._efd >= 0:
            lib.tw_eventfd_write(self._efd)   # make a wait() in select return

    def _drain(self, timeout: float | None) -> int:
        """The kernel's exit order with a deadline; the works filed as
        shutdown letters. Ends with the exited sentinel and the slot released."""
        d = self._dom.d
        lib.tw_flags_set(d, self.id, lib.TW_F_EXITING)
        if self._stops > 1:
            self._halt_at = 1
        elif timeout is not None and not self._halt_at:
            self._halt_at = _mono() + int(timeout * 1e9)
        try:
            for _ in range(1 << 20):
                self._run(False, False)
                if self._halted or lib.tw_slot_check(d, self.id, self.gen) == -errno.ESRCH:
                    break
        finally:
            self._halt_at = 0
        filed = 0
        # What the deadline left: the detached works not started, then the
        # list, detached (EXITING: an empty list becomes the exited sentinel).
        for _ in range(1 << 20):
            if self._bpos < self._bend:
                n = self._bend - self._bpos
                rc = lib.tw_file_taken(d, self.id, self._out + self._bpos, n,
                                       lib.TW_R_SHUTDOWN, ffi.NULL, 0, 0)
                check(rc, "serve: filing shutdown letters")
                filed += rc
                self._bpos = self._bend
            if lib.tw_slot_check(d, self.id, self.gen) == -errno.ESRCH:
                break
            if self._detach() == 0 and \
                    lib.tw_slot_check(d, self.id, self.gen) == -errno.ESRCH:
                break
        self._halted = False
        if filed:
            log.warning("task %d (%s) of domain %s stopped with %d work(s) not run: kept as "
                        "shutdown dead letters", self.id, self.name, self._dom.name, filed)
        self._exited = True
        self._h.current = 0
        self._finish_exit()
        return filed

    def adopt(self) -> int:
        """Re-queue to this task the dead letters whose ``target_name`` is its
        name and whose reason is ``orphaned`` or ``shutdown``; the number
        re-queued. Each letter goes to exactly one task even when several
        workers of the name adopt at once (the re-queue takes it by CAS).
        ``interrupted`` and ``failed`` letters are never adopted: they may
        have had effects, and need a person."""
        self._require_current("adopt")
        n = 0
        for w in self._dom.dead_letters():
            if w.target_name == self.name and w.reason in ("orphaned", "shutdown"):
                if self._requeue(w, TWA_RESUME):
                    n += 1
        return n

    def fileno(self) -> int:
        """The task's eventfd: readable when RESUME work waits. When it
        reports readable, call run() (it drains the eventfd), not checkpoint():
        a wake-up can arrive for work an earlier run already took, and only
        run() consumes it (``loop.add_reader(task.fileno(), task.run)``)."""
        self._require_current("fileno")
        return self._efd

    def attach_loop(self, loop: "asyncio.AbstractEventLoop | None" = None) -> None:
        """Run this task's works from an asyncio loop (the running one by
        default): RESUME works from the loop's reader on ``fileno()``, SIGNAL
        works through ``loop.add_signal_handler``, i.e. at a safe point of the
        loop, never between two bytecodes of a coroutine; ``async def``
        callbacks are scheduled on it. Call from the main thread (signal
        handlers live there). Attaching to the loop already attached does
        nothing; to another one, detaches first."""
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
        _aio.LoopBinding.detach_from(self)

    async def wait_async(self, timeout: float | None = None) -> int:
        """``await``-able wait(): until work is notified (or ``timeout``
        seconds pass), run it; the number of works run meanwhile. Other
        coroutines run while it waits."""
        self._require_current("wait_async")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
        return await _aio.wait_async(self, timeout)

    def _begin_async(self, work: Work, fn, node: int, errs: list) -> int:
        """An async callback's work: schedule it on the attached loop (1), or
        count it an error without calling it (0: not run)."""
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
        self._h.current = 0
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
        self._h.current = 0
        if self._aio is not None and not self._aio.outstanding:
            self.detach_loop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._handler:
            # Before the mapping may go: the watcher reads our slot.
            lib.tw_sigwatch_del(self._dom.d, self.id)
            signals.unsubscribe(self._signum, self._on_signal)
            self._handler = False
        for sig in self._exit_signals:
            signals.unsubscribe(sig, self._on_exit_signal)
        self._exit_signals = ()
        try:
            atexit.unregister(self._atexit)
        except Exception:
            pass
        if self._efd >= 0:
            self._h.own_efd = -1   # before the number can be reused
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

    # ---- signals ------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The task's notification signal (a subscriber of ``signals``)."""
        if not self.is_current:
            return
        d = self._dom.d
        # Take the signals sent so far (README "TWA_SIGNAL is never
        # stranded"): until this store the signal is owed, and the watcher
        # thread sends it again. Inside a callback or critical() it is taken
        # too: the works run when those end.
        lib.tw_sig_ack(d, self.id, 1)
        try:
            if self._critical:
                self._deferred = True   # runs when the outermost critical block ends
            elif self._in_run:
                self._rerun = True
            elif self._batch or lib.tw_flags_get(d, self.id) & lib.TW_F_NOTIFY_SIGNAL:
                self.run()
            if self._waiting:
                lib.tw_eventfd_write(self._efd)  # make a concurrent wait() return
        except TaskWorkError as exc:
            # The list could not be run (a lock timeout, a corrupt list): the
            # flag stays armed and the signal owed, so the watcher sends it
            # again and the works run at the next chance.
            lib.tw_flags_set(d, self.id, lib.TW_F_NOTIFY_SIGNAL)
            lib.tw_sig_ack(d, self.id, 0)
            log.error("task-work signal handler: %r (the works stay queued; the signal "
                      "will be sent again)", exc)

    # ---- exit signals: the kernel's do_exit() -> exit_task_work() -----------

    def _on_exit_signal(self, signum: int, frame: Any) -> bool:
        """An exit signal (a subscriber of ``signals``): exit, the pending
        works run; True while a run or a critical block must end first."""
        if not self.is_current:
            return False
        if self._critical or self._in_run:
            self._terminate_with = signum   # the run or critical block in progress ends first
            return True
        try:
            self.exit()
        except TaskWorkError as exc:
            log.error("exit on signal %d: %r", signum, exc)
        return False

    def _terminate(self) -> None:
        """Exit the task (its pending works run), then die of the exit signal
        that arrived while a run or a critical block was in progress."""
        signum, self._terminate_with = self._terminate_with, 0
        try:
            self.exit()
        except TaskWorkError as exc:
            log.error("exit on signal %d: %r", signum, exc)
        signals.die_of(signum)


def _registering(signum: int, frame: Any) -> None:
    """Holds the notification signal while a registration is being made: a
    TWA_SIGNAL sent the moment the slot is published finds a handler (its
    works run at the first run, wait or checkpoint)."""
