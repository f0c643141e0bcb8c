"""ArcFace ResNet34 exactly as deepface builds it (and as the seed's TF.js ``model.json`` describes it).

Layer names match deepface's / the seed's one for one, because weight files are matched by name.
The four unnamed head layers get the names Keras 2 gave them in deepface's published file
(``batch_normalization``, ``dropout``, ``flatten``, ``dense``); we name them explicitly so that the
names do not depend on how many models a process has already built.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
from keras import layers

from producer.contract.defaults import DEFAULT_INPUT_SCALE, DEFAULT_THRESHOLD
from worker.inference.weights import (
    WeightsError,
    assign_weights,
    check_weight_values,
    read_keras_h5_weights,
    read_tfjs_weights,
)

INPUT_SIZE = 112
EMBEDDING_DIM = 512
PARAMETER_COUNT = 34_165_184
_BN = {"epsilon": 2e-5, "momentum": 0.9}


def _block(x: Any, filters: int, stride: int, conv_shortcut: bool, name: str, dtype: Any) -> Any:
    if conv_shortcut:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv", dtype=dtype)(x)
        shortcut = layers.BatchNormalization(axis=3, name=f"{name}_0_bn", dtype=dtype, **_BN)(shortcut)
    else:
        shortcut = x
    x = layers.BatchNormalization(axis=3, name=f"{name}_1_bn", dtype=dtype, **_BN)(x)
    x = layers.ZeroPadding2D(padding=1, name=f"{name}_1_pad", dtype=dtype)(x)
    x = layers.Conv2D(filters, 3, strides=1, use_bias=False, name=f"{name}_1_conv", dtype=dtype)(x)
    x = layers.BatchNormalization(axis=3, name=f"{name}_2_bn", dtype=dtype, **_BN)(x)
    x = layers.PReLU(shared_axes=[1, 2], name=f"{name}_1_prelu", dtype=dtype)(x)
    x = layers.ZeroPadding2D(padding=1, name=f"{name}_2_pad", dtype=dtype)(x)
    x = layers.Conv2D(filters, 3, strides=stride, use_bias=False, name=f"{name}_2_conv", dtype=dtype)(x)
    x = layers.BatchNormalization(axis=3, name=f"{name}_3_bn", dtype=dtype, **_BN)(x)
    return layers.Add(name=f"{name}_add", dtype=dtype)([shortcut, x])


def _stack(x: Any, filters: int, blocks: int, name: str, dtype: Any) -> Any:
    x = _block(x, filters, 2, True, f"{name}_block1", dtype)
    for i in range(2, blocks + 1):
        x = _block(x, filters, 1, False, f"{name}_block{i}", dtype)
    return x


def build_arcface(precision: str = "float32") -> keras.Model:
    """Build the ArcFace ResNet34 graph (randomly initialised; load weights with :mod:`worker.inference.weights`).

    ``precision`` is ``"float32"`` or a Keras mixed policy such as ``"mixed_bfloat16"`` /
    ``"mixed_float16"``: convolutions then run in reduced precision while variables stay float32,
    and the final ``embedding`` BatchNorm always computes in float32.
    """
    dtype: Any = None if precision == "float32" else keras.DTypePolicy(precision)
    inputs = keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), name="input_1")
    x = layers.ZeroPadding2D(padding=1, name="conv1_pad", dtype=dtype)(inputs)
    x = layers.Conv2D(64, 3, strides=1, use_bias=False, name="conv1_conv", dtype=dtype)(x)
    x = layers.BatchNormalization(axis=3, name="conv1_bn", dtype=dtype, **_BN)(x)
    x = layers.PReLU(shared_axes=[1, 2], name="conv1_prelu", dtype=dtype)(x)
    for filters, blocks, name in ((64, 3, "conv2"), (128, 4, "conv3"), (256, 6, "conv4"), (512, 3, "conv5")):
        x = _stack(x, filters, blocks, name, dtype)
    x = layers.BatchNormalization(name="batch_normalization", dtype=dtype, **_BN)(x)
    x = layers.Dropout(0.4, name="dropout", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    x = layers.Dense(EMBEDDING_DIM, name="dense", dtype=dtype)(x)
    embedding = layers.BatchNormalization(name="embedding", dtype="float32", **_BN)(x)
    return keras.Model(inputs, embedding, name="ResNet34")


# --- loading any supported source into one served model ---------------------------------------------
@dataclass
class FaceModel:
    """A loaded embedding network plus what the engine must know to feed it.

    ``fn`` maps a float32 NHWC batch (already normalised) to raw embeddings. ``scale``/``offset`` turn the
    preprocessed 0..255 RGB pixels into the model's input: channels reversed when ``bgr``, ``mean`` subtracted,
    then ``x * scale + offset`` (ArcFace: /255).
    """

    name: str
    fn: Callable[[Any], Any]
    input_size: int
    embedding_dim: int
    scale: float = DEFAULT_INPUT_SCALE
    offset: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    keras_model: keras.Model | None = None
    mean: tuple[float, float, float] | None = None  # subtracted per channel (in the model's channel order)
    bgr: bool = False
    precision: str = "float32"  # what the network computes in: float32, bfloat16 or float16


def _arcface(weights: dict[str, np.ndarray], source: str, precision: str, name: str) -> FaceModel:
    check_weight_values(weights, source)
    model = build_arcface(precision)
    assign_weights(model, weights, source)
    computes = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(precision, "float32")
    return FaceModel(
        name=name,
        fn=model,
        input_size=INPUT_SIZE,
        embedding_dim=EMBEDDING_DIM,
        keras_model=model,
        precision=computes,
    )


def _custom(model: Any, source: str, name: str) -> FaceModel:
    """Wrap a user's Keras model or SavedModel signature: one 4-D image input, one 2-D output."""
    if isinstance(model, keras.Model):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise WeightsError(
                f"{source}: the model must have one input and one output, "
                f"has {len(model.inputs)} and {len(model.outputs)}"
            )
        in_shape, out_shape, fn = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape), model
    else:
        sig = model.signatures.get("serving_default")
        if sig is None:
            raise WeightsError(f"{source}: SavedModel has no 'serving_default' signature")
        inputs = sig.structured_input_signature[1]
        outputs = sig.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise WeightsError(
                f"{source}: serving_default must have one input and one output, has {len(inputs)} and {len(outputs)}"
            )
        (in_key, in_spec), (out_key, out_spec) = next(iter(inputs.items())), next(iter(outputs.items()))
        in_shape, out_shape = tuple(in_spec.shape), tuple(out_spec.shape)

        def fn(x: Any, _sig: Any = sig, _in: str = in_key, _out: str = out_key, _owner: Any = model) -> Any:
            # _owner keeps the loaded SavedModel (and so its variables) alive as long as fn lives.
            return _sig(**{_in: x})[_out]

    if len(in_shape) != 4 or in_shape[3] != 3 or in_shape[1] is None or in_shape[1] != in_shape[2]:
        raise WeightsError(f"{source}: input must be a square RGB image batch [N, S, S, 3], got {in_shape}")
    if len(out_shape) != 2 or out_shape[1] is None:
        raise WeightsError(f"{source}: output must be a 2-D embedding batch [N, D], got {out_shape}")
    return FaceModel(
        name=name,
        fn=fn,
        input_size=int(in_shape[1]),
        embedding_dim=int(out_shape[1]),
        keras_model=model if isinstance(model, keras.Model) else None,
    )


