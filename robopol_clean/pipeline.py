"""One frame through the whole chain; the pipeline only wires the stages.

:func:`reduce_frame` returns a :class:`FrameResult` with the cleaned frame and every
catalogue; :func:`clean_artifacts` is the same thing as a ccdproc-style step
(`~astropy.nddata.CCDData` in, new `~astropy.nddata.CCDData` out).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table, vstack
from scipy.spatial import cKDTree

from ._version_info import __commit__, __version__
from .background import estimate_background
from .calibration import Calibration, as_calibration
from .celestial import add_sky_columns, frame_wcs
from .classify import FrameScene, SpotClassifier, decide
from .config import PhotometryConfig, ReductionConfig, as_reduction_config
from .detection import detect_spots, saturation_level
from .grouping import group_quadruplets
from .instrument import InstrumentProfile, load_profile
from .io import detector_origin, frame_from_ccd
from .masking import apertures_touch_mask, combine_masks, footprint_mask
from .photometry import PSFFallbackWarning, aperture_radius_for, fit_psf, fit_spots, measure_spots
from .photometry.psf import MIN_PSF_STARS
from .quality import QualityFlag, flags_column_description, spot_flags
from .stokes import pair_ratio_check, stokes_table

__all__ = ["FrameResult", "reduce_frame", "clean_artifacts", "get_classifier", "added_by_photometry",
           "DEFAULT_THRESHOLD", "DEFAULT_UNCERTAIN_BAND"]

log = logging.getLogger(__name__)

#: Spots with p_artifact at or above this are rejected.
DEFAULT_THRESHOLD = ReductionConfig.threshold
#: Kept spots with p_artifact in this band are flagged ``uncertain``.
DEFAULT_UNCERTAIN_BAND = ReductionConfig.uncertain_band


_SCORE_DESCRIPTIONS = {
    "p_artifact": "decision score: probability the spot is an artifact (0-1)",
    "p_cnn": "CNN probability from the spot's 64 x 64 cutout alone",
    "p_orphan": "orphan cue: evidence the spot's partner spots are missing (0-1)",
    "partner_support": "all observable partner spots present at star-like fluxes",
    "p_morph": "morphology baseline score (noisy-OR of the p_* shape terms)",
    "p_elongated": "shape term: elongation above the frame's stellar range",
    "p_sharp": "shape term: much sharper than the seeing (cosmic-ray like)",
    "p_broad": "shape term: much broader than the seeing",
    "p_lopsided": "shape term: head/tail asymmetry of an elongated spot",
    "p_group_outlier": "shape term: more elongated than the other spots of its group",
    "rejected": "p_artifact >= threshold: masked, its group gets no Stokes row",
    "uncertain": "kept, but p_artifact in the uncertain band: inspect",
    "forced": "not detected, and not significant at the position the fitted geometry predicts",
}


@dataclass
class FrameResult:
    """Everything one reduced frame produced.

    Attributes
    ----------
    ccd : CCDData
        The input frame with rejected artifacts' footprints OR-ed into its mask and
        provenance keywords in its header.
    spots : Table
        One row per detected spot (see the spots-table reference in the docs).
    groups : Table
        One row per four-spot group, complete or not, with its ``clean`` flag.
    stokes : Table
        One row per complete quadruplet with no rejected spot: q, u, p, theta, their
        errors and the quality bitmask ``flags`` (0 = clean measurement).
    artifact_mask : ndarray of bool
        The pixels masked as artifacts by this step alone.
    meta : dict
        Profile, classifier, threshold, fitted geometry, FWHM, counts and timings (s).
    """

    ccd: CCDData
    spots: Table
    groups: Table
    stokes: Table
    artifact_mask: np.ndarray
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Counts for reports: spots, rejected, uncertain, quadruplets, Stokes rows, clean ones."""
        return {k: self.meta[k] for k in ("n_spots", "n_rejected", "n_uncertain",
                                          "n_quadruplets", "n_stokes", "n_clean")}


