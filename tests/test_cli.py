"""The command line: ``shm-taskwork demo``, ``status`` and ``inspect`` (docs/cli.md).

Every command runs as a real subprocess (``python -m shm_taskwork.cli``); the
tasks they look at are registered by unrelated processes started with
subprocess. No sleep is used to synchronise: children say when they are ready
on a pipe, and every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT, readline, wait_until

from shm_taskwork import TWA_NONE, TWA_RESUME

CLI_TIMEOUT = 120


def cli(*args: str, timeout: float = CLI_TIMEOUT, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("COLUMNS", "160")
    return subprocess.run([sys.executable, "-m", "shm_taskwork.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **popen)


def shm_names(prefix: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


# ---- exit from inside a callback (the demo retires a worker this way) --------

def test_exit_from_inside_a_callback_completes_when_the_run_returns(domain, spawn):
    child = spawn("""
        import json, sys, time
        from shm_taskwork import Domain, TaskExitedError, TWA_NONE, TWA_RESUME, callback
        dom = Domain.open(sys.argv[1])
        task = dom.register("retiring")
        log = []

        @callback(name="test.note")
        def note(work):
            log.append(("note", work.payload.decode()))

        @callback(name="test.retire")
        def retire(work):
            t0 = time.monotonic()
            try:
                task.exit()
                log.append(("exit returned", round(time.monotonic() - t0, 3)))
            except Exception as exc:
                log.append(("exit raised", repr(exc)))

        task.add(note, b"older", notify=TWA_NONE)
        task.add(retire, notify=TWA_RESUME)
        ran = task.run()
        try:
            task.add(note)
            esrch = None
        except TaskExitedError as exc:
            esrch = exc.errno
        print(json.dumps({"ran": ran, "log": log, "esrch": esrch,
                          "slots": [t.state for t in dom.tasks()],
                          "current": dom.current is not None}), flush=True)
    """, domain.name)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    got = json.loads(out)
    # retire ran first (newest), exit() returned at once instead of spinning;
    # the older work still ran in the same run, then the task was exited.
    assert got["log"][0][0] == "exit returned", got
    assert got["log"][0][1] < 0.5, got
    assert [e[0] for e in got["log"]] == ["exit returned", "note"]
    assert got["ran"] == 2
    assert got["esrch"] == 3
    assert got["current"] is False
    assert "exiting" not in got["slots"] and "running" not in got["slots"]
    st = domain.stats()
    assert st.pool_free == st.pool_size


def test_wait_does_not_spin_on_a_stale_wakeup(domain, spawn):
    """The adder writes the eventfd after the runner's detach already took its
    work (adder: push, set flag; runner: drain, clear, detach; adder: write).
    The eventfd is then readable with no flag set and nothing queued: wait()
    must block, not turn select() into a busy loop (the demo's waiter sits in
    wait() between bursts)."""
    child = spawn("""
        import json, sys, time
        from shm_taskwork import Domain
        from shm_taskwork._native import lib
        dom = Domain.open(sys.argv[1])
        task = dom.register("waiter")
        lib.tw_eventfd_write(task.fileno())   # the late write of a lost race
        c0, w0 = time.process_time(), time.monotonic()
        ran = task.wait(timeout=0.4)
        print(json.dumps({"ran": ran, "cpu": time.process_time() - c0,
                          "wall": time.monotonic() - w0}), flush=True)
        task.exit()
    """, domain.name)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    got = json.loads(out)
    assert got["ran"] == 0 and got["wall"] >= 0.39
    assert got["cpu"] < 0.15, f"wait() burned {got['cpu']:.2f}s of CPU in {got['wall']:.2f}s"


# ---- --help and usage errors ------------------------------------------------------

def test_help_everywhere():
    top = cli("--help")
    assert top.returncode == 0, top.stderr
    for cmd in ("demo", "status", "inspect"):
        assert cmd in top.stdout
    for cmd, words in (("demo", ("--workers", "--works", "--json")),
                       ("status", ("NAME", "--json")),
                       ("inspect", ("NAME", "TASK", "--json"))):
        r = cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: shm-taskwork {cmd}"), r.stdout
        for w in words:
            assert w in r.stdout, (cmd, w)
        assert "--worker " not in r.stdout  # the demo's internal worker switch stays hidden


def test_unknown_subcommand_exits_2():
    r = cli("frobnicate")
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr
    assert "Traceback" not in r.stderr


# ---- demo ---------------------------------------------------------------------------

MODE_ROWS = ("TWA_NONE", "TWA_RESUME", "TWA_SIGNAL", "TWA_SIGNAL_NO_IPI", "TWA_NMI_CURRENT")


def test_demo_runs_end_to_end_and_removes_its_domain():
    """The plain report, as an 80-column terminal shows it: every table fits
    (no line wider, no cell cut to an ellipsis, every column there) and the
    totals add up."""
    import re
    before = shm_names("tw_demo_")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="80")
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "demo"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err + out
    assert "Traceback" not in err
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 80, max(lines, key=len)
    assert "\u2026" not in out and "..." not in out, out
    headers = [ln for ln in lines if ln.startswith("\u2503")]
    cols = [[c.strip() for c in h.strip("\u2503").split("\u2503")] for h in headers]
    assert cols == [["task", "name", "pid", "what it does meanwhile", "works ran"],
                    ["notify mode", "sent", "ran", "cancelled", "lost", "median", "p99", "max"],
                    ["notify mode", "where: count"],
                    ["worker", "RESUME", "SIGNAL", "NO_IPI", "NMI", "add_many"]], cols
    cells = [[c.strip() for c in ln.strip("\u2502").split("\u2502")] for ln in lines
             if ln.startswith("\u2502")]
    # one row per notify mode, with the three latency figures
    figure = re.compile(r"\d+(\.\d+)?(us|ms|s)")
    modes = {r[0]: r for r in cells if len(r) == 8}
    for mode in MODE_ROWS + ("add_many", "control works"):
        assert all(figure.fullmatch(x) for x in modes[mode][5:]), (mode, modes.get(mode))
    # the mode table adds up to its total, which is what the workers ran
    total = modes["total"]
    for k in (1, 2, 3, 4):
        assert sum(int(r[k]) for m, r in modes.items() if m != "total") == int(total[k])
    assert int(total[1]) == int(total[2]) + int(total[3]) and total[4] == "0"
    workers = [r for r in cells if len(r) == 5 and r[4].isdigit()]
    assert workers[-1][1] == "total"
    assert sum(int(r[4]) for r in workers[:-1]) == int(workers[-1][4]) == int(total[2])
    text = " ".join(out.split())
    assert re.search(r"add to exited task \d+ -> TaskExitedError errno=3 \(ESRCH\)", text), out
    m = re.search(r"pool_free (\d+) == pool_size (\d+)", text)
    assert m and m.group(1) == m.group(2), out
    name = re.search(r"domain (/tw_demo_\S+?)[,:]", text).group(1)
    assert f"domain {name} removed." in text
    assert name.startswith(f"/tw_demo_{proc.pid}_")
    assert not os.path.exists("/dev/shm" + name)
    # before/after: nothing new under the prefix is this demo's (other demos may run meanwhile)
    assert not {n for n in shm_names("tw_demo_") - before if n.startswith(f"tw_demo_{proc.pid}_")}


def test_demo_json_ledger_with_an_asyncio_worker():
    r = cli("demo", "--json", "--workers", "4", "--works", "40")
    assert r.returncode == 0, r.stderr + r.stdout
    rep = json.loads(r.stdout)
    assert rep["problems"] == []
    assert rep["removed"] is True
    assert [w["style"] for w in rep["workers"]] == ["waiter", "cruncher", "sleeper", "looper"]
    assert all(w["status"] == 0 for w in rep["workers"])
    for mode in MODE_ROWS + ("add_many",):
        row = rep["modes"][mode]
        assert row["sent"] > 0, mode
        assert row["ran"] + row["cancelled"] == row["sent"] and row["lost"] == 0, (mode, row)
        assert row["latency_us"]["median"] <= row["latency_us"]["p99"] <= row["latency_us"]["max"]
    # TWA_NONE works waited for a run, and some were cancelled by each method
    c = rep["cancel"]
    assert c["held"] == 40
    assert c["cancel"] > 0 and c["cancel_func"] > 0 and c["cancel_match"] > 0
    assert rep["modes"]["TWA_NONE"]["cancelled"] == c["cancel"] + c["cancel_func"] + c["cancel_match"]
    assert c["after_run"] is False
    # SIGNAL works: what the README promises is that they run promptly, exactly
    # once, in the task's own process - each burst settled before the next
    # was sent, none ran twice or in another worker. Not *where*: on a loaded
    # machine the busy loop's checkpoint() may reach a work before the
    # signal's handler does, and that is as correct.
    sig = rep["modes"]["TWA_SIGNAL"]
    assert sig["ran"] == sig["sent"] and sig["lost"] == 0 and sig["cancelled"] == 0
    assert sum(sig["where"].values()) == sig["ran"]
    assert rep["ran_elsewhere"] == 0
    assert not set(sig["where"]) - {"handler: busy loop", "handler: time.sleep",
                                    "handler: asyncio", "checkpoint()", "wait()",
                                    "eventfd reader"}, sig["where"]
    # the totals add up: every row (control works included) to the total,
    # and that to what the workers say they ran
    t = rep["totals"]
    for k in ("sent", "ran", "cancelled", "lost"):
        assert t[k] == sum(r[k] for r in rep["modes"].values()), k
    assert t["ran"] == sum(w["ran"] for w in rep["workers"])
    assert t["sent"] == t["ran"] + t["cancelled"]
    # RESUME never ran inside a handler; the asyncio worker ran it from its reader
    resume = rep["modes"]["TWA_RESUME"]["where"]
    assert not any(k.startswith("handler") for k in resume), resume
    assert resume.get("eventfd reader", 0) > 0, resume
    # NMI work queued from a SIGUSR2 handler ran at the next safe point, not in it
    assert rep["nmi"]["in_handler"] == 0
    assert set(rep["nmi"]["where"]) == {"checkpoint()"}
    assert rep["modes"]["TWA_NMI_CURRENT"]["ran"] == rep["nmi"]["signals"]
    assert rep["add_many"]["pushes"] == 1 and rep["add_many"]["resumes_sent"] <= 1
    ex = rep["exit"]
    assert ex["error"] == "TaskExitedError" and ex["errno"] == 3 and "ESRCH" in ex["message"]
    assert ex["drained_by_exit"] == 3
    assert rep["pool"]["pool_free"] == rep["pool"]["pool_size"]
    assert rep["dead_letters"] == 0 and rep["duplicates"] == 0
    assert rep["counters_before_exit"]["cancelled"] == rep["modes"]["TWA_NONE"]["cancelled"]


def test_demo_interrupted_removes_its_domain_and_reaps_its_workers():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "demo", "--works", "20000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        me = psutil.Process(proc.pid)
        wait_until(lambda: shm_names(f"tw_demo_{proc.pid}_"), 30, what="the demo's domain")
        kids = wait_until(lambda: (lambda k: k if len(k) >= 3 else None)(me.children()), 30,
                          what="three worker processes")
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not shm_names(f"tw_demo_{proc.pid}_")
    for k in kids:
        assert not k.is_running(), f"worker {k.pid} outlived the interrupted demo"


# ---- status and inspect -----------------------------------------------------------------

SERVICE = """
    import json, sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    task = dom.register("svc")
    print(json.dumps({"task": task.id}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps({"ran": task.run()}), flush=True)
        else:
            break
    task.exit()
"""


@pytest.fixture
def service(domain, spawn):
    """A task registered by an unrelated process, with 3 pending works and one
    dead letter: one work for a callback it does not know, run; then two
    test.reload (TWA_NONE) and two test.flush (TWA_RESUME), one reload cancelled."""
    child = spawn(SERVICE, domain.name, stdin=subprocess.PIPE)
    tid = json.loads(readline(child))["task"]
    task = domain.task(tid)
    task.add("test.nobody", b"x", TWA_RESUME)
    child.stdin.write("run\n")
    child.stdin.flush()
    assert json.loads(readline(child)) == {"ran": 0}
    first = task.add("test.reload", b"r" * 10, TWA_NONE)
    task.add("test.reload", b"r" * 11, TWA_NONE)
    task.add("test.flush", b"f" * 12, TWA_RESUME)
    task.add("test.flush", b"f" * 13, TWA_RESUME)
    assert task.cancel(first)
    yield domain, task, child
    if child.poll() is None:
        child.stdin.write("exit\n")
        child.stdin.flush()
        child.communicate(timeout=15)


def test_status_json_reports_tasks_pool_and_dead_letters(service):
    dom, task, child = service
    r = cli("status", dom.name.lstrip("/"), "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["domain"] == {"name": dom.name, "max_tasks": 8, "pool_size": 256,
                             "payload_size": 224, "record_origin": False}
    pool = rec["pool"]
    assert set(pool) >= {"pool_size", "pool_free", "pool_used", "tasks", "dead_letters", "added",
                         "run", "cancelled", "orphaned", "errors", "unknown", "signals_sent",
                         "resumes_sent", "pending", "max_pending"}
    assert pool["pool_size"] == 256 and pool["pool_used"] == 4 and pool["pool_free"] == 252
    assert (pool["tasks"], pool["dead_letters"], pool["added"], pool["cancelled"],
            pool["unknown"], pool["pending"]) == (1, 1, 5, 1, 1, 3)
    [t] = rec["tasks"]
    fields = {"id", "pid", "name", "state", "registered_ns", "added", "run", "cancelled",
              "orphaned", "errors", "unknown", "signals_sent", "resumes_sent", "pending",
              "max_pending", "cpu_percent", "rss", "process_status"}
    assert fields <= set(t)
    assert (t["id"], t["pid"], t["name"], t["state"]) == (task.id, child.pid, "svc", "running")
    assert (t["added"], t["run"], t["cancelled"], t["unknown"], t["pending"], t["max_pending"],
            t["resumes_sent"], t["signals_sent"], t["orphaned"], t["errors"]) == \
        (5, 0, 1, 1, 3, 4, 2, 0, 0, 0)
    assert isinstance(t["cpu_percent"], float) and t["cpu_percent"] >= 0
    assert t["rss"] > 1 << 20
    assert t["process_status"] == psutil.Process(child.pid).status()
    [dl] = rec["dead_letters"]
    assert (dl["func_name"], dl["payload"], dl["sender_pid"], dl["target"]) == \
        ("test.nobody", b"x".hex(), os.getpid(), task.id)
    assert dl["age_ns"] > 0
    # the human view shows the same
    h = cli("status", dom.name)
    assert h.returncode == 0, h.stderr
    assert "svc" in h.stdout and "test.nobody" in h.stdout and "252 free" in h.stdout


def test_status_marks_a_dead_task_and_gives_it_no_process_figures(service):
    dom, task, child = service
    child.kill()
    child.communicate(timeout=15)
    rec = json.loads(cli("status", dom.name, "--json", "--interval", "0").stdout)
    [t] = rec["tasks"]
    assert t["state"] == "reaped"
    assert t["cpu_percent"] is None and t["rss"] is None and t["process_status"] is None
    assert (t["pending"], t["orphaned"]) == (0, 3)   # reaped: its works are dead letters
    assert [w["reason"] for w in rec["dead_letters"]].count("orphaned") == 3


def test_inspect_json_lists_pending_works_newest_first(service):
    dom, task, child = service
    for key in (str(task.id), "svc", f"pid={child.pid}"):
        r = cli("inspect", dom.name, key, "--json")
        assert r.returncode == 0, r.stderr
        rec = json.loads(r.stdout)
        assert rec["domain"] == dom.name
        assert rec["task"]["id"] == task.id and rec["task"]["name"] == "svc"
        assert rec["task"]["pending"] == 3
        pend = rec["pending"]
        assert [w["func_name"] for w in pend] == ["test.flush", "test.flush", "test.reload"]
        assert [w["payload_len"] for w in pend] == [13, 12, 11]
        assert all(w["sender_pid"] == os.getpid() and w["target"] == task.id for w in pend)
        ages = [w["age_ns"] for w in pend]
        assert all(a > 0 for a in ages) and ages == sorted(ages)  # newest first: youngest first
        assert len({w["id"] for w in pend}) == 3
    h = cli("inspect", dom.name, "svc")
    assert h.returncode == 0, h.stderr
    assert "3 pending works, newest first" in h.stdout
    assert h.stdout.index("test.flush") < h.stdout.index("test.reload")


def test_inspect_shows_origins_when_recorded(make_domain, spawn):
    dom = make_domain("origin", record_origin=True)
    child = spawn(SERVICE, dom.name, stdin=subprocess.PIPE)
    task = dom.task(json.loads(readline(child))["task"])
    task.add("test.reload", b"", TWA_NONE)
    rec = json.loads(cli("inspect", dom.name, "svc", "--json").stdout)
    [w] = rec["pending"]
    assert "test_cli.py" in w["origin"] and "test_inspect_shows_origins" in w["origin"]
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


# ---- errors: one line on stderr, no traceback ---------------------------------------------

@pytest.mark.parametrize("args", [("status", "tw_test_no_such_domain"),
                                  ("status", "tw_test_no_such_domain", "--json"),
                                  ("inspect", "tw_test_no_such_domain", "0")])
def test_missing_domain_is_one_line_on_stderr(args):
    r = cli(*args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no domain named '/tw_test_no_such_domain'" in r.stderr


@pytest.mark.parametrize("key", ["nobody", "7", "pid=1"])
def test_inspect_of_a_missing_task_is_one_line_on_stderr(domain, key):
    r = cli("inspect", domain.name, key)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("shm-taskwork inspect: no ")


def test_status_of_a_segment_that_is_not_a_domain_is_one_line_on_stderr():
    import posix_ipc

    from conftest import unique_name
    name = unique_name("garbage")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    try:
        os.write(shm.fd, b"not a domain" * 10)
        shm.close_fd()
        r = cli("status", name)
        assert r.returncode != 0 and r.stdout == ""
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "is not a task-work domain" in r.stderr
    finally:
        posix_ipc.unlink_shared_memory(name)
