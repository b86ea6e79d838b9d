"""The remote rows of ``shm-taskwork bench --remote`` (docs/contract.md "Beyond one host: the bridge").

Two cases through one Redis on this machine, each in two phases:

  redis XADD/XREADGROUP     the floor of this design: a producer XADDs, a
                            consumer process reads with XREADGROUP and XACKs
  shm_taskwork remote       ``Cluster.task(...).add`` -> Redis -> ``shm-taskwork
                            bridge`` -> local add -> the task's callback

* throughput: N messages sent as fast as one producer can, timed until the
  consumer has handled the last one (works/s);
* latency: ``--latency-samples`` messages one at a time (the next is sent when
  the previous one has started), each timed from the send to the start of its
  handling: p50 and p99 in microseconds. Both ends are on this host, so one
  clock (CLOCK_MONOTONIC) times them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from shm_taskwork.tools._common import percentile

FORK = mp.get_context("fork")


# --- redis floor -----------------------------------------------------------------

def _redis_consumer(url, stream, n, lat_n, conn):
    from shm_taskwork.remote import connect
    r = connect(url)
    got = 0
    conn.send("ready")
    while got < n:
        for _, entries in r.xreadgroup("g", "c", {stream: ">"}, count=256, block=5000) or []:
            r.xack(stream, "g", *[e for e, _ in entries])
            got += len(entries)
    conn.send(time.monotonic_ns())
    lat = []
    while len(lat) < lat_n:
        for _, entries in r.xreadgroup("g", "c", {stream: ">"}, count=1, block=5000) or []:
            now = time.monotonic_ns()
            for eid, f in entries:
                lat.append(now - int(f[b"t"]))
                r.xack(stream, "g", eid)
                conn.send(1)
    conn.send(lat)


def bench_redis(url: str, n: int, size: int, lat_n: int) -> dict:
    from shm_taskwork.remote import connect
    r = connect(url)
    stream = f"bench:{uuid.uuid4().hex[:8]}"
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    a, b = FORK.Pipe()
    p = FORK.Process(target=_redis_consumer, args=(url, stream, n, lat_n, b))
    p.start()
    try:
        assert a.recv() == "ready"
        payload = b"x" * size
        t0 = time.monotonic_ns()
        for _ in range(n):
            r.xadd(stream, {"p": payload, "t": 0})
        t_end = a.recv()
        for _ in range(lat_n):
            r.xadd(stream, {"p": payload, "t": time.monotonic_ns()})
            a.recv()
        lat = a.recv()
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
        r.delete(stream)
    return _row("redis XADD/XREADGROUP round trip", n, size, (t_end - t0) / 1e9, lat)


# --- through the bridge --------------------------------------------------------------

def _tw_consumer(name, n, lat_n, conn):
    import struct
    from shm_taskwork import Domain, callback
    lat: list[int] = []
    count = [0]

    @callback(name="bench.remote")
    def sink(work):
        now = time.monotonic_ns()
        count[0] += 1
        if count[0] > n:
            lat.append(now - struct.unpack_from("<q", work.payload)[0])
            conn.send(1)

    with Domain.open(name) as dom:
        t = dom.register("w")
        conn.send("ready")
        while count[0] < n:
            t.wait(timeout=5)
        conn.send(time.monotonic_ns())
        while count[0] < n + lat_n:
            t.wait(timeout=5)
        conn.send(lat)
        t.exit()


def bench_bridge(url: str, n: int, size: int, lat_n: int) -> dict:
    import struct
    from shm_taskwork import TWA_RESUME, Domain
    from shm_taskwork.remote import Cluster
    name = f"/tw_bench_remote_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    dom = Domain.create(name, pool_size=max(1024, n + lat_n), payload_size=max(size, 8),
                        max_tasks=4)
    a, b = FORK.Pipe()
    p = FORK.Process(target=_tw_consumer, args=(name, n, lat_n, b))
    p.start()
    run_dir = tempfile.mkdtemp(prefix="stw-bench-")
    bridge = subprocess.Popen(
        [sys.executable, "-m", "shm_taskwork.cli", "bridge", name, "--redis", url, "--node",
         "bench", "--as", cluster, "--allow", "bench.*", "--no-progress"],
        env=dict(os.environ, SHM_TASKWORK_RUN_DIR=run_dir), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert a.recv() == "ready"
        with Cluster(url) as cl:
            deadline = time.monotonic() + 30
            while "bench" not in cl.nodes(cluster):
                if time.monotonic() > deadline or bridge.poll() is not None:
                    raise RuntimeError("the bench's bridge did not start")
                time.sleep(0.01)
            t = cl.task(cluster, name="w", node="bench")
            payload = b"x" * size
            t0 = time.monotonic_ns()
            for _ in range(n):
                t.add("bench.remote", payload, TWA_RESUME)
            t_end = a.recv()
            pad = b"x" * max(0, size - 8)
            for _ in range(lat_n):
                t.add("bench.remote", struct.pack("<q", time.monotonic_ns()) + pad, TWA_RESUME)
                a.recv()
            lat = a.recv()
        p.join(30)
    finally:
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            try:
                bridge.wait(30)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait()
        if p.is_alive():
            p.kill()
        # last, with the bridge gone: it records each outcome after the add
        from shm_taskwork.remote import connect
        r = connect(url)
        keys = list(r.scan_iter(match=f"stw:{cluster}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
        r.close()
        dom.close()
        dom.unlink()
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
    return _row("shm_taskwork remote (bridge)", n, size, (t_end - t0) / 1e9, lat)


def _row(case: str, n: int, size: int, total_s: float, lat_ns: list) -> dict:
    us = [x / 1000 for x in lat_ns]
    return {"case": case, "messages": n, "size": size, "total_s": total_s,
            "send_s": total_s, "rate": n / total_s, "send_rate": n / total_s,
            "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "mean_us": statistics.fmean(us) if us else 0.0, "latency_samples": len(us)}


def run(n: int, size: int, url: str | None, lat_n: int = 200) -> list[dict]:
    server = None
    if url is None:
        from shm_taskwork.tools._redis_server import RedisServer
        server = RedisServer().start()
        url = server.url
    try:
        return [bench_redis(url, n, size, lat_n), bench_bridge(url, n, size, lat_n)]
    finally:
        if server is not None:
            server.close()
