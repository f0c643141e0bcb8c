"""Turning validated requests into results: image loading, preprocessing, the engine, typed results.

Shared by the micro-batching worker and the plain-rq job functions, so both paths compute the same
numbers and fail with the same codes. Knows nothing of Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from producer.jobs import (
    EmbedRequest, EmbedResult, ErrorCode, ImageRef, JobFailure, Timing, VerifyRequest, VerifyResult, encode_embedding,
    resolve_shared_path,
)
from worker.engine import Engine, configure_tensorflow, reduced_precision_policy
from worker.model import load_face_model
from worker.preprocess import DecodeLimits, preprocess
from worker.settings import WorkerSettings
from worker.weights import download

log = structlog.get_logger("arcface.worker")
Request = EmbedRequest | VerifyRequest


def load_engine(settings: WorkerSettings) -> Engine:
    """Load the configured model (downloading deepface's weights when no path is set) into an engine."""
    configure_tensorflow(settings.intra_op_threads, settings.inter_op_threads)
    start = time.perf_counter()
    path = settings.model_path
    if path is None:
        path = download(settings.model_url, settings.cache_dir / Path(settings.model_url).name, settings.model_sha256)
    precision = reduced_precision_policy() if settings.precision == "reduced" else "float32"
    model = load_face_model(
        path, precision=precision, name=settings.model_name, scale=settings.input_scale,
        offset=settings.input_offset, threshold=settings.threshold,
    )
    model.threshold = settings.threshold
    engine = Engine(model, settings.allowed_batch_sizes)
    log.info("model_loaded", model=model.name, source=str(path), input_size=model.input_size, dim=model.embedding_dim,
             precision=precision, load_s=round(time.perf_counter() - start, 3))
    return engine


@dataclass
class Prepared:
    """A request with its model inputs ready (one image for embed, two for verify)."""

    request: Request
    inputs: list[np.ndarray] = field(default_factory=list)
    preprocess_ms: float = 0.0


class Runtime:
    """Executes requests against one engine."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.limits = DecodeLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)

    def image_bytes(self, ref: ImageRef) -> bytes:
        if ref.data_b64 is not None:
            return ref.inline_bytes(self.settings.max_inline_bytes)
        path = resolve_shared_path(self.settings.shared_root, ref.path or "")
        try:
            size = path.stat().st_size
            if size > self.settings.max_inline_bytes:
                raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"image file {ref.path!r} has {size} bytes, over the {self.settings.max_inline_bytes}-byte limit")
            return path.read_bytes()
        except OSError as exc:
            raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"cannot read image {ref.path!r} under the shared root: {exc.strerror}") from None

    def prepare(self, request: Request) -> Prepared:
        """Load and preprocess the request's images; raises :class:`JobFailure`."""
        if request.model is not None and request.model != self.engine.model.name:
            raise JobFailure(ErrorCode.UNKNOWN_MODEL, f"this worker serves model {self.engine.model.name!r}, not {request.model!r}; send it to that model's queue")
        start = time.perf_counter()
        refs = [request.image] if isinstance(request, EmbedRequest) else [request.a, request.b]
        size = self.engine.model.input_size
        inputs = [preprocess(self.image_bytes(ref), size, self.limits) for ref in refs]
        return Prepared(request, inputs, (time.perf_counter() - start) * 1000.0)

    def finish(self, prepared: Prepared, embeddings: np.ndarray, timing: Timing) -> dict:
        """The JSON-ready result of one request from its rows of the batch's embeddings."""
        req = prepared.request
        name = self.engine.model.name
        if isinstance(req, EmbedRequest):
            return EmbedResult(embedding_b64=encode_embedding(embeddings[0]), dim=int(embeddings.shape[1]), model=name,
                               ref=req.ref, timing=timing).model_dump(mode="json")
        v = self.engine.verify(embeddings[0], embeddings[1], req.threshold)
        return VerifyResult(distance=v.distance, threshold=v.threshold, similar=v.similar, model=name, ref=req.ref,
                            timing=timing).model_dump(mode="json")

    def run_batch(self, prepared: list[Prepared]) -> tuple[np.ndarray, float]:
        """One engine call for every input of ``prepared``; returns (embeddings, inference ms)."""
        inputs = [x for p in prepared for x in p.inputs]
        start = time.perf_counter()
        out = self.engine.embed(np.stack(inputs)) if inputs else np.empty((0, self.engine.model.embedding_dim), np.float32)
        return out, (time.perf_counter() - start) * 1000.0

    def run_one(self, request: Request, queued_ms: float = 0.0) -> dict:
        """Prepare, embed and finish a single request (the plain-rq path)."""
        prepared = self.prepare(request)
        emb, inference_ms = self.run_batch([prepared])
        return self.finish(prepared, emb, Timing(queued_ms=queued_ms, batch_size=1, preprocess_ms=prepared.preprocess_ms, inference_ms=inference_ms))
