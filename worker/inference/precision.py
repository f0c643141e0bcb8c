"""Which arithmetic serves the model: float32, or the reduced path the hardware supports when it is clearly faster
and exact enough.

The reduced path is a Keras mixed policy: ``mixed_bfloat16`` on a CPU with bfloat16 instructions (``amx_bf16`` or
``avx512_bf16`` in ``/proc/cpuinfo``), ``mixed_float16`` on a GPU; variables stay float32 and the model's output
layer computes in float32. ``auto`` builds it only on such hardware, embeds the probe faces that ship with the
package (``worker/inference/data``) with both paths, and keeps the reduced one only when it is at least
:data:`MIN_SPEEDUP` times faster, its embeddings' cosine to float32 is at least :data:`MIN_COSINE` on every face and
no pair's same/different decision at the model's threshold changes.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from worker.inference.engine import Engine, interleaved_seconds
from worker.inference.model import FaceModel
from worker.inference.preprocess import preprocess

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic
MIN_SPEEDUP = 1.15  # the reduced path must be this much faster (best call time of each, interleaved)
MIN_COSINE = 0.9995  # on every probe face, cosine(reduced, float32) at least this
TIMING_ROUNDS = 3
PROBE_DIR = Path(__file__).resolve().parent / "data"
PRECISION_NAMES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as ``/proc/cpuinfo`` describes its first processor: model name and feature flags."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Whether the CPU has bfloat16 arithmetic (AMX or AVX512_BF16)."""
        return any(flag in self.flags for flag in BF16_FLAGS)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    """The text of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS: no bf16 is assumed)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_info(source: Callable[[], str] = read_cpuinfo) -> CpuInfo:
    """Parse the first processor's ``model name`` and ``flags`` from ``source()`` (``/proc/cpuinfo`` text)."""
    model, flags = "unknown", ""
    for line in source().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value
        if model != "unknown" and flags:
            break
    return CpuInfo(model=model, flags=frozenset(flags.split()))


def reduced_policy(cpu: CpuInfo, gpu: bool) -> str | None:
    """The Keras mixed policy this hardware runs faster than float32, or None: float16 on a GPU, bfloat16 on a CPU
    with bf16 flags."""
    if gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu.bf16 else None


def precision_name(policy: str) -> str:
    """``float32`` / ``bfloat16`` / ``float16``: what results, logs and metrics call a policy."""
    return PRECISION_NAMES.get(policy, policy)


class ReducedUnavailable(Exception):
    """The model cannot be rebuilt in reduced precision (the message says why)."""


def reduced_variant(model: FaceModel, policy: str) -> FaceModel:
    """``model`` rebuilt under the Keras mixed ``policy`` with the same weights; its output layer stays float32.

    Any functional or sequential Keras model works (deepface's ArcFace, a ``.keras`` or full-model ``.h5``). Raises
    :class:`ReducedUnavailable` for a SavedModel (served as saved) or a model Keras cannot clone layer by layer.
    """
    import keras

    source = model.keras_model
    if source is None:
        raise ReducedUnavailable(
            "a SavedModel runs as it was saved; reduced precision needs a Keras model (.keras or full-model .h5)"
        )
    output_layers = {id(t._keras_history[0]) for t in source.outputs if hasattr(t, "_keras_history")}

    def rebuild(layer: Any) -> Any:
        config = layer.get_config()
        config["dtype"] = "float32" if id(layer) in output_layers else keras.DTypePolicy(policy)
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(source, clone_function=rebuild)
        clone.set_weights(source.get_weights())
    except Exception as exc:  # custom or subclassed layers: Keras says what it could not rebuild
        raise ReducedUnavailable(f"Keras cannot rebuild the model under {policy}: {type(exc).__name__}: {exc}") from exc
    return dataclasses.replace(model, fn=clone, keras_model=clone, precision=precision_name(policy))


def probe_faces(size: int, directory: Path = PROBE_DIR) -> tuple[np.ndarray, list[str]]:
    """The packaged probe crops preprocessed for a ``size`` x ``size`` model, and each one's person."""
    paths = sorted(directory.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"{directory}: the probe faces are missing from the installed package")
    return np.stack([preprocess(p.read_bytes(), size) for p in paths]), [p.stem.rstrip("0123456789") for p in paths]


