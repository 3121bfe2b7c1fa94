"""The classical baseline: spot morphology plus the instrument's partner cues.

No learning: each feature is turned into evidence by a smooth step at a documented
threshold, and the pieces are combined as independent evidence (noisy-OR):

- elongation (second-moment axis ratio): reflections are streaks, stars are round;
  the threshold rises for faint spots, whose moments are noisy;
- FWHM relative to the frame's stars: cosmic rays are much sharper than the seeing,
  wide smudges (dust donuts, blends) much broader;
- head/tail asymmetry along the major axis: a comet-like streak is lopsided;
- consistency within a quadruplet: the four spots of a star share one PSF, so a spot
  much more elongated than its group mates is suspect;
- the partner cues (orphan and support, :func:`~robopol_clean.classify.orphan.partner_evidence`).
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy import ndimage

from .base import FrameScene, SpotClassifier, noisy_or
from .orphan import partner_evidence, scores_table

__all__ = ["MorphologyClassifier", "morphology_score"]


def _step(value, threshold, width):
    """Smooth step from 0 to 1 around ``threshold`` (logistic of the given width)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-(np.asarray(value, float) - threshold) / width))


def morphology_score(spots: Table, fwhm: float) -> Table:
    """Evidence from each spot's shape alone.

    Parameters
    ----------
    spots : Table
        Needs ``elongation``, ``fwhm``, ``asymmetry``, ``snr``, and for the group check
        ``group_id``.
    fwhm : float
        The frame's stellar FWHM (px).

    Returns
    -------
    Table
        ``p_elongated``, ``p_sharp``, ``p_broad``, ``p_lopsided``, ``p_group_outlier``
        and their combination ``p_morph``.
    """
    n = len(spots)
    snr = np.maximum(np.asarray(spots["snr"], float), 1.0) if n else np.zeros(0)
    elong = np.asarray(spots["elongation"], float) if n else np.zeros(0)
    rel_fwhm = np.asarray(spots["fwhm"], float) / max(fwhm, 1e-3) if n else np.zeros(0)
    asym = np.abs(np.asarray(spots["asymmetry"], float)) if n else np.zeros(0)
    saturated = np.asarray(spots["saturated"], bool) if n else np.zeros(0, bool)
    # Noise inflates measured elongation roughly as 1/SNR.
    p_elong = _step(elong, 1.75 + 6.0 / snr, 0.08)
    p_sharp = _step(-rel_fwhm, -(0.5 - 1.5 / snr), 0.04) * ~saturated
    p_broad = _step(rel_fwhm, 2.2 + 3.0 / snr, 0.15) * ~saturated
    p_lopsided = _step(asym, 0.5 + 2.0 / snr, 0.06) * _step(elong, 1.6 + 2.0 / snr, 0.08)

    p_group = np.zeros(n)
    if n and "group_id" in spots.colnames:
        gid = np.asarray(spots["group_id"])
        grouped = gid >= 0
        if grouped.any():
            ids, inverse = np.unique(gid[grouped], return_inverse=True)
            med = ndimage.median(elong[grouped], labels=inverse, index=np.arange(len(ids)))
            excess = elong[grouped] - med[inverse]
            p_group[grouped] = _step(excess, 0.6 + 3.0 / snr[grouped], 0.1)
    p_morph = noisy_or(p_elong, p_sharp, p_broad, p_lopsided, p_group)
    return Table(
        {"p_elongated": p_elong, "p_sharp": p_sharp, "p_broad": p_broad,
         "p_lopsided": p_lopsided, "p_group_outlier": p_group, "p_morph": p_morph}
    )


class MorphologyClassifier(SpotClassifier):
    """Classical baseline: morphology features combined with the partner cues.

    Parameters
    ----------
    use_orphan_cue : bool
        Combine the morphology score with the instrument's partner cues (orphan and
        support, :func:`~robopol_clean.classify.orphan.combine_evidence`; default True).
    """

    name = "morphology"

    def __init__(self, use_orphan_cue: bool = True):
        self.use_orphan_cue = use_orphan_cue

    def score(self, scene: FrameScene) -> Table:
        scores = morphology_score(scene.spots, scene.fwhm)
        cues = scores_table("p_morph", scores["p_morph"],
                            partner_evidence(scene) if self.use_orphan_cue else None)
        for name in ("p_orphan", "partner_support", "p_artifact"):
            scores[name] = cues[name]
        return scores

    def describe(self) -> dict:
        return {"name": self.name, "orphan_cue": self.use_orphan_cue}
