"""Spot classifiers: every detected spot gets ``p_artifact`` in [0, 1]."""

from .base import FrameScene, SpotClassifier, decide, noisy_or
from .morphology import MorphologyClassifier, morphology_score
from .orphan import orphan_score

__all__ = ["FrameScene", "SpotClassifier", "decide", "noisy_or", "MorphologyClassifier",
           "morphology_score", "orphan_score"]
