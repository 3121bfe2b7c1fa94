"""Combining the exposures of a visit: repeated frames of one field, one row per star.

RoboPol observes a target in sequences of exposures; each frame's Stokes table
(``<stem>_stokes.ecsv``) measures every star once. :func:`combine_stokes` cross-matches
the stars of the exposures and gives each star the inverse-variance weighted means of q
and u, their errors, the chi-square of the exposures about the means and a flag when
they disagree; p (debiased), theta and their errors follow from the means with
:func:`robopol_clean.stokes.stokes_from_qu`, as for a single frame.

Matching
--------
The first table is the reference. Every other exposure gets an offset that carries its
positions onto the reference's, fitted robustly: every pair of its brightest sources
(summed spot fluxes) and the reference's votes for their difference in a 2-D histogram
whose bins are the match radius wide; the peak, refined by the median difference of
the nearest-neighbour matches of all sources (iterated to convergence), is the offset.
Positions are

- **sky positions** (the ``ra``, ``dec`` columns, projected on the tangent plane at the
  reference's centre) when every table has them: the offset then absorbs small
  differences between the frames' astrometric solutions (at most ``max_sky_offset``);
- **pixel positions** otherwise: the offset is the telescope's dither (at most
  ``max_offset`` px; translations only, no rotation).

An exposure that shares too few of its bright sources with the reference at any offset,
or whose offset does not converge, is refused as another field (:class:`CombineError`,
naming the file); so are tables of different instrument profiles, bands (``filter``)
or calibrations (``calibration_hash``, the angle zero point and the instrumental
polarization recorded in the tables' metadata). With the offsets applied, the sources
of all exposures are merged one-to-one within the match radius: a star seen in only
some exposures keeps its row, with the number of exposures that saw it.

Combination
-----------
Only measurements with ``flags == 0`` and finite q, u and errors enter the means
(``include_flagged`` lets the flagged ones in too). For the ``n`` used measurements

.. math::

   \\bar q = \\frac{\\sum q_i / \\sigma_{q,i}^2}{\\sum 1 / \\sigma_{q,i}^2}, \\qquad
   \\sigma_{\\bar q} = \\Big(\\sum 1 / \\sigma_{q,i}^2\\Big)^{-1/2}

(u alike), and ``chi2 = sum((q_i - q̄)^2 / σ_q,i^2 + (u_i - ū)^2 / σ_u,i^2)`` with
``2 (n - 1)`` degrees of freedom. A star whose chi-square is improbable (its
probability below ``significance``, 0.001 by default) is flagged
:attr:`~robopol_clean.quality.CombineFlag.DISAGREE`. The errors come from the
per-measurement noise model alone; ``inflate_errors`` multiplies them by
``sqrt(chi2 / dof)`` where that exceeds 1 (the Birge ratio; noisy with few exposures).

Tables reduced with a calibration that carries its covariance split their errors into a
statistical part (``q_err_stat``) and the calibration's (``q_err_cal``; u alike). The
exposures of a visit share that calibration, so its error is common to them and does not
average down: the means, their weights and the chi-square use the statistical parts, and
the calibration's error of the mean, the exposures' ``q_err_cal`` averaged with the
weights of the mean, is added once in quadrature (``q_err``); the visit table keeps the
parts.

>>> import numpy as np
>>> mean, err, chi2, n = weighted_mean([[0.010, 0.014, np.nan]], [[0.002, 0.002, 0.001]])
>>> round(float(mean[0]), 4), round(float(err[0]), 5), round(float(chi2[0]), 2), int(n[0])
(0.012, 0.00141, 2.0, 2)
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree
from scipy.stats import chi2 as chi2_distribution

from ._version_info import __commit__, __version__
from .config import _Settings, read_settings_file
from .quality import CombineFlag, combined_flags_description
from .stokes import stokes_from_qu

__all__ = ["CombineConfig", "CombineError", "CombinedVisit", "MATCH_MODES", "weighted_mean",
           "read_stokes_table", "combine_stokes", "combine_files", "group_visits",
           "combine_night", "load_combine_config", "VISIT_SUFFIX"]

log = logging.getLogger(__name__)

#: How positions are matched: from the tables' columns, or forced.
MATCH_MODES = ("auto", "sky", "pixel")

#: Suffix of a visit table written by :func:`combine_night` (``<first stem>_visit.ecsv``).
VISIT_SUFFIX = "_visit.ecsv"

#: Columns every input table must have.
_REQUIRED = ("x", "y", "q", "q_err", "u", "u_err", "flags")

#: The parts of q_err and u_err in a table reduced with a calibration's covariance
#: (:mod:`robopol_clean.stokes`); ``qu_corr_cal`` is optional (0 when absent).
_CALIBRATION_ERRORS = ("q_err_stat", "u_err_stat", "q_err_cal", "u_err_cal")

#: Metadata that must agree between the exposures of a visit, and what they mean.
_MUST_AGREE = {
    "profile": "instrument profile",
    "filter": "band (FILTER)",
    "calibration_hash": "calibration",
    "angle_zero": "calibration (angle zero point)",
    "q_inst_coeffs": "calibration (instrumental q)",
    "u_inst_coeffs": "calibration (instrumental u)",
}

#: Metadata copied to the visit table when every exposure has the same value.
_SHARED_META = ("profile", "filter", "calibration_hash", "calibration", "stokes_convention",
                "channel_angles", "angle_zero", "q_inst_coeffs", "u_inst_coeffs", "inst_terms",
                "p_debias", "theta_err_method", "photometry", "classifier")


class CombineError(ValueError):
    """Exposures cannot be combined (unreadable, another field, mixed calibrations);
    the message names the file and the problem in one line."""


@dataclass(frozen=True)
class CombineConfig(_Settings):
    """Every tunable of combining a visit, with its default.

    Attributes
    ----------
    match : {"auto", "sky", "pixel"}
        Position matching: ``"auto"`` uses sky positions when every table has ``ra``
        and ``dec``, pixel positions otherwise.
    match_radius : float
        Largest distance (pix) between a star's positions in two exposures after the
        offset; also the bin width of the offset vote.
    sky_match_radius : float
        The same for sky positions (arcsec).
    max_offset : float
        Largest offset (pix) between an exposure and the reference (telescope dithers).
    max_sky_offset : float
        Largest offset (arcsec) between the sky positions of two exposures (differences
        of their astrometric solutions).
    n_bright : int
        Brightest sources per exposure that vote for the offset.
    min_matches : int
        An exposure must share at least this many of its bright sources with the
        reference ...
    min_match_fraction : float
        ... and at least this fraction of the smaller bright list; otherwise it is
        another field.
    significance : float
        Chi-square test: a star whose exposures' chi-square about the mean has a
        probability below this is flagged ``disagree``.
    include_flagged : bool
        Let measurements with ``flags != 0`` (but finite q, u and errors) enter the
        means; their bits are OR-ed into the combined ``flags``.
    inflate_errors : bool
        Multiply the errors of a star by ``sqrt(chi2 / dof)`` where that exceeds 1.
    """

    match: str = "auto"
    match_radius: float = 3.0
    sky_match_radius: float = 1.5
    max_offset: float = 150.0
    max_sky_offset: float = 10.0
    n_bright: int = 200
    min_matches: int = 5
    min_match_fraction: float = 0.3
    significance: float = 0.001
    include_flagged: bool = False
    inflate_errors: bool = False

    def __post_init__(self):
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {self.match!r}")
        for name in ("match_radius", "sky_match_radius", "max_offset", "max_sky_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("n_bright", "min_matches"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.min_match_fraction <= 1.0:
            raise ValueError(f"min_match_fraction must be in [0, 1], got {self.min_match_fraction!r}")
        if not 0.0 < self.significance < 1.0:
            raise ValueError(f"significance must be in (0, 1), got {self.significance!r}")


def load_combine_config(path: str | os.PathLike) -> CombineConfig:
    """Read a :class:`CombineConfig` from a TOML file of top-level settings.

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or holds an unknown key or a bad value.
    """
    return CombineConfig.from_dict(read_settings_file(path), where=str(path))


@dataclass
class CombinedVisit:
    """The result of :func:`combine_stokes`.

    Attributes
    ----------
    table : Table
        One row per star (see the combine page of the documentation for the columns);
        ``meta`` records the inputs, the offsets and the configuration.
    members : Table
        One row per measurement: ``star_id``, ``exposure`` (index of the input),
        ``group_id``, ``x``, ``y`` (in its own exposure), ``q``, ``q_err``, ``u``,
        ``u_err``, ``flags`` and ``used`` (it entered the means).
    offsets : ndarray
        ``(n_exposures, 2)`` pixel offsets: position in the reference = position in the
        exposure + offset.
    match : str
        ``"sky"`` or ``"pixel"``.
    """

    table: Table
    members: Table
    offsets: np.ndarray
    match: str
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# The statistics
# ---------------------------------------------------------------------------------
def weighted_mean(values, errors, axis: int = -1):
    """Inverse-variance weighted mean along ``axis``, ignoring NaN entries.

    Parameters
    ----------
    values, errors : array-like
        Measurements and their 1-sigma errors (same shape); entries with a non-finite
        value or error, or an error that is not positive, are left out.
    axis : int
        The axis of the repeated measurements.

    Returns
    -------
    mean, err : ndarray
        ``sum(w x) / sum(w)`` and ``sum(w) ** -0.5`` with ``w = 1 / err**2`` (NaN where
        nothing is left).
    chi2 : ndarray
        ``sum(w (x - mean)**2)`` (0 for one measurement, NaN for none).
    n : ndarray of int
        Number of measurements used.
    """
    x = np.asarray(values, float)
    e = np.asarray(errors, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(x) & np.isfinite(e) & (e > 0)
        w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
        sw = w.sum(axis=axis)
        mean = np.where(sw > 0, (w * np.where(ok, x, 0.0)).sum(axis=axis) / sw, np.nan)
        err = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
        dev = np.where(ok, x - np.expand_dims(mean, axis), 0.0)
        chi2 = np.where(sw > 0, (w * dev**2).sum(axis=axis), np.nan)
    return mean, err, chi2, ok.sum(axis=axis)


# ---------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------
def read_stokes_table(path: str | os.PathLike) -> Table:
    """Read a per-frame Stokes table (``<stem>_stokes.ecsv``) and check its columns.

    Raises
    ------
    CombineError
        The file is missing, not a readable ECSV table, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise CombineError(f"{path}: no such file")
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # noqa: BLE001 -- any reader error: one line naming the file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CombineError(f"{path}: not a readable ECSV table ({first})") from None
    _check_columns(table, str(path))
    if "frame" in table.colnames and len(np.unique(np.asarray(table["frame"]))) > 1:
        raise CombineError(f"{path}: holds the rows of several frames (a night's stokes_all); "
                           f"give the per-frame <stem>_stokes.ecsv tables")
    return table


