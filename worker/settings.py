"""The worker process's settings (env prefix ``ARCFACE_``, ``.env`` supported)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_cache_dir
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode

from producer.contract.defaults import (
    DEFAULT_ALLOWED_BATCH_SIZES,
    DEFAULT_DETECT_BATCH_SIZES,
    DEFAULT_INPUT_SCALE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    DEFAULT_THRESHOLD,
    DEFAULT_WEIGHTS_URL,
)
from producer.settings import CommonSettings

MAX_BATCH_SHAPE = 4096  # a compiled batch shape larger than this is a typo, not a batch


class WorkerSettings(CommonSettings):
    """Model, engine, batching and rq-worker settings on top of :class:`~producer.settings.CommonSettings`."""

    # model
    model_path: Path | None = Field(
        default=None,
        description="deepface .h5 weights, TF.js model.json (or its folder), .keras / full-model .h5 or "
        "SavedModel folder; unset = download ARCFACE_MODEL_URL",
    )
    model_url: str = Field(
        default=DEFAULT_WEIGHTS_URL,
        description="where the default ArcFace weights (deepface's) are downloaded from, once",
    )
    model_sha256: str | None = Field(default=None, description="pin the downloaded file's sha256")
    cache_dir: Path = Field(
        default=Path(user_cache_dir("arcface-service")),
        description="download cache (model weights, the detector) and the remembered precision and batch-size "
        "decisions (decisions/)",
        json_schema_extra={"doc_default": "the user cache directory (platformdirs, arcface-service)"},
    )
    model_name: str = Field(default="arcface", description="name reported in results; jobs naming another model fail")
    precision: Literal["auto", "float32", "reduced"] = Field(
        default="auto",
        description="auto = the reduced path where the hardware has one (bfloat16: CPU flag amx_bf16 or "
        "avx512_bf16; float16: a GPU) when measured 1.15x faster with embeddings that agree with float32 on the "
        "packaged probe faces (cosine >= 0.9995, no pair decision changed), else float32; reduced = that path "
        "unmeasured (any Keras model; the output layer and the L2 norm stay float32)",
    )
    input_scale: float = Field(
        default=DEFAULT_INPUT_SCALE,
        allow_inf_nan=False,
        description="model input = (pixel - mean) * scale + offset (pixels 0..255)",
        json_schema_extra={"doc_default": "1/255"},
    )
    input_offset: float = Field(default=0.0, allow_inf_nan=False, description="added after scaling")
    input_mean: Annotated[list[float] | None, NoDecode] = Field(
        default=None, description="per-channel mean subtracted before scaling (e.g. 103.939,116.779,123.68)"
    )
    channel_order: Literal["RGB", "BGR"] = Field(
        default="RGB", description="BGR: the channels are reversed before the mean is subtracted"
    )
    # detection
    detect: Literal["none", "blazeface"] = Field(
        default="none", description="find the face before embedding (jobs may override)"
    )
    detector_path: Path | None = Field(
        default=None, description="BlazeFace TF.js graph model.json (blazeface-front.json)"
    )
    detector_url: str | None = Field(
        default=None, description="download the detector's model.json from here (its .bin beside it)"
    )
    detector_sha256: str | None = Field(default=None, description="pin the downloaded model.json's sha256")
    detect_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default=list(DEFAULT_DETECT_BATCH_SIZES), description="the detector's compiled batch shapes"
    )
    detect_min_score: float = Field(
        default=0.5, description="detections scoring less are dropped (MediaPipe's default)"
    )
    detect_min_face: float = Field(default=20.0, description="faces smaller than this (pixels) are ignored")
    face_select: Literal["auto", "largest", "confident"] = Field(
        default="auto",
        description="auto: the largest visible face among those within 0.25 of the best score; or largest / confident",
    )
    max_faces: int = Field(
        default=20, ge=1, le=1000, description="faces='all' embeds at most this many faces per image"
    )
    crop: Literal["align", "square"] = Field(
        default="align", description="align: warp to the ArcFace template; square: crop with a margin"
    )
    crop_margin: float = Field(default=0.1, description="crop=square: margin added on each side, x the face box side")
    threshold: float = Field(
        default=DEFAULT_THRESHOLD, ge=0.0, le=2.0, description="verify: similar when distance <= threshold"
    )
    # enrolled identities
    gallery_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="in-memory gallery matrices (Redis keeps float32)"
    )
    gallery_names: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="serve only these galleries (comma-separated); unset = all of the model's"
    )
    gallery_device: Literal["auto", "cpu", "tf"] = Field(
        default="auto",
        description="identify search on numpy (cpu) or TensorFlow's device (tf; auto = tf when a GPU is visible)",
    )
    # engine
    allowed_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default=list(DEFAULT_ALLOWED_BATCH_SIZES),
        description="the engine's compiled batch shapes; a batch is padded to the next one",
    )
    intra_op_threads: int = Field(default=0, description="TensorFlow's intra-op thread pool (0 = TensorFlow's default)")
    inter_op_threads: int = Field(default=0, description="TensorFlow's inter-op thread pool (0 = TensorFlow's default)")
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, description="larger images fail with image_too_large")
    min_image_side: int = Field(default=DEFAULT_MIN_SIDE, description="smaller images fail with image_too_small")
    jpeg_decoder: Literal["pillow", "tensorflow"] = Field(
        default="pillow",
        description="tensorflow = the seed's JPEG decoder (INTEGER_FAST IDCT, exact seed pixels); "
        "pillow = libjpeg-turbo's accurate IDCT",
    )
    # batching
    max_batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="images per engine batch; auto = of the allowed sizes 8, 16, 32 (on a GPU every allowed size "
        "from 8), timed in 2 interleaved rounds at start, the largest within 10 % of the fastest; remembered per "
        "model and machine in ARCFACE_CACHE_DIR",
    )
    batch_timeout_ms: float = Field(
        default=5.0, ge=0, description="how long a batch may wait to fill after its first job"
    )
    preprocess_threads: int = Field(
        default=2,
        ge=1,
        description="decode/resize threads: images for the detector, and every image when there are no "
        "preprocessing processes",
    )
    preprocess_processes: int | Literal["auto"] = Field(
        default="auto",
        description="decode/resize in this many processes (off the GIL); 0 = threads only; "
        "auto = one a usable core (at most 8, a container's CPU quota counted) when a GPU serves the model or the "
        "model measured at least 150 images/s, with the pillow JPEG decoder on 2+ cores; threads otherwise",
    )
    preprocess_stall_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="the health check fails while images wait this long in the preprocessing processes with none "
        "finished; unset = the child start timeout (at least 60 s) plus twice decode_timeout_s",
    )
    max_images_per_job: int = Field(
        default=256, ge=1, le=4096, description="largest multi-image job in images (a verify_batch pair counts two)"
    )
    decode_timeout_s: float = Field(
        default=30.0, gt=0, description="an image still decoding after this long fails alone (image_decode_error)"
    )
    max_job_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="largest job payload (after zlib inflation); larger jobs fail with invalid_payload",
    )
    # rq worker liveness
    heartbeat_interval_s: float = Field(
        default=3.0, gt=0, allow_inf_nan=False, description="how often a busy worker refreshes its heartbeat"
    )
    execution_ttl_s: int = Field(
        default=15,
        ge=1,
        description=(
            "a job's liveness entry (arcface:alive:<queue>) lives this long past each heartbeat; "
            "a worker silent for longer is presumed dead"
        ),
    )
    maintenance_interval_s: int = Field(
        default=10, ge=1, description="how often a worker looks for jobs of dead workers"
    )
    worker_ttl_s: int = Field(
        default=60, ge=1, description="a worker's registration lives this long past its last heartbeat"
    )
    metrics_port: int | None = Field(default=None, description="serve Prometheus metrics on this port (unset = off)")

    @field_validator("max_batch_size", "preprocess_processes")
    @classmethod
    def _count_or_auto(cls, value: int | str, info: ValidationInfo) -> int | str:
        least = 0 if info.field_name == "preprocess_processes" else 1  # 0 processes: preprocess on threads
        if isinstance(value, int) and value < least:
            raise ValueError(f"must be an integer >= {least} or auto")
        return value

    @model_validator(mode="after")
    def _batch_within_allowed(self) -> "WorkerSettings":
        largest = max(self.allowed_batch_sizes) if self.allowed_batch_sizes else 0
        if isinstance(self.max_batch_size, int) and self.max_batch_size > largest:
            raise ValueError(
                f"ARCFACE_MAX_BATCH_SIZE={self.max_batch_size} is larger than the largest of "
                "ARCFACE_ALLOWED_BATCH_SIZES "
                f"({largest}): raise one or lower the other"
            )
        return self

    @field_validator("gallery_names", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] or None
        return value

    @field_validator("input_mean", mode="before")
    @classmethod
    def _floats(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(v) for v in value.strip("[] ").split(",") if v.strip()]
        return value

    @field_validator("allowed_batch_sizes", "detect_batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1 or max(value) > MAX_BATCH_SHAPE:
            raise ValueError(f"needs one or more batch sizes from 1 to {MAX_BATCH_SHAPE}, got {value}")
        return sorted(set(value))

    @field_validator("input_mean")
    @classmethod
    def _three(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
            raise ValueError(f"needs 3 finite values (one per channel), got {value}")
        return value

    @field_validator("allowed_batch_sizes", "detect_batch_sizes", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        if isinstance(value, str):  # "1,2,4,8" or "[1, 2, 4, 8]"
            return [int(v) for v in value.strip("[] ").split(",") if v.strip()]
        return value
