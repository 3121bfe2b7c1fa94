"""The demonstration run: simulate, reduce, write everything, compare with the truth.

Everything it prints comes from the simulated frame it makes (seeded): run
``robopol-clean demo --seed S`` to reproduce any of its numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .io import check_writable, write_atomic, write_ecsv
from .simulate import simulate_frame, truth_paths

__all__ = ["run_demo", "demo_numbers", "compare_with_truth"]


def compare_with_truth(result, sim, *, match_radius: float = 3.0) -> dict:
    """Score a reduced simulated frame against its truth tables.

    Parameters
    ----------
    result : FrameResult
        The reduction of ``sim.ccd``.
    sim : SimulatedFrame
        The simulation (truth tables ``stars``, ``spots``, ``artifacts``).
    match_radius : float
        Largest distance (px) between a detection and a true position.

    Returns
    -------
    dict
        ``artifacts``, ``artifacts_caught`` (artifact's brightest pixel masked),
        ``star_spots_simulated``, ``star_spots_detected`` (detections within
        ``match_radius`` of a simulated star spot, each detection once) and
        ``star_spots_rejected`` (those rejected), ``stars_complete``,
        ``stars_measured`` (Stokes rows with ``flags == 0``), and the q/u pull means and
        standard deviations of those rows.
    """
    spots, stokes, mask = result.spots, result.stokes, result.artifact_mask
    from .pipeline import added_by_photometry

    spots = spots[~added_by_photometry(spots)]  # detections only
    stokes = stokes[np.asarray(stokes["flags"]) == 0]
    out: dict = {}
    arts = sim.artifacts
    refl = arts[np.isin(np.asarray(arts["kind"]), ["streak", "ghost"])] if len(arts) else arts
    ny, nx = mask.shape
    if len(refl):
        ix = np.clip(np.round(np.asarray(refl["x"])).astype(int), 0, nx - 1)
        iy = np.clip(np.round(np.asarray(refl["y"])).astype(int), 0, ny - 1)
        out["artifacts"] = len(refl)
        out["artifacts_caught"] = int(np.count_nonzero(mask[iy, ix]))
    else:
        out["artifacts"] = out["artifacts_caught"] = 0

    # Each detection is counted once: a star-spot detection lies within match_radius of a
    # simulated star spot (several true spots may share one detection in a blend).
    truth_spots = sim.spots[~np.asarray(sim.spots["is_artifact"], bool)]
    out["star_spots_simulated"] = len(truth_spots)
    if len(spots) and len(truth_spots):
        tree = cKDTree(np.column_stack([truth_spots["x"], truth_spots["y"]]))
        dist, _ = tree.query(np.column_stack([spots["x"], spots["y"]]))
        on_star = dist <= match_radius
        out["star_spots_detected"] = int(on_star.sum())
        out["star_spots_rejected"] = int(np.asarray(spots["rejected"])[on_star].sum())
    else:
        out["star_spots_detected"] = out["star_spots_rejected"] = 0

    stars = sim.stars
    complete = stars[np.asarray(stars["complete"], bool) & ~np.asarray(stars["saturated"], bool)]
    out["stars_complete"] = len(complete)
    if len(stokes) and len(complete):
        tree = cKDTree(np.column_stack([complete["x"], complete["y"]]))
        dist, idx = tree.query(np.column_stack([stokes["x"], stokes["y"]]))
        ok = dist <= match_radius
        out["stars_measured"] = int(ok.sum())
        truth = complete[idx[ok]]
        pq = (np.asarray(stokes["q"])[ok] - truth["q"]) / np.asarray(stokes["q_err"])[ok]
        pu = (np.asarray(stokes["u"])[ok] - truth["u"]) / np.asarray(stokes["u_err"])[ok]
        out.update(pull_q_mean=float(np.mean(pq)), pull_q_std=float(np.std(pq)),
                   pull_u_mean=float(np.mean(pu)), pull_u_std=float(np.std(pu)))
    else:
        out["stars_measured"] = 0
    return out


def run_demo(outdir: str | Path = "robopol-demo", *, seed: int = 2026, n_stars: int = 600,
             classifier: str = "cnn") -> str:
    """Simulate a RoboPol frame, reduce it, write all products, and report.

    Writes ``demo_input.fits`` and its truth tables, the four products of
    ``robopol-clean reduce``, and ``demo_input_diagnostic.png`` into ``outdir``
    (replacing a previous demo there).

    Returns
    -------
    str
        A short human-readable summary of :func:`demo_numbers`.
    """
    c = demo_numbers(outdir, seed=seed, n_stars=n_stars, classifier=classifier)
    lines = [
        f"robopol-clean demo (simulated RoboPol frame, seed {seed}, {n_stars} stars; "
        f"classifier: {c['classifier']})",
        f"  simulated in {c['simulate_seconds']:.1f} s, reduced in {c['reduce_seconds']:.1f} s",
        f"  spots detected:        {c['n_spots']} ({c['star_spots_detected']} on the "
        f"{c['star_spots_simulated']} simulated star spots)",
        f"  rejected as artifacts: {c['n_rejected']}  (uncertain: {c['n_uncertain']})",
        f"  reflections caught:    {c['artifacts_caught']} of {c['artifacts']} in the truth table",
        f"  star spots rejected:   {c['star_spots_rejected']} of those {c['star_spots_detected']}",
        f"  quadruplets:           {c['n_quadruplets']} complete, {c['n_stokes']} with q, u, "
        f"{c['n_clean']} of them clean (flags == 0)",
    ]
    if "pull_q_std" in c:
        lines.append(f"  pulls (q, u):          mean {c['pull_q_mean']:+.2f}, {c['pull_u_mean']:+.2f}; "
                     f"std {c['pull_q_std']:.2f}, {c['pull_u_std']:.2f} over {c['stars_measured']} stars")
    lines.append(f"  products in {c['outdir']}/:")
    lines.extend(f"    {Path(p).name}" for p in c["products"])
    return "\n".join(lines)


def demo_numbers(outdir: str | Path = "robopol-demo", *, seed: int = 2026, n_stars: int = 600,
                 classifier: str = "cnn") -> dict:
    """The demo's run (as :func:`run_demo`) and its numbers.

    Returns
    -------
    dict
        The frame's counts (``n_spots``, ``n_rejected``, ``n_uncertain``,
        ``n_quadruplets``, ``n_stokes``, ``n_clean``), :func:`compare_with_truth`'s
        numbers, ``simulate_seconds`` and ``reduce_seconds`` (s), ``classifier``,
        ``seed``, ``n_stars``, ``outdir`` and the ``products`` written.
    """
    from .pipeline import reduce_frame
    from .products import write_products

    outdir = check_writable(outdir)
    t0 = time.perf_counter()
    sim = simulate_frame("robopol", seed=seed, n_stars=n_stars)
    t_sim = time.perf_counter() - t0
    stem = "demo_input"
    write_atomic(outdir / f"{stem}.fits", lambda p: sim.ccd.write(p, format="fits", overwrite=True),
                 overwrite=True)
    for kind, path in truth_paths(outdir, stem).items():
        write_ecsv(getattr(sim, kind), path, overwrite=True)
    t1 = time.perf_counter()
    result = reduce_frame(sim.ccd, profile="robopol", classifier=classifier, name=f"{stem}.fits")
    t_red = time.perf_counter() - t1
    paths = write_products(result, outdir, stem, overwrite=True, diagnostic=True)
    m = result.meta
    out = {key: m[key] for key in ("n_spots", "n_rejected", "n_uncertain", "n_quadruplets",
                                   "n_stokes", "n_clean")}
    out.update(compare_with_truth(result, sim))
    out.update(simulate_seconds=t_sim, reduce_seconds=t_red,
               classifier=m["classifier"].get("name"), seed=seed, n_stars=n_stars,
               outdir=str(outdir), products=[str(p) for p in paths.values()])
    return out
