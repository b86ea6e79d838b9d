"""Small helpers the operator programs share: argument types and formatting."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def oldest_pending_ns(dom, task_id: int, gen: int) -> int | None:
    """``enqueued_ns`` of the oldest pending work of one task, or None.

    The list is newest first, so the oldest is the last node of a snapshot:
    one walk in C and one node read, however many works are pending."""
    from shm_taskwork._native import ffi, lib

    n = dom.pool_size
    nodes = ffi.new("uint32_t[]", n)
    gens = ffi.new("uint32_t[]", n)
    cnt = lib.tw_snapshot(dom.d, task_id, gen, nodes, gens, n)
    if cnt <= 0:
        return None
    w = dom._read(nodes[min(cnt, n) - 1], gens[min(cnt, n) - 1], "pending")
    return None if w is None else w.enqueued_ns


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
