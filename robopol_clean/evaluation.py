"""Evaluate a spot classifier on labelled cutouts: metrics and a folder of figures.

:func:`evaluate` computes the numbers a user needs to trust a model -- the ROC AUC,
the confusion matrix at the decision threshold, the recall of significant artifacts
and the false-rejection rate of good star spots (the cost that matters for
polarimetry: every wrongly rejected spot loses a star) -- and writes the figures of
the original work's poster plus a reliability diagram and saliency maps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

__all__ = ["evaluate", "classification_metrics", "predict_probabilities"]

log = logging.getLogger(__name__)

#: Artifacts at least this significant (peak SNR) must be caught ...
ARTIFACT_SNR_MIN = 5.0
#: ... and star spots at least this significant must not be rejected.
STAR_SNR_MIN = 10.0


def predict_probabilities(model, cutouts: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """``p_artifact`` of normalised cutouts from a CNNClassifier or a bare Keras model.

    Parameters
    ----------
    model : CNNClassifier or keras.Model
        The classifier.
    cutouts : ndarray, shape (n, size, size) or (n, size, size, 1)
        Normalised cutouts.
    batch_size : int, optional
        Cutouts per network call (default: the classifier's own; 256 for a bare Keras
        model).

    Returns
    -------
    ndarray, shape (n,)
    """
    if hasattr(model, "predict_cutouts"):
        return model.predict_cutouts(cutouts, batch_size=batch_size)
    x = np.asarray(cutouts, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    out = np.empty(len(x), float)
    batch_size = batch_size or 256
    for start in range(0, len(x), batch_size):
        out[start:start + batch_size] = np.asarray(model.predict_on_batch(x[start:start + batch_size]))[:, 0]
    return out


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else float(num) / float(den)


def classification_metrics(labels: np.ndarray, p: np.ndarray, *, threshold: float = 0.5,
                           snr: np.ndarray | None = None, kind: np.ndarray | None = None) -> dict[str, Any]:
    """Scores of probabilities ``p`` against true ``labels`` (1 = artifact).

    Parameters
    ----------
    labels : ndarray of int
        1 = artifact, 0 = star spot.
    p : ndarray
        ``p_artifact`` of each cutout.
    threshold : float
        Decision threshold (``p >= threshold`` is rejected).
    snr : ndarray, optional
        Peak SNR of each cutout (enables the significance-cut metrics).
    kind : ndarray of str, optional
        Truth kind of each cutout (enables the per-kind metrics).

    Returns
    -------
    dict
        ``n``, ``n_artifacts``, ``n_stars``, ``auc`` (None with one class), ``accuracy``,
        ``confusion_matrix`` ([[TN, FP], [FN, TP]]), ``precision``, ``recall``,
        ``false_rejection_rate`` (stars with p >= threshold), ``brier``, ``ece``
        (expected calibration error, 10 bins), and with ``snr``:
        ``recall_artifacts_snr_ge_5``, ``false_rejection_stars_snr_ge_10`` (and their
        counts); with ``kind``: ``recall_by_kind`` / ``rejection_by_kind``.
    """
    from sklearn.metrics import roc_auc_score  # the package's one AUC (also plots.plot_roc)

    y = np.asarray(labels, int)
    p = np.asarray(p, float)
    pred = p >= threshold
    art, star = y == 1, y == 0
    tp, fn = int(np.sum(pred & art)), int(np.sum(~pred & art))
    fp, tn = int(np.sum(pred & star)), int(np.sum(~pred & star))
    out: dict[str, Any] = {
        "n": int(y.size), "n_artifacts": int(art.sum()), "n_stars": int(star.sum()),
        "threshold": float(threshold),
        "auc": float(roc_auc_score(y, p)) if art.any() and star.any() else None,
        "accuracy": _rate(tp + tn, y.size),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "precision": _rate(tp, tp + fp),
        "recall": _rate(tp, tp + fn),
        "false_rejection_rate": _rate(fp, fp + tn),
        "brier": float(np.mean((p - y) ** 2)) if y.size else None,
    }
    # ECE = sum over bins of (n_bin / n) |mean(p) - mean(y)| = sum |sum_bin(p - y)| / n.
    bins = np.clip(np.digitize(p, np.linspace(0, 1, 11)) - 1, 0, 9)
    out["ece"] = float(np.abs(np.bincount(bins, weights=p - y, minlength=10)).sum() / max(y.size, 1))
    if snr is not None:
        snr = np.asarray(snr, float)
        a5 = art & (snr >= ARTIFACT_SNR_MIN)
        s10 = star & (snr >= STAR_SNR_MIN)
        out["n_artifacts_snr_ge_5"] = int(a5.sum())
        out["recall_artifacts_snr_ge_5"] = _rate(int(np.sum(pred & a5)), int(a5.sum()))
        out["n_stars_snr_ge_10"] = int(s10.sum())
        out["n_stars_snr_ge_10_rejected"] = int(np.sum(pred & s10))
        out["false_rejection_stars_snr_ge_10"] = _rate(int(np.sum(pred & s10)), int(s10.sum()))
    if kind is not None:
        kind = np.asarray(kind).astype(str)
        out["recall_by_kind"] = {str(k): _rate(int(np.sum(pred & (kind == k))), int(np.sum(kind == k)))
                                 for k in np.unique(kind[art])}
        out["rejection_by_kind"] = {str(k): _rate(int(np.sum(pred & (kind == k))), int(np.sum(kind == k)))
                                    for k in np.unique(kind[star])}
    return out


def _captions(meta: Table | None, idx: np.ndarray) -> list[str] | None:
    if meta is None:
        return None
    caps = []
    for i in idx:
        parts = []
        if "kind" in meta.colnames:
            parts.append(str(meta["kind"][i]))
        if "snr" in meta.colnames:
            parts.append(f"snr {float(meta['snr'][i]):.0f}")
        caps.append(" ".join(parts))
    return caps


def _most_confident(labels: np.ndarray, p: np.ndarray, cls: int, n: int) -> np.ndarray:
    """Indices of the ``n`` cutouts of class ``cls`` scored most confidently as that class."""
    idx = np.flatnonzero(labels == cls)
    return idx[np.argsort(-np.abs(p[idx] - (1 - cls)))][:n]


def evaluate(model, cutouts: np.ndarray, labels: np.ndarray, meta_table: Table | None = None,
             out_dir=None, *, history: dict | None = None, threshold: float = 0.5,
             p: np.ndarray | None = None, n_gallery: int = 24, n_saliency: int = 12,
             name: str = "evaluation") -> dict[str, Any]:
    """Metrics and figures of a classifier on labelled, normalised cutouts.

    Parameters
    ----------
    model : CNNClassifier or keras.Model
        The classifier.
    cutouts : ndarray, shape (n, size, size)
        Normalised cutouts.
    labels : ndarray, shape (n,)
        1 = artifact, 0 = star spot.
    meta_table : Table, optional
        One row per cutout; ``snr`` enables the significance-cut metrics, ``kind`` the
        per-kind ones and the gallery captions.
    out_dir : path-like, optional
        Folder for the figures and ``metrics.json`` (created); nothing is written
        when None.
    history : dict, optional
        Keras training history: adds the loss/accuracy curves.
    threshold : float
        Decision threshold on ``p_artifact``.
    p : ndarray, optional
        Precomputed probabilities (skips prediction).
    n_gallery, n_saliency : int
        Cutouts per gallery and per saliency figure.
    name : str
        Recorded in the metrics.

    Returns
    -------
    dict
        See :func:`classification_metrics`; plus ``figures`` (file names) when written.
    """
    from . import plots

    labels = np.asarray(labels, int)
    if p is None:
        p = predict_probabilities(model, cutouts)
    p = np.asarray(p, float)
    snr = None if meta_table is None or "snr" not in meta_table.colnames else np.asarray(meta_table["snr"], float)
    kind = None if meta_table is None or "kind" not in meta_table.colnames else np.asarray(meta_table["kind"])
    metrics = classification_metrics(labels, p, threshold=threshold, snr=snr, kind=kind)
    metrics["name"] = name
    if out_dir is None:
        return metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[str] = []

    def save(fig_name, make):
        try:
            make(out / fig_name)
            figs.append(fig_name)
        except Exception as exc:  # noqa: BLE001 -- a figure must never lose the metrics
            log.warning("figure %s failed: %s", fig_name, exc)

    if history:
        save("training_history.png", lambda path: plots.plot_training_history(history, path))
    save("confusion_matrix.png",
         lambda path: plots.plot_confusion_matrix(metrics["confusion_matrix"], path, threshold=threshold))
    save("roc.png", lambda path: plots.plot_roc(labels, p, path))
    save("reliability.png", lambda path: plots.plot_reliability(labels, p, path))
    save("p_artifact_histogram.png", lambda path: plots.plot_probability_histogram(p, labels, path,
                                                                                    threshold=threshold))
    x = np.asarray(cutouts)
    # Galleries: the most confident of each class, and the worst mistakes.
    for cls, cname in ((1, "artifacts"), (0, "stars")):
        conf = _most_confident(labels, p, cls, n_gallery)
        if conf.size:
            save(f"gallery_confident_{cname}.png",
                 lambda path, c=conf, t=cname: plots.plot_cutout_gallery(
                     x[c], p[c], labels[c], path, title=f"Most confident {t}", captions=_captions(meta_table, c)))
    wrong_score = np.abs(p - labels)
    worst = np.argsort(-wrong_score)[:n_gallery]
    worst = worst[wrong_score[worst] > 0.0]
    if worst.size:
        save("gallery_most_wrong.png",
             lambda path: plots.plot_cutout_gallery(x[worst], p[worst], labels[worst], path,
                                                    title="Most wrong (A = artifact, S = star)",
                                                    captions=_captions(meta_table, worst)))
    if n_saliency and model is not None:
        from .saliency import saliency_maps

        for cls, cname in ((1, "artifacts"), (0, "stars")):
            pick = _most_confident(labels, p, cls, n_saliency)
            if pick.size:
                save(f"saliency_{cname}.png",
                     lambda path, c=pick, t=cname: plots.plot_saliency_gallery(
                         x[c], saliency_maps(model, x[c]), p[c], path, title=f"Saliency: {t}"))
    metrics["figures"] = figs
    from .classify.cnn import _jsonable
    from .io import write_atomic

    text = json.dumps(_jsonable(metrics), indent=2) + "\n"
    write_atomic(out / "metrics.json", lambda tmp: tmp.write_text(text), overwrite=True)
    return metrics
