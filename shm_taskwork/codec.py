"""Payload helpers and the codec table.

Payloads are bytes. A callback may declare a codec for objects
(``@callback(..., codec="json")``, docs/contract.md "Codecs"): ``encode`` and
``decode`` at the end of this module are the table the library uses. The
helpers before it are for callers who encode by hand.

Pickle only when asked for by name, because unpickling data read from shared
memory runs whatever code the data names.
"""
from __future__ import annotations

import json
import pickle
from typing import Any


def json_dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_loads(data: bytes) -> Any:
    """The object a json_dumps payload holds."""
    return json.loads(data)


def pickle_dumps_unsafe(obj: Any) -> bytes:
    """Pickle ``obj``. Only for domains whose every writer you trust."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def pickle_loads_unsafe(data: bytes) -> Any:
    """Unpickle: runs code named by the data. Only for trusted writers."""
    return pickle.loads(data)


# ---- the codec table (docs/contract.md "Codecs") -------------------------------
#
# A callback may declare how its payload encodes an object
# (``@callback(..., codec="json")``); the domain's name table records the
# codec's number next to the callback's name, so a sender that knows only the
# name encodes right. The numbers are the layout's TW_CODEC_* (tw_layout.h).

#: codec name -> the number the name table records (0, raw, is "none declared")
CODEC_IDS = {"json": 1, "pickle": 2, "msgpack": 3}
#: number -> codec name (None: raw bytes)
CODEC_NAMES: dict[int, str | None] = {0: None, **{v: k for k, v in CODEC_IDS.items()}}


def _msgpack() -> Any:
    """The msgpack module, or None when it is not importable."""
    try:
        import msgpack  # type: ignore[import-untyped, unused-ignore]  # the msgpack extra
    except ImportError:
        return None
    return msgpack


def available() -> tuple[str | None, ...]:
    """The codecs this process can use: None (raw bytes), "json", "pickle",
    and "msgpack" when the msgpack package is importable."""
    return (None, "json", "pickle") + (("msgpack",) if _msgpack() is not None else ())


def _choices() -> str:
    return ", ".join(map(repr, available()))


def check_codec(codec: Any) -> str | None:
    """``codec`` if it is one this process can use, else ValueError naming
    the valid choices."""
    if codec is None:
        return None
    if not isinstance(codec, str) or codec not in CODEC_IDS:
        raise ValueError(f"codec must be one of {_choices()}, got {codec!r}")
    if codec == "msgpack" and _msgpack() is None:
        raise ValueError(f"codec 'msgpack' needs the msgpack package, which is not installed "
                         f"(pip install 'shm-taskwork[msgpack]'); valid codecs here: "
                         f"{_choices()}")
    return codec


def _json_encode(obj: Any) -> bytes:
    # strict JSON (no NaN/Infinity): what any reader of the format accepts
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _msgpack_encode(obj: Any) -> bytes:
    mp = _msgpack()
    if mp is None:
        check_codec("msgpack")  # raises, naming the valid choices
    return mp.packb(obj, use_bin_type=True)


def _msgpack_decode(data: bytes) -> Any:
    mp = _msgpack()
    if mp is None:
        check_codec("msgpack")
    return mp.unpackb(data, raw=False)


_ENCODE = {"json": _json_encode, "pickle": pickle_dumps_unsafe, "msgpack": _msgpack_encode}
_DECODE = {"json": json_loads, "pickle": pickle_loads_unsafe, "msgpack": _msgpack_decode}


def encode(codec: str, obj: Any, what: str = "payload") -> bytes:
    """``obj`` encoded with ``codec``. An object the codec cannot encode is a
    TypeError (its type has no encoding) or a ValueError (its value has
    none: a cycle, NaN in JSON, an int too wide), naming the codec."""
    fn = _ENCODE.get(codec)  # type: ignore[arg-type]
    if fn is None:
        check_codec(codec)
    try:
        return fn(obj)  # type: ignore[misc]
    except Exception as exc:
        kind = TypeError if isinstance(exc, (TypeError, AttributeError,
                                             pickle.PicklingError)) else ValueError
        raise kind(f"{what} cannot be encoded with codec {codec!r}: "
                   f"{type(exc).__name__}: {exc}") from exc


def decode(codec: str, data: bytes, what: str = "payload") -> Any:
    """The object ``data`` holds in ``codec``; ValueError naming the codec if
    it holds none. (``"pickle"`` runs code named by the data: the caller
    checks who can write it.)"""
    fn = _DECODE.get(codec)  # type: ignore[arg-type]
    if fn is None:
        check_codec(codec)
    try:
        return fn(data)  # type: ignore[misc]
    except Exception as exc:
        raise ValueError(f"{what} is not valid {codec} ({len(data)} bytes): "
                         f"{type(exc).__name__}: {exc}") from exc
