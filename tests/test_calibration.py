"""Calibration from standard stars (robopol_clean.calibration): the fit recovers injected
instrumental effects, refuses what the standards cannot constrain, and the calibration file
round-trips and is applied (with its hash recorded) by reduce_frame."""

import dataclasses
import hashlib
import math
import tomllib

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from astropy.wcs import WCS
from conftest import INJECTED, STANDARD_WINDOW

from robopol_clean.calibration import (
    Calibration,
    CalibrationError,
    CalibrationSettings,
    fit_calibration,
    fit_measurements,
    load_calibration,
    measure_standards,
    term_degree,
)
from robopol_clean.io import OutputError
from robopol_clean.pipeline import reduce_frame
from robopol_clean.plots import plot_calibration_residuals
from robopol_clean.products import write_products
from robopol_clean.simulate import simulate_frame
from robopol_clean.standards import StandardError, find_standard
from robopol_clean.stokes import stokes_from_fluxes

CATALOGUE = {"BD+59 389": (-0.06172, -0.01803), "HD 212311": (-0.00007, 0.00033),
             "Hiltner 960": (-0.01703, 0.04924), "BD+32 3739": (0.00008, 0.00024)}


def _observed(q, u, angle, q_inst, u_inst):
    """What the instrument measures: R(-angle) (q, u) + instrumental (the model)."""
    c, s = math.cos(math.radians(2 * angle)), math.sin(math.radians(2 * angle))
    return q * c + u * s + q_inst, -q * s + u * c + u_inst


def _measurements(plan, angle=3.0, inst=(0.004, -0.003), err=5e-4, seed=None, profile=None):
    """A measurements table: ``plan`` lists (standard, x_det, y_det); ``inst`` may be
    callables of (x, y); noiseless unless ``seed``."""
    rng = np.random.default_rng(seed) if seed is not None else None
    rows = []
    for i, (name, x, y) in enumerate(plan):
        qi = inst[0](x, y) if callable(inst[0]) else inst[0]
        ui = inst[1](x, y) if callable(inst[1]) else inst[1]
        q, u = _observed(*CATALOGUE[name], angle, qi, ui)
        if rng is not None:
            q, u = q + rng.normal(0, err), u + rng.normal(0, err)
        rows.append((f"f{i}.fits", name, x, y, q, err, u, err))
    return Table(rows=rows, names=("frame", "standard", "x_det", "y_det", "q", "q_err", "u", "u_err"))


TARGET = (1026.0, 1043.0)


def test_term_degree():
    assert [term_degree(t) for t in ("1", "x", "y", "x2", "xy", "y2", "x3", "x2y")] == [0, 1, 1, 2, 2,
                                                                                      2, 3, 3]


def test_fit_recovers_zero_point_and_constant_instrumental_polarization():
    plan = [("BD+59 389", *TARGET)] * 3 + [("HD 212311", *TARGET)] * 3
    fit = fit_measurements(_measurements(plan))  # noiseless
    assert fit.parameters == ["angle_zero", "q_inst[1]", "u_inst[1]"]
    np.testing.assert_allclose(fit.values, [3.0, 0.004, -0.003], atol=1e-9)
    assert fit.chi2 == pytest.approx(0.0, abs=1e-12) and fit.dof == 2 * 6 - 3
    cal = fit.calibration
    assert (cal.angle_zero, cal.q_inst[0], cal.u_inst[0]) == pytest.approx((3.0, 0.004, -0.003))
    assert cal.q_inst[1:] == (0.0,) * 5 and cal.terms == ("1", "x", "y", "x2", "xy", "y2")
    # errors: photon noise (5e-4 per frame) and the catalogue errors (~2.2e-4)
    angle_err = fit.value("angle_zero")[1]
    assert 0.1 < angle_err < 0.4
    assert fit.covariance.shape == (3, 3) and np.allclose(fit.covariance, fit.covariance.T)
    assert np.allclose(np.sqrt(np.diag(fit.covariance)), fit.errors)
    # the catalogue taken as exact: smaller errors, same values
    exact = fit_measurements(_measurements(plan), settings={"catalogue_errors": False})
    np.testing.assert_allclose(exact.values, fit.values, atol=1e-9)
    assert np.all(exact.errors < fit.errors)
    assert list(fit.standards["name"]) == ["BD+59 389", "HD 212311"]
    assert list(fit.standards["n_frames"]) == [3, 3]


