"""docs/contract.md "Beyond one host: the bridge": the bridge over Redis Streams, against a real redis-server
(Debian's package) on a Unix socket in a temporary directory. Two domains
with two bridges of different --node names play two hosts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from shm_taskwork import TWA_NMI_CURRENT, TWA_NONE, TWA_SIGNAL, callback, keys
from shm_taskwork.errors import InvalidModeError, PayloadTooLargeError

from conftest import ROOT, wait_until

redis = pytest.importorskip("redis", reason="the redis client is not installed "
                            "(pip install 'shm-taskwork[remote]')")
from shm_taskwork.remote import Cluster  # noqa: E402
from shm_taskwork.tools._redis_server import RedisServer, find  # noqa: E402

pytestmark = pytest.mark.skipif(find() is None, reason="redis-server cannot be found "
                                "(Debian: apt-get install redis-server)")

RAN: list[bytes] = []


@callback(name="test.remote.rec")
def _rec(work):
    RAN.append(work.payload)


@callback(name="test.remote.echo")
def _echo(work):
    return b"echo:" + work.payload


@pytest.fixture
def rs(tmp_path):
    server = RedisServer()   # a short private directory: Unix socket paths are limited
    server.start()
    yield server
    server.close()


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    monkeypatch.setenv("SHM_TASKWORK_RUN_DIR", d)
    return d


class Bridges:
    def __init__(self, url, run_dir):
        self.url, self.run_dir, self.procs = url, run_dir, []

    def start(self, dom, node, *, cluster="app", allow=("test.*",), killpoint=None,
              claim_idle=30.0):
        env = dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=self.run_dir)
        env.pop("SHM_TASKWORK_KILLPOINT", None)
        if killpoint:
            env["SHM_TASKWORK_KILLPOINT"] = killpoint
        cmd = [sys.executable, "-m", "shm_taskwork.cli", "bridge", dom.name, "--redis", self.url,
               "--node", node, "--as", cluster, "--claim-idle", str(claim_idle), "--no-progress"]
        for a in allow:
            cmd += ["--allow", a]
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stderr.close()


@pytest.fixture
def bridges(rs, run_dir):
    b = Bridges(rs.url, run_dir)
    yield b
    b.stop_all()


def published(cl, node, cluster="app"):
    return wait_until(lambda: node in cl.nodes(cluster), timeout=30,
                      what=f"bridge of node {node} to publish")


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def test_named_node_roundtrip_and_limits(make_domain, bridges, rs):
    a, b = make_domain("a", payload_size=64), make_domain("b", payload_size=128)
    ta, tb = a.register("w", install_handler=False), b.register("w", install_handler=False)
    bridges.start(a, "host-a")
    bridges.start(b, "host-b")
    with Cluster(rs.url) as cl:
        published(cl, "host-a")
        published(cl, "host-b")
        w = cl.task("app", name="w", node="host-b").add("test.remote.rec", b"hello", TWA_NONE)
        assert cl.outcome(w, timeout=30) == "queued"
        assert w.local_id is not None and w.node == "host-b"
        # its state stays for outcome(), then expires (bridge --keep-outcomes)
        assert 0 < cl.r.ttl(f"stw:app:out:{w.id}") <= 7 * 24 * 3600
        assert ta.pending() == 0 and tb.pending() == 1
        assert tb.run() == 1 and RAN == [b"hello"]
        ws = cl.task("app", name="w", node="host-a").add_many("test.remote.rec", [b"1", b"2"])
        assert [cl.outcome(x, timeout=30) for x in ws] == ["queued", "queued"]
        assert ta.run() == 2 and sorted(RAN[1:]) == [b"1", b"2"]
        # limits come from the target's published sizes
        with pytest.raises(PayloadTooLargeError, match="64 bytes"):
            cl.task("app", name="w", node="host-a").add("test.remote.rec", b"x" * 65)
        cl.task("app", name="w", node="host-b").add("test.remote.rec", b"x" * 65)
        with pytest.raises(PayloadTooLargeError, match="smallest"):
            cl.task("app", name="w").add("test.remote.rec", b"x" * 65)
        with pytest.raises(InvalidModeError, match="TWA_NMI_CURRENT"):
            cl.task("app", name="w", node="host-a").add("test.remote.rec", b"", TWA_NMI_CURRENT)


def test_any_node_refused_dead_letter(make_domain, bridges, rs):
    a, b = make_domain("a"), make_domain("b")
    tb = b.register("w", install_handler=False)          # only host-b has a live 'w'
    bridges.start(a, "host-a")
    bridges.start(b, "host-b")
    with Cluster(rs.url) as cl:
        published(cl, "host-a")
        published(cl, "host-b")
        w = cl.task("app", name="w").add("test.remote.rec", b"any", TWA_NONE)
        assert cl.outcome(w, timeout=30) == "queued" and w.node == "host-b"
        assert tb.run() == 1
        r = cl.task("app", name="w", node="host-b").add("evil.rm_rf", b"/")
        assert cl.outcome(r, timeout=30) == "refused"
        assert tb.pending() == 0
        # a name the domain has known, with no live task now: a dead letter
        a.register("ghost", install_handler=False).exit()
        d = cl.task("app", name="ghost", node="host-a").add("test.remote.rec", b"boo")
        assert cl.outcome(d, timeout=30) == "dead_letter"
        [dl] = a.dead_letters()
        assert dl.target_name == "ghost" and dl.payload == b"boo" and dl.reason == "orphaned"


def test_cancel_before_and_after_delivery(make_domain, bridges, rs):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    with Cluster(rs.url) as cl:
        rt = cl.task("app", name="w", node="host-a")
        early = rt.add("test.remote.rec", b"early", TWA_NONE)
        assert cl.cancel(early) is True                  # no bridge yet: removed from Redis
        bridges.start(a, "host-a")
        late = rt.add("test.remote.rec", b"late", TWA_NONE)
        assert cl.outcome(late, timeout=30) == "queued"
        assert cl.outcome(early, timeout=30) == "cancelled"
        assert t.pending() == 1
        assert cl.cancel(late) is True                   # the bridge cancels it locally
        assert t.pending() == 0 and t.run() == 0 and RAN == []
        assert cl.cancel(late) is False
        assert cl.outcome(late, timeout=5) == "cancelled"
        assert late.wait(5) == "cancelled" and late.result is None
        done = rt.add("test.remote.rec", b"done", TWA_NONE)
        assert cl.outcome(done, timeout=30) == "queued"
        assert t.run() == 1
        assert cl.cancel(done) is False                  # it ran: too late


def test_signal_mode_interrupts_the_remote_task(make_domain, bridges, rs, tmp_path):
    from conftest import python_script, readline
    a = make_domain("a")
    out = tmp_path / "ran"
    worker = python_script(f"""
