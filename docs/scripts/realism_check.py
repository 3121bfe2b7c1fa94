"""Compare a simulated RoboPol frame with the real frame J1428 (8-bit rendering).

Usage (from the repository root)::

    python docs/scripts/realism_check.py [--seed 7] [--n-stars 400] [--sky 75] [--outdir docs/_static]

The real frame is the 8-bit contrast-stretched rendering kept outside the package
(``../shared/data/J1428.fits``, or the folder named by ``ROBOPOL_SHARED``); without it
the script says so and exits with status 0. The simulated frame is given the same
stretch (linear from median - 0.5 sigma to median + 2 sigma, clipped to 0-255) and both
are measured with the same code:

* sky levels (8-bit medians) in open sky, the mask arm strips, the central mask and
  the corners, and the sky noise (MAD);
* spot FWHM (horizontal and vertical half-maximum widths) of unclipped star spots;
* length (extent above max(4 sigma, 3 % of the peak) on a 3-row profile) and vertical
  FWHM of the reflection artifacts (hand-labelled on J1428, truth tables in the
  simulation);
* the radial fall-off of the sky (vignetting).

Figures (``realism_frames.png``, ``realism_zooms.png``) go to ``--outdir``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["stretch8", "measure_frame", "main"]

REPO = Path(__file__).resolve().parents[2]


def shared_data() -> Path | None:
    """The folder holding J1428.fits, or None."""
    env = os.environ.get("ROBOPOL_SHARED")
    for base in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        for cand in (base / "data", base):
            if (cand / "J1428.fits").is_file():
                return cand
    return None


def stretch8(data: np.ndarray) -> np.ndarray:
    """The 8-bit rendering of the real frames: median-0.5 sigma .. median+2 sigma, clipped."""
    d = np.asarray(data, float)
    med, sd = np.median(d), np.std(d)
    lo, hi = med - 0.5 * sd, med + 2.0 * sd
    return np.clip(np.floor((d - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _mad(a) -> float:
    a = np.asarray(a, float)
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def _half_width(profile: np.ndarray, i0: int, level: float) -> float:
    """Width (px) of a 1-D profile above ``level`` around index i0, linearly interpolated."""
    n = len(profile)
    left = i0
    while left > 0 and profile[left - 1] >= level:
        left -= 1
    right = i0
    while right < n - 1 and profile[right + 1] >= level:
        right += 1
    xl = left - (profile[left] - level) / (profile[left] - profile[left - 1]) if left > 0 else left
    xr = right + (profile[right] - level) / (profile[right] - profile[right + 1]) if right < n - 1 else right
    return float(xr - xl)


def spot_fwhm(img: np.ndarray, x: float, y: float, half: int = 12) -> tuple[float, float] | None:
    """Horizontal and vertical FWHM of a spot near (x, y) in an 8-bit image; None if clipped/unusable."""
    ix, iy = int(round(x)), int(round(y))
    ny, nx = img.shape
    if not (half + 10 <= ix < nx - half - 10 and half + 10 <= iy < ny - half - 10):
        return None
    box = img[iy - half - 10: iy + half + 11, ix - half - 10: ix + half + 11].astype(float)
    ring = np.concatenate([box[:6].ravel(), box[-6:].ravel(), box[:, :6].ravel(), box[:, -6:].ravel()])
    bg = np.median(ring)
    core = box[10:-10, 10:-10] - bg
    # smooth lightly to find the peak robustly
    py, px = np.unravel_index(np.argmax(core), core.shape)
    peak = core[py, px]
    if box.max() >= 250 or peak < 60:  # clipped, or too faint for a half-max width in 8 bits
        return None
    rowp = core[py - 1: py + 2].mean(axis=0) if 0 < py < core.shape[0] - 1 else core[py]
    colp = core[:, px - 1: px + 2].mean(axis=1) if 0 < px < core.shape[1] - 1 else core[:, px]
    return (_half_width(rowp, px, rowp[px] / 2), _half_width(colp, py, colp[py] / 2))


def streak_shape(img: np.ndarray, x: float, y: float, sky_sigma: float) -> tuple[float, float] | None:
    """Length (extent above max(4 sigma, 3 % of peak), 3-row profile) and vertical FWHM at the peak."""
    ix, iy = int(round(x)), int(round(y))
    ny, nx = img.shape
    hx, hy = 45, 12
    if not (hy + 2 <= iy < ny - hy - 2):
        return None
    x0, x1 = max(ix - hx, 0), min(ix + hx + 1, nx)
    box = img[iy - hy: iy + hy + 1, x0:x1].astype(float)
    bg = np.median(np.concatenate([box[:3].ravel(), box[-3:].ravel()]))
    box = box - bg
    # brightest point within 4 px of the nominal position
    sub = box[hy - 4: hy + 5, max(ix - x0 - 4, 0): ix - x0 + 5]
    sy, sx = np.unravel_index(np.argmax(sub), sub.shape)
    py, px = hy - 4 + sy, max(ix - x0 - 4, 0) + sx
    row = box[py - 1: py + 2].mean(axis=0)
    peak = row[px]
    level = max(4 * sky_sigma / np.sqrt(3), 0.03 * peak)
    if peak <= level:
        return None
    length = _half_width(row, px, level)
    col = box[:, max(px - 1, 0): px + 2].mean(axis=1)
    width = _half_width(col, py, col[py] / 2)
    return length, width


def measure_frame(img: np.ndarray, star_xy: np.ndarray, art_xy: np.ndarray) -> dict:
    """Statistics of one 8-bit RoboPol frame (detector-size, FITS orientation)."""
    out: dict = {}
    open_sky = np.concatenate([img[1300:1700, 200:600].ravel(), img[300:700, 1400:1800].ravel()])
    out["sky_open_median"] = float(np.median(open_sky))
    out["sky_open_mad"] = _mad(open_sky)
    regions = {
        "arm_strip_0.5 (y=1043)": img[1038:1049, 200:700],
        "arm_strip_0.75 (y=992)": img[987:998, 200:700],
        "arm_strip_0.75 (y=1094)": img[1089:1100, 200:700],
        "arm_strip_0.5 (x=1026)": img[200:700, 1021:1032],
        "mask_blob": img[1115:1135, 1000:1050],
        "corner_0_0": img[0:60, 0:60],
        "corner_2047_2047": img[1988:, 1988:],
    }
    out["sky_regions"] = {k: float(np.median(v)) for k, v in regions.items()}
    out["frac_0"] = float((img == 0).mean())
    out["frac_255"] = float((img == 255).mean())
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    r = np.hypot(xx - 1023.5, yy - 1023.5)
    away = (np.abs(xx - 1026) > 90) & (np.abs(yy - 1043) > 90)
    out["radial"] = {int(r0): float(np.median(img[(r >= r0) & (r < r0 + 50) & away]))
                     for r0 in range(800, 1450, 50)}
    fw = [spot_fwhm(img, x, y) for x, y in star_xy]
    fw = np.array([f for f in fw if f is not None])
    out["n_fwhm"] = len(fw)
    out["fwhm_x"] = np.percentile(fw[:, 0], [16, 50, 84]).tolist() if len(fw) else []
    out["fwhm_y"] = np.percentile(fw[:, 1], [16, 50, 84]).tolist() if len(fw) else []
    sh = [streak_shape(img, x, y, out["sky_open_mad"]) for x, y in art_xy]
    sh = np.array([s for s in sh if s is not None])
    out["n_art"] = len(sh)
    out["art_length"] = np.percentile(sh[:, 0], [0, 50, 100]).tolist() if len(sh) else []
    out["art_width"] = np.percentile(sh[:, 1], [0, 50, 100]).tolist() if len(sh) else []
    return out


def _print(name: str, m: dict) -> None:
    def f(v):
        return "[" + ", ".join(f"{a:.1f}" for a in v) + "]" if v else "n/a"

    print(f"--- {name}")
    print(f"  open sky: median {m['sky_open_median']:.1f}, MAD {m['sky_open_mad']:.1f} (8-bit)")
    print("  " + ", ".join(f"{k}: {v:.0f}" for k, v in m["sky_regions"].items()))
    print(f"  pixels at 0: {100 * m['frac_0']:.1f} %, at 255: {100 * m['frac_255']:.2f} %")
    print("  radial sky (r: median): " + ", ".join(f"{k}:{v:.0f}" for k, v in m["radial"].items()))
    print(f"  spot FWHM x (16/50/84 %): {f(m['fwhm_x'])}, y: {f(m['fwhm_y'])} px from {m['n_fwhm']} spots")
    print(f"  artifact length (min/median/max): {f(m['art_length'])} px, vertical FWHM: {f(m['art_width'])} px"
          f" from {m['n_art']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n-stars", type=int, default=None, help="stars (default: 180, or drawn with --generic)")
    parser.add_argument("--sky", type=float, default=None, help="open-sky level (e-/px); default 50, or drawn")
    parser.add_argument("--artifacts", type=int, default=5, help="reflection-artifact groups")
    parser.add_argument("--generic", action="store_true",
                        help="use the simulator's default draws instead of the J1428-like settings")
    parser.add_argument("--outdir", default=str(REPO / "docs" / "_static"))
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)

    data_dir = shared_data()
    if data_dir is None:
        print("realism_check: the real frame J1428.fits is not available (../shared/data or "
              "$ROBOPOL_SHARED); nothing to compare.")
        return 0

    from astropy.io import fits
    from astropy.table import Table

    from robopol_clean.simulate import simulate_frame

    real = fits.getdata(data_dir / "J1428.fits").astype(np.uint8)
    quads = Table.read(data_dir / "J1428_quads.ecsv")
    labels = Table.read(data_dir / "J1428_artifacts.ecsv")
    real_stars = np.array([(q[f"x_{c}"], q[f"y_{c}"]) for q in quads if not q["peak_sat"]
                           for c in ("top", "bottom", "left", "right")])
    real_art = np.array([(a["x"], a["y"]) for a in labels if a["kind"] == "streak"])

    # J1428 is a sparse high-latitude field on a dark sky: its 8-bit rendering has 40 ADU
    # between black and white (sigma ~ 16 ADU), a sky noise of ~4.4 ADU (~12 e-, i.e. a sky of
    # a few tens of e-/px) and no star brighter than ~R 13 on the simulator's zero point.
    preset = {} if args.generic else dict(sky=50.0, n_stars=180, mag_range=(12.5, 19.5), target={"mag": 16.0})
    if args.sky is not None:
        preset["sky"] = args.sky
    if args.n_stars is not None:
        preset["n_stars"] = args.n_stars
    sim = simulate_frame("robopol", seed=args.seed, n_artifact_sources=args.artifacts, **preset)
    img = stretch8(sim.ccd.data)
    st = sim.stars[sim.stars["complete"] & ~sim.stars["saturated"]]
    sim_stars = np.array([(s[f"x_{c}"], s[f"y_{c}"]) for s in st for c in ("top", "bottom", "left", "right")])
    refl = sim.artifacts[np.isin(sim.artifacts["kind"], ["streak", "ghost"])]
    refl = refl[(refl["x"] >= 0) & (refl["x"] < img.shape[1]) & (refl["y"] >= 0) & (refl["y"] < img.shape[0])]
    sim_art = np.array([(a["x"], a["y"]) for a in refl]).reshape(-1, 2)

    m_real = measure_frame(real, real_stars, real_art)
    m_sim = measure_frame(img, sim_stars, sim_art)
    print(f"simulated frame: seed {args.seed}, {len(sim.stars)} stars, sky {sim.params['sky']:.0f} e-/px, "
          f"FWHM {sim.params['fwhm']:.2f} px, beta {sim.params['beta']:.2f}")
    _print("real J1428 (8-bit rendering)", m_real)
    _print("simulation (same stretch)", m_sim)
    lab = labels[labels["kind"] == "streak"]
    print(f"  real artifacts, labels: length {np.median(lab['length_px']):.1f} px median "
          f"({lab['length_px'].min():.1f}-{lab['length_px'].max():.1f}), vertical FWHM "
          f"{np.median(lab['width_px']):.1f} ({lab['width_px'].min():.1f}-{lab['width_px'].max():.1f}) px")
    if len(refl):
        print("  simulated artifacts, truth: length " +
              ", ".join(f"{v:.0f}" for v in refl["length"]) + " px; width " +
              ", ".join(f"{v:.1f}" for v in refl["width"]) + " px; snr_peak " +
              ", ".join(f"{v:.0f}" for v in refl["snr_peak"]))

    if args.no_figures:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.4), constrained_layout=True)
    for ax, im, title in ((axes[0], real, "real J1428 (8-bit rendering)"),
                          (axes[1], img, f"simulated (seed {args.seed}), same stretch")):
        ax.imshow(im, origin="lower", cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        ax.set_title(title)
        ax.set_xlabel("x (px)")
    for a in refl:
        axes[1].add_patch(plt.Rectangle((a["x"] - 30, a["y"] - 15), 60, 30, fill=False, ec="r", lw=0.8))
    for a in labels[labels["kind"] == "streak"]:
        axes[0].add_patch(plt.Rectangle((a["x"] - 30, a["y"] - 15), 60, 30, fill=False, ec="r", lw=0.8))
    fig.savefig(outdir / "realism_frames.png", dpi=90)
    plt.close(fig)

    # zooms: the brightest labelled streaks and the brightest simulated reflections, plus a pattern each
    real_z = [(a["x"], a["y"]) for a in labels[labels["kind"] == "streak"][:3]]
    order = np.argsort(-refl["snr_peak"]) if len(refl) else []
    sim_z = [(refl["x"][i], refl["y"][i]) for i in order[:3]]
    q = quads[np.argsort(quads["min_snr"])[len(quads) // 2]]
    s = st[np.argsort(st["flux"])[-max(1, len(st) // 10)]] if len(st) else None
    fig, axes = plt.subplots(2, 4, figsize=(16, 8), constrained_layout=True)
    for row, (im, zooms, pat, name) in enumerate(((real, real_z, (q["x"], q["y"]), "real"),
                                                  (img, sim_z, None if s is None else (s["x"], s["y"]), "sim"))):
        for col in range(4):
            ax = axes[row, col]
            if col < 3 and col < len(zooms):
                (x, y), hx, hy = zooms[col], 40, 25
            elif col == 3 and pat is not None:
                (x, y), hx, hy = pat, 75, 75
            else:
                ax.axis("off")
                continue
            ix, iy = int(round(x)), int(round(y))
            x0, y0 = max(ix - hx, 0), max(iy - hy, 0)
            cut = im[y0: iy + hy + 1, x0: ix + hx + 1]
            ax.imshow(cut, origin="lower", cmap="gray", vmin=0, vmax=255,
                      extent=(x0 - 0.5, x0 + cut.shape[1] - 0.5, y0 - 0.5, y0 + cut.shape[0] - 0.5))
            ax.set_title(f"{name}: {'pattern' if col == 3 else 'artifact'} at ({ix}, {iy})", fontsize=9)
    fig.savefig(outdir / "realism_zooms.png", dpi=80)
    plt.close(fig)
    print(f"figures written to {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
