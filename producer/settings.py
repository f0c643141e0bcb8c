"""Settings (pydantic-settings, env prefix ``ARCFACE_``, ``.env`` supported) and logging, shared by both
sides. Each process builds one settings object: :class:`ProducerSettings` or the worker's subclass."""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
from platformdirs import user_data_dir
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from structlog.typing import EventDict

from producer.contract.errors import ConfigError
from producer.contract.keys import DEFAULT_QUEUE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
PREFIX = "ARCFACE_"

# Bounds of the settings both sides read: a value outside them is a typo or a unit mistake, refused at start.
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""A queue name: rq keys a queue's lists and registries as ``rq:<kind>:<name>`` and ``rq:queue:<name>:intermediate``
(the service adds ``arcface:model:<name>``, ``arcface:alive:<name>``), so a name holding ``:`` could address another
queue's keys (``victim:intermediate`` is queue ``victim``'s in-flight list). Letters, digits, ``.``, ``_``, ``-``."""
MAX_QUEUE_NAME = 128
MAX_TTL_S = 366 * 24 * 3600  # a year (and a day); -1 keeps forever
MAX_JOB_TIMEOUT_S = 24 * 3600
MAX_RETRIES = 100
MAX_REDIS_CONNECTIONS = 10_000  # Redis's own default maxclients
MAX_INLINE_BYTES = 256 * 1024 * 1024  # base64 makes it a third larger; Redis refuses values over 512 MB
MAX_WAIT_S = 24 * 3600

NOT_SETTINGS = frozenset(
    {
        "ARCFACE_SHARED_DIR",  # tests: where the shared test data lives
        "ARCFACE_FAULTS_SCALE",  # tests/faults: how many jobs the kill storm sends
        "ARCFACE_DEMO_FACES",  # ./dev demo: the face crops it sends
        "ARCFACE_TEST_TIME_SCALE",  # tests: the factor every test wait is multiplied by
        "ARCFACE_WIRE_GOLDEN_WRITE",  # tests: record tests/data/wire-golden.json again
    }
)
"""``ARCFACE_*`` variables that are not settings: read by the tests, the demo and the tools, never by the service.
The settings check (:func:`unknown_variables`) accepts them; every other ``ARCFACE_*`` name must be a setting."""

WORKER_VARIABLES = frozenset(
    f"{PREFIX}{name}"
    for name in (
        "MODEL_PATH MODEL_URL MODEL_SHA256 CACHE_DIR MODEL_NAME PRECISION INPUT_SCALE INPUT_OFFSET INPUT_MEAN "
        "CHANNEL_ORDER DETECT DETECTOR_PATH DETECTOR_URL DETECTOR_SHA256 DETECT_BATCH_SIZES DETECT_MIN_SCORE "
        "DETECT_MIN_FACE FACE_SELECT MAX_FACES CROP CROP_MARGIN THRESHOLD GALLERY_DTYPE GALLERY_NAMES GALLERY_DEVICE "
        "ALLOWED_BATCH_SIZES INTRA_OP_THREADS INTER_OP_THREADS MAX_IMAGE_PIXELS MIN_IMAGE_SIDE JPEG_DECODER "
        "MAX_BATCH_SIZE BATCH_TIMEOUT_MS PREPROCESS_THREADS PREPROCESS_PROCESSES PREPROCESS_STALL_S "
        "MAX_IMAGES_PER_JOB DECODE_TIMEOUT_S MAX_JOB_BYTES HEARTBEAT_INTERVAL_S EXECUTION_TTL_S "
        "MAINTENANCE_INTERVAL_S WORKER_TTL_S METRICS_PORT"
    ).split()
)
"""The worker's own settings' variables, named here so that a producer (which never imports the worker) accepts
them in an environment or ``.env`` shared with workers; tests/test_settings.py checks it equals
``WorkerSettings``'s fields."""


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
        default=512,
        ge=1,
        le=MAX_REDIS_CONNECTIONS,
        description="connections one client process may open (threads wait for a free one)",
    )
    redis_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle to verify a rediss:// server (default: the system's)"
    )
    data_dir: Path = Field(
        default=Path(user_data_dir("arcface-service")),
        description="where the embedded Redis keeps its data (unix socket, AOF)",
        json_schema_extra={"doc_default": "the user data directory (platformdirs, arcface-service)"},
    )
    queue: str = Field(
        default=DEFAULT_QUEUE,
        description=f"rq queue name: 1 to {MAX_QUEUE_NAME} letters, digits, '.', '_' or '-' (no ':', which could "
        "address another queue's rq keys)",
    )
    result_ttl: int = Field(
        default=3600,
        ge=-1,
        le=MAX_TTL_S,
        description="seconds a result is kept under its job id (-1 forever; 0 not kept: waiting on such a job "
        "is refused with ResultNotKept)",
    )
    failure_ttl: int = Field(
        default=86400,
        ge=-1,
        le=MAX_TTL_S,
        description="seconds a failed job and its error are kept (-1 forever, 0 not kept)",
    )
    job_timeout: int = Field(
        default=180,
        ge=1,
        le=MAX_JOB_TIMEOUT_S,
        description="seconds written into each rq job (shown by rq info; plain rq workers enforce it); the "
        "batching worker bounds each image's own work instead (ARCFACE_DECODE_TIMEOUT_S)",
    )
    retries: int = Field(default=3, ge=0, le=MAX_RETRIES, description="times a job is retried after its worker died")
    max_inline_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1,
        le=MAX_INLINE_BYTES,
        description="largest image in bytes, inline or read from a file",
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

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        if ":" in value:
            raise ValueError(
                "a queue name must not contain ':': rq keys its lists as rq:queue:<name>[:intermediate] and "
                "rq:<registry>:<name>, so such a name can take another queue's jobs; use letters, digits, '.', '_' "
                "or '-'"
            )
        if not 1 <= len(value) <= MAX_QUEUE_NAME or not QUEUE_NAME.fullmatch(value):
            raise ValueError(
                f"a queue name is 1 to {MAX_QUEUE_NAME} letters, digits, '.', '_' or '-' (no spaces, control "
                "characters or other punctuation)"
            )
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
        default=60.0, gt=0, le=MAX_WAIT_S, allow_inf_nan=False, description="default seconds to wait for a result"
    )


