"""The operator side of README "Workers in production": works in progress
shown by status, top and the exporter; --check and the example alert clear
once reaping settled a death; output readable in 80 columns; q quits top;
inspect --oldest with payload previews; one form of work id; --json on the
commands that print a result; dead-letters --retry's exit status.

Real processes throughout: a worker blocked inside a callback until the test
releases it (a line on its stdin), real kills, a real pty for top."""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, SERVICE_TASK, readline, run_cli, wait_until

from shm_taskwork import TWA_NONE, TWA_RESUME

CLI_TIMEOUT = 60

# A worker whose callback blocks until the test writes a line on its stdin;
# it says "started <payload>" as each callback begins.
BLOCKING = """
    import sys
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register(sys.argv[2])

    @callback(name="test.block")
    def block(work):
        print("started", work.payload.decode(), flush=True)
        sys.stdin.readline()

    print(task.id, flush=True)
    if sys.stdin.readline().strip() == "run":
        print("ran", task.run(), flush=True)
    sys.stdin.readline()
    task.exit()
"""


def cli(*args: str, columns: int | None = 200, timeout: float = CLI_TIMEOUT):
    return run_cli(*args, columns=columns, timeout=timeout)


@pytest.fixture
def busy(make_domain, spawn):
    """A worker inside the first of 3 works of one run (the other 2 taken
    with it), with 2 more works pending behind the run."""
    dom = make_domain("busy")
    child = spawn(BLOCKING, dom.name, "a-worker-with-a-rather-long-name",
                  stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    for i in range(3):
        task.add("test.block", b"run%d\n\x00" % i, TWA_NONE)
    child.stdin.write("run\n")
    child.stdin.flush()
    assert readline(child).startswith("started run")
    task.add("test.block", b"p0", TWA_NONE)
    task.add("test.block", b"p1", TWA_NONE)
    yield dom, task, child
    if child.poll() is None:
        child.stdin.write("\n" * 6)
        child.stdin.flush()
        child.communicate(timeout=15)


def fits(text: str, width: int = 80) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, f"lines wider than {width}: {long}"


# ---- works in progress, everywhere --------------------------------------------------------

def test_status_shows_running_works_in_80_columns(busy):
    dom, task, child = busy
    rec = json.loads(cli("status", dom.name, "--json").stdout)
    [t] = rec["tasks"]
    assert (t["pending"], t["running"]) == (2, 3) and t["oldest_running_s"] > 0
    assert rec["pool"]["running"] == 3
    r = cli("status", dom.name, columns=80)
    assert r.returncode == 0, r.stderr
    fits(r.stdout)
    lines = r.stdout.splitlines()
    head = next(line for line in lines if line.split()[:2] == ["id", "name"])
    cols = head.split()
    for want in ("id", "pid", "state", "added", "run", "pending", "running", "oldest_run"):
        assert want in cols, head
    row = lines[lines.index(head) + 2].split()
    cells = dict(zip(cols, row))
    assert cells["id"] == str(task.id) and cells["pid"] == str(child.pid)
    assert (cells["added"], cells["run"], cells["pending"], cells["running"]) == \
        ("5", "0", "2", "3")
    assert "--wide" in r.stdout          # says what it left out, and how to see it
    wide = cli("status", dom.name, "--wide", columns=80)
    assert all(c in wide.stdout for c in ("signals", "resumes", "max_pending", "process"))


def test_top_and_exporter_show_running_works(busy):
    dom, task, child = busy
    frame = json.loads(cli("top", dom.name, "--once", "--interval", "0.05", "--json").stdout)
    [t] = frame["tasks"]
    assert (t["pending"], t["running"]) == (2, 3) and t["oldest_running_s"] > 0
    r = cli("top", dom.name, "--once", "--interval", "0.05", columns=80)
    assert r.returncode == 0, r.stderr
    fits(r.stdout)
    head = next(line for line in r.stdout.splitlines() if line.split()[:2] == ["id", "name"])
    assert {"pending", "oldest", "running", "oldest_run", "run", "run/s"} <= set(head.split())
    m = cli("export", dom.name, "--once").stdout
    labels = f'domain="{dom.name}",name="a-worker-with-a-rather-long-name",task="{task.id}"'
    assert f"shm_taskwork_running_works{{{labels}}} 3.0" in m, m
    age = re.search(r"shm_taskwork_oldest_running_seconds\{" + re.escape(labels) + r"\} (\S+)", m)
    assert age and float(age.group(1)) > 0


def test_inspect_lists_oldest_first_with_previews_and_one_id_form(busy):
    dom, task, child = busy
    rec = json.loads(cli("inspect", dom.name, str(task.id), "--json", "--oldest").stdout)
    assert [w["payload"] for w in rec["pending"]] == [b"p0".hex(), b"p1".hex()]
    assert rec["task"]["running"] == 3
    ids = [w["id"] for w in rec["pending"]]
    assert all(re.fullmatch(r"0x[0-9a-f]+", i) for i in ids)
    text = cli("inspect", dom.name, str(task.id), "--oldest").stdout
    assert "2 pending works, oldest first" in text and "3 running" in text
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [r[1] for r in rows] == ids          # the same ids as in JSON
    assert [r[-2] for r in rows] == ["p0", "p1"]   # the payload preview, then its size
    newest = cli("inspect", dom.name, str(task.id)).stdout
    assert newest.index("p1") < newest.index("p0")


def test_inspect_preview_is_escaped_and_short(make_domain, spawn):
    dom = make_domain("preview")
    child = spawn(SERVICE_TASK, dom.name, "svc", stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    task.add("test.known", b"\x1b[31mred\n" + b"x" * 100, TWA_NONE)
    out = cli("inspect", dom.name, "svc", columns=80).stdout
    fits(out)
    assert "\x1b" not in out and "\\x1b[31mred\\n" in out and "..." in out
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


# ---- states operators can act on ----------------------------------------------------------

def check(dom, *opts):
    r = cli("status", dom.name, "--check", *opts)
    assert r.stderr == "", r.stderr
    return r.returncode, r.stdout


def test_check_clears_once_reaping_settled_a_death_and_the_letters_are_dropped(make_domain,
                                                                               spawn):
    dom = make_domain("settle")
    child = spawn(SERVICE_TASK, dom.name, "svc", stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    task.add("test.known", b"", TWA_NONE)
    task.add("test.known", b"", TWA_NONE)
    child.kill()
    child.wait(timeout=10)
    wait_until(lambda: [t.state for t in dom.tasks(reap=False)] == ["dead"],
               what="the killed task to read dead")
    code, out = check(dom)
    assert code == 2 and "1 dead task" in out, out
    rec = json.loads(cli("status", dom.name, "--check", "--json").stdout)
    assert (rec["status"], rec["state"]) == (2, "CRITICAL")
    assert any("dead task" in why for why in rec["reasons"])

    r = cli("fsck", dom.name, "--repair")         # reaping settles the death
    assert r.returncode in (0, 1), r.stderr
    assert [t.state for t in dom.tasks(reap=False)] == ["reaped"]
    code, out = check(dom)
    assert code == 1 and "2 dead letters" in out and "dead task" not in out, out
    assert check(dom, "--warn-dead-letters", "2")[0] == 0
    assert check(dom, "--max-dead-letters", "2")[0] == 0      # the old name
    assert check(dom, "--crit-dead-letters", "1")[0] == 2
    assert check(dom, "--warn-dead-letters", "0", "--crit-dead-letters", "5")[0] == 1
    r = cli("status", dom.name, "--check", "--warn-dead-letters", "3", "--crit-dead-letters", "1")
    assert r.returncode != 0 and "--crit-dead-letters (1) must be at least" in r.stderr

    assert cli("dead-letters", dom.name, "--drop").returncode == 0
    code, out = check(dom)
    assert code == 0 and out.startswith("SHM-TASKWORK OK"), out
    rec = json.loads(cli("status", dom.name, "--check", "--json").stdout)
    assert (rec["status"], rec["state"], rec["reasons"]) == (0, "OK", [])


def test_check_json_of_a_missing_domain_is_unknown():
    r = cli("status", "tw_test_no_such_domain_json", "--check", "--json")
    assert r.returncode == 3
    rec = json.loads(r.stdout)
    assert (rec["status"], rec["state"]) == (3, "UNKNOWN") and "no domain" in rec["reasons"][0]


def test_the_example_dead_task_alert_resolves_once_reaped(make_domain, spawn):
    with open(os.path.join(ROOT, "examples", "prometheus", "shm_taskwork.rules.yml")) as f:
        doc = yaml.safe_load(f)
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r["alert"] == "ShmTaskworkDeadTask"]
    m = re.fullmatch(r'(\w+)\{state="(\w+)"\} == 1', rule["expr"])
    assert m, rule["expr"]
    metric, state = m.groups()

    def firing() -> bool:
        out = cli("export", dom.name, "--once").stdout
        return any(line.startswith(metric + "{") and f'state="{state}"' in line
                   and line.endswith(" 1.0") for line in out.splitlines())

    dom = make_domain("alert")
    child = spawn(SERVICE_TASK, dom.name, "svc", stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    task.add("test.known", b"", TWA_NONE)
    child.kill()
    child.wait(timeout=10)
    wait_until(lambda: [t.state for t in dom.tasks(reap=False)] == ["dead"],
               what="the killed task to read dead")
    assert firing()
    dom.tasks()                                    # reaps it
    assert not firing()


def test_dead_letters_retry_exits_1_when_letters_had_no_live_target(make_domain, spawn):
    dom = make_domain("noretry")
    child = spawn(SERVICE_TASK, dom.name, "svc", stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    task.add("test.stranger", b"", TWA_RESUME)
    child.stdin.write("run\n")
    child.stdin.flush()
    assert int(readline(child)) == 0
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)          # the only task of its name is gone
    r = cli("dead-letters", dom.name, "--retry")
    assert r.returncode == 1, r
    assert "1 with no live task to take them" in r.stdout
    r = cli("dead-letters", dom.name, "--retry", "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == {"retried": 0, "left": 1,
                                                          "no_target": 1}


# ---- q quits top ---------------------------------------------------------------------------

def test_q_quits_top_on_a_terminal(domain):
    import pty

    pid, fd = pty.fork()
    if pid == 0:   # the child: top on the pty, 80 columns
        os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ["COLUMNS"], os.environ["LINES"] = "80", "24"
        os.execv(sys.executable, [sys.executable, "-m", "shm_taskwork.cli", "top",
                                  domain.name, "--interval", "0.1"])
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"shm-taskwork top" not in out:   # the first frame is on the screen
            left = deadline - time.monotonic()
            assert left > 0, out
            if select.select([fd], [], [], left)[0]:
                out += os.read(fd, 65536)
        os.write(fd, b"q")
        deadline = time.monotonic() + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "top did not quit on q"
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    pass
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


# ---- --json everywhere ---------------------------------------------------------------------

def test_every_command_that_prints_a_result_takes_json(make_domain, tmp_path):
    from conftest import unique_name

    name = unique_name("json")
    r = cli("create", name, "--pool-size", "64", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == name
    try:
        for args in (("status", name), ("status", name, "--check"), ("list",),
                     ("fsck", name), ("dead-letters", name), ("top", name, "--once",
                                                              "--interval", "0.01")):
            r = cli(*args, "--json")
            assert r.returncode == 0, (args, r.stderr)
            json.loads(r.stdout)
    finally:
        r = cli("destroy", name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"destroyed": name}


def test_inspect_running_lists_the_works_a_run_holds(busy):
    from shm_taskwork import Domain

    dom, task, child = busy
    if not hasattr(Domain, "running_works"):
        r = cli("inspect", dom.name, str(task.id), "--running")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        pytest.skip("the package has no Domain.running_works() to list running works with")
    rec = json.loads(cli("inspect", dom.name, str(task.id), "--running", "--oldest",
                         "--json").stdout)
    assert rec["total_running"] == 3
    assert [bytes.fromhex(w["payload"]) for w in rec["running"]] == \
        [b"run%d\n\x00" % i for i in range(3)]
    text = cli("inspect", dom.name, str(task.id), "--running").stdout
    assert "3 running works, newest first" in text and "run2\\n\\x00" in text
