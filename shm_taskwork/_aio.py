"""asyncio: a task attached to an event loop, async callbacks, ``wait_async``.

Attaching (``task.attach_loop(loop)``) moves both notifications onto the loop:

- RESUME: ``loop.add_reader(task.fileno(), ...)`` runs the works when the
  eventfd is readable, between two callbacks of the loop.
- SIGNAL: ``loop.add_signal_handler(signum, ...)`` replaces the Python-level
  handler. The signal still interrupts whatever the loop is blocked in (its
  wake-up fd), but the works run from the loop's own callback: at a safe point
  of the loop, never between two bytecodes of a coroutine. The handler runs
  the works of every task of this process that uses that signal, as the
  Python-level one does.

An ``async def`` callback's work is begun by the runner like any other (its
node is RUNNING: cancel cannot reach it, fsck would report it interrupted if
the process died), then its coroutine is scheduled on the attached loop. The
node is finished - counted ``run``, or ``errors`` when the coroutine raised
or was cancelled, and freed - when the coroutine ends. A task that exits while
such coroutines are still running stops accepting work at once and releases
its slot when the last of them ends.

Without an attached loop an async callback is never called (no coroutine is
created, so none is left never-awaited): the work is logged and counted as an
error, "async callback needs an attached loop".
"""
from __future__ import annotations

import asyncio
import errno
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

from . import signals
from ._native import ffi, lib
from .errors import TaskWorkError

if TYPE_CHECKING:
    from .task import Task
    from .work import Work

NEEDS_LOOP = "async callback needs an attached loop (task.attach_loop())"


class LoopBinding:
    """One task attached to one loop."""

    def __init__(self, task: "Task", loop: asyncio.AbstractEventLoop):
        self.task = task
        self.loop = loop
        self.thread = threading.get_ident()
        self.outstanding: dict[int, asyncio.Future[Any]] = {}  # node -> its coroutine's task
        self.waiters: list[asyncio.Future[None]] = []
        self.signal_added = False
        self.release_when_idle = False
        self._wi = ffi.new("struct tw_work_info *")

    # ---- attach / detach ---------------------------------------------------

    def attach(self) -> None:
        task = self.task
        self.loop.add_reader(task._efd, self._on_readable)
        if task._handler:
            try:
                self.loop.add_signal_handler(task._signum, self._on_signal)
            except BaseException:
                self.loop.remove_reader(task._efd)
                raise
            self.signal_added = True

    def detach(self) -> None:
        """Give the notifications back to the Python-level handler and the
        task's own wait(). Coroutines already scheduled keep running."""
        loop = self.loop
        if not loop.is_closed():
            try:
                loop.remove_reader(self.task._efd)
            except (ValueError, OSError):
                pass
        if self.signal_added:
            self.signal_added = False
            signum = self.task._signum
            if not loop.is_closed():
                try:
                    loop.remove_signal_handler(signum)  # leaves SIG_DFL behind
                except (ValueError, RuntimeError):
                    pass
            if threading.current_thread() is threading.main_thread():
                # the library's handler again, or (no task wants the signal
                # any more) ignore it, as _uninstall_handler does
                signals.reinstall(signum)
        self._wake_waiters()

    # ---- the loop's callbacks ----------------------------------------------

    def _on_readable(self) -> None:
        task = self.task
        if not task.is_current:
            self.detach_from(task)
            return
        try:
            task.run()        # run(), not checkpoint(): it drains the eventfd
        except TaskWorkError as exc:
            task_log().error("task-work run from the event loop: %r", exc)
        self._wake_waiters()

    def _on_signal(self) -> None:
        signals.dispatch(self.task._signum, None)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    @staticmethod
    def detach_from(task: "Task") -> None:
        b = task._aio
        if b is not None:
            task._aio = None
            b.detach()

    # ---- async callbacks ---------------------------------------------------

    def schedule(self, work: "Work", fn: Callable[..., Any], node: int) -> None:
        """Start ``fn(work)`` on the loop; its node is finished when it ends."""
        coro = fn(work)
        try:
            if threading.get_ident() == self.thread:
                fut: asyncio.Future[Any] = self.loop.create_task(coro)
            else:
                fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop),
                                          loop=self.loop)
        except BaseException:
            coro.close()   # never a never-awaited coroutine
            raise
        self.outstanding[node] = fut
        fut.add_done_callback(lambda f, w=work, n=node: self._finished(w, n, f))

    def _finished(self, work: "Work", node: int, fut: asyncio.Future[Any]) -> None:
        from .callbacks import log_callback_error

        self.outstanding.pop(node, None)
        task = self.task
        if fut.cancelled():
            outcome = lib.TW_OUT_ERROR
            log_callback_error(work, asyncio.CancelledError(
                f"async callback {work.func_name} was cancelled before it finished"))
        elif fut.exception() is not None:
            outcome = lib.TW_OUT_ERROR
            log_callback_error(work, fut.exception())
        else:
            outcome = lib.TW_OUT_OK
        dom = task._dom
        if not dom._closed:
            rc = lib.tw_step(dom.d, task.id, node, outcome, lib.TW_NIL, self._wi, ffi.NULL,
                             ffi.NULL)
            if rc < 0:  # fsck took it back meanwhile (the task had been judged gone)
                task_log().error("finishing async work %#x: %s", work.id or 0,
                                 errno.errorcode.get(-rc, rc))
        if self.release_when_idle and not self.outstanding:
            self.release_when_idle = False
            task._finish_exit()


def task_log() -> logging.Logger:
    return logging.getLogger("shm_taskwork")


def require_loop(loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    if loop is not None:
        return loop
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("attach_loop() needs a loop: call it from a coroutine, or pass "
                           "loop=") from None


async def wait_async(task: "Task", timeout: float | None) -> int:
    """The body of ``Task.wait_async``."""
    loop = asyncio.get_running_loop()
    start = task._ran_total
    deadline = None if timeout is None else loop.time() + timeout
    b = task._aio if task._aio is not None and task._aio.loop is loop else None
    task._waiting = True
    try:
        while True:
            task.checkpoint()
            if task._ran_total > start:
                return task._ran_total - start
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return 0
            fut: asyncio.Future[None] = loop.create_future()
            efd = task._efd
            if b is not None:
                # the attached reader and signal handler run the works and
                # then wake every waiter
                b.waiters.append(fut)
            else:
                loop.add_reader(efd, lambda: fut.done() or fut.set_result(None))
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass
            finally:
                if b is None:
                    loop.remove_reader(efd)
                    # a wake-up for work a run already took leaves the
                    # eventfd readable with no flag set: drain it, as wait()
                    lib.tw_eventfd_drain(efd)
            if b is not None and task._aio is not b:
                b = None  # detached meanwhile: watch the eventfd ourselves
    finally:
        task._waiting = False
