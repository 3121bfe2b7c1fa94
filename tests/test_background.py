import subprocess
import sys
import warnings

import numpy as np
import pytest

from robopol_clean.background import (
    _clipped_stats,
    _mesh_background,
    _SortedRows,
    estimate_background,
)

NOISE = 10.0


def sky_frame(shape, *, sky=1000.0, n_stars=40, seed=0, trans=None):
    """Flat (or mask-modulated) sky with Gaussian noise and a few bright stars."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, sky) if trans is None else sky * np.asarray(trans, float)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y, a in zip(rng.uniform(0, shape[1], n_stars), rng.uniform(0, shape[0], n_stars),
                       rng.uniform(200, 20000, n_stars)):
        img += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8**2))
    return (img + rng.normal(0, NOISE, shape)).astype(np.float32)


def test_sorted_rows_statistics_match_numpy():
    rng = np.random.default_rng(1)
    values = rng.standard_t(3, (60, 97)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    values[5] = np.nan  # an empty row
    values[6, :] = 2.5  # a constant row
    rows = _SortedRows(values)
    np.testing.assert_array_equal(rows.n, np.count_nonzero(np.isfinite(values), axis=1))
    lo = rng.integers(0, 40, 60)
    hi = np.maximum(lo, np.minimum(rows.n, lo + rng.integers(0, 60, 60)))
    med = rows.median(lo, hi)
    mad = rows.mad(lo, hi, med)
    mean, std = rows.moments(lo, hi)
    cut = rng.normal(0, 1, 60)
    left, right = rows.bisect(lo, hi, cut), rows.bisect(lo, hi, cut, right=True)
    for i in range(60):
        run = rows.s[i, lo[i]: hi[i]]
        if run.size == 0:
            assert np.isnan(med[i]) and np.isnan(mad[i])
            continue
        assert med[i] == np.median(run)
        assert mad[i] == np.median(np.abs(run - med[i]))
        assert mean[i] == pytest.approx(np.mean(run.astype(float)), abs=1e-5)
        assert std[i] == pytest.approx(np.std(run.astype(float)), abs=1e-5)
        assert left[i] == lo[i] + np.count_nonzero(run < cut[i])
        assert right[i] == lo[i] + np.count_nonzero(run <= cut[i])


def _clipped_stats_reference(values, sigma=3.0, iters=3):
    """Median/MAD clipping with a new median per iteration (the straightforward way)."""
    v = np.array(values, np.float32, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(iters):
            med = np.nanmedian(v, axis=-1, keepdims=True)
            std = np.float32(1.4826) * np.nanmedian(np.abs(v - med), axis=-1, keepdims=True)
            with np.errstate(invalid="ignore"):
                v[np.abs(v - med) > sigma * np.maximum(std, np.float32(1e-12))] = np.nan
        med = np.nanmedian(v, axis=-1)
        return med, np.float32(1.4826) * np.nanmedian(np.abs(v - med[..., None]), axis=-1)


@pytest.mark.parametrize("shape", [(500,), (7, 11, 40), (3, 1)])
def test_clipped_stats_matches_reference(shape):
    rng = np.random.default_rng(2)
    values = rng.normal(100, 5, shape).astype(np.float32)
    values.reshape(-1)[rng.random(values.size) < 0.05] += 500  # outliers
    values.reshape(-1)[rng.random(values.size) < 0.05] = np.nan
    med, std = _clipped_stats(values)
    ref_med, ref_std = _clipped_stats_reference(values)
    assert med.shape == std.shape == shape[:-1]
    np.testing.assert_allclose(med, ref_med, rtol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)


@pytest.mark.parametrize("shape, box, exclude", [((256, 320), 64, 10.0), ((301, 250), 64, 75.0),
                                                 ((200, 200), 16, 50.0)])
def test_mesh_matches_photutils_background2d(shape, box, exclude):
    """The mesh estimate equals photutils' Background2D with the same estimators."""
    bg = pytest.importorskip("photutils.background")
    from astropy.stats import SigmaClip

    data = sky_frame(shape, seed=3)
    bad = np.zeros(shape, bool)
    bad[40:110, 60:200] = True  # a masked block: some boxes excluded and refilled
    bad[np.random.default_rng(4).random(shape) < 0.01] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = bg.Background2D(np.where(bad, np.float32(0), data), box, mask=bad,
                              exclude_percentile=exclude, filter_size=3,
                              sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
                              bkg_estimator=bg.SExtractorBackground(),
                              bkg_rms_estimator=bg.MADStdBackgroundRMS(),
                              interpolator=bg.BkgZoomInterpolator(order=1))
    sky, rms = _mesh_background(data, bad, box, 3, exclude_percentile=exclude)
    assert sky.dtype == rms.dtype == np.float32 and sky.shape == shape
    np.testing.assert_allclose(sky, ref.background, atol=1e-4 * NOISE)
    np.testing.assert_allclose(rms, ref.background_rms, atol=1e-4 * NOISE)


