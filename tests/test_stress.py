"""``shm-taskwork stress``: the tool runs, kills, accounts, cleans up - and its
checker is shown able to fail. Plus the regressions the stress runs found."""
from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys

import psutil
import pytest

from shm_taskwork import TWA_SIGNAL

from conftest import ROOT, wait_until

REQUIRED = ("added", "ran", "cancelled", "orphaned", "interrupted", "duplicated", "lost",
            "leaked", "killed", "seconds", "rate")


def run_stress(*args: str, timeout: float = 120, tmpdir: str | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SHM_TASKWORK_KILLPOINT", None)
    if tmpdir:
        env["TMPDIR"] = tmpdir
    p = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "stress", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=30)
        raise AssertionError(f"stress did not finish within {timeout}s:\n{err[-3000:]}")
    return p, out, err


def summary_of(out: str) -> dict:
    lines = out.strip().splitlines()
    assert lines, "stress printed nothing on stdout"
    s = json.loads(lines[-1])
    for key in REQUIRED:
        assert key in s, f"summary lacks {key!r}: {s}"
    return s


def leftovers(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/tw_stress_{pid}_*")


def test_short_run_with_kills_conserves_every_work(tmp_path):
    p, out, err = run_stress("--tasks", "2", "--producers", "2", "--seconds", "3",
                             "--kill-every", "0.3", "--seed", "7", "--json",
                             tmpdir=str(tmp_path))
    assert p.returncode == 0, err[-3000:]
    s = summary_of(out)
    assert len(out.strip().splitlines()) == 1            # --json: the summary only
    assert s["killed"] > 0 and s["added"] > 0 and s["ran"] > 0
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0
    assert s["phantom"] == 0 and s["crashed"] == 0 and s["hung"] == 0 and s["ok"] is True
    # Every confirmed add settled in exactly one way (nothing counted twice).
    settled = (s["settled"]["executed"] + s["settled"]["cancelled"] + s["settled"]["orphaned"]
               + s["settled"]["cancelled_by_killed_canceller"])
    assert settled == s["added"]
    assert all(s["added_by_mode"][m] > 0 for m in ("none", "resume", "signal", "signal_no_ipi"))
    assert 0 < s["added_with_add_many"] < s["added"]
    assert s["seed"] == 7
    # The domain and the ledger directory are gone.
    assert leftovers(p.pid) == []
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory):
    # No fsck at all: SIGKILLs and SIGTERMs (tasks with and without
    # exit_signals), dead tasks replaced under the same name and their dead
    # letters retried to the replacement. One short run, judged twice below.
    tmp = tmp_path_factory.mktemp("lifecycle")
    p, out, err = run_stress("--tasks", "3", "--producers", "2", "--seconds", "4",
                             "--kill-every", "0.2", "--term", "--restart", "--no-fsck",
                             "--seed", "11", "--json", tmpdir=str(tmp))
    return p, summary_of(out), err, tmp


def test_lifecycle_without_an_operator_loses_nothing(lifecycle_run):
    p, s, err, tmp = lifecycle_run
    assert s["lost"] == 0 and s["duplicated"] == 0, (s, err[-3000:])
    assert s["phantom"] == 0 and s["crashed"] == 0 and s["hung"] == 0, (s, err[-3000:])
    assert s["dead_letter_problems"] == 0, err[-3000:]
    assert s["fsck"] is False and s["fsck_runs"] == 0
    assert s["killed"] > 0 and s["terminated"] > 0 and s["terminated_graceful"] > 0
    assert s["restarted"] > 0 and s["retried"] > 0
    settled = (s["settled"]["executed"] + s["settled"]["cancelled"] + s["settled"]["orphaned"]
               + s["settled"]["cancelled_by_killed_canceller"])
    assert settled == s["added"]
    assert leftovers(p.pid) == []
    assert os.listdir(tmp) == []


def test_lifecycle_without_an_operator_leaves_the_domain_whole(lifecycle_run):
    # Reaping alone gives everything back: no pool node missing after the
    # drain, and a dry fsck at the end finds nothing to do.
    p, s, err, tmp = lifecycle_run
    assert s["leaked"] == 0, (s["final_fsck"], err[-3000:])
    assert s["final_fsck"]["clean"] is True, s["final_fsck"]
    assert p.returncode == 0 and s["ok"] is True, err[-3000:]


@pytest.mark.parametrize("fault,field", [("lose", "lost"), ("duplicate", "duplicated"),
                                         ("leak", "leaked")])
def test_checker_detects_a_real_fault(fault, field):
    # The checker itself must be able to fail: a task drops the record of one
    # work it ran (lost), records one twice (duplicated), or a work stays queued
    # on a live task when the pool is counted (leaked).
    p, out, err = run_stress("--tasks", "2", "--producers", "1", "--seconds", "1",
                             "--inject", fault, "--json")
    s = summary_of(out)
    assert p.returncode == 1, (out, err[-2000:])
    assert s[field] > 0 and s["ok"] is False
    others = {"lost", "duplicated", "leaked"} - {field}
    assert all(s[k] == 0 for k in others), s
    if field != "leaked":
        assert f"{field} work(s)" in err and "intent-add@" in err   # the offending ids
    else:
        assert "not free after the drain" in err
    assert leftovers(p.pid) == []


