"""Trust boundaries of a shared domain, the readers' side (issue #14): what a
member that can write a 0660/0666 segment can do to the operators' tools and
to the processes that open it.

- strings read from a segment (task, callback, domain names, origins) reach
  terminals and logs with control characters escaped, never as rich markup;
- a FIFO or a socket in /dev/shm never hangs ``list`` or the exporter;
- forged lock owners in 8 slots do not stall ``status``, ``list`` or
  ``export``: each reader bounds the time it waits on locks others hold and
  reports the slots it could not read;
- ``open``/``open_or_create(name, mode=M)`` refuse a segment owned by another
  user or whose mode grants more than ``M``;
- duplicate name-table entries give one exporter series, and numeric flags
  out of range give a one-line error.

Every command is a real subprocess with a deadline, so a hang fails the test.
The member's side runs as user nobody where the finding needs another user
(the ``stranger`` fixture of tests/test_security.py).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, SERVICE_TASK, cli_env, readline, run_cli, unique_name,
                      wait_until)
from test_security import stranger  # noqa: F401  (a fixture: the member as user nobody)

from shm_taskwork import TWA_NONE, Domain
from shm_taskwork._native import ffi

CLI_TIMEOUT = 30.0

# Window title, clear screen, an OSC-8 link, bell, a C1 CSI, a line separator.
EVIL_TASK = "ev\x1b]0;pwned\x07il\x1b[2J"
EVIL_CB = "cb\x1b]8;;http://example.invalid/\x1b\\link\x1b]8;;\x1b\\\x9b31m"
EVIL_ORIGIN = b"or\x1b[31migin\r\n\xe2\x80\xa8x"
MARKUP_TASK = "[/]"
RAW = ("\x1b", "\x07", "\x9b", "\r", "\u2028")


def _env() -> dict:
    return cli_env(250)


def cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_cli(*args, columns=250, timeout=timeout, errors="surrogateescape")


def assert_escaped(res: subprocess.CompletedProcess, *, must_show: tuple[str, ...] = ()) -> str:
    out = res.stdout + res.stderr
    assert res.returncode in (0, 2), (res.returncode, out)
    for ch in RAW:
        assert ch not in out, (repr(ch), out)
    for text in must_show:
        assert text in out, (text, out)
    return out


def start_task(spawn, dom, name: str):
    child = spawn(SERVICE_TASK, dom.name, name, stdin=subprocess.PIPE)
    return child, dom.task(int(readline(child)))


def run_in(child) -> int:
    child.stdin.write("run\n")
    child.stdin.flush()
    return int(readline(child))


def forge_origin(dom: Domain, work, raw: bytes) -> None:
    """Write a work's origin as any writer of the segment can."""
    node = work.id & 0xffffffff
    d = dom.d
    base = d.base + d.nodes_off + node * d.node_size
    ffi.memmove(base + d.origin_off, raw, len(raw))
    ffi.cast("struct tw_node *", base).origin_len = len(raw)


# ---- 1. terminal escapes and rich markup ---------------------------------------------------

