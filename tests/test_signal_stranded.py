"""TWA_SIGNAL is never stranded (README "TWA_SIGNAL is never stranded").

CPython runs a Python signal handler only when its main thread next checks for
signals. A task's signal caught just before the main thread enters a blocking
system call leaves the handler owed, nothing interrupts the call, and every
later add coalesces into the NOTIFY_SIGNAL bit. The signal is owed until the
handler acknowledges it; the task's watcher thread sends it again.

Real processes throughout: the task and the producers are unrelated Python
processes (subprocess), the signals are real SIGUSR1s.
"""
from __future__ import annotations

import json
import os
import struct
import time

import pytest

from shm_taskwork import TWA_SIGNAL, TWA_SIGNAL_NO_IPI, Domain
from shm_taskwork._native import ffi, lib

from conftest import readline, wait_until

BOUND_S = 0.100          # no TWA_SIGNAL work waits longer for its run to begin
REC = struct.Struct("<IIQ")   # producer, sequence, CLOCK_MONOTONIC ns before the add

# The task: blocked in sys.stdin.readline() between runs, which only its
# SIGUSR1 handler makes. Each callback records (producer, seq, added, started).
TASK = r"""
import json, struct, sys, time
from shm_taskwork import Domain, callback
REC = struct.Struct("<IIQ")
ran = []

@callback(name="stranded.rec")
def rec(work):
    p, s, added = REC.unpack(work.payload)
    ran.append((p, s, added, time.monotonic_ns()))

dom = Domain.open(sys.argv[1])
task = dom.register("blocked")
print(task.id, flush=True)
while True:
    line = sys.stdin.readline()          # blocked here while SIGNAL works arrive
    if line.strip() != "more":
        break
task.run()
json.dump({"ran": ran}, sys.stdout)
sys.stdout.write("\n")
sys.stdout.flush()
task.exit()
dom.close()
"""

# A producer: adds TWA_SIGNAL works for argv[3] seconds, each stamped with its
# add time, at about argv[5] works a second (paced, so that most adds find the
# flag clear and send a signal of their own: many signals, each a chance to
# land just before the task's read); retries a full pool. Prints how many it
# added.
PRODUCER = r"""
import struct, sys, time
from shm_taskwork import Domain, TWA_SIGNAL
from shm_taskwork.errors import PoolExhaustedError
REC = struct.Struct("<IIQ")
dom = Domain.open(sys.argv[1])
task = dom.task(int(sys.argv[2]))
me, seconds, rate = int(sys.argv[4]), float(sys.argv[3]), float(sys.argv[5])
now = time.monotonic()
end, step, due = now + seconds, 1.0 / rate, now
n = 0
while now < end:
    if now < due:
        time.sleep(due - now)           # pacing, not synchronisation
    due += step
    try:
        task.add("stranded.rec", REC.pack(me, n, time.monotonic_ns()), TWA_SIGNAL)
        n += 1
    except PoolExhaustedError:
        pass                            # the works wait; try the next one
    now = time.monotonic()
print(n, flush=True)
dom.close()
"""


def max_stall(adds: list[int], starts: list[int]) -> tuple[int, int]:
    """The longest period with works queued and no callback starting:
    (nanoseconds, when it ended). Queued(t) = adds up to t - starts up to t."""
    events = sorted([(a, 1) for a in adds] + [(s, -1) for s in starts])
    queued = 0
    since = None       # the start of the current period without progress
    worst, at = 0, 0
    for t, kind in events:
        if kind == 1:
            if queued == 0:
                since = t
            queued += 1
        else:
            if since is not None and t - since > worst:
                worst, at = t - since, t
            queued -= 1
            since = t if queued > 0 else None
    return worst, at


def sequence(slot) -> int:
    """The signal sequence in a slot's flags word (README "TWA_SIGNAL is
    never stranded")."""
    return slot.flags >> lib.TW_F_SIGSEQ_SHIFT


