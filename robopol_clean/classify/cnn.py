"""The learned spot classifier: a small convolutional network on 64 x 64 cutouts.

Every detected spot is cut out of the frame (centred on the spot, padded at the
edges), put through :func:`normalise_cutouts` -- the **one** normalisation used by
training and inference, whose version and parameters are stored with the model --
and scored by a VGG-like network (three 3 x 3 convolutions with ReLU, each followed
by 2 x 2 max-pooling, dropout, a small dense layer and a sigmoid output; Adam and
binary cross-entropy), after the 3-convolution network of the original RoboPol
artifact work. The output ``p_cnn`` is the probability that the spot is an artifact
(an internal reflection streak, a compact ghost, a cosmic ray) rather than a spot of
a star.

A model is three files: ``<name>.keras`` (the network for training, saved without
optimizer state and loaded with ``safe_mode=True``), ``<name>.onnx`` (the same
network as an ONNX graph, :mod:`~robopol_clean.classify.onnx_export`, run for
inference with ONNX Runtime) and ``<name>.json`` (metadata: normalisation, cutout
size, threshold, training data and metrics, software versions, and the SHA-256 of
the ONNX file). No code is ever executed from a model file. The shipped model lives
in ``robopol_clean/data``.

Inference never imports Keras or TensorFlow: :meth:`CNNClassifier.load` runs the
ONNX graph; the Keras network is loaded only when asked for (:attr:`CNNClassifier.model`:
fine-tuning, saliency maps) or for an older model saved without its ONNX graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from .base import FrameScene, SpotClassifier
from .orphan import partner_evidence, scores_table

# Most of TensorFlow's C++ log messages are not for our users; a
# value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = [
    "ModelError",
    "NORMALISATION_VERSION",
    "DEFAULT_NORMALISATION",
    "CUTOUT_SIZE",
    "MODEL_FORMAT",
    "DEFAULT_MODEL_NAME",
    "ONNX_BATCH_SIZE",
    "KERAS_BATCH_SIZE",
    "normalise_cutouts",
    "spot_cutouts",
    "normalisation_params",
    "build_model",
    "compile_model",
    "save_model",
    "default_model_path",
    "default_threads",
    "read_metadata",
    "apply_logit_offset",
    "conv_layer_names",
    "OnnxNetwork",
    "CNNClassifier",
]

log = logging.getLogger(__name__)

#: Version of the cutout normalisation (:func:`spot_cutouts`, :func:`normalise_cutouts`);
#: stored in every model's metadata. Version 1: native pixels. Version 2: the frame is
#: first resampled so that its stellar FWHM spans ``fwhm_ref`` cutout pixels, so the
#: network sees every frame at the same seeing (a spot broader or sharper than the
#: frame's stars looks so whatever the night).
NORMALISATION_VERSION = 2

_NORMALISATIONS: dict[int, dict[str, Any]] = {
    1: {"version": 1, "stretch": "asinh",
        "k": 3.0,        # asinh softening, in units of the sky noise
        "scale": 0.25},  # final multiplier: keeps values of order 1 (asinh(1e4/3)*0.25 ~ 2.2)
    2: {"version": 2, "stretch": "asinh", "k": 3.0, "scale": 0.25,
        "fwhm_ref": 4.3},  # px: the stellar FWHM in the cutouts
}

#: Parameters of the current normalisation version (see :func:`normalise_cutouts`).
DEFAULT_NORMALISATION: dict[str, Any] = _NORMALISATIONS[NORMALISATION_VERSION]

#: Cutout side (px) of the shipped network.
CUTOUT_SIZE = 64

#: Identifier written into the metadata JSON of every model.
MODEL_FORMAT = "robopol_clean.cnn"
#: Version of the metadata layout.
MODEL_FORMAT_VERSION = 1

#: Base name of the shipped model in ``robopol_clean/data``.
DEFAULT_MODEL_NAME = "robopol_cnn"

#: Cutouts per ONNX Runtime call: small batches keep the layer activations in the CPU
#: caches (16 to 32 run 35 % faster than 256 on one core).
ONNX_BATCH_SIZE = 16
#: Cutouts per Keras call (each call has a large fixed cost).
KERAS_BATCH_SIZE = 256

#: Architectures offered by :func:`build_model`: convolution filters per block.
VARIANTS: dict[str, tuple[int, ...]] = {
    "3conv": (8, 16, 32),
    "4conv": (8, 16, 32, 64),
}


class ModelError(ValueError):
    """A model file or its metadata cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------
