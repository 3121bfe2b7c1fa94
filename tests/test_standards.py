"""Polarization standards: the shipped catalogue and how a frame is matched to it
(robopol_clean.standards), and standards through the whole chain: simulated frames whose
central target is a standard star (R band, Schmidt, Elston & Lupie 1992), reduced by the
pipeline.

The target sits inside the focal-plane mask, on a sky 2-4 times fainter than the open
field and among the mask's sky steps, and is much brighter than the field stars: its
quadruplet must be found, measured and pass the pair-ratio check, and its q and u must
agree with the catalogue values within their errors.
"""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from robopol_clean.pipeline import reduce_frame
from robopol_clean.simulate import simulate_frame
from robopol_clean.standards import (
    StandardError,
    find_standard,
    load_standards,
    match_frame,
    normalize_name,
    standard_near,
)

#: name: (q, u, p, theta [deg]), R band
STANDARDS = {
    "BD+59 389": (-0.06172, -0.01803, 0.06430, 98.14),
    "HD 212311": (-0.00007, 0.00033, 0.00034, 51.0),
}


def _wcs_at(ra: float, dec: float, pixel=(512.0, 512.0), scale=0.39 / 3600) -> WCS:
    """A TAN WCS putting (ra, dec) at the 0-based ``pixel``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [pixel[0] + 1, pixel[1] + 1]
    w.wcs.cdelt = [-scale, scale]
    return w


def test_catalogue_values_and_reference():
    table = load_standards()
    assert list(table["name"]) == ["BD+59 389", "HD 204827", "Hiltner 960", "VI Cyg 12",
                                   "HD 212311", "BD+32 3739"]
    assert list(table["polarized"]) == [True, True, True, True, False, False]
    assert set(table["bibcode"]) == {"1992AJ....104.1563S"} and table.meta["bibcode"] == "1992AJ....104.1563S"
    assert all("Schmidt, Elston & Lupie 1992" in r for r in table["reference"])
    two_theta = np.radians(2 * np.asarray(table["theta"]))
    np.testing.assert_allclose(table["q"], table["p"] * np.cos(two_theta), atol=1e-5)
    np.testing.assert_allclose(table["u"], table["p"] * np.sin(two_theta), atol=1e-5)
    assert np.all(table["q_err"] > 0) and np.all(table["u_err"] > 0)
    # an unpolarized standard's errors are its p error; a polarized one's near it too
    row = find_standard("HD 212311")
    assert row["q_err"] == row["u_err"] == row["p_err"]
    row = find_standard("BD+59 389")
    assert row["q_err"] == pytest.approx(row["p_err"], rel=0.1)
    assert table["ra"].unit == "deg" and all(c for c in table["coord_ref"])
    load_standards()["q"][0] = 1.0  # a copy: the shipped table is untouched
    assert find_standard("BD+59 389")["q"] == -0.06172


@pytest.mark.parametrize(("written", "name"), [
    ("Hiltner 960", "Hiltner 960"), ("HILT960", "Hiltner 960"), ("Hil960", "Hiltner 960"),
    ("hiltner_960", "Hiltner 960"), (" hilt 960 ", "Hiltner 960"),
    ("BD+59 389", "BD+59 389"), ("BD+59389", "BD+59 389"), ("bd59_389", "BD+59 389"),
    ("BDp59389", "BD+59 389"), ("HD 236928", "BD+59 389"),
    ("VI Cyg 12", "VI Cyg 12"), ("vicyg12", "VI Cyg 12"), ("Cyg OB2-12", "VI Cyg 12"),
    ("hd204827", "HD 204827"), ("HD_212311", "HD 212311"), ("BD +32 3739", "BD+32 3739"),
])
def test_names_are_matched_whatever_the_spelling(written, name):
    row = find_standard(written)
    assert row is not None and row["name"] == name


@pytest.mark.parametrize("written", ["BD-59 389", "BDm59389", "M31", "HD 21231", "", "SIMULATED"])
def test_other_names_match_nothing(written):
    assert find_standard(written) is None


def test_normalize_name_keeps_a_southern_zone():
    assert normalize_name("BD+59 389") == normalize_name("bd 59-389") == "BD59389"
    assert normalize_name("BD-59 389") == normalize_name("BDm59389") == "BDM59389"
    assert normalize_name("CD−59 389") == "CDM59389"  # a typographic minus


def test_position_match():
    row = find_standard("VI Cyg 12")
    near = SkyCoord(row["ra"] + 20 / 3600, row["dec"], unit="deg")
    found, sep = standard_near(near)
    assert found["name"] == "VI Cyg 12" and 10 < sep < 20  # 20 arcsec of RA at dec 41
    found, sep = standard_near(near, tolerance=5.0)
    assert found is None and sep > 5


def test_match_frame_by_object_then_by_wcs():
    header = fits.Header({"OBJECT": "hil960"})
    m = match_frame(header)
    assert (m.name, m.by) == ("Hiltner 960", "OBJECT") and np.isnan(m.separation)
    row = find_standard("HD 204827")
    header = fits.Header({"OBJECT": "field 12"})
    m = match_frame(header, _wcs_at(row["ra"], row["dec"] + 10 / 3600), pointing=(512.0, 512.0))
    assert (m.name, m.by) == ("HD 204827", "WCS") and m.separation == pytest.approx(10, abs=0.1)


def test_no_recognisable_standard_is_a_clear_error():
    header = fits.Header({"OBJECT": "M31"})
    with pytest.raises(StandardError, match=r"^night/f1\.fits: OBJECT 'M31' is not a known standard "
                                            r"\(BD\+59 389, .*\) and the frame has no celestial WCS"):
        match_frame(header, name="night/f1.fits")
    with pytest.raises(StandardError, match="f2.fits: no OBJECT keyword, and no standard lies "
                                            "within 60 arcsec of its pointing"):
        match_frame(fits.Header(), _wcs_at(10.0, 20.0), pointing=(512.0, 512.0), name="f2.fits")


def test_a_bad_catalogue_is_named(tmp_path):
    table = load_standards()
    table.remove_column("q")
    path = tmp_path / "mine.ecsv"
    table.write(path)
    with pytest.raises(StandardError, match="mine.ecsv: standards catalogue lacks column"):
        load_standards(path)
    table = load_standards()
    table["aliases"][1] = "Hil 960"
    table.write(path, overwrite=True)
    with pytest.raises(StandardError, match="mine.ecsv: name 'Hil ?960' is given to two standards"):
        load_standards(path)
    path.write_text("not a table")
    with pytest.raises(StandardError, match="mine.ecsv: not a readable ECSV table"):
        load_standards(path)


@pytest.fixture(scope="module", params=sorted(STANDARDS))
def reduced_standard(request, profile, morphology):
    name = request.param
    q, u = STANDARDS[name][:2]
    # a full-size frame (detection and the mask model work in detector coordinates) with
    # few field stars; R = 11 in 120 s: ~8e6 electrons, unsaturated
    sim = simulate_frame(profile, seed=5, n_stars=50, fwhm=4.5,
                         target=dict(mag=11.0, q=q, u=u))
    return name, sim, reduce_frame(sim.ccd, profile=profile, classifier=morphology)


def _target_row(sim, result):
    target = sim.stars[np.asarray(sim.stars["is_target"], bool)]
    assert len(target) == 1
    st = result.stokes
    d = np.hypot(np.asarray(st["x"]) - target["x"][0], np.asarray(st["y"]) - target["y"][0])
    assert len(st) and d.min() < 2.0, "the target's quadruplet got no Stokes row"
    return st[int(np.argmin(d))]


def test_target_is_detected_grouped_and_clean(reduced_standard, profile):
    name, sim, result = reduced_standard
    gx, gy = profile.target
    groups = result.groups
    g = groups[int(np.argmin(np.hypot(groups["x"] - gx, groups["y"] - gy)))]
    assert np.hypot(g["x"] - gx, g["y"] - gy) < 3.0
    assert g["complete"] and g["clean"], name
    members = result.spots[np.isin(result.spots["spot_id"],
                                   [g[f"spot_{ch}"] for ch in profile.channels])]
    assert len(members) == 4 and not members["saturated"].any()
    assert not members["rejected"].any() and g["flags"] == 0


def test_standard_recovered_within_errors(reduced_standard):
    name, sim, result = reduced_standard
    q, u, p, theta = STANDARDS[name]
    row = _target_row(sim, result)
    # photon limit for ~8e6 electrons: sigma_q ~ 1/sqrt(N_pair) ~ 5e-4
    assert 3e-4 < row["q_err"] < 1.5e-3 and 3e-4 < row["u_err"] < 1.5e-3
    assert abs(row["q"] - q) < 3 * row["q_err"], (name, row["q"], row["q_err"])
    assert abs(row["u"] - u) < 3 * row["u_err"], (name, row["u"], row["u_err"])
    if p > 0.01:  # the polarized standard: p and the angle too
        assert abs(row["p_debiased"] - p) < 3 * row["p_err"]
        assert abs(row["theta"] - theta) < 3 * row["theta_err"]
    else:  # the unpolarized one is consistent with zero
        assert row["snr"] < 3
