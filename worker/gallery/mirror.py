"""The galleries a worker holds in memory, kept current from Redis: loaded at start (one snapshot), then
every event of the stream applied in order; a gap in the sequence numbers reloads everything. How changes
reach every worker is described in :mod:`worker.gallery`; :class:`worker.gallery.store.GalleryStore` adds
the changes, the lookups and the jobs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Self

import numpy as np
import redis
import structlog
from numpy.typing import DTypeLike

from producer.contract.keys import EVENTS_KEY
from worker.gallery.device import DeviceCopy
from worker.gallery.index import GalleryIndex
from worker.gallery.redis_io import events_position, gallery_names, load_gallery, read_binding, text

log = structlog.get_logger("arcface.gallery")


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

    # --- following the events -----------------------------------------------------------------------------
    def _follow(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                response: Any = self.connection.xread({EVENTS_KEY: self._last_id}, count=1000, block=self.block_ms)
                backoff = 0.0
                self._apply_events(response[0][1] if response else [])
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

    def _apply_events(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if not self.apply_event(text(entry_id), fields):
                log.warning("gallery_events_gap", expected_seq=self._seq + 1, got_seq=text(fields.get(b"seq", b"?")))
                self.load()
                break

    def apply_event(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Apply one stream entry; False (nothing applied) when its sequence number is not the next one."""
        seq = int(fields[b"seq"])
        with self._lock:
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
