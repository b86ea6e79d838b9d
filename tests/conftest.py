"""Shared fixtures. Every test removes the segments it made, even on failure:
domains are created through ``make_domain`` (unlinked at teardown), and a last
sweep unlinks any ``/tw_test_*`` segment left by a killed child process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import posix_ipc
import pytest

from shm_taskwork import Domain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tw_test_"


def unique_name(tag: str = "") -> str:
    return f"/{PREFIX}{os.getpid()}_{tag}{uuid.uuid4().hex[:10]}"


def wait_until(pred, timeout: float = 10.0, interval: float = 0.002, what: str = "condition"):
    """Poll ``pred`` until true or the deadline; fail the test on timeout.
    Polling a condition with a deadline, never a bare sleep as synchronisation."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def readline(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """One line from a child's stdout, with a deadline (never blocks forever)."""
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line from pid {proc.pid} within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.poll() is not None else ""
        raise AssertionError(f"pid {proc.pid} closed its stdout (rc={proc.poll()}): {err}")
    return line.strip()


@pytest.fixture
def make_domain():
    made: list[Domain] = []

    def make(tag: str = "", **opts) -> Domain:
        opts.setdefault("pool_size", 256)
        opts.setdefault("max_tasks", 8)
        dom = Domain.create(unique_name(tag), **opts)
        made.append(dom)
        return dom

    yield make
    for dom in made:
        try:
            dom.close()
        finally:
            dom.unlink()


@pytest.fixture
def domain(make_domain):
    return make_domain()


def python_script(body: str, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start an *unrelated* Python process (not a fork) running ``body``."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("text", True)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(body), *args], env=e, **popen)


# A task process for the operator tools' tests: registers as argv[2], prints
# its task id, runs its list on each "run" line, exits on anything else.
SERVICE_TASK = """
    import sys
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register(sys.argv[2])

    @callback(name="test.known")
    def known(work):
        pass

    print(task.id, flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(task.run(), flush=True)
        else:
            break
    task.exit()
"""


def cli_env(columns: int | None = 200) -> dict:
    """The environment of a ``shm-taskwork`` child: this checkout on the path,
    ``COLUMNS`` as given (None: unset, as a pipe would leave it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return env


def run_cli(*args: str, columns: int | None = 200, timeout: float = 60,
            **run) -> subprocess.CompletedProcess:
    """``shm-taskwork ARGS`` in a child, bounded in time; its output as text."""
    return subprocess.run([sys.executable, "-m", "shm_taskwork.cli", *args],
                          env=cli_env(columns), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **run)


@pytest.fixture
def spawn():
    procs: list[subprocess.Popen] = []

    def start(body: str, *args: str, **kw) -> subprocess.Popen:
        p = python_script(body, *args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


@pytest.fixture(autouse=True, scope="session")
def _sweep_segments():
    yield
    mine = f"{PREFIX}{os.getpid()}_"
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for n in names:
        if n.startswith(mine):
            try:
                posix_ipc.unlink_shared_memory("/" + n)
            except posix_ipc.ExistentialError:
                pass
