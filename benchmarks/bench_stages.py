"""Where the time goes: per-stage profile of one full RoboPol frame.

    python benchmarks/run.py --only stages [--quick]
    python benchmarks/bench_stages.py [--n-stars 800] [--repeat 3] [--classifier cnn]

One simulated 2048 x 2048 frame with ~800 stars (seeded) is written to a temporary
FITS file, then read with :func:`robopol_clean.io.read_frame`, reduced with
:func:`robopol_clean.pipeline.reduce_frame` (its ``meta['timings']``: background,
detection, grouping, classification = cutouts + network/morphology + partner cues,
masking, photometry, Stokes) and written with
:func:`robopol_clean.products.write_products` (no diagnostic PNG). The classifier is
loaded once beforehand (its load time is reported separately). The full run reduces
once to warm up, then ``repeat`` times, and reports the median of each stage; the
quick run reduces once, cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Context, Section, Timer, load_default_classifier, log  # noqa: E402

KEY = "stages"
TITLE = "Stage profile: one 2048x2048 frame with ~800 stars"

#: Report order of the pipeline's own timings.
PIPELINE_STAGES = ("background", "detection", "grouping", "classification", "masking",
                   "photometry", "stokes")


def profile_frame(clf, clf_name: str, *, n_stars: int = 800, seed: int = 7, repeat: int = 3,
                  warmup: bool = True, photometry: str = "psf") -> dict:
    """Median seconds per stage (read, pipeline stages, other, write, total)."""
    from robopol_clean.instrument import load_profile
    from robopol_clean.io import read_frame
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.products import write_products
    from robopol_clean.simulate import simulate_frame

    prof = load_profile("robopol")
    with Timer() as ts:
        sim = simulate_frame(prof, seed=seed, n_stars=n_stars)
    runs = []
    with tempfile.TemporaryDirectory(prefix="robopol-bench-") as tmp:
        path = Path(tmp) / "frame.fits"
        sim.ccd.write(path, overwrite=True)
        if warmup:
            reduce_frame(read_frame(path, prof), profile=prof, classifier=clf,
                         photometry=photometry)
        for i in range(repeat):
            with Timer() as tr:
                ccd = read_frame(path, prof)
            res = reduce_frame(ccd, profile=prof, classifier=clf, name=path.name,
                               photometry=photometry)
            with Timer() as tw:
                write_products(res, Path(tmp) / "out", f"frame{i}", overwrite=True)
            timings = dict(res.meta["timings"])
            row = {"read": tr.s}
            row.update({s: timings.get(s, 0.0) for s in PIPELINE_STAGES})
            # sub-stages ("photometry: ...") are parts of their stage, listed after it
            other = [k for k in timings if k not in PIPELINE_STAGES and k != "total"]
            row.update({k: timings[k] for k in other})
            row["other (copy, provenance)"] = timings["total"] - sum(
                v for k, v in timings.items() if k != "total" and ":" not in k)
            row["write"] = tw.s
            row["total"] = tr.s + timings["total"] + tw.s
            runs.append(row)
    stages = list(runs[0])
    med = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in stages}
    return {"stages": med, "runs": runs, "summary": res.summary(), "simulate_seconds": ts.s,
            "shape": list(sim.ccd.shape), "n_stars": n_stars, "seed": seed, "repeat": repeat,
            "warmup": warmup, "classifier": clf_name, "photometry": photometry}


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    clf, name, load_s, why = load_default_classifier(ctx)
    runs = {m: profile_frame(clf, name, repeat=1 if ctx.quick else 3, warmup=not ctx.quick,
                             photometry=m) for m in ("psf", "aperture")}
    out = runs["psf"]
    total = out["stages"]["total"]
    sec.columns = ["stage", "seconds (psf photometry)", "% of total", "seconds (aperture)"]
    aper = runs["aperture"]["stages"]
    for stage, s in out["stages"].items():
        sec.rows.append([stage, f"{s:.3f}", f"{100 * s / total:.1f}" if stage != "total" else "100.0",
                         f"{aper[stage]:.3f}" if stage in aper else "-"])
    sm = out["summary"]
    sec.notes.append(f"frame {out['shape'][1]}x{out['shape'][0]}, {out['n_stars']} stars (seed "
                     f"{out['seed']}): {sm['n_spots']} spots, {sm['n_rejected']} rejected, "
                     f"{sm['n_quadruplets']} complete quadruplets, {sm['n_clean']} clean")
    sec.notes.append(f"classifier {name} (loaded once in {load_s:.2f} s, not counted)"
                     + (f"; {why}" if why else ""))
    sec.notes.append("median of 3 runs after a warm-up run" if not ctx.quick
                     else "quick: one cold run (no warm-up)")
    log(f"stages: total {total:.1f} s per frame")
    sec.data = {**out, "aperture": runs["aperture"]}
    return sec


def main(argv=None) -> None:
    """Stand-alone stage profile (the former benchmarks/bench_reduce.py)."""
    parser = argparse.ArgumentParser(description="Per-stage timing of one full RoboPol frame.")
    parser.add_argument("--n-stars", type=int, default=800)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--classifier", default="cnn", choices=["cnn", "morphology"])
    parser.add_argument("--photometry", default="psf", choices=["psf", "aperture"])
    args = parser.parse_args(argv)
    from robopol_clean.pipeline import get_classifier

    with Timer() as tl:
        clf = get_classifier(args.classifier)
    out = profile_frame(clf, args.classifier, n_stars=args.n_stars, seed=args.seed, repeat=args.repeat,
                        photometry=args.photometry)
    print(f"# one {out['shape'][1]} x {out['shape'][0]} frame, {args.n_stars} stars (seed {args.seed}); "
          f"classifier {args.classifier} (load {tl.s:.2f} s, once per process); "
          f"{args.photometry} photometry")
    print(f"# {out['summary']}")
    print(f"{'stage':<28}{'median [s]':>12}")
    for stage, s in out["stages"].items():
        print(f"{stage:<28}{s:>12.3f}")


if __name__ == "__main__":
    main()
