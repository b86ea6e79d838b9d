"""``shm-taskwork export NAME``: Prometheus metrics of one domain (docs/operations.md).

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
  shm_taskwork_task_info              1, with the pid and state as labels (state:
                                      running, exiting, exited, dead - died, not
                                      reaped yet - or reaped)
  shm_taskwork_task_unreadable        1 when the task's list could not be read at
                                      this scrape (another process held its lock
                                      past the scrape's lock budget): its pending
                                      figures then say 0
  shm_taskwork_task_oldest_pending_seconds   age of the oldest pending work (0: none)
  shm_taskwork_running_works          works a run of the task has taken and not
                                      finished (pending + running: its backlog)
  shm_taskwork_oldest_running_seconds  age, since it was queued, of the oldest
                                      of them (0: none)
  shm_taskwork_task_cpu_seconds_total  CPU time (user + system) of the task's
                                      process, from psutil (live tasks only)
  shm_taskwork_task_resident_memory_bytes   its resident set size (psutil)
  shm_taskwork_task_latency_seconds   histogram: enqueue-to-start latency of the
                                      works the task ran
  shm_taskwork_task_duration_seconds  histogram: duration of its callbacks
  shm_taskwork_callback_latency_seconds / _duration_seconds   the same per
                                      callback name (label ``callback``), over
                                      every task (entries of the name table that
                                      carry the same name are summed: one series
                                      per name)
  (The runner keeps the histograms in the segment - per task in its slot, per
  callback in the name table - with one clock read per work; buckets are
  powers of two from 1.024 us to 68.7 s.)
  shm_taskwork_pool_size / _free / _used, shm_taskwork_dead_letters,
  shm_taskwork_tasks                  the pool and the domain (label ``domain``)
  shm_taskwork_proc_table_used / _size    entries of the process table in use
  shm_taskwork_name_table_used / _size    names kept (callbacks, tasks) / room for them
  shm_taskwork_domain_up              1 while the name leads to a readable domain

A task slot is reused by the next registration, which starts its counters at
zero again: Prometheus treats that as a counter reset.

The exporter is given a name, not a segment: at each scrape it checks that the
segment behind the name is the one it mapped (the inode of /dev/shm/NAME and
the creation time in its header). When the domain was destroyed and created
again it maps the new one; while there is none it serves only
``shm_taskwork_domain_up 0``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from prometheus_client.registry import Collector

from shm_taskwork import observe

EPILOG = """\
The exporter only reads the segment: it registers no task and changes nothing.
It takes a task's list lock only to count its works, and waits for locks
other processes hold at most Domain.READ_LOCK_BUDGET seconds per scrape in
all; a task it could not read has shm_taskwork_task_unreadable 1.
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


def segment_identity(name: str) -> tuple[int, int, int] | None:
    """(device, inode, created_ns) of the segment behind a domain name, or
    None when there is none (or it is still being formatted, or the name is
    not a regular file: a FIFO there is never opened in a way that blocks)."""
    try:
        h = observe.segment_header(name)
    except OSError:
        return None
    if h is None or not h.magic_ok or h.created_ns is None:
        return None
    return h.dev, h.ino, h.created_ns


