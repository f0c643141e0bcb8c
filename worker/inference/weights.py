"""Finding and reading weight files: deepface's Keras HDF5 weights, the seed's TF.js layers model,
and the checks that tell usable weights from a file of zeros.

Every reader returns ``{"layer/variable": ndarray}``; :func:`assign_weights` checks the whole set against
the model (missing, unexpected, wrong shape: the first mismatch is named) before it touches a single
variable, so a half-filled model is never served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from producer.contract.errors import ModelLoadError


class WeightsError(ModelLoadError, RuntimeError):
    """A weight file that cannot be used: wrong format, missing or extra tensors, wrong shapes."""


# --- TF.js layers model ----------------------------------------------------------------------------
_TFJS_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "bool": np.dtype("u1")}
_TFJS_QUANT = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "float16": np.dtype("<f2")}


def _tfjs_entry_bytes(entry: dict[str, Any]) -> tuple[int, np.dtype]:
    count = int(np.prod(entry["shape"], dtype=np.int64))
    quant = entry.get("quantization")
    if quant:
        dtype = _TFJS_QUANT.get(quant["dtype"])
        if dtype is None:
            raise WeightsError(f"{entry['name']}: unsupported quantization dtype {quant['dtype']!r}")
    else:
        dtype = _TFJS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightsError(f"{entry['name']}: unsupported dtype {entry['dtype']!r}")
    dt: Any = np.dtype(dtype)  # type: ignore[call-overload]
    return count * dt.itemsize, dt


def _dequantize(raw: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    quant = entry.get("quantization")
    if not quant:
        return raw
    if quant["dtype"] == "float16":
        return raw.astype(np.float32)
    # uint8/uint16 affine quantization: value = q * scale + min (tfjs-converter's layout).
    return (raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])).astype(np.float32)


def read_tfjs_weights(model_json: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of a TF.js ``model.json`` weights manifest from its binary shards.

    Shards are the files in each group's ``paths`` (next to ``model.json``), concatenated in order;
    entries are consumed from that buffer in manifest order (little-endian; quantized entries are
    expanded to float32). A short or over-long group is an error.
    """
    path = Path(model_json)
    try:
        manifest = json.loads(path.read_text())["weightsManifest"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{path}: not a TF.js model.json with a weightsManifest ({exc})") from None
    out: dict[str, np.ndarray] = {}
    for gi, group in enumerate(manifest):
        try:
            buffer = b"".join((path.parent / p).read_bytes() for p in group["paths"])
        except OSError as exc:
            raise WeightsError(f"{path}: weight shard missing for group {gi}: {exc}") from None
        offset = 0
        for entry in group["weights"]:
            nbytes, dtype = _tfjs_entry_bytes(entry)
            if offset + nbytes > len(buffer):
                raise WeightsError(
                    f"{path}: shards of group {gi} end before tensor {entry['name']!r} "
                    f"(need {offset + nbytes} bytes, have {len(buffer)})"
                )
            raw = np.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
            out[entry["name"]] = _dequantize(raw, entry).reshape(entry["shape"])
            offset += nbytes
        if offset != len(buffer):
            raise WeightsError(
                f"{path}: group {gi} shards hold {len(buffer)} bytes but the manifest describes {offset}"
            )
    return out


# --- Keras HDF5 weights ----------------------------------------------------------------------------
def _attr_strings(value: Any) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in value]


def read_keras_h5_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a Keras HDF5 weights file into ``layer/variable`` names.

    Understands the Keras 2 / tf-keras layout that deepface's ``arcface_weights.h5`` uses (root attribute
    ``layer_names``, per layer ``weight_names`` such as ``conv1_bn/gamma:0``), the same inside a full-model
    file (``model_weights`` group), and Keras 3's ``.weights.h5`` layout (``layers/<name>/vars/<i>``),
    which stores variables by position, so it needs ``model`` to name them.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        out: dict[str, np.ndarray] = {}
        if "layer_names" in root.attrs:
            for layer in _attr_strings(root.attrs["layer_names"]):
                group = root[layer]
                for wname in _attr_strings(group.attrs.get("weight_names", [])):
                    var = wname.split("/")[-1].split(":")[0]
                    out[f"{layer}/{var}"] = np.asarray(group[wname])
            return out
    raise WeightsError(
        f"{path}: HDF5 file holds no Keras weights (no 'layer_names' attribute); a Keras 3 .weights.h5 stores "
        "weights by position, not name: save the whole model as .keras instead"
    )


