"""The worker side of enrolled identities: durable galleries in Redis, an in-memory matrix per gallery kept
current from the events stream, 1:N search as one matrix product per batch of queries, and
:func:`complete`, which turns a gallery job's embeddings into its result.

Layout and events are described in :mod:`producer.gallery`. Every change (enroll, forget) is one Lua script:
the hashes and sets, the event and its sequence number are written atomically, so

* the data in Redis is the truth and survives any worker (and, with AOF, Redis restarts);
* a worker starts by reading the sequence number and the stream's last id (one MULTI), then the hashes, and
  follows the stream from that id (``XREAD BLOCK``): a change made through any worker is in every worker's
  matrix within milliseconds, well within a second; events already in the snapshot are applied again,
  harmlessly (every event is idempotent);
* a search holds the store's lock, so an event arriving during a search is applied right after it: a change
  is visible to searches that start within a second of it or one search duration, whichever is longer (a
  32-query search of 1M enrollments took ~4 s on the loaded 2-core development machine, milliseconds on a GPU);
* a sequence number other than the next one means events were lost to this worker (trimmed while it was
  disconnected, or a Redis that lost writes): it reloads everything.

Memory per enrollment: ``dim * 4`` bytes (float32; ``dim * 2`` with ``dtype="float16"``) for the matrix,
plus about 260-290 bytes of Python index (enrollment id, its row, the subject table). The matrix lives in
pages of 65,536 rows, so growing it never copies it (no transient double). ``bench/identify.py`` measures
memory and queries/s for 10k / 100k / 1M enrollments.

Search. ``scores = Q @ M.T`` for the batch's queries ``Q [N, D]`` against the gallery ``M [n, D]``, page by
page (scores for one page of a 32-query batch: 8 MiB), keeping per query the rows within the threshold, at
most the best ``top_k * m`` of each page (``m`` the most enrollments any subject has, which guarantees the top
``top_k`` distinct subjects are among them); those candidates are re-scored in float64 and reduced to the
best row per subject, filtered by the threshold. Reported distances are therefore ``1 - q.e`` in float64,
the same as :func:`producer.jobs.cosine_distance` (bit-for-bit for float32 galleries). With
``device="tf"`` (or ``"auto"`` with a GPU visible to TensorFlow) the product and the top-k run in
TensorFlow on a copy of the matrix kept on the device (changed rows are scattered into it before a search).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import redis
import structlog

from producer.gallery import (
    EVENTS_KEY, EVENTS_MAXLEN, EVENTS_SEQ_KEY, GALLERIES_KEY, EmbeddingRef, EnrollBatchRequest, EnrollBatchResult, Enrolled,
    EnrollRequest, EnrollResult, ForgetRequest, GalleryItemError,
    ForgetResult, GalleryErrorCode, GalleryFailure, GalleryVerifyRequest, IdentifyRequest, IdentifyResult, Match, SubjectRef,
    VerifySubjectResult, embeddings_key, enrollment_id_for, images_for, enrollments_key, gallery_key, subject_key, subjects_key,
)
from producer.jobs import EmbedRequest, ErrorCode, ImageRef, JobFailure, Timing, VerifyRequest, VerifyResult

log = structlog.get_logger("arcface.gallery")

PAGE_ROWS = 1 << 16  # rows per page of a gallery's matrix (128 MiB of 512-d float32), also the search block
F16_BLOCK_ROWS = 8192  # float16 rows converted to float32 at a time for the product (16 MiB scratch at 512-d)
_SCORE_MARGIN = 1e-4  # candidates are kept down to threshold + margin before the exact float64 re-score


# --- one gallery in memory ---------------------------------------------------------------------------
class GalleryIndex:
    """One gallery's embeddings as a matrix (rows = enrollments) held in pages of :data:`PAGE_ROWS` rows, with
    the enrollment ids and subjects of the rows. Knows nothing of Redis; not thread-safe by itself
    (:class:`GalleryStore` locks around it).

    Growing never copies the matrix: full pages stay where they are and a new page is added; only the last
    page grows (by half again, up to a full page) while the gallery is small. Removal moves the last row
    into the freed one (O(1)); rows past :attr:`n` are kept zero.
    """

    def __init__(self, name: str, model: str, dim: int, dtype: str | np.dtype = np.float32, capacity: int = 0) -> None:
        self.name = name
        self.model = model
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"gallery dtype must be float32 or float16, not {self.dtype}")
        self.page_rows = PAGE_ROWS
        self.pages: list[np.ndarray] = []
        self.row_subject = np.zeros(0, np.int32)
        self.eids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.subjects: list[str] = []  # subject index -> subject
        self.subject_index: dict[str, int] = {}
        self.counts = np.zeros(0, np.int64)  # enrollments per subject index
        self.track_dirty = False  # set when a device copy must be kept in step
        self.dirty: set[int] = set()
        self._reserve(capacity)

    @property
    def n(self) -> int:
        """Enrollments held."""
        return len(self.eids)

    def __len__(self) -> int:
        return len(self.eids)

    @property
    def capacity(self) -> int:
        return (len(self.pages) - 1) * self.page_rows + len(self.pages[-1]) if self.pages else 0

    @property
    def subject_total(self) -> int:
        """Subjects with at least one enrollment."""
        return int(np.count_nonzero(self.counts))

    def nbytes(self) -> int:
        """Bytes of the numpy arrays (the pages at their capacity and the row tables)."""
        return int(sum(p.nbytes for p in self.pages) + self.row_subject.nbytes + self.counts.nbytes)

    def _reserve(self, need: int) -> None:
        if need <= self.capacity:
            return
        P = self.page_rows
        while self.capacity < need:
            if self.pages and len(self.pages[-1]) < P:  # a small gallery: its only page grows
                last = self.pages[-1]
                size = min(P, max(need - (len(self.pages) - 1) * P, len(last) + len(last) // 2))
                page = np.zeros((size, self.dim), self.dtype)
                page[: len(last)] = last
                self.pages[-1] = page
            else:
                self.pages.append(np.zeros((min(P, max(need - len(self.pages) * P, 1024)), self.dim), self.dtype))
        rows = np.zeros(self.capacity, np.int32)
        rows[: len(self.row_subject)] = self.row_subject
        self.row_subject = rows

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of ``row`` (a view, in the gallery's dtype)."""
        return self.pages[row // self.page_rows][row % self.page_rows]

    def vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored embeddings of ``rows`` (a copy, in the gallery's dtype)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), self.dtype)
        page, offset = np.divmod(rows, self.page_rows)
        for k in np.unique(page):
            sel = page == k
            out[sel] = self.pages[k][offset[sel]]
        return out

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, the page's used rows)`` for every page holding rows."""
        for k, page in enumerate(self.pages):
            a = k * self.page_rows
            if a >= self.n:
                return
            yield a, page[: min(len(page), self.n - a)]

    def _write(self, row: int, vectors: np.ndarray) -> None:
        """Store ``vectors`` at rows ``row, row + 1, ...`` (across pages)."""
        done = 0
        while done < len(vectors):
            k, off = divmod(row + done, self.page_rows)
            take = min(len(vectors) - done, len(self.pages[k]) - off)
            self.pages[k][off : off + take] = vectors[done : done + take]
            done += take
        if self.track_dirty:
            self.dirty.update(range(row, row + len(vectors)))

    def _subject(self, subject: str) -> int:
        idx = self.subject_index.get(subject)
        if idx is None:
            idx = len(self.subjects)
            self.subjects.append(subject)
            self.subject_index[subject] = idx
            if idx >= len(self.counts):
                counts = np.zeros(max(16, 2 * len(self.counts)), np.int64)
                counts[: len(self.counts)] = self.counts
                self.counts = counts
        return idx

    def add(self, eid: str, subject: str, vector: np.ndarray) -> bool:
        """Store (or overwrite) one enrollment; True when it is new."""
        sidx = self._subject(subject)
        row = self.row_of.get(eid)
        if row is not None:
            old = int(self.row_subject[row])
            if old != sidx:
                self.counts[old] -= 1
                self.counts[sidx] += 1
                self.row_subject[row] = sidx
            self._write(row, np.asarray(vector).reshape(1, -1))
            return False
        row = self.n
        self._reserve(row + 1)
        self._write(row, np.asarray(vector).reshape(1, -1))
        self.row_subject[row] = sidx
        self.eids.append(eid)
        self.row_of[eid] = row
        self.counts[sidx] += 1
        return True

    def add_many(self, eids: Sequence[str], subjects: Sequence[str], vectors: np.ndarray) -> int:
        """Bulk :meth:`add` (loading); returns how many were new."""
        fresh = [i for i, e in enumerate(eids) if e not in self.row_of]
        if len(set(eids[i] for i in fresh)) != len(fresh):  # duplicates within the chunk: the slow path sorts them out
            return sum(self.add(e, s, v) for e, s, v in zip(eids, subjects, vectors))
        for i in set(range(len(eids))) - set(fresh):
            self.add(eids[i], subjects[i], vectors[i])
        if fresh:
            start = self.n
            self._reserve(start + len(fresh))
            sidx = np.fromiter((self._subject(subjects[i]) for i in fresh), np.int32, len(fresh))
            self._write(start, np.asarray(vectors)[fresh])
            self.row_subject[start : start + len(fresh)] = sidx
            np.add.at(self.counts, sidx, 1)
            for k, i in enumerate(fresh):
                self.eids.append(eids[i])
                self.row_of[eids[i]] = start + k
        return len(fresh)

    def remove(self, eid: str) -> bool:
        """Delete one enrollment; False when it was not here."""
        row = self.row_of.pop(eid, None)
        if row is None:
            return False
        self.counts[self.row_subject[row]] -= 1
        last = self.n - 1
        if row != last:
            moved = self.eids[last]
            self._write(row, self.vector(last).reshape(1, -1).copy())
            self.row_subject[row] = self.row_subject[last]
            self.eids[row] = moved
            self.row_of[moved] = row
        self.eids.pop()
        self._write(last, np.zeros((1, self.dim), self.dtype))
        self.row_subject[last] = 0
        return True

    def rows_of(self, subject: str) -> np.ndarray:
        """The rows of ``subject``'s enrollments (a scan of the row table: ~1 ms per million rows)."""
        sidx = self.subject_index.get(subject)
        if sidx is None or self.counts[sidx] == 0:
            return np.empty(0, np.int64)
        return np.flatnonzero(self.row_subject[: self.n] == sidx)

    def subject_count(self, subject: str) -> int:
        sidx = self.subject_index.get(subject)
        return 0 if sidx is None else int(self.counts[sidx])

    def max_per_subject(self) -> int:
        return int(self.counts.max()) if len(self.counts) else 0

    # --- search ------------------------------------------------------------------------------------
    def candidates(self, queries: np.ndarray, kk: int, floor: np.ndarray | float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
        """Per query the ``kk`` best-scoring rows of every page that score at least ``floor`` (per query):
        ``(scores [N, K], rows [N, K])``, numpy; unused slots score ``-inf``.

        Scores under the floor (beyond the threshold) are dropped before any sorting: with a threshold that
        excludes most of the gallery, a page costs its product and one comparison, not a partition per query.
        """
        nq = len(queries)
        floor = np.broadcast_to(np.asarray(floor, np.float32), (nq,))[:, None]
        scratch = np.empty((min(F16_BLOCK_ROWS, self.n), self.dim), np.float32) if self.dtype != np.float32 else None
        scores, rows = [], []
        for a, page in self.blocks():
            if scratch is None:
                s = queries @ page.T  # [N, rows of the page]: the batch's one product with this page
            else:  # float16: converted a slice at a time into the scratch buffer, products side by side
                s = np.empty((nq, len(page)), np.float32)
                for x in range(0, len(page), len(scratch)):
                    part = page[x : x + len(scratch)]
                    np.copyto(scratch[: len(part)], part)
                    np.matmul(queries, scratch[: len(part)].T, out=s[:, x : x + len(part)])
            hit = s >= floor
            per_query = np.count_nonzero(hit, axis=1)
            k = int(min(kk, per_query.max()))
            if k == 0:
                continue
            top_s = np.full((nq, k), -np.inf, np.float32)
            top_r = np.zeros((nq, k), np.int64)
            few = per_query <= k  # every hit fits: take them as they are
            qi, col = np.nonzero(hit & few[:, None])
            pos = np.arange(len(qi)) - np.searchsorted(qi, qi)  # rank of each hit within its query's row
            top_s[qi, pos] = s[qi, col]
            top_r[qi, pos] = col + a
            many = np.flatnonzero(~few)
            if many.size:  # more hits than kk: the kk best of those rows
                sub = s[many]
                idx = np.argpartition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k :]
                top_s[many] = np.take_along_axis(sub, idx, axis=1)
                top_r[many] = idx + a
            scores.append(top_s)
            rows.append(top_r)
        if not scores:
            return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
        return np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)

    def select(self, query: np.ndarray, scores: np.ndarray, rows: np.ndarray, top_k: int, threshold: float) -> list[Match]:
        """Exact float64 re-score of one query's candidates; the best row per subject, within ``threshold``,
        closest first, at most ``top_k``."""
        keep = scores >= (1.0 - threshold) - _SCORE_MARGIN
        rows = np.asarray(rows)[keep]
        if rows.size == 0:
            return []
        d = 1.0 - self.vectors(rows).astype(np.float64) @ query.astype(np.float64)
        order = np.lexsort((rows, d))
        out: list[Match] = []
        seen: set[int] = set()
        for j in order:
            if d[j] > threshold:
                break
            sidx = int(self.row_subject[rows[j]])
            if sidx in seen:
                continue
            seen.add(sidx)
            out.append(Match(subject=self.subjects[sidx], distance=float(d[j]), enrollment_id=self.eids[rows[j]]))
            if len(out) == top_k:
                break
        return out

    def search(self, queries: np.ndarray, top_k: Sequence[int] | int, threshold: Sequence[float] | float,
               device: "DeviceCopy | None" = None) -> list[list[Match]]:
        """Top-k subjects for every row of ``queries [N, D]`` (L2-normalised), one product for the batch.
        ``top_k`` and ``threshold`` may differ per query."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        ks = [top_k] * len(q) if isinstance(top_k, int) else list(top_k)
        ts = [threshold] * len(q) if isinstance(threshold, (int, float)) else list(threshold)
        if self.n == 0 or len(q) == 0:
            return [[] for _ in q]
        kk = min(self.n, max(ks) * max(1, self.max_per_subject()))
        floor = 1.0 - np.asarray(ts, np.float32) - _SCORE_MARGIN
        scores, rows = device.candidates(self, q, kk) if device is not None else self.candidates(q, kk, floor)
        return [self.select(q[i], scores[i], rows[i], ks[i], ts[i]) for i in range(len(q))]


class DeviceCopy:
    """A gallery's pages on TensorFlow's device (the GPU when there is one), kept in step with the host:
    changed rows are scattered into their page before a search; a page that was reallocated is uploaded again."""

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf
        self.vars: list[Any] = []

    def sync(self, index: GalleryIndex) -> None:
        if not index.track_dirty:  # first use: everything is new
            self.vars = []
            index.track_dirty = True
        dirty = np.fromiter(sorted(index.dirty), np.int64, len(index.dirty))
        index.dirty.clear()
        page_of, offset = np.divmod(dirty, index.page_rows)
        del self.vars[len(index.pages) :]
        for k, page in enumerate(index.pages):
            if k >= len(self.vars) or int(self.vars[k].shape[0]) != len(page):
                var = self.tf.Variable(page, trainable=False)
                if k < len(self.vars):
                    self.vars[k] = var
                else:
                    self.vars.append(var)
                continue
            sel = offset[page_of == k]
            if sel.size:
                self.vars[k].scatter_nd_update(sel[:, None], page[sel])

    def candidates(self, index: GalleryIndex, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        tf = self.tf
        self.sync(index)
        q = tf.constant(queries, dtype=self.vars[0].dtype)
        scores = tf.concat([tf.matmul(q, v, transpose_b=True) for v in self.vars], axis=1)[:, : index.n]
        values, idx = tf.math.top_k(tf.cast(scores, tf.float32), k=kk, sorted=False)
        return values.numpy(), idx.numpy().astype(np.int64)


def tf_gpu_available() -> bool:
    """True when TensorFlow is importable and sees a GPU."""
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return bool(tf.config.list_physical_devices("GPU"))


# --- Lua: one atomic change + its event ------------------------------------------------------------------
_ENROLL_LUA = """
local info = redis.call('HMGET', KEYS[2], 'model', 'dim')
if info[1] then
  if info[1] ~= ARGV[4] or info[2] ~= ARGV[5] then return {'mismatch', info[1], info[2]} end
else
  redis.call('HSET', KEYS[2], 'model', ARGV[4], 'dim', ARGV[5], 'created_at', ARGV[9])
  redis.call('SADD', KEYS[1], ARGV[1])
end
local existing = redis.call('HGET', KEYS[6], ARGV[3])
if existing then
  if redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then return {'exists', redis.call('SCARD', KEYS[4])} end
  return {'conflict', cjson.decode(existing)['subject']}
end
redis.call('HSET', KEYS[5], ARGV[3], ARGV[6])
redis.call('HSET', KEYS[6], ARGV[3], ARGV[7])
redis.call('SADD', KEYS[4], ARGV[3])
local count = redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
local seq = redis.call('INCR', KEYS[8])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'seq', seq, 'op', 'enroll', 'gallery', ARGV[1], 'subject', ARGV[2],
           'eid', ARGV[3], 'model', ARGV[4], 'dim', ARGV[5], 'vec', ARGV[6])
