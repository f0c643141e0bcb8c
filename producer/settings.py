"""Settings (pydantic-settings, env prefix ``ARCFACE_``, ``.env`` supported) and logging, shared by both
sides. Each process builds one settings object: :class:`ProducerSettings` or the worker's subclass."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, Literal

import structlog
from platformdirs import user_data_dir
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.jobs import DEFAULT_QUEUE


class CommonSettings(BaseSettings):
    """What producers and workers must agree on: where Redis is, the queue, TTLs and limits."""

    model_config = SettingsConfigDict(env_prefix="ARCFACE_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://[user:password@]host:port/db, rediss:// (TLS) or unix:///path.sock; unset = the embedded Redis",
    )
    redis_tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify a rediss:// server (default: the system's)")
    data_dir: Path = Field(default=Path(user_data_dir("arcface-service")), description="where the embedded Redis keeps its data")
    queue: str = Field(default=DEFAULT_QUEUE, description="rq queue name")
    result_ttl: int = Field(default=3600, description="seconds a result is kept under its job id")
    failure_ttl: int = Field(default=86400, description="seconds a failed job is kept")
    job_timeout: int = Field(default=180, description="seconds a job may run before it fails with job_timeout")
    retries: int = Field(default=3, ge=0, description="times a job is retried after its worker died")
    max_inline_bytes: int = Field(default=10 * 1024 * 1024, description="largest inline image")
    shared_root: Path | None = Field(default=None, description="directory path images are relative to; unset = path images refused")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    def redis_url_value(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None


class ProducerSettings(CommonSettings):
    """The producer process's settings."""

    wait_timeout: float = Field(default=60.0, description="default seconds to wait for a result")


_URL_SECRET = re.compile(r"(?P<scheme>rediss?|unix)://(?P<user>[^:@/\s]*):(?P<password>[^@\s]+)@")


def redact(text: str) -> str:
    """Hide the password in any Redis URL inside ``text``."""
    return _URL_SECRET.sub(lambda m: f"{m['scheme']}://{m['user']}:***@", text)


def _redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


def configure_logging(settings: CommonSettings, stream: Any = None) -> None:
    """structlog: JSON lines when not a TTY (or ``log_format=json``), a readable console otherwise.

    Every event passes through :func:`redact`, so a Redis password never reaches a log line.
    """
    stream = stream or sys.stderr
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(settings.log_level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
