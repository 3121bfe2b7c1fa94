"""Many simulated frames on disk, each with its truth tables."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..instrument import InstrumentProfile, load_profile
from ._frame import SimulatedFrame, simulate_frame

log = logging.getLogger("robopol_clean.simulate")

#: Suffixes of the truth tables written beside a simulated ``<stem>.fits``, by table.
#: ``_truth_`` keeps them apart from the products ``reduce`` writes for ``<stem>.fits``
#: (:data:`robopol_clean.products.PRODUCT_SUFFIXES`), so reducing into the same folder,
#: even with ``--overwrite``, never replaces the truth.
TRUTH_SUFFIXES = {
    "stars": "_truth_stars.ecsv",
    "spots": "_truth_spots.ecsv",
    "artifacts": "_truth_artifacts.ecsv",
}


def truth_paths(outdir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Paths of the truth tables of simulated frame ``stem`` in ``outdir``.

    Returns
    -------
    dict
        ``{"stars": ..., "spots": ..., "artifacts": ...}``: ``<stem>_truth_<table>.ecsv``.
    """
    return {table: Path(outdir) / f"{stem}{suffix}" for table, suffix in TRUTH_SUFFIXES.items()}


def frame_seeds(seed: int, n_frames: int) -> list[int]:
    """Independent per-frame seeds derived from one seed."""
    children = np.random.SeedSequence(seed).spawn(n_frames)
    return [int(s.generate_state(1, np.uint32)[0]) for s in children]


def simulate_frames(
    outdir: str | os.PathLike,
    n_frames: int,
    seed: int,
    profile: str | os.PathLike | InstrumentProfile = "robopol",
    *,
    prefix: str = "sim",
    overwrite: bool = False,
    callback: Callable[[Path, SimulatedFrame], object] | None = None,
    **kw,
) -> list[Path]:
    """Simulate frames and write them with their truth tables.

    Writes ``<prefix>_0000.fits`` and its truth tables (see :func:`truth_paths`)
    ``<prefix>_0000_truth_{stars,spots,artifacts}.ecsv`` for each frame, each through a
    temporary file in ``outdir`` moved into place. Frame seeds are derived from ``seed``
    (see :func:`frame_seeds`) and kept in SIMSEED.

    Parameters
    ----------
    outdir : path
        Output folder (created if needed).
    n_frames : int
        Number of frames.
    seed : int
        Master seed.
    profile : str, path or InstrumentProfile
        The instrument.
    prefix : str
        File name prefix.
    overwrite : bool
        Replace existing files (otherwise an existing file is an error).
    callback : callable, optional
        Called as ``callback(fits_path, frame)`` after each frame is written.
    **kw
        Passed to :func:`simulate_frame`.

    Returns
    -------
    list of Path
        The FITS files written.
    """
    from ..io import check_writable, write_atomic, write_ecsv

    prof = load_profile(profile)
    outdir = check_writable(outdir)
    written = []
    for i, fseed in enumerate(frame_seeds(seed, n_frames)):
        sim = simulate_frame(prof, seed=fseed, **kw)
        stem = f"{prefix}_{i:04d}"
        path = outdir / f"{stem}.fits"
        hdu = fits.PrimaryHDU(sim.ccd.data, header=sim.ccd.header)
        write_atomic(path, lambda p, h=hdu: h.writeto(p, overwrite=True), overwrite=overwrite)
        for name, tpath in truth_paths(outdir, stem).items():
            table = getattr(sim, name)
            write_ecsv(table, tpath, overwrite=overwrite)
        written.append(path)
        if callback is not None:
            callback(path, sim)
        log.info("wrote %s (%d stars, %d artifacts)", path, len(sim.stars), len(sim.artifacts))
    return written
