"""Beyond one host: works travel through Redis Streams (docs/contract.md "Beyond one host: the bridge").

A sender (:class:`Cluster`) appends each work to a stream; one bridge per host
and domain (``shm-taskwork bridge``) moves it into its local domain with the
ordinary add. Redis gives persistence, replication, consumer groups and
authentication; this module writes no protocol of its own.

Keys, under ``PREFIX`` (``stw``) and the domain's name::

    stw:{dom}:node:{node}    stream: works for one node (its bridge's group)
    stw:{dom}:any:{name}     stream: works for any node with a live task
                             `name`; group "bridges", one consumer per node
    stw:{dom}:ctl:{node}     stream: cancel requests for a node's bridge
    stw:{dom}:out:{id}       string: the work's state (JSON); the one place a
                             work's fate is decided, by SET NX; it expires
                             OUTCOME_TTL (7 days) after its last change
    stw:{dom}:claimed:{node} hash: works a node's bridge has claimed and not
                             yet finished (what its restart resumes)
    stw:{dom}:watch:{node}   hash: works a node's bridge queued whose local
                             outcome is not final yet (id -> local id)
    stw:{dom}:nodes          hash: node -> the domain sizes its bridge publishes
    stw:{dom}:done:{id}      list: pushed when a work's outcome is final

A work's id is not chosen by its sender: it is :func:`work_id` of the stream
and the entry id Redis gave its XADD, so an outcome, a claim or a cancel
always refers to the one stream entry it belongs to, and no sender can name
(overwrite, refuse or cancel) another sender's work by reusing its id.

Exactly once. A work's ``out`` key is set once, atomically, by whoever
comes first: a bridge claiming it (``delivering:NODE``, recorded in the
node's ``claimed`` hash and acknowledged in the stream in the same script), a
cancel (``cancelled``) or a refusal (``refused``). The claiming bridge then
adds the work with a keyed add (the key is the work's id; see
:mod:`shm_taskwork.keys`), so killed at any step and restarted, it resumes
from its ``claimed`` hash and the key table tells it whether the work was
already queued. Entries read but not yet claimed by a dead bridge stay in
the group's pending list, where the bridge's own restart (same node: same
consumer) or another node's bridge (XAUTOCLAIM) takes them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import os
import time
import uuid
from typing import Any, Iterable

from .._layout import NAME_LEN
from .._security import check_text
from ..callbacks import NAME_LIMIT
from ..constants import TWA_NMI_CURRENT, TWA_RESUME, TWAF_NO_ALLOC, VALID_MODES
from ..errors import InvalidModeError, PayloadTooLargeError
from . import scripts
from .wake import channel as wake_channel

PREFIX = "stw"
GROUP = "bridges"
#: A remote work's final outcomes: from the target's local outcome (``ran``,
#: ``failed``, ``cancelled``, ``dead_letter``, ``interrupted``), from its
#: bridge (``refused``; ``unknown`` when a restarted bridge finds its local
#: record gone), or from a cancel before delivery (``cancelled``).
FINAL = ("ran", "failed", "cancelled", "dead_letter", "interrupted", "refused", "unknown")
#: What :meth:`Cluster.outcome` waits for: the work's fate is known, it is
#: queued on its target at least.
KNOWN = ("queued",) + FINAL
LIMIT_TTL = 1.0          # seconds a sender trusts the sizes it read
OUTCOME_TTL = 7 * 24 * 3600  # seconds a work's state is kept in Redis
DONE_TTL = 3600          # seconds a done-list (a wake-up for outcome()) is kept


#: What a remote work's fields may hold (checked by the sender and again by
#: the bridge, which trusts nothing it reads from Redis): a callback name as
#: the domain's name table keeps it, a task name as a slot keeps it.
CALLBACK_NAME_MAX = NAME_LIMIT
TASK_NAME_MAX = NAME_LEN - 1
#: The notify modes a remote task takes: TWA_NONE..TWA_SIGNAL_NO_IPI,
#: optionally with TWAF_NO_ALLOC (TWA_NMI_CURRENT is the caller's own task only).
REMOTE_MODES = frozenset(m | f for m in (0, 1, 2, 3) for f in (0, TWAF_NO_ALLOC))
WORK_ID_RE = re.compile(r"[0-9a-f]{32}\Z")


def work_id(stream: str, entry_id: str) -> str:
    """The cluster-wide id of the work in ``stream`` at ``entry_id``: 32 hex
    digits, derived, never chosen by a sender."""
    h = hashlib.blake2b(f"{stream}\0{entry_id}".encode(), digest_size=16)
    return h.hexdigest()


def check_name(name, what: str, limit: int) -> str:
    """A callback or task name as every domain keeps it: a non-empty str of
    at most ``limit`` bytes (UTF-8) without NUL; else ValueError naming the rule."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str of at most {limit} bytes, got "
                         f"{type(name).__name__ if not isinstance(name, str) else repr(name)}")
    check_text(name, what, limit)
    return name