def step_signal_sequence(slot) -> None:
    """Count one signal as sent, as the adder that arms NOTIFY_SIGNAL does.
    A plain store: the only writer while the test's task is blocked."""
    fl = ffi.cast("uint32_t *", ffi.addressof(slot, "flags"))
    fl[0] = (fl[0] + lib.TW_F_SIGSEQ_ONE) & 0xFFFFFFFF


def run_blocked_task(domain_name: str, spawn, producers: int, seconds: float,
                     rate: float = 4000.0):
    task = spawn(TASK, domain_name, stdin=__import__("subprocess").PIPE)
    tid = int(readline(task, 30))
    procs = [spawn(PRODUCER, domain_name, str(tid), str(seconds), str(k), str(rate))
             for k in range(producers)]
    added = [int(readline(p, seconds + 60)) for p in procs]
    for p in procs:
        p.communicate(timeout=30)
    dom = Domain.open(domain_name)
    try:
        # Every work runs without any further signal from us: the task stays
        # blocked in readline() and only its handler runs works.
        wait_until(lambda: dom.task(tid).pending() == 0, timeout=30,
                   what="the blocked task to run every queued TWA_SIGNAL work")
    finally:
        dom.close()
    task.stdin.write("stop\n")
    task.stdin.flush()
    out, err = task.communicate(timeout=60)
    assert task.returncode == 0, err
    ran = json.loads(out.strip().splitlines()[-1])["ran"]
    return added, ran


@pytest.mark.asan
def test_a_task_blocked_in_readline_loses_no_signal_work(make_domain, spawn):
    """The issue's reproduction: three unrelated producers add TWA_SIGNAL works
    for 15 s to a task blocked in readline(). On the old core the task got
    stuck within seconds (NOTIFY_SIGNAL set, nothing pending, the handler
    owed). Here every work runs exactly once, and there is no period longer
    than the bound with works queued and nothing run."""
    dom = make_domain("strand", pool_size=16384, max_tasks=4)
    added, ran = run_blocked_task(dom.name, spawn, producers=3, seconds=15.0)
    seen = {(p, s) for p, s, _, _ in ran}
    assert len(ran) == len(seen), "a work ran twice"
    assert seen == {(p, s) for p in range(3) for s in range(added[p])}, "a work was lost"
    assert sum(added) > 1000
    worst, _ = max_stall([a for _, _, a, _ in ran], [s for _, _, _, s in ran])
    assert worst <= BOUND_S * 1e9, f"works waited {worst / 1e6:.1f} ms with nothing run"


def test_an_owed_signal_is_sent_again_to_the_main_thread(make_domain, spawn):
    """A signal counted as sent but never taken by the handler (what CPython's
    deferral leaves) is sent again by the task's watcher: the work queued
    behind it runs while the task stays blocked in readline(). Deterministic:
    the member writes the lost signal into the slot itself."""
    dom = make_domain("owed")
    task = spawn(TASK, dom.name, stdin=__import__("subprocess").PIPE)
    tid = int(readline(task, 30))
    t = dom.task(tid)
    # NO_IPI arms NOTIFY_SIGNAL without a signal; then step the signal
    # sequence, as an adder whose signal the interpreter deferred would have.
    t.add("stranded.rec", REC.pack(7, 0, time.monotonic_ns()), TWA_SIGNAL_NO_IPI)
    slot = dom._slot(tid)
    assert slot.flags & lib.TW_F_NOTIFY_SIGNAL
    step_signal_sequence(slot)
    t0 = time.monotonic()
    wait_until(lambda: t.pending() == 0, timeout=10,
               what="the watcher to send the owed signal again")
    waited = time.monotonic() - t0
    assert slot.c.signals_resent >= 1
    assert slot.c.sig_ack == sequence(slot)          # the handler took it
    task.stdin.write("stop\n")
    task.stdin.flush()
    out, err = task.communicate(timeout=30)
    assert task.returncode == 0, err
    assert [r[:2] for r in json.loads(out.strip().splitlines()[-1])["ran"]] == [[7, 0]]
    assert waited < 5.0


