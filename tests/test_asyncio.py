"""asyncio (docs/contract.md "In the ecosystem"): ``attach_loop``/``detach_loop``, ``wait_async``, async
callbacks; and ``Work.state`` of a cancelled handle.

Each task runs in an unrelated process with a real event loop; this process
is the supervisor that adds works (real eventfd writes, real signals) and
reads the slot counters from shared memory. Children say where they are on a
pipe; nothing sleeps to synchronise.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import time

import pytest

from conftest import wait_until

from shm_taskwork import TWA_NONE, TWA_RESUME, TWA_SIGNAL

PRELUDE = """
    import asyncio, json, sys
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("aio")
    state = {"inside": False}

    def say(*what):
        print(json.dumps(what), flush=True)
"""


_BUF: dict[tuple[int, int], bytes] = {}


def readline(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """One line of a child's stdout, with a deadline. Reads the pipe itself:
    a child here may write two lines at once, and a buffered reader would
    keep the second where select() cannot see it."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    key = (proc.pid, fd)
    buf = _BUF.get(key, b"")
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from pid {proc.pid} within {timeout}s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"pid {proc.pid} closed its stdout (rc={proc.poll()})")
        buf += chunk
    line, _, _BUF[key] = buf.partition(b"\n")
    return line.decode().strip()


def say(line: str):
    return json.loads(line)


def info(dom, task_id):
    return next(t for t in dom.tasks() if t.id == task_id)


# ---- SIGNAL at a safe point of the loop ----------------------------------------------

SAFE_POINT = PRELUDE + """
    @callback(name="t.where")
    def where(work):
        state["ran"] = True
        say("ran", state["inside"])

    async def main():
        if sys.argv[2] == "attached":
            task.attach_loop()
        state["inside"] = True
        say("ready", task.id)
        sys.stdin.readline()              # "sent": the signal is delivered by now
        x = 0
        for i in range(200000):           # a stretch of bytecode: a handler that runs
            x += i                        # between bytecodes runs in here
        state["inside"] = False
        await asyncio.sleep(0)            # the loop's turn
        while not state.get("ran"):
            await task.wait_async(timeout=30)

    asyncio.run(main())
    task.exit()
"""


@pytest.mark.parametrize("mode", ["attached", "plain"])
def test_signal_works_run_at_a_safe_point_of_an_attached_loop(domain, spawn, mode):
    child = spawn(SAFE_POINT, domain.name, mode, stdin=subprocess.PIPE)
    tag, tid = say(readline(child))
    assert tag == "ready"
    domain.task(tid).add("t.where", b"", TWA_SIGNAL)
    child.stdin.write("sent\n")
    child.stdin.flush()
    ran = say(readline(child))
    # attached: after the coroutine yielded; plain: the Python-level handler,
    # between two bytecodes of the coroutine (the contrast shows the test sees it)
    assert ran == ["ran", mode == "plain"]
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err


# ---- RESUME from the loop's reader, async callbacks -----------------------------------

ASYNC_CB = PRELUDE + """
    release = None

    @callback(name="t.hold")
    async def hold(work):
        say("started", work.payload.decode())
        await release.wait()
        say("finished", work.payload.decode())

    @callback(name="t.release")
    def do_release(work):
        release.set()

    @callback(name="t.fail")
    async def fail(work):
        await asyncio.sleep(0)
        raise RuntimeError("async boom")

    async def main():
        global release
        release = asyncio.Event()
        task.attach_loop()
        say("ready", task.id)
        while True:
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if line.strip() != "more":
                break
            say("ok")
        task.detach_loop()

    asyncio.run(main())
    task.exit()
"""