def check_notify(notify) -> int:
    """A notify mode a remote task takes, else InvalidModeError."""
    if not isinstance(notify, int) or isinstance(notify, bool):
        raise InvalidModeError(f"notify must be an int: use {VALID_MODES}")
    if notify & 0xFF == TWA_NMI_CURRENT and 0 <= notify < (1 << 16):
        raise InvalidModeError(
            "TWA_NMI_CURRENT is only for the calling process's own task; a remote task "
            f"cannot take it: use {VALID_MODES} without it")
    if notify not in REMOTE_MODES:
        raise InvalidModeError(f"notify={notify!r} is not valid: use {VALID_MODES} "
                               "(TWA_NMI_CURRENT excepted)")
    return notify


def _redis():
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - said plainly
        raise ImportError("shm_taskwork.remote needs the redis client: "
                          "pip install 'shm-taskwork[remote]'") from exc
    return redis


def connect(url: str) -> Any:
    """A Redis client for ``url`` (redis://, rediss:// for TLS, unix://;
    user and password in the URL for AUTH)."""
    return _redis().Redis.from_url(url)


class Keys:
    """The Redis key names of one domain."""

    def __init__(self, domain: str):
        self.domain = domain.lstrip("/")
        b = f"{PREFIX}:{self.domain}"
        self.base = b
        self.nodes = f"{b}:nodes"

    def out(self, wid: str) -> str:
        return f"{self.base}:out:{wid}"

    def node(self, node: str) -> str:
        return f"{self.base}:node:{node}"

    def any(self, name: str) -> str:
        return f"{self.base}:any:{name}"

    def ctl(self, node: str) -> str:
        return f"{self.base}:ctl:{node}"

    def claimed(self, node: str) -> str:
        return f"{self.base}:claimed:{node}"

    def watch(self, node: str) -> str:
        return f"{self.base}:watch:{node}"

    def done(self, wid: str) -> str:
        return f"{self.base}:done:{wid}"

    def reply(self, token: str) -> str:
        return f"{self.base}:reply:{token}"


@dataclasses.dataclass
class RemoteWork:
    """A work sent to a task of another host (docs/contract.md "Beyond one host: the bridge")."""
    id: str
    node: str | None
    domain: str
    target_name: str
    func_name: str
    payload: bytes
    notify: int
    sent_ns: int
    local_id: int | None = None
    stream: str = ""
    entry_id: str = ""
    #: once the outcome is ``ran``: the bytes the callback returned (None if
    #: it returned anything else); once ``failed``: "Type: message"; once
    #: ``refused`` or ``unknown``: why
    result: bytes | None = None
    error: str | None = None
    reason: str | None = None
    _cluster: "Cluster | None" = dataclasses.field(default=None, repr=False, compare=False)
    _final: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def outcome(self) -> str | None:
        """The work's state now, without waiting: None (no bridge has taken
        it), ``delivering``, ``queued``, or one of :data:`FINAL` (kept once
        read). :meth:`Cluster.outcome` and :meth:`wait` wait for it."""
        if self._final is not None:
            return self._final
        return self._cl().look(self)

    def wait(self, timeout: float | None = None) -> str:
        """Block until the outcome is final (one of :data:`FINAL`) and
        return it; ``TimeoutError`` at the deadline. The waiter sleeps in
        Redis (BLPOP on the work's done-list), woken when a bridge records."""
        return self._cl().wait(self, timeout)

    def _cl(self) -> "Cluster":
        if self._cluster is None:
            raise ValueError(f"remote work {self.id}: not bound to a Cluster; use "
                             "cluster.outcome(work) or cluster.wait(work)")
        return self._cluster


def _state(raw) -> dict | None:
    """A work's recorded state; None if there is none, or if what Redis holds
    is not a JSON object with a str ``state`` (input, not trusted)."""
    if raw is None:
        return None
    try:
        st = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(st, dict) or not isinstance(st.get("state"), str):
        return None
    return st


