"""docs/contract.md "Lifecycle without an operator": lifecycle without an operator.

Processes start together, die (SIGKILL, SIGTERM with its default action, a
crash) and are replaced; nobody runs fsck. Every test here uses real,
unrelated processes (subprocess) and real signals, and checks what the
contract promises: death is seen from the segment, the first add after it
raises, whoever notices reaps, each work lands once, slots are reused, names
route to live tasks, exit signals run the pending works, critical sections
keep signal works out, and fsck beside processes paused at any step of any
operation harms nothing.
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import python_script, readline, unique_name, wait_until
from shm_taskwork import (TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI, Domain,
                          DomainCorruptError, NoSuchTaskError, TaskExitedError, callback)
from shm_taskwork._native import lib

TIMEOUT = 30.0
MODES = (TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI)

RAN: list[bytes] = []


@callback(name="life.rec")
def _rec(work):
    RAN.append(work.payload)


@pytest.fixture
def task(domain):
    t = domain.register("life-task", install_handler=False)
    yield t
    if t.is_current:
        t.exit()


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()
    yield


# A task process: registers under argv[2], prints "ready ID", then obeys
# lines on stdin. Every work it runs is printed as "ran PAYLOAD".
TASK = r"""
import os, signal, sys, time
from shm_taskwork import Domain, callback

RAN = []

@callback(name="life.rec")
def rec(work):
    RAN.append(work.payload)
    print("ran", work.payload.decode(), flush=True)

@callback(name="life.slow")
def slow(work):
    print("slow", work.payload.decode(), flush=True)
    time.sleep(0.2)

