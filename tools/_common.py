"""Small helpers the operator programs share: argument types, formatting,
showing strings read from a segment, opening files in /dev/shm."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

# The one escaping of strings read from a segment (README, Security): the
# tools show task, callback, domain names and origins through it, never raw.
from shm_taskwork.domain import printable
from shm_taskwork.observe import oldest_pending_ns, open_regular

__all__ = ["printable", "text_cell", "oldest_pending_ns", "open_regular", "fmt_age", "fmt_bytes",
           "plain_table", "render_table", "fit_columns", "terminal_width", "percentile",
           "preview", "work_id", "hidden_note", "say", "rich_table", "number_arg"]


def number_arg(parse, what: str, lo: float | None = None, hi: float | None = None, *,
               above: bool = False):
    """An argparse type: ``parse(text)`` (int or float), finite, at least
    ``lo`` (more than ``lo`` with ``above``) and at most ``hi``. Errors name
    the range."""
    if above:
        span = f"more than {lo:g}" if hi is None else f"more than {lo:g} and at most {hi:g}"
    elif hi is None:
        span = f"at least {lo:g}"
    else:
        span = f"{lo:g}..{hi:g}"

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        if lo is not None:
            bad = bad or (value <= lo if above else value < lo)
        if hi is not None:
            bad = bad or value > hi
        if bad:
            raise argparse.ArgumentTypeError(f"{what} must be {span}, got {text!r}")
        return value

    convert.__name__ = what.replace(" ", "_")
    return convert


def _int10(text: str) -> int:
    return int(text, 10)


#: argparse type: a whole number of at least 1.
positive_int = number_arg(_int10, "an integer", 1)
#: argparse type: a whole number of at least 0.
count_int = number_arg(_int10, "a whole number", 0)
#: The longest span a seconds flag takes: about 31 years, well inside what
#: sleeps and timers accept (a larger one would overflow them).
MAX_SECONDS = 1e9
#: argparse type: a positive, finite number of seconds, at most MAX_SECONDS.
positive_seconds = number_arg(float, "a number of seconds", 0, MAX_SECONDS, above=True)


def text_cell(value):
    """A cell of a rich table: ``printable(str(value))`` as a ``Text``, which
    rich shows as it is, never parsing it as markup (a name ``[/]`` or
    ``[link=...]`` is text)."""
    from rich.text import Text

    if isinstance(value, Text):
        return value
    return Text(printable(str(value)))


def fmt_age(ns: int | None, compact: bool = False) -> str:
    """A duration in nanoseconds, in the unit that reads best (``compact``:
    no space before the unit, for columns split on white space)."""
    if compact:
        return fmt_age(ns).replace(" ", "")
    if ns is None:
        return "-"
    s = ns / 1e9
    if s < 1e-3:
        return f"{ns / 1e3:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_bytes(n: float | None, compact: bool = False) -> str:
    if compact:
        return fmt_bytes(n).replace(" ", "")
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def work_id(value: int) -> str:
    """How the tools show a work's id, in text and in JSON alike: ``0x`` and
    lowercase hex, as ``repr(Work)`` and the package's log lines write it
    (docs/cli.md, "Ids"). One form, so an id copied from a text listing, a
    log line or ``--json`` output finds the same work; ``int(text, 16)``
    gives back ``Work.id``."""
    return f"{int(value):#x}"


def preview(payload: bytes, width: int = 24) -> str:
    """A short, escaped view of a payload: printable ASCII as it is, every
    other byte as ``\\xNN`` (``\\n``, ``\\t`` ...), cut to ``width``
    characters with ``...`` when longer. Nothing in it is a control
    character, so it is safe on a terminal."""
    text = repr(bytes(payload))[2:-1]
    if len(text) > width:
        text = text[:max(0, width - 3)] + "..."
    return text


def percentile(values, p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``:
    the smallest value with at least p % of the values at or below it
    (``percentile(xs, 50)`` is the lower median, ``percentile(xs, 100)``
    the maximum). ValueError on an empty sequence or a p out of range."""
    if not 0 < p <= 100:
        raise ValueError(f"a percentile is more than 0 and at most 100, got {p!r}")
    s = sorted(values)
    if not s:
        raise ValueError("the percentile of no values")
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


#: The width assumed when output goes to a pipe or a file and COLUMNS is
#: not set: wide enough for every column of every table.
UNLIMITED = 10_000


