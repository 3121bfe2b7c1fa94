import numpy as np
import pytest
from astropy.table import Table

from robopol_clean.instrument import load_profile
from robopol_clean.stokes import (
    NKC_SNR_LIMIT,
    StokesResult,
    angle_error,
    debias_mas,
    nkc_angle_dispersion,
    normalized_difference,
    pair_ratio_check,
    pair_ratio_residuals,
    stokes_from_fluxes,
    stokes_from_qu,
    stokes_table,
)

# R-band standards (Schmidt, Elston & Lupie 1992): q, u, p, theta (deg)
STANDARDS = {
    "BD+59 389": (-0.06172, -0.01803, 0.06430, 98.14),
    "HD 204827": (-0.02312, 0.04312, 0.04893, 59.10),
    "VI Cyg 12": (-0.04809, -0.06259, 0.07893, 116.23),
    "HD 212311": (-0.00007, 0.00033, 0.00034, 51.0),
}


@pytest.fixture(scope="module")
def robopol():
    return load_profile("robopol")


def fluxes(total, q, u):
    """(F0, F45, F90, F135) of a source of total flux `total` with (q, u)."""
    total, q, u = (np.asarray(v, float) for v in (total, q, u))
    return total / 4 * (1 + q), total / 4 * (1 + u), total / 4 * (1 - q), total / 4 * (1 - u)


def test_normalized_difference_value_and_error():
    v, e = normalized_difference(300.0, 100.0, 3.0, 4.0)
    assert v == pytest.approx(0.5)
    # d/da = 2b/(a+b)^2, d/db = -2a/(a+b)^2
    assert e == pytest.approx(np.hypot(2 * 100 / 400**2 * 3.0, 2 * 300 / 400**2 * 4.0))
    v, e = normalized_difference([0.0], [0.0], [1.0], [1.0])
    assert np.isnan(v[0]) and np.isnan(e[0])


def test_convention_on_constructed_fluxes():
    f0, f45, f90, f135 = fluxes(4e5, 0.03, -0.02)
    r = stokes_from_fluxes(f0, f45, f90, f135, 1.0, 1.0, 1.0, 1.0)
    assert r.q == pytest.approx(0.03)
    assert r.u == pytest.approx(-0.02)
    assert r.p == pytest.approx(np.hypot(0.03, -0.02))
    assert r.theta == pytest.approx(np.mod(0.5 * np.degrees(np.arctan2(-0.02, 0.03)), 180))
    # pure +q is theta 0, pure +u is 45, pure -q is 90, pure -u is 135
    q = np.array([0.1, 0, -0.1, 0])
    u = np.array([0, 0.1, 0, -0.1])
    f = fluxes(1e6, q, u)
    r = stokes_from_fluxes(*f, *np.sqrt(f))
    np.testing.assert_allclose(r.theta, [0, 45, 90, 135], atol=1e-9)


def test_theta_range():
    rng = np.random.default_rng(3)
    q, u = rng.uniform(-0.2, 0.2, (2, 5000))
    f = fluxes(1e5, q, u)
    r = stokes_from_fluxes(*f, *np.sqrt(f), angle_zero=73.0)
    assert np.all((r.theta >= 0) & (r.theta < 180))
    # theta exactly on the -u axis wraps to 135, never to -45 or 180
    r = stokes_from_fluxes(*fluxes(1e5, 0.0, -0.05), 1, 1, 1, 1, angle_zero=45.0)
    assert 0 <= float(r.theta) < 180


