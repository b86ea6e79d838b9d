"""What a domain may make this process do to others, and what it refuses.

A domain is shared memory: whoever can write the segment can write any pid,
start time, signal number, fd number or socket name into a task slot. The
library acts on such values in two ways only, and both are fenced here.

**Signals and ``pidfd_getfd``.** Before the first signal to a task, and
before taking its eventfd, the sender opens a pidfd on the slot's pid (the
pidfd pins that process: a signal through it reaches that process or nobody)
and proves that the pinned process *joined this domain*: its
``/proc/PID/maps`` holds a mapping of the very segment the sender maps (same
device and inode). Pid plus start time only name a process, and start times
are public, so they prove nothing about joining; a mapping of the segment is
something only a participant has. The start time is checked after that, as
before, and the maps are read while the pidfd shows the process alive, so the
pid cannot have named another process during the read. A proof (or a
refusal) is cached with the pidfd. An unproven task is never signalled and no
fd is ever taken from it: its work stays queued, the refusal is logged once
and counted in :data:`REFUSED`.

**Signal numbers.** A task's signal is SIGUSR1, SIGUSR2 or a real-time signal
(:data:`TASK_SIGNALS`): nothing else is taken over by ``register`` nor sent to
a signal number read from a slot.

**Fd passing over SCM_RIGHTS.** Abstract Unix socket names have no
permissions: a predictable one can be bound first by any local user. The task
binds ``\\0shm_taskwork/NAME/<32 hex digits>`` with 16 random bytes, retries
on a name in use, and publishes the token in its slot. An adder connects only
after the proof above, and trusts the fd only if the server's ``SO_PEERCRED``
names the proven pid and that process's uid, and the fd is an eventfd.

**Sizes and names** are checked before any system call: a domain larger than
:data:`MAX_DOMAIN_BYTES` or than the free space of the shared-memory
filesystem, and names with NUL, ``.``, ``..``, ``/`` or too many bytes, are a
``ValueError`` with the limit in the message.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import socket
import stat
import struct

from ._native import ffi, lib, start_ticks

log = logging.getLogger("shm_taskwork")

SHM_DIR = "/dev/shm"
#: Largest domain this library creates (bytes): 64 GiB. A bigger one would
#: take most of a machine's memory for one segment; the free space of the
#: shared-memory filesystem is checked too.
MAX_DOMAIN_BYTES = 64 << 30
#: Longest domain name in bytes (UTF-8), without the leading "/": a file name
#: in the shared-memory filesystem (NAME_MAX is 255) with room to spare.
DOMAIN_NAME_MAX = 250
#: The signals a task may use: their default action (terminate) is one a
#: program does not rely on, so taking them over hides no crash or job control.
TASK_SIGNALS = frozenset({int(signal.SIGUSR1), int(signal.SIGUSR2),
                          *range(int(signal.SIGRTMIN), int(signal.SIGRTMAX) + 1)})
TASK_SIGNALS_TEXT = (f"SIGUSR1 ({int(signal.SIGUSR1)}), SIGUSR2 ({int(signal.SIGUSR2)}) or a "
                     f"real-time signal SIGRTMIN..SIGRTMAX ({int(signal.SIGRTMIN)}.."
                     f"{int(signal.SIGRTMAX)})")
FD_TOKEN_LEN = lib.TW_FD_TOKEN_LEN  # bytes of struct tw_slot.fd_token

#: Notifications refused, by reason (process-local): "not joined", "exited",
#: "start time", "signal", "peer credentials", "not an eventfd", "connect",
#: "receive".
REFUSED: collections.Counter = collections.Counter()


# ---- names -------------------------------------------------------------------

def domain_name(name) -> str:
    """The POSIX name ("/NAME") of a valid domain name, else ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"a domain name must be a non-empty str, got {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise ValueError(f"a domain name must be a non-empty str, got {name!r}")
    if "\0" in bare:
        raise ValueError(f"a domain name may not contain NUL, got {name!r}")
    if "/" in bare:
        raise ValueError(f"a domain name may not contain '/' after the first character: {name!r}")
    if bare in (".", ".."):
        raise ValueError(f"{name!r} is not a domain name: '.' and '..' name directories")
    raw = _utf8(bare, "a domain name")
    if len(raw) > DOMAIN_NAME_MAX:
        raise ValueError(f"a domain name is at most {DOMAIN_NAME_MAX} bytes (UTF-8), "
                         f"got {len(raw)}")
    return "/" + bare


