"""Combined q and u of a visit: pulls of the weighted means against the simulated truth.

    python benchmarks/bench_combine.py            # 3 fields x 5 exposures (the issue's target)
    python benchmarks/bench_combine.py --quick    # 1 field x 3 exposures, to check that it works

Frames: full 2048 x 2048 RoboPol frames, ``simulate_frame("robopol", seed=frame_seed,
field_seed=field_seed, n_stars=600, dither=..., sky_center=..., target=False)``: each field
is one set of 600 field stars (positions, magnitudes, polarization up to 4 %) seen in
five exposures with their own noise, seeing, sky, geometry jitter and reflection
artifacts (the simulator's defaults), dithered by the fixed offsets :data:`DITHERS`
(up to 41 px), with a TAN WCS that follows the dither. Seeds from the registry
(:mod:`seeds`): star fields ``SEEDS["combine_fields"]`` (96 100-96 102), exposures
``SEEDS["combine"]`` (96 000-96 014; exposure ``e`` of field ``f`` has frame seed
``first + 5 f + e``). ``--quick`` uses the first field's first three exposures.

Each frame is reduced by ``reduce_frame`` with the default classifier (the shipped CNN
with the partner cues) and the default PSF photometry; the five Stokes tables of a field
are combined by :func:`robopol_clean.combine.combine_stokes`:

- ``sky``: the default (every table has ``ra``/``dec`` from the WCS);
- ``pixel``: ``match="pixel"`` (the fitted dither offsets);
- ``sky, inflated``: ``inflate_errors=True`` (errors times sqrt(chi2/dof) where > 1), for
  comparison only: the target is judged on the default, whose errors come from the
  per-measurement noise model alone;
- ``single exposures``: the per-frame ``flags == 0`` rows of the same frames, for reference;
- ``sky, calibrated``: the whole loop of issue 14. The same exposures are simulated again
  with the calibration benchmark's instrumental effects (:data:`bench_calibration.INJECTED`:
  an angle zero point of 3 deg and (q, u)_inst = (0.004, -0.003)), reduced with the
  calibration *fitted* from that benchmark's six standard-star frames
  (``SEEDS["calibration"]``, full frames, the same classifier) and combined by sky
  position; the pulls are against the stars' true sky q and u, so they carry the
  calibration's own errors too.

Truth: the first exposure's star table (its ``x``, ``y`` are in the reference frame's
pixels, which are the visit table's). A combined row is matched to the nearest true
pattern centre within 3 px; pulls ``(q - q_true) / q_err`` and ``(u - u_true) / u_err``
of the matched ``flags == 0`` rows; robust sigma ``1.4826 * MAD`` about the median, mean,
fraction beyond 5. Target (issue 14): robust sigma in 0.95-1.05 and mean within +-0.05,
for q and for u.

Prints a table; ``--json PATH`` also writes the numbers (the full run writes
``benchmarks/results/combine.json`` unless ``--json ''``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    Context,
    _jsonable,
    _text_table,
    command_line,
    fmt,
    load_default_classifier,
    log,
    machine_description,
    machine_line,
    output_paths,
)
from bench_calibration import INJECTED  # noqa: E402
from seeds import SEEDS  # noqa: E402

#: Exposures per field, stars per field.
N_EXPOSURES = 5
N_STARS = 600
#: Dithers (px) of the exposures of a field.
DITHERS = ((0.0, 0.0), (25.3, -18.1), (-31.7, 12.4), (14.2, 33.6), (-22.9, -27.5))
#: Sky position (ICRS, deg) of each field's centre.
SKY_CENTERS = ((150.0, 20.0), (210.0, 35.0), (300.0, 45.0))
#: Truth matching radius (px) and the pull beyond which a row counts as an outlier.
MATCH_RADIUS = 3.0
PULL_LIMIT = 5.0
#: The issue's target.
TARGET_SIGMA = (0.95, 1.05)
TARGET_MEAN = 0.05
COMMITTED_JSON = (HERE / "results" / "combine.json").resolve()


def plan(quick: bool) -> list[tuple[int, list[tuple[int, tuple[float, float]]]]]:
    """(field seed, [(frame seed, dither), ...]) per field."""
    fields = SEEDS["combine_fields"].frames()
    frames = SEEDS["combine"].frames()
    out = []
    for f, field_seed in enumerate(fields[:1] if quick else fields):
        n = 3 if quick else N_EXPOSURES
        out.append((field_seed, [(frames[N_EXPOSURES * f + e], DITHERS[e]) for e in range(n)]))
    return out


def pull_stats(pulls: np.ndarray) -> dict:
    p = np.asarray(pulls, float)
    p = p[np.isfinite(p)]
    if not p.size:
        return {"n": 0, "sigma_robust": None, "mean": None, "frac_over": None}
    med = float(np.median(p))
    return {"n": int(p.size), "sigma_robust": float(1.4826 * np.median(np.abs(p - med))),
            "mean": float(p.mean()), "median": med,
            "frac_over": float(np.mean(np.abs(p) > PULL_LIMIT))}


def truth_pulls(table, truth) -> dict:
    """Pulls of the flags == 0 rows of a Stokes or visit table against the nearest true star."""
    from scipy.spatial import cKDTree

    clean = table[np.asarray(table["flags"]) == 0]
    d, i = cKDTree(np.c_[truth["x"], truth["y"]]).query(np.c_[clean["x"], clean["y"]],
                                                         distance_upper_bound=MATCH_RADIUS)
    ok = np.isfinite(d)
    i = np.minimum(i, len(truth) - 1)
    q = (np.asarray(clean["q"], float) - np.asarray(truth["q"], float)[i]) / clean["q_err"]
    u = (np.asarray(clean["u"], float) - np.asarray(truth["u"], float)[i]) / clean["u_err"]
    return {"q": np.asarray(q)[ok], "u": np.asarray(u)[ok],
            "q_err": np.asarray(clean["q_err"], float)[ok],
            "n_used": np.asarray(clean["n_used"])[ok] if "n_used" in clean.colnames else None,
            "n_clean": len(clean), "n_matched": int(ok.sum())}


def _block(parts: list[dict], select=None) -> dict:
    q = np.concatenate([p["q"][select(p)] if select else p["q"] for p in parts])
    u = np.concatenate([p["u"][select(p)] if select else p["u"] for p in parts])
    return {"q": pull_stats(q), "u": pull_stats(u)}


def _meets(b: dict) -> bool:
    return all(b[c]["n"] and TARGET_SIGMA[0] <= b[c]["sigma_robust"] <= TARGET_SIGMA[1]
               and abs(b[c]["mean"]) <= TARGET_MEAN for c in ("q", "u"))


def fitted_calibration(clf, quick: bool):
    """The calibration fitted on the calibration benchmark's standard frames, and a summary."""
    import tempfile

    from bench_calibration import simulate as simulate_standards

    from robopol_clean.calibration import fit_calibration, load_calibration

    fit = fit_calibration([s.ccd for s in simulate_standards(quick)], classifier=clf)
    with tempfile.TemporaryDirectory() as tmp:
        calibration = load_calibration(fit.write(Path(tmp) / "calibration.toml"))
    info = {name: {"value": float(v), "error": float(e)}
            for name, v, e in zip(fit.parameters, fit.values, fit.errors)}
    log("calibration fitted: " + ", ".join(f"{k} {v['value']:.5g} +/- {v['error']:.2g}"
                                           for k, v in info.items()))
    return calibration, info


