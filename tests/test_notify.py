"""Every notify mode between unrelated processes (docs/contract.md "Adding, running, cancelling", the notify table).

The task is always a separate Python interpreter started with subprocess (not
a fork): it opens the domain by name, registers, prints ``ready ...`` and then
obeys one-line commands on stdin (block in ``wait()``, sleep, spin, select,
run an asyncio loop, ...). Its callbacks print ``ran PAYLOAD WHERE`` with
``os.write`` (safe inside a signal handler), WHERE being ``handler`` when the
callback runs inside a signal handler's frame and ``safe`` otherwise. The test
process is the adder; it is not registered in the domain.

No sleep synchronises anything: every step waits for a line from the child
with a deadline, or polls /proc for the child being blocked in a system call.
A C program (tests/c/nmi_handler.c) checks that ``tw_add_nmi`` can be called
from a C signal handler, also while it interrupts the same process's own adds.
"""
from __future__ import annotations

import errno
import os
import platform
import select
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI,
                          InvalidModeError, TaskExitedError)
from shm_taskwork._native import lib

from conftest import wait_until

TIMEOUT = 20.0
HERE = os.path.dirname(os.path.abspath(__file__))
REC = "test.notify.rec"      # records the payload (and pokes the child's self-pipe)
WAKE = "test.notify.wake"    # records, then raises out of whatever was interrupted

# ---- the child ---------------------------------------------------------------

PRELUDE = r'''
import asyncio, os, select, selectors, signal, sys, time
from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL,
                          TWA_SIGNAL_NO_IPI, Domain, callback)
from shm_taskwork._native import lib

# Frames that are signal handlers: the package's and the test's own.
HANDLERS = {"_on_signal", "on_usr2"}


def out(*parts):
    # os.write, not print: a callback may run inside a signal handler while
    # the main code is itself writing.
    os.write(1, (" ".join(str(p) for p in parts) + "\n").encode())


def in_handler():
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in HANDLERS:
            return True
        f = f.f_back
    return False


def eventfd_info(fd):
    """(counter, id) of an eventfd from /proc/self/fdinfo (id None if not shown)."""
    count, ident = None, None
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                count = int(line.split()[1], 16)
            elif line.startswith("eventfd-id:"):
                ident = int(line.split()[1])
    return count, ident


RAN = []
PIPE_R, PIPE_W = os.pipe()      # a self-pipe the callbacks poke
os.set_blocking(PIPE_W, False)
os.set_blocking(PIPE_R, False)


class Wake(BaseException):
    """Raised by a callback to leave the call its signal handler interrupted."""


@callback(name="test.notify.rec")
def rec(work):
    where = "handler" if in_handler() else "safe"
    RAN.append((work.payload.decode(), where))
    out("ran", work.payload.decode(), where)
    try:
        os.write(PIPE_W, b"x")
    except BlockingIOError:
        pass


@callback(name="test.notify.wake")
def wake(work):
    where = "handler" if in_handler() else "safe"
    RAN.append((work.payload.decode(), where))
    out("ran", work.payload.decode(), where)
    raise Wake()
'''