dom = Domain.open(sys.argv[1])
exits = (signal.SIGTERM,) if "exit-signals" in sys.argv[3:] else ()
t = dom.register(sys.argv[2], exit_signals=exits)
print("ready", t.id, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "run":
        print("done", t.run(), flush=True)
    elif cmd[0] == "wait":
        print("waited", t.wait(float(cmd[1])), flush=True)
    elif cmd[0] == "abort":
        os.abort()
    elif cmd[0] == "critical":
        # hold a critical section while TWA_SIGNAL works arrive; report
        # what ran inside it, then what ran when it ended
        import threading
        lock = threading.Lock()
        with t.critical():
            with t.critical():          # nested
                print("inside", flush=True)
                sys.stdin.readline()    # the test adds signal works now
                time.sleep(0.05)        # let a stray handler run if it would
                print("still-inside", flush=True)
            print("outer", flush=True)
        print("left", flush=True)
    elif cmd[0] == "spin":
        # a busy main thread (signal handlers run between its bytecodes), until
        # a work has run or the deadline passes
        end, seen = time.monotonic() + float(cmd[1]), len(RAN)
        print("spinning", flush=True)
        while time.monotonic() < end and len(RAN) == seen:
            pass
        print("spun", flush=True)
    elif cmd[0] == "quit":
        break
dom.close()
print("bye", flush=True)
"""


class Proc:
    """A task process with a line protocol. A thread reads its stdout (text
    buffered by Python could hide lines from select), so every read has a
    deadline."""

    def __init__(self, spawn, dom, name, *flags, env=None):
        self.p = spawn(TASK, dom.name, name, *flags, stdin=subprocess.PIPE, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.ran: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.expect("ready")
        self.id = int(line.split()[1])

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    @property
    def pid(self):
        return self.p.pid

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def expect(self, prefix: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"pid {self.pid}: no line starting {prefix!r} within "
                                     f"{TIMEOUT}s (returncode {self.p.poll()})") from None
            if line.startswith("ran "):
                self.ran.append(line.split()[1])
            if line.startswith(prefix):
                return line

    def finish(self) -> int:
        self.p.wait(timeout=TIMEOUT)
        self._reader.join(TIMEOUT)
        while not self.lines.empty():
            line = self.lines.get()
            if line.startswith("ran "):
                self.ran.append(line.split()[1])
        return self.p.returncode


def _kill(proc: Proc, sig=signal.SIGKILL) -> None:
    os.kill(proc.pid, sig)
    proc.p.wait(timeout=TIMEOUT)


# ---- 1. start together ------------------------------------------------------

OPENER = r"""
import json, os, sys, time
from shm_taskwork import Domain
name, go = sys.argv[1], float(sys.argv[2])
while time.time() < go:          # all start at the same instant
    pass
try:
    dom = Domain.open_or_create(name, pool_size=int(sys.argv[3]), max_tasks=8)
    out = {"created": dom.created, "pool": dom.pool_size}
    t = dom.register(f"w{os.getpid()}", install_handler=False)
    out["task"] = t.id
    t.exit()
    dom.close()
except Exception as exc:
    out = {"error": repr(exc)}
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("pool_size", [64, 65536])
def test_open_or_create_by_many_at_once(pool_size):
    """Four unrelated processes call open_or_create at the same instant, ten
    rounds: exactly one creates, every other opens the formatted segment, no
    one sees a half-made one or gets an error."""
    for _ in range(10):
        name = unique_name("race")
        go = time.time() + 0.3
        procs = [python_script(OPENER, name, repr(go), str(pool_size)) for _ in range(4)]
        try:
            outs = [json.loads(p.communicate(timeout=TIMEOUT)[0]) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            try:
                Domain.open(name).unlink()
            except FileNotFoundError:
                pass
        assert all("error" not in o for o in outs), outs
        assert sum(o["created"] for o in outs) == 1, outs
        assert all(o["pool"] == pool_size for o in outs)
        assert all(isinstance(o["task"], int) for o in outs)   # and each could register
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(".shm_taskwork-new.")
                and n.split(".")[2] == str(os.getpid())]


def test_a_creator_killed_half_way_leaves_no_domain(tmp_path):
    """The segment gets its name only once it is whole: a creator killed
    while formatting leaves no domain (and its temporary is swept)."""
    name = unique_name("halfmade")
    p = python_script(r"""
import sys
from shm_taskwork import Domain, _native
orig = _native.lib.tw_format
print("formatting", flush=True)
import os, signal
os.kill(os.getpid(), signal.SIGSTOP)
Domain.create(sys.argv[1], pool_size=1 << 20)
""", name)
    try:
        assert readline(p, TIMEOUT) == "formatting"
        wait_until(lambda: open(f"/proc/{p.pid}/stat").read().split()[2] == "T",
                   what="the creator to stop")
        os.kill(p.pid, signal.SIGCONT)
        # kill it while it formats 1M nodes: the temporary exists, the name not
        wait_until(lambda: any(n.startswith(f".shm_taskwork-new.{p.pid}.")
                               for n in os.listdir("/dev/shm")), timeout=TIMEOUT,
                   what="the temporary segment")
        assert not os.path.exists("/dev/shm" + name)
        p.kill()
        p.wait(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=TIMEOUT)
    with pytest.raises(FileNotFoundError):
        Domain.open(name)
    with Domain.open_or_create(name, pool_size=16) as dom:   # sweeps the temporary
        dom.unlink()
    assert not any(n.startswith(f".shm_taskwork-new.{p.pid}.") for n in os.listdir("/dev/shm"))


@pytest.mark.asan
# ---- 2. death is seen in shared memory; adds raise in every mode -------------

@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "abort"])
def test_death_is_seen_from_the_segment_and_every_add_raises(make_domain, spawn, how):
    """However the process dies (SIGKILL; SIGTERM with its default action; a
    crash), the slot reads dead from shared memory alone, and from the first
    add after the death every add raises TaskExitedError, TWA_NONE included;
    the works it held become orphaned dead letters, each once."""
    dom = make_domain("death")
    w = Proc(spawn, dom, "worker")
    h = dom.task(w.id)
    for i in range(3):
        h.add(_rec, f"p{i}".encode(), TWA_NONE)
    if how == "abort":
        w.send("abort")
        assert w.finish() == -signal.SIGABRT
    else:
        _kill(w, getattr(signal, how))
    assert lib.tw_slot_dead(dom.d, w.id) == 1          # read from the segment
    for mode in MODES:
        with pytest.raises(TaskExitedError) as ei:
            h.add(_rec, b"late", mode)
        assert ei.value.errno == errno.ESRCH
    with pytest.raises(TaskExitedError):
        h.add_many(_rec, [b"a", b"b"], TWA_RESUME)
    dl = dom.dead_letters()
    assert sorted(x.payload for x in dl) == [b"p0", b"p1", b"p2"]
    assert {(x.reason, x.target_name) for x in dl} == {("orphaned", "worker")}
    info = dom.tasks(name="worker")[0]
    assert (info.state, info.orphaned, info.pending) == ("reaped", 3, 0)
    st = dom.stats()
    assert st.pool_used == 3 and st.dead_letters == 3     # no node leaked by the adds


