"""The Redis side of enrolled identities: the Lua scripts that write one change (enroll, forget) together with
its event and sequence number, atomically; what their replies mean; and the reads a worker's store makes (a
gallery's binding, a whole gallery at start-up, a subject's float32 embeddings). Layout and events are
described in :mod:`producer.contract.gallery`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import structlog
from numpy.typing import DTypeLike

from producer.contract.gallery_results import GalleryErrorCode, GalleryFailure
from producer.contract.keys import (
    EVENTS_KEY,
    EVENTS_SEQ_KEY,
    GALLERIES_KEY,
    embeddings_key,
    enrollments_key,
    gallery_key,
    subject_key,
    subjects_key,
)
from worker.gallery.index import GalleryIndex

log = structlog.get_logger("arcface.gallery")

# KEYS: galleries, gallery, subjects, subject, embeddings, enrollments, events, events seq.
# ARGV: gallery, subject, enrollment id, model, dim, vector bytes, record JSON, events maxlen, created_at.
ENROLL_LUA = """
local info = redis.call('HMGET', KEYS[2], 'model', 'dim')
if info[1] then
  if info[1] ~= ARGV[4] or info[2] ~= ARGV[5] then return {'mismatch', info[1], info[2]} end
else
  redis.call('HSET', KEYS[2], 'model', ARGV[4], 'dim', ARGV[5], 'created_at', ARGV[9])
  redis.call('SADD', KEYS[1], ARGV[1])
end
local existing = redis.call('HGET', KEYS[6], ARGV[3])
if existing then
  if redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then
    -- the very record this call writes: a retry after its reply was lost, answered as the first try was
    if existing == ARGV[7] then return {'created', redis.call('SCARD', KEYS[4]), 0} end
    return {'exists', redis.call('SCARD', KEYS[4])}
  end
  return {'conflict', cjson.decode(existing)['subject']}
end
redis.call('HSET', KEYS[5], ARGV[3], ARGV[6])
redis.call('HSET', KEYS[6], ARGV[3], ARGV[7])
redis.call('SADD', KEYS[4], ARGV[3])
local count = redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
local seq = redis.call('INCR', KEYS[8])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'seq', seq, 'op', 'enroll', 'gallery', ARGV[1],
           'subject', ARGV[2], 'eid', ARGV[3], 'model', ARGV[4], 'dim', ARGV[5], 'vec', ARGV[6])
return {'created', count, seq}
"""

# KEYS: gallery, subjects, subject, embeddings, enrollments, events, events seq.
# ARGV: gallery, subject, enrollment id ('' for all of the subject's), events maxlen.
FORGET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_gallery'} end
local ids
if ARGV[3] ~= '' then
  if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then ids = {ARGV[3]} else ids = {} end
else
  ids = redis.call('SMEMBERS', KEYS[3])
end
if #ids == 0 then return {'none', redis.call('SCARD', KEYS[3])} end
for i = 1, #ids, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #ids) do chunk[#chunk + 1] = ids[j] end
  redis.call('HDEL', KEYS[4], unpack(chunk))
  redis.call('HDEL', KEYS[5], unpack(chunk))
  redis.call('SREM', KEYS[3], unpack(chunk))
end
local left = redis.call('SCARD', KEYS[3])
if left == 0 then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HSET', KEYS[2], ARGV[2], left) end
local seq = redis.call('INCR', KEYS[7])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', 'seq', seq, 'op', 'forget', 'gallery', ARGV[1],
           'subject', ARGV[2], 'eids', cjson.encode(ids))
return {'removed', #ids, left, seq, cjson.encode(ids)}
"""


@dataclass
class EnrollOutcome:
    """What one enrollment did: its id, whether it was new, and how many enrollments its subject now has."""

    enrollment_id: str
    created: bool
    subject_enrollments: int


@dataclass
class ForgetOutcome:
    """What a forget removed, and how many enrollments the subject has left."""

    removed: int
    subject_enrollments: int


