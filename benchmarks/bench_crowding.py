"""Stokes completeness and pulls across crowding and seeing, per photometry method.

    python benchmarks/run.py --only crowding [--quick]

Frames: freshly simulated full 2048 x 2048 RoboPol frames
(``simulate_frame("robopol", seed=..., n_stars=..., fwhm=...)``, the simulator's default
artifacts, sky, PSF shape and geometry jitter) at n_stars in {200, 500, 800, 1200} and
FWHM in {3, 4.5, 6} px. Seeds 60_000-60_023 (``SEEDS["crowding"]`` of the registry
:mod:`seeds`, used nowhere else):
``60_000 + 2 * combination + repeat``, combinations in the order (n_stars, FWHM) =
(200, 3), (200, 4.5), (200, 6), (500, 3), ... (1200, 6), two frames each in the full
run; ``--quick`` reduces the first frame (repeat 0) of (500, 4.5) and (1200, 4.5) only,
so its numbers are a subset of the full run's.

Each frame is reduced by ``reduce_frame(ccd, classifier=<default>, photometry=m)`` for
each method ``m`` in ("psf", "aperture") the pipeline offers; a ``reduce_frame``
without a ``photometry`` keyword is run once, labelled "aperture" (its only method).

Truth ("eligible stars"): complete (all four spots in the frame, centre in the usable
region), unsaturated true stars whose faintest spot has S/N >= 10, with the expected
aperture S/N of a spot computed from the truth::

    snr = F / sqrt(F + A * (sky + RN**2)),   A = pi * (2 * FWHM)**2

F the spot's injected electrons (``sim.spots['flux']``), sky the noiseless sky in
electrons per pixel at the spot (``sim.sky`` times the gain: mask transmission,
vignetting, gradient and dust donuts included), RN the read noise (header RDNOISE,
electrons), FWHM the frame's true seeing.

A star has a *neighbour* when any true spot of another star lies within 2 x FWHM of any
of its four true spot positions with a flux >= 0.1 x that spot's flux.

Matching: for every eligible star the nearest Stokes row whose pattern centre lies
within 3 px of the true centre (any flags), and the nearest such row with
``flags == 0`` (a Stokes table without a ``flags`` column counts every row as 0).
Completeness = fraction of eligible stars with a flags == 0 row; "any row" = fraction
with a row of any flags. Pulls ``(q - q_true) / q_err`` and ``(u - u_true) / u_err`` of
the matched flags == 0 rows, q and u pooled: robust sigma ``1.4826 * MAD`` (about the
median), mean, fraction with |pull| > 5 and N. Subsets: per crowding level, per FWHM,
the densest frames, neighbour vs none, and per brightness bin (faintest spot's S/N
10-30, 30-100, 100-300, > 300; magnitude < 14, 14-15, 15-16, 16-17, > 17), so bright
stars do not hide in the average. "Crowded spots": of the true star spots in the frame
with S/N >= 10 that have a detection within 3 px, the fraction whose detection has
``crowded`` set in the pipeline's spots table (a dense real RoboPol field: ~30 %).

Another script can score a single reduction (``benchmarks/`` on ``sys.path``)::

    from bench_crowding import evaluate_frame
    stars, summary = evaluate_frame(result, sim)   # per-star Table, summary dict
"""

from __future__ import annotations

import inspect
import math

import numpy as np
from _common import Context, Section, Timer, fmt, load_default_classifier, log, plural, seeds_text
from astropy.table import Table, vstack
from scipy.spatial import cKDTree
from seeds import SEEDS

KEY = "crowding"
TITLE = "Stokes completeness and pulls across crowding and seeing"

#: Crowding levels (stars per frame) and seeing (FWHM, px) of the full run.
N_STARS = (200, 500, 800, 1200)
FWHMS = (3.0, 4.5, 6.0)
#: First frame seed; frame seed = SEED0 + 2 * combination index + repeat.
SEED0 = SEEDS["crowding"].first
#: Frames per (n_stars, FWHM) combination in the full run.
REPEATS = 2
#: Combinations of the quick run.
QUICK = ((500, 4.5), (1200, 4.5))

