"""Turning validated requests into results: image loading, preprocessing, the engine, typed results.

Shared by the micro-batching worker and the plain-rq job functions, so both paths compute the same
numbers and fail with the same codes. Knows nothing of Redis.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from producer.jobs import (
    EmbedRequest, EmbedResult, ErrorCode, ImageRef, JobFailure, Timing, VerifyRequest, VerifyResult, encode_embedding,
)
from worker.detect import BlazeFace, Face, align, pick, square_crop
from worker.engine import Engine, configure_tensorflow, reduced_precision_policy
from worker.files import read_shared_file
from worker.model import load_face_model
from worker.preprocess import DecodeLimits, decode_image, preprocess
from worker.settings import WorkerSettings
from worker.weights import WeightsError, download

log = structlog.get_logger("arcface.worker")
Request = EmbedRequest | VerifyRequest


def default_weights(settings: WorkerSettings, retries: int = 3, timeout_s: float = 30.0) -> Path:
    """deepface's published weights from ``model_url``, downloaded once into ``cache_dir``."""
    return download(settings.model_url, settings.cache_dir / Path(settings.model_url).name, settings.model_sha256, retries, timeout_s)


def load_engine(settings: WorkerSettings) -> Engine:
    """Load the configured model (downloading deepface's weights when no path is set) into an engine."""
    configure_tensorflow(settings.intra_op_threads, settings.inter_op_threads)
    start = time.perf_counter()
    path = settings.model_path or default_weights(settings)
    precision = reduced_precision_policy() if settings.precision == "reduced" else "float32"
    model = load_face_model(
        path, precision=precision, name=settings.model_name, scale=settings.input_scale,
        offset=settings.input_offset, threshold=settings.threshold,
    )
    model.threshold = settings.threshold
    if settings.input_mean is not None:
        if len(settings.input_mean) != 3:
            raise ValueError(f"ARCFACE_INPUT_MEAN needs 3 values, got {settings.input_mean}")
        model.mean = tuple(settings.input_mean)  # type: ignore[assignment]
    model.bgr = settings.channel_order == "BGR"
    engine = Engine(model, settings.allowed_batch_sizes)
    log.info("model_loaded", model=model.name, source=str(path), input_size=model.input_size, dim=model.embedding_dim,
             precision=precision, load_s=round(time.perf_counter() - start, 3))
    return engine


def load_detector(settings: WorkerSettings) -> BlazeFace | None:
    """The face detector, when one is configured (a local model.json, or a URL downloaded once)."""
    path = settings.detector_path
    if path is None and settings.detector_url:
        base = settings.cache_dir / "blazeface"
        path = download(settings.detector_url, base / Path(settings.detector_url).name, settings.detector_sha256)
        bin_url = settings.detector_url.rsplit("/", 1)[0] + "/" + json.loads(path.read_text())["weightsManifest"][0]["paths"][0]
        download(bin_url, base / Path(bin_url).name)
    if path is None:
        if settings.detect != "none":
            raise WeightsError("ARCFACE_DETECT=blazeface needs ARCFACE_DETECTOR_PATH (blazeface-front.json) or ARCFACE_DETECTOR_URL")
        return None
    detector = BlazeFace(path, min_score=settings.detect_min_score)
    detector.warm_up()
    return detector


@dataclass
class Prepared:
    """A request with its model inputs ready (one image for embed, two for verify). With detection, the
    decoded images wait in ``raw`` until the batch's detector call fills ``inputs`` and ``faces``."""

    request: Request
    inputs: list[np.ndarray] = field(default_factory=list)
    preprocess_ms: float = 0.0
    raw: list[np.ndarray] = field(default_factory=list)
    faces: list[Face] = field(default_factory=list)


