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
from shm_taskwork.tools._common import (count_int, fmt_age, fmt_bytes, number_arg,
                                       oldest_pending_ns, plain_table, positive_int,
                                       positive_seconds, printable, text_cell)

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
    """The object ``status --json`` prints. A task whose list lock another
    process held past the read's budget has ``"unreadable": true``."""
    infos = dom.tasks()   # reaps a dead task: it shows as dead, its works as dead letters
    stats = dom.stats(infos=infos)  # the same read, summed
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
        # one object per bridge of this domain running on this host (SPEC §10)
        "bridge": _bridges(dom),
    }


def _bridges(dom: Domain) -> list[dict]:
    from shm_taskwork.tools.bridge import running_bridges
    return running_bridges(dom.name)


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


def inspect_record(dom: Domain, key: str, *, limit: int | None = None,
                   callback: str | None = None) -> dict:
    """The object ``inspect --json`` prints: ``pending`` holds the works shown
    (newest first; only those of ``callback``, at most ``limit``), while
    ``total_pending`` and ``by_callback`` count every pending work."""
    task = find_task(dom, key)
    info = next((t for t in dom.tasks(reap=False)
                 if t.id == task.id and t.generation == task.gen), None)
    if info is None:
        raise NoSuchTaskError(f"task {task.id} of domain {dom.name!r} exited meanwhile")
    now = time.monotonic_ns()
    pending = []
    by_callback: dict[str, int] = {}
    total = 0
    for w in dom.pending_works(task.id):
        if w.target_gen != task.gen:
            continue
        total += 1
        by_callback[w.func_name] = by_callback.get(w.func_name, 0) + 1
        if callback is not None and w.func_name != callback:
            continue
        if limit is not None and len(pending) >= limit:
            continue
        rec = w.as_dict()
        rec["payload_len"] = len(w.payload)
        rec["age_ns"] = now - w.enqueued_ns
        pending.append(rec)
    return {"domain": dom.name, "task": info.as_dict(), "total_pending": total,
            "by_callback": dict(sorted(by_callback.items(), key=lambda kv: (-kv[1], kv[0]))),
            "pending": pending}


# ---- printing -------------------------------------------------------------------

