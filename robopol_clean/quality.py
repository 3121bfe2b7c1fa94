"""Quality flags of Stokes measurements: a documented bitmask, 0 = clean.

Every complete quadruplet with no rejected (artifact) spot gets a Stokes row; what may
make its q and u doubtful is recorded in the row's integer ``flags`` column instead of
dropping it. Select ``flags == 0`` for science, or test single bits:

>>> from robopol_clean.quality import QualityFlag
>>> flags = QualityFlag.BLENDED | QualityFlag.FORCED
>>> int(flags), bool(flags & QualityFlag.SATURATED)
(17, False)
>>> describe_flags(17)
['blended', 'forced']
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["QualityFlag", "CombineFlag", "FLAG_DESCRIPTIONS", "COMBINE_FLAG_DESCRIPTIONS",
           "describe_flags", "flags_column_description", "combined_flags_description",
           "spot_flags"]


class QualityFlag(enum.IntFlag):
    """Bits of the Stokes table's ``flags`` column (set when any of the four spots has it)."""

    #: Strongly blended: other spots' light in the spot's PSF-weighted pixels exceeds
    #: ``blend_limit`` times its own (PSF photometry), or the neighbours' estimated light
    #: in the aperture exceeds the contamination limit (aperture photometry).
    BLENDED = 1
    #: More than ``masked_limit`` of the spot's PSF light in its fit region falls on masked,
    #: non-finite or off-image pixels (aperture photometry: any aperture pixel).
    MASKED = 2
    #: Saturated or clipped pixels near the spot (left out of a PSF fit).
    SATURATED = 4
    #: Poor PSF fit: the reduced chi-square of the spot's own pixels exceeds ``chi2_limit``.
    POOR_FIT = 8
    #: A spot was not detected and was measured at the position the geometry predicts.
    FORCED = 16
    #: A spot's artifact score lies in the uncertain band.
    UNCERTAIN = 32
    #: Artifact light on a kept spot: the network scores it as an artifact although its
    #: partners confirm a star, or a masked artifact touches its fit region (aperture).
    ARTIFACT_LIGHT = 64
    #: The pair-sum ratio (F45 + F135) / (F0 + F90) deviates from the frame's smooth fit.
    PAIR_RATIO = 128
    #: A flux is not finite or a pair sum is not positive: q or u is undefined (NaN).
    BAD_FLUX = 256


class CombineFlag(enum.IntFlag):
    """Bits that combining the exposures of a visit adds (:mod:`robopol_clean.combine`).

    They sit above the per-measurement bits (:class:`QualityFlag` keeps 1-2048), so a
    combined row's ``flags`` holds both: the OR of the bits of the measurements that
    entered the mean (0 unless flagged ones were let in) and these.
    """

    #: The exposures disagree: their chi-square about the weighted mean is improbable
    #: (probability below the configured significance, 0.001 by default).
    DISAGREE = 4096
    #: No measurement entered the mean (none clean, or none with finite q, u and
    #: errors): q, u and what follows are NaN.
    NO_MEASUREMENT = 8192


FLAG_DESCRIPTIONS = {
    QualityFlag.BLENDED: "blended: neighbouring spots' light dominates a spot's pixels",
    QualityFlag.MASKED: "a spot lost light to the mask, non-finite pixels or the image edge",
    QualityFlag.SATURATED: "saturated or clipped pixels near a spot",
    QualityFlag.POOR_FIT: "poor PSF fit (reduced chi-square above the limit)",
    QualityFlag.FORCED: "a spot was not detected and was measured at its predicted position",
    QualityFlag.UNCERTAIN: "a spot's artifact score is in the uncertain band",
    QualityFlag.ARTIFACT_LIGHT: "artifact light on a kept spot (network score or masked artifact)",
    QualityFlag.PAIR_RATIO: "pair-sum ratio inconsistent with the frame's smooth fit",
    QualityFlag.BAD_FLUX: "a flux is non-finite or a pair sum is not positive (q or u is NaN)",
}

COMBINE_FLAG_DESCRIPTIONS = {
    CombineFlag.DISAGREE: "the exposures disagree (chi-square test of the visit)",
    CombineFlag.NO_MEASUREMENT: "no measurement entered the visit's mean (q, u are NaN)",
}


def describe_flags(value: int) -> list[str]:
    """Names (lower case) of the bits set in ``value`` (per-frame and combine bits)."""
    return [f.name.lower() for f in (*QualityFlag, *CombineFlag) if int(value) & f]


def flags_column_description() -> str:
    """One-line description of the ``flags`` column listing every bit."""
    bits = ", ".join(f"{int(f)} {f.name.lower()}" for f in QualityFlag)
    return f"quality bitmask, 0 = clean measurement ({bits}; see the conventions page)"


def combined_flags_description() -> str:
    """One-line description of a combined (visit) table's ``flags`` column."""
    bits = ", ".join(f"{int(f)} {f.name.lower()}" for f in CombineFlag)
    return (f"quality bitmask, 0 = clean: the OR of the used measurements' bits and the visit's "
            f"own ({bits}; see the combine page)")


def spot_flags(spots, *, photometry: str, blend_limit: float, chi2_limit: float,
               artifact_light_threshold: float | None, masked_limit: float = 0.0) -> np.ndarray:
    """Per-spot bits from the photometry and classification columns of a spots table.

    ``artifact_light`` comes from the classifier's own score (``p_cnn``, else ``p_morph``)
    of kept spots; ``None`` leaves it out. The group-level bits (``pair_ratio``, an
    artifact footprint touching a spot) are the pipeline's.
    """
    n = len(spots)
    flags = np.zeros(n, np.int64)

    def col(name, default):
        return np.asarray(spots[name]) if name in spots.colnames else np.full(n, default)

    with np.errstate(invalid="ignore"):
        if photometry == "psf":
            flags |= np.where(col("blend", 0.0).astype(float) > blend_limit, QualityFlag.BLENDED, 0)
            flags |= np.where(col("masked_fraction", 0.0).astype(float) > masked_limit,
                              QualityFlag.MASKED, 0)
            flags |= np.where(col("n_saturated", 0).astype(float) > 0, QualityFlag.SATURATED, 0)
            flags |= np.where(col("chi2", 0.0).astype(float) > chi2_limit, QualityFlag.POOR_FIT, 0)
        else:
            flags |= np.where(col("contaminated", False).astype(bool), QualityFlag.BLENDED, 0)
            flags |= np.where(col("n_masked", 0).astype(float) > 0, QualityFlag.MASKED, 0)
        flags |= np.where(col("saturated", False).astype(bool), QualityFlag.SATURATED, 0)
        flags |= np.where(col("forced", False).astype(bool), QualityFlag.FORCED, 0)
        flags |= np.where(col("uncertain", False).astype(bool), QualityFlag.UNCERTAIN, 0)
        learned = [c for c in ("p_cnn", "p_morph") if c in spots.colnames]  # own score
        if artifact_light_threshold is not None and learned:
            kept = ~col("rejected", False).astype(bool)
            flags |= np.where(kept & (col(learned[0], 0.0).astype(float)
                                      >= artifact_light_threshold),
                              QualityFlag.ARTIFACT_LIGHT, 0)
        flux = col("flux", np.nan).astype(float)
        flags |= np.where(~np.isfinite(flux) | ~np.isfinite(col("flux_err", np.nan).astype(float)),
                          QualityFlag.BAD_FLUX, 0)
    return flags
