"""The bridge's local side: a claimed work added to the local domain, its
outcome recorded in Redis, and a cancel request carried out here (the steps
"add" and "record" of ``bridge``; docs/contract.md "Beyond one host: the
bridge").

The add is keyed (key = the work's id, track=True): recorded in the segment
before the push, so a repeat is recognised, never queued twice. What a work
is here is what this domain's key table says, never what a record in Redis
says (anyone who can write there could forge it).
"""
from __future__ import annotations

import json
import time
from typing import Callable

from . import sender as remote
from .checks import Checker, Refused, _s, _text
from .killpoints import killpoint
from .scripts import entry_error, reply_or_error
from .watcher import Watcher
from ..errors import NoSuchTaskError, TaskExitedError, TaskWorkError


class Delivery:
    """Adds claimed works to the local domain and records their outcomes;
    cancels a work it queued; at start, hands the works of the ``watch``
    hash to the watcher again. ``stats`` is the bridge's counters (shared)."""

    def __init__(self, dom, r, redis_mod, keys: remote.Keys, node: str, keep: int,
                 checks: Checker, watcher: Watcher, stats: dict,
                 record_script, finish_script, scan_script, log: Callable[[str], None]):
        self.dom, self.r, self.redis_mod, self.keys = dom, r, redis_mod, keys
        self.node, self.keep = node, keep
        self.checks, self.watcher, self.stats = checks, watcher, stats
        self.record_script, self.finish_script = record_script, finish_script
        self.scan_script = scan_script
        self.log = log
        self.unrecorded: list[tuple[str, dict]] = []    # added, their records to send

    def deliver(self, wid: str, e: dict) -> None:
        self.deliver_many([(wid, e)])
        self.flush()

    def deliver_many(self, works: list) -> None:
        """The keyed local adds of claimed works (the step "add"). Their
        records (the step "record") wait in ``unrecorded`` for the bridge's
        next round trip (``take_records``: it sends them with its next read)
        or for ``flush()``; until then each work is in the ``claimed`` hash,
        where a restart finds it, as after a kill between the two steps."""
        for wid, e in works:
            killpoint("bridge_claimed")
            try:
                out = self.add_one(wid, e)
            except Refused as exc:
                out = json.loads(self.checks.refused(wid, e["stream"], e["entry"], str(exc)))
                self.stats["refused"] += 1
            except Exception as exc:       # one work never stops the bridge
                out = self.after_error(wid, e, exc)
            self.unrecorded.append((wid, out))
            killpoint("bridge_added")

    def take_records(self) -> "tuple[list, list, list] | None":
        """The RECORD call (keys, args) for every unrecorded work, and the
        works; None if there are none. The caller runs it and then calls
        ``recorded`` with its reply."""
        outs, self.unrecorded = self.unrecorded, []
        if not outs:
            return None
        keys = [self.keys.claimed(self.node), self.keys.watch(self.node)]
        args: list = [remote.DONE_TTL, self.keep]
        for wid, out in outs:
            keys += [self.keys.out(wid), self.keys.done(wid)]
            # a queued work also enters the watch hash: its local outcome is to come
            args += [wid, json.dumps(out), out["local_id"] if out["state"] == "queued" else ""]
        return keys, args, outs

    def recorded(self, outs: list, res) -> None:
        """After the RECORD call of ``outs`` ran (``res``: its reply, or the
        exception it raised): report what Redis refused, then hand the
        queued works to the watcher."""
        if isinstance(res, Exception):
            self.log(f"record of {len(outs)} works failed: {_text(res, 200)}; they stay in the "
                     "claimed hash until the next start")
            return
        for (wid, _out), got in zip(outs, res):
            err = entry_error(got)
            if err is not None:
                self.log(f"record of {wid} failed: {_text(err, 200)}")
        for _ in outs:
            killpoint("bridge_recorded")
        # only now: a final record must come after the queued one it replaces
        self.watcher.add([(wid, out["local_id"]) for wid, out in outs
                          if out["state"] == "queued"])

    def flush(self) -> None:
        """Record every unrecorded work now, in one call."""
        call = self.take_records()
        if call is None:
            return
        keys, args, outs = call
        self.recorded(outs, reply_or_error(self.record_script, keys, args))

    def after_error(self, wid: str, e: dict, exc: Exception) -> dict:
        """The outcome of a work whose add raised: the key table says whether
        it was queued after all; if not, it is refused with the error."""
        from shm_taskwork import keys
        try:
            rec = keys.lookup(self.dom, wid)
        except Exception:
            rec = None
        if rec is not None:
            if rec.state == "dead_letter":
                return {"state": "dead_letter", "node": self.node, "local_id": rec.work_id}
            return self.queued(rec, None)
        reason = f"{type(exc).__name__}: {exc}"
        self.stats["refused"] += 1
        return json.loads(self.checks.refused(wid, e["stream"], e["entry"], reason[:300]))

    def queued(self, rec, gen) -> dict:
        if gen is None:
            try:
                gen = self.dom.task(rec.slot).gen
            except (NoSuchTaskError, TaskWorkError):
                gen = 0
        return {"state": "queued", "node": self.node, "local_id": rec.work_id,
                "slot": rec.slot, "gen": gen}

    def _name_known(self, target: str) -> bool:
        """True if a task of this name was ever registered in the domain."""
        return self.dom.task_name_known(target)

    def add_one(self, wid: str, e: dict) -> dict:
        """The keyed local add of one claimed work; its outcome record.

        A work for a task name this domain has never known is refused (a
        Redis writer could otherwise fill the pool with dead letters), and so
        is a dead letter while less than a quarter of the pool is free; a
        full pool refuses the work (PoolExhaustedError)."""
        from shm_taskwork import keys
        from shm_taskwork.errors import PoolExhaustedError
        func, payload, notify, target = e["func"], e["payload"], e["notify"], e["target"]
        if isinstance(payload, str):
            payload = bytes.fromhex(payload)
        deadline = time.monotonic() + 30
        while True:
            try:
                try:
                    t = self.dom.task(name=target)
                except NoSuchTaskError:
                    known = keys.lookup(self.dom, wid)
                    if known is None:
                        if not self._name_known(target):
                            raise Refused(f"no task named {_text(target)} was ever "
                                          "registered in this domain") from None
                        if self.dom.pool_free() <= self.dom.pool_size // 4:
                            raise Refused("less than a quarter of the pool is free: no "
                                          "dead letter is filed") from None
                    rec = keys.dead_letter(self.dom, wid, func, payload, target)
                    gen = None
                else:
                    rec = t.add_keyed(func, payload, notify, key=wid, track=True)
                    gen = t.gen
                break
            except TaskExitedError:
                if time.monotonic() > deadline:
                    raise
                continue            # it died between lookup and push: choose again
            except keys.KeyBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except PoolExhaustedError:
                raise Refused(f"the pool of domain {self.dom.name!r} is full "
                              f"(pool_size={self.dom.pool_size})") from None
        self.stats["delivered" if rec.fresh else "duplicates_suppressed"] += 1
        if rec.state == "dead_letter":
            if rec.fresh:
                self.stats["dead_letters"] += 1
            return {"state": "dead_letter", "node": self.node, "local_id": rec.work_id}
        return self.queued(rec, gen if rec.fresh else None)

    def control(self, stream: str, eid: str, fields: dict) -> None:
        """A cancel request. The work to cancel is the one this domain's key
        table says it queued under that work id: a record in Redis (which
        anyone who can write there could forge) names nothing by itself."""
        ok = False
        try:
            f = {_s(k): _s(v) for k, v in fields.items()}
            wid, reply = f.get("id", ""), f.get("reply", "")
            if f.get("op") != "cancel" or not remote.WORK_ID_RE.match(wid):
                self.log(f"ignored control entry {_text(eid)}: op must be 'cancel' with an id "
                         "of 32 hex digits")
            else:
                ok = self.cancel_local(wid)
            if reply and remote.WORK_ID_RE.match(reply):
                rk = self.keys.reply(reply)
                self.r.rpush(rk, "1" if ok else "0")
                self.r.expire(rk, 60)
        except self.redis_mod.ConnectionError:
            raise
        except Exception as exc:           # one entry never stops the bridge
            self.log(f"control entry {_text(eid)}: {type(exc).__name__}: {_text(exc, 200)}")
        self.r.xack(stream, remote.GROUP, eid)
        self.r.xdel(stream, eid)

    def cancel_local(self, wid: str) -> bool:
        from shm_taskwork import Work, keys
        self.flush()          # (a work added just before is recorded queued first)
        st = remote._state(self.r.get(self.keys.out(wid)))
        if not isinstance(st, dict) or st.get("state") != "queued" or \
                st.get("node") != self.node:
            return False
        rec = keys.lookup(self.dom, wid)
        if rec is None or rec.state != "queued":
            return False            # nothing this bridge queued under that id
        try:
            t = self.dom.task(rec.slot)
            w = Work("", 0, b"", target=rec.slot, target_gen=t.gen, id=rec.work_id,
                     domain=self.dom.name)
            ok = t.cancel(w)
        except (NoSuchTaskError, TaskWorkError):
            ok = False
        if ok:
            # the one final state (FINISH: only over this node's queued); the
            # watcher, seeing the local outcome cancelled, then changes nothing
            out = {"state": "cancelled", "node": self.node, "local_id": rec.work_id}
            self.finish_script(keys=[self.keys.watch(self.node), self.keys.out(wid),
                                     self.keys.done(wid)],
                               args=[remote.DONE_TTL, self.keep, self.node, wid,
                                     json.dumps(out)])
            self.stats["cancelled"] += 1
        return ok

    def resume_watch(self) -> None:
        """Watch again the works this node queued whose outcome it had not
        recorded (its ``watch`` hash). The hash is input too: only the key
        table says which local work a work id is (as for a cancel); a work
        it no longer holds is recorded ``unknown`` with the reason, and only
        over this node's ``queued`` (FINISH)."""
        from shm_taskwork import keys
        key = self.keys.watch(self.node)
        cursor = "0"
        for _ in range(1 << 20):          # bounded: HSCAN ends at cursor 0
            nxt, kv = self.scan_script(keys=[key], args=[cursor, 256, 32, 64])
            items, drop = [], []
            for i in range(0, len(kv) - 1, 2):
                wid = _s(kv[i])
                if not remote.WORK_ID_RE.match(wid):
                    self.log(f"dropped watched entry {_text(wid)}: not a work id")
                    drop.append(kv[i])
                    continue
                try:
                    rec = keys.lookup(self.dom, wid)
                except Exception as exc:       # one work never stops the bridge
                    rec = None
                    self.log(f"watched entry {wid}: {type(exc).__name__}")
                if rec is None or rec.state != "queued":
                    items.append((wid, None, "the bridge restarted and its domain's key "
                                  "table no longer holds this work"))
                else:
                    items.append((wid, rec.work_id))
            if drop:
                self.r.hdel(key, *drop)
            self.watcher.add(items)
            cursor = _s(nxt)
            if cursor == "0":
                break
