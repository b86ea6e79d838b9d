"""Operators (docs/cli.md): ``--version``, ``list``, ``status --check``,
``inspect --limit/--callback``, ``dead-letters``, fsck's exit statuses, and a
quiet end on a closed pipe.

Every command runs as a real subprocess against domains whose tasks are
registered by unrelated processes; a dead task is one whose process was
SIGKILLed. No sleep synchronises anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import posix_ipc
import pytest

from conftest import (ROOT, SERVICE_TASK, cli_env, readline, run_cli, unique_name,
                      wait_until)

import shm_taskwork
from shm_taskwork import TWA_NONE, TWA_RESUME

CLI_TIMEOUT = 60


def _env() -> dict:
    return cli_env(200)


def cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_cli(*args, columns=200, timeout=timeout)


# A task that runs on request; it knows test.known but not test.stranger.


def start(spawn, dom, name: str):
    child = spawn(SERVICE_TASK, dom.name, name, stdin=subprocess.PIPE)
    return child, dom.task(int(readline(child)))


def run_in(child) -> int:
    child.stdin.write("run\n")
    child.stdin.flush()
    return int(readline(child))


def kill(dom, child, task) -> None:
    child.kill()
    child.wait(timeout=10)
    # reap=False: look without reaping, as the commands do
    wait_until(lambda: {t.id: t.state for t in dom.tasks(reap=False)}.get(task.id) == "dead",
               what="the killed task to read as dead")


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout == f"shm-taskwork {shm_taskwork.__version__}\n"
    assert "--version" in cli("--help").stdout


# ---- list -------------------------------------------------------------------------

def test_list_finds_domains_by_their_magic(make_domain, spawn):
    dom = make_domain("list")
    child, task = start(spawn, dom, "lister")
    for i in range(3):
        task.add("test.known", b"%d" % i, TWA_NONE)
    task.add("test.stranger", b"", TWA_RESUME)  # unknown there: a dead letter when run
    child_b, task_b = start(spawn, dom, "victim")
    task_b.add("test.known", b"", TWA_NONE)
    kill(dom, child_b, task_b)
    assert run_in(child) == 3
    # a segment with our magic and a layout this build cannot read, and one without it
    odd, plain = unique_name("oddlayout"), unique_name("notours")
    shms = [posix_ipc.SharedMemory(odd, posix_ipc.O_CREX, size=4096),
            posix_ipc.SharedMemory(plain, posix_ipc.O_CREX, size=4096)]
    try:
        os.write(shms[0].fd, b"SHMTWRK\x01" + (999).to_bytes(4, "little"))
        os.write(shms[1].fd, b"something else")
        r = cli("list", "--json")
        assert r.returncode == 0, r.stderr
        found = {d["name"]: d for d in json.loads(r.stdout)}
        assert plain not in found
        assert found[odd]["error"].startswith("layout version 999"), found[odd]
        d = found[dom.name]
        assert d["error"] is None
        assert d["size"] == os.stat("/dev/shm" + dom.name).st_size
        assert (d["pool_size"], d["max_tasks"]) == (256, 8)
        assert (d["alive"], d["dead"], d["pending"], d["dead_letters"]) == (1, 1, 1, 1)
        text = cli("list")
        assert text.returncode == 0, text.stderr
        row = next(line for line in text.stdout.splitlines() if line.startswith(dom.name + " "))
        assert "unreadable" not in row
        assert any(line.startswith(odd + " ") and "unreadable: layout version 999" in line
                   for line in text.stdout.splitlines())
    finally:
        for s in shms:
            s.close_fd()
            s.unlink()
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


# ---- status --check -------------------------------------------------------------------

def check(dom, *opts: str) -> tuple[int, str]:
    r = cli("status", dom.name if not isinstance(dom, str) else dom, "--check", *opts)
    assert r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return r.returncode, lines[0]


def test_check_ok_warning_critical_unknown(make_domain, spawn):
    dom = make_domain("check", pool_size=64)
    code, line = check(dom)
    assert code == 0 and line.startswith(f"SHM-TASKWORK OK - {dom.name}: 0 live tasks"), line
    assert " | " in line and "pool_free=100.0%;10:" in line

    child, task = start(spawn, dom, "svc")
    task.add("test.stranger", b"", TWA_RESUME)
    task.add("test.stranger", b"", TWA_RESUME)
    run_in(child)
    code, line = check(dom)
    assert code == 1 and line.startswith("SHM-TASKWORK WARNING"), line
    assert "2 dead letters (more than 0)" in line
    assert check(dom, "--max-dead-letters", "2")[0] == 0

    # a pending work older than a microsecond: the age threshold (no time asserted)
    task.add("test.known", b"", TWA_NONE)
    code, line = check(dom, "--max-dead-letters", "2", "--max-oldest", "0.000001")
    assert code == 1 and "oldest pending work" in line and "svc" in line, line
    assert check(dom, "--max-dead-letters", "2", "--max-oldest", "3600")[0] == 0

    # the pool nearly empty: 64 nodes, 2 dead letters + 1 pending + 56 more
    for _ in range(56):
        task.add("test.known", b"", TWA_NONE)
    code, line = check(dom, "--max-dead-letters", "2")
    assert code == 1 and "pool 7.8% free (less than 10%)" in line, line
    assert check(dom, "--max-dead-letters", "2", "--min-pool-free", "5")[0] == 0

    # a dead task is CRITICAL, whatever else is true
    victim, vtask = start(spawn, dom, "victim")
    kill(dom, victim, vtask)
    code, line = check(dom, "--max-dead-letters", "1000", "--min-pool-free", "0")
    assert code == 2 and line.startswith("SHM-TASKWORK CRITICAL"), line
    assert f"1 dead task: victim (task {vtask.id}, pid {victim.pid})" in line

    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


def test_check_of_a_missing_domain_is_unknown():
    code, line = check("tw_test_no_such_domain_check")
    assert code == 3
    assert line == ("SHM-TASKWORK UNKNOWN - tw_test_no_such_domain_check: no domain named "
                    "'/tw_test_no_such_domain_check'")


# ---- inspect --limit / --callback ---------------------------------------------------------

def test_inspect_limit_and_callback(make_domain, spawn):
    dom = make_domain("insp")
    child, task = start(spawn, dom, "svc")
    for i in range(5):
        task.add("test.a", b"a" * i, TWA_NONE)
    for i in range(3):
        task.add("test.b", b"b" * i, TWA_NONE)
    rec = json.loads(cli("inspect", dom.name, "svc", "--json", "--limit", "2").stdout)
    assert rec["total_pending"] == 8 and rec["by_callback"] == {"test.a": 5, "test.b": 3}
    assert [w["func_name"] for w in rec["pending"]] == ["test.b", "test.b"]
    assert [w["payload_len"] for w in rec["pending"]] == [2, 1]
    rec = json.loads(cli("inspect", dom.name, "svc", "--json", "--callback", "test.a",
                         "--limit", "3").stdout)
    assert [w["payload_len"] for w in rec["pending"]] == [4, 3, 2]
    r = cli("inspect", dom.name, "svc", "--callback", "test.a", "--limit", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "8 pending works, newest first" in out
    assert "by callback: test.a 5, test.b 3" in out
    assert "callback 'test.a': 5 of them" in out and "showing the newest 3 (--limit)" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isspace() or line[:1].isdigit()]
    rows = [r for r in rows if r and r[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and all(r[2] == "test.a" for r in rows)
    assert [r[-1] for r in rows] == ["4B", "3B", "2B"]
    assert "callback 'test.zzz': 0 of them" in cli("inspect", dom.name, "svc", "--callback", "test.zzz").stdout
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


# ---- a closed pipe -------------------------------------------------------------------------

def test_output_to_a_closed_pipe_ends_quietly(make_domain, spawn):
    dom = make_domain("pipe", pool_size=4096)
    child, task = start(spawn, dom, "svc")
    task.add_many("test.known", [b"x"] * 3000, TWA_NONE)  # ~200 KB of text: beyond a pipe
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "inspect", dom.name,
                             "svc"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()           # `| head -1`
    err = proc.stderr.read()
    proc.wait(timeout=CLI_TIMEOUT)
    assert first.startswith(b"task ")
    assert err == b"", err
    assert proc.returncode == 141
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)


# ---- fsck: could not check vs found something ---------------------------------------------

def test_fsck_exit_statuses_and_dead_letters_are_not_clean(make_domain, spawn):
    r = cli("fsck", "tw_test_no_such_domain_fsck")
    assert r.returncode == 8 and r.stdout == ""
    assert r.stderr.strip() == ("shm-taskwork fsck: no domain named "
                                "'/tw_test_no_such_domain_fsck'")
    dom = make_domain("fsck")
    r = cli("fsck", dom.name)
    assert (r.returncode, r.stdout.strip()) == (0, f"fsck {dom.name}: clean")
    child, task = start(spawn, dom, "svc")
    task.add("test.stranger", b"", TWA_RESUME)
    run_in(child)
    r = cli("fsck", dom.name)
    assert r.returncode == 0, r.stderr
    assert "clean" not in r.stdout
    assert "1 dead letter holds pool nodes" in r.stdout, r.stdout
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.communicate(timeout=15)
    victim, vtask = start(spawn, dom, "victim")
    vtask.add("test.known", b"", TWA_NONE)
    victim.kill()
    victim.wait(timeout=10)
    r = cli("fsck", dom.name)
    if r.returncode == 0:   # already reaped by a reader (README "Lifecycle without an operator"): nothing left to find
        assert "dead letter" in r.stdout
    else:
        assert r.returncode == 1, r.stderr
        assert "found 1 dead task" in r.stdout


# ---- dead-letters --------------------------------------------------------------------------

def test_dead_letters_list_retry_and_drop(make_domain, spawn):
    dom = make_domain("dl")
    child, task = start(spawn, dom, "svc")
    for i in range(3):
        task.add("test.stranger", b"s%d" % i, TWA_RESUME)
    assert run_in(child) == 0
    r = cli("dead-letters", dom.name, "--json")
    assert r.returncode == 0, r.stderr
    dl = json.loads(r.stdout)
    assert len(dl) == 3
    assert {(w["func_name"], w["reason"], w["target_name"]) for w in dl} == \
        {("test.stranger", "unknown_callback", "svc")}
    text = cli("dead-letters", dom.name)
    assert f"{dom.name}: 3 dead letters" in text.stdout and "unknown_callback" in text.stdout
    assert cli("dead-letters", dom.name, "--reason", "orphaned").stdout.strip() == \
        f"{dom.name}: no dead letters of reason orphaned"
    # re-queue them on a live task of the same name: each exactly once
    r = cli("dead-letters", dom.name, "--retry", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"retried": 3, "left": 0, "no_target": 0}
    assert task.pending() == 3
    assert run_in(child) == 0          # still unknown there: dead letters again
    assert len(dom.dead_letters()) == 3
    other, otask = start(spawn, dom, "other")
    r = cli("dead-letters", dom.name, "--retry", "--to", "other")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{dom.name}: retried 3 dead letters; 0 left"
    assert otask.pending() == 3
    assert run_in(other) == 0
    r = cli("dead-letters", dom.name, "--drop", "--reason", "unknown_callback", "--json")
    assert json.loads(r.stdout) == {"dropped": 3, "left": 0}
    st = dom.stats()
    assert st.dead_letters == 0 and st.pool_free == st.pool_size
    for c in (child, other):
        c.stdin.write("exit\n")
        c.stdin.flush()
        c.communicate(timeout=15)


def test_dead_letters_usage_errors(domain):
    r = cli("dead-letters", domain.name, "--to", "x")
    assert r.returncode == 1 and "--to goes with --retry" in r.stderr
    r = cli("dead-letters", domain.name, "--retry", "--drop")
    assert r.returncode == 2 and "not allowed with" in r.stderr
