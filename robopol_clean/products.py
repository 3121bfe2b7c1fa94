"""Writing one reduced frame's products under their documented names.

For an input ``<stem>.fits`` the products in the output folder are:

=========================  ==========================================================
``<stem>_spots.ecsv``      one row per detected spot
``<stem>_stokes.ecsv``     one row per clean quadruplet (q, u, p, theta, errors)
``<stem>_rejected.reg``    DS9 regions: rejected spots (red), uncertain ones (orange)
``<stem>_clean.fits``      the frame with the artifact mask (and provenance keywords)
``<stem>_diagnostic.png``  optional: the frame with quadruplets and rejections marked
=========================  ==========================================================

Every file is written to a temporary name and moved into place, so a crash leaves no
partial product; existing products are refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import OutputError, check_writable, write_atomic, write_ecsv

__all__ = ["PRODUCT_SUFFIXES", "product_paths", "write_products", "products_exist"]

#: The product names, by kind; other tools rely on them.
PRODUCT_SUFFIXES = {
    "spots": "_spots.ecsv",
    "stokes": "_stokes.ecsv",
    "regions": "_rejected.reg",
    "clean": "_clean.fits",
}


def product_paths(outdir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Paths of the products of frame ``stem`` in ``outdir``."""
    return {kind: Path(outdir) / f"{stem}{suffix}" for kind, suffix in PRODUCT_SUFFIXES.items()}


def products_exist(outdir: str | os.PathLike, stem: str) -> bool:
    """Whether all products of ``stem`` are already in ``outdir`` (for resuming)."""
    return all(p.exists() for p in product_paths(outdir, stem).values())


def write_products(result, outdir: str | os.PathLike, stem: str, *, overwrite: bool = False,
                   diagnostic: bool = False) -> dict[str, Path]:
    """Write a `~robopol_clean.pipeline.FrameResult`'s products.

    Parameters
    ----------
    result : FrameResult
        The reduced frame.
    outdir : path-like
        Output folder (created if needed).
    stem : str
        File stem, usually the input file name without ``.fits``.
    overwrite : bool
        Replace existing products; otherwise an existing product is an error and
        nothing is written.
    diagnostic : bool
        Also write ``<stem>_diagnostic.png``.

    Returns
    -------
    dict
        Product kind -> path written.

    Raises
    ------
    OutputError
        The folder is not writable, or a product exists and ``overwrite`` is false.
    """
    outdir = check_writable(outdir)
    paths = product_paths(outdir, stem)
    if diagnostic:
        paths["diagnostic"] = outdir / f"{stem}_diagnostic.png"
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: output exists (use --overwrite to replace it)")

    from .celestial import frame_wcs
    from .regions_io import spots_to_ds9, write_regions

    spots = result.spots
    write_ecsv(spots, paths["spots"], overwrite=overwrite)
    write_ecsv(result.stokes, paths["stokes"], overwrite=overwrite)
    # Rejected spots in red and, drawn in orange, the kept ones in the uncertain band.
    flagged = np.asarray(spots["rejected"], bool) | np.asarray(spots["uncertain"], bool)
    rejected = spots[flagged] if len(spots) else spots
    wcs = frame_wcs(result.ccd, name=stem)  # CCDData.wcs, or the header's (as read_frame keeps it)
    regions = spots_to_ds9(rejected, wcs=wcs, radius=2.0 * float(result.meta.get("fwhm", 4.0)))
    write_regions(regions, paths["regions"], overwrite=overwrite)
    write_atomic(paths["clean"], lambda p: _write_fits(result.ccd, p), overwrite=overwrite)
    if diagnostic:
        from .plots import plot_frame_diagnostic

        write_atomic(paths["diagnostic"],
                     lambda p: plot_frame_diagnostic(result).savefig(p, format="png", bbox_inches="tight"),
                     overwrite=overwrite)
    return paths


def _write_fits(ccd, path: Path) -> None:
    hdul = ccd.to_hdu(hdu_mask="MASK", hdu_uncertainty="UNCERT", as_image_hdu=False)
    if "MASK" in hdul:
        hdul["MASK"].header["COMMENT"] = "1 = masked (bad pixel or artifact); see RCL* keywords"
    try:
        hdul.writeto(path, overwrite=True, output_verify="silentfix")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc})") from None
