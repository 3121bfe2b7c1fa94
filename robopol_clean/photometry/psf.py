"""The point-spread function of a frame, fitted to its own spots.

:func:`fit_psf` fits one elliptical Moffat profile

.. math::

    I(\\Delta x, \\Delta y) = \\frac{(\\beta - 1)\\sqrt{\\det Q}}{\\pi}
        \\left(1 + \\mathbf{r}^T Q\\, \\mathbf{r}\\right)^{-\\beta},
    \\qquad Q = L L^T

(unit total flux; ``L`` lower triangular, so ``Q`` stays positive definite) jointly to
isolated, bright, unsaturated spots of the frame, each with its own flux, local sky
and sub-pixel position. The model is integrated over the pixels (3 x 3 Gauss-Legendre
points per pixel), so it holds at FWHM of 3 px as well as 6 px. The fit is a
Levenberg-Marquardt on the analytic Jacobian with a robust (soft L1) loss; each spot's
flux and sky are solved linearly at every step (variable projection). With too few
usable spots :func:`fit_psf` falls back to a round Moffat of the measured FWHM and warns.

:class:`PSFModel` tabulates the pixel-integrated profile on a grid oversampled
``oversampling`` times and evaluates it (and its gradient) at any sub-pixel offset by
bilinear interpolation: this is what the simultaneous fit of every spot
(:func:`robopol_clean.photometry.fit_spots`) uses.

One PSF for the whole frame: the RoboPol optics give spots of the same shape over the
field to the precision of the fit (the four spots of a star share it, so a common
shape error cancels in q and u); a field-dependent PSF is not modelled.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PSFModel", "PSFFallbackWarning", "fit_psf", "moffat_psf"]

#: Fewest spots :func:`fit_psf` fits a PSF to; with fewer it falls back to a round Moffat.
MIN_PSF_STARS = 5
#: Moffat power of the fallback PSF (a typical seeing-limited profile).
FALLBACK_BETA = 3.0

_GL3 = np.polynomial.legendre.leggauss(3)


class PSFFallbackWarning(UserWarning):
    """Too few spots to fit a PSF: a round Moffat of the measured FWHM is used."""


@dataclass(frozen=True)
class PSFModel:
    """A pixel-integrated elliptical Moffat PSF, tabulated for fast evaluation.

    Parameters
    ----------
    cholesky : (float, float, float)
        ``(l11, l21, l22)`` (1/pix): the shape matrix is ``Q = L L^T`` with
        ``L = [[l11, 0], [l21, l22]]``.
    beta : float
        Moffat power (> 1).
    radius : int
        Half-size (pix) of the tabulated grid; the PSF is zero beyond it.
    oversampling : int
        Grid points per pixel.
    source : str
        ``"fitted"`` or ``"fallback"``.
    n_stars : int
        Spots the PSF was fitted to (0 for a fallback).
    """

    cholesky: tuple[float, float, float]
    beta: float
    radius: int = 15
    oversampling: int = 8
    source: str = "fitted"
    n_stars: int = 0
    _grid: np.ndarray = field(default=None, repr=False, compare=False)
    _grad: tuple = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.beta > 1:
            raise ValueError(f"Moffat beta must be > 1, got {self.beta}")
        n = 2 * int(self.radius) * int(self.oversampling) + 1
        off = (np.arange(n) - (n - 1) / 2) / self.oversampling
        # the profile is point-symmetric: the lower half of the grid mirrors the upper
        half = _pixel_integrated(off[None, :], off[n // 2:, None], self.cholesky, self.beta)
        grid = np.concatenate([half[:0:-1, ::-1], half])
        gy, gx = np.gradient(grid, 1.0 / self.oversampling)
        object.__setattr__(self, "_grid", grid)
        object.__setattr__(self, "_grad", (gx, gy))

    @property
    def shape_matrix(self) -> np.ndarray:
        """``Q`` (1/pix^2)."""
        l11, l21, l22 = self.cholesky
        L = np.array([[l11, 0.0], [l21, l22]])
        return L @ L.T

    @property
    def fwhm_axes(self) -> tuple[float, float]:
        """FWHM along the major and minor axes (pix)."""
        lam = np.linalg.eigvalsh(self.shape_matrix)
        half = 2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0)
        return float(half / math.sqrt(lam[0])), float(half / math.sqrt(lam[1]))

    @property
    def fwhm(self) -> float:
        """Geometric-mean FWHM (pix)."""
        a, b = self.fwhm_axes
        return math.sqrt(a * b)

    @property
    def ellipticity(self) -> float:
        """``1 - b/a`` of the half-maximum contour."""
        a, b = self.fwhm_axes
        return 1.0 - b / a

    @property
    def theta(self) -> float:
        """Major-axis angle from +x (deg, in [0, 180))."""
        w, v = np.linalg.eigh(self.shape_matrix)
        major = v[:, 0]  # smallest eigenvalue of Q: the widest direction
        return float(np.degrees(np.arctan2(major[1], major[0])) % 180.0)

    def describe(self) -> dict:
        """FWHM, ellipticity, angle, beta and provenance, for metadata."""
        return {"psf_fwhm": round(self.fwhm, 4), "psf_ellipticity": round(self.ellipticity, 4),
                "psf_theta": round(self.theta, 2), "psf_beta": round(float(self.beta), 4),
                "psf_source": self.source, "psf_n_stars": int(self.n_stars)}

    def evaluate(self, dx, dy) -> np.ndarray:
        """Fraction of a unit-flux source in the pixel whose centre is at ``(dx, dy)``
        (pix) from the source; zero beyond ``radius``."""
        return _bilinear([self._grid], dx, dy, self.radius, self.oversampling)[0]

    def gradient(self, dx, dy) -> tuple[np.ndarray, np.ndarray]:
        """Derivatives of :meth:`evaluate` with respect to ``dx`` and ``dy`` (1/pix).

        A source moved by ``+d`` along x changes the pixel values by ``-d * d/ddx``."""
        gx, gy = _bilinear(self._grad, dx, dy, self.radius, self.oversampling)
        return gx, gy

    def evaluate_with_gradient(self, dx, dy):
        """:meth:`evaluate` and :meth:`gradient` in one pass."""
        return _bilinear([self._grid, *self._grad], dx, dy, self.radius, self.oversampling)


class _StampSampler:
    """:meth:`PSFModel.evaluate` (and :meth:`~PSFModel.gradient`) at fixed integer pixel
    offsets ``(kx, ky)`` from the rounded positions of many sources, as ``(n, len(kx))``
    float32 arrays.

    A source at sub-pixel offset ``(fx, fy)`` from its rounded position samples the
    tabulated grid at ``(kx - fx, ky - fy) * oversampling``: the same four bilinear
    weights at every offset, and the grid cells shifted by one of a few sub-pixel phases.
    The cells of each phase are tabulated once, so a source costs one row look-up and
    four multiply-adds per pixel.
    """

    def __init__(self, psf: PSFModel, kx, ky):
        self.os = int(psf.oversampling)
        self.lo = -((self.os + 1) // 2)  # lowest phase: floor(-fx * os) for fx <= 0.5
        self.n_phase = self.os + 1
        c = int(psf.radius) * self.os
        ng = psf._grid.shape[0]
        corner = np.arange(self.n_phase + 1) + self.lo  # lower corners, and the last + 1
        ic = c + np.asarray(kx)[None, :] * self.os + corner[:, None]
        jc = c + np.asarray(ky)[None, :] * self.os + corner[:, None]
        lower = slice(None, -1)
        self._inside = (((jc[lower] >= 0) & (jc[lower] <= ng - 2))[:, None]
                        & ((ic[lower] >= 0) & (ic[lower] <= ng - 2))[None])
        self._at = (np.clip(jc, 0, ng - 1)[:, None], np.clip(ic, 0, ng - 1)[None])
        self._grids = [psf._grid, *psf._grad]
        self._tables = {}

    def _table(self, which: int) -> np.ndarray:
        """``(n_phase**2, 4, n_offsets)`` values of one grid at the four corners of each
        phase's cells (0 for cells off the grid)."""
        if which not in self._tables:
            g = self._grids[which][self._at]  # (n_phase + 1, n_phase + 1, n_offsets)
            n = self.n_phase
            t = np.stack([np.where(self._inside, g[a:a + n, b:b + n], 0.0)
                          for a, b in ((0, 0), (0, 1), (1, 0), (1, 1))], axis=2)
            self._tables[which] = t.reshape(n * n, 4, -1).astype(np.float32)
        return self._tables[which]

    def __call__(self, fx, fy, grids=(0,)) -> list[np.ndarray]:
        """The PSF (grid 0) and its derivatives with respect to ``dx`` (1) and ``dy`` (2)
        at ``(kx - fx, ky - fy)``, each ``(n, k)``; ``fx, fy`` in [-0.5, 0.5] (pix)."""
        ax = -np.asarray(fx, np.float64) * self.os
        ay = -np.asarray(fy, np.float64) * self.os
        i0, j0 = np.floor(ax), np.floor(ay)
        fu, fv = (ax - i0).astype(np.float32), (ay - j0).astype(np.float32)
        slot = (j0.astype(np.int64) - self.lo) * self.n_phase + (i0.astype(np.int64) - self.lo)
        wts = np.stack([(1 - fv) * (1 - fu), (1 - fv) * fu, fv * (1 - fu), fv * fu], axis=1)
        return [np.einsum("ia,iak->ik", wts, self._table(g).take(slot, axis=0))
                for g in grids]