REAPERS = r"""
import sys
from shm_taskwork import Domain, TaskExitedError, TWA_RESUME
dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
print("up", flush=True)
sys.stdin.readline()
try:
    t.add("life.rec", b"x", TWA_RESUME)
    print("added", flush=True)
except TaskExitedError:
    print("refused", flush=True)
dom.close()
"""


@pytest.mark.asan
def test_many_processes_race_to_reap_each_work_lands_once(make_domain, spawn):
    """Six processes notice the same death at once (each adds): all are
    refused, and the 40 works the task held are filed exactly once."""
    dom = make_domain("race", pool_size=256)
    w = Proc(spawn, dom, "victim")
    h = dom.task(w.id)
    h.add_many(_rec, [f"w{i}".encode() for i in range(40)], TWA_NONE)
    _kill(w)
    racers = [spawn(REAPERS, dom.name, str(w.id), stdin=subprocess.PIPE) for _ in range(6)]
    for r in racers:
        assert readline(r, TIMEOUT) == "up"
    for r in racers:
        r.stdin.write("go\n")
        r.stdin.flush()
    assert [readline(r, TIMEOUT) for r in racers] == ["refused"] * 6
    payloads = collections.Counter(x.payload for x in dom.dead_letters())
    assert len(payloads) == 40 and set(payloads.values()) == {1}
    info = dom.tasks(name="victim")[0]
    assert info.orphaned == 40 and dom.stats().pool_used == 40


# ---- 3. reaping reports interrupted works; dead letters are a queue ----------

def test_interrupted_work_is_reported_never_rerun(make_domain, spawn, caplog):
    """A task killed inside a callback: that work is reported interrupted (a
    log record with the Work) and given back, never run again; the works it
    had not started are orphaned dead letters."""
    dom = make_domain("intr")
    w = Proc(spawn, dom, "worker", env={"SHM_TASKWORK_KILLPOINT": "in_callback:2"})
    h = dom.task(w.id)
    for i in range(4):
        h.add(_rec, f"i{i}".encode(), TWA_NONE)
    w.send("run")
    assert w.finish() == -signal.SIGKILL
    assert w.ran == ["i3"]                              # newest first; killed in the 2nd
    with caplog.at_level(logging.WARNING, logger="shm_taskwork.reap"):
        with pytest.raises(NoSuchTaskError):
            dom.task(name="worker")                     # notices, reaps, finds no live one
    [rec] = [r for r in caplog.records if hasattr(r, "work")]
    assert rec.work.payload == b"i2" and rec.work.state == "interrupted"
    assert sorted(x.payload for x in dom.dead_letters(reason="orphaned")) == [b"i0", b"i1"]
    info = dom.tasks(name="worker")[0]
    assert (info.interrupted, info.orphaned, info.run) == (1, 2, 1)
    assert dom.stats().pool_used == 2


RETRIER = r"""
import sys
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
print("up", flush=True)
sys.stdin.readline()
print(dom.retry_dead_letters(), flush=True)
dom.close()
"""


@pytest.mark.asan
def test_replaced_worker_gets_its_dead_letters_exactly_once(make_domain, spawn):
    """A worker dies with works queued; a new process registers the same
    name; two processes retry the dead letters at once: each work is
    re-queued exactly once, to the live task of the original name."""
    dom = make_domain("replace", pool_size=128)
    old = Proc(spawn, dom, "worker")
    h = dom.task(name="worker")
    h.add_many(_rec, [f"r{i}".encode() for i in range(20)], TWA_NONE)
    _kill(old)
    assert dom.retry_dead_letters() == 0                # reaped, no live "worker" yet
    assert len(dom.dead_letters(reason="orphaned")) == 20
    new = Proc(spawn, dom, "worker")
    assert dom.task(name="worker").pid == new.pid
    retriers = [spawn(RETRIER, dom.name, stdin=subprocess.PIPE) for _ in range(2)]
    for r in retriers:
        assert readline(r, TIMEOUT) == "up"
    for r in retriers:
        r.stdin.write("go\n")
        r.stdin.flush()
    counts = [int(readline(r, TIMEOUT)) for r in retriers]
    assert sum(counts) == 20 and dom.dead_letters() == []
    new.send("run")
    assert new.expect("done") == "done 20"
    assert sorted(new.ran) == sorted(f"r{i}" for i in range(20))
    assert dom.tasks(name="worker")[-1].state == "running"


