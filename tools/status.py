"""``shm-taskwork status NAME`` and ``shm-taskwork inspect NAME TASK``.

``status`` reads a domain once: its sizes, the pool (``DomainStats``), every
used task slot (``TaskInfo``) with the process's CPU %, resident memory and
state from psutil for the tasks whose process is alive, and the dead-letter
list. ``inspect`` lists the pending works of one task, newest first (or
oldest first with ``--oldest``): callback, age (now minus ``enqueued_ns``,
both CLOCK_MONOTONIC), sender pid, origin (when the domain records origins),
a short escaped preview of the payload and its size; ``--running`` lists the
works a run of the task has taken and not finished instead.

Text output fits the terminal (``$COLUMNS``, else the terminal's width; a
pipe gets every column): when the full table is wider, columns are left out
in a fixed order and a line says so; ``--wide`` shows them all. Work ids are
written ``0x`` and hex (``work_id``) in text and in JSON alike.

Both only read the segment; neither registers a task or takes a work. With
``--json`` each prints one JSON object (the field names of ``TaskInfo``, ``DomainStats`` and ``Work``, docs/api.md).
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
from shm_taskwork.tools._common import (count_int, fit_columns, fmt_age, fmt_bytes, hidden_note,
                                       number_arg, oldest_pending_ns, positive_int,
                                       positive_seconds, preview, printable, render_table, say,
                                       terminal_width, work_id)

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
        rec["id"] = work_id(w.id)
        rec["age_ns"] = now - w.enqueued_ns if w.enqueued_ns else None
        dead.append(rec)
    pool = stats.as_dict()
    # works in progress (docs/cli.md): pending + running
    # is the backlog
    pool["running"] = sum(t.running for t in infos)
    return {
        "domain": {"name": dom.name, "max_tasks": dom.max_tasks, "pool_size": dom.pool_size,
                   "payload_size": dom.payload_size, "record_origin": dom.record_origin},
        "pool": pool,
        "tasks": tasks,
        "dead_letters": dead,
        # one object per bridge of this domain running on this host (README "More than one host")
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
                   callback: str | None = None, oldest: bool = False,
                   running: bool = False) -> dict:
    """The object ``inspect --json`` prints: ``pending`` holds the works shown
    (newest first, or oldest first with ``oldest``; only those of
    ``callback``, at most ``limit``), while ``total_pending`` and
    ``by_callback`` count every pending work. ``running``: the works a run
    of the task has taken and not finished, under ``running``, instead of
    the pending ones (``total_running`` counts them)."""
    task = find_task(dom, key)
    info = next((t for t in dom.tasks(reap=False)
                 if t.id == task.id and t.generation == task.gen), None)
    if info is None:
        raise NoSuchTaskError(f"task {task.id} of domain {dom.name!r} exited meanwhile")
    now = time.monotonic_ns()
    if running:
        works = list(running_works(dom, task.id, task.gen))
        works.sort(key=lambda w: w.enqueued_ns, reverse=not oldest)
    else:
        works = [w for w in dom.pending_works(task.id) if w.target_gen == task.gen]
        if oldest:
            works.reverse()   # the list is newest first
    shown = []
    by_callback: dict[str, int] = {}
    for w in works:
        by_callback[w.func_name] = by_callback.get(w.func_name, 0) + 1
        if callback is not None and w.func_name != callback:
            continue
        if limit is not None and len(shown) >= limit:
            continue
        rec = w.as_dict()
        rec["id"] = work_id(w.id)
        rec["payload_len"] = len(w.payload)
        rec["age_ns"] = now - w.enqueued_ns
        shown.append(rec)
    what = "running" if running else "pending"
    return {"domain": dom.name, "task": info.as_dict(), "order": "oldest" if oldest else "newest",
            f"total_{what}": len(works),
            "by_callback": dict(sorted(by_callback.items(), key=lambda kv: (-kv[1], kv[0]))),
            what: shown}


def running_works(dom: Domain, task_id: int, gen: int) -> list:
    """The works a run of one task has taken and not finished, through
    ``Domain.running_works`` (docs/cli.md, "Works in progress"). A package
    without it raises a one-line error saying so."""
    reader = getattr(dom, "running_works", None)
    if reader is None:
        raise NotImplementedError("listing running works needs Domain.running_works(), "
                                  "which this version of shm_taskwork lacks; `status` and "
                                  "`inspect` show how many there are and the oldest age")
    return [w for w in reader(task_id) if getattr(w, "target_gen", gen) == gen]


# ---- printing -------------------------------------------------------------------

#: The columns of the status tasks table, and the order in which a narrow
#: terminal leaves them out (id, name, pid, state, added, run, pending,
#: running and oldest_run always stay).
TASK_HEAD = ("id", "name", "pid", "state", "added", "run", "pending", "running", "oldest_run",
             "errors", "orphaned", "cancelled", "unknown", "signals", "resumes", "max_pending",
             "cpu %", "rss", "process")
TASK_DROP = ("resumes", "signals", "max_pending", "unknown", "cancelled", "process", "rss",
             "orphaned", "cpu %", "errors")
DL_HEAD = ("work", "reason", "callback", "for task", "slot", "sender", "age", "origin")
DL_DROP = ("origin", "slot", "sender", "for task")


def _age_s(seconds: float | None) -> str:
    return "-" if seconds is None else fmt_age(int(seconds * 1e9), compact=True)


def _fitted(head, rows, out, drop, *, wide: bool, shrink=("name",)):
    """(head, rows, hidden column names) for a terminal of its width."""
    if wide:
        return head, rows, ()
    fh, fr = fit_columns(head, rows, terminal_width(out), drop, shrink=shrink)
    return fh, fr, tuple(h for h in head if h not in fh)


def print_status(rec: dict, out, *, wide: bool = False) -> None:
    d, p = rec["domain"], rec["pool"]
    width = 10_000 if wide else None
    say(f"domain {printable(d['name'])}: {d['max_tasks']} task slots, pool of "
        f"{d['pool_size']} nodes "
        f"with {d['payload_size']}-byte payloads"
        + (", origins recorded" if d.get("record_origin") else ""), out, width)
    say(f"pool: {p['pool_free']} free, {p['pool_used']} used of {p['pool_size']}; "
        f"{p['tasks']} tasks; {p['dead_letters']} dead letters", out, width)
    say("counters: " + ", ".join(f"{k} {p[k]}" for k in (
        "added", "run", "cancelled", "orphaned", "errors", "unknown", "signals_sent",
        "resumes_sent", "pending", "running", "max_pending") if k in p), out, width)
    rows = []
    for t in rec["tasks"]:
        rows.append((t["id"], t["name"], t["pid"], t["state"], t["added"], t["run"],
                     "unreadable" if t.get("unreadable") else t["pending"],
                     t.get("running", 0), _age_s(t.get("oldest_running_s")),
                     t["errors"], t["orphaned"], t["cancelled"], t["unknown"],
                     t["signals_sent"], t["resumes_sent"], t["max_pending"],
                     "-" if t["cpu_percent"] is None else f"{t['cpu_percent']:.1f}",
                     fmt_bytes(t["rss"], compact=True), t["process_status"] or "-"))
    if rows:
        head, rows, hidden = _fitted(TASK_HEAD, rows, out, TASK_DROP, wide=wide)
        render_table(head, rows, out, title="tasks", rich=True, wrap={"name"},
                     right=set(head) - {"name", "state", "process"},
                     width=None if not wide else 10_000)
        hidden_note(hidden, out)
    else:
        print("tasks: none registered", file=out)
    unreadable = sum(1 for t in rec["tasks"] if t.get("unreadable"))
    if unreadable:
        print(f"{unreadable} task{'s' if unreadable != 1 else ''} unreadable: another process "
              "held the list lock past this read's budget (their pending works are not "
              "counted)", file=out)
    if rec["dead_letters"]:
        rows = [(w["id"], w.get("reason") or "-", w["func_name"],
                 w.get("target_name") or "-", w["target"], w["sender_pid"],
                 fmt_age(w["age_ns"], compact=True), w["origin"] or "-")
                for w in rec["dead_letters"]]
        title = (f"dead letters ({len(rows)}): `shm-taskwork dead-letters` retries or "
                 "drops them")
        head, rows, hidden = _fitted(DL_HEAD, rows, out, DL_DROP, wide=wide,
                                     shrink=("callback", "origin"))
        render_table(head, rows, out, title=title, rich=True, wrap={"callback", "origin"},
                     right={"work", "slot", "sender", "age"},
                     width=None if not wide else 10_000)
        hidden_note(hidden, out)
    else:
        print("dead letters: none", file=out)


INSPECT_HEAD = ("#", "work", "callback", "age", "sender", "origin", "payload", "size")
INSPECT_DROP = ("origin", "sender", "#")


def print_inspect(rec: dict, out, *, callback: str | None = None,
                  wide: bool = False) -> None:
    """Plain columns, not a rich table: a task may hold tens of thousands of
    works, and this prints them as fast as ``--json`` does."""
    t = rec["task"]
    what = "running" if "running" in rec and "pending" not in rec else "pending"
    total, shown = rec[f"total_{what}"], len(rec[what])
    order = "oldest first" if rec.get("order") == "oldest" else "newest first"
    width = 10_000 if wide else None
    head_line = (f"task {t['id']} {printable(repr(t['name']))} (pid {t['pid']}, {t['state']}) "
                 f"in {printable(rec['domain'])}: {total} {what} work{'s' if total != 1 else ''}"
                 + (f", {order}" if total > 1 else ""))
    if what == "pending" and t.get("running"):
        head_line += (f"; {t['running']} running (oldest {_age_s(t.get('oldest_running_s'))}: "
                      "--running lists them)")
    say(head_line, out, width)
    if not total:
        return
    by_cb = list(rec["by_callback"].items())
    say("by callback: " + ", ".join(f"{printable(cb)} {n}" for cb, n in by_cb[:8])
        + (f", and {len(by_cb) - 8} more callbacks" if len(by_cb) > 8 else ""), out, width)
    matching = total if callback is None else rec["by_callback"].get(callback, 0)
    if callback is not None:
        out.write(f"callback {callback!r}: {matching} of them\n")
    if shown < matching:
        out.write(f"showing the {order.split()[0]} {shown} (--limit)\n")
    if not shown:
        return
    width = 10_000 if wide else terminal_width(out)
    # the preview takes what the other columns leave, between 8 and 40
    room = max(8, min(40, width - 60))
    rows = [(i, w["id"], printable(w["func_name"]),
             fmt_age(w["age_ns"], compact=True), w["sender_pid"], printable(w["origin"] or "-"),
             preview(bytes.fromhex(w["payload"]), room) or "-", f"{w['payload_len']}B")
            for i, w in enumerate(rec[what], 1)]
    head, rows, hidden = _fitted(INSPECT_HEAD, rows, out, INSPECT_DROP, wide=wide, shrink=())
    render_table(head, rows, out, right={"#", "work", "age", "sender", "size"}, escape=False,
                 width=width)
    hidden_note(hidden, out)


# ---- entry point -----------------------------------------------------------------

_interval = number_arg(float, "a number of seconds", 0, 60)
_percent = number_arg(float, "a percentage", 0, 100)


INSPECT_EPILOG = """\
The text view prints plain columns, as fast as --json. With --callback only
that callback's works are listed, and --limit N keeps the newest N (the
oldest N with --oldest); the header still counts every pending work, by
callback. --running lists the works a run of the task has taken and not
finished (its callback runs now, or waits its turn in the run's chunk).
payload: a short preview, escaped (\\n, \\xNN); size: its length. Work ids
are written 0x and hex in text and in JSON alike (a string in JSON).
"""

CHECK_EPILOG = """\
--check: one summary line on stdout and the exit status of a monitoring plugin
(Nagios, Icinga, Sensu, Zabbix agents); with --json one object instead:
{"status": 0..3, "state": "OK"..., "reasons": [...], "perf": {...}}.
  0 OK        nothing below
  1 WARNING   more dead letters than --warn-dead-letters (default 0; its old
              name --max-dead-letters still works); less of the pool free than
              --min-pool-free percent (default 10); a pending or running work
              older than --max-oldest seconds (default: no limit)
  2 CRITICAL  a dead task (its process died and nobody has reaped it yet: run
              fsck --repair, or let the next adder reap it); more dead letters
              than --crit-dead-letters (default: no limit); the pool is empty
              (adds fail)
  3 UNKNOWN   the domain could not be read (no such domain, permission, a
              corrupt header)
A reaped task is not a finding: reaping settled it, and its works are dead
letters (WARNING) until they are retried or dropped; then the check is OK.
The line ends with performance data after a '|'.
"""

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
CHECK_WORDS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def check_record(dom: Domain, *, warn_dead_letters: int = 0,
                 crit_dead_letters: int | None = None, min_pool_free: float = 10.0,
                 max_oldest: float | None = None) -> dict:
    """What ``status --check`` finds: ``{"status", "state", "domain",
    "reasons", "summary", "perf", "line"}``. It only reads: a dead task
    stays dead (CRITICAL) until a process that adds, or fsck, reaps it; it
    then reads ``reaped``, which is no finding, and its works are dead
    letters (WARNING, or CRITICAL above ``crit_dead_letters``)."""
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
    if crit_dead_letters is not None and stats.dead_letters > crit_dead_letters:
        crit.append(f"{stats.dead_letters} dead letters (more than {crit_dead_letters})")
    elif stats.dead_letters > warn_dead_letters:
        warn.append(f"{stats.dead_letters} dead letters (more than {warn_dead_letters})")
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
    running = sum(t.running for t in infos)
    busy = max((t for t in infos if t.oldest_running_s is not None),
               key=lambda t: t.oldest_running_s, default=None)
    oldest_running = busy.oldest_running_s if busy is not None else None
    if max_oldest is not None and oldest_running is not None and oldest_running > max_oldest:
        warn.append(f"oldest running work {fmt_age(int(oldest_running * 1e9))} old on "
                    f"{printable(busy.name)} (task {busy.id}; more than {max_oldest:g} s)")
    live = sum(1 for t in infos if t.state in LIVE_STATES)
    code = CRITICAL if crit else WARNING if warn else OK
    summary = (f"{live} live task{'s' if live != 1 else ''}, {stats.pending} pending, "
               f"{running} running, pool {free_pct:.1f}% free, "
               f"{stats.dead_letters} dead letters")
    what = "; ".join(crit + warn) or summary
    oldest_s = 0.0 if oldest_ns is None else oldest_ns / 1e9
    perf = {"tasks": live, "dead_tasks": len(dead), "pending": stats.pending,
            "running": running, "dead_letters": stats.dead_letters,
            "pool_free_percent": round(free_pct, 1), "oldest_pending_s": round(oldest_s, 3),
            "oldest_running_s": round(oldest_running or 0.0, 3)}
    crit_dl = "" if crit_dead_letters is None else str(crit_dead_letters)
    perf_text = (f"tasks={live} dead_tasks={len(dead)};;0 pending={stats.pending} "
                 f"running={running} "
                 f"dead_letters={stats.dead_letters};{warn_dead_letters};{crit_dl} "
                 f"pool_free={free_pct:.1f}%;{min_pool_free:g}:;;0;100 "
                 f"oldest_pending={oldest_s:.3f}s;"
                 f"{'' if max_oldest is None else f'{max_oldest:g}'} "
                 f"oldest_running={oldest_running or 0.0:.3f}s;"
                 f"{'' if max_oldest is None else f'{max_oldest:g}'}")
    return {"status": code, "state": CHECK_WORDS[code], "domain": dom.name,
            "reasons": crit + warn, "summary": summary, "perf": perf,
            "line": f"SHM-TASKWORK {CHECK_WORDS[code]} - {printable(dom.name)}: {what} "
                    f"| {perf_text}"}


def check_domain(dom: Domain, *, max_dead_letters: int = 0, min_pool_free: float = 10.0,
                 max_oldest: float | None = None,
                 crit_dead_letters: int | None = None) -> tuple[int, str]:
    """(exit status, summary line) of ``status --check`` (see check_record)."""
    rec = check_record(dom, warn_dead_letters=max_dead_letters,
                       crit_dead_letters=crit_dead_letters, min_pool_free=min_pool_free,
                       max_oldest=max_oldest)
    return rec["status"], rec["line"]


def _check(args) -> int:
    from shm_taskwork import TaskWorkError
    try:
        with Domain.open(args.name) as dom:
            rec = check_record(dom, warn_dead_letters=args.warn_dead_letters,
                               crit_dead_letters=args.crit_dead_letters,
                               min_pool_free=args.min_pool_free, max_oldest=args.max_oldest)
    except (TaskWorkError, OSError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        why = printable(str(exc))
        rec = {"status": UNKNOWN, "state": "UNKNOWN", "domain": args.name, "reasons": [why],
               "summary": None, "perf": None,
               "line": f"SHM-TASKWORK UNKNOWN - {printable(args.name)}: {why}"}
    if args.json:
        print(json.dumps({k: v for k, v in rec.items() if k != "line"}))
    else:
        print(rec["line"])
    return rec["status"]


def build_parser(prog: str, command: str) -> argparse.ArgumentParser:
    if command == "inspect":
        p = argparse.ArgumentParser(
            prog=prog, description="The pending works of one task, newest first (or oldest "
                                   "first): callback, age, sender pid, origin, a payload "
                                   "preview and its size; or the works its run holds.",
            epilog=INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
        p.add_argument("task", metavar="TASK",
                       help="the task: its id, its name, or pid=N / name=TEXT")
        p.add_argument("--json", action="store_true",
                       help='print one object: {"domain", "task", "order", "total_pending", '
                            '"by_callback", "pending": [...]} (with --running: '
                            '"total_running", "running")')
        p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="list only the newest N works (the oldest N with --oldest)")
        p.add_argument("--callback", default=None, metavar="NAME",
                       help="list only the works of this callback")
        p.add_argument("--oldest", action="store_true",
                       help="oldest first (the next to run first)")
        p.add_argument("--running", action="store_true",
                       help="the works a run of the task has taken and not finished, "
                            "instead of the pending ones")
        p.add_argument("--wide", action="store_true",
                       help="every column, however wide the terminal")
        return p
    p = argparse.ArgumentParser(
        prog=prog, description="A domain's tasks, pool and counters, read once; CPU %, "
                               "memory and state of each live task's process (psutil); "
                               "the dead letters.",
        epilog=STATUS_EPILOG + "\n" + CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the domain (a leading / is optional)")
    p.add_argument("--json", action="store_true",
                   help='print one object: {"domain", "pool", "tasks", "dead_letters"}')
    p.add_argument("--wide", action="store_true",
                   help="every column, however wide the terminal")
    p.add_argument("--interval", type=_interval, default=0.1, metavar="SECONDS",
                   help="window for sampling CPU %% (default 0.1; 0: average over the "
                        "process's life)")
    c = p.add_argument_group("alerting (--check)")
    c.add_argument("--check", action="store_true",
                   help="one summary line and a monitoring-plugin exit status (see below)")
    c.add_argument("--warn-dead-letters", "--max-dead-letters", dest="warn_dead_letters",
                   type=count_int, default=0, metavar="N",
                   help="WARNING above N dead letters (default 0)")
    c.add_argument("--crit-dead-letters", type=count_int, default=None, metavar="N",
                   help="CRITICAL above N dead letters (default: never)")
    c.add_argument("--min-pool-free", type=_percent, default=10.0, metavar="PCT",
                   help="WARNING below PCT percent of the pool free (default 10)")
    c.add_argument("--max-oldest", type=positive_seconds, default=None, metavar="SECONDS",
                   help="WARNING when a pending or running work is older (default: no limit)")
    return p


STATUS_EPILOG = """\
task columns: added, run, pending (queued now), running (taken by a run, not
finished: pending + running is the backlog), oldest_run (the oldest running
work's age since it was queued), errors, orphaned, cancelled, unknown,
signals, resumes, max_pending, and the process's cpu %, rss and state. A
narrow terminal gets the first columns (id to oldest_run) and as many of the
others as fit; --wide shows them all. state: running, exiting, exited, dead
(died, not reaped yet) or reaped (its works are dead letters; the row stays
until the slot is reused).
"""


def main(argv=None, prog: str | None = None, command: str = "status") -> int:
    if command not in ("status", "inspect"):
        raise ValueError(f"tools.status serves 'status' and 'inspect', not {command!r}")
    prog = prog or f"shm-taskwork {command}"
    args = build_parser(prog, command).parse_args(argv)
    if command == "status" and args.check:
        if args.crit_dead_letters is not None and args.crit_dead_letters < args.warn_dead_letters:
            raise ValueError(f"--crit-dead-letters ({args.crit_dead_letters}) must be at least "
                             f"--warn-dead-letters ({args.warn_dead_letters})")
        return _check(args)
    with Domain.open(args.name) as dom:
        if command == "inspect":
            rec = inspect_record(dom, args.task, limit=args.limit, callback=args.callback,
                                 oldest=args.oldest, running=args.running)
            if args.json:
                print(json.dumps(rec))
            else:
                print_inspect(rec, sys.stdout, callback=args.callback, wide=args.wide)
            return 0
        rec = status_record(dom, args.interval)
    if args.json:
        print(json.dumps(rec))
    else:
        print_status(rec, sys.stdout, wide=args.wide)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