def moffat_psf(fwhm: float, beta: float = FALLBACK_BETA, *, ellipticity: float = 0.0,
               theta: float = 0.0, radius: int | None = None, source: str = "fallback",
               n_stars: int = 0) -> PSFModel:
    """An elliptical Moffat PSF from its FWHM (geometric mean, pix), ``beta``,
    ellipticity ``1 - b/a`` and major-axis angle ``theta`` (deg from +x).

    Examples
    --------
    >>> psf = moffat_psf(4.3, 3.0, ellipticity=0.1, theta=30.0)
    >>> round(psf.fwhm, 6), round(psf.ellipticity, 6), round(psf.theta, 6)
    (4.3, 0.1, 30.0)
    """
    fwhm, beta, ell = float(fwhm), float(beta), float(ellipticity)
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm}")
    if not 0 <= ell < 1:
        raise ValueError(f"ellipticity must be in [0, 1), got {ell}")
    half = 2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    ratio = 1.0 - ell
    a, b = fwhm / math.sqrt(ratio), fwhm * math.sqrt(ratio)  # major, minor FWHM
    t = math.radians(theta)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    Q = rot @ np.diag([(half / a) ** 2, (half / b) ** 2]) @ rot.T
    L = np.linalg.cholesky(Q)
    return PSFModel((float(L[0, 0]), float(L[1, 0]), float(L[1, 1])), beta,
                    radius=_default_radius(fwhm) if radius is None else int(radius),
                    source=source, n_stars=n_stars)