@dataclass(frozen=True)
class Fidelity:
    """How a reduced path's embeddings compare with float32's on the probe faces."""

    cosine_min: float
    pairs: int
    decisions_changed: int

    @property
    def ok(self) -> bool:
        """Exact enough: every face's cosine >= :data:`MIN_COSINE` and no pair decided differently."""
        return self.cosine_min >= MIN_COSINE and self.decisions_changed == 0


def fidelity(full: np.ndarray, low: np.ndarray, threshold: float) -> Fidelity:
    """Compare two sets of L2-normalised embeddings of the same faces: the smallest cosine between a face's two
    embeddings, and how many pairs of faces change their ``distance <= threshold`` decision."""
    cosine = np.sum(full.astype(np.float64) * low.astype(np.float64), axis=1)
    changed, pairs = 0, 0
    for a, b in itertools.combinations(range(len(full)), 2):
        pairs += 1
        same_full = 1.0 - float(full[a] @ full[b]) <= threshold
        same_low = 1.0 - float(low[a] @ low[b]) <= threshold
        changed += same_full != same_low
    return Fidelity(cosine_min=float(cosine.min()), pairs=pairs, decisions_changed=changed)


@dataclass(frozen=True)
class PrecisionChoice:
    """What serves the model and why; the measurements when there were any."""

    precision: str  # float32 / bfloat16 / float16
    reason: str
    speedup: float | None = None  # reduced images/s over float32's, on the probe batch
    cosine_min: float | None = None
    decisions_changed: int | None = None
    measured: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_precision(
    full: Engine,
    setting: str,
    cpu: CpuInfo,
    gpu: bool,
    rounds: int = TIMING_ROUNDS,
    build: Callable[[FaceModel, str], FaceModel] = reduced_variant,
) -> tuple[Engine, PrecisionChoice]:
    """Decide ``ARCFACE_PRECISION=auto`` for the float32 engine ``full``: the engine to serve and the choice.

    Without reduced hardware nothing is built. Otherwise the reduced engine is built, both embed the probe faces
    (once to warm and compare, then ``rounds`` interleaved timed runs), and it is kept only when at least
    :data:`MIN_SPEEDUP` times faster with :class:`Fidelity` ok. ``setting`` other than ``auto`` is returned as it is
    (the caller built that engine).
    """
    if setting != "auto":
        return full, PrecisionChoice(full.precision, f"ARCFACE_PRECISION={setting}")
    policy = reduced_policy(cpu, gpu)
    if policy is None:
        return full, PrecisionChoice("float32", "no bf16 hardware (no amx_bf16 or avx512_bf16 CPU flag)")
    name = precision_name(policy)
    try:
        low = Engine(build(full.model, policy), full.allowed_batch_sizes)
    except ReducedUnavailable as exc:
        return full, PrecisionChoice("float32", f"{name} unavailable: {exc}")
    faces, _ = probe_faces(full.model.input_size)
    check = fidelity(full.embed(faces), low.embed(faces), full.model.threshold)
    cosine_min, changed = round(check.cosine_min, 6), check.decisions_changed
    if not check.ok:
        return full, PrecisionChoice(
            "float32",
            f"{name} changes embeddings: cosine min {check.cosine_min:.5f} (needs {MIN_COSINE}), "
            f"{check.decisions_changed} of {check.pairs} pair decisions changed",
            cosine_min=cosine_min,
            decisions_changed=changed,
            measured=True,
        )
    seconds = interleaved_seconds({"full": lambda: full.embed(faces), "low": lambda: low.embed(faces)}, rounds)
    speedup = round(min(seconds["full"]) / min(seconds["low"]), 3)
    if speedup < MIN_SPEEDUP:
        return full, PrecisionChoice(
            "float32",
            f"{name} not faster by {MIN_SPEEDUP}x: {speedup:.2f}x",
            speedup=speedup,
            cosine_min=cosine_min,
            decisions_changed=changed,
            measured=True,
        )
    return low, PrecisionChoice(
        name,
        f"{name} {speedup:.2f}x faster, cosine min {check.cosine_min:.5f}, no pair decision changed",
        speedup=speedup,
        cosine_min=cosine_min,
        decisions_changed=changed,
        measured=True,
    )
