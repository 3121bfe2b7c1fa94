"""The network as an ONNX graph: exact export from Keras, safe loading, TensorFlow-free inference."""

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from robopol_clean.classify.cnn import (
    CNNClassifier,
    ModelError,
    OnnxNetwork,
    default_model_path,
    default_threads,
    normalisation_params,
    normalise_cutouts,
)


def test_reduce_frame_never_imports_tensorflow():
    """Loading the shipped classifier and reducing a frame runs ONNX Runtime only."""
    code = textwrap.dedent("""
        import sys

        import numpy as np
        from robopol_clean.pipeline import get_classifier, reduce_frame
        from robopol_clean.simulate import simulate_frame

        clf = get_classifier("cnn")
        sim = simulate_frame("robopol", seed=11, shape=(768, 768), n_stars=90)
        spots = reduce_frame(sim.ccd, classifier=clf).spots
        assert clf.backend == "onnxruntime", clf.backend
        assert len(spots) > 50 and 0 < np.nanmax(spots["p_cnn"]) <= 1
        print("IMPORTED", sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "IMPORTED []" in run.stdout, run.stdout
    assert "onnxruntime" not in run.stderr  # ONNX Runtime logs nothing below errors


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in a Dask worker
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() >= 1


# ---------------------------------------------------------------------------------
# Export (needs Keras and onnx)
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("onnx")
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def saved_model(keras, tmp_path_factory):
    """An untrained (seeded) 3conv model saved with its ONNX graph and metadata."""
    from robopol_clean.classify.cnn import build_model, save_model

    path = tmp_path_factory.mktemp("onnx_models") / "net.keras"
    save_model(build_model("3conv", seed=4, compile=False), path,
               {"normalisation": normalisation_params(), "threshold": 0.5,
                "calibration": {"logit_offset": -2.0}})
    return path


def _copy_model(src, dst_dir, name="m"):
    for suffix in (".keras", ".onnx", ".json"):
        (dst_dir / f"{name}{suffix}").write_bytes(src.with_suffix(suffix).read_bytes())
    return dst_dir / f"{name}.keras"


def _random_cutouts(n, seed=0, size=64):
    """Normalised cutouts of noise with random blobs from 1 to 10^4 sigma, plus extremes."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(0.0, 1.0, (n, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(3):
        x0, y0 = rng.uniform(0, size, (2, n, 1, 1))
        sx, sy = rng.uniform(0.7, 8.0, (2, n, 1, 1))
        amp = 10 ** rng.uniform(0, 4, (n, 1, 1))
        raw += (amp * np.exp(-0.5 * (((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2))).astype(np.float32)
    x = normalise_cutouts(raw, 0.0, 1.0)
    x[: n // 10] = rng.uniform(-1.0, 3.0, (n // 10, size, size))
    return x


def _chain_model(keras):
    """A chain using every exporter option: even kernels, 'valid' padding, no bias,
    strided pooling, each activation."""
    L = keras.layers
    inp = keras.Input((64, 64, 1))
    x = L.Conv2D(5, (2, 3), padding="same", use_bias=False, activation="relu")(inp)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(3, 3, padding="valid", activation="sigmoid")(x)
    x = L.MaxPooling2D(3, strides=2)(x)
    x = L.Flatten()(x)
    x = L.Dropout(0.5)(x)
    x = L.Dense(7, use_bias=False)(x)
    out = L.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.mark.parametrize("variant", ["3conv", "4conv", "chain"])
def test_export_round_trip(keras, variant):
    from robopol_clean.classify.cnn import build_model
    from robopol_clean.classify.onnx_export import keras_to_onnx

    model = _chain_model(keras) if variant == "chain" else build_model(variant, seed=5, compile=False)
    x = _random_cutouts(300, seed=2)[..., None]
    onnx_bytes = keras_to_onnx(model)
    p_onnx = OnnxNetwork(onnx_bytes, "test", threads=1, size=64).predict(x)
    p_keras = np.asarray(model.predict_on_batch(x), np.float64)[:, 0]
    assert np.max(np.abs(p_onnx - p_keras)) <= 1e-5  # float32 rounding only
    assert p_keras.std() > 1e-3  # the check is not vacuous
    assert keras_to_onnx(model) == onnx_bytes  # reproducible


def test_export_refuses_unknown_layers(keras):
    from robopol_clean.classify.onnx_export import keras_to_onnx

    L = keras.layers
    inp = keras.Input((64, 64, 1))
    normed = keras.Model(inp, L.Dense(1)(L.Flatten()(L.BatchNormalization(name="bn")(inp))))
    with pytest.raises(ValueError, match=r"'bn' \(BatchNormalization\).*unknown layer"):
        keras_to_onnx(normed)
    strided = keras.Model(inp, L.Dense(1)(L.Flatten()(L.Conv2D(4, 3, strides=2, name="c")(inp))))
    with pytest.raises(ValueError, match="'c'.*strides"):
        keras_to_onnx(strided)
    a, b = L.Conv2D(2, 3, padding="same")(inp), L.Conv2D(2, 3, padding="same")(inp)
    branched = keras.Model(inp, L.Dense(1)(L.Flatten()(L.Add()([a, b]))))
    with pytest.raises(ValueError, match="cannot export"):
        keras_to_onnx(branched)


def test_saved_model_has_its_onnx_graph(saved_model):
    meta = json.loads(saved_model.with_suffix(".json").read_text())
    onnx_path = saved_model.with_suffix(".onnx")
    assert meta["onnx"]["file"] == onnx_path.name
    assert meta["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert meta["onnx"]["check"]["max_abs_diff"] <= 1e-5
    clf = CNNClassifier.load(saved_model, threads=1)
    assert clf.backend == "onnxruntime" and clf._keras is None
    x = _random_cutouts(200, seed=3)
    p = clf.predict_cutouts(x)
    keras_model = clf.model  # loaded lazily from the .keras beside
    assert clf.model is keras_model and keras_model.name.startswith("robopol_cnn")
    ref = CNNClassifier(keras_model, clf.metadata).predict_cutouts(x)
    np.testing.assert_allclose(p, ref, rtol=0, atol=1e-6)
    # batches spread over threads: the same numbers
    np.testing.assert_array_equal(CNNClassifier.load(saved_model, threads=3).predict_cutouts(x), p)
    assert clf.describe()["backend"] == "onnxruntime"


def test_keras_only_model_falls_back_and_can_be_exported(saved_model, tmp_path):
    """Models saved before the ONNX graph existed run with Keras until exported."""
    from robopol_clean.classify.onnx_export import export_model

    path = _copy_model(saved_model, tmp_path)
    path.with_suffix(".onnx").unlink()
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["onnx"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    old = CNNClassifier.load(path)
    assert old.backend == "keras"
    with pytest.raises(ModelError, match="no ONNX graph"):
        CNNClassifier.load(path, backend="onnx")
    export_model(path)
    new_meta = json.loads(path.with_suffix(".json").read_text())
    assert {k: v for k, v in new_meta.items() if k != "onnx"} == meta
    new = CNNClassifier.load(path)
    assert new.backend == "onnxruntime"
    x = _random_cutouts(100, seed=4)
    np.testing.assert_allclose(new.predict_cutouts(x), old.predict_cutouts(x), rtol=0, atol=1e-6)


def _assert_one_line_model_error(path, match, **kwargs):
    with pytest.raises(ModelError, match=match) as err:
        CNNClassifier.load(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and path.stem in message, message


def _set_onnx(path, data):
    path.with_suffix(".onnx").write_bytes(data)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_bad_onnx_files_are_one_line_errors(keras, saved_model, tmp_path):
    from robopol_clean.classify.cnn import build_model
    from robopol_clean.classify.onnx_export import keras_to_onnx

    path = _copy_model(saved_model, tmp_path)
    good = path.with_suffix(".onnx").read_bytes()
    # a modified graph (one byte) no longer matches its metadata
    path.with_suffix(".onnx").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    _assert_one_line_model_error(path, "SHA-256")
    # a file that is no ONNX graph, even with a matching SHA-256
    _set_onnx(path, b"this is not a protobuf")
    _assert_one_line_model_error(path, "cannot load the ONNX model")
    # a valid graph for another cutout size
    _set_onnx(path, keras_to_onnx(build_model("3conv", size=32, seed=0, compile=False)))
    _assert_one_line_model_error(path, r"expected float32 \(n, 64, 64, 1\)")
    # missing graph, metadata without its SHA-256
    path.with_suffix(".onnx").unlink()
    _assert_one_line_model_error(path, "no such ONNX model file")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["onnx"] = {"file": "m.onnx"}
    path.with_suffix(".json").write_text(json.dumps(meta))
    _assert_one_line_model_error(path, "no sha256")
    _assert_one_line_model_error(tmp_path / "absent.onnx", "no such model file")


def test_shipped_onnx_is_the_export_of_the_shipped_keras(keras):
    from robopol_clean.classify.onnx_export import keras_to_onnx

    path = default_model_path()
    meta = json.loads(path.with_suffix(".json").read_text())
    clf = CNNClassifier.load(backend="keras")
    assert hashlib.sha256(keras_to_onnx(clf.model, metadata=meta)).hexdigest() == meta["onnx"]["sha256"]


def test_onnx_agrees_with_keras_on_10000_cutouts(keras):
    """Real normalised cutouts of simulated detections plus random ones: |dp| <= 1e-5."""
    from robopol_clean.training import cutout_dataset_from_simulation

    real = cutout_dataset_from_simulation(16, 4711, keep_all_stars=True).cutouts
    x = np.concatenate([real, _random_cutouts(10_000 - len(real), seed=6)])
    assert len(real) > 5000 and len(x) == 10_000
    p_onnx = CNNClassifier.load().predict_cutouts(x)
    p_keras = CNNClassifier.load(backend="keras").predict_cutouts(x)
    assert np.max(np.abs(p_onnx - p_keras)) <= 1e-5
    assert p_keras.min() < 0.01 and p_keras.max() > 0.99  # both ends of the range covered
