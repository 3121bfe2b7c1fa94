import os
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.utils.exceptions import AstropyWarning

from robopol_clean.instrument import load_profile
from robopol_clean.io import (
    FrameError,
    OutputError,
    atomic_path,
    check_writable,
    frame_from_ccd,
    read_frame,
    write_atomic,
    write_ecsv,
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


def _ecsv_cases():
    from astropy.table import MaskedColumn, Table

    rng = np.random.default_rng(3)
    bits = np.frombuffer(rng.bytes(8 * 500), np.float64)  # every kind of float64
    special = [0.0, -0.0, 0.1, 1 / 3, 1e15, 1e16, 1e-5, 5e-324, np.nan, np.inf, -np.inf]
    plain = Table({"f8": np.concatenate([bits, special]),
                   "f4": np.concatenate([bits, special]).astype(np.float32),
                   "i8": rng.integers(-10**12, 10**12, 511), "i2": rng.integers(-99, 99, 511).astype(np.int16),
                   "u1": rng.integers(0, 255, 511).astype(np.uint8), "b": rng.random(511) > 0.5,
                   "s": np.array(["", "0", "a_b", "q/u"] * 127 + ["x", "y", "z"])},
                  meta={"frame": "f.fits", "nested": {"a": [1, 2]}})
    plain["f8"].unit, plain["f8"].description = "adu", "a described column"
    quoted = Table({"s": ["two words", 'a "q"', "tab\there"], "x": [1.0, 2.0, 3.0]})
    masked = Table({"m": MaskedColumn([1.0, 2.0, 3.0], mask=[False, True, False])})
    unmasked = Table({"m": MaskedColumn([1.0, 2.0, 3.0], mask=[False, False, False])})
    vector = Table({"v": np.arange(6.0).reshape(3, 2)})
    return {"plain": plain, "quoted": quoted, "masked": masked, "unmasked": unmasked,
            "vector": vector, "empty": plain[:0]}


@pytest.mark.parametrize("case", ["plain", "quoted", "masked", "unmasked", "vector", "empty"])
def test_write_ecsv_gives_astropys_bytes(tmp_path, case):
    """The fast ECSV writer (or its fallback) writes exactly what astropy writes."""
    table = _ecsv_cases()[case]
    write_ecsv(table, tmp_path / "fast.ecsv")
    table.write(tmp_path / "astropy.ecsv", format="ascii.ecsv")
    assert (tmp_path / "fast.ecsv").read_bytes() == (tmp_path / "astropy.ecsv").read_bytes()
    with pytest.raises(OutputError, match="output exists"):
        write_ecsv(table, tmp_path / "fast.ecsv")


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


def _sky(shape=(256, 256), level=300.0, gain=2.0, ron=5.0, seed=1):
    """A star-less sky frame in ADU with photon and read noise for this GAIN and RDNOISE."""
    rng = np.random.default_rng(seed)
    electrons = rng.poisson(level * gain, shape) + rng.normal(0, ron, shape)
    return (electrons / gain).astype(np.float32)


def test_electrons_are_converted_to_adu_with_gain():
    header = fits.Header({"GAIN": 2.0, "RDNOISE": 5.0, "EXPTIME": 60.0})
    adu = _sky()
    from astropy.nddata import StdDevUncertainty

    ccd = CCDData(adu * 2.0, unit="electron", meta=header,
                  uncertainty=StdDevUncertainty(np.sqrt(adu * 2.0)))
    frame = frame_from_ccd(ccd, PROFILE)
    assert frame.unit == "adu" and frame.header["RCLUNIT"] == "electron"
    np.testing.assert_allclose(frame.data, adu, rtol=1e-6)
    np.testing.assert_allclose(frame.uncertainty.array, np.sqrt(adu * 2.0) / 2.0, rtol=1e-6)
    assert ccd.unit == "electron"  # the input is untouched


def test_bunit_is_read_and_rates_are_refused(tmp_path):
    header = fits.Header({"GAIN": 2.0, "RDNOISE": 5.0, "EXPTIME": 60.0, "BUNIT": "electron"})
    path = _write(tmp_path / "e.fits", _sky() * 2.0, header=header)
    np.testing.assert_allclose(read_frame(path, PROFILE).data, _sky(), rtol=1e-6)
    header["BUNIT"] = "adu / s"
    path = _write(tmp_path / "rate.fits", _sky(), header=header)
    with pytest.raises(FrameError, match=r"rate.fits: pixel unit 'adu / s' is not supported"):
        read_frame(path, PROFILE)


@pytest.mark.parametrize("level", [150.0, 900.0])
def test_raw_frame_warns_from_its_noise(level):
    """The bias adds level but no noise: a raw frame is told apart at any sky level."""
    header = fits.Header({"GAIN": 2.0, "RDNOISE": 5.0, "EXPTIME": 60.0})
    sky = _sky(level=level)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame_from_ccd(CCDData(sky, unit="adu", meta=header), PROFILE)  # bias-subtracted: silent
    with pytest.warns(AstropyWarning, match="looks like a raw frame"):
        frame_from_ccd(CCDData(sky + PROFILE.bias, unit="adu", meta=header), PROFILE)
    header["SUBBIAS"] = "ccd=<CCDData>, master=<CCDData>"  # ccdproc's record: trusted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame_from_ccd(CCDData(sky + PROFILE.bias, unit="adu", meta=header), PROFILE)
