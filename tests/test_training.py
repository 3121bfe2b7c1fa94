"""Training data, augmentation, the training loop and transfer learning (real Keras, tiny sets)."""

import json

import numpy as np
import pytest
from astropy.table import Table

keras = pytest.importorskip("keras")

from robopol_clean.classify.cnn import CNNClassifier, normalise_cutouts  # noqa: E402
from robopol_clean.training import (  # noqa: E402
    CutoutDataset,
    _stratified_stars,
    augment_batch,
    cutout_dataset_from_ds9,
    cutout_dataset_from_simulation,
    match_detections,
    split_by_frame,
    synthetic_cutouts,
    train,
)


@pytest.fixture(scope="module")
def synthetic_dataset():
    raw, labels, table = synthetic_cutouts(400, seed=1)
    return CutoutDataset(normalise_cutouts(raw, table["sky"], table["sky_rms"]), labels, table,
                         description={"generator": "synthetic_cutouts"})


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    result = train(synthetic_dataset, epochs=2, batch_size=32, seed=0, out_dir=out, name="tiny",
                   report=False, target_false_rejection=0.05)
    return result


def test_tiny_training_learns_and_writes(trained):
    assert trained.metrics["auc"] > 0.9
    assert trained.model_path.name == "tiny.keras" and trained.model_path.exists()
    meta = json.loads(trained.metadata_path.read_text())
    for key in ("normalisation", "variant", "threshold", "metrics", "versions", "training", "data"):
        assert key in meta
    assert meta["versions"]["keras"] == keras.__version__
    assert meta["training"]["seconds"] > 0
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
    result = train(synthetic_dataset.subset(np.arange(160)), epochs=1, batch_size=32, seed=1,
                   init_from=trained.model_path, early_stopping=False)
    assert result.metadata["training"]["frozen_layers"] == ["conv1", "conv2", "conv3"]
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


def test_match_detections():
    truth = Table({"x": [10.0, 100.0, 200.0, 300.0, 50.0, 400.0],
                   "y": [10.0, 100.0, 200.0, 300.0, 52.0, 400.0],
                   "kind": ["star", "streak", "ghost", "donut", "star", "cosmic_ray"],
                   "x_center": [np.nan, 115.0, 200.0, 300.0, np.nan, 400.0],
                   "length": [np.nan, 30.0, 20.0, 20.0, np.nan, 2.0],
                   "width": [np.nan, 5.0, 5.0, 20.0, np.nan, 1.0]})
    spots = Table({"x": [10.5, 100.2, 125.0, 200.0, 300.0, 50.0, 600.0, 401.0],
                   "y": [10.0, 100.0, 101.0, 201.0, 300.0, 51.0, 600.0, 400.0]})
    labels, kind, dist = match_detections(spots, truth)
    assert list(labels) == [0, 1, 1, 1, -1, 0, -1, 1]
    assert list(kind) == ["star", "streak", "streak", "ghost", "donut", "star", "", "cosmic_ray"]
    # a detection on a donut's ring (no star there) is a donut
    ring = Table({"x": [309.0], "y": [300.0]})
    labels_r, kind_r, _ = match_detections(ring, truth, artifact_kinds=("donut",), ignore_kinds=())
    assert list(labels_r) == [1] and list(kind_r) == ["donut"]
    # a star spot on a streak is ambiguous and left out
    truth.add_row([101.0, 100.0, "star", np.nan, np.nan, np.nan])
    labels, kind, _ = match_detections(spots, truth)
    assert labels[1] == -1 and kind[1] == "ambiguous"
    # cosmic rays can be left out of the artifact class
    labels, _, _ = match_detections(spots, truth, artifact_kinds=("streak", "ghost"))
    assert labels[7] == -1


def test_stratified_star_sampling_flattens_snr():
    rng = np.random.default_rng(0)
    snr = 10 ** rng.exponential(0.3, 5000) * 5  # mostly faint, like a real frame
    pick = _stratified_stars(snr, np.zeros(snr.size, bool), 400, rng, 10)
    assert pick.size == 400 and np.unique(pick).size == 400
    faint_all = np.mean(snr < 10)
    faint_kept = np.mean(snr[pick] < 10)
    assert faint_kept < faint_all - 0.2


def test_dataset_save_load_and_concat(tmp_path, synthetic_dataset):
    small = synthetic_dataset.subset(np.arange(20))
    path = small.save(tmp_path / "d.npz")
    back = CutoutDataset.load(path)
    np.testing.assert_array_equal(back.cutouts, small.cutouts)
    np.testing.assert_array_equal(back.labels, small.labels)
    assert back.table.colnames == small.table.colnames
    both = CutoutDataset.concatenate([small, back])
    assert len(both) == 40 and len(np.unique(both.table["frame"])) == 2 * len(np.unique(small.table["frame"]))


def test_dataset_from_simulation(profile):
    ds = cutout_dataset_from_simulation(2, seed=4, profile=profile, shape=(512, 512),
                                        n_artifact_sources=(3, 5))
    assert len(ds) > 0 and ds.cutouts.shape[1:] == (64, 64)
    assert set(np.unique(ds.labels)) <= {0, 1} and ds.labels.sum() > 0
    assert set(np.unique(ds.table["frame"])) == {0, 1}
    assert "donut" not in set(ds.table["kind"])
    assert ds.description["n_frames"] == 2 and ds.description["artifacts"] == int(ds.labels.sum())
    assert np.all(np.isfinite(ds.cutouts))
    kinds = set(ds.table["kind"][ds.labels == 1])
    assert kinds <= {"streak", "ghost", "cosmic_ray"}


def test_dataset_from_ds9(tmp_path, profile):
    from regions import CirclePixelRegion, PixCoord, Regions

    from robopol_clean.simulate import simulate_frame

    sim = simulate_frame(profile, seed=7, shape=(512, 512), n_artifact_sources=4, n_cosmic_rays=0)
    path = tmp_path / "frame.fits"
    sim.ccd.write(path)
    arts = sim.artifacts[np.isin(np.asarray(sim.artifacts["kind"]), ["streak", "ghost"])]
    assert len(arts)
    regs = Regions([CirclePixelRegion(PixCoord(float(a["x"]), float(a["y"])), radius=6) for a in arts])
    reg_path = tmp_path / "art.reg"
    regs.write(str(reg_path), format="ds9")
    ds = cutout_dataset_from_ds9(path, reg_path, profile=profile, frame_index=3)
    assert len(ds) > 0 and 0 < ds.labels.sum() <= len(arts) + 2
    assert set(ds.table["source"]) == {"ds9"} and set(ds.table["frame"]) == {3}