def test_segment_strings_reach_terminals_escaped_and_never_as_markup(make_domain, spawn,
                                                                     caplog):
    dom = make_domain("esc\x1b[31m\x07", record_origin=True, mode=0o666)
    evil, evil_h = start_task(spawn, dom, EVIL_TASK)
    _markup, markup_h = start_task(spawn, dom, MARKUP_TASK)
    # two works of a callback the task does not know: dead letters (unknown_callback)
    for _ in range(2):
        forge_origin(dom, evil_h.add(EVIL_CB, b"x", TWA_NONE), EVIL_ORIGIN)
    run_in(evil)
    assert len(dom.dead_letters(reason="unknown_callback")) == 2
    # and two pending ones, for inspect and top's oldest column
    for h in (evil_h, markup_h):
        forge_origin(dom, h.add(EVIL_CB, b"y", TWA_NONE), EVIL_ORIGIN)

    shown = ("\\x1b", "[/]")
    assert_escaped(cli("status", dom.name), must_show=shown + ("\\x9b", "\\u2028"))
    assert_escaped(cli("top", dom.name, "--once", "--interval", "0.05"), must_show=shown)
    assert_escaped(cli("inspect", dom.name, str(evil_h.id)), must_show=("\\x1b",))
    assert_escaped(cli("dead-letters", dom.name), must_show=("\\x1b", "\\x07"))
    listed = assert_escaped(cli("list"))
    assert dom.name.replace("\x1b", "\\x1b").replace("\x07", "\\x07") in listed

    # a dead task: the --check line names it, and the reap log too
    evil.kill()
    evil.wait(timeout=10)
    wait_until(lambda: {t.id: t.state for t in dom.tasks(reap=False)}.get(evil_h.id) == "dead",
               what="the killed task to read as dead")
    res = cli("status", dom.name, "--check")
    assert res.returncode == 2, res
    assert_escaped(res, must_show=("SHM-TASKWORK CRITICAL", "ev\\x1b]0;pwned\\x07il"))
    with caplog.at_level(logging.WARNING, logger="shm_taskwork.reap"):
        dom.tasks()
    said = [r.getMessage() for r in caplog.records if r.name == "shm_taskwork.reap"]
    assert said, "the reap was not logged"
    for msg in said:
        assert not any(ch in msg for ch in RAW), msg
        assert "\\x1b" in msg, msg


# ---- 2. a FIFO or a socket in /dev/shm --------------------------------------------------------

@pytest.fixture
def shm_traps():
    """A FIFO and a listening Unix socket in /dev/shm; removed at teardown."""
    fifo = unique_name("fifo")
    sock_name = unique_name("sock")
    os.mkfifo("/dev/shm" + fifo, 0o666)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("/dev/shm" + sock_name)
        sock.listen(1)
        yield fifo, sock_name
    finally:
        sock.close()
        for n in (fifo, sock_name):
            try:
                os.unlink("/dev/shm" + n)
            except FileNotFoundError:
                pass


