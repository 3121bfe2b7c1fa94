"""Simulated polarimetry frames with full truth tables.

:func:`simulate_frame` renders one frame of a multi-channel imaging polarimeter
described by an :class:`~robopol_clean.instrument.InstrumentProfile`: field stars
split into one spot per channel (fluxes set by each star's q and u and the profile's
channel angles), the position-dependent spot geometry, a Moffat PSF, sky behind the
focal-plane mask, detector noise and saturation, and the things a reduction must not
mistake for stars -- reflection artifacts (horizontal streaks and compact ghosts, mostly
as *orphan pairs* laid out like one analyser pair of a pattern whose other pair is
missing), cosmic rays and flat-field dust donuts. Every injected object is listed in
truth tables, so detection, grouping, classification and photometry can be scored.

The simulated frame is in ADU, bias-subtracted unless ``include_bias=True``.

Photometric model
-----------------
A star of instrumental magnitude ``mag`` delivers
``exptime * 10 ** (-0.4 * (mag - zero_point))`` electrons in total over its spots
(:data:`ZERO_POINT` = 23.1 by default: an R = 15 star gives about 2.4e5 e- in 120 s,
and the brightest unsaturated stars are near R = 10.5 for RoboPol). The total is split
between the two analyser pairs in the ratio ``u-pair / q-pair = exp(pair_ratio_slope *
xn)`` (xn the normalised x of the pattern centre; measured as roughly exp(0.85 xn) on
RoboPol), and within each pair by the polarization::

    F(0 deg)  = I_q / 2 (1 + q)     F(90 deg)  = I_q / 2 (1 - q)
    F(45 deg) = I_u / 2 (1 + u)     F(135 deg) = I_u / 2 (1 - u)

so that ``q = (F0 - F90) / (F0 + F90)`` and ``u = (F45 - F135) / (F45 + F135)`` hold
for every star, wherever it sits (with ``I_q = I_u = I / 2`` this is ``I/4 (1 +/- q)``).
The q and u put into the spot fluxes are the star's true (q, u) rotated by
``-profile.angle_zero`` and offset by ``profile.instrumental_qu`` -- the inverse of the
calibration documented in the profile -- and are listed as ``q_obs``, ``u_obs``.

Coordinates in the truth tables are 0-based pixels of the simulated image (FITS
orientation). A frame smaller than the detector is the detector region starting at
``origin`` (detector pixel ``(x0, y0)`` is image pixel ``(0, 0)``); geometry, mask and
vignetting are evaluated at detector coordinates.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table

from .instrument import InstrumentProfile, load_profile

__all__ = [
    "ZERO_POINT",
    "SimulatedFrame",
    "simulate_frame",
    "simulate_frames",
    "moffat_alpha",
]

log = logging.getLogger(__name__)

#: Instrumental magnitude of a source giving 1 electron per second over all its spots.
ZERO_POINT = 23.1

#: Version of the simulation model, written to headers (``SIMVER``).
SIM_VERSION = 1

# Stamp half-sizes (px) used for the PSF, chosen per spot by brightness.
_STAMP_TIERS = (10, 16, 28, 48, 80)


@dataclass
class SimulatedFrame:
    """One simulated frame and its truth.

    Attributes
    ----------
    ccd : CCDData
        The image in ADU (float32), bias-subtracted unless ``include_bias``; the header
        has GAIN, RDNOISE, EXPTIME, SATURATE, SIMSEED and the drawn frame parameters.
    stars : Table
        One row per star (pattern): centre, per-channel spot positions, flux, mag, q, u.
    spots : Table
        One row per star spot and per artifact (the labels a classifier should learn).
    artifacts : Table
        One row per artifact: reflection streaks and ghosts, cosmic rays, dust donuts.
    sky : ndarray
        Noiseless sky (ADU, float32) including mask, vignetting and donuts.
    params : dict
        The frame-level parameters that were drawn (seeing, sky level, jitter, ...).
    """

    ccd: CCDData
    stars: Table
    spots: Table
    artifacts: Table
    sky: np.ndarray
    params: dict = field(default_factory=dict)


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width ``alpha`` (px) giving ``fwhm`` (px) for power ``beta``."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


# ---------------------------------------------------------------------------------
# Rendering helpers (vectorised over sources)
# ---------------------------------------------------------------------------------
def _grid(x: np.ndarray, y: np.ndarray, hx: int, hy: int):
    """Integer pixel grids of stamps centred on the pixels nearest ``(x, y)``."""
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    gx = ix[:, None, None] + np.arange(-hx, hx + 1)[None, None, :]
    gy = iy[:, None, None] + np.arange(-hy, hy + 1)[None, :, None]
    return gx, gy, gx - x[:, None, None], gy - y[:, None, None]


def _moffat(dx, dy, alpha: float, beta: float, ell: float, theta: float) -> np.ndarray:
    """Elliptical Moffat profile (unnormalised) on offset grids."""
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    a = alpha / math.sqrt(1.0 - ell)
    b = alpha * math.sqrt(1.0 - ell)
    return (1.0 + (u / a) ** 2 + (v / b) ** 2) ** (-beta)


def _normalise(stamps: np.ndarray) -> np.ndarray:
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


def _deposit(acc: np.ndarray, gx, gy, values: np.ndarray, shape) -> np.ndarray:
    """Add stamp ``values`` (n, ky, kx) at pixel grids into the flat ``acc``.

    Returns the part of each stamp's sum that fell inside the frame.
    """
    ny, nx = shape
    gx, gy = np.broadcast_arrays(gx, gy)
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    if inside.any():
        flat = gy[inside] * nx + gx[inside]
        acc += np.bincount(flat, weights=values[inside], minlength=ny * nx)
    return np.where(inside, values, 0.0).sum(axis=(1, 2))


def _truncated_exponential(rng, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm proportional to 10**(slope m) on [lo, hi]."""
    a = slope * math.log(10.0)
    u = rng.random(n)
    return lo + np.log1p(u * np.expm1(a * (hi - lo))) / a


