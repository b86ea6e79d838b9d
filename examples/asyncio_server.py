"""An asyncio web server whose workers a supervisor tells to reload.

Each worker is an ``aiohttp.web`` server that registers a task named "web" in
a domain and attaches it to its event loop. A supervisor - any other process
- queues ``app.web.reload`` on every live "web" task; the callback is an
``async def`` that reads the new configuration without blocking the loop
while requests keep being served. Works arrive through the loop: RESUME from
its reader on the task's eventfd, SIGNAL through ``loop.add_signal_handler``,
never in the middle of a request handler.

    python examples/asyncio_server.py serve app --port 8080 --config app.json &
    python examples/asyncio_server.py serve app --port 8081 --config app.json &
    curl -s localhost:8080/                      # {"config": {...}, "version": 0, ...}
    echo '{"greeting": "hi"}' > app.json
    python examples/asyncio_server.py reload app # both workers reload
    curl -s localhost:8080/                      # version 1, the new config

SIGTERM or Ctrl-C stops a worker: its task exits (the works still pending
run first) and the process ends with status 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from aiohttp import web

from shm_taskwork import TWA_RESUME, TWA_SIGNAL, Domain, Task, TaskExitedError, Work, callback

TASK_NAME = "web"


class Config:
    """What the workers serve and what a reload replaces."""

    def __init__(self, path: str | None):
        self.path = path
        self.values: dict[str, object] = {}
        self.version = 0


STATE: Config | None = None


def _read(path: str) -> dict[str, object]:
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the configuration is a JSON object")
    return value


@callback(name="app.web.reload")
async def reload(work: Work) -> None:
    """Re-read the configuration (the payload names the file, or empty: the
    worker's own). Runs on the worker's loop; a failure is logged and
    counted by the library, and the old configuration stays."""
    assert STATE is not None
    path = work.payload.decode() or STATE.path
    if not path:
        return
    loop = asyncio.get_running_loop()
    values = await loop.run_in_executor(None, _read, path)   # the loop keeps serving
    STATE.values, STATE.path = values, path
    STATE.version += 1
    print(f"pid {os.getpid()}: configuration v{STATE.version} from {path} "
          f"(queued by pid {work.sender_pid})", flush=True)


async def index(request: web.Request) -> web.Response:
    assert STATE is not None
    return web.json_response({"pid": os.getpid(), "version": STATE.version,
                              "config": STATE.values})


async def serve(domain: str, port: int, host: str, config: str | None) -> int:
    global STATE
    STATE = Config(config)
    if config and os.path.exists(config):
        STATE.values = _read(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    with Domain.open_or_create(domain) as dom, dom.register(TASK_NAME) as task:
        task.attach_loop(loop)
        app = web.Application()
        app.router.add_get("/", index)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"serving on http://{host}:{port}/ as task {task.id} of {dom.name}, "
              f"pid {os.getpid()}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            task.detach_loop()
        # leaving the `with` exits the task: the works still pending run
    print(f"pid {os.getpid()}: stopped", flush=True)
    return 0


def reload_all(domain: str, config: str | None, notify: int) -> int:
    """Queue a reload on every live "web" task; the number told."""
    told = 0
    with Domain.open(domain) as dom:
        for info in dom.tasks():
            if info.name != TASK_NAME or info.state != "running":
                continue
            task: Task = dom.task(info.id)
            try:
                task.add(reload, (config or "").encode(), notify)
            except TaskExitedError:
                continue   # it exited meanwhile
            told += 1
    print(f"told {told} worker{'s' if told != 1 else ''} to reload")
    return 0 if told else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="aiohttp workers told to reload by a supervisor")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run one worker")
    s.add_argument("domain")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--config", default=None, help="a JSON file, read at start and on reload")
    r = sub.add_parser("reload", help="tell every worker to reload")
    r.add_argument("domain")
    r.add_argument("--config", default=None, help="a JSON file (default: each worker's own)")
    r.add_argument("--signal", action="store_true",
                   help="TWA_SIGNAL instead of TWA_RESUME (the loop takes it either way)")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return asyncio.run(serve(args.domain, args.port, args.host, args.config))
    return reload_all(args.domain, args.config, TWA_SIGNAL if args.signal else TWA_RESUME)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