#: Truth selection and matching.
SNR_MIN = 10.0
MATCH_RADIUS = 3.0          # px, pattern centre
NEIGHBOUR_FWHM = 2.0        # neighbour search radius in FWHM
NEIGHBOUR_FLUX = 0.1        # neighbour flux relative to the spot's
APERTURE_FWHM = 2.0         # aperture radius (FWHM) of the truth S/N
PULL_LIMIT = 5.0

SNR_BINS = ((10.0, 30.0), (30.0, 100.0), (100.0, 300.0), (300.0, math.inf))
MAG_BINS = ((-math.inf, 14.0), (14.0, 15.0), (15.0, 16.0), (16.0, 17.0), (17.0, math.inf))

__all__ = ["spot_snr", "eligible_stars", "match_stokes", "pull_stats", "summarize",
           "crowded_spot_fraction", "evaluate_frame", "photometry_methods", "run"]


# ---------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------
def _fwhm(sim, fwhm: float | None) -> float:
    return float(sim.params["fwhm"] if fwhm is None else fwhm)


def spot_snr(sim, fwhm: float | None = None) -> np.ndarray:
    """Expected aperture S/N of every row of ``sim.spots`` (NaN for artifacts).

    ``F / sqrt(F + A (sky + RN^2))`` with ``A = pi (2 FWHM)^2``, F the spot's electrons,
    sky the noiseless sky (e-/px) at its position, RN the read noise (e-).
    """
    fwhm = _fwhm(sim, fwhm)
    spots = sim.spots
    gain = float(sim.ccd.header["GAIN"])
    rn = float(sim.ccd.header["RDNOISE"])
    ny, nx = sim.sky.shape
    x, y = np.asarray(spots["x"], float), np.asarray(spots["y"], float)
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    sky = np.clip(np.asarray(sim.sky, float)[iy, ix] * gain, 0.0, None)
    flux = np.clip(np.asarray(spots["flux"], float), 0.0, None)
    area = math.pi * (APERTURE_FWHM * fwhm) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.sqrt(flux + area * (sky + rn ** 2))
    return np.where(np.asarray(spots["is_artifact"], bool), np.nan, snr)


def _star_spot_rows(sim) -> np.ndarray:
    """(n_stars, n_channels) row indices into ``sim.spots`` of each star's spots, in the
    channel order of the stars table's ``x_<channel>`` columns."""
    chans = [c[2:] for c in sim.stars.colnames if c.startswith("x_")]
    spots = sim.spots
    sid = np.asarray(spots["star_id"], int)
    ch = np.asarray(spots["channel"]).astype(str)
    rows = np.full((len(sim.stars), len(chans)), -1, int)
    star = sid >= 0
    col = {c: i for i, c in enumerate(chans)}
    idx = np.flatnonzero(star)
    rows[sid[idx], [col[c] for c in ch[idx]]] = idx
    return rows


