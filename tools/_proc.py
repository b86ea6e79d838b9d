"""Child processes and temporary domains for the tools that start their own
(demo, bench; the stress tools are meant to use them too).

Two pieces, each with one way to do its job:

``Children``: starts child processes - forked to run a function
(``fork``), or unrelated programs (``spawn``) - and hears from each one
through one stream of JSON lines (a pipe; for a spawned program, its
stdout). A child says it is ready, once, with ``Link.ready(**facts)``: the
event ``{"ev": "ready", ...}``. The parent waits for conditions on what it
heard (``wait_for``, ``wait_ready``) with a deadline, and a child that dies
first is an error naming its exit status and the last line of its stderr,
never a hang. Leaving the ``with`` block kills and reaps every child still
running.

``temp_domain``: a context manager that creates a domain under a unique
name and always closes and unlinks it, whatever happens inside.

The protocol, in both directions, is one JSON object a line: the parent
writes to a child with ``Child.send(obj)`` (the child's stdin), the child
reads with ``Link.recv(timeout)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from typing import Any, Callable, Iterator

__all__ = ["ChildError", "Child", "Children", "Link", "temp_domain", "unique_domain_name"]


class ChildError(RuntimeError):
    """A child died, or did not do something in time; one line for stderr."""


# ---- the child's side --------------------------------------------------------------

class Link:
    """A child's end of the stream: ``emit`` and ``ready`` write JSON lines
    the parent reads; ``recv`` reads one the parent sent."""

    def __init__(self, out_fd: int, in_fd: int | None = None):
        self.events_fd = out_fd
        self.input_fd = in_fd
        self.unread = b""

    @classmethod
    def stdio(cls) -> "Link":
        """The link of a spawned program: stdout to the parent, stdin from it."""
        sys.stdout.flush()
        return cls(sys.stdout.fileno(), sys.stdin.fileno())

    def emit(self, **event: Any) -> None:
        """Write one event (a JSON object) as one line, at once."""
        data = (json.dumps(event) + "\n").encode()
        while data:
            data = data[os.write(self.events_fd, data):]

    def ready(self, **facts: Any) -> None:
        """The ready handshake: ``{"ev": "ready", **facts}``, said once."""
        self.emit(ev="ready", pid=os.getpid(), **facts)

    def recv(self, timeout: float | None = None) -> Any:
        """The next object the parent sent; ChildError on end of input or
        when none came within ``timeout`` seconds."""
        if self.input_fd is None:
            raise ChildError("this link has no input")
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.unread:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChildError(f"nothing from the parent within {timeout:g}s")
                import select
                if not select.select([self.input_fd], [], [], left)[0]:
                    continue
            chunk = os.read(self.input_fd, 1 << 16)
            if not chunk:
                raise ChildError("the parent closed its end")
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)


# ---- the parent's side -------------------------------------------------------------

class Child:
    """One child as the parent sees it: its pid, the events it sent (its
    ready event in ``ready``), and whether it has ended."""

    def __init__(self, name: str, pid: int, out_fd: int, in_fd: int,
                 proc: subprocess.Popen | None, errfile):
        self.name = name
        self.pid = pid
        self.ready: dict | None = None
        self.events: list[dict] = []
        self.noise: list[str] = []          # lines that were not JSON
        self.eof = False
        self.events_fd = out_fd    # we read the child's events here
        self.input_fd = in_fd      # and write to it here
        self.proc = proc
        self.errfile = errfile
        self.status: int | None = None
        self.unread = b""

    def poll(self) -> int | None:
        """Its exit status once it ended (negative: the signal), else None."""
        if self.status is None:
            if self.proc is not None:
                self.status = self.proc.poll()
            else:
                try:
                    pid, st = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return self.status
                if pid:
                    self.status = os.waitstatus_to_exitcode(st)
        return self.status

    def wait(self, timeout: float) -> int:
        """Its exit status; ChildError if it is still running after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} (pid {self.pid}) did not end within {timeout:g}s")
            time.sleep(0.005)       # polling an exit status with a deadline
        assert self.status is not None
        return self.status

    def send(self, obj: Any) -> None:
        """One object to the child (a JSON line on its input)."""
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.input_fd, data):]

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def last_error_line(self) -> str:
        """The last non-blank line the child wrote on stderr ("" if none)."""
        if self.errfile is None:
            return ""
        try:
            self.errfile.seek(0)
            text = self.errfile.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def describe_end(self) -> str:
        st = self.poll()
        how = "is still running" if st is None else (
            f"was killed by signal {-st}" if st < 0 else f"exited with status {st}")
        err = self.last_error_line()
        return f"{self.name} (pid {self.pid}) {how}" + (f": {err}" if err else "")


