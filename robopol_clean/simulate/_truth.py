"""Truth tables (stars, spots, artifacts) and the FITS header of a simulated frame."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..instrument import InstrumentProfile
from ._render import inside, sample
from ._stars import MoffatPSF, StarField

#: Version of the simulation model, written to headers (``SIMVER``).
SIM_VERSION = 1

# Artifact truth columns after ``artifact_id``: (name, dtype, unit, description). The
# components return one dict per artifact with these keys.
_ARTIFACT_COLUMNS = (
    ("kind", "U10", None, "streak (reflection with head and tail), ghost (compact reflection), "
                          "cosmic_ray, donut (dust ring in the sky)"),
    ("x", float, "pix", "x of the brightest point (donut: ring centre)"),
    ("y", float, "pix", "y of the brightest point"),
    ("x_center", float, "pix", "centre of the horizontal extent"),
    ("length", float, "pix", "horizontal extent above 3% of the peak (noiseless model)"),
    ("width", float, "pix", "vertical FWHM (cosmic ray: pixel extent; donut: outer diameter)"),
    ("flux", float, "electron", "injected electrons (donut: change of the sky, may be negative)"),
    ("flux_in_frame", float, "electron", "part of flux that falls inside the frame"),
    ("peak", float, "electron", "peak pixel above sky (noiseless)"),
    ("snr_peak", float, None, "peak / sky noise per pixel"),
    ("parent", np.int64, None, "star_id of the star whose reflection it is (-1: none)"),
    ("pair_id", np.int64, None, "orphan pair id shared by both members (-1: single)"),
    ("mimics", "U40", None, "channels of the spot pair an orphan pair is laid out like"),
    ("tail_dir", np.int64, None, "direction of a streak's tail along x (+1/-1; 0: none)"),
)


def _table(columns) -> Table:
    """A table from ``(name, values, unit, description)`` tuples."""
    table = Table()
    for name, values, unit, description in columns:
        table[name] = values
        table[name].unit = unit
        table[name].description = description
    return table


def star_table(stars: StarField, channels: tuple[str, ...], zero_point: float) -> Table:
    """One row per star (pattern): centre, spot positions, flux, magnitude, q and u."""
    sx, sy, in_frame = stars.spot_x, stars.spot_y, stars.in_frame
    spot_columns = []
    for i, ch in enumerate(channels):
        spot_columns += [(f"x_{ch}", sx[i], "pix", f"x of the {ch} spot"),
                         (f"y_{ch}", sy[i], "pix", f"y of the {ch} spot")]
    obs = "in the spot fluxes: rotated by -angle_zero plus instrumental"
    return _table([
        ("star_id", np.arange(len(stars.x)), None, "star number (row index)"),
        ("x", sx.mean(axis=0), "pix", "pattern centre x = mean of the spot x positions (0-based)"),
        ("y", sy.mean(axis=0), "pix", "pattern centre y = mean of the spot y positions (0-based)"),
        *spot_columns,
        ("flux", stars.spot_flux.sum(axis=0), "electron",
         "total electrons over all spots (after vignetting)"),
        ("mag", stars.mag, "mag", f"instrumental magnitude; {zero_point} = 1 e-/s over all spots"),
        ("q", stars.q, None, "true Stokes q (sky frame)"),
        ("u", stars.u, None, "true Stokes u (sky frame)"),
        ("q_obs", stars.q_obs, None, f"q {obs} q"),
        ("u_obs", stars.u_obs, None, f"u {obs} u"),
        ("n_in_frame", in_frame.sum(axis=0), None,
         "number of spots whose centre lies in the frame"),
        ("complete", in_frame.all(axis=0) & stars.usable, None,
         "all spots in the frame and the centre in the usable region"),
        ("saturated", stars.saturated.any(axis=0), None,
         "a spot's peak exceeds the saturation level"),
        ("is_target", stars.is_target, None, "the central target"),
    ])


def artifact_table(rows: list[dict], sky: np.ndarray, saturation: float) -> Table:
    """One row per artifact: reflection streaks and ghosts, cosmic rays, dust donuts.

    Parameters
    ----------
    rows : list of dict
        The components' truth rows, keys as the columns of ``_ARTIFACT_COLUMNS``.
    sky : ndarray
        Noiseless sky (electron/px) including the donuts, image shape.
    saturation : float
        Saturation level (electron).
    """
    values = {name: np.array([r[name] for r in rows], dtype=dtype)
              for name, dtype, _, _ in _ARTIFACT_COLUMNS}
    x, y = values["x"], values["y"]
    saturated = ((values["kind"] != "donut") & (values["peak"] + sample(sky, x, y) > saturation)
                 & inside(x, y, sky.shape))
    return _table([
        ("artifact_id", np.arange(len(rows), dtype=np.int64), None, "artifact number (row index)"),
        *((name, values[name], unit, text) for name, _, unit, text in _ARTIFACT_COLUMNS),
        ("saturated", saturated, None, "peak exceeds the saturation level"),
    ])


def spot_table(stars: StarField, artifacts: Table, channels: tuple[str, ...],
               shape: tuple[int, int]) -> Table:
    """One row per star spot (star by star, channels in profile order), then per artifact."""
    nch, ns = stars.spot_x.shape
    nsp, n_art = nch * ns, len(artifacts)
    art = {name: np.asarray(artifacts[name], dtype) for name, dtype in (
        ("x", float), ("y", float), ("flux", float), ("flux_in_frame", float), ("peak", float),
        ("kind", "U10"), ("saturated", bool))}

    def spots_then(star_values, artifact_values):
        return np.concatenate([star_values.T.ravel(), artifact_values])

    return _table([
        ("x", spots_then(stars.spot_x, art["x"]), "pix",
         "spot centre x (artifacts: brightest point)"),
        ("y", spots_then(stars.spot_y, art["y"]), "pix", "spot centre y"),
        ("star_id", np.concatenate([np.repeat(np.arange(ns), nch), np.full(n_art, -1)]), None,
         "star the spot belongs to (-1: artifact)"),
        ("channel", np.concatenate([np.tile(np.array(channels, dtype="U16"), ns),
                                    np.full(n_art, "", dtype="U16")]),
         None, "analyser channel ('' for artifacts)"),
        ("flux", spots_then(stars.spot_flux, art["flux"]), "electron", "injected electrons"),
        ("flux_in_frame", spots_then(stars.flux_in_frame, art["flux_in_frame"]), "electron",
         "part of flux inside the frame"),
        ("peak", spots_then(stars.peak, art["peak"]), "electron",
         "peak pixel above sky (noiseless)"),
        ("is_artifact", np.concatenate([np.zeros(nsp, bool), np.ones(n_art, bool)]), None,
         "not a star spot"),
        ("artifact_id", np.concatenate([np.full(nsp, -1), np.arange(n_art)]), None,
         "row of the artifacts table (-1: star spot)"),
        ("kind", np.concatenate([np.full(nsp, "star", dtype="U10"), art["kind"]]), None,
         "star, streak, ghost, cosmic_ray or donut"),
        ("in_frame", spots_then(stars.in_frame, inside(art["x"], art["y"], shape)), None,
         "the position lies inside the frame"),
        ("saturated", spots_then(stars.saturated, art["saturated"]), None,
         "peak exceeds the saturation level"),
    ])


def frame_header(prof: InstrumentProfile, *, seed: int, exptime: float,
                 origin: tuple[int, int], psf: MoffatPSF, sky_level: float, zero_point: float,
                 n_stars: int, n_artifacts: int, shifts: dict[str, tuple[float, float]],
                 noise: bool, saturate: bool, include_bias: bool) -> fits.Header:
    """The simulated frame's FITS header.

    Detector keywords (GAIN, RDNOISE, SATURATE, ...), the seed, the detector origin and
    the drawn frame parameters (FWHM, SKYLEVEL, GEODX1, ...).
    """
    x0, y0 = origin
    hdr = fits.Header()
    hdr["OBJECT"] = ("SIMULATED", "robopol_clean.simulate")
    hdr["INSTRUME"] = prof.name
    hdr["BUNIT"] = "adu"
    hdr["GAIN"] = (prof.gain, "e-/ADU")
    hdr["RDNOISE"] = (prof.read_noise, "read noise (e-)")
    hdr["EXPTIME"] = (float(exptime), "s")
    hdr["SATURATE"] = (prof.saturation + (prof.bias if include_bias else 0.0),
                       "ADU, clip level" if saturate else "ADU (not clipped)")
    hdr["BIASSUB"] = (not include_bias, "bias subtracted")
    hdr["BIAS"] = (prof.bias, "ADU, detector bias of the profile")
    hdr["SIMSEED"] = (int(seed), "numpy default_rng seed")
    hdr["SIMVER"] = (SIM_VERSION, "simulation model version")
    hdr["SIMNOISE"] = (bool(noise), "Poisson and read noise added")
    hdr["DETX0"] = (x0, "detector x of image pixel 0 (0-based)")
    hdr["DETY0"] = (y0, "detector y of image pixel 0 (0-based)")
    hdr["LTV1"] = (-x0, "IRAF image = detector + LTV")
    hdr["LTV2"] = (-y0, "IRAF image = detector + LTV")
    hdr["FWHM"] = (round(psf.fwhm, 4), "PSF FWHM (px)")
    hdr["MOFBETA"] = (round(psf.beta, 4), "Moffat beta")
    hdr["PSFELL"] = (round(psf.ellipticity, 4), "PSF ellipticity 1-b/a")
    hdr["SKYLEVEL"] = (round(sky_level, 3), "open-sky level (e-/px)")
    hdr["ZEROPT"] = (zero_point, "mag giving 1 e-/s over all spots")
    hdr["NSTARS"] = (int(n_stars), "stars incl. target")
    hdr["NARTIF"] = (int(n_artifacts), "artifacts (all kinds)")
    for i, ch in enumerate(prof.channels):
        hdr[f"GEODX{i + 1}"] = (round(shifts[ch][0], 4), f"geometry shift of {ch} (px)")
        hdr[f"GEODY{i + 1}"] = (round(shifts[ch][1], 4), f"geometry shift of {ch} (px)")
    return hdr


def table_meta(seed: int, prof: InstrumentProfile, zero_point: float) -> dict:
    """Metadata shared by the three truth tables."""
    return {"simseed": int(seed), "instrument": prof.name, "coords": "0-based image pixels (FITS)",
            "zero_point": zero_point}