def eligible_stars(sim, fwhm: float | None = None, snr_min: float = SNR_MIN,
                   all_complete: bool = False) -> Table:
    """The truth selection: complete, unsaturated true stars whose faintest spot has
    expected S/N >= ``snr_min`` (see :func:`spot_snr`).

    Columns: star_id, x, y, mag, q_true, u_true, snr_min (faintest spot), flux_min
    (its electrons), near_neighbour (another star's spot within 2 FWHM of one of the
    four spots with >= 0.1 of that spot's flux), n_neighbours (such spots). With
    ``all_complete`` every complete, unsaturated star is returned, with a boolean
    ``eligible`` column.
    """
    fwhm = _fwhm(sim, fwhm)
    stars = sim.stars
    spots = sim.spots
    rows = _star_spot_rows(sim)
    snr = spot_snr(sim, fwhm)
    ok = (np.asarray(stars["complete"], bool) & ~np.asarray(stars["saturated"], bool)
          & (rows >= 0).all(axis=1))
    safe = np.where(rows >= 0, rows, 0)
    snr_star = np.where(rows >= 0, snr[safe], np.nan)
    with np.errstate(invalid="ignore"):
        snr_min_star = np.nanmin(np.where(np.isfinite(snr_star), snr_star, np.inf), axis=1)
    flux = np.asarray(spots["flux"], float)
    imin = np.argmin(np.where(np.isfinite(snr_star), snr_star, np.inf), axis=1)
    flux_min = flux[safe[np.arange(len(stars)), imin]]
    keep = ok if all_complete else ok & (snr_min_star >= snr_min)
    sel = np.flatnonzero(keep)

    # neighbours: other stars' spots (in the frame or not) near any of the four spots
    is_star = np.asarray(spots["star_id"], int) >= 0
    all_idx = np.flatnonzero(is_star)
    sxy = np.column_stack([np.asarray(spots["x"], float)[all_idx], np.asarray(spots["y"], float)[all_idx]])
    s_sid = np.asarray(spots["star_id"], int)[all_idx]
    s_flux = flux[all_idx]
    n_nb = np.zeros(sel.size, int)
    if sel.size and all_idx.size:
        tree = cKDTree(sxy)
        own = rows[sel].ravel()
        hits = tree.query_ball_point(
            np.column_stack([np.asarray(spots["x"], float)[own], np.asarray(spots["y"], float)[own]]),
            r=NEIGHBOUR_FWHM * fwhm)
        own_sid = np.repeat(np.asarray(stars["star_id"], int)[sel], rows.shape[1])
        cnt = np.array([int(np.count_nonzero((s_sid[h] != sid_)
                                             & (s_flux[h] >= NEIGHBOUR_FLUX * f_)))
                        for h, sid_, f_ in zip(hits, own_sid, flux[own])], int)
        n_nb = cnt.reshape(sel.size, rows.shape[1]).sum(axis=1)

    out = Table()
    out["star_id"] = np.asarray(stars["star_id"], int)[sel]
    out["x"] = np.asarray(stars["x"], float)[sel]
    out["y"] = np.asarray(stars["y"], float)[sel]
    out["mag"] = np.asarray(stars["mag"], float)[sel]
    out["q_true"] = np.asarray(stars["q"], float)[sel]
    out["u_true"] = np.asarray(stars["u"], float)[sel]
    out["snr_min"] = snr_min_star[sel]
    out["flux_min"] = flux_min[sel]
    out["near_neighbour"] = n_nb > 0
    out["n_neighbours"] = n_nb
    if all_complete:
        out["eligible"] = snr_min_star[sel] >= snr_min
    out.meta.update({"fwhm": fwhm, "snr_min": snr_min})
    return out


# ---------------------------------------------------------------------------------
# Matching and statistics
# ---------------------------------------------------------------------------------
def _flags(stokes: Table) -> np.ndarray:
    if "flags" in stokes.colnames:
        return np.asarray(stokes["flags"]).astype(np.int64)
    return np.zeros(len(stokes), np.int64)


