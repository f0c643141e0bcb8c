"""The galleries a worker holds in memory, kept current from Redis: loaded at start (one snapshot), then
every event of the stream applied in order; a gap in the sequence numbers reloads everything, and so does
Redis losing the data the worker holds (checked before every read of the stream, and by :meth:`sync`). How
changes reach every worker is described in :mod:`worker.gallery`; :class:`worker.gallery.store.GalleryStore`
adds the changes, the lookups and the jobs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Self, TypeVar

import numpy as np
import redis
import structlog
from numpy.typing import DTypeLike

from producer.contract.keys import EVENTS_KEY
from worker.batching.retry import transient, until_redis_takes
from worker.gallery.device import DeviceCopy
from worker.gallery.index import GalleryIndex
from worker.gallery.redis_io import (
    data_lost,
    events_position,
    gallery_names,
    load_gallery,
    queue_data_state,
    read_binding,
    stream_id,
    text,
)

log = structlog.get_logger("arcface.gallery")
T = TypeVar("T")


class GalleryMirror:
    """This worker's in-memory indexes of the galleries it serves, following the events stream in a thread.

    ``model``: only galleries bound to it are held (``None``: all). ``galleries``: only these names (``None``:
    every gallery of the model). ``dtype``: of the in-memory matrices. ``block_ms``: how long one read of the
    stream waits for events. Thread-safe (one lock around the indexes)."""

    def __init__(
        self,
        connection: redis.Redis,
        model: str | None,
        *,
        dtype: DTypeLike = "float32",
        galleries: Iterable[str] | None = None,
        block_ms: int = 500,
    ) -> None:
        self.connection = connection
        self.model = model
        self.dtype = np.dtype(dtype)
        self.galleries = None if galleries is None else frozenset(galleries)
        self.block_ms = block_ms
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one full load at a time (the follower's and a job's sync)
        self._indexes: dict[str, GalleryIndex] = {}
        self._devices: dict[str, DeviceCopy] = {}  # device copies of the indexes (dropped on a reload)
        self._bindings: dict[str, tuple[str, int]] = {}
        self._seq = 0
        self._last_id = "0-0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0  # full loads done (1 after start; more after a gap in the events)

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self, load: bool = True) -> Self:
        """Load every served gallery from Redis and start following the events stream (``load=False``:
        resume following from where a stopped store left off)."""
        if load or self.reloads == 0:
            self.load()
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="gallery-events", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the follower thread (waiting up to ``timeout`` seconds for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def serves(self, gallery: str, model: str) -> bool:
        """Whether this worker holds ``gallery`` (bound to ``model``) in memory."""
        return (self.model is None or model == self.model) and (self.galleries is None or gallery in self.galleries)

    def load(self) -> None:
        """(Re)build every served gallery from Redis; events after the snapshot are then applied on top."""
        with self._load_lock:
            self._load()

    def _load(self) -> None:
        start = time.perf_counter()
        conn = self.connection
        seq, last_id = events_position(conn)
        bindings: dict[str, tuple[str, int]] = {}
        indexes: dict[str, GalleryIndex] = {}
        for name in gallery_names(conn):
            binding = read_binding(conn, name)
            if binding is None:
                continue
            bindings[name] = binding
            if self.serves(name, binding[0]):
                indexes[name] = load_gallery(conn, name, *binding, self.dtype)
        with self._lock:
            self._indexes, self._bindings, self._seq, self._last_id = indexes, bindings, seq, last_id
            self._devices = {}
        self.reloads += 1
        enrollments = sum(len(i) for i in indexes.values())
        load_s = round(time.perf_counter() - start, 3)
        log.info("galleries_loaded", galleries=len(indexes), enrollments=enrollments, seq=seq, load_s=load_s)

    def _redis(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` once Redis takes it: a full, restarting or unreachable Redis is waited out (with the batching
        worker's backoff), never a job's failure."""
        return until_redis_takes(what, fn, logger=log)

    def _position(self) -> tuple[int, str, bool]:
        """The last applied event's sequence number and stream id, and whether any gallery is held."""
        with self._lock:
            return self._seq, self._last_id, bool(self._bindings)

    def _reload_lost(self, reason: str) -> None:
        log.warning("gallery_data_lost", reason=reason, held_seq=self._seq, reloads=self.reloads)
        self.load()

    # --- catching up ------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring this worker's galleries up to what Redis holds at this moment: every event written before
        the call is applied, or everything is reloaded when Redis lost the data held. A job that searches
        calls this first, so a change whose result is readable is in every search of a job taken after it."""
        self._redis("gallery_sync", self._sync)

    def _sync(self) -> None:
        seq, last_id, held = self._position()
        with self.connection.pipeline(transaction=False) as pipe:
            queue_data_state(pipe, last_id)
            state = pipe.execute()
        lost = data_lost(seq, last_id, held, state)
        if lost is not None:
            self._reload_lost(lost)
            return
        target = int(state[0] or 0)
        while True:
            applied, last_id, _ = self._position()
            if applied >= target:
                return
            entries: Any = self.connection.xrange(EVENTS_KEY, f"({last_id}", "+", count=1000)
            if not entries:
                self._reload_lost(f"the sequence number is {target} but the stream ends at seq {applied}")
                return
            self._apply_events(entries)

    # --- following the events -----------------------------------------------------------------------------
    def _follow(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                seq, last_id, held = self._position()
                with self.connection.pipeline(transaction=False) as pipe:
                    queue_data_state(pipe, last_id)
                    pipe.xread({EVENTS_KEY: last_id}, count=1000, block=self.block_ms)
                    *state, response = pipe.execute()
                backoff = 0.0
                lost = data_lost(seq, last_id, held, state)
                if lost is not None:
                    self._reload_lost(lost)
                    continue
                self._apply_events(response[0][1] if response else [])
            except Exception as exc:
                if transient(exc):
                    backoff = min(backoff * 2, 10.0) if backoff else 0.25
                    log.error("redis_unreachable", during="gallery_events", error=str(exc)[:300], retry_in_s=backoff)
                    self._stop.wait(backoff)
                    continue
                # an event we cannot apply must not stop the follower: start over from Redis
                log.exception("gallery_event_failed")
                self._stop.wait(0.5)
                try:
                    self.load()
                except redis.RedisError:
                    pass

    def _apply_events(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if not self.apply_event(text(entry_id), fields):
                log.warning("gallery_events_gap", expected_seq=self._seq + 1, got_seq=text(fields.get(b"seq", b"?")))
                self.load()
                break

    def apply_event(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Apply one stream entry; False (nothing applied) when its sequence number is not the next one. An entry
        at or before the last one applied is passed over (read by the follower and by :meth:`sync` both)."""
        seq = int(fields[b"seq"])
        with self._lock:
            if stream_id(entry_id) <= stream_id(self._last_id):
                return True
            if seq != self._seq + 1:
                return False
            op = text(fields[b"op"])
            gallery, subject = text(fields[b"gallery"]), text(fields[b"subject"])
            if op == "enroll":
                model, dim, eid = text(fields[b"model"]), int(fields[b"dim"]), text(fields[b"eid"])
                self._apply_enroll(gallery, model, dim, subject, eid, np.frombuffer(fields[b"vec"], "<f4"))
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

    def _apply_local(self, seq: int, change: Callable[..., None], *args: Any) -> None:
        """Apply our own change at once unless the follower has already passed its event (then it is in)."""
        with self._lock:
            if seq > self._seq:
                change(*args)

    @property
    def seq(self) -> int:
        """The sequence number of the last event applied."""
        return self._seq

    def stats(self) -> dict[str, dict[str, int]]:
        """Per served gallery: enrollments, subjects, bytes of numpy arrays."""
        with self._lock:
            return {
                g: {"enrollments": len(i), "subjects": i.subject_total, "bytes": i.nbytes()}
                for g, i in self._indexes.items()
            }
