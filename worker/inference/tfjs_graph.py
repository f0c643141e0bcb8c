"""TF.js *graph* models (``model.json`` whose ``modelTopology`` is a GraphDef in JSON, plus weight shards)
run in TensorFlow, without the ``tensorflowjs`` package.

The GraphDef is interpreted node by node inside a ``tf.function``: every node becomes standard TensorFlow
ops, so the TF.js-only ops are rewritten on the way (``_FusedConv2D`` lacking TF's attributes,
``FusedDepthwiseConv2dNative``, ``_FusedMatMul``, ``Prelu``). Fused biases are added with ``AddV2`` of a
broadcast constant rather than ``BiasAdd``: TensorFlow 2.21's CPU remapper re-fuses
Conv2D+BiasAdd+AddV2+Relu in BlazeFace's residual blocks into a oneDNN kernel that crashes
(shared/models/README.md). Batch sizes other than the graph's hard-coded 1 work: a ``Reshape`` to a
constant shape with a leading 1 keeps the batch dimension of its input.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from worker.inference.weights import WeightsError, read_tfjs_weights

_DTYPES = {"DT_FLOAT": tf.float32, "DT_INT32": tf.int32, "DT_INT64": tf.int64, "DT_BOOL": tf.bool}


def _attr(node: dict, name: str, default: Any = None) -> Any:
    value = node.get("attr", {}).get(name)
    if value is None:
        return default
    if "list" in value:
        lst = value["list"]
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(v).decode() for v in lst["s"]]
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    return value


def _activation(x: tf.Tensor, op: str, extra: list[tf.Tensor], node: dict) -> tf.Tensor:
    if op == "Relu":
        return tf.nn.relu(x)
    if op == "Relu6":
        return tf.nn.relu6(x)
    if op == "Elu":
        return tf.nn.elu(x)
    if op == "Sigmoid":
        return tf.sigmoid(x)
    if op == "Tanh":
        return tf.tanh(x)
    if op == "LeakyRelu":
        return tf.nn.leaky_relu(x, alpha=_attr(node, "leakyrelu_alpha", 0.2))
    if op == "Prelu":
        return _prelu(x, extra[0])
    raise WeightsError(f"node {node['name']!r}: fused activation {op!r} is not supported")


def _prelu(x: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    return tf.nn.relu(x) - alpha * tf.nn.relu(-x)


def _bias(x: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    # AddV2 of a [1, ..., C] constant instead of BiasAdd: see the module docstring.
    return tf.math.add(x, tf.reshape(b, [1] * (len(x.shape) - 1) + [-1]))


def _fused(node: dict, y: tf.Tensor, args: list[tf.Tensor]) -> tf.Tensor:
    fused = _attr(node, "fused_ops", [])
    extra = list(args)
    for op in fused:
        if op == "BiasAdd":
            y = _bias(y, extra.pop(0))
        elif op == "FusedBatchNorm":
            raise WeightsError(f"node {node['name']!r}: fused batch norm is not supported")
        else:
            y = _activation(y, op, extra, node)
    return y


def _padding(node: dict) -> Any:
    padding = _attr(node, "padding", "VALID")
    if padding == "EXPLICIT":
        p = _attr(node, "explicit_paddings", [])
        return [[p[i], p[i + 1]] for i in range(0, len(p), 2)]
    return padding


_CONV_OPS = frozenset(
    {"_FusedConv2D", "Conv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative", "_FusedMatMul", "MatMul"}
)


_STRUCTURAL_OPS = frozenset({"Reshape", "Pad", "MaxPool", "AvgPool", "Mean", "ConcatV2"})


def _conv(op: str, node: dict, args: list[tf.Tensor]) -> tf.Tensor:
    """Convolutions and matrix products, fused (bias and activation) or not."""
    if op == "_FusedConv2D":
        y = tf.nn.conv2d(
            args[0],
            args[1],
            strides=_attr(node, "strides"),
            padding=_padding(node),
            dilations=_attr(node, "dilations", [1, 1, 1, 1]),
        )
        return _fused(node, y, args[2:])
    if op == "Conv2D":
        return tf.nn.conv2d(
            args[0],
            args[1],
            strides=_attr(node, "strides"),
            padding=_padding(node),
            dilations=_attr(node, "dilations", [1, 1, 1, 1]),
        )
    if op in ("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
        dilations = _attr(node, "dilations", [1, 1, 1, 1])  # NHWC: the spatial ones are [1:3]
        y = tf.nn.depthwise_conv2d(
            args[0], args[1], strides=_attr(node, "strides"), padding=_padding(node), dilations=dilations[1:3]
        )
        return _fused(node, y, args[2:]) if op == "FusedDepthwiseConv2dNative" else y
    if op == "_FusedMatMul":
        y = tf.linalg.matmul(
            args[0],
            args[1],
            transpose_a=_attr(node, "transpose_a", False),
            transpose_b=_attr(node, "transpose_b", False),
        )
        return _fused(node, y, args[2:])
    if op == "MatMul":
        return tf.linalg.matmul(
            args[0],
            args[1],
            transpose_a=_attr(node, "transpose_a", False),
            transpose_b=_attr(node, "transpose_b", False),
        )
    raise ValueError(f"not a convolution or matmul op: {op}")


class TfjsGraphModel:
    """A loaded TF.js graph model: call it on a float32 NHWC batch; returns its outputs by name."""

    def __init__(self, model_json: str | Path, outputs: list[str] | None = None) -> None:
        path = Path(model_json)
        try:
            doc = json.loads(path.read_text())
            self.nodes: dict[str, dict] = {n["name"]: n for n in doc["modelTopology"]["node"]}
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"{path}: not a TF.js graph model.json ({exc})") from None
        if doc.get("format") not in (None, "graph-model"):
            raise WeightsError(f"{path}: format {doc.get('format')!r} is not a graph model")
        self.weights = read_tfjs_weights(path)
        self.constants = {name: tf.constant(value) for name, value in self.weights.items()}
        missing = [n for n, node in self.nodes.items() if node["op"] == "Const" and n not in self.constants]
        if missing:
            raise WeightsError(f"{path}: Const node {missing[0]!r} has no tensor in the weights manifest")
        signature = (doc.get("userDefinedMetadata") or {}).get("signature") or doc.get("signature") or {}
        self.inputs = [n for n, node in self.nodes.items() if node["op"] == "Placeholder"]
        if len(self.inputs) != 1:
            raise WeightsError(f"{path}: expected one input placeholder, found {self.inputs}")
        sig_outputs = [k.split(":")[0] for k in signature.get("outputs", {})]
        self.outputs = outputs or sig_outputs
        if not self.outputs:
            raise WeightsError(f"{path}: no outputs named and none in the model's signature")
        for out in self.outputs:
            if out not in self.nodes:
                raise WeightsError(f"{path}: output {out!r} is not a node of the graph")
        self._fn = tf.function(self._run, autograph=False)

    def _run(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        cache: dict[str, tf.Tensor] = {self.inputs[0]: x}

        def value(name: str) -> tf.Tensor:
            name = name.split(":")[0].lstrip("^")
            if name not in cache:
                cache[name] = self._node(self.nodes[name], value)
            return cache[name]

        return {out: value(out) for out in self.outputs}

    def _structural(self, op: str, node: dict, args: list[tf.Tensor]) -> tf.Tensor:
        """Reshape, padding, pooling, mean and concatenation."""
        if op == "Reshape":
            shape = self.weights.get(node.get("input", ["", ""])[1].split(":")[0])
            if shape is not None and len(shape) and int(shape[0]) == 1:
                return tf.reshape(args[0], tf.concat([tf.shape(args[0])[:1], tf.constant(shape[1:], tf.int32)], 0))
            return tf.reshape(args[0], args[1])
        if op == "Pad":
            return tf.pad(args[0], args[1])
        if op in ("MaxPool", "AvgPool"):
            pool = tf.nn.max_pool2d if op == "MaxPool" else tf.nn.avg_pool2d
            return pool(args[0], ksize=_attr(node, "ksize"), strides=_attr(node, "strides"), padding=_padding(node))
        if op == "Mean":
            return tf.reduce_mean(args[0], axis=args[1], keepdims=_attr(node, "keep_dims", False))
        if op == "ConcatV2":
            return tf.concat(args[:-1], axis=args[-1])
        raise ValueError(f"not a structural op: {op}")

    def _node(self, node: dict, value: Callable[[str], tf.Tensor]) -> tf.Tensor:
        op = node["op"]
        if op == "Const":
            return self.constants[node["name"]]
        args = [value(i) for i in node.get("input", []) if not i.startswith("^")]
        if op in ("Identity", "StopGradient", "Snapshot"):
            return args[0]
        if op in _CONV_OPS:
            return _conv(op, node, args)
        if op == "BiasAdd":
            return _bias(args[0], args[1])
        if op == "Prelu":
            return _prelu(args[0], args[1])
        if op in _STRUCTURAL_OPS:
            return self._structural(op, node, args)
        binary = {
            "Add": tf.math.add,
            "AddV2": tf.math.add,
            "Sub": tf.math.subtract,
            "Mul": tf.math.multiply,
            "RealDiv": tf.math.divide,
            "Maximum": tf.math.maximum,
            "Minimum": tf.math.minimum,
        }
        if op in binary:
            return binary[op](args[0], args[1])
        unary = {
            "Relu": tf.nn.relu,
            "Relu6": tf.nn.relu6,
            "Sigmoid": tf.sigmoid,
            "Tanh": tf.tanh,
            "Softmax": tf.nn.softmax,
            "Elu": tf.nn.elu,
            "Exp": tf.exp,
            "Sqrt": tf.sqrt,
            "Rsqrt": tf.math.rsqrt,
            "Square": tf.square,
        }
        if op in unary:
            return unary[op](args[0])
        raise WeightsError(f"node {node['name']!r}: op {op!r} is not supported by the TF.js graph loader")

    def __call__(self, x: np.ndarray | tf.Tensor) -> dict[str, np.ndarray]:
        out = self._fn(tf.convert_to_tensor(x, tf.float32))
        return {k: v.numpy() for k, v in out.items()}

    @property
    def function(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
        """The compiled function (for composing into a larger graph)."""
        return self._fn
