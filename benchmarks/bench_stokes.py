"""Stokes accuracy with and without artifact cleaning.

    python benchmarks/run.py --only stokes [--quick]

Full RoboPol frames with many reflection sources (seeds ``SEEDS["stokes"]`` of the
registry :mod:`seeds`, 30_000-30_002; quick: the first) are reduced by the
same pipeline three ways: without cleaning (a classifier that scores every spot 0, so
nothing is rejected or masked), with the classical morphology + partner-cue classifier,
and with the pipeline default (the shipped CNN + partner cues) when the model exists.
Every Stokes row (one per clean quadruplet) is matched to the true star whose pattern
centre lies within 3 px (complete, unsaturated stars only); the pulls
``(q - q_true) / q_err`` and ``(u - u_true) / u_err`` are pooled over frames. A row
whose |pull| in q or u exceeds 5 is a > 5 sigma failure; rows matching no true star
are counted as unmatched (spurious patterns, or stars outside the truth selection). A
matched row is "near an artifact" when any artifact (reflection, cosmic ray, dust donut;
a streak's whole extent) lies within the aperture radius + 3 px of one of the star's
four true spot positions: the rows cleaning can change.
"""

from __future__ import annotations

import numpy as np
from _common import Context, Section, Timer, fmt, load_default_classifier, log, plural, seeds_text
from astropy.table import Table
from scipy.spatial import cKDTree
from seeds import SEEDS

KEY = "stokes"
TITLE = "Stokes q/u accuracy with and without artifact cleaning"


def _zero_classifier():
    from robopol_clean.classify import SpotClassifier

    class NoCleaning(SpotClassifier):
        """Scores every spot 0: nothing is rejected, nothing masked."""

        name = "none"

        def score(self, scene):
            return Table({"p_artifact": np.zeros(len(scene.spots))})

    return NoCleaning()


def _artifact_distance(px: np.ndarray, py: np.ndarray, arts) -> np.ndarray:
    """Distance (px) from points to the nearest artifact (a streak's whole extent)."""
    if len(arts) == 0:
        return np.full(px.shape, np.inf)
    ax, ay = np.asarray(arts["x"], float), np.asarray(arts["y"], float)
    streak = np.asarray(arts["kind"]).astype(str) == "streak"
    xc = np.where(streak, np.asarray(arts["x_center"], float), ax)
    half = np.where(streak, 0.5 * np.nan_to_num(np.asarray(arts["length"], float)), 0.0)
    dx = np.maximum(np.abs(px[..., None] - xc) - half, 0.0)
    dy = py[..., None] - ay
    return np.hypot(dx, dy).min(axis=-1)


def _pulls(result, sim, radius: float = 3.0):
    """Pulls of the Stokes rows matched to true stars, and which rows have an artifact
    within an aperture radius + 3 px of one of their four true spot positions."""
    stokes = result.stokes[result.stokes["flags"] == 0]  # clean measurements only
    stars = sim.stars
    ok_truth = np.asarray(stars["complete"], bool) & ~np.asarray(stars["saturated"], bool)
    truth = stars[ok_truth]
    n = len(stokes)
    if n == 0 or len(truth) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool), n, n
    d, i = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
        np.column_stack([stokes["x"], stokes["y"]]), distance_upper_bound=radius)
    ok = np.isfinite(d)
    t = truth[i[ok]]
    pq = ((np.asarray(stokes["q"], float)[ok] - np.asarray(t["q"], float))
          / np.asarray(stokes["q_err"], float)[ok])
    pu = ((np.asarray(stokes["u"], float)[ok] - np.asarray(t["u"], float))
          / np.asarray(stokes["u_err"], float)[ok])
    chans = [c[2:] for c in t.colnames if c.startswith("x_")]
    px = np.column_stack([np.asarray(t[f"x_{c}"], float) for c in chans])
    py = np.column_stack([np.asarray(t[f"y_{c}"], float) for c in chans])
    near = (_artifact_distance(px, py, sim.artifacts).min(axis=1)
            <= float(result.meta["aperture_radius"]) + 3.0)
    return pq, pu, near, n, int(n - ok.sum())


