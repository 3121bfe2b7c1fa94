"""Simultaneous PSF photometry: fluxes, errors, flags of pixels, and the sparse solver."""

import numpy as np
import pytest
from scipy import sparse

from robopol_clean.photometry import fit_spots, moffat_psf, solve_normal_equations

GAIN, RON, SKY, FWHM = 2.687, 8.14, 100.0, 4.3  # e-/adu, e-, adu, pix (RoboPol)
SHAPE = (90, 90)
PSF = moffat_psf(FWHM, 3.0, ellipticity=0.08, theta=40.0)
YY, XX = np.mgrid[: SHAPE[0], : SHAPE[1]]


def render(x, y, flux_adu, psf=PSF, sky=SKY):
    """Noiseless frame (adu): flat sky plus pixel-integrated spots of ``psf``."""
    img = np.full(SHAPE, float(sky))
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux_adu)):
        img += fi * psf.evaluate(XX - xi, YY - yi)
    return img


def noisy(model, rng):
    """Poisson in electrons plus Gaussian read noise, back in adu."""
    return (rng.poisson(model * GAIN) + rng.normal(0.0, RON, model.shape)) / GAIN


def fit(data, x, y, **kw):
    """``fit_spots`` with this file's noise model; only the rows of the input spots."""
    kw.setdefault("psf", PSF)
    t = fit_spots(data, x, y, background=SKY, gain=GAIN, read_noise=RON, **kw)
    return t[: np.size(x)]


# -- blends --------------------------------------------------------------------------------

PAIR_FLUX = np.array([4000.0, 2500.0])  # adu


def pair(sep_fwhm):
    x = np.array([45.2 - sep_fwhm * FWHM / 2, 45.2 + sep_fwhm * FWHM / 2])
    y = np.array([44.7, 44.9])
    return x, y


@pytest.mark.parametrize("sep", [1.0, 1.5, 2.0, 3.0])
def test_blended_pair_fluxes_within_errors(sep):
    x, y = pair(sep)
    rng = np.random.default_rng(7)
    data = noisy(render(x, y, PAIR_FLUX), rng)
    t = fit(data, x + rng.normal(0, 0.2, 2), y + rng.normal(0, 0.2, 2))
    truth = PAIR_FLUX * GAIN
    assert t["flux"].unit == "electron"
    assert np.all(t["flux_err"] > 0)
    assert np.all(np.abs(t["flux"] - truth) < 3 * t["flux_err"])
    # refined positions land on the truth
    assert np.all(np.hypot(t["x_fit"] - x, t["y_fit"] - y) < 0.5)
    # the closer the pair, the more light is shared
    assert np.all(t["blend"] >= 0)
    if sep <= 1.5:
        assert np.all(t["blend"] > 0.05)
    if sep >= 3:
        assert np.all(t["blend"] < 0.05)


@pytest.mark.parametrize("sep", [1.0, 2.0, 3.0])
def test_blended_pair_pulls_have_unit_spread(sep):
    x, y = pair(sep)
    model = render(x, y, PAIR_FLUX)
    truth = PAIR_FLUX * GAIN
    pulls = []
    for seed in range(30):
        rng = np.random.default_rng(1000 + seed)
        t = fit(noisy(model, rng), x + rng.normal(0, 0.2, 2), y + rng.normal(0, 0.2, 2))
        pulls.append((np.asarray(t["flux"]) - truth) / np.asarray(t["flux_err"]))
    pulls = np.array(pulls)
    assert np.all(np.isfinite(pulls))
    for k in range(2):
        assert 0.7 < pulls[:, k].std() < 1.4
        assert abs(pulls[:, k].mean()) < 0.6


# -- pixels left out -----------------------------------------------------------------------


def test_masked_core_pixels_are_counted_and_left_out():
    x, y = np.array([45.3]), np.array([44.6])
    rng = np.random.default_rng(2)
    data = noisy(render(x, y, [5000.0]), rng)
    clean = fit(data, x, y)
    assert clean["n_bad"][0] == 0 and clean["n_saturated"][0] == 0
    mask = np.zeros(SHAPE, bool)
    mask[44:47, 44:47] = True
    data[mask] = 1e6  # whatever is under the mask must not matter
    t = fit(data, x, y, mask=mask)
    assert t["n_bad"][0] == 9
    assert t["n_fit"][0] == clean["n_fit"][0] - 9
    assert abs(t["flux"][0] - 5000.0 * GAIN) < 3 * t["flux_err"][0]
    assert t["flux_err"][0] > clean["flux_err"][0]
    # non-finite pixels are bad pixels too
    data[44:47, 44:47] = np.nan
    t = fit(data, x, y)
    assert t["n_bad"][0] == 9 and np.isfinite(t["flux"][0])


