"""Grouping spots into four-spot patterns (quadruplets), with a per-frame geometry fit.

Each source makes one spot per channel at offsets from the pattern centre that vary
smoothly across the field (the profile's :class:`~robopol_clean.instrument.SpotGeometry`)
and drift by a pixel or two between frames. :func:`group_quadruplets`

1. estimates a constant per-channel shift of the offsets from the mode of the offsets
   between every spot's predicted partners and the spots found near them (a 2-D
   histogram vote, robust to crowding);
2. builds candidate groups: every spot is tried as every channel; the pattern centre it
   implies (``SpotGeometry.pattern_center``) predicts the other spots, looked up with a
   k-d tree within ``tolerance``; candidates are scored by their geometric residual and
   the consistency of their spots' brightness;
3. selects groups globally: best candidates first (more spots, then lower cost), a
   candidate whose spot was already taken is re-scored without it and re-queued, so
   overlapping patterns in dense fields are resolved by quality, not by order;
4. refits the geometry (:func:`fit_geometry`: polynomial corrections with a prior that
   keeps poorly constrained terms at the profile's values) from the confident complete
   groups, and repeats 2-3 with the refined geometry.

Groups with fewer than all channels (a spot off the chip, on the mask, undetected) are
kept as incomplete groups (``complete`` False); they are never used for Stokes parameters.
"""

from __future__ import annotations

import heapq
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from .instrument import InstrumentProfile, SpotGeometry

__all__ = ["GeometryFit", "GroupingResult", "estimate_shift", "fit_geometry", "group_quadruplets"]

log = logging.getLogger(__name__)


@dataclass
class GeometryFit:
    """Result of :func:`fit_geometry`.

    Attributes
    ----------
    geometry : SpotGeometry
        The refined geometry.
    rms : float
        rms distance (pix) of the used spots from the refined model.
    n_used : int
        Number of patterns used after outlier clipping.
    used : ndarray of bool
        Which input patterns were used.
    """

    geometry: SpotGeometry
    rms: float
    n_used: int
    used: np.ndarray