def get_classifier(classifier: str | SpotClassifier | None = None) -> SpotClassifier:
    """Resolve a classifier name (``"cnn"`` or ``"morphology"``) or instance.

    ``None`` gives the default: the shipped CNN combined with the partner cues.
    A path to a model file (``.onnx``, ``.keras`` or its ``.json`` metadata) loads that
    network, run by ONNX Runtime. Resolve once and reuse the instance across frames.
    """
    if isinstance(classifier, SpotClassifier):
        return classifier
    name = "cnn" if classifier is None else str(classifier).lower()
    if name == "morphology":
        from .classify import MorphologyClassifier
        return MorphologyClassifier()
    if name == "cnn" or name.endswith((".onnx", ".keras", ".json")):
        from .classify.cnn import CNNClassifier
        return CNNClassifier.load(None if name == "cnn" else str(classifier))
    raise ValueError(f"unknown classifier {classifier!r} (use 'cnn' or 'morphology')")


@contextmanager
def _one_blas_thread():
    """Run NumPy's BLAS on one thread inside a reduction.

    The stages multiply many small matrices (filters, mesh interpolation, normal
    equations); a multi-threaded BLAS spends more time waking its threads than
    computing, and on a busy machine its spinning threads slow a frame several-fold.
    The second core goes to the network's inference threads instead.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def reduce_frame(
    ccd: CCDData,
    *,
    profile: str | InstrumentProfile = "robopol",
    classifier: str | SpotClassifier | None = None,
    config: ReductionConfig | PhotometryConfig | str | os.PathLike | None = None,
    threshold: float | None = None,
    uncertain_band: tuple[float, float] | None | str = "config",
    detection_threshold: float | None = None,
    photometry: str | None = None,
    calibration: Calibration | str | os.PathLike | None = None,
    name: str = "frame",
) -> FrameResult:
    """Detect, group, score, mask, measure and compute Stokes parameters for one frame.

    Parameters
    ----------
    ccd : CCDData
        The frame, bias-subtracted and flat-fielded, in ADU or electrons. Not modified.
    profile : str or InstrumentProfile
        Instrument profile (name, file, or object).
    classifier : str, SpotClassifier or None
        ``"cnn"`` (default), ``"morphology"``, or an instance (reuse one across frames).
    config : ReductionConfig, PhotometryConfig or path, optional
        Every tunable of the reduction (:class:`~robopol_clean.config.ReductionConfig`;
        a TOML file is read with :func:`~robopol_clean.config.load_config`; a
        `~robopol_clean.config.PhotometryConfig` sets the photometry part). Recorded in
        the catalogues' metadata and the ``RCLCFG`` keyword.
    threshold, uncertain_band, detection_threshold, photometry
        Shortcuts that override ``config.threshold``, ``config.uncertain_band``
        (None: no band), ``config.detection_threshold`` and ``config.photometry.method``.
    calibration : Calibration or path, optional
        A calibration file (``robopol-clean calibrate``, see :doc:`/calibration`) whose
        angle zero point and instrumental polarization replace the profile's
        ``[calibration]`` values for this frame; its SHA-256 and path are recorded in the
        header (``RCLCAL``, ``RCLCALF``) and the catalogues' metadata
        (``calibration_file``). When it carries the covariance of its fitted parameters,
        the Stokes errors include the calibration's (``q_err_cal``, ``u_err_cal``).
    name : str
        Name used in messages (usually the file name).

    Returns
    -------
    FrameResult
    """
    cfg = as_reduction_config(config).updated(threshold=threshold, photometry_method=photometry,
                                              detection_threshold=detection_threshold)
    if uncertain_band != "config":
        cfg = replace(cfg, uncertain_band=uncertain_band)
    profile = load_profile(profile)
    cal = as_calibration(calibration)
    if cal is not None:
        profile = cal.apply(profile)
    clf = get_classifier(classifier)
    with _one_blas_thread():
        return _reduce(ccd, profile, clf, cfg, name, cal)


def _reduce(ccd: CCDData, profile: InstrumentProfile, clf: SpotClassifier, cfg: ReductionConfig,
            name: str, calibration: Calibration | None = None) -> FrameResult:
    config = cfg.photometry
    threshold = cfg.threshold
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    sc = _scored_scene(ccd, profile, clf, cfg, name, timings)
    data, bad, background, fwhm = sc.data, sc.bad, sc.background, sc.fwhm
    spots, groups, artifact_mask, profile = sc.spots, sc.groups, sc.artifact_mask, sc.profile
    gain = float(sc.frame.meta["GAIN"])
    read_noise = float(sc.frame.meta["RDNOISE"])

    with _timed(timings, "photometry"):
        sat_level = saturation_level(data, profile)
        radius = aperture_radius_for(fwhm)
        psf_meta: dict = {}
        if config.method == "psf":
            spots, groups, psf_meta = _psf_photometry(
                data, background, bad, spots, groups, sc.geometry, profile, fwhm,
                artifact_mask, gain, read_noise, sat_level, config, timings)
        else:
            # The sky follows the mask transmission (its arm strips step across annuli),
            # and the other sources' footprints are kept out of each annulus.
            phot = measure_spots(data, spots["x"], spots["y"], fwhm=fwhm, gain=gain,
                                 read_noise=read_noise, mask=bad, aperture_radius=radius,
                                 saturation=sat_level, sky_map=profile.transmission(data.shape),
                                 segmentation=sc.segmentation, labels=spots["label"])
            _merge_photometry(spots, phot)
        # The two analyser pairs of a source must add up to a smooth instrumental ratio:
        # a group that breaks it holds light the photometry could not separate.
        check = pair_ratio_check(groups, spots, profile)
        groups["pair_ratio_z"] = check.z
        groups["pair_ratio_z"].description = ("deviation of log((F45+F135)/(F0+F90)) from the "
                                              "frame's smooth fit, in standard deviations")

    with _timed(timings, "stokes"):
        # the pixels a spot's flux comes from: the PSF fit region, or the aperture
        measured_radius = psf_meta.get("fit_radius", radius)
        groups = _flag_groups(groups, spots, artifact_mask, measured_radius, profile, config)
        measured = groups[np.asarray(groups["complete"], bool) & ~groups["has_rejected"]]
        stokes = stokes_table(measured, spots, profile, exclude_flagged=False, keep_invalid=True,
                              calibration=calibration)
        flags = np.asarray(measured["flags"], np.int64)
        flags = flags | np.where(np.isfinite(np.asarray(stokes["q"], float))
                                 & np.isfinite(np.asarray(stokes["u"], float)),
                                 0, int(QualityFlag.BAD_FLUX))
        stokes["flags"] = flags
        stokes["flags"].description = flags_column_description()
        groups["flags"][np.isin(groups["group_id"], stokes["group_id"])] = flags
        groups["clean"] = (np.asarray(groups["complete"], bool) & ~groups["has_rejected"]
                           & (np.asarray(groups["flags"]) == 0))
        groups["clean"].description = ("complete quadruplet with no rejected spot and "
                                       "flags == 0: a clean Stokes measurement")

    out = _masked_copy(ccd, sc)
    meta = {
        **_scene_meta(sc, clf, cfg, name),
        "aperture_radius": float(radius),
        "n_spots": int(np.count_nonzero(~added_by_photometry(spots))),
        "n_predicted": int(np.count_nonzero(added_by_photometry(spots))),
        # spots measured at predicted positions can complete a group
        "n_quadruplets": int(np.count_nonzero(groups["complete"])) if len(groups) else 0,
        "n_stokes": len(stokes),
        "n_clean": int(np.count_nonzero(np.asarray(stokes["flags"]) == 0)),
        "photometry": config.method,
        **psf_meta,
        "calibration_file": None if calibration is None else calibration.describe(),
        "timings": timings,
    }
    _write_provenance(out, meta)
    timings["total"] = time.perf_counter() - t_start
    for table in (spots, groups, stokes):
        table.meta.update({"frame": name, "robopol_clean_version": __version__,
                           "robopol_clean_commit": __commit__,
                           "profile": profile.name, "classifier": clf.name,
                           "threshold": float(threshold), "photometry": config.method,
                           "config": cfg.non_default(), "config_hash": cfg.digest(),
                           **({"calibration_file": meta["calibration_file"],
                               "calibration_hash": meta["calibration_file"]["sha256"]}
                              if calibration else {}),
                           **psf_meta})
    add_sky_columns(stokes, frame_wcs(sc.frame, name=name))  # ra, dec with a celestial WCS
    if str(sc.frame.meta.get("FILTER", "") or "").strip():  # the band, for combining visits
        stokes.meta["filter"] = str(sc.frame.meta["FILTER"]).strip()
    log.debug("%s: %d spots, %d rejected, %d clean quadruplets", name, meta["n_spots"],
              meta["n_rejected"], meta["n_clean"])
    return FrameResult(out, spots, groups, stokes, artifact_mask, meta)


def clean_artifacts(ccd: CCDData, *, profile: str | InstrumentProfile = "robopol",
                    classifier: str | SpotClassifier | None = None,
                    config: ReductionConfig | str | os.PathLike | None = None,
                    threshold: float | None = None, add_keyword=True) -> CCDData:
    """Mask reflection artifacts in a frame: a ccdproc-style reduction step.

    Only what the mask needs runs: background, detection, grouping and the classifier
    (no photometry, no Stokes parameters; use :func:`reduce_frame` for those).
    Non-finite pixels of the input are OR-ed into the mask too.

    Parameters
    ----------
    ccd : CCDData
        Frame in ADU or electrons after bias subtraction and flat-fielding. Not modified.
    profile, classifier, config, threshold
        As for :func:`reduce_frame`.
    add_keyword : bool, str, `~ccdproc.Keyword` or dict
        As ccdproc's steps take it: True writes the provenance keywords (``RCL*``);
        False or None writes none; a name, a ``Keyword`` or a ``{name: value}`` dict
        adds that keyword (the value of a bare name is ``"clean_artifacts"``) besides
        the ``RCL*`` ones.

    Returns
    -------
    CCDData
        A new frame, in the input's unit, whose mask is the input mask OR-ed with the
        artifact footprints.

    Examples
    --------
    >>> from robopol_clean import clean_artifacts
    >>> from robopol_clean.simulate import simulate_frame
    >>> raw = simulate_frame("robopol", seed=1, shape=(512, 512), n_stars=30).ccd
    >>> cleaned = clean_artifacts(raw, classifier="morphology", add_keyword={"MASKED": True})
    >>> cleaned.header["RCLCLASS"], cleaned.header["MASKED"]
    ('morphology', True)
    """
    cfg = as_reduction_config(config).updated(threshold=threshold)
    clf = get_classifier(classifier)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    with _one_blas_thread():
        sc = _scored_scene(ccd, load_profile(profile), clf, cfg, "frame", timings)
    out = _masked_copy(ccd, sc)
    timings["total"] = time.perf_counter() - t_start
    if add_keyword:
        _write_provenance(out, {**_scene_meta(sc, clf, cfg, "frame"),
                                "n_spots": len(sc.spots), "timings": timings})
    _add_keywords(out.meta, add_keyword)
    return out


def _add_keywords(meta, add_keyword) -> None:
    """ccdproc's ``add_keyword`` forms: bool, a name, a Keyword or a dict of them."""
    if add_keyword is None or isinstance(add_keyword, bool):
        return
    if isinstance(add_keyword, str):
        meta[add_keyword] = "clean_artifacts"
    elif isinstance(add_keyword, dict):
        for key, value in add_keyword.items():
            meta[key] = value
    elif hasattr(add_keyword, "name") and hasattr(add_keyword, "value"):  # ccdproc.Keyword
        meta[add_keyword.name] = add_keyword.value
    else:
        raise TypeError(f"add_keyword must be a bool, str, dict or ccdproc.Keyword, "
                        f"got {type(add_keyword).__name__}")


