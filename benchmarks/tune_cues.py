"""Tune the partner-cue tolerances (``CueConfig``) on frames of their own.

    python benchmarks/tune_cues.py               # 16 frames, full grid (~2 min on 2 cores)
    python benchmarks/tune_cues.py --quick       # 4 frames, 9 settings (~10 s)
    python benchmarks/tune_cues.py --frames 8 --classifier morphology

Frames: the registry's cue-tuning seeds (:mod:`seeds`, ``SEEDS["cue_tuning"]``,
90 000-90 015), which no benchmark evaluates and no model learns from; full 2048 x 2048
RoboPol frames with 500 stars and 12 reflection sources each, made like the Stokes
benchmark's (``simulate_frame("robopol", seed=s, n_stars=500, n_artifact_sources=12)``).

Each frame is reduced once up to the scores (:func:`robopol_clean.pipeline.clean_artifacts`:
background, detection, grouping, classifier) with the classifier wrapped so that its
:class:`~robopol_clean.classify.FrameScene` and its own learned score (``p_cnn`` or
``p_morph``) are kept. The detections are labelled from the truth
(:func:`~robopol_clean.datasets.match_detections` on
:func:`~robopol_clean.datasets.truth_table`: star spots 0; streaks, ghosts and cosmic
rays 1; the rest left out). For every setting, the partner evidence is recomputed on the
same scene with that ``CueConfig`` (:func:`~robopol_clean.classify.partner_evidence`) and
combined with the learned score (:func:`~robopol_clean.classify.combine_evidence`); with
the defaults this reproduces the pipeline's ``p_artifact`` exactly (checked).

Objective, on the labelled detections of all frames pooled: the recall on reflection
artifacts (streaks and ghosts) when the threshold rejects at most 0.1 % of the star
spots; ties are broken by the ROC AUC (all artifacts vs star spots). Shown besides, at the
pipeline's threshold (``ReductionConfig.threshold``): the fraction of reflections with
S/N >= 5 rejected and of star spots with S/N >= 10 rejected (the CNN issue's targets).

Noise: the objective's difference between the best setting and the defaults is
bootstrapped over frames (1000 resamples of the frames with replacement, both settings
on each resample). The defaults are within noise of the best when that difference is at
most twice its bootstrap standard deviation. The best of many settings is picked on the
same frames, so its lead is optimistic.

Settings: every combination of :data:`GRID` (the four tolerances that shape the orphan
cue), then each other tolerance in :data:`ONE_AT_A_TIME` varied alone; ``--quick``:
:data:`QUICK_GRID`. The defaults are always evaluated.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, replace

import numpy as np
from _common import (
    REFLECTION_KINDS,
    Context,
    Timer,
    _text_table,
    fmt,
    load_default_classifier,
    log,
    plural,
    recall_at_frr,
    roc_auc,
    seeds_text,
)
from seeds import SEEDS

from robopol_clean.classify import SpotClassifier
from robopol_clean.config import CueConfig, ReductionConfig
from robopol_clean.evaluation import ARTIFACT_SNR_MIN, STAR_SNR_MIN

#: Stars and reflection sources per frame (as the Stokes benchmark's frames).
N_STARS, N_SOURCES = 500, 12
#: The objective's false-rejection rate: fraction of star spots rejected.
TARGET_FRR = 0.001
#: Every combination of these is evaluated (the defaults are among the values).
GRID = {
    "orphan_z_half": (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5),
    "orphan_z_width": (2.0, 3.0, 4.0),
    "missing_half": (0.1, 0.2, 0.3),
    "same_pair_min_ratio": (0.4, 0.5, 0.6, 0.7),
}
#: Each of these is varied alone, the others at their defaults.
ONE_AT_A_TIME = {
    "other_pair_tolerance": (0.5, 0.7),
    "other_pair_fallback_ratio": (0.15, 0.35),
    "missing_width": (0.1, 0.3),
    "support_min_snr": (3.0, 7.0),
    "support_keep": (0.25, 0.5),
}
#: The grid of ``--quick``.
QUICK_GRID = {"orphan_z_half": (3.0, 3.5, 4.0), "missing_half": (0.1, 0.2, 0.3)}
#: Frames of ``--quick``; bootstrap resamples.
QUICK_FRAMES, N_BOOTSTRAP = 4, 1000
#: The learned score each classifier reports beside ``p_artifact``.
LEARNED = {"cnn": "p_cnn", "morphology": "p_morph"}


@dataclass
class FrameScores:
    """One frame's labelled detections and their ``p_artifact`` under every setting."""

    label: np.ndarray        # 1 artifact, 0 star spot
    reflection: np.ndarray   # a streak or a ghost
    snr: np.ndarray
    p: np.ndarray            # (n_settings, n_detections)