def _check_columns(table: Table, name: str) -> None:
    missing = [c for c in _REQUIRED if c not in table.colnames]
    if missing:
        raise CombineError(f"{name}: not a Stokes table (lacks column(s) {', '.join(missing)})")


def _check_compatible(tables: list[Table], names: list[str]) -> None:
    ref = tables[0].meta
    for table, name in zip(tables[1:], names[1:]):
        for key, what in _MUST_AGREE.items():
            a, b = ref.get(key), table.meta.get(key)
            if not _same(a, b):
                raise CombineError(f"{name}: {what} differs from {names[0]}'s ({b!r} vs {a!r}); "
                                   f"a visit combines exposures of one profile, band and "
                                   f"calibration")


def _calibration_errors(tables: list[Table], names: list[str]) -> bool:
    """Whether the tables carry the calibration's part of their errors (all or none)."""
    has = [all(c in t.colnames for c in _CALIBRATION_ERRORS) for t in tables]
    if any(has) and not all(has):
        odd = has.index(not has[0])
        raise CombineError(f"{names[odd]}: {'has' if has[odd] else 'lacks'} the calibration's "
                           f"error columns ({', '.join(_CALIBRATION_ERRORS)}), unlike "
                           f"{names[0]}; reduce the visit's frames alike")
    return all(has)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# ---------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------
