"""Checks on the real RoboPol frame and its DS9 labels in ../shared/data (skipped without it).

The frame is an 8-bit rendering (values 0-255, clipped at 255): fluxes are not
physical, so only self-consistency is checked.
"""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from robopol_clean.photometry import measure_spots
from robopol_clean.regions_io import labels_from_regions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not (DATA / "J1428_labels.reg").is_file(), reason="needs ../shared/data"),
]
CHANNELS = ("top", "bottom", "left", "right")


@pytest.fixture(scope="module")
def quads():
    return Table.read(DATA / "J1428_quads.ecsv")


def test_ds9_labels_mark_artifacts_not_stars(quads):
    art = Table.read(DATA / "J1428_artifacts.ecsv")
    reg = DATA / "J1428_labels.reg"
    assert labels_from_regions(reg, art["x"], art["y"], tag="artifact").all()
    xs = np.concatenate([quads[f"x_{ch}"] for ch in CHANNELS])
    ys = np.concatenate([quads[f"y_{ch}"] for ch in CHANNELS])
    assert not labels_from_regions(reg, xs, ys, tag="artifact").any()
    assert labels_from_regions(reg, xs, ys, color="green").all()  # spot circles


def test_photometry_on_real_frame(quads):
    data = fits.getdata(DATA / "J1428.fits").astype(np.float32)
    xs = np.concatenate([quads[f"x_{ch}"] for ch in CHANNELS])
    ys = np.concatenate([quads[f"y_{ch}"] for ch in CHANNELS])
    t = measure_spots(data, xs, ys, fwhm=4.3, gain=1.0, read_noise=0.0, saturation=255)
    assert np.all(np.isfinite(t["flux"])) and np.all(t["flux"] > 0)
    assert np.all(t["flux"] > 3 * t["flux_err"])
    sat = np.asarray(t["saturated"]).reshape(len(CHANNELS), len(quads)).any(axis=0)
    assert np.all(sat[np.asarray(quads["peak_sat"], bool)])  # clipped patterns are flagged


def test_psf_photometry_on_real_frame(quads):
    """The clipped 8-bit frame: the PSF is fitted from clipped stars' wings (FWHM in the
    measured RoboPol range), every labelled pattern gets a Stokes row, and the clipped
    ones carry the saturated bit."""
    from robopol_clean.instrument import load_profile
    from robopol_clean.io import read_frame
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.quality import QualityFlag

    prof = load_profile("robopol")
    with pytest.warns(Warning, match="EXPTIME"):  # an 8-bit rendering has no EXPTIME
        ccd = read_frame(DATA / "J1428.fits", prof)
    res = reduce_frame(ccd, profile=prof, classifier="morphology")
    assert res.meta["psf_source"] == "fitted" and 3.8 <= res.meta["psf_fwhm"] <= 5.1
    st = res.stokes
    d = np.hypot(np.asarray(st["x"])[None, :] - np.asarray(quads["x"])[:, None],
                 np.asarray(st["y"])[None, :] - np.asarray(quads["y"])[:, None])
    row = d.argmin(axis=1)
    assert np.all(d[np.arange(len(quads)), row] < 3)
    flags = np.asarray(st["flags"])[row]
    clipped = np.asarray(quads["peak_sat"], bool)
    assert np.all(flags[clipped] & QualityFlag.SATURATED)