def run(quick: bool) -> dict:
    from robopol_clean.combine import CombineConfig, combine_stokes
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.simulate import simulate_frame

    clf, clf_name, _, why = load_default_classifier(Context(quick=quick))
    if why:
        log(why)
    variants = {"sky": CombineConfig(), "pixel": CombineConfig(match="pixel"),
                "sky, inflated": CombineConfig(inflate_errors=True)}
    pulls: dict[str, list[dict]] = {k: [] for k in (*variants, "single exposures",
                                                    "sky, calibrated")}
    calibration, calibration_info = fitted_calibration(clf, quick)
    fields = []
    for f, (field_seed, frames) in enumerate(plan(quick)):
        stokes, truth, seconds = [], None, []
        for frame_seed, dither in frames:
            sim = simulate_frame("robopol", seed=frame_seed, field_seed=field_seed, n_stars=N_STARS,
                                 dither=dither, sky_center=SKY_CENTERS[f], target=False)
            t0 = time.perf_counter()
            result = reduce_frame(sim.ccd, classifier=clf, name=f"field{f}_seed{frame_seed}")
            seconds.append(time.perf_counter() - t0)
            log(f"field {f} (seed {field_seed}) exposure seed {frame_seed}: {len(result.stokes)} "
                f"rows, {int(np.count_nonzero(result.stokes['flags'] == 0))} clean "
                f"({seconds[-1]:.1f} s)")
            stokes.append(result.stokes)
            if truth is None:
                truth = sim.stars  # the reference exposure's pixels
            pulls["single exposures"].append(truth_pulls(result.stokes, sim.stars))
        info = {"field_seed": field_seed, "frame_seeds": [s for s, _ in frames],
                "reduce_seconds": seconds}
        calibrated = []
        for frame_seed, dither in frames:  # the same exposures through the instrument's effects
            sim = simulate_frame("robopol", seed=frame_seed, field_seed=field_seed, n_stars=N_STARS,
                                 dither=dither, sky_center=SKY_CENTERS[f], target=False,
                                 calibration=INJECTED)
            calibrated.append(reduce_frame(sim.ccd, classifier=clf, calibration=calibration,
                                           name=f"field{f}_seed{frame_seed}_cal").stokes)
        visit = combine_stokes(calibrated, [f"exp{e}" for e in range(len(calibrated))])
        pulls["sky, calibrated"].append(truth_pulls(visit.table, truth))
        info["sky, calibrated"] = {"match": visit.match, "n_stars": len(visit.table)}
        for name, cfg in variants.items():
            visit = combine_stokes(stokes, [f"exp{e}" for e in range(len(stokes))], config=cfg)
            p = truth_pulls(visit.table, truth)
            pulls[name].append(p)
            t = visit.table
            info[name] = {"match": visit.match, "offsets": visit.offsets.tolist(),
                          "n_stars": len(t), "n_clean": p["n_clean"], "n_matched": p["n_matched"],
                          "disagree": int(np.count_nonzero(np.asarray(t["flags"]) & 4096)),
                          "median_chi2_dof": float(np.nanmedian(t["chi2_dof"]))}
        fields.append(info)
    results = {"classifier": clf_name, "fields": fields, "calibration": calibration_info,
               "variants": {}}
    for name, parts in pulls.items():
        entry = {"all": _block(parts)}
        if name != "single exposures":
            n_max = max(len(fr["frame_seeds"]) for fr in fields)
            entry["n_used"] = {f"n_used = {k}": _block(parts, lambda p, k=k: p["n_used"] == k)
                               for k in range(1, n_max + 1)}
        for lo, hi in ((0, 0.002), (0.002, 0.005), (0.005, 0.02), (0.02, np.inf)):
            entry.setdefault("q_err", {})[f"q_err {lo:g}-{hi:g}"] = _block(
                parts, lambda p, lo=lo, hi=hi: (p["q_err"] >= lo) & (p["q_err"] < hi))
        entry["meets_target"] = _meets(entry["all"])
        results["variants"][name] = entry
    return results