def _brightness(table: Table) -> np.ndarray:
    """Summed spot fluxes, or 1 / q_err when the table has no fluxes (higher = brighter)."""
    cols = [c for c in table.colnames if c.startswith("flux_")]
    with np.errstate(divide="ignore", invalid="ignore"):
        if cols:
            f = np.stack([np.asarray(table[c], float) for c in cols], axis=1)
            b = np.where(np.isfinite(f), f, 0.0).sum(axis=1)
        else:
            b = 1.0 / np.asarray(table["q_err"], float)
    return np.where(np.isfinite(b), b, -np.inf)


def _has_sky(table: Table) -> bool:
    return ("ra" in table.colnames and "dec" in table.colnames and len(table) > 0
            and bool(np.any(np.isfinite(np.asarray(table["ra"], float)))))


class _Positions:
    """The positions the matching works on: pixels, or arcsec on a tangent plane."""

    def __init__(self, tables: list[Table], mode: str):
        self.mode = mode
        self.center = None
        if mode == "sky":
            from astropy.coordinates import SkyCoord

            ra0, dec0 = _mean_position(tables[0])
            self.center = SkyCoord(ra0, dec0, unit="deg")
            self.frame = self.center.skyoffset_frame()
            self.xy = [self._project(t) for t in tables]
        else:
            self.xy = [np.column_stack([np.asarray(t["x"], float), np.asarray(t["y"], float)])
                       for t in tables]

    def _project(self, table: Table) -> np.ndarray:
        from astropy.coordinates import SkyCoord

        ra, dec = np.asarray(table["ra"], float), np.asarray(table["dec"], float)
        out = np.full((len(table), 2), np.nan)
        ok = np.isfinite(ra) & np.isfinite(dec)
        if ok.any():
            off = SkyCoord(ra[ok], dec[ok], unit="deg").transform_to(self.frame)
            out[ok, 0] = off.lon.wrap_at("180d").arcsec
            out[ok, 1] = off.lat.arcsec
        return out

    def to_sky(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from astropy.coordinates import SkyCoord

        ra = np.full(len(xy), np.nan)
        dec = np.full(len(xy), np.nan)
        ok = np.isfinite(xy).all(axis=1)
        if ok.any():
            c = SkyCoord(xy[ok, 0] / 3600.0, xy[ok, 1] / 3600.0, unit="deg",
                         frame=self.frame).icrs
            ra[ok], dec[ok] = c.ra.deg, c.dec.deg
        return ra, dec


def _mean_position(table: Table) -> tuple[float, float]:
    """Mean sky position (deg) of a table's rows (unit-vector mean)."""
    ra = np.radians(np.asarray(table["ra"], float))
    dec = np.radians(np.asarray(table["dec"], float))
    ok = np.isfinite(ra) & np.isfinite(dec)
    v = np.stack([np.cos(dec[ok]) * np.cos(ra[ok]), np.cos(dec[ok]) * np.sin(ra[ok]),
                  np.sin(dec[ok])]).mean(axis=1)
    return (float(np.degrees(np.arctan2(v[1], v[0])) % 360.0),
            float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))))


@dataclass
class _OffsetFit:
    offset: np.ndarray
    ok: bool
    reason: str = ""
    n_bright_matched: int = 0
    n_matched: int = 0


