"""shm_taskwork: the Linux kernel's task_work, for processes on one host.

The public names of the contract (docs/contract.md), nothing else.
"""
from .callbacks import callback
from .constants import (TWA_FLAGS, TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL,
                        TWA_SIGNAL_NO_IPI, TWAF_NO_ALLOC)
from ._native import DEAD_LETTER_REASONS
from .domain import Domain, DomainStats, TaskInfo
from .errors import (CallbackFailedError, DomainCorruptError, InvalidModeError, NoSuchTaskError,
                     NotCurrentTaskError, OutcomeUnknownError, PayloadTooLargeError,
                     PoolExhaustedError, TaskExitedError, TaskWorkError, UnknownCallbackError,
                     WorkLostError)
from .fsck import FsckReport
from .kernel import (init_task_work, task_work_add, task_work_cancel, task_work_cancel_func,
                     task_work_cancel_match, task_work_pending, task_work_run)
from .task import Task
from .work import Work

__version__ = "0.1.0"

__all__ = [
    "DEAD_LETTER_REASONS",
    "Domain", "DomainStats", "TaskInfo", "Task", "Work", "FsckReport", "callback",
    "TWA_NONE", "TWA_RESUME", "TWA_SIGNAL", "TWA_SIGNAL_NO_IPI", "TWA_NMI_CURRENT",
    "TWA_FLAGS", "TWAF_NO_ALLOC",
    "TaskWorkError", "TaskExitedError", "InvalidModeError", "PayloadTooLargeError",
    "PoolExhaustedError", "NoSuchTaskError", "NotCurrentTaskError", "DomainCorruptError",
    "UnknownCallbackError", "CallbackFailedError", "WorkLostError", "OutcomeUnknownError",
    "init_task_work", "task_work_add", "task_work_run", "task_work_pending",
    "task_work_cancel_match", "task_work_cancel_func", "task_work_cancel",
]