def report(results: dict) -> str:
    cols = ["rows", "subset", "N", "q sigma", "q mean", "u sigma", "u mean", "> 5 sigma", "target"]
    rows = []

    def row(name, subset, b, target=""):
        over = [b[c]["frac_over"] for c in ("q", "u") if b[c]["n"]]
        rows.append([name, subset, fmt(b["q"]["n"]), fmt(b["q"]["sigma_robust"]),
                     fmt(b["q"]["mean"]), fmt(b["u"]["sigma_robust"]), fmt(b["u"]["mean"]),
                     fmt(float(np.mean(over)) if over else None, 4), target])

    for name, entry in results["variants"].items():
        row(name, "all flags == 0", entry["all"], "met" if entry["meets_target"] else "missed")
        for subset, b in {**entry.get("n_used", {}), **entry["q_err"]}.items():
            if b["q"]["n"]:
                row("", subset, b)
    lines = _text_table(cols, rows)
    for f in results["fields"]:
        s = f["sky"]
        lines.append(f"field seed {f['field_seed']}: {s['n_stars']} stars, {s['n_clean']} with "
                     f"flags == 0 ({s['disagree']} disagree), median chi2/dof "
                     f"{s['median_chi2_dof']:.2f}; offsets (px) "
                     + ", ".join(f"({dx:+.1f}, {dy:+.1f})" for dx, dy in s["offsets"][1:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true", help="1 field x 3 exposures")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the numbers (full run: benchmarks/results/"
                             "combine.json; quick: not written unless given)")
    args = parser.parse_args(argv)
    output_paths(parser, args, {"json": COMMITTED_JSON}, not args.quick, "the full run")
    path = args.json
    machine = machine_description()
    t0 = time.perf_counter()
    results = run(args.quick)
    seconds = time.perf_counter() - t0
    text = report(results)
    print(f"combined q/u of simulated field stars ({'quick' if args.quick else 'full'}; "
          f"classifier {results['classifier']}; {seconds:.0f} s)")
    print(f"command: {command_line(argv)}")
    print(f"machine: {machine_line(machine)}")
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command_line(argv), "machine": machine, "seconds": seconds,
                   "results": results}
        Path(path).write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
