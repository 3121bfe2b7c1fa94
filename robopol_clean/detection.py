"""Sky background and spot detection.

Every source makes four spots; this module finds spots, not sources (grouping them into
quadruplets is :mod:`robopol_clean.grouping`'s job).

Background
    :func:`estimate_background` fits a smooth sky (photutils `~photutils.background.Background2D`,
    sigma-clipped, robust) on the open sky. The focal-plane mask of a profile (its arms are
    strips a few tens of pixels wide with sharp edges) cannot be followed by boxes of
    ~64 px, so near the mask the sky is estimated again at finer resolution: along the
    arms (thin blocks of one row or column by ``arm_block`` pixels, which follow an arm's
    edges to a pixel even when the real arm is slightly offset or tilted from the
    profile's model) and, around the central blob and the target squares, as the open
    sky times a measured ratio per transmission zone plus a small-box correction.

Detection
    :func:`detect_spots` smooths the background-subtracted frame with a Gaussian matched
    filter of the stellar FWHM, finds local maxima above ``threshold`` times the filtered
    noise, merges each maximum not separated by a real saddle from a higher one into the
    best connected of those (so a streak with a noisy tail stays one spot, while a faint
    maximum between two sources never joins them), segments the frame at
    ``footprint_threshold`` and splits shared footprints between their spots, and measures
    every spot vectorised: windowed centroid, Gaussian-windowed FWHM, footprint moments
    (elongation, orientation, head/tail asymmetry), sharpness, saturation, mask
    transmission and usability.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.stats import SigmaClip
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from .cutouts import extract_cutouts
from .instrument import InstrumentProfile

__all__ = [
    "SPOT_COLUMNS",
    "DetectionResult",
    "detect_spots",
    "estimate_background",
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
# Background
# ---------------------------------------------------------------------------------
def _bad_pixels(data: np.ndarray, mask) -> np.ndarray:
    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the data shape {data.shape}")
        bad |= mask
    return bad


def _nanmedian_sorted(v: np.ndarray, axis: int) -> np.ndarray:
    """Median along an axis ignoring NaN, vectorised (sorting puts NaN last)."""
    srt = np.sort(v, axis=axis)
    cnt = np.count_nonzero(np.isfinite(v), axis=axis)
    lo = np.expand_dims(np.maximum((cnt - 1) // 2, 0), axis)
    hi = np.expand_dims(np.maximum(cnt // 2, 0), axis)
    hi = np.minimum(hi, v.shape[axis] - 1)
    med = 0.5 * (np.take_along_axis(srt, lo, axis) + np.take_along_axis(srt, hi, axis))
    med = np.squeeze(med, axis)
    return np.where(cnt > 0, med, np.nan)


def _clipped_stats(values: np.ndarray, axis=None, sigma: float = 3.0, iters: int = 3):
    """Sigma-clipped median and MAD-based standard deviation along an axis (NaN = missing)."""
    v = np.array(values, dtype=np.float32, copy=True)
    if axis is None:
        v = v.ravel()
        axis = 0
    for _ in range(iters):
        med = np.expand_dims(_nanmedian_sorted(v, axis), axis)
        std = 1.4826 * np.expand_dims(_nanmedian_sorted(np.abs(v - med), axis), axis)
        with np.errstate(invalid="ignore"):
            v[np.abs(v - med) > sigma * np.maximum(std, 1e-12)] = np.nan
    med = _nanmedian_sorted(v, axis)
    std = 1.4826 * _nanmedian_sorted(np.abs(v - np.expand_dims(med, axis)), axis)
    return med, std


def _mask_regions(profile: InstrumentProfile, shape: tuple[int, int], margin: int):
    """Boolean maps of the mask's horizontal bands, vertical bands and compact parts."""
    ny, nx = shape
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    hreg = np.zeros(shape, bool)
    vreg = np.zeros(shape, bool)
    creg = np.zeros(shape, bool)
    for s in profile.mask_shapes:
        if s.transmission >= 1.0:
            continue
        p = s.params
        if s.kind == "hband":
            rows = np.abs(yy[:, 0] - p["y"]) <= p["width"] / 2 + margin
            hreg[rows, :] = True
        elif s.kind == "vband":
            cols = np.abs(xx[0] - p["x"]) <= p["width"] / 2 + margin
            vreg[:, cols] = True
        else:
            inside = np.broadcast_to(profile._inside(s, xx, yy, shape), shape)
            if inside.any():
                creg |= ndimage.binary_dilation(inside, iterations=margin) if margin else inside
    creg |= hreg & vreg
    hreg &= ~creg
    vreg &= ~creg
    return hreg, vreg, creg