class _KeepScene(SpotClassifier):
    """Scores with another classifier and keeps the frame's scene and scores."""

    def __init__(self, inner: SpotClassifier):
        self.inner, self.name = inner, inner.name
        self.scene = self.scores = None

    def score(self, scene):
        self.scene, self.scores = scene, self.inner.score(scene)
        return self.scores


def settings(quick: bool) -> list[CueConfig]:
    """The cue settings to evaluate, the defaults first, no duplicates."""
    default = CueConfig()
    grid = QUICK_GRID if quick else GRID
    out = [default] + [replace(default, **dict(zip(grid, values)))
                       for values in itertools.product(*grid.values())]
    if not quick:
        out += [replace(default, **{name: v}) for name, values in ONE_AT_A_TIME.items()
                for v in values]
    return list(dict.fromkeys(out))


def label(cues: CueConfig) -> str:
    """A setting as its differences from the defaults."""
    diff = cues.non_default()
    return ", ".join(f"{k} {v:g}" for k, v in diff.items()) if diff else "defaults"


def score_frame(seed: int, clf: SpotClassifier, learned: str, cues: list[CueConfig]) -> FrameScores:
    """Simulate one tuning frame, reduce it up to the scores once, and score its
    labelled detections under every cue setting (``cues[0]`` must be the defaults)."""
    from robopol_clean.classify import combine_evidence, partner_evidence
    from robopol_clean.datasets import match_detections, truth_table
    from robopol_clean.pipeline import clean_artifacts
    from robopol_clean.simulate import simulate_frame

    sim = simulate_frame("robopol", seed=seed, n_stars=N_STARS, n_artifact_sources=N_SOURCES)
    keep = _KeepScene(clf)
    clean_artifacts(sim.ccd, classifier=keep, add_keyword=False)
    scene, scores = keep.scene, keep.scores
    labels, kinds, _ = match_detections(scene.spots, truth_table(sim))
    sel = labels >= 0
    p_learned = np.asarray(scores[learned], float)
    p = np.stack([combine_evidence(p_learned, partner_evidence(replace(scene, cues=c)))[sel]
                  for c in cues])
    if not np.array_equal(p[0], np.asarray(scores["p_artifact"], float)[sel]):
        raise RuntimeError("the default cues do not reproduce the classifier's p_artifact")
    return FrameScores(labels[sel], np.isin(kinds[sel], REFLECTION_KINDS),
                       np.asarray(scene.spots["snr"], float)[sel], p)


def _pooled(frames: list[FrameScores], k: int, pick=None):
    fs = frames if pick is None else [frames[i] for i in pick]
    return (np.concatenate([f.label for f in fs]), np.concatenate([f.reflection for f in fs]),
            np.concatenate([f.snr for f in fs]), np.concatenate([f.p[k] for f in fs]))


def objective(frames: list[FrameScores], k: int, pick=None) -> float:
    """Recall on reflections at a false-rejection rate <= :data:`TARGET_FRR`, setting ``k``."""
    y, refl, _, s = _pooled(frames, k, pick)
    return recall_at_frr(y, s, TARGET_FRR, subset=refl)[0]


def metrics(frames: list[FrameScores], k: int, threshold: float) -> dict:
    """Objective, ROC AUC and the rates at ``threshold`` of setting ``k``."""
    y, refl, snr, s = _pooled(frames, k)
    rejected = s >= threshold
    return {"recall": objective(frames, k), "auc": roc_auc(y, s),
            "reflections_rejected": float(rejected[refl & (snr >= ARTIFACT_SNR_MIN)].mean()),
            "stars_rejected": float(rejected[(y == 0) & (snr >= STAR_SNR_MIN)].mean())}


