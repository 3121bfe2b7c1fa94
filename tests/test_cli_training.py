"""The labelling -> training -> evaluation loop through the command line, with real Keras models."""

import json

import numpy as np
import pytest
from astropy.table import Table

from robopol_clean.classify.cnn import CNNClassifier
from robopol_clean.cli import EXIT_OK, EXIT_USAGE, main
from robopol_clean.regions_io import read_regions

pytestmark = pytest.mark.slow  # trains networks / reduces full frames: minutes


def test_label_train_evaluate(small_fits, tmp_path, capsys):
    # 1. A starting region file: every detected spot, coloured by the current decision.
    reg = tmp_path / "small_labels.reg"
    assert main(["label", str(small_fits), "-o", str(reg), "--classifier", "morphology"]) == EXIT_OK
    regions = read_regions(reg)
    assert len(regions) > 50
    assert main(["label", str(small_fits), "-o", str(reg)]) == EXIT_USAGE  # refuses to overwrite

    # 2. Fine-tune the shipped model on simulated frames plus the DS9-labelled frame.
    out = tmp_path / "model"
    code = main(["train", "-o", str(out), "--name", "tuned", "--sim-frames", "3", "--epochs", "1",
                 "--init-from", "default", "--ds9", str(small_fits), str(reg)])
    assert code == EXIT_OK
    meta = json.loads((out / "tuned.json").read_text())
    assert meta["normalisation"]["version"] >= 1
    tuned = CNNClassifier.load(out / "tuned.keras")
    default = CNNClassifier.load()
    for a, b in zip(tuned.model.layers, default.model.layers):
        if a.name.startswith("conv"):  # frozen: the convolutional filters did not move
            for wa, wb in zip(a.get_weights(), b.get_weights()):
                np.testing.assert_array_equal(wa, wb)

    # 3. Use it to reduce a frame, then evaluate it on fresh simulated frames.
    assert main(["reduce", str(small_fits), "-o", str(tmp_path / "red"), "--model",
                 str(out / "tuned.keras"), "-q"]) == EXIT_OK
    spots = Table.read(tmp_path / "red" / "small_spots.ecsv")
    assert "p_cnn" in spots.colnames and spots.meta["classifier"] == "cnn"

    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(out / "tuned.keras"), "-o", str(report),
                 "--sim-frames", "2"]) == EXIT_OK
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.5 < metrics["auc"] <= 1.0
    assert any(p.suffix == ".png" for p in report.iterdir())
    capsys.readouterr()


def test_evaluate_bad_model(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    assert main(["evaluate", "--model", str(bad), "-o", str(tmp_path / "r")]) == EXIT_USAGE
    assert "bad.json: model metadata file is missing" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps(json.loads(
        CNNClassifier.load().path.with_suffix(".json").read_text())))
    assert main(["evaluate", "--model", str(bad), "-o", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "bad.onnx" in err and "Traceback" not in err  # the network reduce would run


def test_train_without_data(tmp_path, capsys):
    assert main(["train", "-o", str(tmp_path), "--sim-frames", "0"]) == EXIT_USAGE
    assert "no data" in capsys.readouterr().err


def test_ds9_labels_are_read_back(small_fits, tmp_path):
    from robopol_clean.training import cutout_dataset_from_ds9

    reg = tmp_path / "l.reg"
    assert main(["label", str(small_fits), "-o", str(reg), "--classifier", "morphology"]) == EXIT_OK
    data = cutout_dataset_from_ds9(small_fits, reg, artifact_color="red", star_color="green")
    assert isinstance(data.table, Table) and len(data) > 0
    assert set(np.unique(data.labels)) <= {0, 1}
