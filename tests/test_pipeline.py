import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.table import Table

from robopol_clean.demo import compare_with_truth
from robopol_clean.io import FrameError
from robopol_clean.pipeline import added_by_photometry, clean_artifacts, reduce_frame


@pytest.fixture(scope="module")
def result(small_sim, profile, morphology):
    return reduce_frame(small_sim.ccd, profile=profile, classifier=morphology, name="small.fits")


def test_input_untouched(small_sim, profile, morphology):
    before = small_sim.ccd.data.copy()
    mask_before = None if small_sim.ccd.mask is None else small_sim.ccd.mask.copy()
    reduce_frame(small_sim.ccd, profile=profile, classifier=morphology)
    np.testing.assert_array_equal(small_sim.ccd.data, before)
    assert (small_sim.ccd.mask is None) == (mask_before is None)


def test_tables_have_documented_columns(result):
    for col in ("x", "y", "flux", "flux_err", "group_id", "channel", "p_artifact", "rejected",
                "uncertain"):
        assert col in result.spots.colnames
    for col in ("group_id", "x", "y", "q", "q_err", "u", "u_err", "p", "p_err", "theta", "theta_err"):
        assert col in result.stokes.colnames
    s = result.spots
    detected = s[~added_by_photometry(s)]
    assert np.all((detected["p_artifact"] >= 0) & (detected["p_artifact"] <= 1))
    assert np.all(result.stokes["q_err"][result.stokes["flags"] == 0] > 0)
    assert np.all((result.stokes["theta"] >= 0) & (result.stokes["theta"] < 180))


def test_stokes_rows_for_quadruplets_without_rejected_spots(result):
    g = result.groups
    measured = g[g["complete"] & ~g["has_rejected"]]
    assert set(result.stokes["group_id"]) == set(measured["group_id"])
    clean = g[g["clean"]]
    assert set(result.stokes["group_id"][result.stokes["flags"] == 0]) == set(clean["group_id"])
    assert result.meta["n_clean"] == len(clean) and result.meta["n_stokes"] == len(measured)
    spots = result.spots
    for gid in result.stokes["group_id"]:
        members = spots[spots["group_id"] == gid]
        assert len(members) == 4 and not members["rejected"].any()
    # a group with a rejected spot gets no row
    assert not set(g["group_id"][g["has_rejected"]]) & set(result.stokes["group_id"])


def test_mask_is_ored_and_provenance(small_sim, profile, morphology, result):
    assert result.ccd.mask is not None
    assert np.array_equal(result.ccd.mask | result.artifact_mask, result.ccd.mask)
    h = result.ccd.header
    assert h["RCLCLASS"] == "morphology"
    predicted = result.spots["forced"] | result.spots["recovered"] | result.spots["residual"]
    assert h["RCLNSPOT"] == int((~predicted).sum()) == result.meta["n_spots"]
    assert h["RCLNREJ"] == int(result.spots["rejected"].sum())
    assert all(len(k) <= 8 for k in h)
    # An existing mask survives: OR-ed, never replaced.
    ccd = small_sim.ccd.copy()
    ccd.mask = np.zeros(ccd.shape, bool)
    ccd.mask[:5, :5] = True
    out = clean_artifacts(ccd, profile=profile, classifier=morphology)
    assert out.mask[:5, :5].all()
    assert out is not ccd and not ccd.mask[100:, 100:].any()


def test_recovers_truth(small_sim, result):
    c = compare_with_truth(result, small_sim)
    assert c["stars_measured"] >= 0.5 * c["stars_complete"]
    assert c["star_spots_rejected"] <= 0.05 * max(c["star_spots_detected"], 1)
    if c["artifacts"]:
        assert c["artifacts_caught"] >= 0.5 * c["artifacts"]


def test_deterministic(small_sim, profile, morphology, result):
    again = reduce_frame(small_sim.ccd, profile=profile, classifier=morphology, name="small.fits")
    for a, b in ((result.spots, again.spots), (result.stokes, again.stokes)):
        assert a.colnames == b.colnames
        for col in a.colnames:
            np.testing.assert_array_equal(np.asarray(a[col]), np.asarray(b[col]))


def test_frame_without_sources(profile, morphology):
    rng = np.random.default_rng(3)
    ccd = CCDData(rng.normal(100, 5, (256, 256)).astype(np.float32), unit="adu",
                  meta={"GAIN": 2.0, "RDNOISE": 8.0, "EXPTIME": 10.0})
    res = reduce_frame(ccd, profile=profile, classifier=morphology)
    assert isinstance(res.stokes, Table) and len(res.stokes) == 0
    assert res.meta["n_clean"] == 0


def test_fully_saturated_frame(profile, morphology):
    ccd = CCDData(np.full((256, 256), 65535.0, np.float32), unit="adu",
                  meta={"GAIN": 2.0, "RDNOISE": 8.0, "EXPTIME": 10.0})
    res = reduce_frame(ccd, profile=profile, classifier=morphology)
    assert len(res.stokes) == 0


def test_tiny_frame_is_clear_error(profile, morphology):
    ccd = CCDData(np.zeros((20, 20), np.float32), unit="adu")
    with pytest.raises(FrameError, match="too small"):
        reduce_frame(ccd, profile=profile, classifier=morphology, name="tiny.fits")


def test_bad_threshold(small_sim, profile, morphology):
    with pytest.raises(ValueError, match="threshold"):
        reduce_frame(small_sim.ccd, profile=profile, classifier=morphology, threshold=1.5)


def test_detector_region_uses_its_origin(profile, morphology):
    """A frame cut from the middle of the detector (LTV1/LTV2 set) keeps its geometry."""
    from robopol_clean.simulate import simulate_frame

    sim = simulate_frame(profile, seed=21, shape=(512, 512), origin=(700, 300), n_stars=40)
    assert sim.ccd.header["LTV1"] == -700
    res = reduce_frame(sim.ccd, profile=profile, classifier=morphology)
    c = compare_with_truth(res, sim)
    # With the origin ignored, mask and geometry were misplaced: no clean quadruplet at all.
    assert c["stars_measured"] >= 0.25 * c["stars_complete"] > 0
    assert c["star_spots_rejected"] <= 0.05 * c["star_spots_detected"]


def test_counts_are_consistent(result):
    """clean rows <= Stokes rows <= complete quadruplets (after photometry completed groups)."""
    m = result.meta
    assert 0 < m["n_clean"] <= m["n_stokes"] <= m["n_quadruplets"]
    assert m["n_quadruplets"] == int(result.groups["complete"].sum())
    assert m["n_clean"] == int((result.stokes["flags"] == 0).sum())


def test_no_sky_columns_without_a_celestial_wcs(result):
    assert "ra" not in result.stokes.colnames and "dec" not in result.stokes.colnames