def bootstrap_difference(frames: list[FrameScores], a: int, b: int, n: int = N_BOOTSTRAP,
                         seed: int = 0) -> np.ndarray:
    """Objective of setting ``a`` minus setting ``b`` on ``n`` resamples of the frames."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(frames), (n, len(frames)))
    return np.array([objective(frames, a, pick) - objective(frames, b, pick) for pick in picks])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_FRAMES} frames and the small grid")
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help=f"number of tuning frames (default {SEEDS['cue_tuning'].n}; "
                             f"quick {QUICK_FRAMES})")
    parser.add_argument("--classifier", choices=("default", "morphology"), default="default",
                        help="the learned score: the default classifier (the shipped CNN) "
                             "or the classical morphology score")
    parser.add_argument("--top", type=int, default=10, help="grid rows shown (default 10)")
    args = parser.parse_args(argv)

    n_frames = args.frames if args.frames is not None else QUICK_FRAMES if args.quick else None
    try:
        seeds = SEEDS["cue_tuning"].frames(n_frames)
    except ValueError as exc:
        parser.error(str(exc))
    if args.classifier == "morphology":
        from robopol_clean.pipeline import get_classifier

        clf, name = get_classifier("morphology"), "morphology"
    else:
        clf, name, _, why = load_default_classifier(Context(quick=args.quick))
        if why:
            log(why)
    cues = settings(args.quick)
    threshold = ReductionConfig().threshold
    log(f"{plural(len(seeds), 'frame')} ({seeds_text(seeds)}), {plural(len(cues), 'setting')}, "
        f"classifier {name}")
    frames = []
    with Timer() as t:
        for i, seed in enumerate(seeds):
            frames.append(score_frame(seed, clf, LEARNED[name], cues))
            log(f"frame {i + 1}/{len(seeds)} (seed {seed}): "
                f"{frames[-1].label.size} labelled detections")

    results = [metrics(frames, k, threshold) for k in range(len(cues))]
    order = sorted(range(len(cues)), key=lambda k: (results[k]["recall"], results[k]["auc"]),
                   reverse=True)
    best = order[0]
    y, refl, snr, _ = _pooled(frames, 0)
    n_star, n_refl = int((y == 0).sum()), int(refl.sum())
    print(f"Partner-cue tuning: {plural(len(seeds), 'frame')} ({seeds_text(seeds)}; "
          f"{N_STARS} stars, {N_SOURCES} reflection sources each), classifier {name} + cues, "
          f"{t.s:.0f} s")
    print(f"{y.size} labelled detections: {n_star} star spots, {int(y.sum())} artifacts, "
          f"{n_refl} of them reflections ({int((refl & (snr >= ARTIFACT_SNR_MIN)).sum())} with "
          f"S/N >= {ARTIFACT_SNR_MIN:g}); {TARGET_FRR:.1%} of the star spots = "
          f"{int(np.floor(TARGET_FRR * n_star + 1e-9))} spots\n")

    grid_rows = order[:args.top] + ([0] if 0 not in order[:args.top] else [])
    alone = [k for k in range(len(cues)) if k not in grid_rows and len(cues[k].non_default()) == 1
             and next(iter(cues[k].non_default())) in ONE_AT_A_TIME]
    columns = ["setting", "rank", f"reflection recall @ FRR <= {TARGET_FRR:.1%}", "ROC AUC",
               f"reflections S/N>={ARTIFACT_SNR_MIN:g} rejected @ {threshold:g}",
               f"stars S/N>={STAR_SNR_MIN:g} rejected @ {threshold:g}"]
    rank = {k: r + 1 for r, k in enumerate(order)}

    def row(k):
        m = results[k]
        return [label(cues[k]), str(rank[k]), f"{100 * m['recall']:.2f} %", fmt(m["auc"], 4),
                f"{100 * m['reflections_rejected']:.2f} %", f"{100 * m['stars_rejected']:.3f} %"]

    print("\n".join(_text_table(columns, [row(k) for k in grid_rows + alone])))

    diff = bootstrap_difference(frames, best, 0)
    d, sd = results[best]["recall"] - results[0]["recall"], float(np.std(diff))
    se_recall = np.sqrt(results[0]["recall"] * (1 - results[0]["recall"]) / max(n_refl, 1))
    top = [cues[k] for k in range(len(cues)) if results[k]["recall"] == results[best]["recall"]]
    print(f"\nbest: {label(cues[best])} ({len(top)} of {len(cues)} settings reach its recall)")
    print("values among those: " + "; ".join(
        f"{name} " + ", ".join(f"{v:g}" for v in sorted({getattr(c, name) for c in top}))
        for name in (QUICK_GRID if args.quick else GRID)))
    print(f"best - defaults: {100 * d:+.2f} % reflection recall, bootstrap sd {100 * sd:.2f} % "
          f"(over frames; best ahead in {100 * np.mean(diff > 0):.0f} % of resamples); "
          f"recall's binomial sd {100 * se_recall:.2f} %")
    within = d <= 2 * sd
    print("the defaults are " + ("within noise of the best (difference <= 2 sd): the tuning "
                                 "supports them" if within else
                                 "NOT within noise of the best (difference > 2 sd)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
