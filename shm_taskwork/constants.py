"""Notify modes and flags, with the kernel's values (include/linux/task_work.h).

They come from the compiled core, so Python and C cannot disagree.
"""
from ._native import lib

TWA_NONE = lib.TW_TWA_NONE
TWA_RESUME = lib.TW_TWA_RESUME
TWA_SIGNAL = lib.TW_TWA_SIGNAL
TWA_SIGNAL_NO_IPI = lib.TW_TWA_SIGNAL_NO_IPI
TWA_NMI_CURRENT = lib.TW_TWA_NMI_CURRENT
TWA_FLAGS = lib.TW_TWA_FLAGS
TWAF_NO_ALLOC = lib.TW_TWAF_NO_ALLOC

# The bits of TaskInfo.flags (docs/contract.md "Observability"): the task's
# TIF_NOTIFY_RESUME, TIF_NOTIFY_SIGNAL and PF_EXITING.
TASK_NOTIFY_RESUME = lib.TW_F_NOTIFY_RESUME
TASK_NOTIFY_SIGNAL = lib.TW_F_NOTIFY_SIGNAL
TASK_EXITING = lib.TW_F_EXITING

MODE_NAMES = {
    TWA_NONE: "TWA_NONE",
    TWA_RESUME: "TWA_RESUME",
    TWA_SIGNAL: "TWA_SIGNAL",
    TWA_SIGNAL_NO_IPI: "TWA_SIGNAL_NO_IPI",
    TWA_NMI_CURRENT: "TWA_NMI_CURRENT",
}

VALID_MODES = (
    "TWA_NONE (0), TWA_RESUME (1), TWA_SIGNAL (2), TWA_SIGNAL_NO_IPI (3) or "
    "TWA_NMI_CURRENT (4, own task only), optionally OR-ed with TWAF_NO_ALLOC (0x100)"
)
