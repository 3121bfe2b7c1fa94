"""Quality flags and photometry settings: the bitmask, its per-spot bits, the config, and
the flags the pipeline sets on the Stokes rows of a simulated frame."""

import dataclasses

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

import robopol_clean.pipeline as pipeline
from robopol_clean.config import PHOTOMETRY_METHODS, PhotometryConfig
from robopol_clean.detection import saturation_level
from robopol_clean.pipeline import reduce_frame
from robopol_clean.quality import (
    FLAG_DESCRIPTIONS,
    QualityFlag,
    describe_flags,
    flags_column_description,
    spot_flags,
)

LIMITS = dict(blend_limit=2.0, chi2_limit=3.0, masked_limit=0.1)

# -- the bitmask ---------------------------------------------------------------------------


def test_bits_are_distinct_powers_of_two_and_documented():
    values = [int(f) for f in QualityFlag]
    assert len(set(values)) == len(values)
    assert all(v > 0 and v & (v - 1) == 0 for v in values)
    assert set(FLAG_DESCRIPTIONS) == set(QualityFlag)
    assert all(isinstance(t, str) and t for t in FLAG_DESCRIPTIONS.values())
    text = flags_column_description()
    assert "0 = clean" in text
    for f in QualityFlag:
        assert f"{int(f)} {f.name.lower()}" in text


def test_describe_flags():
    assert describe_flags(0) == []
    assert describe_flags(QualityFlag.BLENDED | QualityFlag.FORCED) == ["blended", "forced"]
    assert describe_flags(np.int64(int(QualityFlag.SATURATED))) == ["saturated"]
    every = 0
    for f in QualityFlag:
        assert describe_flags(int(f)) == [f.name.lower()]
        every |= int(f)
    assert describe_flags(every) == [f.name.lower() for f in QualityFlag]


# -- per-spot bits ---------------------------------------------------------------------------


def psf_spots():
    """One clean spot, then one spot per bit a PSF spots table can set."""
    rows = [  # name, overrides
        ("clean", {}),
        ("blended", {"blend": 2.5}),
        ("masked", {"masked_fraction": 0.3}),
        ("clean", {"n_bad": 3, "masked_fraction": 0.05}),  # a few wing pixels: still clean
        ("saturated", {"n_saturated": 2}),
        ("saturated", {"saturated": True}),  # the detection's own flag
        ("poor_fit", {"chi2": 4.0}),
        ("forced", {"forced": True}),
        ("uncertain", {"uncertain": True}),
        ("artifact_light", {"p_cnn": 0.95}),
        ("bad_flux", {"flux": np.nan}),
        ("bad_flux", {"flux_err": np.inf}),
    ]
    base = dict(flux=1e4, flux_err=100.0, blend=0.1, n_bad=0, masked_fraction=0.0,
                n_saturated=0, chi2=1.1,
                saturated=False, forced=False, uncertain=False, rejected=False, p_cnn=0.1)
    t = Table(rows=[{**base, **over} for _, over in rows])
    return t, [name for name, _ in rows]


def aperture_spots():
    rows = [
        ("clean", {}),
        ("blended", {"contaminated": True}),
        ("masked", {"n_masked": 4}),
        ("saturated", {"saturated": True}),
        ("forced", {"forced": True}),
        ("uncertain", {"uncertain": True}),
        ("artifact_light", {"p_cnn": 0.9}),
        ("bad_flux", {"flux": np.nan}),
    ]
    base = dict(flux=1e4, flux_err=100.0, contaminated=False, n_masked=0, saturated=False,
                forced=False, uncertain=False, rejected=False, p_cnn=0.2)
    t = Table(rows=[{**base, **over} for _, over in rows])
    return t, [name for name, _ in rows]


@pytest.mark.parametrize("method", ["psf", "aperture"])
def test_spot_flags_one_bit_per_row(method):
    spots, names = psf_spots() if method == "psf" else aperture_spots()
    flags = spot_flags(spots, photometry=method, artifact_light_threshold=0.9, **LIMITS)
    assert flags.dtype.kind == "i" and flags.shape == (len(spots),)
    for value, name in zip(flags, names):
        expected = [] if name == "clean" else [name]
        assert describe_flags(value) == expected, name
    # the PSF-only bits are not set from PSF columns in aperture mode and vice versa
    if method == "aperture":
        psf, _ = psf_spots()
        out = spot_flags(psf, photometry="aperture", artifact_light_threshold=None, **LIMITS)
        assert not np.any(out & (QualityFlag.BLENDED | QualityFlag.MASKED | QualityFlag.POOR_FIT))