def test_async_callbacks_are_counted_when_their_coroutine_ends(domain, spawn):
    child = spawn(ASYNC_CB, domain.name, stdin=subprocess.PIPE)
    tag, tid = say(readline(child))
    task = domain.task(tid)
    task.add("t.hold", b"h1", TWA_RESUME)
    assert say(readline(child)) == ["started", "h1"]
    # begun, not finished: not counted yet, its node still held (RUNNING)
    t = info(domain, tid)
    assert (t.run, t.errors, t.pending) == (0, 0, 0)
    assert domain.stats().pool_used == 1
    held = task.add("t.hold", b"h2", TWA_NONE)      # waits for the next run
    task.add("t.release", b"", TWA_RESUME)           # that run: releases both
    got = sorted(tuple(say(readline(child))) for _ in range(3))
    assert got == [("finished", "h1"), ("finished", "h2"), ("started", "h2")]
    wait_until(lambda: info(domain, tid).run == 3, what="three works counted run")
    assert held.state == "pending"                   # ran elsewhere: not tracked here
    task.add("t.fail", b"", TWA_RESUME)
    wait_until(lambda: info(domain, tid).errors == 1, what="the failed coroutine counted")
    st = domain.stats()
    assert st.pool_free == st.pool_size
    child.stdin.write("done\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "RuntimeError: async boom" in err
    assert "never awaited" not in err


NO_LOOP = """
    import sys, warnings
    warnings.simplefilter("error")                   # a never-awaited coroutine would fail
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("plain")

    @callback(name="t.async")
    async def handler(work):
        print("must not run", flush=True)

    print(task.id, flush=True)
    sys.stdin.readline()
    print(task.run(), flush=True)
    task.exit()
"""


def test_an_async_callback_without_a_loop_is_a_counted_error(domain, spawn):
    child = spawn(NO_LOOP, domain.name, stdin=subprocess.PIPE)
    tid = int(readline(child))
    domain.task(tid).add("t.async", b"", TWA_NONE)
    child.stdin.write("run\n")
    child.stdin.flush()
    assert readline(child) == "0"                    # not run
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "must not run" not in out
    assert "async callback needs an attached loop" in err
    assert "never awaited" not in err and "RuntimeWarning" not in err
    t = info(domain, tid)
    assert t.errors == 1
    st = domain.stats()
    assert st.pool_free == st.pool_size


# ---- wait_async -------------------------------------------------------------------------

WAIT_ASYNC = PRELUDE + """
    @callback(name="t.note")
    def note(work):
        pass

    async def ticker():
        while True:
            say("tick")
            await asyncio.sleep(0.01)

    async def main():
        say("ready", task.id)
        t = asyncio.get_running_loop().create_task(ticker())
        for _ in range(3):
            say("waited", await task.wait_async(timeout=60))
        say("timeout", await task.wait_async(timeout=0.01))
        t.cancel()

    asyncio.run(main())
    task.exit()
"""


def test_wait_async_lets_the_loop_run_and_wakes_on_resume_and_signal(domain, spawn):
    child = spawn(WAIT_ASYNC, domain.name)
    tag, tid = say(readline(child))
    task = domain.task(tid)
    for notify in (TWA_RESUME, TWA_SIGNAL, TWA_RESUME):
        # the loop keeps running other coroutines while wait_async waits
        assert say(readline(child)) == ["tick"]
        task.add("t.note", b"", notify)
        while (msg := say(readline(child))) == ["tick"]:
            pass
        assert msg == ["waited", 1]
    while (msg := say(readline(child))) == ["tick"]:
        pass
    assert msg == ["timeout", 0]
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err


# ---- Work.state ---------------------------------------------------------------------------

def test_work_state_follows_every_cancel(domain, spawn):
    child = spawn("""
        import sys
        from shm_taskwork import Domain
        dom = Domain.open(sys.argv[1])
        task = dom.register("idle")
        print(task.id, flush=True)
        sys.stdin.read()
        task.exit()
    """, domain.name, stdin=subprocess.PIPE)
    task = domain.task(int(readline(child)))
    a, b, c, d = (task.add(f"t.{x}", b"", TWA_NONE) for x in "abcd")
    assert {w.state for w in (a, b, c, d)} == {"pending"}
    assert task.cancel(a) is True and a.state == "cancelled"
    assert task.cancel(a) is False and a.state == "cancelled"
    got = task.cancel_func("t.b")
    assert got == b and got.state == "cancelled" and b.state == "cancelled"
    got = task.cancel_match(lambda w: w.func_name == "t.c")
    assert got == c and c.state == "cancelled"
    assert d.state == "pending"
    assert task.pending() == 1
    child.communicate(timeout=30)
