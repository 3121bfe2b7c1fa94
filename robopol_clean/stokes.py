"""Stokes parameters from the four spot fluxes of one-shot four-channel polarimeters.

Array-in functions that know nothing about photometry or images: they take fluxes
and their uncertainties (any consistent unit, usually electrons) and return
normalised Stokes parameters with uncertainties. :func:`stokes_table` is thin glue
that pulls the fluxes of clean quadruplets out of the spots and groups tables.

Conventions (the package default; see the instrument profile):

- ``q = (F0 - F90) / (F0 + F90)`` and ``u = (F45 - F135) / (F45 + F135)``, with
  ``F<angle>`` the background-subtracted flux of the channel whose analyser sits at that
  angle. For RoboPol: 0 = right, 90 = left, 45 = bottom, 135 = top (FITS orientation).
  A source of total flux ``I`` gives ``F0 = I/4 (1 + q)``, ``F90 = I/4 (1 - q)``.
- Calibration: the instrumental ``(q_inst, u_inst)`` is subtracted first, then the
  vector is rotated by the angle zero point ``d``:
  ``q' = q cos 2d - u sin 2d``, ``u' = q sin 2d + u cos 2d`` (so ``theta' = theta + d``).
- ``p = sqrt(q^2 + u^2)``, ``theta = 0.5 atan2(u, q)`` in degrees, wrapped to [0, 180).
- Debiased ``p``: the modified asymptotic (MAS) estimator of Plaszczynski et al. (2014,
  MNRAS 439, 4048), with the noise perpendicular to the polarization vector as its
  noise scale (see :func:`debias_mas`).
- Angle error: the Naghizadeh-Khouei & Clarke (1993, A&A 274, 968) dispersion of the
  angle distribution below a polarimetric S/N of 20, ``28.65 deg / SNR`` above (see
  :func:`angle_error`), with the debiased p and the noise perpendicular to the
  polarization vector (equal to p_err when q_err == u_err).

q and u come from different spot pairs, so their errors are independent; all errors
are propagated exactly to first order. A calibration fitted from standard stars has
errors of its own: given the covariance of its corrections at a source (angle zero point,
instrumental q and u), they are propagated into the calibrated q and u too, and the
errors become the statistical and the calibration parts in quadrature
(``calibration_covariance`` of :func:`stokes_from_fluxes`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table
from scipy.special import erf, erfinv

if TYPE_CHECKING:  # for the annotation only: this module does not read calibration files
    from .calibration import Calibration

__all__ = [
    "StokesResult",
    "normalized_difference",
    "stokes_from_fluxes",
    "stokes_from_qu",
    "debias_mas",
    "angle_error",
    "nkc_angle_dispersion",
    "stokes_table",
    "PairRatioCheck",
    "pair_ratio_residuals",
    "group_pair_ratio_residuals",
    "pair_ratio_check",
    "NKC_SNR_LIMIT",
    "RAD_TO_HALF_DEG",
    "CALIBRATION_ERROR_COLUMNS",
]

log = logging.getLogger(__name__)

#: Below this polarimetric S/N the angle error comes from the NKC distribution.
NKC_SNR_LIMIT = 20.0
#: ``0.5 * 180 / pi``: the high-S/N angle error is ``RAD_TO_HALF_DEG * p_err / p`` (deg).
RAD_TO_HALF_DEG = 90.0 / np.pi  # 28.6479 deg

_UNITS = {
    "q": ("", "normalised Stokes q = (F0 - F90) / (F0 + F90), calibrated"),
    "q_err": ("", "1-sigma uncertainty of q"),
    "u": ("", "normalised Stokes u = (F45 - F135) / (F45 + F135), calibrated"),
    "u_err": ("", "1-sigma uncertainty of u"),
    "p": ("", "fractional linear polarization sqrt(q^2 + u^2) (biased)"),
    "p_err": ("", "1-sigma uncertainty of p"),
    "p_debiased": ("", "debiased p, modified asymptotic estimator (Plaszczynski et al. 2014)"),
    "theta": ("deg", "polarization angle 0.5 atan2(u, q), in [0, 180)"),
    "theta_err": ("deg", "angle uncertainty (Naghizadeh-Khouei & Clarke 1993 below S/N 20)"),
    "snr": ("", "polarimetric signal-to-noise p / p_err"),
    "q_err_stat": ("", "1-sigma statistical (photometric) uncertainty of q"),
    "u_err_stat": ("", "1-sigma statistical (photometric) uncertainty of u"),
    "q_err_cal": ("", "1-sigma uncertainty of q from the calibration's fitted parameters"),
    "u_err_cal": ("", "1-sigma uncertainty of u from the calibration's fitted parameters"),
    "qu_corr_cal": ("", "correlation coefficient of the calibration's errors of q and u"),
}

#: Columns of a calibrated result that carries the calibration's uncertainty.
CALIBRATION_ERROR_COLUMNS = ("q_err_stat", "u_err_stat", "q_err_cal", "u_err_cal", "qu_corr_cal")


@dataclass(frozen=True)
class StokesResult:
    """Normalised Stokes parameters and derived quantities, with uncertainties.

    All attributes are float arrays of the same shape (the broadcast shape of the
    input fluxes); ``theta`` and ``theta_err`` are in degrees, the rest dimensionless.

    Attributes
    ----------
    q, q_err, u, u_err : ndarray
        Calibrated normalised Stokes parameters and their 1-sigma errors.
    p, p_err : ndarray
        Polarization fraction (biased) and its error.
    p_debiased : ndarray
        MAS-debiased polarization fraction (>= 0).
    theta, theta_err : ndarray
        Polarization angle in [0, 180) deg and its error (deg).
    snr : ndarray
        Polarimetric signal-to-noise ``p / p_err``.
    q_err_stat, u_err_stat : ndarray or None
        The statistical (photometric) part of ``q_err`` and ``u_err``; None unless a
        calibration covariance was propagated (then ``q_err`` and ``u_err`` are totals).
    q_err_cal, u_err_cal : ndarray or None
        The calibration's part (``q_err**2 = q_err_stat**2 + q_err_cal**2``); None alike.
    qu_corr_cal : ndarray or None
        Correlation coefficient of the calibration's errors of q and u (the angle zero
        point moves them together); None alike.
    """

    q: np.ndarray
    q_err: np.ndarray
    u: np.ndarray
    u_err: np.ndarray
    p: np.ndarray
    p_err: np.ndarray
    p_debiased: np.ndarray
    theta: np.ndarray
    theta_err: np.ndarray
    snr: np.ndarray
    q_err_stat: np.ndarray | None = None
    u_err_stat: np.ndarray | None = None
    q_err_cal: np.ndarray | None = None
    u_err_cal: np.ndarray | None = None
    qu_corr_cal: np.ndarray | None = None

    def as_table(self) -> Table:
        """The result as an `~astropy.table.Table` with units and descriptions set.

        Only valid for 1-D (or scalar) results. The calibration's columns
        (:data:`CALIBRATION_ERROR_COLUMNS`) are there only when they are set.
        """
        t = Table()
        for f in fields(self):
            if getattr(self, f.name) is None:
                continue
            t[f.name] = np.atleast_1d(getattr(self, f.name))
            unit, desc = _UNITS[f.name]
            t[f.name].unit = unit or None
            t[f.name].description = desc
        return t


def normalized_difference(f_a, f_b, e_a, e_b) -> tuple[np.ndarray, np.ndarray]:
    """Normalised difference ``(f_a - f_b) / (f_a + f_b)`` and its exact first-order error.

    Parameters
    ----------
    f_a, f_b : array-like
        Fluxes of the two channels of an analyser pair (any common unit, e.g. electron).
    e_a, e_b : array-like
        Their independent 1-sigma uncertainties (same unit).

    Returns
    -------
    value, err : ndarray
        The normalised difference (dimensionless) and
        ``2 sqrt(f_b^2 e_a^2 + f_a^2 e_b^2) / (f_a + f_b)^2``. NaN where the sum is 0.

    Examples
    --------
    >>> v, e = normalized_difference(110.0, 90.0, 10.0, 10.0)
    >>> round(float(v), 3), round(float(e), 4)
    (0.1, 0.0711)
    """
    f_a, f_b, e_a, e_b = (np.asarray(v, dtype=float) for v in (f_a, f_b, e_a, e_b))
    total = f_a + f_b
    with np.errstate(divide="ignore", invalid="ignore"):
        total = np.where(total == 0, np.nan, total)
        value = (f_a - f_b) / total
        err = 2.0 * np.sqrt(f_b**2 * e_a**2 + f_a**2 * e_b**2) / total**2
    return value, err


def debias_mas(p, b) -> np.ndarray:
    """Modified asymptotic (MAS) estimator of the true polarization fraction.

    ``p_MAS = p - b^2 (1 - exp(-p^2 / b^2)) / (2 p)`` (Plaszczynski et al. 2014,
    MNRAS 439, 4048). It is continuous, never negative, tends to 0 as ``p -> 0``
    and to ``p`` at high S/N, and has a small bias from S/N ~ 2 upwards.

    Parameters
    ----------
    p : array-like
        Measured (biased) polarization fraction.
    b : array-like
        Noise scale: for ``sigma_q == sigma_u == sigma`` it is ``sigma``; in general the
        uncertainty perpendicular to the polarization vector,
        ``b^2 = (u^2 sigma_q^2 + q^2 sigma_u^2) / p^2`` (as in that paper).

    Returns
    -------
    ndarray
        Debiased fraction.
    """
    p = np.asarray(p, dtype=float)
    b2 = np.asarray(b, dtype=float) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        # -expm1(-x) = 1 - exp(-x), accurate for small x
        corr = np.where(p > 0, b2 * -np.expm1(-(p**2) / b2) / (2.0 * p), 0.0)
        corr = np.where(b2 > 0, corr, 0.0)
    return np.maximum(p - corr, 0.0)


def _nkc_density(theta: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """NKC (1993) angle density (per radian of theta - theta0, on [-pi/2, pi/2])."""
    eta = p0 * np.cos(2.0 * theta) / np.sqrt(2.0)
    # exp(eta^2 - p0^2/2) <= 1: written this way it never overflows
    return (np.exp(-(p0**2) / 2.0) / np.pi
            + eta * np.exp(eta**2 - p0**2 / 2.0) * (1.0 + erf(eta)) / np.sqrt(np.pi))


@functools.lru_cache(maxsize=1)
def _nkc_table(step: float = 0.02, n_theta: int = 4001) -> tuple[np.ndarray, np.ndarray]:
    """Lookup table of the NKC angle dispersion (deg) for p0/sigma in [0, NKC_SNR_LIMIT]."""
    snr = np.arange(0.0, NKC_SNR_LIMIT + step / 2, step)
    theta = np.linspace(0.0, np.pi / 2, n_theta)  # density is even: integrate one side
    sig = np.empty_like(snr)
    for start in range(0, snr.size, 128):  # chunks keep the work array small
        p0 = snr[start:start + 128, None]
        g = _nkc_density(theta[None, :], p0)
        norm = np.trapezoid(g, theta, axis=1)
        second = np.trapezoid(g * theta**2, theta, axis=1)
        sig[start:start + 128] = np.degrees(np.sqrt(second / norm))
    return snr, sig


def nkc_angle_dispersion(snr) -> np.ndarray:
    """Dispersion (deg) of the measured angle for a true polarimetric S/N ``p0 / sigma``.

    The standard deviation of the Naghizadeh-Khouei & Clarke (1993) angle
    distribution, obtained by numerical integration on a grid of S/N (step 0.02, tabulated
    once) and linear interpolation. It is ``90 / sqrt(3) = 51.96`` deg at S/N 0 (a
    uniform angle) and tends to ``28.65 / snr`` deg at high S/N; above
    :data:`NKC_SNR_LIMIT` the asymptotic form is returned.

    Parameters
    ----------
    snr : array-like
        True (or debiased) ``p / sigma_p``; negative or NaN values give NaN.

    Returns
    -------
    ndarray
        Angle dispersion in degrees.
    """
    snr = np.asarray(snr, dtype=float)
    grid, sig = _nkc_table()
    with np.errstate(divide="ignore", invalid="ignore"):
        high = RAD_TO_HALF_DEG / snr
    out = np.where(snr < NKC_SNR_LIMIT, np.interp(snr, grid, sig), high)
    return np.where(np.isfinite(snr) & (snr >= 0), out, np.nan)


def angle_error(p, p_err) -> np.ndarray:
    """Uncertainty (deg) of the polarization angle.

    Uses :func:`nkc_angle_dispersion` of ``p / p_err``: the NKC (1993) dispersion below
    S/N 20 and ``28.65 deg * p_err / p`` above. Pass the *debiased* ``p`` as the
    estimate of the true polarization (as :func:`stokes_from_fluxes` does), so that a
    measurement consistent with zero polarization gets an error near 51.96 deg.

    Parameters
    ----------
    p : array-like
        Polarization fraction (preferably debiased).
    p_err : array-like
        Its uncertainty.

    Returns
    -------
    ndarray
        Angle error in degrees; NaN where ``p_err`` is not positive.
    """
    p = np.asarray(p, dtype=float)
    p_err = np.asarray(p_err, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(p_err > 0, p / p_err, np.nan)
    return nkc_angle_dispersion(snr)


def stokes_from_fluxes(f0, f45, f90, f135, e0, e45, e90, e135, *,
                       q_inst=0.0, u_inst=0.0, angle_zero: float = 0.0,
                       calibration_covariance=None) -> StokesResult:
    """Calibrated Stokes q, u, p and theta with uncertainties from four channel fluxes.

    Parameters
    ----------
    f0, f45, f90, f135 : array-like
        Background-subtracted fluxes (e.g. electron) of the channels whose analysers sit
        at 0, 45, 90 and 135 deg. Arrays broadcast together.
    e0, e45, e90, e135 : array-like
        Their 1-sigma uncertainties (same unit).
    q_inst, u_inst : array-like
        Instrumental polarization subtracted from q and u (dimensionless), e.g. the
        profile's calibration maps evaluated at the sources' positions.
    angle_zero : float
        Angle zero point (deg): after subtracting the instrumental polarization the
        vector is rotated by it, ``q' = q cos 2d - u sin 2d``, ``u' = q sin 2d + u cos 2d``.
    calibration_covariance : array-like, optional
        Shape ``(..., 3, 3)``: at each source, the covariance of the three corrections,
        in the order (``angle_zero`` (deg), ``q_inst``, ``u_inst``), e.g.
        :meth:`Calibration.covariance_at <robopol_clean.calibration.Calibration.covariance_at>`.
        It is propagated to first order, ``J C J^T`` with ``J`` the derivatives of
        ``(q', u')``: ``(-k u', -cos 2d, sin 2d)`` and ``(k q', -sin 2d, -cos 2d)``,
        ``k = pi / 90`` per degree of ``d``. Then ``q_err`` and ``u_err`` are totals, the
        statistical and the calibration parts in quadrature, and the parts are returned
        too (``q_err_stat``, ``q_err_cal``, ``qu_corr_cal``, ...).

    Returns
    -------
    StokesResult
        q, u and their errors after calibration; p, p_err, p_debiased, theta, theta_err
        (deg) and snr = p / p_err. p, p_err and theta_err are rotation invariant and are
        computed exactly before the rotation (where q and u errors are independent).
        ``p_err`` is the error along the polarization vector and ``b``, the error
        perpendicular to it, ``b^2 = (u^2 q_err^2 + q^2 u_err^2) / p^2``, sets both the
        debiasing and the angle error (``angle_error(p_debiased, b)``); for
        ``q_err == u_err`` they are equal and the usual formulas result. With a
        ``calibration_covariance`` they come from the total covariance of the calibrated
        ``(q', u')`` instead (:func:`stokes_from_qu` with ``qu_cov``): the rotated
        statistical errors, which are correlated when ``q_err != u_err``, plus the
        calibration's.

    Examples
    --------
    BD+59 389 (R band: q = -0.06172, u = -0.01803) seen with a million electrons:

    >>> I, q, u = 1e6, -0.06172, -0.01803
    >>> f = [I / 4 * (1 + q), I / 4 * (1 + u), I / 4 * (1 - q), I / 4 * (1 - u)]
    >>> r = stokes_from_fluxes(*f, *np.sqrt(f))
    >>> round(float(r.p), 5), round(float(r.theta), 2)
    (0.0643, 98.14)
    """
    q, q_err = normalized_difference(f0, f90, e0, e90)
    u, u_err = normalized_difference(f45, f135, e45, e135)
    q = q - np.asarray(q_inst, dtype=float)
    u = u - np.asarray(u_inst, dtype=float)
    q, u, q_err, u_err = np.broadcast_arrays(q, u, q_err, u_err)
    pol = stokes_from_qu(q, q_err, u, u_err)  # rotation invariant: before the rotation

    two_d = np.radians(2.0 * float(angle_zero))
    c, s = np.cos(two_d), np.sin(two_d)
    q_rot = q * c - u * s
    u_rot = q * s + u * c
    q_err_rot = np.sqrt((c * q_err) ** 2 + (s * u_err) ** 2)
    u_err_rot = np.sqrt((s * q_err) ** 2 + (c * u_err) ** 2)
    theta = np.mod(0.5 * np.degrees(np.arctan2(u_rot, q_rot)), 180.0)
    theta = np.where(theta >= 180.0, 0.0, theta)  # mod can round up to 180.0
    values = dict(q=q_rot, q_err=q_err_rot, u=u_rot, u_err=u_err_rot, p=pol.p, p_err=pol.p_err,
                  p_debiased=pol.p_debiased, theta=theta, theta_err=pol.theta_err, snr=pol.snr)
    if calibration_covariance is not None:
        values.update(_with_calibration_errors(q_rot, u_rot, q_err, u_err, c, s,
                                               calibration_covariance))
    return StokesResult(**{k: np.asarray(v, dtype=float) for k, v in values.items()})


def _with_calibration_errors(q_rot: np.ndarray, u_rot: np.ndarray, q_err: np.ndarray,
                             u_err: np.ndarray, c: float, s: float,
                             calibration_covariance) -> dict:
    """Total errors of calibrated (q', u'): the statistical errors ``q_err``, ``u_err``
    (before the rotation by ``2d``, whose cosine and sine are ``c``, ``s``) and the
    calibration's covariance (``(..., 3, 3)`` of angle_zero (deg), q_inst, u_inst)
    propagated through the correction's derivatives."""
    cov = np.asarray(calibration_covariance, dtype=float)
    if cov.shape[-2:] != (3, 3):
        raise ValueError(f"calibration_covariance must have shape (..., 3, 3), got {cov.shape}")
    k = np.radians(2.0)  # d(2d in radians) / d(d in degrees)
    one = np.ones_like(q_rot)
    jac_q = np.stack([-k * u_rot, -c * one, s * one], axis=-1)
    jac_u = np.stack([k * q_rot, -s * one, -c * one], axis=-1)
    var_q_cal = np.maximum(np.einsum("...i,...ij,...j->...", jac_q, cov, jac_q), 0.0)
    var_u_cal = np.maximum(np.einsum("...i,...ij,...j->...", jac_u, cov, jac_u), 0.0)
    cov_cal = np.einsum("...i,...ij,...j->...", jac_q, cov, jac_u)
    # the statistical covariance rotated: independent before, correlated after when q_err != u_err
    var_q_stat = (c * q_err) ** 2 + (s * u_err) ** 2
    var_u_stat = (s * q_err) ** 2 + (c * u_err) ** 2
    cov_stat = c * s * (q_err**2 - u_err**2)
    q_tot = np.sqrt(var_q_stat + var_q_cal)
    u_tot = np.sqrt(var_u_stat + var_u_cal)
    pol = stokes_from_qu(q_rot, q_tot, u_rot, u_tot, qu_cov=cov_stat + cov_cal)
    q_cal, u_cal = np.sqrt(var_q_cal), np.sqrt(var_u_cal)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where((q_cal > 0) & (u_cal > 0), cov_cal / (q_cal * u_cal), 0.0)
    return dict(q_err=q_tot, u_err=u_tot, p_err=pol.p_err, p_debiased=pol.p_debiased,
                theta_err=pol.theta_err, snr=pol.snr, q_err_stat=np.sqrt(var_q_stat),
                u_err_stat=np.sqrt(var_u_stat), q_err_cal=q_cal, u_err_cal=u_cal,
                qu_corr_cal=np.clip(corr, -1.0, 1.0))


