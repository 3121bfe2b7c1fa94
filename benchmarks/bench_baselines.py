"""Classical baselines vs the CNN on the same held-out spots.

    python benchmarks/run.py --only baselines [--quick]

Every method scores the same labelled detections of held-out simulated frames (see
:mod:`labelled`): artifacts (reflection streaks and ghosts, cosmic rays) = 1, star
spots = 0. Reported: ROC AUC (all labelled detections / those in the profile's usable
region, where quadruplets are measured), the recall on artifacts (and on reflections
alone) at the false-rejection rate (fraction of star spots rejected) of the reference
operating point -- the shipped CNN + partner cues at its threshold, or, while no CNN is
shipped, the morphology + partner cues classifier at 0.5 -- and, at each method's own
cut, the issue's target quantities: recall on reflections with S/N >= 5 and false
rejection of star spots with S/N >= 10 (all / usable region).

Methods:

- morphology: :class:`robopol_clean.classify.MorphologyClassifier` without and with the
  partner cues; the partner cues alone (``p_orphan``: missing partners);
- DAOStarFinder: sharpness and roundness (photutils ``sharpness_range`` /
  ``roundness_range``); score = how far outside a box around the star locus the spot
  lies, ``max(|roundness1|, |roundness2|, |sharpness - 0.6| / 0.4)``, so that score > 1 is
  exactly photutils' default cut (sharpness in [0.2, 1], roundness in [-1, 1]); sweeping
  the threshold scales the box. Spots DAOStarFinder cannot measure count as rejected;
- random forest (scikit-learn, benchmark-only) on the detection columns (elongation,
  FWHM / frame FWHM, sharpness, asymmetry, log SNR, log peak, footprint size,
  transmission, saturated, grouped, partner cues), trained on other frames
  (``SEEDS["benchmark_train"]`` of the registry :mod:`seeds`, 20_000-20_007; the test
  frames are ``SEEDS["benchmark_test"]``, 10_000-10_007);
- the shipped CNN, alone and with the partner cues (when the model exists).
"""

from __future__ import annotations

import numpy as np
from _common import (
    Context,
    Section,
    Timer,
    fmt,
    load_default_classifier,
    log,
    plural,
    recall_at_frr,
    roc_auc,
    seeds_text,
)
from labelled import FEATURES, labelled_set

from robopol_clean.evaluation import ARTIFACT_SNR_MIN, STAR_SNR_MIN

KEY = "baselines"
TITLE = "Classical baselines vs the CNN on held-out detections"


def dao_score(table) -> np.ndarray:
    """Distance outside the DAOFIND star box; > 1 = rejected by photutils' default cuts."""
    s = np.asarray(table["dao_sharpness"], float)
    r1 = np.asarray(table["dao_roundness1"], float)
    r2 = np.asarray(table["dao_roundness2"], float)
    v = np.maximum.reduce([np.abs(r1), np.abs(r2), np.abs(s - 0.6) / 0.4])
    return np.where(np.isfinite(v), v, np.inf)


