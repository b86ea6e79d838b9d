"""`shm-taskwork bench` runs every peer in one run and reports ratios.

Speed is never asserted: only that each case moved all its messages between
processes, that the figures are consistent with one another, and that the
round-trip rows and ratios are there."""
import json
import os
import subprocess
import sys

from conftest import ROOT

CASES = {"add", "add_many(8)", "add_many(8) batch cb", "add, 1 producers", "add, 2 producers",
         "add, 4 producers", "add, 8 producers", "multiprocessing.Queue", "faster-fifo",
         "posix_ipc MessageQueue", "pipe (1 read/record)", "pipe batched (8/write)"}


def test_bench_runs_every_peer_and_reports_ratios():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bench", "-n", "2000",
                        "--batch", "8", "--repeat", "1", "--rtt-rounds", "20", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    results = {x["case"]: x for x in out["results"]}
    assert set(results) == CASES
    for name, x in results.items():
        if "skipped" in x:                      # faster-fifo is an optional extra
            assert name == "faster-fifo", x
            continue
        [total] = x["total_s"]
        assert x["messages"] == 2000 and total > 0 and x["send_s"][0] > 0
        assert abs(x["rate"]["median"] - 2000 / total) < 1e-6 * x["rate"]["median"]
    rtt = {x["case"] for x in out["rtt"]}
    assert {"RTT RESUME, same CPU", "RTT SIGNAL, same CPU", "RTT eventfd, same CPU"} <= rtt
    for x in out["rtt"]:
        assert 0 < x["p50_us"]["median"] <= x["p99_us"]["median"]
    ratios = {(x["case"], x["vs"]) for x in out["ratios"]}
    assert ("add", "pipe (1 read/record)") in ratios
    assert ("add, 8 producers", "add, 1 producers") in ratios
    after = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    assert after <= before                       # its domains and queues are removed


def test_bench_prints_its_rows():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bench", "-n", "500",
                        "--repeat", "1", "--no-rtt", "--no-contention", "--only", "add,pipe"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for row in ("add ", "add_many(100)", "pipe (1 read/record)", "ratio"):
        assert row in r.stdout
