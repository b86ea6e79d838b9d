"""A work's outcome and results (docs/contract.md "Outcomes"): tracked works,
Work.wait/outcome/result/error, Task.call, Domain.work from another process,
retried letters, bounded records - against real worker processes started
with subprocess."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time

import pytest

from shm_taskwork import (TWA_NONE, CallbackFailedError, OutcomeUnknownError, WorkLostError,
                          callback)
from tests.conftest import readline, wait_until

# A worker: registers "w", prints its task id, then runs works until SIGTERM.
WORKER = """
    import os, sys, time
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("w")

    @callback(name="oc.echo")
    def echo(work):
        return b"echo:" + work.payload

    @callback(name="oc.fail")
    def fail(work):
        raise RuntimeError("bad " + work.payload.decode())

    @callback(name="oc.none")
    def none(work):
        return {"not": "bytes"}

    @callback(name="oc.big")
    def big(work):
        return b"x" * (dom.payload_size + 1)

    @callback(name="oc.hang")
    def hang(work):
        print("started", flush=True)
        time.sleep(120)          # killed here by the test

    TRIES = {}
    @callback(name="oc.flaky", retries=2)
    def flaky(work):
        if work.attempt < 2:
            raise OSError(f"attempt {work.attempt}")
        return b"third"

    print(task.id, flush=True)
    task.serve(drain_timeout=5)
"""


# A task that never runs its list: it registers argv[2], prints its id and
# reads stdin until the test ends (or kills it).
IDLE = """
    import sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    t = dom.register(sys.argv[2], install_handler=sys.argv[3] == "1")
    print(t.id, flush=True); sys.stdin.read()
