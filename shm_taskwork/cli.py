"""``shm-taskwork``: one console command; the subcommands live in
``shm_taskwork.tools`` (the repository's top-level ``tools/``).

Each tool module has ``main(argv, prog=..., command=...) -> int``. Errors are
one clear line on stderr and a non-zero exit, never a traceback. Output to a
closed pipe (``shm-taskwork status X | head -1``) ends quietly.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

COMMANDS = {
    "demo": ("shm_taskwork.tools.demo", "the main job on an embedded default"),
    "list": ("shm_taskwork.tools.admin", "every domain on this host"),
    "create": ("shm_taskwork.tools.admin", "create a domain"),
    "destroy": ("shm_taskwork.tools.admin", "remove a domain"),
    "status": ("shm_taskwork.tools.status", "tasks, pool and counters, once (--check: alert)"),
    "top": ("shm_taskwork.tools.top", "live view of a domain"),
    "inspect": ("shm_taskwork.tools.status", "pending works of one task"),
    "dead-letters": ("shm_taskwork.tools.admin", "list, retry or drop a domain's dead letters"),
    "fsck": ("shm_taskwork.tools.admin", "find (and repair) what dead processes held"),
    "stress": ("shm_taskwork.tools.stress",
               "many processes adding, cancelling, running, being killed"),
    "bench": ("shm_taskwork.tools.bench", "this project against its peers, in one run"),
    "export": ("shm_taskwork.tools.export", "Prometheus metrics"),
    "bridge": ("shm_taskwork.tools.bridge", "move works from Redis Streams into a domain"),
    "worker": ("shm_taskwork.tools.worker", "register a task and serve it until stopped"),
}

# The exit status when a command could not do its job at all (no such domain,
# permission denied, a corrupt header): kept apart from the statuses that
# report what a check found. fsck: 8, fsck(8)'s "operational error".
# (`status --check` answers 3, UNKNOWN, itself, on stdout as plugins do.)
ERROR_STATUS = {"fsck": 8}
EPIPE_STATUS = 128 + signal.SIGPIPE  # as a program killed by SIGPIPE


def version() -> str:
    from shm_taskwork import __version__
    return __version__


def usage() -> str:
    lines = ["usage: shm-taskwork COMMAND [options]   (shm-taskwork COMMAND --help)",
             "       shm-taskwork --version", "", "commands:"]
    lines += [f"  {name:<13} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _dispatch(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. stdout points at
        # /dev/null from here on, so the flush at interpreter exit cannot
        # complain about the pipe either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EPIPE_STATUS
    return status


def _dispatch(argv: list[str]) -> int:
    if not argv:
        # no command: the usage, on stderr, and status 2 (a usage error)
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"shm-taskwork {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"shm-taskwork: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    from shm_taskwork.errors import TaskWorkError
    try:
        mod = importlib.import_module(COMMANDS[cmd][0])
    except ImportError as exc:
        print(f"shm-taskwork {cmd}: not available: {exc}", file=sys.stderr)
        return 2
    failed = ERROR_STATUS.get(cmd, 1)
    try:
        return int(mod.main(rest, prog=f"shm-taskwork {cmd}", command=cmd) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except (TaskWorkError, OSError, ValueError) as exc:
        print(f"shm-taskwork {cmd}: {exc}", file=sys.stderr)
        return failed
    except Exception as exc:  # still one line; SHM_TASKWORK_DEBUG=1 shows the traceback
        if os.environ.get("SHM_TASKWORK_DEBUG"):
            raise
        print(f"shm-taskwork {cmd}: unexpected error: {exc!r} "
              "(set SHM_TASKWORK_DEBUG=1 for the traceback)", file=sys.stderr)
        return failed


if __name__ == "__main__":
    sys.exit(main())
