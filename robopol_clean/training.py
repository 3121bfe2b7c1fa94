"""Training of the artifact CNN.

:func:`train` trains (or fine-tunes) a network on a
:class:`~robopol_clean.datasets.CutoutDataset` with a validation split by frame, flip
and clipping augmentation, class weights and early stopping, optionally recalibrates
its output, and writes the model, its metadata and an evaluation report. Every setting
that decides the model is a field of one :class:`TrainingConfig`, recorded in the
model's metadata (``training.config``). :func:`train_default_model` is the one command
that makes the shipped model (:data:`DEFAULT_MODEL_CONFIG`).

The labelled data come from :mod:`robopol_clean.datasets`; its public names are also
importable from here, where they were defined before.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .classify.cnn import (
    DEFAULT_MODEL_NAME,
    VARIANTS,
    CNNClassifier,
    build_model,
    compile_model,
    conv_layer_names,
    default_model_path,
    normalisation_params,
    save_model,
)

# Dataset names defined here before robopol_clean.datasets existed (kept importable).
from .datasets import (  # noqa: F401
    DEFAULT_ARTIFACT_KINDS,
    DEFAULT_IGNORE_KINDS,
    CutoutDataset,
    cutout_dataset_from_ds9,
    cutout_dataset_from_simulation,
    frame_cutouts,
    match_detections,
    synthetic_cutouts,
)

__all__ = [
    "TrainingConfig",
    "DEFAULT_MODEL_CONFIG",
    "TrainResult",
    "augment_batch",
    "split_by_frame",
    "train",
    "train_default_model",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides how a network is trained (not where it is written).

    The defaults train a new 3-convolution network; :data:`DEFAULT_MODEL_CONFIG` holds
    the settings of the shipped model. A trained model records its configuration in
    its metadata as ``training.config`` (:meth:`as_dict`), and
    ``TrainingConfig(**metadata["training"]["config"])`` rebuilds it.

    Attributes
    ----------
    variant : {"3conv", "4conv"}
        Architecture (ignored with ``init_from``: the starting model's is kept).
    epochs : int
        Upper limit of epochs (early stopping usually ends sooner).
    batch_size : int
        Cutouts per gradient step.
    seed : int
        Seeds weights, split, shuffling, augmentation and dropout
        (:func:`keras.utils.set_random_seed`); the same seed and data give the same
        model on the same machine.
    learning_rate : float, optional
        Adam learning rate (default 1e-3; 3e-4 when fine-tuning).
    init_from : str, optional
        Start from a trained model: ``"default"`` (the shipped one) or the path of a
        ``.keras`` file (transfer learning).
    freeze_conv : bool, optional
        Freeze the convolution layers, so only the dense head is retrained (default:
        True with ``init_from``, else False).
    val_fraction : float
        Fraction of the frames (or cutouts) held out for validation.
    val_split_by_frame : bool
        Hold out whole frames (default) rather than random cutouts: cutouts of one
        frame share its seeing, sky and artifacts.
    early_stopping : bool
        Stop when the validation loss has not improved for ``patience`` epochs and
        restore the best weights.
    patience : int
        Epochs without improvement before stopping.
    augment : bool
        Random flips and clipping of the training cutouts (see :func:`augment_batch`).
    clip_fraction : float
        Fraction of training cutouts clipped flat (saturation robustness).
    clip_sigma : (float, float)
        Range of clipping levels (sky sigma), drawn log-uniformly.
    class_weight : bool
        Weight classes inversely to their frequency.
    threshold : float
        Decision threshold on ``p_artifact``, stored in the metadata and used for the
        metrics.
    target_false_rejection : float, optional
        Recalibrate the output (a prior shift: a constant added to the logit, stored
        as ``calibration.logit_offset`` in the metadata and applied by
        :class:`~robopol_clean.classify.cnn.CNNClassifier`) so that this fraction of the
        validation star spots with SNR >= 10 reaches ``threshold``. Training uses
        balanced classes; real frames hold far fewer artifacts, and a rejected star
        spot costs a whole quadruplet. The ranking (AUC) is unchanged. None: no
        recalibration.
    """

    variant: str = "3conv"
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    learning_rate: float | None = None
    init_from: str | None = None
    freeze_conv: bool | None = None
    val_fraction: float = 0.2
    val_split_by_frame: bool = True
    early_stopping: bool = True
    patience: int = 5
    augment: bool = True
    clip_fraction: float = 0.4
    clip_sigma: tuple[float, float] = (4.0, 300.0)
    class_weight: bool = True
    threshold: float = 0.5
    target_false_rejection: float | None = None

    def __post_init__(self):
        # Canonical forms, so a configuration read back from JSON compares equal.
        if self.init_from is not None:
            object.__setattr__(self, "init_from", os.fspath(self.init_from))
        object.__setattr__(self, "clip_sigma", tuple(float(v) for v in self.clip_sigma))
        problems = [text for bad, text in (
            (self.variant not in VARIANTS, f"variant must be one of {sorted(VARIANTS)}"),
            (self.epochs < 1 or self.batch_size < 1, "epochs and batch_size must be >= 1"),
            (self.patience < 0, "patience must be >= 0"),
            (self.learning_rate is not None and not self.learning_rate > 0, "learning_rate must be > 0"),
            (not 0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (not 0 <= self.clip_fraction <= 1, "clip_fraction must be in [0, 1]"),
            (len(self.clip_sigma) != 2 or not 0 < self.clip_sigma[0] <= self.clip_sigma[1],
             "clip_sigma must be (low, high) with 0 < low <= high"),
            (not 0 < self.threshold < 1, "threshold must be in (0, 1)"),
            (self.target_false_rejection is not None and not 0 < self.target_false_rejection < 1,
             "target_false_rejection must be in (0, 1)"),
        ) if bad]
        if problems:
            raise ValueError("invalid TrainingConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed.

        Raises
        ------
        TypeError
            For a name that is not a field.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown training setting(s) {', '.join(map(repr, unknown))}; "
                            f"TrainingConfig fields: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``clip_sigma`` as a list)."""
        out = dataclasses.asdict(self)
        out["clip_sigma"] = list(self.clip_sigma)
        return out


#: The settings of the shipped model (:func:`train_default_model`, ``robopol-clean train``).
DEFAULT_MODEL_CONFIG = TrainingConfig(epochs=40, target_false_rejection=0.005)


def _with_overrides(config: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """``config`` with keyword overrides (the settings :func:`train` once took one by one)."""
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, not {type(config).__name__} "
                        "(give single settings as keywords, e.g. seed=1)")
    return config.replace(**overrides)


# ---------------------------------------------------------------------------------
# Augmentation and split
# ---------------------------------------------------------------------------------
def augment_batch(x: np.ndarray, rng: np.random.Generator, *, flips: bool = True,
                  clip_fraction: float = 0.4, clip_sigma: tuple[float, float] = (4.0, 300.0),
                  normalisation: dict | None = None) -> np.ndarray:
    """Random flips and saturation-like clipping of normalised cutouts (new array).

    - flips: horizontal and vertical, each with probability 1/2 (a reflection's tail
      may point either way; the network must not learn a direction);
    - clipping: a fraction of cutouts is cut flat at a level drawn log-uniformly in
      ``clip_sigma`` (in units of the sky noise), as a saturated or 8-bit-clipped
      frame would show them, and half of those also clipped from below at 0.5-3
      sigma under the sky (clipped display renderings). Clipping commutes with the
      monotonic stretch, so it is applied to normalised values directly.

    Parameters
    ----------
    x : ndarray, shape (n, size, size)
        Normalised cutouts.
    rng : numpy.random.Generator
        Source of the random choices.
    flips : bool
        Apply the random flips.
    clip_fraction : float
        Fraction of the cutouts clipped.
    clip_sigma : (float, float)
        Range of the upper clipping level (sky sigma).
    normalisation : dict, optional
        The normalisation of ``x`` (default: the current version's).

    Returns
    -------
    ndarray, shape (n, size, size), float32
    """
    norm = normalisation or normalisation_params()
    out = np.array(x, np.float32, copy=True)
    n = out.shape[0]
    if flips:
        fx = rng.random(n) < 0.5
        fy = rng.random(n) < 0.5
        out[fx] = out[fx][:, :, ::-1]
        out[fy] = out[fy][:, ::-1, :]
    if clip_fraction > 0:
        sel = np.flatnonzero(rng.random(n) < clip_fraction)
        if sel.size:
            k, scale = float(norm["k"]), float(norm["scale"])
            z_hi = np.exp(rng.uniform(np.log(clip_sigma[0]), np.log(clip_sigma[1]), sel.size))
            hi = (scale * np.arcsinh(z_hi / k)).astype(np.float32)
            sub = np.minimum(out[sel], hi[:, None, None])
            low = rng.random(sel.size) < 0.5
            lo = (-scale * np.arcsinh(rng.uniform(0.5, 3.0, sel.size) / k)).astype(np.float32)
            sub = np.where(low[:, None, None], np.maximum(sub, lo[:, None, None]), sub)
            out[sel] = sub
    return out


def split_by_frame(frames: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/validation masks holding whole frames apart.

    Cutouts of one frame share its seeing, sky and artifacts (pairs from one bright
    star), so a split by cutout would leak; with a single frame the split falls back
    to cutouts.

    Parameters
    ----------
    frames : ndarray
        Frame index of each cutout.
    val_fraction : float
        Fraction of the frames held out (at least one, and at least one kept).
    seed : int
        Seed of the choice.

    Returns
    -------
    train, validation : ndarray of bool
    """
    frames = np.asarray(frames)
    uniq = np.unique(frames)
    rng = np.random.default_rng(seed)
    if uniq.size < 2:
        val = rng.random(frames.size) < val_fraction
    else:
        n_val = min(uniq.size - 1, max(1, int(round(val_fraction * uniq.size))))
        val_frames = rng.choice(uniq, n_val, replace=False)
        val = np.isin(frames, val_frames)
    return ~val, val


# ---------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : keras.Model
        The trained network (best weights).
    classifier : CNNClassifier
        The same network wrapped for inference, with its metadata.
    history : dict
        Per-epoch training and validation loss/accuracy/AUC.
    metrics : dict
        Evaluation on the validation frames (see :func:`robopol_clean.evaluation.evaluate`).
    metadata : dict
        What was written to ``<name>.json``.
    model_path, metadata_path, report_dir : Path or None
        Files written (None when ``out_dir`` is None).
    train_index, val_index : ndarray
        Rows of the dataset used for training and validation.
    seconds : float
        Training wall time.
    """

    model: Any
    classifier: CNNClassifier
    history: dict
    metrics: dict
    metadata: dict
    model_path: Path | None
    metadata_path: Path | None
    report_dir: Path | None
    train_index: np.ndarray
    val_index: np.ndarray
    seconds: float


def _batches(x, y, w, batch_size, rng, augment_kw):
    """A Keras dataset of shuffled (augmented) training batches, reshuffled every epoch."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.order = rng.permutation(len(y))

        def __len__(self):
            return int(np.ceil(len(y) / batch_size))

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            xb = x[idx]
            if augment_kw is not None:
                xb = augment_batch(xb, rng, **augment_kw)
            return xb[..., None], y[idx].astype(np.float32), w[idx]

        def on_epoch_end(self):
            self.order = rng.permutation(len(y))

    return Batches()


def _split(dataset: CutoutDataset, val_dataset: CutoutDataset | None, config: TrainingConfig,
           rng: np.random.Generator) -> tuple[CutoutDataset, CutoutDataset, np.ndarray, np.ndarray]:
    """Training and validation sets, and the dataset rows of each."""
    if val_dataset is not None:
        return dataset, val_dataset, np.arange(len(dataset)), np.arange(0)
    if config.val_split_by_frame:
        frames = (np.asarray(dataset.table["frame"]) if "frame" in dataset.table.colnames
                  else np.arange(len(dataset)))
        _, va = split_by_frame(frames, config.val_fraction, config.seed)
    else:
        va = rng.random(len(dataset)) < config.val_fraction
    tr_idx, va_idx = np.flatnonzero(~va), np.flatnonzero(va)
    return dataset.subset(tr_idx), dataset.subset(va_idx), tr_idx, va_idx


def _network(config: TrainingConfig, size: int, norm: dict) -> tuple[Any, str, float, list[str]]:
    """The compiled network to train: (model, variant, learning rate, frozen layer names)."""
    if config.init_from is not None:
        base = CNNClassifier.load(None if config.init_from == "default" else config.init_from)
        if base.normalisation != norm:
            raise ValueError(f"dataset normalisation {norm} differs from the model's {base.normalisation}")
        model, variant = base.model, base.metadata.get("variant", config.variant)
        freeze = True if config.freeze_conv is None else config.freeze_conv
        lr = 3e-4 if config.learning_rate is None else config.learning_rate
    else:
        model, variant = build_model(config.variant, size=size, seed=config.seed, compile=False), config.variant
        freeze = bool(config.freeze_conv)
        lr = 1e-3 if config.learning_rate is None else config.learning_rate
    frozen = conv_layer_names(model) if freeze else []
    for layer in model.layers:
        if layer.name in frozen:
            layer.trainable = False
    compile_model(model, learning_rate=lr)
    return model, variant, lr, frozen


def _class_weights(labels: np.ndarray, balance: bool) -> dict[int, float]:
    """Loss weight per class: inverse class frequencies (mean 1) with ``balance``, else 1."""
    n_pos = int(np.sum(labels == 1))
    n_neg = labels.size - n_pos
    if balance and n_pos and n_neg:
        return {0: labels.size / (2.0 * n_neg), 1: labels.size / (2.0 * n_pos)}
    return {0: 1.0, 1: 1.0}


def _calibrate(clf: CNNClassifier, val: CutoutDataset, target: float, threshold: float) -> dict:
    """Logit offset putting ``threshold`` at the (1 - target) quantile of the raw
    scores of validation star spots with SNR >= 10 (see :class:`TrainingConfig`)."""
    from .evaluation import STAR_SNR_MIN

    p = clf.predict_cutouts(val.cutouts)
    snr = np.asarray(val.table["snr"], float) if "snr" in val.table.colnames else np.full(len(val), np.inf)
    sel = (val.labels == 0) & (snr >= STAR_SNR_MIN)
    if sel.sum() < 20:
        log.warning("too few validation star spots (%d) to calibrate; no calibration", int(sel.sum()))
        return {"logit_offset": 0.0, "method": "none (too few validation stars)"}
    raw = float(np.clip(np.quantile(p[sel], 1.0 - target), 1e-4, 1 - 1e-4))
    offset = float(np.log(threshold / (1 - threshold)) - np.log(raw / (1 - raw)))
    return {"logit_offset": offset, "raw_threshold": raw, "target_star_false_rejection": target,
            "n_validation_stars": int(sel.sum()),
            "method": (f"prior shift: logit(p) + offset, placing the threshold {threshold} at the raw score "
                       f"exceeded by {target:.3%} of the validation star spots with SNR >= {STAR_SNR_MIN:g}")}


def _canonical(norm: dict) -> dict:
    """Validated normalisation parameters in canonical form (for storage and comparison)."""
    return normalisation_params(int(norm["version"]),
                                **{k: v for k, v in norm.items() if k not in ("version", "stretch")})


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    from . import __version__

    return {"robopol_clean": __version__, "keras": keras.__version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "backend": keras.backend.backend()}


def train(dataset: CutoutDataset, config: TrainingConfig = TrainingConfig(), *,
          val_dataset: CutoutDataset | None = None, out_dir: str | os.PathLike | None = None,
          name: str = DEFAULT_MODEL_NAME, report: bool = True,
          report_dir: str | os.PathLike | None = None, overwrite: bool = True,
          verbose: int = 0, **overrides: Any) -> TrainResult:
    """Train (or fine-tune) the artifact CNN and write model, metadata and report.

    Parameters
    ----------
    dataset : CutoutDataset
        Normalised, labelled cutouts with a ``frame`` column.
    config : TrainingConfig
        The training settings.
    val_dataset : CutoutDataset, optional
        An explicit validation set (then ``dataset`` is all training data).
    out_dir : path-like, optional
        Write ``<name>.keras``, ``<name>.onnx``, ``<name>.json`` and ``<name>_report/``
        here; nothing is written when None.
    name : str
        Model name.
    report : bool
        Write the evaluation figures and metrics.
    report_dir : path-like, optional
        Where (default ``<out_dir>/<name>_report``).
    overwrite : bool
        Replace an existing model of that name.
    verbose : int
        Keras verbosity.
    **overrides
        Fields of :class:`TrainingConfig` replacing those of ``config``, e.g.
        ``train(data, epochs=5, seed=1)``.

    Returns
    -------
    TrainResult

    Raises
    ------
    TypeError
        An override that is not a :class:`TrainingConfig` field.
    ValueError
        An empty dataset, an invalid setting, or a starting model normalised
        differently from the dataset.
    """
    import keras

    from .evaluation import evaluate

    config = _with_overrides(config, overrides)
    if len(dataset) == 0:
        raise ValueError("empty training dataset")
    t0 = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    norm = _canonical(dataset.normalisation)

    train_ds, val_ds, tr_idx, va_idx = _split(dataset, val_dataset, config, rng)
    if len(val_ds) == 0 or len(np.unique(val_ds.labels)) < 2:
        log.warning("validation set is empty or has a single class: metrics will be limited")
    model, variant, lr, frozen = _network(config, dataset.cutouts.shape[1], norm)

    cw = _class_weights(train_ds.labels, config.class_weight)
    y = train_ds.labels.astype(np.float32)
    augment_kw = ({"flips": True, "clip_fraction": config.clip_fraction, "clip_sigma": config.clip_sigma,
                   "normalisation": norm} if config.augment else None)
    batches = _batches(train_ds.cutouts, y, np.where(y == 1, cw[1], cw[0]).astype(np.float32),
                       config.batch_size, rng, augment_kw)
    validation, callbacks = None, []
    if len(val_ds):
        yv = val_ds.labels.astype(np.float32)
        validation = (val_ds.cutouts[..., None], yv, np.where(yv == 1, cw[1], cw[0]).astype(np.float32))
        if config.early_stopping:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                                           restore_best_weights=True))
    fit = model.fit(batches, validation_data=validation, epochs=config.epochs, callbacks=callbacks,
                    verbose=verbose)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    seconds = time.perf_counter() - t0
    epochs_run = len(history.get("loss", []))
    best_epoch = int(np.argmin(history["val_loss"])) + 1 if "val_loss" in history else epochs_run

    meta: dict[str, Any] = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variant": variant,
        "cutout_size": int(dataset.cutouts.shape[1]),
        "n_params": int(model.count_params()),
        "normalisation": norm,
        "threshold": config.threshold,
        "labels": {"0": "star spot", "1": "artifact (reflection streak/ghost, cosmic ray, ...)"},
        "data": {"train": {**dataset.description, **train_ds.counts()},
                 "validation": val_ds.counts() if len(val_ds) else {}},
        "training": {
            "config": config.as_dict(),
            "epochs_run": epochs_run, "best_epoch": best_epoch, "learning_rate": lr,
            "optimizer": "Adam", "loss": "binary_crossentropy", "class_weights": cw,
            "frozen_layers": frozen, "seconds": round(seconds, 1),
            "machine": f"{platform.machine()} x{os.cpu_count()} cpu",
        },
        "versions": _versions(),
    }
    clf = CNNClassifier(model, meta)
    if config.target_false_rejection is not None and len(val_ds):
        meta["calibration"] = _calibrate(clf, val_ds, config.target_false_rejection, config.threshold)
        clf.logit_offset = meta["calibration"]["logit_offset"]
    if report and len(val_ds) and (report_dir is not None or out_dir is not None):
        report_dir = Path(report_dir) if report_dir is not None else Path(out_dir) / f"{name}_report"
    else:
        report_dir = None
    metrics: dict[str, Any] = {}
    if len(val_ds):
        metrics = evaluate(clf, val_ds.cutouts, val_ds.labels, val_ds.table, report_dir,
                           history=history, threshold=config.threshold, name=f"{name}: validation frames")
    meta["metrics"] = {k: v for k, v in metrics.items() if k != "figures"}
    clf.metadata = meta
    model_path = metadata_path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model_path, metadata_path = save_model(model, Path(out_dir) / f"{name}.keras", meta, overwrite=overwrite)
        clf.path = model_path
        log.info("wrote %s (%.0f kB) and %s", model_path, model_path.stat().st_size / 1e3, metadata_path)
    return TrainResult(model, clf, history, metrics, meta, model_path, metadata_path, report_dir,
                       tr_idx, va_idx, seconds)


def train_default_model(out_dir: str | os.PathLike | None = None,
                        config: TrainingConfig = DEFAULT_MODEL_CONFIG, *, n_frames: int = 240,
                        n_test_frames: int | None = None, quick: bool = False,
                        name: str = DEFAULT_MODEL_NAME, report_dir: str | os.PathLike | None = None,
                        threads: int | None = None, **overrides: Any) -> TrainResult:
    """Make the shipped model: simulate, detect, label, train, evaluate, save.

    ``train_default_model()`` writes ``robopol_clean/data/robopol_cnn.keras`` (+ ``.onnx``,
    ``.json``) and the report ``./robopol_cnn_report/``; about 8 minutes on two CPU cores
    (dataset ~4 min, training ~4 min). A separate set of test frames (another seed,
    natural mix of stars and artifacts) is evaluated into ``<name>_report/test/``.

    Parameters
    ----------
    out_dir : path-like, optional
        Output folder (default: the package's ``data`` folder).
    config : TrainingConfig
        The training settings (default :data:`DEFAULT_MODEL_CONFIG`: at most 40 epochs,
        calibrated so 0.5 % of the validation star spots with SNR >= 10 reach the
        threshold -- on independent frames this gave ~0.8 %). Its ``seed`` is also the
        master seed of the simulated frames.
    n_frames : int
        Simulated 1024 x 1024 frames for training + validation.
    n_test_frames : int, optional
        Independent test frames (default n_frames // 6, at least 2; 0 to skip).
    quick : bool
        A smoke run: 12 frames, 3 epochs (minutes -> seconds; not a usable model).
    name : str
        Model name.
    report_dir : path-like, optional
        Evaluation report folder (default ``<out_dir>/<name>_report``, or
        ``./<name>_report`` when writing into the package).
    threads : int, optional
        TensorFlow intra-op threads (set before TensorFlow starts; default: all cores).
    **overrides
        Fields of :class:`TrainingConfig` replacing those of ``config`` (e.g. ``seed=1``).

    Returns
    -------
    TrainResult
        ``metrics`` are the validation ones; ``metadata['test_metrics']`` the test ones.
    """
    config = _with_overrides(config, overrides)
    if threads:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialised
            log.warning("TensorFlow threads already set; 'threads' ignored")
    if quick:
        n_frames, config = 12, config.replace(epochs=3)
    out = Path(out_dir) if out_dir is not None else default_model_path().parent
    t0 = time.perf_counter()
    ds = cutout_dataset_from_simulation(n_frames, config.seed)
    log.info("dataset: %s in %.0f s", ds.counts(), time.perf_counter() - t0)
    if report_dir is None:
        # Figures do not belong in the installed package: beside it only for other folders.
        report_dir = (Path.cwd() if out_dir is None else out) / f"{name}_report"
    result = train(ds, config, out_dir=out, name=name, report_dir=report_dir)
    n_test = max(2, n_frames // 6) if n_test_frames is None else n_test_frames
    if n_test:
        from .evaluation import evaluate

        test = cutout_dataset_from_simulation(n_test, config.seed + 1_000_003, keep_all_stars=True)
        report = None if result.report_dir is None else result.report_dir / "test"
        tm = evaluate(result.classifier, test.cutouts, test.labels, test.table, report,
                      threshold=result.classifier.threshold, name=f"{name}: independent test frames")
        result.metadata["test_metrics"] = {k: v for k, v in tm.items() if k != "figures"}
        result.metadata["data"]["test"] = {**test.description}
    result.metadata["training"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    changed = {k: v for k, v in config.as_dict().items() if v != DEFAULT_MODEL_CONFIG.as_dict()[k]}
    args = ", ".join(f"{k}={v!r}" for k, v in {"seed": config.seed, **changed, "n_frames": n_frames}.items())
    args = args.replace("'", '"')  # the command is single-quoted for the shell
    result.metadata["command"] = ("python -c 'from robopol_clean.training import train_default_model; "
                                  f"train_default_model({args})'")
    save_model(result.model, out / f"{name}.keras", result.metadata, overwrite=True)
    return result
