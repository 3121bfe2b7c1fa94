"""Transfer learning: fine-tuning the shipped CNN (frozen convolutions) on a new artifact class."""

import numpy as np
import pytest

from robopol_clean.classify.cnn import CNNClassifier, conv_layer_names
from robopol_clean.datasets import DEFAULT_ARTIFACT_KINDS, cutout_dataset_from_simulation
from robopol_clean.training import TrainingConfig, train

DONUT_SIM = dict(n_donuts=20, donut_contrast=(0.3, 1.5), donut_radius=(10.0, 15.0),
                 donut_bright_fraction=1.0, sky_range=(100.0, 1000.0), n_cosmic_rays=0)


def _dataset(n_frames, seed, **kw):
    return cutout_dataset_from_simulation(n_frames, seed, shape=(512, 512), n_artifact_sources=0,
                                          artifact_kinds=("donut",), ignore_kinds=DEFAULT_ARTIFACT_KINDS,
                                          sim_kwargs=DONUT_SIM, **kw)


def _donut_recall_auc(clf, ds):
    from sklearn.metrics import roc_auc_score

    p = clf.predict_cutouts(ds.cutouts)
    return float(np.mean(p[ds.labels == 1] >= 0.5)), float(roc_auc_score(ds.labels, p))


def _conv_weights(model):
    names = set(conv_layer_names(model))
    return [np.array(w) for layer in model.layers if layer.name in names for w in layer.get_weights()]


def test_bright_donuts_are_detected_default_unchanged():
    from robopol_clean.simulate import simulate_frame

    a = simulate_frame(seed=3, shape=(128, 128), n_donuts=2)
    b = simulate_frame(seed=3, shape=(128, 128), n_donuts=2, donut_contrast=(0.01, 0.04))
    assert np.array_equal(np.asarray(a.ccd.data), np.asarray(b.ccd.data))
    ds = _dataset(1, 5)
    assert ds.counts().get("kind_donut", 0) >= 10


@pytest.mark.slow
def test_fine_tuning_learns_donuts_with_frozen_conv(tmp_path):
    train_ds = _dataset(8, 11)
    test_ds = _dataset(3, 12, keep_all_stars=True)
    shipped = CNNClassifier.load(None)
    rec0, auc0 = _donut_recall_auc(shipped, test_ds)
    w0 = _conv_weights(shipped.model)
    res = train(train_ds, TrainingConfig(init_from="default", epochs=6, seed=0), out_dir=tmp_path,
                name="donuts", report=False)
    rec1, auc1 = _donut_recall_auc(res.classifier, test_ds)
    assert res.metadata["training"]["frozen_layers"] == conv_layer_names(res.model)
    assert all(np.array_equal(a, b) for a, b in zip(w0, _conv_weights(res.model), strict=True))
    assert (tmp_path / "donuts.keras").exists()
    assert auc1 > auc0 + 0.1
    assert rec1 > rec0 + 0.2
