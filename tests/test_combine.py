"""Combining the exposures of a visit: statistics by hand, matching, flags, refusals and
real reductions of dithered simulated frames."""

import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table
from scipy.spatial import cKDTree
from scipy.stats import chi2 as chi2_distribution

from robopol_clean.combine import (
    CombineConfig,
    CombineError,
    combine_files,
    combine_night,
    combine_stokes,
    group_visits,
    load_combine_config,
    weighted_mean,
)
from robopol_clean.config import ConfigError
from robopol_clean.quality import CombineFlag, QualityFlag, describe_flags
from robopol_clean.stokes import stokes_from_qu


def _table(x, y, q, q_err, u, u_err, flags=None, ids=None, **extra):
    n = len(x)
    t = Table({"group_id": np.arange(n) if ids is None else np.asarray(ids),
               "x": np.asarray(x, float), "y": np.asarray(y, float),
               "q": np.asarray(q, float), "q_err": np.asarray(q_err, float),
               "u": np.asarray(u, float), "u_err": np.asarray(u_err, float),
               "flags": np.zeros(n, np.int64) if flags is None else np.asarray(flags, np.int64)})
    for name, values in extra.items():
        t[name] = values
    t.meta["profile"] = "RoboPol"
    return t


def _field(seed, n, size=1000.0):
    rng = np.random.default_rng(seed)
    return rng, rng.uniform(0, size, n), rng.uniform(0, size, n)


def _exposures(seed=3, n=80, dithers=((0, 0), (23.4, -41.2), (-57.0, 12.5), (61.0, 48.0)),
               missing=0.1, q_true=None):
    """Synthetic Stokes tables of one field; group_id is the true star index."""
    rng, x, y = _field(seed, n)
    err = 1.0 / np.sqrt(10 ** rng.uniform(3, 6, n))
    q0 = rng.normal(0, 0.02, n) if q_true is None else q_true
    u0 = rng.normal(0, 0.02, n)
    tables = []
    for dx, dy in dithers:
        keep = rng.random(n) >= missing
        idx = np.flatnonzero(keep)
        tables.append(_table(x[idx] + dx + rng.normal(0, 0.2, idx.size),
                             y[idx] + dy + rng.normal(0, 0.2, idx.size),
                             q0[idx] + rng.normal(0, err[idx]), err[idx],
                             u0[idx] + rng.normal(0, err[idx]), err[idx], ids=idx,
                             flux_top=1.0 / err[idx] ** 2))
    return tables, (x, y, q0, u0)


def test_weighted_mean_by_hand():
    mean, err, chi2, n = weighted_mean([[0.010, 0.014, 0.012], [1.0, np.nan, 3.0]],
                                       [[0.002, 0.002, 0.001], [1.0, 1.0, 0.0]])
    # w = 250000, 250000, 1e6: mean 18000 / 1.5e6, chi2 = 1 + 1 + 0
    assert mean[0] == pytest.approx(0.012) and err[0] == pytest.approx(1 / math.sqrt(1.5e6))
    assert chi2[0] == pytest.approx(2.0) and n[0] == 3
    # NaN value and zero error left out: one measurement, chi2 0
    assert (mean[1], err[1], chi2[1], n[1]) == (1.0, 1.0, 0.0, 1)
    mean, err, chi2, n = weighted_mean([[np.nan]], [[0.1]])
    assert np.isnan(mean[0]) and np.isnan(err[0]) and np.isnan(chi2[0]) and n[0] == 0


