"""``shm-taskwork stress --bridge [--redis URL] ...``: the bridge's exactly once
under fire (docs/contract.md "Beyond one host: the bridge").

Two domains play two hosts (nodes ``host-a`` and ``host-b``), each with
``--workers`` worker processes of the task name ``w`` and one bridge.
``--producers`` processes send remote works to ``host-a``, ``host-b`` and
"any node" (one add in five an ``add_many``), and cancel some of them
(``--cancel-rate``). Every ``--kill-every`` seconds the controller SIGKILLs a
random bridge and starts it again, at once or (one death in four) after 2.5 s,
longer than the bridges' ``--claim-idle`` of 1 s, so the other node's bridge
takes over what the dead one had read (``taken_over``). About a third of the
bridges it starts also get ``SHM_TASKWORK_KILLPOINT=POINT:N`` with one of the bridge's
steps (``bridge_read``, ``bridge_claimed``, ``key_reserved``, ``key_pushed``,
``bridge_added``, ``bridge_recorded``, ``bridge_settled``), so they die there by
themselves.

At the end producers stop, the bridges (no longer killed) settle every work
(each must be queued at least, or reach a final outcome), the workers exit
(running what is queued), the bridges record each work's local outcome, and
the ledger is judged, per work: outcome ``ran`` - ran exactly once (else
``outcome_wrong``); ``cancelled`` - never ran; no outcome, or never run:
``lost``; still ``queued`` (its local outcome never recorded): ``unsettled``;
run twice: ``duplicated``; a run nobody sent: ``phantom``.

``--malformed P`` makes each producer send, with probability P per send, a
malformed entry written straight to the stream instead (a missing field, a
bad notify mode, a name too long or with NUL, a payload over payload_size, a
callback no ``--allow`` matches, an ``any`` entry for another task, a control
entry without an id). Every such entry must end ``refused`` and never run,
while every good work is still delivered exactly once.

Without ``--redis`` a private redis-server is started in a temporary
directory (Debian's package). The run's keys are removed from Redis at the end.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from shm_taskwork.tools._common import count_int, number_arg, positive_int, positive_seconds

BRIDGE_POINTS = ("bridge_read", "bridge_claimed", "key_reserved", "key_pushed",
                 "bridge_added", "bridge_recorded", "bridge_settled")
NODES = ("host-a", "host-b")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--bridge", action="store_true", required=True,
                   help="stress the Redis bridge (this mode)")
    p.add_argument("--redis", metavar="URL", help="a Redis to use (default: a private one)")
    p.add_argument("--seconds", type=positive_seconds, default=20.0)
    p.add_argument("--kill-every", type=number_arg(float, "a number of seconds", 0),
                   default=1.0, metavar="SECONDS",
                   help="SIGKILL a random bridge this often (0: never)")
    p.add_argument("--killpoints", action=argparse.BooleanOptionalAction, default=True,
                   help="a third of the bridges started also die at a random step")
    p.add_argument("--producers", type=positive_int, default=2)
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes per domain")
    p.add_argument("--rate", type=number_arg(float, "a rate", 0, above=True), default=150.0,
                   help="works per second each producer sends (about)")
    p.add_argument("--cancel-rate", type=number_arg(float, "a probability", 0, 1), default=0.05)
    p.add_argument("--settle", type=positive_seconds, default=120.0, metavar="SECONDS",
                   help="how long the end may take for every work to get its outcome")
    p.add_argument("--malformed", type=number_arg(float, "a probability", 0, 1), default=0.0,
                   metavar="P", help="send a malformed entry instead of a work with this "
                   "probability (each must end refused)")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--role", choices=("worker", "producer"), help=argparse.SUPPRESS)
    p.add_argument("--domain", help=argparse.SUPPRESS)
    p.add_argument("--cluster", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--index", type=count_int, default=0, help=argparse.SUPPRESS)
    return p


# ---- roles ------------------------------------------------------------------

def role_worker(a) -> int:
    from shm_taskwork import Domain, callback
    fd = os.open(os.path.join(a.dir, f"ran.{os.getpid()}"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @callback(name="stress.bridge.rec")
    def rec(work):
        os.write(fd, work.payload + b"\n")     # one write: a whole line or none

    dom = Domain.open(a.domain)
    t = dom.register("w")
    stop = os.path.join(a.dir, "stop-workers")
    print("ready", flush=True)
    while not os.path.exists(stop):
        t.wait(0.05)
        t.run()
    t.exit()
    return 0


def malformed(rng: random.Random, tag: str) -> tuple[bool, dict]:
    """One malformed entry: (to the "any" stream only, fields)."""
    good = {"func": "stress.bridge.rec", "payload": tag.encode(), "notify": "0", "target": "w"}
    kind = rng.randrange(10)
    if kind < 3:
        good.pop(("func", "payload", "target", "notify")[rng.randrange(4)])
    elif kind == 3:
        good["notify"] = rng.choice(["abc", "4", "99", str(2 ** 70), "-1", ""])
    elif kind == 4:
        good["func"] = "stress." + "n" * 200
    elif kind == 5:
        good["func"] = "stress.\0nul"
    elif kind == 6:
        good["payload"] = tag.encode() + b"x" * 70000
    elif kind == 7:
        good["func"] = "evil.not_allowed"
    elif kind == 8:
        return True, dict(good, target="not-w")
    else:
        good["target"] = "t" * 100
    return False, good


def role_producer(a) -> int:
    from shm_taskwork import TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI
    from shm_taskwork.remote import Cluster, Keys, work_id
    rng = random.Random(a.seed)
    log = open(os.path.join(a.dir, f"sent.{a.index}"), "a", buffering=1)
    stop = os.path.join(a.dir, "stop-producers")
    modes = (TWA_NONE, TWA_RESUME, TWA_SIGNAL, TWA_SIGNAL_NO_IPI)
    seq = 0
    with Cluster(a.redis) as cl:
        targets = [cl.task(a.cluster, name="w", node=n) for n in NODES]
        targets.append(cl.task(a.cluster, name="w"))
        print("ready", flush=True)
        t0 = time.monotonic()
        while not os.path.exists(stop):
            t = rng.choice(targets)
            if a.malformed and rng.random() < a.malformed:
                tag = f"bad{a.index}-{seq}"
                seq += 1
                any_only, fields = malformed(rng, tag)
                stream = targets[-1].stream if any_only else t.stream
                eid = cl.r.xadd(stream, fields).decode()
                log.write(f"bad {tag} {work_id(stream, eid)}\n")
                if rng.random() < 0.1:      # a control entry without an id
                    cl.r.xadd(Keys(a.cluster).ctl(rng.choice(NODES)), {"op": "cancel"})
                continue
            n = rng.randint(2, 5) if rng.random() < 0.2 else 1
            payloads = [f"p{a.index}-{seq + i}".encode() for i in range(n)]
            seq += n
            ws = t.add_many("stress.bridge.rec", payloads, rng.choice(modes))
            for w in ws:
                log.write(f"sent {w.payload.decode()} {w.id}\n")
            if rng.random() < a.cancel_rate:
                w = rng.choice(ws)
                try:
                    ok = cl.cancel(w, timeout=5.0)
                    log.write(f"cancel {w.id} {int(ok)}\n")
                except TimeoutError:
                    log.write(f"cancel {w.id} ?\n")
            # pace: about --rate works per second
            ahead = seq / a.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    return 0


# ---- controller -------------------------------------------------------------

class Run:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.dir = tempfile.mkdtemp(prefix="stw-bstress-")
        self.tag = uuid.uuid4().hex[:8]
        self.cluster = f"stress-{self.tag}"
        self.doms = {}
        self.server = None
        self.workers: list[subprocess.Popen] = []
        self.producers: list[subprocess.Popen] = []
        self.bridges: dict[str, subprocess.Popen] = {}
        self.killed = 0
        self.killpoint_deaths: collections.Counter = collections.Counter()
        self.bridge_starts = 0
        self.restart_at: dict[str, float] = {}
        self.env = dict(os.environ, SHM_TASKWORK_RUN_DIR=os.path.join(self.dir, "run"))
        self.env.pop("SHM_TASKWORK_KILLPOINT", None)

    def spawn(self, args, env=None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "shm_taskwork.tools.bridge_stress",
                                 "--bridge", *args], env=env or self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, p: subprocess.Popen) -> None:
        line = p.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"a stress process (pid {p.pid}) failed to start")

    def start_bridge(self, node: str, allow_killpoint: bool = True) -> None:
        env = dict(self.env)
        point = None
        if allow_killpoint and self.a.killpoints and self.rng.random() < 1 / 3:
            # bridge_read weighs three: the death that leaves reads to take over
            point = self.rng.choice(BRIDGE_POINTS + ("bridge_read",) * 2)
            env["SHM_TASKWORK_KILLPOINT"] = f"{point}:{self.rng.randint(1, 40)}"
        dom = self.doms[node]
        p = subprocess.Popen([sys.executable, "-m", "shm_taskwork.cli", "bridge", dom.name,
                              "--redis", self.url, "--node", node, "--as", self.cluster,
                              "--allow", "stress.*", "--claim-idle", "1", "--no-progress"],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        p.killpoint = point  # type: ignore[attr-defined]
        self.bridges[node] = p
        self.bridge_starts += 1

    def check_bridges(self, allow_killpoint: bool = True) -> None:
        now = time.monotonic()
        for node, at in list(self.restart_at.items()):
            if now >= at or not allow_killpoint:
                del self.restart_at[node]
                self.start_bridge(node, allow_killpoint)
        for node, p in list(self.bridges.items()):
            if node in self.restart_at:
                continue
            rc = p.poll()
            if rc is None:
                continue
            point = getattr(p, "killpoint", None)
            if rc == -signal.SIGKILL and point:
                self.killpoint_deaths[point] += 1
                self.killed += 1
                p.killpoint = None  # type: ignore[attr-defined]
            elif rc != 0:
                raise RuntimeError(f"the bridge of {node} exited with status {rc}")
            # died holding reads it never claimed: leave them to the other node
            delay = 2.5 if point == "bridge_read" else self.restart_delay()
            self.restart_at[node] = now + (delay if allow_killpoint else 0.0)

    def restart_delay(self) -> float:
        """Mostly at once; one death in four leaves the node without a bridge
        for longer than --claim-idle, so the other node's bridge takes over
        what this one had read (XAUTOCLAIM)."""
        return 2.5 if self.rng.random() < 0.25 else 0.0

    def run(self) -> dict:
        from shm_taskwork import Domain
        from shm_taskwork.remote import connect
        a = self.a
        if a.redis:
            self.url = a.redis
        else:
            from shm_taskwork.tools._redis_server import RedisServer
            self.server = RedisServer().start()
            self.url = self.server.url
        self.r = connect(self.url)
        for node in NODES:
            self.doms[node] = Domain.create(f"/stw_bstress_{os.getpid()}_{node}",
                                            pool_size=8192, max_tasks=16)
        for node in NODES:
            for _ in range(a.workers):
                self.workers.append(self.spawn(["--role", "worker", "--domain",
                                                self.doms[node].name, "--dir", self.dir]))
        for p in self.workers:
            self.wait_ready(p)
        for node in NODES:
            self.start_bridge(node)
        for i in range(a.producers):
            self.producers.append(self.spawn([
                "--role", "producer", "--redis", self.url, "--cluster", self.cluster,
                "--dir", self.dir, "--index", str(i), "--seed", str(self.rng.randrange(1 << 30)),
                "--rate", str(a.rate), "--cancel-rate", str(a.cancel_rate),
                "--malformed", str(a.malformed)]))
        for p in self.producers:
            self.wait_ready(p)
        t0 = time.monotonic()
        next_kill = t0 + a.kill_every if a.kill_every > 0 else float("inf")
        while time.monotonic() - t0 < a.seconds:
            now = time.monotonic()
            if now >= next_kill:
                running = [n for n in NODES if n not in self.restart_at
                           and self.bridges[n].poll() is None]
                node = self.rng.choice(running) if running else NODES[0]
                p = self.bridges[node]
                if running:
                    p.kill()
                    p.wait()
                    self.killed += 1
                    self.restart_at[node] = now + self.restart_delay()
                next_kill = now + a.kill_every
            self.check_bridges()
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        open(os.path.join(self.dir, "stop-producers"), "w").close()
        for p in self.producers:
            p.wait(60)
        sent, cancels, bad = self.read_sent()
        # settle: the bridges (now left alone) must give every work its fate
        # (queued at least), then, once the workers ran what is queued and
        # exited, its final outcome (ran, recorded from the local outcome)
        from shm_taskwork.remote import FINAL, KNOWN
        deadline = time.monotonic() + a.settle
        ids = list(sent.values()) + list(bad.values())
        outcomes = self.settle(ids, KNOWN, deadline)
        open(os.path.join(self.dir, "stop-workers"), "w").close()
        for p in self.workers:
            p.wait(60)
        outcomes = self.settle(ids, FINAL, deadline + a.settle)
        for p in self.bridges.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        s = self.judge(sent, cancels, outcomes, seconds, bad)
        s["taken_over"] = int(self.r.hget(f"stw:{self.cluster}:stats", "taken_over") or 0)
        return s

    def settle(self, ids: list, wanted: tuple, deadline: float) -> dict:
        """Each work's recorded state, once every one is in ``wanted`` or at
        the deadline (then as they are)."""
        out_key = f"stw:{self.cluster}:out"
        outcomes: dict[str, str] = {}
        while True:
            self.check_bridges(allow_killpoint=False)
            for i in range(0, len(ids), 1000):
                chunk = ids[i:i + 1000]
                for rid, v in zip(chunk, self.r.mget([f"{out_key}:{x}" for x in chunk])):
                    if v is not None:
                        outcomes[rid] = json.loads(v)["state"]
            if all(outcomes.get(rid) in wanted for rid in ids) or time.monotonic() > deadline:
                return outcomes
            time.sleep(0.05)

    def read_sent(self):
        sent: dict[str, str] = {}
        cancels: dict[str, str] = {}
        bad: dict[str, str] = {}
        for fn in os.listdir(self.dir):
            if fn.startswith("sent."):
                with open(os.path.join(self.dir, fn)) as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) == 3 and parts[0] == "sent":
                            sent[parts[1]] = parts[2]
                        elif len(parts) == 3 and parts[0] == "cancel":
                            cancels[parts[1]] = parts[2]
                        elif len(parts) == 3 and parts[0] == "bad":
                            bad[parts[1]] = parts[2]
        return sent, cancels, bad

    def judge(self, sent, cancels, outcomes, seconds, bad=None) -> dict:
        runs: collections.Counter = collections.Counter()
        for fn in os.listdir(self.dir):
            if fn.startswith("ran."):
                with open(os.path.join(self.dir, fn), "rb") as f:
                    for line in f:
                        runs[line.strip().decode()] += 1
        by_outcome = collections.Counter()
        lost = duplicated = cancelled_ran = undecided = cancel_wrong = cancel_unknown = 0
        unsettled = outcome_wrong = 0
        for payload, rid in sent.items():
            oc = outcomes.get(rid)
            n = runs.get(payload, 0)
            by_outcome[oc or "none"] += 1
            if n > 1:
                duplicated += 1
            if oc == "queued":
                unsettled += 1        # queued, its local outcome never recorded
            if oc == "ran" and n != 1:
                outcome_wrong += 1    # recorded ran: it ran, once
            if oc in ("failed", "interrupted", "unknown"):
                outcome_wrong += 1    # the workers' callback neither raises nor dies
            if oc is None or oc == "delivering":
                undecided += 1
                lost += 1
            elif oc == "queued" and n == 0:
                if rid in cancels and cancels[rid] != "1":
                    # the bridge was killed between cancelling it locally and
                    # recording that (README: the one window cancel has)
                    cancel_unknown += 1
                else:
                    lost += 1
            elif oc == "ran" and n == 0:
                lost += 1
            elif oc == "cancelled" and n:
                cancelled_ran += 1
            if cancels.get(rid) == "1" and (oc != "cancelled" or n):
                cancel_wrong += 1
        bad = bad or {}
        # a malformed entry: refused, never run (its run would be a phantom too)
        bad_not_refused = sum(1 for rid in bad.values() if outcomes.get(rid) != "refused")
        bad_ran = sum(1 for tag in bad if runs.get(tag))
        phantom = sum(1 for p in runs if p not in sent)
        return {
            # queued: delivered to a task (its outcome queued, or ran since)
            "sent": len(sent), "queued": by_outcome["queued"] + by_outcome["ran"],
            "ran": sum(runs.values()), "recorded_ran": by_outcome["ran"],
            "unsettled": unsettled, "outcome_wrong": outcome_wrong,
            "cancelled": by_outcome["cancelled"], "dead_letter": by_outcome["dead_letter"],
            "refused": by_outcome["refused"], "lost": lost, "duplicated": duplicated,
            "undecided": undecided, "cancelled_ran": cancelled_ran,
            "cancel_wrong": cancel_wrong, "cancel_unknown": cancel_unknown, "phantom": phantom,
            "malformed": len(bad), "malformed_not_refused": bad_not_refused,
            "malformed_ran": bad_ran, "killed": self.killed,
            "killpoint_deaths": dict(self.killpoint_deaths), "bridge_starts": self.bridge_starts,
            "seconds": round(seconds, 2), "rate": round(len(sent) / seconds, 1) if seconds else 0,
        }

    def cleanup(self) -> None:
        for p in [*self.producers, *self.workers, *self.bridges.values()]:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        for dom in self.doms.values():
            try:
                dom.close()
            finally:
                dom.unlink()
        try:
            keys = list(self.r.scan_iter(match=f"stw:{self.cluster}:*", count=1000))
            for i in range(0, len(keys), 500):
                self.r.delete(*keys[i:i + 500])
            self.r.close()
        except Exception:
            pass
        if self.server is not None:
            self.server.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv=None, prog: str = "shm-taskwork stress", command: str = "stress") -> int:
    a = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    if a.role == "worker":
        return role_worker(a)
    if a.role == "producer":
        return role_producer(a)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    run = Run(a)
    try:
        s = run.run()
    finally:
        run.cleanup()
    ok = not (s["lost"] or s["duplicated"] or s["phantom"] or s["cancelled_ran"]
              or s["cancel_wrong"] or s["malformed_not_refused"] or s["malformed_ran"]
              or s["unsettled"] or s["outcome_wrong"])
    s["ok"] = ok
    if a.json:
        print(json.dumps(s))
    else:
        print(f"bridge stress: {s['sent']} sent, {s['queued']} queued, {s['ran']} ran, "
              f"{s['cancelled']} cancelled; lost {s['lost']}, duplicated {s['duplicated']}, "
              f"phantom {s['phantom']}; malformed {s['malformed']} "
              f"(not refused {s['malformed_not_refused']}, ran {s['malformed_ran']}); "
              f"{s['killed']} bridge kills in {s['seconds']} s: "
              f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
