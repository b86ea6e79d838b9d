"""The contract (docs/contract.md "Callbacks and works", "Adding, running, cancelling"), bullet by bullet, and its API table.

Each test states the kernel behaviour it checks. Everything is real: the
segment, the eventfd, the robust pi_lock, and - where a second process is
essential - an unrelated Python process started with subprocess.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import posix_ipc
import psutil
import pytest

from shm_taskwork import (TWA_NONE, TWA_RESUME, TWA_SIGNAL_NO_IPI, TWAF_NO_ALLOC, Domain,
                          DomainStats, NotCurrentTaskError, NoSuchTaskError, TaskExitedError,
                          TaskInfo, Work, callback)
from shm_taskwork import callbacks
from shm_taskwork._native import N_CANCELLING, N_QUEUED, ffi, lib

from conftest import unique_name, wait_until

# What the callbacks saw, in order; CTX hands them the task under test.
LOG: list = []
CTX: dict = {}


@pytest.fixture(autouse=True)
def _clean_log():
    LOG.clear()
    CTX.clear()
    yield
    LOG.clear()
    CTX.clear()


@pytest.fixture
def task(domain):
    t = domain.register(name="sem")
    CTX["task"] = t
    yield t
    if t.is_current:
        t.exit()


@callback(name="test.sem.record")
def _record(work: Work) -> None:
    LOG.append(work.payload)


@callback(name="test.sem.work")
def _record_work(work: Work) -> None:
    LOG.append(work)


@callback(name="test.sem.other")
def _other(work: Work) -> None:
    LOG.append(b"other:" + work.payload)


@callback(name="test.sem.chain")
def _chain(work: Work) -> None:
    n = int(work.payload)
    LOG.append(n)
    if n < 3:
        CTX["task"].add(_chain, str(n + 1).encode(), TWA_NONE)


@callback(name="test.sem.nested")
def _nested(work: Work) -> None:
    t = CTX["task"]
    t.add(_record, b"added-inside", TWA_NONE)
    LOG.append(("nested run returned", t.run()))


@callback(name="test.sem.fail")
def _fail(work: Work) -> None:
    LOG.append(work.payload)
    raise ValueError(f"boom {work.payload.decode()}")


@callback(name="test.sem.pool_used")
def _pool_used(work: Work) -> None:
    LOG.append(CTX["domain"].stats().pool_used)


@callback(name="test.sem.cancel_sibling")
def _cancel_sibling(work: Work) -> None:
    t = CTX["task"]
    LOG.append(("self", t.cancel(CTX["self"])))
    LOG.append(("sibling", t.cancel(CTX["sibling"])))


@callback(name="test.sem.subtle_b")
def _subtle_b(work: Work) -> None:
    LOG.append(b"B ran")


@callback(name="test.sem.exiting_state")
def _exiting_state(work: Work) -> None:
    t = CTX["task"]
    LOG.append([i.state for i in CTX["domain"].tasks() if i.id == t.id][0])
    # Added while exiting, before the sentinel: still run by exit().
    t.add(_record, b"added during exit", TWA_NONE)


def _info(dom: Domain, task_id: int) -> TaskInfo:
    return next(i for i in dom.tasks() if i.id == task_id)


def _node_state(dom: Domain, node: int) -> int:
    o = ffi.new("uint64_t *")
    assert lib.tw_node_state(dom.d, node, o) == 0
    return (o[0] >> 24) & 0xFF


def _head_index(dom: Domain, task_id: int) -> int:
    return dom._slot(task_id).head & 0xFFFFFFFF


# ---- add --------------------------------------------------------------------

def test_add_returns_a_work_describing_the_queued_work(domain, task):
    before = time.monotonic_ns()
    w = task.add(_record, b"payload", TWA_NONE)
    assert isinstance(w, Work)
    assert w.func_name == "test.sem.record"
    assert w.payload == b"payload"
    assert w.sender_pid == os.getpid()
    assert w.target == task.id
    assert w.origin is None                     # the domain does not record origins
    assert before <= w.enqueued_ns <= time.monotonic_ns()
    assert isinstance(w.id, int) and w.node is not None
    assert task.pending() == 1
    # The callback receives the same work, timestamped with CLOCK_MONOTONIC.
    seen = task.add(_record_work, b"seen", TWA_NONE)
    assert task.run() == 2
    got = LOG[0]
    assert (got.func_name, got.payload, got.sender_pid, got.target, got.id) == (
        "test.sem.work", b"seen", os.getpid(), task.id, seen.id)
    assert got.enqueued_ns == seen.enqueued_ns
    assert got.origin is None
    assert LOG[1] == b"payload"


def test_work_ids_are_unique_per_add_even_when_nodes_are_reused(make_domain):
    dom = make_domain("ids", pool_size=2)
    t = dom.register()
    ids, nodes = set(), set()
    for _ in range(10):
        w1, w2 = t.add(_record, b"", TWA_NONE), t.add(_record, b"", TWA_NONE)
        ids.update((w1.id, w2.id))
        nodes.update((w1.node, w2.node))
        assert t.run() == 2
    assert len(ids) == 20                # every add a new id ...
    assert nodes == {0, 1}               # ... though only two nodes exist
    t.exit()


def test_any_process_may_add_registered_or_not(domain, task, spawn):
    child = spawn("""
        import sys
        from shm_taskwork import Domain, TWA_NONE
        dom = Domain.open(sys.argv[1])
        w = dom.task(int(sys.argv[2])).add("test.sem.work", b"from another process", TWA_NONE)
        print(w.id, flush=True)
        dom.close()
    """, domain.name, str(task.id))
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert task.run() == 1
    got = LOG[0]
    assert got.payload == b"from another process"
    assert got.sender_pid == child.pid
    assert got.id == int(out)


# ---- run: LIFO, batches, rounds, nesting -------------------------------------

def test_run_runs_newest_first(domain, task):
    for i in range(5):
        task.add(_record, bytes([i]), TWA_NONE)
    assert task.pending() == 5
    assert task.run() == 5
    assert LOG == [bytes([i]) for i in (4, 3, 2, 1, 0)]
    assert task.pending() == 0
    assert task.run() == 0


@pytest.mark.asan
def test_add_many_is_one_push_with_one_notification(domain, task):
    payloads = [b"first", b"second", b"third", b"fourth"]
    works = task.add_many(_record, payloads, TWA_RESUME)
    assert [w.payload for w in works] == payloads
    assert len({w.id for w in works}) == 4
    assert len({w.enqueued_ns for w in works}) == 1 and works[0].enqueued_ns > 0
    info = _info(domain, task.id)
    assert info.added == 4 and info.pending == 4
    assert info.resumes_sent == 1 and info.signals_sent == 0
    # The eventfd counter was written exactly once: it reads 1, then nothing.
    assert int.from_bytes(os.read(task.fileno(), 8), sys.byteorder) == 1
    with pytest.raises(BlockingIOError):
        os.read(task.fileno(), 8)
    # As if added one by one: the last payload is the newest and runs first.
    assert task.run() == 4
    assert LOG == payloads[::-1]
    assert domain.stats().pool_free == domain.pool_size


def test_works_added_by_callbacks_run_in_the_same_run(domain, task):
    task.add(_chain, b"0", TWA_NONE)
    assert task.run() == 4              # 0, then 1, 2, 3 each in a further round
    assert LOG == [0, 1, 2, 3]
    assert task.pending() == 0


def test_nested_run_does_not_nest_and_the_outer_run_picks_up(domain, task):
    task.add(_nested, b"", TWA_NONE)
    assert task.run() == 2              # the nested callback and the work it added
    assert LOG == [("nested run returned", 0), b"added-inside"]


def test_raising_callback_does_not_stop_the_run(domain, task, caplog):
    caplog.set_level(logging.ERROR, logger="shm_taskwork")
    task.add(_record, b"oldest", TWA_NONE)
    task.add(_fail, b"1", TWA_NONE)
    task.add(_record, b"middle", TWA_NONE)
    task.add(_fail, b"2", TWA_NONE)
    assert task.run() == 4
    assert LOG == [b"2", b"middle", b"1", b"oldest"]
    failures = [r for r in caplog.records if "test.sem.fail" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)
    assert "boom 1" in caplog.text and "boom 2" in caplog.text
    assert _info(domain, task.id).errors == 2
    # A work whose callback raised is kept: a "failed" dead letter with its
    # error (README "Workers in production"); nothing else is left over.
    letters = domain.dead_letters()
    assert sorted((w.payload, w.reason, w.error, w.attempt) for w in letters) == [
        (b"1", "failed", "ValueError: boom 1", 0), (b"2", "failed", "ValueError: boom 2", 0)]
    assert domain.stats().pool_free == domain.pool_size - 2


def test_run_raise_errors_raises_after_every_detached_work_ran(domain, task):
    task.add(_record, b"a", TWA_NONE)
    task.add(_fail, b"x", TWA_NONE)
    task.add(_record, b"b", TWA_NONE)
    task.add(_fail, b"y", TWA_NONE)
    with pytest.raises(ExceptionGroup) as ei:
        task.run(raise_errors=True)
    assert sorted(str(e) for e in ei.value.exceptions) == ["boom x", "boom y"]
    assert all(isinstance(e, ValueError) for e in ei.value.exceptions)
    assert LOG == [b"y", b"b", b"x", b"a"]          # all ran before the raise
    assert task.pending() == 0
    assert _info(domain, task.id).errors == 2
    # the two failed works are kept as "failed" letters, nothing else is left
    assert sorted(w.payload for w in domain.dead_letters(reason="failed")) == [b"x", b"y"]
    assert domain.stats().pool_free == domain.pool_size - 2


def test_each_node_returns_to_the_pool_after_its_callback(domain, task):
    CTX["domain"] = domain
    for _ in range(3):
        task.add(_pool_used, b"", TWA_NONE)
    assert domain.stats().pool_used == 3
    assert task.run() == 3
    # Inside each callback: its own running node plus the detached rest.
    assert LOG == [3, 2, 1]
    st = domain.stats()
    assert (st.pool_free, st.pool_used) == (domain.pool_size, 0)


# ---- cancel -----------------------------------------------------------------

def test_cancel_is_true_only_while_pending(domain, task):
    a = task.add(_record, b"a", TWA_NONE)
    b = task.add(_record, b"b", TWA_NONE)
    assert task.pending() == 2
    assert task.cancel(a) is True
    assert task.pending() == 1
    assert task.cancel(a) is False               # already removed
    assert task.run() == 1
    assert LOG == [b"b"]
    assert task.cancel(b) is False               # already ran
    info = _info(domain, task.id)
    assert (info.cancelled, info.run) == (1, 1)
    assert domain.stats().pool_free == domain.pool_size


@pytest.mark.asan
def test_cancel_never_hits_a_later_work_on_the_same_node(make_domain):
    dom = make_domain("reuse", pool_size=1)
    t = dom.register()
    a = t.add(_record, b"A", TWA_NONE)
    assert t.run() == 1
    b = t.add(_record, b"B", TWA_NONE)
    assert b.node == a.node and b.id != a.id     # the one node, a new generation
    assert t.cancel(a) is False
    assert t.pending() == 1
    assert t.run() == 1
    assert LOG == [b"A", b"B"]
    assert _info(dom, t.id).cancelled == 0
    assert dom.stats().pool_free == 1
    t.exit()


def test_cancel_of_a_work_for_another_task_or_domain_is_false(make_domain):
    d1, d2 = make_domain("c1"), make_domain("c2")
    t1, t2 = d1.register(), d2.register()
    w = t1.add(_record, b"w", TWA_NONE)
    assert t2.cancel(w) is False                 # same slot id and node, another domain
    assert (t1.pending(), t2.pending()) == (1, 0)
    with pytest.raises(TypeError):
        t1.cancel("not a work")
    assert t1.cancel(w) is True


def test_cancel_func_takes_the_most_recently_queued_match(domain, task):
    for p in (b"f1", b"g1", b"f2", b"g2", b"f3"):
        task.add(_record if p.startswith(b"f") else _other, p, TWA_NONE)
    got = task.cancel_func(_record)
    assert isinstance(got, Work) and got.payload == b"f3"
    assert task.cancel_func("test.sem.record").payload == b"f2"   # by name too
    assert task.cancel_func(_record).payload == b"f1"
    assert task.cancel_func(_record) is None
    assert task.run() == 2
    assert LOG == [b"other:g2", b"other:g1"]


def test_cancel_match_walks_newest_first(domain, task):
    for p in (b"x1", b"y1", b"x2", b"y2"):
        task.add(_record, p, TWA_NONE)
    seen = []

    def pred(w: Work) -> bool:
        seen.append(w.payload)
        return w.payload.startswith(b"x")

    got = task.cancel_match(pred)
    assert got.payload == b"x2" and got.func_name == "test.sem.record"
    assert seen == [b"y2", b"x2"]                 # newest first, stops at the match
    assert task.cancel_match(lambda w: w.payload == b"nope") is None
    assert task.run() == 3
    assert LOG == [b"y2", b"y1", b"x1"]


def test_work_whose_callback_started_cannot_be_cancelled(domain, task):
    # Once run() has detached the batch and passed pi_lock, neither the running
    # work nor its detached siblings are reachable by a canceller: both
    # cancels fail and the sibling still runs, exactly once.
    sibling = task.add(_record, b"sibling", TWA_NONE)
    me = task.add(_cancel_sibling, b"", TWA_NONE)
    CTX.update(self=me, sibling=sibling)
    assert task.run() == 2
    assert LOG == [("self", False), ("sibling", False), b"sibling"]
    assert _info(domain, task.id).cancelled == 0
    assert domain.stats().pool_free == domain.pool_size


# The kernel's subtle case, made deterministic. The canceller is an unrelated
# process whose kill point "in_pi_lock" (reached inside tw_cancel with pi_lock
# held, the matching node marked and its predecessor's link in hand) would
# SIGKILL it; a preloaded kill() turns that self-SIGKILL into a self-SIGSTOP,
# so the canceller parks at exactly that instruction. The runner then detaches
# the list (the head exchange needs no lock) and blocks on pi_lock; SIGCONT
# lets the canceller finish its compare-and-swap on the detached chain.
_STOP_SHIM = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
int kill(pid_t pid, int sig)
{
    if (sig == SIGKILL && pid == getpid())
        sig = SIGSTOP;
    return (int)syscall(SYS_kill, pid, sig);
}
"""

