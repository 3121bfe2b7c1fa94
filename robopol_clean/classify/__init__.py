"""Spot classifiers: every detected spot gets ``p_artifact`` in [0, 1]."""

from .base import FrameScene, SpotClassifier, decide, noisy_or
from .morphology import MorphologyClassifier, morphology_score
from .orphan import PartnerEvidence, combine_evidence, partner_evidence

__all__ = ["FrameScene", "SpotClassifier", "decide", "noisy_or", "MorphologyClassifier",
           "morphology_score", "PartnerEvidence", "partner_evidence", "combine_evidence"]