def test_ledger_judgement_of_every_case(tmp_path):
    # The rules of the module docstring, one id per case, written as the
    # processes would write them (one file per process).
    from shm_taskwork.tools import stress as st

    P = 5 << 32
    I, A, F, CI, C = st.INTENT_ADD, st.ADDED, st.ADD_FAILED, st.CANCEL_INTENT, st.CANCELLED
    R, O, X, RT = st.RAN, st.ORPHANED, st.INTERRUPTED, st.RETRIED
    cases = {
        P | 0: ([I, A], [R]),                       # executed
        P | 1: ([I, A, CI, C], []),
        P | 2: ([I, A], [O]),                       # a dead letter at the end
        P | 3: ([I, A], [R, X]),                    # one execution
        P | 4: ([I, A], [X]),
        P | 5: ([I, A, CI], []),                    # killed canceller
        P | 6: ([I], []),                           # unconfirmed, nowhere
        P | 7: ([I], [R]),                          # unconfirmed, ran
        P | 8: ([I, A], []),                        # LOST
        P | 9: ([I, A], [R, R]),                    # DUPLICATED
        P | 10: ([I, A, CI, C], [O]),               # DUPLICATED
        P | 11: ([I, F], [R]),                      # PHANTOM
        P | 12: ([], [R]),                          # PHANTOM: no intent
        P | 13: ([I, F], []),                       # failed, nowhere
        # the lifecycle: dead letters retried, reapers reporting twice
        P | 14: ([I, A], [O, RT, R]),               # orphaned -> retried -> ran: executed
        P | 15: ([I, A], [O, RT, O, RT, R]),        # its new task died too: executed
        P | 16: ([I, A], [O, RT, O]),               # retried, orphaned again: a dead letter
        P | 17: ([I, A], [O, RT]),                  # LOST: retried, then nowhere
        P | 18: ([I, A], [O, RT, R, R]),            # DUPLICATED: ran twice
        P | 19: ([I, A], [O, O]),                   # DUPLICATED: two copies on the list
        P | 20: ([I, A], [O, R]),                   # DUPLICATED: ran, yet still a dead letter
        P | 21: ([I, A], [O, RT, RT, R]),           # DUPLICATED: retried more than filed
        P | 22: ([I, A], [X, X]),                   # interrupted, reported twice: once
        P | 23: ([I, A], [R, X, X]),                # ran + interrupted twice: once
        P | 24: ([I, A], [O, RT, X, X]),            # retried, then interrupted: executed
        P | 25: ([I, F], [O]),                      # PHANTOM: a failed add became a dead letter
        P | 26: ([I], [O, RT]),                     # LOST: unconfirmed, yet it was queued
        P | 27: ([I, A, CI], [O, RT]),              # LOST: no canceller reaches a retried work
    }
    prod = st.Ledger(str(tmp_path / "producer-5.ledger"), 5)
    other = st.Ledger(str(tmp_path / "task-6.ledger"), 6)
    for wid, (mine, elsewhere) in cases.items():
        for kind in mine:
            prod.put(kind, wid, 1)
        for kind in elsewhere:
            other.put(kind, wid)
    prod.close()
    other.close()
    acc = st.account(str(tmp_path))
    assert acc["bad"] == {"lost": [P | 8, P | 17, P | 26, P | 27],
                          "duplicated": [P | 9, P | 10, P | 18, P | 19, P | 20, P | 21],
                          "phantom": [P | 11, P | 12, P | 25]}
    assert acc["settled"] == {"executed": 8, "cancelled": 1, "orphaned": 2,
                              "cancelled_by_killed_canceller": 1}
    assert acc["added"] == 21 and acc["unconfirmed"] == 3 and acc["add_failed"] == 3
    assert acc["unconfirmed_nowhere"] == 2 and acc["unconfirmed_executed"] == 1
    assert acc["ran_and_interrupted"] == 2 and acc["torn_bytes"] == 0
    assert acc["interrupted"] == 5 and acc["interrupted_reports"] == 8
    assert acc["retried_then_executed"] == 3
    # A torn trailing record is counted, never misread.
    with open(tmp_path / "task-6.ledger", "ab") as f:
        f.write(b"\x07\x00\x00")
    assert st.account(str(tmp_path))["torn_bytes"] == 3


def test_dead_letter_book_writes_what_left_the_list(tmp_path):
    # The controller's view of the dead-letter list: a new copy is 'orphaned',
    # a copy gone after a retry is 'retried', a copy that vanished without one
    # is a problem; interrupted dead letters are written once per copy.
    import struct as _struct
    from types import SimpleNamespace

    from shm_taskwork.tools import stress as st

    def dl(wid, reason="orphaned"):
        return SimpleNamespace(payload=_struct.pack("<Q", wid), reason=reason)

    led = st.Ledger(str(tmp_path / "controller.ledger"), 0)
    book = st.DeadLetterBook(led)
    book.observe([dl(1), dl(2), dl(3, "interrupted")])
    book.observe([dl(1), dl(2), dl(3, "interrupted")])              # nothing new
    book.observe([dl(2), dl(4)], retried_since=True)                # 1 retried, 4 arrived
    book.observe([dl(2), dl(4), dl(1)])                             # 1 orphaned again
    book.observe([dl(4)])                                           # 1, 2 vanished: problems
    led.close()
    recs = [(st.KIND_NAMES[k], wid) for k, _aux, _inc, wid in
            st.REC.iter_unpack(st.read_ledger(str(tmp_path / "controller.ledger"))[0])]
    assert sorted(recs) == sorted([("orphaned", 1), ("orphaned", 2), ("interrupted", 3),
                                   ("retried", 1), ("orphaned", 4), ("orphaned", 1)])
    assert len(book.problems) == 2 and all("vanished" in p for p in book.problems)
    assert book.held_count == 1 and book.orphaned == 4 and book.retried_records == 1


