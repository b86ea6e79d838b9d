"""Scribbled memory: a live segment full of garbage must not crash, hang, or
make the library signal a process it has not verified (docs/contract.md "Shared memory: the domain").

Hypothesis chooses the damage: random bytes and random (often plausible:
small indices, the NIL and EXITED markers, list heads) 32- and 64-bit words at
random offsets of the header, the task slots, the process table, the
callback-name table and the node pool; some cases also forge whole task slots
that name a live stranger's pid with a start time that is not the stranger's.
Then every public operation is called. Each must either succeed or raise a
TaskWorkError.

The damage and the calls happen in a worker subprocess, so that a segfault or
an abort fails the test (with the case that caused it) instead of killing
pytest, and a hang is a per-case timeout. The stranger is a process of the
test's own, whose default action for SIGUSR1 is to die: it must be alive and
answering at the end.

Besides the random rounds: single fields a sender trusts (the eventfd number,
the signal number, a mutex's type), and damage done while another process is
in the middle of its operations.

SHM_TASKWORK_SCRIBBLE_ROUNDS sets the number of rounds (default 1000);
SHM_TASKWORK_SCRIBBLE_SEED the seed (printed either way; run with -rP or -s
to see the count of rounds).
"""
from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import python_script, unique_name

ROUNDS = int(os.environ.get("SHM_TASKWORK_SCRIBBLE_ROUNDS", "1000"))
SEED = int(os.environ.get("SHM_TASKWORK_SCRIBBLE_SEED", "20261127"))
CASE_TIMEOUT = 10.0   # a case that takes longer is a hang
MAX_TASKS = 4

# ---------------------------------------------------------------------------
# the worker: one process, many cases, one JSON line in and out per case