def stokes_from_qu(q, q_err, u, u_err, *, qu_cov=None) -> StokesResult:
    """p, its error, debiased p, theta and its error from q and u and their errors.

    The part of :func:`stokes_from_fluxes` after q and u are known, for q and u that come
    from elsewhere (e.g. the weighted means of several exposures,
    :mod:`robopol_clean.combine`). ``p_err`` is the error along the polarization vector;
    ``b``, the error perpendicular to it, ``b^2 = (u^2 q_err^2 + q^2 u_err^2) / p^2``,
    sets the MAS debiasing (:func:`debias_mas`) and the angle error
    (``angle_error(p_debiased, b)``). With a covariance ``C`` between the errors of q
    and u, ``p_err^2`` gains ``2 q u C / p^2`` and ``b^2`` loses it.

    Parameters
    ----------
    q, q_err, u, u_err : array-like
        Normalised Stokes q and u (dimensionless) and their 1-sigma errors.
        Arrays broadcast together.
    qu_cov : array-like, optional
        Covariance of the errors of q and u (dimensionless); independent errors when
        omitted. A calibration's angle zero point, for instance, moves q and u together.

    Returns
    -------
    StokesResult
        q, u and their errors as given; p, p_err, p_debiased, theta (deg, in [0, 180)),
        theta_err (deg) and snr = p / p_err.

    Examples
    --------
    >>> r = stokes_from_qu(0.03, 0.001, -0.04, 0.001)
    >>> round(float(r.p), 4), round(float(r.theta), 2), round(float(r.snr), 1)
    (0.05, 153.43, 50.0)
    """
    q, q_err, u, u_err = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                               for v in (q, q_err, u, u_err)))
    p = np.hypot(q, u)
    with np.errstate(divide="ignore", invalid="ignore"):
        nonzero = p > 0
        # radial (along the vector) and perpendicular noise; isotropic mean at p == 0
        radial = q**2 * q_err**2 + u**2 * u_err**2
        perpendicular = u**2 * q_err**2 + q**2 * u_err**2
        if qu_cov is not None:
            cross = 2.0 * q * u * np.asarray(qu_cov, dtype=float)
            radial, perpendicular = radial + cross, np.maximum(perpendicular - cross, 0.0)
            radial = np.maximum(radial, 0.0)
        p_err = np.where(nonzero, np.sqrt(radial) / p, np.sqrt((q_err**2 + u_err**2) / 2.0))
        b = np.where(nonzero, np.sqrt(perpendicular) / p, np.sqrt((q_err**2 + u_err**2) / 2.0))
        snr = np.where(p_err > 0, p / p_err, np.nan)
    p_deb = debias_mas(p, b)
    theta_err = angle_error(p_deb, b)  # the angle moves with the perpendicular noise
    theta = np.mod(0.5 * np.degrees(np.arctan2(u, q)), 180.0)
    theta = np.where(theta >= 180.0, 0.0, theta)  # mod can round up to 180.0
    values = dict(q=q, q_err=q_err, u=u, u_err=u_err, p=p, p_err=p_err, p_debiased=p_deb,
                  theta=theta, theta_err=theta_err, snr=snr)
    return StokesResult(**{k: np.asarray(v, dtype=float) for k, v in values.items()})