def test_retry_to_a_named_or_given_task_and_by_reason(domain, task):
    """retry(to=name|Task, reason=...) and drop(reason=...) act on the
    chosen dead letters only; a dead letter with no live target stays."""
    task.add("life.unknown", b"u", TWA_NONE)
    assert task.run() == 0                              # unknown here: a dead letter
    [u] = domain.dead_letters()
    assert (u.reason, u.target_name) == ("unknown_callback", task.name)
    assert domain.retry_dead_letters(reason="orphaned") == 0
    assert domain.retry_dead_letters(to="nobody-of-that-name") == 0
    assert domain.retry_dead_letters(to=task, reason="unknown_callback") == 1
    assert task.pending() == 1 and domain.dead_letters() == []
    assert task.run() == 0 and len(domain.dead_letters()) == 1   # still unknown
    assert domain.retry_dead_letters(to=task.name) == 1
    callback(name="life.unknown")(lambda w: RAN.append(b"now:" + w.payload))
    try:
        assert task.run() == 1 and RAN == [b"now:u"]
    finally:
        from shm_taskwork import callbacks
        callbacks.unregister("life.unknown")
    assert domain.stats().pool_free == domain.pool_size
    with pytest.raises(TypeError):
        domain.retry_dead_letters(to=3)


# ---- 4. slots are reused; names route to live tasks -------------------------

def test_slots_of_dead_tasks_are_reused_without_fsck(make_domain, spawn):
    """A domain with two slots survives ten generations of killed workers."""
    dom = make_domain("reuse", max_tasks=2)
    for gen in range(10):
        a, b = Proc(spawn, dom, "a"), Proc(spawn, dom, "b")
        assert {a.id, b.id} == {0, 1}
        _kill(a)
        _kill(b)
    assert [t.state for t in dom.tasks()] == ["reaped", "reaped"]
    mine = dom.register("me", install_handler=False)
    assert mine.id in (0, 1)
    mine.exit()


def test_task_by_name_is_a_live_one_with_fewest_pending(make_domain, spawn):
    dom = make_domain("names")
    ws = [Proc(spawn, dom, "pool") for _ in range(3)]
    dead = Proc(spawn, dom, "pool")
    dom.task(dead.id).add(_rec, b"d", TWA_NONE)
    _kill(dead)
    for k, w in enumerate(ws):
        for i in range(3 - k):              # 3, 2, 1 pending
            dom.task(w.id).add(_rec, b"x", TWA_NONE)
    t = dom.task(name="pool")
    assert t.id == ws[2].id                 # the one with 1 pending
    assert [i.state for i in dom.tasks(name="pool")].count("running") == 3
    assert len(dom.tasks(name="pool")) == 4 and dom.tasks(name="nobody") == []
    for w in ws:
        _kill(w)
    with pytest.raises(NoSuchTaskError, match="no live task"):
        dom.task(name="pool")


# ---- 5. exit signals: do_exit() -> exit_task_work() ---------------------------

def test_exit_signal_runs_the_pending_works_then_dies_of_it(make_domain, spawn):
    dom = make_domain("term")
    w = Proc(spawn, dom, "graceful", "exit-signals")
    h = dom.task(w.id)
    for i in range(5):
        h.add(_rec, f"g{i}".encode(), TWA_NONE)
    os.kill(w.pid, signal.SIGTERM)
    assert w.finish() == -signal.SIGTERM    # the status SIGTERM's default action gives
    assert sorted(w.ran) == [f"g{i}" for i in range(5)]
    [info] = dom.tasks(name="graceful")
    assert (info.state, info.run, info.orphaned) == ("exited", 5, 0)
    assert dom.dead_letters() == [] and dom.stats().pool_used == 0


def test_exit_signal_during_a_run_lets_the_run_finish(make_domain, spawn):
    """SIGTERM while a callback runs: the run goes on, the rest runs, then
    the process dies of SIGTERM - no work is cut in half or left behind."""
    dom = make_domain("termrun")
    w = Proc(spawn, dom, "graceful", "exit-signals")
    h = dom.task(w.id)
    h.add(_rec, b"after", TWA_NONE)
    h.add("life.slow", b"slow", TWA_NONE)   # newest: runs first, 0.2 s
    w.send("run")
    w.expect("slow")
    os.kill(w.pid, signal.SIGTERM)
    assert w.finish() == -signal.SIGTERM
    assert w.ran == ["after"]
    [info] = dom.tasks(name="graceful")
    assert (info.state, info.run, info.orphaned, info.interrupted) == ("exited", 2, 0, 0)


