"""docs/contract.md "Faults: dead processes": nothing is lost when a process dies.

Every test here makes a real, unrelated process (started with subprocess)
die by SIGKILL at a chosen instruction - the native core's kill points,
switched on with SHM_TASKWORK_KILLPOINT=name[:n] - or kills it from outside,
then runs fsck in the test process and checks conservation: every work the
test knows to have been added was run once, cancelled once, or reported
orphaned / interrupted once; nothing was run twice; every node of the pool can
be allocated again; the pi_lock still works; live tasks were not touched.

Payloads are unique strings, so every work can be followed by name. A task
process reports each work it runs as a line ``ran PAYLOAD`` on stdout.
"""
from __future__ import annotations

import collections
import json
import mmap
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, unique_name, wait_until
from shm_taskwork import (TWA_NONE, TWA_RESUME, TWA_SIGNAL, Domain, PoolExhaustedError,
                          TaskExitedError, callback)
from shm_taskwork import _native
from shm_taskwork._native import lib

TIMEOUT = 20.0  # the most any single step may take before the test fails


@callback(name="faults.noop")
def _noop(work):
    pass

# ---------------------------------------------------------------------------
# child processes

PRELUDE = """
import os, sys, json
from shm_taskwork import Domain, callback, TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI

@callback(name="faults.record")
def record(work):
    sys.stdout.write("ran " + work.payload.decode() + "\\n")
    sys.stdout.flush()

@callback(name="faults.noop")
def noop(work):
    pass
"""

# A task process driven by commands on stdin: "run", "exit", "quit".
TASK = PRELUDE + """
dom = Domain.open(sys.argv[1])
t = dom.register(sys.argv[2])
print("ready", t.id, t.gen, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "run":
        n = t.run()
        print("done", n, flush=True)
    elif cmd[0] == "exit":
        t.exit()
        print("exited", flush=True)
    elif cmd[0] == "quit":
        break
dom.close()
print("bye", flush=True)
"""

# A producer that is not a task: adds works with payloads PREFIX-0, PREFIX-1,
# ... to task TASK_ID, announcing each before and after the add.
PRODUCER = """
import sys
from shm_taskwork import Domain, TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI
name, prefix = sys.argv[1], sys.argv[3]
task_id, count, many = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
modes = [TWA_RESUME, TWA_NONE, TWA_SIGNAL, TWA_SIGNAL_NO_IPI]
dom = Domain.open(name)
t = dom.task(task_id)
i = 0
while i < count:
    if many > 1:
        batch = [f"{prefix}-{k}" for k in range(i, min(count, i + many))]
        print("adding", *batch, flush=True)
        t.add_many("faults.record", [p.encode() for p in batch], TWA_RESUME)
        print("added", *batch, flush=True)
        i += len(batch)
    else:
        p = f"{prefix}-{i}"
        print("adding", p, flush=True)
        t.add("faults.record", p.encode(), modes[i % len(modes)])
        print("added", p, flush=True)
        i += 1
print("finished", flush=True)
dom.close()
"""

# A canceller: cancels the newest pending work of faults.record on a task.
CANCELLER = """
import sys
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
print("cancelling", flush=True)
w = t.cancel_func("faults.record")
print("cancelled", None if w is None else w.payload.decode(), flush=True)
dom.close()
"""


