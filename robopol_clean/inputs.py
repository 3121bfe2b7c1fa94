"""Finding input frames and checking them cheaply, before anything heavy is imported.

Only the standard library is used here, so the command line can expand globs, folders
and ``@list.txt`` files and refuse a missing, unreadable or non-FITS file within
milliseconds, before astropy, the network or a Dask cluster are loaded. The full
checks (a 2-D image, its size, finite pixels) happen in
:func:`robopol_clean.io.read_frame`.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import os
from pathlib import Path

__all__ = ["expand_inputs", "stem_of", "precheck_frame"]

#: Every FITS file starts with this 80-character card (FITS standard 4.0, section 4.4.1.1).
_FITS_SIGNATURE = b"SIMPLE  ="

#: Extensions a frame may have; compressed files are opened through their codec.
_FITS_EXTENSIONS = (".fits", ".fit", ".fts")
_CODECS = {".gz": gzip.open, ".bz2": bz2.open}


def stem_of(path: str | os.PathLike) -> str:
    """The product stem of an input: the file name without ``.fits``/``.fit``/``.fts`` (+ ``.gz``)."""
    name = Path(path).name
    for ext in (".gz", ".fz", ".bz2"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    for ext in _FITS_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def expand_inputs(inputs: list[str], *, strict: bool = True) -> list[str]:
    """Files from paths, globs, directories (``*.fits`` inside) and ``@list.txt`` files.

    Duplicates are dropped (first occurrence kept). Plain paths are returned as given:
    whether they exist is :func:`precheck_frame`'s business.

    Parameters
    ----------
    inputs : list of str
        Paths, glob patterns, folders and ``@file`` lists (one input per line, ``#``
        comments).
    strict : bool
        Raise when a pattern, folder or list yields nothing. With False, such an item is
        kept as it is (as a shell keeps an unmatched glob), so that
        :func:`precheck_frame` reports it like any other input that is not a frame.

    Raises
    ------
    FileNotFoundError
        ``strict`` and a glob or folder matches nothing, or a list file cannot be read.
    """
    files: list[str] = []
    for item in inputs:
        problem, found = _expand_one(item, strict)
        if problem and strict:
            raise FileNotFoundError(problem)
        files.extend(found)
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _expand_one(item: str, strict: bool) -> tuple[str | None, list[str]]:
    if item.startswith("@"):
        try:
            lines = Path(item[1:]).read_text().splitlines()
        except OSError as exc:
            return f"{item[1:]}: cannot read list file ({exc.strerror})", [item]
        listed = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        return None, expand_inputs(listed, strict=strict)
    if os.path.isdir(item):
        found = sorted(p for ext in ("*.fits", "*.fit", "*.fts", "*.fits.gz")
                       for p in glob.glob(os.path.join(item, ext)))
        return (None if found else f"{item}: no FITS files in this folder"), found or [item]
    if any(c in item for c in "*?[") and not os.path.exists(item):
        found = sorted(glob.glob(item))
        return (None if found else f"{item}: no file matches this pattern"), found or [item]
    return None, [item]


def precheck_frame(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a FITS frame, or None when it may be one.

    Reads the first 80 bytes only (decompressing ``.gz``/``.bz2``): the file must exist,
    be readable and start with the FITS primary header's ``SIMPLE`` card.

    Returns
    -------
    str or None
        A one-line message naming the file and the problem.
    """
    name = str(path)
    p = Path(path)
    if name.startswith("@") and not p.exists():
        return f"{name[1:]}: cannot read list file"
    if not p.exists():
        pattern = any(c in name for c in "*?[")
        return f"{name}: " + ("no file matches this pattern" if pattern else "no such file")
    if p.is_dir():
        return f"{name}: a folder with no FITS files"
    if not p.is_file():
        return f"{name}: not a regular file"
    opener = _CODECS.get(p.suffix.lower(), open)
    try:
        with opener(p, "rb") as fh:
            head = fh.read(80)
    except PermissionError:
        return f"{name}: permission denied"
    except (OSError, EOFError) as exc:
        return f"{name}: cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if not head:
        return f"{name}: empty file"
    if not head.startswith(_FITS_SIGNATURE):
        return f"{name}: not a FITS file (it does not start with a SIMPLE card)"
    return None
