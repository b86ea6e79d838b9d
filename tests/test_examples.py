"""What ``examples/`` ships, checked against the real thing: the Prometheus
alert rules against a real exporter's metrics, the systemd units by running
their commands on a real domain, the worker by stopping it as systemd would.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import socket
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, readline

from shm_taskwork import TWA_NONE, TWA_SIGNAL
from shm_taskwork.cli import COMMANDS

EXAMPLES = os.path.join(ROOT, "examples")
SYSTEMD = os.path.join(EXAMPLES, "systemd")
INSTALL_DIR = "/opt/shm-taskwork/"   # where the units expect the project


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shm_taskwork.cli", *args], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


# ---- Prometheus rules ---------------------------------------------------------------

IDLE = """
    import sys
    from shm_taskwork import Domain
    dom = Domain.open(sys.argv[1])
    task = dom.register("idle")
    print(task.id, flush=True)
    sys.stdin.read()
    task.exit()
"""


def test_alert_rules_name_only_metrics_the_exporter_serves(make_domain, spawn):
    with open(os.path.join(EXAMPLES, "prometheus", "shm_taskwork.rules.yml")) as f:
        doc = yaml.safe_load(f)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    for want in ("ShmTaskworkDeadTask", "ShmTaskworkDeadLetters", "ShmTaskworkPoolNearlyEmpty",
                 "ShmTaskworkOldestPendingTooOld"):
        assert want in alerts
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in ("warning", "critical"), r
        assert r["annotations"]["summary"], r
        assert r["expr"].count("(") == r["expr"].count(")"), r["expr"]
    # a domain with a live task that has a pending work: every family appears
    dom = make_domain("rules")
    child = spawn(IDLE, dom.name, stdin=subprocess.PIPE)
    dom.task(int(readline(child))).add("test.x", b"", TWA_NONE)
    r = cli("export", dom.name, "--once")
    assert r.returncode == 0, r.stderr
    served = {line.split("{")[0].split()[0] for line in r.stdout.splitlines()
              if line and not line.startswith("#")}
    for rule in rules:
        names = set(re.findall(r"\bshm_taskwork_\w+", rule["expr"]))
        assert names, rule["expr"]
        missing = names - served
        assert not missing, f"{rule['alert']} names {missing}, not exported"
    # the label a rule selects on is one the exporter sets
    assert 'state="running"' in r.stdout
    child.communicate(timeout=15)   # closes its stdin: it exits its task


# ---- systemd units ------------------------------------------------------------------

def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # systemd keys are case-sensitive
    with open(os.path.join(SYSTEMD, name)) as f:
        cp.read_file(f)
    return cp


def exec_argv(cp, domain: str) -> list[str]:
    argv = shlex.split(cp["Service"]["ExecStart"].replace("%i", domain))
    assert os.path.isabs(argv[0]), argv  # systemd wants an absolute path
    return argv


def test_units_parse_and_their_commands_are_real(make_domain):
    files = sorted(os.listdir(SYSTEMD))
    assert {"shm-taskwork-worker@.service", "shm-taskwork-fsck@.service",
            "shm-taskwork-fsck@.timer"} <= set(files)
    dom = make_domain("units")
    for f in files:
        cp = unit(f)
        assert cp["Unit"]["Description"]
        if f.endswith(".timer"):
            target = cp["Timer"]["Unit"].replace("%i", "")
            assert target in files, target
            assert cp["Timer"]["OnUnitActiveSec"]
            assert cp["Install"]["WantedBy"] == "timers.target"
            continue
        argv = exec_argv(cp, dom.name)
        if os.path.basename(argv[0]) != "shm-taskwork":
            continue
        sub, args = argv[1], argv[2:]
        assert sub in COMMANDS, f"{f}: {sub!r} is not a shm-taskwork command"
        if sub == "worker":
            continue   # it serves until stopped: run by its own test below
        if sub == "export":
            args += ["--once"]   # served forever otherwise: one exposition proves the options
        r = cli(sub, *args)
        assert r.returncode == 0, (f, r.stderr)
    fsck = unit("shm-taskwork-fsck@.service")
    assert fsck["Service"]["Type"] == "oneshot"
    assert exec_argv(fsck, "app")[1:] == ["fsck", "app", "--repair"]


def test_worker_unit_is_type_notify_and_drains_on_its_kill_signal(make_domain, tmp_path):
    """The worker unit run as systemd would: its ExecStart (shm-taskwork
    worker) in its WorkingDirectory, with a real NOTIFY_SOCKET and the
    WATCHDOG_USEC its WatchdogSec gives; READY=1, WATCHDOG=1, the works run,
    then KillSignal drains (STOPPING=1) and the worker exits 0."""
    dom = make_domain("worker")
    cp = unit("shm-taskwork-worker@.service")
    svc = cp["Service"]
    assert svc["Type"] == "notify"
    argv = exec_argv(cp, dom.name)
    assert os.path.basename(argv[0]) == "shm-taskwork" and argv[1] == "worker"
    drain = float(argv[argv.index("--drain-timeout") + 1])
    assert float(svc["TimeoutStopSec"]) > drain, "systemd would SIGKILL the drain"
    watchdog_s = float(svc["WatchdogSec"])
    workdir = svc["WorkingDirectory"].replace(INSTALL_DIR + "examples", EXAMPLES)
    assert os.path.isdir(workdir) and os.path.exists(
        os.path.join(workdir, argv[argv.index("-m") + 1] + ".py"))
    sock_path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(30)
    env = _env()
    env.update(NOTIFY_SOCKET=sock_path, WATCHDOG_USEC=str(int(watchdog_s * 1e6)))
    proc = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", *argv[1:]], env=env,
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    got: list[str] = []

    def until(field: str) -> None:
        while not any(m.startswith(field) for m in got):
            got.extend(srv.recv(4096).decode().splitlines())
    try:
        until("READY=1")
        task = dom.task(name="worker")
        task.add("app.reload", b"config.toml", TWA_SIGNAL)
        assert readline(proc).startswith("reloading config.toml (queued by pid")
        task.add("app.ping", b"", TWA_NONE)   # held: runs in the drain
        proc.send_signal(getattr(signal, svc["KillSignal"]))
        until("STOPPING=1")
        out, err = proc.communicate(timeout=30)
    finally:
        srv.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.split() == ["pong"], out
    assert [t.state for t in dom.tasks() if t.id == task.id] in ([], ["exited"])
    st = dom.stats()
    assert st.pool_free == st.pool_size and dom.dead_letters() == []


# ---- the asyncio server ------------------------------------------------------------------

def _get(url: str) -> dict:
    import json
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_asyncio_server_workers_reload_when_the_supervisor_says(make_domain, tmp_path):
    import json
    import socket
    import urllib.error

    from conftest import wait_until
    dom = make_domain("aiohttp")
    conf = tmp_path / "app.json"
    conf.write_text(json.dumps({"greeting": "hello"}))
    server = os.path.join(EXAMPLES, "asyncio_server.py")
    workers, urls = [], []
    try:
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            w = subprocess.Popen([sys.executable, server, "serve", dom.name, "--port", str(port),
                                  "--config", str(conf)], env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            workers.append(w)
            assert readline(w).startswith(f"serving on http://127.0.0.1:{port}/ as task")
            urls.append(f"http://127.0.0.1:{port}/")
        for w, url in zip(workers, urls):
            assert _get(url) == {"pid": w.pid, "version": 0, "config": {"greeting": "hello"}}
        conf.write_text(json.dumps({"greeting": "hi"}))
        for notify in ([], ["--signal"]):
            r = subprocess.run([sys.executable, server, "reload", dom.name, *notify], env=_env(),
                               capture_output=True, text=True, timeout=60)
            assert (r.returncode, r.stdout.strip()) == (0, "told 2 workers to reload"), r.stderr
            for w in workers:
                assert "configuration v" in readline(w)
        for url in urls:
            wait_until(lambda: _get(url)["version"] == 2, what="the reload to be served")
            assert _get(url)["config"] == {"greeting": "hi"}
        # the reloads were async callbacks, counted when their coroutines ended
        assert sorted((t.run, t.errors) for t in dom.tasks()) == [(2, 0), (2, 0)]
        for w in workers:
            w.send_signal(signal.SIGTERM)
            out, err = w.communicate(timeout=30)
            assert w.returncode == 0, err
            assert out.strip().endswith("stopped")
        with pytest.raises(urllib.error.URLError):
            _get(urls[0])
        assert all(t.state == "exited" for t in dom.tasks())
        st = dom.stats()
        assert st.pool_free == st.pool_size
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate(timeout=10)


def test_typed_usage_program_runs():
    """The program `make typecheck` checks with mypy --strict also runs."""
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "typed_usage.py")], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["five", "three", "one", "six", "async", "seven", "drained"]
