"""``shm-taskwork bridge DOMAIN (--redis URL | --redis-url-file PATH) [--node NODE]
[--allow PATTERN ...]`` (or the URL in ``$SHM_TASKWORK_REDIS_URL``): the
command line of the bridge. The bridge itself, its steps and what a restart
finishes, is ``shm_taskwork.remote.bridge``; the key layout is in
``shm_taskwork.remote.sender``. One bridge per host and domain.

SIGTERM or SIGINT: finish the entry in hand, then exit 0.
"""
from __future__ import annotations

import argparse
import os
import sys

from shm_taskwork import remote
from shm_taskwork.tools._common import positive_seconds

from shm_taskwork.remote.bridge import Bridge, StatusDirError, redact
# the bridges' local files, read by status and export through this module
from shm_taskwork.remote.bridge import private_dir, running_bridges, status_dir

__all__ = ["Bridge", "StatusDirError", "build_parser", "main", "private_dir", "redact", "redis_url",
           "running_bridges", "status_dir"]


URL_ENV = "SHM_TASKWORK_REDIS_URL"


def redis_url(a) -> str:
    """The Redis URL from --redis, --redis-url-file or $SHM_TASKWORK_REDIS_URL
    (the last two keep a password out of argv, which any local user can read
    in /proc). ValueError naming the three if none (or two) is given."""
    given = [x for x in (a.redis, a.redis_url_file) if x is not None]
    if len(given) > 1:
        raise ValueError("give the Redis URL once: --redis URL or --redis-url-file PATH")
    if a.redis_url_file is not None:
        try:
            with open(a.redis_url_file) as f:
                lines = [ln.strip() for ln in f.read(65536).splitlines() if ln.strip()]
        except OSError as exc:
            raise ValueError(f"--redis-url-file {a.redis_url_file}: {exc.strerror}") from None
        if len(lines) != 1:
            raise ValueError(f"--redis-url-file {a.redis_url_file}: the file must hold one "
                             f"URL on one line, found {len(lines)} lines")
        return lines[0]
    if a.redis is not None:
        return a.redis
    env = os.environ.get(URL_ENV, "").strip()
    if env:
        return env
    raise ValueError(f"no Redis URL: give --redis URL, --redis-url-file PATH or set "
                     f"${URL_ENV}")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Move works from Redis Streams into a local domain "
        "(one bridge per host and domain).")
    p.add_argument("domain", help="the local domain")
    p.add_argument("--redis", metavar="URL",
                   help="redis://[user:password@]host:port/db, rediss:// (TLS), unix:///path "
                        "(a password here is visible to local users in the process's argv: "
                        f"prefer --redis-url-file or ${URL_ENV})")
    p.add_argument("--redis-url-file", metavar="PATH",
                   help="read the Redis URL from this file (one line)")
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
    prog = prog or "shm-taskwork bridge"
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    try:
        url = redis_url(a)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        remote.check_name(a.node, "--node", 200)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        import redis
    except ImportError:
        print(f"{prog}: the redis client is not installed: "
              "pip install 'shm-taskwork[remote]'", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if a.progress is None else a.progress
    try:
        b = Bridge(a.domain, url, a.node, a.allow, claim_idle=a.claim_idle, progress=progress,
                   cluster_name=a.cluster_name, keep=max(1, int(a.keep_outcomes)))
    except FileNotFoundError:
        print(f"{prog}: no domain {a.domain!r} on this host "
              "(create it first: shm-taskwork create NAME)", file=sys.stderr)
        return 1
    except StatusDirError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:     # a URL redis-py cannot read: never echoed whole
        print(f"{prog}: {str(exc).replace(url, redact(url))}", file=sys.stderr)
        return 2
    try:
        return b.run()
    except redis.ConnectionError as exc:
        print(f"{prog}: Redis at {redact(url)}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
