"""`shm-taskwork bench` runs every peer in one run and reports ratios.

Speed is never asserted: only that each case moved all its messages between
processes, that the figures are consistent with one another, and that the
round-trip rows, the native figures, the ratios and the targets table are
there."""
import inspect
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT

from shm_taskwork import Task

CASES = {"add", "add tracked", "add_many(8)", "add_many(8) batch cb", "add, 1 producers",
         "add, 2 producers", "add, 4 producers", "add, 8 producers", "multiprocessing.Queue",
         "faster-fifo", "posix_ipc MessageQueue", "pipe (1 read/record)",
         "pipe batched (8/write)"}
HAS_TRACK = "track" in inspect.signature(Task.add).parameters
HAS_CALL = callable(getattr(Task, "call", None))
CAN_BUILD_NATIVE = (os.path.isfile(os.path.join(ROOT, "native", "bench", "bench_native.c"))
                    and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")))


def _bench(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bench", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_runs_every_peer_and_reports_ratios():
    before = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    out = json.loads(_bench("-n", "2000", "--batch", "8", "--repeat", "1", "--rtt-rounds", "20",
                            "--native-iterations", "2000", "--json"))
    results = {x["case"]: x for x in out["results"]}
    assert set(results) == CASES
    for name, x in results.items():
        if "skipped" in x:                      # faster-fifo is an optional extra
            assert name == "faster-fifo" or (name == "add tracked" and not HAS_TRACK), x
            continue
        [total] = x["total_s"]
        assert x["messages"] == 2000 and total > 0 and x["send_s"][0] > 0
        assert abs(x["rate"]["median"] - 2000 / total) < 1e-6 * x["rate"]["median"]
    assert ("skipped" in results["add tracked"]) == (not HAS_TRACK)

    rtt = {x["case"]: x for x in out["rtt"]}
    assert {"RTT RESUME, same CPU", "RTT SIGNAL, same CPU", "RTT call(), same CPU",
            "RTT eventfd, same CPU"} <= set(rtt)
    assert ("skipped" in rtt["RTT call(), same CPU"]) == (not HAS_CALL)
    for x in rtt.values():
        if "skipped" not in x:
            assert x["rounds"] == 20 and 0 < x["p50_us"]["median"] <= x["p99_us"]["median"]

    native = out["native"]
    if CAN_BUILD_NATIVE:                         # a source tree builds its C bench
        assert "skipped" not in native, native
        assert native["iterations"] == 2000 and len(native["runs"]) == 1
        for k in ("bare_cmpxchg_ns", "bare_push_detach_ns", "native_push_detach_ns"):
            assert native[k]["median"] > 0
    else:
        assert native["skipped"]

    ratios = {(x["case"], x["vs"]): x for x in out["ratios"]}
    want = {("add", "pipe (1 read/record)"), ("add", "posix_ipc MessageQueue"),
            ("add", "multiprocessing.Queue"), ("add_many(8)", "pipe batched (8/write)"),
            ("add_many(8) batch cb", "pipe batched (8/write)"),
            ("add, 8 producers", "add, 1 producers"),
            ("RTT RESUME, same CPU", "RTT eventfd, same CPU"),
            ("RTT SIGNAL, same CPU", "RTT eventfd, same CPU")}
    if HAS_TRACK:
        want.add(("add tracked", "add"))
    if HAS_CALL:
        want |= {("RTT call(), same CPU", "RTT eventfd, same CPU"),
                 ("RTT call(), same CPU", "RTT RESUME, same CPU")}
    if CAN_BUILD_NATIVE:
        want.add(("native push+detach", "bare push+detach"))
    if len(os.sched_getaffinity(0)) > 1:
        want |= {("RTT RESUME, 2 CPUs", "RTT eventfd, 2 CPUs"),
                 ("RTT SIGNAL, 2 CPUs", "RTT eventfd, 2 CPUs")}
    assert want <= set(ratios)
    for x in ratios.values():
        assert x["of"] in ("rate", "p50", "ns")
        assert 0 < x["ratio"]["min"] <= x["ratio"]["median"] <= x["ratio"]["max"]

    targets = out["targets"]
    assert len(targets) == 12                    # the bridge's two: with --remote only
    for t in targets:
        assert t["op"] in (">=", "<=") and t["bound"] > 0
        r = ratios.get((t["case"], t["vs"]))
        if r is None:
            assert t["figure"] is None and t["met"] is None
        else:                                    # the verdict follows the figure, whatever it is
            assert t["figure"] == r["ratio"]["median"]
            assert t["met"] == (t["figure"] >= t["bound"] if t["op"] == ">="
                                else t["figure"] <= t["bound"])
    assert {(t["case"], t["vs"]) for t in targets} >= {
        ("add", "pipe (1 read/record)"), ("add", "posix_ipc MessageQueue"),
        ("native push+detach", "bare push+detach"), ("add, 8 producers", "add, 1 producers")}
    after = {n for n in os.listdir("/dev/shm") if n.startswith("tw_bench_")}
    assert after <= before                       # its domains and queues are removed


def test_only_brings_the_baselines_of_its_cases():
    out = json.loads(_bench("-n", "300", "--repeat", "1", "--no-rtt", "--no-native",
                            "--only", "add tracked", "--json", timeout=120))
    assert {x["case"] for x in out["results"]} == {
        "add tracked", "add", "pipe (1 read/record)", "posix_ipc MessageQueue",
        "multiprocessing.Queue", "faster-fifo"}
    assert out["rtt"] == [] and out["native"] == {"skipped": "--no-native"}


def test_bench_prints_its_rows():
    stdout = _bench("-n", "500", "--repeat", "1", "--no-rtt", "--no-contention", "--no-native",
                    "--only", "add,pipe", timeout=120)
    for row in ("add ", "add_many(100)", "pipe (1 read/record)", "posix_ipc MessageQueue",
                "ratio", "targets", "native (C, one thread): skipped: --no-native"):
        assert row in stdout
    assert "met" in stdout or "missed" in stdout