WORKER = r"""
import errno, json, mmap, os, random, signal, sys, traceback
from shm_taskwork import (Domain, TaskWorkError, callback, TWA_NONE, TWA_RESUME, TWA_SIGNAL,
                          TWA_SIGNAL_NO_IPI, TWA_NMI_CURRENT, TWAF_NO_ALLOC, init_task_work,
                          task_work_add, task_work_cancel, task_work_cancel_func,
                          task_work_cancel_match, task_work_pending, task_work_run)
from shm_taskwork import _native
from shm_taskwork._native import ffi, lib

import logging
logging.getLogger("shm_taskwork").setLevel(logging.CRITICAL)  # expected noise here

VICTIM = int(sys.argv[1])
VICTIM_START = _native.start_ticks(VICTIM)
MODES = [TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI, TWA_RESUME | TWAF_NO_ALLOC]
# Locks in a scribbled segment may look held forever: keep this process's
# deadline short so a case stays quick (a process-local setting, not the
# segment's).
LOCK_TIMEOUT_NS = 20_000_000

@callback(name="scribble.rec")
def rec(work):
    pass

@callback(name="scribble.add_more")
def add_more(work):
    cur = DOMS[0].current
    if cur is not None:
        cur.add("scribble.rec", b"from-callback", TWA_NONE)

DOMS = [None]


def regions(d):
    # region -> (start, element size, element count, bytes of the element
    # that hold fields: a node's header, not its payload)
    slot, proc, name = (ffi.sizeof("struct tw_slot"), ffi.sizeof("struct tw_proc"),
                        ffi.sizeof("struct tw_name"))
    return {"header": (0, d.slots_off, 1, ffi.sizeof("struct tw_header")),
            "slots": (d.slots_off, slot, d.max_tasks, slot),
            "procs": (d.procs_off, proc, d.max_procs, proc),
            "names": (d.names_off, name, d.names_cap, name),
            "nodes": (d.nodes_off, d.node_size, d.pool_size, lib.tw_node_header_size())}


def scribble(dom, writes):
    reg = regions(dom.d)
    with open("/dev/shm" + dom.name, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for region, elem, off, kind, value in writes:
            start, size, count, fields = reg[region]
            base = start + (elem % count) * size
            if kind == "bytes":
                raw = bytes.fromhex(value)[:size]
                at = base + off % (size - len(raw) + 1)
            else:
                width = 4 if kind == "u32" else 8
                raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
                at = base + (off % (fields // width)) * width
            m[at:at + len(raw)] = raw


def forge(dom, slot, rnd):
    # A slot that names the stranger with a start time that is not its own.
    s = dom._slot(slot)
    g = (int(s.gen) + 1 + rnd % 5) & 0xFFFFFFFF or 1
    s.gen = g
    s.head = (g << 32) | lib.TW_NIL
    s.state = lib.TW_SLOT_RUNNING
    s.flags = 0
    s.pid = VICTIM
    s.start_ticks = VICTIM_START + 1 + rnd % 1000
    s.signum = int(signal.SIGUSR1)
    s.efd = rnd % 64


def release_leftovers(t):
    # A task whose exit() failed on a corrupt segment still has its eventfd,
    # its fd-server thread and its signal handler: free them here so that
    # hundreds of cases do not pile them up in this one process.
    from shm_taskwork import signals
    if t is None or not getattr(t, "_own", False) or t._exited:
        return
    t._exited = True
    if t._server is not None:
        t._server.stop()
    if t._handler:
        signals.unsubscribe(t._signum, t._on_signal)
    try:
        os.close(t._efd)
    except OSError:
        pass
    if t._dom._current is t:
        t._dom._current = None


def run_case(case):
    name = case["name"]
    rnd = random.Random(case["rnd"])
    outcomes, bad = {}, []

    def call(label, fn, *a, **kw):
        try:
            r = fn(*a, **kw)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            return r
        except TaskWorkError as exc:
            k = type(exc).__name__
            outcomes[k] = outcomes.get(k, 0) + 1
        except Exception as exc:
            bad.append(f"{label}: {exc!r}\n{traceback.format_exc()}")
        return None

    dom = Domain.create(name, max_tasks=MAX_TASKS, pool_size=case["pool"], payload_size=32,
                        max_procs=8, names_cap=8, record_origin=case["origin"])
    DOMS[0] = dom
    others, tasks = [], []
    try:
        dom.d.lock_timeout_ns = LOCK_TIMEOUT_NS
        t = dom.register("scribbled")
        tasks.append(t)
        # a second task of this process, through a second mapping
        dom2 = Domain.open(name)
        others.append(dom2)
        dom2.d.lock_timeout_ns = LOCK_TIMEOUT_NS
        t2 = dom2.register("second", install_handler=False)
        tasks.append(t2)
        # some of everything: pending works, a dead letter, names, a run
        t.add("scribble.unknown", b"dl", TWA_NONE)
        t.run()
        works = [t.add("scribble.rec", b"w%d" % i, MODES[i % 4]) for i in range(4)]
        works += dom.task(t2.id).add_many("scribble.rec", [b"a", b"b", b"c"], TWA_NONE)
        t.add("scribble.add_more", b"more", TWA_NONE)

        for k in case["forge"]:
            forge(dom, k, rnd.randrange(1 << 30))
        scribble(dom, case["writes"])

        # ---- every public operation ----
        dom3 = call("open", Domain.open, name)
        if dom3 is not None:
            others.append(dom3)
            dom3.d.lock_timeout_ns = LOCK_TIMEOUT_NS
            t3 = call("register", dom3.register, "third", install_handler=False)
            if t3 is not None:
                tasks.append(t3)
                call("add(own third)", t3.add, "scribble.rec", b"t3", TWA_SIGNAL)
                call("run(third)", t3.run)
            call("tasks(fresh)", dom3.tasks)
            call("stats(fresh)", dom3.stats)
        for i, mode in enumerate(MODES):
            call(f"add(own, {mode})", t.add, "scribble.rec", b"own%d" % i, mode)
        call("add(own, NMI)", t.add, "scribble.rec", b"nmi", TWA_NMI_CURRENT)
        call("add_many(own)", t.add_many, "scribble.rec", [b"m1", b"m2"], TWA_SIGNAL)
        call("cancel(own)", t.cancel, works[0])
        call("cancel_func(own)", t.cancel_func, "scribble.rec")
        call("cancel_match(own)", t.cancel_match, lambda w: w.payload.startswith(b"w"))
        call("pending(own)", t.pending)
        handles = []
        for i in range(MAX_TASKS):
            h = call(f"task({i})", dom.task, i)
            if h is not None:
                handles.append(h)
        call("task(pid=victim)", dom.task, pid=VICTIM)
        call("task(name=)", dom.task, name="second")
        for h in handles:
            for mode in MODES:
                call(f"add(task {h.id}, {mode})", h.add, "scribble.rec", b"x", mode)
            call(f"add_many(task {h.id})", h.add_many, "scribble.rec", [b"y", b"z"], TWA_SIGNAL)
            call(f"pending(task {h.id})", h.pending)
            call(f"cancel_func(task {h.id})", h.cancel_func, "scribble.rec")
            call(f"cancel_match(task {h.id})", h.cancel_match, lambda w: True)
            for w in works:
                call(f"cancel(task {h.id})", h.cancel, w)
            call(f"pending_works({h.id})", dom.pending_works, h.id)
            kw = init_task_work("scribble.rec", b"k")
            call("task_work_add", task_work_add, h, kw, TWA_SIGNAL)
            call("task_work_pending", task_work_pending, h)
            call("task_work_cancel", task_work_cancel, h, kw)
            call("task_work_cancel_func", task_work_cancel_func, h, "scribble.rec")
            call("task_work_cancel_match", task_work_cancel_match, h, lambda w, d: True, None)
        # a second wave: damage what the first calls left behind (lists they
        # relinked, nodes they freed, slots they registered or exited)
        scribble(dom, case["later"])
        call("run(own)", t.run)
        call("checkpoint(own)", t.checkpoint)
        call("wait(own)", t.wait, 0)
        call("task_work_run", task_work_run)
        call("run(second)", t2.run)
        call("tasks", dom.tasks)
        call("stats", dom.stats)
        call("dead_letters", dom.dead_letters)
        call("retry_dead_letters", dom.retry_dead_letters)
        call("fsck", dom.fsck)
        call("fsck(repair)", dom.fsck, repair=True)
        call("drop_dead_letters", dom.drop_dead_letters)
        call("tasks(after)", dom.tasks)
        call("stats(after)", dom.stats)
        call("add(after)", t.add, "scribble.rec", b"after", TWA_SIGNAL)
        for tk in tasks:
            call(f"exit({tk.id})", tk.exit)
        call("fsck(final)", dom.fsck, repair=True)
    finally:
        for tk in tasks:
            release_leftovers(tk)
        for o in others:
            call("close(other)", o.close)
        call("close", dom.close)
        dom.unlink()
    return {"outcomes": outcomes, "bad": bad}


import faulthandler
print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    # If a case hangs, say where before the parent gives up on it.
    faulthandler.dump_traceback_later(float(sys.argv[2]), exit=False)
    try:
        res = run_case(case)
    except BaseException as exc:
        res = {"outcomes": {}, "bad": [f"setup: {exc!r}\n{traceback.format_exc()}"]}
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(res), flush=True)
""".replace("MAX_TASKS", str(MAX_TASKS))