def test_spot_flags_every_per_spot_bit_covered():
    """Every bit but the group-level PAIR_RATIO comes from spot_flags."""
    seen = 0
    for method, (spots, _) in (("psf", psf_spots()), ("aperture", aperture_spots())):
        seen |= int(np.bitwise_or.reduce(
            spot_flags(spots, photometry=method, artifact_light_threshold=0.9, **LIMITS)))
    assert seen == sum(int(f) for f in QualityFlag) - int(QualityFlag.PAIR_RATIO)


def test_spot_flags_limits_and_missing_columns():
    spots, names = psf_spots()
    # limits are strict: exactly at the limit is not flagged; NaN never is
    t = Table({"blend": [2.0, np.nan], "chi2": [3.0, np.nan], "flux": [1.0, 1.0],
               "flux_err": [1.0, 1.0]})
    assert np.all(spot_flags(t, photometry="psf", artifact_light_threshold=None, **LIMITS) == 0)
    # looser limits clear the blend and chi2 bits
    loose = spot_flags(spots, photometry="psf", blend_limit=10.0, chi2_limit=10.0,
                       artifact_light_threshold=0.9)
    assert not np.any(loose & (QualityFlag.BLENDED | QualityFlag.POOR_FIT))
    # no cnn threshold, or a rejected spot: no artifact_light
    assert not np.any(spot_flags(spots, photometry="psf", artifact_light_threshold=None, **LIMITS)
                      & QualityFlag.ARTIFACT_LIGHT)
    spots["rejected"] = True
    assert not np.any(spot_flags(spots, photometry="psf", artifact_light_threshold=0.9, **LIMITS)
                      & QualityFlag.ARTIFACT_LIGHT)
    # a table without flux columns: every spot's flux is undefined
    bare = Table({"x": [1.0, 2.0]})
    assert list(spot_flags(bare, photometry="psf", artifact_light_threshold=0.5, **LIMITS)) == [
        int(QualityFlag.BAD_FLUX)] * 2
    assert len(spot_flags(Table({"flux": np.zeros(0)}), photometry="psf", artifact_light_threshold=None,
                          **LIMITS)) == 0


# -- the settings ----------------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = PhotometryConfig()
    assert cfg.method in PHOTOMETRY_METHODS and cfg.non_default() == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "aperture"
    with pytest.raises(ValueError, match="method"):
        PhotometryConfig(method="optimal")
    for name in ("recover_snr", "psf_min_snr", "psf_isolation", "blend_limit", "chi2_limit",
                 "pair_ratio_z_max"):
        for bad in (0.0, -1.0, np.nan):
            with pytest.raises(ValueError, match=name):
                PhotometryConfig(**{name: bad})
    for bad in (0.0, -0.1, 1.01, np.nan):
        with pytest.raises(ValueError, match="artifact_light_threshold"):
            PhotometryConfig(artifact_light_threshold=bad)
    PhotometryConfig(artifact_light_threshold=1.0)  # the upper end is allowed


def test_config_digest_is_stable_and_tracks_every_setting():
    a, b = PhotometryConfig(), PhotometryConfig()
    assert a.digest() == b.digest() and len(a.digest()) == 12
    assert all(c in "0123456789abcdef" for c in a.digest())
    assert a.as_dict() == dataclasses.asdict(a)
    seen = {a.digest()}
    changed = {"method": "aperture"}
    for f in dataclasses.fields(PhotometryConfig):
        value = getattr(a, f.name)
        if f.name in changed:
            new = changed[f.name]
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, int):
            new = value + 1
        elif isinstance(value, float):
            new = value * 0.5
        else:
            pytest.fail(f"unexpected setting type {f.name}: {value!r}")
        cfg = dataclasses.replace(a, **{f.name: new})
        assert cfg.non_default() == {f.name: new}
        seen.add(cfg.digest())
        assert cfg.digest() == dataclasses.replace(a, **{f.name: new}).digest()
    assert len(seen) == len(dataclasses.fields(PhotometryConfig)) + 1