def test_fit_errors_are_honest():
    """Over many noisy realisations the pulls of the fitted parameters have unit spread."""
    plan = [("BD+59 389", *TARGET)] * 3 + [("HD 212311", *TARGET)] * 3
    pulls = []
    for seed in range(200):
        fit = fit_measurements(_measurements(plan, seed=seed), settings={"catalogue_errors": False})
        pulls.append((fit.values - [3.0, 0.004, -0.003]) / fit.errors)
    pulls = np.array(pulls)
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.25)
    assert np.all(np.abs(pulls.std(axis=0) - 1) < 0.15)


def test_fit_recovers_a_linear_map_over_the_field(profile):
    geo = profile.geometry

    def q_map(x, y):
        return 0.004 + 0.002 * (x - geo.center[0]) / geo.scale

    def u_map(x, y):
        return -0.003 - 0.001 * (y - geo.center[1]) / geo.scale

    places = [(300.0, 300.0), (1700.0, 400.0), (1000.0, 1700.0), TARGET]
    plan = [(name, *xy) for xy in places for name in ("Hiltner 960", "BD+32 3739")]
    fit = fit_measurements(_measurements(plan, inst=(q_map, u_map)), settings={"order": 1})
    assert fit.parameters == ["angle_zero", "q_inst[1]", "q_inst[x]", "q_inst[y]",
                              "u_inst[1]", "u_inst[x]", "u_inst[y]"]
    np.testing.assert_allclose(fit.values, [3.0, 0.004, 0.002, 0.0, -0.003, 0.0, -0.001], atol=1e-9)
    # the file's coefficients evaluate, through the profile, to the injected map
    calibrated = fit.calibration.apply(profile)
    qi, ui = calibrated.instrumental_qu(np.array([100.0, 1900.0]), np.array([200.0, 1500.0]))
    np.testing.assert_allclose(qi, q_map(np.array([100.0, 1900.0]), 0), atol=1e-9)
    np.testing.assert_allclose(ui, u_map(0, np.array([200.0, 1500.0])), atol=1e-9)


def test_fixed_parameters_keep_the_profile_values(profile):
    unpolarized = [("HD 212311", *TARGET)] * 2 + [("BD+32 3739", *TARGET)] * 2
    fit = fit_measurements(_measurements(unpolarized, angle=profile.angle_zero),
                           settings={"fit_angle": False})
    assert fit.parameters == ["q_inst[1]", "u_inst[1]"]
    assert fit.calibration.angle_zero == profile.angle_zero
    np.testing.assert_allclose(fit.values, [0.004, -0.003], atol=1e-9)
    polarized = [("BD+59 389", *TARGET), ("Hiltner 960", *TARGET)]
    fit = fit_measurements(_measurements(polarized, inst=(0.0, 0.0)),
                           settings={"fit_instrumental": False})
    assert fit.parameters == ["angle_zero"] and fit.value("angle_zero")[0] == pytest.approx(3.0)
    assert fit.calibration.q_inst == (0.0,) * 6


@pytest.mark.parametrize(("plan", "settings", "message"), [
    ([("HD 212311", *TARGET)] * 3, {},
     r"no polarized standard among the frames \(only HD 212311\): the angle zero point cannot be "
     r"fitted; add frames of a polarized standard \(BD\+59 389, HD 204827, Hiltner 960, VI Cyg 12\)"),
    ([("BD+59 389", *TARGET)] * 3 + [("HD 212311", *TARGET)] * 3, {"order": 1},
     r"order 1 has 3 terms and needs standards at 3 or more positions .*; the frames put them at 1"),
    ([("BD+59 389", *TARGET)] * 3, {},
     r"the standards \(BD\+59 389\) cannot separate angle_zero, q_inst\[1\], u_inst\[1\]"),
    ([("BD+59 389", *TARGET)] * 3, {"order": 3}, r"order 3 needs polynomial terms the RoboPol "
                                                  r"profile lacks"),
])
def test_refusals(plan, settings, message):
    with pytest.raises(CalibrationError, match=message):
        fit_measurements(_measurements(plan), settings=settings)


