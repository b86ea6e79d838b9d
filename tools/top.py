"""``shm-taskwork top NAME``: a live view of one domain (docs/cli.md).

Every interval it reads the task table and the pool (``dom.tasks(reap=False)``,
``dom.stats()``), the oldest pending work of each task that has any
(the list is newest first, so it is the last node of a snapshot) and, for
each live task, its process's CPU %, resident memory and
state from psutil. Rates (works run and added per second) are the difference
between two snapshots divided by the time between them.

Reading is all it does: it registers no task and changes
nothing in the segment (it does not reap dead tasks: the next add, register
or fsck does), so it may watch a domain under full load. Dead tasks (their
process died) are shown in red and listed under the table with the works
they left; ``shm-taskwork dead-letters NAME --retry`` re-queues those.

On a terminal the view is redrawn in place (rich's ``Live``); when stdout is
not a terminal every frame is printed as plain text, one after the other.
``--once`` samples twice, one interval apart (so the rates and CPU % cover
that interval), prints one frame and exits. ``q`` (read from the terminal in
cbreak mode when stdin is one) or Ctrl-C ends the view with status 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from shm_taskwork.tools._common import (UNLIMITED, fit_columns, fmt_age, fmt_bytes,
                                       number_arg, oldest_pending_ns, positive_int, printable,
                                       rich_table)

EPILOG = """\
columns:
  pending   works queued now;  oldest  age of the oldest of them
  running   works a run has taken and not finished;  oldest_run  age of the
            oldest of them (since it was queued); pending + running is the
            task's backlog
  added run cancelled errors unknown orphaned   the task's counters
  run/s add/s   rates over the last interval ('-' on the first frame)
  cpu% rss status   the task's process, from psutil ('-' for dead or exited tasks)