import sys, time
from shm_taskwork import Domain, callback
@callback(name="test.remote.sig")
def sig(work):
    open({str(out)!r}, "w").write(work.payload.decode())
dom = Domain.open({a.name!r})
t = dom.register("w")
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not __import__("os").path.exists({str(out)!r}):
    sum(range(1000))      # busy pure-Python loop: only the signal runs the work
""")
    try:
        assert readline(worker) == "ready"
        bridges.start(a, "host-a")
        with Cluster(rs.url) as cl:
            w = cl.task("app", name="w", node="host-a").add("test.remote.sig", b"now",
                                                              TWA_SIGNAL)
            assert w.wait(30) == "ran"      # (returned None: no result)
            assert w.result is None and w.error is None
        assert out.read_text() == "now"
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()


@pytest.mark.parametrize("point", ["bridge_read", "bridge_claimed", "key_reserved",
                                   "key_pushed", "bridge_added", "bridge_recorded"])
def test_bridge_killed_at_every_step_queues_once(point, make_domain, bridges, rs):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    p = bridges.start(a, "host-a", killpoint=point)
    with Cluster(rs.url) as cl:
        w = cl.task("app", name="w", node="host-a").add("test.remote.rec", b"once", TWA_NONE)
        assert p.wait(30) == -signal.SIGKILL
        bridges.start(a, "host-a")
        assert cl.outcome(w, timeout=30) == "queued"
        w2 = cl.task("app", name="w", node="host-a").add("test.remote.rec", b"next", TWA_NONE)
        assert cl.outcome(w2, timeout=30) == "queued"
        assert t.pending() == 2 and t.run() == 2
        assert sorted(RAN) == [b"next", b"once"]
        assert keys.lookup(a, w.id).state == "queued"
        assert a.stats().pool_free == a.pool_size


def test_another_node_takes_over_a_dead_bridges_reads(make_domain, bridges, rs):
    a, b = make_domain("a"), make_domain("b")
    a.register("w", install_handler=False)
    tb = b.register("w", install_handler=False)
    p = bridges.start(a, "host-a", killpoint="bridge_read")
    with Cluster(rs.url) as cl:
        published(cl, "host-a")
        w = cl.task("app", name="w").add("test.remote.rec", b"orphan", TWA_NONE)
        assert p.wait(30) == -signal.SIGKILL            # read by host-a, never claimed
        bridges.start(b, "host-b", claim_idle=0.3)
        assert cl.outcome(w, timeout=30) == "queued" and w.node == "host-b"
        assert tb.run() == 1 and RAN == [b"orphan"]


def test_redis_restart_keeps_the_works(make_domain, bridges, rs):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    with Cluster(rs.url) as cl:
        ws = cl.task("app", name="w", node="host-a").add_many("test.remote.rec", [b"1", b"2"],
                                                             TWA_NONE)
    rs.restart()                                          # AOF: the entries survive
    bridges.start(a, "host-a")
    with Cluster(rs.url) as cl:
        assert [cl.outcome(w, timeout=30) for w in ws] == ["queued", "queued"]
    assert t.run() == 2


def test_status_json_has_the_bridge(make_domain, bridges, rs, run_dir):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    bridges.start(a, "host-a")
    with Cluster(rs.url) as cl:
        w = cl.task("app", name="w", node="host-a").add("test.remote.rec", b"s", TWA_NONE)
        assert cl.outcome(w, timeout=30) == "queued"

    def bridge_obj():
        out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "status", a.name,
                              "--json"], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=run_dir))
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)["bridge"]
        return got if got and got[0]["delivered"] >= 1 else None

    [b] = wait_until(bridge_obj, timeout=30, what="status to show the bridge")
    assert b["node"] == "host-a" and b["refused"] == 0 and b["duplicates_suppressed"] == 0
    assert {"lag", "pending_entries"} <= set(b)
    # export serves the same figures
    from prometheus_client import generate_latest
    from shm_taskwork.tools.export import registry_for
    text = generate_latest(registry_for(a)).decode()
    assert 'shm_taskwork_bridge_up{domain="%s",node="host-a"} 1.0' % a.name in text
    assert 'shm_taskwork_bridge_delivered_total{domain="%s",node="host-a"} 1.0' % a.name in text
    assert t.run() == 1


def test_bridge_errors_are_one_line(make_domain, rs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bridge", "/tw_test_nope",
                          "--redis", rs.url], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "no domain" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_readme_example_runs_as_written(make_domain, bridges, rs):
    """The two-host example of README's "More than one host", with only the
    Redis URL replaced by the test server's."""
    import re
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## More than one host", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    url = re.search(r'Cluster\("([^"]+)"\)', block).group(1)
    block = block.replace(url, rs.url)
    dom = make_domain("app")
    t = dom.register("worker", install_handler=False)
    bridges.start(dom, "host-b", cluster="app", allow=("app.*",))
    with Cluster(rs.url) as cl:
        published(cl, "host-b")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queued"
    # the reload and one of a/b remain (the other was cancelled, or ran: never both)
    wait_until(lambda: t.pending() >= 2, timeout=30, what="the works to arrive")
    assert t.pending() == 2
    t.exit()


