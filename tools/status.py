"""``shm-taskwork status NAME`` and ``shm-taskwork inspect NAME TASK``.

``status`` reads a domain once: its sizes, the pool (``DomainStats``), every
used task slot (``TaskInfo``) with the process's CPU %, resident memory and
state from psutil for the tasks whose process is alive, and the dead-letter
list. ``inspect`` lists the pending works of one task, newest first: callback,
age (now minus ``enqueued_ns``, both CLOCK_MONOTONIC), sender pid, origin
(when the domain records origins) and payload size.

Both only read the segment; neither registers a task or takes a work. With
``--json`` each prints one JSON object (the field names of SPEC section 7).
Errors - no such domain (``FileNotFoundError``), no such task
(``NoSuchTaskError``), a corrupt segment - are raised; the dispatcher prints
them as one line on stderr and exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from shm_taskwork import Domain, NoSuchTaskError
from tools._common import fmt_age, fmt_bytes

LIVE_STATES = ("running", "exiting")
PSUTIL_FIELDS = ("cpu_percent", "rss", "process_status")


# ---- reading --------------------------------------------------------------------

def process_figures(pids: list[int], interval: float) -> dict[int, dict]:
    """pid -> {cpu_percent, rss, process_status} from psutil; None figures for
    a pid that is gone. CPU % is sampled over ``interval`` seconds, or averaged
    over the process's life when ``interval`` is 0."""
    import psutil

    procs: dict[int, "psutil.Process | None"] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.cpu_percent(None)  # primes the sample
            procs[pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            procs[pid] = None
    if interval > 0 and any(procs.values()):
        time.sleep(interval)  # the measurement window of cpu_percent, not a wait on anyone
    out = {}
    for pid, p in procs.items():
        fig = dict.fromkeys(PSUTIL_FIELDS)
        if p is not None:
            try:
                with p.oneshot():
                    if interval > 0:
                        cpu = p.cpu_percent(None)
                    else:
                        t = p.cpu_times()
                        age = max(time.time() - p.create_time(), 1e-3)
                        cpu = 100.0 * (t.user + t.system) / age
                    fig = {"cpu_percent": round(cpu, 1), "rss": p.memory_info().rss,
                           "process_status": p.status()}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        out[pid] = fig
    return out


def status_record(dom: Domain, interval: float = 0.1) -> dict:
    """The object ``status --json`` prints."""
    infos = dom.tasks()
    stats = dom.stats()
    now = time.monotonic_ns()
    live = [t.pid for t in infos if t.state in LIVE_STATES and t.pid > 0]
    figs = process_figures(live, interval)
    tasks = []
    for t in infos:
        rec = t.as_dict()
        rec.update(figs.get(t.pid, dict.fromkeys(PSUTIL_FIELDS)) if t.state in LIVE_STATES
                   else dict.fromkeys(PSUTIL_FIELDS))
        tasks.append(rec)
    dead = []
    for w in dom.dead_letters():
        rec = w.as_dict()
        rec["age_ns"] = now - w.enqueued_ns if w.enqueued_ns else None
        dead.append(rec)
    return {
        "domain": {"name": dom.name, "max_tasks": dom.max_tasks, "pool_size": dom.pool_size,
                   "payload_size": dom.payload_size, "record_origin": dom.record_origin},
        "pool": stats.as_dict(),
        "tasks": tasks,
        "dead_letters": dead,
    }


def find_task(dom: Domain, key: str):
    """TASK on the command line: a task id, ``pid=N``, ``name=TEXT``, or a name."""
    if key.startswith("pid="):
        try:
            return dom.task(pid=int(key[4:]))
        except ValueError:
            raise ValueError(f"pid= needs a number, got {key[4:]!r}") from None
    if key.startswith("name="):
        return dom.task(name=key[5:])
    if key.isdigit():
        return dom.task(int(key))
    return dom.task(name=key)


def inspect_record(dom: Domain, key: str) -> dict:
    """The object ``inspect --json`` prints."""
    task = find_task(dom, key)
    info = next((t for t in dom.tasks() if t.id == task.id and t.generation == task.gen), None)
    if info is None:
        raise NoSuchTaskError(f"task {task.id} of domain {dom.name!r} exited meanwhile")
    now = time.monotonic_ns()
    pending = []
    for w in dom.pending_works(task.id):
        if w.target_gen != task.gen:
            continue
        rec = w.as_dict()
        rec["payload_len"] = len(w.payload)
        rec["age_ns"] = now - w.enqueued_ns
        pending.append(rec)
    return {"domain": dom.name, "task": info.as_dict(), "pending": pending}


# ---- printing -------------------------------------------------------------------

def _table(title: str, head: tuple, rows: list[tuple], out, right=()) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a declared dependency
        print(title, file=out)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        for r in (head, *rows):
            print("  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip(), file=out)
        return
    console = Console(file=out, width=None if out.isatty() else 200, highlight=False)
    t = Table(title=title, title_justify="left")
    for h in head:
        t.add_column(h, justify="right" if h in right else "left", no_wrap=h != "origin")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    console.print(t)


def print_status(rec: dict, out) -> None:
    d, p = rec["domain"], rec["pool"]
    print(f"domain {d['name']}: {d['max_tasks']} task slots, pool of {d['pool_size']} nodes "
          f"with {d['payload_size']}-byte payloads"
          + (", origins recorded" if d.get("record_origin") else ""), file=out)
    print(f"pool: {p['pool_free']} free, {p['pool_used']} used of {p['pool_size']}; "
          f"{p['tasks']} tasks; {p['dead_letters']} dead letters", file=out)
    print("counters: " + ", ".join(f"{k} {p[k]}" for k in (
        "added", "run", "cancelled", "orphaned", "errors", "unknown", "signals_sent",
        "resumes_sent", "pending", "max_pending")), file=out)
    head = ("id", "name", "pid", "state", "added", "run", "cancelled", "orphaned", "errors",
            "unknown", "signals", "resumes", "pending", "max_pending", "cpu %", "rss", "process")
    rows = []
    for t in rec["tasks"]:
        rows.append((t["id"], t["name"], t["pid"], t["state"], t["added"], t["run"],
                     t["cancelled"], t["orphaned"], t["errors"], t["unknown"], t["signals_sent"],
                     t["resumes_sent"], t["pending"], t["max_pending"],
                     "-" if t["cpu_percent"] is None else f"{t['cpu_percent']:.1f}",
                     fmt_bytes(t["rss"]), t["process_status"] or "-"))
    if rows:
        _table("tasks", head, rows, out, right=set(head) - {"name", "state", "process"})
    else:
        print("tasks: none registered", file=out)
    if rec["dead_letters"]:
        rows = [(f"{w['id']:#x}", w["func_name"], w["sender_pid"], w["target"],
                 fmt_age(w["age_ns"]), w["origin"] or "-") for w in rec["dead_letters"]]
        _table(f"dead letters ({len(rows)}): callback unknown to the task that ran them",
               ("work", "callback", "sender", "task", "age", "origin"), rows, out,
               right={"sender", "task", "age"})
    else:
        print("dead letters: none", file=out)


def print_inspect(rec: dict, out) -> None:
    t = rec["task"]
    n = len(rec["pending"])
    print(f"task {t['id']} {t['name']!r} (pid {t['pid']}, {t['state']}) in {rec['domain']}: "
          f"{n} pending work{'s' if n != 1 else ''}" + (", newest first" if n > 1 else ""),
          file=out)
    if not n:
        return
    rows = [(i, f"{w['id']:#x}", w["func_name"], fmt_age(w["age_ns"]), w["sender_pid"],
             w["origin"] or "-", f"{w['payload_len']} B")
            for i, w in enumerate(rec["pending"], 1)]
    _table("pending works", ("#", "work", "callback", "age", "sender", "origin", "payload"),
           rows, out, right={"#", "age", "sender", "payload"})


# ---- entry point -----------------------------------------------------------------

def _interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= v <= 60:
        raise argparse.ArgumentTypeError(f"the interval is 0..60 seconds, got {v}")
    return v


def build_parser(prog: str, command: str) -> argparse.ArgumentParser:
    if command == "inspect":
        p = argparse.ArgumentParser(
            prog=prog, description="The pending works of one task, newest first: callback, "
                                   "age, sender pid, origin, payload size.")
        p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
        p.add_argument("task", metavar="TASK",
                       help="the task: its id, its name, or pid=N / name=TEXT")
        p.add_argument("--json", action="store_true",
                       help='print one object: {"domain", "task", "pending": [...]}')
        return p
    p = argparse.ArgumentParser(
        prog=prog, description="A domain's tasks, pool and counters, read once; CPU %, "
                               "memory and state of each live task's process (psutil); "
                               "the dead letters.")
    p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
    p.add_argument("--json", action="store_true",
                   help='print one object: {"domain", "pool", "tasks", "dead_letters"}')
    p.add_argument("--interval", type=_interval, default=0.1, metavar="SECONDS",
                   help="window for sampling CPU %% (default 0.1; 0: average over the "
                        "process's life)")
    return p


def main(argv=None, prog: str | None = None, command: str = "status") -> int:
    if command not in ("status", "inspect"):
        raise ValueError(f"tools.status serves 'status' and 'inspect', not {command!r}")
    prog = prog or f"shm-taskwork {command}"
    args = build_parser(prog, command).parse_args(argv)
    with Domain.open(args.name) as dom:
        if command == "inspect":
            rec = inspect_record(dom, args.task)
            if args.json:
                print(json.dumps(rec))
            else:
                print_inspect(rec, sys.stdout)
            return 0
        rec = status_record(dom, args.interval)
    if args.json:
        print(json.dumps(rec))
    else:
        print_status(rec, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
