"""Security (issue #10): a shared domain must never become a weapon, and every
bad input gets a clear error.

The attacks are real: a slot forged in the segment to name an unrelated
process, a squatter on the fd-passing socket names, a forged socket token.
The victims are separate Python processes that *block* every signal a task
may use, so a signal sent to them stays pending and visible (sigpending), and
that hold an eventfd a forged slot points at, so a pidfd_getfd + write would
show in its counter. The stranger cases at the end run as user nobody.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from shm_taskwork import (TWA_NONE, TWA_RESUME, TWA_SIGNAL, Domain, NoSuchTaskError,
                          NotCurrentTaskError, Work, callback)
from shm_taskwork import _native, _security
from shm_taskwork._native import lib

from conftest import ROOT, readline, unique_name, wait_until

TIMEOUT = 20.0
REC = "test.sec.rec"
RAN: list[bytes] = []


@callback(name=REC)
def _rec(work):
    RAN.append(work.payload)


def _shm_exists(name: str) -> bool:
    return os.path.exists("/dev/shm/" + name.lstrip("/"))


def ask(proc, command: str, reply: str) -> list[str]:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    while True:
        fields = readline(proc, TIMEOUT).split()
        if fields and fields[0] == reply:
            return fields[1:]


# ---- the processes --------------------------------------------------------------

# Blocks every signal a task may use, and the ones the issue saw used as
# weapons, and holds an eventfd: the target of a forged slot.
VICTIM = r'''
import os, signal, sys
WATCHED = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
           *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)}
signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
print("ready", efd, flush=True)
for line in sys.stdin:
    if line.split() == ["report"]:
        pending = sorted(int(s) for s in signal.sigpending())
        try:
            count = os.eventfd_read(efd)
        except BlockingIOError:
            count = 0
        print("report", count, ",".join(map(str, pending)) or "-", flush=True)
'''

# A task of the domain. Commands: efd (read its eventfd counter without
# running anything), token, checkpoint, block SIG, breakserver.
TASK = r'''
import os, signal, sys, logging
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
from shm_taskwork import Domain, callback, _security
RAN = []

@callback(name="test.sec.rec")
def rec(work):
    RAN.append(work.payload.decode())

dom = Domain.open(sys.argv[1])
signum = int(sys.argv[2]) if len(sys.argv) > 2 else int(signal.SIGUSR1)
t = dom.register(name="sec", signum=signum)
print("ready", t.id, t.gen, t.fileno(), flush=True)
for line in sys.stdin:
    op = line.split()
    if op[0] == "efd":
        try:
            n = os.eventfd_read(t.fileno())
        except BlockingIOError:
            n = 0
        print("efd", n, flush=True)
    elif op[0] == "token":
        tok = _security.read_fd_token(dom._slot(t.id))
        print("token", tok.hex() if tok else "-", int(t._server is not None and t._server.is_alive()), flush=True)
    elif op[0] == "checkpoint":
        print("checkpoint", t.checkpoint(), ",".join(RAN) or "-", flush=True)
    elif op[0] == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {int(op[1])})
        print("blocked", flush=True)
    elif op[0] == "pending":
        # the blocked signals pending now, then consumed (so a later one shows)
        got = sorted(int(s) for s in signal.sigpending())
        for s in got:
            signal.sigtimedwait({s}, 0)
        print("pending", ",".join(map(str, got)) or "-", flush=True)
    elif op[0] == "breakserver":
        # The listening socket fails under the server: its accept() errors.
        import socket
        t._server.sock.shutdown(socket.SHUT_RD)
        print("broken", flush=True)
'''

# Binds abstract names given on the command line (hex of the raw name) and
# hands any client its own eventfd: a squatter.
SQUATTER = r'''
import os, socket, sys, threading
efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
socks = []
for hexname in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(bytes.fromhex(hexname))
    s.listen(8)
    socks.append(s)
CONNECTS = [0]

def serve(s):
    while True:
        c, _ = s.accept()
        CONNECTS[0] += 1
        try:
            socket.send_fds(c, [b"E"], [efd])
        except OSError:
            pass
        c.close()

for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", len(socks), flush=True)
for line in sys.stdin:
    if line.split() == ["report"]:
        try:
            count = os.eventfd_read(efd)
        except BlockingIOError:
            count = 0
        print("report", count, CONNECTS[0], flush=True)
'''


def start(spawn, body: str, *args: str, **kw):
    p = spawn(body, *args, stdin=subprocess.PIPE, **kw)
    fields = readline(p, TIMEOUT).split()
    assert fields[0] == "ready", fields
    return p, fields[1:]


def report(victim) -> tuple[int, list[int]]:
    count, pending = ask(victim, "report", "report")
    return int(count), [] if pending == "-" else [int(s) for s in pending.split(",")]


def forge(dom: Domain, slot: int, pid: int, *, signum: int = int(signal.SIGUSR1),
          efd: int | None = None) -> None:
    """Rewrite a slot as a writer of the segment can: another process's pid
    and start time (public in /proc/PID/stat), a signal, an fd number."""
    s = dom._slot(slot)
    s.pid = pid
    s.start_ticks = _native.start_ticks(pid)
    s.signum = signum
    if efd is not None:
        s.efd = efd


# ---- 1. signal and fd only a process that joined the domain ------------------------------

@pytest.mark.parametrize("fd_path", ["getfd", "scm"])
def test_a_forged_slot_never_signals_or_robs_an_unrelated_process(make_domain, spawn,
                                                                   monkeypatch, caplog, fd_path):
    dom = make_domain("forged", mode=0o666)
    victim, (victim_efd,) = start(spawn, VICTIM)
    task, (tid, _gen, _efd) = start(spawn, TASK, dom.name)
    tid = int(tid)
    if fd_path == "scm":
        monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGRTMIN):
        forge(dom, tid, victim.pid, signum=int(signum), efd=int(victim_efd))
        before = dict(_security.REFUSED)
        with caplog.at_level(logging.WARNING, logger="shm_taskwork"):
            with Domain.open(dom.name) as adder:      # no cached proof: a fresh sender
                h = adder.task(tid)
                fds = os.listdir("/proc/self/fd")
                h.add(REC, b"signal", TWA_SIGNAL)     # queued, no exception ...
                h.add(REC, b"resume", TWA_RESUME)
                # no pidfd kept, no fd taken from the victim
                assert adder._peer.get((tid, h.gen), (-1, -1)) == (-1, -1)
                assert os.listdir("/proc/self/fd") == fds
        assert report(victim) == (0, [])            # ... and nothing reached the victim
        assert _security.REFUSED["not joined"] > before.get("not joined", 0)
        assert any("does not map this domain's segment" in r.getMessage() for r in caplog.records)
        caplog.clear()
        # the works are queued; the flags say the notifications were due
        assert dom.task(tid).pending() >= 2
        dom._slot(tid).flags &= ~(lib.TW_F_NOTIFY_RESUME | lib.TW_F_NOTIFY_SIGNAL)


def test_run_on_a_slot_that_names_this_process_says_what_is_wrong(make_domain, spawn):
    """A slot forged to name this very process is still not its task."""
    dom = make_domain("self")
    task, (tid, *_rest) = start(spawn, TASK, dom.name)
    forge(dom, int(tid), os.getpid())
    h = dom.task(int(tid))
    with pytest.raises(NotCurrentTaskError) as ei:
        h.run()
    assert "did not register it through this Domain object" in str(ei.value)


def test_a_participant_is_still_signalled_and_woken(make_domain, spawn, monkeypatch):
    """The proof holds for every real task, on both fd paths."""
    dom = make_domain("legit")
    task, (tid, _gen, _efd) = start(spawn, TASK, dom.name)
    ask(task, f"block {int(signal.SIGUSR1)}", "blocked")
    for path in ("", "scm"):
        monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", path)
        with Domain.open(dom.name) as adder:
            h = adder.task(int(tid))
            h.add(REC, b"r", TWA_RESUME)
            h.add(REC, b"s", TWA_SIGNAL)
        assert ask(task, "efd", "efd") == ["1"]
        assert ask(task, "pending", "pending") == [str(int(signal.SIGUSR1))]
        assert ask(task, "checkpoint", "checkpoint")[0] == "2"


def test_a_forged_signal_number_is_never_sent(make_domain, spawn):
    """A participant's slot rewritten to SIGTERM: the task blocks SIGTERM (so
    it 'handles' it), yet the sender sends only task signals."""
    dom = make_domain("forgedsig", mode=0o666)
    task, (tid, *_rest) = start(spawn, TASK, dom.name)
    ask(task, f"block {int(signal.SIGTERM)}", "blocked")
    dom._slot(int(tid)).signum = int(signal.SIGTERM)
    with Domain.open(dom.name) as adder:
        adder.task(int(tid)).add(REC, b"x", TWA_SIGNAL)
    assert ask(task, "pending", "pending") == ["-"]
    assert _security.REFUSED["signal"] >= 1


# ---- 2. fd passing nobody can squat ----------------------------------------------------

def _old_names(dom: Domain, slots: int, gens: int) -> list[str]:
    """The predictable names the fd server used to bind."""
    return [f"\0shm_taskwork{dom.name}/{s}/{g}".encode().hex()
            for s in range(slots) for g in range(1, gens + 1)]


def test_a_squatter_on_the_predictable_names_cannot_silence_the_task(make_domain, spawn,
                                                                      monkeypatch):
    dom = make_domain("squat")
    squatter, _ = start(spawn, SQUATTER, *_old_names(dom, dom.max_tasks, 3))
    task, (tid, _gen, _efd) = start(spawn, TASK, dom.name)
    token, alive = ask(task, "token", "token")
    assert token != "-" and alive == "1"
    monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    dom.task(int(tid)).add(REC, b"wake", TWA_RESUME)
    assert ask(task, "efd", "efd") == ["1"]               # the task's own eventfd was written
    assert ask(squatter, "report", "report") == ["0", "0"]


def test_a_forged_token_pointing_at_a_squatter_is_not_trusted(make_domain, spawn, monkeypatch):
    """A writer of the segment points the task's token at its own socket:
    the adder checks SO_PEERCRED (the registrant's pid and uid) and takes
    no fd from it."""
    dom = make_domain("token", mode=0o666)
    task, (tid, *_rest) = start(spawn, TASK, dom.name)
    token = os.urandom(16)
    squatter, _ = start(spawn, SQUATTER, _security.fd_socket_name(dom.name, token).hex())
    _security.write_fd_token(dom._slot(int(tid)), token)
    monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    before = _security.REFUSED["peer credentials"]
    dom.task(int(tid)).add(REC, b"x", TWA_RESUME)
    assert dom._peer[(int(tid), dom.task(int(tid)).gen)][1] == -1
    assert _security.REFUSED["peer credentials"] == before + 1
    # it was asked (once), and not believed: its eventfd was never written
    wait_until(lambda: ask(squatter, "report", "report")[1] == "1", TIMEOUT,
               what="the squatter to accept the adder's connection")
    assert ask(squatter, "report", "report") == ["0", "1"]
    assert ask(task, "efd", "efd") == ["0"]


def test_the_fd_server_retries_a_taken_name_and_says_so(make_domain, spawn, monkeypatch):
    """The first random names the task draws are taken by a squatter: it logs
    each, binds another, publishes that one, and a peer reaches it."""
    dom = make_domain("retry")
    taken = [os.urandom(16) for _ in range(3)]
    squatter, _ = start(spawn, SQUATTER,
                        *[_security.fd_socket_name(dom.name, t).hex() for t in taken])
    body = (f"from shm_taskwork import _security as _s\n"
            f"_draws = iter({taken!r})\n"
            f"_orig = _s.new_fd_token\n"
            f"_s.new_fd_token = lambda: next(_draws, None) or _orig()\n") + TASK
    task, (tid, *_rest) = start(spawn, body, dom.name)
    token, alive = ask(task, "token", "token")
    assert alive == "1" and bytes.fromhex(token) not in taken
    monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    dom.task(int(tid)).add(REC, b"x", TWA_RESUME)
    assert ask(task, "efd", "efd") == ["1"]
    _out, err = task.communicate(timeout=TIMEOUT)
    assert task.returncode == 0, err
    assert err.count("is taken; trying another") == 3, err


def test_the_fd_server_listens_again_after_its_socket_fails(make_domain, spawn, monkeypatch):
    dom = make_domain("renew")
    task, (tid, *_rest) = start(spawn, TASK, dom.name)
    old, _ = ask(task, "token", "token")
    ask(task, "breakserver", "broken")
    wait_until(lambda: ask(task, "token", "token")[0] not in (old, "-"), TIMEOUT,
               what="a new fd-passing name")
    assert ask(task, "token", "token")[1] == "1"
    monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    dom.task(int(tid)).add(REC, b"x", TWA_RESUME)
    assert ask(task, "efd", "efd") == ["1"]


# ---- 3. total size -----------------------------------------------------------------------

# Domain.create in a child whose file-size limit is 256 MiB: should the size
# check ever regress, ftruncate fails there (EFBIG) instead of this test
# filling the machine's shared memory, as the bug it guards against did.
CREATE_CAPPED = r'''
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 28, 1 << 28))
from shm_taskwork import Domain
try:
    Domain.create(sys.argv[1], pool_size=int(sys.argv[2]), payload_size=int(sys.argv[3]))
except BaseException as exc:
    print(type(exc).__name__, "|", exc, flush=True)
else:
    print("created |", flush=True)
'''


def _create_capped(spawn, name: str, pool_size: int, payload_size: int) -> tuple[str, str]:
    p = spawn(CREATE_CAPPED, name, str(pool_size), str(payload_size))
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    kind, _, said = out.strip().partition(" | ")
    return kind, said


def _big_leftovers(tag: str) -> list[str]:
    """Segments named after the test's tag (also a temporary name used while
    formatting), or larger than 1 GiB."""
    out = []
    for n in os.listdir("/dev/shm"):
        try:
            big = os.stat("/dev/shm/" + n).st_size > 1 << 30
        except OSError:
            continue
        if tag in n or big:
            out.append(n)
    return out


def test_an_oversized_domain_fails_fast_and_leaves_nothing(spawn):
    name = unique_name("huge")
    kind, said = _create_capped(spawn, name, 2**24, 2**20)
    size = lib.tw_layout_size(64, 2**24, 2**20, 4 * 64 + 64, 1024, 0, 4096)
    assert kind == "ValueError", said
    assert f"{size:,} bytes" in said and f"{_security.MAX_DOMAIN_BYTES:,}" in said, said
    assert _big_leftovers(name.lstrip("/")) == []


def test_a_domain_larger_than_the_free_shared_memory_fails_fast_and_leaves_nothing(spawn):
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    if free >= _security.MAX_DOMAIN_BYTES:
        pytest.skip(f"/dev/shm has {free:,} bytes free, more than the stated maximum")
    # the smallest payload that makes a 2**24-node pool too big for the free space
    payload = next(p for p in range(0, 2**20 + 1, 64)
                   if lib.tw_layout_size(64, 2**24, p, 320, 1024, 0, 4096) > free)
    name = unique_name("nofit")
    kind, said = _create_capped(spawn, name, 2**24, payload)
    assert kind == "ValueError", said
    assert "bytes free in /dev/shm" in said, said
    assert _big_leftovers(name.lstrip("/")) == []


# ---- 4. names ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["a\x00b", "\x00", "/a\x00", ".", "..", "/.", "/..",
                                 "é" * 126, "x" * 251, "a\udcffb"])
def test_invalid_domain_names_are_value_errors_before_any_system_call(bad):
    for call in (lambda: Domain.create(bad, max_tasks=1, pool_size=1), lambda: Domain.open(bad),
                 lambda: Domain.open_or_create(bad, max_tasks=1, pool_size=1)):
        with pytest.raises(ValueError) as ei:
            call()
        assert "already exists" not in str(ei.value)


def test_nul_in_task_and_callback_names_is_refused_not_truncated(domain):
    with pytest.raises(ValueError, match="NUL"):
        domain.register(name="a\x00b")
    t = domain.register(name="ok")
    try:
        with pytest.raises(NoSuchTaskError, match="NUL"):   # a lookup: no task has it
            domain.task(name="ok\x00tail")
        with pytest.raises(ValueError, match="NUL"):
            callback(name="a\x00b")(lambda w: None)
        with pytest.raises(ValueError, match="NUL"):
            t.add("test.sec\x00hidden", b"", TWA_NONE)
        with pytest.raises(ValueError, match="limit is 111"):
            t.add("n" * 112, b"", TWA_NONE)            # would not fit the name table
        assert domain.stats().pool_free == domain.pool_size
        assert [i.name for i in domain.tasks()] == ["ok"]
    finally:
        t.exit()


# ---- 5. signals ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                                    signal.SIGHUP, signal.SIGALRM, signal.SIGPIPE, 0, 65, -1,
                                    "SIGUSR1", 10.0, True])
def test_register_refuses_signals_a_task_may_not_take_over(domain, signum):
    with pytest.raises(ValueError) as ei:
        domain.register(signum=signum)
    assert "SIGUSR1" in str(ei.value) and "SIGRTMIN..SIGRTMAX" in str(ei.value)
    assert domain.current is None and domain.stats().tasks == 0
    assert signal.getsignal(signal.SIGSEGV) == signal.SIG_DFL


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGRTMIN + 3, signal.SIGRTMAX])
def test_a_task_on_usr2_or_a_realtime_signal_is_signalled(make_domain, spawn, signum):
    dom = make_domain("rt")
    task, (tid, *_rest) = start(spawn, TASK, dom.name, str(int(signum)))
    ask(task, f"block {int(signum)}", "blocked")
    dom.task(int(tid)).add(REC, b"rt", TWA_SIGNAL)
    assert ask(task, "pending", "pending") == [str(int(signum))]


# ---- 6. errors -------------------------------------------------------------------------------

def test_bad_arguments_get_clear_standard_errors(domain):
    t = domain.register(name="args")
    try:
        w = t.add(REC, b"w", TWA_NONE)
        for wid in (2**64, -1, 2**70, True, "7"):
            forged = Work(w.func_name, w.func_id, b"", target=t.id, target_gen=t.gen,
                          id=wid, domain=domain.name)
            assert t.cancel(forged) is False
        with pytest.raises(TypeError, match="int"):
            domain.pending_works("a")
        with pytest.raises(TypeError, match="int"):
            domain.task(pid="1")
        with pytest.raises(TypeError, match="number of seconds"):
            t.wait("1")
        with pytest.raises(ValueError, match="nan"):
            t.wait(float("nan"))
        with pytest.raises(ValueError, match=">= 0"):
            t.wait(-0.5)
        t.add(REC, b"now", TWA_RESUME)
        assert t.wait(10**400) == 2          # "for ever" (not OverflowError); both run
        t.add(REC, b"inf", TWA_RESUME)
        assert t.wait(float("inf")) == 1
        assert domain.stats().pool_free == domain.pool_size
    finally:
        t.exit()


def test_run_on_a_handle_from_another_domain_object_says_what_is_wrong(domain):
    t = domain.register(name="mine")
    other = Domain.open(domain.name)
    try:
        h = other.task(t.id)
        with pytest.raises(NotCurrentTaskError) as ei:
            h.run()
        assert "another Domain object" in str(ei.value)
        assert "register() returned" in str(ei.value)
    finally:
        other.close()
        t.exit()


# ---- the stranger: user nobody ---------------------------------------------------------------

NOBODY = 65534


@pytest.fixture(scope="module")
def stranger():
    """start(body, *args) -> Popen of ``body`` run as user nobody, importing
    a copy of the package (and its compiled dependencies) nobody can read.

    Root's interpreter may live where nobody cannot reach (a 0700 home): then
    the system's python3 of the same version runs the copy."""
    if os.geteuid() != 0:
        pytest.skip("switching to user nobody needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    python = None
    for cand in (sys.executable, f"/usr/bin/python{version}", "/usr/bin/python3"):
        probe = subprocess.run(prefix + [cand, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, cwd="/")
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            python = cand
            break
    if python is None:
        pytest.skip(f"no Python {version} interpreter that user nobody may run")
    copy = tempfile.mkdtemp(prefix="shm_taskwork_nobody_")
    os.chmod(copy, 0o755)
    shutil.copytree(os.path.join(ROOT, "shm_taskwork"), os.path.join(copy, "shm_taskwork"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for mod in ("posix_ipc", "psutil", "_cffi_backend"):
        path = importlib.import_module(mod).__file__
        if os.path.basename(path) == "__init__.py":
            shutil.copytree(os.path.dirname(path), os.path.join(copy, mod),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, copy)
    for dirpath, dirnames, filenames in os.walk(copy):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644 if not f.endswith(".so") else 0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": copy, "PYTHONDONTWRITEBYTECODE": "1",
           "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    check = subprocess.run(prefix + [python, "-c", "import shm_taskwork"], env=env, cwd=copy,
                           capture_output=True, text=True)
    if check.returncode != 0:
        shutil.rmtree(copy)
        pytest.skip(f"user nobody cannot import the package copy: {check.stderr.strip()[-300:]}")
    procs: list[subprocess.Popen] = []

    def run(body: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(prefix + [python, "-c", textwrap.dedent(body), *args], env=env,
                             cwd=copy, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)
    shutil.rmtree(copy)


def test_stranger_opening_a_private_domain_gets_permission_error(make_domain, stranger):
    dom = make_domain("private")                       # 0600, owned by root
    p = stranger(r'''
        import sys
        from shm_taskwork import Domain
        for call in ("open", "open_or_create"):
            try:
                getattr(Domain, call)(sys.argv[1])
            except Exception as exc:
                print(call, type(exc).__module__, type(exc).__name__, "|", exc, flush=True)
        try:
            Domain.create(sys.argv[1])
        except Exception as exc:
            print("create", type(exc).__module__, type(exc).__name__, "|", exc, flush=True)
    ''', dom.name)
    out, err = p.communicate(timeout=TIMEOUT)
    lines = out.splitlines()
    assert len(lines) == 3, (out, err)
    for line in lines[:2]:
        head, said = line.split(" | ", 1)
        assert head.split()[1:] == ["builtins", "PermissionError"], line
        assert dom.name in said and "0o600" in said and "uid 65534" in said, line
    assert lines[2].split()[1:3] == ["builtins", "FileExistsError"], lines[2]


def test_stranger_forging_its_slot_cannot_make_root_signal_anyone(make_domain, spawn, stranger,
                                                                  monkeypatch):
    """In a 0666 domain user nobody registers, then rewrites its slot to name
    an unrelated root process (pid, start time, SIGTERM, an fd number). Root
    adds with every notification: the victim sees nothing."""
    dom = make_domain("open", mode=0o666)
    victim, (victim_efd,) = start(spawn, VICTIM)
    p = stranger(r'''
        import sys
        from shm_taskwork import Domain, _native
        dom = Domain.open(sys.argv[1])
        t = dom.register(name="forger")
        s = dom._slot(t.id)
        victim = int(sys.argv[2])
        s.pid, s.start_ticks = victim, _native.start_ticks(victim)
        s.signum, s.efd = 15, int(sys.argv[3])
        print("forged", t.id, flush=True)
        sys.stdin.readline()
    ''', dom.name, str(victim.pid), victim_efd)
    fields = readline(p, TIMEOUT).split()
    assert fields[0] == "forged", (fields, p.stderr.read() if p.poll() is not None else "")
    for path in ("", "scm"):
        monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", path)
        with Domain.open(dom.name) as adder:
            h = adder.task(int(fields[1]))
            for notify in (TWA_SIGNAL, TWA_RESUME):
                h.add(REC, b"x", notify)
        assert report(victim) == (0, [])


def test_stranger_squatting_and_forging_tokens_cannot_cut_a_root_task_off(make_domain, spawn,
                                                                          stranger, monkeypatch):
    """User nobody binds every predictable socket name of a 0600 root domain
    before its task starts: the task still hands its eventfd to root peers."""
    dom = make_domain("rootsquat")
    squat = stranger(SQUATTER, *_old_names(dom, dom.max_tasks, 3))
    assert readline(squat, TIMEOUT).split()[0] == "ready"
    task, (tid, *_rest) = start(spawn, TASK, dom.name)
    monkeypatch.setenv("SHM_TASKWORK_FD_PASSING", "scm")
    dom.task(int(tid)).add(REC, b"x", TWA_RESUME)
    assert ask(task, "efd", "efd") == ["1"]
    assert ask(squat, "report", "report") == ["0", "0"]