def normalisation_params(version: int = NORMALISATION_VERSION, **overrides) -> dict[str, Any]:
    """Parameters of a normalisation version, with optional overrides.

    Raises
    ------
    ValueError
        For an unknown version or parameter.
    """
    if int(version) not in _NORMALISATIONS:
        raise ValueError(f"unknown cutout normalisation version {version!r} "
                         f"(this robopol_clean knows versions {sorted(_NORMALISATIONS)})")
    params = dict(_NORMALISATIONS[int(version)])
    for key, value in overrides.items():
        if key not in params or key in ("version", "stretch"):
            raise ValueError(f"unknown normalisation parameter {key!r}")
        params[key] = float(value)
    if params["k"] <= 0 or params["scale"] <= 0 or params.get("fwhm_ref", 1.0) <= 0:
        raise ValueError("normalisation parameters k, scale and fwhm_ref must be positive")
    return params


def normalise_cutouts(cutouts: np.ndarray, sky: np.ndarray | float = 0.0,
                      sky_rms: np.ndarray | float = 1.0, *, version: int = NORMALISATION_VERSION,
                      params: dict[str, Any] | None = None) -> np.ndarray:
    """Turn raw cutouts into network input: sky-subtracted, in noise units, stretched.

    Version 1: ``z = (cutout - sky) / sky_rms`` (the significance of each pixel), then
    ``scale * asinh(z / k)``: linear within a few sigma of the sky, logarithmic above,
    so a 5-sigma streak and a 10^4-sigma star core both stay of order one and faint
    and bright sources are seen on a similar footing. The result is invariant to an
    additive sky level and to a common rescaling of data, sky and noise (a change of
    units or gain). Non-finite pixels (masked, or outside the frame when the cutouts
    were padded with NaN) are set to the sky level (0). Flat-topped (saturated or
    clipped) cores pass through unchanged: the network learns them from
    clipping augmentation in training (see :mod:`robopol_clean.training`).

    Parameters
    ----------
    cutouts : ndarray, shape (n, size, size)
        Cutouts in adu (any consistent unit).
    sky : float or ndarray of shape (n,)
        Local sky level under each cutout (same unit); 0 for background-subtracted data.
    sky_rms : float or ndarray of shape (n,)
        Sky noise per pixel (same unit). Non-positive or non-finite values are replaced
        by the median of the valid ones (1 when there are none), with a warning.
    version : int
        Normalisation version (must match the model's; see :data:`NORMALISATION_VERSION`).
    params : dict, optional
        Parameters of that version (default :func:`normalisation_params`). Models pass
        the ones stored in their metadata.

    Returns
    -------
    ndarray, shape (n, size, size), float32
    """
    if params is None:
        params = normalisation_params(version)
    elif int(params.get("version", version)) != int(version):
        raise ValueError(f"normalisation version mismatch: {version} vs params {params.get('version')}")
    normalisation_params(version)  # validates the version
    cut = np.asarray(cutouts, dtype=np.float32)
    if cut.ndim == 4 and cut.shape[-1] == 1:
        cut = cut[..., 0]
    if cut.ndim != 3:
        raise ValueError(f"cutouts must have shape (n, size, size), got {cut.shape}")
    n = cut.shape[0]
    sky = np.broadcast_to(np.asarray(sky, dtype=np.float32), (n,)).astype(np.float32)
    rms = np.broadcast_to(np.asarray(sky_rms, dtype=np.float32), (n,)).astype(np.float32)
    sky = np.where(np.isfinite(sky), sky, np.float32(0.0))
    bad = ~np.isfinite(rms) | (rms <= 0)
    if bad.any():
        good = rms[~bad]
        fill = float(np.median(good)) if good.size else 1.0
        log.warning("%d of %d cutouts have an invalid sky_rms; using %.3g", int(bad.sum()), n, fill)
        rms = np.where(bad, np.float32(fill), rms)
    # In place on one work array: this runs on every spot of every frame.
    inv = (np.float32(1.0) / (rms * np.float32(params["k"])))[:, None, None]
    if sky.any():
        z = cut - sky[:, None, None]
        z *= inv
    else:
        z = cut * inv
    np.arcsinh(z, out=z)
    z *= np.float32(params["scale"])
    np.copyto(z, np.float32(0.0), where=~np.isfinite(z))  # NaN/inf in, or overflow: sky
    return z


