"""Labelled cutout datasets: truth matching, star sampling, simulated and DS9-labelled frames."""

import numpy as np
import pytest
from astropy.table import Table

from robopol_clean.classify.cnn import normalise_cutouts
from robopol_clean.datasets import (
    MATCH_RADIUS,
    STREAK_MARGIN,
    CutoutDataset,
    _stratified_stars,
    cutout_dataset_from_ds9,
    cutout_dataset_from_simulation,
    match_detections,
    synthetic_cutouts,
    truth_table,
)


@pytest.fixture(scope="module")
def synthetic_dataset():
    raw, labels, table = synthetic_cutouts(100, seed=1)
    return CutoutDataset(normalise_cutouts(raw, table["sky"], table["sky_rms"]), labels, table,
                         description={"generator": "synthetic_cutouts"})


def _truth():
    return Table({"x": [10.0, 100.0, 200.0, 300.0, 50.0, 400.0],
                  "y": [10.0, 100.0, 200.0, 300.0, 52.0, 400.0],
                  "kind": ["star", "streak", "ghost", "donut", "star", "cosmic_ray"],
                  "x_center": [np.nan, 115.0, 200.0, 300.0, np.nan, 400.0],
                  "length": [np.nan, 30.0, 20.0, 20.0, np.nan, 2.0],
                  "width": [np.nan, 5.0, 5.0, 20.0, np.nan, 1.0]})


def test_match_detections():
    truth = _truth()
    spots = Table({"x": [10.5, 100.2, 125.0, 200.0, 300.0, 50.0, 600.0, 401.0],
                   "y": [10.0, 100.0, 101.0, 201.0, 300.0, 51.0, 600.0, 400.0]})
    labels, kind, dist = match_detections(spots, truth)
    assert list(labels) == [0, 1, 1, 1, -1, 0, -1, 1]
    assert list(kind) == ["star", "streak", "streak", "ghost", "donut", "star", "", "cosmic_ray"]
    assert dist[0] == pytest.approx(0.5) and np.isnan(dist[6])
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
    empty = match_detections(spots[:0], truth)
    assert all(len(a) == 0 for a in empty)


def test_streak_margin():
    """One rule for training and benchmark labels: |x - x_center| <= length/2 + 3, |y - y| <= max(width, 3)."""
    assert STREAK_MARGIN == MATCH_RADIUS == 3.0
    truth = _truth()
    end = 115.0 + 15.0  # the streak's far end
    spots = Table({"x": [end + 2.5, end + 3.5, 120.0, 120.0], "y": [100.0, 100.0, 104.9, 105.1]})
    labels, kind, dist = match_detections(spots, truth)
    assert list(labels) == [1, -1, 1, -1]
    assert dist[0] == 0.0 and dist[2] == pytest.approx(4.9)
    labels_2, _, _ = match_detections(spots, truth, streak_margin=2.0)
    assert labels_2[0] == -1


def test_truth_table(profile):
    from robopol_clean.simulate import simulate_frame

    sim = simulate_frame(profile, seed=5, shape=(256, 256), n_stars=5, n_artifact_sources=3, n_donuts=1)
    t = truth_table(sim)
    assert t.colnames == ["x", "y", "kind", "x_center", "length", "width"]
    assert len(t) == len(sim.spots)
    art = np.asarray(sim.spots["is_artifact"], bool)
    assert art.sum() == len(sim.artifacts) > 0
    for c in ("x_center", "length", "width"):
        assert np.all(np.isnan(t[c][~art]))
        rows = np.asarray(sim.spots["artifact_id"])[art]
        np.testing.assert_array_equal(np.asarray(t[c])[art], np.asarray(sim.artifacts[c], float)[rows])


def test_stratified_star_sampling_flattens_snr():
    rng = np.random.default_rng(0)
    snr = 10 ** rng.exponential(0.3, 5000) * 5  # mostly faint, like a real frame
    pick = _stratified_stars(snr, np.zeros(snr.size, bool), 400, rng, 10)
    assert pick.size == 400 and np.unique(pick).size == 400
    faint_all = np.mean(snr < 10)
    faint_kept = np.mean(snr[pick] < 10)
    assert faint_kept < faint_all - 0.2
    sat = np.zeros(snr.size, bool)
    sat[:30] = True
    pick = _stratified_stars(snr, sat, 400, rng, 10)
    assert pick.size == 400 and np.sum(pick < 30) == 10


def test_dataset_save_load_and_concat(tmp_path, synthetic_dataset):
    small = synthetic_dataset.subset(np.arange(20))
    path = small.save(tmp_path / "d.npz")
    back = CutoutDataset.load(path)
    np.testing.assert_array_equal(back.cutouts, small.cutouts)
    np.testing.assert_array_equal(back.labels, small.labels)
    assert back.table.colnames == small.table.colnames
    both = CutoutDataset.concatenate([small, back])
    assert len(both) == 40 and len(np.unique(both.table["frame"])) == 2 * len(np.unique(small.table["frame"]))
    with pytest.raises(ValueError, match="same length"):
        CutoutDataset(small.cutouts, small.labels[:-1], small.table)


def test_dataset_from_simulation(profile):
    ds = cutout_dataset_from_simulation(2, seed=4, profile=profile, shape=(512, 512),
                                        n_artifact_sources=(3, 5))
    assert len(ds) > 0 and ds.cutouts.shape[1:] == (64, 64)
    assert set(np.unique(ds.labels)) <= {0, 1} and ds.labels.sum() > 0
    assert set(np.unique(ds.table["frame"])) == {0, 1}
    assert "donut" not in set(ds.table["kind"])
    assert ds.description["n_frames"] == 2 and ds.description["artifacts"] == int(ds.labels.sum())
    assert all(isinstance(k, str) and n > 0 for k, n in ds.description["left_out"].items())
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
    # with a star colour, only spots inside regions of that colour are stars, the rest left out
    # (regions without a colour are green in DS9)
    only_marked = cutout_dataset_from_ds9(path, reg_path, profile=profile, star_color="green",
                                          artifact_color="blue")
    assert only_marked.labels.sum() == 0 and len(only_marked) == ds.labels.sum()
