"""``shm-taskwork bench``: this project beside its peers, in one run.

Every case moves N messages of ``--size`` bytes from a producer process to a
consumer process on this host and times the whole transfer, from the first
send to the consumer having handled the last message. Peers:

  shm_taskwork add        one ``task.add`` per message (TWA_RESUME); the
                          consumer sits in ``task.wait()`` and runs callbacks
  shm_taskwork add_many   batches of ``--batch`` payloads per push
  multiprocessing.Queue   put / get
  faster-fifo             put / get (when the package is installed)
  posix_ipc MessageQueue  send / receive
  pipe                    fixed-size records through os.pipe

Figures are rates (messages per second) and ratios against ``shm_taskwork
add``; each case runs ``--repeat`` times and the best run counts (the least
disturbed by the other core's load). The producer's side alone is reported
too (``send``: time to hand all messages over). Nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid

FORK = mp.get_context("fork")


def _stamp() -> float:
    return time.perf_counter()


# --- shm_taskwork ----------------------------------------------------------

def _tw_consumer(name: str, n: int, ready, done):
    from shm_taskwork import Domain, callback

    count = [0]

    @callback(name="bench.sink")
    def sink(work):
        count[0] += 1

    with Domain.open(name) as dom:
        task = dom.register("bench-consumer")
        ready.send(task.id)
        while count[0] < n:
            task.wait(timeout=5)
        done.send(_stamp())
        task.exit()


def bench_shm_taskwork(n: int, size: int, batch: int = 0) -> tuple[float, float]:
    from shm_taskwork import TWA_RESUME, Domain

    name = f"/tw_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dom = Domain.create(name, pool_size=max(1024, min(n, 1 << 20)), payload_size=max(size, 8),
                        max_tasks=4)
    try:
        ready_r, ready_w = FORK.Pipe(False)
        done_r, done_w = FORK.Pipe(False)
        p = FORK.Process(target=_tw_consumer, args=(name, n, ready_w, done_w))
        p.start()
        if not ready_r.poll(30):
            raise RuntimeError("bench consumer did not register")
        task = dom.task(ready_r.recv())
        payload = b"x" * size
        t0 = _stamp()
        if batch:
            chunk = [payload] * batch
            sent = 0
            while sent < n:
                k = min(batch, n - sent)
                try:
                    task.add_many("bench.sink", chunk[:k], TWA_RESUME)
                    sent += k
                except Exception as exc:  # pool momentarily empty: let it drain
                    if type(exc).__name__ != "PoolExhaustedError":
                        raise
        else:
            add = task.add
            sent = 0
            while sent < n:
                try:
                    add("bench.sink", payload, TWA_RESUME)
                    sent += 1
                except Exception as exc:
                    if type(exc).__name__ != "PoolExhaustedError":
                        raise
        t1 = _stamp()
        if not done_r.poll(120):
            raise RuntimeError("bench consumer did not finish")
        t2 = done_r.recv()
        p.join(30)
        return t1 - t0, t2 - t0
    finally:
        dom.close()
        dom.unlink()


# --- peers -------------------------------------------------------------------

def _transfer(consumer, args: tuple, send, n: int, size: int) -> tuple[float, float]:
    """Start ``consumer(*args, n, done)`` in a child, call ``send(payload)`` n
    times here; (seconds to send all, seconds until the consumer had all)."""
    done_r, done_w = FORK.Pipe(False)
    p = FORK.Process(target=consumer, args=(*args, n, done_w))
    p.start()
    payload = b"x" * size
    t0 = _stamp()
    for _ in range(n):
        send(payload)
    t1 = _stamp()
    if not done_r.poll(120):
        p.kill()
        raise RuntimeError(f"{consumer.__name__} did not finish")
    t2 = done_r.recv()
    p.join(30)
    return t1 - t0, t2 - t0


def _queue_consumer(q, n, done):
    for _ in range(n):
        q.get()
    done.send(_stamp())


def bench_mp_queue(n: int, size: int):
    q = FORK.Queue()
    return _transfer(_queue_consumer, (q,), q.put, n, size)


def _ff_consumer(q, n, done):
    got = 0
    while got < n:
        got += len(q.get_many(timeout=10, max_messages_to_get=1000))
    done.send(_stamp())


def bench_faster_fifo(n: int, size: int):
    import faster_fifo
    q = faster_fifo.Queue(max_size_bytes=64 * 1024 * 1024)
    return _transfer(_ff_consumer, (q,), q.put, n, size)


def _mq_consumer(name, n, done):
    import posix_ipc
    q = posix_ipc.MessageQueue(name)
    for _ in range(n):
        q.receive()
    done.send(_stamp())


def bench_posix_mq(n: int, size: int):
    import posix_ipc
    name = f"/tw_bench_mq_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_message_size=max(size, 1))
    try:
        return _transfer(_mq_consumer, (name,), q.send, n, size)
    finally:
        q.close()
        q.unlink()


def _pipe_consumer(fd, size, n, done):
    left = n * size
    while left:
        left -= len(os.read(fd, min(left, 1 << 16)))
    done.send(_stamp())


def bench_pipe(n: int, size: int):
    r, w = os.pipe()
    try:
        return _transfer(_pipe_consumer, (r, size), lambda b: os.write(w, b), n, size)
    finally:
        os.close(r)
        os.close(w)


def cases(batch: int):
    yield "shm_taskwork add", lambda n, s: bench_shm_taskwork(n, s)
    yield f"shm_taskwork add_many({batch})", lambda n, s: bench_shm_taskwork(n, s, batch)
    yield "multiprocessing.Queue", bench_mp_queue
    yield "faster-fifo", bench_faster_fifo
    yield "posix_ipc MessageQueue", bench_posix_mq
    yield "pipe", bench_pipe


def main(argv=None, prog="shm-taskwork bench", command="bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-n", "--messages", type=int, default=100_000, help="messages per case")
    ap.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    ap.add_argument("--batch", type=int, default=64, help="payloads per add_many push")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    ap.add_argument("--only", default="", help="comma list of case-name substrings to run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--remote", action="store_true",
                    help="add the remote rows: works through Redis and the bridge, beside "
                         "Redis's own XADD/XREADGROUP round trip (a private redis-server "
                         "unless --redis is given)")
    ap.add_argument("--redis", metavar="URL", help="the Redis for --remote")
    ap.add_argument("--latency-samples", type=int, default=200,
                    help="one-at-a-time sends timed for the remote rows' p50/p99")
    a = ap.parse_args(argv)
    if a.messages < 1 or a.size < 1 or a.batch < 1 or a.repeat < 1:
        raise ValueError("--messages, --size, --batch and --repeat must be at least 1")
    results = []
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    for name, fn in cases(a.batch):
        if only and not any(s in name for s in only):
            continue
        best = None
        try:
            for _ in range(a.repeat):
                send, total = fn(a.messages, a.size)
                if best is None or total < best[1]:
                    best = (send, total)
        except ImportError as exc:
            results.append({"case": name, "skipped": f"not installed: {exc.name}"})
            continue
        results.append({"case": name, "messages": a.messages, "size": a.size,
                        "send_s": best[0], "total_s": best[1],
                        "rate": a.messages / best[1], "send_rate": a.messages / best[0]})
    if a.remote or a.redis:
        from shm_taskwork.tools import bench_remote
        results += bench_remote.run(min(a.messages, 20_000), a.size, a.redis,
                                    a.latency_samples)
    base = next((r["rate"] for r in results if r.get("case") == "shm_taskwork add"), None)
    for r in results:
        if base and "rate" in r:
            r["vs_shm_taskwork_add"] = r["rate"] / base
    if a.json:
        print(json.dumps({"host_cpus": os.cpu_count(), "results": results}))
        return 0
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"{a.messages} messages of {a.size} B, producer -> consumer process")
        for col in ("case", "msgs/s end-to-end", "send msgs/s", "ratio to add"):
            t.add_column(col, justify="right" if col != "case" else "left")
        for r in results:
            if "skipped" in r:
                t.add_row(r["case"], r["skipped"], "", "")
            else:
                t.add_row(r["case"], f"{r['rate']:,.0f}", f"{r['send_rate']:,.0f}",
                          f"{r.get('vs_shm_taskwork_add', 0):.2f}x")
        Console().print(t)
        for r in results:
            if "p50_us" in r:
                print(f"{r['case']}: {r['rate']:,.0f} works/s ({r['messages']}), "
                      f"add-to-start p50 {r['p50_us']:,.0f} us, p99 {r['p99_us']:,.0f} us "
                      f"({r['latency_samples']} one at a time)")
    except ImportError:
        for r in results:
            if "skipped" in r:
                print(f"{r['case']:<28} {r['skipped']}")
            else:
                print(f"{r['case']:<28} {r['rate']:>12,.0f}/s  send {r['send_rate']:>12,.0f}/s  "
                      f"{r.get('vs_shm_taskwork_add', 0):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
