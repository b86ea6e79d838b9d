"""The bridge: moves works from Redis Streams into a local domain, exactly
once (README "More than one host"; the command line is
``shm-taskwork bridge``, in ``tools/bridge.py``).


Each entry goes through these steps; a bridge SIGKILLed between any two and
started again (same ``--node``) queues the work exactly once:

  read      XREADGROUP (own stream, the "any node" streams of the task names
            alive here, the control stream); at start the entries this node
            had read and not claimed (its pending list), and periodically
            XAUTOCLAIM of entries a dead bridge of another node left there.
            Reads run in a script that caps their count and bytes and keeps
            an oversize entry's bytes inside Redis (README, Security)
  check     everything read is input from a stranger: fields, types, names,
            notify mode, the payload against payload_size, --allow, and an
            "any" entry's target; a bad entry is refused with a reason
  claim     one script: SET out:ID delivering:NODE NX, HSET claimed:NODE,
            XACK + XDEL (or only XACK if the work's fate was decided already)
  add       the keyed local add (key = the work's id, track=True): recorded
            in the segment before the push, so a repeat is recognised, never
            queued twice
  record    one script: out[id] = outcome, HDEL claimed:NODE, wake outcome();
            a queued work also enters watch:NODE in that script. It rides in
            one round trip with the next read (``_record_and_read``), always
            before the loop waits, before a cancel, and at the end
  settle    the watcher (a thread, see ``watcher``) learns the local outcome
            (ran with its result, failed with its error, cancelled,
            dead_letter, interrupted) and records it with one script:
            out[id] = final outcome if it is still this node's queued,
            HDEL watch:NODE, wake wait(); many works per pipeline

At start the bridge first finishes what its ``claimed`` hash holds, then
watches again what its ``watch`` hash holds.
``SHM_TASKWORK_KILLPOINT=bridge_read|bridge_claimed|bridge_added|bridge_recorded|bridge_settled[:N]``
SIGKILLs the bridge at the N-th pass of that point (fault injection, as the
core's kill points; ``key_reserved`` and ``key_pushed`` are inside the keyed
add).

SIGTERM or SIGINT: finish the entry in hand, then exit 0.

``Bridge`` is the read loop (read, claim, the claimed hash finished after a
restart, take over from a dead node) and composes the parts:
``checks.Checker`` (the step "check": the trust boundary),
``local.Delivery`` (the steps "add" and "record", a cancel, and the watch
hash handed to the watcher again at start), ``watcher.Watcher`` (the step
"settle", its own thread) and ``status.Figures`` (its figures in Redis and
in the status directory). ``killpoints`` holds the kill points.
"""
from __future__ import annotations

import json
import signal
import sys
import time

from . import sender as remote
from .checks import Checker, Refused, _s, _text
from .killpoints import KILLPOINTS, killpoint
from .local import Delivery
from .scripts import (CLAIM, FIELD_MAX, FINISH, MAX_FIELDS, READ, READ_BYTES, READ_COUNT,
                      RECORD, SCAN_CLAIMED, SET_IF_NONE, TAKE, entry_error,
                      reply_or_error)
from .status import Figures, StatusDirError, private_dir, redact, running_bridges, status_dir
from .wake import Wake
from .watcher import Watcher

__all__ = ["KILLPOINTS", "Bridge", "Delivery", "Checker", "Figures", "Refused",
           "StatusDirError", "killpoint", "private_dir", "redact", "running_bridges",
           "status_dir"]


