"""Notifications, the sender's side, and the fd server of a registration.

Getting at another process's eventfd: ``pidfd_getfd(2)`` where the kernel
allows it (same user, ptrace access); otherwise the task's own process hands
the descriptor over a Unix socket with SCM_RIGHTS, both ends checking the
other's SO_PEERCRED (hosts with Yama ptrace_scope >= 1). Setting
``SHM_TASKWORK_FD_PASSING=scm`` in the sender forces the socket path.

Signals: SIGNAL sends the task's signal (SIGUSR1) through a pidfd whose
process was proven, after it was opened, to map this domain's segment and to
still be the registered process (pid plus start time): a corrupt or forged
slot can never make us signal a stranger, nor take an fd from one (see
_security.py and README "Security"). The signal number and the eventfd come
from the task's own fd server when it is up: a member may rewrite the slot,
not what that process answers.

The peer cache (``Domain._peer``: (slot, gen) -> (pidfd, eventfd)) lives as
long as the registration it names.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

from . import _security
from ._native import lib

if TYPE_CHECKING:
    from .domain import Domain
    from .task import Task

log = logging.getLogger("shm_taskwork")


class FdServer(threading.Thread):
    """Hands the task's eventfd to local peers of the same uid (SCM_RIGHTS).

    It listens on an abstract socket whose name nobody can predict (a random
    token, published in the task's slot), so no other user can bind it first;
    a name found taken is logged and another one tried. Should the socket ever
    fail, the server logs it and listens on a fresh name: it never stops
    quietly while the task lives."""

    def __init__(self, dom, slot: int, efd: int, signum: int):
        super().__init__(name="shm_taskwork-fd-server", daemon=True)
        self.efd = efd
        # The task's own word on its signal: a member may rewrite the slot's
        # signum, not what this process answers (README "Security").
        self.hello = b"E" + bytes([signum])
        self._dom = dom
        self._slot_index = slot
        # not `_stop`: threading.Thread has a method of that name (join, fork)
        self._stopping = False
        # Held while the slot's token is written, so that once stop() returns
        # the thread never touches the segment again (it may be unmapped).
        self._lock = threading.RLock()
        self.sock = self._listen()

    def _listen(self) -> socket.socket:
        for _ in range(16):
            token = _security.new_fd_token()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(_security.fd_socket_name(self._dom.name, token))
                sock.listen(16)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("task %d of domain %s: fd-passing socket name %s is taken; "
                            "trying another", self._slot_index, self._dom.name, token.hex())
                continue
            _security.write_fd_token(self._dom._slot(self._slot_index), token)
            return sock
        raise OSError(errno.EADDRINUSE, "16 random fd-passing socket names in a row were taken")

    def run(self):
        # The task's signal must go to the main thread: Python runs handlers
        # there, the blocking call to interrupt is there, and a signal the
        # main thread blocks must stay pending instead of landing here.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if not self._renew(exc):
                    return
                continue
            with conn:
                try:
                    _pid, uid, _gid = _security.peer_cred(conn)
                    if uid != os.getuid() and uid != 0:
                        conn.sendall(b"N")
                        continue
                    socket.send_fds(conn, [self.hello], [self.efd])
                except OSError:
                    pass

    def _renew(self, exc: OSError) -> bool:
        """After a failed accept: False if stopping; else wait out a lack of
        descriptors or memory, or listen on a new name. Never silent."""
        with self._lock:
            if self._stopping:
                return False
            log.warning("task %d of domain %s: fd server: %r", self._slot_index,
                        self._dom.name, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)  # back off; the same socket still listens
                return True
            try:
                self.sock.close()
                self.sock = self._listen()
            except (OSError, ValueError) as again:
                log.error("task %d of domain %s: the fd server cannot listen any more, peers "
                          "that need SCM_RIGHTS cannot wake it: %r", self._slot_index,
                          self._dom.name, again)
                return False
            return True

    def stop(self):
        with self._lock:
            self._stopping = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def is_eventfd(fd: int) -> bool:
    """True if fd is an eventfd opened non-blocking. A peer's descriptor that
    could block us is never written to (README "Security": a member never
    blocks on another member's descriptors; a full eventfd counts as notified)."""
    try:
        return (os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
                and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK))
    except OSError:
        return False


def handles_signal(pid: int, signum: int) -> bool:
    """True if process pid catches, blocks or ignores signum (/proc/PID/status)."""
    if not 0 < signum < signal.NSIG or signum in (signal.SIGKILL, signal.SIGSTOP):
        return False
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigBlk:", "SigIgn:", "SigCgt:")):
                    mask |= int(line.split()[1], 16)
    except (OSError, ValueError):
        return False
    return bool(mask >> (signum - 1) & 1)


def acquire_peer(task: "Task") -> tuple[int, int]:
    """The pidfd and eventfd this process uses to notify ``task`` (another
    process's registration): proven once, cached in the domain's peer
    cache for the registration's life; (-1, -1) parts where refused."""
    dom = task._dom
    key = (task.id, task.gen)
    got = dom._peer.get(key)
    if got is not None and got[0] >= 0 and got[1] >= 0:
        return got
    if got is not None:  # half of it failed last time: start afresh
        _forget_peer(dom, key)
    for old in [k for k in dom._peer if k[0] == task.id and k[1] != task.gen]:
        _forget_peer(dom, old)  # an earlier registration of this slot
    s = dom._slot(task.id)
    pid, start, efd_num = int(s.pid), int(s.start_ticks), int(s.efd)
    if s.gen != task.gen or pid <= 0:
        return -1, -1
    if _security.refused_before(dom, task.id, task.gen, pid, start):
        return -1, -1
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return -1, -1
    # The pidfd pins the process. Before anything is sent to it or taken
    # from it, prove that it joined this domain (it maps this segment),
    # then that it is the registrant (start time). See _security.
    why = _security.prove_joined(dom, task.id, task.gen, pidfd, pid, start)
    if why is not None:
        os.close(pidfd)
        _security.refuse(dom, task.id, task.gen, why)
        return -1, -1
    efd = -1
    if os.environ.get("SHM_TASKWORK_FD_PASSING") != "scm":
        rc = lib.tw_pidfd_getfd(pidfd, efd_num)
        efd = rc if rc >= 0 else -1
        # The number came from the segment: make sure it is the task's
        # eventfd, not some other descriptor we would write 8 bytes into.
        if efd >= 0 and not is_eventfd(efd):
            os.close(efd)
            efd = -1
            log.warning("task %d of domain %s: fd %d of its process is not a "
                        "non-blocking eventfd; asking the task itself",
                        task.id, dom.name, efd_num)
    # The task's own server hands over its eventfd (if we have none yet)
    # and says which signal it takes: the slot's number is a member's to
    # rewrite, and a switched number would trigger another handler of
    # the task's process.
    got_efd, told, why = _security.fetch_eventfd(dom, s, pid)
    if why is not None:
        _security.refuse(dom, task.id, task.gen, why)
    if efd < 0:
        efd = got_efd
        if efd >= 0 and not is_eventfd(efd):
            os.close(efd)
            efd = -1
            _security.refuse(dom, task.id, task.gen,
                             "not a non-blocking eventfd: the task's fd server sent another kind of fd")
    elif got_efd >= 0:
        os.close(got_efd)
    if told is not None and told != task._signum:
        _security.refuse(dom, task.id, task.gen,
                         f"signal: the slot says signal {int(s.signum)}, the task itself "
                         f"says {told}: sending {told}")
        task._signum = task._h.signum = _security.sendable_signal(told)
    elif told is None and task._signum != signal.SIGUSR1:
        # No word from the task (its server is not up yet, or gone): only
        # the default signal is sent on the slot's say-so; this add
        # leaves the work queued and the next one asks again.
        os.close(pidfd)
        return -1, efd
    # The signal number came from the segment too: send it only if it is
    # one a task may use and the task handles (or blocks, or ignores) it.
    # Any other would meet its default action and kill or stop the task.
    if not task._signum:
        _security.refuse(dom, task.id, task.gen,
                         f"signal: signal {int(s.signum)} of the slot is not a task signal")
        os.close(pidfd)
        pidfd = -1
    elif not handles_signal(pid, task._signum):
        log.debug("task %d does not handle signal %d: not signalling it", task.id,
                  task._signum)
        os.close(pidfd)
        pidfd = -1
    dom._peer[key] = (pidfd, efd)
    h = dom._handles.get(key)
    if h is not None:   # the lean add notifies through these from now on
        h.pidfd, h.efd = pidfd, efd
    return pidfd, efd


def _forget_peer(dom: "Domain", key: tuple[int, int]) -> None:
    """Close the descriptors cached for registration key, after the shared
    handle stops naming them (no add may write to a closed, reused number)."""
    h = dom._handles.get(key)
    if h is not None:
        h.pidfd = h.efd = -1
    for fd in dom._peer.pop(key):
        if fd >= 0:
            os.close(fd)


def deliver(task: "Task", due: int) -> None:
    """Perform the notification tw_add found due but could not do itself."""
    if task.is_current:
        if due & lib.TW_DUE_EVENTFD and not due & lib.TW_DONE_EVENTFD:
            lib.tw_eventfd_write(task._efd)
        if due & lib.TW_DUE_SIGNAL and not due & lib.TW_DONE_SIGNAL:
            os.kill(task.pid, task._signum)
        return
    pidfd, efd = acquire_peer(task)
    if due & lib.TW_DUE_EVENTFD and not due & lib.TW_DONE_EVENTFD and efd >= 0:
        lib.tw_eventfd_write(efd)
    if due & lib.TW_DUE_SIGNAL and not due & lib.TW_DONE_SIGNAL and pidfd >= 0:
        lib.tw_pidfd_send(pidfd, task._signum)
