"""``shm-taskwork top NAME``: a live view of one domain (SPEC section 8).

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
that interval), prints one frame and exits. Ctrl-C ends the view with status 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from shm_taskwork.tools._common import (fmt_age, fmt_bytes, number_arg, oldest_pending_ns,
                                       positive_int, printable, text_cell)

EPILOG = """\
columns:
  pending   works queued now;  oldest  age of the oldest of them
  added run cancelled errors unknown orphaned   the task's counters
  run/s add/s   rates over the last interval ('-' on the first frame)
  cpu% rss status   the task's process, from psutil ('-' for dead or exited tasks)

A task whose list lock another process held past the frame's lock budget
shows "unreadable" under pending (its pending works are not counted).
A dead task (its process died) is flagged in red and listed under the table;
its works become orphaned dead letters when it is reaped (at the next add,
register or fsck), and `shm-taskwork dead-letters NAME --retry` re-queues them.
Ctrl-C quits (exit status 0).
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
                   help="stop after N frames (default: until Ctrl-C)")
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

COLUMNS = ("id", "name", "pid", "state", "pending", "oldest", "added", "run", "cancelled",
           "errors", "unknown", "orphaned", "run/s", "add/s", "cpu%", "rss", "status")
_RIGHT = {"id", "pid", "pending", "oldest", "added", "run", "cancelled", "errors", "unknown",
          "orphaned", "run/s", "add/s", "cpu%", "rss"}


def _rate(cur, prev, key: str, dt: float) -> str:
    if prev is None or dt <= 0:
        return "-"
    return f"{max(0, getattr(cur, key) - getattr(prev, key)) / dt:.1f}"


def render(name: str, snap: Snapshot, prev: Snapshot | None, interval: float):
    """One frame: a table of the tasks and the pool line (a rich renderable)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st = snap.stats
    dt = (snap.t_ns - prev.t_ns) / 1e9 if prev is not None else 0.0
    before = {}
    if prev is not None:
        before = {(t.id, t.generation): t for t in prev.tasks}
    dead = [t for t in snap.tasks if t.state in ("dead", "reaped")]

    table = Table(box=box.SIMPLE_HEAD, title=text_cell(f"shm-taskwork top {name}"),
                  title_justify="left",
                  caption=None, pad_edge=False, expand=False)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in _RIGHT else "left", no_wrap=True,
                         overflow="ellipsis" if col == "name" else "fold")
    for t in snap.tasks:
        old = before.get((t.id, t.generation))
        pf = snap.procs.get(t.id)
        state = Text(t.state, style="bold red" if t.state == "dead" else
                     ("yellow" if t.state == "exiting" else
                      ("dim" if t.state == "exited" else "green")))
        cells = [str(t.id), t.name or "-", str(t.pid), state,
                 "unreadable" if t.unreadable else str(t.pending),
                 fmt_age(snap.oldest_ns.get(t.id), compact=True), str(t.added), str(t.run), str(t.cancelled),
                 str(t.errors), str(t.unknown), str(t.orphaned),
                 _rate(t, old, "run", dt), _rate(t, old, "added", dt),
                 "-" if pf is None or pf.cpu is None else f"{pf.cpu:.1f}",
                 fmt_bytes(pf.rss if pf is not None else None, compact=True),
                 pf.status if pf is not None and pf.status else "-"]
        # as text, escaped: never rich markup (the names are the segment's)
        table.add_row(*(text_cell(c) for c in cells), style="red" if t.state == "dead" else None)

    pool = Text.assemble(
        ("pool ", "bold"), f"used {st.pool_used}  free {st.pool_free}  size {st.pool_size}",
        ("   dead letters ", "bold"),
        (str(st.dead_letters), "bold red" if st.dead_letters else ""),
        ("   tasks ", "bold"), str(st.tasks),
        ("   pending ", "bold"), str(st.pending),
        ("   run/s ", "bold"), _rate(st, prev.stats if prev else None, "run", dt),
        ("   add/s ", "bold"), _rate(st, prev.stats if prev else None, "added", dt),
        f"   (every {interval:g}s)")
    parts = [table, pool]
    if not snap.tasks:
        parts.insert(1, Text("no tasks registered", style="dim"))
    if dead:
        who = ", ".join(f"{t.id} (pid {t.pid}, {t.pending} pending, {t.orphaned} orphaned)"
                        for t in dead)
        parts.append(Text(f"DEAD tasks: {who}; their works become dead letters when reaped; "
                          f"`shm-taskwork dead-letters {printable(name)} --retry` re-queues them",
                          style="bold red"))
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
    # Plain frames: no colour codes, and wide enough that rows do not wrap.
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


def _loop(dom, args) -> None:
    sampler = Sampler(dom)
    console = _console()
    interval = args.interval
    if args.once:
        first = sampler.sample()
        time.sleep(interval)  # the span the rates and CPU % are measured over
        frame = render(dom.name, sampler.sample(), first, interval)
        if console.is_terminal:
            console.print(frame)
        else:
            _emit(console, frame)
        return
    frames = args.iterations
    prev = None
    snap = sampler.sample()
    shown = 1
    if console.is_terminal:
        from rich.live import Live

        with Live(render(dom.name, snap, prev, interval), console=console,
                  auto_refresh=False, transient=False) as live:
            while frames is None or shown < frames:
                time.sleep(interval)
                prev, snap = snap, sampler.sample()
                live.update(render(dom.name, snap, prev, interval), refresh=True)
                shown += 1
        return
    _emit(console, render(dom.name, snap, prev, interval))
    while frames is None or shown < frames:
        time.sleep(interval)
        prev, snap = snap, sampler.sample()
        sys.stdout.write("\n")
        _emit(console, render(dom.name, snap, prev, interval))
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