def test_mesh_with_every_box_short_of_pixels():
    """Boxes all below the exclusion rule: every box with a usable pixel is used."""
    data = sky_frame((128, 128), n_stars=0, seed=5)
    bad = np.ones(data.shape, bool)
    bad[::4, ::4] = False  # 1/16 of each box usable, < 25 %
    sky, rms = _mesh_background(data, bad, 64, 3, exclude_percentile=75.0)
    assert np.all(np.abs(sky - 1000.0) < 5) and np.all(np.abs(rms - NOISE) < 3)


def test_flat_sky_and_stars():
    data = sky_frame((512, 512), seed=6, n_stars=60)
    bkg, rms = estimate_background(data)
    assert bkg.dtype == rms.dtype == np.float32
    assert np.all(np.abs(bkg - 1000.0) < 3) and np.all(np.abs(rms / NOISE - 1) < 0.2)


def test_background_follows_mask_arms(profile):
    """A starless frame across the horizontal arm strips: flat residual in every zone."""
    shape = (1120, 200)  # rows 0-1119 include the three horizontal strips near y = 1043
    trans = profile.transmission(shape)
    assert (trans < 1).any()
    img = sky_frame(shape, n_stars=0, trans=trans, seed=10)
    bkg, rms = estimate_background(img, profile=profile)
    resid = (img - bkg) / NOISE
    for level in np.unique(trans):
        zone = trans == level
        assert abs(np.median(resid[zone])) < 0.3, level
        assert np.median(rms[zone]) == pytest.approx(NOISE, rel=0.2)


def test_background_follows_compact_mask(profile):
    """Around the central blob and the target squares (a frame corner holding both)."""
    sub = profile.for_region(800, 820, (450, 450))
    trans = sub.transmission((450, 450))
    img = sky_frame((450, 450), n_stars=0, trans=trans, seed=11)
    bkg, _ = estimate_background(img, profile=sub)
    resid = (img - bkg) / NOISE
    for level in np.unique(trans):
        assert abs(np.median(resid[trans == level])) < 0.3, level


def test_nan_and_mask_are_ignored(profile):
    img = sky_frame((256, 256), seed=12)
    img[10:30, 10:30] = np.nan
    img[100:120, :] = 1e6  # masked
    mask = np.zeros(img.shape, bool)
    mask[100:120, :] = True
    bkg, rms = estimate_background(img, mask=mask, profile=profile)
    assert np.all(np.isfinite(bkg)) and np.all(rms > 0)
    assert np.all(np.abs(bkg - 1000.0) < 5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (10, 10), (17, 40)])
def test_tiny_frames(profile, shape):
    img = np.random.default_rng(0).normal(100, 5, shape).astype(np.float32)
    bkg, rms = estimate_background(img, profile=profile)
    assert bkg.shape == rms.shape == shape and np.all(rms > 0)


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        estimate_background(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="no finite"):
        estimate_background(np.full((32, 32), np.nan))
    with pytest.raises(ValueError, match="mask shape"):
        estimate_background(np.zeros((8, 8)), mask=np.zeros((4, 4), bool))


def test_reduce_path_does_not_import_photutils():
    """photutils costs about a second to import; the reduce path does without it."""
    code = ("import sys, robopol_clean.background, robopol_clean.detection, robopol_clean.masking; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'photutils'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
