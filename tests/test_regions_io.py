import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from regions import (
    CirclePixelRegion,
    CircleSkyRegion,
    EllipsePixelRegion,
    Regions,
)

from robopol_clean.io import OutputError
from robopol_clean.regions_io import (
    DEFAULT_COLORS,
    labels_from_regions,
    read_regions,
    regions_to_text,
    spots_to_regions,
    write_regions,
)


@pytest.fixture
def spots():
    return Table({
        "spot_id": [0, 1, 2],
        "x": [10.0, 50.5, 90.25],
        "y": [20.0, 60.0, 30.75],
        "p_artifact": [0.97, 0.41, 0.08],
        "rejected": [True, False, False],
        "uncertain": [False, True, False],
        "aper_radius": [8.6, 8.6, 8.6],
    })


@pytest.fixture
def wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, 60.0]
    w.wcs.crpix = [64.5, 64.5]
    w.wcs.cdelt = [-0.39 / 3600, 0.39 / 3600]
    return w


def test_spots_to_regions_circles(spots):
    regs = spots_to_regions(spots)
    assert isinstance(regs, Regions) and len(regs) == 3
    assert all(isinstance(r, CirclePixelRegion) for r in regs)
    assert [r.visual["edgecolor"] for r in regs] == ["red", "orange", "green"]
    assert [r.meta["text"] for r in regs] == ["p=0.97", "p=0.41", "p=0.08"]
    assert regs[1].center.x == 50.5 and regs[1].radius == 8.6
    assert spots_to_regions(spots, radius=3.0)[0].radius == 3.0
    assert {r.visual["edgecolor"] for r in spots_to_regions(spots, color_by="none")} == {"green"}
    custom = spots_to_regions(spots, colors={"uncertain": "yellow"})
    assert custom[1].visual["edgecolor"] == "yellow"


def test_spots_to_regions_ellipses(spots):
    spots["a"] = [6.0, 2.0, 2.0]
    spots["b"] = [2.0, 2.0, 2.0]
    spots["orientation"] = [5.0, 0.0, 0.0]
    regs = spots_to_regions(spots, ellipse_scale=2.0)
    assert isinstance(regs[0], EllipsePixelRegion)
    assert regs[0].width == 24.0 and regs[0].height == 8.0
    assert regs[0].angle.to_value("deg") == 5.0


def test_spots_to_regions_errors(spots):
    with pytest.raises(KeyError, match="'x'"):
        spots_to_regions(spots[["y"]])
    with pytest.raises(ValueError, match="color_by"):
        spots_to_regions(spots, color_by="magnitude")
    with pytest.raises(ValueError, match="celestial"):
        spots_to_regions(spots, wcs=WCS(naxis=2))


def test_round_trip_pixel(tmp_path, spots):
    path = write_regions(spots_to_regions(spots), tmp_path / "spots.reg")
    text = path.read_text()
    assert "image" in text
    # 0-based in code, 1-based in the file
    assert "circle(11.00000000,21.00000000,8.60000000)" in text
    assert "circle(91.25000000,31.75000000" in text
    back = read_regions(path)
    assert len(back) == 3
    np.testing.assert_allclose([r.center.x for r in back], spots["x"])
    np.testing.assert_allclose([r.center.y for r in back], spots["y"])
    assert [r.visual["edgecolor"] for r in back] == ["red", "orange", "green"]  # read: edgecolor
    assert [r.meta["text"] for r in back] == ["p=0.97", "p=0.41", "p=0.08"]
    assert [r.meta["tag"] for r in back] == [["spot_0"], ["spot_1"], ["spot_2"]]


def test_single_region_keeps_text_on_its_line(tmp_path, spots):
    # `regions` would move a shared text label to the `global` line, where DS9 drops it
    text = regions_to_text(spots_to_regions(spots[:1]))
    global_line = next(line for line in text.splitlines() if line.startswith("global"))
    assert "text" not in global_line
    assert "text={p=0.97}" in next(line for line in text.splitlines() if line.startswith("circle"))
    write_regions(spots_to_regions(spots[:1]), tmp_path / "one.reg")
    assert read_regions(tmp_path / "one.reg")[0].meta["text"] == "p=0.97"


def test_round_trip_sky(tmp_path, spots, wcs):
    regs = spots_to_regions(spots, wcs=wcs)
    assert all(isinstance(r, CircleSkyRegion) for r in regs)
    assert regs[0].radius.to_value("arcsec") == pytest.approx(8.6 * 0.39, rel=1e-5)
    write_regions(regs, tmp_path / "sky.reg")
    assert "icrs" in (tmp_path / "sky.reg").read_text()
    back = read_regions(tmp_path / "sky.reg")
    pix = [r.to_pixel(wcs) for r in back]
    np.testing.assert_allclose([p.center.x for p in pix], spots["x"], atol=1e-3)
    np.testing.assert_allclose([p.center.y for p in pix], spots["y"], atol=1e-3)
    assert [r.visual["edgecolor"] for r in back] == ["red", "orange", "green"]  # read: edgecolor
    inside = labels_from_regions(tmp_path / "sky.reg", [10.0, 30.0], [20.0, 30.0], wcs=wcs)
    assert list(inside) == [True, False]
    with pytest.raises(ValueError, match="wcs"):
        labels_from_regions(tmp_path / "sky.reg", [10.0], [20.0])


