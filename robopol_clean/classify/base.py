"""The classifier interface: every detected spot gets ``p_artifact`` in [0, 1].

A classifier sees one frame's :class:`FrameScene` (the background-subtracted image,
its noise, the spots table after grouping, the profile and the frame's fitted
geometry) and returns a table of named scores, one row per spot, whose
``p_artifact`` column is its decision score. The pipeline never knows which
classifier it holds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..config import CueConfig
from ..instrument import InstrumentProfile, SpotGeometry

__all__ = ["FrameScene", "SpotClassifier", "noisy_or", "decide"]


@dataclass
class FrameScene:
    """What a classifier may look at for one frame.

    Attributes
    ----------
    data : ndarray
        Background-subtracted image (adu), float32, masked pixels set to 0.
    background : ndarray
        The subtracted sky (adu).
    background_rms : ndarray
        Sky noise per pixel (adu).
    spots : Table
        Detection and grouping columns (see the spots-table reference).
    profile : InstrumentProfile
        The instrument.
    geometry : SpotGeometry
        The spot geometry fitted to this frame.
    fwhm : float
        The frame's stellar FWHM (px).
    mask : ndarray or None
        Pixels not to trust (True = bad).
    cues : CueConfig
        Tolerances of the partner cues (:class:`~robopol_clean.config.CueConfig`).
    """

    data: np.ndarray
    background: np.ndarray
    background_rms: np.ndarray
    spots: Table
    profile: InstrumentProfile
    geometry: SpotGeometry
    fwhm: float
    mask: np.ndarray | None = None
    cues: CueConfig = field(default_factory=CueConfig)


class SpotClassifier(abc.ABC):
    """Base class of spot classifiers."""

    #: Short name recorded in headers and catalogues.
    name: str = "classifier"

    @abc.abstractmethod
    def score(self, scene: FrameScene) -> Table:
        """Score every spot of a frame.

        Returns
        -------
        Table
            One row per spot of ``scene.spots``, with at least ``p_artifact``
            (0 = star, 1 = artifact) and the component scores that went into it.
        """

    def describe(self) -> dict:
        """Metadata recorded with the results (name, version, model file...)."""
        return {"name": self.name}


def noisy_or(*probabilities: np.ndarray) -> np.ndarray:
    """Combine independent pieces of evidence: ``1 - prod(1 - p_i)``."""
    out = np.ones_like(np.asarray(probabilities[0], float))
    for p in probabilities:
        out = out * (1.0 - np.clip(np.asarray(p, float), 0.0, 1.0))
    return 1.0 - out


def decide(p_artifact: np.ndarray, threshold: float = 0.5,
           uncertain_band: tuple[float, float] | None = (0.3, 0.5)) -> tuple[np.ndarray, np.ndarray]:
    """Turn scores into decisions.

    Parameters
    ----------
    p_artifact : ndarray
        Scores in [0, 1].
    threshold : float
        Spots with ``p_artifact >= threshold`` are rejected.
    uncertain_band : (float, float) or None
        Spots with ``low <= p_artifact < high`` that are not rejected are flagged
        ``uncertain`` (kept, but marked for inspection).

    Returns
    -------
    rejected, uncertain : ndarray of bool
    """
    p = np.asarray(p_artifact, float)
    rejected = p >= threshold
    if uncertain_band is None:
        uncertain = np.zeros_like(rejected)
    else:
        lo, hi = uncertain_band
        uncertain = (p >= lo) & (p < hi) & ~rejected
    return rejected, uncertain
