"""Settings (pydantic-settings, env prefix ``ARCFACE_``, ``.env`` supported) and logging, shared by both
sides. Each process builds one settings object: :class:`ProducerSettings` or the worker's subclass."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
from platformdirs import user_data_dir
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from structlog.typing import EventDict

from producer.contract.errors import ConfigError
from producer.contract.keys import DEFAULT_QUEUE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class CommonSettings(BaseSettings):
    """What producers and workers must agree on: where Redis is, the queue, TTLs and limits."""

    # env_ignore_empty: ARCFACE_X= (empty, as compose passes an unset ${ARCFACE_X:-}) means unset, i.e. the default.
    model_config = SettingsConfigDict(
        env_prefix="ARCFACE_", env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://[user:password@]host:port/db, rediss:// (TLS) or unix:///path.sock; "
        "unset = the embedded Redis",
    )
    embedded_redis: bool = Field(
        default=True, description="false: never start or use the embedded Redis (ARCFACE_REDIS_URL required)"
    )
    redis_max_connections: int = Field(
        default=512, ge=1, description="connections one client process may open (threads wait for a free one)"
    )
    redis_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle to verify a rediss:// server (default: the system's)"
    )
    data_dir: Path = Field(
        default=Path(user_data_dir("arcface-service")),
        description="where the embedded Redis keeps its data (unix socket, AOF)",
        json_schema_extra={"doc_default": "the user data directory (platformdirs, arcface-service)"},
    )
    queue: str = Field(default=DEFAULT_QUEUE, min_length=1, description="rq queue name")
    result_ttl: int = Field(
        default=3600,
        ge=-1,
        description="seconds a result is kept under its job id (-1 forever; 0 not kept: waiting on such a job "
        "is refused with ResultNotKept)",
    )
    failure_ttl: int = Field(
        default=86400, ge=-1, description="seconds a failed job and its error are kept (-1 forever, 0 not kept)"
    )
    job_timeout: int = Field(
        default=180,
        ge=1,
        description="seconds written into each rq job (shown by rq info; plain rq workers enforce it); the "
        "batching worker bounds each image's own work instead (ARCFACE_DECODE_TIMEOUT_S)",
    )
    retries: int = Field(default=3, ge=0, description="times a job is retried after its worker died")
    max_inline_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1, description="largest image in bytes, inline or read from a file"
    )
    shared_root: Path | None = Field(
        default=None, description="directory path images are relative to; unset = path images refused"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="json, console, or auto (JSON when not a TTY)"
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value()
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError("must be a redis://host:port/db, rediss://host:port/db or unix:///path.sock URL")
        from redis.connection import parse_url

        try:
            parse_url(url)  # type: ignore[no-untyped-call]  # unannotated in redis-py
        except ValueError as exc:
            raise ValueError(f"not a valid Redis URL ({redact(str(exc))})") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"accepted values: {', '.join(LOG_LEVELS)}")

    @model_validator(mode="after")
    def _embedded_allowed(self) -> "CommonSettings":
        if self.redis_url is None and not self.embedded_redis:
            raise ValueError("ARCFACE_REDIS_URL is required when ARCFACE_EMBEDDED_REDIS=false")
        return self

    def redis_url_value(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None


class ProducerSettings(CommonSettings):
    """The producer process's settings."""

    wait_timeout: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="default seconds to wait for a result"
    )


S = TypeVar("S", bound=BaseSettings)
_SECRET_FIELDS = {"redis_url"}


def _from_dotenv(variable: str) -> bool:
    return not any(k.upper() == variable for k in os.environ)


