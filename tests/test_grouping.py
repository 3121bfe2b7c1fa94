from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from robopol_clean.detection import detect_spots
from robopol_clean.grouping import (
    GroupingResult,
    estimate_shift,
    fit_geometry,
    group_quadruplets,
)

#: The read-only reference data beside the checkout (absent for users and wheels).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

GROUP_COLUMNS = ["group_id", "x", "y", "n_spots", "complete", "spot_top", "spot_bottom", "spot_left",
                 "spot_right", "geom_resid"]


def make_spots(profile, centres, *, geometry=None, noise=0.15, seed=0, flux=None, shape=None):
    """A spots table for patterns at ``centres`` (n, 2), with truth columns star/true_channel."""
    rng = np.random.default_rng(seed)
    geom = profile.geometry if geometry is None else geometry
    centres = np.asarray(centres, float)
    pos = geom.spot_positions(centres[:, 0], centres[:, 1])
    rows = []
    star_flux = rng.uniform(500, 5000, len(centres)) if flux is None else np.asarray(flux, float)
    for ch in profile.channels:
        xs, ys = pos[ch]
        for k in range(len(centres)):
            rows.append((xs[k] + rng.normal(0, noise), ys[k] + rng.normal(0, noise),
                         star_flux[k] * rng.uniform(0.6, 1.6), k, ch))
    x, y, f, star, ch = (np.array(v) for v in zip(*rows))
    if shape is not None:
        ny, nx = shape
        inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
        x, y, f, star, ch = x[inside], y[inside], f[inside], star[inside], ch[inside]
    order = rng.permutation(x.size)
    t = Table({"x": x[order], "y": y[order], "peak": f[order], "star": star[order],
               "true_channel": ch[order]})
    t["spot_id"] = np.arange(len(t))
    return t


def grid_centres(n_side, lo=150.0, hi=1900.0, jitter=20.0, seed=0):
    rng = np.random.default_rng(seed)
    g = np.linspace(lo, hi, n_side)
    cx, cy = np.meshgrid(g, g)
    return np.column_stack([cx.ravel(), cy.ravel()]) + rng.uniform(-jitter, jitter, (n_side**2, 2))


def purity(result, spots, nc=4):
    """(number of complete groups made of one true star with the right channels, number impure)."""
    g = result.groups
    s = result.spots
    ok = bad = 0
    for row in g[g["complete"]]:
        ids = [row[f"spot_{ch}"] for ch in ("top", "bottom", "left", "right")]
        stars = set(np.asarray(s["star"])[ids])
        chans_ok = all(s["true_channel"][i] == ch for i, ch in zip(ids, ("top", "bottom", "left", "right")))
        if len(stars) == 1 and chans_ok:
            ok += 1
        else:
            bad += 1
    return ok, bad


def test_recovers_patterns(profile):
    centres = grid_centres(7)
    spots = make_spots(profile, centres, seed=1)
    res = group_quadruplets(spots, profile)
    assert isinstance(res, GroupingResult)
    assert res.groups.colnames == GROUP_COLUMNS
    ok, bad = purity(res, spots)
    assert ok == len(centres) and bad == 0
    g = res.groups
    assert np.all(g["complete"]) and np.all(g["n_spots"] == 4)
    np.testing.assert_array_equal(g["group_id"], np.arange(len(g)))
    # Channels written on the spots, groups' centres are the spot means.
    s = res.spots
    np.testing.assert_array_equal(s["channel"], s["true_channel"])
    for row in g[:5]:
        ids = [row[f"spot_{ch}"] for ch in profile.channels]
        assert np.allclose([row["x"], row["y"]], [s["x"][ids].mean(), s["y"][ids].mean()])
        assert np.all(s["group_id"][ids] == row["group_id"])
    assert np.all(g["geom_resid"] < 0.6)
    assert all(abs(v) < 0.15 for ch in profile.channels for v in g.meta["shift"][ch])
    assert g.meta["rms"] < 0.3
    assert "group_id" not in spots.colnames  # input untouched