def test_tiny_visit_by_hand():
    """Three exposures of six stars; star 0's combination computed by hand."""
    x = [100.0, 420.0, 260.0, 700.0, 880.0, 530.0]
    y = [150.0, 90.0, 610.0, 330.0, 820.0, 460.0]
    qs = ([0.010, 0.014, 0.012], [0.002, 0.002, 0.001])
    us = ([-0.005, -0.003, -0.004], [0.001, 0.002, 0.002])
    tables = []
    for k, (dx, dy) in enumerate(((0, 0), (12.0, -7.0), (-9.0, 15.0))):
        q = [qs[0][k]] + [0.02] * 5
        u = [us[0][k]] + [-0.01] * 5
        tables.append(_table(np.add(x, dx), np.add(y, dy), q, [qs[1][k]] + [0.003] * 5,
                             u, [us[1][k]] + [0.003] * 5))
    visit = combine_stokes(tables, ["a", "b", "c"])
    t = visit.table
    np.testing.assert_allclose(visit.offsets, [[0, 0], [-12, 7], [9, -15]], atol=1e-9)
    star = t[np.argmin(np.hypot(t["x"] - 100.0, t["y"] - 150.0))]
    assert star["n_exposures"] == star["n_used"] == 3
    assert star["q"] == pytest.approx(0.012) and star["q_err"] == pytest.approx(1 / math.sqrt(1.5e6))
    # u: w = 1e6, 250000, 250000 -> -6750 / 1.5e6; chi2_u = 0.25 + 0.5625 + 0.0625
    assert star["u"] == pytest.approx(-0.0045) and star["u_err"] == pytest.approx(1 / math.sqrt(1.5e6))
    chi2 = 2.0 + 0.875
    assert star["chi2_dof"] == pytest.approx(chi2 / 4)
    assert star["p_chi2"] == pytest.approx(math.exp(-chi2 / 2) * (1 + chi2 / 2))  # 4 dof
    assert star["p"] == pytest.approx(math.hypot(0.012, 0.0045))
    assert star["theta"] == pytest.approx(0.5 * math.degrees(math.atan2(-0.0045, 0.012)) + 180)
    ref = stokes_from_qu(0.012, 1 / math.sqrt(1.5e6), -0.0045, 1 / math.sqrt(1.5e6))
    assert star["p_debiased"] == pytest.approx(float(ref.p_debiased))
    assert star["theta_err"] == pytest.approx(float(ref.theta_err))
    assert star["flags"] == 0 and (t["flags"] == 0).all() and len(t) == 6
    assert t["x"].unit == "pix" and t["theta"].unit == "deg"
    assert t.meta["inputs"] == ["a", "b", "c"] and t.meta["match"] == "pixel"
    assert t.meta["config_hash"] == CombineConfig().digest() and t.meta["profile"] == "RoboPol"


def _with_calibration_errors(table, q_cal, u_cal, corr=0.0):
    """A table as reduced with a calibration's covariance: q_err becomes the total."""
    t = table.copy()
    t["q_err_stat"], t["u_err_stat"] = t["q_err"], t["u_err"]
    t["q_err_cal"] = np.broadcast_to(np.asarray(q_cal, float), len(t)).copy()
    t["u_err_cal"] = np.broadcast_to(np.asarray(u_cal, float), len(t)).copy()
    t["qu_corr_cal"] = np.broadcast_to(np.asarray(corr, float), len(t)).copy()
    t["q_err"] = np.hypot(t["q_err_stat"], t["q_err_cal"])
    t["u_err"] = np.hypot(t["u_err_stat"], t["u_err_cal"])
    return t


