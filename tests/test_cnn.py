"""The CNN classifier: architecture, normalisation, saving/loading, batched inference.

The ONNX graph (export, loading checks, agreement with Keras) is tested in test_onnx.py."""

import json

import numpy as np
import pytest
from astropy.table import Table

keras = pytest.importorskip("keras")

from robopol_clean.classify.cnn import (  # noqa: E402
    NORMALISATION_VERSION,
    CNNClassifier,
    ModelError,
    build_model,
    default_model_path,
    normalisation_params,
    normalise_cutouts,
    save_model,
    spot_cutouts,
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """An untrained (seeded) 3conv model saved with metadata (and its ONNX graph)."""
    pytest.importorskip("onnx")
    model = build_model("3conv", seed=3, compile=False)
    path = tmp_path_factory.mktemp("models") / "net.keras"
    save_model(model, path, {"normalisation": normalisation_params(), "threshold": 0.5})
    return path


def _cutouts(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("variant", ["3conv", "4conv"])
def test_build_model_shapes_and_size(variant):
    model = build_model(variant, seed=0)
    assert model.input_shape == (None, 64, 64, 1)
    assert model.output_shape == (None, 1)
    assert 30_000 <= model.count_params() <= 150_000
    n_conv = sum(layer.__class__.__name__ == "Conv2D" for layer in model.layers)
    assert n_conv == int(variant[0])
    p = model.predict_on_batch(_cutouts(4)[..., None])
    assert np.all((p >= 0) & (p <= 1))


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        build_model("7conv")
    with pytest.raises(ValueError, match="multiple"):
        build_model("3conv", size=60)


def test_build_model_is_seeded():
    a = build_model("3conv", seed=5, compile=False).get_weights()
    b = build_model("3conv", seed=5, compile=False).get_weights()
    c = build_model("3conv", seed=6, compile=False).get_weights()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_normalisation_invariant_to_sky_and_units():
    rng = np.random.default_rng(1)
    raw = rng.normal(0, 1, (5, 64, 64)).astype(np.float32) * 10
    raw[:, 30:34, 20:50] += 5000  # a bright streak
    base = normalise_cutouts(raw, 0.0, 10.0)
    sky = np.array([0.0, 100.0, 5e3, -20.0, 1e4])
    scale = 2.687
    shifted = normalise_cutouts((raw + sky[:, None, None]) * scale, sky * scale, 10.0 * scale)
    np.testing.assert_allclose(shifted, base, atol=2e-4)
    assert base.dtype == np.float32 and base.shape == (5, 64, 64)


def test_normalisation_compresses_and_is_monotonic():
    z = np.array([0.0, 1.0, 5.0, 100.0, 1e4], np.float32)
    cut = np.tile(z[:, None, None], (1, 64, 64))
    out = normalise_cutouts(cut, 0.0, 1.0)[:, 0, 0]
    assert out[0] == 0 and np.all(np.diff(out) > 0)
    assert out[-1] < 3.0  # 10^4 sigma stays of order one
    assert out[2] / out[1] > 3.0  # close to linear near the noise


def test_normalisation_handles_bad_values():
    cut = np.ones((3, 64, 64), np.float32)
    cut[0, 0, 0] = np.nan
    out = normalise_cutouts(cut, [1.0, np.nan, 1.0], [1.0, 2.0, 0.0])
    assert np.all(np.isfinite(out))
    assert out[0, 0, 0] == 0.0  # NaN pixel = sky
    # (n, size, size, 1) accepted
    assert normalise_cutouts(cut[..., None], 0.0, 1.0).shape == (3, 64, 64)


def test_normalisation_versions():
    assert normalisation_params()["version"] == NORMALISATION_VERSION
    with pytest.raises(ValueError, match="version"):
        normalise_cutouts(np.zeros((1, 64, 64)), version=99)
    with pytest.raises(ValueError, match="parameter"):
        normalisation_params(1, bogus=2)
    p = normalisation_params(1, k=5)
    assert p["k"] == 5.0
    assert "fwhm_ref" not in p and normalisation_params(2)["fwhm_ref"] > 0


def test_version_2_cutouts_see_every_frame_at_the_same_seeing():
    yy, xx = np.mgrid[0:300, 0:300]
    ref = normalisation_params(2)["fwhm_ref"]
    widths = []
    for fwhm in (3.0, 4.3, 7.0):
        sigma = fwhm / 2.3548
        img = (1000 * np.exp(-((xx - 150.3) ** 2 + (yy - 149.6) ** 2) / (2 * sigma**2))).astype(np.float32)
        spots = Table({"x": [150.3], "y": [149.6], "sky_rms": [1.0]}, meta={"fwhm": fwhm})
        v2 = spot_cutouts(img, spots, version=2)[0]
        v1 = spot_cutouts(img, spots, version=1)[0]
        half = v2 >= 0.25 * np.arcsinh(1000 / 2 / 3)  # pixels above half the peak
        widths.append(np.sqrt(half.sum() * 4 / np.pi))
        peak = np.unravel_index(np.argmax(v2), v2.shape)
        assert abs(peak[0] - 32) <= 1 and abs(peak[1] - 32) <= 1  # centred
        if fwhm == ref:
            np.testing.assert_allclose(v2, v1)
    # in native pixels the widths would differ by 7/3; resampled they agree
    assert max(widths) - min(widths) < 1.0, widths
    assert widths[1] == pytest.approx(ref, abs=0.8)


def test_save_load_round_trip_identical(saved_model):
    x = _cutouts(300)
    clf = CNNClassifier.load(saved_model)
    assert clf.backend == "onnxruntime"
    model = keras.saving.load_model(saved_model, safe_mode=True, compile=False)
    direct = np.asarray(model.predict_on_batch(x[..., None]))[:, 0]
    p = clf.predict_cutouts(x)
    np.testing.assert_allclose(p, direct, atol=1e-6)
    keras_clf = CNNClassifier.load(saved_model, backend="keras")
    assert keras_clf.backend == "keras"
    np.testing.assert_allclose(keras_clf.predict_cutouts(x), direct, atol=1e-6)
    # batching (incl. a padded last batch) does not change anything
    np.testing.assert_allclose(clf.predict_cutouts(x, batch_size=64), p, atol=1e-6)
    np.testing.assert_allclose(clf.predict_cutouts(x[:5]), p[:5], atol=1e-6)
    assert clf.predict_cutouts(x[:0]).shape == (0,)
    assert saved_model.stat().st_size < 2_000_000
    assert saved_model.with_suffix(".onnx").stat().st_size < 2_000_000
    meta = json.loads(saved_model.with_suffix(".json").read_text())
    assert meta["format"] == "robopol_clean.cnn"
    assert meta["onnx"]["file"] == "net.onnx"
    assert clf.describe()["model"] == "net.keras"


def test_predict_rejects_wrong_shape(saved_model):
    clf = CNNClassifier.load(saved_model)
    with pytest.raises(ValueError, match="shape"):
        clf.predict_cutouts(np.zeros((2, 32, 32)))


def test_corrupt_keras_file(tmp_path, saved_model):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a zip file")
    bad.with_suffix(".json").write_text(saved_model.with_suffix(".json").read_text())
    with pytest.raises(ModelError, match="bad.keras"):
        CNNClassifier.load(bad, backend="keras")
    with pytest.raises(ModelError, match="bad.onnx"):  # the metadata names a graph
        CNNClassifier.load(bad)


def test_missing_or_bad_metadata(tmp_path, saved_model):
    model = tmp_path / "m.keras"
    model.write_bytes(saved_model.read_bytes())
    with pytest.raises(ModelError, match=r"m\.json.*missing"):
        CNNClassifier.load(model)
    model.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelError, match="m.json"):
        CNNClassifier.load(model)
    model.with_suffix(".json").write_text(json.dumps({"format": "robopol_clean.cnn",
                                                       "normalisation": {"version": 42}}))
    with pytest.raises(ModelError, match="version"):
        CNNClassifier.load(model)
    with pytest.raises(ModelError, match="no such model"):
        CNNClassifier.load(tmp_path / "absent.keras")


def test_safe_mode_refuses_code(tmp_path):
    """A model with a Python lambda inside is refused (safe_mode=True), not executed."""
    inp = keras.Input((64, 64, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    path.with_suffix(".json").write_text(json.dumps({"format": "robopol_clean.cnn",
                                                      "normalisation": normalisation_params()}))
    with pytest.raises(ModelError, match="lambda.keras.*Lambda"):
        CNNClassifier.load(path)


def test_wrong_architecture_is_model_error(tmp_path):
    inp = keras.Input((32, 32, 1))
    out = keras.layers.Dense(1)(keras.layers.Flatten()(inp))
    path = tmp_path / "small.keras"
    keras.Model(inp, out).save(path)
    path.with_suffix(".json").write_text(json.dumps({"format": "robopol_clean.cnn",
                                                      "normalisation": normalisation_params()}))
    with pytest.raises(ModelError, match="expected"):
        CNNClassifier.load(path)


def test_predict_spots_raw_vs_background_subtracted(saved_model):
    clf = CNNClassifier.load(saved_model)
    rng = np.random.default_rng(2)
    img = rng.normal(0, 5, (200, 200)).astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    img += 800 * np.exp(-((xx - 60) ** 2 + (yy - 80) ** 2) / 8.0)
    spots = Table({"x": [60.0, 150.0, 2.0], "y": [80.0, 40.0, 198.0], "sky": [300.0] * 3,
                   "sky_rms": [5.0] * 3})
    with pytest.raises(ValueError, match="FWHM"):  # version 2 resamples to a common seeing
        clf.predict_spots(img, spots)
    spots.meta["fwhm"] = 4.3
    p_sub = clf.predict_spots(img, spots, background_subtracted=True)
    p_raw = clf.predict_spots(img + 300.0, spots)
    np.testing.assert_allclose(p_raw, p_sub, atol=1e-5)
    cut = spot_cutouts(img, spots)
    assert cut.shape == (3, 64, 64) and np.all(np.isfinite(cut))
    assert np.all(cut[2, 40:, :] == 0)  # outside the frame = sky
    assert clf.predict_spots(img, spots[:0]).shape == (0,)


def test_score_scene_table(saved_model, profile):
    from robopol_clean.classify import FrameScene

    clf = CNNClassifier.load(saved_model, use_orphan_cue=False)
    img = np.zeros((128, 128), np.float32)
    spots = Table({"x": [30.0, 90.0], "y": [40.0, 64.0], "sky_rms": [3.0, 3.0]})
    scene = FrameScene(img, img, img + 3, spots, profile, profile.geometry, 4.3)
    scores = clf.score(scene)
    assert set(scores.colnames) == {"p_cnn", "p_orphan", "partner_support", "p_artifact"}
    assert not scores["partner_support"].any()
    np.testing.assert_allclose(scores["p_artifact"], scores["p_cnn"])


def test_default_model_if_shipped():
    path = default_model_path()
    if not path.exists():
        pytest.skip("no shipped model yet")
    clf = CNNClassifier.load()
    assert clf.path == path and clf.backend == "onnxruntime"
    assert clf.metadata["normalisation"]["version"] == NORMALISATION_VERSION
    assert path.stat().st_size < 2_000_000
    p = clf.predict_cutouts(np.zeros((3, 64, 64), np.float32))
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
