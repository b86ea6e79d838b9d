"""The exception tree of docs/contract.md "Errors".

``TaskWorkError`` is the root and is never raised directly. Errors the kernel
has an errno for carry it (``err.errno``); bad-input errors are also
``ValueError``s, a lookup failure is a ``LookupError``, and an exited task is a
``ProcessLookupError`` (ESRCH), so code written against the standard library's
exceptions keeps working.
"""
import errno as _errno
import os


class TaskWorkError(Exception):
    """Root of every error this package raises (never raised directly)."""

    errno: int | None = None

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class TaskExitedError(TaskWorkError, ProcessLookupError):
    """The task accepts no more work (its head holds the exited sentinel), or
    the handle belongs to an earlier registration of a reused slot. ESRCH."""

    errno = _errno.ESRCH

    def __init__(self, message: str):
        TaskWorkError.__init__(self, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


class InvalidModeError(TaskWorkError, ValueError):
    """Unknown notify value, or TWA_NMI_CURRENT aimed at another task. EINVAL."""

    errno = _errno.EINVAL


class PayloadTooLargeError(TaskWorkError, ValueError):
    """The payload is larger than the domain's payload_size. E2BIG."""

    errno = _errno.E2BIG


class PoolExhaustedError(TaskWorkError):
    """No free node in the domain's work pool. ENOMEM."""

    errno = _errno.ENOMEM


class NoSuchTaskError(TaskWorkError, LookupError):
    """No registered task matches the key."""


class NotCurrentTaskError(TaskWorkError):
    """An operation that only the task's own process may do (run, wait,
    checkpoint, exit, fileno) was called on another process's task."""

    errno = _errno.EPERM


class DomainCorruptError(TaskWorkError):
    """The segment is inconsistent (bad magic, layout, index, a list that does
    not end) or a lock was not obtained within its deadline."""

    errno = _errno.EUCLEAN


class UnknownCallbackError(TaskWorkError, LookupError):
    """A callback name or id that is not registered in this process."""


class CallbackFailedError(TaskWorkError):
    """``task.call()``: the callback raised (its retries spent). The message
    is the remote error ("Type: message"); ``work`` is the work's handle."""

    def __init__(self, message: str, *, work: object = None):
        super().__init__(message)
        self.work = work


class WorkLostError(TaskWorkError):
    """``task.call()``: the work will never give a result - its outcome is
    ``dead_letter`` (orphaned, shutdown, unknown callback), ``interrupted``
    (its task died in the callback) or ``cancelled`` (by someone else).
    ``outcome`` says which; ``work`` is the work's handle."""

    def __init__(self, message: str, *, work: object = None, outcome: str | None = None):
        super().__init__(message)
        self.work = work
        self.outcome = outcome


class OutcomeUnknownError(TaskWorkError, LookupError):
    """No outcome is recorded for a work id: it was not added with
    ``track=True``, or its record was reused after ``outcomes`` newer
    tracked works settled (docs/contract.md "Outcomes")."""


class KeyBusyError(BlockingIOError):
    """Another live process is adding this key right now: try again later."""


def from_errno(e: int, what: str, *, limit: str = "", **ctx: object) -> Exception:
    """The exception for a native call's ``-e`` (README "Errors"): the one
    place an errno becomes an exception. ``what`` names the call; ``ctx``
    adds what the caller knows, for a message that names the limit:
    ``notify`` and ``valid_modes``, ``size`` and ``payload_size``, ``domain`` and ``pool_size``,
    ``task`` (a description) and ``dead`` (its process died), ``key``."""
    msg = f"{what}: {os.strerror(e)}"
    if limit:
        msg += f" ({limit})"
    if e == _errno.EBUSY and "key" in ctx:
        return KeyBusyError(_errno.EBUSY,
                            f"key {ctx['key']!r} is being added by another live process")
    if e == _errno.ENOSPC and "key" in ctx:
        return BlockingIOError(_errno.ENOSPC, "every entry of the key table is in flight; "
                               "try again")
    if e in (_errno.ESRCH, _errno.EOWNERDEAD):
        if "task" in ctx:
            if e == _errno.EOWNERDEAD:
                return TaskExitedError(f"{what}: {ctx['task']} is dead (its process "
                                       f"{ctx.get('pid')} died) and accepts no more work "
                                       "(ESRCH)")
            return TaskExitedError(f"{what}: {ctx['task']} has exited and accepts no more "
                                   "work (ESRCH)")
        return TaskExitedError(f"{what}: the task has exited and accepts no more work (ESRCH)")
    if e == _errno.EINVAL:
        if "notify" in ctx:
            return InvalidModeError(f"{what}: notify={ctx['notify']!r} is not valid here: use "
                                    f"{ctx.get('valid_modes')}", errno=e)
        return InvalidModeError(msg, errno=e)
    if e == _errno.E2BIG:
        if "size" in ctx:
            return PayloadTooLargeError(
                f"{what}: payload of {ctx['size']} bytes is larger than the domain's "
                f"payload_size ({ctx.get('payload_size')} bytes); nothing was queued", errno=e)
        return PayloadTooLargeError(msg, errno=e)
    if e == _errno.ENOMEM:
        if "domain" in ctx:
            return PoolExhaustedError(
                f"{what}: the work pool of domain {ctx['domain']!r} is empty (pool_size="
                f"{ctx.get('pool_size')}); nothing was queued", errno=e)
        return PoolExhaustedError(msg, errno=e)
    if e == _errno.EPERM:
        return NotCurrentTaskError(msg, errno=e)
    if e == _errno.ETIMEDOUT:
        return DomainCorruptError(
            f"{what}: a lock in the segment was not obtained within its deadline "
            "(its holder is stuck, or the segment is corrupt)", errno=e)
    if e in (_errno.EUCLEAN, _errno.EPROTO):
        return DomainCorruptError(f"{what}: the segment is inconsistent", errno=e)
    if e == _errno.EUSERS:
        return TaskWorkError(
            f"{what}: the domain's process table is full of live processes "
            f"({limit or 'max_procs'}); create the domain with a larger max_procs", errno=e)
    return TaskWorkError(msg, errno=e)


__all__ = [
    "TaskWorkError",
    "TaskExitedError",
    "InvalidModeError",
    "PayloadTooLargeError",
    "PoolExhaustedError",
    "NoSuchTaskError",
    "NotCurrentTaskError",
    "DomainCorruptError",
    "UnknownCallbackError",
    "KeyBusyError",
]