def test_without_exit_signals_sigterm_leaves_orphaned_dead_letters(make_domain, spawn):
    dom = make_domain("noterm")
    w = Proc(spawn, dom, "plain")
    dom.task(w.id).add(_rec, b"o", TWA_NONE)
    os.kill(w.pid, signal.SIGTERM)
    assert w.finish() == -signal.SIGTERM
    assert [(x.payload, x.reason) for x in dom.dead_letters()] == [(b"o", "orphaned")]


def test_exit_signals_are_checked(domain):
    for bad in ((signal.SIGKILL,), (signal.SIGCHLD,), (signal.SIGSEGV,), (signal.SIGUSR1,),
                ("TERM",)):
        with pytest.raises(ValueError, match="exit"):
            domain.register("x", exit_signals=bad)
    assert domain.current is None and domain.tasks() == []


# ---- 6. critical sections ---------------------------------------------------

def test_critical_keeps_signal_works_out_until_the_outermost_block_ends(make_domain, spawn):
    dom = make_domain("crit")
    w = Proc(spawn, dom, "crit")
    h = dom.task(w.id)
    w.send("critical")
    w.expect("inside")
    for i in range(3):
        h.add(_rec, f"c{i}".encode(), TWA_SIGNAL)
    w.send("")
    w.expect("still-inside")
    w.expect("outer")
    assert w.ran == []                       # nothing ran inside (nested) blocks
    w.expect("left")
    assert sorted(w.ran) == ["c0", "c1", "c2"]   # ran when the outermost block ended
    w.send("quit")
    assert w.finish() == 0


def test_without_critical_signal_works_run_in_a_busy_loop(make_domain, spawn):
    """The control for the test above: the same works, no critical block,
    run promptly from the handler while the main thread spins."""
    dom = make_domain("nocrit")
    w = Proc(spawn, dom, "busy")
    w.send("spin 20")
    w.expect("spinning")
    dom.task(w.id).add(_rec, b"s", TWA_SIGNAL)
    line = w.expect("ran")
    assert line == "ran s"
    w.expect("spun")
    w.send("quit")
    assert w.finish() == 0


# ---- 7. fsck beside processes paused at every step ---------------------------

# A process that does one operation of each kind on a task, with a kill
# point set to stop it (SIGSTOP) at the chosen step.
OPERATOR = r"""
import sys
from shm_taskwork import Domain, TWA_NONE, TWA_RESUME, callback
callback(name="life.rec")(lambda work: None)
dom = Domain.open(sys.argv[1])
op, tid = sys.argv[2], int(sys.argv[3])
if op == "register":
    t = dom.register("late-comer", install_handler=False)
    print("done", t.id, flush=True)
    sys.stdin.readline()
    t.exit()
elif op == "add":
    dom.task(tid).add("life.rec", b"paused-add", TWA_RESUME)
    print("done", flush=True)
elif op == "cancel":
    w = dom.task(tid).cancel_func("life.rec")
    print("done", w is not None and w.payload.decode(), flush=True)
elif op == "run":
    t = dom.register("runner", install_handler=False)
    print("registered", t.id, flush=True)
    sys.stdin.readline()
    n = t.run()
    print("done", n, flush=True)
    sys.stdin.readline()
    t.exit()
elif op == "reap":
    try:
        dom.task(tid).add("life.rec", b"x", TWA_NONE)
    except Exception as exc:
        print("done", type(exc).__name__, flush=True)
dom.close()
"""

POINTS = [  # (kill point, operation)
    ("in_claim", "add"), ("mid_pop", "add"), ("after_alloc", "add"), ("after_push", "add"),
    ("in_register", "register"), ("in_pi_lock", "cancel"), ("in_detach", "run"),
    ("after_detach", "run"), ("in_callback", "run"), ("in_reap", "reap"),
    ("in_dl_file", "reap"),
]


