"""Simultaneous PSF photometry of every spot of a frame.

:func:`fit_spots` fits the fluxes (and small position corrections) of all spots at once,
as one sparse weighted linear least-squares problem in the spirit of DAOPHOT's ALLSTAR
and crowdsource (Schlafly et al. 2018): every pixel within ``fit_radius`` of a spot is
modelled as the background plus a local sky offset plus the sum of the PSFs of all
spots whose model reaches it (``model_radius``), so overlapping spots share their light.

The normal equations are sparse. They are assembled from each spot's stamp (the PSF
sampled once per position, :class:`~robopol_clean.photometry.psf.PSFModel`'s table
shifted by the sub-pixel phase) as its own block plus one block per pair of spots that
share fitted pixels, and solved per connected group of spots that share pixels (groups
of equal padded size are solved together as one batched dense problem, so there is no
Python loop over groups); couplings below ``coupling`` (the overlap of two spots'
weighted PSFs relative to their own) are carried by a few block-Jacobi passes instead of
joining groups, which keeps the groups small in crowded fields.

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
from astropy.table import Table
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..masking import unusable_pixels
from .aperture import _checked_inputs, _gather, clipped_sky
from .psf import PSFModel, _StampSampler

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

    bkg = np.asarray(background)
    bkg = np.broadcast_to(bkg if bkg.dtype.kind == "f" else bkg.astype(np.float64), data.shape)
    bad = unusable_pixels(data, mask)
    sat = np.zeros(data.shape, bool)
    if saturation is not None and np.isfinite(saturation):
        with np.errstate(invalid="ignore"):
            sat = data >= saturation
    unusable = bad | sat
    resid = np.empty(data.shape, np.float32)
    np.subtract(data, bkg, out=resid, casting="same_kind")
    resid[unusable] = 0.0
    frame = _Frame(resid, bkg, bad, sat, unusable, gain, (read_noise / gain) ** 2, psf, r_fit,
                   r_mod, (s_in, s_out), coupling, _Stamps(r_mod, data.shape, psf))
    t, model = _fit_once(frame, x, y, fixed, n_recentre, recentre_snr, max_shift, release_snr)
    found = np.zeros((0, 2))
    if search_residuals and n:
        found = _residual_sources(frame, model, t, search_chi2, search_snr,
                                  search_separation * fwhm)
    if len(found):
        t = _refit_near(frame, t, x, y, fixed, found, min(int(n_recentre), 1), recentre_snr,
                        max_shift, release_snr)
    t["residual"] = np.arange(t["flux"].size) >= n
    names, units, descriptions = zip(*_COLUMNS)
    return Table([t[name] for name in names], names=names, units=units,
                 descriptions=descriptions, copy=False,
                 meta={"fit_radius": r_fit, "model_radius": r_mod, "sky_annulus": [s_in, s_out],
                       "n_residual": int(len(found)), **psf.describe()})


@dataclass
class _Frame:
    """What every pass of the fit reads: the frame and the noise model."""

    resid: np.ndarray  # data - background (adu, float32), 0 at unusable pixels
    bkg: np.ndarray
    bad: np.ndarray
    sat: np.ndarray
    unusable: np.ndarray  # bad or saturated
    gain: float
    ron2: float  # read-noise variance (adu^2)
    psf: PSFModel
    r_fit: float
    r_mod: float
    annulus: tuple[float, float]
    coupling: float
    stamp: _Stamps  # the pixels within r_mod of a spot
    _wide: _Stamps | None = None

    @property
    def wide(self) -> _Stamps:
        """The pixels beyond ``r_mod`` and within the PSF's full radius of a spot."""
        if self._wide is None:
            self._wide = _Stamps(float(self.psf.radius), self.resid.shape, self.psf,
                                 inner=self.r_mod)
        return self._wide