def stokes_table(groups: Table, spots: Table, profile, *, exclude_flagged: bool = True,
                 keep_invalid: bool = False, calibration: Calibration | None = None) -> Table:
    """Stokes parameters of every clean, complete quadruplet.

    Parameters
    ----------
    groups : Table
        Groups table (from grouping): ``group_id``, ``x``, ``y`` (pattern centre, pix),
        ``complete`` and ``spot_<channel>`` (spot_id or -1) for every profile channel;
        if it has a boolean ``clean`` column only rows where it is true are used.
    spots : Table
        Spots table with ``spot_id``, ``flux`` and ``flux_err`` (electron, from
        :func:`robopol_clean.photometry.measure_spots`).
    profile : InstrumentProfile
        Supplies the channels, their analyser angles (``channel_angles``), the
        instrumental polarization map (``instrumental_qu``) and ``angle_zero``.
    exclude_flagged : bool
        Also drop groups with a spot whose ``saturated`` flag is set or whose aperture
        lost pixels (``n_masked > 0``), when those columns exist. Groups with a
        non-finite flux or a non-positive pair sum are dropped unless ``keep_invalid``.
    keep_invalid : bool
        Keep groups with a non-finite flux or a non-positive pair sum, with NaN Stokes
        parameters (the pipeline flags them instead of dropping them).
    calibration : Calibration, optional
        The calibration file whose values the profile holds
        (:meth:`Calibration.apply <robopol_clean.calibration.Calibration.apply>`): the
        covariance of its fitted parameters, evaluated at each source
        (:meth:`~robopol_clean.calibration.Calibration.covariance_at` with the profile's
        geometry), is propagated into the errors (``calibration_covariance`` of
        :func:`stokes_from_fluxes`). Without one, or when it carries no covariance, the
        errors are the statistical ones and the table has no calibration columns.

    Returns
    -------
    Table
        One row per used quadruplet: ``group_id``, ``x``, ``y`` (pix), ``q``, ``q_err``,
        ``u``, ``u_err``, ``p``, ``p_err``, ``p_debiased``, ``theta``, ``theta_err`` (deg),
        ``snr``, with a calibration covariance ``q_err_stat``, ``u_err_stat``,
        ``q_err_cal``, ``u_err_cal`` and ``qu_corr_cal`` (``q_err`` and ``u_err`` then being
        the totals), ``crowded`` (only if the spots table has that photometry flag: a
        spot has a close neighbour, so its errors may be underestimated) and
        ``flux_<channel>`` (electron). ``meta`` records the convention and the
        calibration applied.

    Raises
    ------
    KeyError
        If a required column is missing (the message names it and the table).
    ValueError
        If ``calibration`` is not the one the profile holds.
    """
    propagate = calibration is not None and calibration.has_covariance
    if propagate and not np.isclose(float(profile.angle_zero), float(calibration.angle_zero),
                                    rtol=0.0, atol=1e-12):
        raise ValueError(f"stokes_table: the profile's angle_zero ({profile.angle_zero}) is not "
                         f"that of the calibration {calibration.source} "
                         f"({calibration.angle_zero}); apply it first (Calibration.apply)")
    channels = tuple(profile.channels)
    _require(groups, ["group_id", "x", "y", "complete"] + [f"spot_{ch}" for ch in channels],
             "groups")
    _require(spots, ["spot_id", "flux", "flux_err"], "spots")
    by_angle = {a: profile.channel_at_angle(a) for a in (0.0, 45.0, 90.0, 135.0)}

    n = len(groups)
    use = np.asarray(groups["complete"], bool).copy() if n else np.zeros(0, bool)
    if "clean" in groups.colnames:
        use &= np.asarray(groups["clean"], bool)

    # spot_id -> row of the spots table (spot_id normally equals the row index)
    ids = np.asarray(spots["spot_id"], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    all_flux = np.append(np.asarray(spots["flux"], float), np.nan)  # last row: "no spot"
    all_ferr = np.append(np.asarray(spots["flux_err"], float), np.nan)
    rows, flux, ferr = {}, {}, {}
    for ch in channels:
        sid = np.asarray(groups[f"spot_{ch}"], dtype=np.int64) if n else np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, sid), max(len(ids) - 1, 0))
        found = (sid >= 0) & (sorted_ids[pos] == sid) if len(ids) else np.zeros(n, bool)
        use &= found
        rows[ch] = np.where(found, order[pos] if len(ids) else 0, len(ids))
        flux[ch], ferr[ch] = all_flux[rows[ch]], all_ferr[rows[ch]]
    n_candidates = int(np.count_nonzero(use))
    valid = np.ones(n, bool)
    for ch in channels:
        valid &= np.isfinite(flux[ch]) & np.isfinite(ferr[ch])
        if exclude_flagged:
            if "saturated" in spots.colnames:
                use &= ~np.append(np.asarray(spots["saturated"], bool), False)[rows[ch]]
            if "n_masked" in spots.colnames:
                use &= np.append(np.asarray(spots["n_masked"]), 0)[rows[ch]] <= 0
    for a, b in ((by_angle[0.0], by_angle[90.0]), (by_angle[45.0], by_angle[135.0])):
        with np.errstate(invalid="ignore"):
            valid &= (flux[a] + flux[b]) > 0
    if keep_invalid:
        for ch in channels:
            flux[ch] = np.where(valid, flux[ch], np.nan)
            ferr[ch] = np.where(valid, ferr[ch], np.nan)
    else:
        use &= valid
    if n_candidates - np.count_nonzero(use):
        log.info("stokes_table: %d of %d clean complete groups dropped (flagged, masked or "
                 "non-finite fluxes)", n_candidates - np.count_nonzero(use), n_candidates)

    x = np.asarray(groups["x"], float)[use] if n else np.zeros(0)
    y = np.asarray(groups["y"], float)[use] if n else np.zeros(0)
    q_inst, u_inst = profile.instrumental_qu(x, y)
    f = {a: flux[ch][use] for a, ch in by_angle.items()}
    e = {a: ferr[ch][use] for a, ch in by_angle.items()}
    cal_cov = calibration.covariance_at(x, y, profile.geometry) if propagate else None
    with np.errstate(invalid="ignore", divide="ignore"):
        res = stokes_from_fluxes(f[0.0], f[45.0], f[90.0], f[135.0], e[0.0], e[45.0], e[90.0],
                                 e[135.0], q_inst=q_inst, u_inst=u_inst,
                                 angle_zero=profile.angle_zero, calibration_covariance=cal_cov)

    out = Table()
    out["group_id"] = np.asarray(groups["group_id"])[use] if n else np.zeros(0, np.int64)
    out["group_id"].description = "group (pattern) identifier from the groups table"
    for name, values in (("x", x), ("y", y)):
        out[name] = values
        out[name].unit = "pix"
        out[name].description = f"pattern centre {name} (0-based, FITS orientation)"
    res_table = res.as_table() if len(x) else _empty_result_table(propagate)
    for col in res_table.colnames:
        out[col] = res_table[col]
    if propagate:
        out["q_err"].description = "1-sigma uncertainty of q: statistical and calibration in quadrature"
        out["u_err"].description = "1-sigma uncertainty of u: statistical and calibration in quadrature"
    if "crowded" in spots.colnames:
        crowded_rows = np.append(np.asarray(spots["crowded"], bool), False)
        out["crowded"] = np.any([crowded_rows[rows[ch]][use] for ch in channels], axis=0) \
            if len(x) else np.zeros(0, bool)
        out["crowded"].description = "a spot has a neighbour within the crowding radius"
    for ch in channels:
        out[f"flux_{ch}"] = flux[ch][use]
        out[f"flux_{ch}"].unit = "electron"
        out[f"flux_{ch}"].description = (f"{ch} spot flux (analyser {profile.channel_angles[ch]:g} "
                                         "deg)")
    out.meta.update({
        "stokes_convention": "q=(F0-F90)/(F0+F90), u=(F45-F135)/(F45+F135), theta=0.5*atan2(u,q)",
        "channel_angles": {ch: float(profile.channel_angles[ch]) for ch in channels},
        "angle_zero": float(profile.angle_zero),
        "q_inst_coeffs": [float(c) for c in np.ravel(profile.q_inst)],
        "u_inst_coeffs": [float(c) for c in np.ravel(profile.u_inst)],
        "inst_terms": list(profile.geometry.terms),
        "calibration": "q,u -= instrumental_qu(x, y); then rotated by angle_zero",
        "p_debias": "MAS (Plaszczynski et al. 2014)",
        "theta_err_method": f"Naghizadeh-Khouei & Clarke 1993 below S/N {NKC_SNR_LIMIT:g}",
        "profile": profile.name,
    })
    if propagate:
        out.meta["calibration_errors"] = (
            "q_err, u_err = statistical (q_err_stat, u_err_stat) and calibration (q_err_cal, "
            "u_err_cal: the fitted parameters' covariance propagated at each source) in "
            "quadrature; p_err, theta_err from the total covariance")
    return out