A task whose list lock another process held past the frame's lock budget
shows "unreadable" under pending (its pending works are not counted).
A dead task (its process died) is flagged in red and listed under the table;
its works become orphaned dead letters when it is reaped (at the next add,
register or fsck): it then reads "reaped", and `shm-taskwork dead-letters
NAME --retry` re-queues them. A terminal narrower than every column gets
id, name, state, pending, oldest, running, oldest_run, run and run/s, and as
many others as fit; --wide shows them all. q (or Ctrl-C) quits, status 0.
"""


_interval = number_arg(float, "a number of seconds", 0, 86400, above=True)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Live view of a task-work domain: per task the counters,\n"
        "rates, oldest pending age, and the process's CPU %, memory and state;\n"
        "dead tasks flagged.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="domain name")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="time between frames (default 1.0; at most a day, 86400)")
    p.add_argument("--once", action="store_true",
                   help="sample twice one interval apart, print one frame, exit")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help="stop after N frames (default: until q or Ctrl-C)")
    p.add_argument("--wide", action="store_true",
                   help="every column, however wide the terminal")
    p.add_argument("--json", action="store_true",
                   help="print each frame as one JSON object a line (with --once: one)")
    return p


# ---- sampling ---------------------------------------------------------------

@dataclasses.dataclass
class ProcFigures:
    cpu: float | None = None  # percent since the previous sample of this process
    rss: int | None = None
    status: str | None = None


@dataclasses.dataclass
class Snapshot:
    t_ns: int
    stats: object  # DomainStats
    tasks: list  # list[TaskInfo]
    oldest_ns: dict  # task id -> age in ns of the oldest pending work
    procs: dict  # task id -> ProcFigures


class Sampler:
    """Reads a domain and keeps what rates and CPU % need between samples."""

    def __init__(self, dom):
        self.dom = dom
        # (task id, generation, pid) -> psutil.Process, primed with cpu_percent(None)
        self._procs: dict[tuple[int, int, int], object] = {}

    def _figures(self, info) -> ProcFigures:
        import psutil

        key = (info.id, info.generation, info.pid)
        proc = self._procs.get(key)
        cpu = None
        try:
            if proc is None:
                proc = psutil.Process(info.pid)
                proc.cpu_percent(None)  # prime: the first call always says 0.0
                self._procs[key] = proc
            else:
                cpu = proc.cpu_percent(None)
            with proc.oneshot():
                return ProcFigures(cpu=cpu, rss=proc.memory_info().rss, status=proc.status())
        except psutil.NoSuchProcess:
            self._procs.pop(key, None)
            return ProcFigures(status="gone")
        except psutil.AccessDenied:
            return ProcFigures(cpu=cpu, status="denied")

    def sample(self) -> Snapshot:
        dom = self.dom
        # one lock budget for the whole frame (README, Security)
        deadline = time.monotonic_ns() + int(dom.READ_LOCK_BUDGET * 1e9)
        tasks = dom.tasks(reap=False)
        stats = dom.stats(infos=tasks)
        now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of enqueued_ns
        oldest: dict[int, int] = {}
        procs: dict[int, ProcFigures] = {}
        seen = set()
        for info in tasks:
            if info.pending > 0:
                e = oldest_pending_ns(dom, info.id, info.generation, deadline)
                if e is not None:
                    oldest[info.id] = max(0, now - e)
            if info.state in ("running", "exiting"):
                procs[info.id] = self._figures(info)
                seen.add((info.id, info.generation, info.pid))
        for key in [k for k in self._procs if k not in seen]:
            del self._procs[key]  # the task exited or died: forget its process
        return Snapshot(now, stats, tasks, oldest, procs)


# ---- rendering --------------------------------------------------------------

COLUMNS = ("id", "name", "pid", "state", "pending", "oldest", "running", "oldest_run", "run",
           "run/s", "added", "add/s", "errors", "cancelled", "unknown", "orphaned", "cpu%",
           "rss", "status")
#: The order in which a narrow terminal leaves columns out; the others (id,
#: name, state, pending, oldest, running, oldest_run, run, run/s) always stay.
DROP = ("status", "rss", "cancelled", "unknown", "orphaned", "add/s", "cpu%", "errors",
        "added", "pid")
_RIGHT = {"id", "pid", "pending", "oldest", "running", "oldest_run", "added", "run", "cancelled",
          "errors", "unknown", "orphaned", "run/s", "add/s", "cpu%", "rss"}
_STATE_STYLE = {"dead": "bold red", "reaped": "red", "exiting": "yellow", "exited": "dim"}


def _rate(cur, prev, key: str, dt: float) -> str:
    if prev is None or dt <= 0:
        return "-"
    return f"{max(0, getattr(cur, key) - getattr(prev, key)) / dt:.1f}"


def _rate_value(cur, prev, key: str, dt: float) -> float | None:
    if prev is None or dt <= 0:
        return None
    return round(max(0, getattr(cur, key) - getattr(prev, key)) / dt, 3)


def _age_s(seconds: float | None) -> str:
    return fmt_age(None if seconds is None else int(seconds * 1e9), compact=True)


def frame_record(name: str, snap: Snapshot, prev: Snapshot | None) -> dict:
    """One frame as the object ``top --json`` prints (one a line)."""
    st = snap.stats
    dt = (snap.t_ns - prev.t_ns) / 1e9 if prev is not None else 0.0
    before = {(t.id, t.generation): t for t in prev.tasks} if prev is not None else {}
    tasks = []
    for t in snap.tasks:
        old = before.get((t.id, t.generation))
        pf = snap.procs.get(t.id)
        rec = t.as_dict()
        age = snap.oldest_ns.get(t.id)
        rec.update(oldest_pending_s=None if age is None else age / 1e9,
                   run_per_s=_rate_value(t, old, "run", dt),
                   add_per_s=_rate_value(t, old, "added", dt),
                   cpu_percent=pf.cpu if pf else None, rss=pf.rss if pf else None,
                   process_status=pf.status if pf else None)
        tasks.append(rec)
    pool = st.as_dict()
    pool["running"] = sum(t.running for t in snap.tasks)
    pool["run_per_s"] = _rate_value(st, prev.stats if prev else None, "run", dt)
    pool["add_per_s"] = _rate_value(st, prev.stats if prev else None, "added", dt)
    return {"domain": name, "t_ns": snap.t_ns, "interval_s": round(dt, 6) or None,
            "pool": pool, "tasks": tasks}


def render(name: str, snap: Snapshot, prev: Snapshot | None, interval: float,
           width: int = UNLIMITED, wide: bool = False):
    """One frame: a table of the tasks and the pool line (a rich renderable),
    laid out for ``width`` columns (every column with ``wide``)."""
    from rich.console import Group
    from rich.text import Text

    st = snap.stats
    dt = (snap.t_ns - prev.t_ns) / 1e9 if prev is not None else 0.0
    before = {}
    if prev is not None:
        before = {(t.id, t.generation): t for t in prev.tasks}
    dead = [t for t in snap.tasks if t.state == "dead"]   # died, nobody reaped it yet

    rows, styles = [], []
    for t in snap.tasks:
        old = before.get((t.id, t.generation))
        pf = snap.procs.get(t.id)
        state = Text(t.state, style=_STATE_STYLE.get(t.state, "green"))
        rows.append((str(t.id), t.name or "-", str(t.pid), state,
                     "unreadable" if t.unreadable else str(t.pending),
                     fmt_age(snap.oldest_ns.get(t.id), compact=True), str(t.running),
                     _age_s(t.oldest_running_s), str(t.run), _rate(t, old, "run", dt),
                     str(t.added), _rate(t, old, "added", dt), str(t.errors),
                     str(t.cancelled), str(t.unknown), str(t.orphaned),
                     "-" if pf is None or pf.cpu is None else f"{pf.cpu:.1f}",
                     fmt_bytes(pf.rss if pf is not None else None, compact=True),
                     pf.status if pf is not None and pf.status else "-"))
        styles.append("red" if t.state == "dead" else None)
    head, shown = COLUMNS, rows
    if not wide:
        head, shown = fit_columns(COLUMNS, rows, width, DROP, shrink=("name",))
    # as text, escaped: never rich markup (the names are the segment's)
    table = rich_table(head, shown, title=f"shm-taskwork top {name}", right=_RIGHT,
                       wrap={"name"}, row_styles=styles)
    running = sum(t.running for t in snap.tasks)
    pool = Text.assemble(
        ("pool ", "bold"), f"used {st.pool_used}  free {st.pool_free}  size {st.pool_size}",
        ("  dead letters ", "bold"),
        (str(st.dead_letters), "bold red" if st.dead_letters else ""),
        ("  tasks ", "bold"), str(st.tasks),
        ("  pending ", "bold"), str(st.pending),
        ("  running ", "bold"), str(running),
        ("  run/s ", "bold"), _rate(st, prev.stats if prev else None, "run", dt),
        ("  add/s ", "bold"), _rate(st, prev.stats if prev else None, "added", dt),
        f"  (every {interval:g}s; q quits)")
    parts = [table, Text(""), pool]
    if not snap.tasks:
        parts.insert(1, Text("no tasks registered", style="dim"))
    hidden = [h for h in COLUMNS if h not in head]
    if hidden:
        parts.append(Text(f"({len(hidden)} more columns with --wide: {', '.join(hidden)})",
                          style="dim"))
    if dead:
        who = ", ".join(f"{t.id} (pid {t.pid}, {t.pending} pending, {t.running} running)"
                        for t in dead)
        parts.append(Text(f"DEAD tasks: {who}; their works become dead letters when reaped "
                          f"(the next add, register or `shm-taskwork fsck {printable(name)} "
                          "--repair`)", style="bold red"))
    reaped = [t for t in snap.tasks if t.state == "reaped"]
    if reaped:
        who = ", ".join(f"{t.id} (pid {t.pid}, {t.orphaned} orphaned)" for t in reaped)
        parts.append(Text(f"REAPED tasks: {who}; their works are dead letters: "
                          f"`shm-taskwork dead-letters {printable(name)} --retry` re-queues them",
                          style="red"))
    unreadable = sum(1 for t in snap.tasks if t.unreadable)
    if unreadable:
        parts.append(Text(f"{unreadable} task{'s' if unreadable != 1 else ''} unreadable: "
                          "another process held the list lock past this frame's budget",
                          style="yellow"))
    return Group(*parts)


# ---- main -------------------------------------------------------------------

def _console():
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    # Plain frames: no colour codes; $COLUMNS wide, or wide enough for every column.
    width = os.environ.get("COLUMNS", "")
    return Console(force_terminal=False, width=int(width) if width.isdigit() else 200,
                   no_color=True, highlight=False)


def _emit(console, frame) -> None:
    """Print one frame as plain text: no trailing blanks, flushed at once."""
    with console.capture() as cap:
        console.print(frame)
    text = "\n".join(line.rstrip() for line in cap.get().splitlines())
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Keys:
    """The keys typed while the view waits: on a terminal stdin is put in
    cbreak mode (each key arrives at once, not echoed; Ctrl-C still
    interrupts) and restored on exit. ``wait(seconds)`` paces the frames
    and returns True when ``q`` (or ``Q``) was typed. Without a terminal on
    stdin it only paces."""

    QUIT = (b"q", b"Q")

    def __init__(self, stream=None):
        self.stream = sys.stdin if stream is None else stream
        self.fd: int | None = None
        self._saved = None

    def __enter__(self) -> "Keys":
        try:
            fd = self.stream.fileno()
        except (AttributeError, ValueError, OSError):
            return self
        if os.isatty(fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self.fd = None

    def wait(self, seconds: float) -> bool:
        if self.fd is None:
            time.sleep(seconds)  # the interval between frames: pacing, not a wait on anyone
            return False
        import select

        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                key = os.read(self.fd, 1)
                if not key or key in self.QUIT:   # end of input, or q
                    return True


def _loop(dom, args) -> None:
    sampler = Sampler(dom)
    interval = args.interval
    if args.json:
        with Keys() as keys:
            prev, snap = None, sampler.sample()
            if args.once:
                keys.wait(interval)  # the span the rates and CPU % are measured over
                prev, snap = snap, sampler.sample()
            shown = 1
            sys.stdout.write(json.dumps(frame_record(dom.name, snap, prev)) + "\n")
            sys.stdout.flush()
            while not args.once and (args.iterations is None or shown < args.iterations):
                if keys.wait(interval):
                    return
                prev, snap = snap, sampler.sample()
                sys.stdout.write(json.dumps(frame_record(dom.name, snap, prev)) + "\n")
                sys.stdout.flush()
                shown += 1
        return
    console = _console()

    def frame(snap, prev):
        return render(dom.name, snap, prev, interval, width=console.size.width,
                      wide=args.wide)

    if args.once:
        first = sampler.sample()
        time.sleep(interval)  # the span the rates and CPU % are measured over
        f = frame(sampler.sample(), first)
        if console.is_terminal:
            console.print(f)
        else:
            _emit(console, f)
        return
    frames = args.iterations
    prev = None
    snap = sampler.sample()
    shown = 1
    with Keys() as keys:
        if console.is_terminal:
            from rich.live import Live

            with Live(frame(snap, prev), console=console,
                      auto_refresh=False, transient=False) as live:
                while frames is None or shown < frames:
                    if keys.wait(interval):
                        return
                    prev, snap = snap, sampler.sample()
                    live.update(frame(snap, prev), refresh=True)
                    shown += 1
            return
        _emit(console, frame(snap, prev))
        while frames is None or shown < frames:
            if keys.wait(interval):
                return
            prev, snap = snap, sampler.sample()
            sys.stdout.write("\n")
            _emit(console, frame(snap, prev))
            shown += 1


def main(argv: list[str] | None = None, *, prog: str | None = None,
         command: str | None = "top") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog or "shm-taskwork top").parse_args(argv)
    from shm_taskwork import Domain

    dom = Domain.open(args.name)
    try:
        _loop(dom, args)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends
    except BrokenPipeError:  # `top NAME | head`: the reader left; so do we
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
        os.close(devnull)
    finally:
        dom.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