@dataclass
class GroupingResult:
    """What :func:`group_quadruplets` returns.

    Attributes
    ----------
    spots : Table
        Copy of the input with ``group_id`` (-1 if none) and ``channel`` ('' if none).
    groups : Table
        One row per group: ``group_id``, ``x``, ``y``, ``n_spots``, ``complete``,
        ``spot_<channel>``, ``geom_resid``; ``meta['shift']`` (per-channel constant
        offset change, pix), ``meta['rms']`` (pix), ``meta['n_fit']``.
    geometry : SpotGeometry
        The geometry fitted to this frame.
    shift : dict
        ``{channel: (dx, dy)}``: the change of each channel's constant offset term (pix).
    """

    spots: Table
    groups: Table
    geometry: SpotGeometry
    shift: dict[str, tuple[float, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Geometry: shift estimate and fit
# ---------------------------------------------------------------------------------
def _mode_2d(d: np.ndarray, radius: float, bin_size: float = 0.5) -> tuple[np.ndarray, int]:
    """Mode of 2-D offsets: peak of a smoothed histogram, refined by a local mean."""
    nb = int(np.ceil(2 * radius / bin_size))
    edges = np.linspace(-radius, radius, nb + 1)
    h, _, _ = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
    hs = ndimage.gaussian_filter(h, 1.0, mode="constant")
    i, j = np.unravel_index(np.argmax(hs), hs.shape)
    centre = np.array([0.5 * (edges[i] + edges[i + 1]), 0.5 * (edges[j] + edges[j + 1])])
    for _ in range(3):
        near = np.hypot(*(d - centre).T) <= 1.5
        if not near.any():
            break
        centre = d[near].mean(axis=0)
    return centre, int(np.count_nonzero(np.hypot(*(d - centre).T) <= 1.5))


def estimate_shift(x, y, geometry: SpotGeometry, *, radius: float = 9.0,
                   min_votes: int = 3) -> dict[str, tuple[float, float]]:
    """Constant per-channel change of the spot offsets, from a vote over all spots.

    Every spot is tried as every channel; for each other channel the offsets of the
    detected spots within ``radius`` of the predicted position are histogrammed, and the
    mode is the relative shift of the two channels. The relative shifts are combined by
    least squares into per-channel shifts that sum to zero (a common shift of all four
    spots moves the pattern centre and is not observable).

    Parameters
    ----------
    x, y : array-like
        Spot positions (pix).
    geometry : SpotGeometry
        Starting geometry.
    radius : float
        Largest offset change searched (pix).
    min_votes : int
        A channel pair whose mode gathers fewer matches is ignored.

    Returns
    -------
    dict
        ``{channel: (dx, dy)}`` in pix, to pass to ``geometry.shifted``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    chans = geometry.channels
    nc = len(chans)
    zero = {ch: (0.0, 0.0) for ch in chans}
    if x.size < 2:
        return zero
    xy = np.column_stack([x, y])
    tree = cKDTree(xy)
    rows, rhs = [], []
    for r, ref in enumerate(chans):
        cx, cy = geometry.pattern_center(ref, x, y)
        pred = geometry.spot_positions(cx, cy)
        for c, ch in enumerate(chans):
            if c <= r:
                continue
            px, py = pred[ch]
            dist, idx = tree.query(np.column_stack([px, py]), k=min(4, x.size),
                                   distance_upper_bound=radius)
            dist = np.asarray(dist).reshape(x.size, -1)
            idx = np.asarray(idx).reshape(x.size, -1)
            ok = np.isfinite(dist)
            if not ok.any():
                continue
            src = np.broadcast_to(np.arange(x.size)[:, None], idx.shape)[ok]
            d = xy[idx[ok]] - np.column_stack([px, py])[src]
            mode, votes = _mode_2d(d, radius)
            if votes < min_votes:
                continue
            row = np.zeros(nc)
            row[c], row[r] = 1.0, -1.0
            rows.append(row)
            rhs.append(mode)
    if not rows:
        return zero
    a = np.vstack(rows + [np.ones(nc)])  # constraint: shifts sum to zero
    b = np.vstack(rhs + [np.zeros(2)])
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    return {ch: (float(sol[i, 0]), float(sol[i, 1])) for i, ch in enumerate(chans)}


def fit_geometry(positions: np.ndarray, geometry: SpotGeometry, *, spot_sigma: float = 0.3,
                 prior_sigma: float = 0.5, prior_sigma_const: float = 6.0, clip: float = 3.0,
                 min_clip: float = 1.0, n_iter: int = 3) -> GeometryFit:
    """Refine a spot geometry from complete patterns (least squares with a prior).

    The corrections to the polynomial coefficients of every channel are fitted to the
    offsets of the spots from their pattern centres (the mean of the spots). A Gaussian
    prior (``prior_sigma_const`` for the constant term, ``prior_sigma`` for the others,
    in pix at the normalised field edge) keeps terms the patterns do not constrain at
    the starting values, so a handful of patterns refines just the constant offsets and
    many patterns spread over the field refine the whole polynomial. Patterns with a
    spot farther than ``max(clip * rms, min_clip)`` from the model are dropped and the
    fit repeated.

    Parameters
    ----------
    positions : ndarray
        Shape ``(n, n_channels, 2)``: spot ``(x, y)`` (pix) of each complete pattern, in
        ``geometry.channels`` order.
    geometry : SpotGeometry
        Starting geometry (the profile's).
    spot_sigma : float
        Centroid uncertainty of one spot (pix).
    prior_sigma, prior_sigma_const : float
        Prior widths (pix) of the coefficient corrections.
    clip, min_clip : float
        Outlier rejection.
    n_iter : int
        Fit/clip iterations.

    Returns
    -------
    GeometryFit
    """
    pos = np.asarray(positions, float)
    nc = len(geometry.channels)
    if pos.ndim != 3 or pos.shape[1:] != (nc, 2):
        raise ValueError(f"positions must have shape (n, {nc}, 2), got {pos.shape}")
    n = pos.shape[0]
    used = np.isfinite(pos).all(axis=(1, 2))
    if n == 0 or not used.any():
        return GeometryFit(geometry, float("nan"), 0, used)
    centre = pos.mean(axis=1)  # (n, 2)
    offsets = pos - centre[:, None, :]  # (n, C, 2)
    a_full = geometry.design_matrix(centre[:, 0], centre[:, 1])  # (n, T)
    nt = a_full.shape[1]
    prior = np.full(nt, 1.0 / prior_sigma**2)
    if "1" in geometry.terms:
        prior[geometry.terms.index("1")] = 1.0 / prior_sigma_const**2
    coeffs = geometry.coeffs.copy()
    fitted = geometry
    rms = float("nan")
    for _ in range(max(1, n_iter)):
        a = a_full[used]
        model0 = geometry.offset_array(centre[used, 0], centre[used, 1])  # (C, 2, m)
        resid0 = np.moveaxis(offsets[used], 0, -1) - model0  # (C, 2, m)
        lhs = a.T @ a / spot_sigma**2 + np.diag(prior)
        rhs = np.einsum("mt,ckm->ckt", a, resid0) / spot_sigma**2
        delta = np.linalg.solve(lhs, rhs.reshape(-1, nt).T).T.reshape(nc, 2, nt)
        coeffs = geometry.coeffs + delta
        fitted = geometry.with_coeffs(coeffs)
        model = fitted.offset_array(centre[:, 0], centre[:, 1])  # (C, 2, n)
        res = np.moveaxis(offsets, 0, -1) - model
        dist = np.hypot(res[:, 0], res[:, 1])  # (C, n)
        rms = float(np.sqrt(np.mean(dist[:, used] ** 2)))
        worst = dist.max(axis=0)
        new_used = np.isfinite(worst) & (worst <= max(clip * rms, min_clip))
        if new_used.sum() < 1 or np.array_equal(new_used, used):
            break
        used = new_used
    return GeometryFit(fitted, rms, int(used.sum()), used)


# ---------------------------------------------------------------------------------
# Candidates and selection
# ---------------------------------------------------------------------------------
class _Scorer:
    """Scores candidate groups (member spot ids per channel, -1 = missing)."""

    def __init__(self, xy, flux, geometry: SpotGeometry, tol: float, flux_factor: float,
                 flux_weight: float):
        self.xy = xy
        self.logf = None if flux is None else np.log(np.maximum(flux, 1e-3 * np.nanmax(flux)
                                                                if np.any(flux > 0) else 1.0))
        self.geometry = geometry
        self.tol = tol
        self.log_ff = np.log(flux_factor)
        self.flux_weight = flux_weight

    def centre(self, members: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Least-squares pattern centres of candidates (m, C) from a starting guess (m, 2)."""
        has = members >= 0
        pos = self.xy[np.where(has, members, 0)]  # (m, C, 2)
        cen = start.copy()
        nmem = np.maximum(has.sum(axis=1), 1)
        for _ in range(3):
            off = np.moveaxis(self.geometry.offset_array(cen[:, 0], cen[:, 1]), -1, 0)  # (m, C, 2)
            implied = pos - off
            cen = (implied * has[..., None]).sum(axis=1) / nmem[:, None]
        return cen

    def evaluate(self, members: np.ndarray, start: np.ndarray):
        """Refine members (drop spots beyond tolerance / flux outliers); return cost terms."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of lone spots
            return self._evaluate(members, start)

    def _evaluate(self, members: np.ndarray, start: np.ndarray):
        members = members.copy()
        cen = start
        for _ in range(2):
            cen = self.centre(members, cen)
            has = members >= 0
            pos = self.xy[np.where(has, members, 0)]
            off = np.moveaxis(self.geometry.offset_array(cen[:, 0], cen[:, 1]), -1, 0)
            dist = np.hypot(*(pos - cen[:, None, :] - off).transpose(2, 0, 1))
            bad = has & (dist > self.tol)
            if self.logf is not None:
                lf = np.where(has, self.logf[np.where(has, members, 0)], np.nan)
                med = _row_nanmedian(np.where(has.any(axis=1)[:, None], lf, 0.0))
                dev = np.abs(lf - med[:, None])
                bad |= has & (dev > self.log_ff)
            # Drop the worst offender only (one per pass), keeping at least one spot.
            if not bad.any():
                break
            score = np.where(bad, dist, -1.0)
            worst = np.argmax(score, axis=1)
            rows = np.flatnonzero(bad.any(axis=1))
            members[rows, worst[rows]] = -1
        cen = self.centre(members, cen)
        has = members >= 0
        nmem = has.sum(axis=1)
        pos = self.xy[np.where(has, members, 0)]
        off = np.moveaxis(self.geometry.offset_array(cen[:, 0], cen[:, 1]), -1, 0)
        dist = np.hypot(*(pos - cen[:, None, :] - off).transpose(2, 0, 1))
        d2 = np.where(has, dist, 0.0) ** 2
        rms = np.sqrt(d2.sum(axis=1) / np.maximum(nmem, 1))
        cost = d2.sum(axis=1) / self.tol**2
        if self.logf is not None:
            lf = np.where(has, self.logf[np.where(has, members, 0)], np.nan)
            med = _row_nanmedian(np.where(nmem[:, None] > 0, lf, 0.0))
            dev = np.where(has, lf - med[:, None], 0.0) / self.log_ff
            cost = cost + self.flux_weight * (dev**2).sum(axis=1)
        cost = cost / np.maximum(nmem, 1)
        return members, cen, nmem, rms, cost


def _row_nanmedian(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=1)`` for the few columns of a candidate table, without the
    masked-array machinery nanmedian uses on small axes (NaN for all-NaN rows)."""
    srt = np.sort(a, axis=1)  # NaN sort last
    n = np.count_nonzero(~np.isnan(a), axis=1)
    rows = np.arange(a.shape[0])
    lo = srt[rows, np.maximum((n - 1) // 2, 0)]
    hi = srt[rows, np.minimum(n // 2, a.shape[1] - 1)]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _candidates(xy: np.ndarray, tree: cKDTree, geometry: SpotGeometry, tol: float) -> np.ndarray:
    """Member arrays (m, C) of candidate groups: every spot tried as every channel."""
    n = xy.shape[0]
    chans = geometry.channels
    nc = len(chans)
    out = []
    for c, ch in enumerate(chans):
        cx, cy = geometry.pattern_center(ch, xy[:, 0], xy[:, 1])
        pred = geometry.spot_positions(cx, cy)
        mem = np.full((n, nc), -1, np.int64)
        mem[:, c] = np.arange(n)
        for k, other in enumerate(chans):
            if k == c:
                continue
            px, py = pred[other]
            dist, idx = tree.query(np.column_stack([px, py]), k=1, distance_upper_bound=tol)
            found = np.isfinite(dist)
            mem[found, k] = idx[found]
        out.append(mem)
    mem = np.vstack(out)
    mem = mem[(mem >= 0).sum(axis=1) >= 2]
    if mem.size:
        mem = np.unique(mem, axis=0)
    return mem


def _select(scorer: _Scorer, members: np.ndarray, n_spots: int, min_spots: int):
    """Global greedy selection with re-scoring of candidates that lose a spot."""
    if members.shape[0] == 0:
        return np.zeros((0, members.shape[1]), np.int64), np.zeros((0, 2))
    start = _start_centres(scorer, members)
    members, cen, nmem, _, cost = scorer.evaluate(members, start)
    heap = [(-int(nmem[i]), float(cost[i]), i) for i in range(len(nmem)) if nmem[i] >= min_spots]
    heapq.heapify(heap)
    cand_members = list(members)
    cand_cen = list(cen)
    taken = np.zeros(n_spots, bool)
    chosen, chosen_cen = [], []
    while heap:
        neg_n, _cost, i = heapq.heappop(heap)
        mem = cand_members[i]
        ids = mem[mem >= 0]
        if taken[ids].any():
            mem = np.where((mem >= 0) & ~taken[np.maximum(mem, 0)], mem, -1)
            if (mem >= 0).sum() < min_spots:
                continue
            m2, c2, n2, _, k2 = scorer.evaluate(mem[None, :], cand_cen[i][None, :])
            if n2[0] < min_spots:
                continue
            j = len(cand_members)
            cand_members.append(m2[0])
            cand_cen.append(c2[0])
            heapq.heappush(heap, (-int(n2[0]), float(k2[0]), j))
            continue
        taken[ids] = True
        chosen.append(mem)
        chosen_cen.append(cand_cen[i])
    if not chosen:
        return np.zeros((0, members.shape[1]), np.int64), np.zeros((0, 2))
    return np.array(chosen, np.int64), np.array(chosen_cen, float)


def _start_centres(scorer: _Scorer, members: np.ndarray) -> np.ndarray:
    """Pattern centres implied by each candidate's first member spot."""
    geom = scorer.geometry
    has = members >= 0
    first = np.argmax(has, axis=1)
    ids = members[np.arange(len(members)), first]
    cen = np.zeros((len(members), 2))
    for c, ch in enumerate(geom.channels):
        sel = first == c
        if sel.any():
            cx, cy = geom.pattern_center(ch, scorer.xy[ids[sel], 0], scorer.xy[ids[sel], 1])
            cen[sel, 0], cen[sel, 1] = cx, cy
    return cen


def _empty_groups(channels) -> Table:
    t = Table()
    t["group_id"] = np.zeros(0, np.int64)
    t["x"] = np.zeros(0)
    t["y"] = np.zeros(0)
    t["n_spots"] = np.zeros(0, np.int64)
    t["complete"] = np.zeros(0, bool)
    for ch in channels:
        t[f"spot_{ch}"] = np.zeros(0, np.int64)
    t["geom_resid"] = np.zeros(0)
    _describe_groups(t, channels)
    return t


def _describe_groups(t: Table, channels) -> None:
    t["group_id"].description = "group index (row number)"
    t["x"].unit = t["y"].unit = "pix"
    t["x"].description = "pattern centre: mean of the spots (complete) or the model-implied centre"
    t["y"].description = t["x"].description
    t["n_spots"].description = "number of spots in the group"
    t["complete"].description = "all channels present (only complete groups give Stokes parameters)"
    for ch in channels:
        t[f"spot_{ch}"].description = f"spot_id of the {ch} spot (-1 if missing)"
    t["geom_resid"].unit = "pix"
    t["geom_resid"].description = "rms distance of the spots from the fitted geometry"


def group_quadruplets(spots: Table, profile: InstrumentProfile, *, refine: bool = True,
                      tolerance: float | None = None, geometry: SpotGeometry | None = None,
                      search_radius: float | None = None, min_spots: int = 2,
                      flux_factor: float = 10.0, flux_weight: float = 0.25,
                      min_fit_patterns: int = 3) -> GroupingResult:
    """Group detected spots into four-spot patterns.

    Parameters
    ----------
    spots : Table
        Spots with ``x``, ``y`` (pix); ``peak`` (or ``flux``) is used, when present, for
        the brightness-consistency score.
    profile : InstrumentProfile
        Gives the channels, the starting geometry, ``match_tolerance`` and
        ``frame_shift_max``.
    refine : bool
        Estimate the frame's shift and refit the geometry (otherwise use it as given).
    tolerance : float, optional
        Largest distance (pix) of a spot from its predicted position; the profile's
        ``match_tolerance`` by default.
    geometry : SpotGeometry, optional
        Starting geometry (the profile's by default), e.g. one fitted on a previous frame.
    search_radius : float, optional
        Largest frame-to-frame offset change searched (pix); by default the profile's
        ``frame_shift_max`` plus the tolerance.
    min_spots : int
        Smallest group kept (2: incomplete pairs are reported as incomplete groups).
    flux_factor : float
        A spot whose brightness differs from its group's median by more than this factor
        is not accepted into the group.
    flux_weight : float
        Weight of the brightness-consistency term relative to the geometric one.
    min_fit_patterns : int
        Fewest confident complete patterns needed to refit the geometry.

    Returns
    -------
    GroupingResult
    """
    geom0 = profile.geometry if geometry is None else geometry
    chans = geom0.channels
    nc = len(chans)
    tol = float(profile.match_tolerance if tolerance is None else tolerance)
    if not tol > 0:
        raise ValueError(f"tolerance must be positive, got {tol}")
    radius = float(profile.frame_shift_max + tol if search_radius is None else search_radius)
    for col in ("x", "y"):
        if col not in spots.colnames:
            raise ValueError(f"group_quadruplets: the spots table has no {col!r} column")
    out = spots.copy(copy_data=True)
    n = len(out)
    xy = np.column_stack([np.asarray(out["x"], float), np.asarray(out["y"], float)]) if n \
        else np.zeros((0, 2))
    finite = np.isfinite(xy).all(axis=1)
    flux = None
    for col in ("flux", "peak"):
        if col in out.colnames and n:
            f = np.asarray(out[col], float)
            if np.isfinite(f).any():
                flux = np.where(np.isfinite(f), f, np.nanmedian(f))
                break

    shift = {ch: (0.0, 0.0) for ch in chans}
    geom = geom0
    rms = float("nan")
    n_fit = 0
    members = np.zeros((0, nc), np.int64)
    centres = np.zeros((0, 2))
    if n >= 2 and finite.sum() >= 2:
        good_idx = np.flatnonzero(finite)
        xyg = xy[good_idx]
        tree = cKDTree(xyg)
        if refine:
            s = estimate_shift(xyg[:, 0], xyg[:, 1], geom0, radius=radius)
            geom = geom0.shifted(s)
        passes = 2 if refine else 1
        for p in range(passes):
            scorer = _Scorer(xyg, None if flux is None else flux[good_idx], geom, tol,
                             flux_factor, flux_weight)
            cands = _candidates(xyg, tree, geom, tol)
            members, centres = _select(scorer, cands, len(xyg), min_spots)
            if not refine or p == passes - 1:
                break
            complete = (members >= 0).all(axis=1)
            if complete.sum() >= min_fit_patterns:
                pos = xyg[members[complete]]  # (m, C, 2)
                fit = fit_geometry(pos, geom)
                geom, rms, n_fit = fit.geometry, fit.rms, fit.n_used
        members = np.where(members >= 0, good_idx[np.maximum(members, 0)], -1)

    # Shift relative to the starting geometry: change of each channel's constant term.
    if "1" in geom0.terms:
        i1 = geom0.terms.index("1")
        dc = geom.coeffs[:, :, i1] - geom0.coeffs[:, :, i1]
        shift = {ch: (float(dc[c, 0]), float(dc[c, 1])) for c, ch in enumerate(chans)}

    # -- output tables -------------------------------------------------------------
    ng = members.shape[0]
    has = members >= 0
    nmem = has.sum(axis=1)
    complete = nmem == nc
    if ng:
        pos = xy[np.maximum(members, 0)]
        cen = centres.copy()
        cen[complete] = pos[complete].mean(axis=1)
        scorer = _Scorer(xy, None, geom, tol, flux_factor, 0.0)
        inc = ~complete
        if inc.any():
            cen[inc] = scorer.centre(members[inc], centres[inc])
        off = np.moveaxis(geom.offset_array(cen[:, 0], cen[:, 1]), -1, 0)
        dist = np.hypot(*(pos - cen[:, None, :] - off).transpose(2, 0, 1))
        resid = np.sqrt((np.where(has, dist, 0.0) ** 2).sum(axis=1) / np.maximum(nmem, 1))
        order = np.lexsort((cen[:, 0], cen[:, 1]))
        members, cen, nmem, complete, resid = (members[order], cen[order], nmem[order],
                                               complete[order], resid[order])
        if refine and not np.isfinite(rms) and complete.any():
            rms = float(np.sqrt(np.mean(resid[complete] ** 2)))
        groups = Table()
        groups["group_id"] = np.arange(ng, dtype=np.int64)
        groups["x"] = cen[:, 0]
        groups["y"] = cen[:, 1]
        groups["n_spots"] = nmem.astype(np.int64)
        groups["complete"] = complete
        for c, ch in enumerate(chans):
            groups[f"spot_{ch}"] = members[:, c].astype(np.int64)
        groups["geom_resid"] = resid
        _describe_groups(groups, chans)
    else:
        groups = _empty_groups(chans)

    group_id = np.full(n, -1, np.int64)
    channel = np.full(n, "", dtype=f"<U{max(len(ch) for ch in chans)}")
    for c, ch in enumerate(chans):
        ids = members[:, c] if ng else np.zeros(0, np.int64)
        ok = ids >= 0
        group_id[ids[ok]] = np.flatnonzero(ok)
        channel[ids[ok]] = ch
    out["group_id"] = group_id
    out["group_id"].description = "group (quadruplet) index, -1 if in none"
    out["channel"] = channel
    out["channel"].description = "channel of the spot in its group, '' if in none"
    groups.meta["shift"] = {ch: [round(v, 4) for v in shift[ch]] for ch in chans}
    groups.meta["rms"] = None if not np.isfinite(rms) else round(float(rms), 4)
    groups.meta["n_fit"] = int(n_fit)
    groups.meta["tolerance"] = tol
    log.debug("grouped %d spots into %d groups (%d complete); shift %s, rms %s", n, ng,
              int(complete.sum()) if ng else 0, groups.meta["shift"], groups.meta["rms"])
    return GroupingResult(out, groups, geom, shift)
