"""The per-process node cache (native/pool.c, docs/architecture.md "The node
cache"): a process takes free nodes 16 at a time and keeps them CACHED in its
own process-table entry. Real, unrelated processes, real SIGKILLs (the core's
kill points, armed with tw_killpoint_set), real fork(): a dead process's
cached nodes, and the nodes of a batch it died moving, all go back to the pool
once its entry is reclaimed; a forked child never takes its parent's cached
nodes; concurrent adders lose nothing; and the pool runs dry only when every
node is really in use (an empty pool takes nodes from other caches).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

from conftest import readline, wait_until
from shm_taskwork import TWA_NONE, TWA_RESUME, PoolExhaustedError, callback
from shm_taskwork._native import ffi, lib, owner_aux, owner_state

TIMEOUT = 20.0
BATCH = lib.TW_CACHE_BATCH


@callback(name="cache.noop")
def _noop(work):
    pass


def owners(dom) -> list[int]:
    out = ffi.new("uint64_t[]", dom.pool_size)
    lib.tw_scan_owners(dom.d, out)
    return [int(x) for x in out]


def cached_in(dom, entry: int) -> list[int]:
    """Nodes whose owner word says CACHED in process entry ``entry``."""
    return [i for i, o in enumerate(owners(dom))
            if owner_state(o) == lib.TW_N_CACHED and owner_aux(o) & ~lib.TW_CACHE_HELD == entry]


def entry_of(dom, pid: int) -> int:
    p, s = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    for i in range(dom.max_procs):
        lib.tw_proc_info(dom.d, i, p, s)
        if int(p[0]) == pid:
            return i
    raise AssertionError(f"no process entry for pid {pid}")


def assert_pool_whole(dom, task) -> None:
    """Every node is free and can really be allocated again by this process:
    a node counted free but on no list and in no cache would make the pool
    run dry early."""
    assert dom.stats().pool_free == dom.pool_size
    works = [task.add("cache.noop", b"", TWA_NONE) for _ in range(dom.pool_size)]
    with pytest.raises(PoolExhaustedError):
        task.add("cache.noop", b"", TWA_NONE)
    for w in reversed(works):
        assert task.cancel(w)
    assert dom.stats().pool_free == dom.pool_size


# A producer: adds argv[3] works to task argv[2] (payloads argv[4]-k), says
# "ready" and the nodes it used (one line), then (argv[5]) "wait": waits for a line on stdin; "close":
# closes the domain (flushing its cache). argv[6], argv[7]: a kill point to
# arm after the adds (name of a TW_KP_* constant, countdown), or "-".
PRODUCER = """
import sys
from shm_taskwork import Domain, TWA_NONE
from shm_taskwork._native import lib
dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
kp, kn = sys.argv[6], sys.argv[7]
if kp != "-" and sys.argv[5] == "add":
    lib.tw_killpoint_set(getattr(lib, kp), int(kn))
nodes = []
for k in range(int(sys.argv[3])):
    nodes.append(t.add("cache.noop", f"{sys.argv[4]}-{k}".encode(), TWA_NONE).node)
if kp != "-" and sys.argv[5] != "add":
    lib.tw_killpoint_set(getattr(lib, kp), int(kn))
print("ready", *nodes, flush=True)
if sys.argv[5] == "wait":
    sys.stdin.readline()