def _sample(arr: np.ndarray, x, y) -> np.ndarray:
    """Nearest-pixel values of a 2-D array at (x, y), clipped into the array."""
    ny, nx = arr.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    return arr[iy, ix]


def _col(table: Table, name: str, unit: str | None, description: str) -> None:
    table[name].unit = unit
    table[name].description = description


# ---------------------------------------------------------------------------------
# The frame
# ---------------------------------------------------------------------------------
def simulate_frame(
    profile: str | os.PathLike | InstrumentProfile = "robopol",
    *,
    seed: int,
    n_stars: int | None = None,
    shape: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
    fwhm: float | None = None,
    beta: float | None = None,
    ellipticity: float | None = None,
    exptime: float = 120.0,
    sky: float | None = None,
    sky_range: tuple[float, float] = (30.0, 2000.0),
    n_artifact_sources: int | None = None,
    n_cosmic_rays: int | None = None,
    n_donuts: int | None = None,
    donut_contrast: tuple[float, float] = (0.01, 0.04),
    donut_radius: tuple[float, float] = (5.0, 15.0),
    donut_bright_fraction: float = 0.3,
    target: Mapping[str, float] | bool | None = None,
    include_bias: bool = False,
    noise: bool = True,
    saturate: bool = True,
    geometry_jitter: float | Mapping[str, tuple[float, float]] | None = None,
    mag_range: tuple[float, float] = (9.0, 19.5),
    count_slope: float = 0.3,
    zero_point: float = ZERO_POINT,
    pair_ratio_slope: float = 0.85,
    max_polarization: float = 0.04,
) -> SimulatedFrame:
    """Simulate one frame with truth tables.

    Parameters
    ----------
    profile : str, path or InstrumentProfile
        The instrument (``"robopol"`` by default).
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed and arguments give an
        identical frame and tables.
    n_stars : int, optional
        Number of field-star patterns whose centres fall in the frame (extended by the
        spot offsets, so partial patterns at the edges occur). By default a full-detector
        count is drawn uniformly in 150-900 and scaled by the frame's area.
    shape : (ny, nx), optional
        Image shape; the detector shape by default. A smaller frame is the detector
        region starting at ``origin``.
    origin : (x0, y0)
        Detector pixel of image pixel (0, 0).
    fwhm : float, optional
        Seeing FWHM (px); drawn uniformly in ``profile.fwhm_range`` by default.
    beta : float, optional
        Moffat power; drawn in 2.5-4 by default.
    ellipticity : float, optional
        PSF ellipticity ``1 - b/a``; drawn in 0-0.12 by default.
    exptime : float
        Exposure time (s).
    sky : float, optional
        Open-sky level (electron/px); by default drawn log-uniformly in ``sky_range``
        and scaled by ``exptime`` / 120 s.
    sky_range : (low, high)
        Range of the drawn sky level for 120 s (electron/px). The default spans dark
        frames like J1428 (its 8-bit rendering implies only ~30-80 e-/px) up to bright
        (moonlit) skies of ~2000 e-/px.
    n_artifact_sources : int, optional
        Number of reflection-artifact groups (an orphan pair or a single). By default
        most frames get some (about 5-6 artifacts per affected full frame).
    n_cosmic_rays, n_donuts : int, optional
        Counts of cosmic-ray hits and dust donuts (drawn by default).
    donut_contrast : (low, high)
        Range of the donuts' ring amplitude as a fraction of the local sky (drawn
        uniformly). The default 1-4 % mimics real flat-field residuals, which are
        almost never detected as spots; e.g. ``(0.5, 2.0)`` makes bright rings that
        are (for training a donut class).
    donut_radius : (low, high)
        Range of the ring radius (pix).
    donut_bright_fraction : float
        Fraction of donuts brighter than the sky (the others are darker).
    target : dict, bool or None
        The target at ``profile.target``: a dict with ``mag``, ``q``, ``u`` (missing
        keys drawn), ``None`` for a drawn target, ``False`` for none.
    include_bias : bool
        Add the profile's bias level.
    noise : bool
        Add Poisson and read noise (``False``: the noiseless expectation).
    saturate : bool
        Clip at ``profile.saturation`` ADU.
    geometry_jitter : float or dict, optional
        Frame-to-frame change of the spot geometry: a dict ``{channel: (dx, dy)}`` of
        constant offsets, or the size (px) of random per-channel shifts (drawn in
        1-2.5 px by default; 0 for the nominal geometry). Shifts have zero mean so the
        pattern centre stays the mean of the spots.
    mag_range : (bright, faint)
        Magnitude range of field stars.
    count_slope : float
        Slope of the number counts, dN/dm proportional to 10**(count_slope m).
    zero_point : float
        Magnitude of a source giving 1 e-/s (see the module docstring).
    pair_ratio_slope : float
        The u-pair / q-pair light ratio is ``exp(pair_ratio_slope * xn)``.
    max_polarization : float
        Largest fractional polarization of field stars.

    Returns
    -------
    SimulatedFrame
    """
    prof = load_profile(profile)
    rng = np.random.default_rng(seed)
    ny, nx = (int(n) for n in (shape if shape is not None else prof.shape))
    if ny < 16 or nx < 16:
        raise ValueError(f"simulated frame shape {(ny, nx)} is too small (need at least 16 x 16)")
    x0, y0 = (int(v) for v in origin)
    det_ny, det_nx = prof.shape
    area_frac = min(1.0, (nx * ny) / float(det_nx * det_ny))
    gain, rn = prof.gain, prof.read_noise
    channels = prof.channels
    nch = len(channels)
    params: dict[str, Any] = {"seed": int(seed), "shape": (ny, nx), "origin": (x0, y0)}

    # -- frame-level draws (fixed order for reproducibility) -----------------------
    fwhm = float(fwhm if fwhm is not None else rng.uniform(*prof.fwhm_range))
    beta = float(beta if beta is not None else rng.uniform(2.5, 4.0))
    ell = float(ellipticity if ellipticity is not None else rng.uniform(0.0, 0.12))
    psf_theta = float(rng.uniform(0.0, math.pi))
    alpha = moffat_alpha(fwhm, beta)
    sky_level = float(sky if sky is not None else math.exp(rng.uniform(*np.log(sky_range))) * exptime / 120.0)
    grad_amp = rng.uniform(0.0, 0.08)
    grad_ang = rng.uniform(0.0, 2 * math.pi)
    vig_depth = rng.uniform(0.45, 0.65)
    if n_stars is None:
        n_full = int(rng.integers(150, 901))
        n_stars = int(rng.binomial(n_full, area_frac)) if area_frac < 1 else n_full
    n_stars = int(n_stars)

    if isinstance(geometry_jitter, Mapping):
        shifts = {ch: tuple(map(float, geometry_jitter.get(ch, (0.0, 0.0)))) for ch in channels}
    else:
        size = rng.uniform(1.0, 2.5, nch) if geometry_jitter is None else np.full(nch, float(geometry_jitter))
        ang = rng.uniform(0.0, 2 * math.pi, nch)
        d = np.stack([size * np.cos(ang), size * np.sin(ang)], axis=1)
        d -= d.mean(axis=0)
        shifts = {ch: (float(d[i, 0]), float(d[i, 1])) for i, ch in enumerate(channels)}
    geometry = prof.geometry.shifted(shifts)
    params.update(fwhm=fwhm, beta=beta, ellipticity=ell, psf_theta=math.degrees(psf_theta),
                  sky=sky_level, exptime=exptime, geometry_shifts=shifts, n_stars=n_stars)

    # -- sky: gradient, vignetting, mask transmission --------------------------------
    yy = np.arange(ny, dtype=np.float32)[:, None] + y0
    xx = np.arange(nx, dtype=np.float32)[None, :] + x0
    cx, cy = (det_nx - 1) / 2.0, (det_ny - 1) / 2.0

    def vignetting(xd, yd):
        if prof.vignetting_radius is None:
            return np.ones(np.broadcast(xd, yd).shape, np.float32)
        r_in = 0.7 * float(prof.vignetting_radius)  # gentle start; steep beyond vignetting_radius
        r_corner = max(math.hypot(cx, cy), r_in + 1.0)
        r = np.sqrt((xd - cx) ** 2 + (yd - cy) ** 2)
        t = np.clip((r - r_in) / (r_corner - r_in), 0.0, None)
        return np.clip(1.0 - vig_depth * t ** 2, 0.2, 1.0).astype(np.float32)

    gx_ = (xx - cx) / max(det_nx, det_ny)
    gy_ = (yy - cy) / max(det_nx, det_ny)
    plane = 1.0 + grad_amp * (math.cos(grad_ang) * gx_ + math.sin(grad_ang) * gy_)
    trans = prof.transmission((y0 + ny, x0 + nx))[y0:, x0:] if (x0 or y0) else prof.transmission((ny, nx))
    sky_e = (sky_level * plane * vignetting(xx, yy) * trans).astype(np.float64)

    # -- stars ----------------------------------------------------------------------
    # largest spot offset over the frame (corners and centre, detector coordinates)
    cxs = np.array([x0, x0 + nx - 1, x0, x0 + nx - 1, x0 + nx / 2], float)
    cys = np.array([y0, y0, y0 + ny - 1, y0 + ny - 1, y0 + ny / 2], float)
    off = float(np.abs(geometry.offset_array(cxs, cys)).max())
    margin = float(off) + 10.0
    xs = rng.uniform(-margin, nx - 1 + margin, n_stars)
    ys = rng.uniform(-margin, ny - 1 + margin, n_stars)
    mags = _truncated_exponential(rng, n_stars, mag_range[0], mag_range[1], count_slope)
    # a few close doubles: the companion repeats in all spots
    n_dbl = int(rng.binomial(n_stars, 0.04)) if n_stars > 1 else 0
    if n_dbl:
        comp = rng.choice(n_stars, n_dbl, replace=False)
        prim = rng.integers(0, n_stars, n_dbl)
        prim = np.where(prim == comp, (prim + 1) % n_stars, prim)
        r = rng.uniform(3.0, 12.0, n_dbl)
        a = rng.uniform(0, 2 * math.pi, n_dbl)
        xs[comp] = xs[prim] + r * np.cos(a)
        ys[comp] = ys[prim] + r * np.sin(a)
    p = np.minimum(np.abs(rng.normal(0.0, max_polarization / 3.0, n_stars)), max_polarization)
    chi = rng.uniform(0.0, math.pi, n_stars)
    qs, us = p * np.cos(2 * chi), p * np.sin(2 * chi)
    is_target = np.zeros(n_stars, bool)
    if target is not False and prof.target is not None:
        tdict = dict(target) if isinstance(target, Mapping) else {}
        t_mag = float(tdict.get("mag", rng.uniform(11.0, 16.0)))
        t_p = rng.uniform(0.0, 0.08)
        t_chi = rng.uniform(0.0, math.pi)
        t_q = float(tdict.get("q", t_p * math.cos(2 * t_chi)))
        t_u = float(tdict.get("u", t_p * math.sin(2 * t_chi)))
        xs = np.append(xs, prof.target[0] - x0)
        ys = np.append(ys, prof.target[1] - y0)
        mags, qs, us = np.append(mags, t_mag), np.append(qs, t_q), np.append(us, t_u)
        is_target = np.append(is_target, True)
    ns = len(xs)

    xd, yd = xs + x0, ys + y0
    q_inst, u_inst = prof.instrumental_qu(xd, yd)
    d2 = math.radians(2.0 * prof.angle_zero)
    q_obs = qs * math.cos(d2) + us * math.sin(d2) + q_inst
    u_obs = -qs * math.sin(d2) + us * math.cos(d2) + u_inst
    flux = exptime * 10.0 ** (-0.4 * (mags - zero_point)) * vignetting(xd, yd)
    xn = (xd - geometry.center[0]) / geometry.scale
    ratio = np.exp(pair_ratio_slope * xn)  # u-pair / q-pair
    i_u = flux * ratio / (1.0 + ratio)
    i_q = flux - i_u
    (c0, c90), (c45, c135) = prof.q_channels, prof.u_channels
    spot_flux = {c0: i_q / 2 * (1 + q_obs), c90: i_q / 2 * (1 - q_obs),
                 c45: i_u / 2 * (1 + u_obs), c135: i_u / 2 * (1 - u_obs)}
    pos = geometry.spot_positions(xd, yd)
    sx = np.stack([pos[ch][0] - x0 for ch in channels])  # (nch, ns)
    sy = np.stack([pos[ch][1] - y0 for ch in channels])
    sf = np.stack([spot_flux[ch] for ch in channels])

    acc = np.zeros(ny * nx)
    f_in = np.zeros(sf.size)
    s_peak = np.zeros(sf.size)
    fx, fy, ff = sx.ravel(), sy.ravel(), sf.ravel()
    # peak estimate for the stamp size: Moffat peak fraction ~ (beta-1)/(pi alpha^2)
    peak_est = ff * (beta - 1) / (math.pi * alpha ** 2)
    r_need = alpha * np.maximum(peak_est / 2.0, 1.0) ** (1.0 / (2 * beta))
    tier = np.searchsorted(np.asarray(_STAMP_TIERS), r_need).clip(0, len(_STAMP_TIERS) - 1)
    onish = (fx > -_STAMP_TIERS[-1]) & (fx < nx + _STAMP_TIERS[-1]) & \
            (fy > -_STAMP_TIERS[-1]) & (fy < ny + _STAMP_TIERS[-1])
    for k, half in enumerate(_STAMP_TIERS):
        sel = np.flatnonzero((tier == k) & onish)
        for chunk in np.array_split(sel, max(1, len(sel) * (2 * half + 1) ** 2 // 4_000_000 + 1)):
            if not len(chunk):
                continue
            gx, gy, dx, dy = _grid(fx[chunk], fy[chunk], half, half)
            w = _normalise(_moffat(dx, dy, alpha, beta, ell, psf_theta))
            vals = w * ff[chunk, None, None]
            f_in[chunk] = _deposit(acc, gx, gy, vals, (ny, nx))
            s_peak[chunk] = vals.max(axis=(1, 2))
    f_in = f_in.reshape(nch, ns)
    s_peak = s_peak.reshape(nch, ns)

    in_frame = (sx >= 0) & (sx <= nx - 1) & (sy >= 0) & (sy <= ny - 1)
    usable_shape = (max(det_ny, y0 + ny), max(det_nx, x0 + nx))
    usable = prof.usable(xd, yd, usable_shape)
    sky_at_spots = _sample(sky_e.reshape(ny, nx), sx, sy)
    sat_level = prof.saturation * gain
    spot_sat = in_frame & (s_peak + sky_at_spots > sat_level)

    # -- reflection artifacts -----------------------------------------------------------
    art_rows: list[dict] = []
    if n_artifact_sources is None:
        n_groups = 1 + int(rng.poisson(2.3)) if rng.random() < 0.8 else 0
        if area_frac < 1:
            n_groups = int(rng.binomial(n_groups, area_frac))
    else:
        n_groups = int(n_artifact_sources)
    star_flux_w = flux[~is_target] ** 1.5 if (~is_target).any() else None
    field_ids = np.flatnonzero(~is_target)
    pairs = (prof.q_channels, prof.u_channels)
    pair_id = 0
    for _ in range(n_groups):
        kind = "streak" if rng.random() < 0.7 else "ghost"
        is_pair = rng.random() < 0.65
        which = int(rng.integers(0, 2))
        parent = -1
        if star_flux_w is not None and star_flux_w.sum() > 0:
            parent = int(rng.choice(field_ids, p=star_flux_w / star_flux_w.sum()))
        if rng.random() < 0.2 and len(field_ids):  # beside or on a real pattern
            other = int(rng.choice(field_ids))
            vx = xs[other] + rng.normal(0, 25)
            vy = ys[other] + rng.normal(0, 25)
        elif parent >= 0:
            r = rng.uniform(80.0, 700.0)
            a = rng.uniform(0, 2 * math.pi)
            vx, vy = xs[parent] + r * math.cos(a), ys[parent] + r * math.sin(a)
        else:
            vx, vy = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        # keep the members on the frame (a pair's members sit ~off px from its centre)
        mx_, my_ = (min(off + 8.0, (nx - 1) / 2), min(off + 8.0, (ny - 1) / 2)) if is_pair else (20.0, 20.0)
        vx = float(np.clip(vx, mx_, nx - 1 - mx_))
        vy = float(np.clip(vy, my_, ny - 1 - my_))
        chs = pairs[which]
        p_v = geometry.spot_positions(vx + x0, vy + y0)
        if is_pair:
            members = [(float(p_v[ch][0]) - x0, float(p_v[ch][1]) - y0) for ch in chs]
            pid, mimics = pair_id, ",".join(chs)
            pair_id += 1
        else:
            members = [(vx, vy)]
            pid, mimics = -1, ""
        # peak S/N: many faint (the hard cases), most moderate, a few up to saturation
        u_b = rng.random()
        faint = u_b < 0.4
        if faint:
            snr0 = rng.uniform(3.0, 8.0)
        elif u_b < 0.85:
            snr0 = math.exp(rng.uniform(math.log(8.0), math.log(100.0)))
        else:
            snr0 = math.exp(rng.uniform(math.log(100.0), math.log(1.0e4)))
        width0 = float(np.clip(fwhm * math.exp(rng.normal(0.05, 0.15)), 3.0, 8.0))
        length0 = rng.uniform(15.0, 50.0)
        tail_dir = -1 if rng.random() < 0.7 else 1
        for mx, my in members:
            art_rows.append(dict(
                kind=kind, x=mx, y=my, parent=parent, pair_id=pid, mimics=mimics,
                snr_target=snr0 * math.exp(rng.normal(0.0, 0.25)),
                width=float(np.clip(width0 * math.exp(rng.normal(0, 0.05)), 3.0, 8.0)),
                length=length0 * math.exp(rng.normal(0, 0.1)),
                tail_dir=tail_dir, tail_amp=rng.uniform(0.15, 0.5),
                no_tail=(faint and rng.random() < 0.7) or kind == "ghost",
                ghost_fwhm=fwhm * rng.uniform(1.0, 1.5), ghost_q=rng.uniform(1.0, 1.3),
            ))

    hx, hy = 64, 20
    sky2d = sky_e.reshape(ny, nx)
    art_table_rows = []
    if art_rows:
        ax_ = np.array([r["x"] for r in art_rows])
        ay_ = np.array([r["y"] for r in art_rows])
        gx, gy, dx, dy = _grid(ax_, ay_, hx, hy)
        stamps = np.empty(dx.shape[:1] + (2 * hy + 1, 2 * hx + 1))
        along_x = np.linspace(-hx, hx, 8 * (2 * hx) + 1)
        meta = []
        for i, r in enumerate(art_rows):
            ddx, ddy = np.broadcast_arrays(dx[i], dy[i])
            if r["kind"] == "ghost":
                ga = moffat_alpha(r["ghost_fwhm"], 3.0)
                e = 1.0 - 1.0 / r["ghost_q"]
                st = _moffat(ddx, ddy, ga, 3.0, e, 0.0)
                prof1d = (1.0 + (along_x / (ga / math.sqrt(1 - e))) ** 2) ** -3.0
                width = 2 * ga * math.sqrt(1 - e) * math.sqrt(2 ** (1 / 3.0) - 1)
                tail_dir = 0
            else:
                sv = r["width"] / 2.3548
                if r["no_tail"]:
                    sh = sv * rng.uniform(1.1, 1.8)
                    t, tau, tail_dir = 0.0, 1.0, 0
                else:
                    sh = sv * rng.uniform(1.2, 2.0)
                    t = r["tail_amp"]
                    tail_dir = r["tail_dir"]
                    tau = max((r["length"] - 2.65 * sh) / math.log(t / 0.03), 1.5)

                def along(u, sh=sh, t=t, tau=tau):
                    core = np.exp(-0.5 * (u / sh) ** 2)
                    tail = t * np.exp(-np.clip(u, 0, None) / tau) * (1 - np.exp(-0.5 * (np.clip(u, 0, None) / sh) ** 2))
                    return core + tail

                u = ddx * (tail_dir or 1)
                st = along(u) * np.exp(-0.5 * (ddy / sv) ** 2)
                prof1d = along(along_x * (tail_dir or 1))
                width = r["width"]
            stamps[i] = st / st.sum()
            # truth morphology from the noiseless along-x profile through the peak
            k = int(np.argmax(prof1d))
            above = along_x[prof1d >= 0.03 * prof1d[k]]
            meta.append((along_x[k], float(above.max() - above.min()), float(above.mean()) if len(above) else 0.0,
                         width, tail_dir))
        noise_at = _sample(np.sqrt(sky2d + rn ** 2), ax_, ay_)
        peaks = noise_at * np.array([r["snr_target"] for r in art_rows])
        fluxes = peaks / stamps.max(axis=(1, 2))
        a_in = _deposit(acc, gx, gy, stamps * fluxes[:, None, None], (ny, nx))
        for i, r in enumerate(art_rows):
            xk, length, xmid, width, tdir = meta[i]
            peak_x = r["x"] + xk
            art_table_rows.append(dict(
                kind=r["kind"], x=peak_x, y=r["y"], x_center=r["x"] + (xmid if length else 0.0),
                length=length, width=width, flux=fluxes[i], flux_in_frame=a_in[i], peak=peaks[i],
                snr_peak=r["snr_target"], parent=r["parent"], pair_id=r["pair_id"],
                mimics=r["mimics"], tail_dir=tdir,
            ))

    # -- dust donuts (flat-field residual rings in the sky) ------------------------------
    n_don = int(n_donuts) if n_donuts is not None else int(rng.poisson(2.0 * area_frac))
    for _ in range(n_don):
        dxc, dyc = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        rad = rng.uniform(*donut_radius)
        wid = rng.uniform(1.5, 3.5)
        amp = rng.uniform(*donut_contrast) * (-1 if rng.random() < 1.0 - donut_bright_fraction else 1)
        h = int(rad + 4 * wid) + 1
        gx, gy, dx, dy = _grid(np.array([dxc]), np.array([dyc]), h, h)
        ring = np.exp(-0.5 * ((np.hypot(dx, dy) - rad) / wid) ** 2)
        local = float(_sample(sky2d, dxc, dyc))
        vals = ring * amp * local
        sky_ring = np.zeros(ny * nx)
        d_in = _deposit(sky_ring, gx, gy, vals, (ny, nx))  # part of the sky map
        sky_e += sky_ring.reshape(ny, nx)
        art_table_rows.append(dict(
            kind="donut", x=dxc, y=dyc, x_center=dxc, length=2 * (rad + wid), width=2 * (rad + wid),
            flux=float(vals.sum()), flux_in_frame=float(d_in[0]), peak=amp * local,
            snr_peak=abs(amp) * local / math.sqrt(local + rn ** 2), parent=-1, pair_id=-1,
            mimics="", tail_dir=0,
        ))

    # -- cosmic rays (charge deposits; not photons) ----------------------------------
    n_cr = int(n_cosmic_rays) if n_cosmic_rays is not None else int(rng.poisson(10.0 * exptime / 120.0 * area_frac))
    cr = np.zeros(ny * nx)
    for _ in range(n_cr):
        e_peak = math.exp(rng.uniform(math.log(400.0), math.log(40000.0)))
        if rng.random() < 0.7:  # compact hit, 1-4 px
            npx = int(rng.integers(1, 5))
            cxp, cyp = int(rng.integers(0, nx)), int(rng.integers(0, ny))
            nb = [(0, 0)] + [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1)][: npx - 1]
            order = rng.permutation(len(nb) - 1)[: npx - 1] + 1 if npx > 1 else np.array([], int)
            px = np.array([cxp + nb[0][0]] + [cxp + nb[j][0] for j in order])
            py = np.array([cyp + nb[0][1]] + [cyp + nb[j][1] for j in order])
            vals = np.concatenate([[e_peak], e_peak * rng.uniform(0.2, 0.8, npx - 1)])
            length = float(np.ptp(px) + 1)
            width = float(np.ptp(py) + 1)
        else:  # short track
            length = rng.uniform(3.0, 15.0)
            ang = rng.uniform(0, math.pi)
            cxp, cyp = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
            tt = np.linspace(-length / 2, length / 2, int(length * 2) + 1)
            ptx, pty = cxp + tt * math.cos(ang), cyp + tt * math.sin(ang)
            fx0, fy0 = np.floor(ptx).astype(int), np.floor(pty).astype(int)
            wx, wy = ptx - fx0, pty - fy0
            px = np.concatenate([fx0, fx0 + 1, fx0, fx0 + 1])
            py = np.concatenate([fy0, fy0, fy0 + 1, fy0 + 1])
            vals = np.concatenate([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy])
            vals = vals * e_peak / 2.0 * rng.uniform(0.7, 1.3, vals.size)
            width = 1.0
        keep = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        if keep.any():
            np.add.at(cr, py[keep] * nx + px[keep], vals[keep])
        # brightest pixel as the position
        tmp: dict[tuple[int, int], float] = {}
        for a_, b_, v_ in zip(px.tolist(), py.tolist(), vals.tolist()):
            tmp[(a_, b_)] = tmp.get((a_, b_), 0.0) + v_
        (bx, by), bv = max(tmp.items(), key=lambda kv: kv[1])
        art_table_rows.append(dict(
            kind="cosmic_ray", x=float(bx), y=float(by), x_center=float(np.mean(px)), length=float(length),
            width=float(width), flux=float(vals.sum()), flux_in_frame=float(vals[keep].sum()), peak=float(bv),
            snr_peak=float(bv / math.sqrt(float(_sample(sky2d, bx, by)) + rn ** 2)), parent=-1, pair_id=-1,
            mimics="", tail_dir=0,
        ))

    # -- the image ----------------------------------------------------------------------
    model = sky_e + acc.reshape(ny, nx)
    if noise:
        img = rng.poisson(np.clip(model, 0, None)).astype(np.float64)
        img += cr.reshape(ny, nx)
        img += rng.normal(0.0, rn, (ny, nx))
    else:
        img = model + cr.reshape(ny, nx)
    img /= gain
    if saturate:
        np.minimum(img, prof.saturation, out=img)
    if include_bias:
        img += prof.bias
    data = img.astype(np.float32)

    # -- truth tables ---------------------------------------------------------------------
    star_ids = np.arange(ns)
    stars = Table()
    stars["star_id"] = star_ids
    stars["x"] = sx.mean(axis=0)
    stars["y"] = sy.mean(axis=0)
    for i, ch in enumerate(channels):
        stars[f"x_{ch}"] = sx[i]
        stars[f"y_{ch}"] = sy[i]
    stars["flux"] = sf.sum(axis=0)
    stars["mag"] = mags
    stars["q"] = qs
    stars["u"] = us
    stars["q_obs"] = q_obs
    stars["u_obs"] = u_obs
    stars["n_in_frame"] = in_frame.sum(axis=0)
    stars["complete"] = in_frame.all(axis=0) & usable
    stars["saturated"] = spot_sat.any(axis=0)
    stars["is_target"] = is_target
    _col(stars, "star_id", None, "star number (row index)")
    _col(stars, "x", "pix", "pattern centre x = mean of the spot x positions (0-based)")
    _col(stars, "y", "pix", "pattern centre y = mean of the spot y positions (0-based)")
    for ch in channels:
        _col(stars, f"x_{ch}", "pix", f"x of the {ch} spot")
        _col(stars, f"y_{ch}", "pix", f"y of the {ch} spot")
    _col(stars, "flux", "electron", "total electrons over all spots (after vignetting)")
    _col(stars, "mag", "mag", f"instrumental magnitude; {zero_point} = 1 e-/s over all spots")
    _col(stars, "q", None, "true Stokes q (sky frame)")
    _col(stars, "u", None, "true Stokes u (sky frame)")
    _col(stars, "q_obs", None, "q in the spot fluxes: rotated by -angle_zero plus instrumental q")
    _col(stars, "u_obs", None, "u in the spot fluxes: rotated by -angle_zero plus instrumental u")
    _col(stars, "n_in_frame", None, "number of spots whose centre lies in the frame")
    _col(stars, "complete", None, "all spots in the frame and the centre in the usable region")
    _col(stars, "saturated", None, "a spot's peak exceeds the saturation level")
    _col(stars, "is_target", None, "the central target")

    n_art = len(art_table_rows)
    artifacts = Table()
    artifacts["artifact_id"] = np.arange(n_art, dtype=np.int64)
    for name, dtype in (("kind", "U10"), ("x", float), ("y", float), ("x_center", float), ("length", float),
                        ("width", float), ("flux", float), ("flux_in_frame", float), ("peak", float),
                        ("snr_peak", float), ("parent", np.int64), ("pair_id", np.int64), ("mimics", "U40"),
                        ("tail_dir", np.int64)):
        artifacts[name] = np.array([r[name] for r in art_table_rows], dtype=dtype) if n_art else \
            np.zeros(0, dtype=dtype)
    a_in_frame = (artifacts["x"] >= 0) & (artifacts["x"] <= nx - 1) & (artifacts["y"] >= 0) & \
                 (artifacts["y"] <= ny - 1)
    a_sat = np.zeros(n_art, bool)
    if n_art:
        a_sky = _sample(sky_e, artifacts["x"], artifacts["y"])
        a_sat = (artifacts["kind"] != "donut") & (artifacts["peak"] + a_sky > sat_level) & a_in_frame
    artifacts["saturated"] = a_sat
    _col(artifacts, "artifact_id", None, "artifact number (row index)")
    _col(artifacts, "kind", None, "streak (reflection with head and tail), ghost (compact reflection), "
                                  "cosmic_ray, donut (dust ring in the sky)")
    _col(artifacts, "x", "pix", "x of the brightest point (donut: ring centre)")
    _col(artifacts, "y", "pix", "y of the brightest point")
    _col(artifacts, "x_center", "pix", "centre of the horizontal extent")
    _col(artifacts, "length", "pix", "horizontal extent above 3% of the peak (noiseless model)")
    _col(artifacts, "width", "pix", "vertical FWHM (cosmic ray: pixel extent; donut: outer diameter)")
    _col(artifacts, "flux", "electron", "injected electrons (donut: change of the sky, may be negative)")
    _col(artifacts, "flux_in_frame", "electron", "part of flux that falls inside the frame")
    _col(artifacts, "peak", "electron", "peak pixel above sky (noiseless)")
    _col(artifacts, "snr_peak", None, "peak / sky noise per pixel")
    _col(artifacts, "parent", None, "star_id of the star whose reflection it is (-1: none)")
    _col(artifacts, "pair_id", None, "orphan pair id shared by both members (-1: single)")
    _col(artifacts, "mimics", None, "channels of the spot pair an orphan pair is laid out like")
    _col(artifacts, "tail_dir", None, "direction of a streak's tail along x (+1/-1; 0: none)")
    _col(artifacts, "saturated", None, "peak exceeds the saturation level")

    nsp = nch * ns
    spots = Table()
    spots["x"] = np.concatenate([sx.T.ravel(), np.asarray(artifacts["x"], float)])
    spots["y"] = np.concatenate([sy.T.ravel(), np.asarray(artifacts["y"], float)])
    spots["star_id"] = np.concatenate([np.repeat(star_ids, nch), np.full(n_art, -1)]).astype(np.int64)
    spots["channel"] = np.concatenate([np.tile(np.array(channels, dtype="U16"), ns),
                                       np.full(n_art, "", dtype="U16")])
    spots["flux"] = np.concatenate([sf.T.ravel(), np.asarray(artifacts["flux"], float)])
    spots["flux_in_frame"] = np.concatenate([f_in.T.ravel(), np.asarray(artifacts["flux_in_frame"], float)])
    spots["peak"] = np.concatenate([s_peak.T.ravel(), np.asarray(artifacts["peak"], float)])
    spots["is_artifact"] = np.concatenate([np.zeros(nsp, bool), np.ones(n_art, bool)])
    spots["artifact_id"] = np.concatenate([np.full(nsp, -1), np.arange(n_art)]).astype(np.int64)
    spots["kind"] = np.concatenate([np.full(nsp, "star", dtype="U10"), np.asarray(artifacts["kind"], "U10")])
    spots["in_frame"] = np.concatenate([in_frame.T.ravel(), np.asarray(a_in_frame, bool)])
    spots["saturated"] = np.concatenate([spot_sat.T.ravel(), a_sat])
    _col(spots, "x", "pix", "spot centre x (artifacts: brightest point)")
    _col(spots, "y", "pix", "spot centre y")
    _col(spots, "star_id", None, "star the spot belongs to (-1: artifact)")
    _col(spots, "channel", None, "analyser channel ('' for artifacts)")
    _col(spots, "flux", "electron", "injected electrons")
    _col(spots, "flux_in_frame", "electron", "part of flux inside the frame")
    _col(spots, "peak", "electron", "peak pixel above sky (noiseless)")
    _col(spots, "is_artifact", None, "not a star spot")
    _col(spots, "artifact_id", None, "row of the artifacts table (-1: star spot)")
    _col(spots, "kind", None, "star, streak, ghost, cosmic_ray or donut")
    _col(spots, "in_frame", None, "the position lies inside the frame")
    _col(spots, "saturated", None, "peak exceeds the saturation level")

    # -- header ---------------------------------------------------------------------------
    hdr = fits.Header()
    hdr["OBJECT"] = ("SIMULATED", "robopol_clean.simulate")
    hdr["INSTRUME"] = prof.name
    hdr["BUNIT"] = "adu"
    hdr["GAIN"] = (gain, "e-/ADU")
    hdr["RDNOISE"] = (rn, "read noise (e-)")
    hdr["EXPTIME"] = (float(exptime), "s")
    hdr["SATURATE"] = (prof.saturation + (prof.bias if include_bias else 0.0), "ADU, clip level" if saturate
                       else "ADU (not clipped)")
    hdr["BIASSUB"] = (not include_bias, "bias subtracted")
    hdr["BIAS"] = (prof.bias, "ADU, detector bias of the profile")
    hdr["SIMSEED"] = (int(seed), "numpy default_rng seed")
    hdr["SIMVER"] = (SIM_VERSION, "simulation model version")
    hdr["SIMNOISE"] = (bool(noise), "Poisson and read noise added")
    hdr["DETX0"] = (x0, "detector x of image pixel 0 (0-based)")
    hdr["DETY0"] = (y0, "detector y of image pixel 0 (0-based)")
    hdr["LTV1"] = (-x0, "IRAF image = detector + LTV")
    hdr["LTV2"] = (-y0, "IRAF image = detector + LTV")
    hdr["FWHM"] = (round(fwhm, 4), "PSF FWHM (px)")
    hdr["MOFBETA"] = (round(beta, 4), "Moffat beta")
    hdr["PSFELL"] = (round(ell, 4), "PSF ellipticity 1-b/a")
    hdr["SKYLEVEL"] = (round(sky_level, 3), "open-sky level (e-/px)")
    hdr["ZEROPT"] = (zero_point, "mag giving 1 e-/s over all spots")
    hdr["NSTARS"] = (int(ns), "stars incl. target")
    hdr["NARTIF"] = (int(n_art), "artifacts (all kinds)")
    for i, ch in enumerate(channels):
        hdr[f"GEODX{i + 1}"] = (round(shifts[ch][0], 4), f"geometry shift of {ch} (px)")
        hdr[f"GEODY{i + 1}"] = (round(shifts[ch][1], 4), f"geometry shift of {ch} (px)")
    ccd = CCDData(data, unit="adu", meta=hdr)
    sky_adu = (sky_e / gain).astype(np.float32)
    for t in (stars, spots, artifacts):
        t.meta.update({"simseed": int(seed), "instrument": prof.name, "coords": "0-based image pixels (FITS)",
                       "zero_point": zero_point})
    return SimulatedFrame(ccd=ccd, stars=stars, spots=spots, artifacts=artifacts, sky=sky_adu, params=params)


# ---------------------------------------------------------------------------------
# Many frames on disk
# ---------------------------------------------------------------------------------
def frame_seeds(seed: int, n_frames: int) -> list[int]:
    """Independent per-frame seeds derived from one seed."""
    return [int(s.generate_state(1, np.uint32)[0]) for s in np.random.SeedSequence(seed).spawn(n_frames)]


def simulate_frames(
    outdir: str | os.PathLike,
    n_frames: int,
    seed: int,
    profile: str | os.PathLike | InstrumentProfile = "robopol",
    *,
    prefix: str = "sim",
    overwrite: bool = False,
    callback: Callable[[Path, SimulatedFrame], object] | None = None,
    **kw,
) -> list[Path]:
    """Simulate frames and write them with their truth tables.

    Writes ``<prefix>_0000.fits`` and ``<prefix>_0000_{stars,spots,artifacts}.ecsv`` for
    each frame, each through a temporary file in ``outdir`` moved into place. Frame
    seeds are derived from ``seed`` (see :func:`frame_seeds`) and kept in SIMSEED.

    Parameters
    ----------
    outdir : path
        Output folder (created if needed).
    n_frames : int
        Number of frames.
    seed : int
        Master seed.
    profile : str, path or InstrumentProfile
        The instrument.
    prefix : str
        File name prefix.
    overwrite : bool
        Replace existing files (otherwise an existing file is an error).
    callback : callable, optional
        Called as ``callback(fits_path, frame)`` after each frame is written.
    **kw
        Passed to :func:`simulate_frame`.

    Returns
    -------
    list of Path
        The FITS files written.
    """
    from .io import check_writable, write_atomic

    prof = load_profile(profile)
    outdir = check_writable(outdir)
    written = []
    for i, fseed in enumerate(frame_seeds(seed, n_frames)):
        sim = simulate_frame(prof, seed=fseed, **kw)
        stem = outdir / f"{prefix}_{i:04d}"
        hdu = fits.PrimaryHDU(sim.ccd.data, header=sim.ccd.header)
        write_atomic(stem.with_suffix(".fits"), lambda p, h=hdu: h.writeto(p, overwrite=True), overwrite=overwrite)
        for name, table in (("stars", sim.stars), ("spots", sim.spots), ("artifacts", sim.artifacts)):
            write_atomic(outdir / f"{stem.name}_{name}.ecsv",
                         lambda p, t=table: t.write(p, format="ascii.ecsv", overwrite=True), overwrite=overwrite)
        written.append(stem.with_suffix(".fits"))
        if callback is not None:
            callback(written[-1], sim)
        log.info("wrote %s (%d stars, %d artifacts)", stem.with_suffix(".fits"), len(sim.stars), len(sim.artifacts))
    return written
