"""A dead adder's node, judged by whether its push happened.

An adder pushes its node while the owner word still says ALLOC(adder) and
marks it QUEUED only afterwards. Killed between the two, it leaves a linked
node that fsck must not free (the task would run a node back in the pool):
fsck settles it as an ordinary queued work. Killed before the push, the node
is on no list and fsck gives it back as leaked. The task stays alive and idle
throughout, so only fsck can decide.
"""

import signal
import subprocess

import pytest

from shm_taskwork import TWA_NONE, callback

RAN: list[bytes] = []

@callback(name="test.settle.rec")
def rec(work):
    RAN.append(work.payload)

PRODUCER = """
import sys
from shm_taskwork import Domain, TWA_NONE
dom = Domain.open(sys.argv[1])
task = dom.task(int(sys.argv[2]))
task.add("test.settle.rec", b"victim", TWA_NONE)   # dies at the kill point
print("not killed", flush=True)
"""

@pytest.mark.asan
@pytest.mark.parametrize("point, settled, leaked, runs", [
    ("after_push", 1, 0, [b"victim"]),   # pushed, not yet marked: a queued work
    ("after_alloc", 0, 1, []),           # never pushed: back to the pool
])
@pytest.mark.parametrize("healer", ["fsck", "reader"])
def test_dead_adder_node_is_settled_by_whether_it_was_pushed(domain, spawn, point, settled,
                                                              leaked, runs, healer):
    """fsck settles it; so does, without fsck, any process that reads the
    task table (it reclaims the dead adder's process-table entry)."""
    RAN.clear()
    task = domain.register("idle")
    p = spawn(PRODUCER, domain.name, str(task.id), env={"SHM_TASKWORK_KILLPOINT": point})
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL, (out, err)
    assert domain.stats(reap=False).pool_used == 1      # only read: nothing healed yet

    if healer == "fsck":
        rep = domain.fsck(repair=True)
        assert rep.repaired and not rep.dead_tasks and not rep.problems, rep
        assert (rep.settled, rep.leaked, rep.orphaned) == (settled, leaked, 0)
        assert domain.fsck(repair=True).settled == 0    # settled once, for good
    else:
        domain.tasks()                                  # notices the dead adder
        assert domain.stats(reap=False).pool_used == settled
        rep = domain.fsck()
        assert rep.clean and rep.idle_dead_entries == 0, rep

    assert task.pending() == settled
    assert task.run() == len(runs) and RAN == runs
    st = domain.stats()
    assert st.pool_free == st.pool_size                  # nothing leaked, nothing twice

def test_task_runs_a_pushed_but_unmarked_node_itself(domain, spawn):
    """Without fsck: the runner takes the ALLOC node it finds in its batch."""
    RAN.clear()
    task = domain.register("runner")
    p = spawn(PRODUCER, domain.name, str(task.id), env={"SHM_TASKWORK_KILLPOINT": "after_push"})
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert task.run() == 1 and RAN == [b"victim"]
    rep = domain.fsck(repair=True)
    assert rep.leaked == 0 and rep.settled == 0 and rep.orphaned == 0
    assert domain.stats().pool_free == domain.pool_size

def test_cancel_takes_a_pushed_but_unmarked_node(domain, spawn):
    RAN.clear()
    task = domain.register("cancelled")
    p = spawn(PRODUCER, domain.name, str(task.id), env={"SHM_TASKWORK_KILLPOINT": "after_push"})
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    w = task.cancel_func("test.settle.rec")
    assert w is not None and w.payload == b"victim"
    assert task.run() == 0 and RAN == []
    rep = domain.fsck(repair=True)
    assert rep.leaked == 0 and rep.settled == 0
    assert domain.stats().pool_free == domain.pool_size


def test_a_runner_killed_inside_detach_leaves_every_work_findable(domain, spawn):
    """A runner dies inside tw_detach with the batch marked DETACHED but still
    linked (kill point in_detach). Reaping finds each of those works once (an
    orphaned dead letter), a dead adder's pushed node among them included, and
    the slot serves a new registration."""
    RAN.clear()
    child = spawn("""
import sys
from shm_taskwork import Domain
dom = Domain.open(sys.argv[1])
t = dom.register("first")
print(t.id, flush=True)
sys.stdin.readline()
t.run()
""", domain.name, stdin=subprocess.PIPE, env={"SHM_TASKWORK_KILLPOINT": "in_detach"})
    slot = int(child.stdout.readline())
    h = domain.task(slot)
    for i in range(3):
        h.add("test.settle.rec", f"w{i}".encode(), TWA_NONE)
    # and a node pushed by an adder that died before marking it queued
    p = spawn(PRODUCER, domain.name, str(slot), env={"SHM_TASKWORK_KILLPOINT": "after_push"})
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    child.stdin.write("go\n")
    child.stdin.flush()
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    rep = domain.fsck(repair=True)
    assert rep.dead_tasks == [slot] and rep.orphaned == 4 and rep.problems == [], rep
    assert sorted(w.payload for w in domain.dead_letters()) == [b"victim", b"w0", b"w1", b"w2"]
    task = domain.register("second")
    assert task.id == slot
    assert domain.retry_dead_letters(to=task) == 4
    assert task.run() == 4 and sorted(RAN) == [b"victim", b"w0", b"w1", b"w2"]
    assert domain.fsck(repair=True).clean
    assert domain.stats().pool_free == domain.pool_size
