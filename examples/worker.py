"""A worker: one task in a domain, running what its supervisor queues.

Run it under systemd with ``shm-taskwork worker`` (see
``systemd/shm-taskwork-worker@.service``), which imports this module for its
callbacks, or by itself:

    python examples/worker.py DOMAIN [NAME]

Either way the task serves (``Task.serve``): works run as they arrive;
SIGTERM (``systemctl stop``, ``docker stop``) or Ctrl-C drains the queue for
at most 20 s (works still queued then are kept as ``shutdown`` dead letters,
which the next worker of the name adopts), and the process ends with status 0.

Queue something on it from any other process:

    from shm_taskwork import Domain, TWA_SIGNAL
    with Domain.open("app") as dom:
        dom.task(name="worker").add("app.reload", b"config.toml", TWA_SIGNAL)
"""
from __future__ import annotations

import sys

from shm_taskwork import Domain, Work, callback


@callback(name="app.reload", retries=2)
def reload(work: Work) -> None:
    print(f"reloading {work.payload.decode(errors='replace')} "
          f"(queued by pid {work.sender_pid})", flush=True)


@callback(name="app.ping")
def ping(work: Work) -> None:
    print("pong", flush=True)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: worker.py DOMAIN [NAME]", file=sys.stderr)
        return 2
    domain, name = argv[0], (argv[1] if len(argv) > 1 else "worker")
    with Domain.open_or_create(domain) as dom:
        task = dom.register(name)
        print(f"task {task.id} ({name}) of {dom.name} ready, pid {task.pid}", flush=True)
        ran = task.serve(drain_timeout=20.0)
    print(f"exited after {ran} work(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