@dataclass
class _Scene:
    """A frame after detection, grouping, scoring and masking (what the mask needs)."""

    frame: CCDData
    profile: InstrumentProfile
    data: np.ndarray
    bad: np.ndarray | None
    background: np.ndarray
    segmentation: np.ndarray
    spots: Table
    groups: Table
    geometry: object
    fwhm: float
    artifact_mask: np.ndarray


def _scored_scene(ccd: CCDData, profile: InstrumentProfile, clf: SpotClassifier,
                  cfg: ReductionConfig, name: str, timings: dict) -> _Scene:
    frame = frame_from_ccd(ccd, profile, name=name)
    data = np.asarray(frame.data, np.float32)
    profile = profile.for_region(*detector_origin(frame.meta), data.shape)
    bad = None if frame.mask is None else np.asarray(frame.mask, bool)

    with _timed(timings, "background"):
        background, background_rms = estimate_background(data, mask=bad, profile=profile)
    with _timed(timings, "detection"):
        det = detect_spots(data, profile=profile, mask=bad, threshold=cfg.detection_threshold,
                           background=background, background_rms=background_rms)
    spots = det.spots
    fwhm = float(spots.meta.get("fwhm", profile.fwhm)) if len(spots) else profile.fwhm
    with _timed(timings, "grouping"):
        grouping = group_quadruplets(spots, profile)
    spots, groups = grouping.spots, grouping.groups

    with _timed(timings, "classification"):
        residual = data - background
        if bad is not None:
            residual = np.where(bad, np.float32(0.0), residual)
        scene = FrameScene(residual, background, background_rms, spots, profile,
                           grouping.geometry, fwhm, bad, cfg.cues)
        scores = clf.score(scene) if len(spots) else Table({"p_artifact": np.zeros(0)})
        for col in scores.colnames:
            spots[col] = np.asarray(scores[col], float)
        rejected, uncertain = decide(spots["p_artifact"], cfg.threshold, cfg.uncertain_band)
        spots["rejected"] = rejected
        spots["uncertain"] = uncertain
        for col, text in _SCORE_DESCRIPTIONS.items():
            if col in spots.colnames:
                spots[col].description = text

    with _timed(timings, "masking"):
        artifact_mask = footprint_mask(data.shape, det.segmentation,
                                       np.asarray(spots["label"])[rejected])
    return _Scene(frame, profile, data, bad, background, det.segmentation, spots, groups,
                  grouping.geometry, fwhm, artifact_mask)