def _features(table) -> np.ndarray:
    x = np.column_stack([np.asarray(table[f], float) for f in FEATURES])
    return np.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    clf, clf_name, _, why = load_default_classifier(ctx)
    cnn = clf if clf_name == "cnn" else None
    want_cutouts = "cnn_cost" in ctx.cache.get("sections", ())
    test = labelled_set(ctx, "test", keep_cutouts=want_cutouts)
    t = test.table
    y = test.labels
    refl = test.reflection
    kinds, counts = np.unique(np.asarray(t["kind"]).astype(str), return_counts=True)
    n_star, n_art = int((y == 0).sum()), int((y == 1).sum())

    methods: list[tuple[str, np.ndarray | None, float | None, str | None]] = [
        ("morphology", np.asarray(t["p_morph"]), 0.5, None),
        ("partner cues alone (orphan)", np.asarray(t["p_orphan"]), 0.5, None),
        ("morphology + partner cues", np.asarray(t["p_morph_orphan"]), 0.5, None),
        ("DAOStarFinder sharpness/roundness", dao_score(t), 1.0, None),
    ]
    # Random forest on hand-made features, trained on other frames.
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError:
        methods.append(("random forest (features)", None, None,
                        "scikit-learn not installed (pip install scikit-learn)"))
    else:
        train = labelled_set(ctx, "train", keep_cutouts=want_cutouts)
        with Timer() as tt:
            rf = RandomForestClassifier(n_estimators=300, min_samples_leaf=2, class_weight="balanced",
                                        random_state=0, n_jobs=1)
            rf.fit(_features(train.table), train.labels)
        p_rf = rf.predict_proba(_features(t))[:, 1]
        methods.append(("random forest (features)", p_rf, 0.5, None))
        imp = sorted(zip(rf.feature_importances_, FEATURES), reverse=True)[:4]
        sec.notes.append(f"random forest: 300 trees, trained in {tt.s:.1f} s on {len(train.table)} "
                         f"spots of {plural(len(train.seeds), 'other frame')} ({seeds_text(train.seeds)}); "
                         "top features "
                         + ", ".join(f"{n} {v:.2f}" for v, n in imp))
    if cnn is not None:
        thr = float(getattr(cnn, "threshold", 0.5))
        methods.append(("CNN", np.asarray(t["p_cnn"]), thr, None))
        methods.append(("CNN + partner cues (pipeline default)", np.asarray(t["p_cnn_orphan"]), thr, None))
        ref_name, ref_scores, ref_thr = methods[-1][0], methods[-1][1], thr
    else:
        methods.append(("CNN", None, None, why or "model not available"))
        ref_name, ref_scores, ref_thr = methods[2][0], methods[2][1], 0.5
    frr = float(np.mean(ref_scores[y == 0] >= ref_thr))
    snr = np.asarray(t["snr"], float)
    usable = np.asarray(t["usable"], bool)
    bright_refl = refl & (snr >= ARTIFACT_SNR_MIN)
    bright_star = (y == 0) & (snr >= STAR_SNR_MIN)

    def both(f, digits=3):
        return f"{fmt(f(np.ones_like(usable)), digits)} / {fmt(f(usable), digits)}"

    sec.columns = ["method", "ROC AUC (all / usable)", f"recall @ FRR {100 * frr:.1f}%",
                   "reflections @ same FRR", f"own cut: reflections S/N>={ARTIFACT_SNR_MIN:g} recall",
                   f"own cut: stars S/N>={STAR_SNR_MIN:g} FRR"]
    results = {}
    for name, scores, thr, note in methods:
        if scores is None:
            sec.rows.append([name, "not available", "-", "-", "-", "-"])
            sec.notes.append(f"{name}: {note}")
            results[name] = {"available": False, "why": note}
            continue
        auc = roc_auc(y, scores)
        rec, at = recall_at_frr(y, scores, frr)
        rec_refl, _ = recall_at_frr(y, scores, frr, subset=refl)
        own_rec = float(np.mean(scores[y == 1] >= thr))
        own_frr = float(np.mean(scores[y == 0] >= thr))

        def auc_in(region, scores=scores):
            return roc_auc(y[region], scores[region])

        def refl_recall(region, scores=scores, thr=thr):
            return float(np.mean(scores[bright_refl & region] >= thr))

        def star_frr(region, scores=scores, thr=thr):
            return float(np.mean(scores[bright_star & region] >= thr))

        sec.rows.append([name, both(auc_in, 4), fmt(rec), fmt(rec_refl), both(refl_recall), both(star_frr)])
        results[name] = {"available": True, "auc": auc, "auc_usable": auc_in(usable),
                         "recall_at_ref_frr": rec,
                         "reflection_recall_at_ref_frr": rec_refl, "threshold_at_ref_frr": at,
                         "own_threshold": thr, "own_recall": own_rec, "own_frr": own_frr,
                         "own_reflection_recall_snr5": refl_recall(np.ones_like(usable)),
                         "own_reflection_recall_snr5_usable": refl_recall(usable),
                         "own_star_frr_snr10": star_frr(np.ones_like(usable)),
                         "own_star_frr_snr10_usable": star_frr(usable)}
    sec.notes.insert(0, f"{len(t)} labelled detections from "
                     f"{plural(len(test.seeds), 'held-out frame')} of {test.shape[1]}x{test.shape[0]} "
                     f"({seeds_text(test.seeds)}, 6-16 reflection sources each): "
                     f"{n_star} star spots, {n_art} artifacts ("
                     + ", ".join(f"{k} {c}" for k, c in zip(kinds, counts) if k != "star") + "); "
                     f"{int(bright_refl.sum())} reflections with S/N >= {ARTIFACT_SNR_MIN:g} "
                     f"({int((bright_refl & usable).sum())} in the usable region), "
                     f"{int(bright_star.sum())} star spots with S/N >= {STAR_SNR_MIN:g} "
                     f"({int((bright_star & usable).sum())} in the usable region)")
    sec.notes.insert(1, f"reference false-rejection rate (FRR, star spots rejected) "
                     f"{100 * frr:.2f}% = {ref_name} at threshold {ref_thr:g}"
                     + ("" if cnn is not None else " (no CNN model yet)"))
    dao_missing = ~np.isfinite(dao_score(t))
    sec.notes.append("DAOStarFinder score = max(|roundness1|, |roundness2|, |sharpness-0.6|/0.4); "
                     "own cut = photutils defaults (sharpness_range=(0.2, 1), roundness_range=(-1, 1)); "
                     f"it could not measure {100 * np.mean(dao_missing[y == 0]):.1f}% of the star spots "
                     f"and {100 * np.mean(dao_missing[y == 1]):.1f}% of the artifacts (counted as rejected)")
    sec.data = {"n_spots": len(t), "n_stars": n_star, "n_artifacts": n_art,
                "kinds": dict(zip(kinds.tolist(), counts.tolist())), "seeds": test.seeds,
                "reference": {"method": ref_name, "threshold": ref_thr, "frr": frr},
                "methods": results, "labelled_set_seconds": test.seconds}
    log(f"baselines: {len(t)} spots scored")
    return sec
