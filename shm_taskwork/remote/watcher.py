"""The bridge's watcher: the local outcome of each work a bridge queued,
recorded in Redis (docs/contract.md "Beyond one host: the bridge").

The bridge adds every claimed work with ``track=True``, so the domain records
its outcome (docs/contract.md "A work's outcome"). Its read loop never waits
for one: after it has recorded a work ``queued`` (the RECORD script, which
also puts the work in the node's ``watch`` hash), it hands ``(work id, local
id)`` to this watcher, a thread of its own with its own domain handle and its
own Redis connection, and goes back to reading.

Design, for many works in flight at once:

- **Wait on one, read many.** The watcher sleeps on the futex of its oldest
  watched work (``Work.wait`` with a short timeout: at most ``SLICE_MAX``,
  less while works keep settling), so a settle wakes it at once; then it
  reads the outcome of the works it watches without waiting
  (``Work.outcome``, one read of the domain each). Works mostly settle in the
  order they were queued, so the oldest is the best one to sleep on; a work
  that settles out of order is seen at the latest one slice later.
- **Bounded passes.** One pass reads the ``HEAD`` oldest works and a window
  of the others that rotates from pass to pass, ``BUDGET`` reads at most, so
  thousands of works in flight cost a pass no more than that.
- **Batched records.** Every final outcome a pass found goes to Redis in one
  call of the FINISH script (``FLUSH_MAX`` works at most per call): never a
  round trip per work, none per poll.
- **Deaths.** ``Work.wait`` reaps the oldest work's task if its process died,
  and each pass (every ``REAP_EVERY`` seconds at most) checks the tasks of
  the works still pending or running: a task killed in a callback settles its
  work ``interrupted`` (``dead_letter`` for works it had not started).

What is recorded: ``ran`` with ``result`` (the hex of the bytes the callback
returned, at most the domain's payload_size; none if it returned anything
else), ``failed`` with ``error`` ("Type: message"), ``cancelled``,
``dead_letter``, ``interrupted``; each with ``node`` and ``local_id``.

Exactly one final state per work, across crashes. FINISH replaces the
work's state only if it is this node's ``queued``, and drops the work from
the ``watch`` hash in the same script: a repeat (a restarted bridge, or the
watcher after a cancel that already recorded ``cancelled``) changes nothing.
A bridge killed at any point has each queued work either still in its
``claimed`` hash (not queued yet: the resume queues it) or in its ``watch``
hash; a restarted bridge reads the ``watch`` hash, finds each work's local id
in the domain's key table (never in Redis: a record there names nothing by
itself) and watches it again, and ``Domain.work(local id)`` gives its outcome,
settled or not. If the outcome record is gone (more than ``outcomes`` newer
tracked works settled while no bridge watched it, or it was queued untracked)
or the key table no longer holds the work, the outcome is ``unknown`` with a
``reason`` that says which: the bridge does not guess.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from . import sender as remote
from .scripts import FINISH, entry_error, reply_or_error

SLICE_MAX = 0.05      # longest sleep on the oldest work before a pass (s)
SLICE_MIN = 0.001     # the sleep while works keep settling (s)
HEAD = 64             # the oldest works, read every pass
BUDGET = 512          # reads per pass at most (HEAD + a rotating window)
FLUSH_MAX = 256       # final records per FINISH call
REAP_EVERY = 0.25     # seconds between checks of the watched works' tasks
RETRY_PAUSE = 0.5     # seconds before a pass retries after a Redis error


class Watcher:
    """Learns the local outcome of the works a bridge queued and records it
    in Redis. ``add`` is called by the bridge's read loop (any thread);
    everything else runs in the watcher's own thread."""

    def __init__(self, domain: str, url: str, keys: remote.Keys, node: str, keep: int,
                 log: Callable[[str], None], killpoint: Callable[[str], None]):
        from shm_taskwork import Domain
        import redis
        self.redis_mod = redis
        self.dom = Domain.open(domain)   # its own handle: nothing shared with the read loop
        self.r = remote.connect(url)
        self.finish = self.r.register_script(FINISH)
        self.keys, self.node, self.keep = keys, node, int(keep)
        self.log, self.killpoint = log, killpoint
        self.works: dict[str, tuple[int, Any]] = {}     # id -> (local id, Work); oldest first
        self.ready: list[tuple[str, dict]] = []         # final records not yet in Redis
        self.stats = {"ran": 0, "failed": 0, "cancelled": 0, "dead_letter": 0,
                      "interrupted": 0, "unknown": 0}
        self._inbox: list[tuple[str, int | None, str | None]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._cursor = 0
        self._slice = SLICE_MAX
        self._last_reap = 0.0
        self.thread = threading.Thread(target=self._main, name="bridge-watcher", daemon=True)

    # ---- the read loop's side ---------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def add(self, items) -> None:
        """Watch these ``(work id, local id)`` pairs; a local id None, with a
        reason, is recorded ``unknown`` at once: ``(id, None, reason)``."""
        items = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        if not items:
            return
        with self._cv:
            self._inbox.extend(items)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """One last pass (no wait), its records flushed, then the thread ends;
        what is still in flight stays in the watch hash for the next start."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.dom.close()
            self.r.close()

    # ---- the watcher's thread -------------------------------------------------

    def _main(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except self.redis_mod.ConnectionError as exc:
                # the read loop meets the same and ends the bridge; until then
                # the records wait in self.ready
                self.log(f"watcher: Redis: {type(exc).__name__}")
                with self._cv:
                    self._cv.wait(RETRY_PAUSE)
            except Exception as exc:    # a bug of ours: logged, the watcher goes on
                self.log(f"watcher: {type(exc).__name__}: {str(exc)[:200]!r}")
                with self._cv:
                    self._cv.wait(RETRY_PAUSE)

    def _step(self) -> bool:
        with self._cv:
            if not self._inbox and not self.works and not self.ready and not self._stop:
                self._cv.wait(1.0)
            new, self._inbox = self._inbox, []
            stop = self._stop
        for wid, lid, reason in new:
            self._take(wid, lid, reason)
        if not stop and self.works:
            self._sleep_on_oldest()
        self._pass()
        self._flush()
        if stop:
            return False
        return True

    def _take(self, wid: str, lid: int | None, reason: str | None) -> None:
        from shm_taskwork.errors import OutcomeUnknownError
        if wid in self.works:
            return
        if lid is None:
            self._final(wid, None, "unknown", reason=reason)
            return
        try:
            self.works[wid] = (lid, self.dom.work(lid))
        except OutcomeUnknownError:
            self._final(wid, lid, "unknown", reason=self._gone(lid))
        except Exception as exc:          # one work never stops the watcher
            self._final(wid, lid, "unknown",
                        reason=f"its local outcome cannot be read ({type(exc).__name__})")

    def _gone(self, lid: int) -> str:
        return (f"no outcome is recorded for local work {lid:#x} of node {self.node!r}: it "
                f"was queued untracked, or its record was reused after "
                f"outcomes={self.dom.outcomes} newer tracked works settled while no bridge "
                "watched it")

    def _sleep_on_oldest(self) -> None:
        _, h = next(iter(self.works.values()))
        try:
            h.wait(self._slice)       # a futex sleep; reaps its task if it died
        except TimeoutError:
            pass
        except Exception:
            pass                      # read again (and judged) by the pass below

    def _pass(self) -> None:
        """Read the HEAD oldest works and a rotating window of the rest."""
        from shm_taskwork.errors import OutcomeUnknownError
        from shm_taskwork.work import FINAL
        ids = list(self.works)
        todo = ids[:HEAD]
        rest = ids[HEAD:]
        if rest:
            start = self._cursor % len(rest)
            window = (rest[start:] + rest[:start])[:BUDGET - HEAD]
            self._cursor = start + len(window)
            todo += window
        settled = 0
        slots: set[int] = set()
        for wid in todo:
            lid, h = self.works[wid]
            try:
                o = h.outcome
            except OutcomeUnknownError:
                self._final(wid, lid, "unknown", reason=self._gone(lid))
                settled += 1
                continue
            except Exception as exc:       # one work never stops the watcher
                self._final(wid, lid, "unknown",
                            reason=f"its local outcome cannot be read ({type(exc).__name__})")
                settled += 1
                continue
            if o in FINAL:
                self._final(wid, lid, o, h)
                settled += 1
            elif isinstance(h.target, int):
                slots.add(h.target)
        # works keep settling: sleep briefly; none did: back off to SLICE_MAX
        self._slice = SLICE_MIN if settled else min(SLICE_MAX, self._slice * 2)
        now = time.monotonic()
        if slots and now - self._last_reap >= REAP_EVERY:
            self._last_reap = now
            for slot in sorted(slots):
                try:
                    self.dom._reap_if_dead(slot)   # the death settles its works
                except Exception as exc:
                    self.log(f"watcher: reap of task {slot}: {type(exc).__name__}")

    def _final(self, wid: str, lid: int | None, outcome: str, h: Any = None,
               reason: str | None = None) -> None:
        out: dict = {"state": outcome, "node": self.node}
        if lid is not None:
            out["local_id"] = lid
        if outcome == "ran" and h is not None:
            res = h.result
            if isinstance(res, bytes) and len(res) <= self.dom.payload_size:
                out["result"] = res.hex()
        elif outcome == "failed" and h is not None:
            err = h.error
            if isinstance(err, str):
                out["error"] = err[:self.dom.payload_size]
        if reason is not None:
            out["reason"] = reason
        self.works.pop(wid, None)
        self.ready.append((wid, out))
        self.killpoint("bridge_settled")

    def _flush(self) -> None:
        """The ready records, FLUSH_MAX per call. A record Redis refused
        (a key of another type, say) is logged and dropped; on a lost
        connection they all wait for the next pass."""
        while self.ready:
            chunk = self.ready[:FLUSH_MAX]
            keys, args = [self.keys.watch(self.node)], [remote.DONE_TTL, self.keep, self.node]
            for wid, out in chunk:
                keys += [self.keys.out(wid), self.keys.done(wid)]
                args += [wid, json.dumps(out)]
            res = reply_or_error(self.finish, keys, args)
            if isinstance(res, Exception):
                res = [res] * len(chunk)
            del self.ready[:len(chunk)]
            for (wid, out), got in zip(chunk, res):
                err = entry_error(got)
                if err is not None or isinstance(got, Exception):
                    why = str(got) if err is None else err
                    self.log(f"watcher: record of {wid}: {why[:200]!r}")
                elif got == 1:
                    self.stats[out["state"]] = self.stats.get(out["state"], 0) + 1