class Children:
    """The children of one run, and the one place their events are read.

    ``on_event(child, event)``, when given, is called for every event as it
    is read (the ``ready`` event included); every event is also kept in
    ``child.events``."""

    def __init__(self, on_event: Callable[[Child, dict], None] | None = None):
        self.children: list[Child] = []
        self.on_event = on_event
        self._sel = selectors.DefaultSelector()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- starting ---------------------------------------------------------------------

    def fork(self, name: str, target: Callable[..., Any], *args: Any) -> Child:
        """Fork a child that runs ``target(link, *args)`` and exits: status
        0 when it returns, n on ``sys.exit(n)``, 1 when it raises (the
        traceback on its stderr and an ``{"ev": "error"}`` event). Its
        stderr is kept for ``last_error_line``."""
        ev_r, ev_w = os.pipe()
        in_r, in_w = os.pipe()
        errfile = tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:   # the child: never returns into the parent's code
            status = 1
            try:
                os.close(ev_r)
                os.close(in_w)
                os.dup2(errfile.fileno(), 2)
                # sys.stderr may be an object of the parent's (a test runner's
                # capture): the child's goes to its fd 2, the file kept
                sys.stderr = open(2, "w", closefd=False)
                link = Link(ev_w, in_r)
                try:
                    target(link, *args)
                    status = 0
                except SystemExit as exc:   # sys.exit(n) in the child: its status
                    status = exc.code if isinstance(exc.code, int) else (
                        0 if exc.code is None else 1)
                except BaseException as exc:   # noqa: BLE001 - reported, then exit 1
                    traceback.print_exc()
                    with contextlib.suppress(Exception):
                        link.emit(ev="error", error=f"{type(exc).__name__}: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        os.close(ev_w)
        os.close(in_r)
        return self._add(Child(name, pid, ev_r, in_w, None, errfile))

    def spawn(self, name: str, argv: list[str], *, env: dict | None = None) -> Child:
        """Start an unrelated program (``argv``); its stdout is its event
        stream (``Link.stdio()`` in it), its stdin our ``send``, its stderr
        kept for the error message. It runs in its own session, so a Ctrl-C
        at the terminal reaches only the parent, which stops it."""
        errfile = tempfile.TemporaryFile()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errfile, env=env, start_new_session=True)
        assert proc.stdout is not None and proc.stdin is not None
        return self._add(Child(name, proc.pid, proc.stdout.fileno(), proc.stdin.fileno(),
                               proc, errfile))

    def _add(self, child: Child) -> Child:
        os.set_blocking(child.events_fd, False)
        self._sel.register(child.events_fd, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    # -- hearing ----------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Read what the children wrote, waiting at most ``timeout`` s for any."""
        if not self._sel.get_map():
            return
        for key, _ in self._sel.select(timeout):
            child: Child = key.data
            try:
                chunk = os.read(child.events_fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                child.eof = True
                self._sel.unregister(child.events_fd)
                continue
            child.unread += chunk
            *lines, child.unread = child.unread.split(b"\n")
            for line in lines:
                try:
                    ev = json.loads(line)
                except ValueError:
                    child.noise.append(line.decode(errors="replace"))
                    continue
                if not isinstance(ev, dict):
                    child.noise.append(line.decode(errors="replace"))
                    continue
                if ev.get("ev") == "ready" and child.ready is None:
                    child.ready = ev
                child.events.append(ev)
                if self.on_event is not None:
                    self.on_event(child, ev)

    def wait_for(self, pred: Callable[[], Any], what: str, timeout: float) -> None:
        """Read events until ``pred()`` is true. ChildError after ``timeout``
        seconds, or as soon as a child that has not said everything (its
        stream ended) has died."""
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"timed out after {timeout:g}s waiting for {what}")
            if not self._sel.get_map():
                # A child closes its output as it exits: give the exits a
                # moment to be reaped, so the error can name a status.
                for c in self.children:
                    with contextlib.suppress(ChildError):
                        c.wait(min(5.0, max(0.0, deadline - time.monotonic())))
                dead = [c for c in self.children if c.poll() not in (None, 0)]
                raise ChildError(f"{dead[0].describe_end()} while waiting for {what}" if dead
                                 else f"every child closed its output before {what}")
            self.pump(min(left, 0.5))
            for c in self.children:
                if c.eof and c.poll() not in (None, 0):
                    raise ChildError(f"{c.describe_end()} while waiting for {what}")

    def wait_ready(self, children: list[Child] | None = None, timeout: float = 30.0) -> list[dict]:
        """The ready events of ``children`` (default: all), once each has said it."""
        children = self.children if children is None else children
        self.wait_for(lambda: all(c.ready is not None for c in children),
                      f"{', '.join(c.name for c in children if c.ready is None)} to be ready",
                      timeout)
        return [c.ready for c in children if c.ready is not None]

    def event(self, child: Child, kind: str, timeout: float) -> dict:
        """The first event ``{"ev": kind}`` of ``child`` (waiting for it)."""
        def found():
            return next((e for e in child.events if e.get("ev") == kind), None)
        self.wait_for(found, f"{child.name} to send {kind!r}", timeout)
        return found()

    # -- ending -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Kill every child still running, reap them all, close the pipes."""
        for c in self.children:
            c.kill()
        for c in self.children:
            with contextlib.suppress(ChildError):
                c.wait(timeout)
            for fd in (c.events_fd, c.input_fd):
                if c.proc is None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if c.proc is not None:
                for f in (c.proc.stdout, c.proc.stdin):
                    with contextlib.suppress(OSError):
                        if f is not None:
                            f.close()
            if c.errfile is not None:
                c.errfile.close()
        with contextlib.suppress(Exception):
            self._sel.close()


# ---- temporary domains ---------------------------------------------------------------

def unique_domain_name(prefix: str = "tw_tool") -> str:
    """``/PREFIX_PID_RANDOM``: a name no other run picks."""
    return f"/{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def temp_domain(prefix: str = "tw_tool", **create_options: Any) -> Iterator[Any]:
    """A new domain under a unique name (``Domain.create(name,
    **create_options)``), closed and unlinked when the block ends, however it
    ends. Interrupted between the create and the ``yield``, the name is
    unlinked too (it is ours alone)."""
    from shm_taskwork import Domain

    name = unique_domain_name(prefix)
    dom = None
    try:
        dom = Domain.create(name, **create_options)
        yield dom
    finally:
        if dom is not None:
            with contextlib.suppress(Exception):
                dom.close()
        import posix_ipc
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(name)