return {'created', count, seq}
"""

_FORGET_LUA = """
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
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', 'seq', seq, 'op', 'forget', 'gallery', ARGV[1], 'subject', ARGV[2],
           'eids', cjson.encode(ids))
return {'removed', #ids, left, seq, cjson.encode(ids)}
"""


@dataclass
class EnrollOutcome:
    enrollment_id: str
    created: bool
    subject_enrollments: int


@dataclass
class ForgetOutcome:
    removed: int
    subject_enrollments: int


@dataclass
class SubjectDistance:
    distance: float
    enrollment_id: str
    enrollments: int


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --- the store -------------------------------------------------------------------------------------------
class GalleryStore:
    """Durable galleries in Redis plus this worker's in-memory indexes of the galleries it serves.

    ``model``: the worker's model name; only galleries bound to it are held in memory (``None``: all).
    ``galleries``: serve only these names (``None``: every gallery of the model). ``dtype``: ``float32`` or
    ``float16`` for the in-memory matrices (Redis always keeps float32). ``device``: ``cpu`` (numpy),
    ``tf`` (TensorFlow's device) or ``auto`` (TensorFlow when it sees a GPU). Thread-safe.

    Call :meth:`start` to load and follow the events stream, :meth:`stop` to end the follower thread.
    """

    def __init__(self, connection: redis.Redis, model: str | None, *, threshold: float = 0.68, dtype: str = "float32",
                 galleries: Iterable[str] | None = None, device: str = "cpu", events_maxlen: int = EVENTS_MAXLEN,
                 block_ms: int = 500) -> None:
        if device not in ("cpu", "tf", "auto"):
            raise ValueError(f"gallery device must be cpu, tf or auto, not {device!r}")
        self.connection = connection
        self.model = model
        self.threshold = threshold
        self.dtype = np.dtype(dtype)
        self.galleries = None if galleries is None else frozenset(galleries)
        self.use_device = device == "tf" or (device == "auto" and tf_gpu_available())
        self.events_maxlen = events_maxlen
        self.block_ms = block_ms
        self._lock = threading.RLock()
        self._indexes: dict[str, GalleryIndex] = {}
        self._devices: dict[str, DeviceCopy] = {}
        self._bindings: dict[str, tuple[str, int]] = {}
        self._seq = 0
        self._last_id = "0-0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._enroll = connection.register_script(_ENROLL_LUA)
        self._forget = connection.register_script(_FORGET_LUA)
        self.reloads = 0  # full loads done (1 after start; more after a gap in the events)

    @classmethod
    def from_settings(cls, settings: Any, connection: redis.Redis, model: str, threshold: float) -> "GalleryStore":
        """A store configured from worker settings (``gallery_dtype``, ``gallery_names``, ``gallery_device``,
        when the settings class has them; defaults otherwise)."""
        return cls(connection, model, threshold=threshold, dtype=getattr(settings, "gallery_dtype", "float32"),
                   galleries=getattr(settings, "gallery_names", None), device=getattr(settings, "gallery_device", "auto"))

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self, load: bool = True) -> "GalleryStore":
        """Load every served gallery from Redis and start following the events stream (``load=False``:
        resume following from where a stopped store left off)."""
        if load or self.reloads == 0:
            self.load()
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="gallery-events", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def serves(self, gallery: str, model: str) -> bool:
        return (self.model is None or model == self.model) and (self.galleries is None or gallery in self.galleries)

    def load(self) -> None:
        """(Re)build every served gallery from Redis; events after the snapshot are then applied on top."""
        start = time.perf_counter()
        conn = self.connection
        with conn.pipeline(transaction=True) as pipe:
            pipe.get(EVENTS_SEQ_KEY)
            pipe.xrevrange(EVENTS_KEY, count=1)
            seq_raw, last = pipe.execute()
        seq = int(seq_raw or 0)
        last_id = _s(last[0][0]) if last else "0-0"
        bindings: dict[str, tuple[str, int]] = {}
        indexes: dict[str, GalleryIndex] = {}
        for name in sorted(_s(g) for g in conn.smembers(GALLERIES_KEY)):
            binding = self._read_binding(name)
            if binding is None:
                continue
            bindings[name] = binding
            if self.serves(name, binding[0]):
                indexes[name] = self._load_gallery(name, *binding)
        with self._lock:
            self._indexes, self._bindings, self._seq, self._last_id = indexes, bindings, seq, last_id
            self._devices = {}
        self.reloads += 1
        log.info("galleries_loaded", galleries=len(indexes), enrollments=sum(len(i) for i in indexes.values()), seq=seq,
                 load_s=round(time.perf_counter() - start, 3))

    def _read_binding(self, name: str) -> tuple[str, int] | None:
        info = self.connection.hmget(gallery_key(name), "model", "dim")
        if info[0] is None or info[1] is None:
            return None
        return _s(info[0]), int(info[1])

    def _load_gallery(self, name: str, model: str, dim: int, chunk: int = 4096) -> GalleryIndex:
        conn = self.connection
        subject_of: dict[str, str] = {}
        for eid, record in conn.hscan_iter(enrollments_key(name), count=2000):
            try:
                subject_of[_s(eid)] = json.loads(record)["subject"]
            except (ValueError, KeyError, TypeError):
                log.warning("gallery_record_unreadable", gallery=name, enrollment_id=_s(eid))
        index = GalleryIndex(name, model, dim, self.dtype, capacity=int(conn.hlen(embeddings_key(name))) + 1024)
        eids: list[str] = []
        subjects: list[str] = []
        raws: list[bytes] = []

        def flush() -> None:
            if eids:
                vectors = np.frombuffer(b"".join(raws), "<f4").reshape(len(raws), dim)
                index.add_many(eids, subjects, vectors)
                eids.clear(), subjects.clear(), raws.clear()

        for eid_raw, raw in conn.hscan_iter(embeddings_key(name), count=2000):
            eid = _s(eid_raw)
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
                flush()
        flush()
        return index

    # --- following the events -----------------------------------------------------------------------------
    def _follow(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                response = self.connection.xread({EVENTS_KEY: self._last_id}, count=1000, block=self.block_ms)
                backoff = 0.0
                for entry_id, fields in (response[0][1] if response else []):
                    if not self.apply_event(_s(entry_id), fields):
                        log.warning("gallery_events_gap", expected_seq=self._seq + 1, got_seq=_s(fields.get(b"seq", b"?")))
                        self.load()
                        break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                backoff = min(backoff * 2, 10.0) if backoff else 0.25
                log.error("redis_unreachable", during="gallery_events", error=str(exc), retry_in_s=backoff)
                self._stop.wait(backoff)
            except Exception:  # an event we cannot apply must not stop the follower: start over from Redis
                log.exception("gallery_event_failed")
                self._stop.wait(0.5)
                try:
                    self.load()
                except redis.RedisError:
                    pass

    def apply_event(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Apply one stream entry; False (nothing applied) when its sequence number is not the next one."""
        seq = int(fields[b"seq"])
        with self._lock:
            if seq != self._seq + 1:
                return False
            op = _s(fields[b"op"])
            gallery, subject = _s(fields[b"gallery"]), _s(fields[b"subject"])
            if op == "enroll":
                model, dim = _s(fields[b"model"]), int(fields[b"dim"])
                self._apply_enroll(gallery, model, dim, subject, _s(fields[b"eid"]), np.frombuffer(fields[b"vec"], "<f4"))
            elif op == "forget":
                self._apply_forget(gallery, json.loads(fields[b"eids"]))
            self._seq = seq
            self._last_id = entry_id
            return True

    def _apply_enroll(self, gallery: str, model: str, dim: int, subject: str, eid: str, vector: np.ndarray) -> None:
        self._bindings.setdefault(gallery, (model, dim))
        index = self._indexes.get(gallery)
        if index is None:
            if not self.serves(gallery, model):
                return
            index = self._indexes[gallery] = GalleryIndex(gallery, model, dim, self.dtype)
        if index.dim == len(vector):
            index.add(eid, subject, vector)

    def _apply_forget(self, gallery: str, eids: Iterable[str]) -> None:
        index = self._indexes.get(gallery)
        if index is not None:
            for eid in eids:
                index.remove(eid)

    def _apply_local(self, seq: int, change: Any) -> None:
        """Apply our own change at once unless the follower has already passed its event (then it is in)."""
        with self._lock:
            if seq > self._seq:
                change()

    @property
    def seq(self) -> int:
        """The sequence number of the last event applied."""
        return self._seq

    # --- changes ---------------------------------------------------------------------------------------
    def enroll(self, gallery: str, subject: str, enrollment_id: str, embedding: np.ndarray, model: str | None = None,
               meta: dict | None = None) -> EnrollOutcome:
        """Store an embedding under ``subject`` (idempotent by ``enrollment_id``). The first enrollment binds the
        gallery to ``model`` and the embedding's dimension; later ones must match (``gallery_model_mismatch``);
        an id already used for another subject fails with ``enrollment_conflict``."""
        out = self.enroll_many(gallery, [(subject, enrollment_id, embedding, meta)], model)[0]
        if isinstance(out, JobFailure):
            raise out
        return out

    def enroll_many(self, gallery: str, entries: Sequence[tuple[str, str, np.ndarray, dict | None]],
                    model: str | None = None) -> list[EnrollOutcome | GalleryFailure]:
        """:meth:`enroll` for many ``(subject, enrollment_id, embedding, meta)`` in one Redis round trip (each
        still its own atomic script); a refused entry fails alone."""
        model = model or self.model
        if model is None:
            raise ValueError("enroll needs a model name (the store has none)")
        vecs = [np.ascontiguousarray(e[2], dtype="<f4").reshape(-1) for e in entries]
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            for (subject, eid, _, meta), vec in zip(entries, vecs):
                record = json.dumps({"subject": subject, "enrolled_at": now, "meta": meta}, separators=(",", ":"))
                keys = [GALLERIES_KEY, gallery_key(gallery), subjects_key(gallery), subject_key(gallery, subject), embeddings_key(gallery),
                        enrollments_key(gallery), EVENTS_KEY, EVENTS_SEQ_KEY]
                self._enroll(keys=keys, args=[gallery, subject, eid, model, vec.size, vec.tobytes(), record, self.events_maxlen, f"{now:.6f}"],
                             client=pipe)
            replies = pipe.execute()
        out: list[EnrollOutcome | GalleryFailure] = []
        for (subject, eid, _, _), vec, res in zip(entries, vecs, replies):
            status = _s(res[0])
            if status == "mismatch":
                out.append(GalleryFailure(GalleryErrorCode.GALLERY_MODEL_MISMATCH,
                                          f"gallery {gallery!r} holds {_s(res[1])} embeddings ({_s(res[2])}-d), not {model} ({vec.size}-d): "
                                          f"send this job to a {_s(res[1])} worker's queue, or use another gallery"))
            elif status == "conflict":
                out.append(GalleryFailure(GalleryErrorCode.ENROLLMENT_CONFLICT,
                                          f"enrollment id {eid!r} already belongs to subject {_s(res[1])!r} in gallery {gallery!r}; "
                                          "use a new id, or forget that enrollment first"))
            elif status == "exists":
                out.append(EnrollOutcome(eid, False, int(res[1])))
            else:
                self._apply_local(int(res[2]), lambda s=subject, e=eid, v=vec: self._apply_enroll(gallery, model, v.size, s, e, v))
                out.append(EnrollOutcome(eid, True, int(res[1])))
        return out

    def forget(self, gallery: str, subject: str, enrollment_id: str | None = None) -> ForgetOutcome:
        """Delete a subject's enrollments (or one of them). Forgetting what is not there removes nothing;
        an unknown gallery fails with ``unknown_gallery``."""
        keys = [gallery_key(gallery), subjects_key(gallery), subject_key(gallery, subject), embeddings_key(gallery),
                enrollments_key(gallery), EVENTS_KEY, EVENTS_SEQ_KEY]
        res = self._forget(keys=keys, args=[gallery, subject, enrollment_id or "", self.events_maxlen])
        status = _s(res[0])
        if status == "no_gallery":
            raise self._unknown_gallery(gallery)
        if status == "none":
            return ForgetOutcome(0, int(res[1]))
        removed = json.loads(res[4])
        self._apply_local(int(res[3]), lambda: self._apply_forget(gallery, removed))
        return ForgetOutcome(int(res[1]), int(res[2]))

    # --- lookups ---------------------------------------------------------------------------------------
    def _unknown_gallery(self, gallery: str) -> GalleryFailure:
        known = sorted(_s(g) for g in self.connection.smembers(GALLERIES_KEY))
        listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none yet"
        return GalleryFailure(GalleryErrorCode.UNKNOWN_GALLERY, f"no gallery {gallery!r} (galleries: {listed}); enroll a subject into it first")

    def _check_binding(self, gallery: str, binding: tuple[str, int], dim: int) -> None:
        model, gdim = binding
        if (self.model is not None and model != self.model) or gdim != dim:
            raise GalleryFailure(GalleryErrorCode.GALLERY_MODEL_MISMATCH,
                                 f"gallery {gallery!r} holds {model} embeddings ({gdim}-d); this worker serves {self.model} ({dim}-d): "
                                 f"send the job to a {model} worker's queue")

    def index_for(self, gallery: str, dim: int) -> GalleryIndex:
        """The served gallery's index, checked against this worker's model and ``dim``."""
        with self._lock:
            binding = self._bindings.get(gallery)
        if binding is None:
            binding = self._read_binding(gallery)  # created a moment ago, its event not here yet
            if binding is None:
                raise self._unknown_gallery(gallery)
        model, gdim = binding
        self._check_binding(gallery, binding, dim)
        if self.galleries is not None and gallery not in self.galleries:
            raise GalleryFailure(GalleryErrorCode.UNKNOWN_GALLERY, f"this worker does not serve gallery {gallery!r} (it serves {sorted(self.galleries)})")
        with self._lock:
            index = self._indexes.get(gallery)
            if index is None:
                self._bindings.setdefault(gallery, binding)
                index = self._indexes[gallery] = GalleryIndex(gallery, model, gdim, self.dtype)
            return index

    def identify(self, gallery: str, queries: np.ndarray, top_k: Sequence[int] | int = 5,
                 threshold: Sequence[float] | float | None = None) -> list[list[Match]]:
        """Top-k subjects (closest enrollment each, within the threshold) for every query row, as one matrix
        product for the whole batch."""
        q = np.asarray(queries, np.float32)
        q = q.reshape(1, -1) if q.ndim == 1 else q
        index = self.index_for(gallery, q.shape[1])
        with self._lock:
            device = None
            if self.use_device:
                device = self._devices.get(gallery) or self._devices.setdefault(gallery, DeviceCopy())
            return index.search(q, top_k, self.threshold if threshold is None else threshold, device)

    def verify_subject(self, gallery: str, subject: str, embedding: np.ndarray) -> SubjectDistance:
        """Distance from ``embedding`` to ``subject``'s closest enrollment (float64, exact: float16 galleries
        read the subject's float32 embeddings from Redis). ``unknown_subject`` when it has none."""
        q = np.asarray(embedding, np.float64).reshape(-1)
        index = self.index_for(gallery, q.size)
        vectors: np.ndarray | None = None
        eids: list[str] = []
        if index.dtype == np.float32:
            with self._lock:
                rows = index.rows_of(subject)
                if rows.size:
                    vectors = index.vectors(rows).astype(np.float64)
                    eids = [index.eids[r] for r in rows]
        if vectors is None:  # float16, or not in memory (yet): Redis has the truth
            eids = sorted(_s(e) for e in self.connection.smembers(subject_key(gallery, subject)))
            raws = self.connection.hmget(embeddings_key(gallery), eids) if eids else []
            pairs = [(e, r) for e, r in zip(eids, raws) if r is not None and len(r) == q.size * 4]
            if not pairs:
                raise GalleryFailure(GalleryErrorCode.UNKNOWN_SUBJECT, f"no subject {subject!r} in gallery {gallery!r}; enroll them first")
            eids = [e for e, _ in pairs]
            vectors = np.frombuffer(b"".join(r for _, r in pairs), "<f4").reshape(len(pairs), q.size).astype(np.float64)
        d = 1.0 - vectors @ q
        j = int(np.argmin(d))
        return SubjectDistance(float(d[j]), eids[j], len(eids))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per served gallery: enrollments, subjects, bytes of numpy arrays."""
        with self._lock:
            return {g: {"enrollments": len(i), "subjects": i.subject_total, "bytes": i.nbytes()} for g, i in self._indexes.items()}

    def complete(self, kind: str, request: Any, embeddings: np.ndarray, *, timing: Timing | None = None,
                 faces: Sequence[dict | None] = (), failures: dict[int, JobFailure] | None = None) -> dict:
        """See :func:`complete`."""
        if getattr(request, "kind", None) != kind:
            raise JobFailure(ErrorCode.INTERNAL_ERROR, f"a {getattr(request, 'kind', type(request).__name__)!r} request completed as {kind!r}")
        out = self.complete_batch([GalleryItem(request, embeddings, list(faces), timing or Timing(), dict(failures or {}))])[0]
        if isinstance(out, JobFailure):
            raise out
        return out

    def complete_batch(self, items: Sequence["GalleryItem"]) -> list[dict | JobFailure]:
        """Results (or failures) for a batch's gallery jobs, in order; all identify queries on one gallery
        are searched with one matrix product."""
        out: list[dict | JobFailure | None] = [None] * len(items)
        searches: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            try:
                if isinstance(item.request, IdentifyRequest):
                    _single(item, 1)
                    searches.setdefault(item.request.gallery, []).append(i)
                else:
                    out[i] = self._complete_one(item)
            except JobFailure as failure:
                out[i] = failure
        for gallery, members in searches.items():
            reqs = [items[i].request for i in members]
            queries = np.stack([_single(items[i], 1)[0] for i in members])
            try:
                found = self.identify(gallery, queries, [r.top_k for r in reqs], [self._threshold(r) for r in reqs])
                searched = len(self.index_for(gallery, queries.shape[1]))
            except JobFailure as failure:
                for i in members:
                    out[i] = failure
                continue
            for i, req, matches in zip(members, reqs, found):
                item = items[i]
                out[i] = IdentifyResult(gallery=gallery, matches=matches, top_k=req.top_k, threshold=self._threshold(req), searched=searched,
                                        model=self._model_name(), ref=req.ref, face=_face(item, 0), timing=item.timing).model_dump(mode="json")
        return out  # type: ignore[return-value]

    def _threshold(self, request: Any) -> float:
        return self.threshold if request.threshold is None else request.threshold

    def _model_name(self) -> str:
        return self.model or "unknown"

    def _complete_one(self, item: "GalleryItem") -> dict:
        req = item.request
        model = self._model_name()
        if isinstance(req, EnrollRequest):
            vec = _single(item, 1)[0]
            outcome = self.enroll(req.gallery, req.subject, enrollment_id_for(req), vec, model, req.meta)
            return EnrollResult(gallery=req.gallery, subject=req.subject, enrollment_id=outcome.enrollment_id, created=outcome.created,
                                subject_enrollments=outcome.subject_enrollments, model=model, dim=int(vec.size), ref=req.ref,
                                face=_face(item, 0), timing=item.timing).model_dump(mode="json")
        if isinstance(req, EnrollBatchRequest):
            return self._enroll_batch(item, model)
        if isinstance(req, ForgetRequest):
            _single(item, 0)
            f = self.forget(req.gallery, req.subject, req.enrollment_id)
            return ForgetResult(gallery=req.gallery, subject=req.subject, enrollment_id=req.enrollment_id, removed=f.removed,
                                subject_enrollments=f.subject_enrollments, ref=req.ref).model_dump(mode="json")
        if isinstance(req, (GalleryVerifyRequest, VerifyRequest)):
            threshold = self._threshold(req)
            common = dict(threshold=threshold, model=model, ref=req.ref, face_a=_face(item, 0), timing=item.timing)
            if isinstance(req.b, SubjectRef):
                a = _single(item, 1)[0]
                found = self.verify_subject(req.b.gallery, req.b.subject, a)
                return VerifySubjectResult(distance=found.distance, similar=found.distance <= threshold, subject=req.b.subject,
                                           gallery=req.b.gallery, enrollment_id=found.enrollment_id, enrollments=found.enrollments,
                                           **common).model_dump(mode="json")
            if isinstance(req.b, EmbeddingRef):
                a = _single(item, 1)[0]
                b = req.b.vector
                if b.size != a.size:
                    raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"b.embedding_b64 has {b.size} values; this worker's model ({model}) gives {a.size}")
                d = float(1.0 - np.dot(a.astype(np.float64), b.astype(np.float64)))
            else:
                a, b = _single(item, 2)
                d = float(1.0 - np.dot(a.astype(np.float64), b.astype(np.float64)))
                common["face_b"] = _face(item, 1)
            return VerifyResult(distance=d, similar=d <= threshold, **common).model_dump(mode="json")
        raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"{type(req).__name__} is not a gallery job")

    def _enroll_batch(self, item: "GalleryItem", model: str) -> dict:
        req: EnrollBatchRequest = item.request
        rows = _matrix(item, len(req.items))
        with self._lock:
            binding = self._bindings.get(req.gallery)
        binding = binding or self._read_binding(req.gallery)
        if binding is not None:  # a gallery of another model fails the whole job, not each item
            self._check_binding(req.gallery, binding, rows.shape[1])
        errors = [GalleryItemError(index=i, code=f.code, message=f.message) for i, f in sorted(item.failures.items())]
        todo = [i for i in range(len(req.items)) if i not in item.failures]
        outcomes = self.enroll_many(req.gallery, [(req.items[i].subject, enrollment_id_for(req.items[i]), rows[i], req.items[i].meta)
                                                  for i in todo], model)
        results: list[Enrolled | None] = [None] * len(req.items)
        for i, outcome in zip(todo, outcomes):
            if isinstance(outcome, JobFailure):
                errors.append(GalleryItemError(index=i, code=outcome.code, message=outcome.message))
            else:
                results[i] = Enrolled(subject=req.items[i].subject, enrollment_id=outcome.enrollment_id, created=outcome.created,
                                      subject_enrollments=outcome.subject_enrollments)
        errors.sort(key=lambda e: e.index)
        faces = [_face(item, i) for i in range(len(req.items))]
        return EnrollBatchResult(gallery=req.gallery, count=len(req.items), results=results, errors=errors, model=model, dim=int(rows.shape[1]),
                                 ref=req.ref, faces=faces if any(faces) else None, timing=item.timing).model_dump(mode="json")


@dataclass
class GalleryItem:
    """One job handed to :meth:`GalleryStore.complete_batch`: its request, its rows of the batch's embeddings
    (in :func:`images_for` order; rows of failed images are ignored), the detected faces (``Face.as_dict()`` or
    None per image), its timing, and the failures of its images by index."""

    request: Any
    embeddings: np.ndarray
    faces: list[dict | None] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    failures: dict[int, JobFailure] = field(default_factory=dict)  # by image index: images that could not be embedded


def _matrix(item: GalleryItem, n: int) -> np.ndarray:
    emb = np.asarray(item.embeddings, np.float32)
    emb = emb.reshape(1, -1) if emb.ndim == 1 else emb
    if len(emb) != n:
        raise JobFailure(ErrorCode.INTERNAL_ERROR, f"{item.request.kind} job expects {n} embedding(s), got {len(emb)}")
    return emb


def _single(item: GalleryItem, n: int) -> np.ndarray:
    """The rows of a job that fails as a whole when one of its images failed (all but enroll_batch)."""
    for i in sorted(item.failures):
        failure = item.failures[i]
        if n == 2:
            raise JobFailure(failure.code, f"image {'ab'[i]}: {failure.message}")
        raise failure
    return _matrix(item, n)


def _face(item: GalleryItem, i: int) -> dict | None:
    return item.faces[i] if i < len(item.faces) else None


def complete(kind: str, request: Any, embeddings: np.ndarray, *, store: GalleryStore, failures: dict[int, JobFailure] | None = None,
             faces: Sequence[dict | None] = (), timing: Timing | None = None) -> dict:
    """The JSON-ready result of one gallery job, called by the batcher after the engine.

    ``embeddings``: the job's rows, one per :func:`images_for` image, in that order (rows of failed images are
    ignored: zeros will do). ``failures``: the images that could not be read, decoded or had no face, by index.
    Single-image kinds (and verify) raise their image's failure; ``enroll_batch`` reports failed items in
    ``errors``. Raises :class:`~producer.jobs.JobFailure` (gallery codes as
    :class:`~producer.gallery.GalleryFailure`). For a whole batch use :meth:`GalleryStore.complete_batch`, which
    searches all identify jobs of one gallery with one matrix product.
    """
    return store.complete(kind, request, embeddings, timing=timing, faces=faces, failures=failures)


def run_one(runtime: Any, store: GalleryStore, request: Any, queued_ms: float = 0.0) -> dict:
    """Read, embed and complete one gallery job with a :class:`worker.runtime.Runtime` in this thread (the
    plain-rq path)."""
    name = runtime.engine.model.name
    if getattr(request, "model", None) is not None and request.model != name:
        raise JobFailure(ErrorCode.UNKNOWN_MODEL, f"this worker serves model {name!r}, not {request.model!r}; send it to that model's queue")
    refs = images_for(request)
    detect = (getattr(request, "detect", None) or runtime.settings.detect) == "blazeface"
    if refs and detect and runtime.detector is None:
        raise JobFailure(ErrorCode.UNSUPPORTED_JOB, "this worker has no face detector (set ARCFACE_DETECTOR_PATH); send detect=none or another queue")
    images: list[Any] = []
    failures: dict[int, JobFailure] = {}
    for i, ref in enumerate(refs):
        try:
            images.append(runtime.prepare_image(ref, detect))
        except JobFailure as failure:
            failures[i] = failure
            images.append(None)
    waiting = [im for im in images if im is not None]
    found, detect_ms = runtime.detect_images(waiting)
    index_of = [i for i, im in enumerate(images) if im is not None]
    failures.update({index_of[k]: f for k, f in found.items()})
    ok = [i for i in range(len(images)) if i not in failures]
    emb, inference_ms = runtime.embed_inputs([images[i].input for i in ok])
    rows = np.zeros((len(images), runtime.engine.model.embedding_dim), np.float32)
    rows[ok] = emb
    timing = Timing(queued_ms=queued_ms, batch_size=len(ok), preprocess_ms=sum(im.ms for im in waiting), detect_ms=detect_ms,
                    inference_ms=inference_ms)
    faces = [im.face.as_dict() if im is not None and im.face is not None else None for im in images]
    return store.complete(request.kind, request, rows, timing=timing, faces=faces, failures=failures)


__all__ = ["PAGE_ROWS", "DeviceCopy", "GalleryIndex", "GalleryItem", "GalleryStore", "complete", "images_for", "run_one", "tf_gpu_available"]