def _default_radius(fwhm: float) -> int:
    return int(np.clip(math.ceil(4.0 * fwhm), 8, 40))


def _moffat(dx, dy, chol, beta, derivatives=False):
    """The Moffat profile at offsets ``(dx, dy)``; with ``derivatives`` the list of it and
    its derivatives with respect to ``log l11``, ``l21``, ``log l22``, ``beta``, ``dx``
    and ``dy``."""
    l11, l21, l22 = chol
    # r^T L L^T r = |L^T r|^2
    u = l11 * dx + l21 * dy
    v = l22 * dy
    q = 1.0 + u * u + v * v
    if not derivatives:
        return (beta - 1.0) * abs(l11 * l22) / math.pi * q ** (-beta)
    lq = np.log(q)
    val = (beta - 1.0) * abs(l11 * l22) / math.pi * np.exp(-beta * lq)
    g = -2.0 * beta * val / q
    gu, gv = g * u, g * v
    d_dx, d_dy = gu * l11, gu * l21 + gv * l22
    return [val, val + d_dx * dx, gu * dy, val + gv * l22 * dy,
            val * (1.0 / (beta - 1.0) - lq), d_dx, d_dy]


def _pixel_integrated(dx, dy, chol, beta, derivatives=False):
    """Moffat integrated over the unit pixels centred at ``(dx, dy)`` (3 x 3 Gauss-Legendre);
    with ``derivatives`` as :func:`_moffat`."""
    nodes, weights = _GL3
    out = None
    for ti, wi in zip(nodes / 2, weights / 2):
        for tj, wj in zip(nodes / 2, weights / 2):
            terms = _moffat(dx + ti, dy + tj, chol, beta, derivatives)
            if not derivatives:
                out = wi * wj * terms if out is None else out + wi * wj * terms
            elif out is None:
                out = [wi * wj * t for t in terms]
            else:
                for o, t in zip(out, terms):
                    o += wi * wj * t
    return out


