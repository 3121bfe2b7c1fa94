"""The training loop, its settings and transfer learning (real Keras, tiny sets).

The datasets themselves are tested in test_datasets.py.
"""

import dataclasses
import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from robopol_clean.classify.cnn import CNNClassifier, normalise_cutouts  # noqa: E402
from robopol_clean.datasets import CutoutDataset, synthetic_cutouts  # noqa: E402
from robopol_clean.training import (  # noqa: E402
    DEFAULT_MODEL_CONFIG,
    TrainingConfig,
    augment_batch,
    split_by_frame,
    train,
    train_default_model,
)

TINY = TrainingConfig(epochs=2, batch_size=32, seed=0, target_false_rejection=0.05)


@pytest.fixture(scope="module")
def synthetic_dataset():
    raw, labels, table = synthetic_cutouts(400, seed=1)
    return CutoutDataset(normalise_cutouts(raw, table["sky"], table["sky_rms"]), labels, table,
                         description={"generator": "synthetic_cutouts"})


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(synthetic_dataset, TINY, out_dir=out, name="tiny", report=False)


def test_tiny_training_learns_and_writes(trained):
    assert trained.metrics["auc"] > 0.9
    assert trained.model_path.name == "tiny.keras" and trained.model_path.exists()
    meta = json.loads(trained.metadata_path.read_text())
    for key in ("normalisation", "variant", "threshold", "metrics", "versions", "training", "data"):
        assert key in meta
    assert meta["versions"]["keras"] == keras.__version__
    assert meta["training"]["seconds"] > 0
    # the settings are recorded and rebuild the configuration
    assert TrainingConfig(**meta["training"]["config"]) == TINY
    assert meta["data"]["train"]["generator"] == "synthetic_cutouts"
    assert len(trained.history["loss"]) == 2
    # train / validation frames are disjoint
    frames = np.asarray(trained.train_index), np.asarray(trained.val_index)
    assert not set(frames[0]) & set(frames[1])


def test_round_trip_after_training(trained, synthetic_dataset):
    loaded = CNNClassifier.load(trained.model_path)
    x = synthetic_dataset.cutouts[:64]
    np.testing.assert_allclose(loaded.predict_cutouts(x), trained.classifier.predict_cutouts(x), atol=1e-6)
    assert loaded.threshold == 0.5


def test_calibration_prior_shift(trained, synthetic_dataset):
    from robopol_clean.classify.cnn import apply_logit_offset

    cal = trained.metadata["calibration"]
    assert np.isfinite(cal["logit_offset"]) and cal["target_star_false_rejection"] == 0.05
    loaded = CNNClassifier.load(trained.model_path)
    assert loaded.logit_offset == cal["logit_offset"]
    x = synthetic_dataset.cutouts[:32]
    raw = np.asarray(loaded.model.predict_on_batch(x[..., None]))[:, 0]
    np.testing.assert_allclose(loaded.predict_cutouts(x), apply_logit_offset(raw, cal["logit_offset"]),
                               atol=1e-6)
    # the validation stars with SNR >= 10 are rejected at about the target rate
    assert trained.metrics["false_rejection_stars_snr_ge_10"] <= 0.1
    p = np.array([0.01, 0.5, 0.99])
    np.testing.assert_allclose(apply_logit_offset(p, 0.0), p)
    assert np.all(np.diff(apply_logit_offset(p, -2.0)) > 0) and apply_logit_offset(p, -2.0)[1] < 0.5


def test_transfer_learning_freezes_convolutions(trained, synthetic_dataset):
    # the settings as keywords (overrides of the default configuration)
    result = train(synthetic_dataset.subset(np.arange(160)), epochs=1, batch_size=32, seed=1,
                   init_from=trained.model_path, early_stopping=False)
    assert result.metadata["training"]["frozen_layers"] == ["conv1", "conv2", "conv3"]
    config = result.metadata["training"]["config"]
    assert config["init_from"] == str(trained.model_path) and config["epochs"] == 1
    assert config["early_stopping"] is False and config["freeze_conv"] is None
    assert result.metadata["training"]["learning_rate"] == 3e-4  # the fine-tuning default
    base = CNNClassifier.load(trained.model_path).model
    for name in ("conv1", "conv2", "conv3"):
        np.testing.assert_array_equal(base.get_layer(name).get_weights()[0],
                                      result.model.get_layer(name).get_weights()[0])
    assert not np.array_equal(base.get_layer("dense").get_weights()[0],
                              result.model.get_layer("dense").get_weights()[0])


