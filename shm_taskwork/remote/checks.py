"""The bridge's trust boundary: everything it reads from Redis is input from
a stranger (README "The bridge and its Redis"; docs/contract.md "Beyond one
host: the bridge").

``Checker`` validates a stream entry (``check_entry``) and an entry of the
node's ``claimed`` hash (``check_claimed``): fields, types, names, the notify
mode, the payload against payload_size, ``--allow``, and an "any" entry's
target. A bad one raises ``Refused`` with the reason; ``refused`` logs it and
makes its outcome record. ``_text`` escapes an untrusted value for a log line.
"""
from __future__ import annotations

import fnmatch
import json
import re
from typing import Callable

from . import sender as remote
from .scripts import FIELD_MAX, MAX_FIELDS, OVERSIZE
from ..errors import TaskWorkError


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


class Checker:
    """The checks of one bridge: its node, its streams (``keys``), its
    ``--allow`` patterns and its domain's payload_size."""

    def __init__(self, keys: remote.Keys, node: str, allow: list[str], payload_size: int,
                 log: Callable[[str], None]):
        self.keys, self.node, self.allow = keys, node, allow
        self.payload_size = payload_size
        self.log = log

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
                          f"payload_size={self.payload_size} bytes, {FIELD_MAX} bytes for "
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
        if len(payload) > self.payload_size:
            raise Refused(f"payload of {len(payload)} bytes is larger than payload_size "
                          f"({self.payload_size} bytes)")
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
        if len(e["payload"]) > 2 * self.payload_size:
            raise Refused(f"claimed payload larger than payload_size "
                          f"({self.payload_size} bytes)")
        try:
            payload = bytes.fromhex(e["payload"])
        except ValueError:
            raise Refused("claimed payload is not hex") from None
        return {"func": func, "payload": payload, "notify": notify, "target": target,
                "stream": e["stream"], "entry": e["entry"]}

    def refused(self, wid: str, stream: str, eid: str, reason: str) -> str:
        """Log a refusal; the work's outcome record (JSON)."""
        self.log(f"refused entry {_text(eid)} of {_text(stream)}: {reason}")
        return json.dumps({"state": "refused", "node": self.node, "reason": reason,
                           "stream": stream, "entry": eid})
