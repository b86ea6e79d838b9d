"""``shm-taskwork demo``: the main job on an embedded default.

A supervisor (this process) creates a private domain and starts worker
processes - unrelated ones, each started with ``python -m shm_taskwork.tools.demo
--worker`` - that register a task and the callbacks a real service would
take from its supervisor: *reload config*, *flush cache*, *drop connection*.
Each worker meanwhile does something ordinary:

  waiter    blocked in ``task.wait()`` (a 50 ms heartbeat)
  cruncher  a pure-Python compute loop calling ``task.checkpoint()`` between chunks
  sleeper   naps in ``time.sleep(0.02)``, ``task.checkpoint()`` after each
  looper    an asyncio loop: ``add_reader(task.fileno())``, a checkpoint on a timer
            (the fourth worker, with ``--workers 4``)

The supervisor then sends deferred callbacks in every notify mode:

  TWA_NONE           queued and held: they run with the task's next run, which
                     the first RESUME of the next phase triggers. While they
                     wait, some are cancelled with cancel, cancel_func and
                     cancel_match.
  TWA_RESUME         the eventfd wakes wait(), the asyncio reader; the others
                     run them at their next checkpoint
  TWA_SIGNAL         SIGUSR1 through a pidfd: the handler runs them in the
                     middle of the busy loop and of time.sleep
  TWA_SIGNAL_NO_IPI  flag only: they run when the task next checks
  TWA_NMI_CURRENT    own task only: the supervisor sends SIGUSR2 to a worker,
                     whose handler queues NMI work on itself; it runs at the
                     next safe point, never inside the handler
  add_many           one push and one wake-up for a batch

Every callback reports on the worker's stdout (one JSON line, written with
``os.write`` so a signal handler may write too) what it did, where it ran and
its wake-up latency: CLOCK_MONOTONIC at the callback's start minus
``work.enqueued_ns``. Then one worker is told to retire: its callback calls
``task.exit()``, and an add to it afterwards raises TaskExitedError (ESRCH).
The others are shut down, every child is reaped, the pool must be whole again
(``pool_free == pool_size``) and the domain is removed, even on an error or
Ctrl-C. Every work must have run exactly once or been cancelled; otherwise
the demo says so on stderr and exits 1.

Synchronisation is by handshakes on the workers' stdout, each with a
deadline; nothing sleeps to wait for another process.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import signal
import sys
import time

import shm_taskwork
from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI,
                          Domain, TaskExitedError, callback)
from shm_taskwork.tools._common import (UNLIMITED, percentile, positive_int, render_table, say,
                                       terminal_width)
from shm_taskwork.tools._proc import Child, ChildError, Children, temp_domain

PREFIX = "tw_demo_"
STYLES = ("waiter", "cruncher", "sleeper", "looper")
STYLE_TEXT = {
    "waiter": "blocked in task.wait() (50 ms heartbeat)",
    "cruncher": "pure-Python compute loop, task.checkpoint() between chunks",
    "sleeper": "time.sleep(0.02) naps, task.checkpoint() after each",
    "looper": "asyncio: add_reader(task.fileno()), checkpoint() on a 20 ms timer",
}
JOBS = ("demo.reload_config", "demo.flush_cache", "demo.drop_connection")
MODES = (("TWA_NONE", TWA_NONE), ("TWA_RESUME", TWA_RESUME), ("TWA_SIGNAL", TWA_SIGNAL),
         ("TWA_SIGNAL_NO_IPI", TWA_SIGNAL_NO_IPI))
ROWS = ("TWA_NONE", "TWA_RESUME", "TWA_SIGNAL", "TWA_SIGNAL_NO_IPI", "TWA_NMI_CURRENT",
        "add_many")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STEP_TIMEOUT = 15.0   # seconds for any one handshake
NAP = 0.02            # the sleeper's nap and the looper's timer
HEARTBEAT = 0.05      # the waiter's wait() timeout


# =========================================================================
# worker side: runs in each worker process
# =========================================================================

class _State:
    """What a worker's callbacks act on, and where its main code is."""

    def __init__(self, task, style: str):
        self.task = task
        self.style = style
        self.where = "starting"
        self.stop = False
        self.exiting = False
        self.in_usr2 = False
        self.config_version = 0
        self.cache = {f"key{i}": i for i in range(32)}
        self.connections = set(range(64))
        self.chunks = 0
        self.naps = 0
        self.nmi_seq = 0
        self.ran = 0


W: _State | None = None

# Where a callback finds the main code -> what that proves about where it ran.
# The main code sets W.where before each thing it does; a callback that sees
# "compute", "time.sleep" or "asyncio idle" can only be in the signal handler.
_WHERE = {
    "compute": "handler: busy loop",
    "time.sleep": "handler: time.sleep",
    "asyncio idle": "handler: asyncio",
}