def _fit_offset(ref_xy: np.ndarray, ref_bright: np.ndarray, xy: np.ndarray,
                bright: np.ndarray, *, window: float, radius: float, cfg: CombineConfig,
                unit: str) -> _OffsetFit:
    """Offset carrying ``xy`` onto ``ref_xy``: a 2-D histogram vote of the bright sources'
    pairwise differences, refined by the median of nearest-neighbour matches."""
    zero = np.zeros(2)
    ref_ok = np.isfinite(ref_xy).all(axis=1)
    ok = np.isfinite(xy).all(axis=1)
    if not ref_ok.any() or not ok.any():
        return _OffsetFit(zero, False, "no source with a finite position")
    n = int(cfg.n_bright)
    rb = ref_xy[_brightest(ref_bright, ref_ok, n)]
    ob = xy[_brightest(bright, ok, n)]
    need = max(int(cfg.min_matches), int(np.ceil(cfg.min_match_fraction * min(len(rb), len(ob)))))
    d = (rb[:, None, :] - ob[None, :, :]).reshape(-1, 2)
    d = d[(np.abs(d) <= window).all(axis=1)]
    if not len(d):
        return _OffsetFit(zero, False, f"no pair of bright sources within {window:g} {unit}")
    edges = np.arange(-window, window + radius, radius)
    hist, xe, ye = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
    # sums of 2 x 2 bins: a peak on a bin edge is not split
    sums = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    corner = np.array([xe[i + 1], ye[j + 1]])
    near = (np.abs(d - corner) <= radius).all(axis=1)
    offset = np.median(d[near], axis=0)
    # refine on every source: median difference of the nearest-neighbour matches
    tree = cKDTree(ref_xy[ref_ok])
    pts = xy[ok]
    converged = False
    for _ in range(20):
        dist, idx = tree.query(pts + offset, distance_upper_bound=radius)
        hit = np.isfinite(dist)
        if not hit.any():
            break
        step = np.median(tree.data[idx[hit]] - (pts[hit] + offset), axis=0)
        offset = offset + step
        if np.hypot(*step) <= 1e-3 * radius:
            converged = True
            break
    n_bright = _count_matches(rb, ob + offset, radius)
    n_all = _count_matches(ref_xy[ref_ok], pts + offset, radius)
    if not converged:
        return _OffsetFit(offset, False, "the offset does not converge", n_bright, n_all)
    if np.any(np.abs(offset) > window + radius):
        return _OffsetFit(offset, False, f"the offset ({offset[0]:.1f}, {offset[1]:.1f}) {unit} "
                          f"exceeds {window:g} {unit}", n_bright, n_all)
    if n_bright < need:
        return _OffsetFit(offset, False, f"only {n_bright} of {min(len(rb), len(ob))} bright "
                          f"sources match at the best offset within {window:g} {unit} (need "
                          f"{need})", n_bright, n_all)
    return _OffsetFit(offset, True, "", n_bright, n_all)