def _table(title: str, head: tuple, rows: list[tuple], out, right=()) -> None:
    """A rich table. Every cell is shown escaped (``printable``) and as text,
    never parsed as rich markup: the names in it are the segment's."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a declared dependency
        print(title, file=out)
        rows = [tuple(printable(str(x)) for x in r) for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        for r in (head, *rows):
            print("  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip(), file=out)
        return
    console = Console(file=out, width=None if out.isatty() else 200, highlight=False)
    t = Table(title=text_cell(title), title_justify="left")
    for h in head:
        t.add_column(h, justify="right" if h in right else "left", no_wrap=h != "origin")
    for r in rows:
        t.add_row(*(text_cell(x) for x in r))
    console.print(t)


def print_status(rec: dict, out) -> None:
    d, p = rec["domain"], rec["pool"]
    print(f"domain {printable(d['name'])}: {d['max_tasks']} task slots, pool of "
          f"{d['pool_size']} nodes "
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
                     t["resumes_sent"], "unreadable" if t.get("unreadable") else t["pending"],
                     t["max_pending"],
                     "-" if t["cpu_percent"] is None else f"{t['cpu_percent']:.1f}",
                     fmt_bytes(t["rss"]), t["process_status"] or "-"))
    if rows:
        _table("tasks", head, rows, out, right=set(head) - {"name", "state", "process"})
    else:
        print("tasks: none registered", file=out)
    unreadable = sum(1 for t in rec["tasks"] if t.get("unreadable"))
    if unreadable:
        print(f"{unreadable} task{'s' if unreadable != 1 else ''} unreadable: another process "
              "held the list lock past this read's budget (their pending works are not "
              "counted)", file=out)
    if rec["dead_letters"]:
        rows = [(f"{w['id']:#x}", w.get("reason") or "-", w["func_name"],
                 w.get("target_name") or "-", w["target"], w["sender_pid"],
                 fmt_age(w["age_ns"]), w["origin"] or "-") for w in rec["dead_letters"]]
        _table(f"dead letters ({len(rows)}): `shm-taskwork dead-letters` retries or drops them",
               ("work", "reason", "callback", "for task", "slot", "sender", "age", "origin"),
               rows, out, right={"slot", "sender", "age"})
    else:
        print("dead letters: none", file=out)


def print_inspect(rec: dict, out, *, callback: str | None = None) -> None:
    """Plain columns, not a rich table: a task may hold tens of thousands of
    works, and this prints them as fast as ``--json`` does."""
    t = rec["task"]
    total, shown = rec["total_pending"], len(rec["pending"])
    out.write(f"task {t['id']} {t['name']!r} (pid {t['pid']}, {t['state']}) in "
              f"{printable(rec['domain'])}: "
              f"{total} pending work{'s' if total != 1 else ''}"
              + (", newest first" if total > 1 else "") + "\n")
    if not total:
        return
    by_cb = list(rec["by_callback"].items())
    out.write("by callback: " + ", ".join(f"{printable(cb)} {n}" for cb, n in by_cb[:8])
              + (f", and {len(by_cb) - 8} more callbacks" if len(by_cb) > 8 else "") + "\n")
    matching = total if callback is None else rec["by_callback"].get(callback, 0)
    if callback is not None:
        out.write(f"callback {callback!r}: {matching} of them\n")
    if shown < matching:
        out.write(f"showing the newest {shown} (--limit)\n")
    if not shown:
        return
    rows = [(i, f"{w['id']:#x}", printable(w["func_name"]), fmt_age(w["age_ns"], compact=True),
             w["sender_pid"], printable(w["origin"] or "-"), f"{w['payload_len']}B")
            for i, w in enumerate(rec["pending"], 1)]
    plain_table(("#", "work", "callback", "age", "sender", "origin", "payload"), rows, out,
                right={"#", "age", "sender", "payload"})


# ---- entry point -----------------------------------------------------------------

_interval = number_arg(float, "a number of seconds", 0, 60)
_percent = number_arg(float, "a percentage", 0, 100)


INSPECT_EPILOG = """\
The text view prints plain columns, as fast as --json. With --callback only
that callback's works are listed, and --limit N keeps the newest N; the
header still counts every pending work, by callback.
"""

CHECK_EPILOG = """\
--check: one summary line on stdout and the exit status of a monitoring plugin
(Nagios, Icinga, Sensu, Zabbix agents):
  0 OK        nothing below
  1 WARNING   more dead letters than --max-dead-letters (default 0); less of
              the pool free than --min-pool-free percent (default 10); a
              pending work older than --max-oldest seconds (default: no limit)
  2 CRITICAL  a dead task (its process is gone: run fsck --repair, or let the
              next adder reap it); the pool is empty (adds fail)
  3 UNKNOWN   the domain could not be read (no such domain, permission, a
              corrupt header)