def check_text(text, what: str, limit: int) -> bytes:
    """UTF-8 of a task or callback name: no NUL, at most ``limit`` bytes."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is a str of at most {limit} bytes, got {type(text).__name__}")
    if "\0" in text:
        raise ValueError(f"{what} may not contain NUL, got {text!r}")
    raw = _utf8(text, what)
    if len(raw) > limit:
        raise ValueError(f"{what} is a str of at most {limit} bytes, got {len(raw)} bytes: "
                         f"{text[:40]!r}...")
    return raw


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be encodable as UTF-8, got {text!r}") from None


# ---- signals -----------------------------------------------------------------

def task_signal(signum) -> int:
    """The signal number ``register(signum=)`` may take over, else ValueError."""
    if isinstance(signum, bool) or not isinstance(signum, int):
        raise ValueError(f"signum must be a signal number, one of {TASK_SIGNALS_TEXT}; "
                         f"got {signum!r}")
    if int(signum) not in TASK_SIGNALS:
        try:
            shown = signal.Signals(signum).name
        except ValueError:
            shown = str(int(signum))
        raise ValueError(f"signum={shown} is not allowed: a task's signal must be catchable and "
                         f"have a default action nobody relies on: {TASK_SIGNALS_TEXT}")
    return int(signum)


def sendable_signal(signum: int) -> int:
    """A signal number read from a slot, or 0 (send nothing) if it is not one
    a task may use."""
    return signum if signum in TASK_SIGNALS else 0


# ---- sizes -------------------------------------------------------------------

def check_total_size(name: str, size: int) -> None:
    """ValueError unless a segment of ``size`` bytes fits under the stated
    maximum and in the free space of the shared-memory filesystem now."""
    if size > MAX_DOMAIN_BYTES:
        raise ValueError(f"domain {name!r} would take {size:,} bytes, more than the maximum of "
                         f"{MAX_DOMAIN_BYTES:,} bytes (MAX_DOMAIN_BYTES); lower pool_size, "
                         "payload_size or max_tasks")
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return  # no such filesystem to measure: the system call will say
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ValueError(f"domain {name!r} would take {size:,} bytes, more than the "
                         f"{free:,} bytes free in {SHM_DIR}; lower pool_size, payload_size "
                         "or max_tasks")


# ---- errors of the shared-memory calls -----------------------------------------

def permission_error(name: str, action: str) -> PermissionError:
    """PermissionError naming the domain, its owner and its mode."""
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    try:
        st = os.stat(path)
        who = f"owned by uid {st.st_uid} gid {st.st_gid} with mode {stat.S_IMODE(st.st_mode):#o}"
    except OSError:
        who = "whose mode could not be read"
    return PermissionError(errno.EACCES,
                           f"cannot {action} domain {name!r}: it is {who}, and this process "
                           f"(uid {os.geteuid()}) may not", path)


# ---- who else can write a domain -----------------------------------------------

def other_writers(dom) -> str | None:
    """Why a user other than this process's effective one can write the
    segment ``dom`` maps - another owner, or a group or other write bit - or
    None when only this user can (docs/contract.md "Codecs": pickle is refused
    in such a domain). The mode is read from the segment's name, and counts
    only if that name still holds the segment mapped here (same device and
    inode); if it does not, or cannot be read, the answer is the reason."""
    path = SHM_DIR + dom.name
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"the mode of {path} cannot be read ({exc.strerror})"
    if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) != segment_identity(dom):
        return f"{path} is no longer the segment mapped here, so its mode cannot be read"
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"it belongs to uid {st.st_uid}, not to this process (uid {euid})"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"its mode {mode:#o} lets other users (group or other write bits) write it"
    return None


# ---- proving that a process joined this domain -----------------------------------

def _maps_entries(pid: int | str) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file mapping in /proc/PID/maps."""
    out = set()
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[4] == b"0":
                continue
            major, _, minor = parts[3].partition(b":")
            out.add((int(major, 16), int(minor, 16), int(parts[4])))
    return out


def segment_identity(dom) -> tuple[int, int, int]:
    """(major, minor, inode) of the segment this process maps for ``dom``: the
    line of /proc/self/maps that holds the mapping's first byte. Cached."""
    ident = getattr(dom, "_segment_identity", None)
    if ident is None:
        base = int(ffi.cast("uintptr_t", dom.d.base))
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, _, hi = parts[0].partition(b"-")
                if int(lo, 16) <= base < int(hi, 16):
                    major, _, minor = parts[3].partition(b":")
                    ident = (int(major, 16), int(minor, 16), int(parts[4]))
                    break
        if ident is None:  # pragma: no cover - our own mapping is always listed
            raise OSError(errno.ENOENT, "the domain's mapping is not in /proc/self/maps")
        dom._segment_identity = ident
    return ident


