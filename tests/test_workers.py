"""Workers in production (README "Workers in production"): serve(), a stop
that loses nothing, adoption, systemd's notify protocol, the worker command,
works in progress, the states operators act on, failed callbacks kept.

Real processes throughout: workers are unrelated processes started with
subprocess (``shm-taskwork worker``), stopped with real signals; systemd is a
real NOTIFY_SOCKET datagram socket bound by the test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from shm_taskwork import TWA_NONE, TWA_RESUME, Domain, callback

from conftest import ROOT, readline, wait_until

TIMEOUT = 30

# The callbacks a worker imports (-m workmod): each run is appended, as one
# line, to the file named by $WORK_LOG, so the test can count exactly-once.
WORKMOD = '''
import os, time
from shm_taskwork import callback

def _log(kind, work):
    with open(os.environ["WORK_LOG"], "a") as f:
        f.write(f"{kind} {work.payload.decode()} {os.getpid()}\\n")

@callback(name="wk.fast")
def fast(work):
    _log("fast", work)

@callback(name="wk.slow")
def slow(work):
    time.sleep(float(os.environ.get("SLOW_S", "0.2")))
    _log("slow", work)
'''


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "workmod.py").write_text(WORKMOD)
    return tmp_path


def start_worker(dom_name: str, name: str, workdir, *extra: str, env: dict | None = None,
                 ) -> subprocess.Popen:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["WORK_LOG"] = str(workdir / "ran.log")
    e.pop("NOTIFY_SOCKET", None)
    if env:
        e.update(env)
    return subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "worker", dom_name, name,
                             "-m", "workmod", *extra], cwd=str(workdir), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serving(dom: Domain, name: str, pid: int) -> int:
    """Wait until the worker's task is registered; its id."""
    def find():
        for t in dom.tasks(reap=False):
            if t.name == name and t.pid == pid and t.state == "running":
                return t.id + 1
        return 0
    return wait_until(find, TIMEOUT, what=f"worker {name} to register") - 1


def ran(workdir) -> list[str]:
    path = workdir / "ran.log"
    if not path.exists():
        return []
    return [line.split()[1] for line in path.read_text().splitlines()]


def finish(p: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"worker did not stop: {err}")
    return p.returncode, err