def test_split_by_frame():
    frames = np.repeat(np.arange(10), 7)
    tr, va = split_by_frame(frames, 0.2, seed=0)
    assert va.sum() == 14 and not set(frames[tr]) & set(frames[va])
    tr2, va2 = split_by_frame(frames, 0.2, seed=0)
    assert np.array_equal(va, va2)


def test_augment_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (50, 64, 64)).astype(np.float32)
    x[:, 30:34, 32:60] += 3.0
    out = augment_batch(x, np.random.default_rng(1), clip_fraction=0.0)
    assert out.shape == x.shape and out is not x
    # flips only permute pixels
    np.testing.assert_allclose(np.sort(out.reshape(50, -1), axis=1), np.sort(x.reshape(50, -1), axis=1))
    clipped = augment_batch(x, np.random.default_rng(1), flips=False, clip_fraction=1.0)
    assert np.all(clipped.max(axis=(1, 2)) <= x.max(axis=(1, 2)))
    assert np.any(clipped.max(axis=(1, 2)) < x.max(axis=(1, 2)))
    again = augment_batch(x, np.random.default_rng(1), flips=False, clip_fraction=1.0)
    np.testing.assert_array_equal(clipped, again)


def test_training_config():
    config = TrainingConfig()
    assert config.replace() is config
    assert config.replace(epochs=3, init_from=None).epochs == 3 and config.epochs == 30
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    with pytest.raises(TypeError, match="'epoch'.*TrainingConfig fields: variant, epochs"):
        config.replace(epoch=3)
    for bad in (dict(variant="5conv"), dict(epochs=0), dict(val_fraction=1.0), dict(threshold=1.0),
                dict(clip_sigma=(5.0, 1.0)), dict(target_false_rejection=0.0), dict(learning_rate=0.0)):
        with pytest.raises(ValueError, match="invalid TrainingConfig"):
            TrainingConfig(**bad)
    # canonical forms: paths as str, clip_sigma as a tuple of floats; JSON round trip
    from pathlib import Path

    c = TrainingConfig(init_from=Path("m.keras"), clip_sigma=[4, 300])
    assert c.init_from == "m.keras" and c.clip_sigma == (4.0, 300.0)
    assert TrainingConfig(**json.loads(json.dumps(c.as_dict()))) == c
    assert DEFAULT_MODEL_CONFIG.epochs == 40 and DEFAULT_MODEL_CONFIG.target_false_rejection == 0.005


def test_unknown_settings_fail_before_training(synthetic_dataset):
    with pytest.raises(TypeError, match="'epoch'"):
        train(synthetic_dataset, epoch=2)
    with pytest.raises(TypeError, match="config must be a TrainingConfig"):
        train_default_model(None, 0)  # the old positional seed
    with pytest.raises(TypeError, match="config must be a TrainingConfig"):
        train(synthetic_dataset, "3conv")
    with pytest.raises(TypeError, match="'n_epochs'"):
        train_default_model(n_epochs=3)


def test_old_import_locations():
    """The dataset names defined in training before robopol_clean.datasets stay importable."""
    from robopol_clean import datasets, training

    for name in ("CutoutDataset", "DEFAULT_ARTIFACT_KINDS", "DEFAULT_IGNORE_KINDS", "frame_cutouts",
                 "match_detections", "cutout_dataset_from_simulation", "cutout_dataset_from_ds9",
                 "synthetic_cutouts"):
        assert getattr(training, name) is getattr(datasets, name), name
