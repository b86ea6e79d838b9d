"""A bridge's figures and where they are seen: the ``nodes`` hash in Redis
(what senders read of this node) and a file per bridge in a private status
directory (what ``status`` and ``export`` read: ``running_bridges``).

README "The bridge and its Redis": the status directory is mode 0700 and
owned by the bridge's user; a file there is written without following links
and read without following links or blocking, and anything that is not a
bridge's record is skipped. ``redact`` shows a Redis URL without its password.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import time
from typing import Callable

from . import sender as remote
from .checks import _s
from .scripts import FIELD_MAX, MAX_FIELDS


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


class Figures:
    """The figures of one bridge: its counters (``stats``, shared with the
    parts that count), its lag and pending entries, the task names it serves
    here; published to Redis (``publish``) and written to its status file
    (``write_status``)."""

    def __init__(self, r, redis_mod, dom, keys: remote.Keys, node: str, url: str,
                 allow: list[str], settled: Callable[[], dict]):
        self.r, self.redis_mod, self.dom, self.keys = r, redis_mod, dom, keys
        self.node, self.url, self.allow = node, url, allow
        self.settled = settled           # the watcher's counters
        self.names: set[str] = set()
        self.stats = {"delivered": 0, "duplicates_suppressed": 0, "refused": 0,
                      "dead_letters": 0, "cancelled": 0, "taken_over": 0}
        self.lag = 0
        self.pending = 0
        self.watching = 0
        self.started = time.time()
        self.status_dir = private_dir()
        self.status_path = os.path.join(
            self.status_dir,
            f"{self.dom.name.lstrip('/')}.{node}.json".replace("/", "_"))

    def publish(self) -> None:
        d = self.dom
        info = {"payload_size": d.payload_size, "pool_size": d.pool_size,
                "max_tasks": d.max_tasks, "pid": os.getpid(), "seen": time.time(),
                "names": sorted(self.names), "max_fields": MAX_FIELDS,
                "field_bytes": FIELD_MAX}
        self.r.hset(self.keys.nodes, self.node, json.dumps(info))

    def measure(self, groups) -> None:
        """Lag and pending entries of the groups this node reads, and the
        works it watches."""
        self.lag = self.pending = 0
        for stream in list(groups):
            try:
                for g in self.r.xinfo_groups(stream):
                    if _s(g["name"]) == remote.GROUP:
                        self.lag += int(g.get("lag") or 0)
                        self.pending += int(g.get("pending") or 0)
            except (self.redis_mod.ResponseError, TypeError, ValueError):
                pass
        self.pending += int(self.r.hlen(self.keys.claimed(self.node)))
        self.watching = int(self.r.hlen(self.keys.watch(self.node)))

    def figures(self) -> dict:
        return {"domain": self.dom.name.lstrip("/"), "cluster_domain": self.keys.domain,
                "node": self.node, "pid": os.getpid(),
                "redis": redact(self.url), "allow": self.allow, "lag": self.lag,
                "pending_entries": self.pending, "names": sorted(self.names),
                "uptime_s": round(time.time() - self.started, 1), **self.stats,
                "watching": self.watching,
                **{f"settled_{k}": v for k, v in self.settled().items()}}

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

    def line(self) -> None:
        s = self.stats
        print(f"bridge {self.keys.domain}@{self.node}: delivered {s['delivered']}, "
              f"duplicates suppressed {s['duplicates_suppressed']}, refused {s['refused']}, "
              f"dead letters {s['dead_letters']}, lag {self.lag}, pending {self.pending}",
              file=sys.stderr, flush=True)

    def remove(self) -> None:
        """The status file goes with its bridge."""
        try:
            os.unlink(self.status_path)
        except OSError:
            pass
