"""docs/contract.md "Callbacks and works": batch callbacks, and the batch run path under them.

A batch callback is called once per run batch with the list of its works
from that batch, newest first; cancel, exactly-once and crash rules are
those of single works; one that raises counts one error per work."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import readline
from shm_taskwork import TWA_NONE, callback

CALLS: list[list[bytes]] = []
SINGLE: list[bytes] = []


@callback(name="batch.collect", batch=True)
def _collect(works):
    CALLS.append([w.payload for w in works])


@callback(name="batch.fail", batch=True)
def _fail(works):
    raise ValueError(f"boom {len(works)}")


@callback(name="batch.single")
def _single(work):
    SINGLE.append(work.payload)


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()
    SINGLE.clear()


@pytest.fixture
def task(domain):
    t = domain.register("batch-task", install_handler=False)
    yield t
    if t.is_current:
        t.exit()


def _info(domain, tid):
    return next(i for i in domain.tasks() if i.id == tid)


def test_one_call_per_batch_with_its_works_newest_first(domain, task):
    handles = [task.add("batch.collect", f"b{i}".encode(), TWA_NONE) for i in range(5)]
    task.add("batch.single", b"s", TWA_NONE)
    task.add_many("batch.collect", [b"m0", b"m1"], TWA_NONE)
    assert task.run() == 8
    assert CALLS == [[b"m1", b"m0", b"b4", b"b3", b"b2", b"b1", b"b0"]]
    assert SINGLE == [b"s"]
    assert _info(domain, task.id).run == 8
    assert domain.stats().pool_free == domain.pool_size
    # the Works the callback saw carry the fields of the ones add returned
    assert handles[0].func_name == "batch.collect" and handles[0].state == "pending"


def test_works_have_every_field(domain, task):
    seen = []

    @callback(name="batch.fields", batch=True)
    def fields(works):
        seen.extend(works)

    w = task.add("batch.fields", b"payload", TWA_NONE)
    assert task.run() == 1
    [got] = seen
    assert (got.id, got.func_name, got.func_id, got.payload, got.target, got.target_gen,
            got.enqueued_ns, got.sender_pid, got.state) == \
        (w.id, w.func_name, w.func_id, w.payload, w.target, w.target_gen, w.enqueued_ns,
         w.sender_pid, "running")
    assert got == w and "batch.fields" in repr(got)


def test_a_batch_callback_that_raises_counts_one_error_per_work(domain, task):
    for i in range(3):
        task.add("batch.fail", f"f{i}".encode(), TWA_NONE)
    with pytest.raises(ExceptionGroup) as ei:
        task.run(raise_errors=True)
    assert len(ei.value.exceptions) == 3
    info = _info(domain, task.id)
    assert (info.run, info.errors) == (3, 3)
    # each work of the list is kept as a "failed" letter (README "Workers in
    # production"); nothing else is left over
    letters = domain.dead_letters()
    assert sorted(w.payload for w in letters) == [b"f0", b"f1", b"f2"]
    assert {w.reason for w in letters} == {"failed"}
    assert domain.stats().pool_free == domain.pool_size - 3


def test_cancelled_works_are_not_in_the_list(domain, task):
    ws = [task.add("batch.collect", f"c{i}".encode(), TWA_NONE) for i in range(4)]
    assert task.cancel(ws[1]) and task.cancel_func("batch.collect") == ws[3]
    assert task.run() == 2
    assert CALLS == [[b"c2", b"c0"]]
    assert not task.cancel(ws[0])           # it ran: nothing to cancel


def test_works_added_by_a_batch_callback_run_in_a_further_round(domain, task):
    @callback(name="batch.chain", batch=True)
    def chain(works):
        CALLS.append([w.payload for w in works])
        if works[0].payload == b"first":
            task.add_many("batch.chain", [b"x", b"y"], TWA_NONE)

    task.add("batch.chain", b"first", TWA_NONE)
    assert task.run() == 3
    assert CALLS == [[b"first"], [b"y", b"x"]]


KILLED = r"""
import sys
from shm_taskwork import Domain, callback, TWA_NONE

@callback(name="batch.die", batch=True)
def die(works):
    print("got", len(works), flush=True)
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)

@callback(name="batch.later")
def later(work):
    print("later", flush=True)

dom = Domain.open(sys.argv[1])
t = dom.register("victim", install_handler=False)
print("ready", t.id, flush=True)
sys.stdin.readline()
t.run()
"""


def test_a_task_killed_in_a_batch_callback_reports_its_works_interrupted(domain, spawn):
    """Every work handed to the batch callback had started (interrupted, never
    rerun); works it had not reached are orphaned dead letters."""
    p = spawn(KILLED, domain.name, stdin=subprocess.PIPE)
    tid = int(readline(p).split()[1])
    h = domain.task(tid)
    h.add("batch.later", b"old", TWA_NONE)                 # runs after the batch
    h.add_many("batch.die", [b"d0", b"d1", b"d2"], TWA_NONE)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert readline(p) == "got 3"
    assert p.wait(timeout=30) == -signal.SIGKILL
    report = domain.fsck(repair=True)
    assert report.dead_tasks == [tid]
    assert report.interrupted == 3
    assert [w.payload for w in domain.dead_letters(reason="orphaned")] == [b"old"]
    assert domain.drop_dead_letters() == 1
    assert domain.stats().pool_free == domain.pool_size


def test_batch_callbacks_cannot_be_async():
    with pytest.raises(TypeError):
        @callback(name="batch.async", batch=True)
        async def nope(works):  # pragma: no cover - never registered
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
