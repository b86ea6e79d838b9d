"""The exception tree of SPEC §5.

``TaskWorkError`` is the root and is never raised directly. Errors the kernel
has an errno for carry it (``err.errno``); bad-input errors are also
``ValueError``s, a lookup failure is a ``LookupError``, and an exited task is a
``ProcessLookupError`` (ESRCH), so code written against the standard library's
exceptions keeps working.
"""
import errno as _errno


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
]