def test_atomic_write_and_overwrite(tmp_path, spots):
    path = tmp_path / "out.reg"
    write_regions(spots_to_regions(spots), path)
    first = path.read_text()
    with pytest.raises(OutputError, match="out.reg: output exists"):
        write_regions(spots_to_regions(spots[:1]), path)
    assert path.read_text() == first  # untouched
    write_regions(spots_to_regions(spots[:1]), path, overwrite=True)
    assert path.read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.reg"]  # no temp debris


def test_written_file_has_normal_permissions(tmp_path, spots):
    import os

    umask = os.umask(0o022)
    try:
        path = write_regions(spots_to_regions(spots), tmp_path / "perm.reg")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by DS9 run as another user


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, spots):
    import robopol_clean.regions_io as rio

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_regions(spots_to_regions(spots), tmp_path / "x.reg")
    assert list(tmp_path.iterdir()) == []


def test_write_to_missing_folder(tmp_path, spots):
    with pytest.raises(OSError, match="cannot write"):
        write_regions(spots_to_regions(spots), tmp_path / "nope" / "x.reg")


def test_labels_from_ds9_drawn_file(tmp_path):
    # as an astronomer would save it from DS9: 1-based image coordinates
    (tmp_path / "hand.reg").write_text(
        "# Region file format: DS9 version 4.1\n"
        'global color=green font="helvetica 10 normal roman"\n'
        "image\n"
        "circle(101,51,10) # text={streak}\n"
        "box(201,201,40,8,0)\n"
        "-circle(101,51,2)\n"
        "point(300,300) # point=x\n"
    )
    x = np.array([100.0, 100.0, 108.0, 215.0, 200.0, 299.0, 0.0])
    y = np.array([50.0, 55.0, 50.0, 201.0, 206.0, 299.0, 0.0])
    inside = labels_from_regions(tmp_path / "hand.reg", x, y)
    assert list(inside) == [False, True, True, True, False, False, False]
    assert labels_from_regions(read_regions(tmp_path / "hand.reg"), x.reshape(7, 1),
                               y.reshape(7, 1)).shape == (7, 1)


def test_labels_filter_by_color_and_tag(tmp_path):
    (tmp_path / "mixed.reg").write_text(
        "# Region file format: DS9 version 4.1\n"
        "global color=green\n"
        "image\n"
        "circle(11,11,5) # tag={quad1}\n"
        "box(51,51,20,6,0) # color=red tag={artifact}\n"
        "box(81,81,20,6,0) # color=orange tag={artifact}\n"
    )
    x = np.array([10.0, 50.0, 80.0])
    y = np.array([10.0, 50.0, 80.0])
    path = tmp_path / "mixed.reg"
    assert list(labels_from_regions(path, x, y)) == [True, True, True]
    assert list(labels_from_regions(path, x, y, color="red")) == [False, True, False]
    assert list(labels_from_regions(path, x, y, color=["red", "orange"])) == [False, True, True]
    assert list(labels_from_regions(path, x, y, tag="artifact")) == [False, True, True]
    assert list(labels_from_regions(spots_to_regions(Table({"x": [10.0], "y": [10.0]})),
                                    x, y, color="green")) == [True, False, False]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.reg"):
        read_regions(tmp_path / "missing.reg")


def test_default_colors_follow_the_decision():
    spots = Table({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0], "p_artifact": [0.9, 0.4, 0.1],
                   "rejected": [True, False, False], "uncertain": [False, True, False]})
    colors = [r.visual.get("edgecolor") or r.visual.get("color") for r in spots_to_regions(spots)]
    assert colors == [DEFAULT_COLORS[k] for k in ("rejected", "uncertain", "kept")]
    assert DEFAULT_COLORS["rejected"] == "red"


def test_products_of_a_frame_read_with_a_wcs_are_sky_regions(tmp_path):
    """A frame whose header has a celestial WCS (read_frame keeps it in the header, not in
    CCDData.wcs) gets its rejected spots as sky regions."""
    from regions import Regions

    from robopol_clean.instrument import load_profile
    from robopol_clean.io import read_frame
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.products import write_products
    from robopol_clean.simulate import simulate_frame

    sim = simulate_frame("robopol", seed=3, shape=(512, 512), n_stars=40, n_artifact_sources=3,
                         sky_center=(150.0, 20.0))
    path = tmp_path / "frame.fits"
    sim.ccd.write(path)
    profile = load_profile("robopol")
    ccd = read_frame(path, profile)
    result = reduce_frame(ccd, profile=profile, classifier="morphology", name=path.name)
    assert result.spots["rejected"].any()
    written = write_products(result, tmp_path / "out", "frame")
    regs = Regions.read(written["regions"], format="ds9")
    assert len(regs) == int(result.spots["rejected"].sum() + result.spots["uncertain"].sum())
    centre = regs[0].center
    assert centre.frame.name == "icrs" and abs(centre.ra.deg - 150.0) < 0.2