def _bridge_stress(rs, seconds, kill_every):
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "stress", "--bridge",
                          "--redis", rs.url, "--seconds", str(seconds), "--kill-every",
                          str(kill_every), "--json"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_bridge_stress_short(rs):
    s = _bridge_stress(rs, 5, 0.25)
    assert s["ok"] and s["lost"] == 0 and s["duplicated"] == 0 and s["phantom"] == 0
    # (the issue's killed >= 10 is the 20 s run below; here some dead bridges
    # stay away 2.5 s on purpose, so fewer kills fit in 5 s)
    assert s["killed"] >= 5 and s["queued"] > 0
    assert s["ran"] == s["queued"] - s["cancel_unknown"]
    # the run removed its keys from Redis
    assert not list(redis.Redis.from_url(rs.url).scan_iter(match="stw:stress-*"))


@pytest.mark.slow
def test_bridge_stress_issue_run(rs):
    """The issue's run: 20 s, a bridge SIGKILLed every second."""
    s = _bridge_stress(rs, 20, 1)
    assert s["ok"] and s["lost"] == 0 and s["duplicated"] == 0 and s["killed"] >= 10


def test_bench_remote_rows(rs):
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bench", "-n", "300",
                          "--only", "pipe", "--repeat", "1", "--redis", rs.url,
                          "--latency-samples", "20", "--json"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["case"]: r for r in json.loads(out.stdout)["results"]}
    for case in ("redis XADD/XREADGROUP round trip", "shm_taskwork remote (bridge)"):
        r = rows[case]
        assert r["messages"] == 300 and r["latency_samples"] == 20
        assert 0 < r["p50_us"] <= r["p99_us"] and r["rate"] > 0
    # the bridge's two targets are judged against the floor of the same run
    bridge, floor = rows["shm_taskwork remote (bridge)"], rows["redis XADD/XREADGROUP round trip"]
    got = {t["of"]: t for t in json.loads(out.stdout)["targets"]
           if t["case"] == "shm_taskwork remote (bridge)"}
    assert got["rate"]["figure"] == bridge["rate"] / floor["rate"]
    assert got["p50"]["figure"] == bridge["p50_us"] / floor["p50_us"]
    assert got["rate"]["met"] == (got["rate"]["figure"] >= 1.0)
    assert got["p50"]["met"] == (got["p50"]["figure"] <= 3.0)
    # the run removed what it made in Redis
    assert not list(redis.Redis.from_url(rs.url).scan_iter(match="stw:bench-*"))


