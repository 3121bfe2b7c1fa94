"""PSF photometry side by side: robopol-clean, photutils' PSFPhotometry and apertures.

    python benchmarks/run.py --only psf [--quick]

Test images: crowded star fields with known truth, rendered directly (no instrument
pattern, no artifacts): 512 x 512 px, flat sky 200 e-/px, gain 2.687 e-/adu, read noise
8.14 e- (the RoboPol values), Poisson and read noise, no saturation. Stars are placed
uniformly over the image and a margin of 3 FWHM around it (so the crowding does not thin
out at the edges; the light of stars centred off the image spills in, as on a real
frame) at two densities, 300 and 100 stars per 512 x 512 px (a dense RoboPol frame has
~4800 spots on 2048 x 2048 px, i.e. ~300 per 512 x 512; counted over the rendered area),
at FWHM 3 and 6 px. The PSF is an elliptical Moffat, beta 3, ellipticity ``1 - b/a`` =
0.08, major axis at 30 deg (inside the simulator's ranges), rendered from the analytic
profile (unit total flux) integrated over each pixel with 4 x 4 Gauss-Legendre points out
to 8 FWHM: independent of either package's tabulation. Expected aperture S/N
``F / sqrt(F + pi (2 FWHM)^2 (sky + RN^2))`` (the crowding section's) drawn from a
truncated power law ``N(> S/N) ~ (S/N)^-0.6`` between 10 and 3000 (~27 % above 100);
F follows from it. Full run: 3 images per (density, FWHM), seeds 80 000-80 011
(``SEEDS["psf"]`` of the registry :mod:`seeds`; ``80_000 + 3 * case + repeat``, cases
in the order (300, 3), (100, 3), (300, 6), (100, 6)); ``--quick``: the first image
(seed 80 000, 300 stars, FWHM 3) only, so its numbers are a subset of the full run's.

Every method gets the same starting positions: the true positions of the stars centred
on the image plus N(0, 0.3 px) per axis (as from a detection), and nothing else about
the stars. Methods:

- robopol-clean, fitted PSF: ``fit_psf`` on the image minus the known sky, from the
  isolated (no other start position within 4 FWHM), S/N >= 30 (the aperture pass's S/N)
  stars, at most 40 (the pipeline's ``PhotometryConfig`` defaults), first-guess FWHM the
  true one; then ``fit_spots(data, x, y, psf, background=<known sky>, gain, read_noise)``.
  Time: ``fit_psf`` + ``fit_spots``.
- robopol-clean, true PSF: ``fit_spots`` with ``moffat_psf(fwhm, 3, ellipticity=0.08,
  theta=30)``.
- photutils ``PSFPhotometry`` with an ``ImagePSF`` built from the same tabulated PSF as
  the robopol-clean row above it (``PSFModel.evaluate`` on its 1/8 px grid out to its
  radius, ``oversampling=8``: the same pixel-integrated model, spline-interpolated by
  photutils), for the fitted and for the true PSF; ``SourceGrouper(min_separation=2 FWHM)``
  so that overlapping stars are fitted together, ``fit_shape`` = ``2 ceil(1.5 FWHM) + 1``
  (11 px at FWHM 3, 19 px at 6), default fitter (``TRFLSQFitter``, 100 iterations), no
  position bounds, the known flat sky subtracted from the data (no local background
  estimator), ``error`` = ``sqrt(max(data, 0) / gain + (RN / gain)^2)`` (adu; data-based,
  as the pipeline's PSF fit), ``init_params`` with x, y and the aperture flux (adu) as the
  flux guess. Fluxes and ``flux_err`` (adu) times the gain; errors as photutils gives them
  (astropy's absolute covariance of the group fit). Time: the ``PSFPhotometry`` call only
  (the fitted PSF's ``fit_psf`` and the aperture guesses are not counted).
- aperture: ``measure_spots(data, x, y, fwhm, gain, read_noise, aperture_radius=2 FWHM)``
  (default annulus 1.5-2.5 aperture radii, clipped median sky). An aperture measures
  only part of the light, so its truth is ``c * F``, with ``c`` the ideal aperture
  correction: the mean fraction ``measure_spots`` returns for one isolated noiseless star
  (16 sub-pixel positions) of the true PSF, for each FWHM.

Scores, on the stars centred at least 3 FWHM inside the image: pulls ``(flux - F) /
flux_err`` (electrons) with their median, robust sigma (1.4826 MAD about the median) and
fraction beyond 5; "no result" = non-finite flux or non-positive / non-finite error (left
out of the pulls); for the stars with S/N > 100 the median relative error ``(flux - F) /
F`` and the median absolute relative error, split into stars with a neighbour (another
true star, on the image or not and of any brightness, within 2 FWHM) and without.
Timings are wall seconds per image on the machine described in the report (compare
them only within one run). ``fit_spots`` runs with its defaults, its search of the
residuals for missed sources included: the rows it adds are not scored (their number is
in the notes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from _common import Context, Section, Timer, fmt, log, plural, seeds_text
from scipy.spatial import cKDTree
from seeds import SEEDS

KEY = "psf"
TITLE = "PSF photometry vs photutils PSFPhotometry and apertures on crowded star fields"

#: Detector and sky (RoboPol).
GAIN = 2.687            # e-/adu
READ_NOISE = 8.14       # e-
SKY = 200.0             # e-/px, flat
#: Image side (px) and the rendering margin around it (FWHM).
SIZE = 512
MARGIN_FWHM = 3.0
#: The true PSF: elliptical Moffat.
BETA = 3.0
ELLIPTICITY = 0.08
THETA = 30.0            # deg, major axis from +x
RENDER_RADIUS_FWHM = 8.0
#: Brightness distribution: N(> S/N) ~ (S/N)^-SNR_SLOPE on [SNR_LO, SNR_HI].
SNR_LO, SNR_HI, SNR_SLOPE = 10.0, 3000.0, 0.6
APERTURE_FWHM = 2.0     # aperture radius (FWHM), and the S/N definition's
START_SIGMA = 0.3       # px per axis, starting-position scatter
#: Cases (stars per SIZE x SIZE, FWHM px), in order; quick: the first image of the first.
CASES = ((300, 3.0), (100, 3.0), (300, 6.0), (100, 6.0))
REPEATS = 3
SEED0 = SEEDS["psf"].first
#: Scoring.
SCORE_MARGIN_FWHM = 3.0
NEIGHBOUR_FWHM = 2.0
BRIGHT_SNR = 100.0
SNR_BINS = ((10.0, 100.0), (100.0, 300.0), (300.0, math.inf))
PULL_LIMIT = 5.0
#: photutils settings.
GROUP_FWHM = 2.0        # SourceGrouper min_separation (FWHM)
FIT_SHAPE_FWHM = 1.5    # fit_shape half-size (FWHM), rounded up

#: Methods, in table order.
METHODS = ("robopol-clean PSF, fitted", "photutils PSF, fitted",
           "robopol-clean PSF, true", "photutils PSF, true", "aperture (measure_spots)")

__all__ = ["StarField", "render_field", "true_profile", "expected_snr", "aperture_fraction",
           "score", "frame_plan", "run"]

_GL4 = np.polynomial.legendre.leggauss(4)


# ---------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------
def _alphas(fwhm: float) -> tuple[float, float]:
    """Moffat core widths (px) along the major and minor axes."""
    half = 2.0 * math.sqrt(2.0 ** (1.0 / BETA) - 1.0)
    ratio = 1.0 - ELLIPTICITY
    return fwhm / math.sqrt(ratio) / half, fwhm * math.sqrt(ratio) / half


def true_profile(dx, dy, fwhm: float) -> np.ndarray:
    """The true PSF (unit total flux, per px^2) at offset ``(dx, dy)`` from the centre."""
    aa, ab = _alphas(fwhm)
    t = math.radians(THETA)
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return (BETA - 1.0) / (math.pi * aa * ab) * (1.0 + (u / aa) ** 2 + (v / ab) ** 2) ** (-BETA)


def _render(shape, x, y, flux, fwhm: float) -> np.ndarray:
    """Noiseless image (e-) of point sources, pixel-integrated (4 x 4 Gauss-Legendre)."""
    ny, nx = shape
    out = np.zeros(shape)
    r = int(math.ceil(RENDER_RADIUS_FWHM * fwhm))
    off = np.arange(-r, r + 1)
    nodes, weights = _GL4
    nodes, weights = nodes / 2.0, weights / 2.0
    for xi, yi, fi in zip(x, y, flux):
        cx, cy = int(round(xi)), int(round(yi))
        px, py = cx + off, cy + off
        kx = (px >= 0) & (px < nx)
        ky = (py >= 0) & (py < ny)
        if not kx.any() or not ky.any():
            continue
        px, py = px[kx], py[ky]
        dx = px[None, :] - xi
        dy = py[:, None] - yi
        acc = np.zeros((py.size, px.size))
        for ti, wi in zip(nodes, weights):
            for tj, wj in zip(nodes, weights):
                acc += wi * wj * true_profile(dx + ti, dy + tj, fwhm)
        out[py[0]:py[-1] + 1, px[0]:px[-1] + 1] += fi * acc
    return out


def expected_snr(flux, fwhm: float) -> np.ndarray:
    """``F / sqrt(F + pi (2 FWHM)^2 (sky + RN^2))`` (electrons)."""
    area = math.pi * (APERTURE_FWHM * fwhm) ** 2
    flux = np.asarray(flux, float)
    return flux / np.sqrt(flux + area * (SKY + READ_NOISE ** 2))


def _flux_for_snr(snr, fwhm: float) -> np.ndarray:
    area = math.pi * (APERTURE_FWHM * fwhm) ** 2
    s2 = np.asarray(snr, float) ** 2
    return s2 / 2.0 + np.sqrt(s2 * s2 / 4.0 + s2 * area * (SKY + READ_NOISE ** 2))


@dataclass
class StarField:
    """One rendered test image and its truth (the stars centred on the image)."""

    image: np.ndarray       # adu, sky included
    x: np.ndarray           # true centres (px, 0-based)
    y: np.ndarray
    flux: np.ndarray        # true total flux (e-)
    snr: np.ndarray         # expected aperture S/N
    x0: np.ndarray          # starting positions given to every method
    y0: np.ndarray
    neighbour: np.ndarray   # another true star (any flux) within 2 FWHM
    scored: np.ndarray      # centre >= 3 FWHM inside the image
    fwhm: float
    n_stars: int            # stars per SIZE x SIZE (density)
    seed: int
    n_rendered: int         # stars rendered, margin included


def render_field(n_stars: int, fwhm: float, seed: int, size: int = SIZE) -> StarField:
    """A seeded crowded star field: ``n_stars`` per ``SIZE x SIZE`` px over the image and
    a 3 FWHM margin, S/N from the power law, Poisson and read noise, in adu."""
    rng = np.random.default_rng(seed)
    m = MARGIN_FWHM * fwhm
    area = (size + 2 * m) ** 2
    n_all = int(round(n_stars * area / SIZE ** 2))
    x = rng.uniform(-m, size + m, n_all)
    y = rng.uniform(-m, size + m, n_all)
    u = rng.uniform(size=n_all)
    lo = (SNR_LO / SNR_HI) ** SNR_SLOPE
    snr = SNR_LO * (1.0 - u * (1.0 - lo)) ** (-1.0 / SNR_SLOPE)
    flux = _flux_for_snr(snr, fwhm)
    expected = SKY + _render((size, size), x, y, flux, fwhm)
    image = (rng.poisson(expected).astype(np.float64)
             + rng.normal(0.0, READ_NOISE, expected.shape)) / GAIN

    # neighbours among all rendered stars
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(NEIGHBOUR_FWHM * fwhm,
                                                         output_type="ndarray")
    nb = np.zeros(n_all, bool)
    nb[pairs.ravel()] = True

    on = (x >= -0.5) & (x < size - 0.5) & (y >= -0.5) & (y < size - 0.5)
    x, y, flux, snr, nb = x[on], y[on], flux[on], snr[on], nb[on]
    x0 = x + rng.normal(0.0, START_SIGMA, x.size)
    y0 = y + rng.normal(0.0, START_SIGMA, y.size)
    e = SCORE_MARGIN_FWHM * fwhm
    scored = (x >= e) & (x <= size - 1 - e) & (y >= e) & (y <= size - 1 - e)
    return StarField(image, x, y, flux, snr, x0, y0, nb, scored, float(fwhm), int(n_stars),
                     int(seed), n_all)


def aperture_fraction(fwhm: float, n_pos: int = 16, seed: int = 0) -> float:
    """Ideal aperture correction: the mean fraction of an isolated, noiseless star of
    the true PSF that ``measure_spots`` (radius 2 FWHM, default annulus) returns."""
    from robopol_clean.photometry import measure_spots

    rng = np.random.default_rng(seed)
    r = int(math.ceil(RENDER_RADIUS_FWHM * fwhm)) + 2
    n = 2 * r + 1
    out = []
    f0 = 1.0e6
    for _ in range(n_pos):
        xc, yc = r + rng.uniform(-0.5, 0.5), r + rng.uniform(-0.5, 0.5)
        img = (SKY + _render((n, n), [xc], [yc], [f0], fwhm)) / GAIN
        t = measure_spots(img, [xc], [yc], fwhm=fwhm, gain=GAIN, read_noise=READ_NOISE,
                          aperture_radius=APERTURE_FWHM * fwhm)
        out.append(float(t["flux"][0]) / f0)
    return float(np.mean(out))


# ---------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------
def _variance_adu(image: np.ndarray) -> np.ndarray:
    return np.maximum(image, 0.0) / GAIN + (READ_NOISE / GAIN) ** 2


def _psf_settings() -> tuple[float, float, int]:
    """(min S/N, isolation in FWHM, most stars) of the pipeline's PSF star selection."""
    try:
        from robopol_clean.config import PhotometryConfig

        c = PhotometryConfig()
        return float(c.psf_min_snr), float(c.psf_isolation), int(c.psf_max_stars)
    except (ImportError, AttributeError, TypeError):
        return 30.0, 4.0, 40


