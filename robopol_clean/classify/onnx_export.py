"""Exact export of the artifact network from Keras to ONNX (no converter needed).

Training stays in Keras; inference runs the ONNX graph with ONNX Runtime (see
:class:`~robopol_clean.classify.cnn.CNNClassifier`). The network is a plain chain of a
few layer kinds, so the graph is written node by node with :mod:`onnx.helper` from
the layer weights:

==================  ===============================================================
Keras layer         ONNX nodes
==================  ===============================================================
``Conv2D``          ``Conv`` (kernel ``(kh, kw, cin, cout)`` -> ``(cout, cin, kh, kw)``;
                    'same' padding made explicit) + activation
``MaxPooling2D``    ``MaxPool`` ('valid' padding)
``Flatten``         ``Flatten``; the next ``Dense`` kernel's rows are permuted from the
                    Keras (h, w, c) order to the graph's (c, h, w) order
``Dropout``         nothing (identity at inference)
``Dense``           ``Gemm`` + activation (``relu``, ``sigmoid`` or ``linear``)
==================  ===============================================================

The graph takes the Keras input layout, NHWC ``(n, size, size, 1)`` float32 (named
``cutout``), transposes it once to the NCHW layout of ONNX and returns ``(n, 1)``
(``p_artifact``). Any other layer, option or topology is refused with a ValueError
naming the layer. The file is reproducible: the same weights give the same bytes
(fixed opset and IR version, no timestamps). Needs the ``onnx`` package (a training
dependency); running the graph needs only ``onnxruntime``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OPSET", "IR_VERSION", "INPUT_NAME", "OUTPUT_NAME", "keras_to_onnx", "onnx_entry",
           "export_model"]

#: ONNX operator set of the exported graphs (every node used exists unchanged since 13).
OPSET = 13
#: ONNX IR version matching :data:`OPSET`.
IR_VERSION = 7
#: Graph input (NHWC float32 cutouts) and output (sigmoid probability) names.
INPUT_NAME = "cutout"
OUTPUT_NAME = "p_artifact"

_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "linear": None}


def _refuse(layer, why: str):
    raise ValueError(f"cannot export layer {layer.name!r} ({layer.__class__.__name__}) to ONNX: {why}")


def _activation(layer, cfg: dict[str, Any]) -> str | None:
    act = cfg.get("activation", "linear")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        _refuse(layer, f"activation {act!r} (known: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)


def keras_to_onnx(model, *, metadata: dict[str, Any] | None = None) -> bytes:
    """Serialised ONNX model of a Keras chain network: the same function, to float32 rounding.

    Parameters
    ----------
    model : keras.Model
        A chain of Conv2D, MaxPooling2D, Flatten, Dropout and Dense layers with one
        ``(size, size, channels)`` input (see
        :func:`~robopol_clean.classify.cnn.build_model`).
    metadata : dict, optional
        Model metadata; its ``normalisation`` and ``cutout_size`` entries are copied
        into the ONNX ``metadata_props`` (as JSON) so that the file describes its input.

    Returns
    -------
    bytes
        The ONNX ``ModelProto`` (opset :data:`OPSET`), identical for identical weights.

    Raises
    ------
    ValueError
        A layer kind, option (strides, dilation, groups, data format, activation) or
        topology the exporter does not know, named in the message.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"cannot export {model.name!r} to ONNX: needs one input and one output")
    in_shape = tuple(model.inputs[0].shape)
    if len(in_shape) != 4:
        raise ValueError(f"cannot export {model.name!r} to ONNX: input shape {in_shape} is not "
                         "(n, height, width, channels)")
    h, w, c = (int(v) for v in in_shape[1:])
    nodes, inits = [], []
    # Shape (c, h, w) of the current tensor while it is an image; None once flattened.
    image: tuple[int, int, int] | None = (c, h, w)
    pending_perm: np.ndarray | None = None  # row order of the Dense kernel after Flatten
    current = "nchw_input"
    nodes.append(helper.make_node("Transpose", [INPUT_NAME], [current], perm=[0, 3, 1, 2]))
    previous = model.inputs[0]

    def emit(op, inputs, name, **attrs):
        nonlocal current
        out = f"{name}_{op.lower()}"
        nodes.append(helper.make_node(op, [current, *inputs], [out], name=out, **attrs))
        current = out

    def weight(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    for layer in model.layers:
        kind = layer.__class__.__name__
        if kind == "InputLayer":
            continue
        if layer.input is not previous:
            _refuse(layer, "the network is not a simple chain of layers")
        previous = layer.output
        cfg = layer.get_config()
        if (kind in ("Conv2D", "MaxPooling2D", "Flatten")
                and cfg.get("data_format", "channels_last") != "channels_last"):
            _refuse(layer, f"data_format {cfg['data_format']!r}")
        if kind == "Conv2D":
            if image is None:
                _refuse(layer, "a convolution after Flatten")
            if (_pair(cfg["strides"]) != (1, 1) or _pair(cfg["dilation_rate"]) != (1, 1)
                    or int(cfg.get("groups", 1)) != 1):
                _refuse(layer, "only strides 1, dilation 1 and groups 1 are supported")
            act = _activation(layer, cfg)
            kernel, *bias = layer.get_weights()
            kh, kw, cin, cout = kernel.shape
            if cfg["padding"] == "same":  # TensorFlow puts the odd pixel at the end
                pads = [(kh - 1) // 2, (kw - 1) // 2, kh // 2, kw // 2]
            elif cfg["padding"] == "valid":
                pads = [0, 0, 0, 0]
                image = (image[0], image[1] - kh + 1, image[2] - kw + 1)
            else:
                _refuse(layer, f"padding {cfg['padding']!r}")
            inputs = [weight(f"{layer.name}_kernel", kernel.transpose(3, 2, 0, 1))]
            if bias:
                inputs.append(weight(f"{layer.name}_bias", bias[0]))
            emit("Conv", inputs, layer.name, kernel_shape=[int(kh), int(kw)], pads=pads)
            image = (int(cout), image[1], image[2])
            if act:
                emit(act, [], layer.name)
        elif kind == "MaxPooling2D":
            if image is None:
                _refuse(layer, "pooling after Flatten")
            if cfg["padding"] != "valid":
                _refuse(layer, f"padding {cfg['padding']!r}")
            pool = _pair(cfg["pool_size"])
            strides = _pair(cfg["strides"] or pool)
            emit("MaxPool", [], layer.name, kernel_shape=list(pool), strides=list(strides))
            image = (image[0], (image[1] - pool[0]) // strides[0] + 1,
                     (image[2] - pool[1]) // strides[1] + 1)
        elif kind == "Flatten":
            if image is None:
                _refuse(layer, "a second Flatten")
            ch, hh, ww = image
            # Keras flattens (h, w, c); the graph flattens (c, h, w).
            pending_perm = np.arange(hh * ww * ch).reshape(hh, ww, ch).transpose(2, 0, 1).ravel()
            emit("Flatten", [], layer.name, axis=1)
            image = None
        elif kind == "Dropout":
            continue
        elif kind == "Dense":
            if image is not None:
                _refuse(layer, "a Dense layer on an image (add Flatten)")
            act = _activation(layer, cfg)
            kernel, *bias = layer.get_weights()
            if pending_perm is not None:
                kernel, pending_perm = kernel[pending_perm], None
            if not bias:
                bias = [np.zeros(kernel.shape[1], np.float32)]
            emit("Gemm", [weight(f"{layer.name}_kernel", kernel), weight(f"{layer.name}_bias", bias[0])],
                 layer.name)
            if act:
                emit(act, [], layer.name)
        else:
            _refuse(layer, "unknown layer kind (known: Conv2D, MaxPooling2D, Flatten, Dropout, Dense)")
    if previous is not model.outputs[0] or image is not None:
        raise ValueError(f"cannot export {model.name!r} to ONNX: its output is not the last layer's "
                         "flat output")
    n_out = int(model.outputs[0].shape[-1])
    nodes[-1].output[0] = OUTPUT_NAME
    graph = helper.make_graph(
        nodes, str(model.name),
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", h, w, c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", n_out])],
        initializer=inits)
    props = {}
    for key in ("normalisation", "cutout_size"):
        if metadata and key in metadata:
            props[f"robopol_clean.{key}"] = json.dumps(metadata[key], sort_keys=True)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="robopol_clean",
                              doc_string="RoboPol spot artifact network (exported from Keras)")
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(deterministic=True)