_CANCELLER = """
    import sys
    from shm_taskwork import Domain
    from shm_taskwork._native import lib
    dom = Domain.open(sys.argv[1])
    task = dom.task(int(sys.argv[2]))
    lib.tw_killpoint_set(lib.TW_KP_IN_PI_LOCK, 1)
    got = task.cancel_func("test.sem.subtle_b")
    lib.tw_killpoint_set(lib.TW_KP_NONE, 1)
    print(got.id if got is not None else "none", flush=True)
    dom.close()
"""


@pytest.fixture(scope="module")
def stop_shim(tmp_path_factory):
    d = tmp_path_factory.mktemp("shim")
    (d / "stop_shim.c").write_text(_STOP_SHIM)
    so = d / "stop_shim.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", str(so),
                    str(d / "stop_shim.c")], check=True, capture_output=True, timeout=120)
    return str(so)


def test_a_run_waits_for_a_canceller_inside_the_lock(make_domain, spawn, stop_shim):
    """The kernel synchronizes task_work_run() with task_work_cancel() through
    pi_lock. Here the run takes pi_lock before it detaches: with a canceller
    parked inside the lock, the run detaches nothing and runs nothing until
    the canceller is done, and then never sees the cancelled work."""
    dom = make_domain("subtle")
    t = dom.register(name="runner")
    t.add(_record, b"C", TWA_NONE)                  # oldest
    b = t.add(_subtle_b, b"B", TWA_NONE)            # the one to cancel: not at the head
    a = t.add(_record, b"A", TWA_NONE)              # newest: the head
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), stop_shim]))
    child = spawn(_CANCELLER, dom.name, str(t.id), env={"LD_PRELOAD": preload})
    proc = psutil.Process(child.pid)
    wait_until(lambda: child.poll() is not None or proc.status() == psutil.STATUS_STOPPED,
               what="the canceller to park inside tw_cancel")
    assert child.poll() is None, child.communicate(timeout=10)
    # The canceller holds pi_lock and has marked B; A still heads the list.
    assert _node_state(dom, b.node) == N_CANCELLING
    assert _head_index(dom, t.id) == a.node
    pi_word = ffi.cast("uint32_t *", ffi.addressof(dom._slot(t.id), "pi_lock"))

    result: dict = {}

    def runner():
        try:
            result["ran"] = t.run()
        except BaseException as exc:  # reported below
            result["error"] = exc

    th = threading.Thread(target=runner)
    th.start()
    try:
        # The runner blocks on pi_lock (the kernel sets FUTEX_WAITERS in the
        # lock word when a thread sleeps on it) with nothing detached or run.
        wait_until(lambda: pi_word[0] & 0x80000000, what="run() to wait for pi_lock")
        assert _head_index(dom, t.id) == a.node
        assert _node_state(dom, a.node) == N_QUEUED
        assert th.is_alive() and LOG == []
    finally:
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=30)
        th.join(timeout=30)
    assert not th.is_alive()
    assert child.returncode == 0, err
    assert "error" not in result, result
    assert int(out) == b.id                         # the cancel succeeded ...
    assert result["ran"] == 2                       # ... and the runner never saw B
    assert LOG == [b"A", b"C"]
    info = _info(dom, t.id)
    assert (info.run, info.cancelled, info.pending) == (2, 1, 0)
    assert dom.stats().pool_free == dom.pool_size
    assert dom._slot(t.id).lock_recovered == 0      # nobody died: no recovery path
    t.exit()


