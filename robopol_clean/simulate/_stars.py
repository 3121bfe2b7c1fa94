"""Field stars: the PSF, the spot geometry, positions, magnitudes, polarization and spots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..instrument import InstrumentProfile, SpotGeometry
from ._render import deposit, grid, inside, moffat, moffat_alpha, normalise, sample
from ._sky import vignetting

# Stamp half-sizes (px) used for the PSF, chosen per spot by brightness.
_STAMP_TIERS = (10, 16, 28, 48, 80)


@dataclass(frozen=True)
class MoffatPSF:
    """The frame's PSF, the same everywhere.

    Attributes
    ----------
    fwhm : float
        FWHM (px), the geometric mean of the major and minor axes' FWHM.
    beta : float
        Moffat power.
    ellipticity : float
        ``1 - b/a``.
    theta : float
        Position angle of the major axis (rad, from +x towards +y).
    """

    fwhm: float
    beta: float
    ellipticity: float
    theta: float

    @property
    def alpha(self) -> float:
        """Moffat core width (px)."""
        return moffat_alpha(self.fwhm, self.beta)


@dataclass(frozen=True)
class StarField:
    """The stars of one frame and their spots.

    Per-star arrays have shape (n_stars,); per-spot arrays (n_channels, n_stars), channels
    in profile order. Positions are 0-based image pixels, fluxes electrons.

    Attributes
    ----------
    x, y : ndarray
        Pattern centres (px).
    mag : ndarray
        Instrumental magnitudes.
    q, u : ndarray
        True Stokes q and u (sky frame).
    q_obs, u_obs : ndarray
        q and u put into the spot fluxes (inverse of the profile's calibration).
    flux : ndarray
        Electrons over all spots, after vignetting.
    is_target : ndarray
        The central target (bool).
    usable : ndarray
        The centre lies in the profile's usable region (bool).
    spot_x, spot_y : ndarray
        Spot centres (px).
    spot_flux : ndarray
        Spot electrons.
    flux_in_frame : ndarray
        Part of ``spot_flux`` rendered inside the frame (electron).
    peak : ndarray
        Peak pixel of the noiseless spot above sky (electron).
    in_frame : ndarray
        The spot centre lies inside the frame (bool).
    saturated : ndarray
        Spot peak plus sky exceed the saturation level (bool).
    """

    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    q: np.ndarray
    u: np.ndarray
    q_obs: np.ndarray
    u_obs: np.ndarray
    flux: np.ndarray
    is_target: np.ndarray
    usable: np.ndarray
    spot_x: np.ndarray
    spot_y: np.ndarray
    spot_flux: np.ndarray
    flux_in_frame: np.ndarray
    peak: np.ndarray
    in_frame: np.ndarray
    saturated: np.ndarray


def draw_psf(rng: np.random.Generator, prof: InstrumentProfile, fwhm: float | None,
             beta: float | None, ellipticity: float | None) -> MoffatPSF:
    """Draw the PSF parameters not given (see :func:`~robopol_clean.simulate.simulate_frame`).

    FWHM (px) uniform in ``prof.fwhm_range``, power in 2.5-4, ellipticity in 0-0.12; the
    position angle (rad) is always drawn.
    """
    fwhm = float(fwhm if fwhm is not None else rng.uniform(*prof.fwhm_range))
    beta = float(beta if beta is not None else rng.uniform(2.5, 4.0))
    ell = float(ellipticity if ellipticity is not None else rng.uniform(0.0, 0.12))
    return MoffatPSF(fwhm=fwhm, beta=beta, ellipticity=ell, theta=float(rng.uniform(0.0, math.pi)))


def draw_star_count(rng: np.random.Generator, n_stars: int | None, area_frac: float) -> int:
    """Number of field stars: ``n_stars``, or 150-900 per detector scaled by the frame's area."""
    if n_stars is None:
        n_full = int(rng.integers(150, 901))
        n_stars = int(rng.binomial(n_full, area_frac)) if area_frac < 1 else n_full
    return int(n_stars)


def draw_geometry(rng: np.random.Generator, prof: InstrumentProfile,
                  jitter: float | Mapping[str, tuple[float, float]] | None,
                  ) -> tuple[SpotGeometry, dict[str, tuple[float, float]]]:
    """The frame's spot geometry: the profile's, with each channel shifted.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    prof : InstrumentProfile
        The instrument.
    jitter : float, dict or None
        ``{channel: (dx, dy)}`` constant shifts (px), or the size (px) of random shifts
        (``None``: drawn in 1-2.5 px per channel). Random shifts have zero mean.

    Returns
    -------
    geometry : SpotGeometry
        The shifted geometry.
    shifts : dict
        ``{channel: (dx, dy)}`` (px) applied.
    """
    channels = prof.channels
    if isinstance(jitter, Mapping):
        shifts = {ch: tuple(map(float, jitter.get(ch, (0.0, 0.0)))) for ch in channels}
    else:
        nch = len(channels)
        size = rng.uniform(1.0, 2.5, nch) if jitter is None else np.full(nch, float(jitter))
        ang = rng.uniform(0.0, 2 * math.pi, nch)
        d = np.stack([size * np.cos(ang), size * np.sin(ang)], axis=1)
        d -= d.mean(axis=0)
        shifts = {ch: (float(d[i, 0]), float(d[i, 1])) for i, ch in enumerate(channels)}
    return prof.geometry.shifted(shifts), shifts


def max_spot_offset(geometry: SpotGeometry, shape: tuple[int, int],
                    origin: tuple[int, int]) -> float:
    """Largest spot offset (px, either axis) at the frame's corners and centre."""
    ny, nx = shape
    x0, y0 = origin
    cxs = np.array([x0, x0 + nx - 1, x0, x0 + nx - 1, x0 + nx / 2], float)
    cys = np.array([y0, y0, y0 + ny - 1, y0 + ny - 1, y0 + ny / 2], float)
    return float(np.abs(geometry.offset_array(cxs, cys)).max())


def _truncated_exponential(rng, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm proportional to 10**(slope m) on [lo, hi]."""
    a = slope * math.log(10.0)
    u = rng.random(n)
    return lo + np.log1p(u * np.expm1(a * (hi - lo))) / a


def _draw_stars(rng, prof, n_stars, shape, origin, margin, target, mag_range, count_slope,
                max_polarization):
    """Centres (image px), magnitudes, true q and u, and the target flag of the stars."""
    ny, nx = shape
    x0, y0 = origin
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
        given = dict(target) if isinstance(target, Mapping) else {}
        # magnitude, p and angle are drawn even when given: giving them leaves later draws alone
        t_mag = float(given.get("mag", rng.uniform(11.0, 16.0)))
        t_p = rng.uniform(0.0, 0.08)
        t_chi = rng.uniform(0.0, math.pi)
        t_q = float(given.get("q", t_p * math.cos(2 * t_chi)))
        t_u = float(given.get("u", t_p * math.sin(2 * t_chi)))
        xs = np.append(xs, prof.target[0] - x0)
        ys = np.append(ys, prof.target[1] - y0)
        mags, qs, us = np.append(mags, t_mag), np.append(qs, t_q), np.append(us, t_u)
        is_target = np.append(is_target, True)
    return xs, ys, mags, qs, us, is_target


def _observed_qu(prof, q, u, xd, yd):
    """The inverse of the profile's calibration: (q, u) rotated by -angle_zero plus instrumental."""
    q_inst, u_inst = prof.instrumental_qu(xd, yd)
    d2 = math.radians(2.0 * prof.angle_zero)
    q_obs = q * math.cos(d2) + u * math.sin(d2) + q_inst
    u_obs = -q * math.sin(d2) + u * math.cos(d2) + u_inst
    return q_obs, u_obs


def _spot_fluxes(prof, geometry, flux, q_obs, u_obs, xd, pair_ratio_slope) -> np.ndarray:
    """Electrons per spot (n_channels, n_stars): the pair ratio, then q or u within a pair."""
    xn = (xd - geometry.center[0]) / geometry.scale
    ratio = np.exp(pair_ratio_slope * xn)  # u-pair / q-pair
    i_u = flux * ratio / (1.0 + ratio)
    i_q = flux - i_u
    (c0, c90), (c45, c135) = prof.q_channels, prof.u_channels
    spot_flux = {c0: i_q / 2 * (1 + q_obs), c90: i_q / 2 * (1 - q_obs),
                 c45: i_u / 2 * (1 + u_obs), c135: i_u / 2 * (1 - u_obs)}
    return np.stack([spot_flux[ch] for ch in prof.channels])


def render_spots(x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: MoffatPSF, light: np.ndarray,
                 shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Add PSF spots into a flat image.

    Each spot gets the smallest stamp of :data:`_STAMP_TIERS` that holds its profile down
    to about 2 electrons; spots too far outside the frame are skipped.

    Parameters
    ----------
    x, y : ndarray
        Spot centres (n,), image px.
    flux : ndarray
        Spot electrons (n,).
    psf : MoffatPSF
        The PSF.
    light : ndarray
        Flat float64 image (electron), modified in place.
    shape : (ny, nx)
        Image shape.

    Returns
    -------
    flux_in_frame, peak : ndarray
        Electrons rendered inside the frame, and the peak pixel (electron), per spot.
    """
    ny, nx = shape
    alpha, beta = psf.alpha, psf.beta
    f_in = np.zeros(flux.size)
    peak = np.zeros(flux.size)
    # peak estimate for the stamp size: Moffat peak fraction ~ (beta-1)/(pi alpha^2)
    peak_est = flux * (beta - 1) / (math.pi * alpha ** 2)
    r_need = alpha * np.maximum(peak_est / 2.0, 1.0) ** (1.0 / (2 * beta))
    tier = np.searchsorted(np.asarray(_STAMP_TIERS), r_need).clip(0, len(_STAMP_TIERS) - 1)
    big = _STAMP_TIERS[-1]
    onish = (x > -big) & (x < nx + big) & (y > -big) & (y < ny + big)
    for k, half in enumerate(_STAMP_TIERS):
        sel = np.flatnonzero((tier == k) & onish)
        for chunk in np.array_split(sel, max(1, len(sel) * (2 * half + 1) ** 2 // 4_000_000 + 1)):
            if not len(chunk):
                continue
            gx, gy, dx, dy = grid(x[chunk], y[chunk], half, half)
            w = normalise(moffat(dx, dy, alpha, beta, psf.ellipticity, psf.theta))
            vals = w * flux[chunk, None, None]
            f_in[chunk] = deposit(light, gx, gy, vals, shape)
            peak[chunk] = vals.max(axis=(1, 2))
    return f_in, peak


def add_stars(rng: np.random.Generator, prof: InstrumentProfile, geometry: SpotGeometry,
              psf: MoffatPSF, light: np.ndarray, sky: np.ndarray, *, n_stars: int,
              origin: tuple[int, int], spot_offset: float, vignetting_depth: float, exptime: float,
              target: Mapping[str, float] | bool | None, mag_range: tuple[float, float],
              count_slope: float, zero_point: float, pair_ratio_slope: float,
              max_polarization: float, field_rng: np.random.Generator | None = None,
              dither: tuple[float, float] = (0.0, 0.0)) -> StarField:
    """Draw the field stars (and the target) and render their spots.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    prof : InstrumentProfile
        The instrument.
    geometry : SpotGeometry
        The frame's spot geometry.
    psf : MoffatPSF
        The PSF.
    light : ndarray
        Flat float64 image (electron) the spots are added into.
    sky : ndarray
        Noiseless sky (electron/px), image shape; for the saturation flags.
    n_stars : int
        Field stars whose centres fall in the frame extended by ``spot_offset`` + 10 px.
    origin : (x0, y0)
        Detector pixel of image pixel (0, 0).
    spot_offset : float
        Largest spot offset (px) from a pattern centre.
    vignetting_depth : float
        See :func:`~robopol_clean.simulate._sky.vignetting`.
    exptime : float
        Exposure time (s).
    target, mag_range, count_slope, zero_point, pair_ratio_slope, max_polarization
        As for :func:`~robopol_clean.simulate.simulate_frame`.
    field_rng : Generator, optional
        Draw the stars from this generator instead of ``rng`` (the same field in
        several frames).
    dither : (dx, dy)
        Shift (px) of every star, drawn at its field position, on the image.

    Returns
    -------
    StarField
    """
    shape = sky.shape
    ny, nx = shape
    x0, y0 = origin
    xs, ys, mags, qs, us, is_target = _draw_stars(
        rng if field_rng is None else field_rng, prof, n_stars, shape, origin,
        spot_offset + 10.0, target, mag_range, count_slope, max_polarization)
    if dither[0] or dither[1]:
        xs, ys = xs + float(dither[0]), ys + float(dither[1])
    xd, yd = xs + x0, ys + y0
    q_obs, u_obs = _observed_qu(prof, qs, us, xd, yd)
    vig = vignetting(prof, vignetting_depth, xd, yd)
    flux = exptime * 10.0 ** (-0.4 * (mags - zero_point)) * vig
    sf = _spot_fluxes(prof, geometry, flux, q_obs, u_obs, xd, pair_ratio_slope)
    pos = geometry.spot_positions(xd, yd)
    sx = np.stack([pos[ch][0] - x0 for ch in prof.channels])
    sy = np.stack([pos[ch][1] - y0 for ch in prof.channels])
    f_in, peak = render_spots(sx.ravel(), sy.ravel(), sf.ravel(), psf, light, shape)
    f_in, peak = f_in.reshape(sf.shape), peak.reshape(sf.shape)
    in_frame = inside(sx, sy, shape)
    det_ny, det_nx = prof.shape
    usable = prof.usable(xd, yd, (max(det_ny, y0 + ny), max(det_nx, x0 + nx)))
    saturated = in_frame & (peak + sample(sky, sx, sy) > prof.saturation * prof.gain)
    return StarField(x=xs, y=ys, mag=mags, q=qs, u=us, q_obs=q_obs, u_obs=u_obs, flux=flux,
                     is_target=is_target, usable=usable, spot_x=sx, spot_y=sy, spot_flux=sf,
                     flux_in_frame=f_in, peak=peak, in_frame=in_frame, saturated=saturated)
