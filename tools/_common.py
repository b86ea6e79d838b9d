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