def test_concurrent_cancel_and_run_each_work_ran_xor_was_cancelled(make_domain, spawn):
    # The invariant under real contention between two processes: every work
    # added either ran or was cancelled, never both, never neither.
    dom = make_domain("race", pool_size=4096)
    t = dom.register(name="racer")
    child = spawn("""
        import sys
        from shm_taskwork import Domain, TWA_NONE
        dom = Domain.open(sys.argv[1])
        task = dom.task(int(sys.argv[2]))
        added, cancelled, recent = [], [], []
        for i in range(3000):
            w = task.add("test.sem.work", str(i).encode(), TWA_NONE)
            added.append(w.id)
            recent.append(w)
            if i % 2:                     # cancel an older one: often not the head
                victim = recent.pop(len(recent) // 2 if len(recent) > 2 else 0)
                if task.cancel(victim):
                    cancelled.append(victim.id)
        print(" ".join(map(str, added)), flush=True)
        print(" ".join(map(str, cancelled)), flush=True)
        dom.close()
    """, dom.name, str(t.id))
    while child.poll() is None:
        t.run()
    out, err = child.communicate(timeout=60)
    t.run()
    assert child.returncode == 0, err
    added_line, cancelled_line = (out.splitlines() + [""])[:2]
    added = [int(x) for x in added_line.split()]
    cancelled = [int(x) for x in cancelled_line.split()]
    ran = [w.id for w in LOG]
    assert len(added) == 3000 and len(set(added)) == 3000
    assert len(ran) == len(set(ran))                          # nothing ran twice
    assert len(cancelled) == len(set(cancelled))
    assert not set(ran) & set(cancelled)                      # never both
    assert set(ran) | set(cancelled) == set(added)            # never neither
    info = _info(dom, t.id)
    assert (info.run, info.cancelled) == (len(ran), len(cancelled))
    assert dom.stats().pool_free == dom.pool_size
    t.exit()