def describe_settings_error(exc: ValidationError, prefix: str = "ARCFACE_") -> ConfigError:
    """One line naming the first invalid ``ARCFACE_*`` variable, its value and what is accepted."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more invalid setting{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if not loc:  # a whole-model rule: the message names its variables
        variable = msg.split(" ", 1)[0] if msg.startswith(prefix) else f"{prefix}*"
        return ConfigError(variable, f"{msg}{more}")
    field = loc[0]
    variable = f"{prefix}{field.upper()}"
    value = first.get("input")
    shown = redact(value) if field in _SECRET_FIELDS and isinstance(value, str) else value
    where = " (set in .env)" if _from_dotenv(variable) else ""
    text = msg[0].lower() + msg[1:] if msg else "invalid"
    return ConfigError(variable, f"{variable}={shown!r}{where}: {text}{more}")


def load_settings(cls: type[S]) -> S:
    """Build ``cls()`` from the environment and ``.env``; an invalid value raises :class:`ConfigError` whose
    one-line message names the ``ARCFACE_*`` variable and the accepted values (never pydantic's field name)."""
    try:
        return cls()
    except ValidationError as exc:
        raise describe_settings_error(exc) from None
    except SettingsError as exc:
        text = str(exc).splitlines()[0]
        found = re.search(r'field "(\w+)"', text)
        variable = f"ARCFACE_{found[1].upper()}" if found else "ARCFACE_*"
        raise ConfigError(variable, f"{variable}: {text}") from None


# Any scheme, any case (``redis://``, ``REDIS://``, ``redis+tls://``, ``http://``): the URLs a person mistypes are
# the ones most likely to be printed back in an error. The user info ends at the last ``@`` before the host, as
# URL parsers read it, so a password holding ``@`` is hidden whole.
_URL_SECRET = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^:/?#\s]*):(?P<password>[^/?#\s]+)@(?=[^@/?#\s]*(?:[/?#\s]|$))"
)
_QUERY_SECRET = re.compile(r"(?P<key>[?&]password=)[^&#\s]*", re.IGNORECASE)  # unix:///s.sock?password=...


def redact(text: str) -> str:
    """Hide the password of every URL inside ``text``, whatever its scheme (``user:***@``), and a ``password=``
    query parameter (``unix:///run/redis.sock?password=***``)."""
    text = _URL_SECRET.sub(lambda m: f"{m['scheme']}://{m['user']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)


def _redact_processor(_logger: Any, _name: str, event: EventDict) -> EventDict:
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


# Keys shown first, in this order, after the event name: what a batch did, then how long it took.
_FIRST_KEYS = ("jobs", "images")
_LAST_KEYS = ("level", "logger", "timestamp")
_HANDLER_TAG = "_arcface_handler"


def _is_timing(key: str) -> bool:
    return key.endswith(("_ms", "_s")) or key in ("timing", "timings")


def _order_keys(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """A fixed, readable key order: event, then jobs*/images* keys, then timings (``*_ms``, ``*_s``), then the
    rest in the order they were logged, and level/logger/timestamp last."""
    keys = [k for k in event if k != "event" and k not in _LAST_KEYS]
    first = [k for p in _FIRST_KEYS for k in keys if k == p or k.startswith(p + "_")]
    timings = [k for k in keys if k not in first and _is_timing(k)]
    rest = [k for k in keys if k not in first and k not in timings]
    ordered = {"event": event["event"]} if "event" in event else {}
    for k in (*first, *timings, *rest, *(k for k in _LAST_KEYS if k in event)):
        ordered[k] = event[k]
    return ordered


def json_logs(settings: CommonSettings, stream: Any = None) -> bool:
    """Whether logs are JSON lines: ``log_format=json``, or ``auto`` and ``stream`` (stderr) is not a TTY."""
    stream = stream or sys.stderr
    return settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())


def configure_logging(settings: CommonSettings, stream: Any = None) -> None:
    """structlog: JSON lines when not a TTY (or ``log_format=json``), a readable console otherwise.

    Python's own ``logging`` (rq's loggers, TensorFlow's Python logger) and ``warnings`` are routed through
    the same renderer, one line per record, so a JSON log holds nothing but JSON lines. Every event passes
    through :func:`redact`, so a Redis password never reaches a log line.
    """
    stream = stream or sys.stderr
    level = logging.getLevelName(settings.log_level.upper())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(old)
    root.addHandler(_handler(settings, stream))
    # This project's loggers at the configured level; other libraries' chatter (h5py, matplotlib, redis) at INFO+.
    root.setLevel(max(level, logging.INFO))
    for name in ("arcface", "producer", "worker"):
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _handler(settings: CommonSettings, stream: Any) -> logging.Handler:
    """The root logger's handler: every record through :func:`redact`, :func:`_order_keys` and the renderer."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs(settings, stream)
        else structlog.dev.ConsoleRenderer(
            colors=False, sort_keys=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_processor,
            _order_keys,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_TAG, True)
    return handler