@dataclass(frozen=True)
class PairRatioCheck:
    """Result of :func:`pair_ratio_residuals`.

    The noise of ``log R`` is modelled as coming from spot flux errors
    ``sqrt(scale^2 flux_err^2 + confusion^2)``: the photometric errors, widened by a factor
    and by an additive term for light that no error model covers (faint unresolved
    neighbours: confusion noise, the same in electrons for bright and faint spots).

    Attributes
    ----------
    z : ndarray
        ``(log R - model) / sigma`` per group with the robust noise model (NaN where the
        fluxes give no finite ratio or no model could be fitted).
    model : ndarray
        Fitted ``log R`` at each group.
    scale, confusion : float
        Robust noise model (medians of the normalised chi^2, which contaminated groups
        hardly move), used for ``z``; ``confusion`` is in the unit of the fluxes.
    error_scale, error_confusion : float
        The same model calibrated so that the groups within ``clip`` have a mean chi^2
        of a clipped unit Gaussian. Contamination of a spot changes ``log R`` as much as it
        changes q or u, so ``sqrt(error_scale^2 flux_err^2 + error_confusion^2)`` is a
        flux error that also covers the light the photometry could not separate.
    coefficients : ndarray
        The fitted polynomial's coefficients (empty when no model could be fitted).
    powers : tuple of (int, int)
        The ``(i, j)`` of each coefficient's term ``xn**i * yn**j``.
    """

    z: np.ndarray
    model: np.ndarray
    scale: float
    confusion: float
    error_scale: float
    error_confusion: float
    coefficients: np.ndarray = field(default_factory=lambda: np.zeros(0))
    powers: tuple = ()

    def model_at(self, xn, yn) -> np.ndarray:
        """The fitted ``log R`` at normalised positions (NaN if nothing was fitted)."""
        xn, yn = np.asarray(xn, float), np.asarray(yn, float)
        if not len(self.powers):
            return np.full(np.broadcast(xn, yn).shape, np.nan)
        return sum(c * xn**i * yn**j for c, (i, j) in zip(self.coefficients, self.powers))


