"""Reading frames safely and writing outputs atomically.

Every user-caused problem becomes a :class:`FrameError` (bad input) or an
:class:`OutputError` (bad output location) whose message names the file and the
problem in one line. Outputs go to a temporary file in the destination folder and are
moved into place with :func:`os.replace`, so a crash never leaves a partial file and
an interrupted run can be resumed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.utils.exceptions import AstropyWarning

from .instrument import InstrumentProfile

__all__ = [
    "FrameError",
    "OutputError",
    "MIN_FRAME_SIZE",
    "read_frame",
    "frame_from_ccd",
    "atomic_path",
    "write_atomic",
    "write_ecsv",
    "check_writable",
    "detector_origin",
]

_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: Frames smaller than this along either axis cannot hold a four-spot pattern.
MIN_FRAME_SIZE = 128


class FrameError(ValueError):
    """An input frame cannot be used; the message names the file and the problem."""


class OutputError(OSError):
    """An output cannot be written (exists, or the folder is not writable)."""


def read_frame(path: str | os.PathLike, profile: InstrumentProfile, *, hdu: int | None = None) -> CCDData:
    """Read one frame into a float32 `~astropy.nddata.CCDData` in ADU, checked for use.

    The first HDU holding 2-D image data is used unless ``hdu`` is given. Integer and
    big-endian data are converted to native float32; NaN and infinite pixels are masked.
    The input file is opened read-only and never modified.

    Parameters
    ----------
    path : path-like
        FITS file.
    profile : InstrumentProfile
        Supplies GAIN, RDNOISE and EXPTIME when the header lacks them (with a warning).
    hdu : int, optional
        HDU index to read.

    Returns
    -------
    CCDData

    Raises
    ------
    FrameError
        Not a FITS file, no 2-D image, a frame too small, or no finite pixels.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise FrameError(f"{name}: no such file")
    try:
        with fits.open(path, mode="readonly", memmap=False) as hdul:
            hdul.verify("silentfix")
            index = _image_hdu(hdul, name) if hdu is None else hdu
            if not 0 <= index < len(hdul):
                raise FrameError(f"{name}: HDU {index} does not exist ({len(hdul)} HDUs)")
            data = hdul[index].data
            header = hdul[index].header.copy()
            if index > 0:  # inherit primary keywords (GAIN, EXPTIME often live there)
                for card in hdul[0].header.cards:
                    if card.keyword not in header and card.keyword not in ("SIMPLE", "EXTEND", "NAXIS"):
                        header.append(card)
            if data is None:
                raise FrameError(f"{name}: HDU {index} holds no data")
            data = np.array(data)  # a copy, independent of the file
    except FrameError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise FrameError(f"{name}: not a readable FITS file ({_short(exc)})") from None
    unit = _header_unit(header, name)
    return frame_from_ccd(CCDData(_as_float(data, name), unit=unit, meta=header), profile, name=name)


def _header_unit(header, name: str):
    """The pixel unit of BUNIT (ADU when absent)."""
    import astropy.units as u

    text = str(header.get("BUNIT", "") or "").strip()
    if not text:
        return u.adu
    try:
        return u.Unit(text, parse_strict="raise")
    except ValueError:
        raise FrameError(f"{name}: BUNIT {text!r} is not a unit astropy understands") from None