def _fit_once(frame: _Frame, x, y, fixed, n_recentre, recentre_snr, max_shift, release_snr,
              start=None):
    """The passes of :func:`fit_spots` for a fixed set of spots; returns the columns of
    the table (name: array) and the model image (adu) of the last positions and fluxes
    but one."""
    bkg, bad, sat, gain, ron2 = frame.bkg, frame.bad, frame.sat, frame.gain, frame.ron2
    psf, r_fit, coupling = frame.psf, frame.r_fit, frame.coupling
    shape = frame.resid.shape
    x, y = np.array(x, float), np.array(y, float)
    n = x.size
    ok = np.isfinite(x) & np.isfinite(y)
    x0, y0 = (x.copy(), y.copy()) if start is None else (np.array(start[0], float),
                                                         np.array(start[1], float))
    x[~ok], y[~ok] = -1e6, -1e6  # off the image: no pixels

    def layout():
        lay = _Layout(frame.stamp, x, y, r_fit, frame.r_mod, frame.unusable.ravel())
        return (lay, frame.resid.ravel()[lay.fit_pix],
                np.maximum(bkg.ravel()[lay.fit_pix], 0.0))

    lay, r_obs, b_pix = layout()

    # pass 1: data-based weights
    var = (b_pix + np.maximum(r_obs, 0.0)) / gain + ron2
    flux, _ = lay.solve(_inverse(var), r_obs, coupling)
    snr = lay.snr(flux, var)
    if release_snr is not None:
        with np.errstate(invalid="ignore"):
            fixed = fixed & ~(snr >= release_snr)

    def movable(snr):
        with np.errstate(invalid="ignore"):
            return ok & ~fixed & (snr > recentre_snr) & np.isfinite(flux)

    # pass 2: fluxes and position corrections together (one linearised step a pass)
    if n_recentre > 0:
        var = (b_pix + np.maximum(lay.model(flux), 0.0)) / gain + ron2
    for _ in range(max(int(n_recentre), 0)):
        move = movable(snr)
        sol, _ = lay.solve(_inverse(var), r_obs, coupling, move=move, flux=flux)
        step_x = np.clip(np.nan_to_num(sol[n:2 * n]), -0.5, 0.5)
        step_y = np.clip(np.nan_to_num(sol[2 * n:]), -0.5, 0.5)
        flux = np.where(np.isfinite(sol[:n]), sol[:n], flux)
        nx_, ny_ = x + np.where(move, step_x, 0.0), y + np.where(move, step_y, 0.0)
        shift = np.hypot(nx_ - x0, ny_ - y0)
        scale = np.where(shift > max_shift, max_shift / np.maximum(shift, 1e-12), 1.0)
        x = np.where(ok, x0 + (nx_ - x0) * scale, x)
        y = np.where(ok, y0 + (ny_ - y0) * scale, y)
        lay, r_obs, b_pix = layout()
        var = (b_pix + np.maximum(lay.model(flux), 0.0)) / gain + ron2
        snr = lay.snr(flux, var)

    # pass 3: local sky from the frame minus the model of every spot; bright spots to
    # the PSF's full radius, so that their far wings do not count as sky
    bright = movable(snr) & (snr > 100.0)
    parts = [lay.model_entries(np.nan_to_num(flux), frame.r_mod)]
    if bright.any():
        parts.append(_Layout(frame.wide, x[bright], y[bright]).model_entries(
            flux[bright], float(psf.radius), frame.r_mod))
    full = _model_image(parts, shape)
    sky_off, sky_err = _local_sky(frame, full, x, y)
    sky_off = np.where(ok, np.nan_to_num(sky_off), 0.0)
    # the sky at a fitted pixel: mean of the offsets of the spots whose fit region holds it
    row, col, own = lay.row, lay.col, lay.own
    s_sum = np.bincount(row[own], weights=sky_off[col[own]], minlength=lay.fit_pix.size)
    s_cnt = np.bincount(row[own], minlength=lay.fit_pix.size)
    sky_pix = s_sum / np.maximum(s_cnt, 1)

    # pass 4: fluxes with model weights; the covariance includes the positions of the
    # spots that were refined (it matters for blends)
    r_fin = r_obs - sky_pix
    var = (np.maximum(b_pix + sky_pix, 0.0) + np.maximum(lay.model(flux), 0.0)) / gain + ron2
    w = _inverse(var)
    move = movable(lay.snr(flux, var)) if n_recentre > 0 else np.zeros(n, bool)
    sol, diag = lay.solve(w, np.column_stack([r_fin, np.ones_like(r_fin)]), coupling,
                          move=move, flux=flux, want_diag=True)
    flux, g, diag = sol[:n, 0], sol[:n, 1], diag[:n]
    flux_var = diag + g * g * np.where(np.isfinite(sky_err), sky_err, 0.0) ** 2

    # -- per-spot diagnostics on the spot's own pixels ------------------------------------
    P = lay.P_m
    model = lay.model(flux)
    chi = (r_fin - model) ** 2 * w
    n_fit = np.bincount(col[own], minlength=n)
    chi2 = np.bincount(col[own], weights=chi[row[own]], minlength=n) / np.maximum(n_fit - 1, 1)
    # model mismatch, per spot from its own residuals: a reduced chi-square above 1
    # scales the variance (as for any least-squares fit whose model is not exact)
    flux_var = flux_var * np.maximum(np.where(n_fit > 1, chi2, 1.0), 1.0)
    own_light = np.nan_to_num(flux)[col] * P
    others = model[row] - own_light
    wP = P * w[row]
    with np.errstate(divide="ignore", invalid="ignore"):
        blend = (lay.spot_sum(wP * np.maximum(others, 0.0))
                 / lay.spot_sum(wP * np.maximum(own_light, 0.0)))
    n_bad, masked_fraction, n_sat = lay.disk_pixels(r_fit, bad.ravel(), sat.ravel())

    valid = ok & (n_fit > 0) & np.isfinite(flux)
    cols = {
        "flux": np.where(valid, flux * gain, np.nan),
        "flux_err": np.where(valid, np.sqrt(np.maximum(flux_var, 0.0)) * gain, np.nan),
        "x_fit": np.where(ok, x, np.nan),
        "y_fit": np.where(ok, y, np.nan),
        "sky": _sample(bkg, x, y) + sky_off,
        "sky_offset": sky_off,
        "sky_offset_err": sky_err,
        "chi2": np.where(n_fit > 1, chi2, np.nan),
        "n_fit": n_fit.astype(int),
        "n_bad": np.asarray(n_bad, int),
        "masked_fraction": np.where(ok, masked_fraction, np.nan),
        "n_saturated": np.asarray(n_sat, int),
        "blend": np.where(valid, blend, np.nan),
        "shift": np.where(ok, np.hypot(x - x0, y - y0), np.nan),
    }
    return cols, full