def match_stokes(result, sim, *, fwhm: float | None = None, radius: float = MATCH_RADIUS,
                 truth: Table | None = None) -> Table:
    """Per eligible star (:func:`eligible_stars`): its Stokes rows and pulls.

    Adds to the truth columns: any_row (a Stokes row of any flags within ``radius`` px
    of the true pattern centre), row_any / flags_any (nearest such row, -1 if none),
    matched (a flags == 0 row within ``radius``), row / dist (nearest flags == 0 row, -1
    / NaN), flags (0 when matched, else flags_any), q, q_err, u, u_err, pull_q, pull_u
    (NaN when not matched) and crowded (the row's ``crowded`` column if present).
    """
    t = eligible_stars(sim, fwhm) if truth is None else truth.copy()
    stokes = result.stokes
    flags = _flags(stokes)
    n = len(t)
    txy = np.column_stack([np.asarray(t["x"], float), np.asarray(t["y"], float)])
    sxy = np.column_stack([np.asarray(stokes["x"], float), np.asarray(stokes["y"], float)]) \
        if len(stokes) else np.zeros((0, 2))

    def nearest(mask):
        idx = np.flatnonzero(mask)
        if n == 0 or idx.size == 0:
            return np.full(n, -1, int), np.full(n, np.nan)
        d, i = cKDTree(sxy[idx]).query(txy, distance_upper_bound=radius)
        ok = np.isfinite(d)
        return np.where(ok, idx[np.minimum(i, idx.size - 1)], -1), np.where(ok, d, np.nan)

    row_any, _ = nearest(np.ones(len(stokes), bool))
    row, dist = nearest(flags == 0)
    t["any_row"] = row_any >= 0
    t["row_any"] = row_any
    t["flags_any"] = np.where(row_any >= 0, flags[np.maximum(row_any, 0)] if len(stokes) else -1, -1)
    t["matched"] = row >= 0
    t["row"] = row
    t["dist"] = dist
    t["flags"] = np.where(row >= 0, 0, t["flags_any"])
    m = row >= 0
    safe = np.maximum(row, 0)
    for c in ("q", "q_err", "u", "u_err"):
        t[c] = np.where(m, np.asarray(stokes[c], float)[safe], np.nan) if len(stokes) else np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        t["pull_q"] = (np.asarray(t["q"]) - np.asarray(t["q_true"])) / np.asarray(t["q_err"])
        t["pull_u"] = (np.asarray(t["u"]) - np.asarray(t["u_true"])) / np.asarray(t["u_err"])
    if "crowded" in stokes.colnames and len(stokes):
        t["crowded"] = np.where(m, np.asarray(stokes["crowded"], bool)[safe], False)
    return t


def pull_stats(pulls: np.ndarray, limit: float = PULL_LIMIT) -> dict:
    """n, robust sigma (1.4826 MAD about the median), mean, median and the fraction and
    number with |pull| > ``limit`` of the finite values."""
    p = np.asarray(pulls, float)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return {"n": 0, "sigma_robust": None, "mean": None, "median": None, "std": None,
                "frac_over": None, "n_over": 0}
    med = float(np.median(p))
    return {"n": int(p.size), "sigma_robust": float(1.4826 * np.median(np.abs(p - med))),
            "mean": float(p.mean()), "median": med, "std": float(p.std()),
            "frac_over": float(np.mean(np.abs(p) > limit)), "n_over": int(np.sum(np.abs(p) > limit))}


def summarize(stars: Table) -> dict:
    """Completeness and pooled q/u pull statistics of a per-star table (one frame or
    many stacked), overall, neighbour vs none and per S/N and magnitude bin."""
    def block(t):
        n = len(t)
        m = np.asarray(t["matched"], bool) if n else np.zeros(0, bool)
        pulls = np.concatenate([np.asarray(t["pull_q"], float)[m], np.asarray(t["pull_u"], float)[m]]) \
            if n else np.zeros(0)
        out = {"n_eligible": n, "n_matched": int(m.sum()),
               "completeness": float(m.mean()) if n else None,
               "any_row": float(np.mean(np.asarray(t["any_row"], bool))) if n else None,
               "pulls": pull_stats(pulls)}
        if n and m.any():
            bad = ((np.abs(np.asarray(t["pull_q"], float)[m]) > PULL_LIMIT)
                   | (np.abs(np.asarray(t["pull_u"], float)[m]) > PULL_LIMIT))
            out["frac_stars_over"] = float(bad.mean())
        return out

    snr = np.asarray(stars["snr_min"], float)
    mag = np.asarray(stars["mag"], float)
    near = np.asarray(stars["near_neighbour"], bool)
    return {
        "all": block(stars),
        "neighbour": block(stars[near]),
        "no_neighbour": block(stars[~near]),
        "snr_bins": {_bin_label(lo, hi, "S/N"): block(stars[(snr >= lo) & (snr < hi)]) for lo, hi in SNR_BINS},
        "mag_bins": {_bin_label(lo, hi, "mag"): block(stars[(mag >= lo) & (mag < hi)]) for lo, hi in MAG_BINS},
    }


