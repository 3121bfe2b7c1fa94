"""The learned peer: MaxiMask on the same simulated frames as robopol-clean.

    bash benchmarks/setup_maximask.sh          # once: benchmarks/.venv-maximask
    python benchmarks/run.py --only maximask [--quick]

MaxiMask (Paillassa et al. 2020; MIT; PyPI ``maximask``) segments 14 contaminant
classes per pixel (cosmic rays, trails, saturation, diffraction spikes, bright
background, ...). It has no reflection or ghost class; this benchmark asks what it
flags on RoboPol frames anyway. It runs in its own virtual environment (never a
robopol-clean dependency) as a subprocess through its command line, on each frame
written as a plain float32 FITS image, with its default priors and thresholds and
``--single_mask True`` (one int16 map, bit k = class k, background excluded).

Scoring, identical for both tools, at the truth tables' pixel positions:

- a reflection artifact (streak or ghost; the truth x, y is its brightest pixel) is
  flagged when the tool's mask covers that pixel -- for MaxiMask any class except BG,
  for robopol-clean ``FrameResult.artifact_mask``;
- a star spot (truth position, inside the frame) is flagged the same way. A masker that
  also flags the stars has not told reflections apart from stars.

Times: MaxiMask's wall time per frame includes starting Python and TensorFlow and
loading its network (a new process per frame, as its command line is used); its own
log line "Whole processing time" is reported too. robopol-clean's time is
``reduce_frame`` in-process with the classifier loaded once (load time noted).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from _common import Context, Section, Timer, load_default_classifier, log, plural, seeds_text
from seeds import SEEDS

KEY = "maximask"
TITLE = "Peer: MaxiMask vs robopol-clean on the same simulated frames"

VENV = Path(__file__).resolve().parent / ".venv-maximask"
#: MaxiMask's class abbreviations, in its bit order.
CLASSES = ("CR", "HCL", "DCL", "HP", "DP", "P", "TRL", "FR", "NEB", "SAT", "SP", "OV", "BBG", "BG")
TIMEOUT_S = 1200


def maximask_executable() -> Path | None:
    exe = VENV / "bin" / "maximask"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def maximask_version() -> str | None:
    try:
        dist = next((VENV / "lib").glob("python*/site-packages/[Mm]axi[Mm]ask-*.dist-info"))
        return dist.name.split("-")[1].removesuffix(".dist")
    except StopIteration:
        return None


def run_maximask(exe: Path, fits_path: Path) -> dict:
    """Run MaxiMask's command line on one file; returns the mask (int16) and timings."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_USE_LEGACY_KERAS", None)
    cmd = [str(exe), str(fits_path), "--single_mask", "True", "-v"]
    with Timer() as t:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    mask_path = fits_path.with_name(fits_path.name.replace(".fits", ".mask.fits"))
    if proc.returncode != 0 or not mask_path.is_file():
        tail = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"maximask exited {proc.returncode}: " + " | ".join(tail)[-400:])
    from astropy.io import fits

    with fits.open(mask_path) as h:
        mask = np.asarray(h[0].data)
    m = re.search(r"Whole processing time \(incl\. preprocessing\): ([0-9.]+)s", out)
    return {"mask": mask, "wall_s": t.s, "processing_s": float(m.group(1)) if m else None}


def _flags_at(mask: np.ndarray, x, y) -> np.ndarray:
    ny, nx = mask.shape
    ix = np.clip(np.rint(np.asarray(x, float)).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(np.asarray(y, float)).astype(int), 0, ny - 1)
    return mask[iy, ix]


def _class_counts(bits: np.ndarray) -> dict[str, int]:
    bits = np.asarray(bits).astype(np.int64)
    return {c: int(np.count_nonzero(bits & (1 << k))) for k, c in enumerate(CLASSES[:-1])
            if np.count_nonzero(bits & (1 << k))}