AGENT = PRELUDE + r'''
dom = Domain.open(sys.argv[1])
task = dom.register(name=sys.argv[2])
NMI = [0]


def on_usr2(signum, frame):
    # TWA_NMI_CURRENT from inside a Python signal handler: queued here, run
    # later at a safe point - never inside this handler.
    NMI[0] += 1
    before = len(RAN)
    task.add(rec, f"nmi{NMI[0]}".encode(), TWA_NMI_CURRENT)
    out("nmi-added", before, len(RAN))


signal.signal(signal.SIGUSR2, on_usr2)


def drain_pipe():
    try:
        while os.read(PIPE_R, 4096):
            pass
    except BlockingIOError:
        pass


async def aloop(n):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    total = [0]

    def on_ready():
        total[0] += task.run()     # the loop's safe point
        if total[0] >= n and not done.done():
            done.set_result(total[0])

    loop.add_reader(task.fileno(), on_ready)
    out("looping")
    try:
        return await asyncio.wait_for(done, 20)
    finally:
        loop.remove_reader(task.fileno())


count, ident = eventfd_info(task.fileno())
out("ready", task.id, task.fileno(), os.getpid(), ident)
while True:
    line = sys.stdin.readline()
    if not line:
        os._exit(3)          # the test is gone
    op, *arg = line.split()
    if op == "checkpoint":
        out("checkpoint", task.checkpoint())
    elif op == "run":
        out("run", task.run())
    elif op == "wait":
        out("waiting")
        out("waited", task.wait(float(arg[0])))
    elif op == "count":
        out("count", len(RAN))
    elif op == "efd":
        count, _ = eventfd_info(task.fileno())
        readable = bool(select.select([task.fileno()], [], [], 0)[0])
        out("efd", count, int(readable))
    elif op == "flags":
        out("flags", lib.tw_flags_get(dom.d, task.id))
    elif op == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        out("blocked")
    elif op == "sigpending":
        out("sigpending", int(signal.SIGUSR1 in signal.sigpending()))
    elif op == "unblock":
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        out("unblocked", len(RAN))
    elif op == "raise":
        signal.raise_signal(getattr(signal, arg[0]))
        out("raised", len(RAN))
    elif op == "sleep":
        out("sleeping")
        try:
            time.sleep(30)
        except Wake:
            out("woke")
        else:
            out("slept")
    elif op == "spin":
        n0 = len(RAN)
        out("spinning")
        i = 0
        while len(RAN) == n0:      # pure Python: only a signal handler can end it
            i += 1
        out("spun", RAN[-1][1])
    elif op == "select":
        drain_pipe()
        out("selecting")
        ready = select.select([PIPE_R], [], [], 30)[0]
        out("selected", len(ready))
    elif op == "selector":
        want, got = int(arg[0]), 0
        with selectors.DefaultSelector() as sel:
            sel.register(task.fileno(), selectors.EVENT_READ)
            out("looping")
            deadline = time.monotonic() + 20
            while got < want and time.monotonic() < deadline:
                if sel.select(timeout=deadline - time.monotonic()):
                    got += task.checkpoint()     # the loop's safe point
        out("looped", got)
    elif op == "asyncio":
        out("looped", asyncio.run(aloop(int(arg[0]))))
    elif op == "stopserver":
        task._server.stop()
        task._server.join(10)
        out("stopped", int(task._server.is_alive()))
    elif op == "exit":
        task.exit()
        out("exited", len(RAN))
    elif op == "quit":
        task.exit()
        dom.close()
        out("bye")
        sys.exit(0)
    else:
        out("unknown-command", op)
'''

SENDER = r'''
import os, sys
from shm_taskwork import TWA_RESUME, Domain
from shm_taskwork._native import lib


def eventfd_id(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-id:"):
                return int(line.split()[1])
    return None


dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
probe = "-"
if sys.argv[4] == "probe":
    # Is pidfd_getfd allowed between these two unrelated processes at all?
    pidfd = os.pidfd_open(t.pid)
    r = lib.tw_pidfd_getfd(pidfd, int(sys.argv[5]))
    probe = "ok" if r >= 0 else f"errno{-r}"
    if r >= 0:
        os.close(r)
    os.close(pidfd)
t.add("test.notify.rec", sys.argv[3].encode(), TWA_RESUME)
_pidfd, efd = dom._peer.get((t.id, t.gen), (-1, -1))
print("sent", efd, eventfd_id(efd) if efd >= 0 else None, probe, flush=True)
dom.close()
'''


