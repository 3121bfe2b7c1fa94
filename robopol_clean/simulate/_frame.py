"""The frame: :class:`SimulatedFrame` and :func:`simulate_frame`, which runs the components.

The frame's random generator is drawn from in a fixed order: the PSF, the sky, the star
count, the geometry shifts, then the stars, reflections, donuts, cosmic rays and the
noise. Reordering any draw changes every seeded frame, which tests and benchmarks rely on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table

from ..instrument import InstrumentProfile, load_profile
from ._cosmic_rays import cosmic_rays
from ._detector import read_out
from ._donuts import add_donuts
from ._instrumental import calibration_record, inject_calibration, is_identity, standard_target
from ._reflections import add_reflections
from ._sky import draw_sky, sky_image
from ._stars import add_stars, draw_geometry, draw_psf, draw_star_count, max_spot_offset
from ._truth import artifact_table, frame_header, spot_table, star_table, table_meta
from ._wcs import simulated_wcs

#: Instrumental magnitude of a source giving 1 electron per second over all its spots.
ZERO_POINT = 23.1


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


def simulate_frame(
    profile: str | os.PathLike | InstrumentProfile = "robopol",
    *,
    seed: int,
    n_stars: int | None = None,
    shape: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
    field_seed: int | None = None,
    dither: tuple[float, float] = (0.0, 0.0),
    sky_center: tuple[float, float] | None = None,
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
    calibration: Mapping[str, Any] | os.PathLike | str | None = None,
    standard: str | None = None,
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
    field_seed : int, optional
        Draw the stars (their number when ``n_stars`` is not given, positions, doubles,
        magnitudes, polarization and the target's) from a generator of their own with
        this seed, so that frames of different ``seed`` and the same ``field_seed`` (and
        the same star arguments) show the same field with their own noise, PSF, sky and
        artifacts: repeated exposures of one field. By default the stars come from the
        frame's generator.
    dither : (dx, dy)
        Shift (px) of the field on the image: a star drawn at ``(x, y)`` lands on
        ``(x + dx, y + dy)`` (the truth tables list the shifted positions). The field
        is drawn over the undithered frame, so a strip ``|dx|`` (``|dy|``) wide at one
        edge has no stars.
    sky_center : (ra, dec), optional
        Give the frame a celestial TAN WCS (header keywords and ``ccd.wcs``): this ICRS
        position (deg) at the detector centre when undithered, the profile's pixel
        scale, north up, east left; the WCS follows ``dither``, so a star keeps its sky
        position. None (default): no WCS.
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
        Magnitude of a source giving 1 e-/s (see :mod:`robopol_clean.simulate`).
    pair_ratio_slope : float
        The u-pair / q-pair light ratio is ``exp(pair_ratio_slope * xn)``.
    max_polarization : float
        Largest fractional polarization of field stars.
    calibration : dict, Calibration or path, optional
        The instrumental effects the frame is made with, in place of the profile's
        ``[calibration]`` values: a dict with ``angle_zero`` (deg), ``q_inst`` and
        ``u_inst`` (a number for the constant term, or coefficients in the profile's
        term order), or a calibration file (:mod:`robopol_clean.calibration`). The
        fluxes carry every star's (q, u) rotated by ``-angle_zero`` plus the
        instrumental (q, u) at its position, so reducing with the same calibration
        recovers the true values. Recorded in the tables' metadata
        (``instrumental``) and the header (``SIMAZERO``, ``SIMQINST``, ``SIMUINST``:
        angle and constant terms) whenever it is not the identity.
    standard : str, optional
        Make the target this polarization standard (a name of the shipped catalogue,
        :mod:`robopol_clean.standards`): its R-band q and u, magnitude ``target["mag"]``
        (11 by default), and ``OBJECT`` set to its name.

    Returns
    -------
    SimulatedFrame
    """
    prof = load_profile(profile)
    if calibration is not None:
        prof = inject_calibration(prof, calibration)
    target, standard_name = standard_target(prof, target, standard)
    rng = np.random.default_rng(seed)
    ny, nx = shape = tuple(int(n) for n in (shape if shape is not None else prof.shape))
    if ny < 16 or nx < 16:
        raise ValueError(f"simulated frame shape {(ny, nx)} is too small (need at least 16 x 16)")
    origin = tuple(int(v) for v in origin)
    det_ny, det_nx = prof.shape
    area_frac = min(1.0, (nx * ny) / float(det_nx * det_ny))

    # frame-level draws, then the components, in the seed's fixed order (module docstring)
    psf = draw_psf(rng, prof, fwhm, beta, ellipticity)
    sky_drawn = draw_sky(rng, sky, sky_range, exptime)
    field_rng = None if field_seed is None else np.random.default_rng(field_seed)
    n_stars = draw_star_count(rng if field_rng is None else field_rng, n_stars, area_frac)
    geometry, shifts = draw_geometry(rng, prof, geometry_jitter)
    params: dict[str, Any] = {
        "seed": int(seed), "shape": shape, "origin": origin, "fwhm": psf.fwhm, "beta": psf.beta,
        "ellipticity": psf.ellipticity, "psf_theta": math.degrees(psf.theta),
        "sky": sky_drawn.level, "exptime": exptime, "geometry_shifts": shifts, "n_stars": n_stars,
    }

    sky_e = sky_image(prof, sky_drawn, shape, origin)  # electron/px; the donuts go in here
    light = np.zeros(ny * nx)  # electrons of stars and reflections, flat
    offset = max_spot_offset(geometry, shape, origin)
    stars = add_stars(rng, prof, geometry, psf, light, sky_e, n_stars=n_stars, origin=origin,
                      spot_offset=offset, vignetting_depth=sky_drawn.vignetting_depth,
                      exptime=exptime, target=target, mag_range=mag_range,
                      count_slope=count_slope, zero_point=zero_point,
                      pair_ratio_slope=pair_ratio_slope, max_polarization=max_polarization,
                      field_rng=field_rng, dither=dither)
    rows = add_reflections(rng, prof, geometry, stars, light, sky_e, n_groups=n_artifact_sources,
                           area_frac=area_frac, spot_offset=offset, origin=origin, fwhm=psf.fwhm)
    rows += add_donuts(rng, sky_e, n_donuts, area_frac=area_frac, contrast=donut_contrast,
                       radius=donut_radius, bright_fraction=donut_bright_fraction,
                       read_noise=prof.read_noise)
    charge, cr_rows = cosmic_rays(rng, n_cosmic_rays, sky_e, exptime=exptime, area_frac=area_frac,
                                  read_noise=prof.read_noise)
    rows += cr_rows
    data = read_out(rng, sky_e + light.reshape(shape), charge, prof, noise=noise,
                    saturate=saturate, include_bias=include_bias)

    star_truth = star_table(stars, prof.channels, zero_point)
    artifacts = artifact_table(rows, sky_e, prof.saturation * prof.gain)
    spots = spot_table(stars, artifacts, prof.channels, shape)
    instrumental = None if is_identity(prof) else calibration_record(prof)
    for table in (star_truth, spots, artifacts):
        table.meta.update(table_meta(seed, prof, zero_point))
        if instrumental is not None:
            table.meta["instrumental"] = instrumental
    header = frame_header(prof, seed=seed, exptime=exptime, origin=origin, psf=psf,
                          sky_level=sky_drawn.level, zero_point=zero_point,
                          n_stars=len(stars.x), n_artifacts=len(artifacts), shifts=shifts,
                          noise=noise, saturate=saturate, include_bias=include_bias)
    wcs = None
    if field_seed is not None or dither[0] or dither[1]:
        params.update(field_seed=field_seed, dither=tuple(map(float, dither)))
        header["FIELDSD"] = (field_seed if field_seed is not None else -1,
                             "seed of the star field (-1: the frame's)")
        header["DITHX"] = (float(dither[0]), "shift of the field on the image, x (px)")
        header["DITHY"] = (float(dither[1]), "shift of the field on the image, y (px)")
    if sky_center is not None:
        wcs = simulated_wcs(prof, sky_center, origin=origin, dither=dither)
        header.update(wcs.to_header())
    if standard_name is not None:
        header["OBJECT"] = (standard_name, "polarization standard (simulated)")
    if instrumental is not None:
        header["SIMAZERO"] = (float(prof.angle_zero), "[deg] injected angle zero point")
        header["SIMQINST"] = (float(np.ravel(prof.q_inst)[0]), "injected q_inst, constant term")
        header["SIMUINST"] = (float(np.ravel(prof.u_inst)[0]), "injected u_inst, constant term")
        params["instrumental"] = instrumental
    return SimulatedFrame(ccd=CCDData(data, unit="adu", meta=header, wcs=wcs), stars=star_truth,
                          spots=spots, artifacts=artifacts,
                          sky=(sky_e / prof.gain).astype(np.float32), params=params)
