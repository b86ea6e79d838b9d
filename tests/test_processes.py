"""End to end between unrelated processes: several producers, two tasks.

Two task processes (started with subprocess, not forked) run their works in
``wait()`` loops. Three producer processes - two registered as tasks of the
domain, one registered nowhere - add 200 works each with unique payloads, in
every notify mode, single and batched, to both tasks, and cancel some of their
own works right after adding them. One registered producer also forks a child
(multiprocessing's fork context) that adds works of its own, for contrast.

At the end every payload ran exactly once on the task it was sent to, or was
cancelled (cancel returned True) and never ran; the counters agree (added ==
run + cancelled), no node is missing from the pool, and fsck finds nothing.
"""
from __future__ import annotations

import collections
import json
import subprocess

import pytest

from shm_taskwork import TWA_RESUME

from test_notify import TIMEOUT, Child

WORKER = r'''
import json, os, sys, time
from shm_taskwork import Domain, callback

dom = Domain.open(sys.argv[1])
task = dom.register(name=sys.argv[2])
RAN, HANDLER, STOP = [], [0], [False]


def in_handler():
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "_on_signal":
            return True
        f = f.f_back
    return False


@callback(name="test.proc.rec")
def rec(work):
    RAN.append(work.payload.decode())
    HANDLER[0] += in_handler()


@callback(name="test.proc.stop")
def stop(work):
    STOP[0] = True


os.write(1, f"ready {task.id}\n".encode())
deadline = time.monotonic() + 60
while not STOP[0] and time.monotonic() < deadline:
    task.wait(timeout=5)
task.exit()
with open(sys.argv[3], "w") as f:
    json.dump({"ran": RAN, "in_handler": HANDLER[0], "stopped": STOP[0]}, f)
dom.close()
'''

PRODUCER = r'''
import json, multiprocessing, sys
from shm_taskwork import TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI, Domain

name, prefix, n, tids, register, fork_n = sys.argv[1:]
n, fork_n, tids = int(n), int(fork_n), json.loads(tids)
dom = Domain.open(name)
if register == "register":
    me = dom.register(name=f"producer-{prefix}")
tasks = [dom.task(t) for t in tids]
MODES = [TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI, TWA_NONE]


def produce(prefix, n):
    added, cancelled = [], []       # [payload, task id], payload
    i = 0
    while i < n:
        t = tasks[i % len(tasks)]
        mode = MODES[(i // 2) % len(MODES)]
        if i % 25 == 24 and i + 4 <= n:          # now and then a batch: one push
            batch = [f"{prefix}-{k}" for k in range(i, i + 4)]
            t.add_many("test.proc.rec", [p.encode() for p in batch], mode)
            added += [[p, t.id] for p in batch]
            i += 4
            continue
        p = f"{prefix}-{i}"
        w = t.add("test.proc.rec", p.encode(), mode)
        added.append([p, t.id])
        if i % 7 == 3 and t.cancel(w):          # may have run already: then False
            cancelled.append(p)
        i += 1
    return added, cancelled


forked = None
if fork_n:
    ctx = multiprocessing.get_context("fork")
    r, w = ctx.Pipe(duplex=False)

    def child():
        # A forked child of a registered process: not the parent's task, an
        # adder of its own.
        assert dom.current is None
        w.send(produce(prefix + "f", fork_n))
        dom.close()

    proc = ctx.Process(target=child)
    proc.start()
added, cancelled = produce(prefix, n)
if fork_n:
    if not r.poll(30):
        sys.exit("the forked producer sent nothing")
    f_added, f_cancelled = r.recv()
    proc.join(60)
    forked = proc.exitcode
    added += f_added
    cancelled += f_cancelled
print(json.dumps({"added": added, "cancelled": cancelled, "forked": forked}), flush=True)
dom.close()
'''


@pytest.mark.parametrize("fd_passing", ["default", "scm"])
def test_producers_and_tasks_in_unrelated_processes(make_domain, spawn, tmp_path, fd_passing):
    dom = make_domain("e2e", pool_size=4096, max_tasks=8)
    env = {"SHM_TASKWORK_FD_PASSING": "scm" if fd_passing == "scm" else ""}
    workers, tids = [], []
    for k in range(2):
        w = Child(spawn(WORKER, dom.name, f"worker{k}", str(tmp_path / f"w{k}.json"), env=env))
        tids.append(int(w.expect("ready")[0]))
        workers.append(w)
    # (prefix, registered?, works, forked works)
    plan = [("p0", True, 200, 100), ("p1", True, 200, 0), ("p2", False, 200, 0)]
    producers = [spawn(PRODUCER, dom.name, prefix, str(n), json.dumps(tids),
                       "register" if reg else "-", str(fork_n), env=env)
                 for prefix, reg, n, fork_n in plan]
    sent_to: dict[str, int] = {}
    cancelled: list[str] = []
    for p, (prefix, _, n, fork_n) in zip(producers, plan):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        got = json.loads(out.splitlines()[-1])
        if fork_n:
            assert got["forked"] == 0
        assert len(got["added"]) == n + fork_n
        for payload, tid in got["added"]:
            assert payload not in sent_to
            sent_to[payload] = tid
        cancelled += got["cancelled"]
    assert len(sent_to) == 700

    # Everything is added; a RESUME work tells each task to finish its loop.
    for tid in tids:
        dom.task(tid).add("test.proc.stop", b"", TWA_RESUME)
    results = []
    for w, k in zip(workers, range(2)):
        try:
            rc = w.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            w.fail("did not finish")
        if rc != 0:
            w.fail(f"exited with {rc}")
        results.append(json.loads((tmp_path / f"w{k}.json").read_text()))
    assert all(r["stopped"] for r in results)

    # Exactly once, on the task it was sent to; cancelled ones never.
    ran = collections.Counter()
    for tid, r in zip(tids, results):
        for payload in r["ran"]:
            ran[payload] += 1
            assert sent_to[payload] == tid, payload
    assert [p for p, k in ran.items() if k > 1] == []
    assert set(ran).isdisjoint(cancelled)
    assert len(set(cancelled)) == len(cancelled)
    assert set(ran) | set(cancelled) == set(sent_to)

    st = dom.stats()
    assert st.added == 700 + 2                         # the two stop works
    assert st.run == len(ran) + 2
    assert st.cancelled == len(cancelled)
    assert st.added == st.run + st.cancelled
    assert (st.errors, st.unknown, st.pending, st.dead_letters) == (0, 0, 0, 0)
    assert st.pool_free == st.pool_size
    assert st.resumes_sent > 0 and st.signals_sent > 0
    assert st.tasks == 0                               # every task exited
    assert {t.state for t in dom.tasks()} == {"exited"}
    # Every process, the forked one included, left the domain cleanly.
    report = dom.fsck()
    assert report.clean, report.as_dict()