def _bin_label(lo: float, hi: float, what: str) -> str:
    if not np.isfinite(lo):
        return f"{what} < {hi:g}"
    if not np.isfinite(hi):
        return f"{what} > {lo:g}"
    return f"{what} {lo:g}-{hi:g}"


def crowded_spot_fraction(result, sim, *, fwhm: float | None = None,
                          snr_min: float = SNR_MIN, radius: float = MATCH_RADIUS) -> dict:
    """Of the true star spots in the frame with S/N >= ``snr_min`` that have a detected
    spot within ``radius`` px, the fraction flagged ``crowded`` in ``result.spots``
    (None when the column is absent)."""
    spots = sim.spots
    snr = spot_snr(sim, fwhm)
    with np.errstate(invalid="ignore"):
        sel = (~np.asarray(spots["is_artifact"], bool) & np.asarray(spots["in_frame"], bool)
               & (snr >= snr_min))
    det = result.spots
    out = {"n_true": int(sel.sum()), "n_detected": 0, "fraction": None}
    if not len(det) or not sel.any():
        return out
    d, i = cKDTree(np.column_stack([np.asarray(det["x"], float), np.asarray(det["y"], float)])).query(
        np.column_stack([np.asarray(spots["x"], float)[sel], np.asarray(spots["y"], float)[sel]]),
        distance_upper_bound=radius)
    ok = np.isfinite(d)
    out["n_detected"] = int(ok.sum())
    if "crowded" in det.colnames and ok.any():
        out["fraction"] = float(np.mean(np.asarray(det["crowded"], bool)[i[ok]]))
    return out


def evaluate_frame(result, sim, *, fwhm: float | None = None) -> tuple[Table, dict]:
    """Score one reduction (``reduce_frame`` result) of one simulated frame.

    Returns the per-star table of :func:`match_stokes` (eligible stars only) and a
    summary dict: :func:`summarize` plus the frame's numbers (FWHM, Stokes rows, rows
    with flags == 0, rows matching no complete unsaturated true star, crowded-spot
    fraction, the pipeline's timings).
    """
    fwhm = _fwhm(sim, fwhm)
    stars = match_stokes(result, sim, fwhm=fwhm)
    summary = summarize(stars)
    stokes = result.stokes
    flags = _flags(stokes)
    # rows that match no complete, unsaturated true star at all (any S/N)
    truth = eligible_stars(sim, fwhm, all_complete=True)
    n_unmatched = len(stokes)
    if len(stokes) and len(truth):
        d, _ = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
            np.column_stack([np.asarray(stokes["x"], float), np.asarray(stokes["y"], float)]),
            distance_upper_bound=MATCH_RADIUS)
        n_unmatched = int(np.sum(~np.isfinite(d)))
    summary.update({
        "fwhm": fwhm, "n_stars_sim": int(sim.params.get("n_stars", len(sim.stars))),
        "seed": sim.params.get("seed"),
        "n_rows": len(stokes), "n_rows_flag0": int(np.sum(flags == 0)),
        "has_flags": "flags" in stokes.colnames, "n_rows_unmatched": n_unmatched,
        "crowded_spots": crowded_spot_fraction(result, sim, fwhm=fwhm),
        "timings": dict(result.meta.get("timings", {})),
    })
    return stars, summary


# ---------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------
def photometry_methods() -> list[str | None]:
    """The ``photometry=`` values to run: ["psf", "aperture"] when ``reduce_frame``
    takes the keyword, else [None] (the current, aperture-only pipeline)."""
    from robopol_clean.pipeline import reduce_frame

    if "photometry" in inspect.signature(reduce_frame).parameters:
        return ["psf", "aperture"]
    return [None]


def frame_plan(quick: bool) -> list[tuple[int, float, int, int]]:
    """(n_stars, fwhm, repeat, seed) of every frame of the run."""
    plan = []
    for k, (n, f) in enumerate((n, f) for n in N_STARS for f in FWHMS):
        for rep in range(REPEATS):
            if quick and (rep or (n, f) not in QUICK):
                continue
            plan.append((n, f, rep, SEED0 + REPEATS * k + rep))
    return plan


