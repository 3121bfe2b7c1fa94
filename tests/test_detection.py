import numpy as np
import pytest

from robopol_clean.detection import (
    SPOT_COLUMNS,
    DetectionResult,
    detect_spots,
    estimate_background,
    saturation_level,
)

SKY = 200.0
NOISE = 10.0
FWHM = 4.3


def render(shape, xs, ys, amps, *, fwhm=FWHM, sky=SKY, noise=NOISE, seed=0, trans=None):
    """Gaussian spots of peak amplitude ``amps`` on a flat (or mask-modulated) sky."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    img = np.full(shape, sky, float) if trans is None else sky * np.asarray(trans, float)
    sig = fwhm / 2.3548
    r = int(4 * sig) + 2
    for x, y, a in zip(np.atleast_1d(xs), np.atleast_1d(ys), np.atleast_1d(amps)):
        x0, x1 = max(int(x) - r, 0), min(int(x) + r + 1, nx)
        y0, y1 = max(int(y) - r, 0), min(int(y) + r + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sig**2))
    if noise:
        img += rng.normal(0.0, noise, shape)
    return img.astype(np.float32)


def quad_spots(profile, centres):
    """Spot positions (x, y, channel index) of patterns at ``centres`` [(x, y), ...]."""
    cx = np.array([c[0] for c in centres], float)
    cy = np.array([c[1] for c in centres], float)
    pos = profile.spot_positions(cx, cy)
    xs = np.concatenate([pos[ch][0] for ch in profile.channels])
    ys = np.concatenate([pos[ch][1] for ch in profile.channels])
    return xs, ys


@pytest.fixture(scope="module")
def synthetic(profile):
    """A 400 x 400 frame: 4 separate patterns (16 spots) at sub-pixel positions."""
    rng = np.random.default_rng(3)
    centres = [(110.3, 110.7), (290.6, 105.2), (105.1, 285.4), (285.8, 290.9)]
    xs, ys = quad_spots(profile, centres)
    amps = rng.uniform(400, 2000, xs.size)
    img = render((400, 400), xs, ys, amps, seed=1)
    return img, xs, ys, amps


def nearest(spots, xs, ys):
    d = np.hypot(np.asarray(spots["x"])[None, :] - xs[:, None], np.asarray(spots["y"])[None, :] - ys[:, None])
    return d.min(axis=1), d.argmin(axis=1)


def test_recovers_injected_spots(synthetic, profile):
    img, xs, ys, _ = synthetic
    res = detect_spots(img, profile=profile)
    assert isinstance(res, DetectionResult)
    spots = res.spots
    assert list(spots.colnames) == list(SPOT_COLUMNS)
    dist, _ = nearest(spots, xs, ys)
    assert np.all(dist < 0.3), dist  # bright spots: centroids to better than 0.3 px
    assert len(spots) == xs.size  # nothing spurious
    assert np.all(spots["snr"] > 20) and not spots["saturated"].any()
    np.testing.assert_allclose(spots["fwhm"], FWHM, rtol=0.15)
    assert abs(spots.meta["fwhm"] - FWHM) < 0.3
    assert np.all(spots["elongation"] < 1.3)
    np.testing.assert_array_equal(spots["spot_id"], np.arange(len(spots)))
    np.testing.assert_allclose(spots["sky"], SKY, atol=3)
    np.testing.assert_allclose(spots["sky_rms"], NOISE, rtol=0.15)
    assert np.all(spots["transmission"] == 1.0)
    assert spots["x"].unit == "pix" and spots["peak"].unit == "adu"


def test_segmentation_contract(synthetic, profile):
    img, *_ = synthetic
    res = detect_spots(img, profile=profile)
    seg = res.segmentation
    assert seg.shape == img.shape and seg.dtype == np.int32
    labels = np.asarray(res.spots["label"])
    assert len(set(labels)) == len(labels) and labels.min() >= 1
    xi = np.rint(res.spots["x"]).astype(int)
    yi = np.rint(res.spots["y"]).astype(int)
    np.testing.assert_array_equal(seg[yi, xi], labels)
    np.testing.assert_array_equal(np.bincount(seg.ravel())[labels], res.spots["npix"])
    assert set(np.unique(seg)) == {0, *labels}
    assert res.background.dtype == np.float32 and res.background_rms.dtype == np.float32


def test_faint_completeness(profile):
    rng = np.random.default_rng(7)
    xs = rng.uniform(20, 236, 25)
    ys = rng.uniform(20, 236, 25)
    keep = np.ones(25, bool)
    for i in range(25):  # keep them separated
        keep[i] = np.all(np.hypot(xs[:i][keep[:i]] - xs[i], ys[:i][keep[:i]] - ys[i]) > 12)
    xs, ys = xs[keep], ys[keep]
    img = render((256, 256), xs, ys, np.full(xs.size, 8 * NOISE), seed=2)  # peak S/N 8
    spots = detect_spots(img, profile=profile).spots
    dist, _ = nearest(spots, xs, ys)
    assert np.mean(dist < 1.0) >= 0.9
    assert len(spots) <= xs.size + 2


def test_empty_and_pure_noise(profile):
    img = render((128, 128), [], [], [], seed=5)
    res = detect_spots(img, profile=profile)
    assert len(res.spots) == 0
    assert list(res.spots.colnames) == list(SPOT_COLUMNS)
    assert not res.segmentation.any()
    assert res.spots.meta["fwhm"] == pytest.approx(profile.fwhm)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (10, 10), (17, 40)])
def test_tiny_frames(profile, shape):
    img = np.random.default_rng(0).normal(100, 5, shape).astype(np.float32)
    res = detect_spots(img, profile=profile)
    assert res.segmentation.shape == shape
    bkg, rms = estimate_background(img, profile=profile)
    assert bkg.shape == shape and np.all(rms > 0)


def test_nan_inf_and_mask(profile):
    img = render((128, 128), [64.3, 1.2, 100.0], [40.7, 100.2, 100.0], [2000, 2000, 2000], seed=4)
    img[10:20, 10:20] = np.nan
    img[50, 50] = np.inf
    img[60, :] = -np.inf
    mask = np.zeros(img.shape, bool)
    mask[95:106, 95:106] = True  # hides the third spot
    res = detect_spots(img, profile=profile, mask=mask)
    spots = res.spots
    assert np.all(np.isfinite(spots["x"])) and np.all(np.isfinite(spots["snr"]))
    dist, _ = nearest(spots, np.array([64.3, 1.2]), np.array([40.7, 100.2]))
    assert np.all(dist < 1.0)  # including the one on the frame edge
    assert np.all(np.hypot(spots["x"] - 100, spots["y"] - 100) > 5)
    assert np.all(np.isfinite(res.background)) and np.all(res.background_rms > 0)


def test_all_nan_frame(profile):
    res = detect_spots(np.full((40, 40), np.nan, np.float32), profile=profile)
    assert len(res.spots) == 0


def test_saturated_core_flagged(profile):
    img = render((128, 128), [40.2, 90.6], [60.4, 61.3], [200000, 800], seed=6)
    level = 20000.0
    img = np.minimum(img, level)
    assert saturation_level(img, profile) == level  # clipped: many pixels at the ceiling
    spots = detect_spots(img, profile=profile).spots
    assert len(spots) == 2
    i = int(np.argmin(spots["x"]))
    assert spots["saturated"][i] and not spots["saturated"][1 - i]
    assert abs(spots["x"][i] - 40.2) < 0.5 and abs(spots["y"][i] - 60.4) < 0.5


def test_streak_is_one_elongated_spot(profile):
    """A comet-like horizontal streak (bright head, fading tail) is one spot and footprint."""
    shape = (96, 128)
    xs = np.arange(40.0, 75.0, 0.5)
    amps = 600 * np.exp(-(xs - 40.0) / 12.0)  # head at x=40, tail towards +x
    img = render(shape, xs, np.full(xs.size, 48.3), amps / 4, seed=8)
    res = detect_spots(img, profile=profile)
    spots = res.spots
    assert len(spots) == 1
    s = spots[0]
    assert s["elongation"] > 2.5
    assert abs(s["orientation"]) < 10 or abs(abs(s["orientation"]) - 180) < 10
    assert s["asymmetry"] > 0.3
    footprint = res.segmentation == s["label"]
    cols = np.flatnonzero(footprint.any(axis=0))
    assert cols.min() <= 38 and cols.max() >= 68


def add_streak(img, x, y, amp, *, length=25.0, fwhm_y=4.0, tail=0.1, direction=-1):
    """Add a reflection streak: a bright head at (x, y) and a fading tail along ``direction`` x.

    As in :mod:`robopol_clean.simulate`: the head is 1.5 times longer than wide, the tail
    starts at ``tail`` times the head and fades to 3% of it ``length`` px from the head's far
    side. Returns ``img`` (changed in place).
    """
    ny, nx = img.shape
    yy, xx = np.mgrid[:ny, :nx]
    sv = fwhm_y / 2.3548
    sh = 1.5 * sv
    tau = (length - 2.65 * sh) / np.log(tail / 0.03)
    u = (xx - x) * direction
    up = np.clip(u, 0, None)
    along = np.exp(-0.5 * (u / sh) ** 2) + tail * np.exp(-up / tau) * (1 - np.exp(-0.5 * (up / sh) ** 2))
    img += amp * along * np.exp(-0.5 * ((yy - y) / sv) ** 2)
    return img


def star_and_streak(sep, seed, clipped):
    """A star and, ``sep`` px to its right, a 25-px streak whose tail points at the star.

    ``clipped``: an 8-bit-like rendering (sky 50, noise 29, clipped to 0-255, as the real
    frame) where both the star's and the streak's cores are clipped; otherwise the linear
    sky of this module's other tests.
    """
    shape = (64, 128)
    star = (30.3, 32.2)
    head = (star[0] + sep, 32.6)
    sky, noise, star_amp, head_amp = (50.0, 29.0, 1000.0, 2000.0) if clipped else (SKY, NOISE, 3000.0, 600.0)
    img = render(shape, [star[0]], [star[1]], [star_amp], sky=sky, noise=0).astype(float)
    add_streak(img, *head, head_amp)
    img += np.random.default_rng(seed).normal(0.0, noise, shape)
    if clipped:
        img = np.clip(np.round(img), 0, 255)
    return img.astype(np.float32), star, head


@pytest.mark.parametrize("clipped", [False, True], ids=["linear", "clipped"])
@pytest.mark.parametrize("sep", [20, 30, 40])
def test_streak_beside_star_is_its_own_spot(profile, sep, clipped):
    """A streak 20-40 px from a star is neither folded into it nor split along its tail.

    Faint maxima on the tail's end, next to the star's wing, must not chain the two.
    """
    for seed in range(8):
        img, star, head = star_and_streak(sep, seed, clipped)
        spots = detect_spots(img, profile=profile).spots
        assert len(spots) == 2, (seed, spots["x", "y", "snr"])
        dist, idx = nearest(spots, np.array([star[0], head[0]]), np.array([star[1], head[1]]))
        assert dist[0] < 1.0 and dist[1] < 3.0 and idx[0] != idx[1], (seed, dist)
        streak = spots[idx[1]]
        assert streak["elongation"] > 1.2  # its tail may go to the star's share of the footprint
        assert bool(streak["saturated"]) == clipped


def test_cosmic_ray_is_sharp(profile):
    img = render((64, 64), [32.0], [30.0], [1500], seed=9)
    img[10, 50] += 3000.0  # single hot pixel
    spots = detect_spots(img, profile=profile).spots
    assert len(spots) == 2
    cr = spots[np.argmax(spots["x"])]
    star = spots[np.argmin(spots["x"])]
    assert cr["sharpness"] > 2 * star["sharpness"]
    assert cr["fwhm"] < 0.5 * star["fwhm"]


def test_background_follows_mask_arms(profile):
    """A starless frame across the horizontal arm strips: flat residual, no detections."""
    shape = (1120, 200)  # rows 0-1119 include the three horizontal strips near y = 1043
    trans = profile.transmission(shape)
    assert (trans < 1).any()
    img = render(shape, [], [], [], trans=trans, sky=1000.0, noise=NOISE, seed=10)
    bkg, rms = estimate_background(img, profile=profile)
    resid = (img - bkg) / NOISE
    for level in np.unique(trans):
        zone = trans == level
        assert abs(np.median(resid[zone])) < 0.3, level
    res = detect_spots(img, profile=profile, background=bkg, background_rms=rms)
    assert len(res.spots) <= 1


def test_spot_on_arm_and_usable(profile):
    shape = (1120, 200)
    trans = profile.transmission(shape)
    img = render(shape, [100.0, 100.0], [1043.0, 300.0], [1500, 1500], trans=trans, sky=1000.0, seed=11)
    spots = detect_spots(img, profile=profile).spots
    assert len(spots) == 2
    on_arm = spots[np.argmax(spots["y"])]
    assert on_arm["transmission"] == pytest.approx(0.5)
    assert on_arm["usable"] and abs(on_arm["y"] - 1043.0) < 0.3
    edge = detect_spots(render((200, 200), [20.0], [100.0], [1500]), profile=profile).spots
    assert not edge["usable"][0]  # within the 60-px border


def test_clipped_rendering_floor_is_ignored(profile):
    """An 8-bit-like frame clipped at 0 where the sky is dark yields no spurious spots there."""
    rng = np.random.default_rng(12)
    img = rng.normal(30, 25, (200, 200))
    img[:, 100:] = rng.normal(-20, 25, (200, 100))  # dark zone, mostly clipped
    img = np.clip(img, 0, 255).astype(np.float32)
    spots = detect_spots(img, profile=None).spots
    assert np.count_nonzero(spots["x"] > 110) == 0


def test_shape_errors(profile):
    with pytest.raises(ValueError, match="2-D"):
        detect_spots(np.zeros((2, 3, 4)), profile=profile)
    with pytest.raises(ValueError, match="mask shape"):
        detect_spots(np.zeros((8, 8)), profile=profile, mask=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="no finite"):
        estimate_background(np.full((32, 32), np.nan), profile=profile)


def test_simulated_frame(small_sim, profile):
    """The simulator's frame: bright real spots found with sub-pixel centroids."""
    data = np.asarray(small_sim.ccd.data, np.float32)
    res = detect_spots(data, profile=profile)
    truth = small_sim.spots
    real = ~np.asarray(truth["is_artifact"], bool) & np.asarray(truth["in_frame"], bool)
    bright = real & (np.asarray(truth["peak"], float) > 30 * np.median(res.background_rms))
    xs = np.asarray(truth["x"], float)[bright]
    ys = np.asarray(truth["y"], float)[bright]
    dist, _ = nearest(res.spots, xs, ys)
    assert np.mean(dist < 1.0) > 0.9
    assert np.median(dist) < 0.2
    assert abs(res.spots.meta["fwhm"] - small_sim.params["fwhm"]) < 0.15 * small_sim.params["fwhm"]