def test_more_refusals():
    with pytest.raises(CalibrationError, match="no standard-star measurements"):
        fit_measurements(_measurements([])[:0])
    bad = _measurements([("BD+59 389", *TARGET)])
    bad["standard"][0] = "Vega"
    with pytest.raises(CalibrationError, match="'Vega' is not in the standards catalogue"):
        fit_measurements(bad)
    with pytest.raises(CalibrationError, match="nothing to fit"):
        fit_measurements(_measurements([("BD+59 389", *TARGET)]),
                         settings={"fit_angle": False, "fit_instrumental": False})
    with pytest.raises(ValueError, match="order must be an integer"):
        CalibrationSettings(order=-1)


def test_file_round_trip_and_hash(tmp_path, profile):
    plan = [("BD+59 389", *TARGET)] * 2 + [("HD 212311", *TARGET)] * 2
    fit = fit_measurements(_measurements(plan, seed=3))
    path = fit.write(tmp_path / "cal.toml")
    raw = path.read_bytes()
    cal = load_calibration(path)
    assert cal.sha256 == hashlib.sha256(raw).hexdigest() == fit.calibration.sha256
    assert cal.source == str(path)
    assert (cal.angle_zero, cal.q_inst, cal.u_inst, cal.terms, cal.center, cal.scale) == (
        fit.calibration.angle_zero, fit.calibration.q_inst, fit.calibration.u_inst,
        fit.calibration.terms, fit.calibration.center, fit.calibration.scale)
    # the fit's covariance travels with it, the same from the file as unsaved
    assert cal.parameters == tuple(fit.parameters) == fit.calibration.parameters
    assert cal.covariance == fit.calibration.covariance and cal.has_covariance
    np.testing.assert_allclose(cal.covariance, fit.covariance, rtol=1e-12)
    assert cal.describe()["covariance"] == [list(r) for r in cal.covariance]
    doc = tomllib.loads(raw.decode())
    assert doc["format"] == "robopol-clean calibration" and doc["format_version"] == 1
    assert doc["instrument"] == "RoboPol" and doc["created"] and doc["robopol_clean_version"]
    assert doc["fit"]["chi2"] == pytest.approx(fit.chi2) and doc["fit"]["dof"] == fit.dof
    assert np.allclose(doc["fit"]["covariance"], fit.covariance)
    assert doc["fit"]["settings"] == CalibrationSettings().as_dict()
    assert [s["name"] for s in doc["standards"]] == ["BD+59 389", "HD 212311"]
    assert [f["frame"] for f in doc["frames"]] == ["f0.fits", "f1.fits", "f2.fits", "f3.fits"]
    assert {"q_model", "z_q", "z_u"} <= set(doc["frames"][0])
    # not replaced silently, nothing half-written
    with pytest.raises(OutputError, match="output exists"):
        fit.write(path)
    assert path.read_bytes() == raw and not list(tmp_path.glob(".*part"))
    # applying it sets the profile's calibration, and only that
    applied = cal.apply(profile)
    assert applied.angle_zero == cal.angle_zero and applied.q_inst[0] == cal.q_inst[0]
    assert applied.geometry is profile.geometry and profile.angle_zero == 0.0


def _write_toml(path, text):
    path.write_text(text)
    return path


GOOD = """format = "robopol-clean calibration"
format_version = 1
instrument = "RoboPol"
[calibration]
angle_zero = 2.0
terms = ["1"]
q_inst = [0.001]
u_inst = [0.002]
center = [1024.0, 1024.0]
scale = 1024.0
"""


