"""docs/contract.md "Kernel-style functions": the kernel's names return the kernel's
values (0 / -errno, the removed work or None, a bool) instead of raising."""
from __future__ import annotations

import errno

import pytest

from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL_NO_IPI, Work,
                          callback, init_task_work, task_work_add, task_work_cancel,
                          task_work_cancel_func, task_work_cancel_match, task_work_pending,
                          task_work_run)

RAN: list = []


@callback(name="test.kapi.record")
def _record(work):
    RAN.append(work.payload)


@callback(name="test.kapi.other")
def _other(work):
    RAN.append(b"other:" + work.payload)


@pytest.fixture(autouse=True)
def _clean():
    RAN.clear()
    yield
    RAN.clear()


@pytest.fixture
def task(domain):
    t = domain.register(name="kapi")
    yield t
    if t.is_current:
        t.exit()


def test_init_task_work_is_unqueued():
    w = init_task_work(_record, b"data")
    assert isinstance(w, Work)
    assert (w.func_name, w.payload, w.id, w.state) == ("test.kapi.record", b"data", None, "unqueued")
    assert init_task_work("test.kapi.other").payload == b""
    with pytest.raises(TypeError):
        init_task_work(_record, "not bytes")


def test_task_work_add_returns_zero_and_queues(domain, task):
    w = init_task_work(_record, b"one")
    assert task_work_pending(task) is False
    assert task_work_add(task, w, TWA_RESUME) == 0
    assert w.id is not None and w.target == task.id and w.state == "pending"
    assert task_work_pending(task) is True
    assert task.run() == 1 and RAN == [b"one"]
    assert task_work_pending(task) is False


def test_task_work_add_errors_are_negative_errnos(make_domain):
    dom = make_domain("kerr", pool_size=2, payload_size=8)
    t = dom.register()
    free = dom.stats().pool_free
    assert task_work_add(t, init_task_work(_record, b"x" * 9), TWA_NONE) == -errno.E2BIG
    for bad in (5, -1, 0x200):
        assert task_work_add(t, init_task_work(_record), bad) == -errno.EINVAL
    assert dom.stats().pool_free == free and t.pending() == 0
    assert task_work_add(t, init_task_work(_record, b"1"), TWA_NONE) == 0
    assert task_work_add(t, init_task_work(_record, b"2"), TWA_NMI_CURRENT) == 0  # own task
    w = init_task_work(_record, b"3")
    assert task_work_add(t, w, TWA_NONE) == -errno.ENOMEM
    assert w.id is None                                   # not queued
    assert t.pending() == 2
    t.exit()                                              # runs both
    assert RAN == [b"2", b"1"]
    assert task_work_add(t, init_task_work(_record, b"late"), TWA_RESUME) == -errno.ESRCH
    assert dom.stats().pool_free == dom.pool_size


def test_task_work_cancel_functions(domain, task):
    works = []
    for p, fn in ((b"a", _record), (b"b", _other), (b"c", _record), (b"d", _other)):
        w = init_task_work(fn, p)
        assert task_work_add(task, w, TWA_NONE) == 0
        works.append(w)
    # task_work_cancel_match(task, match, data): match(work, data), newest first.
    seen = []

    def match(work, data):
        seen.append((work.payload, data))
        return work.func_name == data

    got = task_work_cancel_match(task, match, "test.kapi.record")
    assert isinstance(got, Work) and got.payload == b"c"
    assert seen == [(b"d", "test.kapi.record"), (b"c", "test.kapi.record")]
    assert task_work_cancel_match(task, lambda w, d: False, None) is None
    # task_work_cancel_func: the most recently queued work of func.
    assert task_work_cancel_func(task, _other).payload == b"d"
    assert task_work_cancel_func(task, "test.kapi.other").payload == b"b"
    assert task_work_cancel_func(task, _other) is None
    # task_work_cancel: True iff it was pending and is now removed.
    assert task_work_cancel(task, works[0]) is True
    assert task_work_cancel(task, works[0]) is False
    assert task_work_cancel(task, works[2]) is False      # cancelled above by match
    assert task_work_pending(task) is False
    assert task.run() == 0 and RAN == []


def test_task_work_run_runs_own_tasks_in_every_domain(make_domain):
    d1, d2, d3 = make_domain("k1"), make_domain("k2"), make_domain("k3")
    t1, t2 = d1.register(), d2.register()                 # d3: joined, no task here
    assert task_work_add(t1, init_task_work(_record, b"in d1"), TWA_NONE) == 0
    assert task_work_add(t2, init_task_work(_record, b"in d2"), TWA_SIGNAL_NO_IPI) == 0
    assert task_work_add(t2, init_task_work(_other, b"also d2"), TWA_NONE) == 0
    assert task_work_run() is None
    assert sorted(RAN) == sorted([b"in d1", b"other:also d2", b"in d2"])
    assert not task_work_pending(t1) and not task_work_pending(t2)
    assert task_work_run() is None and len(RAN) == 3      # nothing left
    for d in (d1, d2, d3):
        assert d.stats().pool_free == d.pool_size
    t1.exit()
    t2.exit()