def hist_value(h: observe.Histogram) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets with their ``le`` labels, sum in seconds)."""
    return ([("+Inf" if le == float("inf") else repr(le), float(n))
             for le, n in h.cumulative()], h.sum_ns / 1e9)


def process_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, RSS bytes) of a process, from psutil; None if it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return t.user + t.system, p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class DomainCollector(Collector):
    """A prometheus_client collector: every ``collect()`` reads the domain anew.

    Scrapes may arrive on several server threads at once; a lock keeps them
    from reading through the same Domain object at the same time. Before each
    scrape the segment behind the name is checked to be the one mapped; a
    domain destroyed and created again is mapped anew."""

    def __init__(self, dom=None, *, name: str | None = None):
        from shm_taskwork.domain import normalize_name

        self.name = normalize_name(name if name is not None else dom.name)
        self.dom = dom
        self.ident = segment_identity(self.name) if dom is not None else None
        self.reopened = 0
        self._lock = threading.Lock()

    def describe(self):
        return []  # no fixed set of series: registering must not scrape

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self.dom is not None:
            self.dom.close()
            self.dom = None

    def _current(self):
        """The mapped domain, re-opened if the name now leads to another
        segment; None while there is no readable domain of that name."""
        from shm_taskwork import Domain, TaskWorkError

        ident = segment_identity(self.name)
        if ident is None:
            self._drop()
            return None
        if self.dom is not None and ident == self.ident:
            return self.dom
        had = self.dom is not None or self.ident is not None
        self._drop()
        try:
            dom = Domain.open(self.name)
        except (OSError, TaskWorkError):
            return None
        # the identity of what was just mapped: re-read, the name may have moved on
        if segment_identity(self.name) != ident:
            dom.close()
            return None
        self.dom, self.ident = dom, ident
        if had:
            self.reopened += 1
        return dom

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        with self._lock:
            dom = self._current()
            if dom is not None:
                # one lock budget for the whole scrape (README, Security)
                deadline = time.monotonic_ns() + int(dom.READ_LOCK_BUDGET * 1e9)
                infos = dom.tasks(reap=False)
                stats = dom.stats(infos=infos)
                now = time.monotonic_ns()
                oldest = {t.id: (observe.oldest_pending_ns(dom, t.id, t.generation, deadline)
                                 if t.pending else None) for t in infos}
                fill = observe.table_fill(dom)
                slot_hists = {t.id: tuple(hist_value(h)
                                          for h in observe.task_histograms(dom, t.id))
                              for t in infos}
                cb_hists = [(name, hist_value(lat), hist_value(dur))
                            for name, lat, dur in observe.callback_histograms(dom)]
        domain = self.name
        up = GaugeMetricFamily(f"{PREFIX}_domain_up", "1 while the name leads to a readable "
                               "task-work domain, 0 while there is none.", labels=["domain"])
        up.add_metric([domain], 0 if dom is None else 1)
        yield up
        reopened = CounterMetricFamily(f"{PREFIX}_domain_reopened", "Times the exporter "
                                       "mapped the domain anew after it was destroyed and "
                                       "created again.", labels=["domain"])
        reopened.add_metric([domain], self.reopened)
        yield reopened
        if dom is None:
            return
        labels = ["domain", "task", "name"]

        counters = {k: CounterMetricFamily(f"{PREFIX}_task_{k}", doc, labels=labels)
                    for k, doc in TASK_COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(f"{PREFIX}_task_{k}", doc, labels=labels)
                  for k, doc in TASK_GAUGES.items()}
        task_up = GaugeMetricFamily(f"{PREFIX}_task_up", "1 while the task's process lives "
                                    "(running or exiting), 0 once it is dead or has exited.",
                                    labels=labels)
        info = GaugeMetricFamily(f"{PREFIX}_task_info", "Always 1; the task's pid and state "
                                 "(running, exiting, exited, dead: died and not reaped yet, "
                                 "reaped: its works are dead letters) as labels.",
                                 labels=labels + ["pid", "state"])
        unreadable = GaugeMetricFamily(f"{PREFIX}_task_unreadable", "1 when the task's list "
                                       "could not be read at this scrape: another process "
                                       "held its lock past the scrape's lock budget (its "
                                       "pending figures then say 0).", labels=labels)
        age = GaugeMetricFamily(f"{PREFIX}_task_oldest_pending_seconds", "Age of the oldest "
                                "work pending on the task (0 when none is).", labels=labels)
        running = GaugeMetricFamily(f"{PREFIX}_running_works", "Works a run of the task "
                                    "has taken and not finished.", labels=labels)
        running_age = GaugeMetricFamily(f"{PREFIX}_oldest_running_seconds", "Age, since it "
                                        "was queued, of the oldest work a run of the task has "
                                        "taken and not finished (0 when none).", labels=labels)
        cpu = CounterMetricFamily(f"{PREFIX}_task_cpu_seconds", "CPU time (user + system) "
                                  "of the task's process (psutil).", labels=labels)
        rss = GaugeMetricFamily(f"{PREFIX}_task_resident_memory_bytes", "Resident set size "
                                "of the task's process (psutil).", labels=labels)
        t_lat = HistogramMetricFamily(f"{PREFIX}_task_latency_seconds", "Enqueue-to-start "
                                      "latency of the works the task ran (kept by its runner "
                                      "in the segment).", labels=labels)
        t_dur = HistogramMetricFamily(f"{PREFIX}_task_duration_seconds", "Duration of the "
                                      "callbacks the task ran.", labels=labels)
        for t in infos:
            values = [domain, str(t.id), t.name]
            for k, fam in counters.items():
                fam.add_metric(values, getattr(t, k))
            for k, fam in gauges.items():
                fam.add_metric(values, getattr(t, k))
            live = t.state in LIVE_STATES
            task_up.add_metric(values, 1 if live else 0)
            info.add_metric(values + [str(t.pid), t.state], 1)
            unreadable.add_metric(values, 1 if t.unreadable else 0)
            e = oldest.get(t.id)
            age.add_metric(values, 0.0 if e is None else max(0, now - e) / 1e9)
            running.add_metric(values, t.running)
            running_age.add_metric(values, t.oldest_running_s or 0.0)
            usage = process_usage(t.pid) if live and t.pid > 0 else None
            if usage is not None:
                cpu.add_metric(values, usage[0])
                rss.add_metric(values, usage[1])
            (lat_b, lat_s), (dur_b, dur_s) = slot_hists[t.id]
            t_lat.add_metric(values, lat_b, lat_s)
            t_dur.add_metric(values, dur_b, dur_s)
        yield from counters.values()
        yield from gauges.values()
        yield task_up
        yield info
        yield unreadable
        yield age
        yield running
        yield running_age
        yield cpu
        yield rss
        yield t_lat
        yield t_dur
        c_lat = HistogramMetricFamily(f"{PREFIX}_callback_latency_seconds", "Enqueue-to-start "
                                      "latency of the works of a callback, on every task.",
                                      labels=["domain", "callback"])
        c_dur = HistogramMetricFamily(f"{PREFIX}_callback_duration_seconds", "Duration of a "
                                      "callback, on every task.", labels=["domain", "callback"])
        for name, (lat_b, lat_s), (dur_b, dur_s) in cb_hists:
            c_lat.add_metric([domain, name], lat_b, lat_s)
            c_dur.add_metric([domain, name], dur_b, dur_s)
        yield c_lat
        yield c_dur
        for metric, (field, doc) in POOL_GAUGES.items():
            fam = GaugeMetricFamily(f"{PREFIX}_{metric}", doc, labels=["domain"])
            fam.add_metric([domain], getattr(stats, field))
            yield fam
        for table, (used, size) in fill.items():
            what = ("Process-table entries in use (processes that add or run works)"
                    if table == "proc_table" else
                    "Names kept in the name table (callbacks, and tasks for their dead letters)")
            fam = GaugeMetricFamily(f"{PREFIX}_{table}_used", what + ".", labels=["domain"])
            fam.add_metric([domain], used)
            yield fam
            fam = GaugeMetricFamily(f"{PREFIX}_{table}_size", f"Entries of the {table.replace('_', ' ')}.",
                                    labels=["domain"])
            fam.add_metric([domain], size)
            yield fam
        yield from bridge_metrics(domain)


# The bridge's figures (README "More than one host"), from the bridges of this domain running on
# this host: gauges and counters labelled by node.
BRIDGE_GAUGES = {"lag": "Entries of the bridge's streams not yet read by its groups.",
                 "pending_entries": "Entries the bridge read or claimed and has not finished."}
BRIDGE_COUNTERS = {
    "delivered": "Remote works the bridge queued (or filed as dead letters) here.",
    "duplicates_suppressed": "Remote works seen again and recognised by their key: not queued.",
    "refused": "Remote works refused: their callback matches no --allow pattern.",
    "dead_letters": "Remote works filed as dead letters: no live task of their name.",
    "cancelled": "Delivered remote works cancelled here at a sender's request.",
    "taken_over": "Entries taken over from a silent bridge (XAUTOCLAIM).",
}


def bridge_metrics(domain: str):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from shm_taskwork.tools.bridge import running_bridges
    recs = running_bridges(domain)
    up = GaugeMetricFamily(f"{PREFIX}_bridge_up", "1 per running bridge of the domain.",
                           labels=["domain", "node"])
    for r in recs:
        up.add_metric([domain, r["node"]], 1)
    yield up
    for k, doc in BRIDGE_GAUGES.items():
        fam = GaugeMetricFamily(f"{PREFIX}_bridge_{k}", doc, labels=["domain", "node"])
        for r in recs:
            fam.add_metric([domain, r["node"]], r.get(k, 0))
        yield fam
    for k, doc in BRIDGE_COUNTERS.items():
        fam = CounterMetricFamily(f"{PREFIX}_bridge_{k}", doc, labels=["domain", "node"])
        for r in recs:
            fam.add_metric([domain, r["node"]], r.get(k, 0))
        yield fam


def registry_for(dom=None, *, name: str | None = None):
    """A fresh CollectorRegistry holding only this domain's collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DomainCollector(dom, name=name))
    return registry


def _serve(name: str, registry, port: int, addr: str) -> None:
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
        print(f"serving {name} metrics on http://{shown}:{port}/metrics", flush=True)
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

    # No such domain at the start is an error; later, while it is gone, the
    # exporter serves domain_up 0 and maps the next one of that name.
    collector = DomainCollector(Domain.open(args.name))
    try:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        if args.once:
            sys.stdout.write(generate_latest(registry).decode())
            sys.stdout.flush()
            return 0
        try:
            _serve(collector.name, registry, args.port, args.addr)
        except KeyboardInterrupt:  # Ctrl-C before the handler was installed
            pass
        return 0
    finally:
        collector.close()


if __name__ == "__main__":
    sys.exit(main())
