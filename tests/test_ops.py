"""Operator tools: ``shm-taskwork top`` and ``shm-taskwork export`` (docs/cli.md, docs/operations.md).

Every command runs as a real subprocess (``python -m shm_taskwork.cli``) and
looks at tasks registered by unrelated processes started with subprocess: a
live one, and one SIGKILLed while registered (no fsck), which both tools must
report as dead. The exporter is also scraped over real HTTP on loopback. No
sleep synchronises anything: children answer on a pipe, the HTTP server is
polled with a deadline, and every wait has a timeout.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, readline, wait_until

from shm_taskwork import TWA_NONE

CLI_TIMEOUT = 60
CB = "test_ops.noop"
TOP_COLUMNS = ("id", "name", "pid", "state", "pending", "oldest", "running", "oldest_run", "run",
               "run/s", "added", "add/s", "errors", "cancelled", "unknown", "orphaned", "cpu%",
               "rss", "status")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "200"
    env.pop("FORCE_COLOR", None)
    return env


def cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shm_taskwork.cli", *args], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def cli_popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", *args], env=_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen, signum: int, timeout: float = 20.0) -> tuple[int, str, str]:
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise AssertionError(f"pid {proc.pid} did not stop within {timeout}s of signal {signum}")
    return proc.returncode, out, err


def parse_top(out: str) -> dict[str, dict[str, str]]:
    """The task rows of the last frame of ``top``'s plain output, by task name."""
    lines = out.splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:2] == ["id", "name"]]
    assert heads, f"no table header in:\n{out}"
    assert lines[heads[-1]].split() == list(TOP_COLUMNS), lines[heads[-1]]
    rows = {}
    for line in lines[heads[-1] + 2:]:
        cells = line.split()
        if not cells:
            break
        assert len(cells) == len(TOP_COLUMNS), f"row {line!r} does not fit the header"
        row = dict(zip(TOP_COLUMNS, cells))
        rows[row["name"]] = row
    return rows


def age_seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|min|h)", text)
    assert m, f"not an age: {text!r}"
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0,
                                "h": 3600.0}[m.group(2)]


def metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from the text exposition format."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, timeout: float = 20.0) -> str:
    """GET the metrics page, retrying until the server answers or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                return resp.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout}s")
            time.sleep(0.02)


LIVE = """
    import sys
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("live")

    @callback(name="test_ops.noop")
    def noop(work):
        pass

    print(task.id, flush=True)
    for line in sys.stdin:        # idle (sleeping) between commands
        if line.strip() == "run":
            print(task.run(), flush=True)
"""

VICTIM = """
    import sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    task = dom.register("victim")
    print(task.id, flush=True)
    sys.stdin.readline()          # killed while waiting here
