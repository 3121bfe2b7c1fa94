"""Spot detection: find the spots of a frame and measure them.

Every source makes four spots; this module finds spots, not sources (grouping them into
quadruplets is :mod:`robopol_clean.grouping`'s job). The sky comes from
:func:`robopol_clean.background.estimate_background` (also importable from here).

:func:`detect_spots` smooths the background-subtracted frame with a Gaussian matched
filter of the stellar FWHM, finds local maxima above ``threshold`` times the filtered
noise, merges each maximum not separated by a real saddle from a higher one into the
best connected of those (so a streak with a noisy tail stays one spot, while a faint
maximum between two sources never joins them), segments the frame at
``footprint_threshold`` and splits shared footprints between their spots, and measures
every spot vectorised: windowed centroid, Gaussian-windowed FWHM, footprint moments
(elongation, orientation, head/tail asymmetry), sharpness, saturation, mask
transmission and usability.

The full-frame filters give the ``scipy.ndimage`` results faster: the Gaussian as banded
matrix products over tiles of the frame (BLAS; equal to float32 rounding), the local
maximum by combining windows of 1, 2, 4, ... pixels (exactly equal).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.spatial import cKDTree

from .background import estimate_background
from .cutouts import extract_cutouts
from .instrument import InstrumentProfile
from .masking import unusable_pixels

__all__ = [
    "SPOT_COLUMNS",
    "DetectionResult",
    "detect_spots",
    "saturation_level",
]

log = logging.getLogger(__name__)

_SIG2FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
_TRUNCATE = 3.5  # Gaussian filter half-width in sigma

#: Columns of the spots table made by :func:`detect_spots`: name -> (dtype, unit, description).
SPOT_COLUMNS: dict[str, tuple[str, str | None, str]] = {
    "spot_id": ("i8", None, "spot index (row number)"),
    "x": ("f8", "pix", "windowed centroid, 0-based column"),
    "y": ("f8", "pix", "windowed centroid, 0-based row"),
    "peak": ("f8", "adu", "brightest pixel above the local background (3x3 around the centroid)"),
    "sky": ("f8", "adu", "local background level"),
    "sky_rms": ("f8", "adu", "local background noise per pixel"),
    "snr": ("f8", None, "peak S/N in the matched-filtered (Gaussian) image"),
    "fwhm": ("f8", "pix", "FWHM: Gaussian-windowed second moments scaled to the half-maximum width of bright stars"),
    "elongation": ("f8", None, "a/b from the footprint's second moments of the filtered light (>= 1)"),
    "orientation": ("f8", "deg", "major-axis angle from +x, in (-90, 90]"),
    "sharpness": ("f8", None, "peak / peak expected for a PSF-like spot of the filter FWHM (~1 for stars)"),
    "asymmetry": ("f8", None, "|third moment| along the major axis / sigma^3 (head/tail skewness)"),
    "npix": ("i8", None, "footprint size (pixels)"),
    "label": ("i8", None, "label of the spot's footprint in the segmentation image"),
    "saturated": ("bool", None, "a pixel within ~FWHM of the peak is at or above saturation"),
    "transmission": ("f8", None, "focal-plane mask sky transmission at the spot (1 = open sky)"),
    "usable": ("bool", None, "inside the profile's usable region"),
}


@dataclass
class DetectionResult:
    """What :func:`detect_spots` returns.

    Attributes
    ----------
    spots : Table
        One row per spot, columns :data:`SPOT_COLUMNS`; ``spots.meta['fwhm']`` is the
        frame's median stellar FWHM (pix), ``spots.meta['saturation']`` the level used.
    segmentation : ndarray of int32
        Footprints: 0 = background, spot ``i``'s pixels equal ``spots['label'][i]``.
    background, background_rms : ndarray of float32
        Sky level and sky noise per pixel (adu).
    """

    spots: Table
    segmentation: np.ndarray
    background: np.ndarray
    background_rms: np.ndarray

    @property
    def fwhm(self) -> float:
        """The frame's median stellar FWHM (pix)."""
        return float(self.spots.meta.get("fwhm", np.nan))