def test_no_resend_without_works_and_none_once_taken(make_domain, spawn):
    """Rate limit: a signal the handler took is never sent again, and an armed
    flag with an empty list is not a debt."""
    dom = make_domain("norsnd")
    task = spawn(TASK, dom.name, stdin=__import__("subprocess").PIPE)
    tid = int(readline(task, 30))
    t = dom.task(tid)
    for k in range(50):
        t.add("stranded.rec", REC.pack(1, k, time.monotonic_ns()), TWA_SIGNAL)
    wait_until(lambda: t.pending() == 0, timeout=10, what="the works to run")
    slot = dom._slot(tid)
    wait_until(lambda: slot.c.sig_ack == sequence(slot), timeout=10,
               what="the handler to take every signal")
    resent = slot.c.signals_resent
    # Armed, but nothing queued: no debt.
    lib.tw_flags_set(dom.d, tid, lib.TW_F_NOTIFY_SIGNAL)
    step_signal_sequence(slot)
    # The watcher polls every 10 ms while armed: give it ten times its resend
    # delay to (wrongly) act, measured by its own counter, not by a sleep.
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        assert slot.c.signals_resent == resent
        time.sleep(0.01)
    task.stdin.write("stop\n")
    task.stdin.flush()
    task.communicate(timeout=30)


# A task with no handler of its own: adders never signal it (it does not
# catch SIGUSR1), so a TWA_SIGNAL work can only reach wait() through the
# WAITING bit and the eventfd.
WAITER = r"""
import sys, time
from shm_taskwork import Domain, callback
@callback(name="stranded.wake")
def wake(work):
    pass
dom = Domain.open(sys.argv[1])
task = dom.register("waiter", install_handler=False)
print(task.id, flush=True)
t0 = time.monotonic()
n = task.wait(timeout=30)
print(n, round(time.monotonic() - t0, 3), flush=True)
task.exit()
dom.close()
"""


def test_wait_gives_signal_works_the_resume_guarantee(make_domain, spawn):
    dom = make_domain("waitsig")
    p = spawn(WAITER, dom.name)
    tid = int(readline(p, 30))
    t = dom.task(tid)
    # wait() is in select() once WAITING shows in the slot's flags.
    wait_until(lambda: lib.tw_flags_get(dom.d, tid) & lib.TW_F_WAITING, timeout=10,
               what="wait() to block")
    t.add("stranded.wake", b"x", TWA_SIGNAL)
    n, took = readline(p, 60).split()
    assert int(n) == 1, "wait() was not woken by a TWA_SIGNAL work"
    assert float(took) < 25
    p.communicate(timeout=30)


def test_max_stall_measures_queued_time_without_progress():
    # added at 0 and 10, started at 50 and 200: queued from 0, progress at 50,
    # then nothing until 200 while one waits.
    assert max_stall([0, 10], [50, 200]) == (150, 200)
    assert max_stall([0, 100], [10, 110]) == (10, 10)