The line ends with performance data after a '|'.
"""

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
CHECK_WORDS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def check_domain(dom: Domain, *, max_dead_letters: int = 0, min_pool_free: float = 10.0,
                 max_oldest: float | None = None) -> tuple[int, str]:
    """(exit status, summary line) of ``status --check``. It only reads: a
    dead task stays dead (CRITICAL) until a process that adds, or fsck, reaps
    it; its works then are dead letters (WARNING)."""
    # one lock budget for the whole check (README, Security)
    deadline = time.monotonic_ns() + int(dom.READ_LOCK_BUDGET * 1e9)
    infos = dom.tasks(reap=False)
    stats = dom.stats(infos=infos)
    now = time.monotonic_ns()
    crit: list[str] = []
    warn: list[str] = []
    dead = [t for t in infos if t.state == "dead"]
    if dead:
        who = ", ".join(f"{printable(t.name)} (task {t.id}, pid {t.pid})" for t in dead[:3])
        more = f" and {len(dead) - 3} more" if len(dead) > 3 else ""
        crit.append(f"{len(dead)} dead task{'s' if len(dead) != 1 else ''}: {who}{more}")
    free_pct = 100.0 * stats.pool_free / stats.pool_size if stats.pool_size else 0.0
    if stats.pool_free == 0:
        crit.append(f"the pool is empty (0 of {stats.pool_size} nodes free): adds fail")
    elif free_pct < min_pool_free:
        warn.append(f"pool {free_pct:.1f}% free (less than {min_pool_free:g}%)")
    if stats.dead_letters > max_dead_letters:
        warn.append(f"{stats.dead_letters} dead letters (more than {max_dead_letters})")
    unreadable = [t for t in infos if t.unreadable]
    if unreadable:
        warn.append(f"{len(unreadable)} task{'s' if len(unreadable) != 1 else ''} unreadable "
                    "(another process held the list lock)")
    oldest_ns = None
    oldest_task = None
    for t in infos:
        if t.state in LIVE_STATES + ("dead",) and t.pending:
            e = oldest_pending_ns(dom, t.id, t.generation, deadline)
            if e is not None and (oldest_ns is None or now - e > oldest_ns):
                oldest_ns, oldest_task = now - e, t
    if max_oldest is not None and oldest_ns is not None and oldest_ns > max_oldest * 1e9:
        warn.append(f"oldest pending work {fmt_age(oldest_ns)} old on "
                    f"{printable(oldest_task.name)} "
                    f"(task {oldest_task.id}; more than {max_oldest:g} s)")
    live = sum(1 for t in infos if t.state in LIVE_STATES)
    code = CRITICAL if crit else WARNING if warn else OK
    what = "; ".join(crit + warn) or (
        f"{live} live task{'s' if live != 1 else ''}, {stats.pending} pending, "
        f"pool {free_pct:.1f}% free, {stats.dead_letters} dead letters")
    oldest_s = 0.0 if oldest_ns is None else oldest_ns / 1e9
    perf = (f"tasks={live} dead_tasks={len(dead)};;0 pending={stats.pending} "
            f"dead_letters={stats.dead_letters};{max_dead_letters} "
            f"pool_free={free_pct:.1f}%;{min_pool_free:g}:;;0;100 "
            f"oldest_pending={oldest_s:.3f}s;{'' if max_oldest is None else f'{max_oldest:g}'}")
    return code, f"SHM-TASKWORK {CHECK_WORDS[code]} - {printable(dom.name)}: {what} | {perf}"


def _check(args) -> int:
    from shm_taskwork import TaskWorkError
    try:
        with Domain.open(args.name) as dom:
            code, line = check_domain(dom, max_dead_letters=args.max_dead_letters,
                                      min_pool_free=args.min_pool_free,
                                      max_oldest=args.max_oldest)
    except (TaskWorkError, OSError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        code, line = (UNKNOWN, f"SHM-TASKWORK UNKNOWN - {printable(args.name)}: "
                               f"{printable(str(exc))}")
    print(line)
    return code


def build_parser(prog: str, command: str) -> argparse.ArgumentParser:
    if command == "inspect":
        p = argparse.ArgumentParser(
            prog=prog, description="The pending works of one task, newest first: callback, "
                                   "age, sender pid, origin, payload size.",
            epilog=INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
        p.add_argument("task", metavar="TASK",
                       help="the task: its id, its name, or pid=N / name=TEXT")
        p.add_argument("--json", action="store_true",
                       help='print one object: {"domain", "task", "total_pending", '
                            '"by_callback", "pending": [...]}')
        p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="list only the newest N works")
        p.add_argument("--callback", default=None, metavar="NAME",
                       help="list only the works of this callback")
        return p
    p = argparse.ArgumentParser(
        prog=prog, description="A domain's tasks, pool and counters, read once; CPU %, "
                               "memory and state of each live task's process (psutil); "
                               "the dead letters.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
    p.add_argument("--json", action="store_true",
                   help='print one object: {"domain", "pool", "tasks", "dead_letters"}')
    p.add_argument("--interval", type=_interval, default=0.1, metavar="SECONDS",
                   help="window for sampling CPU %% (default 0.1; 0: average over the "
                        "process's life)")
    c = p.add_argument_group("alerting (--check)")
    c.add_argument("--check", action="store_true",
                   help="one summary line and a monitoring-plugin exit status (see below)")
    c.add_argument("--max-dead-letters", type=count_int, default=0, metavar="N",
                   help="WARNING above N dead letters (default 0)")
    c.add_argument("--min-pool-free", type=_percent, default=10.0, metavar="PCT",
                   help="WARNING below PCT percent of the pool free (default 10)")
    c.add_argument("--max-oldest", type=positive_seconds, default=None, metavar="SECONDS",
                   help="WARNING when a pending work is older (default: no limit)")
    return p


def main(argv=None, prog: str | None = None, command: str = "status") -> int:
    if command not in ("status", "inspect"):
        raise ValueError(f"tools.status serves 'status' and 'inspect', not {command!r}")
    prog = prog or f"shm-taskwork {command}"
    args = build_parser(prog, command).parse_args(argv)
    if command == "status" and args.check:
        return _check(args)
    with Domain.open(args.name) as dom:
        if command == "inspect":
            rec = inspect_record(dom, args.task, limit=args.limit, callback=args.callback)
            if args.json:
                print(json.dumps(rec))
            else:
                print_inspect(rec, sys.stdout, callback=args.callback)
            return 0
        rec = status_record(dom, args.interval)
    if args.json:
        print(json.dumps(rec))
    else:
        print_status(rec, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