def test_list_skips_a_fifo_and_a_socket_in_dev_shm(shm_traps, domain):
    fifo, sock_name = shm_traps
    t0 = time.monotonic()
    try:
        res = cli("list", timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("list hung on a FIFO in /dev/shm")
    assert res.returncode == 0, res
    assert domain.name in res.stdout
    assert fifo not in res.stdout and sock_name not in res.stdout
    assert time.monotonic() - t0 < 20


def test_the_exporter_skips_a_fifo_left_at_its_domains_name(make_domain):
    """The domain is destroyed and a FIFO takes its name: the next scrape says
    domain_up 0 instead of hanging (and the scrape after that, too)."""
    import urllib.request

    dom = make_domain("expfifo")
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "export", dom.name,
                             "--port", "0"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    fifo = "/dev/shm" + dom.name
    try:
        url = readline(proc, 20).split(" on ", 1)[1].strip()

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()

        assert f'shm_taskwork_domain_up{{domain="{dom.name}"}} 1.0' in scrape()
        dom.unlink()
        os.mkfifo(fifo, 0o666)
        for _ in range(2):
            try:
                text = scrape()
            except OSError as exc:
                pytest.fail(f"the exporter hung on a FIFO at its domain's name: {exc!r}")
            assert f'shm_taskwork_domain_up{{domain="{dom.name}"}} 0.0' in text
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
        try:
            os.unlink(fifo)
        except FileNotFoundError:
            pass


# ---- 3. forged lock owners ---------------------------------------------------------------------

FORGED = 8

# The member: in a 0666 domain, writes 8 slots as a task's (a name, a
# generation; a held life lock, or none: a dead task) whose list lock is held
# by itself, for ever.
FORGER = r'''
import os, sys
from shm_taskwork import Domain
from shm_taskwork._native import ffi, lib
dom = Domain.open(sys.argv[1])
me = os.getpid()
off = ffi.offsetof("struct tw_slot", "pi_lock")
for i in range(int(sys.argv[2])):
    s = dom._slot(i)
    s.name = b"forged%d" % i
    s.pid = me
    s.gen = 1
    s.head = (1 << 32) | lib.TW_NIL
    s.life.word = me if sys.argv[3] == "alive" else 0    # held by a live thread, or dead
    ffi.cast("uint32_t *", ffi.cast("char *", s) + off)[0] = me   # the lock word: held
    s.state = lib.TW_SLOT_RUNNING
print("forged", flush=True)
sys.stdin.readline()
'''


@pytest.fixture(params=["alive", "dead"])
def forged_domain(make_domain, spawn, request):
    """A 0666 domain with FORGED slots whose list lock a member holds: live
    tasks, or dead ones (a reader that reaps takes the lock to reap them)."""
    dom = make_domain("locks", mode=0o666, max_tasks=FORGED + 2)
    args = (FORGER, dom.name, str(FORGED), request.param)
    if os.geteuid() == 0:
        member = request.getfixturevalue("stranger")(*args)
    else:
        member = spawn(*args, stdin=subprocess.PIPE)
    assert readline(member, CLI_TIMEOUT).split() == ["forged"]
    return dom   # the member lives on until its fixture's teardown kills it


# Each reader may wait on locks others hold for a bounded total; unbounded,
# each forged slot costs the 2 s lock deadline (16 s per pass over the table).
READER_BOUND = 8.0


@pytest.mark.parametrize("command", [("export", "--once"), ("list",), ("status",),
                                     ("status", "--json"), ("status", "--check"),
                                     ("top", "--once")])
def test_forged_lock_owners_do_not_stall_readers(forged_domain, command):
    dom = forged_domain
    args = list(command)
    if command[0] != "list":
        args.insert(1, dom.name)
    if command[0] == "top":
        args += ["--interval", "0.05"]
    t0 = time.monotonic()
    try:
        res = cli(*args, timeout=READER_BOUND + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} hung on forged lock owners")
    took = time.monotonic() - t0
    dead = all(t.state == "dead" for t in dom.tasks(reap=False))
    check_code = 2 if dead else 1          # CRITICAL: dead tasks; WARNING: unreadable
    assert res.returncode == (check_code if command == ("status", "--check") else 0), res
    assert took < READER_BOUND, f"{' '.join(command)} took {took:.1f} s"
    out = res.stdout
    if command == ("export", "--once"):
        assert out.count("shm_taskwork_task_unreadable{") == FORGED
        assert out.count(f'shm_taskwork_task_unreadable{{domain="{dom.name}"') == FORGED
        assert " 1.0" in out.split("shm_taskwork_task_unreadable{", 1)[1].splitlines()[0]
    elif command == ("list",):
        line = next(ln for ln in out.splitlines() if ln.startswith(dom.name + " "))
        assert f"{FORGED} slots unreadable" in line, line
    elif command == ("status", "--check"):
        assert f"{FORGED} tasks unreadable" in out, out
    elif command == ("status", "--json"):
        import json
        tasks = json.loads(out)["tasks"]
        assert len(tasks) == FORGED and all(t["unreadable"] for t in tasks), tasks
    else:
        assert out.count("unreadable") >= FORGED, out


def test_tasks_reports_forged_slots_as_unreadable_within_its_budget(forged_domain):
    dom = forged_domain
    t0 = time.monotonic()
    infos = dom.tasks()
    took = time.monotonic() - t0
    assert len(infos) == FORGED
    assert all(t.unreadable and t.pending == 0 for t in infos), infos
    assert took < Domain.READ_LOCK_BUDGET + 0.5, took
    t0 = time.monotonic()
    st = dom.stats(reap=False)
    assert st.tasks == FORGED and st.pending == 0
    assert time.monotonic() - t0 < Domain.READ_LOCK_BUDGET + 0.5
    assert dom.stats(infos=infos) == st
    # try-only: no wait at all
    t0 = time.monotonic()
    assert all(t.unreadable for t in dom.tasks(lock_timeout=0)), "try-only read"
    assert time.monotonic() - t0 < 0.5


def test_a_readable_task_is_not_marked_unreadable(domain, spawn):
    child, h = start_task(spawn, domain, "plain")
    h.add("test.known", b"", TWA_NONE)
    (info,) = domain.tasks()
    assert not info.unreadable and info.pending == 1
    assert info.as_dict()["unreadable"] is False


# ---- 4. a squatted name ------------------------------------------------------------------------

SQUAT = r'''
import sys
from shm_taskwork import Domain
dom = Domain.create(sys.argv[1], mode=0o666, max_tasks=4, pool_size=16)
print("made", flush=True)
'''


def test_open_or_create_with_a_mode_refuses_a_name_squatted_by_another_user(stranger):
    name = unique_name("squat")
    p = stranger(SQUAT, name)
    out, err = p.communicate(timeout=CLI_TIMEOUT)
    assert out.split() == ["made"], (out, err)
    try:
        for call in (Domain.open_or_create, Domain.open):
            with pytest.raises(PermissionError) as ei:
                call(name, mode=0o600).close()
            said = str(ei.value)
            assert name in said and "uid 65534" in said and "0o666" in said, said
        # without a mode, open() stays as it was: it joins (and says nothing)
        Domain.open(name).close()
    finally:
        os.unlink("/dev/shm" + name)


def test_open_with_a_mode_refuses_a_segment_that_grants_more(make_domain):
    dom = make_domain("wide", mode=0o666)
    for mode in (0o600, 0o660, 0o644):
        with pytest.raises(PermissionError) as ei:
            Domain.open(dom.name, mode=mode)
        assert "0o666" in str(ei.value) and f"{mode:#o}" in str(ei.value), str(ei.value)
    with pytest.raises(PermissionError):
        Domain.open_or_create(dom.name, mode=0o600)
    for mode in (0o666, 0o777):
        Domain.open(dom.name, mode=mode).close()
    Domain.open_or_create(dom.name, mode=0o666).close()
    with pytest.raises(ValueError):
        Domain.open(dom.name, mode=0o1000)


# ---- 5. lower findings --------------------------------------------------------------------------

def test_duplicate_name_table_entries_give_one_exporter_series(make_domain, spawn):
    from prometheus_client.parser import text_string_to_metric_families

    dom = make_domain("dupnames")
    child, h = start_task(spawn, dom, "dup")
    h.add("test.known", b"", TWA_NONE)
    assert run_in(child) == 1
    names = ffi.cast("struct tw_name *", dom.d.base + dom.d.names_off)
    src = next(i for i in range(dom.d.names_cap) if names[i].id and
               ffi.string(names[i].name) == b"test.known")
    free = next(i for i in range(dom.d.names_cap) if not names[i].id)
    ffi.memmove(ffi.addressof(names[free]), ffi.addressof(names[src]),
                ffi.sizeof("struct tw_name"))
    names[free].id = names[src].id ^ 0x5a5a     # another id, the same name
    res = cli("export", dom.name, "--once")
    assert res.returncode == 0, res
    seen = set()
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in seen, f"duplicate series {key}"
            seen.add(key)
    count = [s for fam in text_string_to_metric_families(res.stdout) for s in fam.samples
             if s.name == "shm_taskwork_callback_latency_seconds_count"
             and s.labels.get("callback") == "test.known"]
    assert len(count) == 1 and count[0].value == 2.0, count   # both entries counted


@pytest.mark.parametrize("args", [("top", "NAME", "--interval", "1e308"),
                                  ("top", "NAME", "--interval", "1e10"),
                                  ("status", "NAME", "--max-oldest", "1e308")])
def test_numeric_flags_out_of_range_get_one_line_naming_the_range(domain, args):
    args = [domain.name if a == "NAME" else a for a in args]
    res = cli(*args, timeout=20)
    assert res.returncode == 2, res
    err = res.stderr.strip().splitlines()
    assert "unexpected error" not in res.stderr, res.stderr
    assert "at most" in err[-1], res.stderr