def test_calibration_error_is_added_once():
    """Exposures sharing a calibration: the means and the chi-square use the statistical
    errors; the calibration's error is added once, not divided by the exposures."""
    x = [100.0, 420.0, 260.0, 700.0, 880.0, 530.0]
    y = [150.0, 90.0, 610.0, 330.0, 820.0, 460.0]
    q_stat = [0.002, 0.002, 0.001]
    q_cal = [4e-4, 5e-4, 6e-4]
    tables = []
    for k, (dx, dy) in enumerate(((0, 0), (12.0, -7.0), (-9.0, 15.0))):
        plain = _table(np.add(x, dx), np.add(y, dy), [0.010, 0.014, 0.012][k:k + 1] + [0.02] * 5,
                       [q_stat[k]] + [0.003] * 5, [-0.005] * 6, [0.002] * 6)
        tables.append(_with_calibration_errors(plain, [q_cal[k]] + [5e-4] * 5, 3e-4, corr=-0.5))
    t = combine_stokes(tables, ["a", "b", "c"]).table
    star = t[np.argmin(np.hypot(t["x"] - 100.0, t["y"] - 150.0))]
    # statistical weights 250000, 250000, 1e6, as without a calibration
    assert star["q"] == pytest.approx(0.012) and star["q_err_stat"] == pytest.approx(1 / math.sqrt(1.5e6))
    assert star["chi2_dof"] == pytest.approx(2.0 / 4)
    cal = (2.5e5 * 4e-4 + 2.5e5 * 5e-4 + 1e6 * 6e-4) / 1.5e6
    assert star["q_err_cal"] == pytest.approx(cal)
    assert star["q_err"] == pytest.approx(math.hypot(1 / math.sqrt(1.5e6), cal))
    # the same calibration error in every exposure stays as it is
    other = t[np.argmin(np.hypot(t["x"] - 420.0, t["y"] - 90.0))]
    assert other["q_err_cal"] == pytest.approx(5e-4) and other["u_err_cal"] == pytest.approx(3e-4)
    assert other["u_err"] == pytest.approx(math.hypot(0.002 / math.sqrt(3), 3e-4))
    assert other["qu_corr_cal"] == pytest.approx(-0.5)
    ref = stokes_from_qu(other["q"], other["q_err"], other["u"], other["u_err"],
                         qu_cov=-0.5 * 5e-4 * 3e-4)
    assert other["p_err"] == pytest.approx(float(ref.p_err))
    assert other["theta_err"] == pytest.approx(float(ref.theta_err))
    assert {"q_err_stat", "u_err_stat", "q_err_cal", "u_err_cal", "qu_corr_cal"} <= set(t.colnames)
    assert "calibration_errors" in t.meta
    # inflated errors: only the statistical part grows
    inflated = combine_stokes(tables, config=CombineConfig(inflate_errors=True)).table
    row = inflated[np.argmin(np.hypot(inflated["x"] - 100.0, inflated["y"] - 150.0))]
    assert row["q_err_cal"] == pytest.approx(cal)
    assert row["q_err"] == pytest.approx(math.hypot(row["q_err_stat"], cal))
    # tables without those columns combine as before, and do not mix with them
    plain = combine_stokes([_table(*(np.asarray(tb[c]) for c in ("x", "y", "q", "q_err_stat", "u",
                                                                    "u_err_stat"))) for tb in tables])
    assert "q_err_cal" not in plain.table.colnames and "calibration_errors" not in plain.table.meta
    with pytest.raises(CombineError, match="table 1: lacks the calibration's error columns"):
        combine_stokes([tables[0], _table(*(np.asarray(tables[1][c]) for c in (
            "x", "y", "q", "q_err_stat", "u", "u_err_stat")))])


def test_visits_sharing_a_calibration_have_unit_pulls():
    """A calibration error common to the exposures (one draw per star here, as many
    independent calibrations would give) does not average down: the combined pulls
    have unit spread; weighting it as independent noise would make them too wide."""
    rng, x, y = _field(21, 400)
    q_true, u_true = rng.normal(0, 0.02, 400), rng.normal(0, 0.02, 400)
    stat, cal = 1e-3, 8e-4
    dq, du = rng.normal(0, cal, 400), rng.normal(0, cal, 400)  # shared by the exposures
    tables = []
    for dx, dy in ((0, 0), (15.0, -8.0), (-11.0, 6.0), (7.0, 19.0)):
        plain = _table(x + dx, y + dy, q_true + dq + rng.normal(0, stat, 400), np.full(400, stat),
                       u_true + du + rng.normal(0, stat, 400), np.full(400, stat))
        tables.append(_with_calibration_errors(plain, cal, cal))
    t = combine_stokes(tables).table
    d, i = cKDTree(np.c_[x, y]).query(np.c_[t["x"], t["y"]])
    pulls = np.concatenate([(t["q"] - q_true[i]) / t["q_err"], (t["u"] - u_true[i]) / t["u_err"]])
    assert np.std(pulls) == pytest.approx(1.0, abs=0.06)
    naive = np.hypot(stat, cal) / 2.0  # the totals as if independent: 4 exposures
    assert np.std((t["q"] - q_true[i]) / naive) > 1.3
    # the chi-square comes from the statistical errors: the median of chi2(6) / 6
    assert np.nanmedian(t["chi2_dof"]) == pytest.approx(chi2_distribution.median(6) / 6, abs=0.08)