# One TWA_SIGNAL add; run with SHM_TASKWORK_KILLPOINT=in_notify:stop it stops
# itself right after its add armed NOTIFY_SIGNAL, before it sends the signal.
ADD_ONE = r"""
import struct, sys, time
from shm_taskwork import Domain, TWA_SIGNAL
REC = struct.Struct("<IIQ")
dom = Domain.open(sys.argv[1])
dom.task(int(sys.argv[2])).add("stranded.rec", REC.pack(0, 0, time.monotonic_ns()), TWA_SIGNAL)
print("added", flush=True)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.asan
def test_an_adder_stopped_between_arming_and_sending_strands_nothing(make_domain, spawn):
    """An adder preempted (here stopped, at the kill point in_notify) after its
    add armed NOTIFY_SIGNAL and before it sent the signal: every add made
    meanwhile coalesces into the armed flag and sends nothing. The arming CAS
    also stepped the signal sequence, so the signal is owed from that instant
    and the task's watcher sends it: the works run while the adder is still
    stopped and the task stays blocked in readline(). Before the sequence
    moved into the flags word they waited for the adder to be continued."""
    dom = make_domain("armed")
    task = spawn(TASK, dom.name, stdin=__import__("subprocess").PIPE)
    tid = int(readline(task, 30))
    adder = spawn(ADD_ONE, dom.name, str(tid), env={"SHM_TASKWORK_KILLPOINT": "in_notify:stop"})
    try:
        wait_until(lambda: _state(adder.pid) == "T", timeout=30,
                   what="the adder to stop between its arming and its send")
        t = dom.task(tid)
        slot = dom._slot(tid)
        assert slot.flags & lib.TW_F_NOTIFY_SIGNAL
        sent = slot.c.signals_sent
        for k in range(20):
            t.add("stranded.rec", REC.pack(1, k, time.monotonic_ns()), TWA_SIGNAL)
        assert slot.c.signals_sent == sent, "the adds were meant to coalesce"
        wait_until(lambda: t.pending() == 0, timeout=10,
                   what="the watcher to send the signal the stopped adder owes")
        assert _state(adder.pid) == "T", "the adder was continued: the test proves nothing"
        assert slot.c.signals_resent >= 1 and slot.c.sig_ack == sequence(slot)
    finally:
        os.kill(adder.pid, __import__("signal").SIGCONT)
    assert readline(adder, 30) == "added"
    adder.communicate(timeout=30)
    assert adder.returncode == 0
    task.stdin.write("stop\n")
    task.stdin.flush()
    out, err = task.communicate(timeout=30)
    assert task.returncode == 0, err
    ran = sorted(tuple(r[:2]) for r in json.loads(out.strip().splitlines()[-1])["ran"])
    assert ran == [(0, 0)] + [(1, k) for k in range(20)]


# Adds TWA_SIGNAL works and cancels each at once, for argv[3] seconds: many
# armings of NOTIFY_SIGNAL whose work is gone by the time the task looks.
ADD_CANCEL = r"""
import struct, sys, time
from shm_taskwork import Domain, TWA_SIGNAL
from shm_taskwork.errors import PoolExhaustedError
REC = struct.Struct("<IIQ")
dom = Domain.open(sys.argv[1])
task = dom.task(int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    try:
        w = task.add("stranded.rec", REC.pack(9, n, time.monotonic_ns()), TWA_SIGNAL)
    except PoolExhaustedError:
        continue
    if task.cancel(w):
        n += 1
print(n, flush=True)
"""


def test_a_cancelled_work_never_leaves_the_signal_flag_armed(make_domain, spawn):
    """A run clears NOTIFY_SIGNAL on its way out and looks once more. An adder
    that arms the flag after that clear, its work cancelled before the look,
    used to leave the run returning with the flag armed and its signal
    already taken by a handler nested in the run: every later add coalesced
    into the armed flag and sent nothing, and the task, blocked in readline(),
    never ran them (nothing was owed). Here producers cancel every work they
    add while another adds works that must run: once they stop, every one of
    those runs without any further signal."""
    dom = make_domain("cancelled", pool_size=4096)
    task = spawn(TASK, dom.name, stdin=__import__("subprocess").PIPE)
    tid = int(readline(task, 30))
    seconds = 8.0
    cancellers = [spawn(ADD_CANCEL, dom.name, str(tid), str(seconds)) for _ in range(2)]
    prod = spawn(PRODUCER, dom.name, str(tid), str(seconds), "1", "2000")
    cancelled = [int(readline(p, seconds + 60)) for p in cancellers]
    added = int(readline(prod, seconds + 60))
    for p in (*cancellers, prod):
        p.communicate(timeout=30)
    t = dom.task(tid)
    wait_until(lambda: t.pending() == 0, timeout=10,
               what="the blocked task to run the works queued behind a cancelled arming")
    task.stdin.write("stop\n")
    task.stdin.flush()
    out, err = task.communicate(timeout=30)
    assert task.returncode == 0, err
    ran = json.loads(out.strip().splitlines()[-1])["ran"]
    assert sorted(s for p, s, _, _ in ran if p == 1) == list(range(added))
    assert min(cancelled) > 100 and added > 1000