FIT = """
[fit]
parameters = ["angle_zero", "q_inst[1]", "u_inst[1]"]
covariance = [[0.04, 1e-6, 0.0], [1e-6, 9e-8, 0.0], [0.0, 0.0, 1e-7]]
"""


def test_the_fit_covariance_is_read_and_optional(tmp_path):
    cal = load_calibration(_write_toml(tmp_path / "c.toml", GOOD + FIT))
    assert cal.parameters == ("angle_zero", "q_inst[1]", "u_inst[1]")
    assert cal.covariance[0] == (0.04, 1e-6, 0.0) and cal.has_covariance
    cov = cal.covariance_at([0.0, 2047.0], [0.0, 2047.0])
    assert cov.shape == (2, 3, 3)
    np.testing.assert_allclose(cov[0], np.array(cal.covariance))  # a constant map: same everywhere
    # a file without it (written by hand): applied as before, nothing propagated
    bare = load_calibration(_write_toml(tmp_path / "b.toml", GOOD))
    assert not bare.has_covariance and bare.parameters == () and bare.covariance == ()
    assert not bare.covariance_at([1.0], [2.0]).any() and "covariance" not in bare.describe()
    other = load_calibration(_write_toml(tmp_path / "o.toml", GOOD + "[fit]\nchi2 = 1.0\n"))
    assert not other.has_covariance


def _fit_text(parameters='["angle_zero", "q_inst[1]", "u_inst[1]"]',
              covariance="[[0.04, 1e-6, 0.0], [1e-6, 9e-8, 0.0], [0.0, 0.0, 1e-7]]"):
    return GOOD + f"[fit]\nparameters = {parameters}\ncovariance = {covariance}\n"


@pytest.mark.parametrize(("text", "message"), [
    (_fit_text(covariance="[[0.04, 1e-6], [1e-6, 9e-8]]"),
     r"\[fit.covariance\] must be a 3 x 3 matrix"),
    (_fit_text(covariance="[[0.04, 1e-6, 0.0], [2e-6, 9e-8, 0.0], [0.0, 0.0, 1e-7]]"),
     r"\[fit.covariance\] is not symmetric"),
    (_fit_text(covariance="[[0.04, 1e-6, 0.0], [1e-6, nan, 0.0], [0.0, 0.0, 1e-7]]"),
     r"\[fit.covariance\] holds a non-finite value"),
    (_fit_text(covariance="[[0.04, 1e-6, 0.0], [1e-6, -9e-8, 0.0], [0.0, 0.0, 1e-7]]"),
     r"\[fit.covariance\] has a negative variance"),
    (_fit_text(covariance="[[1.0, 0.0, 0.9], [0.0, 1.0, 0.9], [0.9, 0.9, 1.0]]"),
     r"\[fit.covariance\] is not positive semi-definite"),
    (_fit_text(covariance='[["a", 1e-6, 0.0], [1e-6, 9e-8, 0.0], [0.0, 0.0, 1e-7]]'),
     r"\[fit.covariance\] must hold numbers only"),
    (_fit_text(parameters='["angle_zero", "q_inst[x]", "u_inst[1]"]'),
     r"\[fit.parameters\] 'q_inst\[x\]' is not angle_zero, q_inst\[<term>\] or u_inst"),
    (_fit_text(parameters='["angle_zero", "angle_zero", "u_inst[1]"]'),
     r"\[fit.parameters\] must be a list of distinct names"),
    (GOOD + "[fit]\ncovariance = [[1.0]]\n", r"\[fit\] has covariance without parameters"),
    ('fit = "none"\n' + GOOD, r"\[fit\] must be a table"),
])
def test_a_wrong_covariance_is_one_clear_error(tmp_path, text, message):
    path = _write_toml(tmp_path / "wrong.toml", text)
    with pytest.raises(CalibrationError, match=rf"^{tmp_path / 'wrong.toml'}: {message}"):
        load_calibration(path)


