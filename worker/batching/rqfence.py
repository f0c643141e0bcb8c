"""The fence around rq: every rq internal the batching worker relies on lives here, and nowhere else.

rq runs one job at a time and has no hooks for taking, registering or completing many jobs at once, so the worker
writes rq's data structures itself, as rq 2.x lays them out (pinned by tests/test_rqfence.py against rq):

- job hash ``rq:job:<id>`` fields ``status``, ``started_at``, ``ended_at``, ``last_heartbeat``, ``worker_name``,
  ``meta`` (serializer JSON), ``retries_left``; timestamps in rq's ``utcformat``;
- the started registry ``rq:wip:<queue>``: members ``<job id>:<execution id>``; the worker scores its own ``+inf``
  (rq's "never expires", see below);
- finished / failed registries ``rq:finished:<queue>`` / ``rq:failed:<queue>`` scored by expiry time;
- the result stream ``rq:results:<id>`` (``XADD MAXLEN ~ 10``): fields as rq's ``Result.serialize``;
- the queue's intermediate list ``rq:queue:<queue>:intermediate`` (rq's crash-safe pop);
- scheduled retries in ``rq:scheduled:<queue>``;
- the worker registry ``rq:workers`` (``REDIS_WORKER_KEYS``) and rq's cleanup of it, re-exported for maintenance.

Registration, completion and recovery are Lua scripts, so each job's outcome is applied atomically and at most
once: the job's hash names the started member it runs under (:data:`EXECUTION_FIELD`), and an outcome is written
only while the job is still started under the writer's member (not recovered by another worker, re-queued, failed
or deleted by rq's tools, nor flushed). A job therefore ends in exactly one registry with one outcome, even when a
stalled worker, a recovering worker and rq's own tools race.

rq's ``StartedJobRegistry.cleanup`` (run by every ``count`` / ``get_job_ids``: ``rq info``, dashboards) re-queues or
fails every entry whose score is in the past, at once and not atomically with completion. After a Redis stall
longer than the execution TTL every live job's entry would look expired to it, so the worker scores its started
entries ``+inf`` and keeps their liveness in a set of its own, ``arcface:alive:<queue>`` (member -> expiry,
refreshed by the heartbeat), which only the worker's recovery reads, with its two-sightings rule.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from rq.job import JOB_ID_PATTERN, Job
from rq.results import Result
from rq.utils import utcformat
from rq.worker_registration import REDIS_WORKER_KEYS as REDIS_WORKER_KEYS
from rq.worker_registration import clean_worker_registry as clean_worker_registry

from producer.contract.codes import JobFailure
from producer.contract.keys import ERROR_ENTRY_FIELD, ERROR_META_KEY
from producer.contract.rqjob import JSONSerializer, SafeJob

JOB_PREFIX = Job.redis_job_namespace_prefix  # "rq:job:"


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def results_key(job_id: str) -> str:
    return f"rq:results:{job_id}"


class _QueueKey:
    """One Redis key of a queue, from its template (``{}``: the queue's name)."""

    def __init__(self, template: str) -> None:
        self.template = template

    def __get__(self, keys: QueueKeys, owner: type | None = None) -> str:
        return self.template.format(keys.name)


@dataclass(frozen=True)
class QueueKeys:
    """The Redis keys rq uses for one queue."""

    name: str
    queue = _QueueKey("rq:queue:{}")
    intermediate = _QueueKey("rq:queue:{}:intermediate")
    started = _QueueKey("rq:wip:{}")
    finished = _QueueKey("rq:finished:{}")
    failed = _QueueKey("rq:failed:{}")
    scheduled = _QueueKey("rq:scheduled:{}")
    alive = _QueueKey("arcface:alive:{}")  # started member -> liveness expiry (the worker's, not rq's)


def valid_job_id(job_id: str) -> bool:
    """rq refuses ids outside ``[A-Za-z0-9_-]+`` (``.`` and ``:`` break its composite registry keys)."""
    return bool(JOB_ID_PATTERN.fullmatch(job_id)) and len(job_id) <= 512


def timestamp(dt: datetime) -> str:
    """rq's job-hash timestamp format, e.g. ``2026-11-29T16:00:00.123456Z`` (UTC)."""
    return utcformat(dt.astimezone(timezone.utc))


def parse_timestamp(value: bytes | str | None) -> datetime | None:
    """A job-hash timestamp in rq's format or any ISO 8601 form; None when absent or unreadable."""
    if not value:
        return None
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (UnicodeDecodeError, ValueError):
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def inflate(data: bytes, limit: int) -> bytes:
    """rq stores ``data`` zlib-compressed (or plain); inflate at most ``limit`` bytes, never a bomb."""
    if not data or data[:1] in (b"[", b"{"):
        return data
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        return data  # not compressed: rq does the same fallback
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"job data inflates to more than {limit} bytes (ARCFACE_MAX_JOB_BYTES)")
    return out