def test_cross_match_recovers_dithers_and_stars():
    dithers = ((0, 0), (23.4, -41.2), (-57.0, 12.5), (61.0, 48.0))
    tables, (x, y, *_) = _exposures(dithers=dithers)
    visit = combine_stokes(tables)
    expected = np.array(dithers[0]) - np.array(dithers)
    np.testing.assert_allclose(visit.offsets, expected, atol=0.1)
    members = visit.members
    for star_id in np.unique(members["star_id"]):
        ids = np.unique(members["group_id"][members["star_id"] == star_id])
        assert len(ids) == 1  # every star is one true star
    true_ids = np.asarray(members["group_id"])
    seen = np.array([int(np.count_nonzero(np.concatenate([t["group_id"] for t in tables]) == i))
                     for i in range(len(x))])
    t = visit.table
    assert len(t) == np.count_nonzero(seen)  # one row per star seen anywhere
    by_star = {int(s): int(true_ids[members["star_id"] == s][0]) for s in t["star_id"]}
    assert [seen[by_star[int(s)]] for s in t["star_id"]] == list(t["n_exposures"])
    assert (t["n_exposures"] < 4).any()  # stars missing from some exposures keep their row


def test_sky_positions_are_matched_when_every_table_has_them():
    """Pixel dithers beyond max_offset: only the sky can match them; the frames' WCS differ
    by 2 arcsec, which the fitted sky offset absorbs."""
    rng, x, y = _field(8, 60)
    center = SkyCoord(210.0, 35.0, unit="deg")
    frame = center.skyoffset_frame()
    scale = 0.39  # arcsec / px
    err = np.full(60, 0.002)
    tables = []
    for k, (dx, dy) in enumerate(((0, 0), (400.0, -310.0), (-250.0, 380.0))):
        wcs_error = np.array([0.0, 2.0]) if k == 1 else np.zeros(2)
        lon = (x - 500) * scale + wcs_error[0] + rng.normal(0, 0.05, 60)
        lat = (y - 500) * scale + wcs_error[1] + rng.normal(0, 0.05, 60)
        sky = SkyCoord(lon / 3600, lat / 3600, unit="deg", frame=frame).icrs
        tables.append(_table(x + dx, y + dy, rng.normal(0, err), err, rng.normal(0, err), err,
                             ra=sky.ra.deg, dec=sky.dec.deg))
    visit = combine_stokes(tables)
    assert visit.match == "sky" and len(visit.table) == 60
    assert (visit.table["n_used"] == 3).all()
    np.testing.assert_allclose(visit.offsets, [[0, 0], [-400, 310], [250, -380]], atol=0.1)
    np.testing.assert_allclose(visit.meta["sky_offsets"][1], [0.0, -2.0], atol=0.05)
    t = visit.table
    assert t["ra"].unit == "deg" and np.isfinite(t["dec"]).all()
    with pytest.raises(CombineError, match="table 1: not the same field as table 0"):
        combine_stokes(tables, config=CombineConfig(match="pixel"))
    with pytest.raises(CombineError, match="no ra/dec columns"):
        combine_stokes([tables[0], _table(x, y, err, err, err, err)],
                       config=CombineConfig(match="sky"))


