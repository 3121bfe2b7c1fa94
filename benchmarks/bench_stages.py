"""Where the time goes: per-stage profile of one full RoboPol frame, and the cost of start-up.

    python benchmarks/run.py --only stages [--quick]
    python benchmarks/bench_stages.py [--n-stars 800] [--repeat 3] [--classifier cnn]

Targets (the "fast and light" issue), on 2 cores: <= 1.0 s per 2048 x 2048 frame with
800 stars after start-up; ``robopol-clean reduce one.fits -o out`` <= 2.0 s wall
including start-up; <= 600 MB peak memory per process.

One simulated 2048 x 2048 frame with ~800 stars (seeded) is written to a temporary
FITS file, then read with :func:`robopol_clean.io.read_frame`, reduced with
:func:`robopol_clean.pipeline.reduce_frame` (its ``meta['timings']``: background,
detection, grouping, classification = cutouts + network/morphology + partner cues,
masking, photometry, Stokes) and written with
:func:`robopol_clean.products.write_products` (no diagnostic PNG). The classifier is
loaded once beforehand (its load time is reported separately). The full run reduces
once to warm up, then ``repeat`` times, and reports the median of each stage; the
quick run reduces once, cold.

Also measured:

- **the command line, cold**: ``robopol-clean reduce frame.fits -o OUT`` as a new process
  (interpreter, imports, model load, one frame, products), wall time (median of 3; quick:
  1) and the peak resident memory of the process (``ru_maxrss``); and the import of the
  reduction path alone (``python -c "import robopol_clean.pipeline"``);
- **the mask-only step**: :func:`robopol_clean.pipeline.clean_artifacts` (no photometry,
  no Stokes) against the full :func:`~robopol_clean.pipeline.reduce_frame`;
- **side by side** (the same frame): the background by photutils ``Background2D``
  (box 64, 3 x 3 filter, sigma-clipped median) and by SEP (``sep.Background``, same mesh)
  against ours, as the rms of the difference in units of our sky noise; detection by SEP
  (``sep.extract``, 5 sigma) against ours (the fraction of our spots SEP finds within
  1.5 px); the network through ONNX Runtime (ours) and through Keras (when TensorFlow is
  installed) on the frame's cutouts: cutouts/s and the largest probability difference.
  SEP is optional (``pip install sep``); a missing tool's row says so.
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


#: Runs argv[1:], prints its wall time (s) and peak resident memory (KiB), exits with its status.
_LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
if code:
    sys.stderr.write(err.decode(errors="replace"))
print(wall, usage.ru_maxrss)
sys.exit(code)
"""


def cold_command_line(n_stars: int = 800, seed: int = 7, repeat: int = 3) -> dict:
    """Wall time and peak memory of ``robopol-clean reduce one.fits -o OUT`` in a new process."""
    import shutil
    import subprocess

    from robopol_clean.instrument import load_profile
    from robopol_clean.simulate import simulate_frame

    exe = shutil.which("robopol-clean")
    cmd = [exe] if exe else [sys.executable, "-m", "robopol_clean.cli"]
    sim = simulate_frame(load_profile("robopol"), seed=seed, n_stars=n_stars)
    walls, rss, imports = [], [], []
    with tempfile.TemporaryDirectory(prefix="robopol-cold-") as tmp:
        frame = Path(tmp) / "one.fits"
        sim.ccd.write(frame)
        for i in range(repeat):
            # A small launcher starts the command and reports its wall time and peak memory
            # (wait4's ru_maxrss, KiB on Linux): started from this (large) process directly,
            # the child's peak would include this process's memory, shared until exec.
            argv = [*cmd, "reduce", str(frame), "-o", str(Path(tmp) / f"out{i}"), "-q"]
            done = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"robopol-clean reduce failed: {done.stderr.strip()[-300:]}")
            wall, maxrss_kib = done.stdout.split()
            walls.append(float(wall))
            rss.append(int(maxrss_kib) / 1024)
            with Timer() as ti:
                subprocess.run([sys.executable, "-c", "import robopol_clean.pipeline"], check=True)
            imports.append(ti.s)
    return {"wall_s": walls, "wall_median_s": statistics.median(walls), "peak_rss_mib": max(rss),
            "import_s": statistics.median(imports), "command": "robopol-clean reduce one.fits -o OUT -q",
            "n_stars": n_stars, "seed": seed}


