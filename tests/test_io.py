import os
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData

from robopol_clean.instrument import load_profile
from robopol_clean.io import (
    FrameError,
    OutputError,
    atomic_path,
    check_writable,
    frame_from_ccd,
    read_frame,
    write_atomic,
)

PROFILE = load_profile("robopol")


def _write(path, data, header=None, primary_empty=False):
    header = header if header is not None else fits.Header({"GAIN": 2.0, "RDNOISE": 5.0, "EXPTIME": 60.0})
    if primary_empty:
        fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data)]).writeto(path)
    else:
        fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def test_reads_float32_copy(tmp_path):
    path = _write(tmp_path / "f.fits", np.ones((200, 210), np.float64))
    before = path.read_bytes()
    ccd = read_frame(path, PROFILE)
    assert ccd.data.dtype == np.float32 and ccd.shape == (200, 210)
    assert ccd.unit == "adu" and ccd.header["GAIN"] == 2.0
    assert path.read_bytes() == before  # input untouched


def test_integer_and_big_endian(tmp_path):
    data = (np.arange(200 * 200).reshape(200, 200) % 1000).astype(">i2")
    ccd = read_frame(_write(tmp_path / "i.fits", data), PROFILE)
    assert ccd.data.dtype == np.dtype("float32") and ccd.data.dtype.isnative
    np.testing.assert_array_equal(ccd.data, data.astype(float))


def test_image_in_extension_inherits_primary_keywords(tmp_path):
    ccd = read_frame(_write(tmp_path / "e.fits", np.zeros((150, 150), np.float32), primary_empty=True),
                     PROFILE)
    assert ccd.shape == (150, 150) and ccd.header["EXPTIME"] == 60.0


def test_nan_pixels_are_masked(tmp_path):
    data = np.ones((150, 150), np.float32)
    data[10, 20] = np.nan
    data[30, 40] = np.inf
    ccd = read_frame(_write(tmp_path / "n.fits", data), PROFILE)
    assert ccd.mask[10, 20] and ccd.mask[30, 40] and ccd.mask.sum() == 2
    assert np.all(np.isfinite(ccd.data))


def test_missing_header_keywords_fall_back_with_warning(tmp_path):
    path = _write(tmp_path / "h.fits", np.ones((150, 150), np.float32), header=fits.Header())
    with pytest.warns(Warning, match=r"h\.fits: header lacks GAIN, RDNOISE, EXPTIME"):
        ccd = read_frame(path, PROFILE)
    assert ccd.header["GAIN"] == PROFILE.gain


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("SIMPLE = this is not fits"), "not a readable FITS file"),
        (lambda p: p.write_bytes(b""), "not a readable FITS file"),
        (lambda p: fits.PrimaryHDU().writeto(p), "no image data"),
        (lambda p: fits.PrimaryHDU(np.zeros((3, 150, 150), np.float32)).writeto(p), "3-D"),
        (lambda p: fits.PrimaryHDU(np.zeros((50, 60), np.float32)).writeto(p), "too small"),
        (lambda p: fits.PrimaryHDU(np.full((150, 150), np.nan, np.float32)).writeto(p), "no finite pixels"),
    ],
)
def test_bad_inputs_name_file_and_problem(tmp_path, make, message):
    path = tmp_path / "bad.fits"
    make(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FrameError, match=message) as info:
            read_frame(path, PROFILE)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FrameError, match="no such file"):
        read_frame(tmp_path / "nothere.fits", PROFILE)


def test_frame_from_ccd_ors_existing_mask():
    data = np.ones((150, 150), np.float32)
    data[5, 5] = np.nan
    mask = np.zeros((150, 150), bool)
    mask[7, 7] = True
    ccd = CCDData(data, unit="adu", mask=mask, meta={"GAIN": 1.0, "RDNOISE": 1.0, "EXPTIME": 1.0})
    out = frame_from_ccd(ccd, PROFILE)
    assert out.mask[5, 5] and out.mask[7, 7]
    assert not ccd.mask[5, 5]  # input not modified


def test_atomic_write(tmp_path):
    target = tmp_path / "out.txt"
    write_atomic(target, lambda p: p.write_text("hello"))
    assert target.read_text() == "hello"
    with pytest.raises(OutputError, match="output exists"):
        write_atomic(target, lambda p: p.write_text("again"))
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "hello"  # the old file survives a crash
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # no temporary left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(OutputError, match="not writable"):
        check_writable(folder)


def test_unwritable_folder_path_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable"):
        check_writable(blocker / "sub")
