"""Sky positions of measured sources from a frame's celestial WCS.

A frame whose header (or `~astropy.nddata.CCDData.wcs`) holds a celestial world
coordinate system gets ``ra`` and ``dec`` columns (deg, ICRS) in its Stokes table. The
position is the WCS evaluated at the **pattern centre** (``x``, ``y``: the mean of the
four spots), which is where the source itself lies in the instrument's geometry model;
the WCS is assumed to describe source positions, as an astrometric solution fitted to
pattern centres does. A single spot is offset from its source by about 50 px (20" for
RoboPol), so the spots table gets no sky columns.

>>> from astropy.wcs import WCS
>>> w = WCS(naxis=2)
>>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
>>> w.wcs.crval, w.wcs.crpix = [150.0, 20.0], [1.0, 1.0]
>>> w.wcs.cdelt = [-0.39 / 3600, 0.39 / 3600]
>>> ra, dec = sky_positions(w, [0.0], [100.0])
>>> round(float(ra[0]), 4), round(float(dec[0]) - 20.0, 5)  # 100 px north of the reference
(150.0, 0.01083)
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from astropy.table import Table

__all__ = ["frame_wcs", "sky_positions", "add_sky_columns", "SKY_COLUMNS"]

log = logging.getLogger(__name__)

#: The sky columns, their unit and description.
SKY_COLUMNS = {
    "ra": ("deg", "right ascension (ICRS) of the pattern centre, from the frame's WCS"),
    "dec": ("deg", "declination (ICRS) of the pattern centre, from the frame's WCS"),
}


def frame_wcs(ccd, *, name: str = "frame"):
    """The celestial WCS of a frame, or None when it has none.

    ``ccd.wcs`` is used when set; otherwise the WCS is read from the header
    (``ccd.meta``), as :func:`robopol_clean.io.read_frame` keeps it there. A WCS that
    cannot be interpreted or does not transform pixel (0, 0) gives a warning and None.

    Parameters
    ----------
    ccd : CCDData
        The frame.
    name : str
        Name used in the warning (usually the file name).

    Returns
    -------
    astropy.wcs.WCS or None
        The celestial part of the WCS (two pixel axes), or None.
    """
    from astropy.wcs import WCS

    wcs = getattr(ccd, "wcs", None)
    if wcs is None:
        header = getattr(ccd, "meta", None)
        if header is None or not any(str(k).upper().startswith("CTYPE") for k in header):
            return None
        try:
            from astropy.io import fits

            hdr = header if isinstance(header, fits.Header) else fits.Header(
                [(k, v) for k, v in header.items() if len(str(k)) <= 8])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FITSFixedWarning: standardised keywords
                wcs = WCS(hdr, naxis=2)
        except Exception as exc:  # noqa: BLE001 -- any unusable WCS: the frame has none
            warnings.warn(f"{name}: the header's WCS cannot be used ({_first_line(exc)}); "
                          f"no sky positions", stacklevel=2)
            return None
    try:  # a WCS that parses may still not transform (a singular matrix, say)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not getattr(wcs, "has_celestial", False):
                return None
            celestial = wcs.celestial
            sky_positions(celestial, 0.0, 0.0)
    except Exception as exc:  # noqa: BLE001 -- any failure: the frame has no usable WCS
        warnings.warn(f"{name}: the WCS cannot be used ({_first_line(exc)}); no sky positions",
                      stacklevel=2)
        return None
    return celestial


def sky_positions(wcs, x, y) -> tuple[np.ndarray, np.ndarray]:
    """ICRS right ascension and declination (deg) of 0-based pixel positions.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        A celestial WCS (any celestial frame: FK5, galactic, ... are converted to ICRS).
    x, y : array-like
        0-based pixel positions (FITS orientation).

    Returns
    -------
    ra, dec : ndarray
        Degrees; NaN where a position is not finite.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    ra = np.full(x.shape, np.nan)
    dec = np.full(x.shape, np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        sky = wcs.pixel_to_world(x[ok], y[ok]).icrs
        ra[ok] = sky.ra.deg
        dec[ok] = sky.dec.deg
    return ra, dec


def add_sky_columns(table: Table, wcs) -> Table:
    """Add ``ra`` and ``dec`` (deg, ICRS) after ``y`` for the table's ``x``, ``y`` (in place).

    Nothing is added when ``wcs`` is None.

    Parameters
    ----------
    table : Table
        A table with ``x`` and ``y`` (pix), e.g. a Stokes table.
    wcs : astropy.wcs.WCS or None
        The frame's celestial WCS (:func:`frame_wcs`).

    Returns
    -------
    Table
        The same table.
    """
    if wcs is None:
        return table
    ra, dec = sky_positions(wcs, table["x"], table["y"]) if len(table) else (np.zeros(0),) * 2
    index = table.colnames.index("y") + 1
    for offset, (col, values) in enumerate((("ra", ra), ("dec", dec))):
        if col in table.colnames:
            table.remove_column(col)
        table.add_column(values, name=col, index=index + offset)
        table[col].unit, table[col].description = SKY_COLUMNS[col]
    table.meta["sky_positions"] = "WCS at the pattern centre (x, y), ICRS"
    return table


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
