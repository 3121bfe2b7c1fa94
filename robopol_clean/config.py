"""The recorded settings of a reduction's photometry and quality flags.

One frozen object, passed to :func:`robopol_clean.pipeline.reduce_frame` (and through
the batch to every Dask worker), whose non-default values and hash are written into
the catalogues' metadata, so that a result always says how it was made.

>>> from robopol_clean.config import PhotometryConfig
>>> cfg = PhotometryConfig(method="aperture")
>>> cfg.non_default()
{'method': 'aperture'}
>>> len(cfg.digest())
12
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["PhotometryConfig", "PHOTOMETRY_METHODS"]

#: Photometry methods :func:`~robopol_clean.pipeline.reduce_frame` offers.
PHOTOMETRY_METHODS = ("psf", "aperture")


@dataclass(frozen=True)
class PhotometryConfig:
    """Photometry and quality-flag settings.

    Attributes
    ----------
    method : {"psf", "aperture"}
        ``"psf"``: every spot fitted together with the frame's PSF (default);
        ``"aperture"``: apertures of 2 FWHM with a local annulus sky.
    forced : bool
        Measure, at the position the fitted geometry predicts, the missing spot of a
        group with all other channels detected (PSF method).
    recover_snr : float
        Such a spot with a fitted flux S/N at least this is ``recovered`` (detection
        missed it, usually in a blend); below it stays ``forced`` and is flagged.
    residual_search : bool
        Look for sources the detection missed in the frame minus the PSF model, near
        poorly fitted spots, and fit them too (PSF method).
    psf_min_snr : float
        Smallest detection S/N of a spot used to fit the PSF.
    psf_isolation : float
        A PSF spot has no other spot within this many FWHM.
    psf_max_stars : int
        Most spots the PSF is fitted to.
    masked_limit : float
        ``masked`` is flagged where more than this share of a spot's PSF light within
        the fit radius falls on masked, non-finite or off-image pixels (PSF method; the
        fit uses the other pixels).
    blend_limit : float
        ``blended`` is flagged where other spots' light in a spot's PSF-weighted pixels
        exceeds this times its own.
    chi2_limit : float
        ``poor_fit`` is flagged where the reduced chi-square of a spot's own pixels
        exceeds this.
    artifact_light_threshold : float
        ``artifact_light`` is flagged where a kept spot's own network (or morphology)
        score reaches this.
    pair_ratio_z_max : float
        ``pair_ratio`` is flagged where a quadruplet's pair-sum ratio deviates by more
        than this many standard deviations from the frame's smooth fit.
    """

    method: str = "psf"
    forced: bool = True
    recover_snr: float = 5.0
    residual_search: bool = True
    psf_min_snr: float = 30.0
    psf_isolation: float = 4.0
    psf_max_stars: int = 40
    masked_limit: float = 0.1
    blend_limit: float = 2.0
    chi2_limit: float = 3.0
    artifact_light_threshold: float = 0.9
    pair_ratio_z_max: float = 3.0

    def __post_init__(self):
        if self.method not in PHOTOMETRY_METHODS:
            raise ValueError(f"photometry method must be one of {PHOTOMETRY_METHODS}, "
                             f"got {self.method!r}")
        for name in ("recover_snr", "psf_min_snr", "psf_isolation", "blend_limit", "chi2_limit",
                     "pair_ratio_z_max"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if int(self.psf_max_stars) != self.psf_max_stars or self.psf_max_stars < 1:
            raise ValueError(f"psf_max_stars must be a positive integer, got {self.psf_max_stars!r}")
        if not 0 <= self.masked_limit < 1:
            raise ValueError(f"masked_limit must be in [0, 1), got {self.masked_limit!r}")
        if not 0 < self.artifact_light_threshold <= 1:
            raise ValueError("artifact_light_threshold must be in (0, 1], got "
                             f"{self.artifact_light_threshold!r}")

    def as_dict(self) -> dict:
        """All settings."""
        return asdict(self)

    def non_default(self) -> dict:
        """The settings that differ from the defaults."""
        default = type(self)()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def digest(self) -> str:
        """A short hash of all settings (12 hex digits)."""
        def canonical(v):  # 5 == 5.0 == np.float32(5): one hash
            if isinstance(v, (bool, np.bool_, str)):
                return v if isinstance(v, str) else bool(v)
            return float(v)

        text = json.dumps({k: canonical(v) for k, v in self.as_dict().items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