#: The columns of :func:`fit_spots`: name, unit, description.
_COLUMNS = (
    ("flux", "electron", "PSF-fit flux (all spots fitted together)"),
    ("flux_err", "electron",
     "1-sigma flux uncertainty: joint-fit covariance, local-sky error, x max(1, chi2)"),
    ("x_fit", "pix", "PSF-fit position, 0-based column"),
    ("y_fit", "pix", "PSF-fit position, 0-based row"),
    ("sky", "adu", "sky per pixel: background map + local offset"),
    ("sky_offset", "adu", "local sky offset from the model-subtracted annulus"),
    ("sky_offset_err", "adu", "uncertainty of the local sky offset"),
    ("chi2", None, "reduced chi-square of the fit on the spot's own pixels"),
    ("n_fit", None, "pixels fitted within the fit radius"),
    ("n_bad", None, "pixels within the fit radius masked, non-finite or off the image"),
    ("masked_fraction", None,
     "share of the spot's PSF light within the fit radius on masked or off-image pixels"),
    ("n_saturated", None, "saturated pixels within the fit radius (left out of the fit)"),
    ("blend", None, "light of other spots / own light, PSF-weighted over the spot's pixels"),
    ("shift", "pix", "position correction from the fit"),
    ("residual", None, "found in the frame minus the model, not in the input positions"),
)


