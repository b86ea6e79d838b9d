"""docs/contract.md "Errors": every error on bad input. Each must leave the domain exactly as it
was (pool, counters, pending list), carry the kernel's errno where there is
one, and say what the limit or the valid choices are."""
from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import subprocess

import posix_ipc
import pytest

from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, Domain, DomainCorruptError,
                          InvalidModeError, NoSuchTaskError, NotCurrentTaskError,
                          PayloadTooLargeError, PoolExhaustedError, TaskExitedError,
                          TaskWorkError, UnknownCallbackError, callback)
from shm_taskwork import callbacks
from shm_taskwork import _layout

from conftest import unique_name

RAN: list = []


@callback(name="test.err.record")
def _record(work):
    RAN.append(work.payload)


@pytest.fixture(autouse=True)
def _clean():
    RAN.clear()
    yield
    RAN.clear()


@pytest.fixture
def task(domain):
    t = domain.register(name="err")
    yield t
    if t.is_current:
        t.exit()


def snapshot(dom: Domain, t=None):
    """Everything an error must leave unchanged."""
    tasks = [(i.id, i.added, i.run, i.cancelled, i.errors, i.unknown, i.signals_sent,
              i.resumes_sent, i.pending, i.max_pending) for i in dom.tasks()]
    pending = [(w.id, w.payload) for w in dom.pending_works(t.id)] if t is not None else []
    return dom.stats(), tasks, pending


def _shm_exists(name: str) -> bool:
    return os.path.exists("/dev/shm/" + name.lstrip("/"))


# ---- the exception tree ----------------------------------------------------------

def test_exception_tree_and_errnos():
    expect = {
        TaskExitedError: (errno.ESRCH, ProcessLookupError),
        InvalidModeError: (errno.EINVAL, ValueError),
        PayloadTooLargeError: (errno.E2BIG, ValueError),
        PoolExhaustedError: (errno.ENOMEM, TaskWorkError),
        NoSuchTaskError: (None, LookupError),
        NotCurrentTaskError: (errno.EPERM, TaskWorkError),
        DomainCorruptError: (errno.EUCLEAN, TaskWorkError),
        UnknownCallbackError: (None, LookupError),
    }
    for cls, (code, base) in expect.items():
        assert issubclass(cls, TaskWorkError) and issubclass(cls, base), cls
        assert cls.errno == code, cls


# ---- PayloadTooLargeError ----------------------------------------------------------

@pytest.mark.parametrize("payload_size", [0, 16, 224])
def test_payload_too_large_queues_nothing(make_domain, payload_size):
    dom = make_domain("big", payload_size=payload_size)
    t = dom.register()
    t.add(_record, b"k" * payload_size, TWA_NONE)          # exactly the limit is fine
    before = snapshot(dom, t)
    big = b"x" * (payload_size + 1)
    for call in (lambda: t.add(_record, big, TWA_NONE),
                 lambda: t.add(_record, big, TWA_RESUME),
                 lambda: t.add_many(_record, [b"", b"k" * payload_size, big, b""], TWA_NONE)):
        with pytest.raises(PayloadTooLargeError) as ei:
            call()
        e = ei.value
        assert e.errno == errno.E2BIG and isinstance(e, ValueError)
        assert f"{payload_size + 1} bytes" in str(e)
        assert f"payload_size ({payload_size} bytes)" in str(e)
        assert snapshot(dom, t) == before
    assert t.run() == 1 and RAN == [b"k" * payload_size]
    assert dom.stats().pool_free == dom.pool_size
    t.exit()


# ---- InvalidModeError -------------------------------------------------------------

@pytest.mark.parametrize("notify", [5, -1, 0x200, 0x201, 0x100 | 7, 1 << 40, "x", 1.0, None])
def test_unknown_notify_value_queues_nothing(domain, task, notify):
    task.add(_record, b"there before", TWA_NONE)
    before = snapshot(domain, task)
    for call in (lambda: task.add(_record, b"p", notify),
                 lambda: task.add_many(_record, [b"p", b"q"], notify)):
        with pytest.raises(InvalidModeError) as ei:
            call()
        e = ei.value
        assert e.errno == errno.EINVAL and isinstance(e, ValueError)
        for choice in ("TWA_NONE", "TWA_RESUME", "TWA_SIGNAL", "TWA_SIGNAL_NO_IPI",
                       "TWA_NMI_CURRENT", "TWAF_NO_ALLOC"):
            assert choice in str(e)
        assert snapshot(domain, task) == before
    assert task.run() == 1