def terminal_width(out=None) -> int:
    """The columns the output may use: ``$COLUMNS`` when set (as rich and
    the shells read it), else the width of the terminal ``out`` is, else
    (a pipe, a file) UNLIMITED, so scripts reading the text get every
    column."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    out = sys.stdout if out is None else out
    try:
        if out.isatty():
            return shutil.get_terminal_size((80, 24)).columns
    except (AttributeError, ValueError, OSError):
        pass
    return UNLIMITED


def _cell(x) -> str:
    return printable(str(x))


def _line_width(widths: list[int], gap: int, edge: int) -> int:
    return sum(widths) + gap * max(0, len(widths) - 1) + edge


def fit_columns(head: tuple, rows: list[tuple], width: int, drop: tuple = (), *,
                gap: int = 2, edge: int = 0, shrink: tuple = ()) -> tuple[tuple, list[tuple]]:
    """The columns of a table that fit in ``width`` characters.

    Columns named in ``drop`` are left out, in that order, while the table
    is wider than ``width`` (``gap`` characters between columns, ``edge``
    around the whole); a column not in ``drop`` is always kept. The columns
    named in ``shrink`` (free text: a name, an origin) count as at most 16
    characters wide, since the renderer wraps them. Returns (head, rows)."""
    keep = list(range(len(head)))

    def widths() -> list[int]:
        out = []
        for i in keep:
            w = max([len(_cell(head[i]))] + [len(_cell(r[i])) for r in rows])
            out.append(min(w, max(16, len(_cell(head[i])))) if head[i] in shrink else w)
        return out

    for name in drop:
        if _line_width(widths(), gap, edge) <= width:
            break
        if name in head and head.index(name) in keep:
            keep.remove(head.index(name))
    return tuple(head[i] for i in keep), [tuple(r[i] for i in keep) for r in rows]


def rich_table(head: tuple, rows: list[tuple], *, title: str | None = None, right=(),
               wrap=(), escape: bool = True, row_styles: list | None = None,
               sections=(), boxed: bool = False):
    """The rich ``Table`` that ``render_table`` prints, for a view that
    redraws it (``top``): the same layout, cells and escaping.
    ``row_styles``: a rich style (or None) per row; ``sections``: the
    indices of the rows a rule follows (before a total); ``boxed``: rules
    around and between the columns (a report read once, not a listing)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # no vertical rules: two spaces between columns, none at the edges, so
    # the plain and the rich layout are the same width (fit_columns)
    if boxed:
        t = Table(title=text_cell(title) if title else None, title_justify="left")
    else:
        t = Table(title=text_cell(title) if title else None, title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    for h in head:
        t.add_column(h, justify="right" if h in right else "left", no_wrap=h not in wrap,
                     overflow="fold")
    for k, r in enumerate(rows):
        t.add_row(*(x if isinstance(x, Text) else text_cell(x) if escape else Text(str(x))
                    for x in r), style=row_styles[k] if row_styles else None,
                  end_section=k in sections)
    return t


def render_table(head: tuple, rows: list[tuple], out, *, title: str | None = None,
                 right=(), wrap=(), rich: bool = False, width: int | None = None,
                 escape: bool = True, sections=(), boxed: bool = False) -> None:
    """The one table renderer of the tools.

    Every cell is shown escaped (``printable``; ``escape=False``: the
    caller escaped them already) and as text, never parsed as markup: the
    names in it are the segment's. ``right``: the columns
    aligned right (figures); ``wrap``: the columns that may wrap onto more
    lines when the table is too wide (free text: names, origins); the
    others never wrap. ``rich``: a rich table (``rich_table``: for views a
    person reads, a bold header, colours on a terminal); otherwise plain
    columns under a rule of dashes, which costs microseconds a row where
    rich costs a millisecond (for long listings). Both have two spaces
    between columns and none at the edges. ``width``: the line length to fit (default
    ``terminal_width(out)``); fit the columns first with ``fit_columns``.
    ``sections``, ``boxed``: as ``rich_table`` (rich only).
    """
    width = terminal_width(out) if width is None else width
    if rich:
        try:
            from rich.console import Console
        except ImportError:  # pragma: no cover - rich is a declared dependency
            rich = False
    if rich:
        console = Console(file=out, width=min(width, UNLIMITED), highlight=False,
                          color_system="auto" if out.isatty() else None)
        t = rich_table(head, rows, title=title, right=right, wrap=wrap, escape=escape,
                       sections=sections, boxed=boxed)
        with console.capture() as cap:
            console.print(t)
        # rich pads every line to the table's width: no trailing blanks
        out.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
        return
    write = out.write
    if title:
        write(_cell(title) + "\n")
    cells = [tuple(_cell(x) if escape else str(x) for x in r) for r in rows]
    cols = list(zip(head, *cells)) if cells else [(h,) for h in head]
    widths = [max(len(str(x)) for x in col) for col in cols]
    fmts = [("{:>%d}" if h in right else "{:<%d}") % w for h, w in zip(head, widths)]
    line = "  ".join(fmts)
    write(line.format(*head).rstrip() + "\n")
    write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        write(line.format(*r).rstrip() + "\n")


def say(text: str, out, width: int | None = None) -> None:
    """One line of prose, wrapped to the output's width (a pipe: unwrapped);
    continuation lines are indented two spaces. No word is broken."""
    import textwrap

    width = terminal_width(out) if width is None else width
    if len(text) <= width:
        out.write(text + "\n")
        return
    out.write(textwrap.fill(text, width=max(40, width), subsequent_indent="  ",
                            break_long_words=False, break_on_hyphens=False) + "\n")


def hidden_note(hidden, out, width: int | None = None) -> None:
    """One note, wrapped to the width, naming the columns ``fit_columns``
    left out and how to see them."""
    if not hidden:
        return
    import textwrap

    width = terminal_width(out) if width is None else width
    n = len(hidden)
    text = (f"({n} more column{'s' if n != 1 else ''} with --wide: {', '.join(hidden)})")
    out.write(textwrap.fill(text, width=max(40, min(width, UNLIMITED))) + "\n")


def plain_table(head: tuple, rows: list[tuple], out, right=()) -> None:
    """``render_table`` in plain columns, of cells the caller escaped."""
    render_table(head, rows, out, right=right, escape=False)