VICTIM = r"""
import sys
print("up", flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


class Worker:
    """The worker process, restarted when a case killed it."""

    def __init__(self, victim_pid: int):
        self.victim_pid = victim_pid
        self.proc = None
        self.rounds = 0
        self.outcomes: dict[str, int] = {}

    def _start(self):
        self.proc = python_script(WORKER, str(self.victim_pid), str(CASE_TIMEOUT - 2),
                                  stdin=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.err: collections.deque = collections.deque(maxlen=200)
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        self.err_reader = threading.Thread(target=self._pump_err, args=(self.proc, self.err),
                                           daemon=True)
        self.err_reader.start()
        self._get(30.0, "the worker to start")

    @staticmethod
    def _pump(proc, lines):
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    @staticmethod
    def _pump_err(proc, err):
        for line in proc.stderr:  # drained, so the worker never blocks writing it
            err.append(line)

    def _stderr(self) -> str:
        self.err_reader.join(10)
        return "".join(self.err)[-6000:]

    def _get(self, timeout: float, what: str) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            proc, self.proc = self.proc, None
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"hang: no answer within {timeout}s waiting for {what}; "
                                 f"where the worker was:\n{self._stderr()}") from None
        if line is None:
            rc = self.proc.wait(timeout=10)
            self.proc = None
            raise AssertionError(f"the worker died (returncode {rc}) during {what}:\n"
                                 f"{self._stderr()}")
        return line

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        res = json.loads(self._get(CASE_TIMEOUT, f"case {case}"))
        self.rounds += 1
        for k, n in res["outcomes"].items():
            self.outcomes[k] = self.outcomes.get(k, 0) + n
        return res

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def victim():
    p = python_script(VICTIM, stdin=subprocess.PIPE)
    assert _readline(p, 30).strip() == "up"
    yield p
    p.kill()
    p.communicate(timeout=10)


def assert_alive(victim):
    """The stranger answers, so no signal that was sent to it is pending:
    SIGUSR1's default action would have ended it before it could read."""
    victim.stdin.write("ping\n")
    victim.stdin.flush()
    assert _readline(victim, 30).strip() == "pong", \
        f"the stranger (pid {victim.pid}) was killed: returncode {victim.poll()}"