def test_spot_off_the_image_edge_counts_bad_pixels():
    x, y = np.array([1.2]), np.array([45.0])
    data = noisy(render(x, y, [5000.0]), np.random.default_rng(3))
    t = fit(data, x, y)
    assert t["n_bad"][0] > 0
    assert abs(t["flux"][0] - 5000.0 * GAIN) < 4 * t["flux_err"][0]


def test_saturated_spot_measured_from_its_wings():
    x, y = np.array([45.3]), np.array([44.6])
    F = 2e5  # adu
    data = noisy(render(x, y, [F]), np.random.default_rng(3))
    level = 0.3 * data.max()
    clipped = np.minimum(data, level)
    n_clipped = int(np.count_nonzero(clipped >= level))
    assert n_clipped > 10
    t = fit(clipped, x + 0.3, y - 0.2, saturation=level)
    assert t["n_saturated"][0] == n_clipped
    assert t["flux"][0] == pytest.approx(F * GAIN, rel=0.05)
    # without the level the clipped core drags the flux down
    blind = fit(clipped, x + 0.3, y - 0.2)
    assert blind["n_saturated"][0] == 0
    assert blind["flux"][0] < 0.9 * F * GAIN


# -- the noise model -----------------------------------------------------------------------


@pytest.mark.parametrize("flux_adu", [400.0, 1000.0])
def test_faint_isolated_error_matches_analytic_psf_noise(flux_adu):
    x, y = np.array([45.3]), np.array([44.6])
    model = render(x, y, [flux_adu])
    data = noisy(model, np.random.default_rng(11))
    t = fit(data, x, y, fixed=True)
    # the optimal PSF-fit variance (adu^2) over the fitted pixels, in electrons
    P = PSF.evaluate(XX - x[0], YY - y[0])
    var = model / GAIN + (RON / GAIN) ** 2
    r_fit = fit_spots(data, x, y, PSF, background=SKY, gain=GAIN, read_noise=RON).meta["fit_radius"]
    near = np.hypot(XX - x[0], YY - y[0]) <= r_fit
    analytic = np.sqrt(1.0 / np.sum(P[near] ** 2 / var[near])) * GAIN
    assert t["flux_err"][0] == pytest.approx(analytic, rel=0.15)
    # a fit in adu would be a factor GAIN (or sqrt(GAIN)) off
    assert not t["flux_err"][0] == pytest.approx(analytic / np.sqrt(GAIN), rel=0.15)


def test_fixed_spots_do_not_move():
    x, y = np.array([45.3]), np.array([44.6])
    data = noisy(render(x, y, [5000.0]), np.random.default_rng(4))
    t = fit(data, x + 0.7, y - 0.5, fixed=True)
    assert t["shift"][0] == 0.0
    assert t["x_fit"][0] == pytest.approx(46.0) and t["y_fit"][0] == pytest.approx(44.1)
    free = fit(data, x + 0.7, y - 0.5)
    assert free["shift"][0] > 0.5
    assert np.hypot(free["x_fit"][0] - x[0], free["y_fit"][0] - y[0]) < 0.2


def test_forced_photometry_at_a_predicted_position():
    """A bright spot and two predicted positions: one empty, one with a faint spot."""
    bright = (25.3, 30.6, 20000.0)
    faint = (62.4, 61.7, 350.0)  # undetectable by eye: S/N ~ 5
    empty = (30.2, 65.8)
    model = render([bright[0], faint[0]], [bright[1], faint[1]], [bright[2], faint[2]])
    x = np.array([bright[0], faint[0], empty[0]])
    y = np.array([bright[1], faint[1], empty[1]])
    fixed = np.array([False, True, True])
    zero_pulls, faint_pulls = [], []
    for seed in range(10):
        data = noisy(model, np.random.default_rng(50 + seed))
        t = fit(data, x, y, fixed=fixed)
        assert np.all(t["shift"][1:] == 0)
        zero_pulls.append(t["flux"][2] / t["flux_err"][2])
        faint_pulls.append((t["flux"][1] - faint[2] * GAIN) / t["flux_err"][1])
    assert np.all(np.abs(zero_pulls) < 3)
    assert np.all(np.abs(faint_pulls) < 3)
    # on average the faint spot is seen and the empty position is not
    assert abs(np.mean(zero_pulls)) < 1.0 and abs(np.mean(faint_pulls)) < 1.0