# ---------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------
def saturation_level(data: np.ndarray, profile: InstrumentProfile | None = None,
                     min_pixels: int = 25) -> float:
    """Saturation level to flag against: the frame's ceiling if it is visibly clipped.

    A frame whose maximum value is reached by at least ``min_pixels`` pixels (an 8-bit
    rendering, a clipped simulation) is taken to saturate at that maximum; otherwise
    the profile's ``saturation`` (inf without a profile).
    """
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    nominal = float(profile.saturation) if profile is not None else np.inf
    top = float(np.max(data, where=np.isfinite(data), initial=-np.inf))
    if top == -np.inf:  # no finite pixel
        return nominal
    if np.count_nonzero(data == top) >= min_pixels:
        return min(nominal, top)
    return nominal


def _line_minimum(img: np.ndarray, x1, y1, x2, y2, n: int = 24) -> np.ndarray:
    """Minimum of ``img`` (nearest pixel) sampled along segments, vectorised over pairs."""
    t = np.linspace(0.0, 1.0, n)[None, :]
    xs = np.rint(x1[:, None] + (x2 - x1)[:, None] * t).astype(np.int64)
    ys = np.rint(y1[:, None] + (y2 - y1)[:, None] * t).astype(np.int64)
    ys = np.clip(ys, 0, img.shape[0] - 1)
    xs = np.clip(xs, 0, img.shape[1] - 1)
    return img[ys, xs].min(axis=1)


