"""Trust boundaries of a shared domain, on the add and wait paths (README
"Security"): members can deny each other service, and nothing more. A member
never blocks on another member's descriptors, every call with a timeout
returns by its deadline whatever the segment says, and a member cannot make
an adder trigger another handler of a task's process.

The member's side runs as user nobody (the ``stranger`` fixture of
test_security); every test is bounded in time, so a hang fails it.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from shm_taskwork import TWA_RESUME, TWA_SIGNAL, Domain

from conftest import readline, wait_until
from test_security import stranger  # noqa: F401  (the fixture)

TIMEOUT = 30

# The root adder runs in its own process, so a blocked write(2) fails the
# test by its deadline instead of hanging the suite.
ADDER = r"""
import sys, time
from shm_taskwork import Domain, TWA_RESUME, TWA_SIGNAL
dom = Domain.open(sys.argv[1])
t = dom.task(int(sys.argv[2]))
t0 = time.monotonic()
for notify in (TWA_RESUME, TWA_SIGNAL, TWA_RESUME):
    t.add("trust.noop", b"x", notify)
print("added", round(time.monotonic() - t0, 3), flush=True)
dom.close()
"""


def test_a_full_blocking_eventfd_published_by_a_member_never_blocks_an_adder(
        make_domain, spawn, stranger):  # noqa: F811
    """User nobody registers in a 0666 domain, then publishes a *blocking*
    eventfd filled to its maximum as its task's eventfd. Root's add(RESUME)
    used to block in write(2) for ever; now the descriptor is refused (it
    must be non-blocking) and the add returns."""
    dom = make_domain("fullefd", mode=0o666)
    member = stranger(r'''
        import os, sys
        from shm_taskwork import Domain
        dom = Domain.open(sys.argv[1])
        t = dom.register(name="member")
        efd = os.eventfd(0)                      # blocking
        os.eventfd_write(efd, 0xfffffffffffffffe)  # full: the next write blocks
        dom._slot(t.id).efd = efd
        print("ready", t.id, flush=True)
        sys.stdin.readline()
    ''', dom.name)
    fields = readline(member, TIMEOUT).split()
    assert fields[0] == "ready", fields
    for path in ("", "scm"):
        adder = spawn(ADDER, dom.name, fields[1], env={"SHM_TASKWORK_FD_PASSING": path})
        try:
            out, err = adder.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            adder.kill()
            pytest.fail(f"an add to a member with a full blocking eventfd hung ({path or 'pidfd'})")
        assert adder.returncode == 0, err
        assert out.split()[0] == "added"
    member.stdin.write("\n")
    member.stdin.flush()


# The task forges its own slot as a member would (head at a closed index,
# NOTIFY_RESUME set), then waits with a timeout.
FORGED_WAIT = r"""
import sys, time
from shm_taskwork import Domain
from shm_taskwork._native import lib
dom = Domain.open(sys.argv[1])
task = dom.register("victim")
s = dom._slot(task.id)
s.head = (task.gen << 32) | 0xFFFFFFFD        # closed: dead and empty
lib.tw_flags_set(dom.d, task.id, lib.TW_F_NOTIFY_RESUME)
t0 = time.monotonic()
n = task.wait(timeout=1)
print("waited", n, round(time.monotonic() - t0, 3), flush=True)
s.head = (task.gen << 32) | 0xFFFFFFFF        # put the list back for exit
"""


def test_wait_with_a_timeout_returns_by_its_deadline_whatever_the_slot_says(make_domain, spawn):
    dom = make_domain("forgedwait")
    p = spawn(FORGED_WAIT, dom.name)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("wait(timeout=1) did not return on a forged slot")
    fields = out.split()
    assert fields[:2] == ["waited", "0"], (out, err)
    assert 0.9 <= float(fields[2]) < 5.0


# A task on SIGUSR1 whose process also handles SIGUSR2 for its own purposes.
TWO_HANDLERS = r"""
import signal, sys
from shm_taskwork import Domain, callback
hits = {"usr2": 0, "ran": 0}
signal.signal(signal.SIGUSR2, lambda *a: hits.__setitem__("usr2", hits["usr2"] + 1))
@callback(name="trust.noop")
def noop(work):
    hits["ran"] += 1
dom = Domain.open(sys.argv[1])
task = dom.register("victim")
print("ready", task.id, flush=True)
for line in sys.stdin:
    print(hits["usr2"], hits["ran"], flush=True)
"""


def test_a_member_cannot_switch_a_tasks_signal_to_another_handler(make_domain, spawn,
                                                                   stranger):  # noqa: F811
    dom = make_domain("sigswitch", mode=0o666)
    victim = spawn(TWO_HANDLERS, dom.name, stdin=subprocess.PIPE)
    fields = readline(victim, TIMEOUT).split()
    tid = int(fields[1])
    forger = stranger(r'''
        import signal, sys
        from shm_taskwork import Domain
        dom = Domain.open(sys.argv[1])
        dom._slot(int(sys.argv[2])).signum = int(signal.SIGUSR2)
        print("forged", flush=True)
    ''', dom.name, str(tid))
    assert readline(forger, TIMEOUT) == "forged"
    with Domain.open(dom.name) as adder:
        adder.task(tid).add("trust.noop", b"x", TWA_SIGNAL)

    def counts():
        victim.stdin.write("?\n")
        victim.stdin.flush()
        return tuple(int(x) for x in readline(victim, TIMEOUT).split())

    # The work runs (signalled with the task's own SIGUSR1), and the
    # process's SIGUSR2 handler was never triggered.
    wait_until(lambda: counts()[1] == 1, timeout=TIMEOUT, what="the work to run")
    assert counts() == (0, 1)