def _masked_copy(ccd: CCDData, sc: _Scene) -> CCDData:
    """The input frame (its unit and data) with the artifact and unusable pixels OR-ed into its mask."""
    out = ccd.copy()
    out.mask = combine_masks(None if ccd.mask is None else np.asarray(ccd.mask, bool),
                             sc.artifact_mask)
    if sc.bad is not None:
        out.mask = sc.bad if out.mask is None else out.mask | sc.bad
    return out


def _scene_meta(sc: _Scene, clf: SpotClassifier, cfg: ReductionConfig, name: str) -> dict:
    spots, groups = sc.spots, sc.groups
    return {
        "frame": name,
        "version": __version__,
        "commit": __commit__,
        "profile": sc.profile.name,
        "classifier": clf.describe(),
        "threshold": float(cfg.threshold),
        "uncertain_band": None if cfg.uncertain_band is None else list(cfg.uncertain_band),
        "fwhm": sc.fwhm,
        "geometry_shift": groups.meta.get("shift"),
        "geometry_rms": groups.meta.get("rms"),
        "n_rejected": int(np.count_nonzero(spots["rejected"])),
        "n_uncertain": int(np.count_nonzero(spots["uncertain"])),
        "n_quadruplets": int(np.count_nonzero(groups["complete"])) if len(groups) else 0,
        "config": cfg.non_default(),
        "config_hash": cfg.digest(),
    }