def _with_parameters(cal: Calibration, values) -> Calibration:
    """The calibration with its fitted parameters set to ``values``."""
    angle, q, u = cal.angle_zero, list(cal.q_inst), list(cal.u_inst)
    for name, v in zip(cal.parameters, values):
        if name == "angle_zero":
            angle = float(v)
        else:
            coeffs = q if name.startswith("q_inst") else u
            coeffs[cal.terms.index(name[7:-1])] = float(v)
    return dataclasses.replace(cal, angle_zero=angle, q_inst=tuple(q), u_inst=tuple(u))


def test_calibration_errors_match_monte_carlo_of_the_fit(profile):
    """Calibrations drawn from a fitted map's covariance and applied through the profile:
    the calibrated q and u of sources across the field scatter as q_err_cal and
    u_err_cal say."""
    geo = profile.geometry
    places = [(300.0, 300.0), (1700.0, 400.0), (1000.0, 1700.0), TARGET]
    plan = [(name, *xy) for xy in places for name in ("Hiltner 960", "BD+32 3739")]

    def q_map(x, y):
        return 0.004 + 0.002 * (x - geo.center[0]) / geo.scale

    fit = fit_measurements(_measurements(plan, inst=(q_map, -0.003), seed=5), settings={"order": 1})
    cal = fit.calibration
    assert len(cal.parameters) == 7 and cal.has_covariance
    x, y = np.array([150.0, 1024.0, 1900.0, 600.0]), np.array([1800.0, 1024.0, 200.0, 900.0])
    # what the instrument records of bright sources (photon noise negligible)
    q0, u0 = np.array([0.03, 0.0, -0.02, 0.01]), np.array([0.01, 0.04, 0.0, -0.03])
    applied = cal.apply(profile)
    qi, ui = applied.instrumental_qu(x, y)
    raw_q, raw_u = _observed(q0, u0, cal.angle_zero, qi, ui)
    f = np.array([1e14 * (1 + raw_q), 1e14 * (1 + raw_u), 1e14 * (1 - raw_q), 1e14 * (1 - raw_u)])
    predicted = stokes_from_fluxes(*f, *np.sqrt(f), q_inst=qi, u_inst=ui, angle_zero=cal.angle_zero,
                                   calibration_covariance=cal.covariance_at(x, y, geo))
    np.testing.assert_allclose(predicted.q, q0, atol=1e-9)
    rng = np.random.default_rng(8)
    qu = []
    for draw in rng.multivariate_normal(fit.values, fit.covariance, 3000):
        drawn = _with_parameters(cal, draw).apply(profile)
        r = stokes_from_fluxes(*f, *np.sqrt(f), q_inst=drawn.instrumental_qu(x, y)[0],
                               u_inst=drawn.instrumental_qu(x, y)[1], angle_zero=drawn.angle_zero)
        qu.append((r.q, r.u))
    qu = np.array(qu)
    np.testing.assert_allclose(qu[:, 0].std(axis=0), predicted.q_err_cal, rtol=0.06)
    np.testing.assert_allclose(qu[:, 1].std(axis=0), predicted.u_err_cal, rtol=0.06)
    corr = [np.corrcoef(qu[:, 0, k], qu[:, 1, k])[0, 1] for k in range(len(x))]
    np.testing.assert_allclose(corr, predicted.qu_corr_cal, atol=0.06)
    # a map is known best where the standards were: the centre beats the corner
    assert predicted.q_err_cal[1] < predicted.q_err_cal[0]


