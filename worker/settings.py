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

# Bounds: a value outside them is a typo or a unit mistake (each refused at start, before the model loads).
MAX_BATCH_SHAPE = 1024  # a compiled batch shape; 4096 took 2.1 GB for one batch of ArcFace activations
MAX_THREADS = 256
MAX_PIXELS = 100_000_000  # 100 megapixels: 400 MB decoded, per image being decoded
MAX_SIDE = 16_384
MAX_JOB_BYTES = 512 * 1024 * 1024  # Redis refuses values over 512 MB (proto-max-bulk-len)
MAX_BATCH_TIMEOUT_MS = 10_000.0
MAX_DECODE_TIMEOUT_S = 600.0
MIN_HEARTBEAT_S = 0.1  # 1e-6 s drove Redis at 15,500 commands/s
MAX_INTERVAL_S = 3600
PROCESS_BASE_BYTES = 48 * 1024 * 1024  # a preprocessing process's interpreter, NumPy and Pillow
PROCESSES_PER_CORE = 2


def process_budget(max_image_pixels: int) -> int:
    """Memory one preprocessing process may need: its base plus one decoded image at the pixel limit (4 bytes a
    pixel: RGBA-sized), as the fleet tests bound a worker's RSS."""
    return PROCESS_BASE_BYTES + 4 * max_image_pixels