class Child:
    """An unrelated Python process with its stdout read by a thread, so every
    read has a deadline. ``ran`` collects the payloads its callbacks ran."""

    def __init__(self, spawn, body: str, *args: str, killpoint: str | None = None):
        env = {"SHM_TASKWORK_KILLPOINT": killpoint} if killpoint else {"SHM_TASKWORK_KILLPOINT": ""}
        self.proc = spawn(body, *args, env=env, stdin=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        self.ran: list[str] = []
        self.added: list[str] = []
        self.attempted: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            words = line.split()
            if not words:
                continue
            if words[0] == "ran":
                self.ran.append(words[1])
            elif words[0] == "adding":
                self.attempted.extend(words[1:])
            elif words[0] == "added":
                self.added.extend(words[1:])
            self.lines.put(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pid {self.pid}: no line starting {prefix!r} within "
                                     f"{timeout}s (returncode {self.proc.poll()}, stderr: "
                                     f"{self._stderr()})")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                ended = self.proc.poll() is not None and not self._reader.is_alive()
                if ended and self.lines.empty():
                    raise AssertionError(f"pid {self.pid} ended (returncode "
                                         f"{self.proc.returncode}) before printing {prefix!r}: "
                                         f"{self._stderr()}")
                continue
            if line.startswith(prefix):
                return line

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        try:
            return self.proc.stderr.read()[-2000:]
        except (OSError, ValueError):
            return "?"

    def wait_killed(self, timeout: float = TIMEOUT) -> None:
        """Wait until the process died of SIGKILL, and for its last output."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} did not die within {timeout}s") from None
        self._reader.join(timeout)
        assert rc == -9, f"pid {self.pid} ended with {rc}, not SIGKILL: {self._stderr()}"

    def wait_ok(self, timeout: float = TIMEOUT) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} did not finish within {timeout}s") from None
        self._reader.join(timeout)
        assert rc == 0, f"pid {self.pid} ended with {rc}: {self._stderr()}"

    def run_all(self) -> int:
        self.send("run")
        return int(self.expect("done").split()[1])


def start_task(spawn, dom, name: str, killpoint: str | None = None) -> tuple[Child, int]:
    c = Child(spawn, TASK, dom.name, name, killpoint=killpoint)
    tid = int(c.expect("ready").split()[1])
    return c, tid


def run_producer(spawn, dom, tid: int, prefix: str, count: int, *, many: int = 1,
                 killpoint: str | None = None) -> Child:
    return Child(spawn, PRODUCER, dom.name, str(tid), prefix, str(count), str(many),
                 killpoint=killpoint)


# ---------------------------------------------------------------------------
# checks


def payloads(works) -> list[str]:
    return [w.payload.decode() for w in works]


def assert_once(**groups: list[str]) -> collections.Counter:
    """No payload appears twice, within a group or across groups."""
    seen = collections.Counter()
    for items in groups.values():
        seen.update(items)
    twice = {p: n for p, n in seen.items() if n > 1}
    where = {p: [g for g, items in groups.items() if p in items] for p in twice}
    assert not twice, f"works accounted for more than once: {where}"
    return seen


def assert_pool_whole(dom: Domain) -> None:
    """No node is leaked: pool_free says so, and every single node of the pool
    can actually be allocated again (a node that is marked free but is on no
    free list would make the pool run dry early)."""
    # A runner frees a chunk's nodes after its callbacks return: a test that
    # saw a callback run may look a moment before the free.
    wait_until(lambda: dom.stats().pool_free == dom.pool_size, TIMEOUT,
               what="every node back in the pool")
    t = dom.current or dom.register("pool-check", install_handler=False)
    works = []
    for i in range(dom.pool_size):
        works.append(t.add("faults.noop", b"", TWA_NONE))
    with pytest.raises(PoolExhaustedError):
        t.add("faults.noop", b"", TWA_NONE)
    for w in reversed(works):  # newest first: each one is at the head
        assert t.cancel(w)
    assert dom.stats().pool_free == dom.pool_size


def assert_lock_works(handle) -> None:
    """Add and cancel through the task's pi_lock (a canceller must get it)."""
    w = handle.add("faults.noop", b"lock-probe", TWA_NONE)
    assert handle.cancel(w) is True
    assert handle.cancel(w) is False


def info(dom: Domain, tid: int):
    return next(t for t in dom.tasks() if t.id == tid)


# ---------------------------------------------------------------------------
# producers killed: after_alloc, mid_pop, after_push


@pytest.mark.parametrize("point,many", [pytest.param("after_alloc", 1, marks=pytest.mark.asan),
                                        ("after_alloc", 3),
                                        pytest.param("mid_pop", 1, marks=pytest.mark.asan),
                                        pytest.param("after_push", 1, marks=pytest.mark.asan),
                                        ("after_push", 3)])
def test_producer_killed(make_domain, spawn, point, many):
    """A producer dies at a kill point of its 4th add (or 2nd add_many of 3):
    what it added before runs once, the work it died adding either runs once
    (after_push: it was queued) or its node is reported leaked and reclaimed
    (after_alloc / mid_pop: never queued); the live task is untouched."""
    dom = make_domain("prod", pool_size=64)
    task, tid = start_task(spawn, dom, "victim-of-nothing")
    before = info(dom, tid)
    kp_n = 2 if many > 1 else 4
    prod = run_producer(spawn, dom, tid, "P", 12, many=many, killpoint=f"{point}:{kp_n}")
    prod.wait_killed()
    confirmed = list(prod.added)
    dying = [p for p in prod.attempted if p not in confirmed]
    assert len(confirmed) == (kp_n - 1) * many and len(dying) == many

    rep = dom.fsck(repair=True)
    assert rep.dead_tasks == [] and rep.orphaned == 0 and rep.interrupted == 0, rep
    assert rep.problems == [], rep
    # its process-table entry is found dead: holding a node, or (a signal
    # made the live task run its pushed node first) holding nothing
    assert rep.dead_processes in ([prod.pid], []) and \
        len(rep.dead_processes) + rep.idle_dead_entries == 1, rep
    assert rep.leaked == (0 if point == "after_push" else many), rep

    # The live task was not touched: same registration, still running, and
    # it runs everything that was queued.
    after = info(dom, tid)
    assert (after.pid, after.generation, after.state) == (before.pid, before.generation, "running")
    task.run_all()
    expected = confirmed + (dying if point == "after_push" else [])
    assert_once(ran=task.ran)
    assert sorted(task.ran) == sorted(expected)

    assert dom.fsck(repair=False).clean
    assert_lock_works(dom.task(tid))
    assert_pool_whole(dom)


# ---------------------------------------------------------------------------
# tasks killed: after_detach, in_callback


@pytest.mark.parametrize("point,ran_before,reaper", [
    pytest.param("after_detach", 0, "adder", marks=pytest.mark.asan),
    ("after_detach", 0, "fsck"),
    ("in_callback:1", 0, "adder"),
    pytest.param("in_callback:3", 2, "fsck", marks=pytest.mark.asan)])
def test_task_killed(make_domain, spawn, caplog, point, ran_before, reaper):
    """A task dies after detaching its list, or inside its n-th callback. Its
    death is in the segment at once: the first add after it raises
    TaskExitedError, in another process too, and whoever notices first (an
    adder, or fsck) reaps it: each work of the dead task is accounted for
    once - interrupted if its callback had started, an orphaned dead letter
    otherwise - the slot is reusable, old handles keep failing, and a live
    bystander task was not touched."""
    dom = make_domain("task", pool_size=64)
    task, tid = start_task(spawn, dom, "doomed", killpoint=point)
    bystander, bid = start_task(spawn, dom, "bystander")
    h, hb = dom.task(tid), dom.task(bid)
    batch = [f"T-{i}" for i in range(6)]
    for p in batch:
        h.add("faults.record", p.encode(), TWA_NONE)
    for i in range(3):
        hb.add("faults.record", f"B-{i}".encode(), TWA_NONE)
    gen_dead = h.gen

    task.send("run")
    task.wait_killed()
    assert len(task.ran) == ran_before
    assert dom._slot_state(tid, dom._slot(tid)) == "dead"   # seen before any reaping

    if reaper == "adder":
        # An unrelated process adds: its first add raises (and reaps).
        late = run_producer(spawn, dom, tid, "L", 4)
        late.expect("adding")
        assert late.proc.wait(timeout=TIMEOUT) != 0
        assert "TaskExitedError" in late.proc.stderr.read()
        assert late.added == []
        interrupted_count = info(dom, tid).interrupted
        orphaned = payloads(dom.dead_letters(reason="orphaned"))
        assert info(dom, tid).orphaned == len(orphaned)
    else:
        with caplog.at_level("WARNING", logger="shm_taskwork.reap"):
            rep = dom.fsck(repair=True)
        assert rep.dead_tasks == [tid], rep
        assert rep.problems == [] and rep.leaked == 0, rep
        orphaned, interrupted = payloads(rep.orphaned_works), payloads(rep.interrupted_works)
        assert rep.orphaned == len(orphaned) and rep.interrupted == len(interrupted)
        assert rep.orphaned_by_callback == ({"faults.record": rep.orphaned} if orphaned else {})
        reported = [r.work.payload.decode() for r in caplog.records if hasattr(r, "work")]
        assert reported == interrupted                    # one log record per work
        interrupted_count = len(interrupted)
        assert sorted(payloads(dom.dead_letters())) == sorted(orphaned)
        assert_once(ran=task.ran, orphaned=orphaned, interrupted=interrupted)
    assert interrupted_count == (0 if point == "after_detach" else 1)
    assert_once(ran=task.ran, orphaned=orphaned)
    assert len(task.ran) + len(orphaned) + interrupted_count == len(batch)
    assert {w.target_name for w in dom.dead_letters()} == {"doomed"}

    # Exited for good: adds fail, from this process and from another.
    with pytest.raises(TaskExitedError):
        h.add("faults.record", b"too-late", TWA_RESUME)
    again = run_producer(spawn, dom, tid, "X", 1)
    again.expect("adding")
    assert again.proc.wait(timeout=TIMEOUT) != 0
    assert "TaskExitedError" in again.proc.stderr.read()
    assert info(dom, tid).state == "reaped"

    # The bystander: still the same registration, its works all there.
    assert hb.pending() == 3
    assert bystander.run_all() == 3
    assert sorted(bystander.ran) == ["B-0", "B-1", "B-2"]
    assert_lock_works(hb)

    # fsck finds nothing more (at most the dead process's entry in the
    # process table, which nobody needed yet): each work was accounted for once.
    rep2 = dom.fsck(repair=True)
    assert (rep2.dead_tasks, rep2.orphaned, rep2.interrupted, rep2.leaked, rep2.problems) == \
        ([], 0, 0, 0, []), rep2
    assert set(rep2.dead_processes) <= {task.pid}
    assert dom.fsck().clean and rep2.dead_letters == len(orphaned)

    # The slot is reusable; the old handle keeps failing.
    heir = dom.register("heir", install_handler=False)
    assert heir.id == tid and heir.gen != gen_dead
    with pytest.raises(TaskExitedError):
        h.add("faults.record", b"stale-handle", TWA_NONE)
    assert h.pending() == 0
    assert dom.task(tid).gen == heir.gen
    w = heir.add("faults.noop", b"fresh", TWA_NONE)
    assert heir.pending() == 1 and not h.cancel(w)
    assert heir.run() == 1
    assert dom.drop_dead_letters(reason="orphaned") == len(orphaned)
    assert_pool_whole(dom)


# ---------------------------------------------------------------------------
# a canceller killed while it holds the task's pi_lock


@pytest.mark.parametrize("then", [pytest.param("run", marks=pytest.mark.asan), "cancel_same",
                                  "cancel_other"])
def test_canceller_killed_in_pi_lock(make_domain, spawn, then):
    """A canceller dies holding a live task's pi_lock, with the newest work
    marked CANCELLING and still linked. The robust mutex recovers: the next
    locker gets EOWNERDEAD and goes on. The work being cancelled is then
    either run once or cancelled once, never lost and never both."""
    dom = make_domain("pilock", pool_size=64)
    task, tid = start_task(spawn, dom, "locked")
    h = dom.task(tid)
    works = [h.add("faults.record", f"C-{i}".encode(), TWA_NONE) for i in range(5)]
    target = works[-1]  # cancel_func takes the newest pending match

    canceller = Child(spawn, CANCELLER, dom.name, str(tid), killpoint="in_pi_lock")
    canceller.expect("cancelling")
    canceller.wait_killed()
    slot = dom._slot(tid)
    assert slot.lock_recovered == 0  # nobody has taken the lock since

    rep = dom.fsck(repair=True)
    assert rep.dead_tasks == [] and rep.orphaned == 0 and rep.leaked == 0, rep
    assert rep.problems == [], rep
    assert rep.dead_processes == [] and rep.idle_dead_entries == 1   # it held no node

    cancelled = []
    if then == "cancel_same":
        assert h.cancel(target) is True
        cancelled.append("C-4")
        assert slot.lock_recovered == 1  # this process got EOWNERDEAD
    elif then == "cancel_other":
        assert h.cancel(works[1]) is True
        cancelled.append("C-1")
        assert slot.lock_recovered == 1

    n = task.run_all()
    assert slot.lock_recovered == 0  # the runner settled the dead canceller's mark
    assert n == 5 - len(cancelled)
    assert_once(ran=task.ran, cancelled=cancelled)
    assert sorted(task.ran + cancelled) == [f"C-{i}" for i in range(5)]
    assert info(dom, tid).cancelled == len(cancelled)

    assert dom.fsck(repair=True).clean
    assert_lock_works(h)
    # The lock is not poisoned for the task either: a SIGNAL add runs.
    h.add("faults.record", b"C-after", TWA_SIGNAL)
    wait_until(lambda: "C-after" in task.ran, TIMEOUT, what="C-after to run")
    assert_pool_whole(dom)


# ---------------------------------------------------------------------------
# a reused pid


def test_reused_pid_signals_no_one(make_domain, spawn):
    """A dead task's slot whose pid now names a live stranger (pid reuse):
    death is read from the slot's life lock, not from the pid, so the task
    is dead all the same; adds raise TaskExitedError in every mode and
    nothing signals the stranger that now has the pid."""
    dom = make_domain("reuse", pool_size=32)
    task, tid = start_task(spawn, dom, "original")
    h = dom.task(tid)
    for i in range(3):
        h.add("faults.record", f"R-{i}".encode(), TWA_NONE)
    task.proc.kill()
    task.wait_killed()

    # The stranger: a live process that would die of SIGUSR1 (default action)
    # and answers "pong" to every line, so we can prove it is still alive
    # after any signal that was sent to it would have been delivered.
    stranger = Child(spawn, "import sys\nprint('up', flush=True)\nfor l in sys.stdin:\n"
                            "    print('pong', flush=True)\n")
    stranger.expect("up")
    # Pid reuse cannot be arranged on demand, so it is simulated by writing
    # the stranger's pid into the dead registrant's slot directly in shared
    # memory: the slot now names a live pid.
    slot = dom._slot(tid)
    slot.pid = stranger.pid
    assert dom._slot_state(tid, slot) == "dead"

    # A fresh adder (no cached pidfd) asks for a signal: refused, no signal.
    for mode in (TWA_SIGNAL, TWA_RESUME, TWA_NONE):
        with pytest.raises(TaskExitedError):
            h.add("faults.record", b"S", mode)
    sig = run_producer(spawn, dom, tid, "S", 3)  # modes RESUME, NONE, SIGNAL
    sig.expect("adding")
    assert sig.proc.wait(timeout=TIMEOUT) != 0
    stranger.send("ping")
    stranger.expect("pong")
    assert stranger.proc.poll() is None

    assert sorted(payloads(dom.dead_letters(reason="orphaned"))) == ["R-0", "R-1", "R-2"]
    rep = dom.fsck(repair=True)
    assert rep.dead_tasks == [] and rep.orphaned == 0 and rep.problems == [], rep
    with pytest.raises(TaskExitedError):
        h.add("faults.record", b"R-late", TWA_SIGNAL)
    stranger.send("ping")
    stranger.expect("pong")
    assert stranger.proc.poll() is None
    assert dom.drop_dead_letters() == 3
    assert_pool_whole(dom)


# ---------------------------------------------------------------------------
# a read-only fsck changes nothing


def _segment_bytes(dom: Domain) -> bytes:
    with open("/dev/shm" + dom.name, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return bytes(m)


@pytest.mark.asan
def test_fsck_without_repair_changes_nothing(make_domain, spawn):
    """With every kind of finding present (a dead task with a detached batch
    and pending works, a node allocated by a dead producer, a node a dead
    producer was popping), fsck(repair=False) reports them and leaves every
    byte of the segment as it was; fsck(repair=True) then finds the same."""
    dom = make_domain("ro", pool_size=48)
    live, lid = start_task(spawn, dom, "live")
    doomed, did = start_task(spawn, dom, "doomed", killpoint="after_detach")
    hl, hd = dom.task(lid), dom.task(did)
    for i in range(3):
        hl.add("faults.record", f"L-{i}".encode(), TWA_NONE)
        hd.add("faults.record", f"D-{i}".encode(), TWA_NONE)
    doomed.send("run")
    doomed.wait_killed()
    p1 = run_producer(spawn, dom, lid, "A", 5, killpoint="after_alloc:2")
    p1.wait_killed()
    p2 = run_producer(spawn, dom, lid, "M", 5, killpoint="mid_pop:3")
    p2.wait_killed()

    before = _segment_bytes(dom)
    reports = [dom.fsck(repair=False) for _ in range(3)]
    assert _segment_bytes(dom) == before
    for rep in reports:
        assert not rep.repaired
        assert rep.dead_tasks == [did]
        assert rep.orphaned == 3
        assert sorted(payloads(rep.orphaned_works)) == ["D-0", "D-1", "D-2"]
        assert rep.leaked == 2
        assert {p1.pid, p2.pid} <= set(rep.dead_processes)
        assert rep.problems == []
    assert lib.tw_slot_dead(dom.d, did) == 1     # still unreaped

    fixed = dom.fsck(repair=True)
    assert fixed.repaired and _segment_bytes(dom) != before
    assert (fixed.dead_tasks, fixed.orphaned, fixed.leaked) == ([did], 3, 2)
    assert info(dom, did).state == "reaped"
    assert sorted(fixed.dead_processes) == sorted(reports[0].dead_processes)
    assert dom.fsck(repair=False).clean
    assert live.run_all() == 3 + 1 + 2  # L-*, A-0, M-0 M-1
    assert sorted(live.ran) == ["A-0", "L-0", "L-1", "L-2", "M-0", "M-1"]
    assert dom.drop_dead_letters() == 3
    assert_pool_whole(dom)


# ---------------------------------------------------------------------------
# fsck while a domain is busy


BUSY_PRODUCER = """
import json, sys, time
from shm_taskwork import (Domain, PoolExhaustedError, TWA_NONE, TWA_RESUME, TWA_SIGNAL,
                          TWA_SIGNAL_NO_IPI)
name, tid, prefix, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
modes = [TWA_RESUME, TWA_SIGNAL, TWA_NONE, TWA_SIGNAL_NO_IPI]
dom = Domain.open(name)
t = dom.task(tid)
print("up", flush=True)
sys.stdin.readline()  # go
added, cancelled = 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        w = t.add("faults.count", f"{prefix}-{added}".encode(), modes[added % 4])
    except PoolExhaustedError:
        time.sleep(0.0005)  # back-off while the task drains; not a synchronisation
        continue
    if added % 7 == 3 and t.cancel(w):
        cancelled.append(added)
    added += 1
dom.close()
print(json.dumps({"added": added, "cancelled": cancelled}), flush=True)
"""

BUSY_TASK = """
import sys
from shm_taskwork import Domain, callback
dom = Domain.open(sys.argv[1])
ran, stop = [], []

@callback(name="faults.count")
def count(work):
    ran.append(work.payload.decode())

@callback(name="faults.stop")
def halt(work):
    stop.append(1)

t = dom.register("busy")
print("ready", t.id, flush=True)
while not stop:
    t.wait(1.0)
t.exit()
with open(sys.argv[2], "w") as f:
    f.write("\\n".join(ran))
dom.close()
print("exited", len(ran), flush=True)
"""


def test_fsck_concurrent_with_live_processes(make_domain, spawn, tmp_path):
    """Two producers add (in every mode, cancelling some) and a task runs for
    about a second while the test runs fsck(repair=True) in a loop: fsck
    never takes a live process for dead, never reclaims a node in flight, and
    afterwards every work that was not cancelled ran exactly once."""
    dom = make_domain("busy", pool_size=2048, max_tasks=4)
    out = tmp_path / "ran.txt"
    task = Child(spawn, BUSY_TASK, dom.name, str(out))
    tid = int(task.expect("ready").split()[1])
    prods = [Child(spawn, BUSY_PRODUCER, dom.name, str(tid), f"P{k}", "1.0") for k in range(2)]
    for p in prods:
        p.expect("up")
    for p in prods:
        p.send("go")

    runs, busy_skips = 0, 0
    while any(p.proc.poll() is None for p in prods) or runs < 3:
        rep = dom.fsck(repair=True)
        runs += 1
        assert rep.dead_tasks == [] and rep.dead_processes == [], rep
        assert rep.orphaned == 0 and rep.interrupted == 0 and rep.leaked == 0, rep
        # The one thing a busy domain may cause: the free list moved during
        # every attempt to check it. That is a "could not check", not a finding.
        busy_skips += len([p for p in rep.problems if "never held still" in p])
        assert all("never held still" in p for p in rep.problems), rep.problems
        assert runs < 10000

    ledgers = []
    for p in prods:
        p.wait_ok()
        ledgers.append(json.loads(p.expect("{")))
    dom.task(tid).add("faults.stop", b"", TWA_RESUME)
    task.expect("exited")
    task.wait_ok()

    ran = out.read_text().split("\n")
    gone = [set(led["cancelled"]) for led in ledgers]
    expected = [f"P{k}-{i}" for k, led in enumerate(ledgers) for i in range(led["added"])
                if i not in gone[k]]
    counts = collections.Counter(ran)
    assert [p for p, n in counts.items() if n > 1] == []
    assert sorted(ran) == sorted(expected)
    assert sum(led["added"] for led in ledgers) > 500  # the domain really was busy
    assert runs >= 3 and busy_skips < runs
    final = dom.fsck(repair=True)
    assert final.clean, final
    assert dom.stats().pool_free == dom.pool_size


# ---------------------------------------------------------------------------
# the command line: create, destroy, fsck


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "shm_taskwork.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_fsck_json_and_repair(make_domain, spawn):
    dom = make_domain("cli", pool_size=32)
    task, tid = start_task(spawn, dom, "gone")
    h = dom.task(tid)
    for i in range(3):
        h.add("faults.record", f"J-{i}".encode(), TWA_NONE)
    task.proc.kill()
    task.wait_killed()

    r = cli("fsck", dom.name, "--json")
    assert r.returncode == 1, r.stderr  # found, not repaired
    rep = json.loads(r.stdout)
    for key in ("dead_tasks", "orphaned", "orphaned_by_callback", "interrupted", "leaked",
                "repaired", "problems", "dead_processes", "orphaned_works", "dead_letters"):
        assert key in rep
    assert rep["dead_tasks"] == [tid] and rep["orphaned"] == 3 and rep["repaired"] is False
    assert lib.tw_slot_dead(dom.d, tid) == 1  # nothing was changed: still unreaped

    r = cli("fsck", dom.name, "--repair", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["repaired"] is True and rep["dead_tasks"] == [tid] and rep["orphaned"] == 3
    assert rep["orphaned_by_callback"] == {"faults.record": 3}
    assert sorted(bytes.fromhex(w["payload"]).decode() for w in rep["orphaned_works"]) == \
        ["J-0", "J-1", "J-2"]
    assert lib.tw_slot_dead(dom.d, tid) == 0 and info(dom, tid).state == "reaped"
    with pytest.raises(TaskExitedError):
        h.add("faults.record", b"J-late")
    assert dom.drop_dead_letters() == 3

    r = cli("fsck", dom.name)
    assert r.returncode == 0 and "clean" in r.stdout, (r.stdout, r.stderr)
    assert dom.stats().pool_free == dom.pool_size


def test_cli_fsck_human_report(make_domain, spawn):
    dom = make_domain("human", pool_size=32)
    task, tid = start_task(spawn, dom, "gone")
    dom.task(tid).add("faults.record", b"H-0", TWA_NONE)
    task.proc.kill()
    task.wait_killed()
    r = cli("fsck", dom.name)
    assert r.returncode == 1
    assert "1 dead task" in r.stdout and "1 orphaned work" in r.stdout
    assert f"{tid} (gone, pid {task.pid})" in r.stdout
    assert "faults.record" in r.stdout and "repaired: no" in r.stdout
    r = cli("fsck", dom.name, "--repair")
    assert r.returncode == 0 and "repaired: yes" in r.stdout, r.stdout


def test_cli_create_and_destroy():
    name = unique_name("clicreate")
    try:
        r = cli("create", name, "--max-tasks", "5", "--pool-size", "40", "--payload-size", "64",
                "--max-procs", "9", "--mode", "0640", "--record-origin")
        assert r.returncode == 0, r.stderr
        assert os.stat("/dev/shm" + name).st_mode & 0o777 == 0o640
        with Domain.open(name) as dom:
            assert (dom.max_tasks, dom.pool_size, dom.payload_size, dom.max_procs,
                    dom.record_origin) == (5, 40, 64, 9, True)
        r = cli("create", name)
        assert r.returncode != 0 and "already exists" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

        r = cli("destroy", name)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists("/dev/shm" + name)
        r = cli("destroy", name)
        assert r.returncode != 0 and "no domain" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

        r = cli("create", name, "--pool-size", "0")
        assert r.returncode != 0 and "pool_size" in r.stderr and "Traceback" not in r.stderr
        assert not os.path.exists("/dev/shm" + name)
        r = cli("fsck", name)
        assert r.returncode != 0 and "no domain" in r.stderr and r.stdout == ""
    finally:
        if os.path.exists("/dev/shm" + name):
            os.unlink("/dev/shm" + name)


def test_cli_destroy_refuses_live_domain_and_foreign_segment(make_domain, spawn):
    dom = make_domain("refuse", pool_size=16)
    task, tid = start_task(spawn, dom, "alive")
    r = cli("destroy", dom.name)
    assert r.returncode != 0 and "live tasks" in r.stderr
    assert os.path.exists("/dev/shm" + dom.name)
    task.send("quit")
    task.expect("bye")
    task.wait_ok()
    r = cli("destroy", dom.name)
    assert r.returncode == 0, r.stderr

    foreign = unique_name("foreign")
    with open("/dev/shm" + foreign, "wb") as f:
        f.write(b"not a domain at all" * 10)
    try:
        r = cli("destroy", foreign)
        assert r.returncode != 0 and "force" in r.stderr
        assert os.path.exists("/dev/shm" + foreign)
        r = cli("destroy", foreign, "--force")
        assert r.returncode == 0 and not os.path.exists("/dev/shm" + foreign)
    finally:
        if os.path.exists("/dev/shm" + foreign):
            os.unlink("/dev/shm" + foreign)


@pytest.mark.parametrize("command", ["create", "destroy", "fsck"])
def test_cli_help(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: shm-taskwork {command}")
    if command == "fsck":
        assert "exit status" in r.stdout and "--repair" in r.stdout
