"""``shm-taskwork``: one console command, subcommands in ``tools/``.

Each tool module has ``main(argv) -> int``. Errors are one clear line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "demo": ("tools.demo", "the main job on an embedded default"),
    "create": ("tools.admin", "create a domain"),
    "destroy": ("tools.admin", "remove a domain"),
    "status": ("tools.status", "tasks, pool and counters, once"),
    "top": ("tools.top", "live view of a domain"),
    "inspect": ("tools.status", "pending works of one task"),
    "fsck": ("tools.admin", "find (and repair) what dead processes held"),
    "stress": ("tools.stress", "many processes adding, cancelling, running, being killed"),
    "bench": ("tools.bench", "this project against its peers, in one run"),
    "export": ("tools.export", "Prometheus metrics"),
}


def usage() -> str:
    lines = ["usage: shm-taskwork COMMAND [options]   (shm-taskwork COMMAND --help)", "",
             "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
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
    try:
        return int(mod.main(rest, prog=f"shm-taskwork {cmd}", command=cmd) or 0)
    except KeyboardInterrupt:
        return 130
    except (TaskWorkError, OSError, ValueError) as exc:
        print(f"shm-taskwork {cmd}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # still one line; SHM_TASKWORK_DEBUG=1 shows the traceback
        if os.environ.get("SHM_TASKWORK_DEBUG"):
            raise
        print(f"shm-taskwork {cmd}: unexpected error: {exc!r} "
              "(set SHM_TASKWORK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