class Child:
    """One unrelated task process; every read has a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.ran: list[tuple[str, str]] = []   # (payload, where), in order
        self.seen: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fail(self, why: str):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            err = "?"
        raise AssertionError(f"task process {self.pid}: {why}; lines so far {self.seen[-20:]}; "
                             f"stderr: {(err or '')[-3000:]}")

    def line(self, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"no output within {timeout}s")
            if not select.select([self.fd], [], [], left)[0]:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.fail("exited")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        text = raw.decode()
        self.seen.append(text)
        return text

    def expect(self, word: str, timeout: float = TIMEOUT) -> list[str]:
        """The next reply (``ran`` lines on the way are collected in ``ran``);
        it must start with ``word``. Returns its other fields."""
        while True:
            fields = self.line(timeout).split()
            if fields and fields[0] == "ran":
                self.ran.append((fields[1], fields[2]))
                continue
            if not fields or fields[0] != word:
                self.fail(f"expected {word!r}, got {fields}")
            return fields[1:]

    def expect_ran(self, n: int, timeout: float = TIMEOUT) -> list[tuple[str, str]]:
        while len(self.ran) < n:
            fields = self.line(timeout).split()
            if fields and fields[0] == "ran":
                self.ran.append((fields[1], fields[2]))
            else:
                self.fail(f"expected a 'ran' line, got {fields}")
        return self.ran

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str, reply: str | None = None) -> list[str]:
        self.send(command)
        return self.expect(reply or command)

    def quit(self) -> None:
        self.ask("quit", "bye")
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("did not exit")
        if rc != 0:
            self.fail(f"exited with {rc}")


@pytest.fixture
def agent(spawn):
    """start(domain, name) -> a Child that has registered as a task."""

    def start(dom, name: str = "agent", env: dict | None = None) -> Child:
        c = Child(spawn(AGENT, dom.name, name, env=env, stdin=subprocess.PIPE))
        tid, efd, pid, ident = c.expect("ready")
        c.id, c.efd = int(tid), int(efd)
        c.eventfd_id = None if ident == "None" else int(ident)
        assert int(pid) == c.pid
        return c

    return start


# ---- helpers -------------------------------------------------------------------

# System call numbers of "blocked in select/poll" and "blocked in a sleep".
_SYSCALLS = {
    "x86_64": {"select": {7, 23, 270, 271}, "sleep": {35, 230}},
    "aarch64": {"select": {72, 73}, "sleep": {101, 115}},
}


def wait_blocked(pid: int, kind: str) -> None:
    """Poll /proc/PID/syscall until the process's main thread sleeps in a
    system call of ``kind``: then a notification sent now finds it there."""
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        pytest.skip(f"no system call table for {platform.machine()}")

    def blocked() -> bool:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                first = f.read().split()[:1]
        except OSError:
            return False
        return bool(first) and first[0].isdigit() and int(first[0]) in table[kind]

    wait_until(blocked, TIMEOUT, what=f"pid {pid} blocked in {kind}")


def info(dom, task_id: int):
    return next(i for i in dom.tasks() if i.id == task_id)


def settled(dom) -> None:
    """Nothing in flight: every added work was run or cancelled, no node lost."""
    st = dom.stats()
    assert st.added == st.run + st.cancelled, st
    assert st.pending == 0, st
    assert st.pool_free == st.pool_size, st


# ---- TWA_RESUME ------------------------------------------------------------------

def test_resume_wakes_a_task_blocked_in_wait(domain, agent):
    c = agent(domain)
    c.send("wait 30")
    c.expect("waiting")
    wait_blocked(c.pid, "select")
    w = domain.task(c.id).add(REC, b"r1", TWA_RESUME)
    assert w.sender_pid == os.getpid() and w.target == c.id
    assert c.expect("waited") == ["1"]
    assert c.ran == [("r1", "safe")]
    t = info(domain, c.id)
    assert (t.added, t.run, t.resumes_sent, t.signals_sent) == (1, 1, 1, 0)
    c.quit()
    settled(domain)


def test_resume_wakes_a_selector_loop_on_fileno(domain, agent):
    c = agent(domain)
    c.send("selector 2")
    c.expect("looping")
    t = domain.task(c.id)
    t.add(REC, b"s1", TWA_RESUME)
    c.expect_ran(1)
    t.add(REC, b"s2", TWA_RESUME)
    assert c.expect("looped") == ["2"]
    assert c.ran == [("s1", "safe"), ("s2", "safe")]
    c.quit()
    settled(domain)


def test_resume_wakes_an_asyncio_loop_on_fileno(domain, agent):
    c = agent(domain)
    c.send("asyncio 3")
    c.expect("looping")
    t = domain.task(c.id)
    for p in (b"a1", b"a2", b"a3"):
        t.add(REC, p, TWA_RESUME)
    assert c.expect("looped") == ["3"]
    assert sorted(c.ran) == [("a1", "safe"), ("a2", "safe"), ("a3", "safe")]
    c.quit()
    settled(domain)


def test_resume_work_is_not_run_by_the_signal_handler(domain, agent):
    """The task's signal arrives while RESUME work waits: the handler runs
    only what NOTIFY_SIGNAL announced, so the RESUME work waits for the safe
    point."""
    c = agent(domain)
    domain.task(c.id).add(REC, b"resume", TWA_RESUME)
    assert c.ask("raise SIGUSR1", "raised") == ["0"]   # handler ran, work did not
    assert c.ask("checkpoint") == ["1"]
    assert c.ran == [("resume", "safe")]
    c.quit()
    settled(domain)


def test_resume_coalesces_and_loses_no_wakeup(domain, agent):
    c = agent(domain)
    t = domain.task(c.id)
    for i in range(5):
        t.add(REC, f"c{i}".encode(), TWA_RESUME)
    # One eventfd write for five adds: the flag was already set.
    assert info(domain, c.id).resumes_sent == 1
    assert c.ask("efd") == ["1", "1"]
    assert c.ask("checkpoint") == ["5"]
    assert c.ask("efd") == ["0", "0"]
    # The run cleared the flag: the next add writes again.
    t.add(REC, b"after", TWA_RESUME)
    assert info(domain, c.id).resumes_sent == 2
    assert c.ask("efd") == ["1", "1"]
    assert c.ask("wait 30", "waiting") == []
    assert c.expect("waited") == ["1"]
    # add_many: one push, one notification.
    t.add_many(REC, [b"m1", b"m2", b"m3"], TWA_RESUME)
    assert info(domain, c.id).resumes_sent == 3
    assert c.ask("efd") == ["1", "1"]
    assert c.ask("checkpoint") == ["3"]
    assert len(c.ran) == 9 and all(where == "safe" for _, where in c.ran)
    c.quit()
    settled(domain)


# ---- TWA_SIGNAL ------------------------------------------------------------------

def test_signal_interrupts_time_sleep(domain, agent):
    c = agent(domain)
    c.send("sleep")
    c.expect("sleeping")
    wait_blocked(c.pid, "sleep")
    domain.task(c.id).add(WAKE, b"sleep", TWA_SIGNAL)
    # The callback ran inside the handler, and its exception came out of
    # time.sleep(30): the sleep was interrupted, not waited out.
    assert c.expect("woke") == []
    assert c.ran == [("sleep", "handler")]
    t = info(domain, c.id)
    assert (t.added, t.run, t.errors, t.signals_sent, t.resumes_sent) == (1, 1, 1, 1, 0)
    c.quit()
    settled(domain)


def test_signal_interrupts_a_busy_python_loop(domain, agent):
    c = agent(domain)
    c.send("spin")
    c.expect("spinning")
    domain.task(c.id).add(REC, b"spin", TWA_SIGNAL)
    assert c.expect("spun") == ["handler"]
    assert c.ran == [("spin", "handler")]
    c.quit()
    settled(domain)


def test_signal_interrupts_select(domain, agent):
    c = agent(domain)
    c.send("select")
    c.expect("selecting")
    wait_blocked(c.pid, "select")
    domain.task(c.id).add(REC, b"sel", TWA_SIGNAL)
    assert c.expect("selected") == ["1"]   # the handler's callback poked the pipe
    assert c.ran == [("sel", "handler")]
    c.quit()
    settled(domain)


@pytest.mark.asan
def test_signal_coalesces_while_the_signal_is_pending(domain, agent):
    c = agent(domain)
    t = domain.task(c.id)
    c.ask("block", "blocked")
    for i in range(5):
        t.add(REC, f"s{i}".encode(), TWA_SIGNAL)
    assert info(domain, c.id).signals_sent == 1       # sent once: the flag was set
    assert c.ask("sigpending") == ["1"]
    # Unblocked, the one signal runs all five works, inside the handler.
    assert c.ask("unblock", "unblocked") == ["5"]
    assert sorted(c.ran) == [(f"s{i}", "handler") for i in range(5)]
    # The run cleared the flag: the next add signals again (nothing lost).
    t.add(REC, b"again", TWA_SIGNAL)
    assert info(domain, c.id).signals_sent == 2
    c.expect_ran(6)
    assert c.ran[-1] == ("again", "handler")
    # add_many: one push, one signal.
    c.ask("block", "blocked")
    t.add_many(REC, [b"b1", b"b2", b"b3", b"b4"], TWA_SIGNAL)
    assert info(domain, c.id).signals_sent == 3
    assert c.ask("unblock", "unblocked") == ["10"]
    c.quit()
    settled(domain)


def test_signal_to_a_dead_task_signals_no_one(domain, agent, spawn):
    """A SIGKILLed task is dead from the first add after its death: a SIGNAL
    add raises TaskExitedError and reaches no process - not even when its pid
    now belongs to another process (pid reuse, simulated by writing a
    stranger's pid into the slot)."""
    dead = agent(domain, "dead")
    reused = agent(domain, "reused")
    # The stranger blocks SIGUSR1, so a signal sent to it stays visible as pending.
    stranger = Child(spawn(PRELUDE + textwrap.dedent(r'''
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        out("ready")
        while True:
            op = sys.stdin.readline().split()
            if not op:
                os._exit(3)
            if op[0] == "sigpending":
                out("sigpending", int(signal.SIGUSR1 in signal.sigpending()))
            elif op[0] == "register":
                dom = Domain.open(sys.argv[1])
                task = dom.register(name="stranger")
                out("registered", task.id)
            elif op[0] == "unblock":
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
                out("unblocked", len(RAN))
    '''), domain.name, stdin=subprocess.PIPE))
    stranger.expect("ready")
    for c in (dead, reused):
        c.proc.kill()
        c.proc.wait(timeout=TIMEOUT)
    h_dead, h_reused = domain._handle(dead.id, domain._slot(dead.id)), \
        domain._handle(reused.id, domain._slot(reused.id))
    domain._slot(reused.id).pid = stranger.pid        # the pid "was reused"
    with pytest.raises(TaskExitedError):
        h_dead.add(REC, b"to-the-dead", TWA_SIGNAL)
    with pytest.raises(TaskExitedError):
        h_reused.add(REC, b"to-a-reused-pid", TWA_SIGNAL)
    assert stranger.ask("sigpending") == ["0"]         # no signal anywhere
    # The same check is able to see a signal: one sent to the stranger as a task.
    sid = int(stranger.ask("register", "registered")[0])
    domain.task(sid).add(REC, b"to-the-stranger", TWA_SIGNAL)
    assert stranger.ask("sigpending") == ["1"]
    assert stranger.ask("unblock", "unblocked") == ["1"]
    assert stranger.ran == [("to-the-stranger", "handler")]


# ---- TWA_SIGNAL_NO_IPI ------------------------------------------------------------

def test_signal_no_ipi_sets_the_flag_but_interrupts_nothing(domain, agent):
    c = agent(domain)
    t = domain.task(c.id)
    c.ask("block", "blocked")     # a signal, if one were sent, would stay pending
    t.add(REC, b"quiet", TWA_SIGNAL_NO_IPI)
    assert c.ask("sigpending") == ["0"]
    assert c.ask("count") == ["0"]
    assert c.ask("efd") == ["0", "0"]
    assert int(c.ask("flags")[0]) & lib.TW_F_NOTIFY_SIGNAL
    assert c.ask("unblock", "unblocked") == ["0"]
    i = info(domain, c.id)
    assert (i.signals_sent, i.resumes_sent, i.pending) == (0, 0, 1)
    # It runs when the task next checks.
    assert c.ask("checkpoint") == ["1"]
    assert c.ran == [("quiet", "safe")]
    # ... and wait() checks first, so it returns at once.
    t.add(REC, b"quiet2", TWA_SIGNAL_NO_IPI)
    c.ask("wait 30", "waiting")
    assert c.expect("waited") == ["1"]
    assert c.ran[-1] == ("quiet2", "safe")
    c.quit()
    settled(domain)


# ---- TWA_NONE ----------------------------------------------------------------------

def test_none_runs_only_at_run_or_exit(domain, agent):
    c = agent(domain)
    t = domain.task(c.id)
    t.add(REC, b"n1", TWA_NONE)
    assert c.ask("checkpoint") == ["0"]
    assert c.ask("efd") == ["0", "0"]
    c.ask("wait 0.05", "waiting")
    assert c.expect("waited") == ["0"]
    assert c.ask("run") == ["1"]
    assert c.ran == [("n1", "safe")]
    # Another notification makes the next checkpoint run it too.
    t.add(REC, b"n2", TWA_NONE)
    t.add(REC, b"r", TWA_RESUME)
    assert c.ask("checkpoint") == ["2"]
    # exit() runs what is left, then refuses new work.
    t.add(REC, b"n3", TWA_NONE)
    assert c.ask("exit", "exited") == ["4"]
    assert c.ran[-1] == ("n3", "safe")
    with pytest.raises(TaskExitedError):
        t.add(REC, b"late", TWA_NONE)
    i = info(domain, c.id)
    assert (i.state, i.resumes_sent, i.signals_sent) == ("exited", 1, 0)
    settled(domain)


# ---- TWA_NMI_CURRENT ------------------------------------------------------------------

def test_nmi_current_from_a_python_signal_handler_runs_at_the_next_safe_point(domain, agent):
    c = agent(domain)
    # raise_signal runs the handler synchronously: it queues, runs nothing.
    c.send("raise SIGUSR2")
    assert c.expect("nmi-added") == ["0", "0"]
    assert c.expect("raised") == ["0"]
    assert c.ask("efd") == ["1", "1"]           # the own eventfd was written
    assert c.ask("checkpoint") == ["1"]
    assert c.ran == [("nmi1", "safe")]
    # From another process's signal, while the task sleeps in wait().
    c.send("wait 30")
    c.expect("waiting")
    wait_blocked(c.pid, "select")
    os.kill(c.pid, signal.SIGUSR2)
    assert c.expect("nmi-added") == ["1", "1"]
    assert c.expect("waited") == ["1"]
    assert c.ran[-1] == ("nmi2", "safe")
    i = info(domain, c.id)
    assert (i.added, i.run, i.resumes_sent, i.signals_sent) == (2, 2, 2, 0)
    c.quit()
    settled(domain)


def test_nmi_current_aimed_at_another_process_is_einval(domain, agent):
    c = agent(domain)
    free = domain.stats().pool_free
    with pytest.raises(InvalidModeError) as ei:
        domain.task(c.id).add(REC, b"x", TWA_NMI_CURRENT)
    assert ei.value.errno == errno.EINVAL
    assert isinstance(ei.value, ValueError)
    assert domain.stats().pool_free == free
    i = info(domain, c.id)
    assert (i.added, i.pending, i.resumes_sent) == (0, 0, 0)
    assert c.ask("count") == ["0"]
    c.quit()
    settled(domain)


# ---- getting the eventfd of an unrelated process ------------------------------------------

def _send(spawn, dom, c: Child, payload: str, *, scm: bool, probe: bool = False) -> list[str]:
    env = {"SHM_TASKWORK_FD_PASSING": "scm" if scm else ""}
    p = spawn(SENDER, dom.name, str(c.id), payload, "probe" if probe else "-", str(c.efd),
              env=env)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    fields = out.split()
    assert fields[0] == "sent", out
    return fields[1:]          # efd, eventfd id, probe


@pytest.mark.parametrize("path", ["default", "scm"])
def test_an_unrelated_sender_wakes_wait_through_either_fd_path(domain, agent, spawn, path):
    c = agent(domain)
    c.send("wait 30")
    c.expect("waiting")
    wait_blocked(c.pid, "select")
    efd, ident, _ = _send(spawn, domain, c, "via-" + path, scm=path == "scm")
    assert int(efd) >= 0
    if c.eventfd_id is not None:
        # The sender holds the task's own eventfd, not some other one.
        assert int(ident) == c.eventfd_id
    assert c.expect("waited") == ["1"]
    assert c.ran == [("via-" + path, "safe")]
    c.quit()
    settled(domain)


def test_the_two_fd_paths_are_distinct(domain, agent, spawn):
    """With the task's fd server stopped, a sender forced onto SCM_RIGHTS
    cannot obtain the eventfd (the add still succeeds, the wake-up is not
    delivered), while a default sender still can: through pidfd_getfd."""
    c = agent(domain)
    assert c.ask("stopserver", "stopped") == ["0"]
    efd, _, _ = _send(spawn, domain, c, "scm-lost", scm=True)
    assert efd == "-1"
    assert c.ask("efd") == ["0", "0"]                       # no wake-up arrived
    assert int(c.ask("flags")[0]) & lib.TW_F_NOTIFY_RESUME  # though it was due
    assert c.ask("checkpoint") == ["1"]                     # the work itself is safe
    efd, ident, probe = _send(spawn, domain, c, "getfd", scm=False, probe=True)
    if probe != "ok":
        pytest.skip(f"pidfd_getfd is not permitted between unrelated processes here ({probe})")
    assert int(efd) >= 0
    if c.eventfd_id is not None:
        assert int(ident) == c.eventfd_id
    assert c.ask("efd") == ["1", "1"]
    assert c.ask("checkpoint") == ["1"]
    assert c.ran == [("scm-lost", "safe"), ("getfd", "safe")]
    c.quit()
    settled(domain)


# ---- wait() ------------------------------------------------------------------------------

def test_wait_returns_zero_on_timeout_and_counts_what_the_handler_ran(domain, agent):
    c = agent(domain)
    c.ask("wait 0.05", "waiting")
    assert c.expect("waited") == ["0"]
    c.send("wait 30")
    c.expect("waiting")
    wait_blocked(c.pid, "select")
    domain.task(c.id).add_many(REC, [b"h1", b"h2"], TWA_SIGNAL)
    # wait() counts the works run during it, whoever ran them: the signal
    # handler, or wait() itself, woken through the eventfd by the adder that
    # saw WAITING (SIGNAL works get RESUME's guarantee; README "TWA_SIGNAL is
    # never stranded"). Either way both ran once, in one context.
    assert c.expect("waited") == ["2"]
    assert sorted(w for w, _ in c.ran) == ["h1", "h2"]
    assert len({where for _, where in c.ran}) == 1
    c.quit()
    settled(domain)


# ---- the C function for C signal handlers ---------------------------------------------------

@pytest.fixture(scope="module")
def nmi_program(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build tests/c/nmi_handler.c")
    exe = tmp_path_factory.mktemp("nmi") / "nmi_handler"
    cmd = [gcc, "-O2", "-std=gnu11", "-Wall", "-rdynamic",
           "-I", os.path.join(os.path.dirname(HERE), "native"),
           os.path.join(HERE, "c", "nmi_handler.c"), "-o", str(exe), "-ldl", "-lrt"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return str(exe)


def _run_c(nmi_program, dom, mode: str, other) -> dict:
    from shm_taskwork import _taskwork_cffi
    from shm_taskwork.callbacks import func_id
    r = subprocess.run([nmi_program, _taskwork_cffi.__file__, dom.name, str(func_id(REC)),
                        mode, str(other.id), str(other.gen)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout, r.stderr)
    return {k: int(v) for k, v in (f.split("=") for f in r.stdout.split()[1:])}


@pytest.mark.asan
def test_tw_add_nmi_from_a_c_signal_handler(domain, nmi_program):
    """A C program (no Python in it) dlopen()s the extension, maps the domain,
    registers its own task and raises SIGUSR2; the C handler calls tw_add_nmi.
    The eventfd becomes readable, the handler ran nothing, and the program's
    own run finds the one work. Aimed at a task of another process, the same
    call is EINVAL and queues nothing."""
    other = domain.register(name="python-side", install_handler=False)
    try:
        got = _run_c(nmi_program, domain, "once", other)
        assert got["handler_adds"] == 1 and got["ran"] == 1
        assert other.pending() == 0
        c_task = info(domain, got["slot"])
        assert c_task.state == "exited"
        assert (c_task.added, c_task.run, c_task.resumes_sent, c_task.signals_sent) == (1, 1, 1, 0)
    finally:
        other.exit()
    settled(domain)


def test_tw_add_nmi_interrupting_the_processs_own_adds_and_runs(make_domain, nmi_program):
    """A timer signal fires every 100 us while the program adds (TWA_NONE) and
    runs its own list in a loop; each time the C handler calls tw_add_nmi,
    interrupting free-list pops and pushes, list pushes and detaches of the
    same process. Every work is accounted for and every node comes back."""
    dom = make_domain("nmi", pool_size=4096)
    other = dom.register(name="python-side", install_handler=False)
    try:
        got = _run_c(nmi_program, dom, "storm", other)
    finally:
        other.exit()
    assert got["handler_adds"] >= 1000 and got["main_adds"] >= 1000
    assert got["ran"] == got["handler_adds"] + got["main_adds"]
    c_task = info(dom, got["slot"])
    assert (c_task.added, c_task.run) == (got["ran"], got["ran"])
    assert c_task.resumes_sent == got["resume_due"]
    assert c_task.signals_sent == 0
    settled(dom)