def test_auth_through_the_url_and_sigterm(make_domain, run_dir):
    with RedisServer(password="s3cret") as secured:
        a = make_domain("a")
        t = a.register("w", install_handler=False)
        b = Bridges(secured.url, run_dir)
        try:
            wrong = secured.url.replace("s3cret", "wrong")
            out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bridge", a.name,
                                  "--redis", wrong, "--allow", "test.*"], capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
            assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1
            assert "wrong" not in out.stderr                  # the password is not echoed
            p = b.start(a, "host-a")
            with Cluster(secured.url) as cl:
                w = cl.task("app", name="w", node="host-a").add("test.remote.rec", b"k",
                                                                TWA_NONE)
                assert cl.outcome(w, timeout=30) == "queued"
            assert t.run() == 1
            wait_until(lambda: os.listdir(run_dir), timeout=30, what="the status file")
            p.send_signal(signal.SIGTERM)                     # graceful: exit 0, file gone
            assert p.wait(30) == 0
            assert os.listdir(run_dir) == []
        finally:
            b.stop_all()


# ---- outcomes: the target's bridge records the local outcome ------------------

TARGET = """
import os, sys
from shm_taskwork import Domain, callback

@callback(name="test.remote.echo")
def echo(work):
    return b"echo:" + work.payload

@callback(name="test.remote.boom")
def boom(work):
    raise ValueError("bad input " + work.payload.decode())

@callback(name="test.remote.hang")
def hang(work):
    print("started", flush=True)
    sys.stdin.readline()          # until the test kills this process

dom = Domain.open(sys.argv[1])
t = dom.register("w")
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    t.wait(0.05)
    t.run()
t.exit()
"""