S = TypeVar("S", bound=BaseSettings)
_SECRET_FIELDS = {"redis_url"}


class UnknownSettingWarning(UserWarning):
    """An ``ARCFACE_*`` variable that is no setting (a typo?), found by a library caller's :func:`load_settings`."""


def _from_dotenv(variable: str) -> bool:
    return not any(k.upper() == variable for k in os.environ)


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def accepted_range(field: FieldInfo) -> str | None:
    """A field's numeric bounds in words (``> 0 and <= 600``), from its ``gt``/``ge``/``lt``/``le``; None without."""
    parts = []
    for constraint in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(constraint, attr, None)
            if bound is not None:
                parts.append(f"{sign} {_number(bound)}")
    if not parts:
        return None
    finite = "a finite number " if field.annotation is float or field.annotation == float | None else ""
    return finite + " and ".join(parts)


def describe_settings_error(
    exc: ValidationError, prefix: str = PREFIX, cls: type[BaseSettings] | None = None
) -> ConfigError:
    """One line naming the first invalid ``ARCFACE_*`` variable, its value and what is accepted: a field's
    numeric bounds (from ``cls``) and its default are named, so the line says what to set instead."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more invalid setting{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if not loc:  # a whole-model rule: the message names its variables
        variable = msg.split("=", 1)[0].split(" ", 1)[0] if msg.startswith(prefix) else f"{prefix}*"
        return ConfigError(variable, f"{msg}{more}")
    field = loc[0]
    variable = f"{prefix}{field.upper()}"
    value = first.get("input")
    shown = redact(value) if field in _SECRET_FIELDS and isinstance(value, str) else value
    where = " (set in .env)" if _from_dotenv(variable) else ""
    text = msg[0].lower() + msg[1:] if msg else "invalid"
    info = cls.model_fields.get(field) if cls is not None else None
    bounds = accepted_range(info) if info is not None else None
    if info is not None and bounds is not None:
        default = info.get_default(call_default_factory=True)
        unset = "unset it" if default is None else f"unset it for the default {_number(default)}"
        text += f"; accepted: {bounds}: set a value in that range or {unset}"
    return ConfigError(variable, f"{variable}={shown!r}{where}: {text}{more}")


def _dotenv_names(cls: type[BaseSettings]) -> list[str]:
    """The variable names in the ``.env`` file(s) ``cls`` reads (from the working directory), as written."""
    from dotenv import dotenv_values

    files = cls.model_config.get("env_file")
    names: list[str] = []
    for file in [files] if isinstance(files, (str, Path)) else list(files or ()):
        path = Path(file)
        if path.is_file():
            encoding = cls.model_config.get("env_file_encoding") or "utf-8"
            names += [k for k, v in dotenv_values(path, encoding=encoding).items() if v]
    return names


def known_variables(cls: type[BaseSettings]) -> frozenset[str]:
    """Every ``ARCFACE_*`` name a process accepts: ``cls``'s settings, the producer's and the worker's (one
    environment or ``.env`` may serve both) and :data:`NOT_SETTINGS`."""
    fields = set(cls.model_fields) | set(ProducerSettings.model_fields)
    return frozenset(f"{PREFIX}{name.upper()}" for name in fields) | WORKER_VARIABLES | NOT_SETTINGS


def unknown_variables(cls: type[BaseSettings]) -> list[str]:
    """One sentence per ``ARCFACE_*`` variable (environment, then ``.env``) that is no setting, each with the
    nearest setting's name when one is close (a typo such as ``ARCFACE_TRESHOLD``). Empty values are left alone:
    an empty setting means unset anyway (as compose passes ``${VAR:-}``)."""
    known = known_variables(cls)
    settings = sorted(known - NOT_SETTINGS)
    found: dict[str, str] = {}
    for source, names in (("", [k for k, v in os.environ.items() if v]), (" (set in .env)", _dotenv_names(cls))):
        for name in names:
            upper = name.upper()
            if upper.startswith(PREFIX) and upper not in known and name not in found:
                found[name] = source
    out = []
    for name, source in found.items():
        close = difflib.get_close_matches(
            name.upper().removeprefix(PREFIX), [k.removeprefix(PREFIX) for k in settings], n=1, cutoff=0.6
        )
        hint = f"did you mean {PREFIX}{close[0]}?" if close else "no setting has a similar name;"
        out.append(
            f"{name}{source} is not a setting: {hint} rename or remove it (docs/configuration.md lists every setting)"
        )
    return out


def load_settings(cls: type[S], unknown: Literal["refuse", "warn"] = "refuse") -> S:
    """Build ``cls()`` from the environment and ``.env``; an invalid value raises :class:`ConfigError` whose
    one-line message names the ``ARCFACE_*`` variable and the accepted values (never pydantic's field name).

    An ``ARCFACE_*`` variable that is no setting (:func:`unknown_variables`; :data:`NOT_SETTINGS` are allowed) is
    refused the same way (``unknown="refuse"``: the command-line programs), or reported as an
    :class:`UnknownSettingWarning` (``unknown="warn"``: a library caller, which should not fail its host
    service over a variable it does not read)."""
    problems = unknown_variables(cls)
    if problems and unknown == "refuse":
        variable = problems[0].split(" ", 1)[0]
        more = f" (and {len(problems) - 1} more unknown ARCFACE_* variables)" if len(problems) > 1 else ""
        raise ConfigError(variable, problems[0] + more)
    for problem in problems:
        warnings.warn(problem, UnknownSettingWarning, stacklevel=2)
    try:
        return cls()
    except ValidationError as exc:
        raise describe_settings_error(exc, cls=cls) from None
    except SettingsError as exc:
        text = str(exc).splitlines()[0]
        found = re.search(r'field "(\w+)"', text)
        variable = f"{PREFIX}{found[1].upper()}" if found else f"{PREFIX}*"
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