def available_memory(root: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process may still allocate: the machine's MemAvailable, less where a container's cgroup v2
    memory limit (``memory.max`` minus ``memory.current``) is lower; None where neither can be read."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def max_preprocess_processes(max_image_pixels: int) -> tuple[int, str]:
    """The most preprocessing processes this machine takes, and the rule that set it: at most 2 a usable core
    (a container's CPU quota counted) and at most available memory / :func:`process_budget`."""
    from worker.inference.prepool import usable_cores

    cores = usable_cores()
    limit, why = PROCESSES_PER_CORE * cores, f"{PROCESSES_PER_CORE} x {cores} usable cores"
    memory = available_memory()
    if memory is not None:
        budget = process_budget(max_image_pixels)
        if memory // budget < limit:
            limit = max(1, memory // budget)
            why = (
                f"{memory // 2**20} MiB available / {budget // 2**20} MiB a process "
                "(48 MiB + 4 B x ARCFACE_MAX_IMAGE_PIXELS)"
            )
    return limit, why


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
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="model input = (pixel - mean) * scale + offset (pixels 0..255)",
        json_schema_extra={"doc_default": "1/255"},
    )
    input_offset: float = Field(default=0.0, ge=-255, le=255, allow_inf_nan=False, description="added after scaling")
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
        default=0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="detections scoring less are dropped (MediaPipe's default)",
    )
    detect_min_face: float = Field(
        default=20.0, ge=0, le=MAX_SIDE, allow_inf_nan=False, description="faces smaller than this (pixels) are ignored"
    )
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
    crop_margin: float = Field(
        default=0.1,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="crop=square: margin added on each side, x the face box side",
    )
    threshold: float = Field(
        default=DEFAULT_THRESHOLD,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="verify: similar when distance <= threshold",
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
    intra_op_threads: int = Field(
        default=0, ge=0, le=MAX_THREADS, description="TensorFlow's intra-op thread pool (0 = TensorFlow's default)"
    )
    inter_op_threads: int = Field(
        default=0, ge=0, le=MAX_THREADS, description="TensorFlow's inter-op thread pool (0 = TensorFlow's default)"
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, le=MAX_PIXELS, description="larger images fail with image_too_large"
    )
    min_image_side: int = Field(
        default=DEFAULT_MIN_SIDE, ge=1, le=MAX_SIDE, description="smaller images fail with image_too_small"
    )
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
        default=5.0,
        ge=0,
        le=MAX_BATCH_TIMEOUT_MS,
        allow_inf_nan=False,
        description="how long a batch may wait to fill after its first job",
    )
    preprocess_threads: int = Field(
        default=2,
        ge=1,
        le=MAX_THREADS,
        description="decode/resize threads: images for the detector, and every image when there are no "
        "preprocessing processes",
    )
    preprocess_processes: int | Literal["auto"] = Field(
        default="auto",
        description="decode/resize in this many processes (off the GIL); 0 = threads only; "
        "auto = one a usable core (at most 8, a container's CPU quota counted) when a GPU serves the model or the "
        "model measured at least 150 images/s, with the pillow JPEG decoder on 2+ cores; threads otherwise; "
        "a number: at most 2 a usable core and at most available memory / (48 MiB + 4 B x ARCFACE_MAX_IMAGE_PIXELS)",
    )
    preprocess_stall_s: float | None = Field(
        default=None,
        gt=0,
        le=24 * 3600,
        allow_inf_nan=False,
        description="the health check fails while images wait this long in the preprocessing processes with none "
        "finished; unset = the child start timeout (at least 60 s) plus twice decode_timeout_s",
    )
    max_images_per_job: int = Field(
        default=256, ge=1, le=4096, description="largest multi-image job in images (a verify_batch pair counts two)"
    )
    decode_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=MAX_DECODE_TIMEOUT_S,
        allow_inf_nan=False,
        description="an image still decoding after this long fails alone (image_decode_error)",
    )
    max_job_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=MAX_JOB_BYTES,
        description="largest job payload (after zlib inflation); larger jobs fail with invalid_payload",
    )
    # rq worker liveness
    heartbeat_interval_s: float = Field(
        default=3.0,
        ge=MIN_HEARTBEAT_S,
        le=60,
        allow_inf_nan=False,
        description="how often a busy worker refreshes its heartbeat (less than ARCFACE_EXECUTION_TTL_S)",
    )
    execution_ttl_s: int = Field(
        default=15,
        ge=1,
        le=MAX_INTERVAL_S,
        description=(
            "a job's liveness entry (arcface:alive:<queue>) lives this long past each heartbeat; "
            "a worker silent for longer is presumed dead"
        ),
    )
    maintenance_interval_s: int = Field(
        default=10, ge=1, le=MAX_INTERVAL_S, description="how often a worker looks for jobs of dead workers"
    )
    worker_ttl_s: int = Field(
        default=60,
        ge=1,
        le=MAX_INTERVAL_S,
        description="a worker's registration lives this long past its last heartbeat",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="serve Prometheus metrics on this port (unset = off)"
    )

    @field_validator("max_batch_size", "preprocess_processes")
    @classmethod
    def _count_or_auto(cls, value: int | str, info: ValidationInfo) -> int | str:
        least = 0 if info.field_name == "preprocess_processes" else 1  # 0 processes: preprocess on threads
        if isinstance(value, int) and value < least:
            raise ValueError(f"must be an integer >= {least} or auto")
        if info.field_name == "preprocess_processes" and isinstance(value, int) and value > 0:
            most, why = max_preprocess_processes(info.data.get("max_image_pixels", DEFAULT_MAX_PIXELS))
            if value > most:
                raise ValueError(
                    f"at most {most} preprocessing processes on this machine ({why}): lower it, or set auto"
                )
        return value

    @model_validator(mode="after")
    def _detector_configured(self) -> "WorkerSettings":
        if self.detect != "none" and self.detector_path is None and not self.detector_url:
            raise ValueError(
                f"ARCFACE_DETECT={self.detect} needs a detector: set ARCFACE_DETECTOR_PATH (blazeface-front.json) or "
                "ARCFACE_DETECTOR_URL, or ARCFACE_DETECT=none"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_within_ttl(self) -> "WorkerSettings":
        if self.heartbeat_interval_s >= self.execution_ttl_s:
            raise ValueError(
                f"ARCFACE_HEARTBEAT_INTERVAL_S={self.heartbeat_interval_s:g} is not less than "
                f"ARCFACE_EXECUTION_TTL_S={self.execution_ttl_s}: jobs in hand would be presumed dead between "
                "heartbeats; lower the interval or raise the TTL"
            )
        return self

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
        if value is not None and (len(value) != 3 or not all(math.isfinite(v) and 0 <= v <= 255 for v in value)):
            raise ValueError(f"needs 3 values from 0 to 255 (one per channel, in pixel units), got {value}")
        return value

    @field_validator("allowed_batch_sizes", "detect_batch_sizes", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        if isinstance(value, str):  # "1,2,4,8" or "[1, 2, 4, 8]"
            return [int(v) for v in value.strip("[] ").split(",") if v.strip()]
        return value
