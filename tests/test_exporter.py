"""The exporter's metrics (docs/operations.md): oldest pending age, CPU seconds and RSS
per task, the fill of the process and name tables, and a domain destroyed and
created again under the same name while the exporter runs.

The exporter is a real subprocess scraped over HTTP on loopback; the tasks are
registered by unrelated processes. Waits are polls with a deadline.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, SERVICE_TASK, readline, wait_until

from shm_taskwork import TWA_NONE, TWA_RESUME, Domain



def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, timeout: float = 20.0) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, retrying until the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout}s")
            time.sleep(0.02)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def exporter(name: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "export", name,
                             "--port", str(port)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert readline(proc).startswith(f"serving {name} metrics on http://127.0.0.1:{port}")
    return proc, f"http://127.0.0.1:{port}/metrics"


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def value(m: dict, metric: str, **labels) -> float:
    want = {(k, str(v)) for k, v in labels.items()}
    got = [v for (n, ls), v in m.items() if n == metric and want <= ls]
    assert len(got) == 1, (metric, labels, got)
    return got[0]


def test_task_age_process_figures_and_table_fill(make_domain, spawn):
    dom = make_domain("exp")
    child = spawn(SERVICE_TASK, dom.name, "svc", stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    proc, url = exporter(dom.name)
    try:
        m = scrape(url)
        t = dict(domain=dom.name, task=task.id, name="svc")
        assert value(m, "shm_taskwork_domain_up", domain=dom.name) == 1
        assert value(m, "shm_taskwork_task_oldest_pending_seconds", **t) == 0
        task.add("test.known", b"", TWA_NONE)
        task.add("test.other", b"", TWA_NONE)
        m = scrape(url)
        assert value(m, "shm_taskwork_task_oldest_pending_seconds", **t) > 0
        assert value(m, "shm_taskwork_task_cpu_seconds_total", **t) > 0
        assert value(m, "shm_taskwork_task_resident_memory_bytes", **t) > 1 << 20
        # two callback names and the task's own (its dead letters name it)
        assert value(m, "shm_taskwork_name_table_used", domain=dom.name) == 3
        assert value(m, "shm_taskwork_name_table_size", domain=dom.name) > 3
        assert 1 <= value(m, "shm_taskwork_proc_table_used", domain=dom.name) <= 2
        assert value(m, "shm_taskwork_proc_table_size", domain=dom.name) == dom.max_procs
        child.stdin.write("run\n")
        child.stdin.flush()
        assert readline(child) == "1"            # test.other is a dead letter there
        m = scrape(url)
        assert value(m, "shm_taskwork_task_oldest_pending_seconds", **t) == 0
        child.stdin.write("exit\n")
        child.stdin.flush()
        child.communicate(timeout=15)
        m = scrape(url)
        # an exited task has no process figures
        assert not [k for k in m if k[0] == "shm_taskwork_task_cpu_seconds_total"
                    and ("task", str(task.id)) in k[1]]
    finally:
        stop(proc)


def test_exporter_follows_a_domain_destroyed_and_created_again(make_domain):
    dom = make_domain("reopen", pool_size=256)
    name = dom.name
    proc, url = exporter(name)
    try:
        m = scrape(url)
        assert value(m, "shm_taskwork_pool_size", domain=name) == 256
        assert value(m, "shm_taskwork_domain_reopened_total", domain=name) == 0
        dom.close()
        dom.unlink()
        m = scrape(url)
        assert value(m, "shm_taskwork_domain_up", domain=name) == 0
        assert not [k for k in m if k[0] == "shm_taskwork_pool_size"]
        again = Domain.create(name, pool_size=512, max_tasks=4)
        try:
            m = scrape(url)
            assert value(m, "shm_taskwork_domain_up", domain=name) == 1
            assert value(m, "shm_taskwork_pool_size", domain=name) == 512
            assert value(m, "shm_taskwork_domain_reopened_total", domain=name) == 1
            # destroyed and created again between two scrapes: seen too
            again.close()
            again.unlink()
            again = Domain.create(name, pool_size=128, max_tasks=4)
            wait_until(lambda: value(scrape(url), "shm_taskwork_pool_size", domain=name) == 128,
                       what="the exporter to map the newest domain")
            assert value(scrape(url), "shm_taskwork_domain_reopened_total", domain=name) == 2
        finally:
            again.close()
            again.unlink()
    finally:
        stop(proc)


RUNNER = """
    import asyncio, sys, time
    from shm_taskwork import Domain, callback
    dom = Domain.open(sys.argv[1])
    task = dom.register("runner")

    @callback(name="test.quick")
    def quick(work):
        pass

    @callback(name="test.slow")
    def slow(work):
        time.sleep(0.003)             # a callback that takes milliseconds

    @callback(name="test.coro")
    async def coro(work):
        await asyncio.sleep(0.003)

    async def main():
        task.attach_loop()
        print(task.id, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
    task.exit()
"""


def test_latency_and_duration_histograms_kept_by_the_runner(make_domain, spawn):
    dom = make_domain("hist")
    child = spawn(RUNNER, dom.name, stdin=subprocess.PIPE)
    task = dom.task(int(readline(child)))
    for _ in range(3):
        task.add("test.quick", b"", TWA_NONE)
    task.add("test.slow", b"", TWA_NONE)
    task.add("test.coro", b"", TWA_NONE)
    task.add("test.quick", b"", TWA_RESUME)        # wakes the loop: all six run
    wait_until(lambda: next(t for t in dom.tasks() if t.id == task.id).run == 6,
               what="six works run")
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "export", dom.name, "--once"],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fams = {f.name: f for f in text_string_to_metric_families(r.stdout)}
    assert fams["shm_taskwork_task_latency_seconds"].type == "histogram"

    def hist(family: str, **labels) -> tuple[list[tuple[float, float]], float, float]:
        want = {(k, str(v)) for k, v in labels.items()}
        buckets, total, count = [], None, None
        for s in fams[family].samples:
            if not want <= set(s.labels.items()):
                continue
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
        return buckets, total, count

    t = dict(domain=dom.name, task=task.id, name="runner")
    for family in ("shm_taskwork_task_latency_seconds", "shm_taskwork_task_duration_seconds"):
        buckets, total, count = hist(family, **t)
        assert count == 6 and buckets[-1] == (float("inf"), 6), (family, buckets)
        assert [c for _, c in buckets] == sorted(c for _, c in buckets)   # cumulative
        assert total > 0
    per_cb = {cb: hist("shm_taskwork_callback_duration_seconds", domain=dom.name, callback=cb)
              for cb in ("test.quick", "test.slow", "test.coro")}
    assert {cb: v[2] for cb, v in per_cb.items()} == {"test.quick": 4, "test.slow": 1,
                                                      "test.coro": 1}
    # the sleeping callbacks (the coroutine's time counts too) land in the
    # millisecond buckets: none of them under 2**21 ns (2.1 ms)
    for cb in ("test.slow", "test.coro"):
        buckets, total, count = per_cb[cb]
        assert dict(buckets)[2 ** 21 / 1e9] == 0 and count == 1, (cb, buckets)
    lat = hist("shm_taskwork_callback_latency_seconds", domain=dom.name, callback="test.quick")
    assert lat[2] == 4
    child.communicate(timeout=30)
