"""A celestial WCS for simulated frames: the same sky under a dithered telescope."""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS

from ..instrument import InstrumentProfile

__all__ = ["simulated_wcs"]


def simulated_wcs(prof: InstrumentProfile, center: tuple[float, float], *,
                  origin: tuple[int, int] = (0, 0), dither: tuple[float, float] = (0.0, 0.0),
                  rotation: float = 0.0) -> WCS:
    """A gnomonic (TAN) WCS with the profile's pixel scale.

    The sky position ``center`` lies at the detector's centre when the frame is not
    dithered; a dither ``(dx, dy)`` moves the sky by ``(dx, dy)`` pixels on the detector
    (the simulator shifts the stars alike), so a star keeps its sky position in every
    dithered frame. North is up and east left for ``rotation`` 0.

    Parameters
    ----------
    prof : InstrumentProfile
        Supplies ``pixel_scale`` (arcsec/px) and the detector shape.
    center : (ra, dec)
        ICRS position (deg) of the detector centre at zero dither.
    origin : (x0, y0)
        Detector pixel of image pixel (0, 0) (a frame smaller than the detector).
    dither : (dx, dy)
        Shift (px) of the sky on the detector.
    rotation : float
        Position angle (deg) of the detector's +y axis, east of north.

    Returns
    -------
    astropy.wcs.WCS
        Its ``crpix`` is 1-based (FITS); ``pixel_to_world`` takes 0-based positions.
    """
    if not prof.pixel_scale:
        raise ValueError(f"profile {prof.name!r} has no pixel_scale: a WCS cannot be simulated")
    det_ny, det_nx = prof.shape
    scale = float(prof.pixel_scale) / 3600.0
    rot = math.radians(float(rotation))
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.radesys = "ICRS"
    w.wcs.crval = [float(center[0]), float(center[1])]
    # 0-based detector centre, in image pixels, moved with the sky; +1 for FITS
    w.wcs.crpix = [(det_nx - 1) / 2.0 - origin[0] + float(dither[0]) + 1.0,
                   (det_ny - 1) / 2.0 - origin[1] + float(dither[1]) + 1.0]
    w.wcs.cd = scale * np.array([[-math.cos(rot), math.sin(rot)],
                                 [math.sin(rot), math.cos(rot)]])
    return w