def _target(a, tmp_path):
    from conftest import python_script, readline
    stop = tmp_path / "stop"
    p = python_script(TARGET, a.name, str(stop), stdin=subprocess.PIPE)
    assert readline(p) == "ready"
    return p, stop


def test_wait_gives_ran_with_its_result_and_failed_with_its_error(make_domain, bridges, rs,
                                                                  tmp_path):
    """A task process on the target host: one callback returns bytes, one
    raises; the sender waits and reads them."""
    a = make_domain("a", payload_size=64)
    p, stop = _target(a, tmp_path)
    try:
        bridges.start(a, "host-a")
        with Cluster(rs.url) as cl:
            rt = cl.task("app", name="w", node="host-a")
            ok = rt.add("test.remote.echo", b"hi", TWA_NONE)
            bad = rt.add("test.remote.boom", b"42", TWA_NONE)
            assert ok.wait(30) == "ran" and ok.result == b"echo:hi" and ok.error is None
            assert bad.wait(30) == "failed" and bad.result is None
            assert bad.error == "ValueError: bad input 42"
            assert ok.local_id is not None and ok.node == "host-a"
            # outcome() says the same, and so does a fresh handle's first read
            assert cl.outcome(ok, timeout=5) == "ran" and ok.outcome == "ran"
            st = cl.state(bad)
            assert st["state"] == "failed" and st["error"] == "ValueError: bad input 42"
            assert cl.r.hlen("stw:app:watch:host-a") == 0     # nothing left to watch
            assert cl.cancel(ok) is False                      # it ran: too late
        stop.touch()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_task_killed_in_the_callback_gives_interrupted(make_domain, bridges, rs, tmp_path):
    a = make_domain("a")
    p, stop = _target(a, tmp_path)
    from conftest import readline
    try:
        bridges.start(a, "host-a")
        with Cluster(rs.url) as cl:
            w = cl.task("app", name="w", node="host-a").add("test.remote.hang", b"", TWA_NONE)
            assert readline(p, timeout=30) == "started"
            assert w.outcome in ("queued", "delivering")    # running, not final
            p.kill()
            p.wait()
            assert w.wait(30) == "interrupted"
            assert w.result is None and cl.state(w)["local_id"] == w.local_id
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_restarted_bridge_records_the_outcome_it_missed(make_domain, bridges, rs):
    """SIGKILLed after the work ran and before it recorded that: the work
    stays queued in Redis; the restarted bridge finds the local outcome by
    the work's id and records it, once."""
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    p = bridges.start(a, "host-a", killpoint="bridge_settled")
    with Cluster(rs.url) as cl:
        w = cl.task("app", name="w", node="host-a").add("test.remote.echo", b"x", TWA_NONE)
        assert cl.outcome(w, timeout=30) == "queued"
        with pytest.raises(TimeoutError, match="not final"):
            w.wait(0.05)                                   # nothing ran it yet
        assert t.run() == 1
        assert p.wait(30) == -signal.SIGKILL
        assert cl.state(w)["state"] == "queued"            # not recorded yet
        assert cl.r.hexists("stw:app:watch:host-a", w.id)
        bridges.start(a, "host-a")
        assert w.wait(30) == "ran" and w.result == b"echo:x"
        assert cl.r.hlen("stw:app:watch:host-a") == 0
        assert cl.r.llen(f"stw:app:done:{w.id}") <= 2       # queued, ran: one push each