def test_noise_free_frame(profile):
    """A constant sky (no noise, no clipping) is not mistaken for a clipped rendering."""
    img = render((128, 128), [40.3, 90.2], [50.6, 80.1], [500, 300], noise=0)
    spots = detect_spots(img, profile=profile).spots
    assert len(spots) == 2
    dist, _ = nearest(spots, np.array([40.3, 90.2]), np.array([50.6, 80.1]))
    assert np.all(dist < 0.1)


@pytest.mark.shared
def test_real_frame_artifacts_and_stars_detected(real_frame, profile):
    """J1428 (8-bit rendering): each labelled artifact is one spot, every labelled star spot found."""
    from astropy.io import fits
    from astropy.table import Table

    data = fits.getdata(real_frame / "J1428.fits").astype(np.float32)
    art = Table.read(real_frame / "J1428_artifacts.ecsv")
    quads = Table.read(real_frame / "J1428_quads.ecsv")
    spots = detect_spots(data, profile=profile).spots
    x, y = np.asarray(spots["x"]), np.asarray(spots["y"])
    # within a labelled artifact's horizontal extent (cosmic rays: a few pixels)
    half = np.maximum(np.asarray(art["length_px"], float), 4.0)[:, None] / 2 + 3.0
    inside = (np.abs(y[None, :] - np.asarray(art["y"])[:, None]) <= 3.0) & \
        (np.abs(x[None, :] - np.asarray(art["x_center"])[:, None]) <= half)
    count = inside.sum(axis=1)
    assert np.all(count == 1), list(zip(art["id"], count))
    xs = np.concatenate([quads[f"x_{ch}"] for ch in profile.channels])
    ys = np.concatenate([quads[f"y_{ch}"] for ch in profile.channels])
    dist, _ = nearest(spots, xs, ys)
    assert np.all(dist < 2.0), np.sort(dist)[-5:]


