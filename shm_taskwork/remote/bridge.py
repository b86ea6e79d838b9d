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
            a queued work also enters watch:NODE in that script
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
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import stat
import sys
import tempfile
import time

from . import sender as remote
from .scripts import SET_IF_NONE
from .scripts import (CLAIM, FIELD_MAX, FINISH, MAX_FIELDS, OVERSIZE, READ, READ_BYTES,
                      READ_COUNT, RECORD, SCAN_CLAIMED, TAKE)
from .watcher import Watcher
from ..errors import NoSuchTaskError, TaskExitedError, TaskWorkError

KILLPOINTS = ("bridge_read", "bridge_claimed", "bridge_added", "bridge_recorded",
              "bridge_settled")


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


class StatusDirError(PermissionError):
    """The status directory exists but is not private to this user."""


def status_dir() -> str:
    """Where running bridges leave their figures for ``status`` and ``export``.

    ``$SHM_TASKWORK_RUN_DIR`` if set; else ``$XDG_RUNTIME_DIR/shm_taskwork``
    (a per-user directory the session manager made private); else, as root,
    ``/run/shm_taskwork``; else ``$TMPDIR/shm_taskwork-bridges-UID`` (the
    fallback when no runtime directory exists: it carries the user id, and
    :func:`private_dir` refuses it if another user made it first). Wherever
    it is, the directory is mode 0700 and owned by the bridge's user."""
    env = os.environ.get("SHM_TASKWORK_RUN_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                return os.path.join(xdg, "shm_taskwork")
        except OSError:
            pass
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/shm_taskwork"
    return os.path.join(tempfile.gettempdir(), f"shm_taskwork-bridges-{os.geteuid()}")


def _check_private(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StatusDirError(f"status directory {path} is a symbolic link; refusing it "
                             "(it must be a directory of mode 0700 owned by uid "
                             f"{os.geteuid()})")
    if not stat.S_ISDIR(st.st_mode):
        raise StatusDirError(f"status directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StatusDirError(f"status directory {path} is owned by uid {st.st_uid}, not by "
                             f"this bridge's uid {os.geteuid()}; refusing it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise StatusDirError(f"status directory {path} has mode "
                             f"{stat.S_IMODE(st.st_mode):04o}; it must be 0700")


def private_dir() -> str:
    """The status directory, made (mode 0700) if missing; StatusDirError if
    it exists with another owner, other mode bits, or as a symbolic link."""
    d = status_dir()
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    _check_private(d, st)
    return d


def _read_record(d: str, fn: str) -> dict | None:
    """One bridge's figures, or None: never follows a link, never blocks on
    a FIFO, and anything but a JSON object of the expected shape is skipped."""
    try:
        fd = os.open(os.path.join(d, fn), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            rec = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not isinstance(rec, dict) or not isinstance(rec.get("domain"), str) or \
            not isinstance(rec.get("node"), str):
        return None
    pid = rec.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    for k in _FIGURES:
        v = rec.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
    return rec


#: The numbers a bridge's figures hold (read by ``status`` and ``export``).
_FIGURES = ("lag", "pending_entries", "delivered", "duplicates_suppressed", "refused",
            "dead_letters", "cancelled", "taken_over", "uptime_s")


def running_bridges(domain: str) -> list[dict]:
    """The figures of every live bridge of ``domain`` on this host (a
    malformed or foreign file in the status directory is skipped)."""
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
        rec = _read_record(d, fn)
        if rec is None or rec["domain"] != dom:
            continue
        try:
            os.kill(rec["pid"], 0)
        except (OSError, OverflowError):
            continue            # its bridge is gone
        out.append(rec)
    return out


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _text(v, limit: int = 60) -> str:
    """An untrusted value for a log line or a reason: escaped, shortened."""
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    v = str(v)
    return repr(v[:limit] + ("..." if len(v) > limit else ""))


class Refused(Exception):
    """A work the bridge will not queue; its message is the reason."""


_NOTIFY_RE = re.compile(rb"-?[0-9]{1,6}\Z")


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
        self.names: set[str] = set()
        self.stats = {"delivered": 0, "duplicates_suppressed": 0, "refused": 0,
                      "dead_letters": 0, "cancelled": 0, "taken_over": 0}
        self.lag = 0
        self.pending = 0
        self.watching = 0
        self.started = time.time()
        ps = self.dom.payload_size
        # One read: at most READ_COUNT entries and about READ_BYTES bytes.
        # (the payload, its hex and JSON copies for the claimed hash)
        self.read_count = max(1, min(READ_COUNT,
                                     READ_BYTES // (4 * ps + MAX_FIELDS * FIELD_MAX)))
        self.limits = [ps, FIELD_MAX, MAX_FIELDS]
        self.status_dir = private_dir()
        self.status_path = os.path.join(
            self.status_dir,
            f"{self.dom.name.lstrip('/')}.{node}.json".replace("/", "_"))
        self.logged = 0
        self.watcher = Watcher(self.dom.name, url, self.keys, node, self.keep, self.log,
                               killpoint)

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

    def publish(self) -> None:
        d = self.dom
        info = {"payload_size": d.payload_size, "pool_size": d.pool_size,
                "max_tasks": d.max_tasks, "pid": os.getpid(), "seen": time.time(),
                "names": sorted(self.names), "max_fields": MAX_FIELDS,
                "field_bytes": FIELD_MAX}
        self.r.hset(self.keys.nodes, self.node, json.dumps(info))

    def refresh(self) -> None:
        """The task names alive here: this node serves their "any" groups."""
        names = set()
        for t in self.dom.tasks():
            if t.state in ("running", "exiting") and t.name:
                try:     # a name read from the segment is input too
                    names.add(remote.check_name(t.name, "a task name", remote.TASK_NAME_MAX))
                except ValueError:
                    pass
        self.names = names
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
        self.publish()
        self.lag = self.pending = 0
        for stream in list(self.groups):
            try:
                for g in self.r.xinfo_groups(stream):
                    if _s(g["name"]) == remote.GROUP:
                        self.lag += int(g.get("lag") or 0)
                        self.pending += int(g.get("pending") or 0)
            except (self.redis_mod.ResponseError, TypeError, ValueError):
                pass
        self.pending += int(self.r.hlen(self.keys.claimed(self.node)))
        self.watching = int(self.r.hlen(self.keys.watch(self.node)))
        self.write_status()

    def figures(self) -> dict:
        return {"domain": self.dom.name.lstrip("/"), "cluster_domain": self.keys.domain,
                "node": self.node, "pid": os.getpid(),
                "redis": redact(self.url), "allow": self.allow, "lag": self.lag,
                "pending_entries": self.pending, "names": sorted(self.names),
                "uptime_s": round(time.time() - self.started, 1), **self.stats,
                "watching": self.watching,
                **{f"settled_{k}": v for k, v in self.watcher.stats.items()}}

    def write_status(self) -> None:
        """Write the figures without following links: a new file (O_EXCL,
        O_NOFOLLOW, 0600) in the private directory, renamed over the old."""
        _check_private(self.status_dir, os.lstat(self.status_dir))
        tmp = f"{self.status_path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.figures(), f)
            os.replace(tmp, self.status_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ---- checks: everything read from Redis is input from a stranger ----------

    def allowed(self, func: str) -> bool:
        return any(fnmatch.fnmatchcase(func, p) for p in self.allow)

    def _names(self, func, target, stream: str) -> tuple[str, str]:
        try:
            func = remote.check_name(func, "the callback name", remote.CALLBACK_NAME_MAX)
            target = remote.check_name(target, "the target task name", remote.TASK_NAME_MAX)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if stream.startswith(self.keys.any("")):
            if target != stream[len(self.keys.any("")):]:
                raise Refused(f"an entry of stream {_text(stream)} may target only task "
                              f"{_text(stream[len(self.keys.any('')):])}, not {_text(target)}")
        elif stream != self.keys.node(self.node):
            raise Refused(f"stream {_text(stream)} is not one this bridge serves")
        if not self.allowed(func):
            raise Refused(f"callback {_text(func)} matches no --allow pattern")
        return func, target

    def check_entry(self, stream: str, fields: dict) -> dict:
        """The work of one stream entry, validated; Refused(reason) if bad."""
        f = {}
        for k, v in fields.items():
            if not isinstance(k, bytes) or not isinstance(v, bytes):
                raise Refused("an entry's fields are byte strings")
            f[k.decode(errors="replace")] = v
        if OVERSIZE in f:
            raise Refused(f"entry too large ({_text(f[OVERSIZE])}): the limits are "
                          f"payload_size={self.dom.payload_size} bytes, {FIELD_MAX} bytes for "
                          f"any other field, {MAX_FIELDS} fields")
        missing = [k for k in ("func", "payload", "notify", "target") if k not in f]
        if missing:
            raise Refused(f"entry lacks field(s) {', '.join(missing)}")
        try:
            func, target = f["func"].decode(), f["target"].decode()
        except UnicodeDecodeError:
            raise Refused("func and target must be UTF-8") from None
        func, target = self._names(func, target, stream)
        if not _NOTIFY_RE.match(f["notify"]):
            raise Refused(f"notify={_text(f['notify'])} is not an integer: use "
                          f"{remote.VALID_MODES}")
        notify = self._notify(int(f["notify"]))
        payload = f["payload"]
        if len(payload) > self.dom.payload_size:
            raise Refused(f"payload of {len(payload)} bytes is larger than payload_size "
                          f"({self.dom.payload_size} bytes)")
        return {"func": func, "payload": payload, "notify": notify, "target": target,
                "stream": stream}

    def _notify(self, notify) -> int:
        try:
            return remote.check_notify(notify)
        except TaskWorkError as exc:
            raise Refused(str(exc)) from None

    def check_claimed(self, wid: str, raw) -> dict:
        """A work of the claimed hash, validated again (the hash is input too)."""
        if raw is None:
            raise Refused("claimed entry larger than its limit")
        try:
            e = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refused("claimed entry is not JSON") from None
        if not isinstance(e, dict):
            raise Refused("claimed entry is not a JSON object")
        for k, typ in (("func", str), ("payload", str), ("notify", int), ("target", str),
                       ("stream", str), ("entry", str)):
            if not isinstance(e.get(k), typ) or isinstance(e.get(k), bool):
                raise Refused(f"claimed entry: {k} missing or not a {typ.__name__}")
        if remote.work_id(e["stream"], e["entry"]) != wid:
            raise Refused("claimed entry does not belong to its stream entry")
        func, target = self._names(e["func"], e["target"], e["stream"])
        notify = self._notify(e["notify"])
        if len(e["payload"]) > 2 * self.dom.payload_size:
            raise Refused(f"claimed payload larger than payload_size "
                          f"({self.dom.payload_size} bytes)")
        try:
            payload = bytes.fromhex(e["payload"])
        except ValueError:
            raise Refused("claimed payload is not hex") from None
        return {"func": func, "payload": payload, "notify": notify, "target": target,
                "stream": e["stream"], "entry": e["entry"]}

    # ---- one work -----------------------------------------------------------

    def refused(self, wid: str, stream: str, eid: str, reason: str) -> str:
        self.log(f"refused entry {_text(eid)} of {_text(stream)}: {reason}")
        return json.dumps({"state": "refused", "node": self.node, "reason": reason,
                           "stream": stream, "entry": eid})

    def handle_batch(self, stream: str, batch: list) -> None:
        """One read batch of a work stream: every claim (or refusal) in one
        pipeline, then the local adds, then every record in one pipeline.
        The steps keep their order per work, so a kill between any two is
        what the essay above says (a batch only widens each step). Each
        entry is checked before its claim; a bad one is refused, acknowledged
        and removed, and the batch goes on."""
        pipe = self.r.pipeline(transaction=False)
        todo = []
        for eid, fields in batch:
            killpoint("bridge_read")
            wid = remote.work_id(stream, eid)
            try:
                e = self.check_entry(stream, fields)
                reason = None
            except Refused as exc:
                reason = str(exc)
            except Exception as exc:       # one entry never stops the bridge
                reason = f"entry could not be read ({type(exc).__name__})"
            if reason is not None:
                st = self.refused(wid, stream, eid, reason)
                self.refuse_script(keys=[self.keys.out(wid), self.keys.done(wid)],
                                   args=[st, remote.DONE_TTL, self.keep], client=pipe)
                pipe.xack(stream, remote.GROUP, eid)
                pipe.xdel(stream, eid)
                todo.append(("refused", wid, st))
                continue
            entry = json.dumps({"func": e["func"], "payload": e["payload"].hex(),
                                "notify": e["notify"], "target": e["target"],
                                "stream": stream, "entry": eid})
            mine = json.dumps({"state": "delivering", "node": self.node, "stream": stream,
                               "entry": eid})
            self.claim_script(keys=[self.keys.out(wid), self.keys.claimed(self.node), stream],
                              args=[wid, mine, entry, remote.GROUP, eid, self.keep],
                              client=pipe)
            todo.append(("claim", wid, (mine, e, eid)))
        results = iter(pipe.execute(raise_on_error=False))
        claimed = []
        for kind, wid, extra in todo:
            got = next(results)
            if kind == "refused":
                next(results), next(results)            # xack, xdel
                if isinstance(got, bytes) and _s(got) == extra:
                    self.stats["refused"] += 1
            elif isinstance(got, bytes) and _s(got) == extra[0]:
                e = dict(extra[1], entry=extra[2])
                claimed.append((wid, e))
            elif isinstance(got, Exception):
                self.log(f"claim of {_text(extra[2])} failed: {_text(got, 200)}")
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
            try:
                out = self.add_one(wid, e)
            except Refused as exc:
                out = json.loads(self.refused(wid, e["stream"], e["entry"], str(exc)))
                self.stats["refused"] += 1
            except Exception as exc:       # one work never stops the bridge
                out = self.after_error(wid, e, exc)
            outs.append((wid, out))
            killpoint("bridge_added")
        if not outs:
            return
        pipe = self.r.pipeline(transaction=False)
        watch = []
        for wid, out in outs:
            keys = [self.keys.out(wid), self.keys.claimed(self.node), self.keys.done(wid)]
            args = [wid, json.dumps(out), remote.DONE_TTL, self.keep]
            if out["state"] == "queued":       # its local outcome is to come
                keys.append(self.keys.watch(self.node))
                args.append(out["local_id"])
                watch.append((wid, out["local_id"]))
            self.record_script(keys=keys, args=args, client=pipe)
        pipe.execute()
        for _ in outs:
            killpoint("bridge_recorded")
        # only now: a final record must come after the queued one it replaces
        self.watcher.add(watch)

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
        return json.loads(self.refused(wid, e["stream"], e["entry"], reason[:300]))

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
            self.finish_script(keys=[self.keys.out(wid), self.keys.watch(self.node),
                                     self.keys.done(wid)],
                               args=[wid, json.dumps(out), remote.DONE_TTL, self.keep,
                                     self.node])
            self.stats["cancelled"] += 1
        return ok

    # ---- the loop -----------------------------------------------------------

    def dispatch(self, stream: str, entries) -> None:
        batch = []
        for eid, fields in entries:
            eid = _s(eid)
            if not fields:      # deleted while pending
                self.r.xack(stream, remote.GROUP, eid)
            elif stream == self.keys.ctl(self.node):
                self.control(stream, eid, self._pairs(fields))
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
                    e = self.check_claimed(wid, kv[i + 1])
                    if st.get("entry") != e["entry"] or st.get("stream") != e["stream"]:
                        self.log(f"dropped claimed entry {wid}: not the entry claimed")
                        pipe.hdel(key, wid)
                        continue
                    works.append((wid, e))
                except Refused as exc:
                    st = self.refused(wid, "", "", str(exc))
                    self.stats["refused"] += 1
                    self.record_script(keys=[self.keys.out(wid), key, self.keys.done(wid)],
                                       args=[wid, st, remote.DONE_TTL, self.keep],
                                       client=pipe)
                except Exception as exc:       # one work never stops the bridge
                    self.log(f"dropped claimed entry {wid}: {type(exc).__name__}")
                    pipe.hdel(key, wid)
            pipe.execute()
            self.deliver_many(works)
            cursor = _s(nxt)
            if cursor == "0":
                break

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

    def read(self, count: int | None = None) -> int:
        """One capped read (count and bytes, see READ) of new entries of
        every stream; finding none, it waits up to block_ms, polling (a
        blocking XREADGROUP would hand over entries of any size)."""
        count = count or self.read_count
        streams = sorted(self.groups)
        deadline = time.monotonic() + self.block_ms / 1000
        pause = 0.001
        while True:
            got = self.read_script(keys=streams, args=[remote.GROUP, self.node, ">", count,
                                                       *self.limits])
            if got or self.stop or time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        n = 0
        for stream, entries in got or []:
            self.dispatch_safely(_s(stream), entries)
            n += len(entries)
        return n

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
        self.resume_watch()
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
                self.line()
                last_line = now
        self.watcher.close()
        self.refresh()
        if self.progress:
            self.line()
        try:
            os.unlink(self.status_path)
        except OSError:
            pass
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

    def line(self) -> None:
        s = self.stats
        print(f"bridge {self.keys.domain}@{self.node}: delivered {s['delivered']}, "
              f"duplicates suppressed {s['duplicates_suppressed']}, refused {s['refused']}, "
              f"dead letters {s['dead_letters']}, lag {self.lag}, pending {self.pending}",
              file=sys.stderr, flush=True)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True


def redact(url: str) -> str:
    """The URL without its password, in every form redis-py reads one:
    ``scheme://user:password@host``, ``scheme://:password@host``,
    ``unix://:password@/path``, and ``?password=`` in the query (``redis://``,
    ``rediss://``, ``unix://``). A URL that does not parse is not shown."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    try:
        u = urlsplit(url)
        netloc = u.netloc
        if "@" in netloc:
            cred, host = netloc.rsplit("@", 1)
            user, colon, _ = cred.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{host}"
        query = u.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs],
                              safe="*/")
        out = f"{u.scheme}://{netloc}{u.path}" if u.scheme else urlunsplit(
            ("", netloc, u.path, "", ""))
        return out + (f"?{query}" if query else "") + (f"#{u.fragment}" if u.fragment else "")
    except ValueError:
        return "<a Redis URL that does not parse>"