class Runtime:
    """Executes requests against one engine."""

    def __init__(self, settings: WorkerSettings, engine: Engine, detector: BlazeFace | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.detector = detector
        self.limits = DecodeLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)

    def image_bytes(self, ref: ImageRef) -> bytes:
        """The encoded image: inline bytes, or a path image read once from the shared root (no symlinks, regular
        files only, at most ``max_inline_bytes``: see :mod:`worker.files`); raises :class:`JobFailure`."""
        if ref.data_b64 is not None:
            return ref.inline_bytes(self.settings.max_inline_bytes)
        return read_shared_file(self.settings.shared_root, ref.path or "", self.settings.max_inline_bytes)

    def prepare(self, request: Request) -> Prepared:
        """Load and preprocess the request's images; raises :class:`JobFailure`."""
        if request.model is not None and request.model != self.engine.model.name:
            raise JobFailure(ErrorCode.UNKNOWN_MODEL, f"this worker serves model {self.engine.model.name!r}, not {request.model!r}; send it to that model's queue")
        start = time.perf_counter()
        refs = [request.image] if isinstance(request, EmbedRequest) else [request.a, request.b]
        if (request.detect or self.settings.detect) == "blazeface":
            if self.detector is None:
                raise JobFailure(ErrorCode.UNSUPPORTED_JOB, "this worker has no face detector (set ARCFACE_DETECTOR_PATH); send detect=none or another queue")
            raw = [decode_image(self.image_bytes(ref), self.limits) for ref in refs]
            return Prepared(request, [], (time.perf_counter() - start) * 1000.0, raw=raw)
        size = self.engine.model.input_size
        inputs = [preprocess(self.image_bytes(ref), size, self.limits) for ref in refs]
        return Prepared(request, inputs, (time.perf_counter() - start) * 1000.0)

    def detect(self, prepared: list[Prepared]) -> tuple[dict[int, JobFailure], float]:
        """One batched detector call for every image still waiting in ``raw``; picks and crops each face.
        Returns the failures by index into ``prepared`` (``no_face_detected``) and the milliseconds spent."""
        waiting = [(i, p) for i, p in enumerate(prepared) if p.raw]
        if not waiting or self.detector is None:
            return {}, 0.0
        start = time.perf_counter()
        found = self.detector.detect([im for _, p in waiting for im in p.raw])
        failures: dict[int, JobFailure] = {}
        size, s = self.engine.model.input_size, self.settings
        k = 0
        for i, p in waiting:
            for n, image in enumerate(p.raw):
                face = pick(found[k], s.face_select, s.detect_min_face)
                k += 1
                if face is None:
                    which = "" if len(p.raw) == 1 else (" in image a" if n == 0 else " in image b")
                    failures[i] = JobFailure(ErrorCode.NO_FACE_DETECTED, f"no face{which} (score >= {s.detect_min_score}, at least {s.detect_min_face:g} px)")
                    break
                crop = align(image, face, size) if s.crop == "align" else square_crop(image, face, s.crop_margin)
                p.inputs.append(preprocess(crop, size, self.limits))
                p.faces.append(face)
            p.raw = []
        return failures, (time.perf_counter() - start) * 1000.0

    def finish(self, prepared: Prepared, embeddings: np.ndarray, timing: Timing) -> dict:
        """The JSON-ready result of one request from its rows of the batch's embeddings."""
        req = prepared.request
        name = self.engine.model.name
        faces = [f.as_dict() for f in prepared.faces] or [None, None]
        if isinstance(req, EmbedRequest):
            return EmbedResult(embedding_b64=encode_embedding(embeddings[0]), dim=int(embeddings.shape[1]), model=name,
                               ref=req.ref, face=faces[0], timing=timing).model_dump(mode="json")
        v = self.engine.verify(embeddings[0], embeddings[1], req.threshold)
        return VerifyResult(distance=v.distance, threshold=v.threshold, similar=v.similar, model=name, ref=req.ref,
                            face_a=faces[0], face_b=faces[1] if len(faces) > 1 else None, timing=timing).model_dump(mode="json")

    def run_batch(self, prepared: list[Prepared]) -> tuple[np.ndarray, float]:
        """One engine call for every input of ``prepared``; returns (embeddings, inference ms)."""
        inputs = [x for p in prepared for x in p.inputs]
        start = time.perf_counter()
        out = self.engine.embed(np.stack(inputs)) if inputs else np.empty((0, self.engine.model.embedding_dim), np.float32)
        return out, (time.perf_counter() - start) * 1000.0

    def run_one(self, request: Request, queued_ms: float = 0.0) -> dict:
        """Prepare, embed and finish a single request (the plain-rq path)."""
        prepared = self.prepare(request)
        failures, detect_ms = self.detect([prepared])
        if failures:
            raise failures[0]
        emb, inference_ms = self.run_batch([prepared])
        return self.finish(prepared, emb, Timing(queued_ms=queued_ms, batch_size=1, preprocess_ms=prepared.preprocess_ms,
                                                 detect_ms=detect_ms, inference_ms=inference_ms))
