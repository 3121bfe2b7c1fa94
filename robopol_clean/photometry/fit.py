"""Simultaneous PSF photometry of every spot of a frame.

:func:`fit_spots` fits the fluxes (and small position corrections) of all spots at once,
as one sparse weighted linear least-squares problem in the spirit of DAOPHOT's ALLSTAR
and crowdsource (Schlafly et al. 2018): every pixel within ``fit_radius`` of a spot is
modelled as the background plus a local sky offset plus the sum of the PSFs of all
spots whose model reaches it (``model_radius``), so overlapping spots share their light.

The normal equations are sparse. They are solved per connected group of spots that
share pixels (groups of equal padded size are solved together as one batched dense
problem, so there is no Python loop over groups); couplings below ``coupling`` (the
overlap of two spots' weighted PSFs relative to their own) are carried by a few
block-Jacobi passes instead of joining groups, which keeps the groups small in crowded
fields.

Pass by pass:

1. fluxes with the detected positions, weights from the data;
2. ``n_recentre`` passes of fluxes and position corrections together (spots with a
   flux S/N above ``recentre_snr``; shifts capped at ``max_shift`` from the start);
3. the local sky of each spot: the sigma-clipped median of the frame minus the model
   of every spot, in an annulus (``sky_annulus``), which removes what the background
   map missed (the wings of the crowd);
4. fluxes again, with weights from the model (unbiased for faint spots).

Noise model per spot (electron^2), from pixels and fit alone, no frame-wide factor:

.. math::

    \\sigma_F^2 = G^2\\left[(A^T W A)^{-1}\\right]_{jj} + G^2 g_j^2 \\sigma_{s,j}^2

The first term is the covariance of the joint fit with the pixel variances
``(B + M) / G + (RON / G)^2`` (adu^2; B background and sky, M the model of all spots: the
photon noise of source and sky and the read noise, and the light shared with
neighbours); the second is the uncertainty of the local sky ``sigma_s`` (clipped
median of ``n`` annulus pixels: ``(pi / 2) sigma_pix^2 / n``) times the fit's response
``g_j`` to a unit sky offset. The covariance includes the position corrections of the
spots that were refined (blended spots trade flux against position). Where the model
does not describe a spot's own pixels to the noise (reduced chi-square ``chi2_j > 1``:
a PSF mismatch, an unmodelled neighbour) the variance is multiplied by ``chi2_j``, a
model-mismatch term from that spot's own residuals. Saturated, masked and non-finite
pixels get zero weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table, vstack
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .aperture import _checked_inputs, _gather, clipped_sky
from .psf import PSFModel

__all__ = ["fit_spots", "solve_normal_equations"]

#: Largest group of parameters solved as one dense block (couplings are iterated beyond).
MAX_BLOCK = 512


def fit_spots(
    data: np.ndarray,
    x,
    y,
    psf: PSFModel,
    *,
    background: np.ndarray | float,
    gain: float,
    read_noise: float,
    mask: np.ndarray | None = None,
    saturation: float | None = None,
    fixed=None,
    fit_radius: float | None = None,
    model_radius: float | None = None,
    sky_annulus: tuple[float, float] | None = None,
    n_recentre: int = 2,
    recentre_snr: float = 5.0,
    max_shift: float = 2.0,
    coupling: float = 1e-3,
    search_residuals: bool = True,
    search_chi2: float = 1.5,
    search_snr: float = 5.0,
    search_separation: float = 1.0,
    release_snr: float | None = None,
) -> Table:
    """Fluxes (electron) of all spots fitted together with a PSF model.

    Parameters
    ----------
    data : ndarray
        2-D frame (adu), not background-subtracted. Not modified.
    x, y : array-like
        Starting spot positions (pix, 0-based).
    psf : PSFModel
        The frame's PSF (:func:`robopol_clean.photometry.fit_psf`).
    background : ndarray or float
        Smooth sky (adu per pixel) from the background map, subtracted before the fit
        and used in the noise model.
    gain : float
        Gain (electron/adu).
    read_noise : float
        Read noise (electron).
    mask : ndarray of bool, optional
        Pixels to leave out of the fit (True = bad); non-finite pixels always are.
    saturation : float, optional
        Pixels at or above this level (adu) are left out of the fit (zero weight).
    fixed : array-like of bool, optional
        Spots whose position is not refined (e.g. forced at a predicted position).
    release_snr : float, optional
        A ``fixed`` spot whose flux S/N in the first pass reaches this is refined after
        all (a predicted spot that is really there).
    fit_radius : float, optional
        Pixels within this distance (pix) of a spot are fitted; default
        ``1.5 * psf.fwhm`` (at least 3 px).
    model_radius : float, optional
        A spot's PSF is modelled out to this distance (pix); default the PSF grid radius.
    sky_annulus : (float, float), optional
        Inner and outer radius (pix) of the local-sky annulus; default 3 and 5 FWHM.
    n_recentre : int
        Passes of joint flux and position fitting.
    recentre_snr : float
        Only spots with a flux S/N above this have their positions refined.
    max_shift : float
        Largest total position correction (pix).
    coupling : float
        Couplings between spots weaker than this are iterated, not solved jointly.

    search_residuals : bool
        Look for sources the positions missed: around every spot whose reduced
        chi-square exceeds ``search_chi2``, the frame minus the model is matched-filtered
        with the PSF; peaks above ``search_snr`` that lie at least ``search_separation``
        FWHM from every spot are added and all spots fitted again.
    search_chi2, search_snr, search_separation : float
        See ``search_residuals``.

    Returns
    -------
    Table
        One row per spot, then one per source found in the residuals (column
        ``residual`` True, in the order found): ``flux``, ``flux_err`` (electron), ``x_fit``, ``y_fit``
        (pix, refined positions), ``sky`` (adu per pixel: background plus local
        offset), ``sky_offset`` and ``sky_offset_err`` (adu), ``chi2`` (reduced
        chi-square of the spot's own pixels), ``n_fit`` (pixels fitted within
        ``fit_radius``), ``n_bad`` (pixels within ``fit_radius`` masked, non-finite or off
        the image), ``n_saturated`` (saturated pixels within ``fit_radius``), ``blend``
        (fraction of the light in the spot's PSF-weighted pixels that belongs to other
        spots) and ``shift`` (pix, total position correction).
    """
    data, x, y = _checked_inputs(data, x, y, gain, read_noise)
    n = x.size
    fixed = np.zeros(n, bool) if fixed is None else np.broadcast_to(np.asarray(fixed, bool), (n,))
    fwhm = psf.fwhm
    r_fit = max(1.5 * fwhm, 3.0) if fit_radius is None else float(fit_radius)
    r_mod = r_fit + fwhm if model_radius is None else float(model_radius)
    r_mod = min(max(r_mod, r_fit), float(psf.radius))
    s_in, s_out = (3.0 * fwhm, 5.0 * fwhm) if sky_annulus is None else map(float, sky_annulus)

    bkg = np.broadcast_to(np.asarray(background, np.float64), data.shape)
    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
        bad |= mask
    sat = np.zeros(data.shape, bool)
    if saturation is not None and np.isfinite(saturation):
        with np.errstate(invalid="ignore"):
            sat = data >= saturation
    resid = np.where(bad | sat, 0.0, data - bkg).astype(np.float64)
    frame = _Frame(resid, bkg, bad, sat, (bad | sat).astype(np.int8), gain,
                   (read_noise / gain) ** 2, psf, r_fit, r_mod, (s_in, s_out), coupling)
    t, model = _fit_once(frame, x, y, fixed, n_recentre, recentre_snr, max_shift, release_snr)
    found = np.zeros((0, 2))
    if search_residuals and n:
        found = _residual_sources(frame, model, t, search_chi2, search_snr,
                                  search_separation * fwhm)
    if len(found):
        t = _refit_near(frame, t, x, y, fixed, found, min(int(n_recentre), 1), recentre_snr,
                        max_shift, release_snr)
    t["residual"] = np.arange(len(t)) >= n
    t["residual"].description = "found in the frame minus the model, not in the input positions"
    t.meta.update({"fit_radius": r_fit, "model_radius": r_mod, "sky_annulus": [s_in, s_out],
                   "n_residual": int(len(found)), **psf.describe()})
    return t


@dataclass
class _Frame:
    """What every pass of the fit reads: the frame and the noise model."""

    resid: np.ndarray  # data - background (adu), 0 at unusable pixels
    bkg: np.ndarray
    bad: np.ndarray
    sat: np.ndarray
    code: np.ndarray  # int8, 1 at unusable (bad or saturated) pixels
    gain: float
    ron2: float  # read-noise variance (adu^2)
    psf: PSFModel
    r_fit: float
    r_mod: float
    annulus: tuple[float, float]
    coupling: float


def _fit_once(frame: _Frame, x, y, fixed, n_recentre, recentre_snr, max_shift, release_snr,
              start=None):
    """The passes of :func:`fit_spots` for a fixed set of spots; returns the table and
    the model image (adu) of the last positions and fluxes but one."""
    resid, bkg, bad, sat, gain, ron2 = (frame.resid, frame.bkg, frame.bad, frame.sat,
                                        frame.gain, frame.ron2)
    psf, r_fit, r_mod, coupling = frame.psf, frame.r_fit, frame.r_mod, frame.coupling
    ny, nx = resid.shape
    x, y = np.array(x, float), np.array(y, float)
    n = x.size
    ok = np.isfinite(x) & np.isfinite(y)
    x0, y0 = (x.copy(), y.copy()) if start is None else (np.array(start[0], float),
                                                         np.array(start[1], float))
    x[~ok], y[~ok] = -1e6, -1e6  # off the image: no pixels
    stamp = _Stamps(r_mod, (ny, nx))
    lay = _Layout(stamp, x, y, psf, r_fit, r_mod, (bad | sat).ravel())
    r_obs = resid.ravel()[lay.fit_pix]
    b_pix = np.maximum(bkg.ravel()[lay.fit_pix], 0.0)

    # pass 1: data-based weights
    var = (b_pix + np.maximum(r_obs, 0.0)) / gain + ron2
    A = lay.design(n)
    flux, _ = _weighted_solve(A, r_obs, _inverse(var), coupling)
    if release_snr is not None:
        with np.errstate(invalid="ignore"):
            fixed = fixed & ~(_snr(A, flux, var) >= release_snr)

    def movable():
        with np.errstate(invalid="ignore"):
            return ok & ~fixed & (_snr(A, flux, var) > recentre_snr) & np.isfinite(flux)

    # pass 2: fluxes and position corrections together (one linearised step a pass)
    for _ in range(max(int(n_recentre), 0)):
        move = movable()
        var = (b_pix + np.maximum(A @ np.nan_to_num(flux), 0.0)) / gain + ron2
        sol, _ = _weighted_solve(lay.design_with_positions(n, move, flux, psf), r_obs,
                                 _inverse(var), coupling)
        step_x = np.clip(np.nan_to_num(sol[n:2 * n]), -0.5, 0.5)
        step_y = np.clip(np.nan_to_num(sol[2 * n:]), -0.5, 0.5)
        flux = np.where(np.isfinite(sol[:n]), sol[:n], flux)
        nx_, ny_ = x + np.where(move, step_x, 0.0), y + np.where(move, step_y, 0.0)
        shift = np.hypot(nx_ - x0, ny_ - y0)
        scale = np.where(shift > max_shift, max_shift / np.maximum(shift, 1e-12), 1.0)
        x = np.where(ok, x0 + (nx_ - x0) * scale, x)
        y = np.where(ok, y0 + (ny_ - y0) * scale, y)
        lay = _Layout(stamp, x, y, psf, r_fit, r_mod, (bad | sat).ravel())
        r_obs = resid.ravel()[lay.fit_pix]
        b_pix = np.maximum(bkg.ravel()[lay.fit_pix], 0.0)
        A = lay.design(n)
        var = (b_pix + np.maximum(A @ np.nan_to_num(flux), 0.0)) / gain + ron2

    # pass 3: local sky from the frame minus the model of every spot; bright spots to
    # the PSF's full radius, so that their far wings do not count as sky
    bright = movable() & (_snr(A, flux, var) > 100.0)
    full = lay.model_image(np.where(bright, 0.0, np.nan_to_num(flux)), (ny, nx))
    if bright.any():
        wide = _Layout(_Stamps(psf.radius, (ny, nx)), x[bright], y[bright], psf, r_fit,
                       float(psf.radius), None)
        full += wide.model_image(flux[bright], (ny, nx))
    sky_off, sky_err = _local_sky(resid, full, frame.code, x, y, *frame.annulus, bkg, gain, ron2)
    sky_off = np.where(ok, np.nan_to_num(sky_off), 0.0)
    # the sky at a fitted pixel: mean of the offsets of the spots whose fit region holds it
    row, col, near_fit = lay.row, lay.col[lay.m], lay.d2[lay.m] <= r_fit * r_fit
    s_sum = np.bincount(row[near_fit], weights=sky_off[col[near_fit]], minlength=lay.fit_pix.size)
    s_cnt = np.bincount(row[near_fit], minlength=lay.fit_pix.size)
    sky_pix = s_sum / np.maximum(s_cnt, 1)

    # pass 4: fluxes with model weights; the covariance includes the positions of the
    # spots that were refined (it matters for blends)
    r_fin = r_obs - sky_pix
    var = (np.maximum(b_pix + sky_pix, 0.0) + np.maximum(A @ np.nan_to_num(flux), 0.0)) / gain \
        + ron2
    w = _inverse(var)
    move = movable() if n_recentre > 0 else np.zeros(n, bool)
    rhs = np.column_stack([r_fin, np.ones_like(r_fin)])
    sol, diag = _weighted_solve(lay.design_with_positions(n, move, flux, psf), rhs, w, coupling,
                                want_diag=True)
    flux, g, diag = sol[:n, 0], sol[:n, 1], diag[:n]
    flux_var = diag + g * g * np.where(np.isfinite(sky_err), sky_err, 0.0) ** 2
    P = lay.P_m

    # -- per-spot diagnostics on the spot's own pixels ------------------------------------
    model = A @ np.nan_to_num(flux)
    chi = (r_fin - model) ** 2 * w
    own = near_fit
    n_fit = np.bincount(col[own], minlength=n)
    chi2 = np.bincount(col[own], weights=chi[row[own]], minlength=n) / np.maximum(n_fit - 1, 1)
    # model mismatch, per spot from its own residuals: a reduced chi-square above 1
    # scales the variance (as for any least-squares fit whose model is not exact)
    flux_var = flux_var * np.maximum(np.where(n_fit > 1, chi2, 1.0), 1.0)
    own_light = np.nan_to_num(flux)[col] * P
    others = model[row] - own_light
    wP = P * w[row]
    with np.errstate(divide="ignore", invalid="ignore"):
        blend = (np.bincount(col, weights=wP * np.maximum(others, 0.0), minlength=n)
                 / np.bincount(col, weights=wP * np.maximum(own_light, 0.0), minlength=n))
    within = lay.d2 <= r_fit * r_fit
    cw, pw = lay.col[within], lay.pix[within]
    n_bad = (stamp.disk_counts(x, y, r_fit) - np.bincount(cw, minlength=n)
             + np.bincount(cw, weights=bad.ravel()[pw], minlength=n))
    # the share of the spot's light (within the fit radius) on masked or off-image pixels
    good_light = np.bincount(cw, weights=lay.P[within] * ~bad.ravel()[pw], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        masked_fraction = np.clip(1.0 - good_light / stamp.disk_psf_sums(x, y, r_fit, psf),
                                  0.0, 1.0)
    n_sat = np.bincount(cw, weights=sat.ravel()[pw], minlength=n)

    t = Table()
    valid = ok & (n_fit > 0) & np.isfinite(flux)
    cols = (
        ("flux", np.where(valid, flux * gain, np.nan), "electron",
         "PSF-fit flux (all spots fitted together)"),
        ("flux_err", np.where(valid, np.sqrt(np.maximum(flux_var, 0.0)) * gain, np.nan), "electron",
         "1-sigma flux uncertainty: joint-fit covariance, local-sky error, x max(1, chi2)"),
        ("x_fit", np.where(ok, x, np.nan), "pix", "PSF-fit position, 0-based column"),
        ("y_fit", np.where(ok, y, np.nan), "pix", "PSF-fit position, 0-based row"),
        ("sky", _sample(bkg, x, y) + sky_off, "adu", "sky per pixel: background map + local offset"),
        ("sky_offset", sky_off, "adu", "local sky offset from the model-subtracted annulus"),
        ("sky_offset_err", sky_err, "adu", "uncertainty of the local sky offset"),
        ("chi2", np.where(n_fit > 1, chi2, np.nan), None,
         "reduced chi-square of the fit on the spot's own pixels"),
        ("n_fit", n_fit.astype(int), None, "pixels fitted within the fit radius"),
        ("n_bad", np.asarray(n_bad, int), None,
         "pixels within the fit radius masked, non-finite or off the image"),
        ("masked_fraction", np.where(ok, masked_fraction, np.nan), None,
         "share of the spot's PSF light within the fit radius on masked or off-image pixels"),
        ("n_saturated", np.asarray(n_sat, int), None,
         "saturated pixels within the fit radius (left out of the fit)"),
        ("blend", np.where(valid, blend, np.nan), None,
         "light of other spots / own light, PSF-weighted over the spot's pixels"),
        ("shift", np.where(ok, np.hypot(x - x0, y - y0), np.nan), "pix",
         "position correction from the fit"),
    )
    for name, values, unit, desc in cols:
        t[name] = np.asarray(values)
        t[name].unit = unit
        t[name].description = desc
    return t, full


def _refit_near(frame: _Frame, t: Table, x, y, fixed, found, n_recentre, recentre_snr,
                max_shift, release_snr) -> Table:
    """Fit again, with the sources ``found`` added, the spots near them; the rest keep
    their fit and are subtracted as a fixed model. Spots up to a buffer distance beyond
    those updated are fitted too, so the updated ones see all their neighbours free."""
    gain, psf = frame.gain, frame.psf
    reach = frame.r_fit + frame.r_mod + frame.annulus[1]  # a new source can change these
    buffer = reach + frame.r_fit + frame.r_mod
    xf = np.where(np.isfinite(t["x_fit"]), t["x_fit"], x)
    yf = np.where(np.isfinite(t["y_fit"]), t["y_fit"], y)
    pos = np.column_stack([np.nan_to_num(xf, nan=-1e9), np.nan_to_num(yf, nan=-1e9)])
    d, _ = cKDTree(found).query(pos)
    fitted = d <= buffer
    update = np.flatnonzero(d <= reach)
    flux = np.asarray(t["flux"], float) / gain
    keep = ~fitted & np.isfinite(flux) & np.isfinite(xf) & np.isfinite(yf)
    with np.errstate(invalid="ignore", divide="ignore"):
        wide = keep & (np.asarray(t["flux"], float) > 100.0 * np.asarray(t["flux_err"], float))
    shape = frame.resid.shape
    fixed_model = np.zeros(shape)
    for sel, radius in ((keep & ~wide, frame.r_mod), (wide, float(psf.radius))):
        if sel.any():
            lay = _Layout(_Stamps(radius, shape), xf[sel], yf[sel], psf, frame.r_fit, radius,
                          None)
            fixed_model += lay.model_image(flux[sel], shape)
    local = replace(frame, resid=frame.resid - fixed_model)
    idx = np.flatnonzero(fitted)
    m = len(found)
    t_loc, _ = _fit_once(local, np.concatenate([xf[idx], found[:, 0]]),
                         np.concatenate([yf[idx], found[:, 1]]),
                         np.concatenate([fixed[idx], np.zeros(m, bool)]), n_recentre,
                         recentre_snr, max_shift, release_snr,
                         start=(np.concatenate([x[idx], found[:, 0]]),
                                np.concatenate([y[idx], found[:, 1]])))
    out = t.copy(copy_data=True)
    rows = np.searchsorted(idx, update)  # rows of t_loc of the spots to update
    for name in t.colnames:
        out[name][update] = t_loc[name][rows]
    return vstack([out, t_loc[len(idx):]], metadata_conflicts="silent")


def _residual_sources(frame: _Frame, model: np.ndarray, t: Table, chi2_min: float,
                      snr_min: float, separation: float) -> np.ndarray:
    """Positions ``(m, 2)`` of significant PSF-like peaks of the frame minus the model
    near spots whose own pixels are poorly fitted."""
    psf = frame.psf
    chi2 = np.asarray(t["chi2"], float)
    x, y = np.asarray(t["x_fit"], float), np.asarray(t["y_fit"], float)
    with np.errstate(invalid="ignore"):
        cand = np.flatnonzero((chi2 > chi2_min) & np.isfinite(x) & np.isfinite(y))
    if not cand.size:
        return np.zeros((0, 2))
    kh = int(math.ceil(psf.fwhm))
    koff = np.arange(-kh, kh + 1)
    kern = psf.evaluate(koff[None, :], koff[:, None])
    h = int(math.ceil(frame.r_fit)) + kh  # search box half-size, with the kernel's margin
    off = np.arange(-h, h + 1)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    ny, nx = frame.resid.shape
    usable = ~(frame.bad | frame.sat)
    var = (np.maximum(frame.bkg, 0.0) + np.maximum(model, 0.0)) / frame.gain + frame.ron2
    w_img = np.where(usable, _inverse(var), 0.0)
    r_img = (frame.resid - model) * w_img
    xc, yc = np.rint(x[cand]).astype(int), np.rint(y[cand]).astype(int)
    rr, ww = _gather([r_img, w_img], (ny, nx), xc, yc, gx.ravel(), gy.ravel(), h, [0.0, 0.0])
    k3 = kern[None, :, :]
    shape = (cand.size, 2 * h + 1, 2 * h + 1)
    num = ndimage.correlate(rr.reshape(shape), k3, mode="constant")
    den = ndimage.correlate(ww.reshape(shape), k3 * k3, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), 0.0)
    inner = np.zeros(shape[1:], bool)
    inner[kh:-kh, kh:-kh] = True
    snr[:, ~inner] = 0.0
    best = snr.reshape(cand.size, -1).argmax(axis=1)
    peak = snr.reshape(cand.size, -1)[np.arange(cand.size), best]
    px = xc + gx.ravel()[best]
    py = yc + gy.ravel()[best]
    keep = peak > snr_min
    if not keep.any():
        return np.zeros((0, 2))
    pts = np.column_stack([px[keep], py[keep]]).astype(float)
    pts = np.unique(pts, axis=0)  # one peak found from several spots
    known = np.column_stack([x, y])[np.isfinite(x) & np.isfinite(y)]
    d, _ = cKDTree(known).query(pts)
    pts = pts[d >= separation]
    if len(pts) > 1:  # peaks of one source found from neighbouring pixels
        tree = cKDTree(pts)
        drop = {j for i, j in tree.query_pairs(separation)}
        pts = pts[[i for i in range(len(pts)) if i not in drop]]
    return pts


class _Stamps:
    """The pixels within ``radius`` of many (sub-pixel) positions."""

    def __init__(self, radius: float, shape):
        h = int(math.ceil(radius)) + 1
        off = np.arange(-h, h + 1)
        gy, gx = np.meshgrid(off, off, indexing="ij")
        near = np.hypot(gx, gy) <= radius + 0.75  # any centre within 0.71 px of the pixel
        self.dx, self.dy = gx[near], gy[near]
        self.shape = shape

    def entries(self, x, y):
        """Flattened (pixel index, dx, dy, spot) of every on-image stamp pixel;
        dx, dy = pixel centre - position."""
        ny, nx = self.shape
        xc, yc = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        px = xc[:, None] + self.dx[None, :]
        py = yc[:, None] + self.dy[None, :]
        on = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        spot = np.broadcast_to(np.arange(x.size)[:, None], px.shape)[on]
        px, py = px[on], py[on]
        return py * nx + px, px - x[spot], py - y[spot], spot

    def disk_psf_sums(self, x, y, r, psf):
        """Sum of the PSF over the pixel centres within ``r`` of each position."""
        dx = np.rint(x)[:, None] + self.dx[None, :] - x[:, None]
        dy = np.rint(y)[:, None] + self.dy[None, :] - y[:, None]
        return np.where(dx * dx + dy * dy <= r * r, psf.evaluate(dx, dy), 0.0).sum(axis=1)

    def disk_counts(self, x, y, r):
        """Pixel centres within ``r`` of each position, on the image or not."""
        dx = np.rint(x)[:, None] + self.dx[None, :] - x[:, None]
        dy = np.rint(y)[:, None] + self.dy[None, :] - y[:, None]
        return np.count_nonzero(dx * dx + dy * dy <= r * r, axis=1)


class _Layout:
    """Every spot's stamp pixels (``pix``, ``dx``, ``dy``, ``col`` = spot, ``d2``, PSF
    value ``P``) and the fitted pixels: ``fit_pix`` (flat indices of the usable pixels
    within ``r_fit`` of a spot), ``m`` (stamp entries on a fitted pixel within
    ``r_mod``) and ``row`` (their row in the design matrix)."""

    def __init__(self, stamp, x, y, psf, r_fit, r_mod, unusable):
        ny, nx = stamp.shape
        self.pix, self.dx, self.dy, self.col = stamp.entries(x, y)
        self.d2 = self.dx * self.dx + self.dy * self.dy
        self.psf, self.r_mod = psf, r_mod
        self._P = None
        if unusable is None:  # model only
            return
        is_fit = np.zeros(ny * nx, bool)
        is_fit[self.pix[(self.d2 <= r_fit * r_fit) & ~unusable[self.pix]]] = True
        self.fit_pix = np.flatnonzero(is_fit)
        row_of = np.full(ny * nx, -1, np.int32)
        row_of[self.fit_pix] = np.arange(self.fit_pix.size, dtype=np.int32)
        rows = row_of[self.pix]
        self.m = (rows >= 0) & (self.d2 <= r_mod * r_mod)
        self.row = rows[self.m]
        self.P_m = psf.evaluate(self.dx[self.m], self.dy[self.m])

    @property
    def P(self):
        """PSF value of every stamp entry (evaluated when first needed)."""
        if self._P is None:
            self._P = self.psf.evaluate(self.dx, self.dy)
        return self._P

    def design(self, n):
        """Sparse ``(n_pix, n)`` design matrix of the fluxes."""
        return sparse.csc_matrix((self.P_m, (self.row, self.col[self.m])),
                                 shape=(self.fit_pix.size, n))

    def design_with_positions(self, n, move, flux, psf):
        """``(n_pix, 3n)``: fluxes, then x and y corrections of the spots that move."""
        col = self.col[self.m]
        mv = move[col]
        gx, gy = psf.gradient(self.dx[self.m][mv], self.dy[self.m][mv])
        f_c = flux[col[mv]]
        rows = np.concatenate([self.row, self.row[mv], self.row[mv]])
        cols = np.concatenate([col, n + col[mv], 2 * n + col[mv]])
        vals = np.concatenate([self.P_m, -f_c * gx, -f_c * gy])
        return sparse.csc_matrix((vals, (rows, cols)), shape=(self.fit_pix.size, 3 * n))

    def model_image(self, flux, shape):
        """Image (adu) of the spots with these fluxes, each out to ``r_mod``."""
        keep = self.d2 <= self.r_mod * self.r_mod
        return np.bincount(self.pix[keep], weights=flux[self.col[keep]] * self.P[keep],
                           minlength=shape[0] * shape[1]).reshape(shape)


def _inverse(var):
    """Weights 1 / variance; a pixel with no noise (zero variance: a zero pixel of a frame
    without read noise) carries no information the model can use and gets weight 0."""
    with np.errstate(divide="ignore"):
        return np.where(var > 0, 1.0 / var, 0.0)


def _snr(A, flux, var):
    """Flux S/N of each column of a flux design matrix with pixel variances ``var``."""
    return flux * np.sqrt(np.maximum(_diag_info(A, _inverse(var)), 0.0))


def _sample(arr, x, y):
    ny, nx = arr.shape
    xi = np.clip(np.rint(x).astype(np.int64), 0, nx - 1)
    yi = np.clip(np.rint(y).astype(np.int64), 0, ny - 1)
    return np.asarray(arr)[yi, xi].astype(float)


def _local_sky(resid, model, code, x, y, r_in, r_out, bkg, gain, ron2):
    """Clipped median of the frame minus the model in an annulus around each spot, and
    its error from the mean pixel variance of the annulus (sky and the modelled light of
    the spots in it: a crowded annulus is noisier). ``code`` is 1 at unusable pixels."""
    h = int(math.ceil(r_out)) + 1
    off = np.arange(-h, h + 1)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    d = np.hypot(gx, gy).ravel()
    ring = (d >= r_in) & (d < r_out)
    adx, ady = gx.ravel()[ring], gy.ravel()[ring]
    r, m, b, c = _gather([resid, model, bkg, code], resid.shape, np.rint(x), np.rint(y), adx,
                         ady, h, [np.nan, 0.0, 0.0, np.int8(1)])
    usable = c == 0
    level, used = clipped_sky(np.where(usable, r - m, np.inf).astype(np.float32))
    pix_var = np.maximum(b + m, 0.0) / gain + ron2
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_var = (pix_var * usable).sum(axis=1) / usable.sum(axis=1)
        err = np.sqrt(0.5 * np.pi * mean_var / used)
    return level, np.where(used > 0, err, np.nan)


def _diag_info(A, w):
    """Diagonal of A^T W A."""
    return np.asarray(A.multiply(A).T @ w).ravel()


def _weighted_solve(A, r, w, coupling, want_diag=False):
    AW = A.T.multiply(w[None, :]).tocsr()
    N = (AW @ A).tocsr()
    b = AW @ r
    return solve_normal_equations(N, b, coupling=coupling, want_diag=want_diag)


def solve_normal_equations(N, b, *, coupling: float = 1e-3, n_iter: int = 4,
                           want_diag: bool = False):
    """Solve sparse, symmetric positive (semi-)definite normal equations ``N x = b``.

    The parameters are split into the connected groups of the couplings
    ``|N_ij| / sqrt(N_ii N_jj) >= coupling``; each group is solved exactly (groups of
    similar size together, as one batched dense problem), and the weaker couplings
    are carried by ``n_iter`` block-Jacobi passes. Where a group would exceed
    ``MAX_BLOCK`` parameters (an extremely crowded field) the threshold is raised until
    none does, with more passes.

    Parameters
    ----------
    N : sparse matrix
        ``(n, n)`` normal matrix.
    b : ndarray
        Right-hand side(s), ``(n,)`` or ``(n, k)``.
    coupling : float
        Couplings below this are iterated rather than solved jointly.
    n_iter : int
        Block-Jacobi passes for the weak couplings.
    want_diag : bool
        Also return the diagonal of the inverse of the blocks (the parameter variances
        when ``N`` is a weighted ``A^T W A``).

    Returns
    -------
    x : ndarray
        Solution (NaN for parameters with ``N_ii = 0``).
    diag : ndarray or None
        Diagonal of the block inverse, if asked for.
    """
    N = sparse.csr_matrix(N)
    n = N.shape[0]
    b = np.asarray(b, np.float64)
    squeeze = b.ndim == 1
    B = b[:, None] if squeeze else b
    d = N.diagonal()
    live = d > 0
    coo = N.tocoo()
    dd = np.sqrt(np.where(live, d, 1.0))
    rho = np.abs(coo.data) / (dd[coo.row] * dd[coo.col])
    while True:
        strong = (rho >= coupling) | (coo.row == coo.col)
        S = sparse.csr_matrix((coo.data[strong], (coo.row[strong], coo.col[strong])),
                              shape=(n, n))
        # a very dense field must not make one huge dense block: iterate more of it
        lab = connected_components(S, directed=False)[1]
        if not n or np.bincount(lab).max() <= MAX_BLOCK or coupling >= 0.5:
            break
        coupling *= 4.0
        n_iter += 4
    weak = sparse.csr_matrix((coo.data[~strong], (coo.row[~strong], coo.col[~strong])),
                             shape=(n, n))
    blocks = _Blocks(S, live, lab)
    X = blocks.solve(B)
    if weak.nnz:
        for _ in range(int(n_iter)):
            X = blocks.solve(B - weak @ X)
    X[~live] = np.nan
    diag = None
    if want_diag:
        diag = np.where(live, blocks.inverse_diagonal(), np.nan)
    return (X[:, 0] if squeeze else X), diag


class _Blocks:
    """Connected blocks of a sparse symmetric matrix, inverted in batches of equal
    padded size (1, 2, 4, 8, ...)."""

    def __init__(self, S, live, lab):
        n = S.shape[0]
        ncomp = int(lab.max()) + 1 if n else 0
        size = np.bincount(lab, minlength=ncomp)
        order = np.argsort(lab, kind="stable")
        start = np.concatenate([[0], np.cumsum(size)[:-1]])
        local = np.empty(n, np.int64)
        local[order] = np.arange(n) - start[lab[order]]
        padded = 1 << np.ceil(np.log2(np.maximum(size, 1))).astype(np.int64)
        coo = S.tocoo()
        self.lab, self.local, self.n = lab, local, n
        self.batches = []
        for m in np.unique(padded):
            comps = np.flatnonzero(padded == m)
            slot = np.full(ncomp, -1, np.int64)
            slot[comps] = np.arange(comps.size)
            M = np.zeros((comps.size, m, m))
            M[:, np.arange(m), np.arange(m)] = 1.0  # padding and dead parameters: identity
            sel = slot[lab[coo.row]] >= 0
            r, c, v = coo.row[sel], coo.col[sel], coo.data[sel]
            both_live = live[r] & live[c]
            r, c, v = r[both_live], c[both_live], v[both_live]
            diag_rows = np.flatnonzero(live & (slot[lab] >= 0))
            M[slot[lab[diag_rows]], local[diag_rows], local[diag_rows]] = 0.0
            np.add.at(M, (slot[lab[r]], local[r], local[c]), v)
            params = np.flatnonzero(slot[lab] >= 0)
            try:
                inv = np.linalg.inv(M)
            except np.linalg.LinAlgError:
                inv = np.linalg.pinv(M)
            self.batches.append((params, slot[lab[params]], local[params], inv))

    def solve(self, B):
        X = np.zeros_like(B)
        for params, s, loc, inv in self.batches:
            R = np.zeros((inv.shape[0], inv.shape[1], B.shape[1]))
            R[s, loc] = B[params]
            Y = inv @ R
            X[params] = Y[s, loc]
        return X

    def inverse_diagonal(self):
        out = np.zeros(self.n)
        for params, s, loc, inv in self.batches:
            out[params] = inv[s, loc, loc]
        return out