def test_only_clean_measurements_enter_unless_asked():
    tables, _ = _exposures(seed=4, dithers=((0, 0), (10, 10), (-10, 5)), missing=0.0)
    blended = int(QualityFlag.BLENDED)
    # star 0: flagged in one exposure, wild q there; star 1: flagged everywhere
    for t in tables:
        t["flags"][t["group_id"] == 1] = int(QualityFlag.SATURATED)
    bad = tables[1]["group_id"] == 0
    tables[1]["flags"][bad] = blended
    tables[1]["q"][bad] += 0.5
    visit = combine_stokes(tables)
    t, m = visit.table, visit.members
    star0 = int(m["star_id"][(m["group_id"] == 0) & (m["exposure"] == 0)][0])
    star1 = int(m["star_id"][(m["group_id"] == 1) & (m["exposure"] == 0)][0])
    row0, row1 = t[star0], t[star1]
    assert row0["n_exposures"] == 3 and row0["n_used"] == 2 and row0["flags"] == 0
    assert abs(row0["q"] - tables[0]["q"][tables[0]["group_id"] == 0][0]) < 0.1
    # no clean measurement: the row stays, NaN, with why
    assert row1["n_used"] == 0 and np.isnan(row1["q"]) and np.isnan(row1["p"])
    assert row1["flags"] == int(CombineFlag.NO_MEASUREMENT) | int(QualityFlag.SATURATED)
    assert describe_flags(row1["flags"]) == ["saturated", "no_measurement"]
    # --include-flagged: they enter, their bits are carried, the wild one disagrees
    loose = combine_stokes(tables, config=CombineConfig(include_flagged=True)).table
    assert loose[star0]["n_used"] == 3
    assert loose[star0]["flags"] == blended | int(CombineFlag.DISAGREE)
    assert loose[star1]["n_used"] == 3 and loose[star1]["flags"] == int(QualityFlag.SATURATED)
    assert np.isfinite(loose[star1]["q"])
    assert loose.meta["config"] == {"include_flagged": True}


def test_disagreeing_exposures_are_flagged():
    tables, _ = _exposures(seed=5, dithers=((0, 0), (5, 5), (-5, 8), (3, -9)), missing=0.0)
    # star 7 jumps by 6 sigma in one exposure: chi2 ~ 36 * 3/4 on 6 dof
    for t, jump in zip(tables, (0.0, 0.0, 0.0, 6.0)):
        row = t["group_id"] == 7
        t["u"][row] += jump * t["u_err"][row]
    visit = combine_stokes(tables)
    t, m = visit.table, visit.members
    star = int(m["star_id"][(m["group_id"] == 7) & (m["exposure"] == 0)][0])
    assert t[star]["flags"] == int(CombineFlag.DISAGREE) and t[star]["p_chi2"] < 0.001
    others = np.asarray(t["star_id"]) != star
    assert np.mean(t["flags"][others] == 0) > 0.97  # chance alone: 0.1 %
    # inflation: the errors grow by sqrt(chi2/dof) where it exceeds 1, nowhere else
    inflated = combine_stokes(tables, config=CombineConfig(inflate_errors=True)).table
    scale = np.sqrt(np.maximum(np.asarray(t["chi2_dof"]), 1.0))
    np.testing.assert_allclose(inflated["q_err"], t["q_err"] * scale)
    assert inflated["q_err"][star] > 2 * t["q_err"][star]
    # a looser test flags nothing more than the default for this star set
    strict = combine_stokes(tables, config=CombineConfig(significance=1e-12)).table
    assert strict[star]["flags"] == 0