def run(ctx: Context) -> Section:
    from robopol_clean.classify import MorphologyClassifier
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.simulate import simulate_frame

    sec = Section(KEY, TITLE)
    clf, name, _, why = load_default_classifier(ctx)
    configs = [("no cleaning", _zero_classifier()),
               ("morphology + partner cues", MorphologyClassifier())]
    if name == "cnn":
        configs.append(("CNN + partner cues (default)", clf))
    seeds = SEEDS["stokes"].frames(1 if ctx.quick else None)
    n_stars, n_sources = 500, 12
    acc = {c: {"pq": [], "pu": [], "near": [], "rows": 0, "spurious": 0, "seconds": 0.0}
           for c, _ in configs}
    n_refl = 0
    for seed in seeds:
        sim = simulate_frame("robopol", seed=seed, n_stars=n_stars, n_artifact_sources=n_sources)
        arts = sim.artifacts
        n_refl += int(np.isin(np.asarray(arts["kind"]).astype(str), ["streak", "ghost"]).sum())
        for cname, c in configs:
            with Timer() as t:
                res = reduce_frame(sim.ccd, classifier=c, name=f"seed{seed}")
            pq, pu, near, rows, spurious = _pulls(res, sim)
            a = acc[cname]
            a["pq"].append(pq)
            a["pu"].append(pu)
            a["near"].append(near)
            a["rows"] += rows
            a["spurious"] += spurious
            a["seconds"] += t.s
        log(f"stokes: frame seed {seed} reduced {len(configs)} ways")

    sec.columns = ["cleaning", "clean quadruplets", "matched", "unmatched", "near an artifact",
                   "> 5 sigma (q or u)", "> 5 sigma near an artifact",
                   "pull q mean", "pull q std", "pull u mean", "pull u std"]
    data = {}
    for cname, _ in configs:
        a = acc[cname]
        pq, pu = np.concatenate(a["pq"]), np.concatenate(a["pu"])
        near = np.concatenate(a["near"])
        bad = (np.abs(pq) > 5) | (np.abs(pu) > 5)
        frac = float(bad.mean()) if bad.size else float("nan")
        row = {"rows": a["rows"], "matched": int(pq.size), "unmatched": a["spurious"],
               "near_artifact": int(near.sum()), "n_over_5sigma": int(bad.sum()),
               "n_over_5sigma_near_artifact": int((bad & near).sum()), "frac_over_5sigma": frac,
               "pull_q_mean": float(np.mean(pq)) if pq.size else None,
               "pull_q_std": float(np.std(pq)) if pq.size else None,
               "pull_u_mean": float(np.mean(pu)) if pu.size else None,
               "pull_u_std": float(np.std(pu)) if pu.size else None,
               "pull_q_std_clipped": float(np.std(pq[~bad])) if (~bad).any() else None,
               "pull_u_std_clipped": float(np.std(pu[~bad])) if (~bad).any() else None,
               "reduce_seconds": a["seconds"]}
        data[cname] = row
        sec.rows.append([cname, str(a["rows"]), str(pq.size), str(a["spurious"]), str(int(near.sum())),
                         f"{int(bad.sum())} ({fmt(100 * frac, 2)}%)", str(int((bad & near).sum())),
                         fmt(row["pull_q_mean"], 2),
                         fmt(row["pull_q_std"], 2), fmt(row["pull_u_mean"], 2), fmt(row["pull_u_std"], 2)])
    sec.notes.append(f"{plural(len(seeds), 'simulated 2048x2048 frame')} ({seeds_text(seeds)}), "
                     f"{n_stars} stars and {n_sources} reflection sources per frame "
                     f"({n_refl} reflection artifacts in all); truth: complete, unsaturated stars")
    if name != "cnn":
        sec.notes.append(f"CNN row missing: {why}")
    sec.notes.append("pull = (measured - true) / quoted error; std 1 and mean 0 are ideal; "
                     "std without the > 5 sigma rows: "
                     + ", ".join(f"{c} q {fmt(d['pull_q_std_clipped'], 2)} u {fmt(d['pull_u_std_clipped'], 2)}"
                                 for c, d in data.items()))
    sec.data = {"seeds": seeds, "n_stars": n_stars, "n_artifact_sources": n_sources,
                "n_reflections": n_refl, "configs": data}
    return sec