def _refit_near(frame: _Frame, t: dict, x, y, fixed, found, n_recentre, recentre_snr,
                max_shift, release_snr) -> dict:
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
    # only the kept spots whose model reaches the pixels the refit reads matter: the fit
    # regions and sky annuli of its spots, which move by less than 1.5 px
    idx = np.flatnonzero(fitted)
    margin = frame.annulus[1] + 3.0
    reads = cKDTree(pos[idx]).query(pos, distance_upper_bound=margin + psf.radius)[0] - margin
    parts = []
    for sel, stamp, inner in ((keep, frame.stamp, None), (wide, frame.wide, frame.r_mod)):
        sel = sel & (reads <= stamp.radius)
        if sel.any():
            parts.append(_Layout(stamp, xf[sel], yf[sel]).model_entries(flux[sel], stamp.radius,
                                                                       inner))
    resid = np.empty_like(frame.resid)
    np.subtract(frame.resid, _model_image(parts, resid.shape), out=resid, casting="same_kind")
    local = replace(frame, resid=resid)
    m = len(found)
    t_loc, _ = _fit_once(local, np.concatenate([xf[idx], found[:, 0]]),
                         np.concatenate([yf[idx], found[:, 1]]),
                         np.concatenate([fixed[idx], np.zeros(m, bool)]), n_recentre,
                         recentre_snr, max_shift, release_snr,
                         start=(np.concatenate([x[idx], found[:, 0]]),
                                np.concatenate([y[idx], found[:, 1]])))
    rows = np.searchsorted(idx, update)  # rows of t_loc of the spots to update
    out = {}
    for name, values in t.items():
        values = values.copy()
        values[update] = t_loc[name][rows]
        out[name] = np.concatenate([values, t_loc[name][len(idx):]])
    return out


