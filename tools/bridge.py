"""``shm-taskwork bridge DOMAIN --redis URL [--node NODE] [--allow PATTERN ...]``

Moves works from Redis Streams into the local domain (SPEC §10; the key
layout is in :mod:`shm_taskwork.remote`). One bridge per host and domain.

Each entry goes through these steps; a bridge SIGKILLed between any two and
started again (same ``--node``) queues the work exactly once:

  read      XREADGROUP (own stream, the "any node" streams of the task names
            alive here, the control stream); at start the entries this node
            had read and not claimed (its pending list), and periodically
            XAUTOCLAIM of entries a dead bridge of another node left there
  claim     one script: SET out:ID delivering:NODE NX, HSET claimed:NODE,
            XACK + XDEL (or only XACK if the work's fate was decided already)
  add       the keyed local add (key = the work's id): recorded in the segment
            before the push, so a repeat is recognised, never queued twice
  record    one script: out[id] = outcome, HDEL claimed:NODE, wake outcome()

At start the bridge first finishes what its ``claimed`` hash holds.
``SHM_TASKWORK_KILLPOINT=bridge_read|bridge_claimed|bridge_added|bridge_recorded[:N]``
SIGKILLs the bridge at the N-th pass of that point (fault injection, as the
core's kill points; ``key_reserved`` and ``key_pushed`` are inside the keyed
add).

SIGTERM or SIGINT: finish the entry in hand, then exit 0.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import sys
import tempfile
import time

from shm_taskwork import remote
from shm_taskwork.errors import NoSuchTaskError, TaskExitedError, TaskWorkError
from shm_taskwork.tools._common import positive_seconds

KILLPOINTS = ("bridge_read", "bridge_claimed", "bridge_added", "bridge_recorded")


def _killpoint_switch() -> tuple[str | None, int]:
    env = os.environ.get("SHM_TASKWORK_KILLPOINT", "")
    name, _, n = env.partition(":")
    if name not in KILLPOINTS:
        return None, 0
    try:
        return name, max(1, int(n.split(":")[0])) if n else 1
    except ValueError:
        return name, 1


_KP, _KP_LEFT = _killpoint_switch()


def killpoint(name: str) -> None:
    global _KP_LEFT
    if name == _KP:
        _KP_LEFT -= 1
        if _KP_LEFT == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def status_dir() -> str:
    """Where running bridges leave their figures for ``status`` and ``export``."""
    return os.environ.get("SHM_TASKWORK_RUN_DIR") or os.path.join(
        tempfile.gettempdir(), "shm_taskwork-bridges")


def running_bridges(domain: str) -> list[dict]:
    """The figures of every live bridge of ``domain`` on this host."""
    d = status_dir()
    dom = domain.lstrip("/")
    out = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return out
    for fn in names:
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if rec.get("domain") != dom:
            continue
        try:
            os.kill(int(rec["pid"]), 0)
        except (OSError, KeyError, ValueError):
            continue            # its bridge is gone
        out.append(rec)
    return out


# KEYS: out:ID, claimed, stream ; ARGV: id, delivering JSON, entry fields JSON,
# group, entry id, keep ttl
CLAIM = """
local got = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[6]))
if got then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[3], ARGV[5])
if got then return ARGV[2] end
return redis.call('GET', KEYS[1])
"""

# KEYS: out:ID, claimed, done ; ARGV: id, outcome JSON, done ttl, keep ttl
RECORD = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[4]))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return 1
"""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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
        self.refuse_script = self.r.register_script(remote.SET_IF_NONE)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.keep = int(keep)
        self.block_ms = block_ms
        self.progress = progress
        self.stop = False
        self.groups: set[str] = set()
        self.names: set[str] = set()
        self.stats = {"delivered": 0, "duplicates_suppressed": 0, "refused": 0,
                      "dead_letters": 0, "cancelled": 0, "taken_over": 0}
        self.lag = 0
        self.pending = 0
        self.started = time.time()
        self.status_path = os.path.join(
            status_dir(), f"{self.dom.name.lstrip('/')}.{node}.json".replace("/", "_"))

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

    def publish(self) -> None:
        d = self.dom
        info = {"payload_size": d.payload_size, "pool_size": d.pool_size,
                "max_tasks": d.max_tasks, "pid": os.getpid(), "seen": time.time(),
                "names": sorted(self.names)}
        self.r.hset(self.keys.nodes, self.node, json.dumps(info))

    def refresh(self) -> None:
        """The task names alive here: this node serves their "any" groups."""
        names = {t.name for t in self.dom.tasks() if t.state in ("running", "exiting") and t.name}
        self.names = names
        # A name no longer alive here: its works are for the other nodes.
        for stream in list(self.groups):
            if stream.startswith(self.keys.any("")) and \
                    stream[len(self.keys.any("")):] not in names:
                self.groups.discard(stream)
        for n in names:
            self._group(self.keys.any(n))
        self.publish()
        self.lag = self.pending = 0
        for stream in list(self.groups):
            try:
                for g in self.r.xinfo_groups(stream):
                    if _s(g["name"]) == remote.GROUP:
                        self.lag += int(g.get("lag") or 0)
                        self.pending += int(g.get("pending") or 0)
            except self.redis_mod.ResponseError:
                pass
        self.pending += int(self.r.hlen(self.keys.claimed(self.node)))
        self.write_status()

    def figures(self) -> dict:
        return {"domain": self.dom.name.lstrip("/"), "cluster_domain": self.keys.domain,
                "node": self.node, "pid": os.getpid(),
                "redis": _redact(self.url), "allow": self.allow, "lag": self.lag,
                "pending_entries": self.pending, "names": sorted(self.names),
                "uptime_s": round(time.time() - self.started, 1), **self.stats}

    def write_status(self) -> None:
        os.makedirs(status_dir(), mode=0o700, exist_ok=True)
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.figures(), f)
        os.replace(tmp, self.status_path)

    # ---- one work -----------------------------------------------------------

    def allowed(self, func: str) -> bool:
        return any(fnmatch.fnmatchcase(func, p) for p in self.allow)

    def handle_batch(self, stream: str, batch: list) -> None:
        """One read batch of a work stream: every claim (or refusal) in one
        pipeline, then the local adds, then every record in one pipeline.
        The steps keep their order per work, so a kill between any two is
        what the essay above says (a batch only widens each step)."""
        pipe = self.r.pipeline(transaction=False)
        todo = []
        for eid, fields in batch:
            f = {_s(k): v for k, v in fields.items()}
            killpoint("bridge_read")
            if "id" not in f:           # not ours: acknowledge it away
                pipe.xack(stream, remote.GROUP, eid)
                continue
            wid = _s(f["id"])
            if not self.allowed(_s(f["func"])):
                st = json.dumps({"state": "refused", "node": self.node,
                                 "reason": f"callback {_s(f['func'])!r} matches no --allow "
                                           "pattern"})
                self.refuse_script(keys=[self.keys.out(wid), self.keys.done(wid)],
                                   args=[st, remote.DONE_TTL, self.keep], client=pipe)
                pipe.xack(stream, remote.GROUP, eid)
                pipe.xdel(stream, eid)
                todo.append(("refused", wid, st))
                continue
            entry = json.dumps({"func": _s(f["func"]), "payload": f["payload"].hex(),
                                "notify": int(f["notify"]), "target": _s(f["target"])})
            mine = json.dumps({"state": "delivering", "node": self.node})
            self.claim_script(keys=[self.keys.out(wid), self.keys.claimed(self.node), stream],
                              args=[wid, mine, entry, remote.GROUP, eid, self.keep],
                              client=pipe)
            todo.append(("claim", wid, (mine, entry)))
        results = iter(pipe.execute())
        claimed = []
        for kind, wid, extra in todo:
            got = _s(next(results))
            if kind == "refused":
                next(results), next(results)            # xack, xdel
                if got == extra:
                    self.stats["refused"] += 1
            elif got == extra[0]:
                claimed.append((wid, json.loads(extra[1])))
            # else: decided already (cancelled, or another node's claim)
        self.deliver_many(claimed)

    def handle(self, stream: str, eid: str, fields: dict) -> None:
        self.handle_batch(stream, [(eid, fields)])

    def deliver(self, wid: str, e: dict) -> None:
        self.deliver_many([(wid, e)])

    def deliver_many(self, works: list) -> None:
        outs = []
        for wid, e in works:
            killpoint("bridge_claimed")
            outs.append((wid, self.add_one(wid, e)))
            killpoint("bridge_added")
        if not outs:
            return
        pipe = self.r.pipeline(transaction=False)
        for wid, out in outs:
            self.record_script(keys=[self.keys.out(wid), self.keys.claimed(self.node),
                                     self.keys.done(wid)],
                               args=[wid, json.dumps(out), remote.DONE_TTL, self.keep],
                               client=pipe)
        pipe.execute()
        for _ in outs:
            killpoint("bridge_recorded")

    def add_one(self, wid: str, e: dict) -> dict:
        """The keyed local add of one claimed work; its outcome record."""
        from shm_taskwork import keys
        func, payload, notify, target = e["func"], bytes.fromhex(e["payload"]), e["notify"], \
            e["target"]
        deadline = time.monotonic() + 30
        while True:
            try:
                try:
                    t = self.dom.task(name=target)
                except NoSuchTaskError:
                    rec = keys.dead_letter(self.dom, wid, func, payload, target)
                    gen = None
                else:
                    rec = t.add_keyed(func, payload, notify, key=wid)
                    gen = t.gen
                break
            except TaskExitedError:
                continue            # it died between lookup and push: choose again
            except keys.KeyBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.stats["delivered" if rec.fresh else "duplicates_suppressed"] += 1
        if rec.state == "dead_letter":
            if rec.fresh:
                self.stats["dead_letters"] += 1
            return {"state": "dead_letter", "node": self.node, "local_id": rec.work_id}
        if gen is None or not rec.fresh:
            try:
                gen = self.dom.task(rec.slot).gen
            except (NoSuchTaskError, TaskWorkError):
                gen = 0
        return {"state": "queued", "node": self.node, "local_id": rec.work_id,
                "slot": rec.slot, "gen": gen}

    def control(self, stream: str, eid: str, fields: dict) -> None:
        from shm_taskwork import Work
        f = {_s(k): _s(v) for k, v in fields.items()}
        ok = False
        if f.get("op") == "cancel":
            st = remote._state(self.r.get(self.keys.out(f["id"])))
            if st and st["state"] == "queued" and st.get("node") == self.node:
                try:
                    t = self.dom.task(int(st["slot"]))
                    w = Work("", 0, b"", target=int(st["slot"]), target_gen=int(st["gen"]),
                             id=int(st["local_id"]), domain=self.dom.name)
                    ok = t.cancel(w)
                except (NoSuchTaskError, TaskWorkError):
                    ok = False
                if ok:
                    st["state"] = "cancelled"
                    self.r.set(self.keys.out(f["id"]), json.dumps(st), ex=self.keep)
                    self.stats["cancelled"] += 1
        if f.get("reply"):
            rk = self.keys.reply(f["reply"])
            self.r.rpush(rk, "1" if ok else "0")
            self.r.expire(rk, 60)
        self.r.xack(stream, remote.GROUP, eid)
        self.r.xdel(stream, eid)

    # ---- the loop -----------------------------------------------------------

    def dispatch(self, stream: str, entries) -> None:
        batch = []
        for eid, fields in entries:
            eid = _s(eid)
            if fields is None:      # deleted while pending
                self.r.xack(stream, remote.GROUP, eid)
            elif stream == self.keys.ctl(self.node):
                self.control(stream, eid, fields)
            else:
                batch.append((eid, fields))
        if batch:
            self.handle_batch(stream, batch)

    def resume(self) -> None:
        """Finish what this node claimed before it was stopped or killed."""
        self.deliver_many([(_s(wid), json.loads(entry)) for wid, entry in
                           self.r.hgetall(self.keys.claimed(self.node)).items()])

    def read(self, start: str, count: int = 64) -> int:
        streams = {s: start for s in sorted(self.groups)}
        got = self.r.xreadgroup(remote.GROUP, self.node, streams, count=count,
                                block=None if start == "0" else self.block_ms)
        n = 0
        for stream, entries in got or []:
            self.dispatch(_s(stream), entries)
            n += len(entries)
        return n

    def take_over(self) -> None:
        """XAUTOCLAIM: entries read, never claimed, by a bridge silent for
        longer than --claim-idle."""
        for stream in sorted(self.groups):
            if stream == self.keys.ctl(self.node):
                continue
            start = "0-0"
            for _ in range(100):
                res = self.r.xautoclaim(stream, remote.GROUP, self.node, self.claim_idle_ms,
                                        start_id=start, count=64)
                nxt, entries = res[0], res[1]
                if entries:
                    self.stats["taken_over"] += len(entries)
                    # kept in Redis too: a bridge's own figures end with it
                    self.r.hincrby(f"{self.keys.base}:stats", "taken_over", len(entries))
                    self.dispatch(stream, entries)
                start = _s(nxt)
                if start == "0-0":
                    break

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        self._group(self.keys.node(self.node))
        self._group(self.keys.ctl(self.node))
        self.refresh()
        self.resume()
        while not self.stop and self.read("0"):      # our own unclaimed reads
            pass
        last_refresh = last_claim = last_line = time.monotonic()
        self.take_over()
        while not self.stop:
            self.read(">")
            now = time.monotonic()
            if now - last_refresh >= 1.0:
                self.refresh()
                last_refresh = now
            if now - last_claim >= max(0.1, self.claim_idle_ms / 2000):
                self.take_over()
                last_claim = now
            if self.progress and now - last_line >= 5.0:
                self.line()
                last_line = now
        self.refresh()
        if self.progress:
            self.line()
        try:
            os.unlink(self.status_path)
        except OSError:
            pass
        self.dom.close()
        return 0

    def line(self) -> None:
        s = self.stats
        print(f"bridge {self.keys.domain}@{self.node}: delivered {s['delivered']}, "
              f"duplicates suppressed {s['duplicates_suppressed']}, refused {s['refused']}, "
              f"dead letters {s['dead_letters']}, lag {self.lag}, pending {self.pending}",
              file=sys.stderr, flush=True)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user + ':***' if ':' in cred else user}@{host}"
    return url


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Move works from Redis Streams into a local domain "
        "(one bridge per host and domain).")
    p.add_argument("domain", help="the local domain")
    p.add_argument("--redis", required=True, metavar="URL",
                   help="redis://[user:password@]host:port/db, rediss:// (TLS), unix:///path")
    p.add_argument("--node", default=remote.default_node(),
                   help="this host's node name (default: the host name)")
    p.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                   help="queue only callbacks whose names match (fnmatch; repeatable). "
                        "Default: none - every work is refused")
    p.add_argument("--as", dest="cluster_name", metavar="NAME",
                   help="the domain's name in the cluster (default: its local name); "
                        "lets two domains of one machine play two hosts")
    p.add_argument("--claim-idle", type=positive_seconds, default=30.0, metavar="SECONDS",
                   help="take over entries another node's bridge read and left this long "
                        "(default 30)")
    p.add_argument("--keep-outcomes", type=positive_seconds, default=remote.OUTCOME_TTL,
                   metavar="SECONDS", help="how long each work's outcome stays in Redis for "
                   f"outcome() (default {remote.OUTCOME_TTL} s: 7 days)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress line every 5 s on stderr (default: if stderr is a terminal)")
    return p


def main(argv=None, prog: str | None = None, command: str = "bridge") -> int:
    a = build_parser(prog or "shm-taskwork bridge").parse_args(argv)
    try:
        import redis  # noqa: F401
    except ImportError:
        print("shm-taskwork bridge: the redis client is not installed: "
              "pip install 'shm-taskwork[remote]'", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if a.progress is None else a.progress
    try:
        b = Bridge(a.domain, a.redis, a.node, a.allow, claim_idle=a.claim_idle, progress=progress,
                   cluster_name=a.cluster_name, keep=max(1, int(a.keep_outcomes)))
    except FileNotFoundError:
        print(f"shm-taskwork bridge: no domain {a.domain!r} on this host "
              "(create it first: shm-taskwork create NAME)", file=sys.stderr)
        return 1
    import redis
    try:
        return b.run()
    except redis.ConnectionError as exc:
        print(f"shm-taskwork bridge: Redis at {_redact(a.redis)}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