def test_config_digest_of_equal_configs_is_equal():
    a, b = PhotometryConfig(recover_snr=5), PhotometryConfig(recover_snr=5.0)
    assert a == b and a.non_default() == b.non_default() == {}
    assert a.digest() == b.digest()


def test_config_digest_accepts_numpy_scalars():
    cfg = PhotometryConfig(psf_max_stars=np.int64(30), blend_limit=np.float32(2.5))
    assert cfg.digest() == PhotometryConfig(psf_max_stars=30, blend_limit=2.5).digest()


def test_config_rejects_non_positive_psf_max_stars():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="psf_max_stars"):
            PhotometryConfig(psf_max_stars=bad)


# -- the pipeline: pulls and flags of a simulated frame ------------------------------------


@pytest.fixture(scope="module")
def base(small_sim, profile, morphology):
    return reduce_frame(small_sim.ccd, profile=profile, classifier=morphology, name="small.fits")


def row_flags(result, group_id):
    rows = result.stokes[result.stokes["group_id"] == group_id]
    assert len(rows) == 1, f"group {group_id} has {len(rows)} Stokes rows"
    return int(rows["flags"][0])


def test_no_frame_wide_error_calibration():
    assert not hasattr(pipeline, "CALIBRATE_FLUX_ERRORS")


def test_clean_rows_pulls_against_truth(small_sim, base):
    st = base.stokes
    assert st["flags"].dtype.kind == "i"
    clean = st[st["flags"] == 0]
    assert len(clean) >= 20
    stars = small_sim.stars
    dist, idx = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(
        np.column_stack([clean["x"], clean["y"]]))
    ok = dist <= 3.0
    assert ok.sum() >= 0.9 * len(clean)
    truth = stars[idx[ok]]
    pq = (np.asarray(clean["q"])[ok] - truth["q"]) / np.asarray(clean["q_err"])[ok]
    pu = (np.asarray(clean["u"])[ok] - truth["u"]) / np.asarray(clean["u_err"])[ok]
    assert 0.6 < np.std(pq) < 1.6 and 0.6 < np.std(pu) < 1.6
    assert abs(np.mean(pq)) < 0.6 and abs(np.mean(pu)) < 0.6


def test_tables_and_flags_are_consistent(base):
    g, st, s = base.groups, base.stokes, base.spots
    for col in ("forced", "recovered", "x_fit", "y_fit", "chi2", "blend", "n_bad", "n_saturated"):
        assert col in s.colnames
    assert not np.any(np.asarray(s["forced"]) & np.asarray(s["recovered"]))
    measured = g[np.asarray(g["complete"], bool) & ~np.asarray(g["has_rejected"], bool)]
    assert sorted(st["group_id"]) == sorted(measured["group_id"])
    by_id = dict(zip(g["group_id"], g["flags"]))
    assert all(by_id[gid] == f for gid, f in zip(st["group_id"], st["flags"]))
    np.testing.assert_array_equal(
        np.asarray(g["clean"]),
        np.asarray(g["complete"], bool) & ~np.asarray(g["has_rejected"], bool)
        & (np.asarray(g["flags"]) == 0))
    # a row's bits are the OR of its spots' bits (plus the group-level ones)
    cfg = PhotometryConfig()
    per_spot = spot_flags(s, photometry="psf", artifact_light_threshold=None, blend_limit=cfg.blend_limit,
                          chi2_limit=cfg.chi2_limit, masked_limit=cfg.masked_limit)
    group_level = int(QualityFlag.PAIR_RATIO | QualityFlag.ARTIFACT_LIGHT | QualityFlag.BAD_FLUX)
    for gid, f in zip(st["group_id"], st["flags"]):
        ored = int(np.bitwise_or.reduce(per_spot[np.asarray(s["group_id"]) == gid]))
        assert (int(f) & ~group_level) == (ored & ~group_level), gid
    assert base.meta["n_clean"] == int(np.count_nonzero(st["flags"] == 0))