def _merge_parents(img: np.ndarray, px, py, pval, pairs: np.ndarray, contrast: float,
                   merge_sigma: float) -> np.ndarray:
    """The higher maximum each maximum merges into, vectorised over candidate pairs.

    Parameters
    ----------
    img : ndarray
        Significance image the maxima were found in.
    px, py, pval : ndarray
        Maxima: pixel column, row and value.
    pairs : ndarray of int, shape (m, 2)
        Candidate pairs (indices into the maxima).
    contrast, merge_sigma : float
        A maximum merges when it stands no more than ``contrast`` times its height, or
        no more than ``merge_sigma``, above the saddle (the minimum of ``img`` along the
        segment) joining it to a higher maximum.

    Returns
    -------
    ndarray of int
        Index of the parent maximum, -1 for a maximum that is a peak of its own.

    Notes
    -----
    A maximum merges into one parent at most: the higher maximum it is best connected
    to (highest saddle). A faint maximum between two sources (a noise bump in the gap,
    the end of one's tail) thus joins one of them and never chains them together, while
    a tail's maxima still form a tree whose root is the head.
    """
    n = px.size
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), pval))] = np.arange(n)  # ties broken by index
    lo = np.where(rank[pairs[:, 0]] < rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    hi = pairs[:, 0] + pairs[:, 1] - lo
    length = int(np.ceil(np.hypot(px[hi] - px[lo], py[hi] - py[lo]).max()))
    saddle = _line_minimum(img, px[lo].astype(float), py[lo].astype(float), px[hi].astype(float),
                           py[hi].astype(float), n=max(8, length + 1))
    drop = pval[lo] - saddle
    ok = (drop <= contrast * pval[lo]) | (drop <= merge_sigma)
    lo, hi, saddle = lo[ok], hi[ok], saddle[ok]
    parent = np.full(n, -1, np.int64)
    if lo.size:
        order = np.lexsort((-saddle, lo))  # per maximum, the best-connected parent first
        lo, hi = lo[order], hi[order]
        first = np.r_[True, lo[1:] != lo[:-1]]
        parent[lo[first]] = hi[first]
    return parent


def detect_spots(data: np.ndarray, *, profile: InstrumentProfile | None, mask: np.ndarray | None = None,
                 fwhm: float | None = None, threshold: float = 5.0,
                 background: np.ndarray | None = None, background_rms: np.ndarray | None = None,
                 saturation: float | None = None, footprint_threshold: float = 2.0,
                 min_separation: float | None = None, merge_radius: float | None = None,
                 contrast: float = 0.1, merge_sigma: float = 3.0,
                 min_npix: int = 5, max_censored: float = 0.2,
                 min_calibrators: int = 8) -> DetectionResult:
    """Find the spots in a frame and measure their position, shape and flags.

    Parameters
    ----------
    data : ndarray
        2-D frame (adu). NaN/inf pixels are masked.
    profile : InstrumentProfile or None
        Instrument profile (default FWHM, saturation, mask transmission, usable region).
    mask : ndarray of bool, optional
        True for pixels to ignore.
    fwhm : float, optional
        FWHM (pix) of the Gaussian matched filter; the profile's ``fwhm`` by default.
    threshold : float
        Detection threshold: peak of the matched-filtered frame in units of its noise.
    background, background_rms : ndarray, optional
        Sky and sky-noise maps (adu); estimated with :func:`estimate_background` if absent.
    saturation : float, optional
        Level (adu, same zero as ``data``) at or above which a pixel is saturated; by
        default :func:`saturation_level` (the ceiling of a clipped frame, else the
        profile's value).
    footprint_threshold : float
        Footprints are the connected pixels of the filtered frame above this many sigma
        (capped at ``threshold``).
    min_separation : float, optional
        Local maxima closer than this (pix) are one candidate (default: the FWHM).
    merge_radius : float, optional
        Maxima of one footprint closer than this (pix; default 12 FWHM, the length of
        the longest reflection streaks) are candidates for merging: a maximum not
        separated from a higher one by a real saddle merges into the one it is best
        connected to (highest saddle), and into that one only.
    contrast, merge_sigma : float
        A saddle is real when the fainter maximum exceeds it by more than ``contrast``
        times its height *and* by more than ``merge_sigma`` (filtered sigma).
    min_npix : int
        Smallest footprint (pixels) kept.
    min_calibrators : int
        Fewest bright, round, unsaturated spots needed to calibrate the FWHM scale (the
        windowed-moment FWHM is scaled to their half-maximum FWHM; unscaled otherwise).
    max_censored : float
        In a frame clipped at a floor (many pixels at its minimum value, e.g. an 8-bit
        rendering), no peak is accepted where more than this fraction of the nearby
        pixels sit at the floor: the sky there is censored and its noise unknown.

    Returns
    -------
    DetectionResult
        Spots table (empty, with all columns, when nothing is found), segmentation image,
        background and background rms.
    """
    data = np.asarray(data, np.float32)
    if data.ndim != 2:
        raise ValueError(f"detect_spots needs a 2-D frame, got {data.ndim}-D data")
    if data.size == 0:
        raise ValueError("detect_spots: empty frame")
    bad = unusable_pixels(data, mask)
    shape = data.shape
    if fwhm is None:
        fwhm = float(profile.fwhm) if profile is not None else 4.0
    fwhm = float(fwhm)
    if not fwhm > 0:
        raise ValueError(f"fwhm must be positive, got {fwhm}")
    sat = saturation_level(data, profile) if saturation is None else float(saturation)
    background, rms = _sky_maps(data, bad, profile, background, background_rms)
    sigma_k = fwhm / _SIG2FWHM
    resid, smooth, signif, bad = _significance(data, bad, background, rms, sigma_k, max_censored)

    def result(spots: Table, segmentation: np.ndarray) -> DetectionResult:
        return DetectionResult(spots, segmentation, np.ascontiguousarray(background),
                               np.ascontiguousarray(rms))

    def nothing_found() -> DetectionResult:
        spots = _empty_spots()
        spots.meta.update({"fwhm": fwhm, "saturation": sat, "threshold": float(threshold)})
        return result(spots, np.zeros(shape, np.int32))

    min_sep = fwhm if min_separation is None else float(min_separation)
    px, py, pval = _local_maxima(signif, threshold, max(1, round(min_sep * 0.75)))
    if px.size == 0:
        return nothing_found()

    # -- footprints; merge maxima without a real saddle between them (noisy streak tails)
    fthr = min(footprint_threshold, threshold)
    above = signif >= fthr
    seg, nseg = ndimage.label(above, structure=np.ones((3, 3)))
    fpix = np.flatnonzero(above)  # footprint pixels (raster order) and their footprint
    flab = seg.ravel()[fpix]
    pseg = seg[py, px]
    mrad = 12.0 * fwhm if merge_radius is None else float(merge_radius)
    if px.size > 1:
        pairs = cKDTree(np.column_stack([px, py])).query_pairs(mrad, output_type="ndarray")
        if pairs.size:
            pairs = pairs[pseg[pairs[:, 0]] == pseg[pairs[:, 1]]]
        if pairs.size:
            keep = _merge_parents(signif, px, py, pval, pairs, contrast, merge_sigma) < 0
            px, py, pval, pseg = px[keep], py[keep], pval[keep], pseg[keep]

    # Drop peaks whose footprint is too small (isolated hot pixels at the threshold).
    ok = np.bincount(flab, minlength=nseg + 1)[pseg] >= min_npix
    px, py, pval, pseg = px[ok], py[ok], pval[ok], pseg[ok]
    n = px.size
    if n == 0:
        return nothing_found()
    order = np.lexsort((px, py))  # deterministic order: by row, then column
    px, py, pval, pseg = px[order], py[order], pval[order], pseg[order]

    # -- segmentation: one label per spot; shared footprints split between their spots
    spot, share = _split_footprints(fpix, flab, nseg, px, py, pseg, smooth, fwhm)
    owned = spot >= 0
    fpix, spot, share = fpix[owned], spot[owned], share[owned]
    segmentation = np.zeros(shape, np.int32)
    segmentation.ravel()[fpix] = spot + 1

    # -- measurements (vectorised over spots)
    meas = _cutout_measures(resid, data, smooth, px, py, fwhm, sat)
    meas.update(_footprint_shapes(smooth, signif, fthr, fpix, spot, share, n))
    x, y = px + meas.pop("dx"), py + meas.pop("dy")
    ny, nx = shape
    xi = np.clip(np.floor(x + 0.5).astype(int), 0, nx - 1)
    yi = np.clip(np.floor(y + 0.5).astype(int), 0, ny - 1)
    if profile is not None:
        transmission = profile.transmission(shape)[yi, xi].astype(float)
        usable = np.asarray(profile.usable(x, y, shape), bool)
    else:
        transmission = np.ones(n)
        usable = np.ones(n, bool)
    clear = usable & (transmission >= 0.99)  # open sky, away from the mask and the edges
    if np.count_nonzero(clear) < min_calibrators:
        clear = np.ones(n, bool)
    scale = _fwhm_scale(meas, pval, clear, min_calibrators)
    spots = _spots_table({
        "spot_id": np.arange(n), "x": x, "y": y, "peak": meas["peak"],
        "sky": background[yi, xi], "sky_rms": rms[yi, xi], "snr": pval,
        "fwhm": meas["fwhm"] * scale, "elongation": meas["elongation"],
        "orientation": meas["orientation"], "sharpness": meas["sharpness"],
        "asymmetry": meas["asymmetry"], "npix": meas["npix"], "label": np.arange(1, n + 1),
        "saturated": meas["saturated"], "transmission": transmission, "usable": usable,
    })
    good = clear & (~spots["saturated"]) & (spots["snr"] >= max(2 * threshold, 10.0)) & \
        (spots["elongation"] < 1.5) & (spots["sharpness"] > 0.5) & np.isfinite(spots["fwhm"])
    frame_fwhm = float(np.median(spots["fwhm"][good])) if np.count_nonzero(good) >= 3 else fwhm
    spots.meta.update({"fwhm": frame_fwhm, "filter_fwhm": fwhm, "fwhm_scale": scale,
                       "saturation": sat, "threshold": float(threshold)})
    log.debug("detected %d spots (frame FWHM %.2f px)", n, frame_fwhm)
    return result(spots, segmentation)


# ---------------------------------------------------------------------------------
# Stages of detect_spots
# ---------------------------------------------------------------------------------
def _sky_maps(data, bad, profile, background, background_rms):
    """Sky and sky-noise maps (float32, shape of ``data``); noise non-positive or not
    finite is replaced by the median of the rest."""
    shape = data.shape
    if background is None or background_rms is None:
        if bad.all():
            b0, r0 = np.zeros(shape, np.float32), np.ones(shape, np.float32)
        else:
            b0, r0 = estimate_background(data, mask=bad, profile=profile)
        background = b0 if background is None else background
        background_rms = r0 if background_rms is None else background_rms
    background = np.broadcast_to(np.asarray(background, np.float32), shape)
    rms = np.broadcast_to(np.asarray(background_rms, np.float32), shape)
    if not (np.min(rms) > 0 and np.max(rms) < np.inf):  # NaN fails both
        rms_ok = np.isfinite(rms) & (rms > 0)
        fill = np.float32(np.median(rms[rms_ok])) if rms_ok.any() else np.float32(1.0)
        rms = np.where(rms_ok, rms, fill).astype(np.float32)
    return background, rms


def _significance(data, bad, background, rms, sigma_k, max_censored):
    """Residual (bad pixels 0), its matched-filtered version, and that in units of its noise.

    No peak may sit on a bad pixel or where a clipped rendering's sky is censored
    (there the significance is capped at 0). Returns ``resid, smooth, signif, bad``
    (``bad`` now also flags a non-finite background).
    """
    resid = data - background
    resid[bad] = 0.0
    if not np.isfinite(resid).all():
        nonfinite = ~np.isfinite(resid)
        resid[nonfinite] = 0.0
        bad = bad | nonfinite
    smooth = _gaussian_filter(resid, sigma_k)
    signif = np.divide(smooth, rms)
    signif *= np.float32(1.0 / _gaussian_noise_factor(sigma_k))
    if bad.any():
        signif[bad] = np.minimum(signif[bad], 0.0)
    # A rendering clipped at a floor (8-bit display frames) has censored sky where the mask
    # is dark: its median and MAD say nothing about the noise, so peaks there are dropped.
    censored = _censored_fraction(data, bad, sigma_k)
    if censored is not None:
        signif[censored > max_censored] = np.minimum(signif[censored > max_censored], 0.0)
    return resid, smooth, signif, bad


def _local_maxima(signif: np.ndarray, threshold: float, radius: int):
    """Local maxima of ``signif`` at or above ``threshold``: column, row and value.

    A maximum is the largest value of the ``2 radius + 1`` pixel square around it (as
    ``scipy.ndimage.maximum_filter``; outside the frame counts as -inf). Of a plateau of
    equal, touching maxima only the first pixel in raster order is kept.
    """
    size = 2 * radius + 1
    local_max = np.pad(signif, radius, constant_values=-np.inf)
    for axis in (0, 1):
        local_max = _running_max(local_max, size, axis)
    is_peak = signif >= local_max
    is_peak &= signif >= threshold
    pidx = np.flatnonzero(is_peak)
    nx = signif.shape[1]
    # Plateaus (touching maxima) are rare: label only when some maxima touch.
    ahead = np.concatenate([pidx + step for step in (1, nx - 1, nx, nx + 1)])
    if np.isin(ahead, pidx).any():
        plab, _ = ndimage.label(is_peak, structure=np.ones((3, 3)))
        _, first = np.unique(plab.ravel()[pidx], return_index=True)
        pidx = pidx[first]
    py, px = np.divmod(pidx, nx)
    return px, py, signif.ravel()[pidx]


def _split_footprints(fpix, flab, nseg, px, py, pseg, smooth, fwhm, chunk: int = 1 << 20):
    """The spot owning each footprint pixel and its weight in the shape moments.

    A footprint with one spot is all that spot's. A pixel of a footprint shared by
    several goes to the spot whose PSF-like model, scaled to the spot's filtered peak,
    is largest there (a brightness-weighted Voronoi split over the footprint's spots);
    its weight is that spot's share of the summed models.

    Returns
    -------
    spot : ndarray of int
        Index of the owning spot, -1 for pixels of footprints without a spot.
    share : ndarray of float32
        Weight of the pixel (1 outside shared footprints).
    """
    counts = np.bincount(pseg, minlength=nseg + 1)
    owner = np.full(nseg + 1, -1, np.int64)
    single = counts[pseg] == 1
    owner[pseg[single]] = np.flatnonzero(single)
    spot = owner[flab]
    share = np.ones(flab.size, np.float32)
    sel = np.flatnonzero(counts[flab] > 1)
    if sel.size == 0:
        return spot, share
    # The spots of each shared footprint, one row per footprint (padding: -1, log amplitude
    # -inf), and their positions and log filtered amplitudes.
    multi = np.flatnonzero(counts[pseg] > 1)
    multi = multi[np.argsort(pseg[multi], kind="stable")]
    segs, start, per_seg = np.unique(pseg[multi], return_index=True, return_counts=True)
    where = (np.repeat(np.arange(segs.size), per_seg), np.arange(multi.size) - np.repeat(start, per_seg))
    peaks = np.full((segs.size, per_seg.max()), -1, np.int64)
    peaks[where] = multi
    peak_x, peak_y = np.zeros(peaks.shape), np.zeros(peaks.shape)
    peak_x[where], peak_y[where] = px[multi], py[multi]
    log_amp = np.full(peaks.shape, -np.inf)
    log_amp[where] = np.log(np.maximum(smooth[py[multi], px[multi]].astype(np.float64), 1e-12))
    row_of = np.zeros(nseg + 1, np.int64)
    row_of[segs] = np.arange(segs.size)
    step = max(1, chunk // peaks.shape[1])
    for lo in range(0, sel.size, step):  # in chunks: bounded memory
        part = sel[lo: lo + step]
        row = row_of[flab[part]]
        sy, sx = np.divmod(fpix[part], smooth.shape[1])
        d2 = (peak_x[row] - sx[:, None]) ** 2 + (peak_y[row] - sy[:, None]) ** 2
        logw = log_amp[row] - 0.5 * d2 / fwhm**2
        best = np.argmax(logw, axis=1)
        idx = np.arange(part.size)
        with np.errstate(invalid="ignore", over="ignore"):
            frac = 1.0 / np.sum(np.exp(logw - logw[idx, best][:, None]), axis=1)
        spot[part] = peaks[row, best]
        share[part] = np.where(np.isfinite(frac), frac, 1.0)
    return spot, share


def _cutout_measures(resid, data, smooth, px, py, fwhm, sat) -> dict:
    """Windowed centroid offset (``dx``, ``dy``), FWHM, peak, sharpness, half-maximum
    FWHM and saturation of each spot, from cutouts around its peak pixel."""
    n = px.size
    sigma_k = fwhm / _SIG2FWHM
    half = math.ceil(2.5 * fwhm)
    size = 2 * half + 1
    cut = extract_cutouts(resid, px, py, size, fill=0.0, dtype=np.float64)  # bad pixels are 0
    off = np.arange(size, dtype=float) - half

    def window_sums(cx, cy, sw2):
        """Sums over each cutout of w, w dx, w dy and w r^2, w = cutout x exp(-r^2 / 2 sw2)
        around (cx, cy): the window is separable, so two small products per spot."""
        ddx, ddy = off - cx[:, None], off - cy[:, None]
        gx, gy = np.exp(-0.5 * ddx**2 / sw2), np.exp(-0.5 * ddy**2 / sw2)
        rows = np.matmul(cut, np.stack([gx, gx * ddx, gx * ddx**2], axis=2))  # (n, size, 3)
        w = (gy * rows[..., 0]).sum(axis=1)
        return (w, (gy * rows[..., 1]).sum(axis=1), (gy * ddy * rows[..., 0]).sum(axis=1),
                (gy * (rows[..., 2] + ddy**2 * rows[..., 0])).sum(axis=1))

    # Windowed (Gaussian-weighted, SExtractor XWIN-like) centroid, iterated.
    cx = np.zeros(n)
    cy = np.zeros(n)
    for _ in range(6):
        s, sx, sy, _ = window_sums(cx, cy, sigma_k**2)
        okc = s > 0
        step_x = np.where(okc, 2.0 * sx / np.where(okc, s, 1), 0.0)
        step_y = np.where(okc, 2.0 * sy / np.where(okc, s, 1), 0.0)
        cx = np.clip(cx + np.clip(step_x, -1.0, 1.0), -fwhm, fwhm)
        cy = np.clip(cy + np.clip(step_y, -1.0, 1.0), -fwhm, fwhm)

    # Gaussian-windowed second moments, deconvolved from the window -> FWHM.
    sw2 = (1.5 * sigma_k) ** 2
    s, _, _, sr2 = window_sums(cx, cy, sw2)
    m2 = np.where(s > 0, 0.5 * sr2 / np.where(s > 0, s, 1), np.nan)
    m2 = np.clip(m2, 1e-3, 0.95 * sw2)
    fwhm_spot = _SIG2FWHM * np.sqrt(m2 * sw2 / (sw2 - m2))

    # Peak: brightest pixel of the 3x3 around the centroid; sharpness vs the filtered peak.
    idx = np.arange(n)
    ic = np.clip(np.rint(cy).astype(int) + half, 1, size - 2)
    jc = np.clip(np.rint(cx).astype(int) + half, 1, size - 2)
    rows = ic[:, None] + np.array([-1, 0, 1])[None, :]
    cols = jc[:, None] + np.array([-1, 0, 1])[None, :]
    peak = cut[idx[:, None, None], rows[:, :, None], cols[:, None, :]].max(axis=(1, 2))
    # The filtered peak of a Gaussian spot of the filter's own width is half its amplitude.
    filt_peak = smooth[py, px].astype(np.float64)
    sharp = np.where(filt_peak > 0, peak / (2.0 * np.where(filt_peak > 0, filt_peak, 1)), np.nan)

    # Half-maximum area (bright spots): true FWHM for any profile shape, used to calibrate
    # the moment-based values of the frame. Peak from a parabola through the 3x3 core.
    f0 = cut[idx, ic, jc]
    fxm, fxp = cut[idx, ic, jc - 1], cut[idx, ic, jc + 1]
    fym, fyp = cut[idx, ic - 1, jc], cut[idx, ic + 1, jc]
    with np.errstate(divide="ignore", invalid="ignore"):
        cxq = 2 * f0 - fxm - fxp
        cyq = 2 * f0 - fym - fyp
        top = f0 + np.where(cxq > 0, (fxp - fxm) ** 2 / (8 * cxq), 0.0) \
            + np.where(cyq > 0, (fyp - fym) ** 2 / (8 * cyq), 0.0)
    top = np.clip(np.where(np.isfinite(top), top, f0), f0, 1.5 * np.maximum(f0, 0))
    r2 = (off - cx[:, None])[:, None, :] ** 2 + (off - cy[:, None])[:, :, None] ** 2
    area = ((cut >= 0.5 * top[:, None, None]) & (r2 <= (2.0 * fwhm) ** 2)).sum(axis=(1, 2))
    fwhm_half = np.where(top > 0, 2.0 * np.sqrt(area / np.pi), np.nan)

    # Saturation: any raw pixel within ~FWHM of the peak at/above the level.
    saturated = np.zeros(n, bool)
    hot = data >= np.float64(sat)  # compared in float64, as the level is given
    if hot.any():
        reach = max(fwhm, 1.5)
        o = np.arange(-math.floor(reach), math.floor(reach) + 1)
        near = o[None, :] ** 2 + o[:, None] ** 2 <= reach**2
        saturated = (extract_cutouts(hot, px, py, o.size, fill=False, dtype=bool) & near).any(axis=(1, 2))
    return {"dx": cx, "dy": cy, "peak": peak, "fwhm": fwhm_spot, "fwhm_half": fwhm_half,
            "sharpness": sharp, "saturated": saturated}


def _footprint_shapes(smooth, signif, fthr, fpix, spot, share, n) -> dict:
    """Footprint size, elongation, orientation and asymmetry of each spot.

    Moments via bincount over footprint pixels, weighted by the matched-filtered light
    above the footprint isophote: per-pixel noise (and its positive-clipped bias in a
    star's faint outskirts) would otherwise dominate the shape of all but the brightest
    spots, while a streak's extent is kept.
    """
    fy, fx = np.divmod(fpix, smooth.shape[1])
    lab = spot + 1
    sig = signif.ravel()[fpix].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(sig > fthr, smooth.ravel()[fpix] * (1.0 - fthr / sig), 0.0)
    val *= share
    nb = n + 1
    npix = np.bincount(lab, minlength=nb)[1:]
    f0 = np.bincount(lab, val, nb)
    f0s = np.where(f0 > 0, f0, 1.0)
    mx = np.bincount(lab, val * fx, nb) / f0s
    my = np.bincount(lab, val * fy, nb) / f0s
    ux = fx - mx[lab]
    uy = fy - my[lab]
    mxx = np.bincount(lab, val * ux * ux, nb) / f0s + 1.0 / 12.0
    myy = np.bincount(lab, val * uy * uy, nb) / f0s + 1.0 / 12.0
    mxy = np.bincount(lab, val * ux * uy, nb) / f0s
    tr = 0.5 * (mxx + myy)
    det = np.sqrt(np.maximum(0.25 * (mxx - myy) ** 2 + mxy**2, 0.0))
    a2 = tr + det
    b2 = np.maximum(tr - det, 1e-6)
    elong = np.sqrt(a2 / b2)
    theta = 0.5 * np.arctan2(2 * mxy, mxx - myy)
    proj = ux * np.cos(theta)[lab] + uy * np.sin(theta)[lab]
    vp2 = val * proj * proj
    m3 = np.bincount(lab, vp2 * proj, nb) / f0s
    m2a = np.bincount(lab, vp2, nb) / f0s
    asym = np.abs(m3) / np.maximum(m2a, 1e-6) ** 1.5
    orient = np.degrees(theta)
    orient = np.where(orient <= -90.0, orient + 180.0, orient)
    nofoot = f0 <= 0
    elong[nofoot] = 1.0
    orient[nofoot] = 0.0
    asym[nofoot] = 0.0
    return {"npix": npix, "elongation": elong[1:], "orientation": orient[1:], "asymmetry": asym[1:]}


def _fwhm_scale(meas: dict, snr: np.ndarray, clear: np.ndarray, min_calibrators: int) -> float:
    """Scale from the windowed-moment FWHM (robust for faint spots but biased by PSF wings)
    to the half-maximum FWHM, calibrated on the bright, round, unsaturated spots of
    ``clear`` sky; 1 with fewer than ``min_calibrators`` of them or an implausible value."""
    fw = meas["fwhm"]
    cal = clear & (~meas["saturated"]) & (snr >= 20.0) & (meas["elongation"] < 1.5) & \
        (meas["sharpness"] > 0.5) & (meas["sharpness"] < 2.0) & np.isfinite(meas["fwhm_half"]) & \
        np.isfinite(fw) & (fw > 0)
    if cal.any():
        cal &= np.abs(fw / np.median(fw[cal]) - 1.0) < 0.25
    if np.count_nonzero(cal) < min_calibrators:
        return 1.0
    scale = float(np.median(meas["fwhm_half"][cal] / fw[cal]))
    return scale if 0.6 <= scale <= 1.5 else 1.0


def _spots_table(values: dict) -> Table:
    """The spots table: columns :data:`SPOT_COLUMNS`, with their units and descriptions."""
    table = Table()
    for name, (dtype, unit, desc) in SPOT_COLUMNS.items():
        table[name] = np.asarray(values[name]).astype(dtype) if values else np.zeros(0, dtype)
        table[name].unit = unit
        table[name].description = desc
    return table


def _empty_spots() -> Table:
    return _spots_table({})


# ---------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------
def _gaussian_noise_factor(sigma: float) -> float:
    """rms of a Gaussian-filtered white-noise image of unit rms (discrete kernel)."""
    r = int(_TRUNCATE * sigma + 0.5)  # as scipy.ndimage.gaussian_filter
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sum(k**2))  # separable: 2-D factor = (sum k^2)_1d^2, sqrt -> sum k^2


def _gaussian_filter(image: np.ndarray, sigma: float, truncate: float = _TRUNCATE,
                     mode: str = "constant", tile: int = 32) -> np.ndarray:
    """Gaussian filter of a float32 image, as ``scipy.ndimage.gaussian_filter``.

    Same kernel (radius ``int(truncate * sigma + 0.5)``) and edges (``mode='constant'``:
    zeros; ``'nearest'``: the edge pixel repeated), to float32 rounding. Each axis is a
    banded matrix product per ``tile`` rows or columns (BLAS): several times faster than
    ndimage's line-by-line correlation.
    """
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    band = np.zeros((tile, tile + 2 * r), np.float32)  # output i of a tile reads inputs i .. i + 2r
    band[np.arange(tile)[:, None], np.arange(tile)[:, None] + np.arange(2 * r + 1)] = k / k.sum()
    ny, nx = image.shape
    ty, tx = -(-ny // tile), -(-nx // tile)
    pad = np.pad(np.asarray(image, np.float32), ((r, r + ty * tile - ny), (r, r + tx * tile - nx)),
                 mode="edge" if mode == "nearest" else "constant")
    # Along y: tiles of rows, each (tile + 2r) x width, as strided views of the padded image.
    rows = sliding_window_view(pad, tile + 2 * r, axis=0)[::tile].transpose(0, 2, 1)
    along_y = np.matmul(band, rows).reshape(ty * tile, -1)
    cols = sliding_window_view(along_y, tile + 2 * r, axis=1)[:, ::tile].transpose(1, 0, 2)
    out = np.empty((ty * tile, tx * tile), np.float32)
    np.matmul(cols, band.T, out=out.reshape(ty * tile, tx, tile).transpose(1, 0, 2))
    return out[:ny, :nx] if (ty * tile, tx * tile) != (ny, nx) else out


def _running_max(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Maximum over windows of ``size`` samples along ``axis`` (the axis shrinks by
    ``size - 1``), combining windows of 1, 2, 4, ... samples pairwise."""
    def part(start, stop):
        return (slice(None),) * axis + (slice(start, stop),)

    out = values
    width = 1
    while width < size:
        step = min(width, size - width)
        out = np.maximum(out[part(None, -step)], out[part(step, None)])
        width += step
    return out


def _censored_fraction(data: np.ndarray, bad: np.ndarray, sigma: float,
                       min_fraction: float = 0.005) -> np.ndarray | None:
    """Local fraction of pixels sitting at a clipped floor, or None if the frame has no floor."""
    good = ~bad
    if not good.any():
        return None
    floor = float(np.min(data, where=good, initial=np.inf))
    at_floor = good & (data <= floor)
    n_floor, n_good = np.count_nonzero(at_floor), np.count_nonzero(good)
    if n_floor < min_fraction * n_good:
        return None
    if n_floor > n_good // 2:  # the median is the floor: a constant (noise-free) sky, not a clip
        return None
    return _gaussian_filter(at_floor.astype(np.float32), 2 * sigma, truncate=4.0, mode="nearest")
