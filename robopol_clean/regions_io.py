"""SAOImage DS9 region files: show classified spots, and read hand-drawn labels back.

Positions are 0-based in code and tables; DS9 image coordinates are 1-based (a spot at
x = 10 in a table is written as 11 in the file).

- :func:`spots_to_ds9`: the DS9 text of one circle (or ellipse) per spot, coloured by
  the classifier's decision, labelled with its ``p_artifact``; written directly, so a
  reduction does not pay for importing `regions` (and matplotlib, which it imports).
- :func:`spots_to_regions`: the same as `regions` objects (parsed from that text).
- :func:`write_regions`: atomic DS9 write (text or `regions` objects) that refuses to
  overwrite by default.
- :func:`read_regions`, :func:`labels_from_regions`: read a region file an astronomer
  drew in DS9 around artifacts, and tell which positions fall inside one (training
  labels).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from .io import write_atomic

__all__ = [
    "DEFAULT_COLORS",
    "spots_to_ds9",
    "spots_to_regions",
    "regions_to_text",
    "write_regions",
    "read_regions",
    "labels_from_regions",
]

log = logging.getLogger(__name__)

#: Region colours by decision.
DEFAULT_COLORS: dict[str, str] = {"rejected": "red", "uncertain": "orange", "kept": "green"}

_GLOBAL_TEXT = re.compile(r"\s*text=\{[^}]*\}")


def spots_to_ds9(
    spots: Table,
    *,
    wcs: WCS | None = None,
    radius: float | None = None,
    color_by: str = "decision",
    colors: Mapping[str, str] | None = None,
    ellipse_scale: float = 3.0,
    label_format: str = "p={:.2f}",
) -> str:
    """DS9 region text: one region per spot, coloured by the classifier's decision.

    Parameters
    ----------
    spots : Table
        Spots table with ``x``, ``y`` (pix, 0-based). Optional columns used:
        ``p_artifact`` (text label), ``rejected``, ``uncertain`` (colours), ``a``, ``b``
        (semi-axes, pix) and ``orientation`` (deg from +x) for ellipses, ``spot_id``
        (DS9 tag), ``fwhm``/``aper_radius`` (default circle radius).
    wcs : `~astropy.wcs.WCS`, optional
        A celestial WCS: sky regions (ICRS, projected by `regions`) instead of image
        pixels.
    radius : float, optional
        Circle radius (pix). Default: the ``aper_radius`` column, else 2 x ``fwhm``,
        else 8 pix.
    color_by : {"decision", "none"}
        ``"decision"``: red for rejected, orange for uncertain, green otherwise (see
        ``colors``); ``"none"``: every region gets ``colors["kept"]``.
    colors : mapping, optional
        Colours for ``"rejected"``, ``"uncertain"`` and ``"kept"``.
    ellipse_scale : float
        With ``a`` and ``b`` columns, ellipses of semi-axes ``ellipse_scale * a`` and
        ``ellipse_scale * b`` are drawn (3 covers a Gaussian footprint).
    label_format : str
        Format of the text label from ``p_artifact`` (no label without that column).

    Returns
    -------
    str

    Raises
    ------
    KeyError
        If ``x`` or ``y`` is missing.
    ValueError
        If ``wcs`` is not celestial or ``color_by`` is unknown.
    """
    for col in ("x", "y"):
        if col not in spots.colnames:
            raise KeyError(f"spots table lacks column {col!r}")
    if color_by not in ("decision", "none"):
        raise ValueError(f"color_by must be 'decision' or 'none', got {color_by!r}")
    if wcs is not None and not wcs.has_celestial:
        raise ValueError("wcs has no celestial axes: cannot make sky regions")
    palette = dict(DEFAULT_COLORS, **(colors or {}))
    n = len(spots)
    x = np.asarray(spots["x"], float)
    y = np.asarray(spots["y"], float)

    def flag(name):
        return np.asarray(spots[name], bool) if name in spots.colnames else np.zeros(n, bool)

    if color_by == "decision":
        color = np.where(flag("rejected"), palette["rejected"],
                         np.where(flag("uncertain"), palette["uncertain"], palette["kept"]))
    else:
        color = np.full(n, palette["kept"])
    if radius is not None:
        radii = np.full(n, float(radius))
    elif "aper_radius" in spots.colnames:
        radii = np.asarray(spots["aper_radius"], float)
    elif "fwhm" in spots.colnames:
        radii = 2.0 * np.asarray(spots["fwhm"], float)
    else:
        radii = np.full(n, 8.0)
    radii = np.where(np.isfinite(radii) & (radii > 0), radii, 8.0)
    a = b = angle = np.full(n, np.nan)
    if "a" in spots.colnames and "b" in spots.colnames:
        a = ellipse_scale * np.asarray(spots["a"], float)
        b = ellipse_scale * np.asarray(spots["b"], float)
        if "orientation" in spots.colnames:
            angle = np.nan_to_num(np.asarray(spots["orientation"], float))
        else:
            angle = np.zeros(n)
    ellipse = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)

    p_art = np.asarray(spots["p_artifact"], float) if "p_artifact" in spots.colnames else None
    ids = np.asarray(spots["spot_id"]) if "spot_id" in spots.colnames else None
    lines = ["# Region file format: DS9 version 4.1 (robopol-clean)", f"global color={palette['kept']}",
             "image"]
    cx, cy = x + 1.0, y + 1.0  # DS9 image coordinates are 1-based
    for i in range(n):
        if ellipse[i]:
            shape = f"ellipse({cx[i]:.8f},{cy[i]:.8f},{a[i]:.8f},{b[i]:.8f},{angle[i]:.8f})"
        else:
            shape = f"circle({cx[i]:.8f},{cy[i]:.8f},{radii[i]:.8f})"
        attrs = [f"color={color[i]}"]
        if p_art is not None and np.isfinite(p_art[i]):
            attrs.append("text={" + label_format.format(p_art[i]) + "}")
        if ids is not None:
            attrs.append(f"tag={{spot_{ids[i]}}}")
        lines.append(f"{shape} # {' '.join(attrs)}")
    text = "\n".join(lines) + "\n"
    if wcs is None:
        return text
    from regions import Regions  # sky regions: `regions` projects each shape

    return regions_to_text(Regions([r.to_sky(wcs) for r in Regions.parse(text, format="ds9")]))


def spots_to_regions(spots: Table, **kwargs):
    """:func:`spots_to_ds9` as `regions` objects (`~regions.Regions`), same arguments."""
    from regions import Regions

    return Regions.parse(spots_to_ds9(spots, **kwargs), format="ds9")


def regions_to_text(regions) -> str:
    """DS9 text of ``regions`` with every text label kept on its own region line.

    `regions` moves metadata that all regions share into DS9's ``global`` line; DS9
    ignores a text label there, so it is moved back onto each region line.
    """
    from regions import Regions

    text = Regions(list(regions)).serialize(format="ds9")
    lines = text.splitlines()
    moved = None
    for k, line in enumerate(lines):
        if line.startswith("global ") and _GLOBAL_TEXT.search(line):
            moved = _GLOBAL_TEXT.search(line).group(0).strip()
            lines[k] = _GLOBAL_TEXT.sub("", line)
            if lines[k].strip() == "global":
                lines[k] = ""
            break
    if moved:
        shape = re.compile(r"^-?[a-z]+\(")
        for k, line in enumerate(lines):
            if shape.match(line):
                lines[k] = f"{line} {moved}" if " # " in line else f"{line} # {moved}"
    return "\n".join(line for line in lines if line != "") + "\n"


def write_regions(regions, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write regions to a DS9 file atomically (:func:`robopol_clean.io.write_atomic`).

    Readers never see a partial file and a crash leaves no debris.

    Parameters
    ----------
    regions : str, `~regions.Regions` or list of regions
        What to write: DS9 text (:func:`spots_to_ds9`) or region objects.
    path : path-like
        Destination ``.reg`` file.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        If ``path`` exists and ``overwrite`` is false, or the folder is not writable
        (the message names it).
    """
    text = regions if isinstance(regions, str) else regions_to_text(regions)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                        overwrite=overwrite)