def test_other_field_is_refused_naming_it(tmp_path):
    tables, _ = _exposures(seed=6, dithers=((0, 0), (20, -15), (-30, 10)))
    other, _ = _exposures(seed=99, dithers=((0, 0),))
    paths = []
    for k, t in enumerate([*tables, *other]):
        paths.append(tmp_path / f"f{k}_stokes.ecsv")
        t.write(paths[-1])
    out = tmp_path / "visit.ecsv"
    with pytest.raises(CombineError, match=r"f3_stokes.ecsv: not the same field as .*f0_stokes.ecsv"):
        combine_files(paths, out)
    # the odd one first: still named, against the next exposure
    with pytest.raises(CombineError, match=r"f3_stokes.ecsv: not the same field as .*f0_stokes"):
        combine_files([paths[3], *paths[:3]], out)
    assert not out.exists() and not list(tmp_path.glob(".*part"))
    visit = combine_files(paths[:3], out)
    back = Table.read(out)
    assert len(back) == len(visit.table) and back.meta["inputs"] == [p.name for p in paths[:3]]
    assert back["q"].description.startswith("inverse-variance") and back["x"].unit == "pix"
    np.testing.assert_allclose(back.meta["offsets"], visit.offsets)
    from robopol_clean.io import OutputError

    with pytest.raises(OutputError, match="output exists"):
        combine_files(paths[:3], out)
    with pytest.raises(CombineError, match="given twice"):
        combine_files([paths[0], paths[0]], tmp_path / "v2.ecsv")
    with pytest.raises(CombineError, match="not a Stokes table"):
        bad = tmp_path / "bad.ecsv"
        Table({"x": [1.0]}).write(bad)
        combine_files([paths[0], bad], tmp_path / "v3.ecsv")
    night = tmp_path / "stokes_all.ecsv"
    both = Table.read(paths[0])
    both["frame"] = ["a.fits"] * (len(both) - 1) + ["b.fits"]
    both.write(night)
    with pytest.raises(CombineError, match="stokes_all.ecsv: holds the rows of several frames"):
        combine_files([night, paths[1]], tmp_path / "v5.ecsv")
    with pytest.raises(CombineError, match="not a readable ECSV"):
        junk = tmp_path / "junk.ecsv"
        junk.write_text("not a table\x00")
        combine_files([paths[0], junk], tmp_path / "v4.ecsv")


@pytest.mark.parametrize(("key", "values", "what"), [
    ("calibration_hash", ("abc123", "def456"), "calibration differs"),
    ("filter", ("R", "V"), "band"),
    ("profile", ("RoboPol", "WALOP"), "instrument profile"),
    ("angle_zero", (0.0, 2.5), r"calibration \(angle zero point\) differs"),
    ("calibration_hash", (None, "def456"), "calibration differs"),
])
def test_mixed_profiles_bands_and_calibrations_are_refused(key, values, what):
    tables, _ = _exposures(seed=7, dithers=((0, 0), (5, 5)))
    for t, v in zip(tables, values):
        if v is not None:
            t.meta[key] = v
    with pytest.raises(CombineError, match=f"table 1: {what}"):
        combine_stokes(tables)


def test_config_checks_and_file(tmp_path):
    with pytest.raises(ValueError, match="match must be one of"):
        CombineConfig(match="nearest")
    with pytest.raises(ValueError, match="significance"):
        CombineConfig(significance=0.0)
    with pytest.raises(ValueError, match="min_matches"):
        CombineConfig(min_matches=0)
    path = tmp_path / "combine.toml"
    path.write_text("significance = 0.01\ninclude_flagged = true\n")
    assert load_combine_config(path) == CombineConfig(significance=0.01, include_flagged=True)
    path.write_text("radius = 3\n")
    with pytest.raises(ConfigError, match="combine.toml: unknown setting 'radius'"):
        load_combine_config(path)
    with pytest.raises(CombineError, match="at least two"):
        combine_stokes(_exposures(dithers=((0, 0),))[0])


def test_group_visits_splits_a_night_by_field():
    a, _ = _exposures(seed=10, dithers=((0, 0), (8, -3), (-6, 4)))
    b, _ = _exposures(seed=11, dithers=((0, 0), (5, 5)))
    c = [a[0].copy()]
    c[0].meta["filter"] = "V"
    tables = [*a, *b, *c]
    assert group_visits(tables, [f"t{k}" for k in range(len(tables))]) == [[0, 1, 2], [3, 4], [5]]