@pytest.mark.parametrize(("text", "message"), [
    ("x = [", r"not valid TOML"),
    ("format = 'something else'\n", r"not a robopol-clean calibration file"),
    (GOOD.replace("format_version = 1", "format_version = 2"), r"\[format_version\] 2 is newer"),
    (GOOD.replace('instrument = "RoboPol"\n', ""), r"\[instrument\] is required"),
    (GOOD.replace("angle_zero = 2.0", "angle_zero = nan"), r"\[calibration.angle_zero\] must be finite"),
    (GOOD.replace("angle_zero = 2.0\n", ""), r"\[calibration.angle_zero\] must be a number"),
    (GOOD.replace("q_inst = [0.001]", "q_inst = [0.001, 0.0]"), r"\[calibration.q_inst\] must be a list of 1"),
    (GOOD.replace("u_inst = [0.002]", "u_inst = [inf]"), r"\[calibration.u_inst\] holds a non-finite"),
    (GOOD.replace('terms = ["1"]', 'terms = ["z"]'), r"\[calibration.terms\] must be distinct monomials"),
    (GOOD.replace("scale = 1024.0", "scale = -1.0"), r"\[calibration.scale\] must be positive"),
])
def test_a_wrong_calibration_file_is_one_clear_error(tmp_path, text, message):
    path = _write_toml(tmp_path / "wrong.toml", text)
    with pytest.raises(CalibrationError, match=rf"^{tmp_path / 'wrong.toml'}: {message}"):
        load_calibration(path)


def test_a_calibration_for_another_instrument_or_normalisation(tmp_path, profile):
    cal = load_calibration(_write_toml(tmp_path / "c.toml", GOOD))
    assert cal.apply(profile).u_inst[0] == 0.002
    other = load_calibration(_write_toml(tmp_path / "w.toml", GOOD.replace("RoboPol", "WALOP")))
    with pytest.raises(CalibrationError, match="w.toml: a calibration for instrument 'WALOP', not "
                                               "for the 'RoboPol' profile"):
        other.apply(profile)
    shifted = load_calibration(_write_toml(tmp_path / "s.toml", GOOD.replace("[1024.0, 1024.0]",
                                                                               "[1000.0, 1024.0]")))
    with pytest.raises(CalibrationError, match="s.toml: \\[calibration\\] center"):
        shifted.apply(profile)
    with pytest.raises(CalibrationError, match="missing.toml: cannot read calibration"):
        load_calibration(tmp_path / "missing.toml")


# --- real frames: simulated standards reduced by the pipeline -----------------------------

@pytest.fixture(scope="module")
def standard_fit(standard_sims, morphology):
    return fit_calibration([s.ccd for s in standard_sims], classifier=morphology)


def test_fit_on_reduced_frames_recovers_the_injection(standard_fit):
    fit = standard_fit
    m = fit.measurements
    assert list(m["standard"]) == ["BD+59 389"] * 3 + ["HD 212311"] * 3
    assert set(m["matched_by"]) == {"OBJECT"} and set(m["located_by"]) == {"target"}
    assert np.all(m["offset"] < 3) and np.all(m["flags"] == 0)
    # the standard is found at the profile's target position on the detector
    np.testing.assert_allclose(m["x_det"], TARGET[0], atol=8)
    np.testing.assert_allclose(m["y_det"], TARGET[1], atol=8)
    for name, true in zip(fit.parameters, (INJECTED["angle_zero"], INJECTED["q_inst"],
                                           INJECTED["u_inst"])):
        value, err = fit.value(name)
        assert abs(value - true) < 3 * err, (name, value, err)
    assert fit.value("angle_zero")[1] < 0.4
    assert fit.dof == 9 and fit.chi2 < 30


