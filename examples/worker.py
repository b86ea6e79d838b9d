"""A worker: one task in a domain, running what its supervisor queues.

    python examples/worker.py DOMAIN [NAME]

It joins the domain (creating it if it is the first), registers a task named
NAME (default "worker"), and sleeps in ``task.wait()``, which runs works at
that safe point. SIGTERM (``systemctl stop``) and Ctrl-C end the loop and exit the task: the
works still pending run first, then adds to it raise TaskExitedError (ESRCH),
and the process ends with status 0. (``dom.register(name,
exit_signals=(signal.SIGTERM,))`` does the exit inside the library instead,
then ends the process as SIGTERM would: systemd counts that a clean stop too.)

Queue something on it from any other process:

    from shm_taskwork import Domain, TWA_SIGNAL
    with Domain.open("app") as dom:
        dom.task(name="worker").add("app.reload", b"config.toml", TWA_SIGNAL)
"""
from __future__ import annotations

import signal
import sys

from shm_taskwork import TWA_NMI_CURRENT, Domain, Task, TaskWorkError, Work, callback


@callback(name="app.reload")
def reload(work: Work) -> None:
    print(f"reloading {work.payload.decode(errors='replace')} "
          f"(queued by pid {work.sender_pid})", flush=True)


@callback(name="app.ping")
def ping(work: Work) -> None:
    print("pong", flush=True)


@callback(name="app.worker.wake")
def wake(work: Work) -> None:
    """Queued by the SIGTERM handler on its own task: it wakes wait()."""


def on_term(task: Task, stop: list[bool]) -> None:
    def handler(signum: int, frame: object) -> None:
        stop[0] = True
        # TWA_NMI_CURRENT is safe inside a signal handler: no lock, just a
        # push and a write to the task's own eventfd, which ends wait()
        try:
            task.add(wake, notify=TWA_NMI_CURRENT)
        except TaskWorkError:
            pass  # exiting already
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: worker.py DOMAIN [NAME]", file=sys.stderr)
        return 2
    domain, name = argv[0], (argv[1] if len(argv) > 1 else "worker")
    stop = [False]
    with Domain.open_or_create(domain) as dom, dom.register(name) as task:
        on_term(task, stop)
        print(f"task {task.id} ({name}) of {dom.name} ready, pid {task.pid}", flush=True)
        while not stop[0]:
            task.wait()
        # leaving the `with` exits the task: pending works run, then ESRCH
    print("exited", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