def frame_from_ccd(ccd: CCDData, profile: InstrumentProfile, *, name: str = "frame") -> CCDData:
    """Check a `~astropy.nddata.CCDData` and return a float32 copy in ADU, ready for reduction.

    The pipeline works in ADU and converts to electrons with the header's GAIN where
    photon noise is computed. A frame in electrons (after ``ccdproc.gain_correct``) is
    divided by GAIN, so it gives the same Stokes parameters and errors as the same frame
    in ADU; its ``uncertainty`` is converted alike. Other units are refused.

    Non-finite pixels, and pixels whose ``uncertainty`` is not finite and positive, are
    masked (OR-ed with any existing mask) and set to 0. The noise model does not use
    the uncertainty's values (see :doc:`/conventions`). GAIN,
    RDNOISE and EXPTIME come from the profile, with a warning, when the header lacks
    them. A frame that still carries the detector bias (its darkest pixels near the
    profile's ``bias`` level and no ccdproc ``subbias`` record) gets a warning: its
    photon noise would be wrong.

    Raises
    ------
    FrameError
        Wrong dimensionality or unit, too small, or no finite pixels.
    """
    data = _as_float(np.asarray(ccd.data), name)
    ny, nx = data.shape
    if min(ny, nx) < MIN_FRAME_SIZE:
        raise FrameError(f"{name}: frame of {nx} x {ny} px is too small (need at least "
                         f"{MIN_FRAME_SIZE} x {MIN_FRAME_SIZE})")
    finite = np.isfinite(data)
    if not finite.any():
        raise FrameError(f"{name}: no finite pixels (all NaN or infinite)")
    mask = ~finite
    if ccd.mask is not None:
        if np.shape(ccd.mask) != data.shape:
            raise FrameError(f"{name}: mask shape {np.shape(ccd.mask)} differs from data {data.shape}")
        mask |= np.asarray(ccd.mask, bool)
    meta = ccd.meta.copy()
    missing = []
    for key, value in (("GAIN", profile.gain), ("RDNOISE", profile.read_noise),
                       ("EXPTIME", profile.default_exptime)):
        if not _positive_number(meta.get(key)) and not (key == "RDNOISE" and meta.get(key) == 0):
            meta[key] = value
            missing.append(f"{key}={value:g}")
    if missing:
        warnings.warn(f"{name}: header lacks {', '.join(k.split('=')[0] for k in missing)}; "
                      f"using {profile.name} profile values ({', '.join(missing)})", AstropyWarning,
                      stacklevel=2)
    if ccd.uncertainty is not None:
        # The errors come from the noise model (GAIN, RDNOISE, the fitted sky and model),
        # not from a data-based uncertainty, which would bias faint fluxes low; but a
        # pixel the chain calls unusable (no finite, positive uncertainty) is masked.
        unc = np.asarray(ccd.uncertainty.array)
        if unc.shape != data.shape:
            raise FrameError(f"{name}: uncertainty shape {unc.shape} differs from data {data.shape}")
        mask |= ~(np.isfinite(unc) & (unc > 0))
    data = np.where(finite, data, np.float32(0.0))
    to_adu = _adu_per_unit(ccd.unit, float(meta["GAIN"]), name)
    uncertainty = ccd.uncertainty
    if to_adu != 1.0:
        data *= np.float32(to_adu)
        if uncertainty is not None:
            uncertainty = _scaled_uncertainty(uncertainty, to_adu, name)
        meta["RCLUNIT"] = (str(ccd.unit), "input unit; converted to ADU with GAIN")
    _warn_if_raw(data, mask, meta, profile, name)
    return CCDData(data, unit="adu", mask=mask if mask.any() else None, meta=meta,
                   uncertainty=uncertainty, wcs=ccd.wcs)


def _adu_per_unit(unit, gain: float, name: str) -> float:
    """Factor from the frame's unit to ADU: 1 for ADU, 1/GAIN for electrons."""
    import astropy.units as u

    if unit is None or unit == u.adu:
        return 1.0
    if unit == u.electron:
        return 1.0 / gain
    raise FrameError(f"{name}: pixel unit {unit.to_string()!r} is not supported: give a frame in "
                     f"ADU or electrons (counts, not rates or calibrated fluxes)")


def _scaled_uncertainty(uncertainty, factor: float, name: str):
    from astropy.nddata import StdDevUncertainty, VarianceUncertainty

    if isinstance(uncertainty, StdDevUncertainty):
        return StdDevUncertainty(np.asarray(uncertainty.array) * factor, unit="adu")
    if isinstance(uncertainty, VarianceUncertainty):
        return VarianceUncertainty(np.asarray(uncertainty.array) * factor**2, unit="adu2")
    raise FrameError(f"{name}: uncertainty of type {type(uncertainty).__name__} is not supported "
                     "(use StdDevUncertainty or VarianceUncertainty)")


#: Keywords ccdproc and IRAF write when the bias has been removed.
_BIAS_DONE_KEYWORDS = ("SUBBIAS", "ZEROCOR", "BIASCOR", "OVERSCAN", "SUBOSCAN")


def _warn_if_raw(data: np.ndarray, mask: np.ndarray, meta, profile: InstrumentProfile,
                 name: str) -> None:
    """Warn when the frame's noise says it still carries the detector bias.

    Photon noise follows the light, not the bias: in ADU, the sky's variance is
    ``level / GAIN + (RDNOISE / GAIN)**2`` after bias subtraction, but
    ``(level - bias) / GAIN + ...`` in a raw frame. The sky level and its pixel-to-pixel
    noise (robust, from differences of neighbouring pixels) tell the two apart.
    """
    if profile.bias <= 0 or any(k in meta for k in _BIAS_DONE_KEYWORDS):
        return
    rows = data[::16]
    ok = ~(mask[::16, 1:] | mask[::16, :-1])
    level = float(np.median(rows[:, 1:][ok])) if ok.any() else 0.0
    if level <= profile.bias:
        return
    diff = (rows[:, 1:] - rows[:, :-1])[ok]
    var = (1.4826 * float(np.median(np.abs(diff - np.median(diff))))) ** 2 / 2.0
    gain, ron = float(meta["GAIN"]), float(meta["RDNOISE"])
    var_subtracted = level / gain + (ron / gain) ** 2
    var_raw = (level - profile.bias) / gain + (ron / gain) ** 2
    if abs(np.log(var / var_raw)) < abs(np.log(var / var_subtracted)):
        warnings.warn(f"{name}: looks like a raw frame: its sky noise ({var ** 0.5:.1f} ADU) fits a "
                      f"level of {level - profile.bias:.0f} ADU above the {profile.name} bias of "
                      f"{profile.bias:g} ADU, not its level of {level:.0f} ADU; subtract the bias "
                      f"first (ccdproc.subtract_bias), or the photon noise of every measurement is "
                      f"wrong", AstropyWarning, stacklevel=3)


