"""A private ``redis-server`` for tests, the bridge stress and the bench: a
Unix socket in a temporary directory (no TCP port), AOF on, so a Redis
restart keeps what it had acknowledged. Never a fake server."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time


def find() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None)


class RedisServer:
    """``with RedisServer() as rs: rs.url``; ``rs.restart()`` stops it and
    starts it again on the same directory (its AOF)."""

    def __init__(self, directory: str | None = None, password: str | None = None):
        self.exe = find()
        if self.exe is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install "
                                    "redis-server)")
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="stw-redis-")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.sock = os.path.join(self.dir, "redis.sock")
        self.password = password
        self.url = (f"unix://:{password}@{self.sock}?db=0" if password
                    else f"unix://{self.sock}?db=0")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.exe, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
             "--dir", self.dir, "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--daemonize", "no", "--logfile", os.path.join(self.dir, "log"),
             *(["--requirepass", self.password] if self.password else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis(unix_socket_path=self.sock, password=self.password).ping()
                return self
            except (redis.ConnectionError, FileNotFoundError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (see {self.dir}/log)")
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()      # SIGTERM: redis flushes its AOF and exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
