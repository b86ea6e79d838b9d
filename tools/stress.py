"""``shm-taskwork stress``: many processes adding, cancelling, running and
being killed; a ledger proves that nothing was lost, run twice or leaked.

What runs
---------
The controller (this process) creates a private domain and starts ``--tasks``
task processes and ``--producers`` producer processes. Each is an unrelated
process (``python -m shm_taskwork.tools.stress --role task|producer ...``), not a fork of
the controller, in its own session so a Ctrl-C reaches only the controller.

* A **task** registers under a name, registers the callback ``stress.record``
  and loops on ``wait(timeout=0.02)`` (which runs whatever was notified), plus a
  ``run()`` every 0.2 s so that ``TWA_NONE`` works do not wait for the exit.
  The callback appends ``ran ID`` to the task's ledger before it returns.
* A **producer** picks a random task *name* among the running tasks
  (``dom.tasks()``, refreshed every 0.1 s), resolves it with
  ``dom.task(name=...)`` (a live task of that name; the handle is kept until an
  add to it raises ``TaskExitedError``, so a replaced task gets new work), adds
  a work whose payload is its unique 8-byte ID in a random mode of ``--modes``
  (one add in ten is an ``add_many`` of 2 to 8 works), and after an add, with
  probability ``--cancel-rate``, cancels one of its own recent works. IDs are
  ``incarnation << 32 | sequence``: every started process has a new incarnation
  number, so IDs never repeat.
* Every ``--kill-every`` seconds the controller SIGKILLs a random task or
  producer and starts a replacement (a new incarnation). With ``--killpoints``
  (the default when ``--kill-every`` > 0) about a third of the started
  processes also get ``SHM_TASKWORK_KILLPOINT=POINT:N`` at random, so they
  SIGKILL themselves at the N-th pass through one of the nastiest instructions:
  tasks at ``after_detach``, ``in_detach``, ``in_callback``, ``in_register``
  or ``in_reap``, producers at ``after_alloc``, ``after_push``,
  ``in_pi_lock``, ``mid_pop``, ``in_claim``, ``in_reap``, ``in_dl_file`` or
  ``in_notify`` (a producer reaps the dead tasks it notices; ``in_notify``
  is met only by TWA_SIGNAL adds, between the arming and the send).
* ``--term``: half of the kills are a SIGTERM to a random task instead, and
  about half of the task processes register with
  ``exit_signals=(signal.SIGTERM,)``: those run their pending works and then
  die with SIGTERM's status; the others die as if SIGKILLed and their works
  become orphaned dead letters. Either way the exit status must be SIGTERM's.
* ``--restart``: task names are fixed (``stress-t0`` ...), a dead task is
  replaced by a process registering the same name, and the controller re-queues
  the orphaned dead letters to each name that has a live task again
  (``dom.retry_dead_letters(to=NAME, reason="orphaned")``, every 0.05 s).
  Without it each task process has a name of its own and dead letters stay
  until the end.
* ``--serve``: every task process is a ``task.serve()`` worker (README
  "Workers in production"; docs/cli.md, "stress --serve"), with
  ``--drain-timeout`` (default 0.2 s) and callbacks that take ``--work-ms``
  (default 0.5 ms here; producers then skip a task with ``BACKLOG_CAP`` works
  queued), so that a stop finds more queued than the drain runs. With
  ``--term`` a worker that has said READY gets a SIGTERM (every 0.5 s, or
  half of the ``--kill-every`` kills): it drains, files the rest as
  ``shutdown`` dead letters and must exit 0. The next worker of its name
  (``--restart``) adopts them, and the orphaned letters of a SIGKILLed one;
  the controller retries nothing. Workers report over ``NOTIFY_SOCKET`` (a
  datagram socket the controller reads): ``READY=1`` with the count adopted,
  a last ``STATUS=`` with the count left as shutdown letters. At the end every
  worker is waited for to say READY, then all get SIGTERM; then, for each name
  with letters left, two workers start together, adopt them, run them all
  (``drain_timeout=None``) and exit 0.
* Death is seen in shared memory: whoever notices a dead task (a producer's
  add or ``dom.tasks()``, a new registration, the controller's ``dom.tasks()``)
  reaps it. Works whose callback had started are reported by the reaping
  process on the logger ``shm_taskwork.reap``; every process of the run
  (producers, tasks, the controller) writes those as ``interrupted ID``.
* By default a controller thread runs ``fsck(repair=True)`` every 0.1 s beside
  all this (and writes ``interrupted ID`` for the works its reports name).
  ``--no-fsck`` runs none at all: reaping alone must keep the domain whole.
* At the end: producers are stopped (they finish the operation in hand), with
  ``--restart`` the dead letters are retried once more, then the tasks are
  stopped (``exit()`` runs everything queued; with ``--serve``, as said
  above); with fsck two
  ``fsck(repair=True)`` passes reclaim what killed processes held. The dead
  letters still present are read, recorded as their final outcome and dropped,
  and one dry ``fsck(repair=False)`` must then find nothing (``final_fsck``).

The ledger
----------
Each process appends fixed-size 16-byte records to its own file in a private
temporary directory: one ``os.write`` per record on an ``O_APPEND`` descriptor,
so a SIGKILL leaves every record whole or absent and nothing is buffered. The
producer writes ``intent-add`` before ``add`` and ``added`` after it returned
(or ``add-failed`` after ``TaskExitedError``/``PoolExhaustedError``), and
``cancel-intent`` before ``cancel``, then ``cancelled`` (True) or
``cancel-missed`` (False). A task writes ``ran`` inside the callback. Any
process writes ``interrupted`` for a work a reaper (or fsck) reported.

Dead letters are read by the controller alone, and only the controller takes
them off the list (retry, drop), or with ``--serve`` a worker of the letter's
name while it adopts, so it can keep the count of each ID's copies on the
list: a copy it had not seen is written ``orphaned ID`` (``shutdown ID`` for a
shutdown letter); a copy gone after its retry call is written ``retried ID``,
one gone while a worker of its target name was adopting (started before the
read ended, not READY nor dead before the previous read began) ``adopted
ID``. An ID's ``orphaned`` and ``shutdown`` minus its ``retried`` and
``adopted`` is thus the number of copies on the list at the end (the final
read is recorded the same way before the drop). A copy that vanishes when no
retry or adoption can explain it is a fault of the core
(``dead_letter_problems``). With ``--serve`` the list is read after every
task process's death, before its replacement starts, and before every
SIGTERM, so a letter filed and adopted is seen both times; only a letter
adopted and filed again between two reads (a worker SIGKILLed while it
adopts) is seen as neither, which changes no judgement.

How each ID is judged
---------------------
Outcomes of an ID: *executed* (one or more ``ran``, or ``interrupted``),
*cancelled*, *orphaned* (still a dead letter at the end: ``orphaned`` one more
than ``retried``).

* ``ran`` together with ``interrupted`` is one execution: the callback
  recorded the work, then its task died before the node was freed, and the
  reaper found it started. ``interrupted`` alone: the task died after the
  callback had started, before it wrote its record. ``interrupted`` written
  more than once (a reaper killed while reaping and a second one reporting the
  work again, or fsck and the reap logger both) counts once.
* A shutdown letter is judged as an orphaned one, and an adoption as a retry.
* A dead letter that is retried is not an outcome: orphaned -> retried -> ran
  is executed once, and orphaned -> retried -> orphaned -> retried -> ran too
  (a retry to a task that died again). Orphaned, retried and then nothing is
  **lost**.
* **duplicated**: more than one outcome, ``ran``/``cancelled`` twice, two
  copies on the dead-letter list at once (``orphaned`` exceeding ``retried``
  by two), or more ``retried`` than ``orphaned``.
* **lost**: a confirmed add (``added``) with no outcome at all.
* An ``intent-add`` without ``added`` or ``add-failed`` (the producer was killed
  inside ``add``): the work may or may not have been queued. Executed once,
  orphaned once, cancelled once, or nowhere (its node was reclaimed as never
  pushed) are all correct; two outcomes are duplicated. Counted under
  ``unconfirmed``.
* A ``cancel-intent`` without a result (the producer was killed inside
  ``cancel``): the work may have been executed or orphaned, or be nowhere -
  "cancelled by a killed canceller" (the task's runner or fsck gave its node
  back). Never counted lost; counted under ``cancel_unconfirmed``, and a
  confirmed add that ends nowhere this way under
  ``settled.cancelled_by_killed_canceller``.

``settled`` splits the confirmed adds by their one outcome (executed,
cancelled, orphaned, cancelled by a killed canceller); with nothing lost or
duplicated its four figures add up to ``added``. ``retried_then_executed``
counts the IDs that ran (or were interrupted) after a retry.
* **phantom**: an outcome (or an ``orphaned``) for an ID whose add failed, or
  that no producer ever intended, or a ``cancelled`` without ``cancel-intent``.
  A failed add queues nothing, so any of these is a fault.
* **leaked**: ``pool_size - pool_free`` after everything drained and the dead
  letters were dropped; it must be 0.

``killed`` counts every SIGKILL: the controller's (``sigkills_sent``) and the
kill points' (``killpoint_deaths``); ``terminated`` every task that died of
a SIGTERM the controller sent (``sigterms_sent``), split into
``terminated_graceful`` (registered with ``exit_signals``) and
``terminated_abrupt``. ``retried`` is the sum of what
``retry_dead_letters`` returned; ``shutdown_letters`` and ``adopted`` count
the ``shutdown`` and ``adopted`` records (``shutdown_reported`` and
``adopted_reported``: what the workers said over ``NOTIFY_SOCKET``);
``unadopted`` (``--serve``) the orphaned and shutdown letters left at the end,
which must be 0; ``task_exits`` and ``sigterm_exits`` the exit statuses of the
task processes, and of those the controller SIGTERMed (with ``--serve`` each
must be ``0``, or ``SIGKILL`` at a kill point: ``sigterm_unclean`` counts the
others); ``orphaned`` counts the ``orphaned`` records
(a work orphaned twice counts twice), ``interrupted`` the IDs reported
interrupted, ``dead_letters`` the dead letters read at the end.
``--kill-every`` is a target: a kill waits for the victim to be reaped and its
replacement started, and a loop that falls behind skips ticks rather than
killing in bursts. ``crashed`` counts children that exited with an error (a
traceback on their stderr) or a SIGTERM nobody sent, ``hung`` those that did
not stop within their deadline. The run exits 0 only if ``lost``,
``duplicated``, ``leaked``, ``phantom``, ``crashed``, ``hung`` and
``dead_letter_problems`` (and with ``--serve`` ``unadopted`` and
``sigterm_unclean``) are all 0 and the final dry fsck is clean; otherwise
the offending IDs (the first 20) go to stderr. The last line of stdout is
always the JSON summary (``--json``: nothing else).

With ``--domain NAME`` the domain is created under that name and, if the run
fails, kept for ``shm-taskwork inspect``/``fsck``; the default private domain
and the ledger directory are always removed.

Tracked works (``--track``)
---------------------------
A tracked work's outcome is recorded in the domain (docs/contract.md, "A
work's outcome"); ``--track`` checks it against what the ledger says happened.

* Producers add tracked works at up to ``--track-rate`` works per second
  (default 2000, all producers together; 0: every add), the other adds as
  without ``--track``: ``add(..., track=True)``, ``add_many(..., track=True)``
  and one tracked single add in ten ``add_keyed(..., track=True)`` with the
  ID as its key (so producers also die at the kill points ``key_reserved``
  and ``key_pushed``; every other kill point meets tracked works as it meets
  the others). A tracked callback returns ``expected_result(ID)``.
* For each tracked add that returned, the producer writes ``(ID, work id)``
  to its own ``.tracked`` file (24-byte records, one write each, as the
  ledger) before ``added``.
* Waiters: about every ``WAIT_EVERY`` s a producer makes one tracked work a
  waited one, with a timeout drawn from ``WAIT_TIMEOUTS``: either
  ``task.call()`` (written as ``intent-add`` and ``cancel-intent`` before it,
  since call() cancels a work not started at its deadline, then ``added`` and
  ``cancelled``/``cancel-missed``; its work id is known, and written, only
  when it raised) or ``add`` + ``Work.wait()``. The outcome the waiter was
  given and how late it returned past its timeout are written; tasks are
  killed under the waiters all along. A waiter back more than
  ``WAIT_SLACK`` s after its timeout **hung**; one that raised
  ``TimeoutError`` before its timeout, or a ``call()`` that returned other
  bytes than the callback's, is a mismatch.
* The controller's outcome watcher (``OutcomeWatcher``) follows every
  tracked work while the run goes on, because the core keeps only the last
  ``--outcomes`` records (default 16384: this domain's ``outcomes``
  option) and finds one by scanning the ring newest first: a record must be
  read before that many newer tracked works settle, and reading an old one
  costs a scan of the ring. So sizing the ring above the run's tracked works
  would make the end's reads quadratic; instead each work is read
  ``TRACK_LAG`` s after it appears in a ``.tracked`` file, again with a
  backoff while it is pending or running, and a dead letter's ``retried_as``
  (a retry by the controller with ``--restart``, an adoption with
  ``--serve``) is followed to the work it was queued again as. At the end,
  after everything stopped and the dead letters were settled, every chain is
  read to its end. A work whose record was reused before it was read is
  ``outcome_unread``: not judged, and the run fails (raise ``--outcomes`` or
  lower ``--track-rate``).
* The judgement of each tracked ID (``check_outcomes``): the ledger gives
  the outcome its work must end with (``expected_outcome``): a cancel that
  returned True: ``cancelled``; ``ran``: ``ran``, with the callback's result;
  ``ran`` and ``interrupted`` (the task died after the callback returned):
  ``ran`` or ``interrupted``; ``interrupted`` alone: ``interrupted``; still a
  dead letter at the end: ``dead_letter``; a canceller killed inside
  ``cancel()`` and no other outcome: ``cancelled`` (the node it held is given
  back as cancelled); nothing: no outcome is right. That is the outcome of
  the last work of the chain; the chain has at least as many retries as the
  ledger's ``retried`` and ``adopted`` (more when a letter was retried and
  filed again between two reads of the list), none in a run that retries
  nothing, and the ID's own work, once retried, stays ``dead_letter``. A
  waiter that did not time out must have been given that own outcome, and a
  ``call()`` that returned must have a ``ran`` in the ledger. Any
  contradiction is an ``outcome_mismatches`` (the first 20 go to stderr,
  each with what the domain said and the ID's ledger records).
* The summary adds ``tracked`` (by how: add, add_many, add_keyed, call,
  wait), ``outcomes`` (the final outcome of each chain; ``pending`` or
  ``running`` at the end is a mismatch), ``own_outcomes`` (the outcome of
  the work each add returned: a retried letter's is ``dead_letter``),
  ``tracked_hops`` (retried_as
  followed), ``waiters`` (call, wait, timeouts, hung, max_late_ms),
  ``outcome_reads``, ``outcome_mismatches`` and ``outcome_unread``; the run
  is ``ok`` only if both are 0 and no waiter hung.

Tasks blocked in system calls (``--blocking``)
----------------------------------------------
A TWA_SIGNAL work runs from the task's SIGUSR1 handler, and CPython runs a
Python handler only when the main thread next checks for signals: a signal
caught just before the main thread enters a blocking system call leaves the
handler owed. The library must still start every such work within a bound
(docs/cli.md, "stress --blocking": while the task is alive, not in
``critical()`` and not running a callback, no TWA_SIGNAL work waits more than
100 ms for its run to begin because of a deferred handler). ``--blocking``
checks that:

* Every add is ``TWA_SIGNAL`` (``--modes signal``, the only mode allowed), and
  its payload is 16 bytes: the ID, then the producer's ``CLOCK_MONOTONIC``
  time in ns taken just before the add (the same clock in every process).
* A task registers with the library's own SIGUSR1 handler and never calls
  ``run()``: its main thread only goes round the blocking calls of
  ``--block-in`` (default all), each lasting ``--block-for`` seconds (default
  0.5): ``readline`` (a buffered text ``readline()`` on a pipe), ``read``
  (``os.read`` on a pipe), ``select`` (on a pipe that stays empty, with that
  timeout), ``sleep`` (``time.sleep``), ``lock`` (``Lock.acquire(timeout=)``
  on a held lock) and ``wait`` (``task.wait(timeout=)``). A helper thread of
  the task, with every signal blocked (a signal must reach the main thread, as
  it would in an application), writes one line to the readline/read pipe when
  its time is up, and when the stop comes writes to every pipe and releases
  the lock, so those calls end at once (``sleep`` and ``wait`` end at their
  timeout). Then the task exits (``exit()`` runs what is still queued).
* The callback writes ``ran ID`` as always, and to the task's own timing file
  one record: the ID, the add time from the payload, and the times the
  callback started and returned. The main thread writes a record for each
  blocking call (which one, entered, left).
* A **stall** is a period during which the task had at least one work queued
  and none started, not counting the time a callback was running: per task,
  each work is queued from its add time to the start of its callback; a stall
  ends at every callback start and begins at the later of the end of the
  previous callback and the moment a work became queued when none was.
  ``max_stall_ms`` is the longest, ``stalled`` the count of those longer than
  ``--stall-bound`` (ms, default 100), ``stalls_by_call`` which blocking call
  overlapped each of those most. A work whose callback never ran (cancelled,
  orphaned, killed in its callback) queues nothing in this measure, and nor
  does a dead letter retried to another task (its add time is not its queue
  time there); their runs still end stalls. ``wait_ms`` gives percentiles of
  every timed work's wait (add to callback start). A run is ``ok`` only if
  ``stalled`` is 0 as well.
* Combines with ``--seconds``, ``--tasks``, ``--producers``, ``--json``,
  ``--cancel-rate``, ``--kill-every``/``--killpoints``, ``--restart`` and
  ``--no-fsck``; not with ``--term`` (the exit signal's handler is a Python
  handler deferred the same way, outside this bound).
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import shm_taskwork
from shm_taskwork.tools._common import positive_int

CALLBACK = "stress.record"
MODES = {"none": 0, "resume": 1, "signal": 2, "signal_no_ipi": 3}
MODE_NAMES = {v: k for k, v in MODES.items()}
# kill point -> the largest N of POINT:N drawn (how often a process passes it)
TASK_KILLPOINTS = {"after_detach": 30, "in_detach": 30, "in_callback": 400, "in_register": 1,
                   "in_reap": 2}
PRODUCER_KILLPOINTS = {"after_alloc": 400, "after_push": 400, "in_pi_lock": 30,
                       "mid_pop": 400, "in_claim": 1, "in_reap": 3, "in_dl_file": 50,
                       "in_notify": 400}
KILLPOINT_SHARE = 0.33
MANY_SHARE = 0.1       # adds made with add_many (2..8 works, one push)
MANY_FLAG = 0x100      # in a record's aux: the work came with add_many
FSCK_EVERY = 0.1
DEAD_LETTERS_EVERY = 0.05   # --restart: how often the controller retries
TERM_SHARE = 0.5       # --term: the share of kills that are a SIGTERM to a task
GRACEFUL_SHARE = 0.5   # --term: the share of tasks registered with exit_signals
REAP_LOGGER = "shm_taskwork.reap"
# --blocking: the blocking calls a task's main thread goes round
BLOCK_CALLS = ("readline", "read", "select", "sleep", "lock", "wait")
BLOCK_FOR = 0.5        # default seconds per blocking call
STALL_BOUND_MS = 100.0  # default bound on a stall (docs/cli.md, "stress --blocking")
WAKE_POLL = 0.02       # how often a blocking task's helper looks for the stop
SERVE_DRAIN = 0.2      # --serve: default drain deadline, short so that a stop leaves works
SWEEPERS_PER_NAME = 2  # --serve: workers of one name that adopt together at the end
SERVE_WORK_MS = 0.5    # --serve: default time a callback takes
SERVE_TERM_EVERY = 0.5  # --serve --term without --kill-every: a SIGTERM this often
BACKLOG_CAP = 300      # --work-ms > 0: producers skip a task with this many works queued
# --track: tracked works and their outcomes (the module docstring, "Tracked works")
TRACK_KILLPOINTS = {"key_reserved": 20, "key_pushed": 20}   # producers, keyed adds
TRACK_RATE = 2000.0    # default tracked works per second, all producers together
TRACK_OUTCOMES = 16384  # default outcome records of the stress domain (--outcomes)
TRACK_LAG = 0.3        # a tracked work is first read this long after its add
TRACK_EVERY = 0.05     # how often the watcher reads the new works
LETTERS_EVERY = 0.25   # how often it reads again the dead letters that may be retried
BACKOFF_MAX = 1.0      # a work still pending or running is read again at most this late
KEYED_SHARE = 0.1      # tracked single adds made with add_keyed
WAIT_EVERY = 0.05      # mean time between a producer's waited works (call(), Work.wait())
WAIT_TIMEOUTS = (0.01, 0.2)   # a waited work's timeout is drawn from this range
WAIT_SLACK = 2.0       # a wait that returns this much after its timeout hung
RESULT_MASK = 0x5A5A5A5A5A5A5A5A   # a tracked callback returns its ID xor this

# ---- the ledger -------------------------------------------------------------

REC = struct.Struct("<HHIQ")   # kind, aux (notify mode), writer incarnation, id
INTENT_ADD, ADDED, ADD_FAILED, CANCEL_INTENT, CANCELLED, CANCEL_MISSED, RAN, \
    ORPHANED, INTERRUPTED, RETRIED, SHUTDOWN, ADOPTED = range(1, 13)
NKINDS = 13
KIND_NAMES = {INTENT_ADD: "intent-add", ADDED: "added", ADD_FAILED: "add-failed",
              CANCEL_INTENT: "cancel-intent", CANCELLED: "cancelled",
              CANCEL_MISSED: "cancel-missed", RAN: "ran", ORPHANED: "orphaned",
              INTERRUPTED: "interrupted", RETRIED: "retried", SHUTDOWN: "shutdown",
              ADOPTED: "adopted"}


class Ledger:
    """One process's append-only record file: one write(2) per record."""

    def __init__(self, path: str, incarnation: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.inc = incarnation

    def put(self, kind: int, wid: int, aux: int = 0) -> None:
        os.write(self.fd, REC.pack(kind, aux, self.inc, wid))

    def close(self) -> None:
        os.close(self.fd)


# --track: each producer's own file of 24-byte records, one write(2) each as the
# ledger: (ID, value, kind, aux, 0)
TRK = struct.Struct("<QqHHI")
T_TRACK, T_WAITED, T_RESULT_BAD, T_KEY_STALE = 1, 2, 3, 4
# T_TRACK: the add of ID returned work id ``value``; aux says how it was added
HOW_NAMES = ("add", "add_many", "add_keyed", "call", "wait")
H_ADD, H_MANY, H_KEYED, H_CALL, H_WAIT = range(5)
# T_WAITED: a waiter returned; aux = the outcome it returned (its code), with
# W_CALL if it was call() and W_TIMEOUT if it timed out (the code is then the
# outcome the work had); value = how late it returned after its timeout (ns;
# negative: before it)
W_CALL, W_TIMEOUT = 0x100, 0x200
# T_RESULT_BAD: call() returned other bytes than the callback did
# T_KEY_STALE: add_keyed of a new key said the key was known (value: its work id)
OUTCOME_CODES = {"pending": 0, "running": 1, "ran": 2, "failed": 3, "cancelled": 4,
                 "dead_letter": 5, "interrupted": 6}
OUTCOME_NAMES = {v: k for k, v in OUTCOME_CODES.items()}
FINAL_OUTCOMES = ("ran", "failed", "cancelled", "dead_letter", "interrupted")


class TrackFile:
    """A producer's ``.tracked`` file: one write(2) per record, as the ledger."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def put(self, kind: int, wid: int, value: int = 0, aux: int = 0) -> None:
        os.write(self.fd, TRK.pack(wid, value, kind, aux, 0))

    def close(self) -> None:
        os.close(self.fd)


def expected_result(wid: int) -> bytes:
    """What the callback of a tracked stress work returns."""
    return struct.pack("<Q", wid ^ RESULT_MASK)


def payload_id(work) -> int | None:
    """The ID a stress work carries, or None for a foreign payload. A payload
    is the ID (8 bytes), or with ``--blocking`` the ID and the add time (16)."""
    p = work.payload
    return struct.unpack_from("<Q", p)[0] if len(p) in (8, 16) else None


# ---- --blocking: the timing files -------------------------------------------

TREC = struct.Struct("<HHIQQQQ")   # kind, call, writer incarnation, id, added, start, end
T_RUN, T_BLOCK, T_LOOK = 1, 2, 3
# T_RUN: a callback ran work ``id`` (added at ``added``) from ``start`` to ``end``.
# T_BLOCK: the main thread was in blocking call BLOCK_CALLS[call] from ``start``
# to ``end`` (``id`` and ``added`` 0); written with ``end`` 0 on the way in and
# again on the way out. T_LOOK: the task's signal state as its blocking
# helper saw it at ``start`` (every WAKE_POLL): ``call`` its flag bits, ``id``
# signals_resent, ``added`` signals_sent, ``end`` bit 0 a signal owed, bits
# 8-23 the works pending (at most 65,535).
# All times CLOCK_MONOTONIC ns.


class Timing:
    """One task process's timing file: one write(2) per record, as the ledger."""

    def __init__(self, path: str, incarnation: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.inc = incarnation

    def put(self, kind: int, call: int, wid: int, added: int, start: int, end: int) -> None:
        os.write(self.fd, TREC.pack(kind, call, self.inc, wid, added, start, end))

    def close(self) -> None:
        os.close(self.fd)


def _percentile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_stalls(directory: str, bound_ms: float, skip: frozenset | set = frozenset()) -> dict:
    """Judge the timing files of a ``--blocking`` run (the module docstring,
    "Tasks blocked in system calls"). ``skip``: IDs whose add time is not the
    time they were queued on the task that ran them (retried dead letters).

    Per task file, a sweep in time order: a timed work's add makes it
    queued, its callback's start ends that; any callback start ends the stall
    in progress, which began at the later of the previous callback's end and
    the moment the queue went from none to some. A task's callbacks run one
    after another on its main thread, so its runs are in start order."""
    bound_ns = bound_ms * 1e6
    # ms, task inc, begin, end, (call, its entry, its exit), the call it ended in
    stalls: list[tuple[float, int, int, int, tuple[str, int, int], str]] = []
    waits: list[int] = []
    calls = {c: 0 for c in BLOCK_CALLS}
    by_call = {c: 0 for c in (*BLOCK_CALLS, "none")}
    longest = 0
    timed = nruns = 0
    torn = 0
    for fn in sorted(os.listdir(directory)):
        if not fn.endswith(".timing"):
            continue
        with open(os.path.join(directory, fn), "rb") as f:
            raw = f.read()
        whole = len(raw) - len(raw) % TREC.size
        torn += len(raw) - whole
        runs = []        # (start, end, timed)
        adds = []        # add times of the timed works
        blocks = {}      # enter -> (leave, call); a call never left ends never
        looks = []       # (time, flags, resent, sent, owed | pending << 8)
        inc = 0
        for kind, call, inc, wid, added, start, end in TREC.iter_unpack(raw[:whole]):
            if kind == T_RUN:
                counted = 0 < added <= start and wid not in skip
                runs.append((start, end, counted))
                if counted:
                    adds.append(added)
                    waits.append(start - added)
            elif kind == T_BLOCK and 0 <= call < len(BLOCK_CALLS):
                if start not in blocks:
                    calls[BLOCK_CALLS[call]] += 1
                blocks[start] = (end or 1 << 63, BLOCK_CALLS[call])
            elif kind == T_LOOK:
                looks.append((start, call, wid, added, end))
        nruns += len(runs)
        timed += len(adds)
        if any(runs[i][0] > runs[i + 1][0] for i in range(len(runs) - 1)):
            runs.sort()
        adds.sort()
        spans = sorted((enter, leave, call) for enter, (leave, call) in blocks.items())
        n_adds = len(adds)
        i = queued = since = last_end = 0
        for start, end, counted in runs:
            while i < n_adds and adds[i] <= start:
                queued += 1
                if queued == 1:
                    since = adds[i]     # the queue went from none to some
                i += 1
            if queued:
                begin = since if since > last_end else last_end
                length = start - begin
                if length > longest:
                    longest = length
                if length > bound_ns:
                    stalls.append((length / 1e6, inc, begin, start,
                                   _overlapping(spans, begin, start), _at(spans, start),
                                   _signal_state(looks, begin, start)))
                if counted:
                    queued -= 1
            if end > last_end:
                last_end = end
    for st in stalls:
        by_call[st[4][0]] += 1
    waits.sort()
    stalls.sort(reverse=True)
    return {
        "max_stall_ms": round(longest / 1e6, 3), "stalled": len(stalls),
        "stall_bound_ms": bound_ms, "stalls_by_call": by_call, "timed_works": timed,
        "timed_runs": nruns, "block_calls": calls, "timing_torn_bytes": torn,
        "wait_ms": ({"p50": round(_percentile(waits, 0.5) / 1e6, 3),
                     "p99": round(_percentile(waits, 0.99) / 1e6, 3),
                     "max": round(waits[-1] / 1e6, 3)} if waits else None),
        "worst_stalls": stalls[:20],
    }


def _signal_state(looks: list, begin: int, end: int) -> dict:
    """What the task's looks between ``begin`` and ``end`` saw of its signal
    state: how many looks, in how many NOTIFY_SIGNAL was set and a signal
    owed, and how many signals were sent and resent meanwhile."""
    from shm_taskwork.constants import TASK_NOTIFY_SIGNAL
    inside = [lk for lk in looks if begin <= lk[0] <= end]
    if not inside:
        return {"looks": 0}
    before = [lk for lk in looks if lk[0] < begin]
    first = before[-1] if before else inside[0]
    return {"looks": len(inside),
            "flag_set": sum(1 for lk in inside if lk[1] & TASK_NOTIFY_SIGNAL),
            "owed": sum(1 for lk in inside if lk[4] & 1),
            "most_pending": max(lk[4] >> 8 for lk in inside),
            "sent": inside[-1][3] - first[3], "resent": inside[-1][2] - first[2]}


def _at(blocks: list, t: int) -> str:
    """The blocking call the main thread was in at ``t`` ("none" if none)."""
    for enter, leave, call in reversed(blocks):
        if enter <= t:
            return call if t <= leave else "none"
    return "none"


def _overlapping(blocks: list, begin: int, end: int) -> tuple[str, int, int]:
    """The blocking call that overlaps [begin, end] most, with its entry and
    exit times (("none", 0, 0) if none does; exit 1 << 63: never left)."""
    best, found = 0, ("none", 0, 0)
    for enter, leave, call in blocks:
        if enter >= end:
            break
        ov = min(leave, end) - max(enter, begin)
        if ov > best:
            best, found = ov, (call, enter, leave)
    return found


class _ReapRecorder(logging.Handler):
    """Writes ``interrupted ID`` for every interrupted work a reaper of this
    process reports (one WARNING record with ``record.work`` per work)."""

    def __init__(self, ledger: Ledger):
        super().__init__(logging.WARNING)
        self.ledger = ledger
        self.foreign = 0

    def emit(self, record: logging.LogRecord) -> None:
        w = getattr(record, "work", None)
        if w is None:
            return
        wid = payload_id(w)
        if wid is None:
            self.foreign += 1
        else:
            self.ledger.put(INTERRUPTED, wid)


def record_interrupted(ledger: Ledger) -> _ReapRecorder:
    """Attach the ledger to the reap logger of this process. The records are
    not propagated: a run with many kills would flood stderr."""
    h = _ReapRecorder(ledger)
    lg = logging.getLogger(REAP_LOGGER)
    lg.addHandler(h)
    lg.propagate = False
    if lg.level == logging.NOTSET or lg.level > logging.WARNING:
        lg.setLevel(logging.WARNING)
    return h


class DeadLetterBook:
    """The controller's view of the dead-letter list, written to its ledger.

    Only the controller (retry, drop) and, with ``--serve``, a starting
    worker of the letter's name (``serve()`` adopts) take dead letters off the
    list, so the number of copies of each ID on the list only grows between
    two of its reads, unless one of those happened in between.
    ``observe(works)`` compares a fresh read with the counts it holds: a new
    copy is written ``orphaned`` or ``shutdown`` (its reason; ``interrupted``
    for a dead letter filed with that reason); a copy gone is written
    ``retried`` if ``retried_since`` says the controller retried since the
    last read, ``adopted`` if its target name is in ``adopting`` (a worker of
    that name was adopting since the last read), and is a problem otherwise
    (a dead letter vanished)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.held: collections.Counter = collections.Counter()   # orphaned/shutdown copies
        self.names: dict[int, str | None] = {}                   # id -> target name
        self.interrupted: collections.Counter = collections.Counter()
        self.problems: list[str] = []
        self.orphaned = 0           # orphaned records written
        self.shutdown = 0           # shutdown records written
        self.retried_records = 0    # retried records written
        self.adopted = 0            # adopted records written

    def observe(self, works, *, retried_since: bool = False,
                adopting: frozenset | set = frozenset()) -> None:
        now: collections.Counter = collections.Counter()
        inter: collections.Counter = collections.Counter()
        kinds: dict[int, int] = {}
        for w in works:
            wid = payload_id(w)
            reason = getattr(w, "reason", "orphaned")
            if wid is None:
                self._problem(f"dead letter {w!r} carries a foreign payload")
            elif reason in ("orphaned", "shutdown"):
                now[wid] += 1
                kinds[wid] = ORPHANED if reason == "orphaned" else SHUTDOWN
                self.names[wid] = getattr(w, "target_name", None)
            elif reason == "interrupted":
                inter[wid] += 1
            else:
                self._problem(f"dead letter {wid:#x} has reason {reason!r}")
        for wid, n in inter.items():
            for _ in range(n - self.interrupted[wid]):
                self.ledger.put(INTERRUPTED, wid)
        self.interrupted = inter
        for wid in set(now) | set(self.held):
            diff = now[wid] - self.held[wid]
            if diff > 0:
                kind = kinds[wid]
                for _ in range(diff):
                    self.ledger.put(kind, wid)
                if kind == SHUTDOWN:
                    self.shutdown += diff
                else:
                    self.orphaned += diff
            elif diff < 0:
                if retried_since:
                    for _ in range(-diff):
                        self.ledger.put(RETRIED, wid)
                    self.retried_records -= diff
                elif self.names.get(wid) in adopting:
                    for _ in range(-diff):
                        self.ledger.put(ADOPTED, wid)
                    self.adopted -= diff
                else:
                    self._problem(f"dead letter {wid:#x} (for {self.names.get(wid)!r}) "
                                  "vanished with no retry, drop or adoption")
            if not now[wid]:
                self.names.pop(wid, None)
        self.held = now

    def _problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)
        else:
            self.problems[-1] = "(more dead-letter problems)"

    @property
    def held_count(self) -> int:
        return sum(self.held.values()) + sum(self.interrupted.values())

    @property
    def adoptable_count(self) -> int:
        """Copies on the list that a worker of their name would adopt
        (``orphaned`` and ``shutdown``)."""
        return sum(self.held.values())


def ledger_files(directory: str) -> list[str]:
    return [os.path.join(directory, fn) for fn in sorted(os.listdir(directory))
            if fn.endswith(".ledger")]


def read_ledger(path: str) -> tuple[bytes, int]:
    """A ledger file's whole records, and its count of torn trailing bytes
    (none is expected: every record is one write)."""
    with open(path, "rb") as f:
        raw = f.read()
    whole = len(raw) - len(raw) % REC.size
    return raw[:whole], len(raw) - whole


_DENSE_SEQ = 1 << 26   # a sequence beyond this is judged from a dict (a forged id)


def account(directory: str) -> dict:
    """Judge every ID as the module docstring says. Returns the figures, the
    count of torn bytes, and under ``bad`` the offending IDs per category.

    Memory stays small on long runs: IDs are ``incarnation << 32 | sequence``
    with dense sequences, so each incarnation gets one byte per sequence and
    record kind (a count that saturates at 255)."""
    tables: dict[int, list[bytearray]] = {}
    odd: dict[int, list[int]] = {}
    by_mode = {name: 0 for name in MODES}
    torn = many = 0
    for path in ledger_files(directory):
        raw, t = read_ledger(path)
        torn += t
        for kind, aux, _inc, wid in REC.iter_unpack(raw):
            if not 0 < kind < NKINDS:
                continue
            if kind == ADDED:
                m = MODE_NAMES.get(aux & 0xFF, str(aux & 0xFF))
                by_mode[m] = by_mode.get(m, 0) + 1
                if aux & MANY_FLAG:
                    many += 1
            seq = wid & 0xFFFFFFFF
            if seq >= _DENSE_SEQ:
                odd.setdefault(wid, [0] * NKINDS)[kind] += 1
                continue
            tab = tables.get(wid >> 32)
            if tab is None:
                tab = tables[wid >> 32] = [bytearray() for _ in range(NKINDS)]
            a = tab[kind]
            if seq >= len(a):
                a.extend(bytes(seq + 1 - len(a) + 4096))
            if a[seq] < 255:
                a[seq] += 1
    out = dict(intended=0, added=0, add_failed=0, unconfirmed=0, ran=0, cancelled=0,
               orphaned=0, shutdown=0, retried=0, adopted=0, adopted_then_executed=0,
               interrupted=0, interrupted_reports=0,
               ran_and_interrupted=0, retried_then_executed=0, cancel_attempts=0,
               cancel_missed=0, cancel_unconfirmed=0, unconfirmed_executed=0,
               unconfirmed_orphaned=0, unconfirmed_cancelled=0, unconfirmed_nowhere=0,
               duplicated=0, lost=0, phantom=0)
    settled = {"executed": 0, "cancelled": 0, "orphaned": 0, "cancelled_by_killed_canceller": 0}
    bad: dict[str, list[int]] = {"lost": [], "duplicated": [], "phantom": []}

    def judge(wid: int, c) -> None:
        ran, inter, canc = c[RAN], c[INTERRUPTED], c[CANCELLED]
        # a copy filed (orphaned or shutdown) and a copy taken back (retried
        # by the controller, adopted by a worker) are judged alike
        orph, retr = c[ORPHANED] + c[SHUTDOWN], c[RETRIED] + c[ADOPTED]
        out["ran"] += ran
        out["interrupted"] += inter > 0
        out["interrupted_reports"] += inter
        out["cancelled"] += canc
        out["orphaned"] += c[ORPHANED]
        out["shutdown"] += c[SHUTDOWN]
        out["retried"] += c[RETRIED]
        out["adopted"] += c[ADOPTED]
        out["cancel_attempts"] += c[CANCEL_INTENT]
        out["cancel_missed"] += c[CANCEL_MISSED]
        cancel_open = c[CANCEL_INTENT] > c[CANCELLED] + c[CANCEL_MISSED]
        if cancel_open:
            out["cancel_unconfirmed"] += 1
        if ran and inter:
            out["ran_and_interrupted"] += 1
        executed = bool(ran or inter)
        on_list = orph - retr           # copies still on the dead-letter list
        outcomes = int(executed) + int(canc > 0) + int(on_list > 0)
        if c[INTENT_ADD]:
            out["intended"] += 1
        if c[ADDED]:
            out["added"] += 1
        if c[ADD_FAILED]:
            out["add_failed"] += 1
        dup = outcomes > 1 or ran > 1 or canc > 1 or on_list > 1 or on_list < 0
        if dup:
            out["duplicated"] += 1
            bad["duplicated"].append(wid)
        if (((outcomes or orph) and (c[ADD_FAILED] or not c[INTENT_ADD]))
                or canc > c[CANCEL_INTENT]):
            out["phantom"] += 1
            bad["phantom"].append(wid)
        if executed and retr and not dup:
            out["retried_then_executed"] += 1
            out["adopted_then_executed"] += c[ADOPTED] > 0
        if c[ADDED] and outcomes and not dup:
            settled["executed" if executed else "cancelled" if canc else "orphaned"] += 1
        elif c[ADDED] and not outcomes and not dup:
            if cancel_open and not retr:   # its canceller was killed inside cancel()
                settled["cancelled_by_killed_canceller"] += 1
            else:
                out["lost"] += 1
                bad["lost"].append(wid)
        if c[INTENT_ADD] and not c[ADDED] and not c[ADD_FAILED]:
            out["unconfirmed"] += 1
            key = ("unconfirmed_executed" if executed else "unconfirmed_cancelled" if canc
                   else "unconfirmed_orphaned" if on_list > 0 else "unconfirmed_nowhere")
            out[key] += 1
            if retr and not outcomes and not dup:
                # it was queued after all (it became a dead letter), was
                # retried, and then went nowhere
                out["lost"] += 1
                bad["lost"].append(wid)

    empty = (0,) * NKINDS
    for inc in sorted(tables):
        tab = tables[inc]
        n = max(len(a) for a in tab)
        for a in tab:
            a.extend(bytes(n - len(a)))
        base = inc << 32
        for seq, c in enumerate(zip(*tab)):
            if c != empty:
                judge(base | seq, c)
    for wid in sorted(odd):
        judge(wid, odd[wid])
    out["added_by_mode"] = by_mode
    out["added_with_add_many"] = many
    out["settled"] = settled
    out["torn_bytes"] = torn
    out["bad"] = bad
    return out


def retried_ids(directory: str) -> set[int]:
    """The IDs some ledger records as a retried dead letter."""
    out = set()
    for path in ledger_files(directory):
        raw, _ = read_ledger(path)
        out.update(wid for kind, _aux, _inc, wid in REC.iter_unpack(raw) if kind == RETRIED)
    return out


def describe(directory: str, wids: list[int]) -> list[str]:
    """Every record about each of ``wids``, one line per id."""
    want = {w: [] for w in wids}
    for path in ledger_files(directory):
        raw, _ = read_ledger(path)
        for kind, _aux, inc, wid in REC.iter_unpack(raw):
            if wid in want:
                want[wid].append(f"{KIND_NAMES.get(kind, kind)}@{inc}")
    return [f"{w:#x} (producer {w >> 32}, seq {w & 0xffffffff}): {', '.join(want[w]) or '-'}"
            for w in wids]


# ---- --track: every tracked work's outcome against the ledger -------------------

def track_files(directory: str) -> list[str]:
    return [os.path.join(directory, fn) for fn in sorted(os.listdir(directory))
            if fn.endswith(".tracked")]


class Chain:
    """What the domain says of one tracked stress ID: the work its add
    returned (``root``), that work's own final outcome (``first``), the work
    the chain is at now (``cur``, after ``hops`` dead-letter retries followed
    through ``retried_as``), its outcome (``outcome``: None while not read
    final, "dead_letter" while it may still be retried) and result."""

    __slots__ = ("root", "how", "first", "cur", "hops", "outcome", "result")

    def __init__(self, root: int, how: int = H_ADD):
        self.root, self.how, self.cur = root, how, root
        self.first: str | None = None
        self.hops = 0
        self.outcome: str | None = None
        self.result: bytes | None = None

    def __repr__(self) -> str:
        how = HOW_NAMES[self.how] if 0 <= self.how < len(HOW_NAMES) else str(self.how)
        later = (f", {self.hops} retr{'y' if self.hops == 1 else 'ies'} later {self.cur:#x}: "
                 f"{self.outcome}" if self.hops else "")
        return f"work {self.root:#x} ({how}): {self.first}{later}"


class OutcomeWatcher:
    """The controller's reader of tracked outcomes, while the run goes on.

    The core keeps outcome records in a ring of ``--outcomes`` entries and
    finds one by scanning it newest first (native/outcome.c), so a record
    must be read before that many newer tracked works settle, and a read
    costs more the older the record is. The watcher therefore follows each
    tracked work from its add: it tails the producers' ``.tracked`` files,
    reads each new work ``TRACK_LAG`` seconds after it saw it (most have
    settled by then), reads a pending or running one again with a backoff
    (at most ``BACKOFF_MAX``), and follows a dead letter's ``retried_as`` to
    the work it was queued again as. A dead letter not yet retried is read
    again every ``LETTERS_EVERY`` seconds while something may retry it
    (``--restart``, ``--serve``): a retry appends a new record for it, which
    that read finds near the top of the ring. A work whose record is gone
    before the watcher saw it final is ``unread`` (the watcher fell behind:
    a run fails on it, as the outcome was not checked).

    Its state is used by one thread at a time: its own (``loop``) during the
    run, the controller's main thread (``finish``) once that one was joined.
    A ``.tracked`` file is read only up to whole records: each is one
    write(2), and the file's size covers only what was written."""

    def __init__(self, dom, directory: str, retries: bool):
        self.dom = dom
        self.dir = directory
        self.retries = retries
        self.offsets: dict[str, int] = {}
        self.fresh: collections.deque = collections.deque()   # (due, id, work id)
        self.open: dict[int, list] = {}     # work id -> [id, due, backoff]
        self.letters: dict[int, int] = {}   # work id -> id: a dead letter not yet retried
        self.chains: dict[int, Chain] = {}  # id -> its chain
        self.unread: dict[int, int] = {}    # id -> the work id whose record was gone
        self.reads = 0
        self.next_letters = 0.0
        self.error: BaseException | None = None

    def _tail(self, now: float, lag: float) -> None:
        with os.scandir(self.dir) as it:
            grown = [e.path for e in it if e.name.endswith(".tracked")
                     and e.stat().st_size >= self.offsets.get(e.path, 0) + TRK.size]
        for path in sorted(grown):
            off = self.offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(off)
                raw = f.read()
            whole = len(raw) - len(raw) % TRK.size
            self.offsets[path] = off + whole
            for wid, value, kind, aux, _ in TRK.iter_unpack(raw[:whole]):
                if kind == T_TRACK and wid not in self.chains:
                    self.fresh.append((now + lag, wid, value))
                    self.chains[wid] = Chain(value, aux)

    def _look(self, work_id: int) -> tuple[str, bytes | None, int | None] | None:
        """(outcome, result, retried_as) of one work, or None if no record
        (reused). Domain.work() gives the handle; its outcome is then read."""
        from shm_taskwork import OutcomeUnknownError

        self.reads += 1
        try:
            w = self.dom.work(work_id)
            o = w.outcome
            if o in FINAL_OUTCOMES:
                return o, w.result, w.retried_as
            return o, None, None
        except OutcomeUnknownError:
            return None

    def _step(self, work_id: int, wid: int, now: float, final: bool) -> bool:
        """Read an open work; True if it left the open set."""
        ch = self.chains[wid]
        got = self._look(work_id)
        ent = self.open[work_id]
        if got is None:
            del self.open[work_id]
            self.unread[wid] = work_id
            ch.outcome = None
            return True
        o, result, again = got
        if o not in FINAL_OUTCOMES:
            ch.outcome = o if final else None
            ent[1] = now + ent[2]
            ent[2] = min(BACKOFF_MAX, ent[2] * 2)
            return False
        del self.open[work_id]
        if ch.hops == 0:
            ch.first = o
        ch.outcome, ch.result = o, result
        if again:
            self._hop(wid, again, now)
        elif o == "dead_letter":
            self.letters[work_id] = wid
        return True

    def _hop(self, wid: int, new: int, now: float) -> None:
        ch = self.chains[wid]
        ch.hops += 1
        ch.cur = new
        ch.outcome = ch.result = None
        self.open[new] = [wid, now, TRACK_EVERY]

    def _letters(self, now: float) -> None:
        for work_id, wid in list(self.letters.items()):
            got = self._look(work_id)
            # None: its filing record was reused, and no retry since the
            # last read appended one: it is still a letter
            if got is not None and got[2]:
                del self.letters[work_id]
                self._hop(wid, got[2], now)

    def pass_once(self, final: bool = False) -> None:
        now = time.monotonic()
        self._tail(now, 0.0 if final else TRACK_LAG)
        while self.fresh and (final or self.fresh[0][0] <= now):
            _due, wid, work_id = self.fresh.popleft()
            self.open[work_id] = [wid, now, TRACK_EVERY]
        for work_id, ent in list(self.open.items()):
            if final or ent[1] <= now:
                self._step(work_id, ent[0], now, final)
        if final or (self.retries and now >= self.next_letters):
            self._letters(now)
            self.next_letters = now + LETTERS_EVERY

    def loop(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(TRACK_EVERY):
                self.pass_once()
        except BaseException as exc:  # shown by the main thread
            self.error = exc

    def finish(self, rounds: int = 64) -> None:
        """After every process stopped and the dead letters were settled:
        read everything to its end (a retry found opens a new work to read)."""
        for _ in range(rounds):
            before = (len(self.open), len(self.letters), sum(c.hops for c in self.chains.values()))
            self.pass_once(final=True)
            if not self.open or (len(self.open), len(self.letters),
                                 sum(c.hops for c in self.chains.values())) == before:
                break


def _track_records(directory: str):
    for path in track_files(directory):
        with open(path, "rb") as f:
            raw = f.read()
        yield from TRK.iter_unpack(raw[:len(raw) - len(raw) % TRK.size])


def ledger_counts(directory: str, wids) -> dict[int, list[int]]:
    """Per ID of ``wids``, its count of ledger records of each kind."""
    want = set(wids)
    out: dict[int, list[int]] = {w: [0] * NKINDS for w in want}
    for path in ledger_files(directory):
        raw, _ = read_ledger(path)
        for kind, _aux, _inc, wid in REC.iter_unpack(raw):
            if wid in want and 0 < kind < NKINDS:
                out[wid][kind] += 1
    return out


def expected_outcome(c) -> tuple[tuple[str, ...], str]:
    """The final outcomes a tracked work may have given what its ledger says
    (``c``: its count of records per kind), and why."""
    ran, inter, canc = c[RAN], c[INTERRUPTED], c[CANCELLED]
    on_list = c[ORPHANED] + c[SHUTDOWN] - c[RETRIED] - c[ADOPTED]
    if canc:
        return ("cancelled",), "a cancel of it returned True"
    if ran and inter:
        # the callback returned, then its task died: before the runner
        # settled it (interrupted) or after (ran)
        return ("ran", "interrupted"), "ran, then its task died before freeing it"
    if ran:
        return ("ran",), "its callback ran"
    if inter:
        return ("interrupted",), "its task died in its callback"
    if on_list > 0:
        return ("dead_letter",), "a dead letter at the end"
    if c[CANCEL_INTENT] > c[CANCELLED] + c[CANCEL_MISSED]:
        # the node a killed canceller held is given back as cancelled
        # (native/outcome.c: "a reaper or the runner recovering a dead
        # canceller's node")
        return ("cancelled",), "its canceller was killed inside cancel()"
    return (), "the ledger has no outcome for it"


def check_outcomes(directory: str, chains: dict[int, Chain], unread: dict[int, int] | None = None,
                   *, retries: bool = True) -> dict:
    """Judge every tracked work's outcome against the ledger (the module
    docstring, "Tracked works"). ``chains``: what the domain said of each
    tracked ID (OutcomeWatcher.chains); ``retries``: whether the run retried
    or adopted dead letters at all. Returns counts, and under ``bad`` the
    mismatches as (id, text)."""
    unread = unread or {}
    waits: dict[int, list[tuple[int, int]]] = {}
    other: list[tuple[int, str]] = []
    how_count = {h: 0 for h in HOW_NAMES}
    w = dict(call=0, wait=0, timeouts=0, hung=0, max_late_ms=0.0)
    for wid, value, kind, aux, _ in _track_records(directory):
        if kind == T_TRACK:
            if 0 <= aux < len(HOW_NAMES):
                how_count[HOW_NAMES[aux]] += 1
        elif kind == T_WAITED:
            waits.setdefault(wid, []).append((aux, value))
            w["call" if aux & W_CALL else "wait"] += 1
            w["timeouts"] += bool(aux & W_TIMEOUT)
            w["max_late_ms"] = max(w["max_late_ms"], round(value / 1e6, 3))
            if aux & W_TIMEOUT and value < 0:
                other.append((wid, f"a waiter ({'call' if aux & W_CALL else 'wait'}) timed "
                                   f"out {-value / 1e6:.3f} ms before its timeout"))
            if value > WAIT_SLACK * 1e9:
                w["hung"] += 1
                other.append((wid, f"a waiter ({'call' if aux & W_CALL else 'wait'}) returned "
                                   f"{value / 1e9:.3f} s after its timeout"))
        elif kind == T_RESULT_BAD:
            other.append((wid, "call() returned other bytes than the callback"))
        elif kind == T_KEY_STALE:
            other.append((wid, f"add_keyed of a new key found it recorded (work {value:#x})"))
    counts = ledger_counts(directory, set(chains) | set(waits))
    by_outcome = {o: 0 for o in (*FINAL_OUTCOMES, "pending", "running", "unread")}
    own = {o: 0 for o in FINAL_OUTCOMES}    # each added work's own outcome
    bad: list[tuple[int, str]] = list(other)
    hops = 0
    for wid, ch in chains.items():
        c = counts[wid]
        if wid in unread:
            by_outcome["unread"] += 1
            continue
        o = ch.outcome or "pending"
        by_outcome[o] = by_outcome.get(o, 0) + 1
        if ch.first in own:
            own[ch.first] += 1
        hops += ch.hops
        want, why = expected_outcome(c)
        retr = c[RETRIED] + c[ADOPTED]
        problems = []
        if o not in want:
            problems.append(f"the ledger says {why} (so {' or '.join(want) or 'nothing'}), "
                            f"the domain says {o}")
        elif o == "ran" and ch.result != expected_result(wid):
            problems.append(f"ran, with result {ch.result!r} (its callback returned "
                            f"{expected_result(wid)!r})")
        # a letter retried and filed again between two reads of the list is
        # seen by neither read: more hops than retries is right, fewer is not
        if ch.hops < retr or (ch.hops and not retries):
            problems.append(f"retried {retr} time(s) by the ledger, {ch.hops} by retried_as")
        if ch.hops and ch.first != "dead_letter":
            problems.append(f"queued again, yet its own outcome is {ch.first}")
        for aux, _late in waits.get(wid, ()):
            seen = OUTCOME_NAMES.get(aux & 0xFF, str(aux & 0xFF))
            if not aux & W_TIMEOUT and seen != ch.first:
                problems.append(f"a waiter was told {seen}, its outcome is {ch.first}")
        if problems:
            bad.append((wid, f"{ch!r}: " + "; ".join(problems)))
    for wid, got in waits.items():
        if wid in chains:
            continue
        c = counts[wid]
        for aux, _late in got:
            # call() that returned: no work id was given back, the ledger
            # must show the run
            seen = OUTCOME_NAMES.get(aux & 0xFF, str(aux & 0xFF))
            if aux & W_CALL and not aux & W_TIMEOUT and seen == "ran" and not c[RAN]:
                bad.append((wid, "call() returned its result, the ledger has no run"))
    return {"tracked": len(chains), "tracked_by_how": how_count, "outcomes": by_outcome,
            "own_outcomes": own,
            "outcome_mismatches": len(bad), "outcome_unread": len(unread),
            "tracked_hops": hops, "waiters": w, "bad": bad}


# ---- child processes ------------------------------------------------------------

def _stop_requested(stop_file: str, parent: int) -> bool:
    # A controller that vanished (SIGKILL) must not leave children running.
    return os.path.exists(stop_file) or os.getppid() != parent


def role_task(a) -> int:
    from shm_taskwork import Domain, TaskWorkError, callback

    if a.serve:
        # SIGTERM waits, blocked, until serve() takes it (serve() unblocks its
        # stop signals once its handler is in place): a stop that comes while
        # the worker is still registering starts the drain instead of
        # killing the process (README "Workers in production").
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ledger = Ledger(a.ledger, a.incarnation)
    record_interrupted(ledger)
    timing = Timing(a.timing, a.incarnation) if a.blocking else None
    seen = [0]

    @callback(name=CALLBACK)
    def record(work):
        start = time.monotonic_ns()
        p = work.payload
        wid = struct.unpack_from("<Q", p)[0]
        seen[0] += 1
        if a.inject == "lose" and seen[0] == 10:
            return                                  # test-only: a work vanishes
        if a.work_ms:
            time.sleep(a.work_ms / 1000)            # a callback with something to do
        ledger.put(RAN, wid)
        if a.inject == "duplicate" and seen[0] == 10:
            ledger.put(RAN, wid)                    # test-only: a work runs twice
        if timing is not None:
            added = struct.unpack_from("<Q", p, 8)[0] if len(p) == 16 else 0
            timing.put(T_RUN, 0, wid, added, start, time.monotonic_ns())
        if a.track:
            return expected_result(wid)     # a tracked work's result (call(), Work.result)
        return None

    dom = Domain.open(a.domain)
    # Only a task that asks for it takes SIGTERM: the others die of it.
    opts = {"exit_signals": (signal.SIGTERM,)} if a.graceful else {}
    deadline = time.monotonic() + 30
    while True:
        if _stop_requested(a.stop, a.parent):
            dom.close()
            return 0
        try:
            task = dom.register(name=a.name or f"stress-t{a.incarnation}", **opts)
            break
        except TaskWorkError as exc:
            # All slots taken by killed tasks nobody has reaped yet.
            if exc.errno != errno.ENOSPC or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if a.blocking:
        block_round(a, dom, task, timing)
        task.exit()
        dom.close()
        return 0
    if a.serve:
        serve_worker(a, task)
        dom.close()
        return 0
    next_run = time.monotonic() + 0.2
    while not _stop_requested(a.stop, a.parent):
        task.wait(timeout=0.02)
        now = time.monotonic()
        if now >= next_run:
            task.run()       # TWA_NONE works: no notification ever comes
            next_run = now + 0.2
    task.exit()
    dom.close()
    return 0


def serve_worker(a, task) -> None:
    """A ``--serve`` task: ``task.serve()`` until a SIGTERM (the controller's,
    or its own once the stop is requested), draining for at most
    ``--drain-timeout`` seconds. A sweeper (``--sweep``) owes itself the
    SIGTERM before it serves: it adopts its name's letters, runs all of them
    (no drain deadline) and returns."""
    adopt = a.inject != "no-adopt"    # test-only: letters left for a name stay
    if a.sweep:
        os.kill(os.getpid(), signal.SIGTERM)   # pending: SIGTERM is blocked
        task.serve(drain_timeout=None, adopt=adopt)
        return
    done = threading.Event()

    def watch() -> None:
        # A thread with every signal blocked: the SIGTERM it sends is
        # process-directed and reaches the main thread, in serve().
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not done.wait(0.05):
            if _stop_requested(a.stop, a.parent):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="stress-stop-watch", daemon=True)
    watcher.start()
    try:
        task.serve(drain_timeout=a.drain_timeout, adopt=adopt)
    finally:
        # serve() has given SIGTERM back: a late one must not kill the
        # process on its way out (its works are all run or filed already).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        done.set()
        watcher.join(timeout=5)


class _BlockHelper(threading.Thread):
    """The thread that ends a blocking task's calls: one line to the readline
    or read pipe when the call's time is up (``arm``), and, once the stop is
    requested, a line to every pipe and the held lock released. It blocks
    every signal: the notifications must reach the main thread."""

    def __init__(self, a, pipes: list[int], lock: threading.Lock, look=None):
        super().__init__(name="stress-block-helper", daemon=True)
        self.a = a
        self.look = look     # called every WAKE_POLL: records the signal state
        self.pipes = pipes
        self.lock = lock
        self.cond = threading.Condition()
        self.armed: tuple[int, float] | None = None   # (write fd, monotonic deadline)
        self.stopping = threading.Event()

    def arm(self, fd: int, seconds: float) -> None:
        # ``armed`` is read and written only under ``cond``: at most one line
        # is owed, to the call the main thread is about to make, and that
        # call consumes exactly it (a readline or read of the only line).
        with self.cond:
            self.armed = (fd, time.monotonic() + seconds)
            self.cond.notify()

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        next_look = 0.0
        with self.cond:
            while not _stop_requested(self.a.stop, self.a.parent):
                now = time.monotonic()
                if self.armed is not None and now >= self.armed[1]:
                    os.write(self.armed[0], b"\n")
                    self.armed = None
                    continue
                if self.look is not None and now >= next_look:
                    self.look()
                    next_look = now + WAKE_POLL
                until = now + WAKE_POLL
                if self.armed is not None:
                    until = min(until, self.armed[1])
                self.cond.wait(until - now)
        # The end: every pipe becomes readable, the lock free. ``stopping`` is
        # set before those wake-ups, so the call they end is the main
        # thread's last (its loop tests ``stopping`` right after each call).
        self.stopping.set()
        for fd in self.pipes:
            os.write(fd, b"\n")
        try:
            self.lock.release()
        except RuntimeError:    # the main thread took it already
            pass


def block_round(a, dom, task, timing: Timing) -> None:
    """The main thread of a ``--blocking`` task: blocking calls in turn (from
    a random one on), each recorded, until the stop. Every TWA_SIGNAL work
    runs from the SIGUSR1 handler, inside or between these calls."""
    rl_r, rl_w = os.pipe()
    rd_r, rd_w = os.pipe()
    sel_r, sel_w = os.pipe()     # written only at the end
    line = os.fdopen(rl_r, "r")
    lock = threading.Lock()
    lock.acquire()

    def look() -> None:
        # Only reads: never reaps, never waits on the list lock.
        for t in dom.tasks(task.name, reap=False, lock_timeout=0):
            if t.id == task.id and t.generation == task.gen:
                timing.put(T_LOOK, t.flags, t.signals_resent, t.signals_sent,
                           time.monotonic_ns(), int(t.signal_owed) | (min(t.pending, 0xFFFF) << 8))
    helper = _BlockHelper(a, [rl_w, rd_w, sel_w], lock, look)
    helper.start()
    names = a.block_in.split(",")
    codes = [BLOCK_CALLS.index(n) for n in names]
    k = random.Random(a.child_seed).randrange(len(names))
    secs = a.block_for
    try:
        while not helper.stopping.is_set() and not _stop_requested(a.stop, a.parent):
            call = names[k % len(names)]
            code = codes[k % len(names)]
            k += 1
            enter = time.monotonic_ns()
            # entered (a SIGKILL inside the call leaves this one, with no end)
            timing.put(T_BLOCK, code, 0, 0, enter, 0)
            if call == "readline":
                helper.arm(rl_w, secs)
                line.readline()
            elif call == "read":
                helper.arm(rd_w, secs)
                os.read(rd_r, 64)
            elif call == "select":
                select.select([sel_r], [], [], secs)
            elif call == "sleep":
                time.sleep(secs)
            elif call == "lock":
                lock.acquire(timeout=secs)
            else:
                task.wait(timeout=secs)
            timing.put(T_BLOCK, code, 0, 0, enter, time.monotonic_ns())
    finally:
        helper.join(timeout=10)
        line.close()
        for fd in (rl_w, rd_r, rd_w, sel_r, sel_w):
            os.close(fd)


def role_producer(a) -> int:
    from shm_taskwork import Domain, NoSuchTaskError, PoolExhaustedError, TaskExitedError
    from shm_taskwork.errors import KeyBusyError

    ledger = Ledger(a.ledger, a.incarnation)
    record_interrupted(ledger)
    track = TrackFile(a.ledger[:-len(".ledger")] + ".tracked") if a.track else None
    # --track: a token bucket of tracked adds (--track-rate, this producer's
    # share; 0: every add); the others are added as without --track
    tokens, last_fill = 16.0, time.monotonic()
    next_wait = time.monotonic() + WAIT_EVERY
    rng = random.Random(a.child_seed)
    modes = [MODES[m] for m in a.modes.split(",")]
    dom = Domain.open(a.domain)
    names: list[str] = []    # names of the running tasks (a snapshot)
    backlog: dict[str, int] = {}   # name -> its backlog at the snapshot, plus our adds
    handles: dict = {}       # name -> the live task dom.task(name=...) gave
    mine: list = []          # (task, work, id) of own recent adds
    refresh = 0.0
    seq = 0
    ops = 0
    base = a.incarnation << 32
    while True:
        ops += 1
        if ops % 32 == 0 and _stop_requested(a.stop, a.parent):
            break
        now = time.monotonic()
        if now >= refresh or not names:
            # dom.tasks() also reaps the dead tasks it comes across; with
            # slow callbacks a task whose backlog (pending + running, this
            # producer's adds since counted) is full gets nothing new
            infos = [i for i in dom.tasks() if i.state == "running"]
            backlog = {i.name: i.pending + i.running for i in infos}
            names = sorted(backlog)
            refresh = now + (0.02 if a.work_ms else 0.1)
            if not names:
                if _stop_requested(a.stop, a.parent):
                    break
                time.sleep(0.005)
                continue
        name = names[rng.randrange(len(names))]
        if a.work_ms and backlog.get(name, 0) >= BACKLOG_CAP:
            names.remove(name)
            continue
        t = handles.get(name)
        if t is None:
            try:
                t = handles[name] = dom.task(name=name)
            except NoSuchTaskError:     # died (and was reaped) since the snapshot
                names.remove(name)
                continue
        mode = modes[rng.randrange(len(modes))]
        n = rng.randint(2, 8) if rng.random() < MANY_SHARE else 1
        tracked = waited = False
        if track is not None:
            if a.track_rate:
                tokens = min(16.0, tokens + (now - last_fill) * a.track_rate)
                last_fill = now
            tracked = not a.track_rate or tokens >= n
            if tracked and a.track_rate:
                tokens -= n
            if tracked and now >= next_wait:
                # a waiter: call() or add + Work.wait(), with a short timeout
                n, waited = 1, True
                next_wait = now + rng.expovariate(1 / WAIT_EVERY)
        wids = [base | (seq + i) for i in range(n)]
        seq += n
        aux = mode | (MANY_FLAG if n > 1 else 0)
        for wid in wids:
            ledger.put(INTENT_ADD, wid, aux)
        if a.blocking:      # the ID and the add time (CLOCK_MONOTONIC ns)
            now_ns = time.monotonic_ns()
            payloads = [struct.pack("<QQ", w, now_ns) for w in wids]
        else:
            payloads = [struct.pack("<Q", w) for w in wids]
        if waited and rng.random() < 0.5:
            ok = call_one(t, wids[0], payloads[0], mode, rng, ledger, track)
            if not ok:
                handles.pop(name, None)
            continue
        how = H_ADD
        try:
            if n > 1:
                how = H_MANY
                works = t.add_many(CALLBACK, payloads, notify=mode, track=tracked)
            elif tracked and not waited and rng.random() < KEYED_SHARE:
                how = H_KEYED
                rec = t.add_keyed(CALLBACK, payloads[0], notify=mode, track=True,
                                  key=payloads[0])
                if not rec.fresh:           # a new key is never recorded before
                    track.put(T_KEY_STALE, wids[0], rec.work_id)
                works = [rec]
            else:
                works = [t.add(CALLBACK, payloads[0], notify=mode, track=tracked)]
        except (TaskExitedError, PoolExhaustedError, KeyBusyError) as exc:
            for wid in wids:
                ledger.put(ADD_FAILED, wid, aux)
            if isinstance(exc, TaskExitedError):
                handles.pop(name, None)   # the next add asks for a live task of the name
            else:
                time.sleep(0.002)
            continue
        backlog[name] = backlog.get(name, 0) + n
        for wid, w in zip(wids, works):
            if tracked:     # before ``added``: every confirmed tracked add has its work id
                track.put(T_TRACK, wid, w.work_id if how == H_KEYED else w.id,
                          H_WAIT if waited else how)
            ledger.put(ADDED, wid, aux)
            if how != H_KEYED:          # a key record is no handle to cancel
                mine.append((t, w, wid))
        if waited:
            timeout = rng.uniform(*WAIT_TIMEOUTS)
            t0 = time.monotonic()
            try:
                got, flags = works[0].wait(timeout), 0
            except TimeoutError:
                got, flags = works[0].outcome, W_TIMEOUT
            late = time.monotonic() - t0 - timeout
            track.put(T_WAITED, wids[0], int(late * 1e9),
                      OUTCOME_CODES.get(got, 0xFF) | flags)
        if len(mine) > 64:
            del mine[:32]
        if mine and rng.random() < a.cancel_rate:
            k = len(mine) - 1 if rng.random() < 0.5 else rng.randrange(len(mine))
            ct, cw, cid = mine.pop(k)
            ledger.put(CANCEL_INTENT, cid)
            try:
                ok = ct.cancel(cw)
            except TaskExitedError:       # its task is gone: nothing was cancelled
                ok = False
            ledger.put(CANCELLED if ok else CANCEL_MISSED, cid)
    dom.close()
    return 0


def call_one(t, wid: int, payload: bytes, mode: int, rng, ledger: Ledger,
             track: TrackFile) -> bool:
    """--track: one ``task.call()`` with a short timeout, written down as an add
    and a cancel (call() cancels a work that has not started at its
    deadline): ``intent-add`` and ``cancel-intent`` before it, and after it
    the outcome it gave. False if the task had exited."""
    from shm_taskwork import (CallbackFailedError, PoolExhaustedError, TaskExitedError,
                              WorkLostError)
    from shm_taskwork.errors import KeyBusyError

    aux = mode
    ledger.put(CANCEL_INTENT, wid)
    timeout = rng.uniform(*WAIT_TIMEOUTS)
    t0 = time.monotonic()
    work = None
    flags = W_CALL
    try:
        result = t.call(CALLBACK, payload, timeout=timeout, notify=mode)
        got = "ran"
        if result != expected_result(wid):
            track.put(T_RESULT_BAD, wid)
    except TimeoutError as exc:
        work = exc.work
        got, flags = work.outcome, W_CALL | W_TIMEOUT
    except (CallbackFailedError, WorkLostError) as exc:
        work = exc.work
        got = "failed" if isinstance(exc, CallbackFailedError) else exc.outcome
    except (TaskExitedError, PoolExhaustedError, KeyBusyError):
        ledger.put(ADD_FAILED, wid, aux)
        ledger.put(CANCEL_MISSED, wid)
        return False
    late = time.monotonic() - t0 - timeout
    if work is not None:
        track.put(T_TRACK, wid, work.id, H_CALL)
    ledger.put(ADDED, wid, aux)
    cancelled = work is not None and work.state == "cancelled"
    ledger.put(CANCELLED if cancelled else CANCEL_MISSED, wid)
    track.put(T_WAITED, wid, int(late * 1e9), OUTCOME_CODES.get(got, 0xFF) | flags)
    return True


class Child:
    __slots__ = ("role", "inc", "proc", "killpoint", "killed_by_us", "err_path", "started",
                 "name", "graceful", "sweeper", "ended")

    def __init__(self, role, inc, proc, killpoint, err_path, name=None, graceful=False,
                 sweeper=False):
        self.role, self.inc, self.proc, self.killpoint = role, inc, proc, killpoint
        self.killed_by_us = False
        self.err_path = err_path
        self.started = time.monotonic()
        self.name = name
        self.graceful = graceful
        self.sweeper = sweeper
        self.ended: float | None = None    # when the controller saw it exit


def status_name(rc: int) -> str:
    """An exit status as the summary shows it: "0", "1", "SIGKILL"."""
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return str(rc)


class NotifyListener:
    """The controller's end of systemd's notification protocol (sd_notify),
    for ``--serve``: every task process gets ``NOTIFY_SOCKET`` naming this
    datagram socket, as under a ``Type=notify`` unit, and ``serve()`` sends
    ``READY=1`` once registered and adopted (its ``STATUS=`` says how many
    letters it adopted), ``STOPPING=1`` when its drain begins and a last
    ``STATUS=`` with the works it left as shutdown letters. A thread reads
    the socket all the time (a full queue would block the senders), and
    ``SO_PASSCRED`` gives each datagram its sender's pid. The socket is an
    abstract one (``@name``): no path length limit, no file to remove."""

    ADOPTED = re.compile(r"adopted (\d+)")
    LEFT = re.compile(r"(\d+) left as shutdown")

    def __init__(self, name: str):
        self.path = "@" + name            # as NOTIFY_SOCKET spells an abstract socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.lock = threading.Lock()
        # pid -> {"ready": monotonic time READY=1 came, "adopted": n,
        #         "stopping": time, "shutdown": n}; written by the thread
        #         under ``lock``, read under it
        self.by_pid: dict[int, dict] = {}
        self.unknown = 0          # datagrams with no sender credentials
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="stress-notify", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            while True:
                try:
                    data, anc, _flags, _addr = self.sock.recvmsg(
                        4096, socket.CMSG_SPACE(struct.calcsize("iII")), socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                pid = None
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                        pid = struct.unpack_from("i", cdata)[0]
                self._note(pid, data.decode(errors="replace"), time.monotonic())

    def _note(self, pid: int | None, text: str, when: float) -> None:
        if pid is None:
            self.unknown += 1
            return
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        status = fields.get("STATUS", "")
        with self.lock:
            d = self.by_pid.setdefault(pid, {})
            if fields.get("READY") == "1":
                d["ready"] = when
                m = self.ADOPTED.search(status)
                d["adopted"] = int(m.group(1)) if m else 0
            if fields.get("STOPPING") == "1":
                d["stopping"] = when
            m = self.LEFT.search(status)
            if m:
                d["shutdown"] = int(m.group(1))

    def get(self, pid: int) -> dict:
        with self.lock:
            return dict(self.by_pid.get(pid, {}))

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.close()


# ---- the controller -------------------------------------------------------------

def _modes(text: str) -> str:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"invalid mode(s) {', '.join(map(repr, bad)) or '(none given)'}: "
            f"choose from {', '.join(MODES)} (comma-separated)")
    return ",".join(dict.fromkeys(names))


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return v


def _rate(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{v} is not a probability: use 0..1")
    return v


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Many processes adding, cancelling, running and being killed (SIGKILL, "
                    "SIGTERM) and replaced; a ledger checks that every work ran once, was "
                    "cancelled once or ended a dead letter once, and that no pool node "
                    "leaked. Exit 0 only if so.")
    p.add_argument("--tasks", type=positive_int, default=4, help="task processes (default 4)")
    p.add_argument("--producers", type=positive_int, default=4,
                   help="producer processes (default 4)")
    p.add_argument("--seconds", type=_nonneg_float, default=10.0,
                   help="how long to add, cancel and kill (default 10)")
    p.add_argument("--kill-every", type=_nonneg_float, default=0.0, metavar="SECONDS",
                   help="SIGKILL a random task or producer this often and start a "
                        "replacement (default 0: no kills)")
    p.add_argument("--cancel-rate", type=_rate, default=0.1, metavar="R",
                   help="after an add, the chance that a producer cancels one of its own "
                        "recent works (0..1, default 0.1)")
    p.add_argument("--modes", type=_modes, default=None, metavar="LIST",
                   help=f"notify modes to add with, comma-separated from {', '.join(MODES)} "
                        "(default: all four; with --blocking only signal)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every random choice (default: random; printed in the summary)")
    p.add_argument("--json", action="store_true",
                   help="print only the JSON summary (it is always the last line)")
    p.add_argument("--domain", default=None, metavar="NAME",
                   help="create the domain under this name (default: a private unique name); "
                        "kept if the run fails")
    p.add_argument("--pool-size", type=positive_int, default=65536,
                   help="work pool of the domain (default 65536)")
    p.add_argument("--killpoints", action=argparse.BooleanOptionalAction, default=None,
                   help="also make some started processes SIGKILL themselves at a native "
                        "kill point (default: on when --kill-every > 0)")
    p.add_argument("--term", action="store_true",
                   help="make half of the kills a SIGTERM to a task; about half of the tasks "
                        "register with exit_signals=(SIGTERM,) (their works run before they "
                        "die), the others die of it (their works become dead letters); with "
                        "--serve a SIGTERM goes to a serving worker every 0.5 s, or as half of "
                        "the --kill-every kills")
    p.add_argument("--restart", action="store_true",
                   help="replace a dead task by a process of the same name and retry the "
                        "orphaned dead letters to it (default: a new name per process, dead "
                        "letters stay until the end)")
    p.add_argument("--fsck", action=argparse.BooleanOptionalAction, default=True,
                   help="run fsck --repair every 0.1 s beside everything (default); with "
                        "--no-fsck none runs: reaping alone must keep the domain whole")
    p.add_argument("--blocking", action="store_true",
                   help="tasks sit in blocking system calls (readline, read, select, sleep, "
                        "lock, wait) while producers add TWA_SIGNAL works run by the SIGUSR1 "
                        "handler; also measure stalls (works queued, none run) and fail on "
                        "any longer than --stall-bound")
    p.add_argument("--block-in", type=_block_calls, default=None, metavar="LIST",
                   help=f"--blocking: the calls to go round, comma-separated from "
                        f"{', '.join(BLOCK_CALLS)} (default: all)")
    p.add_argument("--block-for", type=_nonneg_float, default=None, metavar="SECONDS",
                   help=f"--blocking: how long each blocking call lasts (default {BLOCK_FOR}; "
                        "more than --stall-bound)")
    p.add_argument("--stall-bound", type=_nonneg_float, default=None, metavar="MS",
                   help=f"--blocking: the longest stall allowed, in ms (default "
                        f"{STALL_BOUND_MS:g})")
    p.add_argument("--serve", action="store_true",
                   help="each task process is a task.serve() worker: a SIGTERM (--term, and "
                        "the stop at the end) makes it drain for --drain-timeout seconds, file "
                        "what is left as shutdown dead letters and exit 0; a worker that "
                        "starts adopts its name's orphaned and shutdown letters")
    p.add_argument("--drain-timeout", type=_nonneg_float, default=None, metavar="SECONDS",
                   help=f"--serve: serve()'s drain deadline (default {SERVE_DRAIN:g})")
    p.add_argument("--work-ms", type=_nonneg_float, default=None, metavar="MS",
                   help=f"how long each callback takes (default 0; with --serve "
                        f"{SERVE_WORK_MS:g}, so that a stop finds a queue longer than the "
                        f"drain); producers then skip a task with {BACKLOG_CAP} works queued")
    p.add_argument("--track", action="store_true",
                   help="add tracked works (track=True, add_many, add_keyed, call(), "
                        "Work.wait() with short timeouts) and check every tracked work's "
                        "outcome (Domain.work) against the ledger; a mismatch fails the run")
    p.add_argument("--track-rate", type=_nonneg_float, default=None, metavar="N",
                   help=f"--track: tracked works per second, all producers together (default "
                        f"{TRACK_RATE:g}; 0: every add); the other adds are untracked")
    p.add_argument("--outcomes", type=positive_int, default=None, metavar="N",
                   help=f"--track: outcome records of the stress domain (default "
                        f"{TRACK_OUTCOMES}); a record must be read before N newer tracked "
                        "works settle")
    # test-only: prove that the checker can fail
    p.add_argument("--inject", choices=("lose", "duplicate", "leak", "no-adopt"), default=None,
                   help=argparse.SUPPRESS)
    # internal: the child roles
    p.add_argument("--role", choices=("task", "producer"), help=argparse.SUPPRESS)
    p.add_argument("--ledger", help=argparse.SUPPRESS)
    p.add_argument("--stop", help=argparse.SUPPRESS)
    p.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--incarnation", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--graceful", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timing", help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    return p


def _block_calls(text: str) -> str:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in BLOCK_CALLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"invalid call(s) {', '.join(map(repr, bad)) or '(none given)'}: "
            f"choose from {', '.join(BLOCK_CALLS)} (comma-separated)")
    return ",".join(dict.fromkeys(names))


def resolve_blocking(p: argparse.ArgumentParser, a) -> None:
    """Fill the defaults that depend on --blocking, and refuse what does not
    combine with it (p.error: one line, exit status 2)."""
    given = [f for f, v in (("--block-in", a.block_in), ("--block-for", a.block_for),
                            ("--stall-bound", a.stall_bound)) if v is not None]
    if not a.blocking:
        if given:
            p.error(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} "
                    "with --blocking")
        if a.modes is None:
            a.modes = ",".join(MODES)
        return
    if a.modes is None:
        a.modes = "signal"
    elif a.modes != "signal":
        p.error(f"--blocking adds TWA_SIGNAL works only: use --modes signal (got {a.modes})")
    if a.term:
        p.error("--blocking does not combine with --term: the exit signal's handler is "
                "deferred the same way, outside the stall bound")
    a.block_in = a.block_in or ",".join(BLOCK_CALLS)
    a.block_for = BLOCK_FOR if a.block_for is None else a.block_for
    a.stall_bound = STALL_BOUND_MS if a.stall_bound is None else a.stall_bound
    if a.stall_bound <= 0:
        p.error(f"--stall-bound must be > 0 ms (got {a.stall_bound:g})")
    if a.block_for * 1000 <= a.stall_bound:
        p.error(f"--block-for must be longer than --stall-bound ({a.block_for:g} s <= "
                f"{a.stall_bound:g} ms): a shorter call ends any stall before the bound")


def resolve_track(p: argparse.ArgumentParser, a) -> None:
    """Fill --track's defaults; --track-rate and --outcomes need it."""
    if not a.track:
        given = [f for f, v in (("--track-rate", a.track_rate), ("--outcomes", a.outcomes))
                 if v is not None]
        if given:
            p.error(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} "
                    "with --track")
        return
    a.track_rate = TRACK_RATE if a.track_rate is None else a.track_rate
    a.outcomes = TRACK_OUTCOMES if a.outcomes is None else a.outcomes