@pytest.fixture(scope="module")
def worker(victim):
    w = Worker(victim.pid)
    yield w
    w.stop()


# ---------------------------------------------------------------------------
# the damage hypothesis chooses

REGIONS = st.sampled_from(["header", "slots", "procs", "names", "nodes"])
SMALL = st.integers(0, 40)
MARKERS = st.sampled_from([0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0xFFFFFF])
U32 = st.one_of(SMALL, MARKERS, st.integers(0, 2**32 - 1))
HEADS = st.builds(lambda g, i: (g << 32) | i, st.integers(0, 4), st.one_of(SMALL, MARKERS))
U64 = st.one_of(HEADS, U32, st.integers(0, 2**64 - 1), st.just(2**64 - 1))

ELEM = st.integers(0, 1 << 16)
OFF = st.integers(0, 1 << 16)
WRITE = st.one_of(
    st.tuples(REGIONS, ELEM, OFF, st.just("bytes"),
              st.binary(min_size=1, max_size=16).map(bytes.hex)),
    st.tuples(REGIONS, ELEM, OFF, st.just("u32"), U32),
    st.tuples(REGIONS, ELEM, OFF, st.just("u64"), U64),
)

CASE = st.fixed_dictionaries({
    "writes": st.lists(WRITE, min_size=1, max_size=24),
    "later": st.lists(WRITE, max_size=8),
    "forge": st.lists(st.integers(0, MAX_TASKS - 1), max_size=2, unique=True),
    "origin": st.booleans(),
    "pool": st.sampled_from([8, 24]),
    "rnd": st.integers(0, 2**32 - 1),
})


def _check(worker, victim, case):
    case = dict(case, name=unique_name("scrib"))
    res = worker.run(case)
    assert not res["bad"], "an operation raised something other than TaskWorkError:\n" + \
        "\n".join(res["bad"])
    assert victim.poll() is None, f"the stranger died (returncode {victim.returncode})"


def _report(worker, victim, what: str, started: float, rounds: int, before: dict):
    assert_alive(victim)
    outcomes = {k: n - before.get(k, 0) for k, n in worker.outcomes.items()}
    print(f"\n{what}: {rounds} scribble rounds (seed {SEED}) in "
          f"{time.monotonic() - started:.1f}s; outcomes of the calls: {outcomes}")


def test_scribbled_segment(worker, victim, record_property):
    started = time.monotonic()
    before, outcomes = worker.rounds, dict(worker.outcomes)

    @seed(SEED)
    @settings(max_examples=ROUNDS, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(CASE)
    def scribbled(case):
        _check(worker, victim, case)

    scribbled()
    record_property("scribble_rounds", worker.rounds - before)
    _report(worker, victim, "scribbled segment", started, worker.rounds - before, outcomes)
    assert worker.rounds - before >= min(ROUNDS, 50)


@pytest.mark.asan
def test_scribbled_segment_smoke(worker, victim):
    """A handful of cases, for the sanitizer build."""
    started = time.monotonic()
    before, outcomes = worker.rounds, dict(worker.outcomes)

    @seed(SEED + 1)
    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(CASE)
    def scribbled(case):
        _check(worker, victim, case)

    scribbled()
    _report(worker, victim, "scribble smoke", started, worker.rounds - before, outcomes)


def test_forged_slots_never_signal_the_stranger(worker, victim):
    """Every slot forged to name the stranger, no other damage: every SIGNAL
    add is aimed at it, and none may reach it."""
    for k in range(20):
        res = worker.run({"name": unique_name("forge"), "writes": [], "later": [], "origin": False,
                          "forge": list(range(k % MAX_TASKS, MAX_TASKS)), "pool": 24, "rnd": k})
        assert not res["bad"], res["bad"]
    assert_alive(victim)


# ---------------------------------------------------------------------------
# single fields a sender trusts: the eventfd number and the signal number

TASK = r"""
import sys
from shm_taskwork import Domain, callback

@callback(name="scribble.note")
def note(work):
    print("ran", work.payload.decode(), flush=True)

dom = Domain.open(sys.argv[1])
t = dom.register("target")
print("ready", t.id, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "wait":
        print("waiting", flush=True)
        print("woke", t.wait(float(sys.argv[2])), flush=True)
    elif cmd == "run":
        print("done", t.run(), flush=True)
    elif cmd == "ping":
        print("pong", flush=True)
dom.close()
"""

SENDER = r"""
import sys
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
dom.task(int(sys.argv[2])).add("scribble.note", sys.argv[4].encode(), int(sys.argv[3]))
dom.close()
print("sent", flush=True)
"""


def _readline(proc, timeout: float) -> str:
    got: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: got.put(proc.stdout.readline()), daemon=True).start()
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line from pid {proc.pid} within {timeout}s") from None


