"""The bridge trusts nothing it reads from Redis; its local files are
private; its Redis password stays secret (README, Security). Each test plays
the stranger who can write to the bridge's Redis, against a real
redis-server and a real bridge process, and is bounded in time."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import uuid

import pytest

from shm_taskwork import TWA_NONE, callback
from shm_taskwork.errors import InvalidModeError

from conftest import ROOT, wait_until

redis = pytest.importorskip("redis", reason="the redis client is not installed "
                            "(pip install 'shm-taskwork[remote]')")
from shm_taskwork.remote import Cluster  # noqa: E402
from shm_taskwork.tools._redis_server import RedisServer, find  # noqa: E402

pytestmark = pytest.mark.skipif(find() is None, reason="redis-server cannot be found "
                                "(Debian: apt-get install redis-server)")

NODE = "host-a"


@callback(name="test.trust.ok")
def _ok(work):
    pass


BASE = "stw:app"


def wid_of(stream: str, eid) -> str:
    """The work id the bridge gives a stream entry (blake2b of stream and
    entry id, as shm_taskwork.remote.work_id)."""
    import hashlib
    eid = eid.decode() if isinstance(eid, bytes) else eid
    return hashlib.blake2b(f"{stream}\0{eid}".encode(), digest_size=16).hexdigest()


@pytest.fixture
def rs():
    server = RedisServer()
    server.start()
    yield server
    server.close()


class Bridges:
    """Bridge processes with stderr to a file (a bridge that logs much never
    blocks on a full pipe)."""

    def __init__(self, url, run_dir, tmp_path):
        self.url, self.run_dir, self.tmp, self.procs = url, run_dir, tmp_path, []

    def start(self, dom, node=NODE, *, allow=("test.*",), url_args=None, env=None):
        e = dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=self.run_dir)
        e.pop("SHM_TASKWORK_KILLPOINT", None)
        e.pop("SHM_TASKWORK_REDIS_URL", None)
        e.update(env or {})
        cmd = [sys.executable, "-m", "shm_taskwork.cli", "bridge", dom.name,
               *(url_args if url_args is not None else ["--redis", self.url]),
               "--node", node, "--as", "app", "--no-progress"]
        for a in allow:
            cmd += ["--allow", a]
        err = open(self.tmp / f"bridge-{len(self.procs)}.err", "w+")
        p = subprocess.Popen(cmd, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err)
        p.err = err
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
            p.err.close()


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture
def bridges(rs, run_dir, tmp_path):
    b = Bridges(rs.url, run_dir, tmp_path)
    yield b
    b.stop_all()


def published(cl, node=NODE):
    return wait_until(lambda: node in cl.nodes("app"), timeout=30,
                      what=f"bridge of node {node} to publish")


def state_of(r, stream, eid):
    raw = r.get(f"{BASE}:out:{wid_of(stream, eid)}")
    return None if raw is None else json.loads(raw)


def alive_and_delivering(cl, proc, task, name="w"):
    """The bridge is alive and queues a good work sent after the bad ones."""
    w = cl.task("app", name=name, node=NODE).add("test.trust.ok", b"good", TWA_NONE)
    assert cl.outcome(w, timeout=30) == "queued", "the good work behind the bad ones"
    assert proc.poll() is None, "the bridge died"
    return w


BAD_ENTRIES = {
    "no func": {"payload": b"x", "notify": b"0", "target": b"w"},
    "no payload": {"func": b"test.trust.ok", "notify": b"0", "target": b"w"},
    "no target": {"func": b"test.trust.ok", "payload": b"x", "notify": b"0"},
    "notify abc": {"func": b"test.trust.ok", "payload": b"x", "notify": b"abc", "target": b"w"},
    "notify 4": {"func": b"test.trust.ok", "payload": b"x", "notify": b"4", "target": b"w"},
    "notify 99": {"func": b"test.trust.ok", "payload": b"x", "notify": b"99", "target": b"w"},
    "notify 2**70": {"func": b"test.trust.ok", "payload": b"x", "notify": str(2 ** 70).encode(),
                     "target": b"w"},
    "name 200 bytes": {"func": b"test." + b"n" * 195, "payload": b"x", "notify": b"0",
                       "target": b"w"},
    "name with NUL": {"func": b"test.\0x", "payload": b"x", "notify": b"0", "target": b"w"},
    "func not UTF-8": {"func": b"test.\xff", "payload": b"x", "notify": b"0", "target": b"w"},
    "payload too large": {"func": b"test.trust.ok", "payload": b"x" * 65, "notify": b"0",
                          "target": b"w"},
    "target 100 bytes": {"func": b"test.trust.ok", "payload": b"x", "notify": b"0",
                         "target": b"t" * 100},
}


def test_bad_entries_are_refused_and_the_bridge_goes_on(make_domain, bridges, rs):
    """Before the claim: each bad entry is refused with a reason and
    acknowledged; the works behind it are queued, and a restart finds
    nothing left pending to die on."""
    a = make_domain("a", payload_size=64)
    t = a.register("w", install_handler=False)
    stream = f"{BASE}:node:{NODE}"
    with Cluster(rs.url) as cl:
        r = cl.r
        r.xgroup_create(stream, "bridges", id="0", mkstream=True)
        eids = {k: r.xadd(stream, v) for k, v in BAD_ENTRIES.items()}
        p = bridges.start(a)
        alive_and_delivering(cl, p, t)
        for what, eid in eids.items():
            st = wait_until(lambda: state_of(r, stream, eid), timeout=10, what=what)
            assert st["state"] == "refused" and st["reason"], what
        assert t.pending() == 1
        assert r.xpending(stream, "bridges")["pending"] == 0
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        p2 = bridges.start(a)
        alive_and_delivering(cl, p2, t)
        assert t.pending() == 2


def test_an_any_stream_entry_targets_only_its_task(make_domain, bridges, rs):
    from shm_taskwork import Domain
    a = make_domain("a")
    pub = a.register("public", install_handler=False)
    other = Domain.open(a.name)            # a second handle plays a second process
    try:
        _any_stream(a, pub, other.register("private", install_handler=False), bridges, rs)
    finally:
        other.close()


def _any_stream(a, pub, priv, bridges, rs):
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        stream = f"{BASE}:any:public"
        wait_until(lambda: "public" in cl.nodes("app")[NODE]["names"], timeout=30,
                   what="the bridge to serve 'public'")
        eid = cl.r.xadd(stream, {"func": "test.trust.ok", "payload": b"x", "notify": "0",
                                 "target": "private"})
        st = wait_until(lambda: state_of(cl.r, stream, eid) or
                        (priv.pending() and {"state": "delivered to private"}),
                        timeout=30, what="the entry's fate")
        assert st["state"] == "refused" and "private" in st["reason"]
        assert priv.pending() == 0 and pub.pending() == 0
        alive_and_delivering(cl, p, pub, name="public")


def test_resume_checks_the_claimed_hash_again_allow_included(make_domain, bridges, rs):
    """The claimed hash is input too: a forged claim of a callback no
    --allow pattern matches, or with a bad notify or name, is refused on
    resume, and the bridge goes on."""
    a = make_domain("a", payload_size=64)
    t = a.register("w", install_handler=False)
    stream = f"{BASE}:node:{NODE}"
    with Cluster(rs.url) as cl:
        r = cl.r
        forged = {}
        for n, (func, notify) in enumerate([("admin.reboot", 1), ("test.trust.ok", 99),
                                            ("test." + "n" * 195, 0), ("test.\0x", 0)]):
            eid = f"1-{n}"
            wid = wid_of(stream, eid)
            r.set(f"{BASE}:out:{wid}", json.dumps({"state": "delivering", "node": NODE,
                                                   "stream": stream, "entry": eid}))
            r.hset(f"{BASE}:claimed:{NODE}", wid, json.dumps(
                {"func": func, "payload": b"boom".hex(), "notify": notify, "target": "w",
                 "stream": stream, "entry": eid}))
            forged[func] = wid
        p = bridges.start(a)
        alive_and_delivering(cl, p, t)
        assert t.pending() == 1                   # the good work only
        for func, wid in forged.items():
            st = json.loads(r.get(f"{BASE}:out:{wid}"))
            assert st["state"] == "refused", func
        assert "admin.reboot" in json.loads(r.get(f"{BASE}:out:{forged['admin.reboot']}")
                                            )["reason"]
        assert r.hlen(f"{BASE}:claimed:{NODE}") == 0


def test_unknown_task_names_do_not_fill_the_pool_with_dead_letters(make_domain, bridges, rs):
    from shm_taskwork import Domain
    a = make_domain("a", pool_size=32)
    other = Domain.open(a.name)
    try:
        other.register("gone", install_handler=False).exit()   # a name the domain has known
    finally:
        other.close()
    t = a.register("w", install_handler=False)
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        ghosts = cl.task("app", name="nosuch", node=NODE).add_many("test.trust.ok",
                                                                   [b"g"] * 40)
        assert {cl.outcome(w, timeout=30) for w in ghosts} == {"refused"}
        assert a.dead_letters() == []
        gone = cl.task("app", name="gone", node=NODE).add_many("test.trust.ok", [b"d"] * 40)
        outs = [cl.outcome(w, timeout=30) for w in gone]
        assert "dead_letter" in outs and "refused" in outs   # dead letters stop at a reserve
        assert a.stats(reap=False).pool_free >= 32 // 4
        alive_and_delivering(cl, p, t)


def test_a_full_pool_refuses_the_work_and_the_bridge_goes_on(make_domain, bridges, rs):
    a = make_domain("a", pool_size=16)
    t = a.register("w", install_handler=False)
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        ws = cl.task("app", name="w", node=NODE).add_many("test.trust.ok", [b"f"] * 24)
        outs = [cl.outcome(w, timeout=30) for w in ws]
        assert outs.count("queued") == 16 and outs.count("refused") == 8
        assert "pool" in cl.state(ws[-1])["reason"]
        assert p.poll() is None
        assert t.run() == 16
        alive_and_delivering(cl, p, t)


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_memory_is_bounded_oversize_entries_never_reach_the_bridge(make_domain, bridges, rs):
    """64 MiB of entries, each larger than the domain's payload_size: the
    bridge's peak RSS grows by far less than their size."""
    a = make_domain("a", payload_size=4096)
    t = a.register("w", install_handler=False)
    stream = f"{BASE}:node:{NODE}"
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        alive_and_delivering(cl, p, t)
        before = _hwm_kib(p.pid)
        blob = os.urandom(1 << 20)
        pipe = cl.r.pipeline(transaction=False)
        eids = []
        for i in range(64):
            pipe.xadd(stream, {"func": "test.trust.ok", "payload": blob, "notify": "0",
                               "target": "w"})
            if i % 8 == 7:
                eids += pipe.execute()
        alive_and_delivering(cl, p, t)
        after = _hwm_kib(p.pid)
        for eid in eids:
            assert state_of(cl.r, stream, eid)["state"] == "refused"
        assert after - before < 16 * 1024, f"peak RSS grew {after - before} KiB"
        print(f"bridge peak RSS: {before} KiB before, {after} KiB after 64 MiB of entries")