"""


def idle_task(dom, spawn, name: str = "idle", install_handler: bool = True):
    """(process, handle) of an IDLE task of dom."""
    proc = spawn(IDLE, dom.name, name, "1" if install_handler else "0", stdin=subprocess.PIPE)
    return proc, dom.task(int(readline(proc)))


@callback(name="oc.echo")
def _echo_here(work):
    return b"here:" + work.payload


@pytest.fixture
def worker(make_domain, spawn):
    dom = make_domain("oc", pool_size=128)
    proc = spawn(WORKER, dom.name)
    task = dom.task(int(readline(proc)))
    yield dom, proc, task
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.mark.asan
def test_a_tracked_work_run_by_another_process_reports_ran_and_its_result(worker):
    dom, _proc, task = worker
    w = task.add("oc.echo", b"hi", track=True)
    assert w.tracked and w.outcome in ("pending", "running", "ran")
    assert w.wait(timeout=20) == "ran"
    assert w.outcome == "ran" and w.result == b"echo:hi" and w.error is None
    wait_until(lambda: dom.stats().pool_free == dom.pool_size, what="the node given back")


def test_an_untracked_work_has_no_outcome_and_cannot_be_waited_on(worker):
    dom, _proc, task = worker
    w = task.add("oc.echo", b"u")
    assert w.outcome is None and not w.tracked
    with pytest.raises(ValueError, match="track=True"):
        w.wait(1)
    wait_until(lambda: dom.stats().pool_free == dom.pool_size, what="the work ran")
    with pytest.raises(OutcomeUnknownError, match="track=True"):
        dom.work(w.id)


def test_call_returns_the_result_and_none_for_a_value_that_is_not_bytes(worker):
    _dom, _proc, task = worker
    assert task.call("oc.echo", b"abc", timeout=20) == b"echo:abc"
    assert task.call("oc.none", b"", timeout=20) is None
    assert task.call("oc.echo", b"", timeout=20) == b"echo:"


def test_call_raises_callback_failed_with_the_remote_error(worker):
    _dom, _proc, task = worker
    with pytest.raises(CallbackFailedError, match="RuntimeError: bad xyz") as ei:
        task.call("oc.fail", b"xyz", timeout=20)
    assert ei.value.work.outcome == "failed"
    assert ei.value.work.error == "RuntimeError: bad xyz"


def test_a_result_larger_than_the_payload_size_is_a_failure_that_says_so(worker):
    dom, _proc, task = worker
    with pytest.raises(CallbackFailedError, match=f"payload_size={dom.payload_size}"):
        task.call("oc.big", b"", timeout=20)


@pytest.mark.asan
def test_a_callback_with_retries_is_followed_to_its_last_attempt(worker):
    _dom, _proc, task = worker
    w = task.add("oc.flaky", b"", track=True)
    assert w.wait(20) == "ran" and w.result == b"third"


@pytest.mark.asan
def test_call_timeout_cancels_a_work_that_has_not_started(make_domain, spawn):
    dom = make_domain("octo", pool_size=32)
    proc, task = idle_task(dom, spawn)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="cancelled") as ei:
        task.call("oc.echo", b"late", timeout=0.3, notify=TWA_NONE)
    assert time.monotonic() - t0 < 10
    assert ei.value.work.outcome == "cancelled"
    assert dom.stats().pool_free == dom.pool_size and task.pending() == 0
    # a second handle on the same work says the same
    assert dom.work(ei.value.work.id).outcome == "cancelled"


def test_a_waiter_sleeps_in_the_kernel_it_does_not_spin(make_domain, spawn):
    dom = make_domain("occpu", pool_size=32)
    proc, task = idle_task(dom, spawn)
    w = task.add("oc.echo", b"", TWA_NONE, track=True)
    c0, t0 = time.thread_time(), time.monotonic()
    with pytest.raises(TimeoutError, match="still pending"):
        w.wait(1.5)
    cpu, wall = time.thread_time() - c0, time.monotonic() - t0
    assert wall >= 1.5
    # a poll loop would burn a good part of the 1.5 s; a futex sleeper a few
    # wake-ups' worth (one per slice)
    assert cpu < 0.05, f"the waiter used {cpu * 1e3:.1f} ms of CPU in {wall:.2f} s"


def test_a_work_pending_when_its_task_is_killed_ends_dead_letter(make_domain, spawn):
    dom = make_domain("ocdl", pool_size=32)
    proc, task = idle_task(dom, spawn)
    w = task.add("oc.echo", b"", TWA_NONE, track=True)
    proc.kill()
    proc.wait(10)
    # the waiter notices the death, reaps the task: the work never ran
    assert w.wait(20) == "dead_letter" and w.result is None
    assert dom.work(w.id).outcome == "dead_letter"
    assert [x.id for x in dom.dead_letters()] == [w.id]


@pytest.mark.asan
def test_call_on_a_task_killed_in_the_callback_raises_work_lost_interrupted(worker):
    dom, proc, task = worker
    got: dict = {}

    def caller():
        try:
            task.call("oc.hang", b"", timeout=30)
        except Exception as exc:  # noqa: BLE001 - what call() raised is the result
            got["exc"] = exc

    th = threading.Thread(target=caller)
    th.start()
    assert readline(proc) == "started"
    proc.kill()
    proc.wait(10)
    th.join(30)
    assert not th.is_alive()
    exc = got["exc"]
    assert isinstance(exc, WorkLostError) and exc.outcome == "interrupted", exc
    assert exc.work.outcome == "interrupted"


def test_another_process_waits_on_a_work_by_its_id(worker, spawn):
    dom, _proc, task = worker
    w = task.add("oc.echo", b"far", track=True)
    other = spawn("""
        import sys
        from shm_taskwork import Domain
        dom = Domain.open(sys.argv[1])
        w = dom.work(int(sys.argv[2]))
        print(w.wait(20), w.result.decode(), flush=True)
    """, dom.name, str(w.id))
    assert readline(other, 30) == "ran echo:far"
    assert other.wait(10) == 0


@pytest.mark.asan
def test_a_retried_dead_letter_names_its_new_work(make_domain, spawn):
    dom = make_domain("ocre", pool_size=32)
    idle, task = idle_task(dom, spawn, "w")
    w = task.add("oc.echo", b"again", TWA_NONE, track=True)
    idle.kill()
    idle.wait(10)
    assert w.wait(20) == "dead_letter" and w.retried_as is None
    # a worker of the same name adopts the letter (serve(adopt=True))
    worker = spawn(WORKER, dom.name)
    readline(worker)
    wait_until(lambda: dom.work(w.id).retried_as is not None, what="the letter adopted")
    # the original stays dead_letter, and names the new work
    again = dom.work(w.id)
    assert again.outcome == "dead_letter" and again.retried_as not in (None, w.id)
    new = dom.work(again.retried_as)
    assert new.wait(20) == "ran" and new.result == b"echo:again"
    worker.send_signal(signal.SIGTERM)
    worker.wait(20)


@pytest.mark.asan
def test_outcome_records_are_bounded_by_the_outcomes_option(make_domain):
    dom = make_domain("ocring", pool_size=32, outcomes=4)
    task = dom.register("own")
    first = task.add(_echo_here, b"0", track=True)
    task.run()
    assert first.outcome == "ran"
    later = [task.add(_echo_here, bytes([i]), track=True) for i in range(3)]
    task.run()
    # three newer settled: the first is still readable from a new handle
    assert dom.work(first.id).outcome == "ran"
    task.add(_echo_here, b"4", track=True)
    task.run()
    with pytest.raises(OutcomeUnknownError, match="outcomes=4"):
        dom.work(first.id)
    # a handle that read its final outcome keeps it
    assert first.outcome == "ran" and first.result == b"here:0"
    assert all(w.outcome == "ran" for w in later)
    with pytest.raises(ValueError, match="outcomes=0 is out of range"):
        make_domain("ocbad", outcomes=0)


def test_call_on_the_callers_own_task_runs_it_meanwhile(make_domain):
    dom = make_domain("ocown", pool_size=16)
    task = dom.register("own")
    assert task.call(_echo_here, b"me", timeout=10) == b"here:me"
    assert dom.stats().pool_free == dom.pool_size


@pytest.mark.asan
def test_add_many_and_add_keyed_track_too(make_domain):
    dom = make_domain("ocmany", pool_size=16)
    task = dom.register("own")
    works = task.add_many(_echo_here, [b"a", b"b"], track=True)
    rec = task.add_keyed(_echo_here, b"k", key="k1", track=True)
    task.run()
    assert [w.wait(5) for w in works] == ["ran", "ran"]
    assert sorted(w.result for w in works) == [b"here:a", b"here:b"]
    assert dom.work(rec.work_id).wait(5) == "ran" and dom.work(rec.work_id).result == b"here:k"


def test_wait_async_awaits_the_outcome(worker):
    _dom, _proc, task = worker
    w = task.add("oc.echo", b"aio", track=True)
    assert asyncio.run(w.wait_async(20)) == "ran" and w.result == b"echo:aio"


def test_tracked_bad_input_queues_nothing(make_domain):
    dom = make_domain("ocbadin", pool_size=4, payload_size=8)
    task = dom.register("own")
    with pytest.raises(ValueError, match="payload_size"):
        task.add(_echo_here, b"x" * 9, track=True)
    assert dom.stats().pool_free == 4 and task.pending() == 0
    with pytest.raises(TypeError):
        dom.work("1")
    with pytest.raises(OutcomeUnknownError, match="pool_size=4"):
        dom.work(7)


@pytest.mark.asan
def test_a_letter_whose_filer_died_keeps_its_outcome_when_it_is_retried(make_domain, spawn):
    # A reaper killed while filing the letter (kill point in_dl_file) leaves
    # it with no record: it reads dead_letter all along, and its retry does
    # not turn the original's outcome into the new work's.
    dom = make_domain("ocdlk", pool_size=16, outcomes=64)
    idle, task = idle_task(dom, spawn, "t", install_handler=False)
    w = task.add("oc.echo", b"again", TWA_NONE, track=True)
    idle.kill()
    idle.wait(10)
    reaper = spawn("""
        import sys
        from shm_taskwork import Domain
        Domain.open(sys.argv[1]).tasks()
    """, dom.name, env={"SHM_TASKWORK_KILLPOINT": "in_dl_file:1"})
    assert reaper.wait(30) == -signal.SIGKILL
    dom.fsck(repair=True)
    assert dom.work(w.id).outcome == "dead_letter"
    me = dom.register("t", install_handler=False)
    assert dom.retry_dead_letters(to="t") == 1
    me.run()
    again = dom.work(w.id)
    assert again.outcome == "dead_letter" and again.retried_as not in (None, w.id)
    assert dom.work(again.retried_as).wait(5) == "ran"
    me.exit()
