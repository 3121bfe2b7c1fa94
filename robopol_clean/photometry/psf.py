"""The point-spread function of a frame, fitted to its own spots.

:func:`fit_psf` fits one elliptical Moffat profile

.. math::

    I(\\Delta x, \\Delta y) = \\frac{(\\beta - 1)\\sqrt{\\det Q}}{\\pi}
        \\left(1 + \\mathbf{r}^T Q\\, \\mathbf{r}\\right)^{-\\beta},
    \\qquad Q = L L^T

(unit total flux; ``L`` lower triangular, so ``Q`` stays positive definite) jointly to
isolated, bright, unsaturated spots of the frame, each with its own flux, local sky
and sub-pixel position. The model is integrated over the pixels (3 x 3 Gauss-Legendre
points per pixel), so it holds at FWHM of 3 px as well as 6 px. With too few usable
spots :func:`fit_psf` falls back to a round Moffat of the measured FWHM and warns.

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
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix

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
        grid = _pixel_integrated(off[None, :], off[:, None], self.cholesky, self.beta)
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


def _moffat(dx, dy, chol, beta):
    l11, l21, l22 = chol
    # r^T L L^T r = |L^T r|^2
    u = l11 * dx + l21 * dy
    v = l22 * dy
    return (beta - 1.0) * abs(l11 * l22) / math.pi * (1.0 + u * u + v * v) ** (-beta)


def _pixel_integrated(dx, dy, chol, beta):
    """Moffat integrated over the unit pixels centred at ``(dx, dy)`` (3 x 3 Gauss-Legendre)."""
    nodes, weights = _GL3
    out = 0.0
    for ti, wi in zip(nodes / 2, weights / 2):
        for tj, wj in zip(nodes / 2, weights / 2):
            out = out + wi * wj * _moffat(dx + ti, dy + tj, chol, beta)
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
    image = np.asarray(image, np.float64)
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
    rows = yc[:, None, None] + off[None, :, None]
    cols = xc[:, None, None] + off[None, None, :]
    d = image[rows, cols]
    var = np.asarray(variance, np.float64)[rows, cols]
    bad = ~np.isfinite(d) | ~(var > 0)
    if mask is not None:
        bad |= np.asarray(mask, bool)[rows, cols]
    w = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, var))
    d = np.where(bad, 0.0, d)
    peak = np.where(bad, -np.inf, d).max(axis=(1, 2))
    keep = np.argsort(-peak)[:max_stars]
    d, w = d[keep], w[keep]
    fx = (x[idx] - xc)[keep]
    fy = (y[idx] - yc)[keep]
    n = len(keep)
    ox = off[None, None, :] - fx[:, None, None]
    oy = off[None, :, None] - fy[:, None, None]
    sw = np.sqrt(w)

    def model(p):
        chol = (math.exp(p[0]), p[1], math.exp(p[2]))
        sx, sy = p[4:4 + n], p[4 + n:]
        return _pixel_integrated(ox - sx[:, None, None], oy - sy[:, None, None], chol, p[3])

    def linear(P):  # per-spot weighted least squares for flux and sky (batched 2 x 2)
        a11 = (w * P * P).sum(axis=(1, 2))
        a12 = (w * P).sum(axis=(1, 2))
        a22 = w.sum(axis=(1, 2))
        b1 = (w * P * d).sum(axis=(1, 2))
        b2 = (w * d).sum(axis=(1, 2))
        det = a11 * a22 - a12 * a12
        det = np.where(det > 0, det, np.inf)
        return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det

    def residuals(p):
        P = model(p)
        f, s = linear(P)
        return (sw * (d - f[:, None, None] * P - s[:, None, None])).ravel()

    l0 = 2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0) / float(fwhm)
    p0 = np.concatenate([[math.log(l0), 0.0, math.log(l0), beta], np.zeros(2 * n)])
    lo = np.concatenate([[math.log(l0 / 4), -l0, math.log(l0 / 4), 1.2], np.full(2 * n, -1.5)])
    hi = np.concatenate([[math.log(l0 * 4), l0, math.log(l0 * 4), 12.0], np.full(2 * n, 1.5)])
    npix = (2 * h + 1) ** 2
    sparsity = lil_matrix((n * npix, 4 + 2 * n), dtype=int)
    sparsity[:, :4] = 1
    for i in range(n):  # each spot's pixels depend on the shape and its own position only
        sparsity[i * npix:(i + 1) * npix, [4 + i, 4 + n + i]] = 1
    try:
        fit = least_squares(residuals, p0, bounds=(lo, hi), jac_sparsity=sparsity,
                            loss="soft_l1", f_scale=3.0, x_scale="jac", max_nfev=60)
    except (ValueError, np.linalg.LinAlgError) as exc:
        return _fallback(fwhm, beta, f"the PSF fit failed ({exc})")
    p = fit.x
    if not np.all(np.isfinite(p)):
        return _fallback(fwhm, beta, "the PSF fit did not converge")
    chol = (math.exp(p[0]), float(p[1]), math.exp(p[2]))
    fitted = PSFModel(chol, float(p[3]), radius=1, source="fitted", n_stars=n)
    return PSFModel(chol, float(p[3]), radius=_default_radius(fitted.fwhm), source="fitted",
                    n_stars=n)


def _fallback(fwhm: float, beta: float, why: str) -> PSFModel:
    warnings.warn(f"PSF: {why}; using a round Moffat (FWHM {float(fwhm):.2f} px, "
                  f"beta {beta:g})", PSFFallbackWarning, stacklevel=3)
    return moffat_psf(fwhm, beta, source="fallback")