@pytest.mark.parametrize("shape", [(2048, 96), (70, 130), (5, 3)])
@pytest.mark.parametrize("mode, sigma", [("constant", 1.83), ("nearest", 3.7)])
def test_gaussian_filter_matches_ndimage(shape, mode, sigma):
    from scipy import ndimage

    from robopol_clean.detection import _gaussian_filter

    img = np.random.default_rng(13).normal(0.0, 10.0, shape).astype(np.float32)
    img[shape[0] // 2, shape[1] // 2] = 1e4
    ref = ndimage.gaussian_filter(img, sigma, mode=mode, truncate=3.5)
    out = _gaussian_filter(img, sigma, truncate=3.5, mode=mode)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_local_maxima_match_maximum_filter():
    """Same maxima as scipy's maximum filter; one pixel per plateau, the first in raster order."""
    from scipy import ndimage

    from robopol_clean.detection import _local_maxima

    rng = np.random.default_rng(14)
    img = ndimage.gaussian_filter(rng.normal(0, 1, (300, 200)), 1.5).astype(np.float32) * 10
    img[0, 50] = img[299, 199] = 50.0  # maxima on the frame edge
    img[100:103, 100:102] = 60.0  # a plateau
    px, py, val = _local_maxima(img, 2.0, 3)
    ref = (img >= ndimage.maximum_filter(img, 7, mode="constant", cval=-np.inf)) & (img >= 2.0)
    ref[100:103, 100:102] = False
    ref[100, 100] = True
    ry, rx = np.nonzero(ref)
    np.testing.assert_array_equal(py, ry)
    np.testing.assert_array_equal(px, rx)
    np.testing.assert_array_equal(val, img[ry, rx])


def test_saturation_level_of_integer_and_nan_frames(profile):
    img = np.full((20, 20), 100, np.uint8)
    img[:5, :6] = 255
    assert saturation_level(img, profile) == 255.0
    assert saturation_level(np.full((4, 4), np.nan), profile) == profile.saturation
    assert saturation_level(np.zeros((6, 6)), None) == 0.0  # 36 pixels at the ceiling
    assert saturation_level(np.arange(16.0).reshape(4, 4), None) == np.inf


def test_shared_footprint_is_split(profile):
    """Three blended stars: three spots, each owning the pixels nearest to it."""
    xs, ys = np.array([40.0, 48.0, 44.0]), np.array([40.0, 40.0, 47.0])
    img = render((90, 90), xs, ys, [3000, 2000, 2500], seed=15)
    res = detect_spots(img, profile=profile)
    assert len(res.spots) == 3
    labels = np.unique(res.segmentation[35:52, 35:53])
    assert set(labels) >= set(res.spots["label"])  # one footprint, split three ways
    dist, idx = nearest(res.spots, xs, ys)
    assert np.all(dist < 0.5)
    for x, y, i in zip(xs, ys, idx):
        assert res.segmentation[int(y), int(x)] == res.spots["label"][i]