"""


@pytest.fixture
def scene(make_domain, spawn):
    """A domain with a live task (5 added, 3 run, 2 pending) and a dead one
    (4 added and pending, its process SIGKILLed, no fsck)."""
    dom = make_domain("ops")
    live = spawn(LIVE, dom.name, stdin=subprocess.PIPE)
    victim = spawn(VICTIM, dom.name, stdin=subprocess.PIPE)
    live_id, victim_id = int(readline(live)), int(readline(victim))
    t_first_add = time.monotonic()
    for i in range(3):
        dom.task(live_id).add(CB, b"%d" % i, notify=TWA_NONE)
    live.stdin.write("run\n")
    live.stdin.flush()
    assert readline(live) == "3"
    for i in range(2):
        dom.task(live_id).add(CB, b"later %d" % i, notify=TWA_NONE)
    for i in range(4):
        dom.task(victim_id).add(CB, b"v%d" % i, notify=TWA_NONE)
    t_last_add = time.monotonic()
    victim.kill()
    victim.wait(timeout=10)
    wait_until(lambda: {t.id: t.state for t in dom.tasks()}.get(victim_id) == "reaped",
               what="the killed task to read as dead")
    return dict(dom=dom, live=live, victim=victim, live_id=live_id, victim_id=victim_id,
                t_first_add=t_first_add, t_last_add=t_last_add)


# ---- top ----------------------------------------------------------------------

def test_top_once_shows_counters_ages_processes_and_flags_the_dead_task(scene):
    dom = scene["dom"]
    t0 = time.monotonic()
    r = cli("top", dom.name, "--once", "--interval", "0.2")
    t1 = time.monotonic()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "\x1b[" not in r.stdout  # not a terminal: plain frames, no escape codes
    rows = parse_top(r.stdout)
    assert set(rows) == {"live", "victim"}
    live, dead = rows["live"], rows["victim"]

    assert live["id"] == str(scene["live_id"]) and live["pid"] == str(scene["live"].pid)
    assert live["state"] == "running"
    assert (live["added"], live["run"], live["pending"]) == ("5", "3", "2")
    assert (live["cancelled"], live["errors"], live["unknown"], live["orphaned"]) == ("0",) * 4
    # nothing happened during the sampled interval: the rates are measured, and zero
    assert live["run/s"] == "0.0" and live["add/s"] == "0.0"
    # the process figures come from psutil: an idle process blocked on stdin
    assert live["status"] == psutil.Process(scene["live"].pid).status() == "sleeping"
    assert float(live["cpu%"]) >= 0.0
    assert re.fullmatch(r"[0-9.]+(KiB|MiB|GiB)", live["rss"]), live["rss"]

    assert dead["id"] == str(scene["victim_id"]) and dead["pid"] == str(scene["victim"].pid)
    assert dead["state"] == "reaped"
    # reaped (by whoever noticed first): its 4 works are orphaned dead letters
    assert (dead["added"], dead["run"], dead["pending"], dead["orphaned"]) == ("4", "0", "0", "4")
    assert (dead["cpu%"], dead["rss"], dead["status"]) == ("-", "-", "-")

    # oldest pending age: the oldest of each list was queued between the
    # fixture's first and last add, and read between t0 and t1
    assert dead["oldest"] == "-"             # nothing pending: its works are dead letters
    for row in (live,):
        age = age_seconds(row["oldest"])
        assert t0 - scene["t_last_add"] - 0.01 <= age <= t1 - scene["t_first_add"] + 0.01, row

    # the reaped task is flagged under the table, with what to do about it
    flag = [line for line in r.stdout.splitlines() if line.startswith("REAPED")]
    assert len(flag) == 1, r.stdout
    assert f"{scene['victim_id']} (pid {scene['victim'].pid}, 4 orphaned)" in flag[0]
    assert f"dead-letters {dom.name} --retry" in flag[0]
    # the pool line
    st = dom.stats()
    assert st.pool_used == 6
    pool = [line for line in r.stdout.splitlines() if line.startswith("pool")]
    assert len(pool) == 1
    assert f"used {st.pool_used}  free {st.pool_free}  size {st.pool_size}" in pool[0]
    assert "dead letters 4" in pool[0] and "tasks 2" in pool[0] and "pending 2" in pool[0]


BUSY = """
    import sys
    from shm_taskwork import Domain, TWA_NONE, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("busy")

    @callback(name="test_ops.noop")
    def noop(work):
        pass

    task.add(noop, notify=TWA_NONE)
    task.run()
    print("ready", flush=True)
    while True:                   # adds to itself and runs, as fast as it can
        task.add(noop, notify=TWA_NONE)
        task.run()