class Bridge:
    def __init__(self, domain: str, url: str, node: str, allow: list[str],
                 claim_idle: float = 30.0, block_ms: int = 200, progress: bool = False,
                 cluster_name: str | None = None, keep: int = remote.OUTCOME_TTL):
        from shm_taskwork import Domain
        import redis
        self.redis_mod = redis
        self.dom = Domain.open(domain)
        self.url, self.node, self.allow = url, node, list(allow)
        self.keys = remote.Keys(cluster_name or self.dom.name)
        self.r = remote.connect(url)
        self.claim_script = self.r.register_script(CLAIM)
        self.record_script = self.r.register_script(RECORD)
        self.finish_script = self.r.register_script(FINISH)
        self.refuse_script = self.r.register_script(SET_IF_NONE)
        self.read_script = self.r.register_script(READ)
        self.take_script = self.r.register_script(TAKE)
        self.scan_script = self.r.register_script(SCAN_CLAIMED)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.keep = int(keep)
        self.block_ms = block_ms
        self.progress = progress
        self.stop = False
        self.groups: set[str] = set()
        ps = self.dom.payload_size
        # One read: at most READ_COUNT entries and about READ_BYTES bytes.
        # (the payload, its hex and JSON copies for the claimed hash)
        self.read_count = max(1, min(READ_COUNT,
                                     READ_BYTES // (4 * ps + MAX_FIELDS * FIELD_MAX)))
        self.limits = [ps, FIELD_MAX, MAX_FIELDS]
        # the parts: figures (and the status file), checks, the watcher, the local side
        self.status = Figures(self.r, redis, self.dom, self.keys, node, url, self.allow,
                              lambda: self.watcher.stats)
        self.stats = self.status.stats          # one dict: every part counts in it
        self.logged = 0
        self.wake = Wake(self.r, self.log)
        self.checks = Checker(self.keys, node, self.allow, ps, self.log)
        self.watcher = Watcher(self.dom.name, url, self.keys, node, self.keep, self.log,
                               killpoint)
        self.local = Delivery(self.dom, self.r, redis, self.keys, node, self.keep, self.checks,
                              self.watcher, self.stats, self.record_script, self.finish_script,
                              self.scan_script, self.log)

    def log(self, msg: str) -> None:
        """One line on stderr; untrusted parts are escaped by the caller (_text)."""
        self.logged += 1
        if self.logged <= 1000 or self.logged % 1000 == 0:
            print(f"shm-taskwork bridge {self.node}: {msg}", file=sys.stderr, flush=True)

    # ---- setup ------------------------------------------------------------

    def _group(self, stream: str) -> None:
        if stream in self.groups:
            return
        try:
            self.r.xgroup_create(stream, remote.GROUP, id="0", mkstream=True)
        except self.redis_mod.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.groups.add(stream)

    def refresh(self) -> None:
        """The task names alive here: this node serves their "any" groups."""
        names = set()
        for t in self.dom.tasks():
            if t.state in ("running", "exiting") and t.name:
                try:     # a name read from the segment is input too
                    names.add(remote.check_name(t.name, "a task name", remote.TASK_NAME_MAX))
                except ValueError:
                    pass
        self.status.names = names
        # A name no longer alive here: its works are for the other nodes.
        for stream in list(self.groups):
            if stream.startswith(self.keys.any("")) and \
                    stream[len(self.keys.any("")):] not in names:
                self.groups.discard(stream)
        # (made again here if a fault dropped them: see guarded)
        for stream in (self.keys.node(self.node), self.keys.ctl(self.node),
                       *(self.keys.any(n) for n in sorted(names))):
            try:
                self._group(stream)
            except self.redis_mod.ResponseError as exc:
                self.log(f"stream {_text(stream)}: {_text(exc, 200)}")
        self.wake.follow(self.groups)
        self.status.publish()
        self.status.measure(self.groups)
        self.status.write_status()

    # ---- claim: one read batch (the steps check, claim; add and record: local)

    def handle_batch(self, stream: str, batch: list) -> None:
        """One read batch of a work stream: every claim in one script call
        (refusals in the same round trip), then the local adds, then every
        record in one script call (sent with the next read). The steps keep
        their order per work, so a kill between any two is what the essay
        above says (a batch only widens each step). Each entry is checked
        before its claim; a bad one is refused, acknowledged and removed,
        and the batch goes on."""
        pipe = self.r.pipeline(transaction=False)
        refused: list[str] = []
        got: object = None
        keys, args, mine_of = [self.keys.claimed(self.node), stream], [remote.GROUP, self.keep], []
        for eid, fields in batch:
            killpoint("bridge_read")
            wid = remote.work_id(stream, eid)
            try:
                e = self.checks.check_entry(stream, fields)
                reason = None
            except Refused as exc:
                reason = str(exc)
            except Exception as exc:       # one entry never stops the bridge
                reason = f"entry could not be read ({type(exc).__name__})"
            if reason is not None:
                st = self.checks.refused(wid, stream, eid, reason)
                self.refuse_script(keys=[self.keys.out(wid), self.keys.done(wid)],
                                   args=[st, remote.DONE_TTL, self.keep], client=pipe)
                pipe.xack(stream, remote.GROUP, eid)
                pipe.xdel(stream, eid)
                refused.append(st)
                continue
            entry = json.dumps({"func": e["func"], "payload": e["payload"].hex(),
                                "notify": e["notify"], "target": e["target"],
                                "stream": stream, "entry": eid})
            mine = json.dumps({"state": "delivering", "node": self.node, "stream": stream,
                               "entry": eid})
            keys.append(self.keys.out(wid))
            args += [wid, mine, entry, eid]
            mine_of.append((wid, mine, e, eid))
        if refused:
            # (a pipeline of scripts asks Redis whether they are loaded first:
            # only when a refusal rides along)
            if mine_of:
                self.claim_script(keys=keys, args=args, client=pipe)
            results = pipe.execute(raise_on_error=False)
            for i, st in enumerate(refused):
                got = results[3 * i]                    # then its xack, xdel
                if isinstance(got, bytes) and _s(got) == st:
                    self.stats["refused"] += 1
            got = results[-1]
        elif mine_of:
            got = reply_or_error(self.claim_script, keys, args)
        if not mine_of:
            return
        if isinstance(got, Exception):
            self.log(f"claim of {len(mine_of)} entries of {_text(stream)} failed: "
                     f"{_text(got, 200)}")
            return
        claimed = []
        for (wid, mine, e, eid), res in zip(mine_of, got):
            err = entry_error(res)
            if err is not None:
                self.log(f"claim of {_text(eid)} failed: {_text(err, 200)}")
            elif (_s(res) if isinstance(res, bytes) else res) == mine:
                claimed.append((wid, dict(e, entry=eid)))
            # else: decided already (cancelled, or another node's claim)
        self.local.deliver_many(claimed)

    def handle(self, stream: str, eid: str, fields: dict) -> None:
        self.handle_batch(stream, [(eid, fields)])

    # ---- the loop -----------------------------------------------------------

    def dispatch(self, stream: str, entries) -> None:
        batch = []
        for eid, fields in entries:
            eid = _s(eid)
            if not fields:      # deleted while pending
                self.r.xack(stream, remote.GROUP, eid)
            elif stream == self.keys.ctl(self.node):
                self.local.control(stream, eid, self._pairs(fields))   # (flushes first)
            else:
                batch.append((eid, self._pairs(fields)))
        if batch:
            self.handle_batch(stream, batch)

    @staticmethod
    def _pairs(fields) -> dict:
        """Entry fields as the scripts return them (a flat list) or as
        redis-py's parsed reply (a dict)."""
        if isinstance(fields, dict):
            return fields
        return {fields[i]: fields[i + 1] for i in range(0, len(fields) - 1, 2)}

    def resume(self) -> None:
        """Finish what this node claimed before it was stopped or killed.
        Each claimed entry is checked as a new one (the hash is input too),
        and only a claim this node made (its ``out`` record says it is
        delivering here, for that very stream entry) is queued."""
        key = self.keys.claimed(self.node)
        cursor = "0"
        vmax = 2 * self.dom.payload_size + 4 * FIELD_MAX
        while True:
            nxt, kv = self.scan_script(keys=[key], args=[cursor, 64, vmax, 64])
            works, pipe = [], self.r.pipeline(transaction=False)
            for i in range(0, len(kv) - 1, 2):
                wid = _s(kv[i])
                if not remote.WORK_ID_RE.match(wid):
                    self.log(f"dropped claimed entry {_text(wid)}: not a work id")
                    pipe.hdel(key, kv[i])
                    continue
                try:
                    # only a claim this node made: its out record says so
                    st = remote._state(self.r.get(self.keys.out(wid)))
                    if not isinstance(st, dict) or st.get("state") != "delivering" or \
                            st.get("node") != self.node:
                        self.log(f"dropped claimed entry {wid}: no claim of this node")
                        pipe.hdel(key, wid)
                        continue
                    e = self.checks.check_claimed(wid, kv[i + 1])
                    if st.get("entry") != e["entry"] or st.get("stream") != e["stream"]:
                        self.log(f"dropped claimed entry {wid}: not the entry claimed")
                        pipe.hdel(key, wid)
                        continue
                    works.append((wid, e))
                except Refused as exc:
                    st = self.checks.refused(wid, "", "", str(exc))
                    self.stats["refused"] += 1
                    self.record_script(keys=[key, self.keys.watch(self.node),
                                             self.keys.out(wid), self.keys.done(wid)],
                                       args=[remote.DONE_TTL, self.keep, wid, st, ""],
                                       client=pipe)
                except Exception as exc:       # one work never stops the bridge
                    self.log(f"dropped claimed entry {wid}: {type(exc).__name__}")
                    pipe.hdel(key, wid)
            pipe.execute()
            self.local.deliver_many(works)
            cursor = _s(nxt)
            if cursor == "0":
                break

    def read(self, count: int | None = None) -> int:
        """One capped read (count and bytes, see READ) of new entries of
        every stream; finding none, it waits up to block_ms for a wake-up
        (``wake``), looking again at least every 10 ms (a blocking
        XREADGROUP would hand over entries of any size)."""
        count = count or self.read_count
        streams = sorted(self.groups)
        deadline = time.monotonic() + self.block_ms / 1000
        pause = 0.001
        while True:
            self.wake.drain()   # (the read below covers what they announced)
            got = self._record_and_read(streams, [remote.GROUP, self.node, ">", count,
                                                  *self.limits])
            if got or self.stop or time.monotonic() >= deadline:
                break
            if not self.wake.wait(pause):
                pause = min(pause * 2, 0.01)
        n = 0
        for stream, entries in got or []:
            self.dispatch_safely(_s(stream), entries)
            n += len(entries)
        return n

    def _record_and_read(self, streams: list, args: list):
        """The READ script, with the records of the works added since the
        last round trip in front of it (the step "record" of the last batch
        and the step "read" of the next share one round trip; a record is
        still sent before the loop waits, and in order before any later
        step of its work). Scripts run by their hash; one Redis no longer
        has (a restart, SCRIPT FLUSH) is loaded and run again alone."""
        call = self.local.take_records()
        if call is None:
            return self.read_script(keys=streams, args=args)
        keys, rargs, outs = call
        pipe = self.r.pipeline(transaction=False)
        pipe.evalsha(self.record_script.sha, len(keys), *keys, *rargs)
        pipe.evalsha(self.read_script.sha, len(streams), *streams, *args)
        rec, got = pipe.execute(raise_on_error=False)   # (a lost connection raises)
        NoScript = self.redis_mod.exceptions.NoScriptError
        if isinstance(rec, NoScript):
            rec = reply_or_error(self.record_script, keys, rargs)
        self.local.recorded(outs, rec)
        if isinstance(got, NoScript):
            got = self.read_script(keys=streams, args=args)
        elif isinstance(got, Exception):
            raise got
        return got

    def read_pending(self) -> None:
        """The entries this node had read and not claimed (its pending
        list), each stream from its start: an entry that stays pending is
        passed, never read again in this loop."""
        for stream in sorted(self.groups):
            start = "0"
            while not self.stop:
                got = self.read_script(keys=[stream], args=[remote.GROUP, self.node, start,
                                                            self.read_count, *self.limits])
                if not got:
                    break
                entries = got[0][1]
                self.dispatch_safely(stream, entries)
                start = _s(entries[-1][0])

    def dispatch_safely(self, stream: str, entries) -> None:
        try:
            self.dispatch(stream, entries)
        except self.redis_mod.ConnectionError:
            raise
        except Exception as exc:       # a bug of ours: logged, the bridge goes on
            self.log(f"entries of {_text(stream)}: {type(exc).__name__}: {_text(exc, 200)}")

    def take_over(self) -> None:
        """XAUTOCLAIM: entries read, never claimed, by a bridge silent for
        longer than --claim-idle."""
        for stream in sorted(self.groups):
            if stream == self.keys.ctl(self.node):
                continue
            start = "0-0"
            for _ in range(100):
                res = self.take_script(keys=[stream],
                                       args=[remote.GROUP, self.node, self.claim_idle_ms,
                                             self.read_count, *self.limits, start])
                nxt, entries = res[0], res[1]
                if entries:
                    self.stats["taken_over"] += len(entries)
                    # kept in Redis too: a bridge's own figures end with it
                    self.r.hincrby(f"{self.keys.base}:stats", "taken_over", len(entries))
                    self.dispatch_safely(stream, entries)
                start = _s(nxt)
                if start == "0-0":
                    break

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        self._group(self.keys.node(self.node))
        self._group(self.keys.ctl(self.node))
        self.refresh()
        self.watcher.start()
        self.resume()
        self.local.resume_watch()
        self.read_pending()
        last_refresh = last_claim = last_line = time.monotonic()
        self.guarded(self.take_over)
        while not self.stop:
            self.guarded(self.read)
            now = time.monotonic()
            if now - last_refresh >= 1.0:
                self.guarded(self.refresh)
                last_refresh = now
            if now - last_claim >= max(0.1, self.claim_idle_ms / 2000):
                self.guarded(self.take_over)
                last_claim = now
            if self.progress and now - last_line >= 5.0:
                self.status.line()
                last_line = now
        self.guarded(self.local.flush)
        self.watcher.close()
        self.refresh()
        self.wake.close()
        if self.progress:
            self.status.line()
        self.status.remove()
        self.dom.close()
        return 0

    def guarded(self, step) -> None:
        """One step of the loop. Redis keys of the wrong type, a group
        deleted under the bridge, a bug of ours: logged, the groups made
        again, and the bridge goes on; only a lost connection ends it."""
        try:
            step()
        except self.redis_mod.ConnectionError:
            raise
        except Exception as exc:
            self.log(f"{step.__name__}: {type(exc).__name__}: {_text(exc, 200)}")
            self.groups.clear()
            for stream in (self.keys.node(self.node), self.keys.ctl(self.node)):
                try:
                    self._group(stream)
                except self.redis_mod.ResponseError as exc2:
                    self.log(f"stream {_text(stream)}: {_text(exc2, 200)}")
            time.sleep(self.block_ms / 1000)    # no busy loop on a lasting fault

    def _on_stop(self, signum, frame) -> None:
        self.stop = True