def added_by_photometry(spots: Table) -> np.ndarray:
    """True for the rows of a spots table that the photometry added (``forced``,
    ``recovered`` or ``residual``), False for detected spots.

    Those rows have no classifier scores; select ``~added_by_photometry(spots)`` for the
    detections alone.
    """
    out = np.zeros(len(spots), bool)
    for col in ("forced", "recovered", "residual"):
        if col in spots.colnames:
            out |= np.asarray(spots[col], bool)
    return out


def _merge_photometry(spots: Table, phot: Table) -> None:
    for col in phot.colnames:
        if col == "saturated":
            spots["saturated"] = np.asarray(spots["saturated"], bool) | np.asarray(phot[col], bool)
            spots["saturated"].description = "a pixel near the peak or in the aperture is saturated"
        else:
            spots[col] = phot[col]


def _psf_photometry(data, background, bad, spots, groups, geometry, profile, fwhm,
                    artifact_mask, gain, read_noise, sat_level, config, timings):
    """Forced spots for three-spot groups, the frame's PSF, then every spot fitted.

    Adds the sub-stages ``photometry: psf model`` and ``photometry: joint fit`` (s) to
    ``timings`` (parts of ``photometry``)."""
    if config.forced:
        spots, groups = _add_forced_spots(spots, groups, geometry, profile, data.shape)
    else:
        spots["forced"] = np.zeros(len(spots), bool)
    fit_mask = artifact_mask if bad is None else (bad | artifact_mask)
    rejected = np.asarray(spots["rejected"], bool)
    x, y = np.asarray(spots["x"], float), np.asarray(spots["y"], float)
    sat_pix = data >= sat_level
    variance = (np.maximum(data, 0.0) / gain + (read_noise / gain) ** 2).astype(np.float32)
    stars = _psf_stars(spots, fwhm, config)
    with warnings.catch_warnings(record=True) as caught, \
            _timed(timings, "photometry: psf model"):
        warnings.simplefilter("always", PSFFallbackWarning)
        psf = fit_psf(data - background, x[stars], y[stars], fwhm=fwhm, variance=variance,
                      mask=fit_mask | sat_pix, max_stars=config.psf_max_stars)
    for w in caught:
        log.warning("%s", w.message)
    fitted = ~rejected & np.isfinite(x) & np.isfinite(y)
    with _timed(timings, "photometry: joint fit"):
        phot = fit_spots(data, x[fitted], y[fitted], psf, background=background, gain=gain,
                         read_noise=read_noise, mask=fit_mask, saturation=sat_level,
                         search_residuals=config.residual_search,
                         fixed=np.asarray(spots["forced"], bool)[fitted],
                         release_snr=config.recover_snr)
    new = np.asarray(phot["residual"], bool)
    if new.any():  # sources found in the frame minus the model: spots of their own
        spots = _append_spots(spots, np.asarray(phot["x_fit"])[new], np.asarray(phot["y_fit"])[new])
        fitted = np.append(fitted, np.ones(int(new.sum()), bool))
    spots["residual"] = np.zeros(len(spots), bool)
    rows = np.flatnonzero(fitted)
    for col in phot.colnames:
        if col == "residual":
            spots["residual"][rows] = new
            continue
        values = np.asarray(phot[col])
        full = np.full(len(spots), np.nan if values.dtype.kind == "f" else 0, values.dtype)
        full[rows] = values
        spots[col] = full
        spots[col].unit = phot[col].unit
        spots[col].description = phot[col].description
    spots["saturated"] = np.asarray(spots["saturated"], bool) | (np.asarray(spots["n_saturated"]) > 0)
    nearest = _nearest_distance(np.asarray(spots["x"], float), np.asarray(spots["y"], float))
    spots["nearest"] = nearest
    spots["nearest"].unit = "pix"
    spots["nearest"].description = "distance to the nearest other spot"
    spots["crowded"] = nearest < aperture_radius_for(fwhm) + 2.0 * fwhm
    spots["crowded"].description = "another spot within 2 FWHM of the aperture's edge"
    # A predicted spot that the fit finds significant was only missed by detection
    # (blended): it is "recovered"; the others stay "forced" (flagged).
    with np.errstate(invalid="ignore", divide="ignore"):
        found = np.asarray(spots["flux"], float) >= config.recover_snr * np.asarray(spots["flux_err"], float)
    forced = np.asarray(spots["forced"], bool)
    spots["recovered"] = forced & found
    spots["recovered"].description = ("not detected, but found significant at its predicted "
                                      "position by the PSF fit (position refined)")
    spots["forced"] = forced & ~found
    spots["residual"].description = ("not detected: found in the frame minus the PSF model "
                                     "of all spots (not classified, in no group)")
    return spots, groups, {**psf.describe(), "fit_radius": phot.meta["fit_radius"]}