def detector_origin(header) -> tuple[float, float]:
    """Detector position of image pixel (0, 0) from IRAF's ``LTV1``/``LTV2`` (image = detector + LTV).

    Windowed read-outs and cut-outs carry these keywords; a full frame has none (origin 0, 0).
    """
    def value(key):
        try:
            return -float(header.get(key, 0.0) or 0.0)
        except (TypeError, ValueError):
            return 0.0
    return value("LTV1"), value("LTV2")


def _image_hdu(hdul, name: str) -> int:
    dims = []
    for i, h in enumerate(hdul):
        if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        shape = h.shape if h.header.get("NAXIS", 0) else ()
        if len(shape) == 2:
            return i
        if len(shape) == 3 and shape[0] == 1:
            return i
        dims.append(len(shape))
    if any(d > 2 for d in dims):
        raise FrameError(f"{name}: image data is {max(dims)}-D; expected a 2-D frame")
    raise FrameError(f"{name}: no image data (empty HDUs)")


def _as_float(data: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise FrameError(f"{name}: image data is {data.ndim}-D; expected a 2-D frame")
    if data.dtype.kind not in "iuf":
        raise FrameError(f"{name}: unsupported pixel type {data.dtype}")
    return data.astype(np.float32, copy=True)  # native byte order, independent copy


def _positive_number(value) -> bool:
    try:
        return float(value) > 0 and np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------
def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises
    ------
    OutputError
        If the folder cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    Raises
    ------
    OutputError
        If ``path`` exists and ``overwrite`` is false, or the folder is not writable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists (use overwrite to replace it)")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in {path.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        write(tmp)
    return Path(path)


def write_ecsv(table, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a table as ECSV, atomically: the same bytes as astropy's ECSV writer, faster.

    Astropy formats every value of every column in a Python loop (``str`` of each
    element), about 0.1 s for a spots table of a crowded frame. For tables of plain 1-D
    numeric, boolean and simple string columns, the values are formatted column-wise by
    numpy (``astype(str)`` gives exactly ``str`` of each element: the shortest
    round-trip representation of a float) and the header by astropy from the table's
    first zero rows. Anything else (masked, multidimensional, object or mixin columns,
    strings that would need quoting) is written by astropy itself.

    Parameters
    ----------
    table : `~astropy.table.Table`
        The table; not modified.
    path : path-like
        Output file.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.
    """
    lines = _ecsv_lines(table)
    if lines is None:
        return write_atomic(path, lambda p: table.write(p, format="ascii.ecsv", overwrite=True),
                            overwrite=overwrite)

    def write(p: Path) -> None:
        # as astropy writes it: lines joined by os.linesep, no newline translation
        with open(p, "w", newline="") as fh:
            fh.write(os.linesep.join(lines) + os.linesep)

    return write_atomic(path, write, overwrite=overwrite)


def _ecsv_lines(table) -> list[str] | None:
    """The ECSV lines of ``table``, or None when it needs astropy's general writer."""
    import io

    from astropy.table import Column, MaskedColumn

    columns = []
    for name in table.colnames:
        col = table.columns[name]
        if not (type(col) is Column or (type(col) is MaskedColumn and not col.mask.any())):
            return None  # masked values, mixins: astropy
        values = np.asarray(col.data if type(col) is MaskedColumn else col)
        if values.ndim != 1 or values.dtype.kind not in "biufU":
            return None  # multidimensional, object, bytes: astropy
        if values.dtype == np.float64:
            text = list(map(repr, values.tolist()))  # == str(np.float64(v)), and faster
        elif values.dtype.kind == "U":
            if any('"' in v or any(c.isspace() for c in v) for v in np.unique(values).tolist()):
                return None  # would need quoting
            text = ['""' if v == "" else v for v in values.tolist()]
        else:
            text = values.astype(str).tolist()
        columns.append(text)
    head = io.StringIO()
    table[:0].write(head, format="ascii.ecsv")
    lines = head.getvalue().split(os.linesep)
    if lines and lines[-1] == "":
        lines.pop()
    lines.extend(" ".join(row) for row in zip(*columns))
    return lines