def _bilinear(grids, dx, dy, radius, oversampling):
    """Bilinear interpolation of same-shape tabulated grids at offsets (pix); 0 outside."""
    n = grids[0].shape[0]
    u = (np.asarray(dx, np.float64) + radius) * oversampling
    v = (np.asarray(dy, np.float64) + radius) * oversampling
    inside = (u >= 0) & (u < n - 1) & (v >= 0) & (v < n - 1)
    u = np.where(inside, u, 0.0)
    v = np.where(inside, v, 0.0)
    i, j = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - i, v - j
    k = j * n + i
    fv = np.where(inside, fv, 0.0)
    w00, w01 = np.where(inside, (1 - fv) * (1 - fu), 0.0), np.where(inside, (1 - fv) * fu, 0.0)
    w10, w11 = fv * (1 - fu), fv * fu
    out = []
    for grid in grids:
        g = grid.ravel()
        out.append(w00 * g[k] + w01 * g[k + 1] + w10 * g[k + n] + w11 * g[k + n + 1])
    return out


def fit_psf(image: np.ndarray, x, y, *, fwhm: float, variance: np.ndarray,
            mask: np.ndarray | None = None, beta: float = FALLBACK_BETA,
            max_stars: int = 40, min_stars: int = MIN_PSF_STARS,
            half_size: int | None = None) -> PSFModel:
    """Fit one elliptical Moffat PSF to isolated spots of a frame.

    Parameters
    ----------
    image : ndarray
        Background-subtracted frame (adu).
    x, y : array-like
        Positions (pix, 0-based) of the spots to fit: isolated, bright, unsaturated
        (the caller selects them; the brightest ``max_stars`` inside the frame are used).
    fwhm : float
        First guess of the FWHM (pix), e.g. the detection's measurement; also the
        fallback PSF's FWHM.
    variance : ndarray
        Per-pixel noise variance of ``image`` (adu^2), same shape.
    mask : ndarray of bool, optional
        Pixels to ignore (masked, saturated, non-finite).
    beta : float
        Starting Moffat power, and the fallback's.
    max_stars, min_stars : int
        Most spots fitted; fewest accepted before falling back (with a
        :class:`PSFFallbackWarning`).
    half_size : int, optional
        Half-size (pix) of each fitted stamp; default ``ceil(2 * fwhm)``.

    Returns
    -------
    PSFModel
        ``source`` is ``"fitted"`` or ``"fallback"``; ``n_stars`` the spots used.
    """
    if int(max_stars) < 1:
        raise ValueError(f"max_stars must be at least 1, got {max_stars}")
    image = np.asarray(image)
    ny, nx = image.shape
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    h = int(math.ceil(2.0 * fwhm)) if half_size is None else int(half_size)
    inside = (np.isfinite(x) & np.isfinite(y) & (x >= h) & (x < nx - h - 1)
              & (y >= h) & (y < ny - h - 1))
    idx = np.flatnonzero(inside)
    if min(idx.size, int(max_stars)) < min_stars:
        return _fallback(fwhm, beta, f"{min(idx.size, int(max_stars))} isolated bright spots "
                                     f"(need {min_stars})")

    off = np.arange(-h, h + 1)
    xc, yc = np.rint(x[idx]).astype(int), np.rint(y[idx]).astype(int)
    flat = (yc[:, None, None] + off[None, :, None]) * nx + xc[:, None, None] + off[None, None, :]
    d = image.ravel().take(flat).astype(np.float64)
    var = np.asarray(variance).ravel().take(flat).astype(np.float64)
    bad = ~np.isfinite(d) | ~(var > 0)
    if mask is not None:
        bad |= np.asarray(mask, bool).ravel().take(flat)
    w = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, var))
    d = np.where(bad, 0.0, d)
    peak = np.where(bad, -np.inf, d).max(axis=(1, 2))
    keep = np.argsort(-peak)[:max_stars]
    n = len(keep)
    d, w = d[keep].reshape(n, -1), w[keep].reshape(n, -1)
    gy, gx = np.meshgrid(off, off, indexing="ij")
    ox = gx.ravel()[None, :] - (x[idx] - xc)[keep][:, None]
    oy = gy.ravel()[None, :] - (y[idx] - yc)[keep][:, None]

    l0 = 2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0) / float(fwhm)
    p0 = np.concatenate([[math.log(l0), 0.0, math.log(l0), beta], np.zeros(2 * n)])
    lo = np.concatenate([[math.log(l0 / 4), -l0, math.log(l0 / 4), 1.2], np.full(2 * n, -1.5)])
    hi = np.concatenate([[math.log(l0 * 4), l0, math.log(l0 * 4), 12.0], np.full(2 * n, 1.5)])
    with np.errstate(all="ignore"):
        p = _SpotFit(d, w, ox, oy).solve(p0, lo, hi)
    if p is None:
        return _fallback(fwhm, beta, "the PSF fit did not converge")
    chol = (math.exp(p[0]), float(p[1]), math.exp(p[2]))
    fitted = PSFModel(chol, float(p[3]), radius=1, source="fitted", n_stars=n)
    return PSFModel(chol, float(p[3]), radius=_default_radius(fitted.fwhm), source="fitted",
                    n_stars=n)


