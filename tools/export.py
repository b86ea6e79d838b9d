"""``shm-taskwork export NAME``: Prometheus metrics of one domain (SPEC section 8).

A custom collector reads the domain at scrape time (``dom.tasks(reap=False)``,
``dom.stats()``): nothing is cached between scrapes and nothing is written to
the segment, so the exporter may watch a domain under full load and may run
beside any number of other readers. The metrics are served over HTTP with
``prometheus_client.start_http_server`` on 127.0.0.1 by default, until
SIGTERM or Ctrl-C (exit status 0); ``--once`` prints the text exposition to
stdout and exits.

Metrics (labels ``domain``, ``task`` (the slot id) and ``name`` per task):

  shm_taskwork_task_<counter>_total   added, run, cancelled, orphaned, errors,
                                      unknown, signals_sent, resumes_sent
  shm_taskwork_task_pending           works queued now
  shm_taskwork_task_max_pending       the most ever queued at once
  shm_taskwork_task_up                1 while the process lives (running or
                                      exiting), 0 once it is dead or has exited
  shm_taskwork_task_info              1, with the pid and state as labels
  shm_taskwork_pool_size / _free / _used, shm_taskwork_dead_letters,
  shm_taskwork_tasks                  the pool and the domain (label ``domain``)

A task slot is reused by the next registration, which starts its counters at
zero again: Prometheus treats that as a counter reset.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from prometheus_client.registry import Collector

EPILOG = """\
The exporter only reads the segment: it takes no lock and registers no task.
It listens on 127.0.0.1 unless --addr says otherwise (the metrics name the
processes of the host: think before exposing them). --port 0 lets the system
pick a free port. The first line on stdout says where it listens. SIGTERM or
Ctrl-C stops it with exit status 0.
"""

PREFIX = "shm_taskwork"

TASK_COUNTERS = {
    "added": "Works queued onto the task.",
    "run": "Works the task ran.",
    "cancelled": "Works cancelled before they ran.",
    "orphaned": "Pending works reclaimed by fsck after the task's process died.",
    "errors": "Callbacks that raised.",
    "unknown": "Works whose callback was unknown to the task (kept as dead letters).",
    "signals_sent": "Signals sent to the task's process (TWA_SIGNAL).",
    "resumes_sent": "Eventfd writes to wake the task (TWA_RESUME, TWA_NMI_CURRENT).",
}
TASK_GAUGES = {
    "pending": "Works queued on the task now.",
    "max_pending": "The most works ever queued on the task at once.",
}
POOL_GAUGES = {
    "pool_size": ("pool_size", "Work nodes in the domain's pool."),
    "pool_free": ("pool_free", "Work nodes on the free list."),
    "pool_used": ("pool_used", "Work nodes allocated, queued, running or dead letters."),
    "dead_letters": ("dead_letters", "Works kept because their callback was unknown."),
    "tasks": ("tasks", "Task slots in use by a task that has not exited."),
}
LIVE_STATES = ("running", "exiting")


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free port), got {value}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Serve a task-work domain's counters, pending works, pool\n"
        "and task liveness as Prometheus metrics.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="domain name")
    p.add_argument("--port", type=_port, default=9464, help="TCP port (default 9464)")
    p.add_argument("--addr", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--once", action="store_true",
                   help="print the metrics in the text exposition format and exit")
    return p


class DomainCollector(Collector):
    """A prometheus_client collector: every ``collect()`` reads the domain anew.

    Scrapes may arrive on several server threads at once; a lock keeps them
    from reading through the same Domain object at the same time."""

    def __init__(self, dom):
        self.dom = dom
        self._lock = threading.Lock()

    def describe(self):
        return []  # no fixed set of series: registering must not scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            infos = self.dom.tasks(reap=False)
            stats = self.dom.stats(reap=False)
        domain = self.dom.name
        labels = ["domain", "task", "name"]

        counters = {k: CounterMetricFamily(f"{PREFIX}_task_{k}", doc, labels=labels)
                    for k, doc in TASK_COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(f"{PREFIX}_task_{k}", doc, labels=labels)
                  for k, doc in TASK_GAUGES.items()}
        up = GaugeMetricFamily(f"{PREFIX}_task_up", "1 while the task's process lives "
                               "(running or exiting), 0 once it is dead or has exited.",
                               labels=labels)
        info = GaugeMetricFamily(f"{PREFIX}_task_info", "Always 1; the task's pid and state "
                                 "(running, exiting, exited, dead) as labels.",
                                 labels=labels + ["pid", "state"])
        for t in infos:
            values = [domain, str(t.id), t.name]
            for k, fam in counters.items():
                fam.add_metric(values, getattr(t, k))
            for k, fam in gauges.items():
                fam.add_metric(values, getattr(t, k))
            up.add_metric(values, 1 if t.state in LIVE_STATES else 0)
            info.add_metric(values + [str(t.pid), t.state], 1)
        yield from counters.values()
        yield from gauges.values()
        yield up
        yield info
        for metric, (field, doc) in POOL_GAUGES.items():
            fam = GaugeMetricFamily(f"{PREFIX}_{metric}", doc, labels=["domain"])
            fam.add_metric([domain], getattr(stats, field))
            yield fam


def registry_for(dom):
    """A fresh CollectorRegistry holding only this domain's collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DomainCollector(dom))
    return registry


def _serve(dom, registry, port: int, addr: str) -> None:
    from prometheus_client import start_http_server

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            started = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot listen on {addr} port {port}: "
                          f"{exc.strerror or exc}") from None
        server = started[0] if isinstance(started, tuple) else None
        if server is not None:
            host, port = server.server_address[:2]
        else:
            host = addr
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {dom.name} metrics on http://{shown}:{port}/metrics", flush=True)
        try:
            while not stop.wait(3600):
                pass
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None, *, prog: str | None = None,
         command: str | None = "export") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog or "shm-taskwork export").parse_args(argv)
    from prometheus_client import generate_latest

    from shm_taskwork import Domain

    dom = Domain.open(args.name)
    try:
        registry = registry_for(dom)
        if args.once:
            sys.stdout.write(generate_latest(registry).decode())
            sys.stdout.flush()
            return 0
        try:
            _serve(dom, registry, args.port, args.addr)
        except KeyboardInterrupt:  # Ctrl-C before the handler was installed
            pass
        return 0
    finally:
        dom.close()


if __name__ == "__main__":
    sys.exit(main())