def test_recovers_2px_shift(profile):
    """Per-channel changes of ~2 px (zero mean): found, and the grouping does not suffer."""
    shift = {"top": (0.8, 2.0), "bottom": (-0.5, -1.9), "left": (-2.0, 0.6), "right": (1.7, -0.7)}
    geom = profile.geometry.shifted(shift)
    spots = make_spots(profile, grid_centres(6, seed=3), geometry=geom, seed=2)
    res = group_quadruplets(spots, profile)
    ok, bad = purity(res, spots)
    assert ok == 36 and bad == 0
    for ch in profile.channels:
        np.testing.assert_allclose(res.groups.meta["shift"][ch], shift[ch], atol=0.15)
        np.testing.assert_allclose(res.shift[ch], shift[ch], atol=0.15)
    # Without refinement and with a tight tolerance the nominal geometry misses them.
    plain = group_quadruplets(spots, profile, refine=False, tolerance=1.0)
    assert purity(plain, spots)[0] < 36


def test_field_dependent_geometry(profile):
    """Offsets varying across the field: the polynomial model groups corner patterns."""
    corners = np.array([[150, 150], [1900, 150], [150, 1900], [1900, 1900], [1024, 1024]], float)
    spots = make_spots(profile, corners, seed=4)
    res = group_quadruplets(spots, profile)
    assert purity(res, spots) == (5, 0)


def test_dense_overlapping_field(profile):
    """Hundreds of overlapping patterns: global selection keeps groups pure."""
    rng = np.random.default_rng(5)
    centres = rng.uniform(100, 1100, (500, 2))
    spots = make_spots(profile, centres, seed=6, noise=0.2)
    res = group_quadruplets(spots, profile)
    ok, bad = purity(res, spots)
    assert ok >= 0.95 * len(centres)
    assert bad <= 0.01 * len(centres)


def test_incomplete_groups(profile):
    """Patterns cut by the frame edge or missing a spot become incomplete groups."""
    shape = (600, 600)
    centres = np.array([[300.0, 300.0], [20.0, 300.0], [300.0, 580.0], [150.0, 150.0]])
    spots = make_spots(profile, centres, seed=7, shape=shape)
    # Remove the top spot of the last pattern (e.g. undetected).
    drop = (spots["star"] == 3) & (spots["true_channel"] == "top")
    spots = spots[~drop]
    spots["spot_id"] = np.arange(len(spots))
    res = group_quadruplets(spots, profile)
    g = res.groups
    s = res.spots
    assert len(g) == 4
    by_star = {}
    for row in g:
        ids = [row[f"spot_{ch}"] for ch in profile.channels if row[f"spot_{ch}"] >= 0]
        by_star[int(s["star"][ids[0]])] = row
        assert len(set(s["star"][ids])) == 1
    assert by_star[0]["complete"] and by_star[0]["n_spots"] == 4
    assert not by_star[1]["complete"] and by_star[1]["n_spots"] == 3  # left spot off-chip
    assert by_star[1]["spot_left"] == -1
    assert not by_star[2]["complete"] and by_star[2]["n_spots"] == 3  # top spot off-chip
    assert not by_star[3]["complete"] and by_star[3]["spot_top"] == -1
    # Incomplete groups' centres are the model-implied centres.
    np.testing.assert_allclose([by_star[1]["x"], by_star[1]["y"]], centres[1], atol=0.5)
    assert np.all(s["group_id"] >= 0)


def test_unrelated_spots_not_grouped(profile):
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 2048, 30)
    y = rng.uniform(0, 2048, 30)
    spots = Table({"x": x, "y": y, "peak": np.full(30, 100.0)})
    res = group_quadruplets(spots, profile)
    assert not np.any(res.groups["complete"])
    assert np.count_nonzero(res.spots["group_id"] >= 0) <= 4
    ungrouped = res.spots["group_id"] < 0
    assert np.all(res.spots["channel"][ungrouped] == "")


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single(profile, n):
    spots = Table({"x": np.full(n, 500.0), "y": np.full(n, 500.0), "peak": np.ones(n)})
    res = group_quadruplets(spots, profile)
    assert len(res.groups) == 0 and res.groups.colnames == GROUP_COLUMNS
    assert len(res.spots) == n and "group_id" in res.spots.colnames and "channel" in res.spots.colnames
    assert res.geometry is profile.geometry


def test_missing_columns(profile):
    with pytest.raises(ValueError, match="'y'"):
        group_quadruplets(Table({"x": [1.0]}), profile)