@pytest.mark.parametrize("point,op", POINTS, ids=[p for p, _ in POINTS])
def test_fsck_beside_a_process_paused_at_every_step(make_domain, spawn, point, op):
    """A process stops (SIGSTOP, via the kill point's ':stop' action) in the
    middle of an operation; fsck(repair=True) runs twice beside it and must
    judge nobody dead and change nothing it holds; then the process goes on
    and every work is accounted for once, the pool whole."""
    dom = make_domain("paused", pool_size=64)
    target = dom.register("target", install_handler=False)
    for i in range(3):
        target.add(_rec, f"t{i}".encode(), TWA_NONE)
    victim_dead = None
    if op == "reap":                      # a dead task for the paused one to reap
        d = Proc(spawn, dom, "doomed")
        dom._handle(d.id, dom._slot(d.id)).add(_rec, b"doomed-work", TWA_NONE)
        _kill(d)
        victim_dead = d.id
    tid = victim_dead if op == "reap" else target.id
    env = {"SHM_TASKWORK_KILLPOINT": f"{point}:stop"}
    p = spawn(OPERATOR, dom.name, op, str(tid), stdin=subprocess.PIPE, env=env)
    if op == "run":
        runner_id = int(readline(p, TIMEOUT).split()[1])
        runner = dom.task(runner_id)
        for i in range(3):
            runner.add(_rec, f"r{i}".encode(), TWA_NONE)
        p.stdin.write("go\n")
        p.stdin.flush()
    wait_until(lambda: open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
               timeout=TIMEOUT, what=f"the process to stop at {point}")
    try:
        for _ in range(2):
            rep = dom.fsck(repair=True)
            assert p.pid not in rep.dead_processes, rep
            assert rep.leaked == 0 and rep.settled == 0 and rep.problems == [], rep
            if op != "reap":
                assert rep.dead_tasks == [] and rep.orphaned == 0 and rep.interrupted == 0, rep
    finally:
        os.kill(p.pid, signal.SIGCONT)
    line = readline(p, TIMEOUT)
    assert line.startswith("done"), line
    p.stdin.write("go\n")
    p.stdin.flush()
    p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0
    # Everything accounted for: run what is queued, check the dead letters.
    ran_here = target.run()
    dl = dom.dead_letters()
    expected_pending = 3 + (1 if op == "add" else 0) - (1 if op == "cancel" else 0)
    assert ran_here == expected_pending, (ran_here, RAN)
    if op == "reap":
        assert [x.payload for x in dl] == [b"doomed-work"]
    else:
        assert dl == []
    final = dom.fsck(repair=True)
    assert final.problems == [] and final.leaked == 0, final
    dom.drop_dead_letters()
    target.exit()
    assert dom.stats().pool_free == dom.pool_size


@pytest.mark.asan
def test_a_runner_killed_mid_detach_leaves_works_no_one_can_cancel_twice(make_domain, spawn):
    """A runner stopped inside tw_detach (batch marked, not yet detached),
    then SIGKILLed while holding pi_lock: a canceller gets the lock
    (EOWNERDEAD) and finds the works taken by the run - not cancellable, no
    error - and the reaper files each of them once."""
    dom = make_domain("middetach")
    w = Proc(spawn, dom, "runner", env={"SHM_TASKWORK_KILLPOINT": "in_detach:stop"})
    h = dom.task(w.id)
    works = [h.add(_rec, f"m{i}".encode(), TWA_NONE) for i in range(3)]
    w.send("run")
    wait_until(lambda: open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
               timeout=TIMEOUT, what="the runner to stop inside detach")
    _kill(w)
    h2 = dom._handle(w.id, dom._slot(w.id))
    assert h2.cancel_func(_rec) is None and not h2.cancel(works[0])
    assert sorted(x.payload for x in dom.dead_letters()) == [b"m0", b"m1", b"m2"]
    assert dom.tasks(name="runner")[0].cancelled == 0


# ---- 8. a lock timeout loses nothing; no spurious EBUSY ----------------------

CANCEL_AND_STOP = r"""
import sys
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
dom.task(int(sys.argv[2])).cancel_func("life.never")
"""