_TASK_CHILD = """
    import sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    t = dom.register(name="other")
    print(t.id, flush=True)
    sys.stdin.readline()
    t.exit()
    dom.close()
"""


def _other_task(domain, spawn):
    child = spawn(_TASK_CHILD, domain.name, stdin=subprocess.PIPE)
    line = child.stdout.readline()
    assert line, child.communicate(timeout=10)
    return child, domain.task(int(line))


def _finish(child):
    child.stdin.write("exit\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err


def test_nmi_current_on_another_process_task(domain, task, spawn):
    child, other = _other_task(domain, spawn)
    before = snapshot(domain, other)
    for call in (lambda: other.add(_record, b"", TWA_NMI_CURRENT),
                 lambda: other.add_many(_record, [b"", b""], TWA_NMI_CURRENT)):
        with pytest.raises(InvalidModeError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
        assert "TWA_NMI_CURRENT" in str(ei.value) and "own task" in str(ei.value)
        assert snapshot(domain, other) == before
    # On the own task it is a valid mode.
    task.add(_record, b"own", TWA_NMI_CURRENT)
    assert task.run() == 1 and RAN == [b"own"]
    _finish(child)
    assert domain.stats().pool_free == domain.pool_size


# ---- PoolExhaustedError ------------------------------------------------------------

@pytest.mark.asan
def test_pool_exhausted_queues_nothing_and_leaks_nothing(make_domain):
    dom = make_domain("pool", pool_size=4)
    t = dom.register()
    t.add_many(_record, [b"1", b"2"], TWA_NONE)
    before = snapshot(dom, t)
    # Needs three nodes, two are free: nothing is queued, the two come back.
    with pytest.raises(PoolExhaustedError) as ei:
        t.add_many(_record, [b"a", b"b", b"c"], TWA_NONE)
    assert ei.value.errno == errno.ENOMEM
    assert "pool_size=4" in str(ei.value) and "nothing was queued" in str(ei.value)
    assert snapshot(dom, t) == before
    assert before[0].pool_free == 2
    t.add(_record, b"3", TWA_NONE)
    t.add(_record, b"4", TWA_RESUME)
    full = snapshot(dom, t)
    assert full[0].pool_free == 0
    for call in (lambda: t.add(_record, b"5", TWA_RESUME),
                 lambda: t.add_many(_record, [b"5"], TWA_NONE)):
        with pytest.raises(PoolExhaustedError) as ei:
            call()
        assert ei.value.errno == errno.ENOMEM and "pool_size=4" in str(ei.value)
        assert snapshot(dom, t) == full
    assert t.run() == 4 and RAN == [b"4", b"3", b"2", b"1"]
    assert dom.stats().pool_free == 4
    t.add(_record, b"again", TWA_NONE)                 # usable again
    t.exit()


# ---- TaskExitedError ---------------------------------------------------------------

def test_task_exited_queues_nothing(domain):
    t = domain.register(name="gone")
    t.exit()
    before = snapshot(domain)
    for call in (lambda: t.add(_record, b"", TWA_NONE), lambda: t.add(_record, b"", TWA_RESUME),
                 lambda: t.add_many(_record, [b"a", b"b"], TWA_NONE),
                 lambda: domain.task(t.id).add(_record, b"", TWA_NONE)):
        with pytest.raises(TaskExitedError) as ei:
            call()
        e = ei.value
        assert e.errno == errno.ESRCH and isinstance(e, ProcessLookupError)
        assert "ESRCH" in str(e) and "exited" in str(e)
        assert snapshot(domain) == before
    assert before[0].pool_free == domain.pool_size
    # Own-task operations on an exited task say it exited.
    for op in (t.run, t.checkpoint, t.fileno, lambda: t.wait(0)):
        with pytest.raises(TaskExitedError):
            op()


# ---- NoSuchTaskError, NotCurrentTaskError ------------------------------------------

def test_no_such_task(domain, task):
    cases = [(lambda: domain.task(domain.max_tasks), f"0..{domain.max_tasks - 1}"),
             (lambda: domain.task(-1), f"0..{domain.max_tasks - 1}"),
             (lambda: domain.task(task.id + 1), "free"),
             (lambda: domain.task(pid=2 ** 22 + 7), "pid="),
             (lambda: domain.task(name="nobody"), "name='nobody'"),
             (lambda: domain.pending_works(domain.max_tasks), f"0..{domain.max_tasks - 1}")]
    before = snapshot(domain, task)
    for call, said in cases:
        with pytest.raises(NoSuchTaskError) as ei:
            call()
        assert isinstance(ei.value, LookupError) and said in str(ei.value)
    assert snapshot(domain, task) == before
    for bad in (lambda: domain.task(), lambda: domain.task(1, pid=2), lambda: domain.task("0"),
                lambda: domain.task(True)):
        with pytest.raises(TypeError):
            bad()


def test_not_current_task(domain, task, spawn):
    child, other = _other_task(domain, spawn)
    before = snapshot(domain, other)
    for op in (other.run, other.checkpoint, lambda: other.wait(0), other.fileno, other.exit):
        with pytest.raises(NotCurrentTaskError) as ei:
            op()
        assert ei.value.errno == errno.EPERM
        assert f"pid {child.pid}" in str(ei.value) and f"pid {os.getpid()}" in str(ei.value)
        assert snapshot(domain, other) == before
    _finish(child)


# ---- DomainCorruptError ------------------------------------------------------------

def _raw_segment(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=max(len(data), 1))
    try:
        if data:
            with mmap.mmap(shm.fd, len(data)) as m:
                m[:] = data
    finally:
        shm.close_fd()


@pytest.mark.parametrize("data", [
    b"\xde\xad\xbe\xef" * 1024,                      # garbage
    b"NOTOURS!" + bytes(4088),                       # another magic
    b"",                                             # empty (1 zero byte)
    b"SHMTWRK\x01",                                  # our magic, shorter than a header
], ids=["garbage", "magic", "empty", "short"])
def test_open_a_segment_that_is_not_a_domain(data):
    name = unique_name("corrupt")
    _raw_segment(name, data)
    try:
        with pytest.raises(DomainCorruptError) as ei:
            Domain.open(name)
        assert ei.value.errno == errno.EUCLEAN
        assert name in str(ei.value)
        if not data.startswith(b"SHMTWRK"):
            assert "not a task-work domain" in str(ei.value)
            assert "SHMTWRK" in str(ei.value)              # what was expected
    finally:
        posix_ipc.unlink_shared_memory(name)


def _patch_header(dom: Domain, field: str, value: int) -> None:
    off = _layout.HEADER.offsets[field]
    with open("/dev/shm/" + dom.name.lstrip("/"), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        struct.pack_into("<I", m, off, value)


def test_open_a_domain_of_another_layout_version(make_domain):
    dom = make_domain("version")
    _patch_header(dom, "layout_version", 99)
    with pytest.raises(DomainCorruptError) as ei:
        Domain.open(dom.name)
    msg = str(ei.value)
    assert "99" in msg and str(_layout.LAYOUT_VERSION) in msg and "layout version" in msg


@pytest.mark.parametrize("field,value", [("pool_size", 0), ("pool_size", 1 << 30),
                                         ("node_size", 8), ("max_tasks", 100000)])
def test_open_a_domain_with_inconsistent_sizes(make_domain, field, value):
    dom = make_domain("sizes")
    _patch_header(dom, field, value)
    with pytest.raises(DomainCorruptError) as ei:
        Domain.open(dom.name)
    assert "inconsistent" in str(ei.value)


# ---- UnknownCallbackError ----------------------------------------------------------

def test_unknown_callback_required():
    with pytest.raises(UnknownCallbackError) as ei:
        callbacks.require("test.err.never-registered")
    assert isinstance(ei.value, LookupError)
    assert "test.err.never-registered" in str(ei.value)
    assert callbacks.require("test.err.record") is _record


# ---- bad arguments -------------------------------------------------------------------

@pytest.mark.parametrize("opts,exc,said", [
    ({"max_tasks": 0}, ValueError, "between 1 and 4096"),
    ({"max_tasks": 4097}, ValueError, "between 1 and 4096"),
    ({"pool_size": 0}, ValueError, f"between 1 and {1 << 24}"),
    ({"pool_size": (1 << 24) + 1}, ValueError, f"between 1 and {1 << 24}"),
    ({"payload_size": -1}, ValueError, f"between 0 and {1 << 20}"),
    ({"payload_size": (1 << 20) + 1}, ValueError, f"between 0 and {1 << 20}"),
    ({"max_tasks": "8"}, TypeError, "max_tasks must be an int"),
    ({"pool_size": 2.5}, TypeError, "pool_size must be an int"),
    ({"payload_size": None}, TypeError, "payload_size must be an int"),
    ({"max_tasks": True}, TypeError, "max_tasks must be an int"),
    ({"mode": 0o1000}, ValueError, "0o777"),
    ({"mode": "600"}, ValueError, "0o777"),
])
def test_bad_create_arguments_leave_no_segment(opts, exc, said):
    name = unique_name("badargs")
    with pytest.raises(exc) as ei:
        Domain.create(name, **opts)
    assert said in str(ei.value)
    assert not _shm_exists(name)


@pytest.mark.parametrize("name", ["", "/", "a/b", "x" * 300, None, 5])
def test_bad_domain_names(name):
    with pytest.raises(ValueError):
        Domain.create(name, max_tasks=1, pool_size=1)


def test_bad_arguments_to_task_operations_change_nothing(domain, task):
    task.add(_record, b"there", TWA_NONE)
    before = snapshot(domain, task)
    cases = [
        (lambda: task.add(_record, 123, TWA_NONE), TypeError, "bytes-like"),
        (lambda: task.add(_record, "text", TWA_NONE), TypeError, "bytes-like"),
        (lambda: task.add(123, b"", TWA_NONE), TypeError, "callable or its registered name"),
        (lambda: task.add("", b"", TWA_NONE), ValueError, "non-empty"),
        (lambda: task.add_many(_record, [b"ok", 5], TWA_NONE), TypeError, "bytes-like"),
        (lambda: task.cancel("not a work"), TypeError, "Work"),
        (lambda: task.cancel_match(5), TypeError, "callable"),
        (lambda: task.cancel_func(3.5), TypeError, "callable or its registered name"),
        (lambda: task.wait(-1), ValueError, ">= 0"),
    ]
    for call, exc, said in cases:
        with pytest.raises(exc) as ei:
            call()
        assert said in str(ei.value)
        assert snapshot(domain, task) == before
    assert task.add_many(_record, [], TWA_NONE) == []
    assert snapshot(domain, task) == before


def test_bad_registrations(domain, task):
    before = snapshot(domain, task)
    with pytest.raises(TaskWorkError) as ei:
        domain.register()                              # one task per process per domain
    assert f"task {task.id}" in str(ei.value)
    other = Domain.open(domain.name)
    try:
        for kw, said in [({"name": "n" * 48}, "47 bytes"), ({"name": 5}, "47 bytes"),
                         ({"signum": signal.SIGKILL}, "catchable"), ({"signum": 0}, "signal")]:
            with pytest.raises(ValueError) as ei:
                other.register(**kw)
            assert said in str(ei.value)
    finally:
        other.close()
    assert snapshot(domain, task) == before


def test_bad_callback_registrations():
    with pytest.raises(ValueError) as ei:
        callback(name="n" * 112)(lambda w: None)
    assert "112 bytes" in str(ei.value) and "limit is 111" in str(ei.value)
    with pytest.raises(ValueError):
        callback(name="")(lambda w: None)
    with pytest.raises(TypeError):
        callback(5)


def test_full_task_table(make_domain):
    dom = make_domain("full", max_tasks=1)
    t = dom.register()
    other = Domain.open(dom.name)
    try:
        with pytest.raises(TaskWorkError) as ei:
            other.register()
        assert ei.value.errno == errno.ENOSPC and "max_tasks=1" in str(ei.value)
    finally:
        other.close()
    t.exit()


def test_close_releases_the_task_when_exit_fails_on_a_corrupt_segment(make_domain):
    """exit() cannot drain a list whose head points outside the pool; close()
    must still give back the eventfd, the fd-server thread and the handler."""
    import signal as _signal
    from shm_taskwork.signals import dispatch as _on_signal  # the package's handler
    dom = make_domain("corrupt_close")
    t = dom.register("doomed")
    efd, server = t.fileno(), t._server
    assert _signal.getsignal(_signal.SIGUSR1) is _on_signal and server.is_alive()
    s = dom._slot(t.id)
    s.head = (t.gen << 32) | (dom.pool_size + 7)      # scribbled: an index out of range
    with pytest.raises(DomainCorruptError):
        t.run()
    dom.close()
    assert dom.current is None
    with pytest.raises(OSError):
        os.fstat(efd)
    server.join(timeout=5)
    assert not server.is_alive()
    assert _signal.getsignal(_signal.SIGUSR1) is not _on_signal
