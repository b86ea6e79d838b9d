"""The kernel's names, returning the kernel's values instead of raising.

For code ported from kernel/task_work.c: ``task_work_add`` returns 0 or a
negative errno, the cancel functions return the removed work or None.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

from . import callbacks
from .domain import _OPEN
from .errors import (InvalidModeError, PayloadTooLargeError, PoolExhaustedError,
                     TaskExitedError)
from .work import Work

if TYPE_CHECKING:
    from .callbacks import CallbackRef
    from .task import Task

def _task(task: "Task") -> "Task":
    from .task import Task  # task.py imports domain.py, as this module does
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task (from dom.task() or dom.register()), "
                        f"got {type(task).__name__}")
    return task


def init_task_work(func: "CallbackRef", payload: bytes | bytearray | memoryview = b"") -> Work:
    """An unqueued work (init_task_work)."""
    fid, name = callbacks.resolve(func)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}")
    return Work(name, fid, bytes(payload))


def task_work_add(task: "Task", work: Work, notify: int) -> int:
    """Queue ``work`` on ``task``. RETURNS: 0, -ESRCH (the task exited),
    -EINVAL (bad notify mode), -ENOMEM (pool empty) or -E2BIG (payload too
    large). On success ``work`` becomes the queued work (its id is set)."""
    _task(task)
    if not isinstance(work, Work):
        raise TypeError(f"work must be a Work (from init_task_work()), got {type(work).__name__}")
    try:
        got = task.add(work.func_name, work.payload, notify)
    except TaskExitedError:
        return -errno.ESRCH
    except InvalidModeError:
        return -errno.EINVAL
    except PoolExhaustedError:
        return -errno.ENOMEM
    except PayloadTooLargeError:
        return -errno.E2BIG
    for attr in ("sender_pid", "target", "target_gen", "enqueued_ns", "origin", "id",
                 "domain", "state"):
        setattr(work, attr, getattr(got, attr))
    return 0


def task_work_run() -> None:
    """Run the calling process's task in every domain it joined."""
    for dom in list(_OPEN):
        if not dom._closed:
            cur = dom.current
            if cur is not None:
                cur.run()


def task_work_pending(task: "Task") -> bool:
    return _task(task).pending() > 0


def task_work_cancel_match(task: "Task", match: Callable[[Work, object], bool],
                           data: object) -> Work | None:
    """Remove the newest pending work with ``match(work, data)`` true."""
    if not callable(match):
        raise TypeError(f"match must be callable as match(work, data), got {type(match).__name__}")
    return _task(task).cancel_match(lambda w: match(w, data))


def task_work_cancel_func(task: "Task", func: "CallbackRef") -> Work | None:
    return _task(task).cancel_func(func)


def task_work_cancel(task: "Task", work: Work) -> bool:
    return _task(task).cancel(work)