def isolated_clean_groups(result, shape, min_snr=20.0):
    """Clean quadruplets whose spots are isolated (> 5 FWHM), inside the frame and bright."""
    s, fwhm = result.spots, result.meta["fwhm"]
    ny, nx = shape
    out = []
    for gid in result.stokes["group_id"][result.stokes["flags"] == 0]:
        m = s[s["group_id"] == gid]
        x, y = np.asarray(m["x"]), np.asarray(m["y"])
        if (len(m) == 4 and np.all(np.asarray(m["nearest"]) > 5 * fwhm)
                and np.all(np.asarray(m["snr"]) > min_snr)
                and np.all((x > 40) & (x < nx - 40) & (y > 40) & (y < ny - 40))):
            out.append((float(np.min(m["nearest"])), int(gid)))
    assert out, "no isolated clean quadruplet in the test frame"
    return [gid for _, gid in sorted(out, reverse=True)]


def test_recovered_and_forced_spots(small_sim, profile, morphology, base):
    """Spots added at the predicted position: recovered when significant, otherwise
    forced and flagged; raising recover_snr turns the recovered ones into forced ones."""
    s = base.spots
    recovered = s[np.asarray(s["recovered"], bool)]
    if not len(recovered):
        pytest.skip("the test frame has no recovered spot")
    snr = np.asarray(recovered["flux"]) / np.asarray(recovered["flux_err"])
    assert np.all(snr >= PhotometryConfig().recover_snr)
    strict = reduce_frame(small_sim.ccd, profile=profile, classifier=morphology,
                          config=PhotometryConfig(recover_snr=1e6))
    assert strict.meta["config"] == {"photometry.recover_snr": 1e6}
    assert strict.meta["config_hash"] != base.meta["config_hash"]
    ss = strict.spots
    assert not np.any(ss["recovered"])
    assert np.count_nonzero(ss["forced"]) == np.count_nonzero(s["forced"] | s["recovered"])
    for gid in recovered["group_id"]:
        if gid in strict.stokes["group_id"]:
            assert row_flags(strict, gid) & QualityFlag.FORCED
        if gid in base.stokes["group_id"]:
            assert not row_flags(base, gid) & QualityFlag.FORCED


def blank_spot(sim, base, gid, which=0):
    """``sim``'s frame with spot ``which`` of group ``gid`` replaced by sky noise."""
    ccd = sim.ccd.copy()
    gain, ron = float(ccd.header["GAIN"]), float(ccd.header["RDNOISE"])
    victim = base.spots[(base.spots["group_id"] == gid)][which]
    yy, xx = np.mgrid[: ccd.shape[0], : ccd.shape[1]]
    disk = np.hypot(xx - victim["x"], yy - victim["y"]) <= 4 * base.meta["fwhm"]
    sky = np.maximum(sim.sky[disk], 0.0)
    rng = np.random.default_rng(0)
    ccd.data[disk] = (rng.poisson(sky * gain) + rng.normal(0.0, ron, sky.shape)) / gain
    return ccd, victim


def same_group(base, res, gid):
    """Row of ``res.groups`` with the centre of ``base``'s group ``gid``."""
    g = base.groups[base.groups["group_id"] == gid][0]
    dist, k = cKDTree(np.column_stack([res.groups["x"], res.groups["y"]])).query(
        [float(g["x"]), float(g["y"])])
    assert dist < 3
    return int(k)


@pytest.mark.parametrize("orphan_cue", [True, False])
def test_blanked_spot_is_forced_and_flagged(small_sim, profile, orphan_cue, base):
    from robopol_clean.classify import MorphologyClassifier

    gid = isolated_clean_groups(base, small_sim.ccd.shape)[0]
    ccd, victim = blank_spot(small_sim, base, gid)
    res = reduce_frame(ccd, profile=profile,
                       classifier=MorphologyClassifier(use_orphan_cue=orphan_cue))
    k = same_group(base, res, gid)
    new_gid = int(res.groups["group_id"][k])
    members = res.spots[res.spots["group_id"] == new_gid]
    assert len(members) == 4 and bool(res.groups["complete"][k])
    forced = members[np.asarray(members["forced"], bool)]
    assert len(forced) == 1 and not np.any(members["recovered"])
    assert forced["channel"][0] == victim["channel"]
    assert np.hypot(forced["x"][0] - victim["x"], forced["y"][0] - victim["y"]) < 1.5
    # nothing there: the flux is consistent with zero
    assert abs(forced["flux"][0]) < 3 * forced["flux_err"][0]
    assert res.groups["flags"][k] & QualityFlag.FORCED
    assert not res.groups["clean"][k]
    assert res.meta["n_predicted"] >= 1
    if orphan_cue:
        # the partner cue sees an empty predicted position: the three detected spots
        # look like orphans, are rejected, and the group gets no Stokes row
        assert res.groups["has_rejected"][k]
        assert new_gid not in res.stokes["group_id"]
    else:
        assert not res.groups["has_rejected"][k]
        assert row_flags(res, new_gid) & QualityFlag.FORCED


