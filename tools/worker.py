"""``shm-taskwork worker DOMAIN NAME -m MODULE [-m MODULE ...] [--create]
[--drain-timeout S] [--no-adopt]``: a worker in one command.

Imports the modules (their ``@callback`` definitions), opens the domain
(creates it with ``--create``), registers NAME and serves it
(``Task.serve``): works run as they arrive until SIGTERM or SIGINT, then the
queue drains for at most ``--drain-timeout`` seconds, what is left becomes
``shutdown`` dead letters for the next worker of the name to adopt, and the
command exits 0. Under systemd (``Type=notify``) it reports READY, STATUS,
WATCHDOG and STOPPING. A module that cannot be imported or a domain that
cannot be opened is one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from shm_taskwork.tools._common import number_arg


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    p.add_argument("domain", help="domain name")
    p.add_argument("name", help="the task name to register")
    p.add_argument("-m", "--module", action="append", required=True, metavar="MODULE",
                   help="a module to import for its @callback definitions (repeatable)")
    p.add_argument("--create", action="store_true",
                   help="create the domain if it does not exist")
    p.add_argument("--drain-timeout", type=number_arg(float, "--drain-timeout", 0, 1e9),
                   default=30.0, metavar="S",
                   help="seconds the queue may drain after a stop signal (default 30)")
    p.add_argument("--no-adopt", action="store_true",
                   help="do not take over the orphaned and shutdown dead letters of NAME")
    return p


def main(argv=None, prog: str | None = None, command: str = "worker") -> int:
    import signal
    # A stop signal before serve() takes it must not kill the worker with its
    # queue: held until serve() subscribes (it unblocks them), then drained.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    args = build_parser(prog or "shm-taskwork worker").parse_args(argv)
    p = prog or "shm-taskwork worker"
    # `-m pkg.mod` finds modules as `python -m` does: the current directory first
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for mod in args.module:
        try:
            importlib.import_module(mod)
        except Exception as exc:
            print(f"{p}: cannot import module {mod!r}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 1
    from shm_taskwork import Domain
    from shm_taskwork.errors import TaskWorkError
    try:
        dom = Domain.open_or_create(args.domain) if args.create else Domain.open(args.domain)
    except (TaskWorkError, OSError, ValueError) as exc:
        print(f"{p}: cannot open domain {args.domain!r}: {exc}", file=sys.stderr)
        return 1
    with dom:
        task = dom.register(args.name)
        print(f"{p}: task {task.id} ({args.name}) of {dom.name} serving, pid {os.getpid()}",
              file=sys.stderr, flush=True)
        ran = task.serve(drain_timeout=args.drain_timeout, adopt=not args.no_adopt)
        print(f"{p}: stopped after {ran} work(s)", file=sys.stderr, flush=True)
    return 0