def read_regions(path: str | os.PathLike):
    """Read a DS9 region file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it cannot be parsed as a DS9 region file (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such region file")
    from regions import Regions

    try:
        return Regions.read(str(path), format="ds9")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable DS9 region file ({exc})") from None


def labels_from_regions(path_or_regions, x, y, *, wcs: WCS | None = None,
                        color: str | Sequence[str] | None = None,
                        tag: str | None = None) -> np.ndarray:
    """Which positions fall inside any region drawn in DS9 (e.g. around artifacts).

    Parameters
    ----------
    path_or_regions : path-like or `~regions.Regions`
        A DS9 region file (or regions already read).
    x, y : array-like
        Positions (pix, 0-based), same shape.
    wcs : `~astropy.wcs.WCS`, optional
        Needed when the file holds sky regions (fk5, icrs, galactic...).
    color : str or sequence of str, optional
        Use only regions of these colours (e.g. ``"red"`` when artifacts were drawn in
        red among other regions). DS9's default colour is green.
    tag : str, optional
        Use only regions carrying this DS9 tag (e.g. ``"artifact"``).

    Returns
    -------
    ndarray of bool
        Shaped like ``x``: inside at least one included region and in no excluded
        (``-shape``) region. Regions without an area (points, text) never contain.

    Raises
    ------
    ValueError
        If sky regions are present and no ``wcs`` is given.
    """
    from regions import PixCoord, Regions, SkyRegion

    regs = (path_or_regions if isinstance(path_or_regions, Regions)
            else read_regions(path_or_regions))
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    pix = PixCoord(x.ravel(), y.ravel())
    inside = np.zeros(x.size, bool)
    excluded = np.zeros(x.size, bool)
    skipped = 0
    colors = None if color is None else {color} if isinstance(color, str) else set(color)
    for reg in regs:
        if colors is not None and _region_color(reg) not in colors:
            continue
        if tag is not None and tag not in (reg.meta.get("tag") or []):
            continue
        if isinstance(reg, SkyRegion):
            if wcs is None:
                raise ValueError("region file holds sky regions: pass the frame's wcs")
            reg = reg.to_pixel(wcs)
        try:
            hit = np.asarray(reg.contains(pix), bool).reshape(-1)
        except (NotImplementedError, AttributeError, TypeError):
            skipped += 1
            continue
        if reg.meta.get("include", 1) in (0, False):
            excluded |= hit
        else:
            inside |= hit
    if skipped:
        log.warning("labels_from_regions: %d region(s) without an area ignored", skipped)
    return (inside & ~excluded).reshape(x.shape)


def _region_color(region) -> str:
    """A region's colour: ``color`` when made in code, ``edgecolor`` when read from a file."""
    visual = region.visual
    return str(visual.get("color") or visual.get("edgecolor") or "green")