def _seeds_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return seeds_text(seeds)
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _crowded_by_combination(frames: list[dict]) -> dict[str, float]:
    """Mean crowded-spot fraction per 'n_stars/FWHM' over the frames that have one."""
    acc: dict[str, list[float]] = {}
    for f in frames:
        if f["crowded_spots"]["fraction"] is not None:
            acc.setdefault(f"{f['n_stars']}/{f['fwhm']:g}", []).append(f["crowded_spots"]["fraction"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _row(method: str, subset: str, b: dict) -> list[str]:
    p = b["pulls"]
    return [method, subset, str(b["n_eligible"]), fmt(b["completeness"]), fmt(b["any_row"]),
            str(p["n"]), fmt(p["sigma_robust"], 2), fmt(p["mean"], 2),
            "-" if p["frac_over"] is None else f"{p['n_over']} ({fmt(100 * p['frac_over'], 1)}%)"]


def run(ctx: Context) -> Section:
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.simulate import simulate_frame

    sec = Section(KEY, TITLE)
    clf, clf_name, _, why = load_default_classifier(ctx)
    methods = photometry_methods()
    labels = {m: (m or "aperture") for m in methods}
    plan = frame_plan(ctx.quick)
    per_star: dict[str, list[Table]] = {labels[m]: [] for m in methods}
    frames: dict[str, list[dict]] = {labels[m]: [] for m in methods}
    for n_stars, fwhm, _rep, seed in plan:
        sim = simulate_frame("robopol", seed=seed, n_stars=n_stars, fwhm=fwhm)
        for m in methods:
            kw = {} if m is None else {"photometry": m}
            with Timer() as t:
                res = reduce_frame(sim.ccd, classifier=clf, name=f"seed{seed}", **kw)
            stars, summ = evaluate_frame(res, sim)
            stars["seed"] = seed
            stars["n_stars"] = n_stars
            stars["fwhm"] = fwhm
            per_star[labels[m]].append(stars)
            frames[labels[m]].append({
                "seed": seed, "n_stars": n_stars, "fwhm": fwhm, "seconds": t.s,
                "photometry_seconds": summ["timings"].get("photometry"),
                "n_eligible": summ["all"]["n_eligible"], "completeness": summ["all"]["completeness"],
                "any_row": summ["all"]["any_row"], "n_rows": summ["n_rows"],
                "n_rows_flag0": summ["n_rows_flag0"], "n_rows_unmatched": summ["n_rows_unmatched"],
                "crowded_spots": summ["crowded_spots"]})
        log(f"crowding: seed {seed} ({n_stars} stars, FWHM {fwhm:g}) reduced "
            f"{plural(len(methods), 'way')}")

    sec.columns = ["photometry", "subset", "eligible", "completeness (flags 0)", "any row",
                   "pulls (q+u)", "robust sigma", "mean", "|pull| > 5"]
    densest = max(n for n, *_ in plan)
    data: dict = {}
    for m in methods:
        lab = labels[m]
        allt = vstack(per_star[lab], metadata_conflicts="silent")
        ns = np.asarray(allt["n_stars"], int)
        fw = np.asarray(allt["fwhm"], float)
        summ = summarize(allt)
        by_n = {str(n): summarize(allt[ns == n])["all"] for n in sorted(set(ns.tolist()))}
        by_f = {f"{f:g}": summarize(allt[fw == f])["all"] for f in sorted(set(fw.tolist()))}
        grid = {f"{n}/{f:g}": summarize(allt[(ns == n) & (fw == f)])["all"]
                for n in sorted(set(ns.tolist())) for f in sorted(set(fw.tolist()))
                if np.any((ns == n) & (fw == f))}
        dense = summarize(allt[ns == densest])
        fr = frames[lab]
        secs = [f["seconds"] for f in fr]
        phot = [f["photometry_seconds"] for f in fr if f["photometry_seconds"] is not None]
        crowd = [f["crowded_spots"]["fraction"] for f in fr if f["crowded_spots"]["fraction"] is not None]
        data[lab] = {"overall": summ, "by_n_stars": by_n, "by_fwhm": by_f, "by_n_stars_fwhm": grid,
                     "densest": {"n_stars": densest, **dense}, "frames": fr,
                     "reduce_seconds_median": float(np.median(secs)),
                     "photometry_seconds_median": float(np.median(phot)) if phot else None}
        sec.rows.append(_row(lab, "all", summ["all"]))
        for n, b in by_n.items():
            sec.rows.append(_row(lab, f"{n} stars", b))
        for f, b in by_f.items():
            sec.rows.append(_row(lab, f"FWHM {f} px", b))
        sec.rows.append(_row(lab, f"densest ({densest} stars)", dense["all"]))
        sec.rows.append(_row(lab, "neighbour within 2 FWHM", summ["neighbour"]))
        sec.rows.append(_row(lab, "no neighbour", summ["no_neighbour"]))
        for k, b in {**summ["snr_bins"], **summ["mag_bins"]}.items():
            sec.rows.append(_row(lab, k, b))
        sec.notes.append(
            f"{lab}: median {fmt(data[lab]['reduce_seconds_median'], 2)} s per reduce, photometry stage "
            f"{fmt(data[lab]['photometry_seconds_median'], 3)} s; crowded true spots (S/N >= 10, detected) "
            + (", ".join(f"{k}: {fmt(100 * v, 0)}%" for k, v in _crowded_by_combination(fr).items())
               if crowd else "n/a (no 'crowded' column)")
            + "; completeness by stars/FWHM "
            + ", ".join(f"{k}: {fmt(b['completeness'])}" for k, b in grid.items()))
    seeds = [s for *_, s in plan]
    sec.notes.insert(0, f"{plural(len(plan), 'simulated 2048x2048 frame')} "
                        f"({_seeds_text(seeds)}; "
                        f"{'quick: ' if ctx.quick else ''}{REPEATS if not ctx.quick else 1} per stars/FWHM), "
                        f"default artifacts; classifier {clf_name}"
                     + ("" if clf_name == "cnn" else f" ({why})"))
    if methods == [None]:
        sec.notes.insert(1, "reduce_frame has no photometry= keyword yet: only the current (aperture) "
                            "method is run")
    sec.notes.append("eligible = complete, unsaturated true stars whose faintest spot has expected "
                     "S/N >= 10 (F / sqrt(F + pi (2 FWHM)^2 (sky + RN^2))); completeness = eligible "
                     "stars with a flags == 0 Stokes row within 3 px (any row: any flags); pulls "
                     "(q - q_true) / q_err and (u - u_true) / u_err of those rows, pooled; robust "
                     "sigma = 1.4826 MAD; neighbour = another star's spot within 2 FWHM of one of "
                     "the four spots with >= 0.1 of its flux")
    sec.data = {"seeds": seeds, "plan": [{"n_stars": n, "fwhm": f, "repeat": r, "seed": s}
                                         for n, f, r, s in plan],
                "classifier": clf_name, "methods": [labels[m] for m in methods],
                "photometry_keyword": methods != [None], "snr_min": SNR_MIN,
                "match_radius": MATCH_RADIUS, "results": data}
    return sec


def readme_row(results: dict, n_frames: int) -> str:
    """The README's crowded-field row, from this section's ``results`` (``sec.data``):
    ``tests/test_readme_numbers.py`` checks that the README carries exactly this line."""
    def part(method: str) -> str:
        r = results[method]
        a, d = r["overall"]["all"], r["densest"]["all"]
        p = a["pulls"]
        return (f"{a['completeness']:.3f} of eligible stars get a `flags == 0` row (densest frames "
                f"{d['completeness']:.3f}), q/u pulls robust sigma {p['sigma_robust']:.2f}, "
                f"{100 * p['frac_over']:.1f} % beyond 5 sigma")
    return (f"| crowded fields, {n_frames} held-out frames of 200-1,200 stars and FWHM 3-6 px "
            f"| PSF photometry (default): {part('psf')}; apertures: {part('aperture')} "
            f"| `python benchmarks/run.py` (section `crowding`) |")
