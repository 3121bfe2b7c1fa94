import numpy as np
import pytest

from robopol_clean.masking import (
    apertures_touch_mask,
    combine_masks,
    dilate_mask,
    disk_structure,
    footprint_mask,
    unusable_pixels,
)


@pytest.fixture
def segmentation():
    seg = np.zeros((64, 80), int)
    seg[10:13, 10:30] = 1  # a streak
    seg[40:44, 50:54] = 2  # a star
    seg[50:52, 5:8] = 5
    return seg


def test_footprint_mask_selects_labels(segmentation):
    m = footprint_mask(segmentation.shape, segmentation, [1, 5], dilate=0)
    assert m.dtype == bool and m.shape == segmentation.shape
    np.testing.assert_array_equal(m, np.isin(segmentation, [1, 5]))
    assert not m[40:44, 50:54].any()


def test_footprint_mask_dilation(segmentation):
    m = footprint_mask(segmentation.shape, segmentation, np.array([1]), dilate=2)
    assert m[8, 20] and m[14, 20] and m[11, 8] and m[11, 31]  # grown by 2 px
    assert not m[7, 20] and not m[11, 32]
    assert not m[8, 8]  # disk, not square: the corner is further than 2 px
    # dilation near the frame edge stays inside the frame
    seg = np.zeros((20, 20), int)
    seg[0, 0] = 3
    m = footprint_mask((20, 20), seg, [3], dilate=3)
    assert m[3, 0] and m[0, 3] and not m[3, 3]
    assert m.sum() == disk_structure(3)[3:, 3:].sum()


def test_footprint_mask_empty_and_errors(segmentation):
    assert not footprint_mask(segmentation.shape, segmentation, []).any()
    assert not footprint_mask(segmentation.shape, segmentation, [0, 99]).any()
    with pytest.raises(ValueError, match="shape"):
        footprint_mask((10, 10), segmentation, [1])
    with pytest.raises(ValueError, match="dilate"):
        footprint_mask(segmentation.shape, segmentation, [1], dilate=-1)


def test_combine_masks_ors_without_mutating():
    a = np.zeros((4, 4), bool)
    a[0, 0] = True
    b = np.zeros((4, 4), bool)
    b[3, 3] = True
    c = combine_masks(a, b)
    assert c[0, 0] and c[3, 3] and c.sum() == 2
    assert a.sum() == 1 and b.sum() == 1  # inputs untouched
    d = combine_masks(None, b)
    assert d is not b and np.array_equal(d, b)
    assert combine_masks(None, None) is None
    assert np.array_equal(combine_masks(a, None), a)
    with pytest.raises(ValueError, match="shapes"):
        combine_masks(a, np.zeros((3, 3), bool))


def test_apertures_touch_mask():
    mask = np.zeros((50, 50), bool)
    mask[25, 30] = True
    x = np.array([25.0, 25.0, 10.0, 30.0])
    y = np.array([25.0, 20.0, 10.0, 25.0])
    touch = apertures_touch_mask(mask, x, y, radius=5.0)
    # pixel (30, 25) spans x 29.5-30.5: 4.5 px from (25, 25) -> touches; (25, 20) is 7 away
    assert list(touch) == [True, False, False, True]
    assert not apertures_touch_mask(mask, x, y, radius=4.4)[0]
    assert not apertures_touch_mask(np.zeros((50, 50), bool), x, y, 5.0).any()
    assert apertures_touch_mask(mask, x.reshape(2, 2), y.reshape(2, 2), 5.0).shape == (2, 2)
    assert apertures_touch_mask(mask, [], [], 5.0).size == 0
    off = apertures_touch_mask(mask, [-100.0, np.nan], [-100.0, 25.0], 5.0)
    assert not off.any()


def test_apertures_touch_mask_matches_photutils_exact_overlap():
    """Any overlap: the same answer as photutils' exact aperture photometry of the mask."""
    aperture = pytest.importorskip("photutils.aperture")
    rng = np.random.default_rng(3)
    for trial in range(40):
        ny, nx = rng.integers(5, 60, 2)
        mask = rng.random((ny, nx)) < rng.choice([0.002, 0.01, 0.05])
        x = rng.uniform(-8, nx + 8, 60)
        y = rng.uniform(-8, ny + 8, 60)
        if trial % 3 == 0:  # centres on pixel centres and edges: tangent circles
            x, y = np.round(2 * x) / 2, np.round(2 * y) / 2
        radius = rng.choice([0.5, 1.0, 2.5, 3.0, 4.4, 7.3])
        ap = aperture.CircularAperture(np.column_stack([x, y]), r=radius)
        overlap, _ = ap.do_photometry(mask.astype(np.float32), method="exact")
        np.testing.assert_array_equal(apertures_touch_mask(mask, x, y, radius),
                                      np.nan_to_num(overlap) > 0)


@pytest.mark.parametrize("structure", [disk_structure(2), np.ones((3, 5), bool),
                                       np.eye(3, dtype=bool)[::-1]])
@pytest.mark.parametrize("fraction", [0.002, 0.3])  # sparse (scattered) and dense (bounding box)
def test_dilate_mask_matches_binary_dilation(structure, fraction):
    from scipy import ndimage

    mask = np.random.default_rng(5).random((40, 50)) < fraction
    mask[0, 10] = mask[20, 49] = mask[39, 0] = True  # on the edges
    before = mask.copy()
    out = dilate_mask(mask, structure)
    np.testing.assert_array_equal(out, ndimage.binary_dilation(mask, structure=structure))
    assert out is not mask and np.array_equal(mask, before)  # input untouched
    assert not dilate_mask(np.zeros((5, 5), bool), structure).any()


def test_unusable_pixels_ors_non_finite_with_the_mask():
    data = np.ones((3, 4))
    data[0, 1], data[2, 3] = np.nan, np.inf
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    bad = unusable_pixels(data, mask)
    assert bad.sum() == 3 and bad[0, 1] and bad[2, 3] and bad[1, 2]
    assert mask.sum() == 1 and bad is not mask  # inputs untouched
    assert unusable_pixels(data).sum() == 2
    with pytest.raises(ValueError, match="mask shape"):
        unusable_pixels(data, np.zeros((2, 2), bool))