def test_a_work_id_names_one_stream_entry(make_domain, bridges, rs):
    """A stranger reusing another sender's work id in another stream
    neither refuses nor replaces that work."""
    a, b = make_domain("a"), make_domain("b")
    tb = b.register("w", install_handler=False)
    with Cluster(rs.url) as cl:
        victim = cl.task("app", name="w", node="host-b").add("test.trust.ok", b"mine",
                                                             TWA_NONE)
        pa = bridges.start(a)
        published(cl)
        stream = f"{BASE}:node:{NODE}"
        eid = cl.r.xadd(stream, {"id": victim.id, "func": "evil.run", "payload": b"theirs",
                                 "notify": "0", "target": "w"})
        wait_until(lambda: cl.r.xlen(stream) == 0, timeout=30, what="the entry to be handled")
        assert cl.state(victim) is None               # untouched: still to be taken
        assert state_of(cl.r, stream, eid)["state"] == "refused"
        bridges.start(b, "host-b")
        assert cl.outcome(victim, timeout=30) == "queued"
        assert pa.poll() is None
        assert [w.payload for w in b.pending_works(tb.id)] == [b"mine"]


def test_a_forged_record_and_cancel_cannot_cancel_a_local_work(make_domain, bridges, rs):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    local = t.add("test.trust.ok", b"local", TWA_NONE)      # never came through Redis
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        r = cl.r
        ctl = f"{BASE}:ctl:{NODE}"
        # a control entry without an id, then one with a forged record
        tok0 = uuid.uuid4().hex
        r.xadd(ctl, {"op": "cancel", "reply": tok0})
        forged = uuid.uuid4().hex
        r.set(f"{BASE}:out:{forged}", json.dumps({"state": "queued", "node": NODE,
                                                  "slot": t.id, "gen": t.gen,
                                                  "local_id": local.id}))
        tok = uuid.uuid4().hex
        r.xadd(ctl, {"op": "cancel", "id": forged, "reply": tok})
        got = r.blpop([f"{BASE}:reply:{tok}"], timeout=20)
        assert got is not None and got[1] == b"0"
        assert t.pending() == 1
        assert p.poll() is None
        alive_and_delivering(cl, p, t)


