"""The one recorded configuration of a reduction: every tunable, frozen, with defaults.

:class:`ReductionConfig` gathers the decision thresholds, the detection threshold, the
partner-cue tolerances (:class:`CueConfig`) and the photometry and quality-flag limits
(:class:`PhotometryConfig`). It is passed to :func:`robopol_clean.pipeline.reduce_frame`
and :func:`~robopol_clean.pipeline.clean_artifacts`, through the batch to every Dask
worker, and read by ``robopol-clean reduce --config FILE.toml``. Its non-default values
and a hash of all values go into the catalogues' metadata and the cleaned frame's
header (``RCLCFG``), so a result always says how it was made.

>>> from robopol_clean.config import ReductionConfig
>>> cfg = ReductionConfig.from_dict({"threshold": 0.6, "photometry": {"method": "aperture"}})
>>> cfg.non_default()
{'threshold': 0.6, 'photometry.method': 'aperture'}
>>> len(cfg.digest())
12

A TOML file has the same layout (top-level values, then ``[cues]`` and
``[photometry]`` tables); unknown keys are errors::

    threshold = 0.6
    uncertain_band = [0.3, 0.6]

    [photometry]
    method = "aperture"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ReductionConfig", "CueConfig", "PhotometryConfig", "ConfigError",
           "PHOTOMETRY_METHODS", "load_config", "read_settings_file", "as_reduction_config"]

#: Photometry methods :func:`~robopol_clean.pipeline.reduce_frame` offers.
PHOTOMETRY_METHODS = ("psf", "aperture")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names it."""


