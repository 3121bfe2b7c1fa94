"""Polarization standard stars: the shipped catalogue, and which standard a frame shows.

The catalogue (``robopol_clean/data/standards.ecsv``) lists R-band polarized and
unpolarized standards of Schmidt, Elston & Lupie (1992, AJ 104, 1563;
``1992AJ....104.1563S``) with their ICRS positions: p, theta, q and u as fractions and
degrees, their errors, and whether the star is a polarized (angle) standard.
:func:`load_standards` reads it (or another file of the same columns).

A frame is matched to a standard by :func:`match_frame`:

1. by its ``OBJECT`` keyword, compared with every name and alias after
   :func:`normalize_name` (case, spaces, ``_``, ``-``, ``.`` and ``+`` do not matter;
   the sign of a Durchmusterung zone does: ``BD-59`` is not ``BD+59``), so
   ``"Hiltner 960"``, ``"HILT960"`` and ``"hil_960"`` all name Hiltner 960;
2. otherwise, when the frame has a celestial WCS, by the sky position of its pointing
   (the instrument's target position, or the frame centre): the nearest standard within
   a tolerance (60 arcsec by default).

A frame matching neither is a :class:`StandardError` naming the file.

>>> from robopol_clean.standards import find_standard, normalize_name
>>> normalize_name("BD +59 389"), normalize_name("bd59_389")
('BD59389', 'BD59389')
>>> row = find_standard("HILT960")
>>> str(row["name"]), float(row["q"]), bool(row["polarized"])
('Hiltner 960', -0.01703, True)
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from astropy.table import Row, Table

__all__ = ["StandardError", "StandardMatch", "STANDARD_COLUMNS", "DEFAULT_SKY_TOLERANCE",
           "load_standards", "normalize_name", "find_standard", "standard_near", "match_frame"]

#: Columns a standards catalogue must have.
STANDARD_COLUMNS = ("name", "aliases", "ra", "dec", "p", "p_err", "theta", "theta_err", "q", "u",
                    "polarized")

#: Largest distance (arcsec) between a frame's pointing and a standard matched by position.
DEFAULT_SKY_TOLERANCE = 60.0


class StandardError(ValueError):
    """A frame shows no recognisable standard, or a catalogue is unusable; the message
    names the file."""


def normalize_name(name: str) -> str:
    """A star name reduced to what identifies it: upper case, letters and digits only.

    ``+`` and separators (spaces, ``_``, ``-``, ``.``, ``#``) are dropped; a minus sign
    after a Durchmusterung prefix (``BD``, ``CD``, ``SD``, also written ``BDm``) is kept
    as ``M``, so southern zones stay distinct. ``BDp59389`` (``p`` for ``+``) is
    ``BD59389``.

    Parameters
    ----------
    name : str
        A name as written in a header or catalogue.

    Returns
    -------
    str
    """
    text = str(name).strip().upper().replace("\u2212", "-")
    m = re.match(r"^(BD|CD|SD)\s*([+\-PM]?)\s*(?=\d)", text)
    if m:
        sign = "M" if m.group(2) in ("-", "M") else ""
        text = m.group(1) + sign + text[m.end():]
    return re.sub(r"[^A-Z0-9]", "", text)


def _read(path: str | None) -> Table:
    """The catalogue at ``path`` (the shipped one, read once per process, for None)."""
    return _shipped() if path is None else _parse(path)


@functools.lru_cache(maxsize=1)
def _shipped() -> Table:
    return _parse(None)


def _parse(path: str | None) -> Table:
    if path is None:
        source = resources.files("robopol_clean") / "data" / "standards.ecsv"
        name = "robopol_clean/data/standards.ecsv"
        text = source.read_text(encoding="utf-8")
    else:
        name = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StandardError(f"{path}: cannot read standards catalogue ({exc})") from None
    try:
        table = Table.read(text, format="ascii.ecsv")
    except Exception as exc:  # noqa: BLE001 -- any parse failure is one line naming the file
        raise StandardError(f"{name}: not a readable ECSV table ({type(exc).__name__})") from None
    missing = [c for c in STANDARD_COLUMNS if c not in table.colnames]
    if missing:
        raise StandardError(f"{name}: standards catalogue lacks column(s) {', '.join(missing)}")
    for col in ("ra", "dec", "q", "u", "p_err"):
        if not np.all(np.isfinite(np.asarray(table[col], float))):
            raise StandardError(f"{name}: column {col} has non-finite values")
    table.meta["source"] = name
    _add_qu_errors(table)
    keys: dict[str, int] = {}
    for i, row in enumerate(table):
        for alias in [row["name"], *str(row["aliases"] or "").split("|")]:
            key = normalize_name(alias)
            if key and keys.setdefault(key, i) != i:
                raise StandardError(f"{name}: name {alias!r} is given to two standards")
    table.meta["name_index"] = keys
    return table


def _add_qu_errors(table: Table) -> None:
    """``q_err`` and ``u_err`` from the published p and theta errors.

    Polarized standards: first-order propagation through ``q = p cos 2theta``,
    ``u = p sin 2theta``. Unpolarized ones (no angle error): ``p_err`` on each.
    """
    p = np.asarray(table["p"], float)
    p_err = np.asarray(table["p_err"], float)
    two_t = np.radians(2.0 * np.asarray(table["theta"], float))
    t_err = np.radians(np.asarray(table["theta_err"], float))
    dq = np.hypot(np.cos(two_t) * p_err, 2.0 * p * np.sin(two_t) * t_err)
    du = np.hypot(np.sin(two_t) * p_err, 2.0 * p * np.cos(two_t) * t_err)
    no_angle = ~np.isfinite(t_err)
    table["q_err"] = np.where(no_angle, p_err, dq)
    table["u_err"] = np.where(no_angle, p_err, du)
    for col in ("q_err", "u_err"):
        table[col].description = (f"1-sigma error of {col[0]}, propagated from p_err and theta_err "
                                  "(p_err when theta_err is not given)")


def load_standards(path: str | os.PathLike | None = None) -> Table:
    """The standards catalogue.

    Parameters
    ----------
    path : path-like, optional
        An ECSV file with the columns of :data:`STANDARD_COLUMNS`; the shipped
        catalogue by default.

    Returns
    -------
    Table
        One row per standard, with ``q_err`` and ``u_err`` added (see the module
        docstring); a copy, free to modify.

    Raises
    ------
    StandardError
        The file cannot be read, lacks a column, has non-finite positions or values, or
        gives one name to two standards.
    """
    table = _read(None if path is None else str(path))
    out = table.copy(copy_data=True)
    out.meta = dict(table.meta)
    return out


def find_standard(name: str, standards: Table | None = None) -> Row | None:
    """The standard a name refers to (its name or an alias, see :func:`normalize_name`).

    Parameters
    ----------
    name : str
        A name, e.g. the ``OBJECT`` keyword of a frame.
    standards : Table, optional
        The catalogue (:func:`load_standards` by default).

    Returns
    -------
    astropy.table.Row or None
    """
    table = standards if standards is not None else _read(None)
    index = table.meta.get("name_index")
    if index is None:
        index = {normalize_name(a): i for i, r in enumerate(table)
                 for a in [r["name"], *str(r["aliases"] or "").split("|")] if normalize_name(a)}
    i = index.get(normalize_name(name)) if str(name).strip() else None
    return None if i is None else table[i]


def standard_near(coord, tolerance: float = DEFAULT_SKY_TOLERANCE,
                  standards: Table | None = None) -> tuple[Row | None, float]:
    """The standard nearest a sky position, if within ``tolerance``.

    Parameters
    ----------
    coord : SkyCoord
        A sky position (any celestial frame astropy can transform to ICRS).
    tolerance : float
        Largest separation (arcsec).
    standards : Table, optional
        The catalogue (:func:`load_standards` by default).

    Returns
    -------
    row : astropy.table.Row or None
        The nearest standard, or None when none lies within ``tolerance``.
    separation : float
        Its separation (arcsec; inf for an empty catalogue).
    """
    from astropy.coordinates import SkyCoord

    table = standards if standards is not None else _read(None)
    if not len(table):
        return None, float("inf")
    cat = SkyCoord(np.asarray(table["ra"], float), np.asarray(table["dec"], float), unit="deg")
    sep = coord.separation(cat).arcsec
    i = int(np.argmin(sep))
    return (table[i] if sep[i] <= tolerance else None), float(sep[i])


@dataclass(frozen=True)
class StandardMatch:
    """Which standard a frame shows, and how that was decided.

    Attributes
    ----------
    standard : astropy.table.Row
        The catalogue row.
    by : {"OBJECT", "WCS"}
        Matched by the header's ``OBJECT`` or by the WCS position of the pointing.
    separation : float
        Distance (arcsec) from the pointing to the standard when matched by position
        (NaN when matched by name).
    """

    standard: Row
    by: str
    separation: float = float("nan")

    @property
    def name(self) -> str:
        """The standard's catalogue name."""
        return str(self.standard["name"])


def match_frame(header, wcs=None, *, pointing: tuple[float, float] | None = None,
                tolerance: float = DEFAULT_SKY_TOLERANCE, standards: Table | None = None,
                name: str = "frame") -> StandardMatch:
    """The standard a frame shows: by its ``OBJECT``, else by its WCS.

    Parameters
    ----------
    header : Mapping
        The frame's header (``OBJECT`` is read).
    wcs : astropy.wcs.WCS, optional
        The frame's WCS; used when ``OBJECT`` names no standard and it is celestial.
    pointing : (x, y), optional
        Pixel (0-based, image coordinates) whose sky position is the frame's pointing:
        the instrument's target position, or the frame centre. Needed for the WCS match.
    tolerance : float
        Largest distance (arcsec) from the pointing to a standard matched by position.
    standards : Table, optional
        The catalogue (:func:`load_standards` by default).
    name : str
        The frame's name for messages (usually its file name).

    Returns
    -------
    StandardMatch

    Raises
    ------
    StandardError
        No standard recognised; the message names the frame, its ``OBJECT`` and why
        the position did not help.
    """
    table = standards if standards is not None else _read(None)
    obj = str(header.get("OBJECT", "") or "").strip() if header is not None else ""
    row = find_standard(obj, table) if obj else None
    if row is not None:
        return StandardMatch(row, "OBJECT")
    what = f"OBJECT {obj!r} is not a known standard" if obj else "no OBJECT keyword"
    if wcs is not None and getattr(wcs, "has_celestial", False) and pointing is not None:
        try:
            coord = wcs.pixel_to_world(float(pointing[0]), float(pointing[1]))
        except Exception as exc:  # noqa: BLE001 -- a broken WCS is reported, not raised
            raise StandardError(f"{name}: {what}, and its WCS cannot place the pointing "
                                f"({type(exc).__name__}: {exc})") from None
        row, sep = standard_near(coord, tolerance, table)
        if row is not None:
            return StandardMatch(row, "WCS", sep)
        where = coord.icrs.to_string("hmsdms", precision=0)
        raise StandardError(f"{name}: {what}, and no standard lies within {tolerance:g} arcsec "
                            f"of its pointing ({where}; nearest {sep / 60:.1f} arcmin away)")
    known = ", ".join(str(n) for n in table["name"])
    raise StandardError(f"{name}: {what} ({known}) and the frame has no celestial WCS to match "
                        f"it by position")
