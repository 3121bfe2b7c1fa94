"""One frame through the whole chain; the pipeline only wires the stages.

:func:`reduce_frame` returns a :class:`FrameResult` with the cleaned frame and every
catalogue; :func:`clean_artifacts` is the same thing as a ccdproc-style step
(`~astropy.nddata.CCDData` in, new `~astropy.nddata.CCDData` out).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table

from . import __version__
from .classify import FrameScene, SpotClassifier, decide
from .detection import detect_spots, estimate_background, saturation_level
from .grouping import group_quadruplets
from .instrument import InstrumentProfile, load_profile
from .io import detector_origin, frame_from_ccd
from .masking import apertures_touch_mask, combine_masks, footprint_mask
from .photometry import aperture_radius_for, measure_spots
from .stokes import pair_ratio_check, stokes_table

__all__ = ["FrameResult", "reduce_frame", "clean_artifacts", "get_classifier",
           "DEFAULT_THRESHOLD", "DEFAULT_UNCERTAIN_BAND"]

log = logging.getLogger(__name__)

#: Spots with p_artifact at or above this are rejected.
DEFAULT_THRESHOLD = 0.5
#: Kept spots with p_artifact in this band are flagged ``uncertain``.
DEFAULT_UNCERTAIN_BAND = (0.3, 0.5)
#: Groups with a spot whose aperture holds too much neighbour light get no Stokes row.
EXCLUDE_CONTAMINATED = True
#: Groups whose pair-sum ratio deviates by more than this (standard deviations) get none.
PAIR_RATIO_Z_MAX = 3.0
#: Widen the flux errors by the frame's pair-ratio calibration.
CALIBRATE_FLUX_ERRORS = True


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
        One row per clean quadruplet: q, u, p, theta and their errors.
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
        """Counts for reports: spots, rejected, uncertain, quadruplets, clean ones."""
        return {k: self.meta[k] for k in ("n_spots", "n_rejected", "n_uncertain",
                                          "n_quadruplets", "n_clean")}


def get_classifier(classifier: str | SpotClassifier | None = None) -> SpotClassifier:
    """Resolve a classifier name (``"cnn"`` or ``"morphology"``) or instance.

    ``None`` gives the default: the shipped CNN combined with the partner cues.
    A path to a ``.keras`` file loads that network (with its ``.json`` metadata).
    Loading a network takes a few seconds: resolve once and reuse the instance.
    """
    if isinstance(classifier, SpotClassifier):
        return classifier
    name = "cnn" if classifier is None else str(classifier).lower()
    if name == "morphology":
        from .classify import MorphologyClassifier
        return MorphologyClassifier()
    if name == "cnn" or name.endswith(".keras"):
        from .classify.cnn import CNNClassifier
        return CNNClassifier.load(None if name == "cnn" else str(classifier))
    raise ValueError(f"unknown classifier {classifier!r} (use 'cnn' or 'morphology')")


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
    threshold: float = DEFAULT_THRESHOLD,
    uncertain_band: tuple[float, float] | None = DEFAULT_UNCERTAIN_BAND,
    detection_threshold: float = 5.0,
    name: str = "frame",
) -> FrameResult:
    """Detect, group, score, mask, measure and compute Stokes parameters for one frame.

    Parameters
    ----------
    ccd : CCDData
        The frame in ADU (bias-subtracted, flat-fielded). Not modified.
    profile : str or InstrumentProfile
        Instrument profile (name, file, or object).
    classifier : str, SpotClassifier or None
        ``"cnn"`` (default), ``"morphology"``, or an instance (reuse one across frames).
    threshold : float
        Spots with ``p_artifact >= threshold`` are rejected and masked.
    uncertain_band : (float, float) or None
        Kept spots with a score in this band are flagged ``uncertain``.
    detection_threshold : float
        Detection threshold in units of the sky noise.
    name : str
        Name used in messages (usually the file name).

    Returns
    -------
    FrameResult
    """
    profile = load_profile(profile)
    clf = get_classifier(classifier)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    frame = frame_from_ccd(ccd, profile, name=name)
    data = np.asarray(frame.data, np.float32)
    profile = profile.for_region(*detector_origin(frame.meta), data.shape)
    bad = None if frame.mask is None else np.asarray(frame.mask, bool)
    gain = float(frame.meta["GAIN"])
    read_noise = float(frame.meta["RDNOISE"])

    with _timed(timings, "background"):
        background, background_rms = estimate_background(data, mask=bad, profile=profile)
    with _timed(timings, "detection"):
        det = detect_spots(data, profile=profile, mask=bad, threshold=detection_threshold,
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
                           grouping.geometry, fwhm, bad)
        scores = clf.score(scene) if len(spots) else Table({"p_artifact": np.zeros(0)})
        for col in scores.colnames:
            spots[col] = np.asarray(scores[col], float)
        rejected, uncertain = decide(spots["p_artifact"], threshold, uncertain_band)
        spots["rejected"] = rejected
        spots["uncertain"] = uncertain
        for col, text in _SCORE_DESCRIPTIONS.items():
            if col in spots.colnames:
                spots[col].description = text

    with _timed(timings, "masking"):
        artifact_mask = footprint_mask(data.shape, det.segmentation,
                                       np.asarray(spots["label"])[rejected])

    with _timed(timings, "photometry"):
        radius = aperture_radius_for(fwhm)
        # The sky follows the mask transmission (its arm strips step across annuli), and
        # the other sources' footprints are kept out of each annulus.
        phot = measure_spots(data, spots["x"], spots["y"], fwhm=fwhm, gain=gain,
                             read_noise=read_noise, mask=bad, aperture_radius=radius,
                             saturation=saturation_level(data, profile),
                             sky_map=profile.transmission(data.shape),
                             segmentation=det.segmentation, labels=spots["label"])
        for col in phot.colnames:
            if col == "saturated":
                spots["saturated"] = np.asarray(spots["saturated"], bool) | np.asarray(phot[col], bool)
                spots["saturated"].description = "a pixel near the peak or in the aperture is saturated"
            else:
                spots[col] = phot[col]
        # The two analyser pairs of a source must add up to a smooth instrumental ratio:
        # groups that break it hold light the photometry could not separate, and the
        # spread of the rest calibrates the flux errors (unresolved neighbours).
        check = pair_ratio_check(groups, spots, profile)
        groups["pair_ratio_z"] = check.z
        groups["pair_ratio_z"].description = ("deviation of log((F45+F135)/(F0+F90)) from the "
                                              "frame's smooth fit, in standard deviations")
        if CALIBRATE_FLUX_ERRORS:
            spots["flux_err"] = np.hypot(check.error_scale * np.asarray(spots["flux_err"], float),
                                         check.error_confusion)
            spots["flux_err"].unit = "electron"
            spots["flux_err"].description = ("1-sigma flux uncertainty: CCD noise model widened "
                                             "by the frame's pair-ratio calibration")
        groups.meta["pair_ratio"] = {"scale": check.scale, "confusion": check.confusion,
                                     "error_scale": check.error_scale,
                                     "error_confusion": check.error_confusion}

    with _timed(timings, "stokes"):
        groups = _flag_clean_groups(groups, spots, artifact_mask, radius, profile)
        stokes = stokes_table(groups, spots, profile)
        groups["clean"] &= np.isin(groups["group_id"], stokes["group_id"])  # e.g. non-positive flux

    out = ccd.copy()
    out.mask = combine_masks(None if ccd.mask is None else np.asarray(ccd.mask, bool), artifact_mask)
    if frame.mask is not None and out.mask is not None:
        out.mask = out.mask | np.asarray(frame.mask, bool)
    meta = {
        "frame": name,
        "version": __version__,
        "profile": profile.name,
        "classifier": clf.describe(),
        "threshold": float(threshold),
        "uncertain_band": None if uncertain_band is None else list(uncertain_band),
        "fwhm": fwhm,
        "aperture_radius": float(radius),
        "geometry_shift": groups.meta.get("shift"),
        "geometry_rms": groups.meta.get("rms"),
        "n_spots": len(spots),
        "n_rejected": int(np.count_nonzero(spots["rejected"])),
        "n_uncertain": int(np.count_nonzero(spots["uncertain"])),
        "n_quadruplets": int(np.count_nonzero(groups["complete"])) if len(groups) else 0,
        "n_clean": len(stokes),
        "timings": timings,
    }
    _write_provenance(out, meta)
    timings["total"] = time.perf_counter() - t_start
    for table in (spots, groups, stokes):
        table.meta.update({"frame": name, "robopol_clean_version": __version__,
                           "profile": profile.name, "classifier": clf.name,
                           "threshold": float(threshold)})
    log.debug("%s: %d spots, %d rejected, %d clean quadruplets", name, meta["n_spots"],
              meta["n_rejected"], meta["n_clean"])
    return FrameResult(out, spots, groups, stokes, artifact_mask, meta)


def clean_artifacts(ccd: CCDData, *, profile: str | InstrumentProfile = "robopol",
                    classifier: str | SpotClassifier | None = None,
                    threshold: float = DEFAULT_THRESHOLD, add_keyword: bool = True) -> CCDData:
    """Mask reflection artifacts in a frame: a ccdproc-style reduction step.

    Parameters
    ----------
    ccd : CCDData
        Frame in ADU after bias subtraction and flat-fielding. Not modified.
    profile, classifier, threshold
        As for :func:`reduce_frame`.
    add_keyword : bool
        Write the provenance keywords (``RCL*``) into the header.

    Returns
    -------
    CCDData
        A new frame whose mask is the input mask OR-ed with the artifact footprints.

    Examples
    --------
    >>> from robopol_clean import clean_artifacts
    >>> from robopol_clean.simulate import simulate_frame
    >>> raw = simulate_frame("robopol", seed=1, shape=(512, 512), n_stars=30).ccd
    >>> cleaned = clean_artifacts(raw, classifier="morphology")
    >>> cleaned.header["RCLCLASS"]
    'morphology'
    """
    result = reduce_frame(ccd, profile=profile, classifier=classifier, threshold=threshold)
    out = result.ccd
    if not add_keyword:
        for key in [k for k in out.meta if str(k).startswith("RCL")]:
            del out.meta[key]
    return out


def _flag_clean_groups(groups: Table, spots: Table, artifact_mask: np.ndarray, radius: float,
                       profile: InstrumentProfile) -> Table:
    """Add ``clean``: complete; no rejected, saturated, partly masked or ``contaminated``
    spot (neighbour light in the aperture); no artifact footprint inside any of its
    apertures; a pair-sum ratio within ``PAIR_RATIO_Z_MAX`` of the frame's fit."""
    groups = groups.copy(copy_data=True)
    if not len(groups):
        groups["clean"] = np.zeros(0, bool)
        return groups
    ids = np.stack([np.asarray(groups[f"spot_{ch}"]) for ch in profile.channels], axis=1)
    present = ids >= 0
    safe = np.where(present, ids, 0)
    bad_spot = np.asarray(spots["rejected"], bool) | np.asarray(spots["saturated"], bool)
    if "n_masked" in spots.colnames:
        bad_spot |= np.asarray(spots["n_masked"]) > 0
    if EXCLUDE_CONTAMINATED and "contaminated" in spots.colnames:
        bad_spot |= np.asarray(spots["contaminated"], bool)
    touched = apertures_touch_mask(artifact_mask, np.asarray(spots["x"], float),
                                   np.asarray(spots["y"], float), radius)
    bad = (bad_spot | touched)[safe] & present
    groups["clean"] = np.asarray(groups["complete"], bool) & present.all(axis=1) & ~bad.any(axis=1)
    if "pair_ratio_z" in groups.colnames:
        with np.errstate(invalid="ignore"):
            groups["clean"] &= ~(np.abs(np.asarray(groups["pair_ratio_z"], float))
                                 > PAIR_RATIO_Z_MAX)
    groups["clean"].description = ("complete; no rejected, saturated, masked or contaminated "
                                   "spot; apertures free of artifact footprints; pair ratio "
                                   "consistent")
    return groups


def _write_provenance(ccd: CCDData, meta: dict) -> None:
    """Short (<= 8 character) header keywords so no HIERARCH warning is raised."""
    h = ccd.meta
    h["RCLVER"] = (str(meta["version"]), "robopol-clean version")
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
    h["RCLNCLN"] = (meta["n_clean"], "clean quadruplets with Stokes q, u")
    h["RCLFWHM"] = (round(meta["fwhm"], 3), "[pix] stellar FWHM measured")