def _send(dom, tid: int, notify: int, payload: str):
    s = python_script(SENDER, dom.name, str(tid), str(notify), payload)
    out, err = s.communicate(timeout=30)
    assert s.returncode == 0 and out.strip() == "sent", err


def test_scribbled_eventfd_number_is_not_written(make_domain, spawn):
    """The slot's eventfd number names a descriptor in the task's process. If
    the segment says 1 (the task's stdout), a sender must not write its 8
    bytes there: it checks that what it obtained is an eventfd, and falls
    back to asking the task itself, so the RESUME still wakes the task."""
    from shm_taskwork import TWA_RESUME
    dom = make_domain("efd", pool_size=16)
    task = spawn(TASK, dom.name, "60", stdin=subprocess.PIPE)
    tid = int(_readline(task, 30).split()[1])
    dom._slot(tid).efd = 1  # scribbled: the task's stdout
    task.stdin.write("wait\n")
    task.stdin.flush()
    assert _readline(task, 30) == "waiting\n"
    _send(dom, tid, TWA_RESUME, "resume")
    # well before the task's wait() would time out (60 s)
    lines = [_readline(task, 20), _readline(task, 20)]
    assert lines == ["ran resume\n", "woke 1\n"], lines


def test_scribbled_signal_number_is_not_sent(make_domain, spawn):
    """The slot's signal number is what a sender sends. If the segment says
    SIGTERM for a task that handles only SIGUSR1, sending it would kill the
    (verified) task: a sender sends only a signal the task handles or blocks.
    The work itself is queued and runs: signalled with the signal the task's
    own fd server names (README "Security"), or at the task's next run()."""
    import signal
    from shm_taskwork import TWA_SIGNAL
    dom = make_domain("signum", pool_size=16)
    task = spawn(TASK, dom.name, "15", stdin=subprocess.PIPE)
    tid = int(_readline(task, 30).split()[1])
    dom._slot(tid).signum = int(signal.SIGTERM)  # scribbled
    _send(dom, tid, TWA_SIGNAL, "signal")
    task.stdin.write("ping\n")
    task.stdin.flush()
    lines = [_readline(task, 30)]
    if lines[0] == "ran signal\n":                     # its own SIGUSR1 ran it
        lines.append(_readline(task, 30))
    assert lines[-1] == "pong\n", f"the task died: {task.poll()}"
    task.stdin.write("run\n")
    task.stdin.flush()
    if len(lines) == 2:
        assert _readline(task, 30) == "done 0\n"       # ran once, not again
    else:
        assert [_readline(task, 30), _readline(task, 30)] == ["ran signal\n", "done 1\n"]


# ---------------------------------------------------------------------------
# damage while the operations run: a value may change between two reads

STORM_OPS = r"""
import logging, sys, time
logging.getLogger("shm_taskwork").setLevel(logging.CRITICAL)
from shm_taskwork import Domain, TaskWorkError, TWA_NONE, TWA_RESUME, TWA_SIGNAL, callback
dom = Domain.open(sys.argv[1])
dom.d.lock_timeout_ns = 20_000_000   # this process's deadline, kept short

@callback(name="storm.rec")
def rec(work):
    pass

t = dom.register("storm")
ops = [lambda: t.add_many("storm.rec", [b"x"] * 6, TWA_NONE),   # often runs the pool dry
       lambda: t.add("storm.rec", b"y", TWA_RESUME)]
more = [lambda: t.run(), lambda: t.cancel(t.add("storm.rec", b"c", TWA_NONE)),
        lambda: t.add("storm.rec", b"z", TWA_SIGNAL), lambda: t.cancel_func("storm.rec"),
        lambda: t.pending(), lambda: t.cancel_match(lambda w: True)]
slow = [lambda: dom.tasks(), lambda: dom.stats(), lambda: dom.dead_letters(),
        lambda: dom.fsck(), lambda: dom.fsck(repair=True)]
print("ready", flush=True)
sys.stdin.readline()
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    try:
        ops[n % 2]()
        if n % 6 == 5:
            more[n // 6 % len(more)]()
        if n % 100 == 99:
            slow[n // 100 % len(slow)]()
    except TaskWorkError:
        pass
    n += 1
print("survived", n, flush=True)
"""