def _directional_background(data: np.ndarray, bad: np.ndarray, region: np.ndarray, block: int,
                            axis: int):
    """Sky along bands: sigma-clipped medians of 1 x ``block`` pixel runs along ``axis``.

    ``axis=1`` for horizontal bands (runs along x), ``axis=0`` for vertical ones. Returns
    (background, rms) filled where ``region`` is True, NaN elsewhere.
    """
    if axis == 0:
        bkg, rms = _directional_background(data.T, bad.T, region.T, block, 1)
        return bkg.T, rms.T
    _ny, nx = data.shape
    rows = np.flatnonzero(region.any(axis=1))
    bkg = np.full(data.shape, np.nan, np.float32)
    rms = np.full(data.shape, np.nan, np.float32)
    if rows.size == 0:
        return bkg, rms
    nb = max(1, round(nx / block))
    edges = np.linspace(0, nx, nb + 1).astype(int)
    width = int(np.max(np.diff(edges)))
    sub = np.where(bad[rows] | ~region[rows], np.nan, data[rows]).astype(np.float32)
    runs = np.full((rows.size, nb, width), np.nan, np.float32)
    for b in range(nb):  # a handful of blocks, each vectorised over all rows
        runs[:, b, : edges[b + 1] - edges[b]] = sub[:, edges[b]: edges[b + 1]]
    med, std = _clipped_stats(runs, axis=2)
    # Light smoothing across rows (3) and along the band (3 blocks), ignoring gaps.
    med = _nan_smooth(med)
    std = _nan_smooth(std)
    centres = 0.5 * (edges[:-1] + edges[1:]) - 0.5
    xs = np.arange(nx)
    for arr, out in ((med, bkg), (std, rms)):
        filled = _fill_along(arr)
        if nb == 1:
            out[rows] = filled[:, :1]
        else:
            # Linear interpolation along x between block centres, all rows at once.
            j = np.clip(np.searchsorted(centres, xs) - 1, 0, nb - 2)
            t = np.clip((xs - centres[j]) / (centres[j + 1] - centres[j]), 0.0, 1.0)
            out[rows] = filled[:, j] * (1 - t) + filled[:, j + 1] * t
    keep = region
    bkg[~keep] = np.nan
    rms[~keep] = np.nan
    return bkg, rms