def _emit(obj: dict) -> None:
    """One JSON line on stdout. os.write, not print: a signal handler may
    write while the main code is writing (print would raise on re-entry)."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    while data:
        n = os.write(1, data)
        data = data[n:]


def _ran(work, started_ns: int, did: str, **extra) -> None:
    W.ran += 1
    try:
        seq = json.loads(work.payload)["seq"]
    except (ValueError, KeyError, TypeError):
        seq = None
    where = "exit()" if W.exiting else _WHERE.get(W.where, W.where)
    _emit({"ev": "ran", "seq": seq, "cb": work.func_name, "lat": started_ns - work.enqueued_ns,
           "where": where, "did": did, "sender": work.sender_pid, **extra})


@callback(name="demo.reload_config")
def reload_config(work) -> None:
    t = time.monotonic_ns()
    W.config_version += 1
    _ran(work, t, f"config v{W.config_version}")


@callback(name="demo.flush_cache")
def flush_cache(work) -> None:
    t = time.monotonic_ns()
    n = len(W.cache)
    W.cache.clear()
    W.cache.update({f"key{i}": i for i in range(8)})  # warm again
    _ran(work, t, f"flushed {n} entries")


@callback(name="demo.drop_connection")
def drop_connection(work) -> None:
    t = time.monotonic_ns()
    conn = json.loads(work.payload).get("conn", 0)
    W.connections.discard(conn)
    W.connections.add(conn + 64)  # the client reconnects
    _ran(work, t, f"dropped conn {conn}")


@callback(name="demo.sample_watchdog")
def sample_watchdog(work) -> None:
    """Queued with TWA_NMI_CURRENT by the SIGUSR2 handler on its own task."""
    t = time.monotonic_ns()
    _ran(work, t, "watchdog sample", in_handler=W.in_usr2, nmi=json.loads(work.payload)["nmi"])


@callback(name="demo.retire")
def retire(work) -> None:
    """Exit the task from inside one of its callbacks: exit() marks it
    exiting, the run in progress drains the list and completes the exit."""
    t = time.monotonic_ns()
    W.exiting = True
    W.task.exit()
    W.stop = True
    _ran(work, t, "task.exit() requested")


@callback(name="demo.shutdown")
def shutdown(work) -> None:
    t = time.monotonic_ns()
    W.stop = True
    _ran(work, t, "stopping")


def _on_usr2(signum, frame) -> None:
    """Watchdog: queue work on the own task from inside a signal handler."""
    if not W.task.is_current:
        return
    W.in_usr2 = True
    try:
        W.nmi_seq += 1
        payload = json.dumps({"seq": None, "nmi": W.nmi_seq}).encode()
        w = W.task.add("demo.sample_watchdog", payload, TWA_NMI_CURRENT)
        _emit({"ev": "nmi_added", "nmi": W.nmi_seq, "id": w.id})
    finally:
        W.in_usr2 = False


def _orphaned(ppid: int) -> bool:
    return os.getppid() != ppid


def _loop_waiter(task, ppid: int) -> None:
    while not W.stop and task.is_current and not _orphaned(ppid):
        W.where = "wait()"
        task.wait(timeout=HEARTBEAT)


def _loop_cruncher(task, ppid: int) -> None:
    x = 1
    while not W.stop and task.is_current:
        W.where = "compute"
        for i in range(1500):          # about 100 us of pure Python
            x = (x * 1103515245 + i) & 0x7FFFFFFF
        W.chunks += 1
        W.where = "checkpoint()"
        task.checkpoint()              # the safe point
        if W.chunks % 256 == 0 and _orphaned(ppid):
            break


def _loop_sleeper(task, ppid: int) -> None:
    while not W.stop and task.is_current and not _orphaned(ppid):
        W.where = "time.sleep"
        time.sleep(NAP)
        W.naps += 1
        W.where = "checkpoint()"
        task.checkpoint()


def _loop_looper(task, ppid: int) -> None:
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        fd = task.fileno()

        def on_readable():
            W.where = "eventfd reader"
            task.run()                 # run(), not checkpoint(): it drains the eventfd
            W.where = "asyncio idle"

        loop.add_reader(fd, on_readable)
        try:
            while not W.stop and task.is_current and not _orphaned(ppid):
                W.where = "asyncio idle"
                await asyncio.sleep(NAP)
                W.naps += 1
                if not task.is_current:    # the reader ran a callback that exited it
                    break
                W.where = "checkpoint()"
                task.checkpoint()
        finally:
            loop.remove_reader(fd)

    asyncio.run(main())


def worker_main(args) -> int:
    global W
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the supervisor
    ppid = os.getppid()
    with Domain.open(args.domain) as dom:
        task = dom.register(f"{args.worker}-{args.index}")
        W = _State(task, args.worker)
        signal.signal(signal.SIGUSR2, _on_usr2)
        _emit({"ev": "ready", "task": task.id, "pid": os.getpid(), "name": task.name,
               "style": args.worker})
        try:
            {"waiter": _loop_waiter, "cruncher": _loop_cruncher, "sleeper": _loop_sleeper,
             "looper": _loop_looper}[args.worker](task, ppid)
        finally:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            if task.is_current:
                W.exiting = True
                W.where = "exit()"
                task.exit()
        _emit({"ev": "exited", "ran": W.ran, "chunks": W.chunks, "naps": W.naps,
               "config_version": W.config_version, "connections": len(W.connections)})
    return 0


# =========================================================================
# supervisor side
# =========================================================================

class DemoError(Exception):
    """Something the demo promises did not happen; one line for stderr."""


class _Worker:
    """One worker process: its ``Child`` (pid, ready event, exit status)
    and what the demo keeps about it."""

    def __init__(self, index: int, style: str, child: Child):
        self.index = index
        self.style = style
        self.child = child
        self.exited: dict | None = None
        self.task = None
        self.name = f"{style}-{index}"
        self.sent = 0

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def ready(self) -> dict | None:
        return self.child.ready

    @property
    def eof(self) -> bool:
        return self.child.eof

    def wait(self) -> int:
        try:
            return self.child.wait(STEP_TIMEOUT)
        except ChildError as exc:
            raise DemoError(str(exc)) from None

    def last_error_line(self) -> str:
        return self.child.last_error_line()


class _Sent:
    __slots__ = ("seq", "mode", "worker", "cb", "work")

    def __init__(self, seq, mode, worker, cb, work):
        self.seq, self.mode, self.worker, self.cb, self.work = seq, mode, worker, cb, work


class Demo:
    def __init__(self, workers: int, works: int):
        self.nworkers = workers
        self.works = works
        self.name: str | None = None      # the domain's, once made
        self.dom: Domain | None = None
        self._domain = contextlib.ExitStack()
        self.workers: list[_Worker] = []
        self._by_child: dict[int, _Worker] = {}
        self.kids = Children(on_event=self._on_event)
        self.seq = itertools.count(1)
        self.sent: dict[int, _Sent] = {}
        self.ran: dict[int, dict] = {}
        self.duplicates: list[int] = []
        self.cancelled: dict[int, str] = {}      # seq -> how
        self.nmi_added: dict[tuple[int, int], dict] = {}
        self.nmi_ran: dict[tuple[int, int], dict] = {}
        self.facts: dict = {}
        self.t0 = time.monotonic()

    # ---- processes and their reports -----------------------------------------

    def start_workers(self) -> None:
        # the directory holding the package (the repository, or site-packages)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(shm_taskwork.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        for i in range(self.nworkers):
            style = STYLES[i % len(STYLES)]
            # Ctrl-C must not land between the fork and the bookkeeping: a
            # worker started but not recorded would be left running.
            # (The worker unblocks both signals first thing.)
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                child = self.kids.spawn(
                    f"worker {style}-{i}",
                    [sys.executable, "-m", "shm_taskwork.tools.demo", "--worker", style,
                     "--domain", self.name, "--index", str(i)], env=env)
                w = _Worker(i, style, child)
                self.workers.append(w)
                self._by_child[id(child)] = w
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        self.wait_for(lambda: all(w.ready for w in self.workers), "the workers to register")
        for w in self.workers:
            w.task = self.dom.task(w.ready["task"])
            w.name = w.ready["name"]
            if w.task.pid != w.pid:
                raise DemoError(f"task {w.task.id} has pid {w.task.pid}, its worker is {w.pid}")

    def pump(self, timeout: float) -> None:
        self.kids.pump(timeout)

    def _on_event(self, child: Child, ev: dict) -> None:
        self.handle(self._by_child[id(child)], ev)

    def handle(self, w: _Worker, ev: dict) -> None:
        kind = ev.get("ev")
        if kind == "exited":
            w.exited = ev
        elif kind == "nmi_added":
            self.nmi_added[(w.index, ev["nmi"])] = ev
        elif kind == "ran":
            ev["worker"] = w.index
            if ev.get("nmi") is not None:
                key = (w.index, ev["nmi"])
                if key in self.nmi_ran:
                    self.duplicates.append(-ev["nmi"])
                self.nmi_ran[key] = ev
                return
            seq = ev.get("seq")
            if seq in self.ran:
                self.duplicates.append(seq)
            self.ran[seq] = ev

    def wait_for(self, pred, what: str, timeout: float = STEP_TIMEOUT) -> None:
        try:
            self.kids.wait_for(pred, what, timeout)
        except ChildError as exc:
            raise DemoError(str(exc)) from None

    @property
    def noise(self) -> list[str]:
        """Lines the workers printed that were not events."""
        return [line for w in self.workers for line in w.child.noise]

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.exited is None and not w.eof]

    # ---- sending -------------------------------------------------------------

    def send(self, w: _Worker, mode: str, notify: int, cb: str | None = None) -> _Sent:
        seq = next(self.seq)
        cb = cb or JOBS[(seq // self.nworkers) % len(JOBS)]  # every worker gets every job
        payload = json.dumps({"seq": seq, "conn": seq % 64}).encode()
        work = w.task.add(cb, payload, notify)
        s = _Sent(seq, mode, w.index, cb, work)
        self.sent[seq] = s
        w.sent += 1
        return s

    def settled(self, seqs) -> bool:
        return all(s in self.ran or s in self.cancelled for s in seqs)

    def phase_none(self) -> None:
        """TWA_NONE: queued, no notification; held until the task's next run.
        Cancel some while they wait."""
        ws = self.live()
        held = [self.send(ws[i % len(ws)], "TWA_NONE", TWA_NONE) for i in range(self.works)]
        self.pump(0)
        per = collections.Counter(s.worker for s in held)
        pending = {w.index: w.task.pending() for w in ws}
        self.facts["none_held"] = sum(min(pending[i], n) for i, n in per.items())
        # task_work_cancel: by the exact work (node + generation)
        by_work = 0
        for s in held:
            if s.seq % 10 == 0 and self.workers[s.worker].task.cancel(s.work):
                self.cancelled[s.seq] = "cancel"
                by_work += 1
        # task_work_cancel_func: the newest pending work of one callback, until none is left
        by_func = 0
        t0 = ws[0].task
        while (got := t0.cancel_func("demo.drop_connection")) is not None:
            self._cancelled(got, "cancel_func")
            by_func += 1
        # task_work_cancel_match: a predicate over the pending works, newest first
        by_match = 0
        t1 = ws[1 % len(ws)].task
        def pred(work) -> bool:  # reload_config for the first 32 connections
            return (work.func_name == "demo.reload_config"
                    and json.loads(work.payload)["conn"] < 32)
        while (got := t1.cancel_match(pred)) is not None:
            self._cancelled(got, "cancel_match")
            by_match += 1
        expect = {w.index: per[w.index] - sum(1 for q, _ in self.cancelled.items()
                                              if self.sent[q].worker == w.index) for w in ws}
        after = {w.index: w.task.pending() for w in ws}
        self.facts["cancel"] = {
            "cancel": by_work, "cancel_func": by_func, "cancel_match": by_match,
            "cancel_func_of": f"{ws[0].name}: demo.drop_connection",
            "cancel_match_of": f"{t1.name}: demo.reload_config with conn < 32",
            "pending_after": sum(after.values()), "pending_expected": sum(expect.values()),
            "held": self.facts["none_held"]}
        if after != expect and self.facts["none_held"] == self.works:
            raise DemoError(f"pending after cancelling is {after}, expected {expect}")
        self.facts["none_seqs"] = [s.seq for s in held]

    def _cancelled(self, work, how: str) -> None:
        seq = json.loads(work.payload)["seq"]
        if seq in self.cancelled:
            raise DemoError(f"work {seq} was cancelled twice ({self.cancelled[seq]}, {how})")
        self.cancelled[seq] = how

    def phase_bursts(self, mode: str, notify: int, also=()) -> None:
        """Send ``works`` works in about ten bursts; each burst must settle
        (every work reported run) before the next is sent."""
        ws = self.live()
        burst = max(1, self.works // 10)
        seqs: list[int] = []
        for k in range(0, self.works, burst):
            part = [self.send(ws[j % len(ws)], mode, notify).seq
                    for j in range(k, min(k + burst, self.works))]
            seqs += part
            self.wait_for(lambda: self.settled(part), f"the {mode} works to run")
        # Works held without a notification ran with the next run of their task.
        self.wait_for(lambda: self.settled(also), f"the held works to run after {mode}")
        self.facts.setdefault("phase_seqs", {})[mode] = seqs

    def phase_nmi(self) -> None:
        """SIGUSR2 -> the worker's handler adds TWA_NMI_CURRENT work to itself."""
        ws = self.live()
        target = next((w for w in ws if w.style == "cruncher"), ws[0])
        count = max(5, min(50, self.works // 10))
        for i in range(1, count + 1):
            os.kill(target.pid, signal.SIGUSR2)
            key = (target.index, i)
            self.wait_for(lambda: key in self.nmi_ran, f"NMI work {i} to run on {target.name}")
        self.facts["nmi"] = {"worker": target.name, "signals": count}

    def phase_add_many(self) -> None:
        w = self.live()[0]
        n = max(2, self.works // 4)
        before = self._info(w).resumes_sent
        seqs = [next(self.seq) for _ in range(n)]
        payloads = [json.dumps({"seq": q, "conn": q % 64}).encode() for q in seqs]
        works = w.task.add_many("demo.flush_cache", payloads, TWA_RESUME)
        for q, work in zip(seqs, works):
            self.sent[q] = _Sent(q, "add_many", w.index, "demo.flush_cache", work)
        w.sent += n
        self.wait_for(lambda: self.settled(seqs), "the add_many works to run")
        self.facts["add_many"] = {"worker": w.name, "works": n, "pushes": 1,
                                  "resumes_sent": self._info(w).resumes_sent - before}
        # A work that already ran cannot be cancelled (nor a later one reusing its node).
        self.facts["cancel"]["after_run"] = w.task.cancel(works[0])
        if self.facts["cancel"]["after_run"]:
            raise DemoError("cancel() of a work that had already run returned True")

    def _info(self, w: _Worker):
        for t in self.dom.tasks():
            if t.id == w.task.id and t.generation == w.task.gen:
                return t
        raise DemoError(f"task {w.task.id} ({w.name}) is gone from the task table")

    def phase_exit(self) -> None:
        """Retire the last worker from inside one of its callbacks; then show
        that adding to it raises TaskExitedError (ESRCH)."""
        w = self.live()[-1]
        held = [self.send(w, "exit", TWA_NONE).seq for _ in range(3)]
        ctl = self.send(w, "control", TWA_RESUME, cb="demo.retire").seq
        self.wait_for(lambda: w.exited is not None, f"{w.name} to exit")
        self.wait_for(lambda: self.settled(held + [ctl]), f"{w.name}'s last works to run")
        try:
            w.child.wait(STEP_TIMEOUT)
        except ChildError:
            raise DemoError(f"{w.name} (pid {w.pid}) did not end after its task exited") from None
        try:
            w.task.add("demo.flush_cache", b"{}", TWA_RESUME)
        except TaskExitedError as exc:
            self.facts["exit"] = {"worker": w.name, "task": w.task.id, "pid": w.pid,
                                  "error": type(exc).__name__, "errno": exc.errno,
                                  "message": str(exc),
                                  "drained_by_exit": sum(self.ran[q]["where"] == "exit()"
                                                         for q in held)}
        else:
            raise DemoError(f"add to exited task {w.task.id} did not raise TaskExitedError")
        if self.facts["exit"]["errno"] != 3:
            raise DemoError(f"TaskExitedError carries errno {self.facts['exit']['errno']}, not ESRCH")

    def shutdown(self) -> None:
        ws = self.live()
        ctl = [self.send(w, "control", TWA_RESUME, cb="demo.shutdown").seq for w in ws]
        self.wait_for(lambda: all(w.exited for w in ws), "the workers to shut down")
        self.wait_for(lambda: self.settled(ctl), "the shutdown works")
        for w in ws:
            w.wait()

    # ---- the whole run ---------------------------------------------------------

    def run(self) -> dict:
        # a private domain, removed by cleanup() however the run ends
        self.dom = self._domain.enter_context(temp_domain(
            PREFIX.rstrip("_"), max_tasks=max(8, self.nworkers),
            pool_size=max(1024, 2 * self.works + 256), payload_size=128))
        self.name = self.dom.name
        self.start_workers()
        self.phase_none()
        # The first RESUME of each worker also runs the TWA_NONE works it holds.
        self.phase_bursts("TWA_RESUME", TWA_RESUME,
                          also=[q for q in self.facts["none_seqs"] if q not in self.cancelled])
        self.phase_bursts("TWA_SIGNAL", TWA_SIGNAL)
        self.phase_bursts("TWA_SIGNAL_NO_IPI", TWA_SIGNAL_NO_IPI)
        self.phase_nmi()
        self.phase_add_many()
        self.facts["stats_before_exit"] = self.dom.stats().as_dict()
        self.phase_exit()
        self.shutdown()
        self.pump(0)
        st = self.dom.stats()
        self.facts["pool"] = st.as_dict()
        self.facts["dead_letters"] = len(self.dom.dead_letters())
        return self.report()

    def cleanup(self) -> None:
        """Stop every child, reap it, remove the domain. Safe after any error."""
        self.kids.close(STEP_TIMEOUT)
        self._domain.close()      # temp_domain: closed and unlinked
        if self.name is None:     # interrupted before it was made: nothing to remove
            self.facts["removed"] = True
            return
        import posix_ipc
        try:
            posix_ipc.SharedMemory(self.name).close_fd()
            self.facts["removed"] = False
        except posix_ipc.ExistentialError:
            self.facts["removed"] = True

    # ---- the ledger and the report ---------------------------------------------

    def report(self) -> dict:
        rows = {}
        problems = []
        for mode in ROWS:
            if mode == "TWA_NMI_CURRENT":
                sent = len(self.nmi_added)
                ran = [self.nmi_ran[k] for k in self.nmi_added if k in self.nmi_ran]
                cancelled = 0
                lost = sent - len(ran)
            else:
                seqs = [q for q, s in self.sent.items() if s.mode == mode]
                sent = len(seqs)
                ran = [self.ran[q] for q in seqs if q in self.ran]
                cancelled = sum(1 for q in seqs if q in self.cancelled)
                lost = sum(1 for q in seqs if q not in self.ran and q not in self.cancelled)
                both = [q for q in seqs if q in self.ran and q in self.cancelled]
                if both:
                    problems.append(f"{len(both)} {mode} works were cancelled and ran too")
            lats = [e["lat"] for e in ran]
            rows[mode] = {
                "sent": sent, "ran": len(ran), "cancelled": cancelled, "lost": lost,
                "latency_us": ({"median": round(percentile(lats, 50) / 1e3, 1),
                                "p99": round(percentile(lats, 99) / 1e3, 1),
                                "max": round(max(lats) / 1e3, 1)} if lats else None),
                "where": dict(collections.Counter(e["where"] for e in ran).most_common()),
            }
            if lost:
                problems.append(f"{lost} {mode} works lost (neither ran nor cancelled)")
        by_worker: dict[str, dict] = {}
        for w in self.workers:
            cells = {}
            for mode in ROWS:
                if mode == "TWA_NMI_CURRENT":
                    lats = [e["lat"] for k, e in self.nmi_ran.items() if k[0] == w.index]
                else:
                    lats = [self.ran[q]["lat"] for q, s in self.sent.items()
                            if s.mode == mode and s.worker == w.index and q in self.ran]
                if lats:
                    cells[mode] = {"n": len(lats), "median": round(percentile(lats, 50) / 1e3, 1),
                                   "max": round(max(lats) / 1e3, 1)}
            by_worker[w.name] = cells
        # the works that steer the demo itself: the three held for the retiring
        # worker's exit, its retire, and one shutdown per worker
        other = [q for q, s in self.sent.items() if s.mode in ("exit", "control")]
        lost_other = [q for q in other if q not in self.ran]
        if lost_other:
            problems.append(f"{len(lost_other)} control works never ran")
        rows["control"] = {
            "sent": len(other), "ran": len(other) - len(lost_other), "cancelled": 0,
            "lost": len(lost_other), "latency_us": None,
            "where": dict(collections.Counter(self.ran[q]["where"] for q in other
                                              if q in self.ran).most_common())}
        lats = [self.ran[q]["lat"] for q in other if q in self.ran]
        if lats:
            rows["control"]["latency_us"] = {"median": round(percentile(lats, 50) / 1e3, 1),
                                             "p99": round(percentile(lats, 99) / 1e3, 1),
                                             "max": round(max(lats) / 1e3, 1)}
        totals = {k: sum(r[k] for r in rows.values()) for k in ("sent", "ran", "cancelled",
                                                                   "lost")}
        # exactly once, and in the process of the task it was queued on
        elsewhere = [q for q, e in self.ran.items()
                     if q in self.sent and e["worker"] != self.sent[q].worker]
        if elsewhere:
            problems.append(f"{len(elsewhere)} works ran in another worker than their task's")
        reported = sum(((w.exited or {}).get("ran") or 0) for w in self.workers)
        if all(w.exited for w in self.workers) and reported != totals["ran"]:
            problems.append(f"the workers report {reported} works run, the ledger "
                            f"{totals['ran']}")
        if self.duplicates:
            problems.append(f"{len(self.duplicates)} works ran twice")
        unknown = [q for q in self.ran if q not in self.sent]
        if unknown:
            problems.append(f"{len(unknown)} reports of works never sent")
        in_handler = sum(1 for e in self.nmi_ran.values() if e.get("in_handler"))
        if in_handler:
            problems.append(f"{in_handler} NMI works ran inside the signal handler")
        pool = self.facts["pool"]
        if pool["pool_free"] != pool["pool_size"]:
            problems.append(f"pool_free {pool['pool_free']} != pool_size {pool['pool_size']} "
                            "after every work ran or was cancelled")
        if self.facts["dead_letters"]:
            problems.append(f"{self.facts['dead_letters']} dead letters")
        stats = self.facts["stats_before_exit"]
        exp_cancel = len(self.cancelled)
        if stats["cancelled"] != exp_cancel:
            problems.append(f"the tasks counted {stats['cancelled']} cancelled, "
                            f"the supervisor {exp_cancel}")
        return {
            "domain": self.name,
            "workers": [{"name": w.name, "task": w.task.id if w.task else None, "pid": w.pid,
                         "style": w.style, "sent": w.sent,
                         "ran": (w.exited or {}).get("ran"),
                         "chunks": (w.exited or {}).get("chunks"),
                         "naps": (w.exited or {}).get("naps"),
                         "status": w.child.poll()} for w in self.workers],
            "works_per_mode": self.works,
            "modes": rows,
            "totals": totals,
            "ran_elsewhere": len(elsewhere),
            "latency_by_worker": by_worker,
            "cancel": self.facts["cancel"],
            "add_many": self.facts["add_many"],
            "nmi": {**self.facts["nmi"], "in_handler": in_handler,
                    "where": rows["TWA_NMI_CURRENT"]["where"]},
            "exit": self.facts["exit"],
            "counters_before_exit": stats,
            "pool": pool,
            "dead_letters": self.facts["dead_letters"],
            "duplicates": len(self.duplicates),
            "stray_output": self.noise[:5],
            "problems": problems,
        }


# ---- printing ------------------------------------------------------------------
# Every table fits an 80-column terminal: latencies in compact units, the long
# texts (what a worker does, where callbacks ran) in columns that wrap, never
# truncated.

MODE_LABEL = {"control": "control works", "TWA_SIGNAL_NO_IPI": "TWA_SIGNAL_NO_IPI"}
SHORT_MODE = {"TWA_RESUME": "RESUME", "TWA_SIGNAL": "SIGNAL", "TWA_SIGNAL_NO_IPI": "NO_IPI",
              "TWA_NMI_CURRENT": "NMI", "add_many": "add_many"}
MODE_NOTES = [
    "TWA_NONE: held without a notification until the task's next run.",
    "TWA_NMI_CURRENT: queued by a worker on its own task from a SIGUSR2 handler.",
    "add_many: one push and one TWA_RESUME wake-up for a batch.",
    "control works: the 3 works held for the retiring worker's exit, its retire "
    "(task.exit() in a callback) and one shutdown per worker.",
]


def _us(value: float | None) -> str:
    """Microseconds in the unit that reads best, at most 5 characters (the
    mode table's eight columns must fit 80 columns also when a loaded
    machine makes the figures milliseconds)."""
    if value is None:
        return "-"
    if value < 999.5:
        return f"{value:.0f}us"
    if value < 9.95e3:
        return f"{value / 1e3:.1f}ms"
    if value < 999.5e3:
        return f"{value / 1e3:.0f}ms"
    if value < 9.95e6:
        return f"{value / 1e6:.1f}s"
    return f"{value / 1e6:.0f}s"


def _lat(row: dict, key: str) -> str:
    return "-" if row["latency_us"] is None else _us(row["latency_us"][key])


def _fmt_where(where: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in where.items())


def tables(rep: dict) -> list[tuple[str, tuple, list[tuple], set]]:
    """(title, head, rows, right-aligned columns) of each table of the report."""
    wk_head = ("task", "name", "pid", "what it does meanwhile", "works ran")
    wk_rows = [(str(w["task"]), w["name"], str(w["pid"]), STYLE_TEXT[w["style"]],
                str(w["ran"])) for w in rep["workers"]]
    total_ran = sum(w["ran"] or 0 for w in rep["workers"])
    wk_rows.append(("", "total", "", "", str(total_ran)))
    head = ("notify mode", "sent", "ran", "cancelled", "lost", "median", "p99", "max")
    rows = []
    for mode, r in rep["modes"].items():
        rows.append((MODE_LABEL.get(mode, mode), str(r["sent"]), str(r["ran"]),
                     str(r["cancelled"]), str(r["lost"]), _lat(r, "median"), _lat(r, "p99"),
                     _lat(r, "max")))
    t = rep["totals"]
    rows.append(("total", str(t["sent"]), str(t["ran"]), str(t["cancelled"]), str(t["lost"]),
                 "", "", ""))
    wh_rows = [(MODE_LABEL.get(mode, mode), _fmt_where(r["where"]) or "-")
               for mode, r in rep["modes"].items()]
    mx_modes = [m for m in ROWS if m != "TWA_NONE"]
    mx_head = ("worker", *(SHORT_MODE[m] for m in mx_modes))
    mx_rows = []
    for w in rep["workers"]:
        cells = rep["latency_by_worker"].get(w["name"], {})
        mx_rows.append((w["name"], *(_us(cells[m]["median"]) if m in cells else "-"
                                     for m in mx_modes)))
    return [
        ("workers (unrelated processes, one task each)", wk_head, wk_rows,
         {"task", "pid", "works ran"}),
        ("deferred callbacks by notify mode; latency: enqueued -> callback start", head, rows,
         set(head[1:])),
        ("where the callbacks ran", ("notify mode", "where: count"), wh_rows, set()),
        ("median wake-up latency by worker", mx_head, mx_rows,
         set(mx_head[1:])),
    ]


def render(rep: dict, out) -> None:
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is a declared dependency
        Console = None
    lines_before = [
        f"shm-taskwork demo: domain {rep['domain']}, {len(rep['workers'])} worker processes, "
        f"{rep['works_per_mode']} works per notify mode",
    ]
    c = rep["cancel"]
    am = rep["add_many"]
    ex = rep["exit"]
    pool = rep["pool"]
    nmi = rep["nmi"]
    lines_after = [
        f"TWA_NONE: {rep['modes']['TWA_NONE']['sent']} queued with no notification; "
        f"{c['held']} of them still pending when checked, until cancelled or run by the "
        f"task's next run (the first TWA_RESUME).",
        f"cancelled {c['cancel'] + c['cancel_func'] + c['cancel_match']} while pending: "
        f"cancel(work) {c['cancel']}, cancel_func {c['cancel_func']} ({c['cancel_func_of']}), "
        f"cancel_match {c['cancel_match']} ({c['cancel_match_of']}); "
        f"cancel() of a work that already ran -> {c['after_run']}.",
        f"add_many: {am['works']} works to {am['worker']} in {am['pushes']} push, "
        f"{am['resumes_sent']} eventfd wake-up.",
        f"TWA_NMI_CURRENT: {nmi['signals']} SIGUSR2 to {nmi['worker']}; its handler queued work "
        f"on its own task; ran inside the handler: {nmi['in_handler']}.",
        f"exit: {ex['worker']} (task {ex['task']}) called task.exit() from a callback; "
        f"{ex['drained_by_exit']} held works ran during the exit.",
        f"ESRCH: add to exited task {ex['task']} -> {ex['error']} errno={ex['errno']} "
        f"(ESRCH): {ex['message']}",
        f"pool: pool_free {pool['pool_free']} == pool_size {pool['pool_size']}"
        if pool["pool_free"] == pool["pool_size"] else
        f"pool: pool_free {pool['pool_free']} != pool_size {pool['pool_size']}",
        f"dead letters: {rep['dead_letters']}; works run twice: {rep['duplicates']}; "
        f"all {len(rep['workers'])} workers reaped.",
        f"domain {rep['domain']} removed." if rep.get("removed") else
        f"domain {rep['domain']} NOT removed.",
    ]
    if rep["problems"]:
        lines_after.append("problems: " + "; ".join(rep["problems"]))
    all_tables = tables(rep)
    rich = Console is not None
    # $COLUMNS or the terminal's width, else 80: the tables are made to fit 80
    width = terminal_width(out)
    width = 80 if width == UNLIMITED else width
    for ln in lines_before:
        say(ln, out, width)
    for k, (title, head, rows, right) in enumerate(all_tables):
        # the long texts wrap (never an ellipsis); figures never do
        render_table(head, rows, out, title=title, right=right, rich=rich, width=width,
                     boxed=True,
                     wrap={"what it does meanwhile", "where: count"},
                     sections={len(rows) - 2} if k < 2 and len(rows) > 1 and rows[-2][0] != ""
                     else ())
        out.write("\n")
        if k == 1:
            for ln in MODE_NOTES:
                say(ln, out, width)
    for ln in lines_after:
        say(ln, out, width)


# ---- entry point ------------------------------------------------------------------

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start worker processes on a private domain, send them deferred "
                    "callbacks in every notify mode, cancel some, exit one task (ESRCH), "
                    "print what happened and the wake-up latencies, remove the domain.",
        epilog="Exit status 0 when every work ran exactly once or was cancelled and the pool "
               "is whole again; 1 with one line on stderr otherwise.")
    p.add_argument("--workers", type=positive_int, default=3,
                   help="worker processes (default 3: waiter, cruncher, sleeper; "
                        "a 4th runs an asyncio loop)")
    p.add_argument("--works", type=positive_int, default=200,
                   help="works sent per notify mode (default 200)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    # the worker side (started by the demo itself)
    p.add_argument("--worker", choices=STYLES, help=argparse.SUPPRESS)
    p.add_argument("--domain", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None, prog: str = "shm-taskwork demo", command: str = "demo") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.worker:
        return worker_main(args)
    demo = Demo(args.workers, args.works)
    prev_term = None
    if sys.platform.startswith("linux"):
        def on_term(signum, frame):
            raise KeyboardInterrupt
        try:
            prev_term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            prev_term = None
    try:
        try:
            rep = demo.run()
        finally:
            demo.cleanup()
    except DemoError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    rep["removed"] = demo.facts.get("removed", False)
    rep["seconds"] = round(time.monotonic() - demo.t0, 2)
    if not rep["removed"]:
        rep["problems"].append(f"domain {demo.name} was not removed")
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep, sys.stdout)
        print(f"done in {rep['seconds']:.2f} s.")
    if rep["problems"]:
        print(f"{prog}: {rep['problems'][0]}"
              + (f" (and {len(rep['problems']) - 1} more)" if len(rep["problems"]) > 1 else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