def test_reap_logger_records_are_written_to_the_ledger(tmp_path):
    import logging
    import struct as _struct
    from types import SimpleNamespace

    from shm_taskwork.tools import stress as st

    led = st.Ledger(str(tmp_path / "p.ledger"), 3)
    h = st.record_interrupted(led)
    try:
        lg = logging.getLogger(st.REAP_LOGGER)
        lg.warning("interrupted", extra={"work": SimpleNamespace(payload=_struct.pack("<Q", 42))})
        lg.warning("interrupted", extra={"work": SimpleNamespace(payload=b"x")})
        lg.warning("no work attached")
    finally:
        logging.getLogger(st.REAP_LOGGER).removeHandler(h)
        led.close()
    recs = list(st.REC.iter_unpack(st.read_ledger(str(tmp_path / "p.ledger"))[0]))
    assert recs == [(st.INTERRUPTED, 0, 3, 42)] and h.foreign == 1


# ---- --track: every tracked work's outcome against the ledger ------------------

def track_failure(s: dict, err: str) -> str:
    keys = ("tracked", "outcomes", "own_outcomes", "outcome_mismatches", "outcome_unread", "waiters",
            "tracked_hops", "lost", "duplicated", "crashed", "hung")
    return f"{ {k: s.get(k) for k in keys} }\n{err[-3000:]}"


def test_track_with_kills_gives_every_work_the_outcome_the_ledger_says():
    # serve() workers SIGKILLed (orphaned letters) and SIGTERMed mid-queue
    # (shutdown letters), the next worker of the name adopting them as new
    # works; producers SIGKILLed too, and waiting on some works (call(),
    # Work.wait()) while all this goes on. Every tracked work's outcome,
    # read with Domain.work() and followed through retried_as, must be what
    # its ledger says.
    # Callbacks of 3 ms keep a queue a stop cannot drain in 0.2 s, and a kill
    # every 0.5 s leaves the processes time to start even on a busy machine.
    p, out, err = run_stress("--track", "--serve", "--term", "--restart", "--tasks", "2",
                             "--producers", "2", "--seconds", "5", "--kill-every", "0.5",
                             "--work-ms", "3", "--seed", "29", "--json")
    s = summary_of(out)
    assert p.returncode == 0 and s["ok"] is True, track_failure(s, err)
    assert s["track"] is True and s["outcome_mismatches"] == 0 and s["outcome_unread"] == 0
    own, end = s["own_outcomes"], s["outcomes"]
    assert s["tracked"] > 0 and own["ran"] > 0 and own["cancelled"] > 0, track_failure(s, err)
    assert own["dead_letter"] + own["interrupted"] > 0, track_failure(s, err)
    # the letters were adopted, and their chains followed to the end
    assert s["tracked_hops"] > 0 and s["adopted"] > 0, track_failure(s, err)
    assert end["pending"] == end["running"] == end["failed"] == 0
    assert sum(end.values()) == s["tracked"]
    assert all(s["tracked_by_how"][h] > 0 for h in ("add", "add_many")), s["tracked_by_how"]
    assert s["waiters"]["call"] + s["waiters"]["wait"] > 0 and s["waiters"]["hung"] == 0
    assert s["killed"] > 0 and s["lost"] == 0 and s["duplicated"] == 0
    assert leftovers(p.pid) == []


def test_track_every_add_under_sigkills(tmp_path):
    # Every add tracked (--track-rate 0) on plain tasks whose callbacks take
    # 2 ms, SIGKILLed: works queued on a dead task stay dead letters to the
    # end. (No --term: a task with exit_signals runs its list until it is
    # empty, as the kernel's exit does, which adders at this rate outpace.)
    p, out, err = run_stress("--track", "--track-rate", "0", "--work-ms", "2", "--tasks", "2",
                             "--producers", "3", "--seconds", "4", "--kill-every", "0.5",
                             "--cancel-rate", "0.2", "--seed", "23", "--json",
                             tmpdir=str(tmp_path))
    s = summary_of(out)
    assert p.returncode == 0 and s["ok"] is True, track_failure(s, err)
    assert s["outcome_mismatches"] == 0 and s["outcome_unread"] == 0
    assert s["tracked"] > 0 and s["outcomes"]["ran"] > 0, track_failure(s, err)
    assert s["tracked_hops"] == 0           # nothing retries a letter here
    assert s["outcomes"]["dead_letter"] == s["own_outcomes"]["dead_letter"]
    assert leftovers(p.pid) == []
    assert os.listdir(tmp_path) == []