dom.close()
print("closed", flush=True)
"""


def killed(p) -> None:
    p.wait(timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr.read())


def test_cached_nodes_are_owned_and_counted_free(make_domain):
    """One add takes a batch: the rest stays CACHED in our entry's name,
    counted free; closing the domain gives them back (nothing CACHED)."""
    dom = make_domain("own", pool_size=128)
    t = dom.register("own", install_handler=False)
    t.add("cache.noop", b"x", TWA_NONE)
    me = entry_of(dom, os.getpid())
    assert len(cached_in(dom, me)) == BATCH - 1
    assert dom.stats().pool_free == dom.pool_size - 1
    assert t.run() == 1
    assert dom.stats().pool_free == dom.pool_size
    assert dom.fsck(repair=False).clean


@pytest.mark.asan
@pytest.mark.parametrize("how", ["holding", "mid_batch_pop", "mid_batch_push"])
def test_killed_cache_holder_leaks_nothing(make_domain, spawn, how):
    """A producer is SIGKILLed holding a cache, in the middle of a batch pop
    (free-list CAS done, owner words not yet CACHED) or of a batch push on
    close (owner words FREE, free-list CAS not done). Once its entry is
    reclaimed nothing names it, fsck is clean, every node can be allocated
    again, and what it added runs once."""
    dom = make_domain("kill", pool_size=64)
    t = dom.register("sink", install_handler=False)
    if how == "holding":
        p = spawn(PRODUCER, dom.name, str(t.id), "3", "P", "wait", "-", "-",
                  stdin=subprocess.PIPE)
    elif how == "mid_batch_pop":
        # its first add refills: dies with a batch taken off the list
        p = spawn(PRODUCER, dom.name, str(t.id), "1", "P", "add", "TW_KP_MID_BATCH_POP", "1")
    else:
        # close flushes its 15 cached nodes as one chain: dies before the CAS
        p = spawn(PRODUCER, dom.name, str(t.id), "1", "P", "close", "TW_KP_MID_BATCH_PUSH", "1")
    added = 0
    if how == "holding":
        assert len(readline(p, TIMEOUT).split()) == 4   # ready and 3 nodes
        added = 3
        entry = entry_of(dom, p.pid)
        assert len(cached_in(dom, entry)) == BATCH - 3
        p.kill()
    elif how == "mid_batch_push":
        assert len(readline(p, TIMEOUT).split()) == 2   # ready and its node
        added = 1
    killed(p)
    if how != "mid_batch_pop":
        # its works were queued; the pool counts its cached nodes free until
        # its entry is reclaimed, and after
        assert t.pending() == added
    rep = dom.fsck(repair=True)
    assert rep.problems == [] and rep.dead_tasks == [] and rep.orphaned == 0, rep
    # cached nodes were free all along: not leaked. A batch the producer died
    # moving on the free list is found (FREE on no list) and given back.
    assert rep.leaked == {"holding": 0, "mid_batch_pop": BATCH,
                          "mid_batch_push": BATCH - 1}[how], rep
    assert not any(owner_state(o) == lib.TW_N_CACHED and owner_aux(o) & ~lib.TW_CACHE_HELD != entry_of(dom, os.getpid())
                   for o in owners(dom)), "a node still names the dead producer"
    assert dom.fsck(repair=False).clean
    assert t.run() == added
    assert_pool_whole(dom, t)


# A parent that holds a cache, then forks: the child adds; then the parent
# adds again from its cache. One JSON line: the parent's cached nodes before
# the fork, the nodes the child got, the nodes the parent got after.
FORKER = """
import json, os, sys
from shm_taskwork import Domain, TWA_NONE
from shm_taskwork._native import ffi, lib
dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
t.add("cache.noop", b"parent-0", TWA_NONE)
out = ffi.new("uint64_t[]", dom.pool_size)
lib.tw_scan_owners(dom.d, out)
me = dom.d.my_proc
mine = [i for i in range(dom.pool_size)
        if (out[i] >> 24) & 0xff == lib.TW_N_CACHED and out[i] & 0xffffff == me]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    nodes = [t.add("cache.noop", f"child-{k}".encode(), TWA_NONE).node for k in range(20)]
    os.write(w, (" ".join(map(str, nodes)) + "\\n").encode())
    dom.close()
    os._exit(0)
os.close(w)
with os.fdopen(r) as f:
    child = [int(x) for x in f.readline().split()]