def test_calibration_applied_by_reduce_frame(standard_fit, morphology, tmp_path):
    path = standard_fit.write(tmp_path / "cal.toml")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sim = simulate_frame(seed=40, n_stars=150, standard="VI Cyg 12", calibration=INJECTED,
                         **STANDARD_WINDOW)
    target = sim.stars[sim.stars["is_target"]][0]

    def target_row(result):
        st = result.stokes
        return st[int(np.argmin(np.hypot(st["x"] - target["x"], st["y"] - target["y"])))]

    raw = target_row(reduce_frame(sim.ccd, classifier=morphology))
    result = reduce_frame(sim.ccd, classifier=morphology, calibration=path)
    row = target_row(result)
    # the fit's covariance is in the errors; without it they are the statistical part
    stokes = result.stokes
    bare = dataclasses.replace(load_calibration(path), parameters=(), covariance=())
    plain = reduce_frame(sim.ccd, classifier=morphology, calibration=bare).stokes
    np.testing.assert_array_equal(stokes["q_err_stat"], plain["q_err"])
    np.testing.assert_array_equal(stokes["u_err_stat"], plain["u_err"])
    np.testing.assert_array_equal(stokes["q"], plain["q"])
    np.testing.assert_allclose(stokes["u_err"] ** 2, plain["u_err"] ** 2 + stokes["u_err_cal"] ** 2)
    assert "q_err_cal" not in plain.colnames and np.all(stokes["q_err_cal"] > 0)
    assert result.meta["calibration_file"]["parameters"] == standard_fit.parameters
    # uncalibrated: off by the injected rotation and offset; calibrated: the catalogue values
    q_cat, u_cat = -0.04809, -0.06259
    assert abs(raw["u"] - u_cat) > 5 * raw["u_err"]
    assert abs(row["q"] - q_cat) < 4 * row["q_err"] and abs(row["u"] - u_cat) < 4 * row["u_err"]
    h = result.ccd.header
    assert h["RCLCAL"] == sha and h["RCLCALF"] == str(path)
    for table in (result.stokes, result.spots, result.groups):
        assert table.meta["calibration_file"]["sha256"] == sha
        assert table.meta["calibration_file"]["file"] == str(path)
    assert result.stokes.meta["angle_zero"] == pytest.approx(standard_fit.calibration.angle_zero)
    assert result.meta["calibration_file"]["angle_zero"] == result.stokes.meta["angle_zero"]
    # no calibration file: nothing recorded but the profile's own values
    plain = reduce_frame(sim.ccd, classifier=morphology)
    assert "RCLCAL" not in plain.ccd.header and "calibration_file" not in plain.stokes.meta
    # written products keep the hash, and the header card needs no HIERARCH
    write_products(result, tmp_path / "out", "vicyg")
    with fits.open(tmp_path / "out" / "vicyg_clean.fits") as hdul:
        assert hdul[0].header["RCLCAL"] == sha
    assert Table.read(tmp_path / "out" / "vicyg_stokes.ecsv").meta["calibration_file"]["sha256"] == sha


def test_reduce_frame_refuses_a_wrong_calibration(small_sim, morphology, tmp_path):
    path = _write_toml(tmp_path / "w.toml", GOOD.replace("RoboPol", "WALOP"))
    with pytest.raises(CalibrationError, match="w.toml: a calibration for instrument 'WALOP'"):
        reduce_frame(small_sim.ccd, classifier=morphology, calibration=path)


def test_stokes_products_as_input(standard_sims, morphology, tmp_path, profile):
    """The products of a reduce without calibration give the same measurement as the frame."""
    sim = standard_sims[0]
    result = reduce_frame(sim.ccd, classifier=morphology, name="std.fits")
    write_products(result, tmp_path, "std")
    from_product = measure_standards([tmp_path / "std_stokes.ecsv"])
    from_frame = measure_standards([sim.ccd], classifier=morphology)
    for col in ("standard", "x_det", "y_det", "q", "q_err", "u", "u_err"):
        assert from_product[col][0] == pytest.approx(from_frame[col][0]) \
            if from_product[col].dtype.kind == "f" else from_product[col][0] == from_frame[col][0]
    # products made with a calibration are refused: calibrate needs raw values
    cal = Calibration("RoboPol", 1.0, (0.0,), (0.0,), ("1",), (1024.0, 1024.0), 1024.0)
    write_products(reduce_frame(sim.ccd, classifier=morphology, calibration=cal), tmp_path / "c", "std")
    with pytest.raises(CalibrationError, match="std_stokes.ecsv: reduced with a calibration"):
        measure_standards([tmp_path / "c" / "std_stokes.ecsv"])
    (tmp_path / "std_clean.fits").unlink()
    with pytest.raises(CalibrationError, match="std_stokes.ecsv: its header is read from "
                                               "std_clean.fits beside it, which cannot be read"):
        measure_standards([tmp_path / "std_stokes.ecsv"])