def restore(job_id: str, fields: dict[bytes, bytes], connection: redis.Redis, max_data_bytes: int) -> SafeJob:
    """Build rq's job object from a raw hash without another round trip, with ``data`` inflated under a
    bound first (rq's own restore inflates without one). Raises whatever rq raises on a field it cannot read."""
    raw = dict(fields)
    raw[b"data"] = inflate(raw.get(b"data", b""), max_data_bytes)
    if len(raw[b"data"]) > max_data_bytes:
        raise ValueError(f"job data is over {max_data_bytes} bytes (ARCFACE_MAX_JOB_BYTES)")
    job = SafeJob(job_id, connection=connection, serializer=JSONSerializer)
    try:
        job.restore(raw)
    except Exception as exc:
        raise ValueError(f"{_blame(job_id, raw, connection)}{type(exc).__name__}: {str(exc)[:200]}") from None
    return job


_BLAME_MAX_FIELDS = 64


def _blame(job_id: str, raw: dict[bytes, bytes], connection: redis.Redis) -> str:
    """Name the hash field rq chokes on (only computed for a hash that failed), e.g. ``field 'timeout': ``.
    Each try restores the whole hash, so a hash of thousands of fields is not searched (rq writes about 30):
    quadratic work there would stall the worker for minutes (5,000 fields: 5 s)."""
    if len(raw) > _BLAME_MAX_FIELDS:
        return ""
    for name in raw:
        if name == b"data":
            continue
        trial = {k: v for k, v in raw.items() if k != name}
        try:
            SafeJob(job_id, connection=connection, serializer=JSONSerializer).restore(trial)
        except Exception:
            continue
        return f"field {name.decode('latin-1')[:40]!r} = {raw[name][:40]!r}: "
    return ""


def decode_data(job: SafeJob) -> tuple[str, Any, Any, Any]:
    """``(func_name, instance, args, kwargs)`` of a job's JSON data, read strictly (no pickle, ever)."""
    value = json.loads(job.data)
    if not isinstance(value, list) or len(value) != 4 or not isinstance(value[0], str):
        raise ValueError("job data must be the JSON array [func_name, null, [request], {}]")
    return value[0], value[1], value[2], value[3]


def success_entry(
    return_value: dict[str, Any], worker_name: str, execution_id: str, started: datetime, ended: datetime
) -> dict[str, Any]:
    """The result-stream entry rq writes for a finished job (``Result.Type.SUCCESSFUL``)."""
    encoded = base64.b64encode(JSONSerializer.dumps(return_value)).decode("ascii")
    entry = {"type": Result.Type.SUCCESSFUL.value, "worker_name": worker_name, "return_value": encoded}
    return {**entry, **_execution_fields(execution_id, started, ended)}


def failure_entry(
    failure: JobFailure, worker_name: str, execution_id: str | None, started: datetime | None, ended: datetime
) -> dict[str, Any]:
    """The result-stream entry rq writes for a failed job (``Result.Type.FAILED``), plus the typed error as data
    (:data:`~producer.contract.keys.ERROR_ENTRY_FIELD`): a reader of the stream gets the code without the job's meta."""
    entry = {
        "type": Result.Type.FAILED.value,
        "worker_name": worker_name,
        "exc_string": base64.b64encode(zlib.compress(exc_string(failure).encode())).decode("ascii"),
        ERROR_ENTRY_FIELD: failure.to_error().model_dump_json(),
    }
    return {**entry, **_execution_fields(execution_id, started, ended)}