def test_masked_spot_is_flagged(small_sim, profile, morphology, base):
    ccd = small_sim.ccd.copy()
    gid = isolated_clean_groups(base, ccd.shape)[0]
    spot = base.spots[(base.spots["group_id"] == gid)][1]
    xi, yi = int(round(spot["x"])), int(round(spot["y"]))

    def reduce_with(rows, cols):
        ccd.mask = np.zeros(ccd.shape, bool)
        ccd.mask[rows, cols] = True
        res = reduce_frame(ccd, profile=profile, classifier=morphology)
        assert gid in res.stokes["group_id"]
        s = res.spots[res.spots["group_id"] == gid]
        return res, s[np.hypot(s["x"] - spot["x"], s["y"] - spot["y"]) < 2]

    # a bad column segment on the far wing: pixels lost, little light, not flagged
    res, hit = reduce_with(slice(yi + 4, yi + 6), slice(xi - 1, xi + 2))
    assert len(hit) == 1 and hit["n_bad"][0] > 0 and hit["masked_fraction"][0] < 0.1
    assert not row_flags(res, gid) & QualityFlag.MASKED
    # a masked core: most of the light lost, flagged
    res, hit = reduce_with(slice(yi - 1, yi + 2), slice(xi - 1, xi + 2))
    assert len(hit) == 1 and hit["masked_fraction"][0] > 0.1
    assert row_flags(res, gid) & QualityFlag.MASKED
    assert not row_flags(base, gid) & QualityFlag.MASKED


def test_clipped_spot_is_flagged_saturated(small_sim, profile, morphology, base):
    ccd = small_sim.ccd.copy()
    s = base.spots
    # the brightest isolated clean quadruplet, clipped below its brightest spot's peak
    gids = isolated_clean_groups(base, ccd.shape)
    gid = max(gids, key=lambda g: float(np.max(s["peak"][s["group_id"] == g])))
    spot = s[s["group_id"] == gid][np.argmax(s["peak"][s["group_id"] == gid])]
    xi, yi = int(round(spot["x"])), int(round(spot["y"]))
    stamp = np.asarray(ccd.data[yi - 6:yi + 7, xi - 6:xi + 7], float)
    level = float(np.sort(stamp.ravel())[-30])  # 30 pixels of the spot reach it
    ccd.data = np.minimum(np.asarray(ccd.data), np.float32(level))
    assert saturation_level(ccd.data, profile) == pytest.approx(level)
    res = reduce_frame(ccd, profile=profile, classifier=morphology)
    rs = res.spots[res.spots["group_id"] == gid] if gid in res.spots["group_id"] else None
    assert rs is not None and len(rs) == 4
    hit = rs[np.hypot(rs["x"] - spot["x"], rs["y"] - spot["y"]) < 2]
    assert len(hit) == 1 and hit["n_saturated"][0] > 0 and hit["saturated"][0]
    assert row_flags(res, gid) & QualityFlag.SATURATED
    assert not row_flags(base, gid) & QualityFlag.SATURATED


def test_combine_bits_sit_above_the_measurement_bits():
    from robopol_clean.quality import (
        COMBINE_FLAG_DESCRIPTIONS,
        CombineFlag,
        combined_flags_description,
    )

    values = [int(f) for f in CombineFlag]
    assert all(v & (v - 1) == 0 for v in values) and min(values) > 2 * max(map(int, QualityFlag))
    assert set(COMBINE_FLAG_DESCRIPTIONS) == set(CombineFlag)
    text = combined_flags_description()
    assert all(f"{int(f)} {f.name.lower()}" in text for f in CombineFlag)
    assert describe_flags(int(QualityFlag.BLENDED) | int(CombineFlag.DISAGREE)) == ["blended",
                                                                                   "disagree"]