class RemoteTask:
    """A handle to the task(s) named ``name`` of a domain on ``node`` (None:
    any node that has a live one)."""

    def __init__(self, cluster: "Cluster", domain: str, name: str, node: str | None):
        self.cluster, self.domain, self.name, self.node = cluster, domain, name, node
        self.keys = Keys(domain)
        self.stream = self.keys.node(node) if node is not None else self.keys.any(name)
        self._wake = wake_channel(self.stream)
        if node is None:
            cluster._ensure_group(self.stream)
        self._limit_cache: tuple[float, int | None] = (0.0, None)

    def __repr__(self) -> str:
        return f"<RemoteTask {self.name!r} of {self.domain!r} on {self.node or 'any node'}>"

    def _limit(self) -> int | None:
        """The payload limit the target's bridge(s) published: that node's,
        or for any node the smallest of them. None: nothing published yet.
        Read again after LIMIT_TTL seconds (a bridge may restart with a
        domain of other sizes)."""
        at, limit = self._limit_cache
        now = time.monotonic()
        if limit is not None and now - at < LIMIT_TTL:
            return limit
        limit = self._read_limit()
        self._limit_cache = (now, limit)
        return limit

    def _read_limit(self) -> int | None:
        r = self.cluster.r
        if self.node is not None:
            raw = r.hget(self.keys.nodes, self.node)
            return json.loads(raw)["payload_size"] if raw else None
        sizes = [json.loads(v)["payload_size"] for v in r.hvals(self.keys.nodes)]
        return min(sizes) if sizes else None

    def _check(self, func: str, payloads: list[bytes], notify: int) -> str:
        check_notify(notify)
        if isinstance(func, str):
            name = func
        else:
            from .. import callbacks
            _, name = callbacks.resolve(func)
        check_name(name, "a callback name", CALLBACK_NAME_MAX)
        limit = self._limit()
        for p in payloads:
            if limit is not None and len(p) > limit:
                where = f"node {self.node!r}" if self.node else "the smallest published node"
                raise PayloadTooLargeError(
                    f"add: payload of {len(p)} bytes is larger than the payload_size of domain "
                    f"{self.domain!r} on {where} ({limit} bytes); nothing was sent")
        return name

    def add(self, func, payload: bytes = b"", notify: int = TWA_RESUME) -> RemoteWork:
        """Send one work; returns at once (see :meth:`Cluster.outcome`)."""
        return self.add_many(func, [payload], notify)[0]

    def add_many(self, func, payloads: Iterable[bytes], notify: int = TWA_RESUME
                 ) -> list[RemoteWork]:
        """Send several works in one round trip (a pipeline of XADDs)."""
        payloads = [bytes(p) for p in payloads]
        name = self._check(func, payloads, notify)
        now = time.time_ns()
        works = [RemoteWork("", self.node, self.keys.domain, self.name, name, p,
                            notify, now, stream=self.stream, _cluster=self.cluster)
                 for p in payloads]
        pipe = self.cluster.r.pipeline(transaction=False)
        for w in works:
            pipe.xadd(self.stream, {"func": name, "payload": w.payload,
                                    "notify": str(notify), "target": self.name,
                                    "sent_ns": str(now)})
        # after the entries, in the same round trip: a bridge waiting on the
        # stream wakes now, not at its next poll (remote.wake)
        pipe.publish(self._wake, b"")
        for w, eid in zip(works, pipe.execute()):
            w.entry_id = eid.decode() if isinstance(eid, bytes) else eid
            w.id = work_id(self.stream, w.entry_id)
        return works