def export_model(keras_path: str | os.PathLike, *, n_check: int = 512, atol: float = 1e-5) -> Path:
    """Add the ONNX graph to a saved model: writes ``<name>.onnx``, updates ``<name>.json``.

    For models saved before inference moved to ONNX Runtime (they have only
    ``<name>.keras`` and ``<name>.json``). The Keras network is loaded safely, exported
    with :func:`keras_to_onnx` and checked against Keras on ``n_check`` seeded random
    cutouts; the metadata gains the ``onnx`` entry (file, SHA-256, opset, check) and
    keeps everything else.

    Parameters
    ----------
    keras_path : path-like
        The model's ``.keras`` file.
    n_check : int
        Random cutouts on which Keras and ONNX Runtime must agree.
    atol : float
        Largest accepted absolute difference of the probabilities.

    Returns
    -------
    Path
        The ``.onnx`` file.

    Raises
    ------
    ModelError
        The model cannot be loaded, or the two disagree by more than ``atol``.
    """
    from .cnn import CNNClassifier, _write_model_files, read_metadata

    keras_path = Path(keras_path)
    metadata = read_metadata(keras_path.with_suffix(".json"))
    clf = CNNClassifier.load(keras_path, backend="keras")
    onnx_bytes = keras_to_onnx(clf.model, metadata=metadata)
    metadata["onnx"] = onnx_entry(clf.model, onnx_bytes, keras_path.with_suffix(".onnx").name,
                                  n_check=n_check, atol=atol)
    _write_model_files(keras_path, metadata, onnx_bytes)
    return keras_path.with_suffix(".onnx")


def onnx_entry(model, onnx_bytes: bytes, filename: str, *, n_check: int = 512,
               atol: float = 1e-5) -> dict[str, Any]:
    """The metadata entry of an exported graph, after checking it against Keras.

    The two networks score ``n_check`` seeded normal random cutouts (scaled like
    normalised ones); their probabilities must agree within ``atol``.

    Raises
    ------
    ModelError
        If they do not.
    """
    from .cnn import ModelError, OnnxNetwork

    size = int(model.input_shape[1])
    x = (np.random.default_rng(0).standard_normal((n_check, size, size, 1)) * 0.5).astype(np.float32)
    p_keras = np.asarray(model(x, training=False), np.float64)[:, 0]
    p_onnx = OnnxNetwork(onnx_bytes, filename, threads=1).predict(x)
    diff = float(np.max(np.abs(p_keras - p_onnx))) if n_check else 0.0
    if not diff <= atol:
        raise ModelError(f"{filename}: the exported ONNX graph differs from the Keras network by "
                         f"{diff:.2g} (> {atol:g})")
    return {"file": filename, "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "opset": OPSET,
            "input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "NHWC",
            "check": {"n_cutouts": int(n_check), "max_abs_diff": diff}}