@callback(name="test.trust.secret")
def _secret(work):
    return b"the-local-secret"


def test_a_forged_watch_entry_reads_no_local_outcome(make_domain, bridges, rs):
    """The watch hash is input: an entry naming a local work that came
    through no Redis (with a forged queued record pointing at it) gets no
    outcome of that work, only ``unknown``; malformed entries are dropped,
    and the bridge goes on."""
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    local = t.add("test.trust.secret", b"", TWA_NONE, track=True)
    assert t.run() == 1 and local.wait(5) == "ran"
    with Cluster(rs.url) as cl:
        r = cl.r
        forged = uuid.uuid4().hex
        r.set(f"{BASE}:out:{forged}", json.dumps({"state": "queued", "node": NODE,
                                                  "local_id": local.id}))
        r.hset(f"{BASE}:watch:{NODE}", mapping={forged: local.id, "not a work id": 1,
                                               uuid.uuid4().hex: "x" * 5000})
        p = bridges.start(a)
        st = wait_until(lambda: (lambda s: s if s["state"] != "queued" else None)(
            json.loads(r.get(f"{BASE}:out:{forged}"))), timeout=30, what="the forged entry")
        assert st["state"] == "unknown" and "result" not in st and "key table" in st["reason"]
        assert b"the-local-secret".hex() not in r.get(f"{BASE}:out:{forged}").decode()
        wait_until(lambda: r.hlen(f"{BASE}:watch:{NODE}") == 0, timeout=30,
                   what="the watch hash to empty")
        alive_and_delivering(cl, p, t)


