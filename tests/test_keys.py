"""Keyed adds (shm_taskwork.keys): a work queued at most once per key, through
the adder's own SIGKILL at every step, after the work ran and its node was
reused; the eviction rule of the key table."""
from __future__ import annotations

import signal
import subprocess

import pytest

from shm_taskwork import TWA_NONE, TaskExitedError, callback, keys

from conftest import python_script, readline

# keys.c is native code: these run under AddressSanitizer too (make test-asan)
pytestmark = pytest.mark.asan

RAN: list[bytes] = []


@callback(name="test.keys.rec")
def _rec(work):
    RAN.append(work.payload)


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def test_a_key_is_queued_once_and_outlives_its_work(domain):
    t = domain.register("w", install_handler=False)
    first = t.add_keyed("test.keys.rec", b"a", TWA_NONE, key="k")
    assert first.fresh and first.state == "queued" and first.slot == t.id
    again = t.add_keyed("test.keys.rec", b"a", TWA_NONE, key="k")
    assert not again.fresh and again.work_id == first.work_id
    assert t.pending() == 1 and t.run() == 1 and RAN == [b"a"]
    # run, freed, and the node reused: the key still says queued
    t.add("test.keys.rec", b"other", TWA_NONE)
    assert not t.add_keyed("test.keys.rec", b"a", TWA_NONE, key="k").fresh
    assert t.run() == 1 and RAN == [b"a", b"other"]
    assert keys.lookup(domain, "k").state == "queued"
    assert keys.lookup(domain, "never") is None
    assert domain.stats().pool_free == domain.pool_size


def test_errors_queue_nothing_and_leave_the_key_free(domain):
    t = domain.register("w", install_handler=False)
    with pytest.raises(ValueError, match="payload_size"):
        t.add_keyed("test.keys.rec", b"x" * (domain.payload_size + 1), key="big")
    assert keys.lookup(domain, "big") is None
    child = python_script(f"""
import sys
from shm_taskwork import Domain
dom = Domain.open({domain.name!r})
t = dom.register("gone", install_handler=False)
print("ready", flush=True)
sys.stdin.readline()
t.exit()
""", stdin=subprocess.PIPE)
    assert readline(child) == "ready"
    stale = domain.task(name="gone")
    child.stdin.write("go\n")
    child.stdin.close()
    assert child.wait(30) == 0
    with pytest.raises(TaskExitedError):
        stale.add_keyed("test.keys.rec", b"y", TWA_NONE, key="retry")
    assert keys.lookup(domain, "retry") is None
    assert t.add_keyed("test.keys.rec", b"y", TWA_NONE, key="retry").fresh
    assert t.run() == 1 and domain.stats().pool_free == domain.pool_size


@pytest.mark.parametrize("point", ["after_alloc", "key_reserved", "key_pushed"])
def test_an_adder_killed_at_every_step(domain, point):
    t = domain.register("w", install_handler=False)
    child = python_script(f"""
from shm_taskwork import Domain
dom = Domain.open({domain.name!r})
dom.task(name="w").add_keyed("test.keys.rec", b"once", 0, key="k")
""", env={"SHM_TASKWORK_KILLPOINT": point})
    assert child.wait(30) == -signal.SIGKILL
    rec = t.add_keyed("test.keys.rec", b"once", TWA_NONE, key="k")
    # killed before its push: the key is free again; after it: recorded
    assert rec.fresh == (point != "key_pushed")
    assert t.pending() == 1 and t.run() == 1 and RAN == [b"once"]
    assert not t.add_keyed("test.keys.rec", b"once", TWA_NONE, key="k").fresh
    assert t.run() == 0
    assert domain.stats().pool_free == domain.pool_size


def test_keyed_dead_letter_is_filed_once(domain):
    a = keys.dead_letter(domain, "d", "test.keys.rec", b"z", "ghost")
    b = keys.dead_letter(domain, "d", "test.keys.rec", b"z", "ghost")
    assert a.fresh and not b.fresh and a.state == b.state == "dead_letter"
    [dl] = domain.dead_letters()
    assert dl.target_name == "ghost" and dl.reason == "orphaned" and dl.payload == b"z"
    t = domain.register("ghost", install_handler=False)
    assert domain.retry_dead_letters() == 1 and t.run() == 1 and RAN == [b"z"]


def test_eviction_after_keys_cap_newer_keys(make_domain):
    dom = make_domain(pool_size=64)
    t = dom.register("w", install_handler=False)
    t.add_keyed("test.keys.rec", b"0", TWA_NONE, key="key-0")
    t.run()
    for i in range(1, keys.KEYS_CAP):
        t.add_keyed("test.keys.rec", b"", TWA_NONE, key=f"key-{i}")
        if i % 32 == 0:
            t.run()
    assert keys.lookup(dom, "key-0") is not None      # KEYS_CAP keys: all remembered
    t.add_keyed("test.keys.rec", b"", TWA_NONE, key="one-more")
    assert keys.lookup(dom, "key-0") is None           # the oldest is forgotten
    assert keys.lookup(dom, "key-1") is not None
    assert keys.used(dom) == keys.KEYS_CAP
    t.run()


def _tag(key: str) -> int:
    """The 16-bit tag the key table files a key under (native/tw_internal.h
    TW_KEY_TAG of keys.key_id): lookups compare tags before keys."""
    k = keys.key_id(key)
    return (k ^ (k >> 16) ^ (k >> 32) ^ (k >> 48)) & 0xFFFF


def test_keys_that_share_a_tag_are_told_apart(make_domain):
    """A tag only says where to look: two keys with one tag are two keys,
    each queued once, each found as itself, also after one is evicted."""
    by_tag: dict[int, str] = {}
    i = 0
    while True:      # the birthday bound: a shared tag within a few hundred keys
        k = f"tag-{i}"
        other = by_tag.setdefault(_tag(k), k)
        if other != k:
            break
        i += 1
    a, b = other, k
    assert keys.key_id(a) != keys.key_id(b) and _tag(a) == _tag(b)
    dom = make_domain(pool_size=64)
    t = dom.register("w", install_handler=False)
    ra = t.add_keyed("test.keys.rec", b"a", TWA_NONE, key=a)
    assert keys.lookup(dom, b) is None
    rb = t.add_keyed("test.keys.rec", b"b", TWA_NONE, key=b)
    assert ra.fresh and rb.fresh and ra.work_id != rb.work_id
    assert not t.add_keyed("test.keys.rec", b"a", TWA_NONE, key=a).fresh
    assert not t.add_keyed("test.keys.rec", b"b", TWA_NONE, key=b).fresh
    assert keys.lookup(dom, a).work_id == ra.work_id
    assert keys.lookup(dom, b).work_id == rb.work_id
    assert t.run() == 2 and sorted(RAN) == [b"a", b"b"]
    # a, then KEYS_CAP newer keys (b among them): a is evicted, b is not
    for j in range(keys.KEYS_CAP - 1):
        t.add_keyed("test.keys.rec", b"", TWA_NONE, key=f"fill-{j}")
        if j % 32 == 0:
            t.run()
    assert keys.lookup(dom, a) is None
    assert keys.lookup(dom, b).work_id == rb.work_id
    # a again takes the next ring entry, b's (same tag, other key): b is
    # forgotten there, a is found as the new work
    again = t.add_keyed("test.keys.rec", b"a2", TWA_NONE, key=a)
    assert again.fresh and keys.lookup(dom, a).work_id == again.work_id
    assert keys.lookup(dom, b) is None
    t.run()
