"""Every public call with arguments a careless (or hostile) caller could pass
(issue #10): each call works or raises a documented error - one of docs/contract.md "Errors"'s,
or TypeError, ValueError, FileNotFoundError, FileExistsError, PermissionError
- never a dependency's (posix_ipc, cffi's OverflowError, AttributeError ...)
and never a crash.

After every example the works it queued are run (by this process for its own
task, by a separate task process for its) and the dead letters dropped: then
no pool node may be in use. At the end nothing the calls opened may be left:
the same descriptors in /proc/self/fd, the same threads, and the process
table holding only the entries of the two processes that use the domain.

Hypothesis runs derandomized (the same examples every run), without an
example database. ``pickle_loads_unsafe`` is left out on purpose: unpickling
runs whatever the data names, which is why it says "unsafe".
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm_taskwork import (TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI,
                          TWAF_NO_ALLOC, Domain, TaskWorkError, Work, callback, codec,
                          init_task_work, task_work_add, task_work_cancel, task_work_cancel_func,
                          task_work_cancel_match, task_work_pending, task_work_run)
from shm_taskwork import callbacks as callbacks_mod
from shm_taskwork._native import ffi, lib

from conftest import PREFIX, readline, wait_until

TIMEOUT = 20.0
REC = "test.fuzz.rec"
DOCUMENTED = (TaskWorkError, TypeError, ValueError, FileNotFoundError, FileExistsError,
              PermissionError)
FUZZ_NAME = f"{PREFIX}{os.getpid()}_fz"


@callback(name=REC)
def _rec(work):
    pass


CHILD = r'''
import sys
from shm_taskwork import Domain, callback

@callback(name="test.fuzz.rec")
def rec(work):
    pass

dom = Domain.open(sys.argv[1])
t = dom.register(name="fuzz-child")
print("ready", t.id, flush=True)
for line in sys.stdin:
    if line.strip() == "run":
        n = 0
        while t.pending() or n == 0:
            n += 1
            t.run()
        print("ran", flush=True)
    elif line.strip() == "quit":
        break
t.exit()
dom.close()
print("bye", flush=True)
'''

# ---- argument strategies ------------------------------------------------------------------
# Each argument is valid about two times in three (so whole calls often
# work) and otherwise anything: another type, out of range, NUL, too long.

OBJ = object()
NOT_TEXT = st.one_of(st.none(), st.floats(), st.binary(max_size=8),
                     st.lists(st.integers(0, 3), max_size=2), st.just(OBJ))
NOT_INT = st.one_of(NOT_TEXT, st.text(max_size=8))
JUNK = st.one_of(NOT_INT, st.booleans(), st.integers(),
                 st.sampled_from([2**64, 2**63, -2**63 - 1, 2**31, -1, 0]))
# every one invalid as a domain name
BAD_TEXT = st.sampled_from(["", "a\x00b", "\x00", ".", "..", "/", "/.", "/..", "a/b", "x" * 300,
                            "é" * 200, "\udcff", "//"])
TEXT = st.one_of(st.text(max_size=12), BAD_TEXT)


def mostly(valid, invalid):
    return st.sampled_from((True, True, False)).flatmap(lambda ok: valid if ok else invalid)


def sizes(lo: int, hi: int, over: int):
    """Small valid values, invalid ones on both sides, other types - never a
    valid value large enough to make a big segment."""
    return mostly(st.integers(lo, hi),
                  st.one_of(st.integers(min_value=over), st.integers(max_value=lo - 1),
                            NOT_INT, st.booleans()))


# Only names under this test's own prefix may be valid: nothing else is ever created.
DOMAIN_NAMES = mostly(st.builds(lambda t: FUZZ_NAME + t, st.text(max_size=12)),
                      st.one_of(st.builds(lambda t: FUZZ_NAME + t, BAD_TEXT), BAD_TEXT,
                                NOT_TEXT, st.integers(), st.booleans()))
CREATE_KW = st.fixed_dictionaries({}, optional={
    "max_tasks": sizes(1, 8, 4097), "pool_size": sizes(1, 64, (1 << 24) + 1),
    "payload_size": sizes(0, 300, (1 << 20) + 1), "max_procs": sizes(1, 80, 65537),
    "names_cap": sizes(1, 64, (1 << 20) + 1),
    "mode": mostly(st.sampled_from([0o600, 0o660, 0o666]), st.one_of(
        st.sampled_from([0o1000, -1]), JUNK)),
    "record_origin": mostly(st.booleans(), JUNK),
})
FUNCS = mostly(st.sampled_from([REC, _rec, "test.fuzz.unknown", lambda w: None]),
               st.one_of(BAD_TEXT, st.text(min_size=112, max_size=120), NOT_TEXT, st.integers()))
PAYLOADS = mostly(st.one_of(st.binary(max_size=40), st.builds(bytearray, st.binary(max_size=8)),
                            st.builds(memoryview, st.binary(max_size=8))),
                  st.one_of(st.text(max_size=4), JUNK))
NOTIFY = mostly(st.sampled_from([TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI,
                                 TWA_NMI_CURRENT, TWA_RESUME | TWAF_NO_ALLOC,
                                 TWA_SIGNAL | TWAF_NO_ALLOC]),
                st.one_of(st.sampled_from([5, 0x200, 0xff00, -1, 2**31, 2**64]), JUNK))
# never None or inf for wait(): nothing may block the test for ever
TIMEOUTS = mostly(st.one_of(st.floats(0, 0.002), st.just(0)),
                  st.one_of(st.integers(-3, -1),
                            st.sampled_from([float("nan"), -float("inf"), -1e300]),
                            st.text(max_size=3), st.binary(max_size=3), st.booleans(),
                            st.just(OBJ), st.lists(st.integers(), max_size=1)))
SIGNUMS = mostly(st.sampled_from([signal.SIGUSR1, signal.SIGUSR2, signal.SIGRTMIN,
                                  signal.SIGRTMIN + 5, signal.SIGRTMAX]),
                 st.one_of(st.sampled_from([signal.SIGKILL, signal.SIGSEGV, signal.SIGCHLD,
                                            signal.SIGTERM, 0, 65, 1000]), JUNK))
TASK_NAMES = mostly(st.one_of(st.none(), st.text(max_size=12)),
                    st.one_of(BAD_TEXT, st.text(min_size=48, max_size=50), NOT_TEXT))
PREDS = mostly(st.sampled_from([lambda w: True, lambda w: False,
                                lambda w: w.payload[:1] == b"a"]), JUNK)


class Env:
    def __init__(self, dom, other, task, child_id):
        self.dom = dom
        self.other = other                  # a second Domain object of the same segment
        self.task = task                    # this process's task
        self.child = dom.task(child_id)     # a task in another process
        self.foreign = other.task(task.id)  # this process's task, through `other`
        self.works: list[Work] = []

    def tasks(self):
        return st.sampled_from([self.task, self.child, self.foreign])

    def work(self, draw):
        """A Work the calls returned, a forged one, or anything. The draws
        never depend on what earlier examples left (Hypothesis replays them)."""
        if draw(st.sampled_from((True, True, False))):
            i = draw(st.integers(0, 15))
            return self.works[i % len(self.works)] if self.works else OBJ
        forged = st.builds(lambda i, tgt, g, d: Work(REC, 1, b"", target=tgt, target_gen=g, id=i,
                                                     domain=d),
                           JUNK, mostly(st.sampled_from([0, 1]), JUNK),
                           mostly(st.just(1), JUNK), mostly(st.just(self.dom.name), JUNK))
        return draw(mostly(forged, JUNK))


OPS = ("add", "add_many", "cancel", "cancel_func", "cancel_match", "pending", "run", "wait",
       "checkpoint", "fileno", "exit_other", "create", "open", "open_or_create", "task", "tasks",
       "stats", "pending_works", "dead_letters", "drop_dead_letters", "retry_dead_letters",
       "register", "fsck", "init_task_work", "task_work_add", "task_work_run",
       "task_work_pending", "task_work_cancel_match", "task_work_cancel_func",
       "task_work_cancel", "json_dumps", "json_loads", "callback")


def _ops(env: Env, draw, name: str):
    """One call of ``name``: (description, zero-argument callable)."""
    t = draw(env.tasks())
    any_task = mostly(env.tasks(), JUNK)
    if name == "add":
        args = (draw(FUNCS), draw(PAYLOADS), draw(NOTIFY))
        return f"{t!r}.add{args!r}", lambda: env.works.append(t.add(*args))
    if name == "add_many":
        args = (draw(FUNCS), draw(mostly(st.lists(PAYLOADS, max_size=4), JUNK)), draw(NOTIFY))
        return f"{t!r}.add_many{args!r}", lambda: env.works.extend(t.add_many(*args))
    if name == "cancel":
        w = env.work(draw)
        return f"{t!r}.cancel({w!r})", lambda: t.cancel(w)
    if name == "cancel_func":
        f = draw(FUNCS)
        return f"{t!r}.cancel_func({f!r})", lambda: t.cancel_func(f)
    if name == "cancel_match":
        p = draw(PREDS)
        return f"{t!r}.cancel_match({p!r})", lambda: t.cancel_match(p)
    if name == "pending":
        return f"{t!r}.pending()", t.pending
    if name == "run":
        r = draw(st.one_of(st.booleans(), JUNK))
        return f"{t!r}.run(raise_errors={r!r})", lambda: t.run(raise_errors=r)
    if name == "wait":
        w = draw(TIMEOUTS)
        return f"{t!r}.wait({w!r})", lambda: t.wait(w)
    if name == "checkpoint":
        return f"{t!r}.checkpoint()", t.checkpoint
    if name == "fileno":
        return f"{t!r}.fileno()", t.fileno
    if name == "exit_other":
        # exit() of a task that is not this process's own (the own one stays)
        o = draw(st.sampled_from([env.child, env.foreign]))
        return f"{o!r}.exit()", o.exit
    if name in ("create", "open_or_create"):
        n, kw = draw(DOMAIN_NAMES), draw(CREATE_KW)

        def make():
            d = getattr(Domain, name)(n, **kw)
            d.close()
            if not d.name.startswith("/" + FUZZ_NAME) or d.name == env.dom.name:
                raise AssertionError(f"{name} made or opened {d.name!r}")
            d.unlink()
        return f"Domain.{name}({n!r}, **{kw!r})", make
    if name == "open":
        n = draw(st.one_of(DOMAIN_NAMES, st.just(env.dom.name)))
        return f"Domain.open({n!r})", lambda: Domain.open(n).close()
    if name == "task":
        kw = draw(mostly(
            st.one_of(st.builds(lambda k: {"key": k}, st.integers(0, 3)),
                      st.just({"pid": os.getpid()}),
                      st.builds(lambda n: {"name": n}, st.sampled_from(["fuzz", "fuzz-child", "x"]))),
            st.fixed_dictionaries({}, optional={"key": st.one_of(st.integers(-2, 9), JUNK),
                                                "pid": JUNK, "name": TEXT})))
        return f"dom.task(**{kw!r})", lambda: env.dom.task(**kw)
    if name == "tasks":
        return "dom.tasks()", env.dom.tasks
    if name == "stats":
        return "dom.stats()", env.dom.stats
    if name == "pending_works":
        k = draw(mostly(st.integers(0, 3), st.one_of(st.integers(-2, 9), JUNK)))
        return f"dom.pending_works({k!r})", lambda: env.dom.pending_works(k)
    if name == "dead_letters":
        return "dom.dead_letters()", env.dom.dead_letters
    if name == "drop_dead_letters":
        return "dom.drop_dead_letters()", env.dom.drop_dead_letters
    if name == "retry_dead_letters":
        return "dom.retry_dead_letters()", env.dom.retry_dead_letters
    if name == "register":
        n, s = draw(TASK_NAMES), draw(SIGNUMS)

        def reg():
            got = env.other.register(n, signum=s)
            got.exit()
        return f"other.register({n!r}, signum={s!r})", reg
    if name == "fsck":
        r = draw(st.booleans())
        return f"dom.fsck(repair={r})", lambda: env.dom.fsck(repair=r)
    if name == "init_task_work":
        f, p = draw(FUNCS), draw(PAYLOADS)
        return f"init_task_work({f!r}, {p!r})", lambda: init_task_work(f, p)
    if name == "task_work_add":
        tt, n = draw(any_task), draw(NOTIFY)
        if draw(st.booleans()):
            w = init_task_work(REC, draw(st.binary(max_size=40)))
        else:
            w = env.work(draw)
        return f"task_work_add({tt!r}, {w!r}, {n!r})", lambda: task_work_add(tt, w, n)
    if name == "task_work_run":
        return "task_work_run()", task_work_run
    if name == "task_work_pending":
        tt = draw(any_task)
        return f"task_work_pending({tt!r})", lambda: task_work_pending(tt)
    if name == "task_work_cancel_match":
        tt, m, d = (draw(any_task), draw(mostly(st.just(lambda w, d: w.payload == d), JUNK)),
                    draw(st.one_of(st.binary(max_size=2), JUNK)))
        return (f"task_work_cancel_match({tt!r}, {m!r}, {d!r})",
                lambda: task_work_cancel_match(tt, m, d))
    if name == "task_work_cancel_func":
        tt, f = draw(any_task), draw(FUNCS)
        return f"task_work_cancel_func({tt!r}, {f!r})", lambda: task_work_cancel_func(tt, f)
    if name == "task_work_cancel":
        tt, w = draw(any_task), env.work(draw)
        return f"task_work_cancel({tt!r}, {w!r})", lambda: task_work_cancel(tt, w)
    if name == "json_dumps":
        o = draw(st.one_of(JUNK, st.recursive(st.none() | st.integers() | st.text(max_size=4),
                                               lambda c: st.lists(c, max_size=3), max_leaves=6)))
        return f"codec.json_dumps({o!r})", lambda: codec.json_dumps(o)
    if name == "json_loads":
        b = draw(st.one_of(st.binary(max_size=12), st.text(max_size=12), JUNK))
        return f"codec.json_loads({b!r})", lambda: codec.json_loads(b)
    if name == "callback":
        n = draw(st.one_of(TEXT, JUNK))

        def reg_cb():
            def fn(work):
                pass
            callback(name=n)(fn)
            callbacks_mod.unregister(n)
        return f"callback(name={n!r})", reg_cb
    raise AssertionError(name)


def _proc_entries(dom) -> list[int]:
    pid, start = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    out = []
    for i in range(dom.max_procs):
        lib.tw_proc_info(dom.d, i, pid, start)
        if pid[0]:
            out.append(int(pid[0]))
    return sorted(out)


def _fds() -> set[int]:
    return set(int(n) for n in os.listdir("/proc/self/fd"))


def test_every_public_call_works_or_raises_a_documented_error(make_domain, spawn):
    fds0, threads0 = _fds(), threading.active_count()
    dom = make_domain("fuzz", max_tasks=4, pool_size=128, payload_size=32, mode=0o600)
    task = dom.register(name="fuzz")
    child = spawn(CHILD, dom.name, stdin=subprocess.PIPE)
    fields = readline(child, TIMEOUT).split()
    assert fields[0] == "ready", fields
    other = Domain.open(dom.name)
    env = Env(dom, other, task, int(fields[1]))

    def settle():
        """Run what the calls queued, drop the dead letters: then no node may
        be in use."""
        child.stdin.write("run\n")
        child.stdin.flush()
        assert readline(child, TIMEOUT) == "ran"
        while task.pending():
            task.run()
        dom.drop_dead_letters()
        st_ = dom.stats()
        assert st_.pool_free == dom.pool_size, st_
        del env.works[16:]

    # each Domain object that allocates holds a process-table entry until closed
    for t in (env.task, env.foreign, env.child):
        t.add(REC, b"warm-up", TWA_NONE)
    settle()
    procs0 = _proc_entries(dom)
    assert procs0 == sorted([os.getpid(), os.getpid(), child.pid])  # dom, other; the child

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def calls(data):
        for _ in range(data.draw(st.integers(1, 6))):
            name = data.draw(st.sampled_from(OPS))
            what, call = _ops(env, data.draw, name)
            try:
                call()
            except DOCUMENTED:
                outcomes[name, "raised"] += 1
            except BaseException as exc:
                raise AssertionError(f"{what} raised an undocumented {type(exc).__name__}: "
                                     f"{exc}") from exc
            else:
                outcomes[name, "worked"] += 1
        settle()

    outcomes: collections.Counter = collections.Counter()
    calls()
    # the fuzz reached every call, and both ways where both are possible
    assert {op for op, _ in outcomes} == set(OPS), outcomes
    for op in ("add", "add_many", "cancel_match", "create", "open", "register", "task",
               "task_work_add", "task_work_cancel_match", "wait"):
        assert outcomes[op, "worked"] and outcomes[op, "raised"], (op, str(sorted(outcomes.items())))
    # every call left the process table as it found it (the fuzz made
    # and closed Domain objects, registered and exited tasks)
    assert _proc_entries(dom) == procs0
    other.close()
    assert _proc_entries(dom) == sorted([os.getpid(), child.pid])
    task.exit()
    child.stdin.write("quit\n")
    child.stdin.flush()
    assert readline(child, TIMEOUT) == "bye"
    child.communicate(timeout=TIMEOUT)
    dom.close()
    wait_until(lambda: threading.active_count() == threads0, TIMEOUT, what="threads to end")
    assert _fds() == fds0
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(FUZZ_NAME)]