def test_sigterm_drains_the_queue_and_exits_0(make_domain, workdir):
    """The README's worker with three TWA_NONE works queued, stopped with
    SIGTERM (systemctl stop, docker stop): before, exit 143 and 3 orphaned
    letters. Now the queue runs, the exited sentinel is installed, exit 0."""
    dom = make_domain("drain")
    p = start_worker(dom.name, "w", workdir)
    tid = serving(dom, "w", p.pid)
    t = dom.task(tid)
    for i in range(3):
        t.add("wk.fast", f"n{i}".encode(), TWA_NONE)
    p.send_signal(signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 0, err
    assert sorted(ran(workdir)) == ["n0", "n1", "n2"]
    assert dom.dead_letters() == []
    assert [i.state for i in dom.tasks() if i.id == tid] == ["exited"]


def test_a_drain_deadline_leaves_shutdown_letters_that_the_next_worker_adopts(make_domain,
                                                                            workdir):
    dom = make_domain("deadline", pool_size=512)
    p = start_worker(dom.name, "w", workdir, "--drain-timeout", "0.5", env={"SLOW_S": "0.1"})
    tid = serving(dom, "w", p.pid)
    t = dom.task(tid)
    t.add_many("wk.slow", [f"s{i}".encode() for i in range(40)], TWA_NONE)
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc, err = finish(p)
    took = time.monotonic() - t0
    assert rc == 0, err
    first = ran(workdir)
    letters = dom.dead_letters()
    assert {w.reason for w in letters} == {"shutdown"}
    assert {w.target_name for w in letters} == {"w"}
    # never lost, never run twice: what ran and what was kept are the 40
    kept = [w.payload.decode() for w in letters]
    assert sorted(first + kept) == sorted(f"s{i}" for i in range(40))
    assert 0 < len(first) < 40 and took < 10
    # Two workers of the name start together: each letter goes to one of them.
    a = start_worker(dom.name, "w", workdir, env={"SLOW_S": "0"})
    b = start_worker(dom.name, "w", workdir, env={"SLOW_S": "0"})
    for q in (a, b):
        serving(dom, "w", q.pid)
    wait_until(lambda: len(ran(workdir)) == 40 and not dom.dead_letters(), TIMEOUT,
               what="the shutdown letters to be adopted and run")
    for q in (a, b):
        q.send_signal(signal.SIGTERM)
        assert finish(q)[0] == 0
    assert sorted(ran(workdir)) == sorted(f"s{i}" for i in range(40))


def test_a_second_stop_signal_ends_the_drain_at_once(make_domain, workdir):
    dom = make_domain("twice", pool_size=256)
    p = start_worker(dom.name, "w", workdir, "--drain-timeout", "60", env={"SLOW_S": "0.2"})
    tid = serving(dom, "w", p.pid)
    dom.task(tid).add_many("wk.slow", [f"s{i}".encode() for i in range(50)], TWA_NONE)
    p.send_signal(signal.SIGTERM)

    def draining():
        if p.poll() is not None:   # a worker that died is not draining: say how
            pytest.fail(f"the worker ended ({p.returncode}) before its drain began: "
                        f"{p.stderr.read()}")
        return len(ran(workdir)) >= 1
    wait_until(draining, TIMEOUT, what="the drain to begin")
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    rc, err = finish(p)
    assert rc == 0, err
    assert time.monotonic() - t0 < 5
    done = ran(workdir)
    kept = [w.payload.decode() for w in dom.dead_letters(reason="shutdown")]
    assert sorted(done + kept) == sorted(f"s{i}" for i in range(50)) and kept


def test_systemd_notify_ready_status_watchdog_stopping(make_domain, workdir, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(TIMEOUT)
    try:
        dom = make_domain("sd")
        p = start_worker(dom.name, "w", workdir, env={"NOTIFY_SOCKET": sock_path,
                                                      "WATCHDOG_USEC": "200000"})
        got: list[str] = []

        def until(field: str) -> None:
            while not any(m.startswith(field) for m in got):
                got.extend(srv.recv(4096).decode().splitlines())

        until("READY=1")
        until("WATCHDOG=1")
        n_wd = sum(m == "WATCHDOG=1" for m in got)
        until("STATUS=")
        # it wakes by itself for the watchdog: several come while idle
        while sum(m == "WATCHDOG=1" for m in got) < n_wd + 3:
            got.extend(srv.recv(4096).decode().splitlines())
        p.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        rc, err = finish(p)
        assert rc == 0, err
        assert got.index("READY=1") < got.index("STOPPING=1")
    finally:
        srv.close()


def test_worker_command_errors_are_one_line_and_exit_1(make_domain, workdir):
    dom = make_domain("errs")
    p = start_worker(dom.name, "w", workdir, "-m", "no_such_module_here")
    rc, err = finish(p)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "no_such_module_here" in err
    p = start_worker("/tw_test_no_such_domain_xyz", "w", workdir)
    rc, err = finish(p)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "cannot open domain" in err
    # --create makes it
    name = dom.name + "_c"
    p = start_worker(name, "w", workdir, "--create")
    try:
        d2 = Domain.open(name) if wait_until(lambda: os.path.exists("/dev/shm" + name),
                                             TIMEOUT, what="the domain") else None
        serving(d2, "w", p.pid)
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0
        d2.close()
    finally:
        try:
            Domain.open(name).unlink()
        except Exception:
            pass


SLOW_TASK = r"""
import sys, time
from shm_taskwork import Domain, callback
@callback(name="wk.tick")
def tick(work):
    time.sleep(0.2)
@callback(name="wk.tickfail", on_failure="drop")
def tickfail(work):
    time.sleep(0.2)
    raise ValueError("counted at once")
dom = Domain.open(sys.argv[1])
t = dom.register("busy")
print(t.id, flush=True)
sys.stdin.readline()
t.run()
print("done", flush=True)
sys.stdin.readline()
"""


def long_batch(dom: Domain, spawn, callback_name: str):
    """A task process that runs 20 works of 200 ms of ``callback_name`` in
    one batch; (process, a function giving the task's TaskInfo now)."""
    p = spawn(SLOW_TASK, dom.name, stdin=subprocess.PIPE)
    tid = int(readline(p, TIMEOUT))
    dom.task(tid).add_many(callback_name, [b"x"] * 20, TWA_NONE)
    p.stdin.write("go\n")
    p.stdin.flush()
    return p, lambda: next(i for i in dom.tasks(reap=False) if i.id == tid)


def test_work_in_progress_is_visible_during_a_long_batch(make_domain, spawn):
    """20 works of 200 ms in one batch: before, run=0 pending=0 for the
    whole batch. Now running counts the taken works and run moves as each
    work returns."""
    p, info = long_batch(make_domain("wip", pool_size=256), spawn, "wk.tick")
    i = wait_until(lambda: (lambda x: x if x.run >= 2 else None)(info()), TIMEOUT,
                   what="two works to finish")
    assert i.pending == 0 and i.running in (20 - i.run, 20 - i.run - 1)
    assert i.oldest_running_s is not None and i.oldest_running_s > 0.3
    r0 = i.run
    wait_until(lambda: info().run >= r0 + 2, TIMEOUT, what="the run counter to move")
    assert readline(p, TIMEOUT) == "done"
    i = info()
    assert (i.run, i.running, i.oldest_running_s) == (20, 0, None)
    p.stdin.write("\n")
    p.stdin.flush()


def test_errors_are_counted_as_they_happen_during_a_long_batch(make_domain, spawn):
    p, info = long_batch(make_domain("wiperr", pool_size=256), spawn, "wk.tickfail")
    i = wait_until(lambda: (lambda x: x if x.errors >= 2 else None)(info()), TIMEOUT,
                   what="errors to move during the batch")
    assert i.running > 0 and i.errors <= i.run
    assert readline(p, TIMEOUT) == "done"
    assert (info().errors, info().run) == (20, 20)
    p.stdin.write("\n")
    p.stdin.flush()


def test_states_dead_then_reaped(make_domain, spawn):
    dom = make_domain("states")
    p = spawn(SLOW_TASK, dom.name, stdin=subprocess.PIPE)
    tid = int(readline(p, TIMEOUT))
    p.kill()
    p.wait(timeout=TIMEOUT)
    assert {i.id: i.state for i in dom.tasks(reap=False)}[tid] == "dead"
    assert {i.id: i.state for i in dom.tasks()}[tid] == "reaped"


@callback(name="wk.flaky", retries=2)
def _flaky(work):
    ATTEMPTS.append(work.attempt)
    raise ValueError(f"no luck with {work.payload.decode()}")


@callback(name="wk.dropper", on_failure="drop")
def _dropper(work):
    raise KeyError("dropped")


ATTEMPTS: list[int] = []


def test_a_failed_callback_is_retried_then_kept_as_a_failed_letter(make_domain):
    ATTEMPTS.clear()
    dom = make_domain("failed")
    t = dom.register("f", install_handler=False)
    t.add(_flaky, b"job", TWA_NONE)
    t.add(_dropper, b"gone", TWA_NONE)
    assert t.run() == 4
    assert ATTEMPTS == [0, 1, 2]
    [w] = dom.dead_letters()
    assert (w.reason, w.func_name, w.payload, w.attempt) == ("failed", "wk.flaky", b"job", 2)
    assert w.error == "ValueError: no luck with job"
    i = next(x for x in dom.tasks() if x.id == t.id)
    assert (i.run, i.errors) == (4, 4)
    assert dom.stats().pool_free == dom.pool_size - 1
    # a failed letter is never adopted: it needs a person
    assert t.adopt() == 0
    # a person retries it: it runs once more (its retries were spent), and
    # fails again into a letter
    assert dom.retry_dead_letters(reason="failed") == 1
    assert t.run() == 1 and ATTEMPTS == [0, 1, 2, 2]
    assert [w.reason for w in dom.dead_letters()] == ["failed"]
    t.exit()


def test_callback_options_are_checked():
    with pytest.raises(ValueError, match="retries"):
        callback(name="wk.bad1", retries=-1)(lambda w: None)
    with pytest.raises(ValueError, match="on_failure"):
        callback(name="wk.bad2", on_failure="explode")(lambda w: None)


def test_shm_taskwork_with_no_command_prints_usage_and_exits_2():
    e = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli"], capture_output=True,
                       text=True, env=e, timeout=TIMEOUT)
    assert r.returncode == 2 and "usage" in r.stderr and r.stdout == ""


def test_register_adopt_takes_the_orphaned_letters_of_its_name(make_domain, spawn):
    dom = make_domain("adopt")
    p = spawn(SLOW_TASK, dom.name, stdin=subprocess.PIPE)
    tid = int(readline(p, TIMEOUT))
    dom.task(tid).add_many("wk.tick", [b"a", b"b"], TWA_NONE)
    p.kill()
    p.wait(timeout=TIMEOUT)
    dom.tasks()   # reaps: two orphaned letters for "busy"
    assert [w.reason for w in dom.dead_letters()] == ["orphaned", "orphaned"]
    heir = dom.register("busy", install_handler=False, adopt=True)
    assert dom.dead_letters() == [] and heir.pending() == 2
    heir.exit()
