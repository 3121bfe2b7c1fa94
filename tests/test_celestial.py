"""Sky positions from a frame's celestial WCS (robopol_clean.celestial)."""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from astropy.wcs import WCS

from robopol_clean.celestial import add_sky_columns, frame_wcs, sky_positions
from robopol_clean.io import read_frame


def _wcs(ctype=("RA---TAN", "DEC--TAN"), crval=(150.0, 20.0)):
    w = WCS(naxis=2)
    w.wcs.ctype = list(ctype)
    w.wcs.crval = list(crval)
    w.wcs.crpix = [257.0, 257.0]
    w.wcs.cdelt = [-0.39 / 3600, 0.39 / 3600]
    return w


def test_wcs_read_from_a_file_header(visit_sims, profile, tmp_path):
    sim = visit_sims[0]
    path = tmp_path / "frame.fits"
    sim.ccd.write(path)
    ccd = read_frame(path, profile)
    w = frame_wcs(ccd, name=path.name)
    x, y = np.array([0.0, 100.5, 639.0]), np.array([0.0, 320.0, 17.0])
    ra, dec = sky_positions(w, x, y)
    expected = sim.ccd.wcs.pixel_to_world(x, y)
    assert np.all(SkyCoord(ra, dec, unit="deg").separation(expected).arcsec < 1e-6)
    assert frame_wcs(sim.ccd) is not None  # CCDData.wcs, when set


def test_frames_without_a_usable_wcs():
    data = np.zeros((8, 8))
    assert frame_wcs(CCDData(data, unit="adu")) is None
    assert frame_wcs(CCDData(data, unit="adu", meta=fits.Header({"OBJECT": "x"}))) is None
    linear = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"})
    assert frame_wcs(CCDData(data, unit="adu", meta=linear)) is None
    broken = fits.Header({"CTYPE1": "RA---XYZ", "CTYPE2": "DEC--XYZ"})
    with pytest.warns(UserWarning, match="bad.fits: the header's WCS cannot be used"):
        assert frame_wcs(CCDData(data, unit="adu", meta=broken), name="bad.fits") is None
    singular = _wcs()
    singular.wcs.cdelt = [0.0, 0.0]
    with pytest.warns(UserWarning, match="frame: the WCS cannot be used"):
        assert frame_wcs(CCDData(data, unit="adu", wcs=singular)) is None


def test_other_celestial_frames_become_icrs():
    gal = _wcs(("GLON-TAN", "GLAT-TAN"), (120.0, 10.0))
    ra, dec = sky_positions(gal, [256.0, np.nan], [256.0, 3.0])
    expected = SkyCoord(120.0, 10.0, unit="deg", frame="galactic").icrs
    assert SkyCoord(ra[0], dec[0], unit="deg").separation(expected).arcsec < 1e-6
    assert np.isnan(ra[1]) and np.isnan(dec[1])


def test_add_sky_columns_after_y():
    t = Table({"group_id": [1, 2], "x": [256.0, 256.0], "y": [256.0, 356.0], "q": [0.0, 0.1]})
    assert add_sky_columns(t.copy(), None).colnames == t.colnames
    add_sky_columns(t, _wcs())
    assert t.colnames == ["group_id", "x", "y", "ra", "dec", "q"]
    assert t["ra"].unit == "deg" and t["ra"][0] == pytest.approx(150.0)
    assert t["dec"][1] - t["dec"][0] == pytest.approx(100 * 0.39 / 3600, rel=1e-4)
    empty = add_sky_columns(Table({"x": np.zeros(0), "y": np.zeros(0)}), _wcs())
    assert empty.colnames == ["x", "y", "ra", "dec"] and len(empty) == 0
