"""The shipped network, judged on freshly simulated frames it was never trained on."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from robopol_clean.datasets import match_detections, truth_table
from robopol_clean.pipeline import added_by_photometry, get_classifier, reduce_frame
from robopol_clean.simulate import simulate_frame

pytestmark = pytest.mark.slow  # trains networks / reduces full frames: minutes


def test_shipped_model_auc_on_fresh_frames():
    # Training used seeds derived from 0; these frames come from other seeds. Measured:
    # AUC 0.9995 (default decision: CNN + partner cues) and 0.974 (CNN alone) on seeds
    # 900-901; the morphology baseline scores ~0.95 on such data.
    clf = get_classifier("cnn")
    labels, p_default, p_cnn = [], [], []
    for seed in (900, 901):
        sim = simulate_frame("robopol", seed=seed, n_artifact_sources=10)
        result = reduce_frame(sim.ccd, classifier=clf)
        lab, _, _ = match_detections(result.spots, truth_table(sim))
        s = result.spots
        ok = (lab >= 0) & ~added_by_photometry(s)
        labels.append(lab[ok])
        p_default.append(np.asarray(result.spots["p_artifact"])[ok])
        p_cnn.append(np.asarray(result.spots["p_cnn"])[ok])
    y = np.concatenate(labels)
    assert 20 < y.sum() < len(y)
    assert roc_auc_score(y, np.concatenate(p_default)) >= 0.995
    assert roc_auc_score(y, np.concatenate(p_cnn)) >= 0.94