def test_outcome_checker_reports_what_contradicts_the_ledger(tmp_path):
    # The outcome judge on a ledger written as the processes would write it,
    # and what the domain "said" of each tracked work: the right outcomes
    # pass, every deliberately wrong one is reported.
    from shm_taskwork.tools import stress as st

    P = 7 << 32
    I, A, CI, C, CM = st.INTENT_ADD, st.ADDED, st.CANCEL_INTENT, st.CANCELLED, st.CANCEL_MISSED
    R, O, X, RT = st.RAN, st.ORPHANED, st.INTERRUPTED, st.RETRIED
    ok = st.expected_result
    # id: (producer records, other records, (first, final, hops, result))
    cases = {
        P | 0: ([I, A], [R], ("ran", "ran", 0, ok(P | 0))),
        P | 1: ([I, A, CI, C], [], ("cancelled", "cancelled", 0, None)),
        P | 2: ([I, A], [O], ("dead_letter", "dead_letter", 0, None)),
        P | 3: ([I, A], [X], ("interrupted", "interrupted", 0, None)),
        P | 4: ([I, A], [R, X], ("interrupted", "interrupted", 0, None)),
        P | 5: ([I, A], [O, RT, R], ("dead_letter", "ran", 1, ok(P | 5))),
        P | 6: ([I, A, CI], [], ("cancelled", "cancelled", 0, None)),   # killed canceller
        P | 7: ([I, A, CI, CM], [R], ("ran", "ran", 0, ok(P | 7))),
        # wrong, each one way
        P | 10: ([I, A], [R], ("cancelled", "cancelled", 0, None)),      # ran, says cancelled
        P | 11: ([I, A, CI, C], [], ("ran", "ran", 0, ok(P | 11))),      # cancelled, says ran
        P | 12: ([I, A], [O], ("ran", "ran", 0, ok(P | 12))),            # a letter, says ran
        P | 13: ([I, A], [X], ("dead_letter", "dead_letter", 0, None)),  # killed in callback
        P | 14: ([I, A], [R], ("ran", "ran", 0, b"12345678")),           # wrong result
        P | 15: ([I, A], [O, RT, R], ("ran", "ran", 0, ok(P | 15))),     # retried_as not seen
        P | 16: ([I, A], [R], ("pending", "pending", 0, None)),          # never settled
        P | 17: ([I, A], [], ("ran", "ran", 0, ok(P | 17))),             # the ledger: lost
        P | 18: ([I, A], [R], ("failed", "failed", 0, None)),
    }
    prod = st.Ledger(str(tmp_path / "producer-7.ledger"), 7)
    task = st.Ledger(str(tmp_path / "task-8.ledger"), 8)
    trk = st.TrackFile(str(tmp_path / "producer-7.tracked"))
    chains = {}
    for wid, (mine, elsewhere, (first, final, hops, result)) in cases.items():
        for kind in mine:
            prod.put(kind, wid, 1)
        for kind in elsewhere:
            task.put(kind, wid)
        trk.put(st.T_TRACK, wid, 0x100000000 | wid & 0xFF, st.H_ADD)
        ch = chains[wid] = st.Chain(0x100000000 | wid & 0xFF)
        ch.first, ch.outcome, ch.hops, ch.result = first, final, hops, result
    # waiters: one told the truth, one told another outcome, one came back
    # 3 s after its timeout, and a call() that returned with no run recorded
    trk.put(st.T_WAITED, P | 0, 1_000_000, st.OUTCOME_CODES["ran"])
    trk.put(st.T_WAITED, P | 1, 0, st.OUTCOME_CODES["ran"] | st.W_CALL)
    trk.put(st.T_WAITED, P | 2, 3_000_000_000, st.OUTCOME_CODES["pending"] | st.W_TIMEOUT)
    trk.put(st.T_WAITED, P | 3, -5_000_000, st.OUTCOME_CODES["running"] | st.W_TIMEOUT)
    prod.put(I, P | 20, 1)
    prod.put(A, P | 20, 1)
    trk.put(st.T_WAITED, P | 20, 0, st.OUTCOME_CODES["ran"] | st.W_CALL)
    for f in (prod, task, trk):
        f.close()
    res = st.check_outcomes(str(tmp_path), chains, {}, retries=True)
    wrong = sorted({wid for wid, _ in res["bad"]})
    assert wrong == [P | 1, P | 2, P | 3, P | 10, P | 11, P | 12, P | 13, P | 14, P | 15, P | 16,
                     P | 17, P | 18, P | 20], res["bad"]
    text = dict(res["bad"])
    assert "the domain says cancelled" in text[P | 10]
    assert "result b'12345678'" in text[P | 14]
    assert "retried 1 time(s) by the ledger, 0 by retried_as" in text[P | 15]
    assert "a waiter was told ran, its outcome is cancelled" in text[P | 1]
    assert "after its timeout" in text[P | 2] and res["waiters"]["hung"] == 1
    assert "no run" in text[P | 20]
    assert "timed out 5.000 ms before its timeout" in text[P | 3]
    assert res["outcome_mismatches"] == len(res["bad"]) == 13
    assert res["tracked"] == len(cases) and res["outcomes"]["pending"] == 1
    # Without retries in the run, a followed retried_as is itself wrong.
    res = st.check_outcomes(str(tmp_path), {P | 5: chains[P | 5]}, {}, retries=False)
    assert P | 5 in {w for w, _ in res["bad"]}
    # A record reused before it was read is not judged, but counted.
    res = st.check_outcomes(str(tmp_path), {P | 0: chains[P | 0]}, {P | 0: 1}, retries=True)
    assert res["outcome_unread"] == 1 and res["outcomes"]["unread"] == 1