def _nan_smooth(arr: np.ndarray) -> np.ndarray:
    """3x3 median ignoring NaN (rows x blocks)."""
    pad = np.pad(arr, 1, mode="edge")
    stack = np.stack([pad[i:i + arr.shape[0], j:j + arr.shape[1]] for i in range(3) for j in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmedian(stack, axis=0)
    return np.where(np.isfinite(out), out, arr)


def _fill_along(arr: np.ndarray) -> np.ndarray:
    """Fill NaN along the last axis by the row's nearest finite value (then the global median)."""
    arr = arr.copy()
    bad = ~np.isfinite(arr)
    if not bad.any():
        return arr
    n = arr.shape[1]
    idx = np.where(~bad, np.arange(n)[None, :], -1)
    left = np.maximum.accumulate(idx, axis=1)
    idx_r = np.where(~bad, np.arange(n)[None, :], n)
    right = np.minimum.accumulate(idx_r[:, ::-1], axis=1)[:, ::-1]
    r = np.arange(arr.shape[0])[:, None]
    lv = np.where(left >= 0, arr[r, np.clip(left, 0, n - 1)], np.nan)
    rv = np.where(right < n, arr[r, np.clip(right, 0, n - 1)], np.nan)
    fill = np.where(np.isfinite(lv), lv, rv)
    arr = np.where(bad, fill, arr)
    if not np.isfinite(arr).all():
        glob = np.nanmedian(arr) if np.isfinite(arr).any() else 0.0
        arr = np.where(np.isfinite(arr), arr, glob)
    return arr


def _compact_background(data, bad, region, open_sky, trans, box):
    """Sky over compact mask parts: open sky x per-zone ratio, plus a fine-box correction.

    Each transmission level of the profile's mask is a zone whose sky/open-sky ratio is
    measured (sigma-clipped), so sharp circular edges are followed exactly where the
    profile is right; a ``box``-pixel background of the remainder absorbs the rest.
    """
    levels = np.unique(trans[region])
    model = np.array(open_sky, np.float32, copy=True)
    rms = np.full(data.shape, np.nan, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_img = np.where(bad | (open_sky == 0), np.nan, data / open_sky)
    zone_rms = {}
    for lev in levels:
        zone = region & (trans == lev)
        vals = ratio_img[zone]
        vals = vals[np.isfinite(vals)]
        if vals.size < 20:
            continue
        med, _ = _clipped_stats(vals)
        if np.isfinite(med):
            model[zone] = open_sky[zone] * np.float32(med)
        res = (data - model)[zone & ~bad]
        _, sd = _clipped_stats(res)
        zone_rms[lev] = sd
    corr, corr_rms = _background2d(np.where(bad, np.float32(0.0), data - model), bad, box, 3,
                                   exclude_percentile=50.0)
    for lev, sd in zone_rms.items():
        if np.isfinite(sd) and sd > 0:
            rms[region & (trans == lev)] = sd
    rms = np.where(np.isfinite(rms), rms, corr_rms)
    return model + corr, rms


def _background2d(data, bad, box_size, filter_size, exclude_percentile=10.0):
    from photutils.background import (
        Background2D,
        BkgZoomInterpolator,
        MADStdBackgroundRMS,
        SExtractorBackground,
    )

    ny, nx = data.shape
    box = int(max(4, min(box_size, ny, nx)))
    filt = int(filter_size) if min(ny // box, nx // box) >= filter_size else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkg = Background2D(np.where(bad, np.float32(0.0), data), box, mask=bad,
                           exclude_percentile=exclude_percentile, filter_size=filt,
                           sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
                           bkg_estimator=SExtractorBackground(),
                           bkg_rms_estimator=MADStdBackgroundRMS(),
                           interpolator=BkgZoomInterpolator(order=1))
    return (np.asarray(bkg.background, np.float32), np.asarray(bkg.background_rms, np.float32))


def estimate_background(data: np.ndarray, *, mask: np.ndarray | None = None,
                        profile: InstrumentProfile | None = None, box_size: int = 64,
                        filter_size: int = 3, arm_block: int = 128,
                        local_box: int = 16,
                        min_rms_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and sky noise maps, following the focal-plane mask when a profile is given.

    Parameters
    ----------
    data : ndarray
        2-D frame (adu). NaN/inf pixels are ignored.
    mask : ndarray of bool, optional
        True for pixels to ignore.
    profile : InstrumentProfile, optional
        Instrument profile; its mask shapes (in the frame's pixel coordinates, origin at
        pixel (0, 0)) decide where the sky is re-estimated at finer resolution.
    box_size : int
        Box size (pix) of the smooth open-sky estimate (`~photutils.background.Background2D`).
    filter_size : int
        Median filter size (boxes) of that estimate.
    arm_block : int
        Length (pix) of the 1-pixel-thick runs used along the mask's bands.
    local_box : int
        Box size (pix) of the correction applied around compact mask parts (central
        blob, target squares), whose sky is modelled as the open sky times a ratio
        measured in each of the profile's transmission zones.
    min_rms_fraction : float
        The rms map is floored at this fraction of its median (sky clipped at zero in a
        rendering has no measurable noise; the mask cuts the sky noise by at most
        ~sqrt(transmission)).

    Returns
    -------
    background, background_rms : ndarray of float32
        Shape of ``data``, in adu. The rms is floored at a small positive value.

    Raises
    ------
    ValueError
        If ``data`` is not 2-D, has no usable pixel, or the mask shape differs.
    """
    data = np.asarray(data, np.float32)
    if data.ndim != 2:
        raise ValueError(f"estimate_background needs a 2-D frame, got {data.ndim}-D data")
    bad = _bad_pixels(data, mask)
    if bad.all():
        raise ValueError("estimate_background: no finite, unmasked pixels in the frame")
    ny, nx = data.shape
    if min(ny, nx) < 16:
        med, std = _clipped_stats(data[~bad])
        std = float(std) if np.isfinite(std) and std > 0 else 1.0
        return (np.full(data.shape, med, np.float32), np.full(data.shape, std, np.float32))

    regions = None
    if profile is not None and profile.mask_shapes:
        margin = 6
        hreg, vreg, creg = _mask_regions(profile, data.shape, margin)
        if hreg.any() or vreg.any() or creg.any():
            regions = (hreg, vreg, creg)

    if regions is None:
        bkg, rms = _background2d(data, bad, box_size, filter_size)
    else:
        hreg, vreg, creg = regions
        near = hreg | vreg | creg
        # Smooth open sky, interpolated across the mask.
        open_bad = bad | near
        if open_bad.all():
            open_bad = bad
        bkg, rms = _background2d(data, open_bad, box_size, filter_size, exclude_percentile=75.0)
        for region, axis in ((hreg, 1), (vreg, 0)):
            if region.any():
                b, r = _directional_background(data, bad, region, arm_block, axis)
                ok = region & np.isfinite(b) & np.isfinite(r)
                bkg[ok] = b[ok]
                rms[ok] = r[ok]
        if creg.any():
            rr, cc = np.nonzero(creg)
            pad = 2 * local_box
            y0, y1 = max(rr.min() - pad, 0), min(rr.max() + pad + 1, ny)
            x0, x1 = max(cc.min() - pad, 0), min(cc.max() + pad + 1, nx)
            sub = creg[y0:y1, x0:x1]
            b, r = _compact_background(data[y0:y1, x0:x1], bad[y0:y1, x0:x1], sub,
                                       bkg[y0:y1, x0:x1], profile.transmission(data.shape)[y0:y1, x0:x1],
                                       local_box)
            bkg[y0:y1, x0:x1][sub] = b[sub]
            rms[y0:y1, x0:x1][sub] = r[sub]

    good = np.isfinite(rms) & (rms > 0)
    # Floor: a fraction of the typical noise. Sky clipped at zero (renderings) has a MAD
    # of 0, which would make every fluctuation "significant".
    floor = min_rms_fraction * float(np.median(rms[good])) if good.any() else 1e-3
    if floor <= 0 or not np.isfinite(floor):
        floor = 1e-3
    rms = np.where(good, np.maximum(rms, floor), max(floor, float(np.median(rms[good])) if good.any()
                                                      else 1.0)).astype(np.float32)
    if not np.isfinite(bkg).all():
        bkg = np.where(np.isfinite(bkg), bkg, np.nanmedian(bkg) if np.isfinite(bkg).any() else 0.0)
    return bkg.astype(np.float32), rms


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
    finite = np.asarray(data)[np.isfinite(data)]
    nominal = float(profile.saturation) if profile is not None else np.inf
    if finite.size == 0:
        return nominal
    top = float(finite.max())
    if np.count_nonzero(finite >= top) >= min_pixels:
        return min(nominal, top)
    return nominal


def _empty_spots() -> Table:
    t = Table()
    for name, (dtype, unit, desc) in SPOT_COLUMNS.items():
        t[name] = np.zeros(0, dtype=dtype)
        t[name].unit = unit
        t[name].description = desc
    return t


def _gaussian_noise_factor(sigma: float) -> float:
    """rms of a Gaussian-filtered white-noise image of unit rms (discrete kernel)."""
    r = int(_TRUNCATE * sigma + 0.5)  # as scipy.ndimage.gaussian_filter
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sum(k**2))  # separable: 2-D factor = (sum k^2)_1d^2, sqrt -> sum k^2


def _censored_fraction(data: np.ndarray, bad: np.ndarray, sigma: float,
                       min_fraction: float = 0.005) -> np.ndarray | None:
    """Local fraction of pixels sitting at a clipped floor, or None if the frame has no floor."""
    good = ~bad
    if not good.any():
        return None
    floor = float(np.min(data[good]))
    at_floor = good & (data <= floor)
    if np.count_nonzero(at_floor) < min_fraction * np.count_nonzero(good):
        return None
    if floor >= float(np.median(data[good])):  # a constant (noise-free) sky, not a clip
        return None
    return ndimage.gaussian_filter(at_floor.astype(np.float32), 2 * sigma, mode="nearest")


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
    bad = _bad_pixels(data, mask)
    shape = data.shape
    ny, nx = shape
    if fwhm is None:
        fwhm = float(profile.fwhm) if profile is not None else 4.0
    fwhm = float(fwhm)
    if not fwhm > 0:
        raise ValueError(f"fwhm must be positive, got {fwhm}")
    sat = saturation_level(data, profile) if saturation is None else float(saturation)

    if background is None or background_rms is None:
        if bad.all():
            b0, r0 = np.zeros(shape, np.float32), np.ones(shape, np.float32)
        else:
            b0, r0 = estimate_background(data, mask=bad, profile=profile)
        background = b0 if background is None else background
        background_rms = r0 if background_rms is None else background_rms
    background = np.broadcast_to(np.asarray(background, np.float32), shape)
    background_rms = np.broadcast_to(np.asarray(background_rms, np.float32), shape)
    rms_ok = np.isfinite(background_rms) & (background_rms > 0)
    if rms_ok.all():
        rms_safe = np.asarray(background_rms, np.float32)
    else:
        fill_rms = np.float32(np.median(background_rms[rms_ok])) if rms_ok.any() else np.float32(1.0)
        rms_safe = np.where(rms_ok, background_rms, fill_rms).astype(np.float32)

    resid = data - background
    resid[bad] = 0.0
    nonfinite = ~np.isfinite(resid)
    if nonfinite.any():
        resid[nonfinite] = 0.0
        bad = bad | nonfinite

    sigma_k = fwhm / _SIG2FWHM
    smooth = ndimage.gaussian_filter(resid, sigma_k, mode="constant", cval=0.0, truncate=_TRUNCATE)
    signif = smooth / rms_safe
    signif *= np.float32(1.0 / _gaussian_noise_factor(sigma_k))
    if bad.any():
        signif[bad] = np.minimum(signif[bad], 0.0)  # no peak sits on a bad pixel
    # A rendering clipped at a floor (8-bit display frames) has censored sky where the mask
    # is dark: its median and MAD say nothing about the noise, so peaks there are dropped.
    censored = _censored_fraction(data, bad, sigma_k)
    if censored is not None:
        signif[censored > max_censored] = np.minimum(signif[censored > max_censored], 0.0)

    empty = DetectionResult(_empty_spots(), np.zeros(shape, np.int32),
                            np.ascontiguousarray(background), np.ascontiguousarray(rms_safe))
    empty.spots.meta.update({"fwhm": fwhm, "saturation": sat, "threshold": threshold})

    # -- peaks -----------------------------------------------------------------------
    min_sep = fwhm if min_separation is None else float(min_separation)
    rad = max(1, round(min_sep * 0.75))
    local_max = ndimage.maximum_filter(signif, size=2 * rad + 1, mode="constant", cval=-np.inf)
    is_peak = (signif >= local_max) & (signif >= threshold)
    if not is_peak.any():
        return empty
    plab, _npk = ndimage.label(is_peak, structure=np.ones((3, 3)))
    flat = plab.ravel()
    order = np.flatnonzero(flat)
    _, first = np.unique(flat[order], return_index=True)
    pidx = order[first]  # one pixel per plateau
    py, px = np.divmod(pidx, nx)
    pval = signif[py, px]

    # -- footprints ------------------------------------------------------------------
    fthr = min(footprint_threshold, threshold)
    seg, nseg = ndimage.label(signif >= fthr, structure=np.ones((3, 3)))
    pseg = seg[py, px]

    # -- merge maxima without a real saddle between them (noisy streak tails) -----------
    mrad = 12.0 * fwhm if merge_radius is None else float(merge_radius)
    if px.size > 1:
        tree = cKDTree(np.column_stack([px, py]))
        pairs = tree.query_pairs(mrad, output_type="ndarray")
        if pairs.size:
            pairs = pairs[pseg[pairs[:, 0]] == pseg[pairs[:, 1]]]
        if pairs.size:
            keep = _merge_parents(signif, px, py, pval, pairs, contrast, merge_sigma) < 0
            px, py, pval, pseg = px[keep], py[keep], pval[keep], pseg[keep]

    # Drop peaks whose footprint is too small (isolated hot pixels at the threshold).
    seg_size = np.bincount(seg.ravel(), minlength=nseg + 1)
    ok = seg_size[pseg] >= min_npix
    px, py, pval, pseg = px[ok], py[ok], pval[ok], pseg[ok]
    n = px.size
    if n == 0:
        return empty
    order_v = np.lexsort((px, py))  # deterministic order: by row, then column
    px, py, pval, pseg = px[order_v], py[order_v], pval[order_v], pseg[order_v]

    # -- segmentation: one label per spot; shared footprints split by nearest peak -------
    segmap = np.zeros(nseg + 1, np.int32)
    counts = np.bincount(pseg, minlength=nseg + 1)
    single = counts[pseg] == 1
    segmap[pseg[single]] = np.flatnonzero(single) + 1
    segmentation = segmap[seg]
    shared_segs = np.flatnonzero(counts > 1)
    ownership = None
    if shared_segs.size:
        # A pixel of a shared footprint goes to the spot whose PSF-like model, scaled to the
        # spot's filtered peak, is largest there (a brightness-weighted Voronoi split); its
        # weight in the shape moments is that spot's share of the summed models.
        in_shared = np.zeros(nseg + 1, bool)
        in_shared[shared_segs] = True
        sy, sx = np.nonzero(in_shared[seg])
        pix_seg = seg[sy, sx]
        multi = np.flatnonzero(counts[pseg] > 1)
        tree = cKDTree(np.column_stack([px[multi], py[multi]]))
        k = int(min(multi.size, 8))
        dist, nn = tree.query(np.column_stack([sx, sy]), k=k)
        dist = dist.reshape(len(sx), k)
        nn = nn.reshape(len(sx), k)
        cand = multi[nn]
        match = pseg[cand] == pix_seg[:, None]
        amp = np.maximum(smooth[py[cand], px[cand]].astype(np.float64), 1e-12)
        logw = np.where(match, np.log(amp) - 0.5 * (dist / fwhm) ** 2, -np.inf)
        best = np.argmax(logw, axis=1)
        rows = np.arange(len(sx))
        has = match[rows, best]
        chosen = cand[rows, best]
        with np.errstate(invalid="ignore", over="ignore"):
            share = 1.0 / np.sum(np.exp(logw - logw[rows, best][:, None]), axis=1)
        # Pixels whose k nearest peaks all lie elsewhere go to the segment's brightest peak.
        brightest = np.zeros(nseg + 1, int)
        ordb = multi[np.argsort(pval[multi])]
        brightest[pseg[ordb]] = ordb
        chosen = np.where(has, chosen, brightest[pix_seg])
        share = np.where(has & np.isfinite(share), share, 1.0)
        segmentation[sy, sx] = chosen + 1
        ownership = np.ones(shape, np.float32)
        ownership[sy, sx] = share
    labels = np.arange(1, n + 1)

    # -- measurements (vectorised over spots) ------------------------------------------
    meas = _measure(resid, data, bad, smooth, signif, fthr, segmentation, ownership, px, py, fwhm,
                    sat, n)
    x, y = meas["x"], meas["y"]
    xi = np.clip(np.floor(x + 0.5).astype(int), 0, nx - 1)
    yi = np.clip(np.floor(y + 0.5).astype(int), 0, ny - 1)
    if profile is not None:
        trans_map = profile.transmission(shape)
        transmission = trans_map[yi, xi].astype(float)
        usable = np.asarray(profile.usable(x, y, shape), bool)
    else:
        transmission = np.ones(n)
        usable = np.ones(n, bool)

    spots = _empty_spots()
    values = {
        "spot_id": np.arange(n),
        "x": x, "y": y,
        "peak": meas["peak"],
        "sky": background[yi, xi].astype(float),
        "sky_rms": rms_safe[yi, xi].astype(float),
        "snr": pval.astype(float),
        "fwhm": meas["fwhm"],
        "elongation": meas["elongation"],
        "orientation": meas["orientation"],
        "sharpness": meas["sharpness"],
        "asymmetry": meas["asymmetry"],
        "npix": meas["npix"],
        "label": labels,
        "saturated": meas["saturated"],
        "transmission": transmission,
        "usable": usable,
    }
    # FWHM scale: the windowed-moment FWHM (robust for faint spots but biased by PSF wings)
    # is calibrated on the half-maximum FWHM of the bright, round, unsaturated spots.
    fw = meas["fwhm"]
    clear = usable & (transmission >= 0.99)  # open sky, away from the mask and the edges
    if np.count_nonzero(clear) < min_calibrators:
        clear = np.ones(n, bool)
    cal = clear & (~meas["saturated"]) & (pval >= 20.0) & (meas["elongation"] < 1.5) & \
        (meas["sharpness"] > 0.5) & (meas["sharpness"] < 2.0) & np.isfinite(meas["fwhm_half"]) & \
        np.isfinite(fw) & (fw > 0)
    if cal.any():
        cal &= np.abs(fw / np.median(fw[cal]) - 1.0) < 0.25
    scale = 1.0
    if np.count_nonzero(cal) >= min_calibrators:
        scale = float(np.median(meas["fwhm_half"][cal] / fw[cal]))
        if not 0.6 <= scale <= 1.5:
            scale = 1.0
    values["fwhm"] = meas["fwhm"] * scale
    table = Table()
    for name, (dtype, unit, desc) in SPOT_COLUMNS.items():
        table[name] = np.asarray(values[name]).astype(dtype)
        table[name].unit = unit
        table[name].description = desc
    spots = table

    good = clear & (~spots["saturated"]) & (spots["snr"] >= max(2 * threshold, 10.0)) & \
        (spots["elongation"] < 1.5) & (spots["sharpness"] > 0.5) & np.isfinite(spots["fwhm"])
    frame_fwhm = float(np.median(spots["fwhm"][good])) if np.count_nonzero(good) >= 3 else fwhm
    spots.meta.update({"fwhm": frame_fwhm, "filter_fwhm": fwhm, "fwhm_scale": scale, "saturation": sat,
                       "threshold": float(threshold)})
    log.debug("detected %d spots (frame FWHM %.2f px)", n, frame_fwhm)
    return DetectionResult(spots, segmentation.astype(np.int32), np.ascontiguousarray(background),
                           np.ascontiguousarray(rms_safe))


def _measure(resid, data, bad, smooth, signif, fthr, segmentation, ownership, px, py, fwhm, sat, n):
    """Per-spot measurements from cutouts around the peaks and from the footprints."""
    sigma_k = fwhm / _SIG2FWHM
    half = math.ceil(2.5 * fwhm)
    size = 2 * half + 1
    cut = extract_cutouts(resid, px, py, size, fill=0.0).astype(np.float64)
    badc = extract_cutouts(bad.astype(np.float32), px, py, size, fill=1.0) > 0.5
    cut[badc] = 0.0
    off = np.arange(size) - half
    dx = off[None, None, :].astype(float)
    dy = off[None, :, None].astype(float)

    # Windowed (Gaussian-weighted, SExtractor XWIN-like) centroid, iterated.
    sw = sigma_k
    cx = np.zeros(n)
    cy = np.zeros(n)
    for _ in range(6):
        ddx = dx - cx[:, None, None]
        ddy = dy - cy[:, None, None]
        w = np.exp(-0.5 * (ddx**2 + ddy**2) / sw**2) * cut
        s = w.sum(axis=(1, 2))
        okc = s > 0
        sx = np.where(okc, 2.0 * (w * ddx).sum(axis=(1, 2)) / np.where(okc, s, 1), 0.0)
        sy = np.where(okc, 2.0 * (w * ddy).sum(axis=(1, 2)) / np.where(okc, s, 1), 0.0)
        cx = cx + np.clip(sx, -1.0, 1.0)
        cy = cy + np.clip(sy, -1.0, 1.0)
        cx = np.clip(cx, -fwhm, fwhm)
        cy = np.clip(cy, -fwhm, fwhm)
    x = px + cx
    y = py + cy

    # Gaussian-windowed second moments, deconvolved from the window -> FWHM.
    sw2 = (1.5 * sigma_k) ** 2
    ddx = dx - cx[:, None, None]
    ddy = dy - cy[:, None, None]
    r2 = ddx**2 + ddy**2
    w = np.exp(-0.5 * r2 / sw2) * cut
    s = w.sum(axis=(1, 2))
    m2 = np.where(s > 0, 0.5 * (w * r2).sum(axis=(1, 2)) / np.where(s > 0, s, 1), np.nan)
    m2 = np.clip(m2, 1e-3, 0.95 * sw2)
    sig2 = m2 * sw2 / (sw2 - m2)
    fwhm_spot = _SIG2FWHM * np.sqrt(sig2)

    # Peak: brightest pixel of the 3x3 around the centroid; sharpness vs the filtered peak.
    ic = np.clip(np.rint(cy).astype(int) + half, 1, size - 2)
    jc = np.clip(np.rint(cx).astype(int) + half, 1, size - 2)
    rows = ic[:, None] + np.array([-1, 0, 1])[None, :]
    cols = jc[:, None] + np.array([-1, 0, 1])[None, :]
    peak = cut[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].max(axis=(1, 2))
    # The filtered peak of a Gaussian spot of the filter's own width is half its amplitude.
    filt_peak = smooth[py, px].astype(np.float64)
    sharp = np.where(filt_peak > 0, peak / (2.0 * np.where(filt_peak > 0, filt_peak, 1)), np.nan)

    # Half-maximum area (bright spots): true FWHM for any profile shape, used to calibrate
    # the moment-based values of the frame. Peak from a parabola through the 3x3 core.
    f0 = cut[np.arange(n), ic, jc]
    fxm, fxp = cut[np.arange(n), ic, jc - 1], cut[np.arange(n), ic, jc + 1]
    fym, fyp = cut[np.arange(n), ic - 1, jc], cut[np.arange(n), ic + 1, jc]
    with np.errstate(divide="ignore", invalid="ignore"):
        cxq = 2 * f0 - fxm - fxp
        cyq = 2 * f0 - fym - fyp
        top = f0 + np.where(cxq > 0, (fxp - fxm) ** 2 / (8 * cxq), 0.0) \
            + np.where(cyq > 0, (fyp - fym) ** 2 / (8 * cyq), 0.0)
    top = np.clip(np.where(np.isfinite(top), top, f0), f0, 1.5 * np.maximum(f0, 0))
    within = r2 <= (2.0 * fwhm) ** 2
    area = ((cut >= 0.5 * top[:, None, None]) & within).sum(axis=(1, 2))
    fwhm_half = np.where(top > 0, 2.0 * np.sqrt(area / np.pi), np.nan)

    # Saturation: any raw pixel within ~FWHM of the peak at/above the level.
    if np.isfinite(sat):
        raw = extract_cutouts(data, px, py, size, fill=-np.inf).astype(np.float64)
        near = (dx**2 + dy**2) <= max(fwhm, 1.5) ** 2
        saturated = ((raw >= sat) & near).any(axis=(1, 2))
    else:
        saturated = np.zeros(n, bool)

    # Footprint moments via bincount over footprint pixels, weighted by the matched-filtered
    # light above the footprint isophote: per-pixel noise (and its positive-clipped bias
    # in a star's faint outskirts) would otherwise dominate the shape of all but the
    # brightest spots, while a streak's extent is kept.
    fy, fx = np.nonzero(segmentation)
    lab = segmentation[fy, fx].astype(np.int64)
    sig = signif[fy, fx].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(sig > fthr, smooth[fy, fx] * (1.0 - fthr / sig), 0.0)
    if ownership is not None:
        val = val * ownership[fy, fx]
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
    proj = ux * np.cos(theta[lab]) + uy * np.sin(theta[lab])
    m3 = np.bincount(lab, val * proj**3, nb) / f0s
    m2a = np.bincount(lab, val * proj**2, nb) / f0s
    asym = np.abs(m3) / np.maximum(m2a, 1e-6) ** 1.5
    orient = np.degrees(theta)
    orient = np.where(orient <= -90.0, orient + 180.0, orient)
    nofoot = f0 <= 0
    elong[nofoot] = 1.0
    orient[nofoot] = 0.0
    asym[nofoot] = 0.0
    return {
        "x": x, "y": y, "peak": peak, "fwhm": fwhm_spot, "fwhm_half": fwhm_half, "sharpness": sharp,
        "saturated": saturated, "npix": npix, "elongation": elong[1:],
        "orientation": orient[1:], "asymmetry": asym[1:],
    }