def load_face_model(
    path: str | os.PathLike[str],
    *,
    precision: str = "float32",
    name: str = "arcface",
    scale: float = DEFAULT_INPUT_SCALE,
    offset: float = 0.0,
    threshold: float = DEFAULT_THRESHOLD,
    mean: tuple[float, float, float] | None = None,
    bgr: bool = False,
) -> FaceModel:
    """Load a model from any supported source, detected from the file itself.

    - deepface's ``arcface_weights.h5`` (Keras HDF5 *weights*) or a TF.js layers ``model.json`` (+ shards):
      the ArcFace ResNet34 is built and every tensor assigned by name (``precision`` applies);
    - a full Keras model (``.keras``, or ``.h5`` with a model config) or a SavedModel directory: served as
      it is.
    ``scale``, ``offset``, ``mean``, ``bgr`` (how pixels become the model's input) and ``threshold`` describe the
    served model, whatever its source. Anything else raises :class:`~worker.inference.weights.WeightsError` naming the
    problem.
    """
    model = _load_network(Path(path), precision, name)
    return dataclasses.replace(model, scale=scale, offset=offset, threshold=threshold, mean=mean, bgr=bgr)


def _load_network(p: Path, precision: str, name: str) -> FaceModel:
    source = str(p)
    if not p.exists():
        raise WeightsError(f"{source}: no such file or directory")
    if p.is_dir():
        if (p / "saved_model.pb").exists():
            import tensorflow as tf

            return _custom(tf.saved_model.load(source), source, name)
        if (p / "model.json").exists():
            p = p / "model.json"
        else:
            raise WeightsError(
                f"{source}: directory is neither a SavedModel (saved_model.pb) nor a TF.js model (model.json)"
            )
    if p.suffix == ".json":
        return _load_tfjs(p, precision, name)
    head = p.read_bytes()[:8] if p.is_file() else b""
    if p.suffix == ".keras" or head.startswith(b"PK"):
        return _custom(keras.models.load_model(p, compile=False), source, name)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return _load_h5(p, source, precision, name)
    raise WeightsError(
        f"{source}: matches no supported format "
        "(deepface .h5 weights, TF.js model.json, .keras, .h5 model, SavedModel directory)"
    )


def _load_tfjs(p: Path, precision: str, name: str) -> FaceModel:
    """A TF.js layers ``model.json`` (+ shards): the ArcFace ResNet34 with its weights."""
    try:
        fmt = json.loads(p.read_text()).get("format")
    except ValueError as exc:
        raise WeightsError(f"{p}: not valid JSON ({exc})") from None
    if fmt != "layers-model":
        raise WeightsError(
            f"{p}: TF.js format {fmt!r} is not a layers model; ArcFace needs the seed's layers model.json"
        )
    return _arcface(read_tfjs_weights(p), str(p), precision, name)


def _load_h5(p: Path, source: str, precision: str, name: str) -> FaceModel:
    """An HDF5 file: a full Keras model (a ``model_config`` attribute) or deepface's ArcFace weights."""
    import h5py

    try:
        with h5py.File(p, "r") as f:
            full_model = "model_config" in f.attrs
    except OSError as exc:
        raise WeightsError(f"{source}: not a readable HDF5 file ({exc})") from None
    if full_model:
        return _custom(keras.models.load_model(p, compile=False), source, name)
    return _arcface(read_keras_h5_weights(p), source, precision, name)