def test_the_sender_checks_names_and_modes():
    """The sender refuses what the bridge would refuse, naming the rule."""
    with RedisServer() as server, Cluster(server.url) as cl:
        rt = cl.task("app", name="w", node=NODE)
        with pytest.raises(ValueError, match="at most 111 bytes"):
            rt.add("test." + "n" * 200, b"")
        with pytest.raises(ValueError, match="NUL"):
            rt.add("test.\0x", b"")
        with pytest.raises(InvalidModeError, match="not valid"):
            rt.add("test.trust.ok", b"", 99)
        with pytest.raises(InvalidModeError, match="not valid"):
            rt.add("test.trust.ok", b"", 2 ** 70)
        with pytest.raises(ValueError, match="at most 47 bytes"):
            cl.task("app", name="t" * 100)
        assert cl.r.keys("stw:app:node:*") == []


# ---- the status directory ------------------------------------------------------

@pytest.mark.parametrize("how", ["mode 0777", "symlink", "other owner"])
def test_a_status_directory_that_is_not_private_is_refused(make_domain, bridges, rs,
                                                           tmp_path, how):
    a = make_domain("a")
    d = tmp_path / "run"
    if how == "mode 0777":
        d.mkdir()
        os.chmod(d, 0o777)
    elif how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", d)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    p = bridges.start(a)
    assert p.wait(30) == 1
    p.err.seek(0)
    err = p.err.read()
    assert "status directory" in err and err.count("\n") == 1, err
    assert not any(f.endswith(".json") for f in os.listdir(tmp_path / "elsewhere")) \
        if how == "symlink" else True


def test_the_status_directory_is_private_and_readers_skip_planted_files(
        make_domain, bridges, rs, run_dir):
    a = make_domain("a")
    p = bridges.start(a)
    with Cluster(rs.url) as cl:
        published(cl)
    wait_until(lambda: os.path.isdir(run_dir) and any(
        f.endswith(".json") for f in os.listdir(run_dir)), timeout=30, what="status file")
    st = os.lstat(run_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    for f in os.listdir(run_dir):
        assert stat.S_IMODE(os.lstat(os.path.join(run_dir, f)).st_mode) == 0o600
    # planted files: a list, an object with a live pid and no node, a FIFO
    for n, body in enumerate([b"[1]", json.dumps({"domain": a.name.lstrip("/"),
                                                  "pid": 1}).encode(), b"{"]):
        with open(os.path.join(run_dir, f"planted{n}.json"), "wb") as f:
            f.write(body)
    os.mkfifo(os.path.join(run_dir, "fifo.json"))
    env = dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=run_dir)
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "status", a.name, "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [rec] = json.loads(out.stdout)["bridge"]
    assert rec["pid"] == p.pid