def test_a_restarted_bridge_says_unknown_when_the_local_record_is_gone(make_domain, bridges,
                                                                       rs):
    a = make_domain("a", outcomes=1)
    t = a.register("w", install_handler=False)
    p = bridges.start(a, "host-a", killpoint="bridge_settled")
    with Cluster(rs.url) as cl:
        w = cl.task("app", name="w", node="host-a").add("test.remote.echo", b"x", TWA_NONE)
        assert cl.outcome(w, timeout=30) == "queued"
        assert t.run() == 1
        assert p.wait(30) == -signal.SIGKILL
        # while no bridge watches: a newer tracked work settles, the ring of 1 turns
        t.add("test.remote.echo", b"local", TWA_NONE, track=True)
        assert t.run() == 1
        bridges.start(a, "host-a")
        assert w.wait(30) == "unknown"
        assert "outcomes=1" in w.reason and w.result is None


def test_a_forged_final_state_is_read_as_input(make_domain, rs):
    """What the sender reads back is input too: a result that is not hex,
    or larger than the target's payload_size, is no result."""
    with Cluster(rs.url) as cl:
        rt = cl.task("app", name="w", node="host-z")
        cl.r.hset("stw:app:nodes", "host-z", json.dumps({"payload_size": 4}))
        ws = rt.add_many("test.remote.echo", [b"1", b"2", b"3"])
        for w, res in zip(ws, ["zz", "00" * 5, "0102"]):
            cl.r.set(f"stw:app:out:{w.id}", json.dumps({"state": "ran", "node": "host-z",
                                                        "result": res, "error": 7}))
            cl.r.rpush(f"stw:app:done:{w.id}", "x")
        assert [w.wait(5) for w in ws] == ["ran"] * 3
        assert [w.result for w in ws] == [None, None, b"\x01\x02"]
        assert all(w.error is None for w in ws)
        cl.r.set(f"stw:app:out:{ws[0].id}", "[not an object")
        assert cl.state(ws[0]) is None


def test_a_sender_wakes_the_bridge_and_a_flooded_channel_never_stops_it(make_domain, bridges,
                                                                        rs):
    """README "Wake-ups": the bridge subscribes to its streams' wake
    channels; an add publishes on its stream's channel in the XADD's round
    trip; a message past Redis's pubsub output-buffer limit ends the
    bridge's subscription, never the bridge, which subscribes again."""
    dom = make_domain("a")
    t = dom.register("w", install_handler=False)
    bridge = bridges.start(dom, "host-a")
    channel = "stw:app:node:host-a:wake"
    with Cluster(rs.url) as cl:
        published(cl, "host-a")

        def subscribers(ch=channel):
            return dict(cl.r.pubsub_numsub(ch)).get(ch.encode(), 0)

        wait_until(lambda: subscribers() == 1, timeout=30, what="the bridge to subscribe")
        assert subscribers("stw:app:ctl:host-a:wake") == 1
        listener = cl.r.pubsub(ignore_subscribe_messages=True)
        listener.subscribe(channel)
        rt = cl.task("app", name="w", node="host-a")
        w = rt.add("test.remote.rec", b"one", TWA_NONE)
        got = wait_until(lambda: listener.get_message(timeout=0.5), timeout=30,
                         what="the add's wake-up")
        assert got["channel"] == channel.encode()
        listener.close()
        assert cl.outcome(w, timeout=30) == "queued"
        # 40 MiB on the channel: past the subscriber limit (32 MiB by default)
        limit = cl.r.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        assert "pubsub 33554432" in limit
        cl.r.publish(channel, b"x" * (40 << 20))
        w2 = rt.add("test.remote.rec", b"two", TWA_NONE)
        assert cl.outcome(w2, timeout=30) == "queued"
        wait_until(lambda: subscribers() == 1, timeout=30, what="the bridge to subscribe again")
        w3 = rt.add("test.remote.rec", b"three", TWA_NONE)
        assert cl.outcome(w3, timeout=30) == "queued"
        assert bridge.poll() is None
        assert t.run() == 3 and sorted(RAN) == [b"one", b"three", b"two"]
    bridge.send_signal(signal.SIGTERM)
    _, err = bridge.communicate(timeout=30)
    assert bridge.returncode == 0
    assert b"wake-up channel: ConnectionError" in err    # Redis dropped it; it went on