def test_input_validation_and_untouched_data():
    data = noisy(render([45.0], [45.0], [3000.0]), np.random.default_rng(0))
    before = data.copy()
    fit(data, [45.0], [45.0])
    np.testing.assert_array_equal(data, before)
    with pytest.raises(ValueError, match="2-D"):
        fit_spots(data[0], [1.0], [1.0], PSF, background=SKY, gain=GAIN, read_noise=RON)
    with pytest.raises(ValueError, match="same length"):
        fit_spots(data, [1.0, 2.0], [1.0], PSF, background=SKY, gain=GAIN, read_noise=RON)
    with pytest.raises(ValueError, match="gain"):
        fit_spots(data, [1.0], [1.0], PSF, background=SKY, gain=0.0, read_noise=RON)
    with pytest.raises(ValueError, match="read_noise"):
        fit_spots(data, [1.0], [1.0], PSF, background=SKY, gain=GAIN, read_noise=-1.0)
    with pytest.raises(ValueError, match="mask"):
        fit_spots(data, [1.0], [1.0], PSF, background=SKY, gain=GAIN, read_noise=RON,
                  mask=np.zeros((3, 3), bool))
    # a non-finite position gives a row of NaN, not an error
    t = fit(data, [45.0, np.nan], [45.0, 10.0])
    assert np.isfinite(t["flux"][0]) and np.isnan(t["flux"][1]) and np.isnan(t["x_fit"][1])


def test_no_spots_gives_an_empty_table():
    data = noisy(render([], [], []), np.random.default_rng(0))
    t = fit_spots(data, [], [], PSF, background=SKY, gain=GAIN, read_noise=RON)
    assert len(t) == 0 and "flux_err" in t.colnames and "residual" in t.colnames


def test_normal_equations_from_stamps_match_the_dense_design():
    """The normal equations assembled from the spots' stamps (own blocks, and the pairs
    of spots that share pixels) are those of the dense design: fluxes, and position
    corrections with columns ``-flux * dP/dx``, on the usable pixels within ``r_fit``
    of any spot."""
    from robopol_clean.photometry.fit import _Layout, _Stamps

    x = np.array([30.2, 34.9, 37.1, 60.4, 20.0, 88.6])  # a chain of blends, isolated, edge
    y = np.array([40.3, 41.8, 36.2, 60.1, 70.7, 45.0])
    n, r_fit, r_mod = x.size, 6.45, 10.75
    unusable = np.zeros(SHAPE, bool)
    unusable[40, 33:36] = True
    lay = _Layout(_Stamps(r_mod, SHAPE, PSF), x, y, r_fit, r_mod, unusable.ravel())
    yy, xx = np.divmod(lay.fit_pix, SHAPE[1])
    near_any = np.min((xx[:, None] - x) ** 2 + (yy[:, None] - y) ** 2, axis=1) <= r_fit**2
    assert np.all(near_any) and not np.any(unusable.ravel()[lay.fit_pix])
    rng = np.random.default_rng(5)
    flux = rng.uniform(500.0, 5000.0, n)
    A = np.zeros((lay.fit_pix.size, 3 * n))
    for j in range(n):
        near = (xx - x[j]) ** 2 + (yy - y[j]) ** 2 <= r_mod**2
        gx, gy = PSF.gradient(xx - x[j], yy - y[j])
        A[near, j] = PSF.evaluate(xx - x[j], yy - y[j])[near]
        A[near, n + j], A[near, 2 * n + j] = -flux[j] * gx[near], -flux[j] * gy[near]
    w = rng.uniform(0.05, 0.2, lay.fit_pix.size)
    r = rng.normal(0.0, 10.0, lay.fit_pix.size)
    for cols, kw in ((slice(0, n), {}), (slice(None), {"move": np.ones(n, bool), "flux": flux})):
        D = A[:, cols]
        N = D.T @ (w[:, None] * D)
        sol, diag = lay.solve(w, r, 0.0, want_diag=True, **kw)
        np.testing.assert_allclose(sol, np.linalg.solve(N, D.T @ (w * r)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(diag, np.diag(np.linalg.inv(N)), rtol=1e-4)


# -- the sparse solver ---------------------------------------------------------------------


def block_spd(sizes, rng, weak=0.0, n_weak=0, dead=()):
    """A sparse SPD matrix made of dense SPD blocks of the given sizes (scattered over a
    random permutation of the parameters), plus ``n_weak`` symmetric couplings of
    relative strength ``weak`` between blocks, and zero rows/columns at ``dead``."""
    n = int(sum(sizes))
    perm = rng.permutation(n)
    rows, cols, vals = [], [], []
    block_of = np.empty(n, int)
    start = 0
    for k, m in enumerate(sizes):
        idx = perm[start:start + m]
        block_of[idx] = k
        # positive factors: every in-block coupling is far above the threshold
        G = rng.uniform(0.2, 1.0, size=(m, m))
        B = G @ G.T + 0.5 * m * np.eye(m)
        B *= rng.uniform(0.1, 1e4)  # very different scales, as fluxes and positions
        r, c = np.meshgrid(idx, idx, indexing="ij")
        rows.append(r.ravel())
        cols.append(c.ravel())
        vals.append(B.ravel())
        start += m
    N = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, n))
    if n_weak:
        d = N.diagonal()
        i = rng.integers(0, n, 4 * n_weak)
        j = rng.integers(0, n, 4 * n_weak)
        cross = block_of[i] != block_of[j]
        i, j = i[cross][:n_weak], j[cross][:n_weak]
        v = weak * np.sqrt(d[i] * d[j]) * rng.choice([-1.0, 1.0], i.size)
        W = sparse.csr_matrix((v, (i, j)), shape=(n, n))
        W = W + W.T  # a repeated pair adds up to at most 2 * weak * 2
        N = N + W
    if len(dead):
        keep = np.ones(n)
        keep[list(dead)] = 0.0
        D = sparse.diags(keep)
        N = D @ N @ D
    return sparse.csr_matrix(N)