def test_the_default_status_directory(monkeypatch, tmp_path):
    from shm_taskwork.tools import bridge
    monkeypatch.delenv("SHM_TASKWORK_RUN_DIR", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert bridge.status_dir() == str(xdg / "shm_taskwork")
    assert bridge.private_dir() == str(xdg / "shm_taskwork")
    assert stat.S_IMODE(os.lstat(xdg / "shm_taskwork").st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    expect = "/run/shm_taskwork" if os.geteuid() == 0 else \
        os.path.join(__import__("tempfile").gettempdir(), f"shm_taskwork-bridges-{os.geteuid()}")
    assert bridge.status_dir() == expect


# ---- secrets -------------------------------------------------------------------

@pytest.mark.parametrize("form", ["file", "env", "query"])
def test_the_password_stays_secret(make_domain, run_dir, tmp_path, form):
    pw = "s3cret-" + uuid.uuid4().hex[:8]
    a = make_domain("a")
    with RedisServer(password=pw) as server:
        b = Bridges(server.url, run_dir, tmp_path)
        env = {}
        if form == "file":
            f = tmp_path / "url"
            f.write_text(server.url + "\n")
            os.chmod(f, 0o600)
            args = ["--redis-url-file", str(f)]
        elif form == "env":
            env = {"SHM_TASKWORK_REDIS_URL": server.url}
            args = []
        else:    # the query form, in argv: still redacted in every output
            args = ["--redis", f"unix://{server.sock}?db=0&password={pw}"]
        try:
            p = b.start(a, url_args=args, env=env)
            with Cluster(server.url) as cl:
                published(cl)
            wait_until(lambda: os.path.isdir(run_dir) and os.listdir(run_dir), timeout=30,
                       what="status file")
            with open(f"/proc/{p.pid}/cmdline", "rb") as fh:
                argv = fh.read()
            if form != "query":
                assert pw.encode() not in argv
            for fn in os.listdir(run_dir):
                with open(os.path.join(run_dir, fn)) as fh:
                    assert pw not in fh.read()
            e = dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=run_dir)
            out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "status", a.name,
                                  "--json"], env=e, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and pw not in out.stdout + out.stderr
            assert "***" in out.stdout
        finally:
            b.stop_all()
        p.err.close()
        with open(p.err.name) as fh:
            assert pw not in fh.read()


def test_no_url_is_a_one_line_error(make_domain, tmp_path):
    a = make_domain("a")
    env = dict(os.environ, PYTHONPATH=ROOT, SHM_TASKWORK_RUN_DIR=str(tmp_path / "run"))
    env.pop("SHM_TASKWORK_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "bridge", a.name],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--redis-url-file" in out.stderr and "SHM_TASKWORK_REDIS_URL" in out.stderr


def test_redact_every_url_form():
    from shm_taskwork.remote.bridge import redact as _redact
    for url in ["redis://u:pw@h:6379/0", "redis://:pw@h", "redis://h/0?password=pw",
                "unix://:pw@/tmp/s.sock?db=0", "unix:///tmp/s?db=0&password=pw",
                "rediss://u:pw@h/1", "rediss://h?ssl_cert_reqs=none&password=pw"]:
        out = _redact(url)
        assert "pw" not in out and "***" in out, (url, out)
    assert _redact("unix:///tmp/s?db=0") == "unix:///tmp/s?db=0"


def test_bridge_stress_with_malformed_entries(rs):
    """The stress run with malformed entries among the good ones, bridges
    SIGKILLed as they go: every good work exactly once, every bad one refused."""
    out = subprocess.run([sys.executable, "-m", "shm_taskwork.cli", "stress", "--bridge",
                          "--redis", rs.url, "--seconds", "4", "--kill-every", "0.5",
                          "--malformed", "0.3", "--rate", "100", "--json"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    s = json.loads(out.stdout)
    assert s["ok"] and s["malformed"] >= 20 and s["malformed_not_refused"] == 0
    assert s["malformed_ran"] == 0 and s["lost"] == 0 and s["duplicated"] == 0
    assert s["queued"] > 0 and s["phantom"] == 0


def test_a_stream_deleted_or_of_another_type_never_stops_the_bridge(make_domain, bridges, rs):
    a = make_domain("a")
    t = a.register("w", install_handler=False)
    stream = f"{BASE}:node:{NODE}"
    with Cluster(rs.url) as cl:
        p = bridges.start(a)
        published(cl)
        alive_and_delivering(cl, p, t)
        cl.r.delete(stream)                   # its group goes with it
        cl.r.set(stream, "not a stream")
        wait_until(lambda: "WRONGTYPE" in open(p.err.name).read(), timeout=30,
                   what="the bridge to meet the key of another type")
        assert p.poll() is None
        cl.r.delete(stream)
        alive_and_delivering(cl, p, t)
