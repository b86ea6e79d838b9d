"""Small helpers the operator programs share: argument types, formatting,
showing strings read from a segment, opening files in /dev/shm."""
from __future__ import annotations

import argparse

# The one escaping of strings read from a segment (README, Security): the
# tools show task, callback, domain names and origins through it, never raw.
from shm_taskwork.domain import printable
from shm_taskwork.observe import oldest_pending_ns, open_regular

__all__ = ["printable", "text_cell", "oldest_pending_ns", "open_regular", "fmt_age", "fmt_bytes",
           "plain_table", "number_arg"]


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


def plain_table(head: tuple, rows: list[tuple], out, right=()) -> None:
    """Columns padded to their widest cell, two spaces apart: the fast path
    for long listings (rich's tables cost a millisecond a row)."""
    cols = list(zip(head, *rows)) if rows else [(h,) for h in head]
    widths = [max(len(str(x)) for x in col) for col in cols]
    fmts = [("{:>%d}" if h in right else "{:<%d}") % w for h, w in zip(head, widths)]
    line = "  ".join(fmts)
    write = out.write
    write(line.format(*head).rstrip() + "\n")
    write("  ".join("-" * w for w in widths) + "\n")
    for r in rows:
        write(line.format(*(str(x) for x in r)).rstrip() + "\n")