def _psf_stars(spots: Table, fwhm: float, config: PhotometryConfig) -> np.ndarray:
    """Isolated, bright, unsaturated, star-like spots to fit the PSF to; saturated ones
    too (their clipped pixels are left out of the fit) when there are too few others, as
    on a frame whose bright stars are all clipped."""
    n = len(spots)
    if n == 0:
        return np.zeros(0, bool)
    nearest = _nearest_distance(np.asarray(spots["x"], float), np.asarray(spots["y"], float))
    ok = (np.isfinite(nearest) & (nearest > config.psf_isolation * fwhm)
          & (np.asarray(spots["snr"], float) >= config.psf_min_snr)
          & ~np.asarray(spots["rejected"], bool) & ~np.asarray(spots["uncertain"], bool)
          & ~np.asarray(spots["forced"], bool)
          & (np.asarray(spots["elongation"], float) < 1.5))
    if "transmission" in spots.colnames:
        ok &= np.asarray(spots["transmission"], float) > 0.9
    unsaturated = ok & ~np.asarray(spots["saturated"], bool)
    return unsaturated if unsaturated.sum() >= MIN_PSF_STARS else ok


def _nearest_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance (pix) to the nearest other position: inf when alone, NaN if not finite."""
    xy = np.column_stack([x, y])
    finite = np.isfinite(xy).all(axis=1)
    nearest = np.full(len(x), np.nan)
    nearest[finite] = np.inf
    if finite.sum() > 1:
        d, _ = cKDTree(xy[finite]).query(xy[finite], k=2)
        nearest[finite] = d[:, 1]
    return nearest


def _append_spots(spots: Table, x, y, **values) -> Table:
    """Rows for spots that detection did not give: NaN scores and shapes, not rejected."""
    new = Table()
    for name in spots.colnames:
        col = np.asarray(spots[name])
        kind = col.dtype.kind
        fill = np.nan if kind == "f" else (False if kind == "b" else ("" if kind in "US" else -1))
        new[name] = np.full(len(x), fill, dtype=col.dtype)
    new["spot_id"] = np.arange(len(spots), len(spots) + len(x))
    new["x"], new["y"] = x, y
    if "usable" in new.colnames:
        new["usable"] = True
    for name, value in values.items():
        new[name] = value
    out = vstack([spots, new], metadata_conflicts="silent")
    for name in spots.colnames:
        out[name].unit = spots[name].unit
        out[name].description = spots[name].description
    return out


def _add_forced_spots(spots: Table, groups: Table, geometry, profile, shape):
    """Append a spot at the predicted position of the one missing channel of groups
    with every other channel detected; ``forced`` marks them."""
    chans = list(profile.channels)
    spots["forced"] = np.zeros(len(spots), bool)
    if not len(groups):
        return spots, groups
    ids = np.stack([np.asarray(groups[f"spot_{ch}"]) for ch in chans], axis=1)
    one_missing = (ids < 0).sum(axis=1) == 1
    g = np.flatnonzero(one_missing)
    if not g.size:
        return spots, groups
    off = geometry.offset_array(np.asarray(groups["x"], float)[g], np.asarray(groups["y"], float)[g])
    c = np.argmax(ids[g] < 0, axis=1)
    px = np.asarray(groups["x"], float)[g] + off[c, 0, np.arange(g.size)]
    py = np.asarray(groups["y"], float)[g] + off[c, 1, np.arange(g.size)]
    ny, nx = shape
    on = (px >= 0) & (px <= nx - 1) & (py >= 0) & (py <= ny - 1)
    g, c, px, py = g[on], c[on], px[on], py[on]
    if not g.size:
        return spots, groups
    first = len(spots)
    out = _append_spots(spots, px, py, group_id=np.asarray(groups["group_id"])[g],
                        channel=np.asarray(chans)[c], forced=True)
    groups = groups.copy(copy_data=True)
    for k, ch in enumerate(chans):
        sel = c == k
        col = np.asarray(groups[f"spot_{ch}"]).copy()
        col[g[sel]] = first + np.flatnonzero(sel)
        groups[f"spot_{ch}"] = col
    groups["n_spots"][g] += 1
    groups["complete"][g] = True
    return out, groups


def _flag_groups(groups: Table, spots: Table, artifact_mask: np.ndarray, radius: float,
                 profile: InstrumentProfile, config: PhotometryConfig) -> Table:
    """Add ``has_rejected`` (a rejected spot: no Stokes row) and ``flags`` (the OR of the
    spots' quality bits, :class:`~robopol_clean.quality.QualityFlag`); an artifact
    footprint within ``radius`` (pix) of a spot is artifact light on it."""
    groups = groups.copy(copy_data=True)
    n = len(groups)
    if not n:
        groups["has_rejected"] = np.zeros(0, bool)
        groups["flags"] = np.zeros(0, np.int64)
        return groups
    ids = np.stack([np.asarray(groups[f"spot_{ch}"]) for ch in profile.channels], axis=1)
    present = ids >= 0
    safe = np.where(present, ids, 0)
    per_spot = spot_flags(spots, photometry=config.method, blend_limit=config.blend_limit,
                          chi2_limit=config.chi2_limit, masked_limit=config.masked_limit,
                          artifact_light_threshold=config.artifact_light_threshold)
    touched = apertures_touch_mask(artifact_mask, np.asarray(spots["x"], float),
                                   np.asarray(spots["y"], float), radius)
    per_spot |= np.where(touched, int(QualityFlag.ARTIFACT_LIGHT), 0)
    flags = np.bitwise_or.reduce(np.where(present, per_spot[safe], 0), axis=1)
    if "pair_ratio_z" in groups.colnames:
        with np.errstate(invalid="ignore"):
            off = np.abs(np.asarray(groups["pair_ratio_z"], float)) > config.pair_ratio_z_max
        flags |= np.where(off, int(QualityFlag.PAIR_RATIO), 0)
    groups["has_rejected"] = (np.asarray(spots["rejected"], bool)[safe] & present).any(axis=1)
    groups["has_rejected"].description = "a spot was rejected as an artifact: no Stokes row"
    groups["flags"] = flags.astype(np.int64)
    groups["flags"].description = flags_column_description()
    return groups


def _write_provenance(ccd: CCDData, meta: dict) -> None:
    """Short (<= 8 character) header keywords so no HIERARCH warning is raised."""
    h = ccd.meta
    h["RCLVER"] = (str(meta["version"]), "robopol-clean version")
    if meta.get("commit"):
        h["RCLGIT"] = (str(meta["commit"]), "robopol-clean git commit")
    h["RCLPROF"] = (str(meta["profile"]), "instrument profile")
    h["RCLCLASS"] = (str(meta["classifier"].get("name")), "artifact classifier")
    model = meta["classifier"].get("model")
    if model:
        h["RCLMODEL"] = (str(model)[:68], "classifier model")
    h["RCLTHRES"] = (meta["threshold"], "p_artifact rejection threshold")
    h["RCLNSPOT"] = (meta["n_spots"], "spots detected")
    h["RCLNREJ"] = (meta["n_rejected"], "spots rejected as artifacts")
    h["RCLNUNC"] = (meta["n_uncertain"], "spots flagged uncertain")
    h["RCLNQUAD"] = (meta["n_quadruplets"], "complete four-spot groups")
    if "n_stokes" in meta:  # a full reduction, not the mask-only clean_artifacts
        h["RCLNSTK"] = (meta["n_stokes"], "quadruplets with Stokes q, u (any flags)")
        h["RCLNCLN"] = (meta["n_clean"], "clean quadruplets: Stokes rows with flags == 0")
        h["RCLPHOT"] = (meta["photometry"], "photometry method")
    h["RCLFWHM"] = (round(meta["fwhm"], 3), "[pix] stellar FWHM measured")
    h["RCLCFG"] = (meta["config_hash"], "hash of the reduction configuration")
    if hasattr(h, "add_history"):  # a FITS header (a plain dict meta has no HISTORY)
        for key, value in meta["config"].items():  # what differs from the defaults, readable
            h.add_history(f"robopol-clean config: {key} = {value}")
    if meta.get("calibration_file"):  # a calibration file applied (the profile's own: absent)
        h["RCLCAL"] = meta["calibration_file"]["sha256"]  # 64 hex digits: no room for a comment
        h["RCLCALF"] = (meta["calibration_file"]["file"], "calibration file applied")
    if "psf_fwhm" in meta:
        h["RCLPSFW"] = (meta["psf_fwhm"], "[pix] PSF FWHM (geometric mean)")
        h["RCLPSFE"] = (meta["psf_ellipticity"], "PSF ellipticity 1 - b/a")
        h["RCLPSFB"] = (meta["psf_beta"], "PSF Moffat beta")
        h["RCLPSFS"] = (meta["psf_source"], "PSF fitted or fallback")