# --- real reductions of dithered simulated frames ----------------------------------------
def test_real_reductions_have_sky_columns(visit_sims, visit_reduced):
    sim, result = visit_sims[0], visit_reduced[0]
    stokes = result.stokes
    assert stokes.colnames[:5] == ["group_id", "x", "y", "ra", "dec"]
    assert stokes["ra"].unit == "deg" and "ICRS" in stokes["ra"].description
    d, i = cKDTree(np.c_[sim.stars["x"], sim.stars["y"]]).query(np.c_[stokes["x"], stokes["y"]])
    true = sim.ccd.wcs.pixel_to_world(sim.stars["x"][i], sim.stars["y"][i])
    got = SkyCoord(stokes["ra"], stokes["dec"], unit="deg")
    assert np.median(got.separation(true).arcsec[d < 2]) < 0.2


@pytest.mark.parametrize("match", ["sky", "pixel"])
def test_real_reductions_of_a_dithered_field_combine(visit_sims, visit_reduced, match):
    tables = [r.stokes.copy() for r in visit_reduced[:3]]
    if match == "pixel":
        for t in tables:
            t.remove_columns(["ra", "dec"])
    visit = combine_stokes(tables, [r.meta["frame"] for r in visit_reduced[:3]])
    assert visit.match == match
    dithers = np.array([sim.params["dither"] for sim in visit_sims[:3]])
    expected = dithers[0] - dithers
    np.testing.assert_allclose(visit.offsets, expected, atol=0.3)
    t = visit.table
    assert (t["n_used"] == 3).sum() >= 10
    # each combined star is one simulated star; its q, u agree with the truth
    truth = visit_sims[0].stars
    d, i = cKDTree(np.c_[truth["x"], truth["y"]]).query(np.c_[t["x"], t["y"]])
    good = (d < 1.5) & (t["flags"] == 0)
    assert good.sum() >= 0.8 * np.count_nonzero(t["flags"] == 0)
    pulls = np.concatenate([(t["q"] - truth["q"][i]) / t["q_err"],
                            (t["u"] - truth["u"][i]) / t["u_err"]])[np.r_[good, good]]
    assert np.mean(np.abs(pulls) < 3) > 0.9 and abs(np.median(pulls)) < 0.5
    if match == "sky":
        sky = SkyCoord(t["ra"], t["dec"], unit="deg")
        true = visit_sims[0].ccd.wcs.pixel_to_world(truth["x"][i], truth["y"][i])
        assert np.median(sky.separation(true).arcsec[good]) < 0.2
    # the other field: refused, named
    refused = "visit3.fits: not the same field as visit0.fits" + (
        r" \(pointings 0.4\d\d deg apart" if match == "sky" else "")
    with pytest.raises(CombineError, match=refused):
        other = visit_reduced[3].stokes.copy()
        if match == "pixel":
            other.remove_columns(["ra", "dec"])
        combine_stokes([*tables, other], [r.meta["frame"] for r in visit_reduced])


def test_combine_night_writes_visits(visit_reduced, tmp_path):
    paths = []
    for k, r in enumerate(visit_reduced):
        paths.append(tmp_path / f"visit{k}_stokes.ecsv")
        r.stokes.write(paths[-1])
    (tmp_path / "broken_stokes.ecsv").write_text("junk")
    written = combine_night([*paths, tmp_path / "broken_stokes.ecsv"], tmp_path)
    assert set(written) == {"visit0_visit.ecsv", "visits"}
    visits = Table.read(tmp_path / "visits.ecsv")
    assert list(visits["frames"]) == ["visit0,visit1,visit2"] and visits["n_frames"][0] == 3
    visit = Table.read(tmp_path / "visit0_visit.ecsv")
    assert visit.meta["inputs"] == [p.name for p in paths[:3]] and visit.meta["match"] == "sky"
    assert len(visit) == visits["n_stars"][0]