def save_deepface_h5(model: Any, path: str | os.PathLike[str], keras2_names: bool = True) -> Path:
    """Write ``model``'s weights in the layout of deepface's ``arcface_weights.h5`` (Keras 2 ``save_weights``:
    root ``layer_names``, per layer ``weight_names`` like ``conv1_bn/gamma:0``, datasets under those names)."""
    import h5py

    out = Path(path)
    with h5py.File(out, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.8.0"
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = []
            for var in layer.weights:
                short = var.name.split("/")[-1].split(":")[0]
                name = f"{layer.name}/{short}:0" if keras2_names else f"{layer.name}/{short}"
                names.append(name.encode())
                group.create_dataset(name, data=np.asarray(var.numpy()))
            group.attrs["weight_names"] = np.array(names)
    return out


# --- assignment ------------------------------------------------------------------------------------
def variable_names(model: Any) -> dict[str, Any]:
    """Map ``layer/variable`` names (the TF.js manifest's and the HDF5 file's naming) to model variables."""
    out: dict[str, Any] = {}
    for layer in model.layers:
        for var in layer.weights:
            out[f"{layer.name}/{var.name.split('/')[-1].split(':')[0]}"] = var
    return out


def assign_weights(model: Any, weights: dict[str, np.ndarray], source: str) -> None:
    """Check ``weights`` against every variable of ``model`` by name and shape, then assign them all.

    Raises :class:`WeightsError` naming the first missing, unexpected or wrongly shaped tensor; in that
    case no variable has been changed.
    """
    variables = variable_names(model)
    for name, var in variables.items():
        if name not in weights:
            raise WeightsError(
                f"{source}: no tensor for model variable {name!r} "
                f"({len(weights)} tensors in the file, {len(variables)} expected)"
            )
        if tuple(weights[name].shape) != tuple(var.shape):
            raise WeightsError(
                f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, the model needs {tuple(var.shape)}"
            )
    extra = sorted(set(weights) - set(variables))
    if extra:
        raise WeightsError(f"{source}: tensor {extra[0]!r} matches no model variable ({len(extra)} unexpected)")
    for name, var in variables.items():
        var.assign(weights[name].astype(np.float32, copy=False))


# --- sanity ----------------------------------------------------------------------------------------
def check_weight_values(weights: dict[str, np.ndarray], source: str) -> None:
    """Refuse weights no trained or freshly initialised network has: none at all, a non-finite value, or a
    kernel that is all zeros (what a file cut short while it was written reads back as).

    Raises :class:`WeightsError` naming the first such tensor and how many there are.
    """
    if not weights:
        raise WeightsError(f"{source}: holds no weights")
    bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
    if bad:
        raise WeightsError(
            f"{source}: tensor {bad[0]!r} holds NaN or infinite values ({len(bad)} such tensors): "
            "the file is damaged; delete it (or download it again)"
        )
    zero = [name for name, w in weights.items() if name.endswith("/kernel") and not np.any(w)]
    if zero:
        raise WeightsError(
            f"{source}: kernel {zero[0]!r} is all zeros ({len(zero)} of "
            f"{sum(name.endswith('/kernel') for name in weights)} kernels): the file is damaged or was cut short "
            "while it was written; delete it (or download it again)"
        )


def check_weights_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`WeightsError` unless ``path`` is a deepface-layout HDF5 or TF.js weights file whose
    tensors pass :func:`check_weight_values`."""
    p = Path(path)
    if p.suffix == ".json":
        check_weight_values(read_tfjs_weights(p), str(p))
        return
    try:
        weights = read_keras_h5_weights(p)
    except (OSError, KeyError, ValueError) as exc:  # h5py's errors for a file cut short inside a dataset
        raise WeightsError(f"{p}: unreadable HDF5 weights ({exc})") from None
    check_weight_values(weights, str(p))
