"""The frame PSF: the tabulated pixel-integrated Moffat and its fit to a frame's spots."""

import math
import warnings

import numpy as np
import pytest

from robopol_clean.photometry import PSFFallbackWarning, PSFModel, fit_psf, moffat_psf

GAIN, RON, SKY = 2.687, 8.14, 100.0  # e-/adu, e-, adu (RoboPol)


def render_field(psf, *, seed, n=20, flux=(2e4, 1e5), shape=(240, 300), spacing=60):
    """``n`` isolated spots of ``psf`` on a grid (sub-pixel centres, random fluxes) on a
    flat sky, with Poisson and read noise; returns data, variance (adu^2), x, y."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(shape[1] // spacing), np.arange(shape[0] // spacing))
    x = spacing / 2 + spacing * gx.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    y = spacing / 2 + spacing * gy.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    f = rng.uniform(*flux, n)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    model = np.full(shape, SKY)
    for xi, yi, fi in zip(x, y, f):
        model += fi * psf.evaluate(xx - xi, yy - yi)
    data = (rng.poisson(model * GAIN) + rng.normal(0.0, RON, shape)) / GAIN
    variance = model / GAIN + (RON / GAIN) ** 2
    return data, variance, x, y


# -- the tabulated model -----------------------------------------------------------------


@pytest.mark.parametrize(("fwhm", "beta", "ell", "theta"),
                         [(4.3, 3.0, 0.0, 0.0), (4.3, 3.0, 0.1, 30.0), (3.0, 2.5, 0.25, 120.0),
                          (6.0, 4.0, 0.05, 179.0), (5.0, 1.8, 0.3, 90.0)])
def test_moffat_psf_round_trips_shape(fwhm, beta, ell, theta):
    psf = moffat_psf(fwhm, beta, ellipticity=ell, theta=theta)
    assert isinstance(psf, PSFModel)
    assert psf.fwhm == pytest.approx(fwhm, rel=1e-9)
    assert psf.ellipticity == pytest.approx(ell, abs=1e-9)
    assert psf.beta == beta
    if ell > 0:
        assert psf.theta == pytest.approx(theta, abs=1e-6)
        assert 0 <= psf.theta < 180
    a, b = psf.fwhm_axes
    assert a >= b and math.sqrt(a * b) == pytest.approx(fwhm)
    d = psf.describe()
    assert d["psf_fwhm"] == pytest.approx(fwhm, abs=1e-4)
    assert d["psf_source"] == "fallback" and d["psf_n_stars"] == 0
    # Q is symmetric positive definite
    Q = psf.shape_matrix
    np.testing.assert_allclose(Q, Q.T)
    assert np.all(np.linalg.eigvalsh(Q) > 0)


def test_moffat_psf_rejects_bad_parameters():
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="fwhm"):
            moffat_psf(bad)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ellipticity"):
            moffat_psf(4.0, ellipticity=bad)
    with pytest.raises(ValueError, match="beta"):
        moffat_psf(4.0, 1.0)


@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.3, -0.2), (0.5, 0.5), (-0.77, 0.41),
                                    (0.123, 0.999)])
@pytest.mark.parametrize("shape", [(4.3, 3.0, 0.1, 30.0), (3.0, 2.5, 0.0, 0.0)])
def test_evaluate_is_normalised_at_any_subpixel_offset(offset, shape):
    fwhm, beta, ell, theta = shape
    psf = moffat_psf(fwhm, beta, ellipticity=ell, theta=theta)
    yy, xx = np.mgrid[-60:61, -60:61]
    v = psf.evaluate(xx - offset[0], yy - offset[1])
    # the wing beyond the tabulated radius is truncated
    assert 0.97 < v.sum() <= 1.0 + 1e-9
    assert np.all(v >= 0)
    # the total hardly depends on the sub-pixel offset
    v0 = psf.evaluate(xx, yy)
    assert v.sum() == pytest.approx(v0.sum(), rel=2e-3)


def test_evaluate_is_point_symmetric_and_zero_beyond_radius():
    psf = moffat_psf(4.3, 3.0, ellipticity=0.15, theta=30.0)
    r = psf.radius
    yy, xx = np.mgrid[-(r - 1):r, -(r - 1):r]  # strictly inside the tabulated grid
    v = psf.evaluate(xx, yy)
    np.testing.assert_allclose(v, v[::-1, ::-1], rtol=1e-12, atol=1e-15)
    # sub-pixel offsets: I(d) = I(-d)
    rng = np.random.default_rng(4)
    dx, dy = rng.uniform(-r + 1, r - 1, (2, 500))
    np.testing.assert_allclose(psf.evaluate(dx, dy), psf.evaluate(-dx, -dy),
                               rtol=1e-9, atol=1e-14)
    # peak at the centre; ellipse along theta: wider along the major axis
    assert v.argmax() == v.size // 2
    t = np.radians(psf.theta)
    major = psf.evaluate(np.array([3 * np.cos(t)]), np.array([3 * np.sin(t)]))
    minor = psf.evaluate(np.array([-3 * np.sin(t)]), np.array([3 * np.cos(t)]))
    assert major[0] > minor[0]
    far = np.array([r + 1.0, 0.0, -(r + 1.0), 50.0])
    np.testing.assert_array_equal(psf.evaluate(far, far[::-1]), 0.0)


def test_evaluate_accepts_scalars_and_keeps_shapes():
    psf = moffat_psf(4.3, 3.0, ellipticity=0.1, theta=30.0)
    inside = psf.evaluate(0.3, -0.2)
    assert np.ndim(inside) == 0 and float(inside) > 0
    assert float(psf.evaluate(psf.radius + 5.0, 0.0)) == 0.0
    gx, gy = psf.gradient(1.0, 0.5)
    assert np.ndim(gx) == np.ndim(gy) == 0 and float(gx) < 0 and float(gy) < 0
    grid = np.zeros((3, 4))
    assert psf.evaluate(grid, grid).shape == (3, 4)
    assert all(g.shape == (3, 4) for g in psf.gradient(grid, grid))


@pytest.mark.parametrize("shape", [(4.3, 3.0, 0.1, 30.0), (3.0, 2.5, 0.2, 100.0)])
def test_gradient_matches_finite_differences(shape):
    fwhm, beta, ell, theta = shape
    psf = moffat_psf(fwhm, beta, ellipticity=ell, theta=theta)
    rng = np.random.default_rng(1)
    dx, dy = rng.uniform(-2 * fwhm, 2 * fwhm, (2, 400))
    gx, gy = psf.gradient(dx, dy)
    h = 0.5 / psf.oversampling
    fdx = (psf.evaluate(dx + h, dy) - psf.evaluate(dx - h, dy)) / (2 * h)
    fdy = (psf.evaluate(dx, dy + h) - psf.evaluate(dx, dy - h)) / (2 * h)
    scale = max(np.abs(gx).max(), np.abs(gy).max())
    np.testing.assert_allclose(gx, fdx, atol=0.01 * scale)
    np.testing.assert_allclose(gy, fdy, atol=0.01 * scale)
    # and the analytic sign: the profile falls away from the centre
    assert psf.gradient(np.array([2.0]), np.array([0.0]))[0][0] < 0
    assert psf.gradient(np.array([0.0]), np.array([-2.0]))[1][0] > 0


@pytest.mark.parametrize("radius", [11.7, 25.0])
def test_stamp_sampler_matches_evaluate(radius):
    """The per-source tabulation the joint fit uses gives the PSF and its gradient of
    :meth:`PSFModel.evaluate` at every stamp pixel, zero beyond the grid."""
    from robopol_clean.photometry.psf import _StampSampler

    psf = moffat_psf(4.3, 3.2, ellipticity=0.1, theta=30.0)
    h = int(np.ceil(radius)) + 1
    ky, kx = np.mgrid[-h:h + 1, -h:h + 1]
    near = np.hypot(kx, ky) <= radius
    kx, ky = kx[near], ky[near]
    rng = np.random.default_rng(2)
    fx, fy = rng.uniform(-0.5, 0.5, (2, 60))
    fx[:3], fy[:3] = [0.5, -0.5, 0.0], [-0.5, 0.5, 0.0]
    values = _StampSampler(psf, kx, ky)(fx, fy, grids=(0, 1, 2))
    ref = psf.evaluate_with_gradient(kx[None] - fx[:, None], ky[None] - fy[:, None])
    for v, r in zip(values, ref):
        assert v.shape == (60, kx.size) and v.dtype == np.float32
        np.testing.assert_allclose(v, r, rtol=0, atol=1e-6 * np.abs(r).max())
    assert np.all(values[0][:, np.maximum(abs(kx), abs(ky)) > psf.radius + 1] == 0)


def test_profile_derivatives_match_finite_differences():
    """The analytic Jacobian of the PSF fit: derivatives of the pixel-integrated Moffat
    with respect to log l11, l21, log l22, beta and the offsets."""
    from robopol_clean.photometry.psf import _pixel_integrated

    rng = np.random.default_rng(3)
    dx, dy = rng.uniform(-6.0, 6.0, (2, 300))
    p = np.array([np.log(0.21), 0.03, np.log(0.19), 3.1])

    def value(q, ox=0.0, oy=0.0):
        return _pixel_integrated(dx + ox, dy + oy, (np.exp(q[0]), q[1], np.exp(q[2])), q[3])

    terms = _pixel_integrated(dx, dy, (np.exp(p[0]), p[1], np.exp(p[2])), p[3],
                              derivatives=True)
    np.testing.assert_allclose(terms[0], value(p), rtol=1e-12)
    h = 1e-6
    numeric = [(value(p + h * e) - value(p - h * e)) / (2 * h) for e in np.eye(4)]
    numeric += [(value(p, h, 0) - value(p, -h, 0)) / (2 * h),
                (value(p, 0, h) - value(p, 0, -h)) / (2 * h)]
    for analytic, fd in zip(terms[1:], numeric):
        np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_importing_photometry_leaves_scipy_optimize_out():
    """Start-up weight: the PSF fit needs no scipy.optimize."""
    import subprocess
    import sys

    code = "import sys, robopol_clean.photometry; sys.exit('scipy.optimize' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the fit -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fwhm", "beta", "ell", "theta", "seed"),
                         [(4.3, 3.0, 0.12, 35.0, 0), (3.2, 2.6, 0.08, 120.0, 1),
                          (5.5, 3.8, 0.0, 0.0, 2)])
def test_fit_psf_recovers_an_elliptical_moffat(fwhm, beta, ell, theta, seed):
    truth = moffat_psf(fwhm, beta, ellipticity=ell, theta=theta)
    data, variance, x, y = render_field(truth, seed=seed)
    rng = np.random.default_rng(100 + seed)
    # start from detection-like positions and a guess of the FWHM 10 % off
    with warnings.catch_warnings():
        warnings.simplefilter("error", PSFFallbackWarning)
        psf = fit_psf(data - SKY, x + rng.normal(0, 0.3, x.size), y + rng.normal(0, 0.3, y.size),
                      fwhm=0.9 * fwhm, variance=variance)
    assert psf.source == "fitted" and psf.n_stars == 20
    assert psf.fwhm == pytest.approx(fwhm, rel=0.03)
    assert psf.ellipticity == pytest.approx(ell, abs=0.03)
    assert psf.beta == pytest.approx(beta, abs=0.3)
    if ell >= 0.05:
        diff = (psf.theta - theta + 90) % 180 - 90
        assert abs(diff) < 10
    assert psf.radius >= 4 * psf.fwhm - 1
    assert psf.describe()["psf_source"] == "fitted"


def test_fit_psf_ignores_masked_pixels():
    truth = moffat_psf(4.0, 3.0, ellipticity=0.1, theta=60.0)
    data, variance, x, y = render_field(truth, seed=5)
    # corrupt the cores of a few stars, and mask them
    mask = np.zeros(data.shape, bool)
    for xi, yi in zip(x[:4], y[:4]):
        sl = (slice(int(yi) - 1, int(yi) + 2), slice(int(xi) - 1, int(xi) + 2))
        data[sl] = 1e6
        mask[sl] = True
    psf = fit_psf(data - SKY, x, y, fwhm=4.0, variance=variance, mask=mask)
    assert psf.source == "fitted"
    assert psf.fwhm == pytest.approx(4.0, rel=0.03)
    assert psf.ellipticity == pytest.approx(0.1, abs=0.03)


def test_fit_psf_falls_back_with_too_few_stars():
    truth = moffat_psf(4.3, 3.0, ellipticity=0.1, theta=30.0)
    data, variance, x, y = render_field(truth, seed=3)
    with pytest.warns(PSFFallbackWarning, match="2 isolated"):
        psf = fit_psf(data - SKY, x[:2], y[:2], fwhm=4.1, variance=variance)
    assert psf.source == "fallback" and psf.n_stars == 0
    assert psf.fwhm == pytest.approx(4.1)
    assert psf.ellipticity == pytest.approx(0.0, abs=1e-12)
    # spots too close to the edge do not count either
    with pytest.warns(PSFFallbackWarning):
        psf = fit_psf(data - SKY, [1.0, 2.0, 3.0, 298.0, 5.0, 1.0],
                      [1.0, 238.0, 5.0, 2.0, 239.0, np.nan], fwhm=4.1, variance=variance)
    assert psf.source == "fallback"
    with pytest.warns(PSFFallbackWarning):
        psf = fit_psf(data - SKY, [], [], fwhm=3.5, variance=variance)
    assert psf.source == "fallback" and psf.fwhm == pytest.approx(3.5)


def test_fit_psf_max_stars_below_min_stars_falls_back():
    truth = moffat_psf(4.3, 3.0, ellipticity=0.1, theta=30.0)
    data, variance, x, y = render_field(truth, seed=6)
    with pytest.warns(PSFFallbackWarning):
        psf = fit_psf(data - SKY, x, y, fwhm=4.0, variance=variance, max_stars=2)
    assert psf.source == "fallback"
    with pytest.raises(ValueError, match="max_stars"):
        fit_psf(data - SKY, x, y, fwhm=4.0, variance=variance, max_stars=0)
