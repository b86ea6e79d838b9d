"""Callbacks registered by name.

A work names its callback in shared memory by a stable 64-bit id: the first
8 bytes of BLAKE2b over the UTF-8 name (0 is reserved, so it maps to 1). The
name itself goes into the domain's name table, so tools can show it. The
process that *runs* a work must have the callback registered - normally by
importing the module that defines it.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any, Callable, TypeVar, Union, overload

#: A callback as add() and the cancel calls take it: the registered function
#: (or any callable, named by ``module:qualname``) or its registered name.
CallbackRef = Union[str, Callable[..., Any]]
F = TypeVar("F", bound=Callable[..., Any])

from . import codec as _codec
from .errors import UnknownCallbackError

_BY_ID: dict[int, Callable] = {}
_NAMES: dict[int, str] = {}
#: id -> the codec this process declared for it (raw callbacks are absent)
_CODECS: dict[int, str] = {}
#: called with (id, name, codec) when a callback declares a codec; the domain
#: layer records it in every domain this process has open (domain.py)
ON_DECLARE: list[Callable[[int, str, str], None]] = []
NAME_LIMIT = 111  # bytes; the domain's name table keeps this many


def func_id(name: str) -> int:
    """The stable 64-bit id of a callback name."""
    v = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return v or 1


TASK_NAME_PREFIX = "task:"   # task names share the domain's name table with callbacks


def task_name_id(name: str) -> int:
    """The name-table id of a task name (kept with its dead letters)."""
    return func_id(TASK_NAME_PREFIX + name)


def default_name(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


ON_FAILURE = ("dead_letter", "drop")
#: retries a callback may ask for: the attempt count lives in 16 bits of a node
MAX_RETRIES = 1000


@overload
def callback(fn: F, *, name: str | None = None, batch: bool = False, retries: int = 0,
             on_failure: str = "dead_letter", codec: str | None = None) -> F: ...


@overload
def callback(fn: None = None, *, name: str | None = None, batch: bool = False,
             retries: int = 0, on_failure: str = "dead_letter",
             codec: str | None = None) -> Callable[[F], F]: ...


def callback(fn: Callable[..., Any] | None = None, *,
             name: str | None = None, batch: bool = False, retries: int = 0,
             on_failure: str = "dead_letter", codec: str | None = None) -> Callable[..., Any]:
    """Register ``fn`` as a callback, under ``module:qualname`` or ``name``.

    Usable bare (``@callback``) or with a name (``@callback(name="app.flush")``).
    An ``async def`` is allowed: in a task attached to an asyncio loop
    (``task.attach_loop()``) each of its works is scheduled on the loop and
    counted ``run`` when the coroutine finishes (``errors`` if it raised);
    a task without an attached loop counts it an error ("async callback
    needs an attached loop") and never creates the coroutine.
    ``batch=True`` makes a batch callback: it is called once per run batch
    with the list of its works from that batch, newest first, instead of
    once per work; a batch callback that raises counts one error per work of
    the list. (Not for ``async def``.)
    A callback that raises is kept (README "Workers in production"): it is
    queued again on the same task and run again, up to ``retries`` times
    (``Work.attempt`` is 0 the first time); after that its work becomes a
    dead letter with ``reason="failed"`` and ``Work.error`` (the exception's
    type and message, cut to the room its node has after the payload).
    ``errors`` counts every raise. ``on_failure="drop"`` counts and logs the
    raise and forgets the work. (``async def`` callbacks are counted and
    logged, as with ``"drop"``.)
    Registering the same name twice replaces the function (a module reloaded);
    two different names with the same id are refused.

    ``codec`` (docs/contract.md "Codecs"): how the callback's payload holds an
    object - ``"json"``, ``"pickle"``, ``"msgpack"`` (when the msgpack package
    is importable) or None, raw bytes (the default). It is recorded with the
    name in every domain this process maps, so ``task.add(name, obj)`` from
    any process encodes ``obj`` with it, and the callback reads the object as
    ``work.value``. The first codec a domain records for a name stays; a
    process that declares another one gets a ValueError naming both when it puts
    the name (adds with it) or reads ``work.value``. ``"pickle"`` is refused
    (``PermissionError``) in a domain another user can write.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or \
            not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an int from 0 to {MAX_RETRIES}, got {retries!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, "
                         f"got {on_failure!r}")
    codec = _codec.check_codec(codec)

    def register(f: Any) -> Any:
        if not callable(f):
            raise TypeError(f"callback() needs a callable, got {type(f).__name__}")
        cb_name = name if name is not None else default_name(f)
        if not isinstance(cb_name, str) or not cb_name:
            raise ValueError("a callback name must be a non-empty str")
        _check_name(cb_name)
        fid = func_id(cb_name)
        other = _NAMES.get(fid)
        if other is not None and other != cb_name:  # pragma: no cover - 2**-64
            raise ValueError(f"callback names {cb_name!r} and {other!r} share the id {fid:#x}")
        _BY_ID[fid] = f
        _NAMES[fid] = cb_name
        f.__shm_taskwork_name__ = cb_name
        f.__shm_taskwork_id__ = fid
        # an `async def`: its works are scheduled on the task's attached loop
        f.__shm_taskwork_async__ = inspect.iscoroutinefunction(f)
        if batch and f.__shm_taskwork_async__:
            raise TypeError(f"callback {cb_name!r}: a batch callback cannot be async")
        f.__shm_taskwork_batch__ = bool(batch)
        f.__shm_taskwork_retries__ = retries
        # keep a failed work (retry it, then file it): not for async ones
        f.__shm_taskwork_keep__ = on_failure == "dead_letter" and not f.__shm_taskwork_async__
        f.__shm_taskwork_codec__ = codec
        if codec is None:
            _CODECS.pop(fid, None)
        else:
            _CODECS[fid] = codec
            for hook in ON_DECLARE:
                hook(fid, cb_name, codec)
        return f

    if fn is not None:
        return register(fn)
    return register


def unregister(func_or_name) -> None:
    """Forget a callback in this process (works for it become unknown here)."""
    fid, _ = resolve(func_or_name)
    _BY_ID.pop(fid, None)
    _NAMES.pop(fid, None)
    _CODECS.pop(fid, None)


_BY_NAME: dict[str, tuple[int, str]] = {}


def resolve(func) -> tuple[int, str]:
    """(id, name) for a registered function, any callable, or a name."""
    if isinstance(func, str):
        got = _BY_NAME.get(func)
        if got is not None:
            return got
        if not func:
            raise ValueError("a callback name must be a non-empty str")
        _check_name(func)
        if len(_BY_NAME) < 4096:
            _BY_NAME[func] = got = (func_id(func), func)
            return got
        return func_id(func), func
    fid = getattr(func, "__shm_taskwork_id__", None)
    if fid is not None:
        return fid, func.__shm_taskwork_name__
    if callable(func):
        name = getattr(func, "__shm_taskwork_name__", None) or default_name(func)
        _check_name(name)
        return func_id(name), name
    raise TypeError(f"func must be a callback (a callable or its registered name), "
                    f"not {type(func).__name__}")


def _check_name(name: str) -> None:
    """A name the domain's table keeps whole: no NUL, at most NAME_LIMIT bytes."""
    if "\0" in name:
        raise ValueError(f"a callback name may not contain NUL, got {name!r}")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ValueError(f"a callback name must be encodable as UTF-8, got {name!r}") from None
    if size > NAME_LIMIT:
        raise ValueError(f"callback name {name!r} is {size} bytes; the limit is {NAME_LIMIT}")


def lookup(fid: int) -> Callable | None:
    return _BY_ID.get(fid)


def name_of(fid: int) -> str | None:
    return _NAMES.get(fid)


def codec_of(fid: int) -> str | None:
    """The codec this process declared for callback ``fid`` (None: raw, or
    not declared here)."""
    return _CODECS.get(fid)


def declared_codecs() -> list[tuple[int, str, str]]:
    """(id, name, codec) of every callback this process declared a codec for."""
    return [(fid, _NAMES[fid], c) for fid, c in list(_CODECS.items()) if fid in _NAMES]


def require(func) -> Callable:
    fid, name = resolve(func)
    fn = _BY_ID.get(fid)
    if fn is None:
        raise UnknownCallbackError(f"callback {name!r} is not registered in this process")
    return fn


def log_callback_error(work: Any, exc: BaseException) -> None:
    """Log a callback that raised (logger ``shm_taskwork``), with where its
    work was queued when the domain records origins."""
    where = f" (queued at {work.origin})" if work.origin else ""
    logging.getLogger("shm_taskwork").error(
        "callback %s failed for work %#x%s: %r", work.func_name, work.id or 0, where, exc,
        exc_info=exc)
