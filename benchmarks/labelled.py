"""The labelled held-out spots shared by the classifier benchmarks.

Frames are simulated with the seeds of the registry (:mod:`seeds`; disjoint from the
CNN's training frames and from every tuning set): ``benchmark_test`` (10_000-10_007) for
the test frames, ``benchmark_train`` (20_000-20_007) for the frames the benchmark's own
models are trained on; quick runs take the first of each. They are reduced by the real
pipeline, and every detected spot is labelled from the truth tables by the rule the
CNN's training labels follow (:func:`robopol_clean.datasets.match_detections`).
One pass per frame computes every score the benchmarks compare, on exactly the
pipeline's detections and cutouts:

- ``p_morph`` (morphology alone) and ``p_morph_orphan`` (+ the partner cues, the
  package's classical classifier :class:`robopol_clean.classify.MorphologyClassifier`);
- ``p_orphan`` and ``partner_support``, the partner cues alone
  (:func:`robopol_clean.classify.partner_evidence`);
- ``p_cnn`` and ``p_cnn_orphan`` (+ the partner cues: the pipeline default) from the
  shipped CNN, when it exists;
- DAOStarFinder's ``dao_sharpness``, ``dao_roundness1``, ``dao_roundness2`` measured
  at each detected position (photutils ``xycoords``) on the background-subtracted frame;
- the detection columns (features for the random forest);
- optionally the normalised 64 x 64 cutouts (for training the CNN variants).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from _common import REFLECTION_KINDS, Context, load_default_classifier, log
from astropy.table import Table, vstack
from scipy.spatial import cKDTree
from seeds import SEEDS

__all__ = ["LabelledSet", "labelled_set", "dao_measure"]

#: Spot features given to the random forest (detection + grouping + partner cues).
FEATURES = ("elongation", "rel_fwhm", "sharpness", "asymmetry", "log_snr", "log_peak",
            "rel_npix", "transmission", "saturated", "p_orphan", "partner_support", "grouped")


@dataclass
class LabelledSet:
    """Scores, features and labels of labelled detections from several frames."""

    table: Table                 # one row per labelled detection
    cutouts: np.ndarray | None   # (n, 64, 64) float32 normalised, or None
    seeds: list[int]
    shape: tuple[int, int]
    seconds: float

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.table["label"], int)

    @property
    def reflection(self) -> np.ndarray:
        return np.isin(np.asarray(self.table["kind"]).astype(str), REFLECTION_KINDS)


def dao_measure(data: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> Table:
    """DAOStarFinder sharpness and roundness at given positions (no cuts applied).

    Spots DAOStarFinder cannot measure (its convolved peak is not positive) get NaN.
    """
    from photutils.detection import DAOStarFinder

    n = len(x)
    out = Table({"dao_sharpness": np.full(n, np.nan), "dao_roundness1": np.full(n, np.nan),
                 "dao_roundness2": np.full(n, np.nan)})
    if n == 0:
        return out
    xy = np.column_stack([x, y])
    kw = dict(xycoords=xy, min_separation=0.0, exclude_border=False)
    try:  # photutils >= 3: ranges; None disables the cuts
        finder = DAOStarFinder(threshold=1e-9, fwhm=fwhm, sharpness_range=None,
                               roundness_range=None, **kw)
    except TypeError:  # photutils 2
        finder = DAOStarFinder(1e-9, fwhm, sharplo=-np.inf, sharphi=np.inf,
                               roundlo=-np.inf, roundhi=np.inf, **kw)
    found = finder(np.asarray(data, float))
    if found is None or len(found) == 0:
        return out
    xc = "x_centroid" if "x_centroid" in found.colnames else "xcentroid"
    yc = "y_centroid" if "y_centroid" in found.colnames else "ycentroid"
    d, i = cKDTree(np.column_stack([found[xc], found[yc]])).query(xy, distance_upper_bound=3.0)
    ok = np.isfinite(d)
    for src, dst in (("sharpness", "dao_sharpness"), ("roundness1", "dao_roundness1"),
                     ("roundness2", "dao_roundness2")):
        vals = np.asarray(found[src], float)
        out[dst][ok] = vals[i[ok]]
    return out


def _make_scorer(cnn, keep_cutouts: bool):
    """A SpotClassifier that records every score; decides with morphology + partner cues."""
    from robopol_clean.classify import (
        SpotClassifier,
        combine_evidence,
        morphology_score,
        partner_evidence,
    )

    class AllScores(SpotClassifier):
        name = "bench-all-scores"

        def __init__(self):
            self.last_cutouts = None

        def score(self, scene):
            ev = partner_evidence(scene)
            p_morph = np.asarray(morphology_score(scene.spots, scene.fwhm)["p_morph"], float)
            out = Table({"p_morph": p_morph, "p_orphan": np.asarray(ev.p_orphan, float),
                         "partner_support": np.asarray(ev.support, bool),
                         "p_morph_orphan": combine_evidence(p_morph, ev)})
            if cnn is not None:
                p = cnn.predict_spots(scene.data, scene.spots, background_subtracted=True, fwhm=scene.fwhm)
                out["p_cnn"] = p
                out["p_cnn_orphan"] = combine_evidence(p, ev)
            dao = dao_measure(scene.data, np.asarray(scene.spots["x"], float),
                              np.asarray(scene.spots["y"], float), scene.fwhm)
            for c in dao.colnames:
                out[c] = dao[c]
            out["frame_fwhm"] = np.full(len(out), float(scene.fwhm))
            if keep_cutouts:
                from robopol_clean.classify.cnn import spot_cutouts

                norm = {} if cnn is None else {"version": cnn.normalisation_version,
                                               "params": cnn.normalisation}
                self.last_cutouts = spot_cutouts(scene.data, scene.spots, background_subtracted=True,
                                                 fwhm=scene.fwhm, **norm)
            out["p_artifact"] = out["p_morph_orphan"]
            return out

    return AllScores()


def _frame(seed: int):
    """A full RoboPol frame (the star count drawn) with 6-16 reflection sources.

    Full frames, not detector regions: the pipeline reads pixel (0, 0) as detector
    pixel (0, 0) (it does not use DETX0/DETY0), so a region at another origin would be
    reduced with a misplaced geometry and mask.
    """
    from robopol_clean.simulate import simulate_frame

    rng = np.random.default_rng(seed)
    return simulate_frame("robopol", seed=seed, n_artifact_sources=int(rng.integers(6, 17)))


def labelled_set(ctx: Context, which: str, *, keep_cutouts: bool = False) -> LabelledSet:
    """The 'test' or 'train' labelled detections (cached; seeds ``SEEDS["benchmark_<which>"]``).

    CNN scores are included when the shipped model exists.
    """
    from robopol_clean.datasets import match_detections, truth_table
    from robopol_clean.pipeline import added_by_photometry, reduce_frame

    key = ("labelled", which)
    cached = ctx.cache.get(key)
    if cached is not None and (cached.cutouts is not None or not keep_cutouts):
        return cached
    clf, clf_name, _, _ = load_default_classifier(ctx)
    cnn = clf if clf_name == "cnn" else None
    seeds = SEEDS[f"benchmark_{which}"].frames(1 if ctx.quick else None)
    scorer = _make_scorer(cnn, keep_cutouts)
    tables, cuts = [], []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        sim = _frame(seed)
        shape = sim.ccd.shape
        res = reduce_frame(sim.ccd, classifier=scorer, name=f"seed{seed}")
        sp = res.spots[~added_by_photometry(res.spots)]  # the detections the classifier scored
        labels, kinds, _ = match_detections(sp, truth_table(sim))
        keep = labels >= 0
        fw = float(res.meta["fwhm"])
        t = Table({
            "seed": np.full(keep.sum(), seed), "x": np.asarray(sp["x"], float)[keep],
            "y": np.asarray(sp["y"], float)[keep], "label": labels[keep], "kind": kinds[keep],
            "elongation": np.asarray(sp["elongation"], float)[keep],
            "rel_fwhm": np.asarray(sp["fwhm"], float)[keep] / fw,
            "sharpness": np.asarray(sp["sharpness"], float)[keep],
            "asymmetry": np.asarray(sp["asymmetry"], float)[keep],
            "snr": np.asarray(sp["snr"], float)[keep],
            "usable": np.asarray(sp["usable"], bool)[keep],
            "log_snr": np.log10(np.maximum(np.asarray(sp["snr"], float)[keep], 1e-3)),
            "log_peak": np.log10(np.maximum(np.asarray(sp["peak"], float)[keep], 1e-3)),
            "rel_npix": np.asarray(sp["npix"], float)[keep] / fw**2,
            "transmission": np.asarray(sp["transmission"], float)[keep],
            "saturated": np.asarray(sp["saturated"], float)[keep],
            "grouped": (np.asarray(sp["group_id"]) >= 0).astype(float)[keep],
        })
        for c in ("p_morph", "p_orphan", "partner_support", "p_morph_orphan", "p_cnn", "p_cnn_orphan",
                  "dao_sharpness", "dao_roundness1", "dao_roundness2"):
            if c in sp.colnames:
                t[c] = np.asarray(sp[c], float)[keep]
        tables.append(t)
        if keep_cutouts:
            cuts.append(scorer.last_cutouts[keep])
        log(f"{which} frame {i + 1}/{len(seeds)} (seed {seed}): {len(sp)} spots, "
            f"{int((labels == 1).sum())} artifacts, {int((labels == 0).sum())} stars labelled")
    out = LabelledSet(vstack(tables, metadata_conflicts="silent"),
                      np.concatenate(cuts) if keep_cutouts else None, seeds, shape,
                      time.perf_counter() - t0)
    ctx.cache[key] = out
    return out