# ---- pending, checkpoint -------------------------------------------------------

def test_pending_is_a_snapshot(domain, task):
    assert task.pending() == 0
    works = [task.add(_record, b"", TWA_NONE) for _ in range(3)]
    assert task.pending() == 3
    task.cancel(works[1])
    assert task.pending() == 2
    task.run()
    assert task.pending() == 0


def test_checkpoint_runs_only_when_a_notify_flag_is_set(domain, task):
    task.add(_record, b"none", TWA_NONE)
    assert task.checkpoint() == 0                 # no flag: nothing runs
    assert task.pending() == 1 and LOG == []
    task.add(_record, b"no-ipi", TWA_SIGNAL_NO_IPI)
    assert task.checkpoint() == 2                 # the flag is set: the whole list runs
    assert LOG == [b"no-ipi", b"none"]
    assert task.checkpoint() == 0                 # the run cleared the flag
    task.add(_record, b"resume", TWA_RESUME)
    assert task.checkpoint() == 1
    assert LOG[-1] == b"resume"


# ---- exit -------------------------------------------------------------------

def test_exit_runs_until_empty_then_refuses_new_work(domain):
    t = domain.register(name="exiting")
    CTX.update(task=t, domain=domain)
    assert domain.current is t
    t.add(_record, b"queued before exit", TWA_NONE)
    t.add(_exiting_state, b"", TWA_NONE)
    assert _info(domain, t.id).state == "running"
    t.exit()
    # The batch newest first, then a further round for the work added meanwhile.
    assert LOG == ["exiting", b"queued before exit", b"added during exit"]
    assert _info(domain, t.id).state == "exited"
    before = domain.stats()
    for call in (lambda: t.add(_record, b"late", TWA_NONE),
                 lambda: t.add_many(_record, [b"l1", b"l2"], TWA_NONE)):
        with pytest.raises(TaskExitedError) as ei:
            call()
        assert ei.value.errno == errno.ESRCH
        assert isinstance(ei.value, ProcessLookupError)
    assert domain.stats() == before                # nothing queued, nothing leaked
    assert before.pool_free == domain.pool_size
    t.exit()                                       # idempotent
    assert not t.is_current and domain.current is None