def test_a_run_whose_lock_wait_times_out_leaves_its_works_queued(make_domain, spawn):
    """A canceller stopped inside pi_lock: the task's run() cannot get the
    lock within its deadline and raises, but detaches nothing; once the
    canceller goes on, the next run runs every work."""
    dom = make_domain("timeout")
    t = dom.register("t", install_handler=False)
    for i in range(3):
        t.add(_rec, f"q{i}".encode(), TWA_NONE)
    t.add("life.never", b"x", TWA_NONE)                       # what the canceller marks
    p = spawn(CANCEL_AND_STOP, dom.name, str(t.id), env={"SHM_TASKWORK_KILLPOINT": "in_pi_lock:stop"})
    wait_until(lambda: open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
               timeout=TIMEOUT, what="the canceller to stop inside pi_lock")
    try:
        with pytest.raises(DomainCorruptError, match="deadline"):
            t.run()
        assert RAN == []
        head = dom._slot(t.id).head & 0xFFFFFFFF
        assert head != lib.TW_NIL                                # still queued
    finally:
        os.kill(p.pid, signal.SIGCONT)
    p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0
    assert t.run() == 3 and sorted(RAN) == [b"q0", b"q1", b"q2"]
    t.exit()
    assert dom.stats().pool_free == dom.pool_size


DL_FILER = r"""
import sys
from shm_taskwork import Domain, TWA_NONE
dom = Domain.open(sys.argv[1])
t = dom.register("filer", install_handler=False)
t.add("life.nobody-knows", b"z", TWA_NONE)
t.run()          # files it as a dead letter: stops inside dl_lock
t.exit()
dom.close()
"""


def test_a_run_that_cannot_file_a_dead_letter_loses_nothing(make_domain, spawn, caplog):
    """Another process is stopped holding the dead-letter lock. Our run meets
    a work with an unknown callback and cannot file it within the deadline:
    the work stays ours (logged), nothing is lost or counted twice, and the
    next run files it."""
    dom = make_domain("dlstuck")
    p = spawn(DL_FILER, dom.name, env={"SHM_TASKWORK_KILLPOINT": "in_dl_file:stop"})
    wait_until(lambda: open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
               timeout=TIMEOUT, what="the filer to stop inside dl_lock")
    t = dom.register("t", install_handler=False)
    try:
        t.add("life.nobody-knows", b"mine", TWA_NONE)
        t.add(_rec, b"known", TWA_NONE)
        with caplog.at_level(logging.ERROR, logger="shm_taskwork"):
            assert t.run() == 1                      # the known one ran
        assert "finished at the next run" in caplog.text
        assert RAN == [b"known"] and t._unfinished
    finally:
        os.kill(p.pid, signal.SIGCONT)
    p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0
    assert t.run() == 0 and not t._unfinished        # filed now
    assert sorted(w.payload for w in dom.dead_letters()) == [b"mine", b"z"]
    [info] = dom.tasks(name="t")
    assert (info.unknown, info.run) == (1, 1)
    assert dom.drop_dead_letters() == 2
    t.exit()
    assert dom.stats().pool_free == dom.pool_size


def test_many_threads_adding_at_once_never_see_ebusy(domain, task):
    """More threads than a process has intent words add at the same time."""
    errors: list[BaseException] = []

    def adder(k):
        try:
            for i in range(200):
                w = task.add(_rec, b"", TWA_NONE)
                assert task.cancel(w) or True
        except BaseException as exc:      # reported below
            errors.append(exc)

    ths = [threading.Thread(target=adder, args=(k,)) for k in range(24)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=TIMEOUT)
    assert errors == []
    task.run()
    assert domain.stats().pool_free == domain.pool_size


# ---- 9. the process table heals too ----------------------------------------

ADDER = r"""
import os, sys
from shm_taskwork import Domain, TWA_NONE
dom = Domain.open(sys.argv[1])
dom.task(int(sys.argv[2])).add("life.rec", sys.argv[3].encode(), TWA_NONE)
print("added", flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.asan
def test_dead_adders_never_fill_the_process_table(make_domain, spawn):
    """With room for 3 processes, 12 adders in a row are SIGKILLed after
    adding: each new one reclaims a dead one's entry, no fsck needed."""
    dom = make_domain("procs", max_procs=3)
    t = dom.register("t", install_handler=False)
    for i in range(12):
        p = spawn(ADDER, dom.name, str(t.id), f"a{i}")
        assert readline(p, TIMEOUT) == "added"
        p.wait(timeout=TIMEOUT)
    assert t.run() == 12
    hdr = dom._d.base
    assert dom.fsck().problems == []
    t.exit()
    assert dom.stats().pool_free == dom.pool_size
