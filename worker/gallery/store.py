"""The worker's gallery store: durable galleries in Redis (:mod:`worker.gallery.redis_io`) and this worker's
in-memory indexes of those it serves (:mod:`worker.gallery.index`), kept current from the events stream
(:class:`worker.gallery.mirror.GalleryMirror`); here the changes, the lookups and the gallery jobs. How
changes reach every worker is described in :mod:`worker.gallery`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

import worker.gallery.jobs as gallery_jobs
from producer.contract.codes import JobFailure
from producer.contract.defaults import DEFAULT_THRESHOLD
from producer.contract.gallery_results import GalleryErrorCode, GalleryFailure, Match
from producer.contract.keys import EVENTS_MAXLEN
from producer.contract.results import Timing
from worker.batching.retry import transient
from worker.gallery.device import DeviceCopy, tf_gpu_available
from worker.gallery.index import GalleryIndex
from worker.gallery.mirror import GalleryMirror
from worker.gallery.redis_io import (
    ENROLL_LUA,
    FORGET_LUA,
    EnrollOutcome,
    ForgetOutcome,
    enroll_keys,
    enroll_outcome,
    forget_keys,
    read_binding,
    subject_vectors,
    text,
    unknown_gallery,
)


@dataclass
class SubjectDistance:
    """A query's distance to a subject's closest enrollment, that enrollment, and how many the subject has."""

    distance: float
    enrollment_id: str
    enrollments: int


class GalleryStore(GalleryMirror):
    """Durable galleries in Redis plus this worker's in-memory indexes of the galleries it serves.

    ``model``: the worker's model name; only galleries bound to it are held in memory (``None``: all).
    ``galleries``: serve only these names (``None``: every gallery of the model). ``dtype``: ``float32`` or
    ``float16`` for the in-memory matrices (Redis always keeps float32). ``device``: ``cpu`` (numpy),
    ``tf`` (TensorFlow's device) or ``auto`` (TensorFlow when it sees a GPU). Thread-safe.

    Call :meth:`start` to load and follow the events stream, :meth:`stop` to end the follower thread.
    """

    def __init__(
        self,
        connection: redis.Redis,
        model: str | None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        dtype: str = "float32",
        galleries: Iterable[str] | None = None,
        device: str = "cpu",
        events_maxlen: int = EVENTS_MAXLEN,
        block_ms: int = 500,
    ) -> None:
        if device not in ("cpu", "tf", "auto"):
            raise ValueError(f"gallery device must be cpu, tf or auto, not {device!r}")
        super().__init__(connection, model, dtype=dtype, galleries=galleries, block_ms=block_ms)
        self.threshold = threshold
        self.use_device = device == "tf" or (device == "auto" and tf_gpu_available())
        self.events_maxlen = events_maxlen
        self._enroll = connection.register_script(ENROLL_LUA)
        self._forget = connection.register_script(FORGET_LUA)

    @classmethod
    def from_settings(cls, settings: Any, connection: redis.Redis, model: str, threshold: float) -> GalleryStore:
        """A store configured from worker settings (``gallery_dtype``, ``gallery_names``, ``gallery_device``,
        when the settings class has them; defaults otherwise)."""
        return cls(
            connection,
            model,
            threshold=threshold,
            dtype=getattr(settings, "gallery_dtype", "float32"),
            galleries=getattr(settings, "gallery_names", None),
            device=getattr(settings, "gallery_device", "auto"),
        )

    # --- changes ---------------------------------------------------------------------------------------
    def enroll(
        self,
        gallery: str,
        subject: str,
        enrollment_id: str,
        embedding: np.ndarray,
        model: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> EnrollOutcome:
        """Store an embedding under ``subject`` (idempotent by ``enrollment_id``). The first enrollment binds the
        gallery to ``model`` and the embedding's dimension; later ones must match (``gallery_model_mismatch``);
        an id already used for another subject fails with ``enrollment_conflict``."""
        out = self.enroll_many(gallery, [(subject, enrollment_id, embedding, meta)], model)[0]
        if isinstance(out, JobFailure):
            raise out
        return out

    def enroll_many(
        self,
        gallery: str,
        entries: Sequence[tuple[str, str, np.ndarray, dict[str, Any] | None]],
        model: str | None = None,
    ) -> list[EnrollOutcome | GalleryFailure]:
        """:meth:`enroll` for many ``(subject, enrollment_id, embedding, meta)`` in one Redis round trip (each
        still its own atomic script); a refused entry fails alone."""
        model = model or self.model
        if model is None:
            raise ValueError("enroll needs a model name (the store has none)")
        vecs = [np.ascontiguousarray(e[2], dtype="<f4").reshape(-1) for e in entries]
        now = time.time()
        calls: list[tuple[list[str], list[Any]]] = []
        for (subject, eid, _, meta), vec in zip(entries, vecs, strict=True):
            record = json.dumps({"subject": subject, "enrolled_at": now, "meta": meta}, separators=(",", ":"))
            args = [gallery, subject, eid, model, vec.size, vec.tobytes(), record, self.events_maxlen, f"{now:.6f}"]
            calls.append((enroll_keys(gallery, subject), args))
        replies: list[Any] = [None] * len(calls)

        def write() -> None:
            """Run the scripts not yet answered; a full Redis refuses some and takes others, so each entry is
            retried until it has its own reply (a retry of a written one is answered as its first try)."""
            todo = [i for i, r in enumerate(replies) if r is None]
            with self.connection.pipeline(transaction=False) as pipe:
                for i in todo:
                    self._enroll(keys=calls[i][0], args=calls[i][1], client=pipe)
                got = pipe.execute(raise_on_error=False)
            refused: Exception | None = None
            for i, reply in zip(todo, got, strict=True):
                if not isinstance(reply, Exception):
                    replies[i] = reply
                elif transient(reply):
                    refused = reply
                else:
                    raise reply
            if refused is not None:
                raise refused

        self._redis("gallery_enroll", write)
        out: list[EnrollOutcome | GalleryFailure] = []
        for (subject, eid, _, _), vec, reply in zip(entries, vecs, replies, strict=True):
            outcome = enroll_outcome(gallery, model, eid, vec.size, reply)
            if isinstance(outcome, EnrollOutcome) and outcome.created:
                self._apply_local(int(reply[2]), self._apply_enroll, gallery, model, vec.size, subject, eid, vec)
            out.append(outcome)
        return out

    def forget(self, gallery: str, subject: str, enrollment_id: str | None = None) -> ForgetOutcome:
        """Delete a subject's enrollments (or one of them). Forgetting what is not there removes nothing;
        an unknown gallery fails with ``unknown_gallery``."""
        args: list[Any] = [gallery, subject, enrollment_id or "", self.events_maxlen]
        res: Any = self._redis("gallery_forget", lambda: self._forget(keys=forget_keys(gallery, subject), args=args))
        status = text(res[0])
        if status == "no_gallery":
            raise self._unknown_gallery(gallery)
        if status == "none":
            return ForgetOutcome(0, int(res[1]))
        self._apply_local(int(res[3]), self._apply_forget, gallery, json.loads(res[4]))
        return ForgetOutcome(int(res[1]), int(res[2]))

    # --- lookups ---------------------------------------------------------------------------------------
    def _binding(self, gallery: str) -> tuple[str, int] | None:
        with self._lock:
            binding = self._bindings.get(gallery)
        # created a moment ago, its event not here yet
        return binding or self._redis("gallery_read", lambda: read_binding(self.connection, gallery))

    def _unknown_gallery(self, gallery: str) -> GalleryFailure:
        return self._redis("gallery_read", lambda: unknown_gallery(self.connection, gallery))

    def check_gallery(self, gallery: str, dim: int) -> None:
        """``gallery_model_mismatch`` when ``gallery`` exists bound to another model than this worker's or to
        another dimension than ``dim``; nothing when it does not exist (yet)."""
        binding = self._binding(gallery)
        if binding is not None:
            self._check_binding(gallery, binding, dim)

    def check_model(self, gallery: str) -> None:
        """``gallery_model_mismatch`` when ``gallery`` exists bound to another model than this worker's: a change
        that embeds nothing (forget) is refused through a worker of another model as an enroll is; nothing when
        the gallery does not exist (yet)."""
        binding = self._binding(gallery)
        if binding is not None:
            self._check_binding(gallery, binding, binding[1])

    def _check_binding(self, gallery: str, binding: tuple[str, int], dim: int) -> None:
        model, gdim = binding
        if (self.model is not None and model != self.model) or gdim != dim:
            raise GalleryFailure(
                GalleryErrorCode.GALLERY_MODEL_MISMATCH,
                f"gallery {gallery!r} holds {model} embeddings ({gdim}-d); this worker serves {self.model} ({dim}-d): "
                f"send the job to a {model} worker's queue",
            )

    def index_for(self, gallery: str, dim: int) -> GalleryIndex:
        """The served gallery's index, checked against this worker's model and ``dim``."""
        binding = self._binding(gallery)
        if binding is None:
            raise self._unknown_gallery(gallery)
        model, gdim = binding
        self._check_binding(gallery, binding, dim)
        if self.galleries is not None and gallery not in self.galleries:
            raise GalleryFailure(
                GalleryErrorCode.UNKNOWN_GALLERY,
                f"this worker does not serve gallery {gallery!r} (it serves {sorted(self.galleries)})",
            )
        with self._lock:
            index = self._indexes.get(gallery)
            if index is None:
                self._bindings.setdefault(gallery, binding)
                index = self._indexes[gallery] = GalleryIndex(gallery, model, gdim, self.dtype)
            return index

    def identify(
        self,
        gallery: str,
        queries: np.ndarray,
        top_k: Sequence[int] | int = 5,
        threshold: Sequence[float] | float | None = None,
    ) -> list[list[Match]]:
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
        held = self._subject_rows(index, subject) if index.dtype == np.float32 else None
        # float16, or not in memory (yet): Redis has the truth
        eids, vectors = held or self._redis(
            "gallery_read", lambda: subject_vectors(self.connection, gallery, subject, q.size)
        )
        d = 1.0 - vectors @ q
        j = int(np.argmin(d))
        return SubjectDistance(float(d[j]), eids[j], len(eids))

    def _subject_rows(self, index: GalleryIndex, subject: str) -> tuple[list[str], np.ndarray] | None:
        """``subject``'s enrollment ids and float64 embeddings as held in memory; None when it has none here."""
        with self._lock:
            rows = index.rows_of(subject)
            if not rows.size:
                return None
            return [index.eids[r] for r in rows], index.vectors(rows).astype(np.float64)

    # --- jobs (worker.gallery.jobs) ----------------------------------------------------------------------
    def complete(
        self,
        kind: str,
        request: Any,
        embeddings: np.ndarray,
        *,
        timing: Timing | None = None,
        faces: Sequence[dict[str, Any] | None] = (),
        failures: dict[int, JobFailure] | None = None,
    ) -> dict[str, Any]:
        """See :func:`worker.gallery.complete`."""
        return gallery_jobs.complete(
            kind, request, embeddings, store=self, timing=timing, faces=faces, failures=failures
        )

    def complete_batch(self, items: Sequence[gallery_jobs.GalleryItem]) -> list[dict[str, Any] | JobFailure]:
        """Results (or failures) for a batch's gallery jobs, in order; all identify queries on one gallery
        are searched with one matrix product."""
        return gallery_jobs.complete_batch(self, items)

    def threshold_for(self, request: Any) -> float:
        """The request's threshold, or this store's default when it has none."""
        return self.threshold if request.threshold is None else float(request.threshold)

    @property
    def model_name(self) -> str:
        """The model results name (``unknown`` for a store of every model)."""
        return self.model or "unknown"