def resolve_serve(p: argparse.ArgumentParser, a) -> None:
    """Fill --drain-timeout's default and refuse what does not combine with
    --serve (p.error: one line, exit status 2)."""
    if a.work_ms is None:
        a.work_ms = SERVE_WORK_MS if a.serve and a.role is None else 0.0
    if not a.serve:
        if a.drain_timeout is not None and a.role is None:
            p.error("--drain-timeout only applies with --serve")
        return
    if a.blocking:
        p.error("--serve does not combine with --blocking: a serve() worker waits in "
                "serve(), not in the blocking calls --blocking measures")
    if a.drain_timeout is None and not a.sweep:
        a.drain_timeout = SERVE_DRAIN


class Controller:
    def __init__(self, a, out):
        self.a = a
        self.out = out
        self.rng = random.Random(a.seed)
        self.children: list[Child] = []
        self.inc = 0
        self.killed = 0
        self.sigkills_sent = 0
        self.terminated = 0
        self.sigterms_sent = 0
        self.terminated_graceful = 0
        self.killed_by = {"task": 0, "producer": 0}
        self.killpoint_deaths: dict[str, int] = {}
        self.crashed: list[str] = []
        self.noisy: list[str] = []
        self.t0_ns = 0
        self.hung = 0
        self.started = {"task": 0, "producer": 0}
        self.restarted = 0
        self.fsck_runs = 0
        self.fsck_problems: list[str] = []
        self.fsck_orphaned = 0
        self.fsck_interrupted = 0
        self.fsck_leaked = 0
        self.fsck_settled = 0
        self.fsck_incomplete = 0
        self.fsck_error: BaseException | None = None
        self.retried = 0
        self.retry_calls = 0
        self.dom = None
        self.watcher: OutcomeWatcher | None = None
        self.tmp = tempfile.mkdtemp(prefix="shm-taskwork-stress-")
        self.stop_producers = os.path.join(self.tmp, "stop-producers")
        self.stop_tasks = os.path.join(self.tmp, "stop-tasks")
        self.stop_sweepers = os.path.join(self.tmp, "stop-sweepers")   # never made
        # --serve: the workers' sd_notify datagrams; the task processes that
        # were (or may still be) adopting, for the book; exit statuses
        self.notify = (NotifyListener(f"shm-taskwork-stress-{os.getpid()}-{uuid.uuid4().hex[:10]}")
                       if a.serve else None)
        self.windows: list[Child] = []
        self.last_observe = 0.0
        self.task_exits: collections.Counter = collections.Counter()
        self.sigterm_exits: collections.Counter = collections.Counter()
        self.sweepers = 0
        self.shutdown_reported = 0
        self.adopted_reported = 0
        self.ready = 0
        self.ledger = Ledger(os.path.join(self.tmp, "controller.ledger"), 0)
        self.book = DeadLetterBook(self.ledger)
        self.reaps = record_interrupted(self.ledger)
        # the directory holding the package (the repository, or site-packages)
        root = os.path.dirname(os.path.dirname(os.path.abspath(shm_taskwork.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("SHM_TASKWORK_KILLPOINT", None)
        self.env = env

    # -- children --

    def spawn(self, role: str, name: str | None = None, sweeper: bool = False) -> Child:
        self.inc += 1
        inc = self.inc
        env = self.env
        kp = None
        if self.a.killpoints and not sweeper and self.rng.random() < KILLPOINT_SHARE:
            points = TASK_KILLPOINTS if role == "task" else PRODUCER_KILLPOINTS
            if role == "producer" and self.a.track:
                points = {**points, **TRACK_KILLPOINTS}     # keyed adds: --track only
            point = self.rng.choice(sorted(points))
            count = self.rng.randint(1, points[point])
            kp = f"{point}:{count}"
            env = dict(env, SHM_TASKWORK_KILLPOINT=kp)
        graceful = (role == "task" and self.a.term and not self.a.serve
                    and self.rng.random() < GRACEFUL_SHARE)
        if role == "task" and name is None:
            name = f"stress-t{inc}"
        err_path = os.path.join(self.tmp, f"{role}-{inc}.err")
        cmd = [sys.executable, "-m", "shm_taskwork.tools.stress", "--role", role,
               "--domain", self.dom.name,
               "--ledger", os.path.join(self.tmp, f"{role}-{inc}.ledger"),
               "--stop", (self.stop_producers if role == "producer" else
                          self.stop_sweepers if sweeper else self.stop_tasks),
               "--parent", str(os.getpid()), "--incarnation", str(inc),
               "--child-seed", str(self.a.seed * 1000003 + inc), "--modes", self.a.modes,
               "--cancel-rate", repr(self.a.cancel_rate), "--work-ms", repr(self.a.work_ms)]
        if name is not None:
            cmd += ["--name", name]
        if graceful:
            cmd += ["--graceful"]
        if self.a.serve and role == "task":
            cmd += ["--serve"]
            cmd += ["--sweep"] if sweeper else ["--drain-timeout", repr(self.a.drain_timeout)]
            env = dict(env, NOTIFY_SOCKET=self.notify.path)
        if self.a.blocking:
            cmd += ["--blocking"]
            if role == "task":
                cmd += ["--block-in", self.a.block_in, "--block-for", repr(self.a.block_for),
                        "--timing", os.path.join(self.tmp, f"{role}-{inc}.timing")]
        if self.a.track:
            cmd += ["--track"]
            if role == "producer":
                cmd += ["--track-rate", repr(self.a.track_rate / self.a.producers)]
        if self.a.inject in ("lose", "duplicate", "no-adopt"):
            cmd += ["--inject", self.a.inject]
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        c = Child(role, inc, proc, kp, err_path, name, graceful, sweeper)
        self.children.append(c)
        self.started[role] += 1
        if self.a.serve and role == "task":
            self.windows.append(c)
        return c

    def _tail(self, c: Child) -> str:
        try:
            with open(c.err_path, "rb") as f:
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-8:])

    def _judge_exit(self, c: Child) -> None:
        rc = c.proc.returncode
        c.ended = time.monotonic()
        if c.role == "task":
            self.task_exits[status_name(rc)] += 1
            if self.notify is not None:
                note = self.notify.get(c.proc.pid)
                self.ready += "ready" in note
                self.adopted_reported += note.get("adopted", 0)
                self.shutdown_reported += note.get("shutdown", 0)
        if c.role == "task" and self.a.serve and rc == -signal.SIGTERM and not c.killed_by_us:
            self.crashed.append(f"task {c.inc} (pid {c.proc.pid}, a serve() worker) died of "
                                f"SIGTERM: serve() must drain and return, exit 0: "
                                f"{self._tail(c)}")
            return
        if c.killed_by_us or rc in (0, -signal.SIGKILL):
            # Not a crash, yet something on stderr: the library logged an
            # error (a signal handler that could not run the list, a
            # notification not sent, ...). A serve() worker's warning that
            # it kept works as shutdown letters is what --serve provokes.
            tail = "\n".join(line for line in self._tail(c).splitlines()
                             if "kept as shutdown dead letters" not in line)
            if tail:
                how = "exited" if rc == 0 else f"died of {signal.Signals(-rc).name}" \
                    if rc < 0 else f"exited with {rc}"
                self.noisy.append(f"{c.role} {c.inc} (pid {c.proc.pid}, {how}) wrote to "
                                  f"stderr: {tail}")
        if c.killed_by_us:
            return
        if rc == -signal.SIGKILL:
            self.killed += 1
            self.killed_by[c.role] += 1
            point = (c.killpoint or "unknown:").split(":")[0]
            self.killpoint_deaths[point] = self.killpoint_deaths.get(point, 0) + 1
        elif rc != 0:
            self.crashed.append(f"{c.role} {c.inc} (pid {c.proc.pid}) exited with {rc}: "
                                f"{self._tail(c)}")

    def reap(self, replace: bool) -> None:
        gone = [c for c in self.children if c.proc.poll() is not None]
        for c in gone:
            self.children.remove(c)
            self._judge_exit(c)
        if self.a.serve and any(c.role == "task" for c in gone):
            # The letters a dead worker left (shutdown letters it filed,
            # orphaned ones its reaping files now) are on the list before a
            # worker of its name can adopt them: the book sees every one.
            self.observe()
        if replace:
            for c in gone:
                same = c.role == "task" and self.a.restart
                self.spawn(c.role, c.name if same else None)
                self.restarted += same

    def kill_one(self, term_only: bool = False) -> None:
        live = [c for c in self.children if c.proc.poll() is None]
        if not live:
            return
        sig = signal.SIGKILL
        if self.a.term and (term_only or self.rng.random() < TERM_SHARE):
            tasks = [c for c in live if c.role == "task"]
            if self.notify is not None:
                # a serve() worker takes SIGTERM once serve() runs: before
                # that (the interpreter starting) SIGTERM's default action
                # applies, as for any program
                tasks = [c for c in tasks if "ready" in self.notify.get(c.proc.pid)]
            if tasks:
                live, sig = tasks, signal.SIGTERM
            elif term_only:
                return
        c = self.rng.choice(live)
        if self.a.serve:
            # what the victim adopted leaves the list in the book's view
            # before the victim can file it again
            self.observe()
        try:
            c.proc.send_signal(sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGTERM:
            self.sigterms_sent += 1
        try:
            # a task with exit_signals (or serve()) first runs what it has queued
            c.proc.wait(timeout=10 if sig == signal.SIGKILL else 30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a D-state process, a hang
            self.hung += 1
            self.crashed.append(f"{c.role} {c.inc} (pid {c.proc.pid}) did not die of "
                                f"{signal.Signals(sig).name}: {self._tail(c)}")
            c.proc.kill()
            c.killed_by_us = True
            c.proc.wait(timeout=10)
            return
        if sig == signal.SIGTERM:
            self.sigterm_exits[status_name(c.proc.returncode)] += 1
        if sig == signal.SIGTERM and self.a.serve and c.proc.returncode == 0:
            c.killed_by_us = True      # drained and returned: a clean stop
            self.terminated += 1
        elif c.proc.returncode == -sig and not (self.a.serve and sig == signal.SIGTERM):
            c.killed_by_us = True
            if sig == signal.SIGKILL:
                self.killed_by[c.role] += 1
                self.killed += 1
                self.sigkills_sent += 1
            else:
                self.terminated += 1
                self.terminated_graceful += c.graceful
        # else it had exited on its own just before (or a task with
        # exit_signals did not end with SIGTERM's status): reap() judges it

    def stop_role(self, role: str, stop_file: str, timeout: float) -> None:
        with open(stop_file, "w"):
            pass
        deadline = time.monotonic() + timeout
        for c in [c for c in self.children if c.role == role]:
            self._reap_by(c, role, deadline, timeout)

    def _reap_by(self, c, what: str, deadline: float, timeout: float) -> None:
        """Wait for child c until deadline; one that has not stopped by then
        is hung: killed and counted. Then it is judged and forgotten."""
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.hung += 1
            self.crashed.append(f"{what} {c.inc} (pid {c.proc.pid}) did not stop within "
                                f"{timeout:.0f}s: {self._tail(c)}")
            c.proc.kill()
            c.killed_by_us = True
            c.proc.wait(timeout=10)
        self.children.remove(c)
        self._judge_exit(c)

    def kill_all(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                try:
                    c.proc.kill()
                except ProcessLookupError:
                    pass
        for c in self.children:
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        self.children.clear()
        # A Ctrl-C can land between Popen() and the append to self.children:
        # sweep this process's real children too, so none outlives us.
        import psutil
        strays = psutil.Process().children()
        for p in strays:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(strays, timeout=10)

    # -- dead letters --

    def dead_letter_pass(self, retry: bool) -> None:
        """Read the dead letters into the book; with ``retry``, re-queue the
        orphaned ones to every name that has a running task, and read again
        to see which copies left the list. ``dom.tasks()`` reaps the dead
        tasks it comes across."""
        from shm_taskwork import NoSuchTaskError, TaskExitedError

        live = {i.name for i in self.dom.tasks() if i.state == "running"}
        dls = self.observe()
        if not retry:
            return
        names = sorted({w.target_name for w in dls if getattr(w, "reason", None) == "orphaned"}
                       & live)
        if not names:
            return
        for name in names:
            try:
                n = self.dom.retry_dead_letters(to=name, reason="orphaned")
            except (NoSuchTaskError, TaskExitedError):
                continue        # the name's task died since the snapshot
            self.retry_calls += 1
            self.retried += n
        self.book.observe(self.dom.dead_letters(), retried_since=True)

    def observe(self) -> list:
        """Read the dead letters into the book. With --serve, a copy gone
        since the last read was adopted if a worker of its name was adopting
        in the meantime: started before this read ended, and not READY (nor
        dead) before the last read began."""
        begun = time.monotonic()
        dls = self.dom.dead_letters()
        since = self.last_observe
        adopting = set()
        keep = []
        for c in self.windows:
            end = c.ended
            if self.notify is not None:
                ready = self.notify.get(c.proc.pid).get("ready")
                if ready is not None and (end is None or ready < end):
                    end = ready
            if end is None or end >= since:
                adopting.add(c.name)
                keep.append(c)
        self.windows = keep          # a window closed before this read stays closed
        self.book.observe(dls, adopting=adopting)
        self.last_observe = begun
        return dls

    def await_ready(self, timeout: float) -> None:
        """--serve, before the stop at the end: every task process has said
        READY (it has adopted) or died, and the book has read the list since,
        so that what a worker adopted and files again at its stop counts as
        two moves. A worker that never says READY in time is hung."""
        deadline = time.monotonic() + timeout
        waiting = [c for c in self.children if c.role == "task"]
        while waiting:
            waiting = [c for c in waiting if c.proc.poll() is None
                       and "ready" not in self.notify.get(c.proc.pid)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                for c in waiting:
                    self.hung += 1
                    self.crashed.append(f"task {c.inc} (pid {c.proc.pid}) did not say READY "
                                        f"within {timeout:.0f}s: {self._tail(c)}")
                break
            time.sleep(0.01)     # the listener thread notes READY as it comes
        self.reap(replace=False)
        self.observe()

    def sweep(self) -> None:
        """--serve, at the end: the letters still filed for a name (shutdown
        letters of the last stop, orphaned ones filed late) are adopted by
        SWEEPERS_PER_NAME workers of that name started together (each letter
        must go to exactly one), which serve with no drain deadline and stop
        at once: they run all of them and exit 0."""
        names = sorted({w.target_name for w in self.dom.dead_letters()
                        if w.reason in ("orphaned", "shutdown") and w.target_name})
        per = max(1, (self.max_tasks // 2) // SWEEPERS_PER_NAME)
        for i in range(0, len(names), per):
            kids = [self.spawn("task", n, sweeper=True) for n in names[i:i + per]
                    for _ in range(SWEEPERS_PER_NAME)]
            self.sweepers += len(kids)
            deadline = time.monotonic() + 60
            for c in kids:
                self._reap_by(c, "sweeper", deadline, 60)
            self.observe()

    # -- fsck --

    def fsck_once(self) -> None:
        # Orphaned works are filed as dead letters, which the book reads;
        # interrupted ones are written here (the judge counts an id once).
        rep = self.dom.fsck(repair=True)
        self.fsck_runs += 1
        for w in rep.interrupted_works:
            wid = payload_id(w)
            if wid is not None:
                self.ledger.put(INTERRUPTED, wid)
            else:
                self.fsck_problems.append(f"work {w.id:#x} has a {len(w.payload)}-byte payload")
        self.fsck_orphaned += rep.orphaned
        self.fsck_interrupted += rep.interrupted
        self.fsck_leaked += rep.leaked
        self.fsck_settled += rep.settled
        self.fsck_incomplete += len(rep.incomplete)
        for prob in rep.problems:
            if len(self.fsck_problems) < 50:
                self.fsck_problems.append(prob)

    def fsck_loop(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(FSCK_EVERY):
                self.fsck_once()
        except BaseException as exc:  # shown by the main thread
            self.fsck_error = exc

    # -- the run --

    def run(self) -> dict:
        from shm_taskwork import Domain, callback

        a = self.a
        name = a.domain or f"/tw_stress_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        max_tasks = self.max_tasks = max(16, 4 * a.tasks)
        extra = {"outcomes": a.outcomes} if a.track else {}
        self.dom = Domain.create(name, max_tasks=max_tasks, pool_size=a.pool_size,
                                 payload_size=16 if a.blocking else 8,
                                 max_procs=min(65536, 4 * (a.tasks + a.producers)
                                               + 4 * max_tasks + 64), **extra)

        @callback(name=CALLBACK)
        def record(work):  # the controller registers the callback, as a task would
            self.ledger.put(RAN, struct.unpack_from("<Q", work.payload)[0])

        for k in range(a.tasks):
            self.spawn("task", f"stress-t{k}" if a.restart else None)
        for _ in range(a.producers):
            self.spawn("producer")
        stop_fsck = threading.Event()
        fsck_thread = None
        if a.fsck:
            fsck_thread = threading.Thread(target=self.fsck_loop, args=(stop_fsck,),
                                           name="stress-fsck", daemon=True)
            fsck_thread.start()
        watch_thread = None
        if a.track:
            self.watcher = OutcomeWatcher(self.dom, self.tmp, retries=a.restart or a.serve)
            watch_thread = threading.Thread(target=self.watcher.loop, args=(stop_fsck,),
                                            name="stress-outcomes", daemon=True)
            watch_thread.start()
        progress = _Progress(a.seconds) if sys.stderr.isatty() else None
        t0 = time.monotonic()
        self.t0_ns = int(t0 * 1e9)
        end = t0 + a.seconds
        every = a.kill_every
        if every == 0 and a.serve and a.term:
            every = SERVE_TERM_EVERY       # SIGTERMs alone
        next_kill = t0 + every if every > 0 else float("inf")
        # --serve: workers adopt; the controller only reads the list
        next_dl = t0 + DEAD_LETTERS_EVERY if a.restart or a.serve else float("inf")
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                self.reap(replace=True)
                if now >= next_kill:
                    self.kill_one(term_only=a.kill_every == 0)
                    self.reap(replace=True)
                    next_kill = max(next_kill + every, time.monotonic())
                if now >= next_dl:
                    self.dead_letter_pass(retry=not a.serve)
                    next_dl = time.monotonic() + DEAD_LETTERS_EVERY
                if self.fsck_error is not None:
                    raise self.fsck_error
                if progress:
                    progress.update(now - t0, self)
                time.sleep(max(0.0, min(next_kill, next_dl, end, time.monotonic() + 0.01)
                               - time.monotonic()))
            seconds = time.monotonic() - t0
            # Producers first (each finishes the operation in hand); then, with
            # --restart, the dead letters go to the live tasks once more; then
            # the tasks: exit() runs everything still queued.
            self.reap(replace=False)
            self.stop_role("producer", self.stop_producers, 30)
            if a.restart and not a.serve:
                self.dead_letter_pass(retry=True)
            if a.serve:
                self.await_ready(30)
            self.stop_role("task", self.stop_tasks, 60)
        finally:
            stop_fsck.set()
            if fsck_thread is not None:
                fsck_thread.join(timeout=30)
            if watch_thread is not None:
                watch_thread.join(timeout=30)
            if progress:
                progress.close()
        if fsck_thread is not None and fsck_thread.is_alive():
            raise RuntimeError("the fsck thread did not stop within 30 s")
        if self.fsck_error is not None:
            raise self.fsck_error
        if watch_thread is not None and watch_thread.is_alive():
            raise RuntimeError("the outcome watcher did not stop within 30 s")
        if self.watcher is not None and self.watcher.error is not None:
            raise self.watcher.error
        if a.fsck:
            # Whatever killed processes still held.
            self.fsck_once()
            self.fsck_once()
        if a.serve:
            self.observe()
            self.sweep()
        # What is left on the dead-letter list is each work's final outcome.
        self.dead_letter_pass(retry=False)
        dead_letters = self.book.held_count
        unadopted = self.book.adoptable_count
        dropped = self.dom.drop_dead_letters()
        if dropped != dead_letters or self.dom.dead_letters():
            self.book.problems.append(f"{dead_letters} dead letter(s) read at the end, "
                                      f"{dropped} dropped, {len(self.dom.dead_letters())} left")
        if a.inject == "leak":
            # test-only: a work queued on a live task (the controller) that
            # never runs before the pool is counted
            me = self.dom.register("stress-leak", install_handler=False)
            me.add(CALLBACK, struct.pack("<Q", 0), notify=0)
        # Nothing may be left for an operator: a dry fsck finds nothing.
        final = self.dom.fsck(repair=False)
        stats = self.dom.stats()
        acc = account(self.tmp)
        if self.watcher is not None:
            # Every process is gone and every letter settled: each tracked
            # work's chain is read to its end and judged.
            self.watcher.finish()
            acc["track"] = check_outcomes(self.tmp, self.watcher.chains, self.watcher.unread,
                                          retries=a.restart or a.serve)
            acc["track"]["outcome_reads"] = self.watcher.reads
        if a.blocking:
            # A retried dead letter was queued on its new task at the retry,
            # not at its add: its wait there is not measured.
            # (Only --restart retries.)
            acc["stalls"] = measure_stalls(self.tmp, a.stall_bound,
                                           retried_ids(self.tmp) if a.restart else set())
        acc.update(leaked=stats.pool_size - stats.pool_free, killed=self.killed,
                   seconds=round(seconds, 3), rate=round(acc["added"] / seconds, 1) if seconds else 0.0,
                   dead_letters=dead_letters, unadopted=unadopted,
                   final_fsck={"clean": final.clean, "dead_tasks": len(final.dead_tasks),
                               "dead_processes": len(final.dead_processes),
                               "orphaned": final.orphaned, "interrupted": final.interrupted,
                               "leaked": final.leaked, "settled": final.settled,
                               "incomplete": len(final.incomplete),
                               "problems": final.problems[:10]})
        return acc

    def cleanup(self, keep_domain: bool) -> None:
        self.kill_all()
        if self.notify is not None:
            self.notify.close()
        if self.dom is not None:
            self.dom.close()
            if not keep_domain:
                self.dom.unlink()
        try:
            self.ledger.close()
        except OSError:
            pass
        logging.getLogger(REAP_LOGGER).removeHandler(self.reaps)
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Progress:
    """A rich progress bar on stderr (when rich is importable)."""

    def __init__(self, seconds: float):
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            self.p = None
            return
        self.p = Progress(TextColumn("stress"), BarColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), transient=True)
        self.p.start()
        self.t = self.p.add_task("stress", total=max(seconds, 0.001), info="")

    def update(self, elapsed: float, ctl: Controller) -> None:
        if self.p is None:
            return
        live = sum(1 for c in ctl.children if c.proc.returncode is None)
        self.p.update(self.t, completed=elapsed,
                      info=f"{ctl.killed} killed, {live} processes, {ctl.fsck_runs} fsck, "
                           f"{ctl.fsck_orphaned} orphaned")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def main(argv=None, prog: str = "shm-taskwork stress", command: str = "stress") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bridge" in argv:          # the Redis bridge's stress (docs/contract.md "Beyond one host: the bridge")
        from shm_taskwork.tools import bridge_stress
        return bridge_stress.main(argv, prog, command)
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    resolve_blocking(parser, a)
    resolve_serve(parser, a)
    resolve_track(parser, a)
    if a.role == "task":
        return role_task(a)
    if a.role == "producer":
        return role_producer(a)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    if a.killpoints is None:
        a.killpoints = a.kill_every > 0
    ctl = Controller(a, sys.stdout)
    ok = False
    try:
        acc = ctl.run()
        bad = acc.pop("bad")
        summary = {
            "added": acc["added"], "ran": acc["ran"], "cancelled": acc["cancelled"],
            "orphaned": acc["orphaned"], "interrupted": acc["interrupted"],
            "duplicated": acc["duplicated"], "lost": acc["lost"], "leaked": acc["leaked"],
            "killed": acc["killed"], "seconds": acc["seconds"], "rate": acc["rate"],
            "phantom": acc["phantom"], "crashed": len(ctl.crashed), "hung": ctl.hung,
            "intended": acc["intended"], "add_failed": acc["add_failed"],
            "unconfirmed": acc["unconfirmed"],
            "unconfirmed_outcome": {k[len("unconfirmed_"):]: acc[k] for k in
                                    ("unconfirmed_executed", "unconfirmed_cancelled",
                                     "unconfirmed_orphaned", "unconfirmed_nowhere")},
            "settled": acc["settled"],
            "ran_and_interrupted": acc["ran_and_interrupted"],
            "cancel_attempts": acc["cancel_attempts"], "cancel_missed": acc["cancel_missed"],
            "cancel_unconfirmed": acc["cancel_unconfirmed"],
            "added_by_mode": acc["added_by_mode"],
            "added_with_add_many": acc["added_with_add_many"],
            "terminated": ctl.terminated, "terminated_graceful": ctl.terminated_graceful,
            "terminated_abrupt": ctl.terminated - ctl.terminated_graceful,
            "sigterms_sent": ctl.sigterms_sent,
            "retried": ctl.retried, "retried_then_executed": acc["retried_then_executed"],
            "restarted": ctl.restarted, "interrupted_reports": acc["interrupted_reports"],
            "final_fsck": acc["final_fsck"],
            "dead_letter_problems": len(ctl.book.problems),
            "children_with_stderr": len(ctl.noisy),
            "sigkills_sent": ctl.sigkills_sent, "killed_by_role": ctl.killed_by, "killpoint_deaths": ctl.killpoint_deaths,
            "started": ctl.started, "fsck_runs": ctl.fsck_runs,
            "fsck_leaked": ctl.fsck_leaked, "fsck_settled": ctl.fsck_settled,
            "fsck_incomplete": ctl.fsck_incomplete, "fsck_problems": len(ctl.fsck_problems),
            "dead_letters": acc["dead_letters"], "torn_bytes": acc["torn_bytes"],
            "tasks": a.tasks, "producers": a.producers, "kill_every": a.kill_every,
            "cancel_rate": a.cancel_rate, "modes": a.modes.split(","),
            "killpoints": a.killpoints, "pool_size": a.pool_size, "seed": a.seed,
            "term": a.term, "restart": a.restart, "fsck": a.fsck,
            "blocking": a.blocking,
            "serve": a.serve, "drain_timeout": a.drain_timeout, "work_ms": a.work_ms,
            "shutdown_letters": acc["shutdown"], "shutdown_reported": ctl.shutdown_reported,
            "adopted": acc["adopted"], "adopted_reported": ctl.adopted_reported,
            "adopted_then_executed": acc["adopted_then_executed"],
            "unadopted": acc["unadopted"] if a.serve else None,
            "sweepers": ctl.sweepers, "workers_ready": ctl.ready,
            "task_exits": dict(ctl.task_exits), "sigterm_exits": dict(ctl.sigterm_exits),
            # a SIGTERMed serve() worker exits 0 (or dies at a kill point)
            "sigterm_unclean": (sum(n for k, n in ctl.sigterm_exits.items()
                                    if k not in ("0", "SIGKILL")) if a.serve else 0),
        }
        tr = acc.get("track")
        tbad: list = []
        if tr is not None:
            tbad = tr.pop("bad")
            summary.update(tr, outcomes_kept=a.outcomes, track_rate=a.track_rate)
        else:
            summary.update(tracked=None, outcome_mismatches=None, outcome_unread=None)
        summary["track"] = a.track
        st = acc.get("stalls")
        worst = []
        if st is not None:
            worst = st.pop("worst_stalls")
            summary.update(st, block_in=a.block_in.split(","), block_for=a.block_for)
        else:
            summary.update(max_stall_ms=None, stalled=None, stall_bound_ms=None)
        failed = [k for k in ("lost", "duplicated", "leaked", "phantom", "crashed", "hung",
                              "dead_letter_problems", "stalled", "unadopted",
                              "sigterm_unclean", "outcome_mismatches", "outcome_unread")
                  if summary[k]]
        if not summary["final_fsck"]["clean"]:
            failed.append("final_fsck")
        summary["ok"] = ok = not failed
        if not a.json:
            _print_human(summary)
        print(json.dumps(summary), flush=True)
        if failed:
            for k in ("lost", "duplicated", "phantom"):
                if bad[k]:
                    print(f"{prog}: {len(bad[k])} {k} work(s); the first {min(20, len(bad[k]))}:",
                          file=sys.stderr)
                    for line in describe(ctl.tmp, bad[k][:20]):
                        print(f"  {line}", file=sys.stderr)
            if tbad:
                print(f"{prog}: {len(tbad)} tracked work(s) whose outcome contradicts the "
                      f"ledger; the first {min(20, len(tbad))}:", file=sys.stderr)
                recs = dict(zip([w for w, _ in tbad[:20]],
                                describe(ctl.tmp, [w for w, _ in tbad[:20]])))
                for wid, text in tbad[:20]:
                    print(f"  {text}\n    ledger: {recs[wid]}", file=sys.stderr)
            if summary["outcome_unread"]:
                print(f"{prog}: {summary['outcome_unread']} tracked work(s) whose outcome "
                      f"record was reused before it was read: raise --outcomes "
                      f"({a.outcomes}) or lower --track-rate ({a.track_rate:g})",
                      file=sys.stderr)
            if summary["leaked"]:
                print(f"{prog}: {summary['leaked']} pool node(s) not free after the drain "
                      "(and the dead letters dropped)", file=sys.stderr)
            if summary["unadopted"]:
                print(f"{prog}: {summary['unadopted']} orphaned or shutdown dead letter(s) "
                      "left at the end: no worker of their name adopted them", file=sys.stderr)
            if summary["sigterm_unclean"]:
                print(f"{prog}: {summary['sigterm_unclean']} serve() worker(s) did not exit 0 "
                      f"after a SIGTERM: {summary['sigterm_exits']}", file=sys.stderr)
            for line in ctl.crashed[:20]:
                print(f"{prog}: {line}", file=sys.stderr)
            for line in ctl.noisy[:10]:
                print(f"{prog}: {line}", file=sys.stderr)
            for line in ctl.book.problems[:20]:
                print(f"{prog}: dead letters: {line}", file=sys.stderr)
            if worst:
                print(f"{prog}: {summary['stalled']} stall(s) longer than "
                      f"{a.stall_bound:g} ms (works queued, none run); the longest "
                      f"{len(worst)}:", file=sys.stderr)
                for ms, inc, begin, end, (call, enter, leave), last, sig in worst:
                    where = call
                    if call != "none":
                        left = (f"left at {(leave - ctl.t0_ns) / 1e9:.3f} s" if leave < 1 << 63
                                else "never left")
                        where += f" (entered at {(enter - ctl.t0_ns) / 1e9:.3f} s, {left})"
                    print(f"  task {inc}: {ms:.1f} ms, from {(begin - ctl.t0_ns) / 1e9:.3f} s "
                          f"into the run, in {where}; ended in {last}", file=sys.stderr)
                    if sig["looks"]:
                        print(f"    its {sig['looks']} look(s) meanwhile: NOTIFY_SIGNAL set in "
                              f"{sig['flag_set']}, a signal owed in {sig['owed']}; signals "
                              f"sent {sig['sent']}, resent {sig['resent']}; at most "
                              f"{sig['most_pending']} work(s) pending", file=sys.stderr)
            if "final_fsck" in failed:
                print(f"{prog}: the final dry fsck is not clean: {summary['final_fsck']}",
                      file=sys.stderr)
        for prob in ctl.fsck_problems[:10]:
            print(f"{prog}: fsck problem: {prob}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        ctl.cleanup(keep_domain=bool(a.domain) and not ok)


def _print_human(s: dict) -> None:
    print(f"stress: {s['tasks']} tasks, {s['producers']} producers, {s['seconds']} s, "
          f"kill every {s['kill_every']} s, modes {','.join(s['modes'])}, seed {s['seed']}")
    print(f"  added {s['added']} ({s['rate']}/s), ran {s['ran']}, cancelled {s['cancelled']}, "
          f"orphaned {s['orphaned']}, interrupted {s['interrupted']}")
    print(f"  killed {s['killed']} (tasks {s['killed_by_role']['task']}, producers "
          f"{s['killed_by_role']['producer']}; at kill points {sum(s['killpoint_deaths'].values())})"
          f", fsck runs {s['fsck_runs']}, unconfirmed adds {s['unconfirmed']}")
    print(f"  terminated {s['terminated']} ({s['terminated_graceful']} with exit_signals), "
          f"restarted {s['restarted']}, retried {s['retried']}, dead letters at the end "
          f"{s['dead_letters']}, final dry fsck {'clean' if s['final_fsck']['clean'] else 'NOT clean'}")
    if s["serve"]:
        ex = ", ".join(f"{k} {v}" for k, v in sorted(s["task_exits"].items())) or "none"
        tx = ", ".join(f"{k} {v}" for k, v in sorted(s["sigterm_exits"].items())) or "none"
        print(f"  serve (drain {s['drain_timeout']:g} s): shutdown letters {s['shutdown_letters']} "
              f"(workers said {s['shutdown_reported']}), adopted {s['adopted']} (workers said "
              f"{s['adopted_reported']}), then run {s['adopted_then_executed']}, unadopted "
              f"{s['unadopted']}, sweepers {s['sweepers']}")
        print(f"  worker exits: {ex}; after a SIGTERM mid-run: {tx}")
    if s["blocking"]:
        w = s["wait_ms"] or {"p50": "-", "p99": "-", "max": "-"}
        print(f"  blocking in {','.join(s['block_in'])} ({s['block_for']} s each): "
              f"{sum(s['block_calls'].values())} calls, {s['timed_works']} works timed, wait "
              f"p50 {w['p50']} ms, p99 {w['p99']} ms, max {w['max']} ms; longest stall "
              f"{s['max_stall_ms']} ms, {s['stalled']} over {s['stall_bound_ms']:g} ms")
    if s["track"]:
        o = s["outcomes"]
        wt = s["waiters"]
        by_how = ", ".join(f"{k} {v}" for k, v in s["tracked_by_how"].items())
        print(f"  tracked {s['tracked']} ({by_how}"
              f"): {', '.join(f'{k} {v}' for k, v in o.items() if v)}; retried_as followed "
              f"{s['tracked_hops']}; waiters: call {wt['call']}, wait {wt['wait']}, timed out "
              f"{wt['timeouts']}, latest {wt['max_late_ms']} ms past the timeout; mismatches "
              f"{s['outcome_mismatches']}, unread {s['outcome_unread']}")
    print(f"  lost {s['lost']}, duplicated {s['duplicated']}, leaked {s['leaked']}, "
          f"phantom {s['phantom']}, crashed {s['crashed']}, hung {s['hung']}"
          f"{', stalled ' + str(s['stalled']) if s['blocking'] else ''}"
          f"{', unadopted ' + str(s['unadopted']) if s['serve'] else ''}: "
          f"{'OK' if s['ok'] else 'FAILED'}")


if __name__ == "__main__":
    if "--role" in sys.argv:
        sys.exit(main())       # a child: a traceback is the evidence of a crash
    from shm_taskwork.cli import main as cli_main
    sys.exit(cli_main(["stress", *sys.argv[1:]]))
