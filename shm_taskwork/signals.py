"""One router for every signal the package handles.

It knows nothing of tasks. A subscriber is a callable ``fn(signum, frame)``;
the router installs one Python handler per signal and calls every
subscriber of that signal, in subscription order. Two kinds of signal:

- ``NOTIFY`` (a task's notification signal, SIGUSR1 by default): after the
  subscribers, the handler that was installed before is called. When the
  last subscriber leaves, the signal is set to be ignored (a straggling
  notification must not kill the process with SIGUSR1's default action).
- ``PLAIN`` (``serve()``'s stop signals): the subscribers only; when the
  last one leaves, the handler installed before comes back.
- ``EXIT`` (``register(exit_signals=...)``, the kernel's do_exit()): a
  subscriber returns True to say "not now" (a run or a critical block is in
  progress; it dies of the signal when that ends); when none does, the
  process dies of the signal (:func:`die_of`). When the last subscriber
  leaves, the handler installed before comes back.

Python runs signal handlers in the main thread only, so subscribe and
unsubscribe are for the main thread (elsewhere unsubscribe keeps the handler).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

NOTIFY = "notify"
EXIT = "exit"
PLAIN = "plain"   # serve()'s stop signals: the subscribers only

Subscriber = Callable[[int, Any], Any]

_SUBS: dict[int, list[Subscriber]] = {}
_KIND: dict[int, str] = {}
_PREV: dict[int, Any] = {}

# uncatchable; synchronous faults (a Python handler turns a crash into a hang);
# default action ignore or stop/continue (no exit status to give)
NOT_EXIT_SIGNALS = frozenset({
    signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE,
    signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGCHLD, signal.SIGCONT,
    signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def exit_signal_set(exit_signals, signum: int) -> tuple[int, ...]:
    """Validate ``register(exit_signals=)`` against the task's own signal."""
    try:
        sigs = tuple(signal.Signals(s) for s in exit_signals)
    except (TypeError, ValueError):
        raise ValueError(f"exit_signals must be signal numbers, got {exit_signals!r}") from None
    for s in sigs:
        if s in NOT_EXIT_SIGNALS or s == signum:
            raise ValueError(
                f"exit_signals: {s.name} cannot be an exit signal (uncatchable, a fault, one "
                "whose default action does not end the process, or the task's own "
                "notification signal); use e.g. SIGTERM, SIGINT, SIGHUP")
    return tuple(int(s) for s in sigs)


def dispatch(signum: int, frame: Any = None) -> None:
    """The Python handler of every routed signal (also called by an asyncio
    loop's signal callback, which replaces the Python handler while a loop is
    attached)."""
    # Read before the subscribers run: one that exits may unsubscribe the last.
    kind, prev = _KIND.get(signum), _PREV.get(signum)
    deferred = False
    for fn in list(_SUBS.get(signum, ())):
        if fn(signum, frame):
            deferred = True
    if kind == EXIT:
        if not deferred:
            die_of(signum)
        return
    if kind == PLAIN:
        return
    if callable(prev):
        prev(signum, frame)


def subscribe(signum: int, fn: Subscriber, kind: str) -> None:
    """Route ``signum`` to ``fn``. The first subscriber installs the router's
    handler, remembering the one it replaces. Main thread only."""
    signum = int(signum)
    prev = signal.signal(signum, dispatch)
    if prev is not dispatch:
        _PREV[signum] = prev
    _KIND[signum] = kind
    _SUBS.setdefault(signum, []).append(fn)


def unsubscribe(signum: int, fn: Subscriber) -> None:
    """Stop routing ``signum`` to ``fn``; the last one out puts back what the
    signal's kind says (see the module's doc)."""
    signum = int(signum)
    subs = _SUBS.get(signum, [])
    if fn in subs:
        subs.remove(fn)
    if subs or threading.current_thread() is not threading.main_thread():
        return
    prev = _PREV.pop(signum, signal.SIG_DFL)
    kind = _KIND.pop(signum, NOTIFY)
    try:
        if kind in (EXIT, PLAIN):
            signal.signal(signum, prev or signal.SIG_DFL)
        else:
            # Keep ignoring a straggling signal instead of dying of it.
            signal.signal(signum, prev if prev not in (None, signal.SIG_DFL) else signal.SIG_IGN)
    except (ValueError, TypeError):
        pass


def subscribed(signum: int) -> bool:
    return bool(_SUBS.get(int(signum)))


def reinstall(signum: int) -> None:
    """Take the signal back after something else (an asyncio loop) handled
    it: the router's handler if anyone subscribes, else ignore it."""
    signal.signal(signum, dispatch if subscribed(signum) else signal.SIG_IGN)


def die_of(signum: int) -> None:
    """End the process with the status signum's default action gives (the
    exit status a shell or supervisor sees: killed by that signal)."""
    sys.stdout.flush() if sys.stdout else None
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    # Only reached if the default action does not end the process.
    os._exit(128 + signum)