def test_flux_inconsistent_spot_excluded(profile):
    spots = make_spots(profile, [[500.0, 500.0], [1500.0, 1500.0]], seed=9, flux=[1000.0, 1000.0])
    odd = np.flatnonzero((spots["star"] == 0) & (spots["true_channel"] == "left"))[0]
    spots["peak"][odd] = 1e6  # e.g. a bright ghost exactly where a faint star's spot should be
    res = group_quadruplets(spots, profile)
    assert res.spots["group_id"][odd] == -1
    g0 = res.groups[res.groups["spot_top"] == np.flatnonzero((spots["star"] == 0)
                                                             & (spots["true_channel"] == "top"))[0]]
    assert len(g0) == 1 and g0["n_spots"][0] == 3 and not g0["complete"][0]
    loose = group_quadruplets(spots, profile, flux_factor=1e9)
    assert loose.spots["group_id"][odd] >= 0


def test_estimate_shift(profile):
    shift = {"top": (1.0, 1.5), "bottom": (-1.0, -1.5), "left": (0.5, -0.5), "right": (-0.5, 0.5)}
    spots = make_spots(profile, grid_centres(5), geometry=profile.geometry.shifted(shift), seed=10)
    est = estimate_shift(spots["x"], spots["y"], profile.geometry)
    for ch in profile.channels:
        np.testing.assert_allclose(est[ch], shift[ch], atol=0.2)
    assert estimate_shift([1.0], [2.0], profile.geometry)["top"] == (0.0, 0.0)


def test_fit_geometry(profile):
    geom = profile.geometry
    coeffs = geom.coeffs.copy()
    coeffs[:, :, geom.terms.index("x")] += np.array([[0.8, -0.5], [-0.3, 0.6], [0.5, 0.2], [-1.0, -0.3]])
    coeffs[:, :, geom.terms.index("1")] += np.array([[0.4, 1.0], [-0.4, -1.0], [1.0, 0.0], [-1.0, 0.0]])
    true = geom.with_coeffs(coeffs)
    rng = np.random.default_rng(11)
    centres = rng.uniform(100, 1950, (300, 2))
    pos = true.spot_positions(centres[:, 0], centres[:, 1])
    positions = np.stack([np.column_stack(pos[ch]) for ch in geom.channels], axis=1)
    positions += rng.normal(0, 0.2, positions.shape)
    positions[0, 0] += 5.0  # an outlier
    fit = fit_geometry(positions, geom)
    assert not fit.used[0] and fit.n_used >= 295
    assert fit.rms < 0.35
    test = rng.uniform(100, 1950, (50, 2))
    diff = fit.geometry.offset_array(test[:, 0], test[:, 1]) - true.offset_array(test[:, 0], test[:, 1])
    assert np.sqrt(np.mean(diff**2)) < 0.1
    # A few patterns: the prior keeps the fit tame, and it still beats the start geometry.
    few = fit_geometry(positions[1:4], geom)
    assert np.abs(few.geometry.coeffs - geom.coeffs).max() < 2.0
    start = geom.offset_array(test[:, 0], test[:, 1]) - true.offset_array(test[:, 0], test[:, 1])
    diff_few = few.geometry.offset_array(test[:, 0], test[:, 1]) - true.offset_array(test[:, 0], test[:, 1])
    assert np.sqrt(np.mean(diff_few**2)) < 0.7 * np.sqrt(np.mean(start**2))
    empty = fit_geometry(np.zeros((0, 4, 2)), geom)
    assert empty.geometry is geom and empty.n_used == 0
    with pytest.raises(ValueError, match="shape"):
        fit_geometry(np.zeros((3, 2, 2)), geom)


def _render(shape, xs, ys, amps, seed=0, fwhm=4.3, sky=100.0, noise=8.0):
    rng = np.random.default_rng(seed)
    img = np.full(shape, sky)
    sig = fwhm / 2.3548
    for x, y, a in zip(xs, ys, amps):
        x0, x1 = max(int(x) - 12, 0), min(int(x) + 13, shape[1])
        y0, y1 = max(int(y) - 12, 0), min(int(y) + 13, shape[0])
        if x0 < x1 and y0 < y1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            img[y0:y1, x0:x1] += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sig**2))
    return (img + rng.normal(0, noise, shape)).astype(np.float32)