def run(ctx: Context) -> Section:
    from astropy.io import fits

    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.simulate import simulate_frame

    sec = Section(KEY, TITLE)
    exe = maximask_executable()
    seeds = SEEDS["maximask"].frames(1 if ctx.quick else None)
    shape = (1024, 1024)
    clf, name, load_s, why = load_default_classifier(ctx)
    sec.columns = ["tool", "s / frame", "reflections flagged", "star spots flagged",
                   "bright star spots flagged", "mask classes at reflections",
                   "mask classes at star spots"]
    mm = {"wall": [], "proc": [], "refl": 0, "stars": 0, "bright": 0, "refl_cls": {}, "star_cls": {}}
    rc = {"wall": [], "refl": 0, "stars": 0, "bright": 0, "spots_rejected": 0, "spots_detected": 0}
    n_refl = n_star = n_bright = 0
    per_artifact = []
    mm_error = None
    with tempfile.TemporaryDirectory(prefix="robopol-maximask-") as tmp:
        for seed in seeds:
            # A detector region at origin (0, 0): robopol-clean reads image pixel (0, 0)
            # as detector pixel (0, 0). 1024 x 1024 keeps MaxiMask's minutes per frame bounded.
            sim = simulate_frame("robopol", seed=seed, shape=shape, n_artifact_sources=8)
            arts = sim.artifacts
            refl = arts[np.isin(np.asarray(arts["kind"]).astype(str), ["streak", "ghost"])]
            spots = sim.spots
            star = ~np.asarray(spots["is_artifact"], bool) & np.asarray(spots["in_frame"], bool)
            sx, sy = np.asarray(spots["x"], float)[star], np.asarray(spots["y"], float)[star]
            n_refl += len(refl)
            n_star += int(star.sum())
            # star spots at least as bright (peak) as the faintest reflection of the frame
            bright = (np.asarray(spots["peak"], float)[star] >= np.min(refl["peak"])
                      if len(refl) else np.zeros(int(star.sum()), bool))
            n_bright += int(bright.sum())

            with Timer() as t:
                res = reduce_frame(sim.ccd, classifier=clf, name=f"seed{seed}")
            rc["wall"].append(t.s)
            rc_refl = _flags_at(res.artifact_mask, refl["x"], refl["y"]).astype(bool)
            rc["refl"] += int(rc_refl.sum())
            rc_star = _flags_at(res.artifact_mask, sx, sy).astype(bool)
            rc["stars"] += int(rc_star.sum())
            rc["bright"] += int((rc_star & bright).sum())
            from robopol_clean.demo import compare_with_truth

            cmp = compare_with_truth(res, sim)
            rc["spots_rejected"] += cmp["star_spots_rejected"]
            rc["spots_detected"] += cmp["star_spots_detected"]

            mm_refl_bits = np.zeros(len(refl), np.int64)
            if exe is not None and mm_error is None:
                path = Path(tmp) / f"frame_{seed}.fits"
                fits.PrimaryHDU(np.asarray(sim.ccd.data, np.float32)).writeto(path, overwrite=True)
                log(f"maximask: frame seed {seed} ({shape[1]}x{shape[0]}), about 1-2 minutes")
                try:
                    out = run_maximask(exe, path)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    mm_error = str(exc)
                else:
                    mask = out["mask"]
                    mm["wall"].append(out["wall_s"])
                    if out["processing_s"] is not None:
                        mm["proc"].append(out["processing_s"])
                    mm_refl_bits = _flags_at(mask, refl["x"], refl["y"]).astype(np.int64)
                    star_bits = _flags_at(mask, sx, sy).astype(np.int64)
                    mm["refl"] += int(np.count_nonzero(mm_refl_bits))
                    mm["stars"] += int(np.count_nonzero(star_bits))
                    mm["bright"] += int(np.count_nonzero(star_bits[bright]))
                    for dst, bits in (("refl_cls", mm_refl_bits), ("star_cls", star_bits)):
                        for c, k in _class_counts(bits).items():
                            mm[dst][c] = mm[dst].get(c, 0) + k
            for j in range(len(refl)):
                per_artifact.append({"seed": seed, "kind": str(refl["kind"][j]),
                                     "x": float(refl["x"][j]), "y": float(refl["y"][j]),
                                     "snr_peak": float(refl["snr_peak"][j]),
                                     "robopol_clean": bool(rc_refl[j]),
                                     "maximask_classes": [c for k, c in enumerate(CLASSES[:-1])
                                                          if int(mm_refl_bits[j]) & (1 << k)]})

    def pct(k, n):
        return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"

    def cls(d):
        return ", ".join(f"{c} {k}" for c, k in sorted(d.items(), key=lambda kv: -kv[1])) or "none"

    version = maximask_version()
    if exe is None:
        sec.rows.append(["MaxiMask", "not run", "-", "-", "-", "-", "-"])
        sec.notes.append("MaxiMask not run: its environment benchmarks/.venv-maximask is absent "
                         "(create it with: bash benchmarks/setup_maximask.sh)")
        sec.status = "skipped"
    elif mm_error is not None and not mm["wall"]:
        sec.rows.append([f"MaxiMask {version}", "failed", "-", "-", "-", "-", "-"])
        sec.notes.append(f"MaxiMask failed: {mm_error}")
        sec.status = "partial"
    else:
        proc = (f" ({np.mean(mm['proc']):.0f} processing)" if mm["proc"] else "")
        sec.rows.append([f"MaxiMask {version} (default thresholds)",
                         f"{np.mean(mm['wall']):.0f}{proc}", pct(mm["refl"], n_refl),
                         pct(mm["stars"], n_star), pct(mm["bright"], n_bright),
                         cls(mm["refl_cls"]), cls(mm["star_cls"])])
        if mm_error:
            sec.notes.append(f"MaxiMask failed on a later frame: {mm_error}")
    sec.rows.append([f"robopol-clean ({name})", f"{np.mean(rc['wall']):.1f}", pct(rc["refl"], n_refl),
                     pct(rc["stars"], n_star), pct(rc["bright"], n_bright),
                     "artifact_mask", "artifact_mask"])
    sec.notes.insert(0, f"{plural(len(seeds), 'simulated RoboPol frame')} of {shape[1]}x{shape[0]} "
                     f"({seeds_text(seeds)}, 8 reflection sources per frame): {n_refl} reflection "
                     f"artifacts, {n_star} star spots in all")
    sec.notes.append(f"robopol-clean: classifier {name} loaded once ({load_s:.1f} s, not counted)"
                     + (f"; {why}" if why else "") + f"; star spots rejected as detections "
                     f"{rc['spots_rejected']} of {rc['spots_detected']} detected")
    sec.notes.append("bright star spots: peak at least that of the frame's faintest reflection")
    sec.notes.append("flagged = the tool's mask covers the truth pixel (MaxiMask: any class but BG)"
                     "; MaxiMask has no reflection class, so a reflection marked with the same "
                     "class as the star spots (BBG, bright background) is not told apart from them")
    sec.data = {"seeds": seeds, "shape": list(shape), "n_reflections": n_refl, "n_star_spots": n_star,
                "n_bright_star_spots": n_bright,
                "maximask": {"version": version, "executable": None if exe is None else str(exe),
                             "error": mm_error, "wall_s": mm["wall"], "processing_s": mm["proc"],
                             "reflections_flagged": mm["refl"], "star_spots_flagged": mm["stars"],
                             "bright_star_spots_flagged": mm["bright"],
                             "classes_at_reflections": mm["refl_cls"],
                             "classes_at_star_spots": mm["star_cls"]},
                "robopol_clean": {"classifier": name, "wall_s": rc["wall"],
                                  "reflections_flagged": rc["refl"], "star_spots_flagged": rc["stars"],
                                  "bright_star_spots_flagged": rc["bright"],
                                  "star_spots_rejected": rc["spots_rejected"],
                                  "star_spots_detected": rc["spots_detected"]},
                "reflections": per_artifact}
    return sec