def test_task_context_manager_exits(domain):
    with domain.register() as t:
        assert t.is_current
        t.add(_record, b"in with", TWA_NONE)
    assert LOG == [b"in with"]
    assert not t.is_current and domain.current is None
    with pytest.raises(TaskExitedError):
        t.add(_record, b"", TWA_NONE)


def test_stale_handle_keeps_failing_after_its_slot_is_reused(domain):
    old = domain.register(name="first")
    other_handle = domain.task(old.id)             # a second handle to the same registration
    old.exit()
    new = domain.register(name="second")
    assert new.id == old.id and new.gen != old.gen   # the slot was reused
    for h in (old, other_handle):
        with pytest.raises(TaskExitedError):
            h.add(_record, b"stale", TWA_NONE)
        assert h.pending() == 0
    w = new.add(_record, b"fresh", TWA_NONE)
    assert other_handle.cancel(w) is False         # a stale handle cannot touch the new list
    assert domain.task(new.id) == new
    assert new.run() == 1 and LOG == [b"fresh"]
    new.exit()


# ---- other processes' tasks, lookup ---------------------------------------------

_TASK_CHILD = """
    import sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    t = dom.register(name=sys.argv[2])
    print(t.id, flush=True)
    sys.stdin.readline()
    t.exit()
    dom.close()
"""