def test_frame_without_a_standard_is_named(small_sim, morphology):
    with pytest.raises(StandardError, match="^frame 0: OBJECT 'SIMULATED' is not a known standard"):
        measure_standards([small_sim.ccd], classifier=morphology)


def test_standard_found_by_wcs(standard_sims, morphology, tmp_path):
    """OBJECT names no standard, but the WCS puts one at the target position."""
    sim = standard_sims[3]
    ccd = sim.ccd.copy()
    ccd.header["OBJECT"] = "zero-pol std"
    row = find_standard("HD 212311")
    target = sim.stars[sim.stars["is_target"]][0]
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [row["ra"], row["dec"]]
    w.wcs.crpix = [target["x"] + 1 + 2.0, target["y"] + 1]  # 2 px off: a WCS is not perfect
    w.wcs.cdelt = [-0.39 / 3600, 0.39 / 3600]
    ccd.wcs = w
    m = measure_standards([ccd], classifier=morphology)
    assert (m["standard"][0], m["matched_by"][0], m["located_by"][0]) == ("HD 212311", "WCS", "WCS")
    assert m["offset"][0] == pytest.approx(2.0, abs=1.0)
    # the same from a FITS file: the WCS is read from its header
    path = tmp_path / "zp.fits"
    ccd.write(path)
    on_disk = measure_standards([path], classifier=morphology)
    assert (on_disk["matched_by"][0], on_disk["located_by"][0]) == ("WCS", "WCS")
    assert on_disk["q"][0] == pytest.approx(m["q"][0])
    # the WCS puts the named standard off the frame: refused
    w.wcs.crpix = [5000.0, 5000.0]
    ccd.header["OBJECT"] = "HD 212311"
    with pytest.raises(CalibrationError, match="frame 0: its WCS puts HD 212311 at pixel .* outside "
                                               "the 1024 x 1024 frame"):
        measure_standards([ccd], classifier=morphology)


def test_flagged_standard_is_refused_unless_allowed(morphology):
    """A saturated standard (R = 8) is flagged: refused, or used when its flags are allowed."""
    sim = simulate_frame(seed=41, n_stars=80, standard="BD+59 389", target={"mag": 8.0},
                         **STANDARD_WINDOW)
    with pytest.raises(CalibrationError, match=r"frame 0: the Stokes row of BD\+59 389 at .* is "
                                               r"flagged .*saturated"):
        measure_standards([sim.ccd], classifier=morphology)
    m = measure_standards([sim.ccd], classifier=morphology, settings={"allow_flags": 511})
    assert m["flags"][0] & 4


def test_no_standard_near_the_target(standard_sims, morphology):
    ccd = standard_sims[0].ccd.copy()
    ccd.header["LTV1"] = ccd.header["LTV1"] + 300  # the target would be 300 px away
    with pytest.raises(CalibrationError, match="frame 0: no measured quadruplet within 25 px of "
                                               r"\(.*\), where BD\+59 389 should be \(by the target "
                                               "position\\)"):
        measure_standards([ccd], classifier=morphology)


def test_residual_figure(standard_fit, tmp_path):
    fig = plot_calibration_residuals(standard_fit, tmp_path / "res.png")
    assert (tmp_path / "res.png").stat().st_size > 10_000
    title = fig.axes[0].get_title()
    assert "angle_zero = " in title and "chi2 = " in title
    assert [t.get_text().split("\n")[0] for t in fig.axes[1].get_xticklabels()] == ["BD+59 389",
                                                                                   "HD 212311"]


def test_in_memory_frames_are_not_modified(standard_sims, morphology):
    ccd = standard_sims[1].ccd
    before = ccd.data.copy()
    measure_standards([ccd], classifier=morphology)
    assert np.array_equal(ccd.data, before) and isinstance(ccd, CCDData)