os.waitpid(pid, 0)
nodes = [t.add("cache.noop", f"parent-{k}".encode(), TWA_NONE).node for k in range(1, 6)]
dom.close()
print(json.dumps({"cached": mine, "child": child, "parent": nodes}), flush=True)
"""


def test_forked_child_does_not_reuse_parent_cache(make_domain, spawn):
    """A forked child inherits a copy of its parent's cache, but the nodes in
    it are CACHED in the parent's entry: the child takes its own (none of the
    parent's cached nodes), the parent goes on using its cache after the
    fork, and all 26 works run once."""
    dom = make_domain("fork", pool_size=256)
    t = dom.register("sink", install_handler=False)
    p = spawn(FORKER, dom.name, str(t.id))
    res = json.loads(readline(p, TIMEOUT))
    p.wait(timeout=TIMEOUT)
    assert p.returncode == 0
    cached, child, parent = set(res["cached"]), res["child"], res["parent"]
    assert len(cached) == BATCH - 1 and len(child) == 20 and len(parent) == 5
    assert not cached & set(child), "the child took nodes from its parent's cache"
    assert set(parent) <= cached, "the parent's cache was disturbed by the fork"
    assert len(set(child) | set(parent)) == 25
    assert t.run() == 26
    rep = dom.fsck(repair=True)
    assert rep.clean and rep.leaked == 0, rep
    assert_pool_whole(dom, t)


# A task process that runs its list until it has run argv[3] works, printing
# the payloads it ran (one line each), then closes.
RUNNER = """
import sys
from shm_taskwork import Domain, callback
dom = Domain.open(sys.argv[1])
t = dom.register("runner", install_handler=False)
ran = []
@callback(name="cache.rec")
def rec(work):
    ran.append(work.payload.decode())
print("ready", t.id, flush=True)
want = int(sys.argv[2])
while len(ran) < want:
    t.wait(0.2)   # the adds notify (TWA_RESUME): wait() wakes on the eventfd
for p in ran:
    print(p)
t.exit()
dom.close()
print("done", flush=True)
"""


@pytest.mark.asan
def test_threads_adding_beside_a_runner_lose_nothing(make_domain, spawn):
    """Six threads add 300 works each to another process's task through a
    pool of 48 nodes while it runs them: the adders' caches, the runner's
    cache (its frees), the shared list and the steals between them are all
    busy. Every work runs exactly once and the pool ends whole."""
    dom = make_domain("threads", pool_size=48)
    nthreads, per = 6, 300
    p = spawn(RUNNER, dom.name, str(nthreads * per))
    line = readline(p, TIMEOUT).split()
    assert line[0] == "ready"
    t = dom.task(int(line[1]))
    errors: list[BaseException] = []

    def adder(k: int) -> None:
        try:
            for i in range(per):
                payload = f"{k}-{i}".encode()
                # the pool is small: a full pool means "wait for the runner"
                wait_until(lambda: _try_add(t, payload), TIMEOUT, interval=0.0005,
                           what="room in the pool")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(k,)) for k in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ran = out.split()[:-1]
    assert out.split()[-1] == "done"
    assert sorted(ran) == sorted(f"{k}-{i}" for k in range(nthreads) for i in range(per))
    rep = dom.fsck(repair=True)
    assert rep.clean, rep
    me = dom.register("pool-check", install_handler=False)
    assert_pool_whole(dom, me)


def _try_add(t, payload: bytes) -> bool:
    try:
        t.add("cache.rec", payload, TWA_RESUME)
        return True
    except PoolExhaustedError:
        return False


def test_pool_runs_dry_only_when_every_node_is_in_use(make_domain, spawn):
    """Another live process holds 15 cached nodes of a 24-node pool: this
    process can still add 24 works (the last ones taken from that cache),
    and only the 25th finds the pool empty. The holder's later adds find its
    stale entries and take other nodes; nothing is lost."""
    dom = make_domain("dry", pool_size=24)
    t = dom.register("sink", install_handler=False)
    p = spawn(PRODUCER, dom.name, str(t.id), "1", "H", "wait", "-", "-", stdin=subprocess.PIPE)
    assert readline(p, TIMEOUT).split()[0] == "ready"
    assert len(cached_in(dom, entry_of(dom, p.pid))) == BATCH - 1
    works = [t.add("cache.noop", b"", TWA_NONE) for _ in range(dom.pool_size - 1)]
    with pytest.raises(PoolExhaustedError):
        t.add("cache.noop", b"", TWA_NONE)
    assert cached_in(dom, entry_of(dom, p.pid)) == []
    p.kill()
    killed(p)
    for w in works:
        assert t.cancel(w)
    assert t.run() == 1
    rep = dom.fsck(repair=True)
    assert rep.problems == [] and rep.leaked == 0, rep
    assert_pool_whole(dom, t)