class Cluster:
    """A connection to the Redis that carries a cluster's works."""

    def __init__(self, url: str):
        self.url = url
        self.r = connect(url)
        self._set_if_none = self.r.register_script(scripts.SET_IF_NONE)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.r.close()

    def _ensure_group(self, stream: str) -> None:
        try:
            self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except _redis().ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def task(self, domain: str, *, name: str, node: str | None = None) -> RemoteTask:
        """A handle to task ``name`` of ``domain`` on ``node`` (None: any
        node that has a live task of that name)."""
        check_name(name, "task(): name=", TASK_NAME_MAX)
        if node is not None:
            check_name(node, "task(): node=", 255)
        return RemoteTask(self, domain, name, node)

    def nodes(self, domain: str) -> dict[str, dict]:
        """What each node's bridge published for ``domain``: sizes, pid, time."""
        raw = self.r.hgetall(Keys(domain).nodes)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def state(self, w: RemoteWork) -> dict | None:
        """The recorded state of ``w`` (None: no bridge has taken it yet)."""
        return _state(self.r.get(Keys(w.domain).out(w.id)))

    def outcome(self, w: RemoteWork, timeout: float | None = None) -> str:
        """Wait until ``w``'s fate is known and return its state: ``"queued"``
        (on a live task of the target node, not yet settled there), or a final
        outcome (:data:`FINAL`): ``"ran"``, ``"failed"`` (``w.result`` /
        ``w.error`` say more), ``"cancelled"``, ``"dead_letter"`` (no live
        task of its name there, or its task died before running it),
        ``"interrupted"`` (its task died in the callback), ``"refused"`` (its
        callback is not allowed there, or the entry was bad; ``w.reason``),
        ``"unknown"`` (the target's bridge lost track of it; ``w.reason``).
        TimeoutError if not known within ``timeout`` seconds."""
        return self._until(w, timeout, KNOWN)

    def wait(self, w: RemoteWork, timeout: float | None = None) -> str:
        """Wait until ``w``'s outcome is final (:data:`FINAL`) and return it;
        ``TimeoutError`` at the deadline (nothing is changed)."""
        if w._final is not None:
            return w._final
        return self._until(w, timeout, FINAL)

    def look(self, w: RemoteWork) -> str | None:
        """``w``'s state now (one GET), applied to ``w`` as outcome() does."""
        st = self.state(w)
        if st is None:
            return None
        self._apply(w, st)
        return st["state"]

    def _until(self, w: RemoteWork, timeout: float | None, wanted: tuple) -> str:
        if timeout is not None and (timeout != timeout or timeout < 0):
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        keys = Keys(w.domain)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.state(w)
            if st is not None and st["state"] in wanted:
                self._apply(w, st)
                return st["state"]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                what = "final" if wanted is FINAL else "known"
                raise TimeoutError(f"outcome of remote work {w.id}: not {what} within "
                                   f"{timeout} s (state: {st['state'] if st else 'not taken'})")
            # BLPOP sleeps in Redis until a bridge (or a cancel) records a
            # state of this work and pushes its done-list; the 1 s cap re-reads
            # the state (another waiter may have popped the push, or the list
            # expired).
            self.r.blpop([keys.done(w.id)], timeout=min(1.0, left) if left is not None else 1.0)

    def _apply(self, w: RemoteWork, st: dict) -> None:
        """Copy what a recorded state says onto ``w``. The state is input
        (anyone who can write Redis can write it): a result is kept only as
        hex of at most the target node's published payload_size, an error or
        reason only as a str, cut to that size."""
        if isinstance(st.get("local_id"), int) and not isinstance(st.get("local_id"), bool):
            w.local_id = st["local_id"]
        if isinstance(st.get("node"), str):
            w.node = st["node"]
        state = st["state"]
        limit = self._result_limit(w.domain, w.node) if state in ("ran", "failed") else 4096
        if state == "ran":
            res = st.get("result")
            w.result = None
            if isinstance(res, str) and len(res) <= 2 * limit:
                try:
                    w.result = bytes.fromhex(res)
                except ValueError:
                    pass
        for name in ("error", "reason"):
            v = st.get(name)
            setattr(w, name, v[:limit] if isinstance(v, str) else None)
        if state in FINAL:
            w._final = state

    def _result_limit(self, domain: str, node: str | None) -> int:
        raw = self.r.hget(Keys(domain).nodes, node) if node else None
        try:
            size = json.loads(raw)["payload_size"] if raw else None
        except (ValueError, TypeError, KeyError, RecursionError):
            size = None
        if isinstance(size, int) and not isinstance(size, bool) and 0 <= size:
            return min(size, scripts.READ_BYTES)
        return scripts.READ_BYTES

    def cancel(self, w: RemoteWork, timeout: float = 10.0) -> bool:
        """True iff ``w``'s callback had not started and now never will.

        Before delivery the work is marked cancelled and its stream entry
        removed; after it, the target node's bridge cancels the local work
        (``Task.cancel``) and answers. TimeoutError if that bridge does not
        answer within ``timeout`` seconds (the request stays queued for it)."""
        keys = Keys(w.domain)
        mine = json.dumps({"state": "cancelled", "at": "sender"})
        raw = self._set_if_none(keys=[keys.out(w.id), keys.done(w.id)],
                                args=[mine, DONE_TTL, OUTCOME_TTL])
        raw = raw.decode() if isinstance(raw, bytes) else raw
        if raw == mine:
            if w.stream and w.entry_id:
                self.r.xdel(w.stream, w.entry_id)
            return True
        got = _state(raw)
        if got is None or got["state"] not in ("delivering", "queued") or \
                not isinstance(got.get("node"), str):
            return False
        token = uuid.uuid4().hex
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(keys.ctl(got["node"]), {"op": "cancel", "id": w.id, "reply": token})
        pipe.publish(wake_channel(keys.ctl(got["node"])), b"")
        pipe.execute()
        res = self.r.blpop([keys.reply(token)], timeout=timeout)
        if res is None:
            raise TimeoutError(f"cancel of remote work {w.id}: the bridge of node "
                               f"{got['node']!r} did not answer within {timeout} s")
        return res[1] == b"1"


def default_node() -> str:
    return os.uname().nodename