def spot_cutouts(data: np.ndarray, spots: Table, *, size: int = CUTOUT_SIZE,
                 background_subtracted: bool = True, fwhm: float | None = None,
                 version: int = NORMALISATION_VERSION,
                 params: dict[str, Any] | None = None) -> np.ndarray:
    """Normalised cutouts of every spot of an image: what the network sees.

    Training (:mod:`robopol_clean.training`) and inference (:class:`CNNClassifier`)
    both go through this function. Pixels outside the frame count as sky. From
    version 2 on, the image is resampled every ``fwhm / fwhm_ref`` pixels
    (:func:`~robopol_clean.cutouts.resampled_cutouts`) so that the frame's stars
    have the same width in every cutout.

    Parameters
    ----------
    data : ndarray
        The image (adu); background-subtracted when ``background_subtracted``.
    spots : Table
        Needs ``x``, ``y``, ``sky_rms`` and, for raw data, ``sky``.
    size : int
        Cutout side (px).
    background_subtracted : bool
        Use sky = 0 (the image already has its sky removed) instead of ``spots['sky']``.
    fwhm : float, optional
        The frame's stellar FWHM (px); default ``spots.meta['fwhm']`` (set by
        :func:`~robopol_clean.detection.detect_spots`). Needed from version 2 on.
    version, params
        Normalisation (see :func:`normalise_cutouts`).

    Returns
    -------
    ndarray, shape (len(spots), size, size), float32

    Raises
    ------
    ValueError
        If the normalisation needs the FWHM and none is given or known.
    """
    from ..cutouts import extract_cutouts, resampled_cutouts

    params = normalisation_params(version) if params is None else params
    if len(spots) == 0:
        return np.zeros((0, size, size), np.float32)
    x, y = np.asarray(spots["x"], float), np.asarray(spots["y"], float)
    data = np.asarray(data, np.float32)
    if int(version) >= 2:
        fwhm = spots.meta.get("fwhm") if fwhm is None else fwhm
        if fwhm is None or not np.isfinite(fwhm) or fwhm <= 0:
            raise ValueError(f"cutout normalisation version {version} needs the frame's stellar "
                             f"FWHM (got {fwhm!r}): pass fwhm= or set spots.meta['fwhm']")
        cut = resampled_cutouts(data, x, y, size, float(fwhm) / float(params["fwhm_ref"]), fill=np.nan)
    else:
        cut = extract_cutouts(data, x, y, size=size, fill=np.nan)
    sky = 0.0 if background_subtracted else np.asarray(spots["sky"], float)
    return normalise_cutouts(cut, sky, np.asarray(spots["sky_rms"], float), version=version, params=params)


# ---------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------
def build_model(variant: str = "3conv", size: int = CUTOUT_SIZE, seed: int | None = 0, *,
                dense_units: int = 32, dropout: float = 0.3, learning_rate: float = 1e-3,
                compile: bool = True):
    """Build the artifact network (uncompiled weights seeded by ``seed``).

    ``Input(size, size, 1)`` -> N x [Conv2D 3x3 + ReLU, MaxPool 2x2] -> Flatten ->
    Dropout -> Dense(``dense_units``, ReLU) -> Dense(1, sigmoid). ``"3conv"`` has
    8/16/32 filters (~71k parameters, ~0.3 MB on disk; ~15,000 cutouts/s on two
    CPU cores -- wider first layers cost 3x the time for no gain), ``"4conv"`` adds a
    64-filter block. Compiled with Adam and binary cross-entropy.

    Parameters
    ----------
    variant : {"3conv", "4conv"}
        Architecture.
    size : int
        Cutout side (px); a multiple of 2**n_blocks.
    seed : int or None
        Seed of the weight initialisers.
    dense_units, dropout, learning_rate : float
        Head width, dropout rate and Adam learning rate.
    compile : bool
        Compile with Adam + binary cross-entropy (+ accuracy and AUC metrics).

    Returns
    -------
    keras.Model
    """
    import keras

    if variant not in VARIANTS:
        raise ValueError(f"unknown CNN variant {variant!r} (use one of {sorted(VARIANTS)})")
    filters = VARIANTS[variant]
    if size % (2 ** len(filters)):
        raise ValueError(f"cutout size {size} must be a multiple of {2 ** len(filters)}")
    seeds = iter(range(0 if seed is None else int(seed) * 100, 10**9))

    def init():
        return keras.initializers.GlorotUniform(seed=None if seed is None else next(seeds))

    inputs = keras.Input(shape=(size, size, 1), name="cutout")
    x = inputs
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu", kernel_initializer=init(),
                                name=f"conv{i + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, seed=None if seed is None else int(seed), name="dropout")(x)
    x = keras.layers.Dense(dense_units, activation="relu", kernel_initializer=init(), name="dense")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init(), name="p_artifact")(x)
    model = keras.Model(inputs, outputs, name=f"robopol_cnn_{variant}")
    if compile:
        compile_model(model, learning_rate=learning_rate)
    return model