def _execution_fields(execution_id: str | None, started: datetime | None, ended: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if execution_id:
        out["execution_id"] = execution_id
    if started is not None:
        out["execution_started_at"] = started.timestamp()
    out["execution_ended_at"] = ended.timestamp()
    return out


def exc_string(failure: JobFailure) -> str:
    """How a failure reads in rq's result stream and ``rq info``; clients parse the code from job meta."""
    return f"producer.jobs.JobFailure: [{failure.code.value}] {failure.message}"


def failure_meta(meta: dict[str, Any] | None, failure: JobFailure) -> bytes:
    """The job's meta with the typed error under ``error`` (JSON; other keys kept when they were JSON)."""
    merged = dict(meta) if isinstance(meta, dict) and "unserialized" not in meta else {}
    merged[ERROR_META_KEY] = failure.to_error().model_dump(mode="json")
    return JSONSerializer.dumps(merged)


# --- Lua (worker/batching/*.lua: each script's KEYS, ARGV and replies are described at its top) ----------
# A job in one of these statuses was taken by some worker (or ended): taking drops a queue entry naming it, and the
# registration and outcome scripts refuse it (the same set, written once).
TAKEN_STATUSES = frozenset({"started", "finished", "failed", "stopped", "canceled"})
_TAKEN_LUA = "local TAKEN = {" + ", ".join(f"{s} = true" for s in sorted(TAKEN_STATUSES)) + "}\n"


def _lua(name: str) -> str:
    return Path(__file__).with_name(f"{name}.lua").read_text()


_OUTCOMES_LUA, _REGISTER_LUA = _TAKEN_LUA + _lua("outcomes"), _TAKEN_LUA + _lua("register")
_READ_LUA = _lua("read")
TOO_LARGE = b"__arcface_hash_too_large__"  # read.lua's marker of a hash over the bound
MAX_TTL_S = 2**31 - 1  # a larger result/failure TTL (68 years) is kept this long
EXECUTION_FIELD = "arcface_execution"  # the job hash field naming the started member it runs under (outcomes.lua)
STALLED_FIELD = "arcface_stalled"  # the worker hash field saying why the worker is stuck (arcface-worker-health)


@dataclass
class Outcome:
    """What happens to one job, applied atomically by :meth:`Fence.apply`."""

    guard: str  # "own" | "expired" | "popped" | "none"
    kind: str  # "finished" | "failed" | "requeue" | "schedule"
    job_id: str
    member: str = ""
    ttl: int = 0
    fields: dict[str, str] | None = None
    entry: dict[str, Any] | None = None
    extra: str = ""
    lrem_from: str = ""

    def argv(self) -> list[str]:
        return [
            self.guard,
            self.kind,
            self.job_id,
            self.member,
            str(min(int(self.ttl), MAX_TTL_S)),  # EXPIRE refuses more, after the script's first writes
            json.dumps(self.fields or {}, separators=(",", ":")),
            json.dumps(self.entry, separators=(",", ":")) if self.entry else "",
            self.extra,
            self.lrem_from,
        ]


def started_fields(
    stamp: str, worker_name: str, member: str, origin: str | None, enqueued_missing: bool
) -> dict[str, str]:
    """The job hash fields a registration writes: rq's ``started`` status, times and worker, and our execution
    member (recovery acts on the job only while it runs under this entry). ``origin``: the queue, for a producer
    that wrote none (the wire format's default); ``enqueued_missing``: stamp ``enqueued_at`` too."""
    fields = {"status": "started", "started_at": stamp, "last_heartbeat": stamp, "worker_name": worker_name}
    fields[EXECUTION_FIELD] = member
    if origin is not None:
        fields["origin"] = origin
    if enqueued_missing:
        fields["enqueued_at"] = stamp
    return fields


class Fence:
    """rq's bookkeeping for one queue, written in bulk."""

    def __init__(self, connection: redis.Redis, queue_name: str) -> None:
        self.connection = connection
        self.keys = QueueKeys(queue_name)
        self._outcomes = connection.register_script(_OUTCOMES_LUA)
        self._read = connection.register_script(_READ_LUA)
        self._register = connection.register_script(_REGISTER_LUA)

    def read_jobs(self, ids: list[str], max_bytes: int) -> list[dict[bytes, bytes]]:
        """Every job hash in one round trip, each bounded to ``max_bytes`` (see :data:`TOO_LARGE`)."""
        if not ids:
            return []
        rows = self._read(keys=[job_key(jid) for jid in ids], args=[max_bytes])
        return [dict(zip(row[::2], row[1::2], strict=True)) for row in rows]

    def apply(self, outcomes: list[Outcome], now: float, worker_key: str, worker_name: str) -> list[int]:
        """Apply outcomes in one script call; per outcome 0 (skipped), 1 (applied) or 2 (applied, has dependents)."""
        if not outcomes:
            return []
        argv: list[str] = [repr(now), worker_key, worker_name]
        for outcome in outcomes:
            argv.extend(outcome.argv())
        k = self.keys
        keys = [k.started, k.finished, k.failed, k.scheduled, k.alive]
        return [int(x) for x in self._outcomes(keys=keys, args=argv)]

    def register(self, pipe: Any, jobs: list[tuple[str, str, dict[str, str]]], expiry: float) -> None:
        """Queue on ``pipe`` the registration of popped jobs ``(id, started member, hash fields)``, alive until
        ``expiry``: the pipe's result for it is one flag a job, 1 where it is now started under that member, 0 where
        it is not ours: another worker re-queued the id from the intermediate list while this registration waited
        (see :data:`_REGISTER_LUA`)."""
        argv: list[str] = [repr(expiry)]
        for job_id, member, fields in jobs:
            argv += [job_id, member, json.dumps(fields, separators=(",", ":"))]
        self._register(keys=[self.keys.intermediate, self.keys.started, self.keys.alive], args=argv, client=pipe)

    def drop_popped(self, raw_ids: list[bytes]) -> None:
        """Take popped ids that will not run (stale entries, unreadable ids) out of the intermediate list."""
        with self.connection.pipeline(transaction=False) as pipe:
            for raw in raw_ids:
                pipe.lrem(self.keys.intermediate, 1, raw)  # type: ignore[arg-type]  # bytes go to Redis as they are
            pipe.execute()

    def drop_started(self, member: str) -> None:
        """Forget a started member whose job is gone or unreadable (its registry entry and its liveness)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.started, member)
            pipe.zrem(self.keys.alive, member)
            pipe.execute()

    def requeue_orphan(self, raw_id: bytes) -> None:
        """An id left in the intermediate list by a worker that died before registering it goes back to the
        queue (atomically: out of the list and onto the queue)."""
        with self.connection.pipeline() as pipe:
            pipe.lrem(self.keys.intermediate, 1, raw_id)  # type: ignore[arg-type]  # bytes go to Redis as they are
            pipe.rpush(self.keys.queue, raw_id)
            pipe.execute()

    def purge_expired(self, now: float) -> None:
        """rq's finished and failed registries without their expired entries (rq's own cleanup, for this queue)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.keys.finished, 0, now)
            pipe.zremrangebyscore(self.keys.failed, 0, now)
            pipe.execute()

    def take_due_scheduled(self, now: float, limit: int = 1000) -> list[str]:
        """Due ids of rq's scheduled registry, each removed by this call (a second caller gets none of them)."""
        due: list[bytes] = self.connection.zrangebyscore(self.keys.scheduled, "-inf", int(now), start=0, num=limit)  # type: ignore[assignment]
        if not due:
            return []
        with self.connection.pipeline() as pipe:
            for jid in due:
                pipe.zrem(self.keys.scheduled, jid)
            removed = pipe.execute()
        return [jid.decode("latin-1") for jid, r in zip(due, removed, strict=True) if r]

    def refresh_started(self, pipe: Any, members: dict[str, float]) -> None:
        """Queue on ``pipe`` new liveness expiries for started members that still have one (ZADD XX: a heartbeat
        never re-creates the entry of a job completed or recovered meanwhile)."""
        if members:
            pipe.zadd(self.keys.alive, members, xx=True)

    def expired_started(self, now: float) -> list[tuple[str, float]]:
        """Started members whose heartbeat ran out, with their expiries: from the liveness set, and entries that
        an earlier worker version scored by expiry in the started registry itself (never this version's ``+inf``)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self.keys.alive, "-inf", now, withscores=True)
            pipe.zrangebyscore(self.keys.started, "-inf", now, withscores=True)
            alive, legacy = pipe.execute()
        found: dict[str, float] = {}
        for m, score in [*legacy, *alive]:
            found[m.decode() if isinstance(m, bytes) else str(m)] = float(score)
        return list(found.items())


def mark_worker_dead(connection: redis.Redis, worker_key: str) -> None:
    """Let rq's ``register_birth`` re-register this worker: it refuses a worker key without a ``death`` field."""
    connection.hset(worker_key, "death", utcformat(datetime.now(timezone.utc)))


def split_member(member: str) -> str:
    """The job id of a started-registry member ``<job id>:<execution id>`` (rq's composite key)."""
    return member.rsplit(":", 1)[0] if ":" in member else member