class _Settings:
    """Shared behaviour of the frozen settings classes: dict views, diffs and a hash."""

    def as_dict(self) -> dict:
        """All settings (nested for sub-configurations)."""
        return asdict(self)

    def non_default(self) -> dict:
        """The settings that differ from the defaults, flattened (``"photometry.method"``)."""
        default = type(self)()
        out: dict[str, Any] = {}
        for f in fields(self):
            value, ref = getattr(self, f.name), getattr(default, f.name)
            if is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in value.non_default().items()})
            elif value != ref:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def digest(self) -> str:
        """A short hash of all settings (12 hex digits); 5 == 5.0 hash alike."""
        text = json.dumps(_canonical(self.as_dict()), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "configuration"):
        """Build from a (nested) dict; unknown keys and bad values raise :class:`ConfigError`."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(known)})")
            sub = _SUBCONFIGS.get((cls.__name__, key))
            if sub is not None:
                value = sub.from_dict(value, where=f"{where} [{key}]")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _canonical(v):
    if isinstance(v, dict):
        return {k: _canonical(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str) or v is None:
        return v
    return float(v)


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class CueConfig(_Settings):
    """Tolerances of the partner cues (:mod:`robopol_clean.classify.orphan`).

    A star puts light in all four channels; the cues compare the light found at a
    spot's predicted partners with the least a star could have put there.

    Attributes
    ----------
    same_pair_min_ratio : float
        Smallest partner/spot flux ratio within one analyser pair, ``(1 - q) / (1 + q)``:
        0.6 allows ``|q|`` up to 0.25.
    other_pair_tolerance : float
        Factor on the frame's fitted ratio of the two pairs (polarization, fit errors).
    other_pair_fallback_ratio : float
        Smallest other-pair/spot ratio when no pair ratio could be fitted (few
        quadruplets): the conservative bound for RoboPol's whole field.
    orphan_z_half, orphan_z_width : float
        Partner deficit (sigma) at which ``p_orphan`` = 0.5, and the width of its ramp.
    missing_half, missing_width : float
        Fraction of the lowest plausible partner light found missing at which the orphan
        evidence is halved, and the width of that ramp.
    support_min_snr : float
        Each partner of a supported spot must be measured at least at this S/N.
    support_keep : float
        Fraction of a learned artifact score kept for a spot with full partner support
        (0: a confirmed quadruplet is a star whatever its cutout looks like).
    """

    same_pair_min_ratio: float = 0.6
    other_pair_tolerance: float = 0.6
    other_pair_fallback_ratio: float = 0.25
    orphan_z_half: float = 3.5
    orphan_z_width: float = 3.0
    missing_half: float = 0.2
    missing_width: float = 0.2
    support_min_snr: float = 5.0
    support_keep: float = 0.0

    def __post_init__(self):
        _positive(self, *(f.name for f in fields(self) if f.name != "support_keep"))
        if not 0.0 <= self.support_keep <= 1.0:
            raise ValueError(f"support_keep must be in [0, 1], got {self.support_keep!r}")


@dataclass(frozen=True)
class PhotometryConfig(_Settings):
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
        _positive(self, "recover_snr", "psf_min_snr", "psf_isolation", "blend_limit", "chi2_limit",
                  "pair_ratio_z_max")
        if int(self.psf_max_stars) != self.psf_max_stars or self.psf_max_stars < 1:
            raise ValueError(f"psf_max_stars must be a positive integer, got {self.psf_max_stars!r}")
        if not 0 <= self.masked_limit < 1:
            raise ValueError(f"masked_limit must be in [0, 1), got {self.masked_limit!r}")
        if not 0 < self.artifact_light_threshold <= 1:
            raise ValueError("artifact_light_threshold must be in (0, 1], got "
                             f"{self.artifact_light_threshold!r}")


@dataclass(frozen=True)
class ReductionConfig(_Settings):
    """Every tunable of a reduction, with its default.

    Attributes
    ----------
    threshold : float
        Spots with ``p_artifact >= threshold`` are rejected and masked.
    uncertain_band : (float, float) or None
        Kept spots with ``p_artifact`` in ``[lo, hi)`` are flagged ``uncertain``
        (None: no band).
    detection_threshold : float
        Detection threshold in units of the local sky noise.
    cues : CueConfig
        Partner-cue tolerances.
    photometry : PhotometryConfig
        Photometry method, its limits and the quality-flag limits.
    """

    threshold: float = 0.5
    uncertain_band: tuple[float, float] | None = (0.3, 0.5)
    detection_threshold: float = 5.0
    cues: CueConfig = field(default_factory=CueConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.uncertain_band is not None:
            band = tuple(self.uncertain_band)
            if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
                raise ValueError(f"uncertain_band must be (lo, hi) with 0 <= lo <= hi <= 1, "
                                 f"got {self.uncertain_band!r}")
            object.__setattr__(self, "uncertain_band", (float(band[0]), float(band[1])))
        _positive(self, "detection_threshold")
        for name, kind in (("cues", CueConfig), ("photometry", PhotometryConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}")

    def updated(self, **changes) -> ReductionConfig:
        """A copy with top-level values or ``photometry_<name>`` / ``cues_<name>`` changed.

        ``None`` values are ignored, so command-line options that were not given keep
        the configuration's values.
        """
        top, sub = {}, {"photometry": {}, "cues": {}}
        for key, value in changes.items():
            if value is None:
                continue
            prefix, _, name = key.partition("_")
            if prefix in sub and name:
                sub[prefix][name] = value
            else:
                top[key] = value
        try:
            for name, values in sub.items():
                if values:
                    top[name] = replace(getattr(self, name), **values)
            return replace(self, **top)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


_SUBCONFIGS = {("ReductionConfig", "cues"): CueConfig,
               ("ReductionConfig", "photometry"): PhotometryConfig}


def as_reduction_config(config=None) -> ReductionConfig:
    """A :class:`ReductionConfig` from None (defaults), itself, a `PhotometryConfig` or a TOML path."""
    if config is None:
        return ReductionConfig()
    if isinstance(config, ReductionConfig):
        return config
    if isinstance(config, PhotometryConfig):
        return ReductionConfig(photometry=config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a ReductionConfig, PhotometryConfig or a TOML path, "
                    f"got {type(config).__name__}")


def load_config(path: str | os.PathLike) -> ReductionConfig:
    """Read a :class:`ReductionConfig` from a TOML file (see the module docstring).

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or holds an unknown key or a bad value;
        the message names the file.
    """
    return ReductionConfig.from_dict(read_settings_file(path), where=str(path))


def read_settings_file(path: str | os.PathLike) -> dict:
    """The TOML table of a settings file, for a settings class's ``from_dict``.

    Raises
    ------
    ConfigError
        The file cannot be read or is not TOML; the message names the file.
    """
    import tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
