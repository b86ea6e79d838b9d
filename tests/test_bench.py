"""`shm-taskwork bench` runs every peer in one run and reports ratios.

Speed is never asserted: only that each case moved all its messages between
two processes and that the figures are consistent with one another."""
import json
import os
import subprocess
import sys

from conftest import ROOT

CASES = {"shm_taskwork add", "shm_taskwork add_many(8)", "multiprocessing.Queue", "faster-fifo",
         "posix_ipc MessageQueue", "pipe"}


def test_bench_runs_every_peer_and_reports_ratios():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bench", "-n", "2000",
                        "--batch", "8", "--repeat", "1", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    results = {x["case"]: x for x in json.loads(r.stdout)["results"]}
    assert set(results) == CASES
    for name, x in results.items():
        if "skipped" in x:                      # faster-fifo is an optional extra
            assert name == "faster-fifo", x
            continue
        assert x["messages"] == 2000 and x["total_s"] >= x["send_s"] > 0
        assert abs(x["rate"] - 2000 / x["total_s"]) < 1e-6 * x["rate"]
        assert abs(x["vs_shm_taskwork_add"] * results["shm_taskwork add"]["rate"] - x["rate"]) \
            < 1e-6 * x["rate"]
    assert results["shm_taskwork add"]["vs_shm_taskwork_add"] == 1.0
    after = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    assert after <= before                       # its domains and queues are removed