SIZES = [1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17]


def test_solver_matches_dense_for_independent_blocks():
    rng = np.random.default_rng(0)
    N = block_spd(SIZES, rng)
    b = rng.normal(size=N.shape[0])
    x, diag = solve_normal_equations(N, b, want_diag=True)
    dense = N.toarray()
    np.testing.assert_allclose(x, np.linalg.solve(dense, b), rtol=1e-9, atol=0)
    np.testing.assert_allclose(diag, np.diag(np.linalg.inv(dense)), rtol=1e-9)
    x2, none = solve_normal_equations(N, b)
    assert none is None
    np.testing.assert_allclose(x2, x, rtol=1e-12)


def test_solver_with_weak_couplings_below_threshold():
    rng = np.random.default_rng(1)
    N = block_spd(SIZES, rng, weak=4e-4, n_weak=60)
    off = sparse.triu(N, 1).tocoo()
    d = N.diagonal()
    rho = np.abs(off.data) / np.sqrt(d[off.row] * d[off.col])
    assert (rho[rho < 1e-2]).max() < 1e-3  # the weak ones are below the default threshold
    B = rng.normal(size=(N.shape[0], 3))  # several right-hand sides at once
    X, diag = solve_normal_equations(N, B, want_diag=True)
    assert X.shape == B.shape
    dense = N.toarray()
    exact = np.linalg.solve(dense, B)
    np.testing.assert_allclose(X, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
    # the variances come from the block inverses alone: off by O(rho^2) per weak coupling
    np.testing.assert_allclose(diag, np.diag(np.linalg.inv(dense)), rtol=5e-6)
    # the same couplings solved jointly (threshold below them) are exact
    Xj, diagj = solve_normal_equations(N, B, coupling=1e-6, want_diag=True)
    np.testing.assert_allclose(Xj, exact, rtol=1e-9, atol=1e-9 * np.abs(exact).max())
    np.testing.assert_allclose(diagj, np.diag(np.linalg.inv(dense)), rtol=1e-9)


def test_solver_strong_couplings_join_blocks():
    rng = np.random.default_rng(2)
    N = block_spd(SIZES, rng, weak=0.02, n_weak=15)  # above threshold: blocks merge
    b = rng.normal(size=N.shape[0])
    x, diag = solve_normal_equations(N, b, want_diag=True)
    dense = N.toarray()
    np.testing.assert_allclose(x, np.linalg.solve(dense, b), rtol=1e-8,
                               atol=1e-8 * np.abs(x).max())
    np.testing.assert_allclose(diag, np.diag(np.linalg.inv(dense)), rtol=1e-8)


def test_solver_dead_parameters_are_nan():
    rng = np.random.default_rng(3)
    N = block_spd([1, 3, 4], rng, dead=(2, 5))
    b = rng.normal(size=N.shape[0])
    b[[2, 5]] = 0.0
    x, diag = solve_normal_equations(N, b, want_diag=True)
    live = np.ones(N.shape[0], bool)
    live[[2, 5]] = False
    assert np.all(np.isnan(x[~live])) and np.all(np.isnan(diag[~live]))
    sub = N.toarray()[np.ix_(live, live)]
    np.testing.assert_allclose(x[live], np.linalg.solve(sub, b[live]), rtol=1e-9)
    np.testing.assert_allclose(diag[live], np.diag(np.linalg.inv(sub)), rtol=1e-9)


def test_solve_normal_equations_splits_a_huge_coupled_group():
    """A chain of strongly coupled parameters longer than MAX_BLOCK (an extremely crowded
    field) is not solved as one dense block, and the iteration still converges."""
    from robopol_clean.photometry.fit import MAX_BLOCK

    n = 4 * MAX_BLOCK
    N = sparse.diags([np.full(n - 1, -0.3), np.full(n, 2.0), np.full(n - 1, -0.3)], [-1, 0, 1])
    b = np.random.default_rng(0).normal(size=n)
    x, diag = solve_normal_equations(N.tocsr(), b, want_diag=True)
    np.testing.assert_allclose(N @ x, b, atol=1e-8)
    assert np.all(diag > 0)