"""


def test_top_rates_and_cpu_of_a_busy_task(make_domain, spawn):
    dom = make_domain("busy")
    busy = spawn(BUSY, dom.name)
    assert readline(busy) == "ready"
    tid = dom.task(pid=busy.pid).id
    before = next(t for t in dom.tasks() if t.id == tid)
    r = cli("top", dom.name, "--once", "--interval", "0.3")
    after = next(t for t in dom.tasks() if t.id == tid)
    assert r.returncode == 0, r.stderr
    row = parse_top(r.stdout)["busy"]
    assert row["state"] == "running"
    run_rate, add_rate = float(row["run/s"]), float(row["add/s"])
    assert run_rate > 0 and add_rate > 0, row
    # the rate is a difference of two snapshots taken inside [before, after]
    # over at least the 0.3 s interval: it cannot exceed what happened meanwhile
    assert run_rate * 0.3 <= after.run - before.run + 1, (row, before.run, after.run)
    assert add_rate * 0.3 <= after.added - before.added + 1, (row, before.added, after.added)
    # a busy loop is on the CPU, and psutil says so
    assert float(row["cpu%"]) > 5.0, row


def test_top_iterations_prints_that_many_frames(domain):
    r = cli("top", domain.name, "--iterations", "3", "--interval", "0.05")
    assert r.returncode == 0, r.stderr
    titles = [line for line in r.stdout.splitlines() if line == f"shm-taskwork top {domain.name}"]
    assert len(titles) == 3, r.stdout
    assert r.stdout.count("no tasks registered") == 3
    # the first frame has no previous snapshot, later ones have rates
    pools = [line for line in r.stdout.splitlines() if line.startswith("pool")]
    assert "run/s -" in pools[0] and "run/s 0.0" in pools[2], pools


def test_top_ctrl_c_exits_zero_quietly(domain):
    proc = cli_popen("top", domain.name, "--interval", "0.05")
    try:
        assert readline(proc) == f"shm-taskwork top {domain.name}"  # a frame is out
        rc, out, err = stop(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert rc == 0
    assert err == ""


# ---- export -------------------------------------------------------------------

def _task_labels(dom, tid: int, name: str) -> frozenset:
    return frozenset({"domain": dom.name, "task": str(tid), "name": name}.items())


def check_exposition(text: str, scene) -> dict:
    dom, m = scene["dom"], metrics(text)
    live = _task_labels(dom, scene["live_id"], "live")
    dead = _task_labels(dom, scene["victim_id"], "victim")
    # what the test did, as counters and gauges
    assert m[("shm_taskwork_task_added_total", live)] == 5
    assert m[("shm_taskwork_task_run_total", live)] == 3
    assert m[("shm_taskwork_task_pending", live)] == 2
    assert m[("shm_taskwork_task_added_total", dead)] == 4
    assert m[("shm_taskwork_task_run_total", dead)] == 0
    assert m[("shm_taskwork_task_pending", dead)] == 0      # reaped: ...
    assert m[("shm_taskwork_task_orphaned_total", dead)] == 4  # ... its works are dead letters
    assert m[("shm_taskwork_task_up", live)] == 1
    assert m[("shm_taskwork_task_up", dead)] == 0
    info = {dict(lbl)["task"]: dict(lbl) for (n, lbl) in m if n == "shm_taskwork_task_info"}
    assert info[str(scene["live_id"])]["state"] == "running"
    assert info[str(scene["live_id"])]["pid"] == str(scene["live"].pid)
    assert info[str(scene["victim_id"])]["state"] == "reaped"
    # every counter of TaskInfo is there and agrees with the task table
    for t in dom.tasks():
        lbl = _task_labels(dom, t.id, t.name)
        for k in ("added", "run", "cancelled", "orphaned", "errors", "unknown",
                  "signals_sent", "resumes_sent"):
            assert m[(f"shm_taskwork_task_{k}_total", lbl)] == getattr(t, k), k
        for k in ("pending", "max_pending"):
            assert m[(f"shm_taskwork_task_{k}", lbl)] == getattr(t, k), k
    # the pool and the domain
    st, d = dom.stats(), frozenset({"domain": dom.name}.items())
    assert m[("shm_taskwork_pool_size", d)] == st.pool_size == 256
    assert m[("shm_taskwork_pool_used", d)] == st.pool_used == 6
    assert m[("shm_taskwork_pool_free", d)] == st.pool_free == 250
    assert m[("shm_taskwork_dead_letters", d)] == 4
    assert m[("shm_taskwork_tasks", d)] == 2
    return m


def test_export_once_prints_the_metrics(scene):
    r = cli("export", scene["dom"].name, "--once")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "# TYPE shm_taskwork_task_added_total counter" in r.stdout
    assert "# TYPE shm_taskwork_task_pending gauge" in r.stdout
    check_exposition(r.stdout, scene)


def test_export_serves_http_reads_at_scrape_time_and_stops_on_sigterm(scene):
    dom = scene["dom"]
    port = free_port()
    proc = cli_popen("export", dom.name, "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        check_exposition(scrape(url), scene)
        # the collector reads the domain at each scrape: one more add shows up
        dom.task(scene["live_id"]).add(CB, notify=TWA_NONE)
        m = metrics(scrape(url))
        live = _task_labels(dom, scene["live_id"], "live")
        assert m[("shm_taskwork_task_added_total", live)] == 6
        assert m[("shm_taskwork_task_pending", live)] == 3
        rc, out, err = stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert rc == 0, err
    assert "Traceback" not in err
    assert out.splitlines() == [f"serving {dom.name} metrics on {url}"]


def test_export_port_zero_announces_its_port_and_stops_on_ctrl_c(domain):
    proc = cli_popen("export", domain.name, "--port", "0")
    try:
        line = readline(proc)
        m = re.fullmatch(r"serving (\S+) metrics on (http://127\.0\.0\.1:(\d+)/metrics)", line)
        assert m and m.group(1) == domain.name and int(m.group(3)) > 0, line
        got = metrics(scrape(m.group(2)))
        d = frozenset({"domain": domain.name}.items())
        assert got[("shm_taskwork_pool_free", d)] == domain.pool_size
        assert got[("shm_taskwork_tasks", d)] == 0
        rc, _, err = stop(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert rc == 0
    assert err == ""


def test_export_port_in_use_is_one_line_error(domain):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = cli("export", domain.name, "--port", str(s.getsockname()[1]))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot listen" in r.stderr
    assert r.stdout == ""


# ---- errors and help ----------------------------------------------------------

@pytest.mark.parametrize("cmd", [["top", "--once"], ["export", "--once"], ["export"]])
def test_missing_domain_is_one_line_error(cmd):
    from conftest import unique_name
    missing = unique_name("missing")
    r = cli(cmd[0], missing, *cmd[1:])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert missing in lines[0] and lines[0].startswith(f"shm-taskwork {cmd[0]}:")
    assert r.stdout == ""


@pytest.mark.parametrize("cmd,options", [
    ("top", ["--interval", "--once", "--iterations"]),
    ("export", ["--port", "--addr", "--once"]),
])
def test_help(cmd, options):
    r = cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: shm-taskwork {cmd}")
    for opt in options:
        assert opt in r.stdout


@pytest.mark.parametrize("args", [["--interval", "0"], ["--interval", "soon"],
                                  ["--iterations", "0"]])
def test_top_bad_arguments_are_usage_errors(domain, args):
    r = cli("top", domain.name, *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


# ---- the shared pieces of tools/: _proc and _common ------------------------------------------

def _echo_child(link, greeting):
    link.ready(greeting=greeting)
    got = link.recv(timeout=30)
    link.emit(ev="echo", got=got)


def _dies_before_ready(link):
    import sys as _sys
    print("cannot open the thing", file=_sys.stderr)
    raise SystemExit(3)


def test_children_ready_handshake_and_both_directions():
    from shm_taskwork.tools._proc import Children

    with Children() as kids:
        c = kids.fork("echo", _echo_child, "hi")
        [ready] = kids.wait_ready(timeout=30)
        assert ready["greeting"] == "hi" and ready["pid"] == c.pid
        c.send({"n": 7})
        assert kids.event(c, "echo", 30)["got"] == {"n": 7}
        assert c.wait(30) == 0
    assert c.poll() == 0


def test_a_child_dying_before_ready_is_an_error_at_once_not_a_timeout():
    from shm_taskwork.tools._proc import ChildError, Children

    t0 = time.monotonic()
    with Children() as kids:
        kids.fork("doomed", _dies_before_ready)
        with pytest.raises(ChildError) as err:
            kids.wait_ready(timeout=60)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "doomed" in msg and "status 3" in msg and "cannot open the thing" in msg, msg


def test_children_kills_and_reaps_what_is_left_on_exit():
    from shm_taskwork.tools._proc import Children

    with Children() as kids:
        c = kids.fork("echo", _echo_child, "hi")   # waits forever for a line
        kids.wait_ready(timeout=30)
    assert c.poll() == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(c.pid, 0)


def test_a_spawned_program_speaks_through_stdio():
    from shm_taskwork.tools._proc import Children

    body = ("from shm_taskwork.tools._proc import Link\n"
            "link = Link.stdio(); link.ready(); link.emit(ev='got', v=link.recv(30))\n")
    env = _env()
    with Children() as kids:
        c = kids.spawn("prog", [sys.executable, "-c", body], env=env)
        kids.wait_ready(timeout=30)
        c.send([1, 2])
        assert kids.event(c, "got", 30)["v"] == [1, 2]
        assert c.wait(30) == 0


def test_temp_domain_is_unlinked_however_the_block_ends():
    from shm_taskwork.tools._proc import temp_domain

    with pytest.raises(RuntimeError):
        with temp_domain("tw_test_tmp", pool_size=64) as dom:
            name = dom.name
            assert os.path.exists("/dev/shm" + name)
            raise RuntimeError("boom")
    assert not os.path.exists("/dev/shm" + name)


def test_percentile_is_nearest_rank():
    from shm_taskwork.tools._common import percentile

    xs = [5, 1, 4, 2, 3]
    assert [percentile(xs, p) for p in (1, 20, 50, 80, 99, 100)] == [1, 1, 3, 4, 5, 5]
    assert percentile(range(1, 101), 99) == 99
    for bad in (0, 101, -1):
        with pytest.raises(ValueError, match="more than 0 and at most 100"):
            percentile(xs, bad)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_fit_columns_drops_in_order_and_keeps_the_rest():
    from shm_taskwork.tools._common import fit_columns

    head = ("id", "name", "a", "b", "c")
    rows = [(1, "n" * 10, "x" * 20, "y" * 20, "z" * 20)]
    h, r = fit_columns(head, rows, 60, ("c", "b", "a"))
    assert h == ("id", "name", "a", "b") and r == [(1, "n" * 10, "x" * 20, "y" * 20)]
    h, _ = fit_columns(head, rows, 10, ("c", "b"))
    assert h == ("id", "name", "a")          # never drops what is not listed
    assert fit_columns(head, rows, 10_000, ("c",))[0] == head
