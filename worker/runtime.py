"""Turning validated requests into results: image loading, preprocessing, the engine, typed results.

Shared by the micro-batching worker and the plain-rq job functions, so both paths compute the same
numbers and fail with the same codes. Knows nothing of Redis.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.gallery import (
    EnrollBatchRequest,
    EnrollRequest,
    ForgetRequest,
    GalleryVerifyRequest,
    IdentifyRequest,
)
from producer.contract.requests import EmbedBatchRequest, EmbedRequest, ImageRef, VerifyBatchRequest, VerifyRequest
from producer.contract.results import (
    EmbedBatchResult,
    EmbedResult,
    FaceEmbedding,
    ItemError,
    PairResult,
    Timing,
    VerifyBatchResult,
    VerifyResult,
    encode_embedding,
    encode_matrix,
)
from producer.contract.wire import request_images
from worker.inference.cache import download
from worker.inference.decisions import DecisionCache, weights_digest
from worker.inference.decode_checks import DecodeLimits
from worker.inference.detect import BlazeFace, Face, align, pick, pick_all, square_crop
from worker.inference.engine import Engine, configure_tensorflow, has_gpu, reduced_precision_policy
from worker.inference.files import read_shared_file
from worker.inference.model import load_face_model
from worker.inference.precision import CpuInfo, ReducedUnavailable, cpu_info, read_cpuinfo, reduced_variant
from worker.inference.prepool import usable_cores
from worker.inference.preprocess import PreparedImage, decode_image, preprocess
from worker.inference.tuning import Tuned, tune
from worker.inference.weights import WeightsError, check_weights_file
from worker.settings import WorkerSettings

log = structlog.get_logger("arcface.worker")
Request = Any  # AnyRequest or a gallery request (producer.contract.gallery)
GALLERY_REQUESTS = (EnrollRequest, EnrollBatchRequest, IdentifyRequest, GalleryVerifyRequest, ForgetRequest)


def default_weights(settings: WorkerSettings, retries: int = 3, timeout_s: float = 30.0) -> Path:
    """deepface's published weights from ``model_url``, downloaded once into ``cache_dir`` (an HDF5 file is
    checked for damaged weights before it is kept; a damaged cached copy is downloaded again)."""
    name = Path(settings.model_url).name
    return download(
        settings.model_url,
        settings.cache_dir / name,
        settings.model_sha256,
        retries,
        timeout_s,
        check=check_weights_file if name.endswith(".h5") else None,
    )


def load_engine(settings: WorkerSettings) -> Engine:
    """Load the configured model (downloading deepface's weights when no path is set) into an engine: float32, or
    with ``ARCFACE_PRECISION=reduced`` the reduced path (a SavedModel, which cannot be rebuilt, stays float32 and
    says why). ``auto`` loads float32; :func:`prepare_engine` decides."""
    configure_tensorflow(settings.intra_op_threads, settings.inter_op_threads)
    start = time.perf_counter()
    path = model_source(settings)
    policy = reduced_precision_policy() if settings.precision == "reduced" else "float32"
    model = load_face_model(
        path,
        precision=policy,
        name=settings.model_name,
        scale=settings.input_scale,
        offset=settings.input_offset,
        threshold=settings.threshold,
        mean=tuple(settings.input_mean) if settings.input_mean is not None else None,  # type: ignore[arg-type]
        bgr=settings.channel_order == "BGR",
    )
    if policy != "float32" and model.precision == "float32":  # not ArcFace: rebuild the user's model
        try:
            model = reduced_variant(model, policy)
        except ReducedUnavailable as exc:
            log.warning("reduced_precision_unavailable", model=model.name, reason=str(exc), serving="float32")
    engine = Engine(model, settings.allowed_batch_sizes)
    log.info(
        "model_loaded",
        model=model.name,
        source=str(path),
        input_size=model.input_size,
        dim=model.embedding_dim,
        precision=model.precision,
        load_s=round(time.perf_counter() - start, 3),
    )
    return engine


def model_source(settings: WorkerSettings) -> Path:
    """The model file or folder: ``ARCFACE_MODEL_PATH``, else deepface's weights downloaded once."""
    return settings.model_path or default_weights(settings)


def decision_inputs(settings: WorkerSettings, engine: Engine, cpu: CpuInfo) -> dict[str, Any]:
    """What a measured precision / batch-size decision depends on (its cache key): the weights, the TensorFlow and
    Keras versions, the CPU, the GPUs, the usable cores and the settings that change speed or fidelity."""
    import keras
    import tensorflow as tf

    return {
        "weights_sha256": weights_digest(model_source(settings)),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_model": cpu.model,
        "cpu_flags": sorted(cpu.flags),
        "gpus": [g.name for g in tf.config.list_physical_devices("GPU")],
        "usable_cores": usable_cores(),
        "input_size": engine.model.input_size,
        "settings": {
            name: getattr(settings, name)
            for name in (
                "precision",
                "max_batch_size",
                "allowed_batch_sizes",
                "intra_op_threads",
                "inter_op_threads",
                "input_scale",
                "input_offset",
                "input_mean",
                "channel_order",
                "threshold",
            )
        },
    }


def prepare_engine(settings: WorkerSettings, cpuinfo: Callable[[], str] = read_cpuinfo) -> Tuned:
    """Load the model and decide what serves it (:func:`~worker.inference.tuning.tune`): precision and batch cap,
    measured (``auto``) or set, remembered in ``ARCFACE_CACHE_DIR/decisions``. Sets ``settings.max_batch_size`` to
    the cap. ``cpuinfo`` returns ``/proc/cpuinfo``'s text (tests give other CPUs)."""
    engine = load_engine(settings)
    cpu = cpu_info(cpuinfo)
    tuned = tune(
        engine,
        precision_setting=settings.precision,
        max_batch_setting=settings.max_batch_size,
        cpu=cpu,
        gpu=has_gpu(),
        cache=DecisionCache(settings.cache_dir / "decisions"),
        key_inputs=decision_inputs(settings, engine, cpu),
    )
    settings.max_batch_size = tuned.max_batch_size
    return tuned


def load_gallery(settings: WorkerSettings, connection: Any, engine: Engine) -> Any:
    """The enrolled-identities store of this worker: galleries of its model loaded from Redis, kept current from
    the events stream (``ARCFACE_GALLERY_*`` settings)."""
    from worker.gallery import GalleryStore

    return GalleryStore.from_settings(settings, connection, engine.model.name, engine.model.threshold).start()


def load_detector(settings: WorkerSettings) -> BlazeFace | None:
    """The face detector, when one is configured (a local model.json, or a URL downloaded once)."""
    path = settings.detector_path
    if path is None and settings.detector_url:
        base = settings.cache_dir / "blazeface"
        path = download(settings.detector_url, base / Path(settings.detector_url).name, settings.detector_sha256)
        bin_url = (
            settings.detector_url.rsplit("/", 1)[0]
            + "/"
            + json.loads(path.read_text())["weightsManifest"][0]["paths"][0]
        )
        download(bin_url, base / Path(bin_url).name)
    if path is None:
        if settings.detect != "none":
            raise WeightsError(
                "ARCFACE_DETECT=blazeface needs ARCFACE_DETECTOR_PATH (blazeface-front.json) or ARCFACE_DETECTOR_URL"
            )
        return None
    detector = BlazeFace(path, allowed_batch_sizes=settings.detect_batch_sizes, min_score=settings.detect_min_score)
    detector.warm_up()
    return detector


@dataclass
class _Embedded:
    """What the engine made of one request's images: rows in request order (rows of failed images are ignored),
    the failures by index, each image's face (as stored in results) and the timings."""

    embeddings: np.ndarray
    failures: dict[int, JobFailure]
    faces: list[dict | None]
    timing: Timing


class Runtime:
    """Executes requests against one engine."""

    def __init__(
        self, settings: WorkerSettings, engine: Engine, detector: BlazeFace | None = None, gallery: Any = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.detector = detector
        self.gallery = gallery  # worker.gallery.GalleryStore: enrolled identities (enroll, identify, verify a subject)
        self.limits = DecodeLimits.from_settings(settings)

    def image_bytes(self, ref: ImageRef) -> bytes:
        """The encoded image: inline bytes, or a path image read once from the shared root (no symlinks, regular
        files only, at most ``max_inline_bytes``: see :mod:`worker.inference.files`); raises :class:`JobFailure`."""
        if ref.data_b64 is not None:
            return ref.inline_bytes(self.settings.max_inline_bytes)
        return read_shared_file(self.settings.shared_root, ref.path or "", self.settings.max_inline_bytes)

    def check(self, request: Request) -> bool:
        """Refuse a request this worker cannot serve; returns whether its images go through the detector."""
        model = getattr(request, "model", None)
        if model is not None and model != self.engine.model.name:
            raise JobFailure(
                ErrorCode.UNKNOWN_MODEL,
                f"this worker serves model {self.engine.model.name!r}, not {model!r}; send it to that model's queue",
            )
        n = len(request_images(request))
        if n > self.settings.max_images_per_job:
            raise JobFailure(
                ErrorCode.INVALID_PAYLOAD,
                f"job has {n} images, over this worker's limit of {self.settings.max_images_per_job} "
                "(ARCFACE_MAX_IMAGES_PER_JOB); split it",
            )
        if isinstance(request, GALLERY_REQUESTS) and self.gallery is None:
            raise JobFailure(
                ErrorCode.UNSUPPORTED_JOB,
                "this worker serves no galleries; send gallery jobs to a worker started with them",
            )
        if n == 0:
            return False
        detect = (getattr(request, "detect", None) or self.settings.detect) == "blazeface"
        if detect and self.detector is None:
            raise JobFailure(
                ErrorCode.UNSUPPORTED_JOB,
                "this worker has no face detector (set ARCFACE_DETECTOR_PATH); send detect=none or another queue",
            )
        return detect

    def prepare_image(self, ref: ImageRef, detect: bool, all_faces: bool = False) -> PreparedImage:
        """Read, decode and preprocess one image (or only decode it, for the detector); raises :class:`JobFailure`."""
        start = time.perf_counter()
        data = self.image_bytes(ref)
        if detect:
            return PreparedImage(
                raw=decode_image(data, self.limits), ms=(time.perf_counter() - start) * 1000.0, all_faces=all_faces
            )
        return PreparedImage(
            input=preprocess(data, self.engine.model.input_size, self.limits), ms=(time.perf_counter() - start) * 1000.0
        )

    def detect_images(self, images: list[PreparedImage]) -> tuple[dict[int, JobFailure], float]:
        """One batched detector call for every image still waiting in ``raw``; picks and crops each face.
        Returns the failures by index into ``images`` (``no_face_detected``) and the milliseconds spent."""
        waiting = [i for i, im in enumerate(images) if im.raw is not None]
        if not waiting or self.detector is None:
            return {}, 0.0
        start = time.perf_counter()
        found = self.detector.detect([images[i].raw for i in waiting])  # type: ignore[misc]
        failures: dict[int, JobFailure] = {}
        size, s = self.engine.model.input_size, self.settings
        for i, faces in zip(waiting, found, strict=True):
            im = images[i]
            image, im.raw = im.raw, None
            assert image is not None
            picked = pick(faces, s.face_select, s.detect_min_face)
            chosen = pick_all(faces, s.detect_min_face, s.max_faces) if im.all_faces else [picked] if picked else []
            if not chosen:
                failures[i] = JobFailure(
                    ErrorCode.NO_FACE_DETECTED,
                    f"no face (score >= {s.detect_min_score}, at least {s.detect_min_face:g} px)",
                )
                continue
            inputs = [
                preprocess(
                    align(image, f, size) if s.crop == "align" else square_crop(image, f, s.crop_margin),
                    size,
                    self.limits,
                )
                for f in chosen
            ]
            im.input, im.face = inputs[0], chosen[0]
            im.extra = list(zip(inputs[1:], chosen[1:], strict=True)) if im.all_faces else None
        return failures, (time.perf_counter() - start) * 1000.0

    def embed_inputs(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """One engine call for ``inputs``; returns (embeddings, inference ms)."""
        start = time.perf_counter()
        out = (
            self.engine.embed(np.stack(inputs))
            if inputs
            else np.empty((0, self.engine.model.embedding_dim), np.float32)
        )
        return out, (time.perf_counter() - start) * 1000.0

    def finish(
        self,
        request: Request,
        embeddings: np.ndarray,
        failures: dict[int, JobFailure],
        faces: list[Face | None],
        timing: Timing,
        extra_faces: list[tuple[Face, np.ndarray]] | None = None,
    ) -> dict:
        """The JSON-ready result of a request from the embeddings of its images (rows in request order; rows
        of failed images are ignored). Single-image kinds raise the failure of their image; multi-item kinds
        report failed items in ``errors`` and never fail as a whole."""
        done = _Embedded(embeddings, failures, [f.as_dict() if f is not None else None for f in faces], timing)
        if isinstance(request, GALLERY_REQUESTS):
            assert self.gallery is not None
            return self.gallery.complete(
                request.kind, request, embeddings, timing=timing, faces=done.faces, failures=failures
            )
        if isinstance(request, EmbedRequest):
            return self._finish_embed(request, done, faces[0], extra_faces)
        if isinstance(request, VerifyRequest):
            return self._finish_verify(request, done)
        if isinstance(request, EmbedBatchRequest):
            return self._finish_embed_batch(request, done)
        return self._finish_pairs(request, done)

    def _finish_embed(
        self, request: EmbedRequest, done: _Embedded, face: Face | None, extra: list[tuple[Face, np.ndarray]] | None
    ) -> dict:
        if 0 in done.failures:
            raise done.failures[0]
        every = None
        if request.faces == "all" and face is not None:
            pairs = [(face, done.embeddings[0]), *(extra or [])]
            every = [FaceEmbedding(**f.as_dict(), embedding_b64=encode_embedding(row)) for f, row in pairs]
        return EmbedResult(
            embedding_b64=encode_embedding(done.embeddings[0]),
            dim=int(done.embeddings.shape[1]),
            model=self.engine.model.name,
            precision=self.engine.precision,
            ref=request.ref,
            face=done.faces[0],
            faces=every,
            timing=done.timing,
        ).model_dump(mode="json")

    def _finish_verify(self, request: VerifyRequest, done: _Embedded) -> dict:
        for i in (0, 1):
            if i in done.failures:
                f = done.failures[i]
                raise JobFailure(f.code, f"image {'ab'[i]}: {f.message}")
        v = self.engine.verify(done.embeddings[0], done.embeddings[1], request.threshold)
        return VerifyResult(
            distance=v.distance,
            threshold=v.threshold,
            similar=v.similar,
            model=self.engine.model.name,
            precision=self.engine.precision,
            ref=request.ref,
            face_a=done.faces[0],
            face_b=done.faces[1],
            timing=done.timing,
        ).model_dump(mode="json")

    def _finish_embed_batch(self, request: EmbedBatchRequest, done: _Embedded) -> dict:
        rows = np.array(done.embeddings, dtype=np.float32, copy=True)
        errors = [ItemError(index=i, code=f.code, message=f.message) for i, f in sorted(done.failures.items())]
        rows[[e.index for e in errors]] = 0.0
        return EmbedBatchResult(
            count=len(rows),
            dim=int(rows.shape[1]),
            embeddings_b64=encode_matrix(rows),
            errors=errors,
            model=self.engine.model.name,
            precision=self.engine.precision,
            ref=request.ref,
            faces=done.faces if self.detector is not None and any(done.faces) else None,
            timing=done.timing,
        ).model_dump(mode="json")

    def _finish_pairs(self, request: VerifyBatchRequest, done: _Embedded) -> dict:
        results: list[PairResult | None] = []
        errors: list[ItemError] = []
        threshold = self.engine.model.threshold if request.threshold is None else request.threshold
        for k in range(len(request.pairs)):
            bad = next((i for i in (2 * k, 2 * k + 1) if i in done.failures), None)
            if bad is not None:
                f = done.failures[bad]
                errors.append(ItemError(index=k, code=f.code, message=f"image {'ab'[bad % 2]}: {f.message}"))
                results.append(None)
                continue
            v = self.engine.verify(done.embeddings[2 * k], done.embeddings[2 * k + 1], threshold)
            results.append(PairResult(distance=v.distance, similar=v.similar))
        return VerifyBatchResult(
            count=len(results),
            threshold=threshold,
            results=results,
            errors=errors,
            model=self.engine.model.name,
            precision=self.engine.precision,
            ref=request.ref,
            timing=done.timing,
        ).model_dump(mode="json")

    def run_one(self, request: Request, queued_ms: float = 0.0) -> dict:
        """Prepare, embed and finish a single request in this thread (the plain-rq path)."""
        detect = self.check(request)
        images: list[PreparedImage] = []
        failures: dict[int, JobFailure] = {}
        for i, ref in enumerate(request_images(request)):
            try:
                images.append(self.prepare_image(ref, detect))
            except JobFailure as failure:
                failures[i] = failure
                images.append(PreparedImage())
        found, detect_ms = self.detect_images(images)
        failures.update(found)
        ok = [i for i in range(len(images)) if i not in failures]
        extra = [(x, f) for i in ok for x, f in (images[i].extra or [])]
        inputs: list[Any] = [images[i].input for i in ok] + [x for x, _ in extra]
        emb, inference_ms = self.embed_inputs(inputs)
        rows = np.zeros((len(images), self.engine.model.embedding_dim), np.float32)
        rows[ok] = emb[: len(ok)]
        extra_faces = [(f, row) for (_, f), row in zip(extra, emb[len(ok) :], strict=True)]
        timing = Timing(
            queued_ms=queued_ms,
            batch_size=len(ok),
            preprocess_ms=sum(im.ms for im in images),
            detect_ms=detect_ms,
            inference_ms=inference_ms,
        )
        return self.finish(request, rows, failures, [im.face for im in images], timing, extra_faces)