def test_errors_match_monte_carlo():
    rng = np.random.default_rng(42)
    total, q0, u0 = 2e4, 0.05, -0.03
    f = np.array(fluxes(total, q0, u0))
    e = np.sqrt(f) * np.array([1.0, 1.3, 0.8, 1.1])  # unequal errors per channel
    n = 4000
    draws = f[:, None] + e[:, None] * rng.standard_normal((4, n))
    r = stokes_from_fluxes(*draws, *(np.broadcast_to(e[:, None], (4, n))),
                           q_inst=0.004, u_inst=-0.002, angle_zero=20.0)
    truth = stokes_from_fluxes(*f, *e, q_inst=0.004, u_inst=-0.002, angle_zero=20.0)
    pull_q = (r.q - truth.q) / r.q_err
    pull_u = (r.u - truth.u) / r.u_err
    pull_p = (r.p - truth.p) / r.p_err
    assert np.std(pull_q) == pytest.approx(1.0, abs=0.05)
    assert np.std(pull_u) == pytest.approx(1.0, abs=0.05)
    assert np.std(pull_p) == pytest.approx(1.0, abs=0.06)
    assert abs(np.mean(pull_q)) < 0.06 and abs(np.mean(pull_u)) < 0.06
    # S/N ~ 5: the NKC angle error (perpendicular noise) matches the scatter
    dtheta = (r.theta - truth.theta + 90) % 180 - 90
    assert np.std(dtheta) == pytest.approx(float(truth.theta_err), rel=0.06)
    assert 4 < float(truth.snr) < 7


def test_calibration_subtract_then_rotate():
    f = fluxes(1e6, 0.05, 0.01)
    r = stokes_from_fluxes(*f, 1, 1, 1, 1, q_inst=0.01, u_inst=0.01, angle_zero=30.0)
    q, u = 0.04, 0.0
    c, s = np.cos(np.radians(60)), np.sin(np.radians(60))
    assert r.q == pytest.approx(q * c - u * s)
    assert r.u == pytest.approx(q * s + u * c)
    assert r.theta == pytest.approx(30.0)  # theta' = theta + angle_zero
    assert r.p == pytest.approx(0.04)
    # rotation keeps p and p_err, rotates the error ellipse
    e = np.array([1.0, 3.0, 1.0, 3.0]) * 100
    r0 = stokes_from_fluxes(*f, *e)
    r90 = stokes_from_fluxes(*f, *e, angle_zero=45.0)  # 2d = 90: q' = -u, u' = q
    assert r90.q == pytest.approx(-r0.u) and r90.u == pytest.approx(r0.q)
    assert r90.q_err == pytest.approx(r0.u_err) and r90.u_err == pytest.approx(r0.q_err)
    assert r90.p_err == pytest.approx(r0.p_err)


def test_calibration_arrays_broadcast():
    f = fluxes(np.full(3, 1e6), 0.02, 0.0)
    r = stokes_from_fluxes(*f, *np.sqrt(f), q_inst=np.array([0.0, 0.01, 0.02]))
    np.testing.assert_allclose(r.q, [0.02, 0.01, 0.0], atol=1e-12)


@pytest.mark.parametrize("name", list(STANDARDS))
def test_standards_recovered(name):
    q, u, p, theta = STANDARDS[name]
    f = fluxes(4e7, q, u)  # bright: sigma_q ~ 1/sqrt(2e7)
    r = stokes_from_fluxes(*f, *np.sqrt(f))
    assert r.q == pytest.approx(q, abs=1e-12) and r.u == pytest.approx(u, abs=1e-12)
    assert r.p == pytest.approx(p, abs=6e-5)
    assert r.theta == pytest.approx(theta, abs=0.1 if p > 0.01 else 1.0)
    assert r.q_err == pytest.approx(1 / np.sqrt(2e7), rel=0.01)  # photon limit
    if p > 0.01:
        assert r.p_debiased == pytest.approx(r.p, rel=1e-4)


def test_standard_with_noise_and_calibration():
    """BD+59 389 observed through a fake instrument (q_inst, rotation) is recovered."""
    rng = np.random.default_rng(7)
    q, u, p, theta = STANDARDS["BD+59 389"]
    delta, qi, ui = 12.0, 0.003, -0.002
    # what the instrument records: true vector rotated by -delta, plus instrumental
    c, s = np.cos(np.radians(-2 * delta)), np.sin(np.radians(-2 * delta))
    f = np.array(fluxes(2e6, q * c - u * s + qi, q * s + u * c + ui))
    e = np.sqrt(f)
    r = stokes_from_fluxes(*(f + e * rng.standard_normal(4)), *e, q_inst=qi, u_inst=ui,
                           angle_zero=delta)
    assert abs(r.q - q) < 4 * r.q_err and abs(r.u - u) < 4 * r.u_err
    assert abs(r.theta - theta) < 4 * r.theta_err
    assert r.q_err < 0.002