def text(value: Any) -> str:
    """A Redis reply (bytes) or anything else as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def enroll_keys(gallery: str, subject: str) -> list[str]:
    """The KEYS of :data:`ENROLL_LUA`."""
    return [GALLERIES_KEY, *forget_keys(gallery, subject)]


def forget_keys(gallery: str, subject: str) -> list[str]:
    """The KEYS of :data:`FORGET_LUA`."""
    return [
        gallery_key(gallery),
        subjects_key(gallery),
        subject_key(gallery, subject),
        embeddings_key(gallery),
        enrollments_key(gallery),
        EVENTS_KEY,
        EVENTS_SEQ_KEY,
    ]


def enroll_outcome(gallery: str, model: str, eid: str, dim: int, reply: Any) -> EnrollOutcome | GalleryFailure:
    """What one :data:`ENROLL_LUA` reply means for the caller (a created one's sequence number is ``reply[2]``;
    0 when a retry found the record its lost first try wrote)."""
    status = text(reply[0])
    if status == "mismatch":
        held, held_dim = text(reply[1]), text(reply[2])
        return GalleryFailure(
            GalleryErrorCode.GALLERY_MODEL_MISMATCH,
            f"gallery {gallery!r} holds {held} embeddings ({held_dim}-d), not {model} ({dim}-d): "
            f"send this job to a {held} worker's queue, or use another gallery",
        )
    if status == "conflict":
        return GalleryFailure(
            GalleryErrorCode.ENROLLMENT_CONFLICT,
            f"enrollment id {eid!r} already belongs to subject {text(reply[1])!r} in gallery {gallery!r}; "
            "use a new id, or forget that enrollment first",
        )
    return EnrollOutcome(eid, status != "exists", int(reply[1]))


def events_position(conn: redis.Redis) -> tuple[int, str]:
    """The events' sequence number and the stream's last id, read together (one MULTI)."""
    with conn.pipeline(transaction=True) as pipe:
        pipe.get(EVENTS_SEQ_KEY)
        pipe.xrevrange(EVENTS_KEY, count=1)
        seq_raw, last = pipe.execute()
    return int(seq_raw or 0), text(last[0][0]) if last else "0-0"


def queue_data_state(pipe: Any, last_id: str) -> None:
    """Queue the reads :func:`data_lost` judges on a pipeline: the events' sequence number, the stream entry at
    ``last_id`` and how many galleries there are."""
    pipe.get(EVENTS_SEQ_KEY)
    pipe.xrange(EVENTS_KEY, last_id, last_id)
    pipe.scard(GALLERIES_KEY)


def data_lost(seq: int, last_id: str, holds_galleries: bool, replies: list[Any]) -> str | None:
    """Why the gallery data in Redis is no longer the data a worker applied up to event ``seq`` (stream entry
    ``last_id``), judged on the replies of :func:`queue_data_state`; None while it still is. Redis lost its
    data (``FLUSHALL``, a restart without persistence, a deleted key) when the sequence number went back, the
    last applied entry is gone or carries another number, or the galleries set is gone while the worker holds
    galleries. (An entry also goes when the stream is trimmed past a worker far behind: it must reload too.)"""
    seq_raw, at_last, galleries = replies
    redis_seq = int(seq_raw or 0)
    if redis_seq < seq:
        return f"the events' sequence number is {redis_seq} in Redis; this worker applied up to {seq}"
    if last_id != "0-0":
        if not at_last:
            return f"event {last_id} (seq {seq}), the last this worker applied, is no longer in the stream"
        held = at_last[0][1].get(b"seq")
        if held is None or int(held) != seq:
            return f"event {last_id} is seq {text(held)} in Redis; this worker applied it as seq {seq}"
    if holds_galleries and int(galleries) == 0:
        return "no galleries are listed in Redis; this worker holds some"
    return None


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-n``) as numbers, in the stream's order."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def gallery_names(conn: redis.Redis) -> list[str]:
    """Every gallery in Redis, sorted."""
    return sorted(text(g) for g in conn.smembers(GALLERIES_KEY))


def read_binding(conn: redis.Redis, name: str) -> tuple[str, int] | None:
    """``(model, dim)`` the gallery is bound to; None when there is no such gallery."""
    info: Any = conn.hmget(gallery_key(name), "model", "dim")
    if info[0] is None or info[1] is None:
        return None
    return text(info[0]), int(info[1])


def unknown_gallery(conn: redis.Redis, gallery: str) -> GalleryFailure:
    """The failure for a gallery that does not exist, listing those that do."""
    known = gallery_names(conn)
    listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none yet"
    return GalleryFailure(
        GalleryErrorCode.UNKNOWN_GALLERY,
        f"no gallery {gallery!r} (galleries: {listed}); enroll a subject into it first",
    )


def load_gallery(
    conn: redis.Redis, name: str, model: str, dim: int, dtype: DTypeLike, chunk: int = 4096
) -> GalleryIndex:
    """A gallery read from Redis into a new index (``chunk`` rows added at a time)."""
    subject_of = _subjects_of(conn, name)
    capacity = int(conn.hlen(embeddings_key(name))) + 1024
    index = GalleryIndex(name, model, dim, dtype, capacity=capacity)
    for eids, subjects, raws in _embedding_chunks(conn, name, dim, subject_of, chunk):
        index.add_many(eids, subjects, np.frombuffer(b"".join(raws), "<f4").reshape(len(raws), dim))
    return index


def _subjects_of(conn: redis.Redis, name: str) -> dict[str, str]:
    subject_of: dict[str, str] = {}
    for eid, record in conn.hscan_iter(enrollments_key(name), count=2000):
        try:
            subject_of[text(eid)] = json.loads(record)["subject"]
        except (ValueError, KeyError, TypeError):
            log.warning("gallery_record_unreadable", gallery=name, enrollment_id=text(eid))
    return subject_of


def _embedding_chunks(
    conn: redis.Redis, name: str, dim: int, subject_of: dict[str, str], chunk: int
) -> Iterator[tuple[list[str], list[str], list[bytes]]]:
    """The gallery's readable embeddings as ``(enrollment ids, subjects, raw float32 rows)``, ``chunk`` at a time."""
    eids: list[str] = []
    subjects: list[str] = []
    raws: list[bytes] = []
    for eid_raw, raw in conn.hscan_iter(embeddings_key(name), count=2000):
        eid = text(eid_raw)
        subject = subject_of.get(eid)
        if subject is None:  # written between the two scans: its event follows the snapshot
            continue
        if len(raw) != dim * 4:
            log.warning("gallery_embedding_unreadable", gallery=name, enrollment_id=eid, bytes=len(raw), dim=dim)
            continue
        eids.append(eid)
        subjects.append(subject)
        raws.append(raw)
        if len(eids) >= chunk:
            yield eids, subjects, raws
            eids, subjects, raws = [], [], []
    if eids:
        yield eids, subjects, raws


def subject_vectors(conn: redis.Redis, gallery: str, subject: str, dim: int) -> tuple[list[str], np.ndarray]:
    """A subject's enrollment ids (sorted) and their float32 embeddings as float64 rows, from Redis (the truth);
    ``unknown_subject`` when it has none of ``dim`` values."""
    eids = sorted(text(e) for e in conn.smembers(subject_key(gallery, subject)))
    raws: Any = conn.hmget(embeddings_key(gallery), eids) if eids else []
    pairs = [(e, r) for e, r in zip(eids, raws, strict=True) if r is not None and len(r) == dim * 4]
    if not pairs:
        raise GalleryFailure(
            GalleryErrorCode.UNKNOWN_SUBJECT,
            f"no subject {subject!r} in gallery {gallery!r}; enroll them first",
        )
    vectors = np.frombuffer(b"".join(r for _, r in pairs), "<f4").reshape(len(pairs), dim)
    return [e for e, _ in pairs], vectors.astype(np.float64)