@pytest.mark.parametrize("args,msg", [
    (("--track-rate", "5"), "--track-rate only applies with --track"),
    (("--outcomes", "100"), "--outcomes only applies with --track"),
    (("--track", "--outcomes", "0"), "--outcomes"),
])
def test_track_options_need_track(args, msg):
    p, out, err = run_stress(*args, timeout=30)
    assert p.returncode == 2 and msg in err, err


def test_bad_modes_name_the_valid_choices():
    p, out, err = run_stress("--modes", "resume,bogus", timeout=30)
    assert p.returncode == 2
    assert "bogus" in err and "none, resume, signal, signal_no_ipi" in err
    assert "Traceback" not in err


def test_help_through_the_console_command():
    p, out, err = run_stress("--help", timeout=30)
    assert p.returncode == 0
    for flag in ("--tasks", "--producers", "--seconds", "--kill-every", "--cancel-rate",
                 "--modes", "--seed", "--json", "--killpoints", "--term", "--restart",
                 "--no-fsck", "--blocking", "--block-in", "--block-for", "--stall-bound"):
        assert flag in out
    for hidden in ("--inject", "--role", "--graceful", "--name "):
        assert hidden not in out


def test_ctrl_c_kills_children_and_removes_everything(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "shm_taskwork.tools.stress", "--tasks", "2", "--producers",
                          "2", "--seconds", "60", "--json"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ctl = psutil.Process(p.pid)
        kids = wait_until(lambda: len(ctl.children()) >= 4 and ctl.children(), timeout=30,
                          what="the stress children to start")
        assert leftovers(p.pid)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    assert p.returncode != 0
    assert "Traceback" not in err
    for k in kids:
        assert not k.is_running() or k.status() == psutil.STATUS_ZOMBIE
    assert leftovers(p.pid) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_twenty_seconds_of_lifecycle_without_an_operator():
    p, out, err = run_stress("--tasks", "4", "--producers", "3", "--seconds", "20",
                             "--kill-every", "0.5", "--term", "--restart", "--no-fsck",
                             "--json", timeout=300)
    s = summary_of(out)
    assert p.returncode == 0, (s, err[-3000:])
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0
    assert s["final_fsck"]["clean"] is True
    assert s["killed"] > 0 and s["terminated"] > 0 and s["retried"] > 0


@pytest.mark.slow
def test_sixty_seconds_of_kills_every_fifty_ms():
    p, out, err = run_stress("--tasks", "4", "--producers", "4", "--seconds", "60",
                             "--kill-every", "0.05", "--json", timeout=400)
    s = summary_of(out)
    assert p.returncode == 0, (s, err[-3000:])
    assert s["killed"] > 500
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0


# ---- --blocking: tasks blocked in system calls while TWA_SIGNAL works arrive ----

def blocking_failure(s: dict, err: str) -> str:
    keys = ("lost", "duplicated", "leaked", "stalled", "max_stall_ms", "stalls_by_call",
            "wait_ms", "block_calls", "timed_works", "crashed", "hung")
    return f"{ {k: s.get(k) for k in keys} }\n{err[-3000:]}"


def test_blocking_tasks_start_every_signal_work_within_the_bound(tmp_path):
    # Each task's main thread only sits in blocking calls (readline and read
    # on pipes, select, sleep, a lock wait, wait()), 0.5 s each; the works
    # arrive as TWA_SIGNAL from three producer processes and run from the
    # SIGUSR1 handler. A signal caught just before the main thread enters one
    # of those calls leaves the handler owed until the call ends: every work
    # must still be accounted for, and no period with works queued and none
    # started may last longer than 100 ms.
    p, out, err = run_stress("--blocking", "--tasks", "4", "--producers", "3",
                             "--seconds", "5", "--json", tmpdir=str(tmp_path))
    s = summary_of(out)
    assert len(out.strip().splitlines()) == 1
    assert s["blocking"] is True and s["modes"] == ["signal"] and s["stall_bound_ms"] == 100
    # The mode did what it says: every kind of call was made, works were timed.
    assert all(n > 0 for n in s["block_calls"].values()), s["block_calls"]
    assert s["added"] > 0 and s["timed_works"] > 0
    assert s["timed_works"] == s["settled"]["executed"] == s["ran"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0, blocking_failure(s, err)
    assert s["phantom"] == 0 and s["crashed"] == 0 and s["hung"] == 0, blocking_failure(s, err)
    assert s["stalled"] == 0 and s["max_stall_ms"] <= 100, blocking_failure(s, err)
    assert p.returncode == 0 and s["ok"] is True, blocking_failure(s, err)
    assert leftovers(p.pid) == []
    assert os.listdir(tmp_path) == []


def _timing(path, inc, records):
    from shm_taskwork.tools import stress as st

    t = st.Timing(str(path), inc)
    for rec in records:
        t.put(*rec)
    t.close()


def test_stall_judgement_of_every_case(tmp_path):
    # The measure of the module docstring on hand-written timing files: a
    # stall ends at any callback start and begins at the later of the last
    # callback's end and the moment the queue went from none to some; time
    # inside callbacks is not a stall; untimed works (no add time, or a
    # retried dead letter) queue nothing but their runs end stalls.
    from shm_taskwork.tools import stress as st

    ms = 1_000_000
    R, B = st.T_RUN, st.T_BLOCK
    read, sleep = st.BLOCK_CALLS.index("read"), st.BLOCK_CALLS.index("sleep")
    _timing(tmp_path / "task-7.timing", 7, [
        (R, 0, 1, 1 * ms, 10 * ms, 11 * ms),          # waited 9 ms: no stall
        (B, read, 0, 0, 15 * ms, 310 * ms),
        (R, 0, 3, 25 * ms, 300 * ms, 301 * ms),       # newest first: a 289 ms stall,
        (R, 0, 2, 20 * ms, 301 * ms, 302 * ms),       # from 2's add (after 1's end)
        (R, 0, 9, 5 * ms, 450 * ms, 600 * ms),        # retried: untimed, a 150 ms callback
        (R, 0, 4, 400 * ms, 610 * ms, 611 * ms),      # queued 210 ms, stalls 50 + 10 ms
        (R, 0, 5, 0, 700 * ms, 701 * ms),             # no add time: untimed
        (B, sleep, 0, 0, 620 * ms, 0),                # entered ...
        (B, sleep, 0, 0, 620 * ms, 1200 * ms),        # ... and left: one call
        (R, 0, 6, 800 * ms, 900 * ms, 901 * ms),      # exactly 100 ms: not over the bound
    ])
    _timing(tmp_path / "task-8.timing", 8, [
        (R, 0, 11, 1000 * ms, 1250 * ms, 1251 * ms),  # 250 ms, outside every call
        (B, read, 0, 0, 1300 * ms, 0),                # entered, never left (killed)
        (R, 0, 12, 1310 * ms, 1500 * ms, 1501 * ms),  # 190 ms, inside that call
    ])
    with open(tmp_path / "task-8.timing", "ab") as f:
        f.write(b"\x01\x00")                          # a torn record is counted, not read
    m = st.measure_stalls(str(tmp_path), 100.0, skip={9})
    assert m["stalled"] == 3 and m["max_stall_ms"] == 280.0
    assert m["stalls_by_call"] == {"readline": 0, "read": 2, "select": 0, "sleep": 0,
                                   "lock": 0, "wait": 0, "none": 1}
    assert [(round(w[0]), w[1], w[4], w[5]) for w in m["worst_stalls"]] == [
        (280, 7, ("read", 15 * ms, 310 * ms), "read"), (250, 8, ("none", 0, 0), "none"),
        (190, 8, ("read", 1300 * ms, 1 << 63), "read")]
    assert m["timed_works"] == 7 and m["timed_runs"] == 9
    assert m["block_calls"]["read"] == 2 and m["block_calls"]["sleep"] == 1
    assert m["wait_ms"]["max"] == 281.0 and m["timing_torn_bytes"] == 2
    # The bound is a parameter: at 300 ms nothing is over it.
    assert st.measure_stalls(str(tmp_path), 300.0, skip={9})["stalled"] == 0
    # Without the skip the retried work queues from its add at 5 ms.
    assert st.measure_stalls(str(tmp_path), 100.0)["max_stall_ms"] > 280.0


@pytest.mark.parametrize("args,text", [
    (("--blocking", "--term"), "--blocking does not combine with --term"),
    (("--blocking", "--modes", "signal,resume"), "use --modes signal"),
    (("--block-for", "1"), "--block-for only applies with --blocking"),
    (("--blocking", "--block-for", "0.1"), "--block-for must be longer than --stall-bound"),
    (("--blocking", "--block-in", "read,nap"), "choose from readline, read, select, sleep, "
                                              "lock, wait"),
    (("--blocking", "--stall-bound", "0"), "--stall-bound must be > 0 ms"),
])
def test_blocking_options_refused_with_one_line(args, text):
    p, out, err = run_stress(*args, timeout=30)
    assert p.returncode == 2, (out, err)
    assert text in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("shm-taskwork stress: error:")


@pytest.mark.slow
def test_thirty_seconds_of_blocking_tasks_never_stall():
    p, out, err = run_stress("--blocking", "--tasks", "4", "--producers", "3", "--seconds", "30",
                             "--json", timeout=300)
    s = summary_of(out)
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0, blocking_failure(s, err)
    assert s["stalled"] == 0 and s["max_stall_ms"] <= 100, blocking_failure(s, err)
    assert p.returncode == 0 and s["ok"] is True, blocking_failure(s, err)
    assert all(n > 0 for n in s["block_calls"].values()) and s["timed_works"] > 0


@pytest.mark.slow
def test_blocking_tasks_killed_and_restarted_lose_nothing():
    # Kills at random (kill points included), replacements under the same
    # name, dead letters retried to them, all while the tasks block: every
    # work is accounted for. Stalls are measured but not judged here: a
    # killed adder or a notification to a task being killed can delay works
    # for reasons other than a deferred handler.
    p, out, err = run_stress("--blocking", "--tasks", "3", "--producers", "3", "--seconds", "20",
                             "--kill-every", "0.5", "--restart", "--json", timeout=300)
    s = summary_of(out)
    assert s["killed"] > 0 and s["retried"] > 0 and s["timed_works"] > 0
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0, blocking_failure(s, err)
    assert s["phantom"] == 0 and s["crashed"] == 0 and s["hung"] == 0, blocking_failure(s, err)
    assert s["dead_letter_problems"] == 0 and s["final_fsck"]["clean"], blocking_failure(s, err)
    assert s["max_stall_ms"] is not None


# ---- regressions the stress runs found --------------------------------------

def _readline(p, timeout: float) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, f"no line from the child within {timeout}s"
    return p.stdout.readline()


def test_signal_between_publishing_the_slot_and_the_handler_does_not_kill(domain, spawn):
    # A producer may see a task in dom.tasks() and send it TWA_SIGNAL the
    # moment its slot is published; the registering process must not die of
    # SIGUSR1's default action. The child is held right after the slot is
    # published (before the fd server starts) until the parent has signalled it.
    child = spawn(
        """
        import sys
        from shm_taskwork import Domain, callback
        from shm_taskwork import notify

        ran = []

        @callback(name="stress.regress")
        def f(work):
            ran.append(work.payload)

        class HeldServer(notify.FdServer):
            def __init__(self, *a, **k):
                print("published", flush=True)
                sys.stdin.readline()
                super().__init__(*a, **k)

        notify.FdServer = HeldServer
        dom = Domain.open(sys.argv[1])
        t = dom.register("held")
        t.exit()
        print("ran", len(ran), flush=True)
        dom.close()
        """, domain.name, stdin=subprocess.PIPE)
    assert _readline(child, 30) == "published\n"
    task = domain.task(pid=child.pid)
    task.add("stress.regress", b"x", notify=TWA_SIGNAL)
    try:
        out, err = child.communicate(input="go\n", timeout=30)
    except BrokenPipeError:  # it died before reading
        out, err = child.communicate(timeout=30)
    assert child.returncode == 0, (child.returncode, err)
    assert out.strip().endswith("ran 1")


# ---- --serve: serve() workers stopped by SIGTERM mid-queue, adopted letters ----

def serve_failure(s: dict, err: str) -> str:
    keys = ("lost", "duplicated", "leaked", "phantom", "crashed", "hung", "unadopted",
            "shutdown_letters", "shutdown_reported", "adopted", "adopted_reported", "orphaned",
            "task_exits", "sigterm_exits", "dead_letter_problems", "final_fsck")
    return f"{ {k: s.get(k) for k in keys} }\n{err[-3000:]}"


def test_serve_workers_stopped_by_sigterm_mid_queue_lose_nothing(tmp_path):
    # Each task process is a serve() worker whose callbacks take 1 ms, with
    # about 300 works queued, so a SIGTERM (one every 0.5 s, and the stop at
    # the end) finds more queued than a 0.2 s drain runs: the rest become shutdown letters, and the
    # worker exits 0. Its replacement (same name) adopts them; at the end two
    # workers per name adopt together whatever is left. Every work ran once,
    # was cancelled once, or is accounted for; every shutdown letter was
    # adopted.
    p, out, err = run_stress("--serve", "--term", "--restart", "--drain-timeout", "0.2",
                             "--work-ms", "1", "--tasks", "3", "--producers", "2",
                             "--seconds", "4", "--seed", "21", "--json", tmpdir=str(tmp_path))
    s = summary_of(out)
    assert len(out.strip().splitlines()) == 1
    assert s["serve"] is True and s["drain_timeout"] == 0.2 and s["work_ms"] == 1
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0, serve_failure(s, err)
    assert s["phantom"] == 0 and s["crashed"] == 0 and s["hung"] == 0, serve_failure(s, err)
    assert s["dead_letter_problems"] == 0, serve_failure(s, err)
    # SIGTERMs were sent mid-run, and every SIGTERMed worker exited 0.
    assert s["terminated"] > 0 and s["sigterm_exits"] == {"0": s["terminated"]}, s
    assert s["task_exits"] == {"0": s["started"]["task"]}, s
    # Shutdown letters were made, and each one adopted: what the ledger saw
    # filed (shutdown, orphaned) all came back, as the workers themselves
    # reported over NOTIFY_SOCKET (no SIGKILL here, so both views agree).
    assert s["shutdown_letters"] > 0 and s["restarted"] > 0, serve_failure(s, err)
    assert s["adopted"] == s["shutdown_letters"] + s["orphaned"], serve_failure(s, err)
    assert s["shutdown_reported"] == s["shutdown_letters"], serve_failure(s, err)
    assert s["adopted_reported"] == s["adopted"], serve_failure(s, err)
    assert s["adopted_then_executed"] > 0 and s["sweepers"] > 0
    assert s["unadopted"] == 0 and s["dead_letters"] == 0, serve_failure(s, err)
    assert s["final_fsck"]["clean"] is True, s["final_fsck"]
    assert p.returncode == 0 and s["ok"] is True, serve_failure(s, err)
    assert leftovers(p.pid) == []
    assert os.listdir(tmp_path) == []


def test_serve_checker_fails_when_letters_are_not_adopted(tmp_path):
    # The adoption check can fail: workers that serve with adopt=False leave
    # the shutdown letters of the workers they replace on the list.
    p, out, err = run_stress("--serve", "--term", "--restart", "--tasks", "2",
                             "--producers", "1", "--seconds", "1.5", "--seed", "2",
                             "--work-ms", "1",
                             "--inject", "no-adopt", "--json", tmpdir=str(tmp_path))
    s = summary_of(out)
    assert p.returncode == 1, (s, err[-2000:])
    assert s["shutdown_letters"] > 0 and s["adopted"] == 0
    assert s["unadopted"] == s["shutdown_letters"] + s["orphaned"] > 0 and s["ok"] is False
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0
    assert "left at the end: no worker of their name adopted them" in err
    assert leftovers(p.pid) == []


def test_ledger_judgement_of_shutdown_and_adopted_letters(tmp_path):
    # A shutdown letter is judged as an orphaned one, its adoption as a
    # retry: filed -> adopted -> ran is one execution; adopted and then
    # nowhere is lost; two copies filed at once, or adopted more than filed,
    # is duplicated.
    from shm_taskwork.tools import stress as st

    P = 7 << 32
    I, A, R, X = st.INTENT_ADD, st.ADDED, st.RAN, st.INTERRUPTED
    O, S, RT, AD = st.ORPHANED, st.SHUTDOWN, st.RETRIED, st.ADOPTED
    cases = {
        P | 0: [S, AD, R],              # stopped mid-queue, adopted, run: executed
        P | 1: [S, AD, S, AD, R],       # its adopter was stopped too: executed
        P | 2: [O, AD, S, AD, X],       # killed, adopted, stopped, adopted, interrupted
        P | 3: [S],                     # a dead letter at the end
        P | 4: [S, AD],                 # LOST: adopted, then nowhere
        P | 5: [S, S],                  # DUPLICATED: two copies on the list
        P | 6: [S, AD, AD, R],          # DUPLICATED: adopted more than filed
        P | 7: [S, R],                  # DUPLICATED: ran, yet still a dead letter
        P | 8: [O, RT, S, AD, R],       # retried by the controller, then adopted: executed
    }
    prod = st.Ledger(str(tmp_path / "producer-7.ledger"), 7)
    other = st.Ledger(str(tmp_path / "controller.ledger"), 0)
    for wid, kinds in cases.items():
        prod.put(I, wid, 1)
        prod.put(A, wid, 1)
        for kind in kinds:
            other.put(kind, wid)
    prod.close()
    other.close()
    acc = st.account(str(tmp_path))
    assert acc["bad"] == {"lost": [P | 4], "duplicated": [P | 5, P | 6, P | 7], "phantom": []}
    assert acc["settled"] == {"executed": 4, "cancelled": 0, "orphaned": 1,
                              "cancelled_by_killed_canceller": 0}
    assert acc["shutdown"] == 11 and acc["orphaned"] == 2
    assert acc["adopted"] == 9 and acc["retried"] == 1
    assert acc["adopted_then_executed"] == 4 and acc["retried_then_executed"] == 4


def test_dead_letter_book_tells_adoption_from_a_vanished_letter(tmp_path):
    # A shutdown letter is written 'shutdown'; a copy gone while a worker of
    # its target name was adopting is 'adopted'; gone while none was, it is a
    # problem (nobody else takes letters off the list).
    import struct as _struct
    from types import SimpleNamespace

    from shm_taskwork.tools import stress as st

    def dl(wid, name, reason="shutdown"):
        return SimpleNamespace(payload=_struct.pack("<Q", wid), reason=reason,
                               target_name=name)

    led = st.Ledger(str(tmp_path / "controller.ledger"), 0)
    book = st.DeadLetterBook(led)
    book.observe([dl(1, "a"), dl(2, "b"), dl(3, "a", "orphaned")])
    book.observe([dl(2, "b")], adopting={"a"})             # 1 and 3 adopted by a's worker
    book.observe([dl(2, "b"), dl(1, "a")])                 # 1 filed again at a's stop
    book.observe([], adopting={"a"})                       # 2 vanished: b was not adopting
    led.close()
    recs = [(st.KIND_NAMES[k], wid) for k, _aux, _inc, wid in
            st.REC.iter_unpack(st.read_ledger(str(tmp_path / "controller.ledger"))[0])]
    assert sorted(recs) == sorted([("shutdown", 1), ("shutdown", 2), ("orphaned", 3),
                                   ("adopted", 1), ("adopted", 3), ("shutdown", 1),
                                   ("adopted", 1)])
    assert len(book.problems) == 1 and "0x2 (for 'b') vanished" in book.problems[0]
    assert book.shutdown == 3 and book.orphaned == 1 and book.adopted == 3
    assert book.adoptable_count == 0


@pytest.mark.parametrize("args,text", [
    (("--drain-timeout", "1"), "--drain-timeout only applies with --serve"),
    (("--serve", "--blocking"), "--serve does not combine with --blocking"),
])
def test_serve_options_refused_with_one_line(args, text):
    p, out, err = run_stress(*args, timeout=30)
    assert p.returncode == 2 and text in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


@pytest.mark.slow
def test_thirty_seconds_of_serve_workers_terminated_and_killed():
    # SIGKILLs (the controller's and kill points') and SIGTERMs mid-queue: a
    # killed worker's works become orphaned letters, a terminated one's
    # shutdown letters; the next worker of the name adopts both.
    p, out, err = run_stress("--serve", "--term", "--restart", "--tasks", "4",
                             "--producers", "3", "--seconds", "30", "--kill-every", "0.2",
                             "--json", timeout=400)
    s = summary_of(out)
    assert p.returncode == 0 and s["ok"] is True, serve_failure(s, err)
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["leaked"] == 0
    assert s["killed"] > 0 and s["terminated"] > 0 and s["orphaned"] > 0
    assert s["shutdown_letters"] > 0 and s["unadopted"] == 0
    assert s["adopted"] == s["shutdown_letters"] + s["orphaned"], serve_failure(s, err)
    assert set(s["sigterm_exits"]) <= {"0", "SIGKILL"} and s["sigterm_exits"]["0"] > 0
    assert s["final_fsck"]["clean"] is True