def _aperture(field: StarField) -> dict:
    from robopol_clean.photometry import measure_spots

    with Timer() as t:
        tab = measure_spots(field.image, field.x0, field.y0, fwhm=field.fwhm, gain=GAIN,
                            read_noise=READ_NOISE, aperture_radius=APERTURE_FWHM * field.fwhm)
    return {"flux": np.asarray(tab["flux"], float), "flux_err": np.asarray(tab["flux_err"], float),
            "seconds": t.s}


def _fitted_psf(field: StarField, ap: dict):
    """The frame's PSF from its own isolated, bright stars (robopol-clean's fit_psf)."""
    from robopol_clean.photometry import PSFFallbackWarning, fit_psf

    min_snr, isolation, max_stars = _psf_settings()
    xy = np.column_stack([field.x0, field.y0])
    d, _ = cKDTree(xy).query(xy, k=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = ap["flux"] / ap["flux_err"]
    sel = (d[:, 1] > isolation * field.fwhm) & (snr >= min_snr)
    with warnings.catch_warnings(record=True) as caught, Timer() as t:
        warnings.simplefilter("always", PSFFallbackWarning)
        psf = fit_psf(field.image - SKY / GAIN, field.x0[sel], field.y0[sel], fwhm=field.fwhm,
                      variance=_variance_adu(field.image), max_stars=max_stars)
    fallback = [str(w.message) for w in caught if issubclass(w.category, PSFFallbackWarning)]
    return psf, t.s, int(sel.sum()), fallback


def _robopol(field: StarField, psf) -> dict:
    from robopol_clean.photometry import fit_spots

    with Timer() as t:
        tab = fit_spots(field.image, field.x0, field.y0, psf, background=SKY / GAIN, gain=GAIN,
                        read_noise=READ_NOISE)
    n = field.x0.size  # rows after the inputs' are sources its residual search added
    return {"flux": np.asarray(tab["flux"], float)[:n],
            "flux_err": np.asarray(tab["flux_err"], float)[:n], "seconds": t.s,
            "fit_radius": float(tab.meta.get("fit_radius", np.nan)),
            "n_added": int(len(tab) - n)}


def image_psf(psf):
    """photutils ``ImagePSF`` of a robopol-clean ``PSFModel``: its pixel-integrated
    profile on a grid oversampled 8 times out to its radius."""
    from photutils.psf import ImagePSF

    over = 8
    off = np.arange(-psf.radius * over, psf.radius * over + 1) / over
    data = psf.evaluate(off[None, :], off[:, None])
    return ImagePSF(data, oversampling=over)


def fit_shape_for(fwhm: float) -> int:
    return 2 * int(math.ceil(FIT_SHAPE_FWHM * fwhm)) + 1


def _photutils(field: StarField, psf, flux_guess_e: np.ndarray) -> dict:
    from astropy.table import Table
    from photutils.psf import PSFPhotometry, SourceGrouper

    model = image_psf(psf)
    k = fit_shape_for(field.fwhm)
    phot = PSFPhotometry(model, (k, k), grouper=SourceGrouper(min_separation=GROUP_FWHM * field.fwhm))
    init = Table({"x": field.x0, "y": field.y0,
                  "flux": np.nan_to_num(np.asarray(flux_guess_e, float) / GAIN)})
    err = np.sqrt(_variance_adu(field.image))
    data = field.image - SKY / GAIN
    with warnings.catch_warnings(record=True) as caught, Timer() as t:
        warnings.simplefilter("always")
        res = phot(data, error=err, init_params=init)
    n = field.x0.size
    idx = np.asarray(res["id"], int) - 1
    flux = np.full(n, np.nan)
    ferr = np.full(n, np.nan)
    flags = np.zeros(n, int)
    flux[idx] = np.asarray(res["flux_fit"], float) * GAIN
    ferr[idx] = np.asarray(res["flux_err"], float) * GAIN
    flags[idx] = np.asarray(res["flags"], int)
    return {"flux": flux, "flux_err": ferr, "seconds": t.s, "flags": flags,
            "max_group": int(np.max(res["group_size"])) if len(res) else 0,
            "n_warnings": len(caught)}


# ---------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------
def score(flux, flux_err, truth, snr, neighbour) -> dict:
    """Pull and relative-error statistics of one method on a set of stars."""
    flux, flux_err, truth = (np.asarray(a, float) for a in (flux, flux_err, truth))
    snr, neighbour = np.asarray(snr, float), np.asarray(neighbour, bool)
    ok = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pull = (flux - truth) / flux_err
        rel = (flux - truth) / truth
    p = pull[ok]
    out = {"n": int(flux.size), "n_no_result": int((~ok).sum()), "n_pulls": int(p.size)}
    if p.size:
        med = float(np.median(p))
        out.update(pull_median=med, pull_sigma_robust=float(1.4826 * np.median(np.abs(p - med))),
                   pull_mean=float(p.mean()), frac_over=float(np.mean(np.abs(p) > PULL_LIMIT)),
                   n_over=int(np.sum(np.abs(p) > PULL_LIMIT)))
    else:
        out.update(pull_median=None, pull_sigma_robust=None, pull_mean=None, frac_over=None,
                   n_over=0)
    out["snr_bins"] = {}
    for lo, hi in SNR_BINS:
        b = ok & (snr >= lo) & (snr < hi)
        pb = pull[b]
        med = float(np.median(pb)) if pb.size else None
        out["snr_bins"][f"> {lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"] = {
            "n": int(pb.size), "pull_median": med,
            "pull_sigma_robust": float(1.4826 * np.median(np.abs(pb - med))) if pb.size else None,
            "frac_over": float(np.mean(np.abs(pb) > PULL_LIMIT)) if pb.size else None}
    bright = (snr > BRIGHT_SNR) & np.isfinite(rel)
    out["n_no_result_bright"] = int(np.sum((snr > BRIGHT_SNR) & ~np.isfinite(rel)))
    for name, sel in (("bright", bright), ("bright_isolated", bright & ~neighbour),
                      ("bright_neighbour", bright & neighbour)):
        r = rel[sel]
        out[name] = {"n": int(r.size),
                     "median_rel": float(np.median(r)) if r.size else None,
                     "median_abs_rel": float(np.median(np.abs(r))) if r.size else None}
    return out


# ---------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------
def frame_plan(quick: bool) -> list[tuple[int, float, int, int]]:
    """(stars per 512^2, FWHM, repeat, seed) of every image of the run."""
    plan = []
    for k, (n, f) in enumerate(CASES):
        for rep in range(REPEATS):
            if quick and (k or rep):
                continue
            plan.append((n, f, rep, SEED0 + REPEATS * k + rep))
    return plan


def _case_label(n: int, f: float) -> str:
    return f"{n} stars, FWHM {f:g}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _row(case: str, method: str, seconds: float, s: dict) -> list[str]:
    def rel(key):
        b = s[key]
        return "-" if b["median_abs_rel"] is None else f"{_pct(b['median_abs_rel'])} ({b['n']})"

    return [case, method, fmt(seconds, 2), str(s["n"]), str(s["n_no_result"]),
            fmt(s["pull_median"], 2), fmt(s["pull_sigma_robust"], 2),
            "-" if s["frac_over"] is None else f"{s['n_over']} ({fmt(100 * s['frac_over'], 1)}%)",
            _pct(s["bright"]["median_rel"]), rel("bright_isolated"), rel("bright_neighbour")]


def run(ctx: Context) -> Section:
    from robopol_clean.photometry import moffat_psf

    sec = Section(KEY, TITLE)
    plan = frame_plan(ctx.quick)
    ap_frac = {f: aperture_fraction(f) for f in sorted({f for _, f, _, _ in plan})}
    stars: dict[str, dict[str, list]] = {m: {} for m in METHODS}
    images: list[dict] = []
    for n_stars, fwhm, rep, seed in plan:
        field = render_field(n_stars, fwhm, seed)
        true_psf = moffat_psf(fwhm, BETA, ellipticity=ELLIPTICITY, theta=THETA, source="true")
        ap = _aperture(field)
        psf, t_psf, n_cand, fallback = _fitted_psf(field, ap)
        res = {
            "aperture (measure_spots)": ap,
            "robopol-clean PSF, fitted": _robopol(field, psf),
            "robopol-clean PSF, true": _robopol(field, true_psf),
            "photutils PSF, fitted": _photutils(field, psf, ap["flux"]),
            "photutils PSF, true": _photutils(field, true_psf, ap["flux"]),
        }
        res["robopol-clean PSF, fitted"]["seconds"] += t_psf
        sc = field.scored
        img = {"seed": seed, "n_stars": n_stars, "fwhm": fwhm, "repeat": rep,
               "n_rendered": field.n_rendered, "n_on_image": int(field.x.size),
               "n_scored": int(sc.sum()), "n_bright": int(np.sum(sc & (field.snr > BRIGHT_SNR))),
               "n_neighbour": int(np.sum(sc & field.neighbour)),
               "fitted_psf": {**psf.describe(), "seconds": t_psf, "candidates": n_cand,
                              "fallback": fallback},
               "methods": {}}
        for m in METHODS:
            r = res[m]
            truth = field.flux * (ap_frac[fwhm] if m.startswith("aperture") else 1.0)
            for k, v in (("flux", r["flux"][sc]), ("flux_err", r["flux_err"][sc]),
                         ("truth", truth[sc]), ("snr", field.snr[sc]),
                         ("neighbour", field.neighbour[sc])):
                stars[m].setdefault(k, []).append(v)
            stars[m].setdefault("case", []).append(np.full(int(sc.sum()), CASES.index((n_stars, fwhm))))
            info = {"seconds": r["seconds"],
                    **score(r["flux"][sc], r["flux_err"][sc], truth[sc], field.snr[sc],
                            field.neighbour[sc])}
            if "n_added" in r:
                info["n_added"] = r["n_added"]
            if "flags" in r:
                info.update(frac_flagged=float(np.mean(r["flags"][sc] != 0)),
                            max_group=r["max_group"], n_warnings=r["n_warnings"])
            img["methods"][m] = info
        images.append(img)
        log(f"psf: seed {seed} ({n_stars} stars, FWHM {fwhm:g}): "
            + ", ".join(f"{m} {res[m]['seconds']:.2f} s" for m in METHODS))

    sec.columns = ["case", "method", "s / image", "stars", "no result", "pull median",
                   "pull robust sigma", "|pull| > 5", "S/N > 100: median rel. error",
                   "median |rel. error|, no neighbour (N)", "median |rel. error|, neighbour (N)"]
    pooled: dict[str, dict] = {}
    cases = [c for c in CASES if any((n, f) == c for n, f, _, _ in plan)]
    for m in METHODS:
        cat = {k: np.concatenate(v) for k, v in stars[m].items()}
        secs = [i["methods"][m]["seconds"] for i in images]
        s = score(cat["flux"], cat["flux_err"], cat["truth"], cat["snr"], cat["neighbour"])
        pooled[m] = {"all": {"seconds_per_image": float(np.mean(secs)), **s}, "cases": {}}
        if len(cases) > 1:
            sec.rows.append(_row("all", m, float(np.mean(secs)), s))
        for c in cases:
            ci = CASES.index(c)
            sel = cat["case"] == ci
            cs = score(cat["flux"][sel], cat["flux_err"][sel], cat["truth"][sel], cat["snr"][sel],
                       cat["neighbour"][sel])
            csecs = float(np.mean([i["methods"][m]["seconds"] for i in images
                                   if (i["n_stars"], i["fwhm"]) == c]))
            pooled[m]["cases"][_case_label(*c)] = {"seconds_per_image": csecs, **cs}
    for c in cases:
        for m in METHODS:
            b = pooled[m]["cases"][_case_label(*c)]
            sec.rows.append(_row(_case_label(*c), m, b["seconds_per_image"], b))

    seeds = [s for *_, s in plan]
    per_case = REPEATS if not ctx.quick else 1
    sec.notes.append(
        f"{plural(len(plan), 'rendered 512x512 image')} ({seeds_text(seeds)}; "
        f"{'quick: ' if ctx.quick else ''}{per_case} per case): stars per 512x512 px (over the image "
        f"and a 3 FWHM margin) x FWHM px; elliptical Moffat beta {BETA:g}, ellipticity {ELLIPTICITY:g}, "
        f"theta {THETA:g} deg, 4x4 Gauss-Legendre pixel integration; flat sky {SKY:g} e-/px, gain "
        f"{GAIN} e-/adu, read noise {READ_NOISE} e-, Poisson + read noise, no saturation; S/N "
        f"(F / sqrt(F + pi (2 FWHM)^2 (sky + RN^2))) from N(>S/N) ~ (S/N)^-{SNR_SLOPE:g} on "
        f"{SNR_LO:g}-{SNR_HI:g}; every method starts from the true positions + N(0, {START_SIGMA:g} px)")
    sec.notes.append(
        "scored: stars centred >= 3 FWHM inside the image; pulls (flux - F) / flux_err (electrons), "
        "robust sigma = 1.4826 MAD; 'no result' = non-finite flux or error (not in the pulls); "
        "relative errors (flux - F) / F of the S/N > 100 stars; neighbour = another true star (any "
        "brightness, on the image or in the margin) within 2 FWHM; s / image = wall seconds per image (mean)")
    shapes = ", ".join(f"{fit_shape_for(f)} px at FWHM {f:g}" for f in ap_frac)
    sec.notes.append(
        "robopol-clean fitted: fit_psf (isolated S/N >= 30 stars, first-guess FWHM the true one) "
        "+ fit_spots, both timed; true: fit_spots with moffat_psf(FWHM, 3, ellipticity=0.08, "
        "theta=30). photutils: PSFPhotometry with ImagePSF(oversampling=8) of the same tabulated "
        f"PSFModel, SourceGrouper(min_separation=2 FWHM), fit_shape {shapes}, default "
        "TRFLSQFitter, known sky subtracted, "
        "error = data-based per-pixel sigma, init_params x, y and the aperture flux; flux_err as "
        "photutils gives it; only the PSFPhotometry call is timed. Images are 512x512 so that "
        "photutils' grouped fit stays short (1024x1024 with 1200 stars at FWHM 6 took ~85 s in "
        "development)")
    sec.notes.append(
        "aperture: measure_spots, radius 2 FWHM, default annulus; truth = c F with the ideal "
        "aperture correction c (isolated noiseless star of the true PSF): "
        + ", ".join(f"c = {v:.4f} at FWHM {f:g}" for f, v in ap_frac.items()))
    fp = [i["fitted_psf"] for i in images]
    sec.notes.append(
        "fitted PSFs (true: FWHM per case, ellipticity 0.08, theta 30, beta 3): "
        + "; ".join(f"seed {i['seed']}: FWHM {p['psf_fwhm']:.3f}, ell {p['psf_ellipticity']:.3f}, "
                    f"theta {p['psf_theta']:.1f}, beta {p['psf_beta']:.2f}, {p['psf_n_stars']} stars"
                    + (" (FALLBACK)" if p["psf_source"] != "fitted" else "")
                    for i, p in zip(images, fp)))
    ph = [(i["seed"], i["methods"][m]) for i in images for m in METHODS if m.startswith("photutils")]
    sec.notes.append(
        "photutils flags != 0 (scored stars, both PSFs): "
        + f"{fmt(100 * float(np.mean([v['frac_flagged'] for _, v in ph])), 1)}% on average; "
        + f"largest group {max(v['max_group'] for _, v in ph)} stars")
    sec.notes.append(
        "pulls by S/N (robust sigma, |pull| > 5), all cases: "
        + "; ".join(m + ": " + ", ".join(
            f"S/N {k} {fmt(b['pull_sigma_robust'], 2)}, {_pct(b['frac_over'])}"
            for k, b in pooled[m]["all"]["snr_bins"].items()) for m in METHODS))
    added = [i["methods"][m].get("n_added", 0) for i in images for m in METHODS
             if m.startswith("robopol")]
    sec.notes.append(
        f"fit_spots' residual search added {sum(added)} sources in all (both PSFs, "
        f"{plural(len(images), 'image')}; not scored; every star centred on the image was given)")
    sec.data = {"seeds": seeds, "plan": [{"n_stars": n, "fwhm": f, "repeat": r, "seed": s}
                                         for n, f, r, s in plan],
                "settings": {"size": SIZE, "gain": GAIN, "read_noise": READ_NOISE, "sky": SKY,
                             "beta": BETA, "ellipticity": ELLIPTICITY, "theta": THETA,
                             "snr_range": [SNR_LO, SNR_HI], "snr_slope": SNR_SLOPE,
                             "start_sigma": START_SIGMA, "score_margin_fwhm": SCORE_MARGIN_FWHM,
                             "neighbour_fwhm": NEIGHBOUR_FWHM,
                             "bright_snr": BRIGHT_SNR, "group_fwhm": GROUP_FWHM,
                             "fit_shape": {f"{f:g}": fit_shape_for(f) for f in ap_frac}},
                "aperture_fraction": {f"{f:g}": v for f, v in ap_frac.items()},
                "methods": list(METHODS), "results": pooled, "images": images}
    return sec