def _residual_sources(frame: _Frame, model: np.ndarray, t: dict, chi2_min: float,
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
    xc, yc = np.rint(x[cand]).astype(int), np.rint(y[cand]).astype(int)
    # the weighted residual image, on the search boxes only (0 off the image)
    r, m, b, unusable = _gather([frame.resid, model, frame.bkg, frame.unusable], model.shape,
                                xc, yc, gx.ravel(), gy.ravel(), h, [0.0, 0.0, 0.0, True])
    var = (np.maximum(b, 0.0) + np.maximum(m, 0.0)) / frame.gain + frame.ron2
    ww = np.where(unusable, 0.0, _inverse(var))
    rr = (r - m) * ww
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
    """The pixel offsets that can lie within ``radius`` (and beyond ``inner``) of a
    position in a spot's rounded pixel (+-0.75 pix), nearest first, and the PSF sampled
    at them."""

    def __init__(self, radius: float, shape, psf: PSFModel, inner: float = 0.0):
        h = int(math.ceil(radius)) + 1
        off = np.arange(-h, h + 1)
        gy, gx = np.meshgrid(off, off, indexing="ij")
        dist = np.hypot(gx, gy).ravel()
        order = np.argsort(dist, kind="stable")
        order = order[(dist[order] <= radius + 0.75) & (dist[order] > inner - 0.75)]
        self.dx, self.dy, self.dist = gx.ravel()[order], gy.ravel()[order], dist[order]
        self.dx32, self.dy32 = self.dx.astype(np.float32), self.dy.astype(np.float32)
        self.radius, self.reach, self.shape = float(radius), h, shape
        self.flat = self.dy * shape[1] + self.dx
        self.sample = _StampSampler(psf, self.dx, self.dy)

    def columns(self, r: float) -> int:
        """How many leading offsets can hold a pixel within ``r`` of a position."""
        return int(np.searchsorted(self.dist, r + 0.75, side="right"))


class _Layout:
    """Every spot's stamp as dense ``(n_spots, n_offsets)`` arrays: flat pixel index
    ``pix`` and squared distance ``d2`` (pix^2, float32) of the pixel centre from the
    position, ``inf`` off the image (``d2_edge``: the distances of the spots ``edge``
    whose stamps cross the border, on the image or not); the PSF ``P`` when first needed.

    With ``unusable`` (flat bool image), the design of the fit: ``fit_pix`` (flat
    indices of the usable pixels within ``r_fit`` of a spot) and, for every stamp pixel
    within ``r_mod`` that is fitted, its entry (``entry`` flat index in the stamps,
    ``col`` = spot, ``row`` in ``fit_pix``, PSF value ``P_m``; ``own``: within the
    spot's own ``r_fit``), sorted by spot.
    """

    def __init__(self, stamp: _Stamps, x, y, r_fit=None, r_mod=None, unusable=None):
        ny, nx = stamp.shape
        self.stamp, self.n, self.k = stamp, x.size, stamp.dx.size
        xr, yr = np.rint(x), np.rint(y)
        self.fx, self.fy = x - xr, y - yr
        xc, yc = xr.astype(np.int64), yr.astype(np.int64)
        d2 = stamp.dx32[None, :] - self.fx[:, None].astype(np.float32)
        ay = stamp.dy32[None, :] - self.fy[:, None].astype(np.float32)
        np.square(d2, out=d2)
        d2 += np.square(ay, out=ay)
        self.d2 = d2
        self.pix = (yc * nx + xc)[:, None] + stamp.flat[None, :]
        h = stamp.reach
        self.edge = np.flatnonzero((xc < h) | (xc >= nx - h) | (yc < h) | (yc >= ny - h))
        if self.edge.size:  # off-image pixels: out of reach
            px, py = xc[self.edge, None] + stamp.dx, yc[self.edge, None] + stamp.dy
            on = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            self.pix[self.edge] = np.where(on, self.pix[self.edge], 0)
            self.d2_edge = d2[self.edge]
            d2[self.edge] = np.where(on, self.d2_edge, np.inf)
        self._P = self._grad = None
        if unusable is None:  # model only
            return
        nf = stamp.columns(r_fit)
        pf = self.pix[:, :nf]
        inside = d2[:, :nf] <= r_fit * r_fit
        inside &= ~unusable[pf]
        is_fit = np.zeros(ny * nx, bool)
        is_fit[pf[inside]] = True
        self.fit_pix = np.flatnonzero(is_fit)
        row_of = np.empty(ny * nx, np.int32)  # read at fitted pixels only
        row_of[self.fit_pix] = np.arange(self.fit_pix.size, dtype=np.int32)
        design = d2 <= r_mod * r_mod
        design &= is_fit[self.pix]
        self.entry = np.flatnonzero(design)
        self.col = self.entry // self.k
        self.row = row_of[self.pix.ravel()[self.entry]]
        self.own = d2.ravel()[self.entry] <= r_fit * r_fit
        self.P_m = self.P.ravel()[self.entry]
        counts = np.bincount(self.col, minlength=self.n)
        self._spots = np.flatnonzero(counts)
        self._starts = (np.cumsum(counts) - counts)[self._spots]
        self._pairs = None

    @property
    def P(self) -> np.ndarray:
        """PSF value (float32) of every stamp pixel."""
        if self._P is None:
            self._P = self.stamp.sample(self.fx, self.fy)[0]
        return self._P

    @property
    def gradient_m(self) -> tuple[np.ndarray, np.ndarray]:
        """PSF derivatives (1/pix) with respect to the pixel offset at the design entries."""
        if self._grad is None:
            gx, gy = self.stamp.sample(self.fx, self.fy, grids=(1, 2))
            self._grad = gx.ravel()[self.entry], gy.ravel()[self.entry]
        return self._grad

    def model_entries(self, flux, radius: float, inner: float | None = None):
        """Flat pixel indices and values (adu) of the spots with these fluxes, each out to
        ``radius`` (and beyond ``inner``): for :func:`_model_image`."""
        wts = self.P * np.asarray(flux, np.float64)[:, None]
        outside = self.d2 > radius * radius
        if inner is not None:
            outside |= self.d2 <= inner * inner
        wts[outside] = 0.0
        return self.pix.ravel(), wts.ravel()

    def model(self, flux) -> np.ndarray:
        """The fluxes' model (adu) at the fitted pixels: ``A @ flux``."""
        return np.bincount(self.row, weights=self.P_m * np.nan_to_num(flux)[self.col],
                           minlength=self.fit_pix.size)

    def spot_sum(self, values) -> np.ndarray:
        """Sum over each spot's design entries of ``values`` ``(..., n_entries)``."""
        values = np.asarray(values)
        out = np.zeros(values.shape[:-1] + (self.n,))
        if self._spots.size:
            out[..., self._spots] = np.add.reduceat(values, self._starts, axis=-1)
        return out

    def snr(self, flux, var) -> np.ndarray:
        """Flux S/N of each spot with pixel variances ``var``: ``flux sqrt(A^T W A)_jj``."""
        info = self.spot_sum(self.P_m * self.P_m * _inverse(var)[self.row])
        return flux * np.sqrt(np.maximum(info, 0.0))

    def pairs(self):
        """Design entries of two spots on one pixel: ``(e1, e2)`` (spot of ``e1`` <
        spot of ``e2``), sorted by spot pair; the pairs ``(i, j)`` and their first
        entries."""
        if self._pairs is None:
            row = self.row
            mult = np.bincount(row, minlength=self.fit_pix.size)
            rest = np.flatnonzero(mult[row] > 1)
            # the entries of each shared pixel by level: the first (lowest) entry, the
            # second, ...; every entry pairs with the entries of the lower levels
            e1, e2, levels = [], [], []
            while rest.size:
                first = np.empty(mult.size, np.int64)  # read where written only
                first[row[rest[::-1]]] = rest[::-1]  # the last write wins: the lowest entry
                lowest = first[row[rest]] == rest
                for below in levels:
                    e1.append(below[row[rest[lowest]]])
                    e2.append(rest[lowest])
                levels.append(first)
                rest = rest[~lowest]
            e1 = np.concatenate(e1) if e1 else np.zeros(0, np.int64)
            e2 = np.concatenate(e2) if e2 else np.zeros(0, np.int64)
            c1, c2 = self.col[e1], self.col[e2]
            if self.n < 2**15:  # by spot pair: two linear-time radix sorts
                srt = np.argsort(c2.astype(np.int16), kind="stable")
                srt = srt[np.argsort(c1[srt].astype(np.int16), kind="stable")]
            else:
                srt = np.argsort(c1 * self.n + c2)
            e1, e2 = e1[srt], e2[srt]
            key = c1[srt] * self.n + c2[srt]
            first = np.flatnonzero(np.diff(key, prepend=-1)) if key.size else key
            self._pairs = (e1, e2, key[first] // self.n, key[first] % self.n, first)
        return self._pairs

    def solve(self, w, rhs, coupling, *, move=None, flux=None, want_diag=False):
        """Weighted least squares ``min |W^1/2 (rhs - A p)|`` (weights ``w`` and
        right-hand side(s) ``rhs`` ``(n_pix,)`` or ``(n_pix, k)`` at ``fit_pix``) of the
        fluxes and, with ``move``, the position corrections of those spots (design columns
        ``-flux dP/dx``, ``-flux dP/dy``; parameters ``(n)`` or ``(3n)``: fluxes, x, y).
        Returns the solution and, with ``want_diag``, the parameter variances, as
        :func:`solve_normal_equations`.

        The normal equations are assembled from the design entries directly: each spot's
        own block, and the blocks of the spot pairs that share pixels."""
        n, m = self.n, self.entry.size
        sw = np.sqrt(w)[self.row]
        t = 1 if move is None else 3
        # design values times sqrt(weight), in double precision: nearly coincident spots
        # make ill-conditioned blocks
        X = np.empty((t, m))
        np.multiply(self.P_m, sw, out=X[0])
        if move is not None:
            scale = sw * np.where(move, -np.nan_to_num(flux), 0.0)[self.col]
            for i, g in enumerate(self.gradient_m, start=1):
                np.multiply(g, scale, out=X[i])
        R = np.atleast_2d(np.asarray(rhs, np.float64).T).take(self.row, axis=1)
        R *= sw
        k = R.shape[0]
        ia, ib = np.triu_indices(t)
        tmp = np.empty(m)  # one product at a time: it stays in cache
        own = np.array([self.spot_sum(np.multiply(X[a], X[b], out=tmp)) for a, b in zip(ia, ib)])
        b = np.array([self.spot_sum(np.multiply(X[a], R[j], out=tmp))
                      for a, j in np.ndindex(t, k)]).reshape(t, k, n)
        spot = np.arange(n)
        off = ia != ib
        rows = [ia[:, None] * n + spot, ib[off, None] * n + spot]
        cols = [ib[:, None] * n + spot, ia[off, None] * n + spot]
        vals = [own, own[off]]
        e1, e2, pi, pj, first = self.pairs()
        if e1.size:
            ja, jb = np.divmod(np.arange(t * t), t)
            cross = np.add.reduceat(X[:, e1][ja] * X[:, e2][jb], first, axis=1)
            r_, c_ = ja[:, None] * n + pi, jb[:, None] * n + pj
            rows += [r_, c_]
            cols += [c_, r_]
            vals += [cross, cross]
        rows = np.concatenate([r.ravel() for r in rows])
        cols = np.concatenate([c.ravel() for c in cols])
        vals = np.concatenate([v.ravel() for v in vals])
        nz = vals != 0
        B = b.transpose(0, 2, 1).reshape(t * n, k)
        sol, diag = _solve_coo(rows[nz], cols[nz], vals[nz], t * n, B, coupling, 4, want_diag)
        return (sol[:, 0] if np.ndim(rhs) == 1 else sol), diag

    def disk_pixels(self, r, bad, sat):
        """Per spot, over the pixel centres within ``r``: the number off the image or
        ``bad``, the share of the PSF on them, and the number ``sat``."""
        nf = self.stamp.columns(r)
        on = self.d2[:, :nf] <= r * r
        disk = on.copy()
        if self.edge.size:
            disk[self.edge] = self.d2_edge[:, :nf] <= r * r
        pf = self.pix[:, :nf]
        lost = disk & ~(on & ~bad[pf])
        P = self.P[:, :nf]
        with np.errstate(invalid="ignore", divide="ignore"):
            masked = np.clip(np.sum(P * lost, axis=1, dtype=np.float64)
                             / np.sum(P * disk, axis=1, dtype=np.float64), 0.0, 1.0)
        return (np.count_nonzero(lost, axis=1), masked,
                np.count_nonzero(on & sat[pf], axis=1))


def _model_image(parts, shape) -> np.ndarray:
    """Image (adu) of the model entries ``(pixel, value)`` of several layouts."""
    pix = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    wts = np.concatenate([w for _, w in parts]) if parts else np.zeros(0)
    return np.bincount(pix, weights=wts, minlength=shape[0] * shape[1]).reshape(shape)


def _inverse(var):
    """Weights 1 / variance; a pixel with no noise (zero variance: a zero pixel of a frame
    without read noise) carries no information the model can use and gets weight 0."""
    with np.errstate(divide="ignore"):
        return np.where(var > 0, 1.0 / var, 0.0)


def _sample(arr, x, y):
    ny, nx = arr.shape
    xi = np.clip(np.rint(x).astype(np.int64), 0, nx - 1)
    yi = np.clip(np.rint(y).astype(np.int64), 0, ny - 1)
    return np.asarray(arr)[yi, xi].astype(float)


def _local_sky(frame: _Frame, model: np.ndarray, x, y):
    """Clipped median of the frame minus the model in an annulus around each spot, and
    its error from the mean pixel variance of the annulus (sky and the modelled light of
    the spots in it: a crowded annulus is noisier)."""
    r_in, r_out = frame.annulus
    h = int(math.ceil(r_out)) + 1
    off = np.arange(-h, h + 1)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    d = np.hypot(gx, gy).ravel()
    ring = (d >= r_in) & (d < r_out)
    xc, yc, dx, dy = np.rint(x), np.rint(y), gx.ravel()[ring], gy.ravel()[ring]
    # v: frame minus model (inf where unusable); b: background plus model (0 there)
    if x.size * dx.size > model.size // 2:  # most of the frame: combine the images first
        diff = np.empty(model.shape, np.float32)
        np.subtract(frame.resid, model, out=diff, casting="same_kind")
        diff[frame.unusable] = np.inf
        light = np.empty(model.shape, np.float32)
        np.add(frame.bkg, model, out=light, casting="same_kind")
        np.maximum(light, 0.0, out=light)
        light[frame.unusable] = 0.0
        v, b = _gather([diff, light], model.shape, xc, yc, dx, dy, h, [np.inf, 0.0])
    else:
        r, m, b, unusable = _gather([frame.resid, model, frame.bkg, frame.unusable],
                                    model.shape, xc, yc, dx, dy, h, [0.0, 0.0, 0.0, True])
        v = np.empty(r.shape, np.float32)
        np.subtract(r, m, out=v, casting="same_kind")
        v[unusable] = np.inf
        b += m
        np.maximum(b, 0.0, out=b)
        b[unusable] = 0.0
    level, used = clipped_sky(v)
    n_usable = np.count_nonzero(v < np.inf, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_var = b.sum(axis=1, dtype=np.float64) / n_usable / frame.gain + frame.ron2
        err = np.sqrt(0.5 * np.pi * mean_var / used)
    return level, np.where(used > 0, err, np.nan)


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
    coo = sparse.coo_matrix(N)
    coo.sum_duplicates()
    return _solve_coo(coo.row, coo.col, coo.data, coo.shape[0], b, coupling, n_iter, want_diag)


def _solve_coo(row, col, val, n, b, coupling, n_iter, want_diag):
    """:func:`solve_normal_equations` of the ``n x n`` matrix with the entries
    ``val`` at ``(row, col)`` (no duplicates)."""
    b = np.asarray(b, np.float64)
    squeeze = b.ndim == 1
    B = b[:, None] if squeeze else b
    on_diag = row == col
    d = np.zeros(n)
    d[row[on_diag]] = val[on_diag]
    live = d > 0
    dd = np.sqrt(np.where(live, d, 1.0))
    rho = np.abs(val) / (dd[row] * dd[col])
    while True:
        strong = (rho >= coupling) | on_diag
        # a very dense field must not make one huge dense block: iterate more of it
        lab = connected_components(sparse.csr_matrix(
            (np.ones(np.count_nonzero(strong), np.int8), (row[strong], col[strong])),
            shape=(n, n)), directed=False)[1]
        if not n or np.bincount(lab).max() <= MAX_BLOCK or coupling >= 0.5:
            break
        coupling *= 4.0
        n_iter += 4
    weak = ~strong
    blocks = _Blocks(row[strong], col[strong], val[strong], live, lab)
    X = blocks.solve(B)
    if weak.any():
        W = sparse.csr_matrix((val[weak], (row[weak], col[weak])), shape=(n, n))
        for _ in range(int(n_iter)):
            X = blocks.solve(B - W @ X)
    X[~live] = np.nan
    diag = None
    if want_diag:
        diag = np.where(live, blocks.inverse_diagonal(), np.nan)
    return (X[:, 0] if squeeze else X), diag


class _Blocks:
    """Inverse of the connected blocks of a sparse symmetric matrix (entries ``v`` at
    ``(r, c)``, no duplicates), as one sparse block-diagonal matrix; the blocks are
    inverted in batches of equal padded size (1, 2, 4, 8, ...)."""

    def __init__(self, r, c, v, live, lab):
        n = lab.size
        ncomp = int(lab.max()) + 1 if n else 0
        size = np.bincount(lab, minlength=ncomp)
        order = np.argsort(lab, kind="stable")
        start = np.cumsum(size) - size
        local = np.empty(n, np.int64)
        local[order] = np.arange(n) - start[lab[order]]
        padded = 1 << np.ceil(np.log2(np.maximum(size, 1))).astype(np.int64)
        both_live = live[r] & live[c]
        r, c, v = r[both_live], c[both_live], v[both_live]
        rows, cols, vals = [], [], []
        for m in np.unique(padded):
            comps = np.flatnonzero(padded == m)
            slot = np.full(ncomp, -1, np.int64)
            slot[comps] = np.arange(comps.size)
            M = np.zeros((comps.size, m, m))
            M[:, np.arange(m), np.arange(m)] = 1.0  # padding and dead parameters: identity
            sel = slot[lab[r]] >= 0
            M[slot[lab[r[sel]]], local[r[sel]], local[c[sel]]] = v[sel]
            try:
                inv = np.linalg.inv(M)
            except np.linalg.LinAlgError:
                inv = np.linalg.pinv(M)
            params = np.flatnonzero(slot[lab] >= 0)
            at = np.full((comps.size, m), -1, np.int64)  # the parameter in each place
            at[slot[lab[params]], local[params]] = params
            pr, pc = np.broadcast_arrays(at[:, :, None], at[:, None, :])
            real = (pr >= 0) & (pc >= 0)
            rows.append(pr[real])
            cols.append(pc[real])
            vals.append(inv[real])
        self.inverse = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)) \
            if rows else sparse.csr_matrix((n, n))

    def solve(self, B):
        return self.inverse @ B

    def inverse_diagonal(self):
        return self.inverse.diagonal()
