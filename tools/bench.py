"""``shm-taskwork bench``: this project beside its peers, in one run.

Throughput: every case moves N messages of ``--size`` bytes from producer
process(es) to one consumer process on this host and times the whole
transfer, from the first send to the consumer having handled the last
message (each message is handed to a Python function, as a callback would
be). Cases:

  add                        one ``task.add`` per message (TWA_RESUME); the
                             consumer sits in ``task.wait()``
  add tracked                the same with ``track=True`` (each work's
                             outcome recorded; skipped, with a note, where
                             ``add`` has no ``track``)
  add_many(B)                B payloads per push, a callback per work
  add_many(B) batch cb       the same, one batch callback per run batch
  add, P producers           P processes adding into the one task
  multiprocessing.Queue      put / get
  faster-fifo                put / get_many (its best mode for single sends)
  posix_ipc MessageQueue     send / receive, one message at a time
  pipe (1 read/record)       os.write / os.read per fixed-size record
  pipe batched (B/write)     B records per write; the consumer reads what is
                             there and calls a function per record

Round trips (p50 and p99 of ``--rtt-rounds``): a RESUME ping-pong between two
tasks (each in ``wait()``), the same with TWA_SIGNAL, ``task.call()`` (a
tracked add and a wait for its result) against a task whose callback returns
bytes (skipped where ``Task.call`` does not exist), and a raw eventfd
ping-pong (blocking reads), once with the two processes pinned to different
CPUs and once both pinned to one CPU (``os.sched_setaffinity``).

Native: the C micro-benchmark native/bench/bench_native.c (``make
bench-native``), built from the source tree with the C compiler: the core's
push + detach of one work against a bare Treiber push + xchg detach, in one
thread. Skipped, with a note, where the sources or a compiler are missing.

Each round of ``--repeat`` runs every case once, in turn, so each round gives
a ratio measured under the same load; the table shows the median rate and
the median ratio with its range over the rounds (the spread says how noisy
the machine was). ``--only`` brings along the cases its choices are compared
with. The targets table holds each ratio's median against the project's
performance targets (met / missed); nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import inspect
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from shm_taskwork.tools._common import percentile
from shm_taskwork.tools._proc import Children, temp_domain

FORK = mp.get_context("fork")   # the queues of the peer cases


def _stamp() -> float:
    return time.perf_counter()


class Skip(Exception):
    """A case that cannot run here; its message says why (the table's note)."""


def _add_tracks() -> bool:
    """Does this version's ``Task.add`` take ``track=``?"""
    from shm_taskwork import Task
    return "track" in inspect.signature(Task.add).parameters


def _has_call() -> bool:
    from shm_taskwork import Task
    return callable(getattr(Task, "call", None))


# --- shm_taskwork ----------------------------------------------------------

def _tw_consumer(link, name: str, n: int, batch_cb: bool):
    from shm_taskwork import Domain, callback

    count = [0]

    def handle(payload):
        count[0] += 1

    @callback(name="bench.sink")
    def sink(work):
        handle(work.payload)

    @callback(name="bench.batch", batch=True)
    def batch(works):
        for w in works:
            handle(w.payload)

    with Domain.open(name) as dom:
        task = dom.register("bench-consumer")
        link.ready(task=task.id)
        while count[0] < n:
            task.wait(timeout=5)
        link.emit(ev="done", t=_stamp())
        task.exit()


def _tw_producer(link, name: str, tid: int, n: int, size: int, batch: int, func: str,
                 track: bool):
    from shm_taskwork import TWA_RESUME, Domain, PoolExhaustedError

    with Domain.open(name) as dom:
        task = dom.task(tid)
        payload = b"x" * size
        link.ready()
        link.recv(timeout=60)   # "go": every producer starts at once
        t0 = _stamp()
        sent = 0
        if batch:
            chunk = [payload] * batch
            add_many = task.add_many
            while sent < n:
                k = min(batch, n - sent)
                try:
                    add_many(func, chunk if k == batch else chunk[:k], TWA_RESUME)
                    sent += k
                except PoolExhaustedError:  # let the consumer drain
                    time.sleep(0)
        elif track:
            add = task.add
            while sent < n:
                try:
                    add(func, payload, TWA_RESUME, track=True)
                    sent += 1
                except PoolExhaustedError:
                    time.sleep(0)
        else:
            add = task.add
            while sent < n:
                try:
                    add(func, payload, TWA_RESUME)
                    sent += 1
                except PoolExhaustedError:
                    time.sleep(0)
        link.emit(ev="done", t0=t0, t1=_stamp())


_NOTIFY: dict = {}


def bench_shm_taskwork(n: int, size: int, batch: int = 0, batch_cb: bool = False,
                       producers: int = 1, track: bool = False) -> tuple[float, float]:
    if track and not _add_tracks():
        raise Skip("Task.add takes no track= in this version")
    with temp_domain("tw_bench", pool_size=max(4096, min(n, 1 << 18)),
                     payload_size=max(size, 8), max_tasks=4) as dom, Children() as kids:
        c = kids.fork("bench consumer", _tw_consumer, dom.name, n, batch_cb)
        tid = kids.wait_ready([c], timeout=30)[0]["task"]
        func = "bench.batch" if batch_cb else "bench.sink"
        procs = []
        for k in range(producers):
            share = n // producers + (1 if k < n % producers else 0)
            procs.append(kids.fork(f"bench producer {k}", _tw_producer, dom.name, tid, share,
                                   size, batch, func, track))
        kids.wait_ready(procs, timeout=30)   # every producer has opened the domain
        for p in procs:
            p.send("go")
        spans = [kids.event(p, "done", 120) for p in procs]
        t2 = kids.event(c, "done", 120)["t"]
        for child in procs + [c]:
            child.wait(30)
        t0 = min(s["t0"] for s in spans)
        t1 = max(s["t1"] for s in spans)
        info = next((i for i in dom.tasks(reap=False) if i.id == tid), None)
        if info is not None and info.added:  # eventfd writes per work (the storm)
            _NOTIFY["last"] = info.resumes_sent / info.added
        return t1 - t0, t2 - t0


# --- peers -------------------------------------------------------------------

class _Done:
    """What a peer consumer is given to say it is done: ``done.send(t)``."""

    def __init__(self, link):
        self.link = link

    def send(self, t: float) -> None:
        self.link.emit(ev="done", t=t)


def _consume(link, consumer, args: tuple, n: int) -> None:
    link.ready()
    consumer(*args, n, _Done(link))


def _transfer(consumer, args: tuple, send, n: int, size: int, batch: int = 0):
    """Start ``consumer(*args, n, done)`` in a child, send n messages here
    (``send(payload)`` each, or ``send(b"".join(batch payloads))``);
    (seconds to send all, seconds until the consumer had all)."""
    with Children() as kids:
        p = kids.fork(consumer.__name__, _consume, consumer, args, n)
        kids.wait_ready([p], timeout=30)
        payload = b"x" * size
        t0 = _stamp()
        if batch:
            block = payload * batch
            full, rest = divmod(n, batch)
            for _ in range(full):
                send(block)
            if rest:
                send(payload * rest)
        else:
            for _ in range(n):
                send(payload)
        t1 = _stamp()
        t2 = kids.event(p, "done", 120)["t"]
        p.wait(30)
        return t1 - t0, t2 - t0


def _queue_consumer(q, n, done):
    count = [0]

    def handle(payload):
        count[0] += 1

    for _ in range(n):
        handle(q.get())
    done.send(_stamp())


def bench_mp_queue(n: int, size: int):
    q = FORK.Queue()
    return _transfer(_queue_consumer, (q,), q.put, n, size)


def _ff_consumer(q, n, done):
    count = [0]

    def handle(payload):
        count[0] += 1

    while count[0] < n:
        for m in q.get_many(timeout=10, max_messages_to_get=1000):
            handle(m)
    done.send(_stamp())


def bench_faster_fifo(n: int, size: int):
    import faster_fifo
    q = faster_fifo.Queue(max_size_bytes=64 * 1024 * 1024)
    return _transfer(_ff_consumer, (q,), q.put, n, size)


def _mq_consumer(name, n, done):
    import posix_ipc
    q = posix_ipc.MessageQueue(name)
    count = [0]

    def handle(payload):
        count[0] += 1

    for _ in range(n):
        handle(q.receive()[0])
    done.send(_stamp())


def bench_posix_mq(n: int, size: int):
    import posix_ipc
    name = f"/tw_bench_mq_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_message_size=max(size, 1))
    except (ValueError, posix_ipc.Error) as exc:
        raise Skip(f"no queue of {size}-byte messages here ({exc}); the limit is "
                   "/proc/sys/fs/mqueue/msgsize_max") from None
    try:
        return _transfer(_mq_consumer, (name,), q.send, n, size)
    finally:
        q.close()
        q.unlink()


def _pipe_consumer(fd, size, n, done):
    count = [0]

    def handle(payload):
        count[0] += 1

    read = os.read
    for _ in range(n):
        rec = read(fd, size)
        while len(rec) < size:  # a record split across two reads (rare)
            rec += read(fd, size - len(rec))
        handle(rec)
    done.send(_stamp())


def _pipe_batched_consumer(fd, size, n, done):
    count = [0]

    def handle(payload):
        count[0] += 1

    read = os.read
    left = n
    buf = b""
    while left:
        buf += read(fd, 1 << 16)
        k = min(len(buf) // size, left)
        for i in range(0, k * size, size):
            handle(buf[i:i + size])
        buf = buf[k * size:]
        left -= k
    done.send(_stamp())


def _bench_pipe(n: int, size: int, consumer, batch: int = 0):
    r, w = os.pipe()
    try:
        write = os.write

        def send(b):
            while b:
                b = b[write(w, b):]
        return _transfer(consumer, (r, size), send, n, size, batch)
    finally:
        os.close(r)
        os.close(w)


def bench_pipe(n: int, size: int):
    return _bench_pipe(n, size, _pipe_consumer)


def bench_pipe_batched(n: int, size: int, batch: int):
    return _bench_pipe(n, size, _pipe_batched_consumer, batch)


# --- round trips ---------------------------------------------------------------

def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


_PP: dict = {"peer": None, "mode": 0, "left": 0, "got": 0}


def _rtt_callbacks() -> None:
    """The ping-pong callbacks, registered before any fork: a TWA_SIGNAL
    work may arrive the instant a task registers."""
    from shm_taskwork import callback

    @callback(name="bench.ping")
    def ping(work):
        _PP["left"] -= 1
        _PP["peer"].add("bench.pong", work.payload, _PP["mode"])

    @callback(name="bench.pong")
    def pong(work):
        _PP["got"] += 1

    @callback(name="bench.echo")
    def echo(work):   # what task.call() waits for: its result
        _PP["left"] -= 1
        return work.payload


def _tw_pong(link, name: str, rounds: int, mode: int, cpu):
    _pin(cpu)
    from shm_taskwork import Domain

    with Domain.open(name) as dom:
        _PP["left"], _PP["mode"] = rounds, mode
        me = dom.register("pong")
        link.ready(task=me.id)
        peer = link.recv(timeout=30)   # None: call(), nobody to answer with an add
        _PP["peer"] = None if peer is None else dom.task(peer)
        link.emit(ev="go")
        deadline = time.monotonic() + 120
        while _PP["left"] > 0 and time.monotonic() < deadline:
            me.wait(timeout=1)
        link.emit(ev="done")
        me.exit()


def bench_rtt_tw(rounds: int, mode: int, cpus: tuple) -> list[int]:
    _rtt_callbacks()
    total = rounds + 50
    old = os.sched_getaffinity(0)
    with temp_domain("tw_bench", pool_size=1024, payload_size=16, max_tasks=4) as dom, \
            Children() as kids:
        p = kids.fork("RTT peer", _tw_pong, dom.name, total, mode, cpus[1])
        try:
            _pin(cpus[0])
            peer = dom.task(kids.wait_ready([p], timeout=30)[0]["task"])
            me = dom.register("ping")
            p.send(me.id)
            kids.event(p, "go", 30)
            _PP["got"] = 0
            times = []
            deadline = time.monotonic() + 120
            for i in range(total):
                t0 = time.perf_counter_ns()
                peer.add("bench.ping", b"p", mode)
                while _PP["got"] <= i:
                    me.wait(timeout=1)
                    if time.monotonic() > deadline:
                        raise RuntimeError("RTT bench: the peer stopped answering")
                times.append(time.perf_counter_ns() - t0)
            kids.event(p, "done", 30)
            p.wait(30)
            me.exit()
            return times[50:]
        finally:
            os.sched_setaffinity(0, old)


def bench_rtt_call(rounds: int, cpus: tuple) -> list[int]:
    """``peer.call()`` round trips: a tracked add on the peer (in ``wait()``)
    and a wait here for its outcome and result, the callback's bytes."""
    if not _has_call():
        raise Skip("Task.call does not exist in this version")
    _rtt_callbacks()
    total = rounds + 50
    old = os.sched_getaffinity(0)
    with temp_domain("tw_bench", pool_size=1024, payload_size=16, max_tasks=4) as dom, \
            Children() as kids:
        p = kids.fork("call() peer", _tw_pong, dom.name, total, 0, cpus[1])
        try:
            _pin(cpus[0])
            peer = dom.task(kids.wait_ready([p], timeout=30)[0]["task"])
            p.send(None)
            kids.event(p, "go", 30)
            times = []
            call = peer.call
            for _ in range(total):
                t0 = time.perf_counter_ns()
                if call("bench.echo", b"p", timeout=30) != b"p":
                    raise RuntimeError("call() bench: the peer's result is not its payload")
                times.append(time.perf_counter_ns() - t0)
            kids.event(p, "done", 30)
            p.wait(30)
            return times[50:]
        finally:
            os.sched_setaffinity(0, old)


def _efd_pong(link, efd_in, efd_out, rounds, cpu):
    _pin(cpu)
    link.ready()
    for _ in range(rounds):
        os.eventfd_read(efd_in)
        os.eventfd_write(efd_out, 1)
    link.emit(ev="done")


def bench_rtt_eventfd(rounds: int, cpus: tuple) -> list[int]:
    e1, e2 = os.eventfd(0), os.eventfd(0)
    total = rounds + 50
    old = os.sched_getaffinity(0)
    try:
        with Children() as kids:
            p = kids.fork("eventfd peer", _efd_pong, e1, e2, total, cpus[1])
            kids.wait_ready([p], timeout=30)
            _pin(cpus[0])
            times = []
            for _ in range(total):
                t0 = time.perf_counter_ns()
                os.eventfd_write(e1, 1)
                os.eventfd_read(e2)
                times.append(time.perf_counter_ns() - t0)
            kids.event(p, "done", 30)
            p.wait(30)
            return times[50:]
    finally:
        os.sched_setaffinity(0, old)
        os.close(e1)
        os.close(e2)


# --- native ----------------------------------------------------------------------

# The C sources, where the package runs from a source tree (tools/ beside native/).
_NATIVE = Path(__file__).resolve().parent.parent / "native"


def build_native(workdir: str) -> str:
    """Build native/bench/bench_native.c with the core's C files into
    ``workdir`` (as ``make bench-native`` does); the program's path."""
    src = _NATIVE / "bench" / "bench_native.c"
    if not src.is_file():
        raise Skip("no C sources beside the package (a source checkout has native/bench/)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise Skip("no C compiler (cc, gcc, or $CC)")
    exe = os.path.join(workdir, "bench_native")
    core = sorted(str(p) for p in _NATIVE.glob("*.c"))
    r = subprocess.run([cc, "-O2", "-std=gnu11", "-o", exe, str(src), *core, "-lpthread"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        errs = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines()
        raise Skip(f"the C micro-benchmark did not build: {errs[0] if errs else r.returncode}")
    return exe


def bench_native(exe: str, iterations: int) -> dict:
    """One run of the C micro-benchmark: ns per iteration of each case."""
    r = subprocess.run([exe, str(iterations), "--json"], capture_output=True, text=True,
                       timeout=600)
    if r.returncode:
        raise RuntimeError(f"bench_native exited {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout)


# --- the run -------------------------------------------------------------------

def throughput_cases(batch: int, contention: bool):
    yield "add", lambda n, s: bench_shm_taskwork(n, s)
    yield "add tracked", lambda n, s: bench_shm_taskwork(n, s, track=True)
    yield f"add_many({batch})", lambda n, s: bench_shm_taskwork(n, s, batch)
    yield f"add_many({batch}) batch cb", lambda n, s: bench_shm_taskwork(n, s, batch, True)
    if contention:
        for p in (1, 2, 4, 8):
            yield f"add, {p} producers", \
                lambda n, s, p=p: bench_shm_taskwork(n, s, producers=p)
    yield "multiprocessing.Queue", bench_mp_queue
    yield "faster-fifo", bench_faster_fifo
    yield "posix_ipc MessageQueue", bench_posix_mq
    yield "pipe (1 read/record)", bench_pipe
    yield f"pipe batched ({batch}/write)", lambda n, s: bench_pipe_batched(n, s, batch)


# (case, baseline) pairs whose ratio of rates the table shows
def ratio_pairs(batch: int):
    b = f"pipe batched ({batch}/write)"
    return [("add", "pipe (1 read/record)"), ("add", "posix_ipc MessageQueue"),
            ("add", "multiprocessing.Queue"), ("add", "faster-fifo"),
            ("add tracked", "add"),
            (f"add_many({batch})", b), (f"add_many({batch}) batch cb", b),
            ("add, 8 producers", "add, 1 producers")]


def rtt_cases(rounds: int):
    from shm_taskwork import TWA_RESUME, TWA_SIGNAL
    cpus = sorted(os.sched_getaffinity(0))
    placements = [("same CPU", (cpus[0], cpus[0]))]
    if len(cpus) > 1:
        placements.insert(0, ("2 CPUs", (cpus[0], cpus[1])))
    for label, pl in placements:
        yield f"RTT RESUME, {label}", lambda pl=pl: bench_rtt_tw(rounds, TWA_RESUME, pl)
        yield f"RTT SIGNAL, {label}", lambda pl=pl: bench_rtt_tw(rounds, TWA_SIGNAL, pl)
        yield f"RTT call(), {label}", lambda pl=pl: bench_rtt_call(rounds, pl)
        yield f"RTT eventfd, {label}", lambda pl=pl: bench_rtt_eventfd(rounds, pl)


# (case, baseline) pairs of round trips whose ratio of p50s the table shows
def rtt_pairs(names):
    for nm in names:
        kind, label = nm.split(", ", 1)
        if kind != "RTT eventfd":
            yield nm, f"RTT eventfd, {label}"
        if kind == "RTT call()":
            yield nm, f"RTT RESUME, {label}"


NATIVE_PAIR = ("native push+detach", "bare push+detach")
# the remote rows (--remote, tools/bench_remote.py): works through the bridge
# against Redis's own XADD/XREADGROUP round trip, the floor of the design
REMOTE_PAIR = ("shm_taskwork remote (bridge)", "redis XADD/XREADGROUP round trip")


# The project's performance targets: (case, baseline, op, bound) on the
# median ratio of one run. Reported as met / missed, never asserted.
def targets(batch: int):
    b = f"pipe batched ({batch}/write)"
    return [("add", "pipe (1 read/record)", ">=", 1.0),
            ("add", "posix_ipc MessageQueue", ">=", 1.3),
            (f"add_many({batch})", b, ">=", 1.5),
            (f"add_many({batch}) batch cb", b, ">=", 3.0),
            ("RTT RESUME, 2 CPUs", "RTT eventfd, 2 CPUs", "<=", 1.3),
            ("RTT RESUME, same CPU", "RTT eventfd, same CPU", "<=", 3.0),
            ("RTT SIGNAL, 2 CPUs", "RTT eventfd, 2 CPUs", "<=", 1.6),
            ("RTT SIGNAL, same CPU", "RTT eventfd, same CPU", "<=", 5.0),
            (*NATIVE_PAIR, "<=", 4.0),
            ("add, 8 producers", "add, 1 producers", ">=", 0.8),
            # through Redis (--remote): the bridge against Redis's own round trip
            (*REMOTE_PAIR, ">=", 1.0, "rate"),
            (*REMOTE_PAIR, "<=", 3.0, "p50")]


def judge(ratios: list[dict], batch: int) -> list[dict]:
    """Each target's median ratio, met or missed (a target that names what
    it is of - rate, p50 - takes that ratio of the pair)."""
    by = {(r["case"], r["vs"]): r for r in ratios}
    by_of = {(r["case"], r["vs"], r["of"]): r for r in ratios}
    out = []
    for num, den, op, bound, *of in targets(batch):
        r = by_of.get((num, den, of[0])) if of else by.get((num, den))
        fig = r["ratio"]["median"] if r else None
        met = None if fig is None else (fig >= bound if op == ">=" else fig <= bound)
        out.append({"case": num, "vs": den, "of": r["of"] if r else (of[0] if of else None),
                    "op": op, "bound": bound, "figure": fig, "met": met})
    return out


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _with_baselines(names: list[str], chosen: set[str], pairs) -> list[str]:
    """``chosen`` and the baselines its cases are compared with (and theirs:
    ``add tracked`` brings ``add``, which brings the pipe), in ``names``' order."""
    pairs = [(num, den) for num, den in pairs if den in names]
    chosen = set(chosen)
    for _ in range(len(names)):   # a chain is at most as long as the case list
        more = {den for num, den in pairs if num in chosen} - chosen
        if not more:
            break
        chosen |= more
    return [nm for nm in names if nm in chosen]


def main(argv=None, prog="shm-taskwork bench", command="bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-n", "--messages", type=int, default=200_000, help="messages per case")
    ap.add_argument("--size", type=int, default=40, help="payload bytes (default 40)")
    ap.add_argument("--batch", type=int, default=100, help="payloads per add_many / pipe write")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; medians and ranges over them")
    ap.add_argument("--only", default="",
                    help="comma list of case-name substrings to run (with their baselines)")
    ap.add_argument("--rtt-rounds", type=int, default=2000, help="round trips per RTT case")
    ap.add_argument("--no-rtt", action="store_true", help="skip the round-trip cases")
    ap.add_argument("--no-contention", action="store_true", help="skip 1/2/4/8 producers")
    ap.add_argument("--no-native", action="store_true",
                    help="skip the C micro-benchmark (native push+detach)")
    ap.add_argument("--native-iterations", type=int, default=2_000_000,
                    help="iterations per run of the C micro-benchmark (the native case a "
                         "quarter of them)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--remote", action="store_true",
                    help="add the remote rows: works through Redis and the bridge, beside "
                         "Redis's own XADD/XREADGROUP round trip (a private redis-server "
                         "unless --redis is given)")
    ap.add_argument("--redis", metavar="URL", help="the Redis for --remote")
    ap.add_argument("--latency-samples", type=int, default=200,
                    help="one-at-a-time sends timed for the remote rows' p50/p99")
    a = ap.parse_args(argv)
    if a.messages < 1 or a.size < 1 or a.batch < 1 or a.repeat < 1 or a.rtt_rounds < 1:
        raise ValueError("--messages, --size, --batch, --repeat, --rtt-rounds must be >= 1")
    if not 1 <= a.native_iterations <= 1_000_000_000:
        raise ValueError("--native-iterations must be 1..1000000000, got "
                         f"{a.native_iterations}")
    only = [s.strip() for s in a.only.split(",") if s.strip()]

    def wanted(name):
        return not only or any(s in name for s in only)

    all_cases = dict(throughput_cases(a.batch, not a.no_contention))
    names = _with_baselines(list(all_cases), {nm for nm in all_cases if wanted(nm)},
                            ratio_pairs(a.batch))
    runs: dict[str, list[tuple[float, float]]] = {nm: [] for nm in names}
    skipped: dict[str, str] = {}
    notes: dict[str, list[float]] = {}   # eventfd writes per work, shm cases
    for _ in range(a.repeat):
        for nm in names:
            if nm in skipped:
                continue
            try:
                _NOTIFY.pop("last", None)
                runs[nm].append(all_cases[nm](a.messages, a.size))
                if "last" in _NOTIFY:
                    notes.setdefault(nm, []).append(_NOTIFY["last"])
            except ImportError as exc:
                skipped[nm] = f"not installed: {exc.name}"
            except Skip as exc:
                skipped[nm] = str(exc)
    results = []
    for nm in names:
        if nm in skipped:
            results.append({"case": nm, "skipped": skipped[nm]})
            continue
        rates = [a.messages / tot for _, tot in runs[nm]]
        r = {"case": nm, "messages": a.messages, "size": a.size,
             "send_s": [s for s, _ in runs[nm]], "total_s": [t for _, t in runs[nm]],
             "rate": _summary(rates),
             "send_rate": _summary([a.messages / snd for snd, _ in runs[nm]])}
        if nm in notes:
            r["eventfd_writes_per_work"] = _summary(notes[nm])
        results.append(r)
    if a.remote or a.redis:
        from shm_taskwork.tools import bench_remote
        results += bench_remote.run(min(a.messages, 20_000), a.size, a.redis,
                                    a.latency_samples)
    ratios = []
    for num, den in ratio_pairs(a.batch):
        if runs.get(num) and runs.get(den):   # rate num / rate den, round by round
            per_round = [t_den / t_num for (_, t_num), (_, t_den) in zip(runs[num], runs[den])]
            ratios.append({"case": num, "vs": den, "of": "rate", "ratio": _summary(per_round)})

    rows = {r["case"]: r for r in results if "p50_us" in r}
    if all(nm in rows for nm in REMOTE_PAIR):   # one run each: a range of one
        bridge, floor = rows[REMOTE_PAIR[0]], rows[REMOTE_PAIR[1]]
        ratios.append({"case": REMOTE_PAIR[0], "vs": REMOTE_PAIR[1], "of": "rate",
                       "ratio": _summary([bridge["rate"] / floor["rate"]])})
        ratios.append({"case": REMOTE_PAIR[0], "vs": REMOTE_PAIR[1], "of": "p50",
                       "ratio": _summary([bridge["p50_us"] / floor["p50_us"]])})

    rtts = []
    if not a.no_rtt:
        all_rtt = dict(rtt_cases(a.rtt_rounds))
        rnames = _with_baselines(list(all_rtt), {nm for nm in all_rtt if wanted(nm)},
                                 rtt_pairs(list(all_rtt)))
        p50s: dict[str, list[float]] = {nm: [] for nm in rnames}
        p99s: dict[str, list[float]] = {nm: [] for nm in rnames}
        rskipped: dict[str, str] = {}
        for _ in range(a.repeat):
            for nm in rnames:
                if nm in rskipped:
                    continue
                try:
                    ts = all_rtt[nm]()
                except Skip as exc:
                    rskipped[nm] = str(exc)
                    continue
                p50s[nm].append(percentile(ts, 50) / 1000)
                p99s[nm].append(percentile(ts, 99) / 1000)
        for nm in rnames:
            if nm in rskipped:
                rtts.append({"case": nm, "skipped": rskipped[nm]})
            else:
                rtts.append({"case": nm, "rounds": a.rtt_rounds, "p50_us": _summary(p50s[nm]),
                             "p99_us": _summary(p99s[nm])})
        for num, den in rtt_pairs(rnames):
            if p50s.get(num) and p50s.get(den):   # p50 num / p50 den, round by round
                ratios.append({"case": num, "vs": den, "of": "p50",
                               "ratio": _summary([x / y for x, y in zip(p50s[num], p50s[den])])})

    native: dict = {}
    if a.no_native:
        native["skipped"] = "--no-native"
    elif not wanted(NATIVE_PAIR[0]):
        native["skipped"] = "not chosen by --only"
    else:
        with tempfile.TemporaryDirectory(prefix="tw_bench_native_") as tmp:
            try:
                exe = build_native(tmp)
            except Skip as exc:
                native["skipped"] = str(exc)
            else:
                nruns = [bench_native(exe, a.native_iterations) for _ in range(a.repeat)]
                native = {"iterations": a.native_iterations, "runs": nruns}
                for k in ("bare_cmpxchg_ns", "bare_push_detach_ns", "native_push_detach_ns"):
                    native[k] = _summary([r[k] for r in nruns])
                ratios.append({"case": NATIVE_PAIR[0], "vs": NATIVE_PAIR[1], "of": "ns",
                               "ratio": _summary([r["native_push_detach_ns"]
                                                  / r["bare_push_detach_ns"] for r in nruns])})
    out = {"host_cpus": os.cpu_count(), "repeat": a.repeat, "results": results, "rtt": rtts,
           "native": native, "ratios": ratios, "targets": judge(ratios, a.batch)}
    if a.json:
        print(json.dumps(out))
        return 0
    _print(out, a)
    return 0


def _fmt_range(s: dict, fmt: str) -> str:
    return f"{format(s['median'], fmt)} [{format(s['min'], fmt)}-{format(s['max'], fmt)}]"


def _print(out: dict, a) -> None:
    print(f"{a.messages} messages of {a.size} B, producer(s) -> consumer process; "
          f"{a.repeat} rounds, median [min-max]; {out['host_cpus']} CPUs")
    print(f"{'case':<28} {'msgs/s end to end':>34} {'send msgs/s':>12} {'wakes/work':>10}")
    for r in out["results"]:
        if "skipped" in r:
            print(f"{r['case']:<28} skipped: {r['skipped']}")
        elif "p50_us" in r:  # a remote row (--remote)
            print(f"{r['case']}: {r['rate']:,.0f} works/s ({r['messages']}), add-to-start "
                  f"p50 {r['p50_us']:,.0f} us, p99 {r['p99_us']:,.0f} us "
                  f"({r['latency_samples']} one at a time)")
        else:
            wakes = r.get("eventfd_writes_per_work")
            print(f"{r['case']:<28} {_fmt_range(r['rate'], ',.0f'):>34} "
                  f"{r['send_rate']['median']:>12,.0f} "
                  f"{format(wakes['median'], '.4f') if wakes else '':>10}".rstrip())
    if out["rtt"]:
        print(f"\n{'round trip':<32} {'p50 us':>22} {'p99 us':>22}")
        for r in out["rtt"]:
            if "skipped" in r:
                print(f"{r['case']:<32} skipped: {r['skipped']}")
            else:
                print(f"{r['case']:<32} {_fmt_range(r['p50_us'], '.1f'):>22} "
                      f"{_fmt_range(r['p99_us'], '.1f'):>22}")
    nat = out["native"]
    if "skipped" in nat:
        print(f"\nnative (C, one thread): skipped: {nat['skipped']}")
    else:
        print(f"\n{'native (C, one thread), ns':<32} {'median [min-max]':>22}")
        for k, label in (("bare_cmpxchg_ns", "bare cmpxchg"),
                         ("bare_push_detach_ns", "bare push+detach (Treiber)"),
                         ("native_push_detach_ns", "native push+detach")):
            print(f"{label:<32} {_fmt_range(nat[k], '.1f'):>22}")
    if out["ratios"]:
        print(f"\n{'ratio':<62} {'median [min-max]':>22}")
        for r in out["ratios"]:
            label = r["case"] + " / " + r["vs"]
            if r["case"] == REMOTE_PAIR[0]:
                label = "bridge / Redis's own"
            print(f"{label + ' (' + r['of'] + ')':<62} {_fmt_range(r['ratio'], '.2f'):>22}")
    print(f"\n{'targets (median ratio of this run)':<62} {'figure':>7} {'target':>8}")
    for t in out["targets"]:
        fig = "-" if t["figure"] is None else f"{t['figure']:.2f}x"
        verdict = {True: "met", False: "missed", None: "not measured"}[t["met"]]
        bound = f"{t['op']} {t['bound']:.1f}x"
        label = t["case"] + " / " + t["vs"]
        if t["case"] == REMOTE_PAIR[0]:
            label = f"bridge / Redis's own ({t['of']})"
        print(f"{label:<62} {fig:>7} {bound:>8}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