def test_detect_then_group_shifted_image(profile):
    """End to end on pixels: 2-px channel shifts, overlapping patterns, partial patterns."""
    shift = {"top": (0.0, 2.0), "bottom": (0.0, -2.0), "left": (-1.5, 1.0), "right": (1.5, -1.0)}
    geom = profile.geometry.shifted(shift)
    rng = np.random.default_rng(12)
    centres = rng.uniform(30, 480, (24, 2))
    pos = geom.spot_positions(centres[:, 0], centres[:, 1])
    xs = np.concatenate([pos[ch][0] for ch in profile.channels])
    ys = np.concatenate([pos[ch][1] for ch in profile.channels])
    amps = np.tile(rng.uniform(300, 2000, 24), 4)
    img = _render((512, 512), xs, ys, amps, seed=13)
    spots = detect_spots(img, profile=profile).spots
    res = group_quadruplets(spots, profile)
    g = res.groups[res.groups["complete"]]
    inside = np.all([(pos[ch][0] > 3) & (pos[ch][0] < 508) & (pos[ch][1] > 3) & (pos[ch][1] < 508)
                     for ch in profile.channels], axis=0)
    # Each complete group sits on an injected pattern (all four spots within 1 px).
    found = 0
    for row in g:
        k = np.argmin(np.hypot(centres[:, 0] - row["x"], centres[:, 1] - row["y"]))
        for ch in profile.channels:
            i = row[f"spot_{ch}"]
            assert np.hypot(spots["x"][i] - pos[ch][0][k], spots["y"][i] - pos[ch][1][k]) < 1.0
        found += 1
    assert found >= 0.9 * inside.sum()


def test_simulated_frame_groups(small_sim, profile):
    data = np.asarray(small_sim.ccd.data, np.float32)
    spots = detect_spots(data, profile=profile).spots
    res = group_quadruplets(spots, profile)
    truth = small_sim.spots
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    d = np.hypot(tx[None, :] - np.asarray(spots["x"])[:, None], ty[None, :] - np.asarray(spots["y"])[:, None])
    j = d.argmin(axis=1)
    matched = d.min(axis=1) < 1.5
    star = np.where(matched, np.asarray(truth["star_id"])[j], -1)
    chan = np.where(matched, np.asarray(truth["channel"]).astype(str)[j], "")
    g = res.groups[res.groups["complete"]]
    assert len(g) >= 10
    pure = 0
    for row in g:
        ids = [row[f"spot_{ch}"] for ch in profile.channels]
        if len(set(star[ids])) == 1 and star[ids[0]] >= 0 and list(chan[ids]) == list(profile.channels):
            pure += 1
    assert pure >= 0.9 * len(g)
    assert res.groups.meta["rms"] < 0.6


@pytest.mark.shared
def test_real_frame_j1428(profile):
    """The real J1428 frame: the hand-labelled quadruplets are found, geometry matches."""
    path = SHARED_DATA / "J1428.fits"
    if not path.exists():
        pytest.skip("the real RoboPol frame (../shared/data) is not available")
    from astropy.io import fits

    data = fits.getdata(path).astype(np.float32)
    quads = Table.read(SHARED_DATA / "J1428_quads.ecsv")
    spots = detect_spots(data, profile=profile).spots
    res = group_quadruplets(spots, profile)
    s, g = res.spots, res.groups
    sx, sy = np.asarray(s["x"]), np.asarray(s["y"])
    recovered = 0
    for row in quads:
        gids = set()
        ok = True
        for ch in profile.channels:
            d = np.hypot(sx - row[f"x_{ch}"], sy - row[f"y_{ch}"])
            i = int(np.argmin(d))
            ok &= bool(d[i] < 2.0 and s["channel"][i] == ch)
            gids.add(int(s["group_id"][i]))
        if ok and len(gids) == 1 and -1 not in gids and g["complete"][gids.pop()]:
            recovered += 1
    assert recovered >= 20, f"{recovered} of {len(quads)} labelled quadruplets recovered"
    # The fitted geometry reproduces the labelled spot offsets.
    pos = np.stack([np.column_stack([quads[f"x_{ch}"], quads[f"y_{ch}"]]) for ch in profile.channels], axis=1)
    cen = pos.mean(axis=1)
    model = np.moveaxis(res.geometry.offset_array(cen[:, 0], cen[:, 1]), -1, 0)
    resid = np.hypot(*(pos - cen[:, None, :] - model).transpose(2, 0, 1))
    assert np.sqrt(np.mean(resid**2)) < 0.6
    assert g.meta["rms"] < 0.6
    assert all(abs(v) < 1.0 for ch in profile.channels for v in g.meta["shift"][ch])
