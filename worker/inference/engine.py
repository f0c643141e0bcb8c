"""The compiled, batched inference engine. Knows nothing of Redis or rq.

A ``tf.function`` runs on a few fixed batch shapes (``allowed_batch_sizes``, TF Serving's term): a batch
is zero-padded up to the next allowed size, so after warm-up nothing is ever traced again.
"""

from __future__ import annotations

import bisect
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from producer.contract.defaults import DEFAULT_ALLOWED_BATCH_SIZES
from producer.contract.metric import cosine_distance
from worker.inference.decode_checks import DEFAULT_LIMITS, DecodeLimits
from worker.inference.model import FaceModel
from worker.inference.preprocess import preprocess


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0) -> list[str]:
    """Thread counts (0 = TensorFlow's default) and GPU memory growth; call before any model is built.

    Returns the visible GPU names (empty on CPU). With a GPU, TensorFlow places the model there itself.
    """
    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return [g.name for g in gpus]


def reduced_precision_policy() -> str:
    """The Keras mixed policy for ``precision=reduced``: float16 on a GPU, bfloat16 on a CPU."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


@dataclass
class Verification:
    distance: float
    threshold: float
    similar: bool


class Engine:
    """Batched embeddings from a :class:`~worker.inference.model.FaceModel` on fixed batch shapes."""

    def __init__(self, model: FaceModel, allowed_batch_sizes: Sequence[int] = DEFAULT_ALLOWED_BATCH_SIZES) -> None:
        if not allowed_batch_sizes or min(allowed_batch_sizes) < 1:
            raise ValueError(f"allowed_batch_sizes must be positive integers, got {allowed_batch_sizes!r}")
        self.model = model
        self.allowed_batch_sizes = tuple(sorted(set(int(b) for b in allowed_batch_sizes)))
        self.max_batch_size = self.allowed_batch_sizes[-1]
        self.input_shape = (model.input_size, model.input_size, 3)
        self._predict = tf.function(self._forward, autograph=False)

    def _forward(self, x: tf.Tensor) -> tf.Tensor:
        if self.model.bgr:
            x = tf.reverse(x, axis=[-1])
        if self.model.mean is not None:
            x = x - tf.constant(self.model.mean, tf.float32)
        x = x * self.model.scale + self.model.offset
        if self.model.keras_model is not None:
            y = self.model.keras_model(x, training=False)
        else:
            y = self.model.fn(x)
        return tf.math.l2_normalize(tf.cast(y, tf.float32), axis=1)

    @property
    def trace_count(self) -> int:
        """How many times the compiled predict has been traced (one per allowed size once warm)."""
        return int(self._predict.experimental_get_tracing_count())

    def padded_size(self, n: int) -> int:
        """The allowed batch size a batch of ``n`` runs at (``n`` <= ``max_batch_size``)."""
        return self.allowed_batch_sizes[bisect.bisect_left(self.allowed_batch_sizes, n)]

    def warm_up(self) -> float:
        """Trace and run every allowed batch size once; returns the seconds it took."""
        start = time.perf_counter()
        for size in self.allowed_batch_sizes:
            self._predict(tf.zeros((size, *self.input_shape), tf.float32)).numpy()
        return time.perf_counter() - start

    def warm_up_to(self, cap: int) -> float:
        """Trace and run the allowed sizes up to ``cap`` (the worker never runs larger batches)."""
        start = time.perf_counter()
        for size in self.allowed_batch_sizes:
            if size <= cap:
                self._predict(tf.zeros((size, *self.input_shape), tf.float32)).numpy()
        return time.perf_counter() - start

    def time_batch_sizes(self, min_seconds: float = 0.3) -> dict[int, float]:
        """Images/s of each allowed size (traced first; each timed for at least ``min_seconds`` or one call)."""
        rates: dict[int, float] = {}
        for size in self.allowed_batch_sizes:
            x = tf.random.uniform((size, *self.input_shape), 0.0, 255.0)
            self._predict(x).numpy()
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < min_seconds:
                self._predict(x).numpy()
                calls += 1
            rates[size] = size * calls / (time.perf_counter() - start)
        return rates

    def embed(self, batch: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]`` for preprocessed inputs ``[N, S, S, 3]`` (0..255)."""
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1:] != self.input_shape:
            raise ValueError(f"expected a batch of shape [N, {self.input_shape}], got {arr.shape}")
        out = np.empty((len(arr), self.model.embedding_dim), np.float32)
        for start in range(0, len(arr), self.max_batch_size):
            chunk = arr[start : start + self.max_batch_size]
            size = self.padded_size(len(chunk))
            if size != len(chunk):
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *self.input_shape), np.float32)])
            out[start : start + self.max_batch_size] = self._predict(tf.constant(chunk)).numpy()[
                : min(len(arr) - start, self.max_batch_size)
            ]
        return out

    def embed_images(
        self, images: Iterable[bytes | np.ndarray], limits: DecodeLimits = DEFAULT_LIMITS, pool: Executor | None = None
    ) -> np.ndarray:
        """Preprocess (in ``pool`` when given) and embed encoded images or decoded arrays."""
        items = list(images)
        size = self.model.input_size
        inputs = (
            list(pool.map(lambda im: preprocess(im, size, limits), items))
            if pool
            else [preprocess(im, size, limits) for im in items]
        )
        return self.embed(np.stack(inputs)) if inputs else np.empty((0, self.model.embedding_dim), np.float32)

    def verify(self, a: np.ndarray, b: np.ndarray, threshold: float | None = None) -> Verification:
        """Compare two embeddings: cosine distance and ``similar = distance <= threshold``."""
        t = self.model.threshold if threshold is None else threshold
        d = cosine_distance(a, b)
        return Verification(distance=d, threshold=t, similar=d <= t)


def choose_batch_size(rates: dict[int, float], prefer_large: bool, tolerance: float = 0.03) -> int:
    """The batch cap from measured images/s: the fastest size; with ``prefer_large`` (a GPU, where larger batches
    also absorb bursts) the largest size within ``tolerance`` of the fastest."""
    best = max(rates.values())
    if prefer_large:
        return max(size for size, rate in rates.items() if rate >= best * (1.0 - tolerance))
    return max(rates, key=lambda size: rates[size])


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))