def compile_model(model, *, learning_rate: float = 1e-3) -> None:
    """Compile ``model`` with Adam, binary cross-entropy, accuracy and AUC."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])


def conv_layer_names(model) -> list[str]:
    """Names of the convolution layers (frozen in transfer learning)."""
    return [layer.name for layer in model.layers if layer.__class__.__name__ == "Conv2D"]


def save_model(model, path: str | os.PathLike, metadata: dict[str, Any], *,
               overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``<path>.keras`` (no optimizer), ``<path>.onnx`` and ``<path>.json``.

    The ONNX graph is exported with
    :func:`~robopol_clean.classify.onnx_export.keras_to_onnx` (needs the ``onnx``
    package), checked against the Keras network, and recorded in the metadata
    (``onnx``: file name, SHA-256, opset, check). The files are written to temporary
    names in the destination folder and moved into place, so a crash never leaves a
    half-written model. The metadata is completed with the format identifier and must
    hold a ``normalisation`` entry.

    Returns
    -------
    keras_path, json_path : Path
    """
    import keras

    from .onnx_export import keras_to_onnx, onnx_entry

    keras_path = Path(path)
    if keras_path.suffix != ".keras":
        keras_path = keras_path.with_name(keras_path.name + ".keras")
    json_path = keras_path.with_suffix(".json")
    if not overwrite and any(p.exists() for p in _model_files(keras_path)):
        raise FileExistsError(f"{keras_path}: model exists (use overwrite=True)")
    if "normalisation" not in metadata:
        raise ValueError("model metadata needs a 'normalisation' entry")
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION}
    meta.update(metadata)
    meta.setdefault("cutout_size", int(model.input_shape[1]))
    # A copy without optimizer state: smaller, and all inference needs.
    plain = keras.Model.from_config(model.get_config())
    for target, source in zip(plain.weights, model.weights):
        target.assign(source)
    onnx_bytes = keras_to_onnx(plain, metadata=meta)
    meta["onnx"] = onnx_entry(plain, onnx_bytes, keras_path.with_suffix(".onnx").name)
    _write_model_files(keras_path, meta, onnx_bytes, plain)
    return keras_path, json_path


def _model_files(keras_path: Path) -> tuple[Path, Path, Path]:
    """``<name>.keras``, ``<name>.onnx`` and ``<name>.json``."""
    return keras_path, keras_path.with_suffix(".onnx"), keras_path.with_suffix(".json")


def _write_model_files(keras_path: Path, metadata: dict[str, Any], onnx_bytes: bytes,
                       keras_model=None) -> None:
    """Write the ONNX graph, the metadata and (if given) the Keras network, atomically
    per file: each is written in a temporary folder beside it and moved into place."""
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    _, onnx_path, json_path = _model_files(keras_path)
    tmpdir = Path(tempfile.mkdtemp(dir=keras_path.parent, prefix=f".{keras_path.stem}."))
    try:
        written = []
        if keras_model is not None:
            with warnings.catch_warnings():
                # Keras 3.15 + numpy 2 emit a DeprecationWarning from inside `save`.
                warnings.filterwarnings("ignore", message=r"__array__ implementation",
                                        category=DeprecationWarning)
                keras_model.save(tmpdir / keras_path.name)
            written.append(keras_path)
        (tmpdir / onnx_path.name).write_bytes(onnx_bytes)
        (tmpdir / json_path.name).write_text(json.dumps(_jsonable(metadata), indent=2) + "\n")
        for final in [*written, onnx_path, json_path]:
            os.replace(tmpdir / final.name, final)
    finally:
        for leftover in tmpdir.glob("*"):
            leftover.unlink(missing_ok=True)
        tmpdir.rmdir()


