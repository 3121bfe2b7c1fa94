import numpy as np
import pytest

from robopol_clean.cutouts import cutout_origin, extract_cutouts, resample_image, resampled_cutouts


@pytest.fixture
def image():
    return np.arange(20 * 30, dtype=float).reshape(20, 30)  # ny=20, nx=30


def test_interior_matches_slicing(image):
    x = np.array([10.2, 15.0, 20.6])
    y = np.array([8.0, 10.4, 9.5])
    cut = extract_cutouts(image, x, y, size=7)
    assert cut.shape == (3, 7, 7) and cut.dtype == np.float32
    for i in range(3):
        xi, yi = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        np.testing.assert_array_equal(cut[i], image[yi - 3:yi + 4, xi - 3:xi + 4])
        assert cut[i, 3, 3] == image[yi, xi]


def test_even_size_centre_index(image):
    cut = extract_cutouts(image, [12], [9], size=8)
    assert cut[0, 4, 4] == image[9, 12]
    x0, y0 = cutout_origin([12], [9], 8)
    assert (x0[0], y0[0]) == (8, 5)


def test_edges_are_filled_and_masked(image):
    cut, valid = extract_cutouts(image, [0.0, 29.0, 5.0], [0.0, 19.0, 100.0], size=5, fill=-1.0,
                                 return_mask=True)
    # lower-left corner: the centre is pixel (0, 0); two rows/columns outside.
    assert cut[0, 2, 2] == image[0, 0]
    assert np.all(cut[0, :2, :] == -1) and np.all(cut[0, :, :2] == -1)
    np.testing.assert_array_equal(cut[0, 2:, 2:], image[0:3, 0:3])
    assert valid[0].sum() == 9
    # upper-right corner
    np.testing.assert_array_equal(cut[1, :3, :3], image[17:20, 27:30])
    assert np.all(cut[1, 3:, :] == -1)
    # entirely outside
    assert np.all(cut[2] == -1) and not valid[2].any()
    np.testing.assert_array_equal(cut == -1, ~valid)


def test_nan_centres_and_empty_input(image):
    cut = extract_cutouts(image, [np.nan], [3.0], size=3, fill=7.0)
    assert np.all(cut == 7.0)
    empty, mask = extract_cutouts(image, [], [], size=4, return_mask=True)
    assert empty.shape == (0, 4, 4) and mask.shape == (0, 4, 4)


def test_cutout_larger_than_frame():
    img = np.ones((3, 4))
    cut, valid = extract_cutouts(img, [1.0], [1.0], size=9, return_mask=True)
    assert cut.shape == (1, 9, 9) and valid.sum() == 12 and cut.sum() == 12


def test_errors(image):
    with pytest.raises(ValueError, match="2-D"):
        extract_cutouts(np.zeros((2, 2, 2)), [0], [0])
    with pytest.raises(ValueError, match="size"):
        extract_cutouts(image, [0], [0], size=0)
    with pytest.raises(ValueError, match="same length"):
        extract_cutouts(image, [0, 1], [0])


def test_many_cutouts_inside_and_across_the_edges():
    """1000 cutouts anywhere (some partly off the frame) match a per-cutout slice.
    (Their speed is measured by benchmarks/bench_stages.py, not here.)"""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2048, 2048)).astype(np.float32)
    x = rng.uniform(-20, 2068, 1000)
    y = rng.uniform(-20, 2068, 1000)
    cut = extract_cutouts(img, x, y, 64)
    assert cut.shape == (1000, 64, 64)
    padded = np.pad(img, 64)
    x0, y0 = cutout_origin(x, y, 64)
    for i in rng.choice(1000, 20, replace=False):
        np.testing.assert_array_equal(cut[i], padded[y0[i] + 64:y0[i] + 128, x0[i] + 64:x0[i] + 128])


def test_resampled_cutouts(image):
    x, y = np.array([10.2, 40.0, 3.0]), np.array([20.7, 33.0, 60.0])
    np.testing.assert_array_equal(resampled_cutouts(image, x, y, 16, 1.0, fill=0.0),
                                  extract_cutouts(image, x, y, 16, fill=0.0))
    # A linear ramp is resampled exactly: sample (r, c) of the frame resampled by s
    # lies at (c * s, r * s).
    ramp = np.add.outer(np.arange(50.0) * 3.0, np.arange(70.0))  # value = x + 3 y
    small = resample_image(ramp, 1.5)
    assert small.shape == (33, 47)
    rr, cc = np.mgrid[0:33, 0:47]
    np.testing.assert_allclose(small, cc * 1.5 + 3 * rr * 1.5, rtol=1e-6)
    cut = resampled_cutouts(ramp, [30.0], [30.0], 8, 1.5)[0]
    assert cut[4, 4] == pytest.approx(30.0 + 3 * 30.0)  # centred on the sample nearest (x, y)
    assert np.isnan(resampled_cutouts(ramp, [1.0], [1.0], 8, 2.0)).any()  # off the frame
    with pytest.raises(ValueError, match="scale"):
        resample_image(ramp, 0.0)


@pytest.mark.parametrize("scale", [0.7, 1.1037, 2.5])
def test_resample_image_is_bilinear_interpolation(scale):
    from scipy.ndimage import map_coordinates

    img = np.random.default_rng(4).normal(0, 100, (53, 71)).astype(np.float32)
    small = resample_image(img, scale)
    rows, cols = np.meshgrid(np.arange(small.shape[0]) * scale, np.arange(small.shape[1]) * scale,
                             indexing="ij")
    assert rows.max() <= img.shape[0] - 1 and rows.max() > img.shape[0] - 1 - scale
    ref = map_coordinates(img.astype(float), [rows, cols], order=1)
    np.testing.assert_allclose(small, ref, rtol=0, atol=1e-3)