# --- the calibration's own uncertainty ----------------------------------------------
def _random_covariance(rng, n, sigmas=(0.3, 3e-4, 4e-4)):
    """n random 3 x 3 covariances of (angle_zero deg, q_inst, u_inst), correlated."""
    a = rng.normal(size=(n, 3, 3)) * np.asarray(sigmas)[:, None]
    return a @ a.transpose(0, 2, 1) / 3


def _calibrated_qu(f, e, angle, qi, ui):
    r = stokes_from_fluxes(*f, *e, q_inst=qi, u_inst=ui, angle_zero=angle)
    return np.array([r.q, r.u])


def test_calibration_covariance_matches_finite_differences():
    """J C J^T with J of the subtract-then-rotate correction, checked by central
    differences of stokes_from_fluxes itself."""
    rng = np.random.default_rng(11)
    n = 6
    f = np.array(fluxes(10 ** rng.uniform(4, 7, n), rng.normal(0, 0.05, n), rng.normal(0, 0.05, n)))
    e = np.sqrt(f) * rng.uniform(0.7, 1.4, (4, n))  # unequal errors: q_err != u_err
    angle, qi, ui = 23.0, 0.004, -0.003
    cov = _random_covariance(rng, n)
    r = stokes_from_fluxes(*f, *e, q_inst=qi, u_inst=ui, angle_zero=angle,
                           calibration_covariance=cov)
    steps = (1e-4, 1e-7, 1e-7)
    jac = np.zeros((n, 2, 3))
    for j, h in enumerate(steps):
        up = [angle, qi, ui]
        down = [angle, qi, ui]
        up[j] += h
        down[j] -= h
        jac[:, :, j] = ((_calibrated_qu(f, e, *up) - _calibrated_qu(f, e, *down)) / (2 * h)).T
    expected = jac @ cov @ jac.transpose(0, 2, 1)
    np.testing.assert_allclose(r.q_err_cal**2, expected[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(r.u_err_cal**2, expected[:, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(r.qu_corr_cal, expected[:, 0, 1] / np.sqrt(
        expected[:, 0, 0] * expected[:, 1, 1]), rtol=1e-5)
    # the totals are the statistical and the calibration parts in quadrature; the
    # statistical part and the values are those of a reduction without the covariance
    plain = stokes_from_fluxes(*f, *e, q_inst=qi, u_inst=ui, angle_zero=angle)
    np.testing.assert_array_equal(r.q_err_stat, plain.q_err)
    np.testing.assert_array_equal(r.u_err_stat, plain.u_err)
    for name in ("q", "u", "p", "theta"):
        np.testing.assert_array_equal(getattr(r, name), getattr(plain, name))
    np.testing.assert_allclose(r.q_err**2, r.q_err_stat**2 + r.q_err_cal**2, rtol=1e-12)
    np.testing.assert_allclose(r.u_err**2, r.u_err_stat**2 + r.u_err_cal**2, rtol=1e-12)
    assert plain.q_err_cal is None and "q_err_cal" not in plain.as_table().colnames
    assert r.as_table().colnames[-5:] == ["q_err_stat", "u_err_stat", "q_err_cal", "u_err_cal",
                                          "qu_corr_cal"]


def test_zero_calibration_covariance_changes_no_error():
    """The total covariance after the rotation (correlated when q_err != u_err) gives the
    p_err and theta_err computed before it."""
    rng = np.random.default_rng(12)
    n = 50
    f = np.array(fluxes(10 ** rng.uniform(3, 6, n), rng.normal(0, 0.03, n), rng.normal(0, 0.03, n)))
    e = np.sqrt(f) * np.array([1.0, 2.5, 1.0, 2.5])[:, None]
    plain = stokes_from_fluxes(*f, *e, q_inst=0.002, angle_zero=31.0)
    zero = stokes_from_fluxes(*f, *e, q_inst=0.002, angle_zero=31.0,
                              calibration_covariance=np.zeros((n, 3, 3)))
    for name in ("q_err", "u_err", "p_err", "p_debiased", "theta_err", "snr"):
        np.testing.assert_allclose(getattr(zero, name), getattr(plain, name), rtol=1e-9)
    assert np.all(zero.q_err_cal == 0) and np.all(zero.qu_corr_cal == 0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3, 3\)"):
        stokes_from_fluxes(*f, *e, calibration_covariance=np.zeros((n, 2, 2)))


def test_calibration_errors_match_monte_carlo():
    """Calibrations drawn from the covariance: q', u', p and theta of bright sources (photon
    noise negligible) scatter as q_err_cal, u_err_cal, their correlation, p_err and
    theta_err say."""
    rng = np.random.default_rng(13)
    q0 = np.array([0.03, 0.03, 0.0, -0.02])  # at 22.5 deg the angle moves q and u together
    u0 = np.array([0.03, -0.01, 0.04, 0.0])
    f = np.array(fluxes(1e14, q0, u0))
    e = np.sqrt(f)
    mean = np.array([3.0, 0.004, -0.003])
    cov = _random_covariance(rng, 1, sigmas=(0.5, 4e-4, 3e-4))[0]
    r = stokes_from_fluxes(*f, *e, q_inst=mean[1], u_inst=mean[2], angle_zero=mean[0],
                           calibration_covariance=cov)
    draws = rng.multivariate_normal(mean, cov, 4000)
    qu = np.array([_calibrated_qu(f, e, *d) for d in draws])  # (draws, 2, sources)
    np.testing.assert_allclose(qu[:, 0].std(axis=0), r.q_err, rtol=0.05)
    np.testing.assert_allclose(qu[:, 1].std(axis=0), r.u_err, rtol=0.05)
    corr = [np.corrcoef(qu[:, 0, k], qu[:, 1, k])[0, 1] for k in range(len(q0))]
    np.testing.assert_allclose(corr, r.qu_corr_cal, atol=0.05)
    p = np.hypot(qu[:, 0], qu[:, 1])
    theta = 0.5 * np.degrees(np.arctan2(qu[:, 1], qu[:, 0]))
    dtheta = (theta - np.median(theta, axis=0) + 90) % 180 - 90
    np.testing.assert_allclose(p.std(axis=0), r.p_err, rtol=0.06)
    np.testing.assert_allclose(dtheta.std(axis=0), r.theta_err, rtol=0.06)


def test_angle_zero_error_moves_theta_not_p():
    """An uncertain zero point alone: theta_err grows by it in quadrature, p_err is the
    statistical one (the q-u correlation it brings keeps it out of p)."""
    f = fluxes(1e8, 0.02, 0.02)
    e = np.sqrt(f)
    sigma = 0.4  # deg
    r = stokes_from_fluxes(*f, *e, calibration_covariance=np.diag([sigma**2, 0.0, 0.0]))
    plain = stokes_from_fluxes(*f, *e)
    assert float(r.p_err) == pytest.approx(float(plain.p_err), rel=1e-9)
    # (up to the debiasing of p, which the perpendicular noise sets)
    assert float(r.theta_err) == pytest.approx(np.hypot(float(plain.theta_err), sigma), rel=1e-3)
    assert float(r.qu_corr_cal) == pytest.approx(-1.0)
    k = np.radians(2.0)
    assert float(r.q_err_cal) == pytest.approx(k * 0.02 * sigma)


def test_stokes_from_qu_with_correlated_errors():
    plain = stokes_from_qu(0.03, 0.001, -0.02, 0.002)
    zero = stokes_from_qu(0.03, 0.001, -0.02, 0.002, qu_cov=0.0)
    for name in ("p_err", "p_debiased", "theta_err", "snr"):
        assert getattr(zero, name) == pytest.approx(getattr(plain, name), rel=1e-12)
    rng = np.random.default_rng(14)
    cov = np.array([[1e-6, 1.2e-6], [1.2e-6, 4e-6]])
    qu = rng.multivariate_normal([0.03, -0.02], cov, 20000)
    r = stokes_from_qu(0.03, 1e-3, -0.02, 2e-3, qu_cov=1.2e-6)
    assert np.hypot(qu[:, 0], qu[:, 1]).std() == pytest.approx(float(r.p_err), rel=0.03)
    theta = 0.5 * np.degrees(np.arctan2(qu[:, 1], qu[:, 0]))
    assert theta.std() == pytest.approx(float(r.theta_err), rel=0.03)


def test_nkc_limits():
    assert nkc_angle_dispersion(0.0) == pytest.approx(90 / np.sqrt(3), abs=1e-3)  # 51.96
    snr = np.linspace(0, 30, 301)
    sig = nkc_angle_dispersion(snr)
    assert np.all(sig <= 51.962) and np.all(np.diff(sig) < 0)  # monotonic decreasing
    # continuous at the switch to the asymptotic form
    lo, hi = nkc_angle_dispersion([NKC_SNR_LIMIT - 1e-6, NKC_SNR_LIMIT])
    assert lo == pytest.approx(hi, rel=0.01)
    assert hi == pytest.approx(28.6479 / NKC_SNR_LIMIT)
    assert np.isnan(nkc_angle_dispersion(-1.0))


@pytest.mark.parametrize("p0_over_sigma", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_nkc_matches_monte_carlo(p0_over_sigma):
    rng = np.random.default_rng(11)
    n = 40000
    q = p0_over_sigma + rng.standard_normal(n)
    u = rng.standard_normal(n)
    dtheta = 0.5 * np.degrees(np.arctan2(u, q))  # true angle 0, in [-90, 90)
    assert np.sqrt(np.mean(dtheta**2)) == pytest.approx(
        float(nkc_angle_dispersion(p0_over_sigma)), rel=0.02)


def test_low_snr_errors_bounded():
    rng = np.random.default_rng(5)
    f = np.array(fluxes(400.0, 0.0, 0.0))[:, None] + 10 * rng.standard_normal((4, 500))
    r = stokes_from_fluxes(*f, *np.full((4, 500), 10.0))
    assert np.all(r.theta_err <= 51.962) and np.all(r.theta_err > 0)
    assert np.median(r.theta_err) > 30  # unpolarized, noisy: angle barely constrained
    assert np.all(r.p_debiased >= 0) and np.all(r.p_debiased <= r.p)
    assert np.mean(r.p_debiased) < np.mean(r.p)
    assert angle_error(0.0, 0.01) == pytest.approx(51.96, abs=0.01)


def test_debias_mas():
    assert debias_mas(0.0, 0.01) == 0.0
    assert debias_mas(1.0, 0.01) == pytest.approx(1.0 - 0.0001 / 2)
    rng = np.random.default_rng(1)
    # the MAS estimator is much less biased than p at S/N 3
    q = 3.0 + rng.standard_normal(20000)
    u = rng.standard_normal(20000)
    p = np.hypot(q, u)
    assert abs(np.mean(debias_mas(p, 1.0)) - 3.0) < 0.5 * abs(np.mean(p) - 3.0)


def test_result_table_units():
    f = fluxes(np.array([1e6, 2e6]), 0.01, 0.02)
    t = stokes_from_fluxes(*f, *np.sqrt(f)).as_table()
    assert t["theta"].unit == "deg" and t["theta_err"].unit == "deg"
    assert len(t) == 2 and "p_debiased" in t.colnames
    assert isinstance(stokes_from_fluxes(*f, *np.sqrt(f)), StokesResult)


# --- stokes_table glue -------------------------------------------------------------
def _tables(profile, qs, us, total=4e6, clean=None, complete=None):
    n = len(qs)
    channels = profile.channels
    spots = Table()
    rows = []
    for g in range(n):
        f = dict(zip((0.0, 45.0, 90.0, 135.0), fluxes(total, qs[g], us[g])))
        for ch in channels:
            rows.append((g, ch, f[profile.channel_angles[ch] % 180]))
    # shuffle the spots table to check the lookup by spot_id, not by order
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    spots["spot_id"] = np.arange(len(rows))[order] + 100
    spots["flux"] = np.array([r[2] for r in rows])[order]
    spots["flux_err"] = np.sqrt(spots["flux"])
    spots["saturated"] = np.zeros(len(rows), bool)
    groups = Table()
    groups["group_id"] = np.arange(n) + 7
    groups["x"] = np.linspace(300, 1700, n)
    groups["y"] = np.linspace(1700, 300, n)
    groups["complete"] = np.ones(n, bool) if complete is None else complete
    for ch in channels:
        groups[f"spot_{ch}"] = [100 + next(i for i, r in enumerate(rows)
                                           if r[0] == g and r[1] == ch) for g in range(n)]
    if clean is not None:
        groups["clean"] = clean
    return groups, spots


def test_stokes_table_columns_and_values(robopol):
    qs = [STANDARDS[k][0] for k in STANDARDS]
    us = [STANDARDS[k][1] for k in STANDARDS]
    groups, spots = _tables(robopol, qs, us)
    t = stokes_table(groups, spots, robopol)
    expected = ["group_id", "x", "y", "q", "q_err", "u", "u_err", "p", "p_err", "p_debiased",
                "theta", "theta_err", "snr"] + [f"flux_{ch}" for ch in robopol.channels]
    assert t.colnames == expected
    np.testing.assert_allclose(t["q"], qs, atol=1e-12)
    np.testing.assert_allclose(t["u"], us, atol=1e-12)
    assert t["theta"][0] == pytest.approx(98.14, abs=0.01)  # BD+59 389
    assert list(t["group_id"]) == [7, 8, 9, 10]
    assert t["theta"].unit == "deg" and t["x"].unit == "pix" and t["flux_top"].unit == "electron"
    assert all(t[c].description for c in t.colnames)
    assert t.meta["angle_zero"] == 0.0 and "stokes_convention" in t.meta


def test_stokes_table_uses_right_channels(robopol):
    # RoboPol: q = (right - left)/(right + left), u = (bottom - top)/(bottom + top)
    groups, spots = _tables(robopol, [0.1], [-0.05])
    t = stokes_table(groups, spots, robopol)
    fr, fl, fb, ft = (t[f"flux_{c}"][0] for c in ("right", "left", "bottom", "top"))
    assert t["q"][0] == pytest.approx((fr - fl) / (fr + fl))
    assert t["u"][0] == pytest.approx((fb - ft) / (fb + ft))
    assert fr > fl and fb < ft


def test_stokes_table_selects_clean_complete(robopol):
    groups, spots = _tables(robopol, [0.01, 0.02, 0.03, 0.04], [0.0] * 4,
                            clean=[True, False, True, True], complete=[True, True, False, True])
    spots["saturated"][spots["spot_id"] == groups["spot_top"][3]] = True
    t = stokes_table(groups, spots, robopol)
    assert list(t["group_id"]) == [7]
    assert len(stokes_table(groups, spots, robopol, exclude_flagged=False)) == 2


def test_stokes_table_calibration(robopol):
    coeffs = np.zeros(len(robopol.geometry.terms))
    coeffs[0] = 0.01
    prof = robopol.replace(q_inst=coeffs, angle_zero=10.0)
    groups, spots = _tables(prof, [0.01 + 0.02], [0.0])
    t = stokes_table(groups, spots, prof)
    assert t["q"][0] == pytest.approx(0.02 * np.cos(np.radians(20)))
    assert t["theta"][0] == pytest.approx(10.0)
    assert t.meta["angle_zero"] == 10.0 and t.meta["q_inst_coeffs"][0] == 0.01


def _calibration(**changes):
    from robopol_clean.calibration import Calibration

    values = dict(instrument="RoboPol", angle_zero=2.0, q_inst=(0.003, 0.001), u_inst=(-0.002, 0.0),
                  terms=("1", "x"), center=(1024.0, 1024.0), scale=1024.0,
                  parameters=("angle_zero", "q_inst[1]", "q_inst[x]", "u_inst[1]"),
                  covariance=((0.09, 0.0, 0.0, 1e-5), (0.0, 9e-8, 1e-8, 0.0),
                              (0.0, 1e-8, 4e-8, 0.0), (1e-5, 0.0, 0.0, 1.6e-7)))
    values.update(changes)
    return Calibration(**values)


def test_stokes_table_with_a_calibration_covariance(robopol):
    cal = _calibration()
    prof = cal.apply(robopol)
    groups, spots = _tables(prof, [0.03, -0.01, 0.0], [0.01, 0.02, -0.03])
    plain = stokes_table(groups, spots, prof)
    t = stokes_table(groups, spots, prof, calibration=cal)
    assert t.colnames == plain.colnames[:13] + ["q_err_stat", "u_err_stat", "q_err_cal",
                                                "u_err_cal", "qu_corr_cal"] + plain.colnames[13:]
    np.testing.assert_array_equal(t["q_err_stat"], plain["q_err"])
    np.testing.assert_array_equal(t["q"], plain["q"])
    # the calibration's error at each source: its covariance through the map at (x, y)
    expected = stokes_from_fluxes(
        *(np.asarray(t[f"flux_{prof.channel_at_angle(a)}"]) for a in (0.0, 45.0, 90.0, 135.0)),
        *(np.sqrt(np.asarray(t[f"flux_{prof.channel_at_angle(a)}"])) for a in (0.0, 45.0, 90.0, 135.0)),
        q_inst=prof.instrumental_qu(t["x"], t["y"])[0], u_inst=prof.instrumental_qu(t["x"], t["y"])[1],
        angle_zero=cal.angle_zero, calibration_covariance=cal.covariance_at(t["x"], t["y"]))
    np.testing.assert_allclose(t["q_err_cal"], expected.q_err_cal, rtol=1e-12)
    assert np.all(t["q_err"] > t["q_err_stat"]) and t["q_err_cal"].description
    assert "calibration in quadrature" in t["q_err"].description and "calibration_errors" in t.meta
    assert "calibration_errors" not in plain.meta
    # a detector region: positions and the normalisation move together, the errors stay
    region = prof.for_region(300.0, 200.0)
    moved = groups.copy()
    moved["x"] -= 300.0
    moved["y"] -= 200.0
    np.testing.assert_allclose(stokes_table(moved, spots, region, calibration=cal)["q_err_cal"],
                               t["q_err_cal"], rtol=1e-12)
    # no covariance (a file without one): nothing changes, no columns
    bare = _calibration(parameters=(), covariance=())
    same = stokes_table(groups, spots, prof, calibration=bare)
    assert same.colnames == plain.colnames and same.meta == plain.meta
    for col in plain.colnames:
        np.testing.assert_array_equal(same[col], plain[col])
    # empty tables keep the columns
    assert "q_err_cal" in stokes_table(groups[:0], spots, prof, calibration=cal).colnames
    # the profile must hold the calibration's values
    with pytest.raises(ValueError, match="apply it first"):
        stokes_table(groups, spots, robopol, calibration=cal)


def test_stokes_table_crowded_column(robopol):
    groups, spots = _tables(robopol, [0.01, 0.02], [0.0, 0.0])
    spots["crowded"] = np.zeros(len(spots), bool)
    spots["crowded"][spots["spot_id"] == groups["spot_left"][1]] = True
    t = stokes_table(groups, spots, robopol)
    assert list(t["crowded"]) == [False, True]  # flagged, not dropped
    assert "crowded" not in stokes_table(groups, spots[["spot_id", "flux", "flux_err"]],
                                         robopol).colnames


def test_stokes_table_empty_and_missing(robopol):
    groups, spots = _tables(robopol, [0.01], [0.0], clean=[False])
    t = stokes_table(groups, spots, robopol)
    assert len(t) == 0 and "theta_err" in t.colnames
    with pytest.raises(KeyError, match="flux"):
        stokes_table(groups, spots[["spot_id"]], robopol)


# --- pair-sum ratio check ---------------------------------------------------------------
def _pair_fluxes(rng, n=300, extra=0.0, scale=1.0):
    """Groups with a smooth instrumental pair ratio; errors from the flux model only.

    ``extra`` (electrons) is unmodelled additive noise per spot, ``scale`` multiplies the
    true noise; returned errors are the nominal ones.
    """
    xn, yn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    total = 10 ** rng.uniform(3.5, 6.5, n)
    ratio = np.exp(0.85 * xn + 0.1 * yn**2)
    iq, iu = total / (1 + ratio), total * ratio / (1 + ratio)
    q, u = rng.normal(0, 0.02, n), rng.normal(0, 0.02, n)
    f = np.array([iq / 2 * (1 + q), iu / 2 * (1 + u), iq / 2 * (1 - q), iu / 2 * (1 - u)])
    e = np.sqrt(f + 400.0)  # Poisson + sky
    noisy = f + scale * e * rng.normal(size=f.shape) + extra * rng.normal(size=f.shape)
    return noisy, e, xn, yn


def test_pair_ratio_flags_light_in_one_spot():
    rng = np.random.default_rng(10)
    f, e, xn, yn = _pair_fluxes(rng)
    bad = np.arange(10)
    # a neighbour's light in the 0-deg spot: q off by 8.5 sigma, log R by 6
    f[0, bad] += 12 * e[0, bad]
    chk = pair_ratio_residuals(*f, *e, xn, yn)
    assert np.all(np.abs(chk.z[bad]) > 3.5)
    good = np.abs(chk.z[10:])
    assert np.mean(good > 3) < 0.01
    assert 0.8 < np.std(chk.z[10:]) < 1.1  # the robust noise model errs on the wide side
    assert chk.error_scale == pytest.approx(1.0, abs=0.1) and chk.error_confusion < 20
    np.testing.assert_allclose(chk.model, 0.85 * xn + 0.1 * yn**2, atol=0.02)


def test_pair_ratio_calibrates_flux_errors():
    rng = np.random.default_rng(11)
    f, e, xn, yn = _pair_fluxes(rng, n=600, scale=1.5)
    chk = pair_ratio_residuals(*f, *e, xn, yn)
    assert chk.error_scale == pytest.approx(1.5, rel=0.12)
    f, e, xn, yn = _pair_fluxes(rng, n=600, extra=300.0)  # confusion noise of 300 e-
    chk = pair_ratio_residuals(*f, *e, xn, yn)
    assert chk.error_confusion == pytest.approx(300.0, rel=0.3)
    assert chk.error_scale < 1.2


def test_pair_ratio_bright_source_among_faint_ones():
    """A sparse field's bright target is not flagged: the model's own error counts."""
    rng = np.random.default_rng(12)
    f, e, xn, yn = _pair_fluxes(rng, n=25)
    f[:, 0] = 1e6 * np.array([1, np.exp(0.85 * xn[0] + 0.1 * yn[0] ** 2)] * 2) / 2
    f[:, 0] += np.sqrt(f[:, 0]) * rng.normal(size=4)
    e[:, 0] = np.sqrt(f[:, 0])
    chk = pair_ratio_residuals(*f, *e, xn, yn)
    assert abs(chk.z[0]) < 3


def test_pair_ratio_degenerate_inputs():
    chk = pair_ratio_residuals(*[np.ones(2)] * 8, np.zeros(2), np.zeros(2))
    assert np.isnan(chk.z).all() and chk.error_scale == 1.0
    f = np.array([[1.0, 2.0, -3.0, 1.0, 1.0]] * 4)
    chk = pair_ratio_residuals(*f, *np.full((4, 5), 0.1), np.zeros(5), np.zeros(5))
    assert np.isnan(chk.z[2]) and np.isfinite(chk.z[[0, 1, 3, 4]]).all()


def test_pair_ratio_check_on_tables(robopol):
    rng = np.random.default_rng(13)
    n = 40
    groups, spots = _tables(robopol, rng.normal(0, 0.01, n), rng.normal(0, 0.01, n))
    spots["flux"] = spots["flux"] + spots["flux_err"] * rng.normal(size=len(spots))
    sid = groups["spot_right"][3]
    spots["flux"][spots["spot_id"] == sid] *= 1.05  # 5% more light in one spot
    spots["saturated"][spots["spot_id"] == groups["spot_top"][5]] = True
    chk = pair_ratio_check(groups, spots, robopol)
    assert chk.z.shape == (n,) and abs(chk.z[3]) > 10
    assert np.isfinite(chk.z[5])  # flagged spots leave the fit but are still tested
