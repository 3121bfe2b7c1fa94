"""Saliency maps and the evaluation report."""

import json

import numpy as np
import pytest

pytest.importorskip("keras")

from robopol_clean.classify.cnn import CNNClassifier, build_model, normalisation_params  # noqa: E402
from robopol_clean.evaluation import classification_metrics, evaluate  # noqa: E402
from robopol_clean.saliency import saliency_maps  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    model = build_model("3conv", seed=0, compile=False)
    return CNNClassifier(model, {"normalisation": normalisation_params()})


def test_saliency_shape_and_values(classifier):
    x = np.random.default_rng(0).normal(0, 1, (10, 64, 64)).astype(np.float32)
    s = saliency_maps(classifier, x, batch_size=4)
    assert s.shape == (10, 64, 64) and s.dtype == np.float32
    assert np.all(np.isfinite(s)) and np.all(s >= 0) and s.max() > 0
    s_model = saliency_maps(classifier.model, x[..., None])
    np.testing.assert_allclose(s_model, s, rtol=1e-5, atol=1e-8)
    n = saliency_maps(classifier, x, normalise=True)
    np.testing.assert_allclose(n.reshape(10, -1).max(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        saliency_maps(classifier, np.zeros((2, 64, 64, 3)))


def test_classification_metrics():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7])
    snr = np.array([20, 5, 30, 50, 6, 3, 10, 8])
    kind = np.array(["star"] * 4 + ["streak", "streak", "ghost", "cosmic_ray"])
    m = classification_metrics(labels, p, threshold=0.5, snr=snr, kind=kind)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["auc"] == pytest.approx(15 / 16)
    assert m["recall_artifacts_snr_ge_5"] == pytest.approx(2 / 3)  # snr 6, 10, 8 -> 0.9, 0.4, 0.7
    assert m["false_rejection_stars_snr_ge_10"] == pytest.approx(1 / 3)
    assert m["recall_by_kind"]["streak"] == 1.0 and m["recall_by_kind"]["ghost"] == 0.0
    one_class = classification_metrics(np.zeros(3), np.array([0.1, 0.2, 0.9]))
    assert one_class["auc"] is None and one_class["recall"] is None


def test_evaluate_writes_report(tmp_path, classifier):
    from astropy.table import Table

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (30, 64, 64)).astype(np.float32)
    labels = np.arange(30) % 2
    table = Table({"snr": rng.uniform(3, 100, 30), "kind": np.where(labels == 1, "streak", "star")})
    history = {"loss": [0.6, 0.5], "val_loss": [0.65, 0.55], "accuracy": [0.6, 0.7],
               "val_accuracy": [0.55, 0.65]}
    m = evaluate(classifier, x, labels, table, tmp_path / "rep", history=history, n_gallery=4,
                 n_saliency=2)
    for name in ("training_history.png", "confusion_matrix.png", "roc.png", "reliability.png",
                 "p_artifact_histogram.png", "gallery_most_wrong.png", "saliency_artifacts.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 1000, name
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["n"] == 30 and saved["auc"] == pytest.approx(m["auc"])
    assert evaluate(classifier, x, labels)["n"] == 30  # no out_dir: metrics only