def _jsonable(obj):
    """Convert numpy scalars/arrays (and paths) for strict JSON (non-finite -> null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def default_model_path() -> Path:
    """Path of the shipped model ``robopol_clean/data/robopol_cnn.keras``.

    The model's ``.onnx`` and ``.json`` files lie beside it.
    """
    return Path(str(resources.files("robopol_clean") / "data" / f"{DEFAULT_MODEL_NAME}.keras"))


def default_threads() -> int:
    """Threads for network inference: ``OMP_NUM_THREADS`` when set (Dask workers set it
    to 1), else the CPU cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), shortened."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------------
# Inference with ONNX Runtime
# ---------------------------------------------------------------------------------
class OnnxNetwork:
    """The network as an ONNX Runtime session on the CPU: what inference runs.

    Batches are spread over ``threads`` Python threads, each running the graph on one
    core (ONNX Runtime releases the GIL). Unlike ONNX Runtime's own intra-op threads,
    which meet after every layer and so wait for the slowest of them, this keeps its
    speed when other processes share the cores.

    Parameters
    ----------
    model : bytes
        The serialised ONNX graph (NHWC float32 input, one ``(n, 1)`` output).
    name : str
        The file it came from, for error messages.
    threads : int, optional
        Batches run at once (default :func:`default_threads`; 1 in a Dask worker).
    size : int, optional
        Expected cutout side; the graph's input must be ``(n, size, size, 1)``.

    Raises
    ------
    ModelError
        The bytes are not a graph ONNX Runtime can run, or its input/output shapes are
        not ``(n, size, size, 1) -> (n, 1)`` float32; one line naming the file.
    """

    def __init__(self, model: bytes, name: str, *, threads: int | None = None, size: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: nothing printed on normal use
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- any failure means an unusable file
            raise ModelError(f"{name}: cannot load the ONNX model ({_one_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        # Fixed dimensions are ints, the batch dimension a name.
        shape_in = tuple(inputs[0].shape) if len(inputs) == 1 else ()
        shape_out = tuple(outputs[0].shape) if len(outputs) == 1 else ()
        side = size if size else (shape_in[1:2] or [None])[0]
        if (shape_in[1:] != (side, side, 1) or not isinstance(side, int) or shape_out[1:] != (1,)
                or len(shape_out) != 2 or inputs[0].type != "tensor(float)"
                or outputs[0].type != "tensor(float)"):
            want = size or "size"
            raise ModelError(f"{name}: ONNX graph maps {shape_in} -> {shape_out}, "
                             f"expected float32 (n, {want}, {want}, 1) -> (n, 1)")
        self.input_name = inputs[0].name
        #: Keras-style shapes (batch dimension None).
        self.input_shape = (None, side, side, 1)
        self.output_shape = (None, 1)
        self.threads = default_threads() if threads is None else max(int(threads), 1)
        self._pool = None

    def predict(self, x: np.ndarray, batch_size: int = ONNX_BATCH_SIZE) -> np.ndarray:
        """Probabilities of ``(n, size, size, 1)`` float32 inputs, in batches; ``(n,)`` float64."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(len(x), np.float64)

        def run(start):
            feed = {self.input_name: x[start:start + batch_size]}
            out[start:start + batch_size] = self.session.run(None, feed)[0][:, 0]

        starts = range(0, len(x), batch_size)
        if self.threads == 1 or len(starts) == 1:
            for start in starts:
                run(start)
        else:
            if self._pool is None or self._pool[0] != os.getpid():  # threads do not survive a fork
                self._pool = os.getpid(), ThreadPoolExecutor(self.threads, thread_name_prefix="robopol-cnn")
            list(self._pool[1].map(run, starts))
        return out


def _load_keras(keras_path: Path, size: int):
    """The Keras network of a model file, loaded safely (no code runs from the file)."""
    if not keras_path.is_file():
        raise ModelError(f"{keras_path}: no such Keras model file (training, fine-tuning and "
                         "saliency maps need the .keras beside the .onnx)")
    import keras

    try:
        model = keras.saving.load_model(keras_path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 -- any failure means an unusable file
        raise ModelError(f"{keras_path}: cannot load the Keras model ({_one_line(exc)})") from None
    if tuple(model.input_shape[1:]) != (size, size, 1) or tuple(model.output_shape[1:]) != (1,):
        raise ModelError(f"{keras_path}: network maps {model.input_shape} -> {model.output_shape}, "
                         f"expected (None, {size}, {size}, 1) -> (None, 1)")
    return model


def _load_onnx(onnx_path: Path, entry: Any, size: int, threads: int | None) -> OnnxNetwork:
    """The ONNX graph of a model, after checking its SHA-256 against the metadata."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelError(f"{onnx_path.with_suffix('.json')}: metadata 'onnx' entry has no sha256")
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: no such ONNX model file (its metadata records one)")
    try:
        data = onnx_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{onnx_path}: cannot read the ONNX model ({_one_line(exc)})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelError(f"{onnx_path}: SHA-256 differs from the one in its metadata "
                         "(a modified or mismatched model file)")
    return OnnxNetwork(data, str(onnx_path), threads=threads, size=size)


# ---------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------
class CNNClassifier(SpotClassifier):
    """Score spots with a trained network (load once, reuse for every frame).

    Use :meth:`load` to create one. :meth:`score` implements the
    :class:`~robopol_clean.classify.base.SpotClassifier` interface on a
    :class:`~robopol_clean.classify.base.FrameScene`; :meth:`predict_spots` scores
    spots of any image given its spots table; :meth:`predict_cutouts` scores
    normalised cutouts.

    Parameters
    ----------
    model : OnnxNetwork or keras.Model
        The network run for inference (input ``(size, size, 1)``, one sigmoid output):
        the ONNX graph (what :meth:`load` gives) or a Keras network (during training).
    metadata : dict
        The model's metadata (normalisation, cutout size, threshold...).
    path : Path, optional
        The model's ``.keras`` path (its name; the ``.onnx`` and ``.json`` lie beside it).
    use_orphan_cue : bool
        Combine ``p_cnn`` with the instrument's partner cues (orphan and support,
        :func:`~robopol_clean.classify.orphan.combine_evidence`) in :meth:`score`
        (default True).
    batch_size : int, optional
        Cutouts per network call (default :data:`ONNX_BATCH_SIZE` or
        :data:`KERAS_BATCH_SIZE`).
    """

    name = "cnn"

    def __init__(self, model, metadata: dict[str, Any], path: Path | None = None, *,
                 use_orphan_cue: bool = True, batch_size: int | None = None):
        self.network = model
        self._keras = None if isinstance(model, OnnxNetwork) else model
        self.metadata = dict(metadata)
        self.path = None if path is None else Path(path)
        self.use_orphan_cue = use_orphan_cue
        if batch_size is None:
            batch_size = ONNX_BATCH_SIZE if isinstance(model, OnnxNetwork) else KERAS_BATCH_SIZE
        self.batch_size = int(batch_size)
        norm = self.metadata["normalisation"]
        self.normalisation_version = int(norm["version"])
        self.normalisation = normalisation_params(
            self.normalisation_version, **{k: v for k, v in norm.items() if k not in ("version", "stretch")})
        self.size = int(self.metadata.get("cutout_size", model.input_shape[1]))
        self.threshold = float(self.metadata.get("threshold", 0.5))
        self.logit_offset = float((self.metadata.get("calibration") or {}).get("logit_offset", 0.0))
        self._predict_fn = None

    @property
    def backend(self) -> str:
        """``"onnxruntime"`` or ``"keras"``: what :meth:`predict_cutouts` runs."""
        return "onnxruntime" if isinstance(self.network, OnnxNetwork) else "keras"

    @property
    def model(self):
        """The Keras network (training, fine-tuning, saliency maps).

        For a classifier running the ONNX graph it is loaded from ``<name>.keras`` on
        first use (this imports Keras and TensorFlow).
        """
        if self._keras is None:
            if self.path is None:
                raise ModelError("this classifier has no Keras network (no model path)")
            self._keras = _load_keras(self.path.with_suffix(".keras"), self.size)
        return self._keras

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, backend: str = "auto",
             threads: int | None = None, **kwargs) -> CNNClassifier:
        """Load a model and its metadata (``<name>.onnx`` or ``.keras``, and ``<name>.json``).

        Parameters
        ----------
        path : path-like, optional
            Any of the model's files (``.keras``, ``.onnx`` or ``.json``); default the
            shipped model.
        backend : {"auto", "onnx", "keras"}
            What runs inference. ``"auto"``: the ONNX graph when the metadata records
            one, else (an older model saved without it) the Keras network, with a log
            message; :func:`~robopol_clean.classify.onnx_export.export_model` adds the
            graph to such a model.
        threads : int, optional
            Cores running the ONNX graph (default :func:`default_threads`).
        **kwargs
            Passed to the constructor (``use_orphan_cue``, ``batch_size``).

        Raises
        ------
        ModelError
            Missing file, missing or invalid metadata, an ONNX file whose SHA-256 is not
            the one in the metadata, a file that is not an ONNX graph or Keras model (or
            would need unsafe deserialisation), or a network with the wrong input/output
            shape. One line naming the file.
        """
        if backend not in ("auto", "onnx", "keras"):
            raise ValueError(f"unknown backend {backend!r} (use 'auto', 'onnx' or 'keras')")
        given = default_model_path() if path is None else Path(path)
        keras_path, onnx_path, json_path = _model_files(given.with_suffix(".keras"))
        if not json_path.is_file() and not given.is_file():
            hint = (" (the shipped model is missing: train it with "
                    "robopol_clean.training.train_default_model)") if path is None else ""
            raise ModelError(f"{given}: no such model file{hint}")
        if given.suffix not in (".keras", ".onnx", ".json"):
            raise ModelError(f"{given}: not a model file (.keras, .onnx or .json)")
        metadata = read_metadata(json_path)
        size = int(metadata.get("cutout_size", CUTOUT_SIZE))
        entry = metadata.get("onnx")
        if backend == "keras" or (backend == "auto" and entry is None):
            if backend == "auto":
                log.info("%s: no ONNX graph in the metadata; running the Keras network", json_path)
            network = _load_keras(keras_path, size)
        else:
            if entry is None:
                raise ModelError(f"{json_path}: the model has no ONNX graph (add one with "
                                 "robopol_clean.classify.onnx_export.export_model)")
            network = _load_onnx(onnx_path, entry, size, threads)
        return cls(network, metadata, keras_path, **kwargs)

    # -- prediction ---------------------------------------------------------------
    def _keras_predictor(self):
        if self._predict_fn is None:
            import tensorflow as tf

            model = self.network

            @tf.function(reduce_retracing=True)
            def predict(x):
                return model(x, training=False)

            self._predict_fn = predict
        return self._predict_fn

    def _predict_keras(self, x: np.ndarray, bs: int) -> np.ndarray:
        n = x.shape[0]
        out = np.empty(n, np.float64)
        predict = self._keras_predictor()
        for start in range(0, n, bs):
            chunk = x[start:start + bs]
            if chunk.shape[0] < bs and n > bs:
                # Pad the last batch to the traced shape: no retracing.
                pad = np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], np.float32)
                p = predict(np.concatenate([chunk, pad])).numpy()[: chunk.shape[0], 0]
            else:
                p = predict(chunk).numpy()[:, 0]
            out[start:start + chunk.shape[0]] = p
        return out

    def predict_cutouts(self, cutouts_normalised: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Artifact probability of normalised cutouts, computed in batches.

        Parameters
        ----------
        cutouts_normalised : ndarray, shape (n, size, size) or (n, size, size, 1)
            Output of :func:`normalise_cutouts` with this model's parameters.
        batch_size : int, optional
            Cutouts per network call (default the classifier's); bounds memory.

        Returns
        -------
        ndarray, shape (n,), float64 in [0, 1]
            The network output, shifted by the model's calibration (``logit_offset``
            in the metadata) when it has one.
        """
        x = np.asarray(cutouts_normalised, np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != (self.size, self.size, 1):
            raise ValueError(f"cutouts must have shape (n, {self.size}, {self.size}[, 1]), got {x.shape}")
        bs = int(batch_size or self.batch_size)
        if x.shape[0] == 0:
            return np.empty(0, np.float64)
        if isinstance(self.network, OnnxNetwork):
            out = self.network.predict(x, bs)
        else:
            out = self._predict_keras(x, bs)
        if self.logit_offset:
            out = apply_logit_offset(out, self.logit_offset)
        return out

    def normalise(self, cutouts: np.ndarray, sky=0.0, sky_rms=1.0) -> np.ndarray:
        """:func:`normalise_cutouts` with this model's version and parameters."""
        return normalise_cutouts(cutouts, sky, sky_rms, version=self.normalisation_version,
                                 params=self.normalisation)

    def predict_spots(self, data: np.ndarray, spots: Table, *, background_subtracted: bool = False,
                      fwhm: float | None = None, profile=None) -> np.ndarray:
        """``p_cnn`` of every spot of an image.

        Parameters
        ----------
        data : ndarray
            The image (adu).
        spots : Table
            Needs ``x``, ``y``, ``sky_rms`` and, unless ``background_subtracted``,
            ``sky`` (the local sky level subtracted from each cutout).
        background_subtracted : bool
            ``data`` already has its sky removed (as in a FrameScene): use sky = 0.
        fwhm : float, optional
            The frame's stellar FWHM (px; default ``spots.meta['fwhm']``), for models
            whose normalisation resamples to a common seeing.
        profile : InstrumentProfile, optional
            Unused (accepted for interface symmetry).

        Returns
        -------
        ndarray, shape (len(spots),)
        """
        if len(spots) == 0:
            return np.zeros(0)
        x = spot_cutouts(data, spots, size=self.size, background_subtracted=background_subtracted,
                         fwhm=fwhm, version=self.normalisation_version, params=self.normalisation)
        return self.predict_cutouts(x)

    def score(self, scene: FrameScene) -> Table:
        """Score every spot of a frame (the SpotClassifier interface).

        Returns
        -------
        Table
            ``p_cnn`` (the network), ``p_orphan`` and ``partner_support`` (the partner
            cues of :func:`~robopol_clean.classify.orphan.partner_evidence`; 0 and
            False when disabled) and ``p_artifact``, their combination
            (:func:`~robopol_clean.classify.orphan.combine_evidence`).
        """
        p_cnn = self.predict_spots(scene.data, scene.spots, background_subtracted=True, fwhm=scene.fwhm)
        return scores_table("p_cnn", p_cnn, partner_evidence(scene) if self.use_orphan_cue else None)

    def describe(self) -> dict:
        """Name, model file, inference backend, normalisation and threshold, for provenance."""
        return {"name": self.name, "model": None if self.path is None else self.path.name,
                "backend": self.backend,
                "model_version": self.metadata.get("name"),
                "normalisation": dict(self.normalisation),
                "orphan_cue": self.use_orphan_cue, "threshold": self.threshold,
                "logit_offset": self.logit_offset}


def apply_logit_offset(p: np.ndarray, offset: float) -> np.ndarray:
    """``sigmoid(logit(p) + offset)``: a prior-shift recalibration of probabilities.

    A network trained on balanced classes outputs probabilities for a 50 % artifact
    prior; real frames hold far fewer artifacts among their detections. Adding
    ``log(prior_ratio)`` to the logit moves the probabilities to another prior without
    changing their ranking (so the AUC is unchanged).
    """
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p) + float(offset))))


def read_metadata(json_path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a model's metadata JSON.

    Raises
    ------
    ModelError
        Missing file, invalid JSON, wrong format, or an unknown normalisation.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise ModelError(f"{json_path}: model metadata file is missing (a model needs its .json)")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{json_path}: cannot read model metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelError(f"{json_path}: not robopol_clean model metadata (format != {MODEL_FORMAT!r})")
    norm = meta.get("normalisation")
    if not isinstance(norm, dict) or "version" not in norm:
        raise ModelError(f"{json_path}: metadata has no normalisation entry")
    try:
        normalisation_params(int(norm["version"]),
                             **{k: v for k, v in norm.items() if k not in ("version", "stretch")})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{json_path}: {exc}") from None
    return meta
