"""Repeated exposures of one simulated field: field_seed, dither and the simulated WCS."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from robopol_clean.simulate import simulate_frame

KW = dict(shape=(256, 256), origin=(900, 900), n_stars=25, n_artifact_sources=0)


def test_same_field_with_its_own_noise():
    a = simulate_frame(seed=1, field_seed=9, **KW)
    b = simulate_frame(seed=2, field_seed=9, dither=(12.5, -7.0), **KW)
    for col in ("mag", "q", "u"):
        np.testing.assert_array_equal(a.stars[col], b.stars[col])
    # the truth's centre is the mean of the spots, whose geometry jitters frame to frame
    np.testing.assert_allclose(b.stars["x"] - a.stars["x"], 12.5, atol=0.2)
    np.testing.assert_allclose(b.stars["y"] - a.stars["y"], -7.0, atol=0.2)
    assert a.params["fwhm"] != b.params["fwhm"]  # the frame's own draws
    assert b.ccd.header["FIELDSD"] == 9 and b.ccd.header["DITHX"] == 12.5
    other = simulate_frame(seed=1, field_seed=10, **KW)
    assert not np.array_equal(a.stars["q"], other.stars["q"])
    plain = simulate_frame(seed=1, **KW)  # the default draws stars from the frame's generator
    assert "FIELDSD" not in plain.ccd.header and "CTYPE1" not in plain.ccd.header
    assert plain.ccd.wcs is None


def test_wcs_follows_the_dither(tmp_path):
    frames = [simulate_frame(seed=s, field_seed=9, dither=d, sky_center=(210.0, 35.0), **KW)
              for s, d in ((1, (0.0, 0.0)), (2, (30.0, -20.0)))]
    sky = [f.ccd.wcs.pixel_to_world(f.stars["x"], f.stars["y"]) for f in frames]
    assert np.all(sky[0].separation(sky[1]).arcsec < 0.1)  # a star keeps its sky position
    # the detector centre at zero dither is the given position; the scale is the profile's
    w = frames[0].ccd.wcs
    centre = w.pixel_to_world(1023.5 - 900, 1023.5 - 900)
    assert centre.ra.deg == pytest.approx(210.0) and centre.dec.deg == pytest.approx(35.0)
    step = w.pixel_to_world(0, 0).separation(w.pixel_to_world(0, 100)).arcsec
    assert step == pytest.approx(39.0, rel=1e-4)
    # the header holds the same WCS (written files keep it)
    path = tmp_path / "f.fits"
    fits.PrimaryHDU(frames[1].ccd.data, header=frames[1].ccd.header).writeto(path)
    back = WCS(fits.getheader(path))
    np.testing.assert_allclose(back.wcs.crpix, frames[1].ccd.wcs.wcs.crpix)
    assert back.wcs.radesys == "ICRS"