def mask_only_vs_full(clf, n_stars: int = 800, seed: int = 7, repeat: int = 3) -> dict:
    """Seconds of clean_artifacts (mask only) and reduce_frame on the same frame (medians)."""
    from robopol_clean.instrument import load_profile
    from robopol_clean.pipeline import clean_artifacts, reduce_frame
    from robopol_clean.simulate import simulate_frame

    prof = load_profile("robopol")
    ccd = simulate_frame(prof, seed=seed, n_stars=n_stars).ccd
    out = {}
    for label, step in (("clean_artifacts", lambda: clean_artifacts(ccd, profile=prof, classifier=clf)),
                        ("reduce_frame", lambda: reduce_frame(ccd, profile=prof, classifier=clf))):
        step()  # warm-up
        times = []
        for _ in range(repeat):
            with Timer() as t:
                step()
            times.append(t.s)
        out[label] = statistics.median(times)
    return out


def alternatives(clf, n_stars: int = 800, seed: int = 7) -> list[list[str]]:
    """The same stage done by other well-kept tools, on the same frame (see the module doc)."""
    import numpy as np

    from robopol_clean.background import estimate_background
    from robopol_clean.detection import detect_spots
    from robopol_clean.instrument import load_profile
    from robopol_clean.simulate import simulate_frame

    prof = load_profile("robopol")
    ccd = simulate_frame(prof, seed=seed, n_stars=n_stars).ccd
    data = np.asarray(ccd.data, np.float32)
    bad = np.zeros(data.shape, bool) if ccd.mask is None else np.asarray(ccd.mask, bool)
    rows = []

    def best(fn, n=3):
        times, out = [], None
        for _ in range(n):
            with Timer() as t:
                out = fn()
            times.append(t.s)
        return min(times), out

    t_ours, (bkg, rms) = best(lambda: estimate_background(data, mask=bad, profile=prof))
    good = ~bad & np.isfinite(bkg)
    rows.append(["background", "robopol-clean estimate_background", f"{t_ours:.3f}", "reference"])

    def agreement(other):
        return f"rms {np.sqrt(np.mean(((other - bkg) / rms)[good] ** 2)):.2f} sky sigma"

    try:
        from astropy.stats import SigmaClip
        from photutils.background import Background2D, MedianBackground

        t, b2d = best(lambda: Background2D(data, 64, filter_size=3, mask=bad,
                                           sigma_clip=SigmaClip(3.0), bkg_estimator=MedianBackground()))
        rows.append(["background", "photutils Background2D (64 px, 3x3, clipped median)", f"{t:.3f}",
                     agreement(b2d.background)])
    except Exception as exc:  # noqa: BLE001 -- a tool that fails here is reported, not fatal
        rows.append(["background", "photutils Background2D", "-", f"failed: {exc}"[:80]])
    try:
        import sep

        native = np.ascontiguousarray(data)
        t, sb = best(lambda: sep.Background(native, mask=bad, bw=64, bh=64, fw=3, fh=3))
        rows.append(["background", "SEP Background (64 px, 3x3)", f"{t:.3f}", agreement(sb.back())])
    except ImportError:
        sep = None
        rows.append(["background", "SEP Background", "-", "sep not installed"])

    t_det, det = best(lambda: detect_spots(data, profile=prof, mask=bad, background=bkg,
                                           background_rms=rms))
    rows.append(["detection", "robopol-clean detect_spots", f"{t_det:.3f}",
                 f"{len(det.spots)} spots (reference)"])
    if sep is not None:
        sub = np.ascontiguousarray(data - bkg)
        t, objs = best(lambda: sep.extract(sub, 5.0, err=np.ascontiguousarray(rms), mask=bad,
                                           minarea=5))
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([objs["x"], objs["y"]])).query(
            np.column_stack([det.spots["x"], det.spots["y"]]))
        rows.append(["detection", "SEP extract (5 sigma, minarea 5)", f"{t:.3f}",
                     f"{len(objs)} objects; {np.mean(d <= 1.5):.1%} of our spots within 1.5 px"])

    from robopol_clean.classify.cnn import spot_cutouts

    if hasattr(clf, "predict_cutouts"):
        cut = spot_cutouts(data - bkg, det.spots, background_subtracted=True, fwhm=det.spots.meta["fwhm"],
                           version=clf.normalisation_version, params=clf.normalisation)
        t, p_ort = best(lambda: clf.predict_cutouts(cut))
        rows.append(["inference", "ONNX Runtime (reduce's engine)", f"{t:.3f}",
                     f"{len(cut) / t:,.0f} cutouts/s"])
        try:
            keras_model = clf.model  # the .keras network, loaded on first use
            import keras

            x = cut[..., None].astype(np.float32)
            keras_model.predict(x[:256], verbose=0)
            t, p_k = best(lambda: keras_model.predict(x, batch_size=256, verbose=0)[:, 0])
            from robopol_clean.classify.cnn import apply_logit_offset

            p_k = apply_logit_offset(p_k, clf.logit_offset) if clf.logit_offset else p_k
            rows.append(["inference", f"Keras {keras.__version__} (training engine)", f"{t:.3f}",
                         f"{len(cut) / t:,.0f} cutouts/s; max |dp| {np.max(np.abs(p_k - p_ort)):.1e}"])
        except ImportError:
            rows.append(["inference", "Keras", "-", "TensorFlow not installed"])
    return rows


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    clf, name, load_s, why = load_default_classifier(ctx)
    runs = {m: profile_frame(clf, name, repeat=1 if ctx.quick else 3, warmup=not ctx.quick,
                             photometry=m) for m in ("psf", "aperture")}
    cold = cold_command_line(repeat=1 if ctx.quick else 3)
    mask_only = mask_only_vs_full(clf, repeat=1 if ctx.quick else 3)
    side = alternatives(clf)
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
    sec.notes.append(f"command line, cold (new process: imports, model, one frame, products): "
                     f"{cold['wall_median_s']:.2f} s wall (median of {len(cold['wall_s'])}), peak "
                     f"memory {cold['peak_rss_mib']:.0f} MiB; importing the reduction path alone "
                     f"{cold['import_s']:.2f} s")
    sec.notes.append(f"mask-only clean_artifacts {mask_only['clean_artifacts']:.2f} s vs full "
                     f"reduce_frame {mask_only['reduce_frame']:.2f} s")
    for row in side:
        sec.notes.append(f"side by side, {row[0]}: {row[1]}: {row[2]} s ({row[3]})")
    log(f"stages: total {total:.1f} s per frame; cold command {cold['wall_median_s']:.1f} s, "
        f"{cold['peak_rss_mib']:.0f} MiB")
    sec.data = {**out, "aperture": runs["aperture"], "cold_command_line": cold,
                "mask_only": mask_only, "alternatives": side}
    return sec


def main(argv=None) -> None:
    """Stand-alone stage profile (the former benchmarks/bench_reduce.py)."""
    parser = argparse.ArgumentParser(description="Per-stage timing of one full RoboPol frame.")
    parser.add_argument("--n-stars", type=int, default=800)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--classifier", default="cnn", choices=["cnn", "morphology"])
    parser.add_argument("--photometry", default="psf", choices=["psf", "aperture"])
    parser.add_argument("--cold", action="store_true", help="also time the command line in a new process")
    parser.add_argument("--alternatives", action="store_true", help="also the side-by-side tools")
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
    if args.cold:
        cold = cold_command_line(n_stars=args.n_stars, seed=args.seed, repeat=args.repeat)
        print(f"# cold command line: {cold['wall_median_s']:.2f} s wall, {cold['peak_rss_mib']:.0f} MiB peak; "
              f"import {cold['import_s']:.2f} s")
    if args.alternatives:
        for row in alternatives(clf, n_stars=args.n_stars, seed=args.seed):
            print("# " + " | ".join(row))


if __name__ == "__main__":
    main()