def test_another_process_task_lookup_and_not_current(domain, task, spawn):
    child = spawn(_TASK_CHILD, domain.name, "the-child", stdin=subprocess.PIPE)
    child_id = int(child.stdout.readline())
    by_pid = domain.task(pid=child.pid)
    by_name = domain.task(name="the-child")
    by_id = domain.task(child_id)
    assert by_pid == by_name == by_id
    assert (by_pid.id, by_pid.pid, by_pid.name) == (child_id, child.pid, "the-child")
    assert not by_pid.is_current
    assert domain.task(task.id) == task and domain.task(pid=os.getpid()) == task
    assert domain.current is task
    for op in (by_pid.run, by_pid.checkpoint, lambda: by_pid.wait(0), by_pid.fileno,
               by_pid.exit):
        with pytest.raises(NotCurrentTaskError) as ei:
            op()
        assert str(child.pid) in str(ei.value)
    with pytest.raises(NoSuchTaskError):
        domain.task(pid=1 if child.pid != 1 else 2)
    with pytest.raises(NoSuchTaskError):
        domain.task(name="nobody")
    with pytest.raises(NoSuchTaskError):
        domain.task(domain.max_tasks)
    child.stdin.write("exit\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert _info(domain, child_id).state == "exited"
    with pytest.raises(NoSuchTaskError):
        domain.task(name="the-child")


def test_a_looked_up_handle_to_the_own_task_is_the_own_task(domain, task):
    from shm_taskwork import TWA_NMI_CURRENT
    for h in (domain.task(task.id), domain.task(pid=os.getpid()), domain.task(name="sem")):
        assert h == task and h.is_current
        h.add(_record, b"nmi", TWA_NMI_CURRENT)   # own task: allowed
        assert h.run() == 1
    assert LOG == [b"nmi"] * 3


def test_taskinfo_and_domainstats_fields_and_states(domain, spawn):
    info_fields = {"id", "pid", "name", "state", "registered_ns", "added", "run",
                   "cancelled", "orphaned", "errors", "unknown", "signals_sent",
                   "resumes_sent", "pending", "max_pending"}
    stats_fields = {"pool_size", "pool_free", "pool_used", "tasks", "dead_letters", "added",
                    "run", "cancelled", "orphaned", "errors", "unknown", "signals_sent",
                    "resumes_sent", "pending", "max_pending"}
    st = domain.stats()
    assert isinstance(st, DomainStats) and stats_fields <= set(st.as_dict())
    assert (st.pool_free, st.pool_used, st.tasks, st.dead_letters) == (domain.pool_size, 0, 0, 0)

    t = domain.register(name="stats")
    w = [t.add(_record, b"", TWA_NONE) for _ in range(3)]
    t.cancel(w[0])
    info = _info(domain, t.id)
    assert isinstance(info, TaskInfo) and info_fields <= set(info.as_dict())
    assert (info.pid, info.name, info.state) == (os.getpid(), "stats", "running")
    assert 0 < info.registered_ns <= time.monotonic_ns()
    assert (info.added, info.cancelled, info.pending, info.max_pending) == (3, 1, 2, 3)
    st = domain.stats()
    assert (st.tasks, st.pool_used, st.added, st.pending) == (1, 2, 3, 2)

    # A task whose process died without exiting is "reaped" once reaped (tasks() reaps first).
    child = spawn(_TASK_CHILD, domain.name, "doomed", stdin=subprocess.PIPE)
    child_id = int(child.stdout.readline())
    assert _info(domain, child_id).state == "running"
    child.kill()
    child.wait(timeout=30)
    assert _info(domain, child_id).state == "reaped"
    t.run()
    t.exit()
    assert domain.stats().pool_free == domain.pool_size


# ---- unknown callbacks: dead letters ------------------------------------------

@pytest.mark.asan
def test_unknown_callback_goes_to_the_dead_letters(domain, task, caplog):
    late = "test.sem.registered-late"
    task.add(late, b"waiting for a callback", TWA_NONE)
    task.add(_record, b"known", TWA_NONE)
    assert task.run() == 1                          # the known one
    assert LOG == [b"known"]
    assert late in caplog.text                      # logged
    info = _info(domain, task.id)
    assert (info.unknown, info.run) == (1, 1)
    dead = domain.dead_letters()
    assert [(w.func_name, w.payload, w.target) for w in dead] == [
        (late, b"waiting for a callback", task.id)]
    st = domain.stats()
    assert (st.dead_letters, st.pool_free) == (1, domain.pool_size - 1)

    [w] = dead
    assert (w.reason, w.target_name) == ("unknown_callback", task.name)
    assert domain.dead_letters(reason="orphaned") == []
    with pytest.raises(ValueError, match="unknown_callback"):
        domain.dead_letters(reason="lost")

    # Unknown here still: running them here leaves it.
    assert domain.run_dead_letters() == 0
    assert len(domain.dead_letters()) == 1
    callback(name=late)(lambda w: LOG.append(b"late:" + w.payload))
    try:
        assert domain.run_dead_letters() == 1
    finally:
        callbacks.unregister(late)
    assert LOG[-1] == b"late:waiting for a callback"
    assert domain.dead_letters() == []
    assert domain.stats().pool_free == domain.pool_size

    # Dropping returns the nodes without running anything.
    task.add_many("test.sem.never-registered", [b"1", b"2"], TWA_NONE)
    assert task.run() == 0
    assert len(domain.dead_letters()) == 2
    assert domain.drop_dead_letters() == 2
    assert domain.dead_letters() == [] and domain.stats().dead_letters == 0
    assert domain.stats().pool_free == domain.pool_size


# ---- origin recording -----------------------------------------------------------

def _queue_here(t, notify=TWA_NONE, func=None):
    return t.add(func or _record_work, b"o", notify), sys._getframe().f_lineno


def _expected_origin(line: int, function: str) -> str:
    text = f"{__file__}:{line} in {function} (pid {os.getpid()})"
    raw = text.encode()
    return text if len(raw) <= lib.TW_ORIGIN_LEN else "..." + raw[-(lib.TW_ORIGIN_LEN - 3):].decode()


def test_origin_is_recorded_when_asked_for(make_domain, caplog):
    dom = make_domain("origin", record_origin=True)
    t = dom.register()
    w, line = _queue_here(t)
    assert w.origin == _expected_origin(line, "_queue_here")
    assert [p.origin for p in dom.pending_works(t.id)] == [w.origin]
    assert t.run() == 1
    assert LOG[0].origin == w.origin                 # the callback sees it too
    # TWAF_NO_ALLOC: no origin recorded.
    w2, _ = _queue_here(t, TWA_NONE | TWAF_NO_ALLOC)
    assert w2.origin is None
    assert t.run() == 1 and LOG[1].origin is None
    many, line_many = t.add_many(_record_work, [b"m1", b"m2"], TWA_NONE), sys._getframe().f_lineno
    expected = _expected_origin(line_many, "test_origin_is_recorded_when_asked_for")
    assert [m.origin for m in many] == [expected, expected]
    assert t.run() == 2 and [x.origin for x in LOG[2:]] == [expected, expected]
    del LOG[2:]
    # A callback's error is logged with the origin of its work.
    caplog.set_level(logging.ERROR, logger="shm_taskwork")
    w3, line3 = _queue_here(t, TWA_NONE, _fail)
    assert t.run() == 1
    assert _expected_origin(line3, "_queue_here") in caplog.text
    t.exit()


# ---- domains --------------------------------------------------------------------

def test_domain_create_open_close_unlink(make_domain):
    dom = make_domain("life")
    with pytest.raises(FileExistsError):
        Domain.create(dom.name)
    with pytest.raises(FileNotFoundError):
        Domain.open(unique_name("missing"))
    other = Domain.open(dom.name.lstrip("/"))      # the leading slash is optional
    assert (other.name, other.max_tasks, other.pool_size, other.payload_size) == (
        dom.name, dom.max_tasks, dom.pool_size, dom.payload_size)
    other.close()
    other.close()                                  # twice is fine
    dom.close()
    dom.close()
    dom.unlink()
    dom.unlink()                                   # twice is fine
    assert not os.path.exists("/dev/shm/" + dom.name.lstrip("/"))
    with pytest.raises(FileNotFoundError):
        Domain.open(dom.name)


def test_domain_open_or_create_and_context_manager():
    name = unique_name("ooc")
    try:
        with Domain.open_or_create(name, max_tasks=3, pool_size=10, payload_size=16) as a:
            assert a.created and (a.max_tasks, a.pool_size, a.payload_size) == (3, 10, 16)
            with Domain.open_or_create(name, max_tasks=5) as b:
                assert not b.created and b.max_tasks == 3   # the existing one, as it is
        assert a._closed and b._closed
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def test_domain_mode_default_and_given(make_domain):
    old = os.umask(0o077)                          # the creator's umask does not narrow it
    try:
        d1 = make_domain("mode")
        d2 = make_domain("mode", mode=0o640)
    finally:
        os.umask(old)
    assert os.stat("/dev/shm/" + d1.name.lstrip("/")).st_mode & 0o777 == 0o600
    assert os.stat("/dev/shm/" + d2.name.lstrip("/")).st_mode & 0o777 == 0o640


def test_an_add_through_a_forgotten_handle_after_close_is_an_error_not_a_crash(spawn):
    # The process keeps one add handle per registration; past 4 * max_tasks
    # registrations it forgets those with no descriptors, while Task objects
    # may still hold them. close() must reach those too: an add through one
    # then says the domain is closed (it read unmapped memory before).
    p = spawn("""
        import sys
        from shm_taskwork import Domain, callback, TWA_NONE
        from shm_taskwork.errors import TaskExitedError

        @callback(name="sem.noop")
        def noop(work):
            pass

        dom = Domain.create(sys.argv[1], max_tasks=1, pool_size=16)
        try:
            old = []
            for _ in range(6):
                t = dom.register("x")
                h = dom.task(t.id)
                old.append(h)
                t.exit()
                try:
                    h.add(noop, b"", TWA_NONE)   # caches the callback in h
                except TaskExitedError:
                    pass
            dom.close()
            try:
                old[0].add(noop, b"", TWA_NONE)
            except ValueError as exc:
                print(exc, flush=True)
        finally:
            dom.unlink()
    """, unique_name("forgot"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "is closed" in out, out
