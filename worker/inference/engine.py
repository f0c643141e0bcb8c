"""The compiled, batched inference engine. Knows nothing of Redis or rq.

One ``tf.function``, traced once for any batch size, runs on a few fixed batch shapes (``allowed_batch_sizes``,
TF Serving's term): a batch is zero-padded up to the next allowed size, so the kernels (oneDNN, cuDNN) see only
those shapes and nothing is ever traced again. The batch cap is chosen by :func:`choose_batch_size`.
"""

from __future__ import annotations

import bisect
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

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
        # one trace for every batch size (a trace per size cost ~0.8 s each on 2 cores, most of a start)
        signature = [tf.TensorSpec((None, *self.input_shape), tf.float32)]
        self._predict = tf.function(self._forward, autograph=False, input_signature=signature)
        self._ran: set[int] = set()  # batch sizes run at least once (warm)

    @property
    def precision(self) -> str:
        """The arithmetic the model computes in: ``float32``, ``bfloat16`` or ``float16``."""
        return self.model.precision

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
        """How many times the compiled predict has been traced (one, whatever the batch size)."""
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
        """Run each allowed size up to ``cap`` (the worker never runs larger batches) that has not run yet."""
        start = time.perf_counter()
        for size in self.allowed_batch_sizes:
            if size <= cap and size not in self._ran:
                self._run(tf.zeros((size, *self.input_shape), tf.float32))
        return time.perf_counter() - start

    def batch_seconds(self, sizes: Sequence[int], rounds: int) -> dict[int, list[float]]:
        """Seconds of each of ``rounds`` runs of a batch of each size, interleaved (one of each size per round);
        the inputs are fixed pseudo-random images, the same at every start."""
        rng = np.random.default_rng(0)
        inputs = {s: tf.constant(rng.uniform(0, 255, (s, *self.input_shape)).astype(np.float32)) for s in sizes}
        calls: dict[Any, Callable[[], Any]] = {s: functools.partial(self._run, inputs[s]) for s in sizes}
        return interleaved_seconds(calls, rounds)

    def _run(self, x: tf.Tensor) -> np.ndarray:
        out = self._predict(x).numpy()
        self._ran.add(int(x.shape[0]))
        return out

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
            out[start : start + self.max_batch_size] = self._run(tf.constant(chunk))[
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


BATCH_TOLERANCE = 0.10  # a larger batch is preferred while within 10 % of the fastest size's images/s
CPU_BATCH_CANDIDATES = (8, 16, 32)


def interleaved_seconds(calls: dict[Any, Callable[[], Any]], rounds: int) -> dict[Any, list[float]]:
    """Run every call once per round, in turn, ``rounds`` times: the seconds of each run, by key. Interleaving
    spreads a noisy neighbour's load over all candidates instead of one."""
    seconds: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[key].append(time.perf_counter() - start)
    return seconds


def batch_candidates(allowed: Sequence[int], gpu: bool) -> tuple[int, ...]:
    """The batch sizes worth timing: on a CPU the allowed ones among 8, 16 and 32 (smaller ones waste the
    convolutions' vector width; beyond 32 images/s stays flat and one call takes seconds); on a GPU every allowed
    size from 8 up. Where none qualifies, the largest allowed size alone."""
    sizes = tuple(s for s in sorted(allowed) if s >= 8 and (gpu or s in CPU_BATCH_CANDIDATES))
    return sizes or (max(allowed),)


def batch_rates(seconds: dict[int, list[float]]) -> dict[int, float]:
    """Images/s of each size from its fastest run (the run least disturbed by other work on the machine)."""
    return {size: size / min(runs) for size, runs in seconds.items()}


def choose_batch_size(seconds: dict[int, list[float]], tolerance: float = BATCH_TOLERANCE) -> int:
    """The batch cap from timed runs (seconds per call, by batch size): the largest size whose images/s (from its
    fastest run) is within ``tolerance`` of the fastest size's. Larger batches also absorb bursts, and on the flat
    part of the curve the largest wins every time instead of whichever the noise favoured."""
    rates = batch_rates(seconds)
    best = max(rates.values())
    return max(size for size, rate in rates.items() if rate >= best * (1.0 - tolerance))


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))
