"""Sky background and sky noise maps that follow the focal-plane mask.

:func:`estimate_background` fits a smooth sky on the open sky: a mesh of boxes whose
sky is a sigma-clipped SExtractor-like mode and whose noise a MAD standard deviation
(the estimators of photutils' `~photutils.background.Background2D`, computed here
without it), median-filtered and interpolated bilinearly between the box centres.
The focal-plane mask of a profile (its arms are strips a few tens of pixels wide with
sharp edges) cannot be followed by boxes of ~64 px, so near the mask the sky is
estimated again at finer resolution: along the arms (thin blocks of one row or column
by ``arm_block`` pixels, which follow an arm's edges to a pixel even when the real arm
is slightly offset or tilted from the profile's model) and, around the central blob
and the target squares, as the open sky times a measured ratio per transmission zone
plus a small-box correction.

Every clipped statistic sorts its samples once (:class:`_SortedRows`): the samples of a
row that survive a clip are then a contiguous run of the sorted row, so each clipping
iteration costs a few binary searches and prefix sums rather than a new median.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.spatial import cKDTree

from .instrument import InstrumentProfile
from .masking import dilate_mask, unusable_pixels

__all__ = ["estimate_background"]

#: mad_std's scale: the standard deviation of a Gaussian from its median absolute deviation.
_MAD_TO_STD = 1.482602218505602


# ---------------------------------------------------------------------------------
# Clipped statistics of sorted samples
# ---------------------------------------------------------------------------------
class _SortedRows:
    """Statistics of contiguous runs of rows sorted once (NaN = missing, sorted last).

    Parameters
    ----------
    values : ndarray, shape (m, k)
        Samples, one set per row.

    Attributes
    ----------
    s : ndarray of float32, shape (m, k)
        Each row sorted ascending.
    n : ndarray of int
        Number of finite samples of each row (they are ``s[:, :n]``).
    """

    _CHUNK = 64  # prefix sums are kept per chunk of sorted samples

    def __init__(self, values: np.ndarray):
        self.s = np.sort(np.asarray(values, np.float32), axis=1)
        self._rows = np.arange(self.s.shape[0])
        self.n = self.bisect(np.zeros(self.s.shape[0], np.intp),
                             np.full(self.s.shape[0], self.s.shape[1], np.intp), np.inf, right=True)
        self._cum = None

    def at(self, index: np.ndarray) -> np.ndarray:
        """``s[row, index[row]]`` for every row (indices clipped to the row)."""
        return self.s[self._rows, np.minimum(np.maximum(index, 0), self.s.shape[1] - 1)]

    def bisect(self, lo, hi, value, right: bool = False) -> np.ndarray:
        """Per row, the first index in ``[lo, hi)`` whose sample is >= ``value`` (>, with
        ``right``), or ``hi``: a binary search vectorised over rows."""
        lo, hi = np.array(lo, np.intp), np.array(hi, np.intp)
        for _ in range(int(np.max(hi - lo, initial=0)).bit_length()):
            mid = (lo + hi) // 2
            v = self.at(mid)
            below = (v <= value) if right else (v < value)
            live = lo < hi
            lo = np.where(live & below, mid + 1, lo)
            hi = np.where(live & ~below, mid, hi)
        return lo

    def median(self, lo, hi) -> np.ndarray:
        """Median of ``s[lo:hi]`` per row (NaN for empty runs)."""
        n = hi - lo
        mid = (self.at(lo + (n - 1) // 2) + self.at(lo + n // 2)) / 2
        return np.where(n > 0, mid, np.nan)

    def mad(self, lo, hi, centre) -> np.ndarray:
        """Median of ``|s[lo:hi] - centre|`` per row, without sorting the deviations.

        The deviations left of ``centre`` (read leftwards) and right of it (read
        rightwards) are two sorted lists; the k-th smallest of their union is found by a
        binary search on how many of the k + 1 smallest come from the left list.
        """
        n = hi - lo
        p = self.bisect(lo, hi, centre)  # s[lo:p] < centre <= s[p:hi]
        n_left, n_right = p - lo, hi - p
        k = (n - 1) // 2

        def left(i):
            return centre - self.at(p - 1 - i)

        def right(j):
            return self.at(p + j) - centre

        a = np.maximum(k + 1 - n_right, 0)
        b = np.minimum(k + 1, n_left)
        for _ in range(int(np.max(b - a, initial=0)).bit_length()):
            i = (a + b) // 2
            live = a < b
            more = live & (left(i) < right(k - i))  # the next left deviation is smaller
            a = np.where(more, i + 1, a)
            b = np.where(live & ~more, i, b)
        i, j = a, k + 1 - a  # counts taken from the left and right lists
        kth = np.maximum(np.where(i > 0, left(i - 1), -np.inf), np.where(j > 0, right(j - 1), -np.inf))
        after = np.minimum(np.where(i < n_left, left(i), np.inf), np.where(j < n_right, right(j), np.inf))
        with np.errstate(invalid="ignore"):  # empty runs: inf - inf
            out = np.where(n % 2 == 1, kth, (kth + after) / 2)
        return np.where(n > 0, out, np.nan).astype(np.float32)

    def moments(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (ddof 0) of ``s[lo:hi]`` per row, from prefix sums."""
        s1, s2 = self._prefix(hi) - self._prefix(lo)
        n = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s1 / n
            var = np.maximum(s2 / n - mean**2, 0.0)
        return self._ref + mean, np.sqrt(var)

    def _prefix(self, k) -> np.ndarray:
        """Sums of ``s[:, :k] - ref`` and of its squares per row (``k <= n``), shape (2, m)."""
        chunk = self._CHUNK
        if self._cum is None:
            # Centred on each row's median so that float32 squares lose no precision; the
            # sums are cumulated per chunk of samples, the last partial chunk summed here.
            self._ref = np.where(self.n > 0, self.at((self.n - 1) // 2), np.float32(0.0))
            self._centred = self.s - self._ref[:, None]
            starts = np.arange(0, self.s.shape[1], chunk)
            cum = np.stack([np.cumsum(np.add.reduceat(v, starts, axis=1), axis=1, dtype=np.float64)
                            for v in (self._centred, self._centred**2)])
            self._cum = np.pad(cum, ((0, 0), (0, 0), (1, 0)))
        base = k // chunk
        idx = base[:, None] * chunk + np.arange(chunk)
        part = self._centred[self._rows[:, None], np.minimum(idx, self.s.shape[1] - 1)]
        part = np.where(idx < k[:, None], part, np.float32(0.0)).astype(np.float64)
        return self._cum[:, self._rows, base] + np.stack([part.sum(axis=1), (part * part).sum(axis=1)])


def _clipped_stats(values: np.ndarray, sigma: float = 3.0, iters: int = 3):
    """Median and MAD-based standard deviation along the last axis, clipped iteratively.

    Each of ``iters`` iterations drops the samples further than ``sigma`` standard
    deviations from the median; NaN samples are missing. Returns arrays of float32 of
    ``values.shape[:-1]`` (0-d for 1-D input).
    """
    values = np.asarray(values, np.float32)
    rows = _SortedRows(values.reshape(-1, values.shape[-1]))
    lo, hi = np.zeros_like(rows.n), rows.n
    for _ in range(iters):
        med = rows.median(lo, hi)
        cut = sigma * np.maximum(np.float32(1.4826) * rows.mad(lo, hi, med), np.float32(1e-12))
        lo, hi = rows.bisect(lo, hi, med - cut), rows.bisect(lo, hi, med + cut, right=True)
    med = rows.median(lo, hi)
    std = np.float32(1.4826) * rows.mad(lo, hi, med)
    return med.reshape(values.shape[:-1]), std.reshape(values.shape[:-1])


def _ragged(samples: list[np.ndarray]) -> np.ndarray:
    """Samples of unequal sizes as the rows of one array, padded with NaN."""
    out = np.full((len(samples), max((v.size for v in samples), default=0)), np.nan, np.float32)
    for row, v in zip(out, samples):
        row[: v.size] = v
    return out


def _mode_and_rms(values: np.ndarray, min_good: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky and noise of each row of samples, as photutils' Background2D boxes.

    Samples are sigma-clipped at 3 standard deviations around the median (at most five
    iterations, astropy's ``SigmaClip``); the sky is SExtractor's mode estimate
    ``2.5 median - 1.5 mean`` (the median where mean and median differ by 0.3 standard
    deviations or more), the noise the MAD standard deviation. Rows left with at most
    ``min_good`` samples are NaN.
    """
    rows = _SortedRows(values)
    lo, hi = np.zeros_like(rows.n), rows.n
    for iteration in range(6):  # at most five clipping iterations, then the final statistics
        med = rows.median(lo, hi)
        mean, std = rows.moments(lo, hi)
        if iteration == 5:
            break
        new_lo = rows.bisect(lo, hi, med - 3.0 * std)
        new_hi = rows.bisect(new_lo, hi, med + 3.0 * std, right=True)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    with np.errstate(invalid="ignore", divide="ignore"):
        skewed = np.abs(mean - med) >= 0.3 * std
    sky = np.where(std == 0, mean, np.where(skewed, med, 2.5 * med - 1.5 * mean))
    rms = _MAD_TO_STD * rows.mad(lo, hi, med)
    few = (hi - lo) <= min_good
    return np.where(few, np.nan, sky).astype(np.float32), np.where(few, np.nan, rms).astype(np.float32)


def _nan_median_filter(arr: np.ndarray, size: int = 3, mode: str = "constant") -> np.ndarray:
    """``size`` x ``size`` median ignoring NaN; outside the array NaN (``mode='constant'``)
    or the nearest edge value (``'edge'``). For small arrays (meshes, runs)."""
    h = size // 2
    pad = np.pad(arr, h, mode=mode, **({"constant_values": np.nan} if mode == "constant" else {}))
    rows = _SortedRows(sliding_window_view(pad, (size, size)).reshape(arr.size, size * size))
    return rows.median(np.zeros_like(rows.n), rows.n).reshape(arr.shape)


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


def _interp_weights(centres: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation from samples at ``centres`` to pixels 0 .. n-1, as a matrix.

    Returns float32 weights of shape ``(n, len(centres))``; beyond the first and last
    centres the nearest sample is used. ``weights @ samples`` interpolates.
    """
    m = len(centres)
    w = np.zeros((n, m), np.float32)
    if m == 1:
        w[:, 0] = 1.0
        return w
    x = np.arange(n)
    j = np.clip(np.searchsorted(centres, x, side="right") - 1, 0, m - 2)
    t = np.clip((x - centres[j]) / (centres[j + 1] - centres[j]), 0.0, 1.0)
    w[x, j] = 1.0 - t
    w[x, j + 1] = t
    return w


# ---------------------------------------------------------------------------------
# Mesh, bands and compact mask parts
# ---------------------------------------------------------------------------------
def _mesh_background(data: np.ndarray, bad: np.ndarray, box_size: int, filter_size: int,
                     exclude_percentile: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth sky and noise maps from a mesh of ``box_size`` boxes.

    As photutils' `~photutils.background.Background2D` with ``SigmaClip(sigma=3,
    maxiters=5)``, ``SExtractorBackground``, ``MADStdBackgroundRMS`` and linear
    ``BkgZoomInterpolator``: boxes keeping at most ``1 - exclude_percentile / 100`` of
    their pixels after masking and clipping are refilled by inverse-distance weighting
    of the 10 nearest good boxes, the mesh is median-filtered over ``filter_size``
    boxes and interpolated bilinearly between box centres. If every box falls short,
    every box with a usable pixel is used; with none at all the maps are NaN.
    """
    ny, nx = data.shape
    box = int(max(4, min(box_size, ny, nx)))
    filt = int(filter_size) if min(ny // box, nx // box) >= filter_size else 1
    nby, nbx = -(-ny // box), -(-nx // box)
    values = np.where(bad, np.float32(np.nan), data)
    if (nby * box, nbx * box) != (ny, nx):  # partial boxes at the far edges: pad with NaN
        values = np.pad(values, ((0, nby * box - ny), (0, nbx * box - nx)), constant_values=np.nan)
    values = values.reshape(nby, box, nbx, box).transpose(0, 2, 1, 3).reshape(nby * nbx, box * box)
    for min_good in ((1.0 - exclude_percentile / 100.0) * box * box, 0.0):
        sky, rms = _mode_and_rms(values, min_good)
        if not np.isnan(sky).all():
            break
    else:
        return np.full(data.shape, np.nan, np.float32), np.full(data.shape, np.nan, np.float32)
    sky, rms = _fill_mesh(sky.reshape(nby, nbx), rms.reshape(nby, nbx))
    if filt > 1:
        sky, rms = _nan_median_filter(sky, filt), _nan_median_filter(rms, filt)
    # Bilinear interpolation is separable: two small matrix products per map.
    wy = _interp_weights((np.arange(nby) + 0.5) * box - 0.5, ny)
    wx = _interp_weights((np.arange(nbx) + 0.5) * box - 0.5, nx)
    return (wy @ sky) @ wx.T, (wy @ rms) @ wx.T


def _fill_mesh(sky: np.ndarray, rms: np.ndarray, n_neighbors: int = 10):
    """Replace NaN mesh boxes by inverse-distance weighting of the nearest good ones."""
    hole = np.isnan(sky)
    if not hole.any():
        return sky, rms
    good = np.argwhere(~hole)
    dist, idx = cKDTree(good, leafsize=10).query(np.argwhere(hole), k=n_neighbors)
    dist, idx = dist.reshape(-1, n_neighbors), idx.reshape(-1, n_neighbors)
    valid = np.isfinite(dist)
    w = np.where(valid, 1.0 / np.where(valid, dist, 1.0), 0.0)
    src = np.where(valid, idx, 0)
    out = []
    for mesh in (sky, rms):
        mesh = mesh.copy()
        mesh[hole] = (w * mesh[~hole][src]).sum(axis=1) / w.sum(axis=1)
        out.append(mesh)
    return out


def _band_background(data: np.ndarray, bad: np.ndarray, lines: np.ndarray, exclude: np.ndarray,
                     block: int, sky: np.ndarray, rms: np.ndarray, axis: int = 1) -> None:
    """Sky along the mask's bands, written into ``sky`` and ``rms`` on their lines.

    Sigma-clipped medians of runs of 1 x ``block`` pixels along the lines ``lines``
    (rows for bands along x, ``axis=1``; columns for bands along y, ``axis=0``), lightly
    smoothed across lines (3) and along the band (3 runs) and interpolated linearly
    along it. Pixels where ``exclude`` is True are left out and left alone.
    """
    if lines.size == 0:
        return

    def take(image):  # the lines as rows (np.take: much faster than fancy indexing here)
        picked = np.take(image, lines, axis=1 - axis)
        return picked if axis == 1 else np.ascontiguousarray(picked.T)

    n = data.shape[axis]
    nb = max(1, round(n / block))
    edges = np.linspace(0, n, nb + 1).astype(int)
    width = int(np.max(np.diff(edges)))
    inside = ~take(exclude)
    sub = np.where(take(bad) | ~inside, np.float32(np.nan), take(data))
    runs = np.full((lines.size, nb, width), np.nan, np.float32)
    for b in range(nb):  # a handful of blocks, each vectorised over all lines
        runs[:, b, : edges[b + 1] - edges[b]] = sub[:, edges[b]: edges[b + 1]]
    weights = _interp_weights(0.5 * (edges[:-1] + edges[1:]) - 0.5, n).T
    for est, out in zip(_clipped_stats(runs), (sky, rms)):
        smooth = _nan_median_filter(est, 3, mode="edge")
        line = _fill_along(np.where(np.isfinite(smooth), smooth, est)) @ weights
        target = take(out)
        np.copyto(target, line, where=inside)
        if axis == 1:
            out[lines] = target
        else:
            out[:, lines] = target.T


def _compact_background(data, bad, region, open_sky, trans, box):
    """Sky over compact mask parts: open sky x per-zone ratio, plus a fine-box correction.

    Each transmission level of the profile's mask is a zone whose sky/open-sky ratio is
    measured (sigma-clipped), so sharp circular edges are followed exactly where the
    profile is right; a ``box``-pixel background of the remainder absorbs the rest.
    """
    model = np.array(open_sky, np.float32, copy=True)
    rms = np.full(data.shape, np.nan, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_img = np.where(bad | (open_sky == 0), np.nan, data / open_sky)
    zones, ratios = [], []
    for lev in np.unique(trans[region]):
        zone = region & (trans == lev)
        r = ratio_img[zone]
        r = r[np.isfinite(r)]
        if r.size >= 20:
            zones.append(zone)
            ratios.append(r)
    if zones:
        ratio, _ = _clipped_stats(_ragged(ratios))
        for zone, med in zip(zones, ratio):
            if np.isfinite(med):
                model[zone] = open_sky[zone] * med
        _, zone_rms = _clipped_stats(_ragged([(data - model)[zone & ~bad] for zone in zones]))
        for zone, sd in zip(zones, zone_rms):
            if np.isfinite(sd) and sd > 0:
                rms[zone] = sd
    corr, corr_rms = _mesh_background(data - model, bad, box, 3, exclude_percentile=50.0)
    rms = np.where(np.isfinite(rms), rms, corr_rms)
    return model + corr, rms


def _mask_regions(profile: InstrumentProfile, shape: tuple[int, int], margin: int):
    """Where the mask needs a finer sky: rows of horizontal bands, columns of vertical
    bands, and a map of its compact parts.

    Each part is grown by ``margin`` pixels (the compact ones by as many 4-connected
    dilations); where bands cross they count as compact.

    Returns
    -------
    rows, cols : ndarray of int
        Rows of the horizontal bands and columns of the vertical ones.
    compact : ndarray of bool
        Compact parts (central blob, target squares, band crossings).
    """
    ny, nx = shape
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    hrows = np.zeros(ny, bool)
    vcols = np.zeros(nx, bool)
    compact = np.zeros(shape, bool)
    diamond = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), margin)
    for s in profile.mask_shapes:
        if s.transmission >= 1.0:
            continue
        p = s.params
        if s.kind == "hband":
            hrows |= np.abs(yy[:, 0] - p["y"]) <= p["width"] / 2 + margin
        elif s.kind == "vband":
            vcols |= np.abs(xx[0] - p["x"]) <= p["width"] / 2 + margin
        else:
            inside = np.broadcast_to(profile._inside(s, xx, yy, shape), shape)
            compact |= dilate_mask(inside, diamond) if margin else inside
    rows, cols = np.flatnonzero(hrows), np.flatnonzero(vcols)
    compact[np.ix_(rows, cols)] = True
    return rows, cols, compact


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
        Box size (pix) of the smooth open-sky estimate (sigma-clipped SExtractor mode
        per box, as `~photutils.background.Background2D`).
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
    bad = unusable_pixels(data, mask)
    if bad.all():
        raise ValueError("estimate_background: no finite, unmasked pixels in the frame")
    ny, nx = data.shape
    if min(ny, nx) < 16:
        med, std = _clipped_stats(data[~bad])
        std = float(std) if np.isfinite(std) and std > 0 else 1.0
        return (np.full(data.shape, med, np.float32), np.full(data.shape, std, np.float32))

    regions = None
    if profile is not None and profile.mask_shapes:
        regions = _mask_regions(profile, data.shape, margin=6)
        if not (regions[0].size or regions[1].size or regions[2].any()):
            regions = None  # the frame does not reach the mask
    if regions is None:
        bkg, rms = _mesh_background(data, bad, box_size, filter_size)
    else:
        rows, cols, compact = regions
        # Smooth open sky, interpolated across the mask.
        open_bad = bad | compact
        open_bad[rows] = True
        open_bad[:, cols] = True
        if open_bad.all():
            open_bad = bad
        bkg, rms = _mesh_background(data, open_bad, box_size, filter_size, exclude_percentile=75.0)
        _band_background(data, bad, rows, compact, arm_block, bkg, rms, axis=1)
        _band_background(data, bad, cols, compact, arm_block, bkg, rms, axis=0)
        crow, ccol = np.flatnonzero(compact.any(axis=1)), np.flatnonzero(compact.any(axis=0))
        if crow.size:
            pad = 2 * local_box
            win = (slice(max(crow[0] - pad, 0), min(crow[-1] + pad + 1, ny)),
                   slice(max(ccol[0] - pad, 0), min(ccol[-1] + pad + 1, nx)))
            sub = compact[win]
            b, r = _compact_background(data[win], bad[win], sub, bkg[win],
                                       profile.transmission(data.shape)[win], local_box)
            bkg[win][sub] = b[sub]
            rms[win][sub] = r[sub]

    # Floor: a fraction of the typical noise. Sky clipped at zero (renderings) has a MAD
    # of 0, which would make every fluctuation "significant". The typical noise is the
    # median of a regular subsample of the (smooth) map.
    good = np.isfinite(rms) & (rms > 0)
    step = max(1, int(np.sqrt(rms.size / 65536)))
    sample = rms[::step, ::step][good[::step, ::step]]
    if sample.size == 0:
        sample = rms[good]
    typical = float(np.median(sample)) if sample.size else np.nan
    floor = min_rms_fraction * typical
    if not (np.isfinite(floor) and floor > 0):
        floor = 1e-3
    np.maximum(rms, np.float32(floor), out=rms)
    if not good.all():
        rms[~good] = max(floor, typical) if np.isfinite(typical) else max(floor, 1.0)
    if not np.isfinite(bkg).all():
        bkg = np.where(np.isfinite(bkg), bkg, np.nanmedian(bkg) if np.isfinite(bkg).any() else 0.0)
    return bkg.astype(np.float32, copy=False), rms