class _SpotFit:
    """Robust least squares of one Moffat shape and a sub-pixel shift per spot.

    Parameters ``p = (log l11, l21, log l22, beta, sx_1..sx_n, sy_1..sy_n)``; the
    residuals ``sqrt(w) (d - f_i P_i(p) - s_i)`` have each spot's flux ``f_i`` and sky
    ``s_i`` from a weighted linear fit at every ``p`` (variable projection), and the loss
    is soft L1 with a scale of ``F_SCALE`` standard deviations. Minimised by
    Levenberg-Marquardt (iteratively reweighted for the loss) on the exact Jacobian of
    the projected residuals; bounds by projection.
    """

    F_SCALE = 3.0
    FTOL = 1e-8
    MAX_ITER = 60

    def __init__(self, d, w, ox, oy):
        self.d, self.w, self.sw, self.ox, self.oy = d, w, np.sqrt(w), ox, oy
        self.n = d.shape[0]
        self.a22 = w.sum(axis=1)
        self.b2 = (w * d).sum(axis=1)

    def _state(self, p):
        """Cost, residuals and what the Jacobian needs, at ``p``."""
        n = self.n
        out = _pixel_integrated(self.ox - p[4:4 + n, None], self.oy - p[4 + n:, None],
                                (math.exp(p[0]), p[1], math.exp(p[2])), p[3], derivatives=True)
        P = out[0]
        w, d = self.w, self.d
        a11 = (w * P * P).sum(axis=1)
        a12 = (w * P).sum(axis=1)
        b1 = (w * P * d).sum(axis=1)
        det = a11 * self.a22 - a12 * a12
        det = np.where(det > 0, det, np.inf)
        f = (self.a22 * b1 - a12 * self.b2) / det
        s = (a11 * self.b2 - a12 * b1) / det
        r = self.sw * (d - f[:, None] * P - s[:, None])
        c2 = self.F_SCALE ** 2
        cost = c2 * float(np.sum(np.sqrt(1.0 + r * r / c2) - 1.0))
        return cost, r, (out, f, s, a11, a12, det)

    def _jacobian(self, lin):
        """d r / d p: ``(4, n, npix)`` for the shape, ``(2, n, npix)`` for each spot's
        own shift (its residuals only)."""
        (P, *dP), f, s, a11, a12, det = lin
        # the shifts enter as (offset - shift): d/dshift = -d/doffset
        D = np.stack(dP[:4] + [-dP[4], -dP[5]])
        w, a22 = self.w, self.a22
        da11 = 2.0 * (w * P * D).sum(axis=2)
        da12 = (w * D).sum(axis=2)
        db1 = (w * D * self.d).sum(axis=2)
        r1 = db1 - da11 * f - da12 * s
        r2 = -da12 * f
        df = (a22 * r1 - a12 * r2) / det
        ds = (a11 * r2 - a12 * r1) / det
        J = -self.sw * (f[:, None] * D + df[..., None] * P + ds[..., None])
        return J[:4], J[4:]

    def solve(self, p0, lo, hi):
        """The fitted parameters, or None when the fit fails."""
        n, c2 = self.n, self.F_SCALE ** 2
        p = p0.copy()
        cost, r, lin = self._state(p)
        lam = 1e-3
        for _ in range(self.MAX_ITER):
            if not np.isfinite(cost):
                return None
            Jg, Js = self._jacobian(lin)
            om = 1.0 / np.sqrt(1.0 + r * r / c2)  # soft-L1 weights (IRLS)
            Jgo = Jg * om
            H = np.zeros((4 + 2 * n, 4 + 2 * n))
            H[:4, :4] = np.einsum("anp,bnp->ab", Jgo, Jg)
            cross = np.einsum("anp,bnp->abn", Jgo, Js)  # (4, 2, n)
            H[:4, 4:] = cross.reshape(4, 2 * n)
            H[4:, :4] = H[:4, 4:].T
            ss = np.einsum("anp,bnp->abn", Js * om, Js)  # (2, 2, n)
            i = np.arange(n)
            H[4 + i, 4 + i], H[4 + n + i, 4 + n + i] = ss[0, 0], ss[1, 1]
            H[4 + i, 4 + n + i] = H[4 + n + i, 4 + i] = ss[0, 1]
            g = np.concatenate([(Jgo * r).sum(axis=(1, 2)), (Js * (om * r)).sum(axis=2).ravel()])
            scale = np.maximum(np.diag(H), 1e-12 * max(np.diag(H).max(), 1e-300))
            while True:
                try:
                    step = np.linalg.solve(H + lam * np.diag(scale), -g)
                except np.linalg.LinAlgError:
                    return None
                trial = np.clip(p + step, lo, hi)
                new_cost, new_r, new_lin = self._state(trial)
                if new_cost < cost:
                    break
                lam *= 10.0
                if lam > 1e10:  # no step lowers the cost: at the minimum
                    return p if np.all(np.isfinite(p)) else None
            done = cost - new_cost <= self.FTOL * cost
            p, cost, r, lin = trial, new_cost, new_r, new_lin
            lam = max(lam / 10.0, 1e-12)
            if done:
                break
        return p if np.all(np.isfinite(p)) else None


def _fallback(fwhm: float, beta: float, why: str) -> PSFModel:
    warnings.warn(f"PSF: {why}; using a round Moffat (FWHM {float(fwhm):.2f} px, "
                  f"beta {beta:g})", PSFFallbackWarning, stacklevel=3)
    return moffat_psf(fwhm, beta, source="fallback")