def _brightest(brightness: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:
    rows = np.flatnonzero(ok)
    order = np.argsort(-brightness[rows], kind="stable")
    return rows[order[:n]]


def _count_matches(ref: np.ndarray, pts: np.ndarray, radius: float) -> int:
    """One-to-one matches within ``radius`` (greedy by distance)."""
    if not len(ref) or not len(pts):
        return 0
    pairs = _pair_up(cKDTree(ref), pts, radius)
    return len(pairs[0])


def _pair_up(tree: cKDTree, pts: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (point row, tree row) within ``radius``, closest first."""
    k = min(4, tree.n)
    dist, idx = tree.query(pts, k=k, distance_upper_bound=radius)
    dist, idx = dist.reshape(len(pts), k), idx.reshape(len(pts), k)
    rows = np.repeat(np.arange(len(pts)), k)
    dist, idx = dist.ravel(), idx.ravel()
    hit = np.isfinite(dist)
    rows, idx, dist = rows[hit], idx[hit], dist[hit]
    order = np.argsort(dist, kind="stable")
    taken_p, taken_t = set(), set()
    out_p, out_t = [], []
    for r, t in zip(rows[order].tolist(), idx[order].tolist()):
        if r in taken_p or t in taken_t:
            continue
        taken_p.add(r)
        taken_t.add(t)
        out_p.append(r)
        out_t.append(t)
    return np.asarray(out_p, np.int64), np.asarray(out_t, np.int64)


def _fit_all(pos: _Positions, bright: list[np.ndarray], ref: int,
             cfg: CombineConfig) -> list[_OffsetFit]:
    window, radius, unit = ((cfg.max_sky_offset, cfg.sky_match_radius, "arcsec")
                            if pos.mode == "sky" else (cfg.max_offset, cfg.match_radius, "px"))
    fits = []
    for k in range(len(pos.xy)):
        if k == ref:
            n = int(np.count_nonzero(np.isfinite(pos.xy[k]).all(axis=1)))
            fits.append(_OffsetFit(np.zeros(2), True, "", n, n))
        else:
            fits.append(_fit_offset(pos.xy[ref], bright[ref], pos.xy[k], bright[k],
                                    window=window, radius=radius, cfg=cfg, unit=unit))
    return fits


def _match_offsets(pos: _Positions, bright: list[np.ndarray], cfg: CombineConfig,
                   names: list[str], tables: list[Table]) -> list[_OffsetFit]:
    """Offsets of every exposure against the first; refuses another field, naming it."""
    fits = _fit_all(pos, bright, 0, cfg)
    failed = [k for k, f in enumerate(fits) if not f.ok]
    if not failed:
        return fits
    odd, ref = failed[0], 0
    if len(names) >= 3 and len(failed) == len(names) - 1:
        # every other exposure fails against the first: is the first the odd one?
        second = _fit_all(pos, bright, 1, cfg)
        if [k for k, f in enumerate(second) if not f.ok] == [0]:
            odd, ref, fits = 0, 1, second
    reason = fits[odd].reason
    if pos.mode == "sky":
        sep = _separation(tables[ref], tables[odd])
        reason = f"pointings {sep:.3f} deg apart; {reason}"
        if sep < 0.05:  # overlapping pointings: the frames' WCS may disagree
            reason += "; if their WCS disagree, match by pixel positions"
    raise CombineError(f"{names[odd]}: not the same field as {names[ref]} ({reason}); "
                       f"nothing written")


def _separation(a: Table, b: Table) -> float:
    from astropy.coordinates import SkyCoord

    ca, cb = (SkyCoord(*_mean_position(t), unit="deg") for t in (a, b))
    return float(ca.separation(cb).deg)


def _merge(xy: list[np.ndarray], radius: float) -> np.ndarray:
    """Stars from positions already in the reference system.

    Exposure by exposure, each source is paired one-to-one (closest first, within
    ``radius``) with the stars found so far, at their mean positions; the unpaired ones
    become new stars. Returns ``(n_stars, n_exposures)`` rows of the tables (-1 where an
    exposure has no measurement of the star).
    """
    n_exp = len(xy)
    rows = np.zeros((0, n_exp), np.int64)
    sums = np.zeros((0, 2))
    counts = np.zeros(0)
    for k, pts in enumerate(xy):
        star_of = np.full(len(pts), -1, np.int64)
        finite = np.isfinite(pts).all(axis=1)
        known = np.flatnonzero(counts > 0)
        if len(known) and finite.any():
            tree = cKDTree(sums[known] / counts[known, None])
            p_rows, s_rows = _pair_up(tree, pts[finite], radius)
            star_of[np.flatnonzero(finite)[p_rows]] = known[s_rows]
        new = np.flatnonzero(star_of < 0)
        star_of[new] = len(counts) + np.arange(len(new))
        rows = np.vstack([rows, np.full((len(new), n_exp), -1, np.int64)])
        sums = np.vstack([sums, np.zeros((len(new), 2))])
        counts = np.append(counts, np.zeros(len(new)))
        rows[star_of, k] = np.arange(len(pts))
        np.add.at(sums, star_of[finite], pts[finite])
        np.add.at(counts, star_of[finite], 1.0)
    return rows


def _gather(values: list[np.ndarray], star_rows: np.ndarray) -> np.ndarray:
    """``(n_stars, n_exposures)`` of per-exposure row values (NaN where missing)."""
    out = np.full(star_rows.shape, np.nan)
    for k, v in enumerate(values):
        have = star_rows[:, k] >= 0
        out[have, k] = np.asarray(v, float)[star_rows[have, k]]
    return out


# ---------------------------------------------------------------------------------
# The combination
# ---------------------------------------------------------------------------------
def combine_stokes(tables: list[Table], names: list[str] | None = None, *,
                   config: CombineConfig | None = None) -> CombinedVisit:
    """Cross-match the stars of a visit's exposures and combine their q and u.

    Parameters
    ----------
    tables : list of Table
        Per-frame Stokes tables (at least two) of one field, e.g. read with
        :func:`read_stokes_table`; the first is the reference.
    names : list of str, optional
        Their names in messages and metadata (usually the file names).
    config : CombineConfig, optional
        Matching and combination settings (the defaults if omitted); recorded in the
        output's metadata.

    Returns
    -------
    CombinedVisit
        The visit table (one row per star), the measurement table and the offsets.

    Raises
    ------
    CombineError
        Fewer than two tables, a table that is not a Stokes table, tables of different
        profiles, bands or calibrations, or an exposure of another field; the message
        names the odd table.
    """
    cfg = config if config is not None else CombineConfig()
    names = [str(n) for n in names] if names is not None else [f"table {i}" for i in range(len(tables))]
    if len(names) != len(tables):
        raise ValueError(f"{len(tables)} tables but {len(names)} names")
    if len(tables) < 2:
        raise CombineError("give at least two Stokes tables of one field to combine")
    for table, name in zip(tables, names):
        _check_columns(table, name)
        if not len(table):
            raise CombineError(f"{name}: no Stokes rows: nothing to match")
    _check_compatible(tables, names)
    calibration_errors = _calibration_errors(tables, names)
    if cfg.match == "auto":
        mode = "sky" if all(_has_sky(t) for t in tables) else "pixel"
    else:
        mode = cfg.match
        if mode == "sky":
            for table, name in zip(tables, names):
                if not _has_sky(table):
                    raise CombineError(f"{name}: no ra/dec columns (its frame had no celestial "
                                       f"WCS): match by pixel positions instead")
    pos = _Positions(tables, mode)
    bright = [_brightness(t) for t in tables]
    fits = _match_offsets(pos, bright, cfg, names, tables)
    radius = cfg.sky_match_radius if mode == "sky" else cfg.match_radius
    shifted = [xy + f.offset for xy, f in zip(pos.xy, fits)]
    star_rows = _merge(shifted, radius)
    pix_offsets = np.array([f.offset for f in fits]) if mode == "pixel" else \
        _pixel_offsets(tables, star_rows)
    table, members = _combined_table(tables, star_rows, pix_offsets, shifted, pos, cfg,
                                     calibration_errors)
    meta = _provenance(tables, names, cfg, mode, fits, pix_offsets, calibration_errors)
    table.meta.update(meta)
    members.meta.update({k: meta[k] for k in ("inputs", "match")})
    log.debug("combined %d exposures (%s matching): %d stars, %d with flags == 0", len(tables),
             mode, len(table), int(np.count_nonzero(np.asarray(table["flags"]) == 0)))
    return CombinedVisit(table, members, pix_offsets, mode, meta)


def _pixel_offsets(tables: list[Table], star_rows: np.ndarray) -> np.ndarray:
    """Pixel offsets from the stars matched on the sky: median of reference minus exposure."""
    x = [np.asarray(t["x"], float) for t in tables]
    y = [np.asarray(t["y"], float) for t in tables]
    out = np.zeros((len(tables), 2))
    ref = star_rows[:, 0]
    for k in range(1, len(tables)):
        both = (ref >= 0) & (star_rows[:, k] >= 0)
        if both.any():
            out[k] = [np.median(x[0][ref[both]] - x[k][star_rows[both, k]]),
                      np.median(y[0][ref[both]] - y[k][star_rows[both, k]])]
        else:
            out[k] = np.nan
    return out


def _combined_table(tables, star_rows, pix_offsets, shifted, pos, cfg, calibration_errors=False):
    n_star = len(star_rows)
    have = star_rows >= 0
    q, qe, u, ue, fl, xs, ys = (_gather([np.asarray(t[c], float) for t in tables], star_rows)
                                for c in ("q", "q_err", "u", "u_err", "flags", "x", "y"))
    # with a calibration's errors the means, their weights and the chi-square use the
    # statistical part alone: the calibration's part is common to the exposures
    qw, uw = (_gather([np.asarray(t[c], float) for t in tables], star_rows)
              for c in ("q_err_stat", "u_err_stat")) if calibration_errors else (qe, ue)
    flags = np.where(have, np.nan_to_num(fl), 0).astype(np.int64)
    with np.errstate(invalid="ignore"):
        valid = have & np.isfinite(q) & np.isfinite(u) & (qw > 0) & (uw > 0)
    used = valid & ((flags == 0) | bool(cfg.include_flagged))
    qm, qme, chi_q, n_used = weighted_mean(np.where(used, q, np.nan), np.where(used, qw, np.nan))
    um, ume, chi_u, _ = weighted_mean(np.where(used, u, np.nan), np.where(used, uw, np.nan))
    dof = 2 * (n_used - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2 = np.where(n_used >= 2, chi_q + chi_u, np.nan)
        chi2_dof = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)
        p_chi2 = np.where(dof > 0, chi2_distribution.sf(chi2, np.maximum(dof, 1)), np.nan)
    if cfg.inflate_errors:
        scale = np.where(np.isfinite(chi2_dof), np.sqrt(np.maximum(chi2_dof, 1.0)), 1.0)
        qme, ume = qme * scale, ume * scale
    out_flags = np.bitwise_or.reduce(np.where(used, flags, 0), axis=1)
    none = n_used == 0
    out_flags = np.where(none, np.bitwise_or.reduce(np.where(have, flags, 0), axis=1)
                         | int(CombineFlag.NO_MEASUREMENT), out_flags)
    with np.errstate(invalid="ignore"):
        out_flags |= np.where(p_chi2 < cfg.significance, int(CombineFlag.DISAGREE), 0)
    if calibration_errors:
        cal = _calibration_part(tables, star_rows, used, qw, uw)
        q_tot, u_tot = np.hypot(qme, cal["q_err_cal"]), np.hypot(ume, cal["u_err_cal"])
        pol = stokes_from_qu(qm, q_tot, um, u_tot, qu_cov=cal["qu_corr_cal"] * cal["q_err_cal"]
                             * cal["u_err_cal"])
    else:
        pol = stokes_from_qu(qm, qme, um, ume)

    # positions: the mean over the star's measurements, in the reference's pixels
    with _quiet_nanmean():
        x_mean = np.nanmean(xs + pix_offsets[:, 0], axis=1)
        y_mean = np.nanmean(ys + pix_offsets[:, 1], axis=1)

    out = Table()
    out["star_id"] = np.arange(n_star, dtype=np.int64)
    out["star_id"].description = "star identifier within the visit"
    for name, values, text in (("x", x_mean, "mean position x in the reference exposure"),
                               ("y", y_mean, "mean position y in the reference exposure")):
        out[name] = values
        out[name].unit = "pix"
        out[name].description = f"{text} (0-based; the first input)"
    if pos.mode == "sky":
        with _quiet_nanmean():
            mean_xy = np.column_stack([
                np.nanmean(_gather([s[:, c] for s in shifted], star_rows), axis=1)
                for c in (0, 1)]) if n_star else np.zeros((0, 2))
        ra, dec = pos.to_sky(mean_xy)
        out["ra"], out["dec"] = ra, dec
        out["ra"].unit = out["dec"].unit = "deg"
        out["ra"].description = "right ascension (ICRS): mean over the exposures"
        out["dec"].description = "declination (ICRS): mean over the exposures"
    out["n_exposures"] = have.sum(axis=1).astype(np.int64)
    out["n_exposures"].description = "exposures with a Stokes row of this star (any flags)"
    out["n_used"] = n_used.astype(np.int64)
    out["n_used"].description = "measurements in the means (flags == 0 unless include_flagged)"
    res = pol.as_table()
    for col in ("q", "q_err", "u", "u_err", "p", "p_err", "p_debiased", "theta", "theta_err",
                "snr"):
        out[col] = res[col]
    out["q"].description = "inverse-variance weighted mean of q"
    out["q_err"].description = "1-sigma error of the mean of q" + (
        " (times sqrt(chi2_dof) where > 1)" if cfg.inflate_errors else "")
    out["u"].description = "inverse-variance weighted mean of u"
    out["u_err"].description = "1-sigma error of the mean of u" + (
        " (times sqrt(chi2_dof) where > 1)" if cfg.inflate_errors else "")
    if calibration_errors:
        inflated = " (times sqrt(chi2_dof) where > 1)" if cfg.inflate_errors else ""
        for c in ("q", "u"):
            out[f"{c}_err"].description = (f"1-sigma error of the mean of {c}: {c}_err_stat and "
                                           f"{c}_err_cal in quadrature")
            out[f"{c}_err_stat"] = qme if c == "q" else ume
            out[f"{c}_err_stat"].description = (f"statistical error of the mean of {c}, from the "
                                                f"exposures' {c}_err_stat{inflated}")
        for col, text in (("q_err_cal", "calibration's error of q, shared by the exposures: their "
                                        "q_err_cal averaged with the weights of the mean"),
                          ("u_err_cal", "calibration's error of u, shared by the exposures: their "
                                        "u_err_cal averaged with the weights of the mean"),
                          ("qu_corr_cal", "correlation of the calibration's errors of q and u "
                                          "(mean over the exposures used)")):
            out[col] = cal[col]
            out[col].description = text
    out["chi2_dof"] = chi2_dof
    out["chi2_dof"].description = ("chi-square of q and u about the means per degree of "
                                   "freedom, 2 (n_used - 1)")
    out["p_chi2"] = p_chi2
    out["p_chi2"].description = "probability of a chi-square at least this large by chance"
    out["flags"] = out_flags.astype(np.int64)
    out["flags"].description = combined_flags_description()

    members = Table()
    star, exp = np.nonzero(have)
    rows = star_rows[star, exp]
    members["star_id"] = star.astype(np.int64)
    members["exposure"] = exp.astype(np.int64)
    members["group_id"] = np.array([np.asarray(tables[k]["group_id"])[r]
                                    if "group_id" in tables[k].colnames else -1
                                    for k, r in zip(exp, rows)], np.int64)
    for name, arr in (("x", xs), ("y", ys), ("q", q), ("q_err", qe), ("u", u), ("u_err", ue)):
        members[name] = arr[star, exp]
    members["x"].unit = members["y"].unit = "pix"
    members["flags"] = flags[star, exp]
    members["used"] = used[star, exp]
    return out, members


def _calibration_part(tables: list[Table], star_rows: np.ndarray, used: np.ndarray,
                      q_err_stat: np.ndarray, u_err_stat: np.ndarray) -> dict:
    """The calibration's error of the weighted means.

    Every exposure is calibrated by the same parameters, so their calibration errors are
    fully correlated: the error of a weighted mean is the weighted mean of the errors
    (exact when the star's derivatives are the same in every exposure, which dithers of
    a small fraction of the polynomials' scale hardly change; otherwise an upper bound).
    The weights are those of the means (the statistical errors); the correlation of q
    and u is the mean of the exposures'.
    """
    out = {}
    for c, err in (("q", q_err_stat), ("u", u_err_stat)):
        cal = _gather([np.asarray(t[f"{c}_err_cal"], float) for t in tables], star_rows)
        ok = used & np.isfinite(cal)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
            sw = w.sum(axis=1)
            out[f"{c}_err_cal"] = np.where(sw > 0, (w * np.where(ok, cal, 0.0)).sum(axis=1) / sw,
                                           np.nan)
    corr = _gather([np.asarray(t["qu_corr_cal"], float) if "qu_corr_cal" in t.colnames
                    else np.zeros(len(t)) for t in tables], star_rows)
    ok = used & np.isfinite(corr)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = ok.sum(axis=1)
        out["qu_corr_cal"] = np.where(n > 0, np.where(ok, corr, 0.0).sum(axis=1) / np.maximum(n, 1),
                                      np.nan)
    return out


@contextlib.contextmanager
def _quiet_nanmean():
    """Silence 'Mean of empty slice' for stars whose positions are all NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _provenance(tables, names, cfg, mode, fits, pix_offsets, calibration_errors=False) -> dict:
    meta = {
        "robopol_clean_version": __version__,
        "robopol_clean_commit": __commit__,
        "n_inputs": len(tables),
        "inputs": list(names),
        "frames": [str(t.meta.get("frame", n)) for t, n in zip(tables, names)],
        "reference": names[0],
        "match": mode,
        "offsets": [[float(v) for v in o] for o in pix_offsets],
        "offsets_note": "pix: position in the reference = position in the exposure + offset",
        "n_matched": [int(f.n_matched) for f in fits],
        "input_config_hashes": [t.meta.get("config_hash") for t in tables],
        "config": cfg.non_default(),
        "config_hash": cfg.digest(),
        "settings": cfg.as_dict(),
        "combination": "inverse-variance weighted means of q and u; chi2 of q and u about the "
                       "means with 2 (n_used - 1) dof; p, theta from robopol_clean.stokes",
    }
    if calibration_errors:
        meta["calibration_errors"] = (
            "means, weights and chi2 from q_err_stat, u_err_stat; the calibration's error "
            "(q_err_cal, u_err_cal: the exposures' averaged with the same weights, not "
            "reduced by their number) added once in quadrature")
    if mode == "sky":
        meta["sky_offsets"] = [[float(v) for v in f.offset] for f in fits]
        meta["sky_offsets_note"] = "arcsec on the tangent plane at the reference's centre"
    for key in _SHARED_META:
        values = [t.meta.get(key) for t in tables]
        if values[0] is not None and all(_same(values[0], v) for v in values[1:]):
            meta[key] = values[0]
    return meta


# ---------------------------------------------------------------------------------
# Files and nights
# ---------------------------------------------------------------------------------
def combine_files(paths: list[str | os.PathLike], output: str | os.PathLike, *,
                  config: CombineConfig | None = None, overwrite: bool = False) -> CombinedVisit:
    """Combine per-frame Stokes tables (ECSV files) into one visit table, written atomically.

    Parameters
    ----------
    paths : list of path-like
        ``<stem>_stokes.ecsv`` files of one field; the first is the reference.
    output : path-like
        The visit table (ECSV) to write.
    config : CombineConfig, optional
        Settings (defaults if omitted).
    overwrite : bool
        Replace an existing output.

    Returns
    -------
    CombinedVisit

    Raises
    ------
    CombineError
        As :func:`combine_stokes`, or an input that cannot be read; nothing is written.
    OutputError
        The output exists (without ``overwrite``) or cannot be written.
    """
    from .io import OutputError, write_atomic

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: output exists (use --overwrite to replace it)")
    names = [str(p) for p in paths]
    resolved = [Path(p).resolve() for p in paths]
    if output.resolve() in resolved:
        raise CombineError(f"{output}: the output is one of the inputs")
    seen: dict[Path, str] = {}
    for path, name in zip(resolved, names):
        if path in seen:
            raise CombineError(f"{name}: given twice (also as {seen[path]})")
        seen[path] = name
    tables = [read_stokes_table(p) for p in paths]
    visit = combine_stokes(tables, names, config=config)
    visit.table.meta["inputs"] = [Path(n).name for n in names]
    if not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, lambda p: visit.table.write(p, format="ascii.ecsv", overwrite=True),
                 overwrite=overwrite)
    return visit


def group_visits(tables: list[Table], names: list[str], *,
                 config: CombineConfig | None = None) -> list[list[int]]:
    """Split a night's exposures, in order, into visits of consecutive frames of one field.

    An exposure joins the current visit when it has the visit's profile, band and
    calibration and matches the visit's first exposure (the reference, as in
    :func:`combine_stokes`); otherwise it starts a new visit.

    Parameters
    ----------
    tables : list of Table
        Per-frame Stokes tables in observing order.
    names : list of str
        Their names.
    config : CombineConfig, optional
        The matching settings.

    Returns
    -------
    list of list of int
        Indices into ``tables``, one list per visit (single exposures included).
    """
    cfg = config if config is not None else CombineConfig()
    visits: list[list[int]] = []
    for k, table in enumerate(tables):
        if visits and _joins(tables[visits[-1][0]], table, names[visits[-1][0]], names[k], cfg):
            visits[-1].append(k)
        else:
            visits.append([k])
    return visits


def _joins(ref: Table, table: Table, ref_name: str, name: str, cfg: CombineConfig) -> bool:
    if not len(ref) or not len(table):
        return False
    try:
        _check_compatible([ref, table], [ref_name, name])
    except CombineError:
        return False
    mode = cfg.match
    if mode == "auto":
        mode = "sky" if _has_sky(ref) and _has_sky(table) else "pixel"
    elif mode == "sky" and not (_has_sky(ref) and _has_sky(table)):
        return False
    pos = _Positions([ref, table], mode)
    window, radius, unit = ((cfg.max_sky_offset, cfg.sky_match_radius, "arcsec")
                            if mode == "sky" else (cfg.max_offset, cfg.match_radius, "px"))
    fit = _fit_offset(pos.xy[0], _brightness(ref), pos.xy[1], _brightness(table), window=window,
                      radius=radius, cfg=cfg, unit=unit)
    return fit.ok


def combine_night(stokes_paths: list[str | os.PathLike], outdir: str | os.PathLike, *,
                  config: CombineConfig | None = None) -> dict[str, Path]:
    """Visit tables of a night: consecutive exposures of one field combined.

    The night's Stokes tables are split into visits (:func:`group_visits`); every visit
    of two or more exposures is combined and written as ``<first stem>_visit.ecsv``
    (the stem of its first frame), and ``visits.ecsv`` lists the visits (one row per
    visit file: its frames, stars and clean stars). Both are replaced on every run, as
    the other night products are. A table that cannot be read is left out with a
    warning.

    Parameters
    ----------
    stokes_paths : list of path-like
        The night's ``<stem>_stokes.ecsv`` files in observing order.
    outdir : path-like
        Where the visit tables go (the per-frame products' folder).
    config : CombineConfig, optional
        Matching and combination settings.

    Returns
    -------
    dict
        Visit file name (and ``"visits"``) -> path written.
    """
    from .io import write_atomic

    cfg = config if config is not None else CombineConfig()
    outdir = Path(outdir)
    tables, names = [], []
    for path in stokes_paths:
        try:
            tables.append(read_stokes_table(path))
            names.append(str(path))
        except CombineError as exc:
            log.warning("warning: %s; left out of the visits", exc)
    written: dict[str, Path] = {}
    rows = []
    for visit in group_visits(tables, names, config=cfg):
        if len(visit) < 2:
            continue
        stems = [Path(names[k]).name.removesuffix("_stokes.ecsv") for k in visit]
        path = outdir / f"{stems[0]}{VISIT_SUFFIX}"
        try:
            result = combine_stokes([tables[k] for k in visit], [names[k] for k in visit],
                                    config=cfg)
        except CombineError as exc:  # grouping checked the reference only
            log.warning("warning: visit of %s not combined: %s", stems[0], exc)
            continue
        result.table.meta["inputs"] = [Path(names[k]).name for k in visit]
        write_atomic(path, lambda p, t=result.table: t.write(p, format="ascii.ecsv",
                                                             overwrite=True), overwrite=True)
        written[path.name] = path
        t = result.table
        rows.append({"visit": path.name, "n_frames": len(visit), "frames": ",".join(stems),
                     "match": result.match, "n_stars": len(t),
                     "n_clean": int(np.count_nonzero(np.asarray(t["flags"]) == 0))})
    summary = outdir / "visits.ecsv"
    if rows:
        table = Table(rows=rows, names=("visit", "n_frames", "frames", "match", "n_stars",
                                        "n_clean"))
        table["n_clean"].description = "stars with flags == 0 in the visit table"
        write_atomic(summary, lambda p: table.write(p, format="ascii.ecsv", overwrite=True),
                     overwrite=True)
        written["visits"] = summary
    else:
        summary.unlink(missing_ok=True)
    log.info("%d visit(s) of two or more exposures combined%s", len(rows),
             f" (listed in {summary})" if rows else "")
    return written