def _alive(pidfd: int) -> bool:
    """True while the process a pidfd refers to has not exited (a pidfd
    becomes readable when it does)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


def prove_joined(dom, slot: int, gen: int, pidfd: int, pid: int, start: int) -> str | None:
    """None if the process pinned by ``pidfd`` (pid ``pid``) maps this
    domain's segment and has start time ``start``; else why not. A verdict
    that cannot change (for this slot, generation, pid and start time) is
    remembered: :func:`refused_before` answers it without a system call."""
    ident = segment_identity(dom)
    try:
        maps = _maps_entries(pid)
    except OSError as exc:  # e.g. no descriptor left: may work next time
        return f"not joined: /proc/{pid}/maps cannot be read ({exc.strerror})"
    ticks = start_ticks(pid)
    # Alive now means alive since pidfd_open: /proc/PID was that process's.
    if not _alive(pidfd):
        why = f"exited: process {pid} has exited"
    elif ident not in maps:
        why = (f"not joined: process {pid} does not map this domain's segment "
               f"(device {ident[0]}:{ident[1]}, inode {ident[2]})")
    elif ticks != start:
        why = (f"start time: process {pid} started at tick {ticks}, the registrant at "
               f"tick {start}")
    else:
        return None
    dom.__dict__.setdefault("_unproven", {})[(slot, gen)] = (pid, start)
    return why


def refuse(dom, slot: int, gen: int, why: str) -> None:
    """Count and log (once per registration and reason) a notification not
    delivered. ``why`` starts with its reason, as counted in REFUSED."""
    reason = why.split(":", 1)[0]
    REFUSED[reason] += 1
    seen = dom.__dict__.setdefault("_refusals_logged", set())
    if (slot, gen, why) not in seen:
        seen.add((slot, gen, why))
        # A task that just died is no threat: its add raises or fsck reaps it.
        level = logging.DEBUG if reason == "exited" else logging.WARNING
        log.log(level, "domain %s, task %d (generation %d): notification not sent, the work "
                "stays queued: %s", dom.name, slot, gen, why)


def refused_before(dom, slot: int, gen: int, pid: int, start: int) -> bool:
    """True if this registration, naming this pid and start time, was already
    refused the proof of joining for good (a refusal is cached like a proof)."""
    return dom.__dict__.get("_unproven", {}).get((slot, gen)) == (pid, start)


# ---- fd passing ----------------------------------------------------------------

def new_fd_token() -> bytes:
    """16 random bytes, never all zero (zero means "no server")."""
    while True:
        token = os.urandom(FD_TOKEN_LEN)
        if any(token):
            return token


def fd_socket_name(domain: str, token: bytes) -> bytes:
    return f"\0shm_taskwork{domain}/{token.hex()}".encode()


def read_fd_token(slot) -> bytes | None:
    """The token a task published in ``slot.fd_token`` (None: no server yet).
    The task writes it right after bind; a torn read names no socket."""
    token = bytes(ffi.buffer(slot.fd_token, FD_TOKEN_LEN))
    return token if any(token) else None


def write_fd_token(slot, token: bytes) -> None:
    ffi.memmove(slot.fd_token, token, FD_TOKEN_LEN)


def process_uid(pid: int) -> int | None:
    """Effective uid of a process (/proc/PID/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def fetch_eventfd(dom, slot, pid: int) -> tuple[int, int | None, str | None]:
    """The task's eventfd over SCM_RIGHTS from the server named by the slot's
    token, and the signal the task says it takes: (fd, signum, None), or
    (-1, None, why) when there is none or it is not trusted (why is None when
    there is simply no server). ``pid`` is the proven registrant; the server
    must be that process, with that process's uid."""
    token = read_fd_token(slot)
    if token is None:
        return -1, None, None  # no server yet
    uid = process_uid(pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(2.0)
        try:
            s.connect(fd_socket_name(dom.name, token))
            peer_pid, peer_uid, _ = peer_cred(s)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return -1, None, None  # the server is gone (the task is exiting)
            return -1, None, f"connect: {exc!r}"
        if peer_pid != pid or uid is None or peer_uid != uid:
            return -1, None, (f"peer credentials: the fd server is pid {peer_pid} uid "
                              f"{peer_uid}, the registrant pid {pid} uid {uid}")
        try:
            msg, fds, _flags, _addr = socket.recv_fds(s, 16, 1)
        except OSError as exc:
            return -1, None, f"receive: {exc!r}"
    for extra in fds[1:]:
        os.close(extra)
    if msg[:1] != b"E" or len(msg) != 2 or not fds:
        for fd in fds[:1]:
            os.close(fd)
        return -1, None, "the task refused to hand over its eventfd (uid differs)"
    return fds[0], msg[1], None


# ---- arguments -------------------------------------------------------------------

def timeout_seconds(timeout) -> float | None:
    """A wait timeout: None (for ever) or seconds >= 0; inf means None."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got "
                        f"{type(timeout).__name__}")
    if timeout != timeout:
        raise ValueError("timeout must be >= 0 or None, got nan")
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    # Beyond a billion years is for ever (and an int that large has no float).
    return None if timeout >= 1e16 else float(timeout)


def not_this_handle(task, what: str) -> str:
    """Why ``what`` cannot run on a handle whose slot names this very process."""
    from ._native import OPEN
    dom = task._dom
    for other in list(OPEN):
        cur = None if other is dom or other._closed else other.current
        if cur is not None and other.name == dom.name and (cur.id, cur.gen) == (task.id, task.gen):
            return (f"{what}: task {task.id} of domain {dom.name!r} is this process's "
                    "registration, made through another Domain object of the same segment; "
                    f"call {what}() on the Task that register() returned (that Domain's "
                    "current), not on a handle from this Domain")
    return (f"{what}: task {task.id} of domain {dom.name!r} names this process (pid "
            f"{task.pid}), but this process did not register it through this Domain object "
            f"(its task here is {dom.current!r}); {what}() works only on the Task that "
            "register() returned")