def pair_ratio_residuals(f0, f45, f90, f135, e0, e45, e90, e135, xn, yn, *, degree: int = 2,
                         clip: float = 3.0, maxiters: int = 20, fit_mask=None,
                         trim: float = 0.75, min_groups: int = 20) -> PairRatioCheck:
    """Consistency of the two analyser pairs' total fluxes with a smooth instrumental ratio.

    A point source puts the same light into both analyser pairs up to an instrumental
    ratio ``R = (F45 + F135) / (F0 + F90)`` that varies smoothly over the field and does
    not depend on the source's polarization. Light that leaks into one spot only (an
    unresolved neighbour, a cosmic ray, a sky error) changes ``R``: contamination ``c``
    of one spot shifts ``log R`` by about ``c / (F0 + F90)`` (or the u pair's sum), as
    much as it shifts q (or u). ``log R`` is fitted with a polynomial in the normalised
    position (a weighted least-trimmed fit, iterated) and each group's deviation is
    returned in units of its uncertainty (see :class:`PairRatioCheck` for the noise
    model).

    Parameters
    ----------
    f0, f45, f90, f135 : array-like
        Channel fluxes (any common unit), 1-D.
    e0, e45, e90, e135 : array-like
        Their 1-sigma uncertainties.
    xn, yn : array-like
        Normalised positions of the groups (order-unity across the field).
    degree : int
        Total degree of the polynomial in ``(xn, yn)``; lowered automatically when
        there are too few groups (fewer than 3 per term).
    clip : float
        Groups deviating by more than this many standard deviations are left out of
        the error calibration (and of the fit).
    maxiters : int
        Largest number of fit iterations.
    fit_mask : array-like of bool, optional
        Groups allowed in the fit (all by default); residuals are returned for all.
    trim : float
        Fraction of the groups (those closest to the model) that enter each fit.
    min_groups : int
        With fewer usable groups the noise model is not fitted (scale 1, no confusion).

    Returns
    -------
    PairRatioCheck

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> xn, yn = rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50)
    >>> iu = 1000 * np.exp(0.4 * xn); iq = np.full(50, 1000.0)
    >>> f = [iq / 2, iu / 2, iq / 2, iu / 2]
    >>> f[0] = f[0] + np.r_[100.0, np.zeros(49)]  # light leaking into one spot
    >>> chk = pair_ratio_residuals(*f, *[np.full(50, 5.0)] * 4, xn, yn)
    >>> bool(abs(chk.z[0]) > 10 and np.all(np.abs(chk.z[1:]) < 1e-6))
    True
    """
    f0, f45, f90, f135, e0, e45, e90, e135, xn, yn = (
        np.atleast_1d(np.asarray(v, float)) for v in (f0, f45, f90, f135, e0, e45, e90,
                                                       e135, xn, yn))
    iq, iu = f0 + f90, f45 + f135
    with np.errstate(divide="ignore", invalid="ignore"):
        logr = np.log(iu / iq)
        var = (e0**2 + e90**2) / iq**2 + (e45**2 + e135**2) / iu**2
        w = 2.0 / iq**2 + 2.0 / iu**2  # d var / d confusion^2
    ok = (iq > 0) & (iu > 0) & np.isfinite(logr) & np.isfinite(var) & (var > 0) & \
        np.isfinite(xn) & np.isfinite(yn)
    fit_ok = ok & (np.asarray(fit_mask, bool) if fit_mask is not None else True)
    n = logr.size
    n_fit = int(np.count_nonzero(fit_ok))
    if n_fit < 3:
        nan = np.full(n, np.nan)
        return PairRatioCheck(nan, nan.copy(), 1.0, 0.0, 1.0, 0.0)
    deg = int(degree)
    while deg > 0 and n_fit < 3 * (deg + 1) * (deg + 2) // 2:
        deg -= 1
    powers = [(i, t - i) for t in range(deg + 1) for i in range(t + 1)]
    basis = np.stack([xn**i * yn**j for i, j in powers], axis=1)
    basis = np.where(np.isfinite(basis), basis, 0.0)
    calibrate = n_fit >= int(min_groups)

    def total_var(k, c):
        return k**2 * var + c**2 * w

    use = fit_ok.copy()
    # first fit nearly unweighted (a huge extra variance) so that a few bright outliers
    # cannot pull it; then fit the best `trim` fraction with the robust noise model
    med = np.median(logr[fit_ok])
    extra = max(1.4826 * float(np.median(np.abs(logr[fit_ok] - med))), 1e-6) ** 2
    scale, conf = 1.0, 0.0
    coef = np.zeros(len(powers))
    res = logr - med
    model_var = np.zeros(n)
    for it in range(max(int(maxiters), 1)):
        tv = total_var(scale, conf) + (extra if it == 0 else 0.0)
        coef, model_var = _weighted_fit(basis, logr, tv, use)
        res = logr - basis @ coef
        new_scale, new_conf = (_robust_noise(res[fit_ok], var[fit_ok], w[fit_ok])
                               if calibrate else (1.0, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            za = np.abs(res) / np.sqrt(total_var(new_scale, new_conf) + model_var)
        limit = min(float(clip), float(np.quantile(za[fit_ok], trim))) if trim < 1 else clip
        new_use = fit_ok & (za <= limit)
        if np.count_nonzero(new_use) < len(powers):
            break
        done = (it > 0 and np.array_equal(new_use, use)
                and abs(new_conf - conf) <= 1e-3 * max(conf, 1e-12)
                and abs(new_scale - scale) <= 1e-3)
        use, scale, conf = new_use, new_scale, new_conf
        if done:
            break
    coef, model_var = _weighted_fit(basis, logr, total_var(scale, conf), use)
    model = basis @ coef
    res = logr - model
    with np.errstate(invalid="ignore", divide="ignore"):
        # the model's own uncertainty counts (it dominates for a source much brighter
        # than the others, e.g. the target of a sparse field)
        z = np.where(ok, res / np.sqrt(total_var(scale, conf) + model_var), np.nan)
    err_scale, err_conf = 1.0, 0.0
    if calibrate:
        kept = fit_ok & (np.abs(z) <= clip)
        if np.count_nonzero(kept) >= 10:
            err_scale, err_conf = _chi2_noise(res[kept], var[kept], w[kept], float(clip))
    return PairRatioCheck(z, np.where(ok, model, np.nan), float(scale), float(conf),
                          float(err_scale), float(err_conf), coef, tuple(powers))


def _weighted_fit(basis: np.ndarray, y: np.ndarray, variance: np.ndarray,
                  use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares on the ``use`` rows: coefficients and, for every row, the
    variance of the fitted model there."""
    sw = 1.0 / np.sqrt(variance[use])
    a = basis[use] * sw[:, None]
    coef, *_ = np.linalg.lstsq(a, y[use] * sw, rcond=None)
    cov = np.linalg.pinv(a.T @ a)
    model_var = np.einsum("ij,jk,ik->i", basis, cov, basis)
    return coef, np.maximum(model_var, 0.0)


#: Quantile of the normalised chi^2 that the robust noise model matches to a unit
#: Gaussian's (the median: up to half the groups may be contaminated without inflating it).
_ROBUST_QUANTILE = 0.5


def _chi2_quantile(q: float) -> float:
    """Quantile of a chi-square with one degree of freedom."""
    return float(2.0 * erfinv(q) ** 2)


def _split_noise(res: np.ndarray, var: np.ndarray, w: np.ndarray, stat) -> tuple[float, float]:
    """Noise model ``scale^2 var + c^2 w`` with ``stat(chi2) == 1`` on each half.

    ``scale`` (>= 1) is set on the half of the groups where the confusion term matters
    least (smallest ``w / var``: the bright ones), ``c`` (>= 0) on the other half; the
    two are solved alternately, each given the other. ``stat`` maps normalised chi^2
    values to a number that is 1 for a unit Gaussian.
    """
    if res.size < 20:
        return 1.0, _solve_noise(res, var, w, stat, "confusion", 1.0, 0.0)
    lever = w / var
    split = lever <= np.median(lever)
    scale, conf = 1.0, 0.0
    for _ in range(3):  # the coupling is weak: a few alternations settle both
        new_scale = _solve_noise(res[split], var[split], w[split], stat, "scale", scale, conf)
        new_conf = _solve_noise(res[~split], var[~split], w[~split], stat, "confusion",
                                new_scale, conf)
        done = abs(new_scale - scale) <= 1e-3 * scale and abs(new_conf - conf) <= 1e-3 * max(
            conf, 1e-12)
        scale, conf = new_scale, new_conf
        if done:
            break
    return scale, conf


def _solve_noise(res, var, w, stat, which: str, scale: float, conf: float) -> float:
    """Smallest ``scale`` (>= 1) or ``confusion`` (>= 0), the other fixed, with
    ``stat(res^2 / (scale^2 var + confusion^2 w)) <= 1``."""
    if which == "scale":
        def chi(t):
            return stat(res**2 / (t**2 * var + conf**2 * w))
        lo, hi = 1.0, 2.0
    else:
        def chi(t):
            return stat(res**2 / (scale**2 * var + t**2 * w))
        lo, hi = 0.0, 1.0
    if res.size == 0 or chi(lo) <= 1.0:
        return lo
    if which != "scale":
        hi = float(np.sqrt(np.max(res**2 / w))) + 1e-300
    while chi(hi) > 1.0 and hi < 1e12:
        hi *= 2.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if chi(mid) > 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-4 * hi:
            break
    return hi


def _robust_noise(res, var, w) -> tuple[float, float]:
    ref = _chi2_quantile(_ROBUST_QUANTILE)
    return _split_noise(res, var, w, lambda c: _quantile_in_place(c, _ROBUST_QUANTILE) / ref)


def _quantile_in_place(c: np.ndarray, q: float) -> float:
    """``np.quantile(c, q)`` (linear interpolation) of a temporary 1-D array, which it
    reorders: a partial sort instead of np.quantile's overhead, in a bisection that calls
    it hundreds of times."""
    pos = q * (c.size - 1)
    lo = int(pos)
    hi = min(lo + 1, c.size - 1)
    c.partition((lo, hi) if hi != lo else lo)
    return float(c[lo] + (c[hi] - c[lo]) * (pos - lo))


def _chi2_noise(res, var, w, clip: float) -> tuple[float, float]:
    # mean chi^2 of a unit Gaussian truncated at |z| <= clip
    t = 1.0 - 2.0 * clip * np.exp(-0.5 * clip**2) / np.sqrt(2 * np.pi) / erf(clip / np.sqrt(2))
    return _split_noise(res, var, w, lambda c: np.mean(c) / t)


def group_pair_ratio_residuals(groups: Table, spots: Table, profile,
                               **kwargs) -> PairRatioCheck:
    """:func:`pair_ratio_residuals` for every group of a groups table.

    Parameters
    ----------
    groups : Table
        Groups with ``x``, ``y`` (pix) and ``spot_<channel>``; only groups with four
        finite fluxes and positive pair sums get a value.
    spots : Table
        Spots with ``spot_id``, ``flux`` and ``flux_err``.
    profile : InstrumentProfile
        Channels, analyser angles and the geometry's normalisation (``center``, ``scale``).
    **kwargs
        Passed to :func:`pair_ratio_residuals` (e.g. ``fit_mask``, ``degree``).

    Returns
    -------
    PairRatioCheck
        One value of ``z`` and ``model`` per group.
    """
    n = len(groups)
    by_angle = {a: profile.channel_at_angle(a) for a in (0.0, 45.0, 90.0, 135.0)}
    ids = np.asarray(spots["spot_id"], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    flux = np.append(np.asarray(spots["flux"], float)[order], np.nan)
    ferr = np.append(np.asarray(spots["flux_err"], float)[order], np.nan)
    f, e = {}, {}
    for a, ch in by_angle.items():
        sid = np.asarray(groups[f"spot_{ch}"], dtype=np.int64) if n else np.zeros(0, np.int64)
        if len(ids):
            pos = np.minimum(np.searchsorted(sorted_ids, sid), len(ids) - 1)
            found = (sid >= 0) & (sorted_ids[pos] == sid)
        else:
            pos, found = np.zeros(n, np.int64), np.zeros(n, bool)
        row = np.where(found, pos, len(ids))
        f[a], e[a] = flux[row], ferr[row]
    geo = profile.geometry
    xn = (np.asarray(groups["x"], float) - geo.center[0]) / geo.scale if n else np.zeros(0)
    yn = (np.asarray(groups["y"], float) - geo.center[1]) / geo.scale if n else np.zeros(0)
    return pair_ratio_residuals(f[0.0], f[45.0], f[90.0], f[135.0], e[0.0], e[45.0],
                                e[90.0], e[135.0], xn, yn, **kwargs)


def pair_ratio_check(groups: Table, spots: Table, profile, **kwargs) -> PairRatioCheck:
    """:func:`group_pair_ratio_residuals` fitted on the trustworthy groups of a frame.

    The fit uses complete groups whose spots are not flagged (``rejected``,
    ``saturated``, ``n_masked > 0``, ``contaminated``, when those columns exist);
    residuals are returned for every group.

    Parameters
    ----------
    groups, spots : Table
        Groups and spots tables (after photometry).
    profile : InstrumentProfile
        The instrument.
    **kwargs
        Passed to :func:`pair_ratio_residuals`.

    Returns
    -------
    PairRatioCheck
    """
    n = len(groups)
    fit = np.asarray(groups["complete"], bool).copy() if n else np.zeros(0, bool)
    if n and len(spots):
        bad = np.zeros(len(spots), bool)
        for col in ("rejected", "saturated", "contaminated"):
            if col in spots.colnames:
                bad |= np.asarray(spots[col], bool)
        if "n_masked" in spots.colnames:
            bad |= np.asarray(spots["n_masked"]) > 0
        ids = np.asarray(spots["spot_id"], dtype=np.int64)
        lookup = dict(zip(ids.tolist(), bad.tolist()))
        for ch in profile.channels:
            sid = np.asarray(groups[f"spot_{ch}"], dtype=np.int64)
            fit &= np.array([not lookup.get(int(i), True) for i in sid], bool)
    kwargs.setdefault("fit_mask", fit)
    return group_pair_ratio_residuals(groups, spots, profile, **kwargs)


def _empty_result_table(calibration_errors: bool = False) -> Table:
    z = np.zeros(0)
    return StokesResult(**{f.name: z for f in fields(StokesResult)
                           if calibration_errors or f.name not in CALIBRATION_ERROR_COLUMNS}
                        ).as_table()


def _require(table: Table, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise KeyError(f"{what} table lacks column(s) {', '.join(missing)}"
                       + (" (run photometry.measure_spots first)" if "flux" in missing else ""))
