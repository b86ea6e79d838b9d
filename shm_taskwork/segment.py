"""A domain's segment: made whole under a temporary name and then linked
under its own, or opened and checked, and mapped by the compiled core
(``tw_map``). What :meth:`Domain.create <shm_taskwork.Domain.create>` and
:meth:`Domain.open <shm_taskwork.Domain.open>` do below the Python object
(docs/contract.md "Lifecycle without an operator").
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import time
from typing import Any

import posix_ipc

from . import _native, _security
from ._native import check, ffi, lib
from .errors import DomainCorruptError

SHM_DIR = "/dev/shm"   # where Linux keeps POSIX shared memory (glibc's shm_open)

LIMITS = {
    "max_tasks": (1, 4096),
    "pool_size": (1, 1 << 24),
    "payload_size": (0, 1 << 20),
    "max_procs": (1, 65536),
    "names_cap": (1, 1 << 20),
    "outcomes": (1, 1 << 20),     # lib.TW_OUTCOMES_LIMIT
}


def _check_int(key: str, value) -> int:
    lo, hi = LIMITS[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{key}={value} is out of range: it must be between {lo} and {hi}")
    return value


def _check_mode(mode) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits between 0 and 0o777, got {mode!r}")
    return mode


def _check_owner(name: str, st: os.stat_result, mode: int) -> None:
    """PermissionError unless the segment (``st``) is this effective user's
    and grants no bit outside ``mode``."""
    have = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    if st.st_uid == euid and not have & ~mode:
        return
    why = (f"it belongs to uid {st.st_uid}, not to this process (uid {euid})"
           if st.st_uid != euid else
           f"its mode {have:#o} grants more than the {mode:#o} asked for")
    raise PermissionError(errno.EACCES,
                          f"refusing to join domain {name!r}: it is owned by uid {st.st_uid} "
                          f"gid {st.st_gid} with mode {have:#o}, and {why}; remove it or "
                          f"pick another name", SHM_DIR + name)


_TMP_PREFIX = ".shm_taskwork-new."   # a domain being formatted, not yet linked


def _sweep_temporaries() -> None:
    """Remove temporaries left by creators that died before they linked."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(_TMP_PREFIX)]
    except OSError:
        return
    for n in names:
        try:
            pid = int(n[len(_TMP_PREFIX):].split(".")[0])
            os.kill(pid, 0)
            continue               # its creator is still at work
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            os.unlink(f"{SHM_DIR}/{n}")
        except OSError:
            pass


def create(name: str, *, max_tasks: int, pool_size: int, payload_size: int, mode: int,
           record_origin: bool, max_procs: int | None, names_cap: int, outcomes: int) -> Any:
    """Domain.create below the object: check the sizes, make the segment
    ``name`` (already normalized) whole and map it; its ``struct tw_dom``."""
    _check_int("max_tasks", max_tasks)
    _check_int("pool_size", pool_size)
    _check_int("payload_size", payload_size)
    if max_procs is None:
        max_procs = min(65536, 4 * max_tasks + 64)
    _check_int("max_procs", max_procs)
    _check_int("names_cap", names_cap)
    _check_int("outcomes", outcomes)
    _check_mode(mode)
    size = lib.tw_layout_size(max_tasks, pool_size, payload_size, max_procs, names_cap,
                              int(bool(record_origin)), outcomes)
    _security.check_total_size(name, size)
    # Made whole before it has its name: created under a temporary name,
    # formatted and mapped, then linked under the domain's name in one
    # step (link(2) fails if the name exists). An opener never sees a
    # half-made segment, and of racing creators exactly one link succeeds
    # (docs/contract.md "Lifecycle without an operator", start together). The temporary name always goes.
    _sweep_temporaries()
    tmp = f"{SHM_DIR}/{_TMP_PREFIX}{os.getpid()}.{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create domain {name!r} in {SHM_DIR}: "
                                 f"{exc.strerror}") from None
    d = ffi.new("struct tw_dom *")
    mapped = False
    try:
        # The creator's umask must not narrow the mode it asked for.
        os.fchmod(fd, mode)
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            buf = ffi.from_buffer(m)
            rc = lib.tw_format(buf, size, max_tasks, pool_size, payload_size, max_procs,
                               names_cap, int(bool(record_origin)), outcomes,
                               time.monotonic_ns())
            ffi.release(buf)
        check(rc, f"format domain {name!r}")
        check(lib.tw_map(d, fd, size), f"map domain {name!r}")
        mapped = True
        try:
            os.link(tmp, SHM_DIR + name, follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(f"domain {name!r} already exists") from None
    except BaseException:
        if mapped:
            lib.tw_unmap(d)
        raise
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return d


def open_existing(name: str, mode: int | None) -> Any:
    """Domain.open below the object: open the segment ``name`` (already
    normalized), check it (and its owner and mode when ``mode`` is given)
    and map it; its ``struct tw_dom``."""
    if mode is not None:
        _check_mode(mode)
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError as exc:
        raise FileNotFoundError(f"no domain named {name!r}") from exc
    except posix_ipc.PermissionsError:
        raise _security.permission_error(name, "open") from None
    try:
        # fstat of the descriptor that is mapped: what is checked is what is joined
        st = os.fstat(shm.fd)
        if not stat.S_ISREG(st.st_mode):
            raise DomainCorruptError(f"{name!r} is not a task-work domain (not a regular "
                                     "file)")
        if mode is not None:
            _check_owner(name, st, mode)
    except BaseException:
        shm.close_fd()
        raise
    size = shm.size  # read before close_fd()
    try:
        head = os.pread(shm.fd, 16, 0)
        d = ffi.new("struct tw_dom *")
        rc = lib.tw_map(d, shm.fd, size)
    finally:
        shm.close_fd()
    if rc < 0:
        magic = head[:8]
        version = struct.unpack_from("<I", head, 8)[0] if len(head) >= 12 else None
        if -rc == errno.EPROTO:  # our magic, another layout
            raise DomainCorruptError(
                f"domain {name!r} has layout version {version} (node header and slot "
                f"sizes of that build); this build uses layout version "
                f"{_native.LAYOUT_VERSION}: use the same shm_taskwork version everywhere")
        if magic != b"SHMTWRK\x01":
            raise DomainCorruptError(
                f"{name!r} is not a task-work domain (magic {magic!r}, expected b'SHMTWRK\\x01')")
        check(rc, f"open domain {name!r}")
    return d