STORM_SCRIBBLER = r"""
import mmap, random, sys, time
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
d = dom.d
rnd = random.Random(int(sys.argv[3]))
values = [lambda: rnd.randrange(1 << 32), lambda: rnd.randrange(d.pool_size),
          lambda: d.pool_size + rnd.randrange(100), lambda: 0xFFFFFFFE]
with open("/dev/shm" + dom.name, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
    print("ready", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + float(sys.argv[2])
    k = 0
    while time.monotonic() < end:
        # The link of any node: free (a pop reads it), being filled by an
        # add (its chain), queued, detached (a walk follows it) - between the
        # moment its user last read it and the moment it uses it.
        at = d.nodes_off + rnd.randrange(d.pool_size) * d.node_size + 8
        m[at:at + 4] = rnd.choice(values)().to_bytes(4, "little")
        k += 1
print("scribbled", k, flush=True)
"""


@pytest.mark.parametrize("seed_", [SEED, SEED + 1])
def test_scribbling_while_operating(make_domain, seed_):
    """One process keeps calling the operations on its task while another
    keeps writing garbage into the links, heads, states and intents of the
    same segment. The first must survive: every check in the core holds
    against a value that changes between two reads.

    The robust mutexes are left out here: glibc keeps a held robust mutex on
    the owner's robust list through pointers stored inside the mutex, so
    garbage written over a mutex *while it is held* can crash the holder in
    pthread_mutex_unlock; no library can check that. The static rounds above
    do scribble over mutexes that are not held."""
    dom = make_domain("storm", pool_size=8, max_tasks=2)
    seconds = "2.0"
    ops = python_script(STORM_OPS, dom.name, seconds, stdin=subprocess.PIPE)
    scr = python_script(STORM_SCRIBBLER, dom.name, seconds, str(seed_), stdin=subprocess.PIPE)
    try:
        for p in (ops, scr):
            assert _readline(p, 30) == "ready\n", p.stderr.read()
        for p in (ops, scr):
            p.stdin.write("go\n")
            p.stdin.flush()
        out, err = ops.communicate(timeout=60)
        assert ops.returncode == 0, f"the operating process died ({ops.returncode}):\n{err[-3000:]}"
        assert out.startswith("survived")
        scr.communicate(timeout=60)
        assert scr.returncode == 0
    finally:
        for p in (ops, scr):
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)


@pytest.mark.asan
def test_scribbled_mutex_type_is_refused(worker, victim):
    """glibc keeps a mutex's type inside the mutex - in the segment. Garbage
    there can select the priority-protect code path with a ceiling glibc never
    expects, where it assert()s and aborts the process. A lock whose type is
    not the robust, process-shared one the domain was made with is refused
    (DomainCorruptError) instead of taken. Here: slot 0's pi_lock and the
    header's locks get such a type, then every operation runs."""
    from shm_taskwork._native import ffi
    kind_off = 16  # glibc's struct __pthread_mutex_s: __lock, __count, __owner, __nusers, __kind
    prio_protect = 0x40 | 0x80 | (0xFFF << 19)  # PRIO_PROTECT | PSHARED | ceiling 4095
    slot_kind = (ffi.offsetof("struct tw_slot", "pi_lock") + kind_off) // 4
    writes = [["slots", 0, slot_kind, "u32", prio_protect]]
    for lock in ("dl_lock", "fsck_lock"):
        writes.append(["header", 0, (ffi.offsetof("struct tw_header", lock) + kind_off) // 4,
                       "u32", prio_protect])
    for k, w in enumerate([writes[:1], writes[1:2], writes[2:], writes]):
        res = worker.run({"name": unique_name("kind"), "writes": w, "later": [], "forge": [],
                          "origin": False, "pool": 24, "rnd": k})
        assert not res["bad"], res["bad"]
        assert res["outcomes"].get("DomainCorruptError", 0) > 0, res["outcomes"]
    assert_alive(victim)
