import numpy as np
import pytest

from robopol_clean.photometry import (
    annulus_for,
    aperture_radius_for,
    flux_variance,
    measure_spots,
)

GAIN, RON, SKY, FWHM = 2.687, 8.14, 100.0, 4.3  # e-/adu, e-, adu, pix (RoboPol)
SHAPE = (160, 160)
XS = np.array([40.3, 118.7, 41.1, 119.2])
YS = np.array([42.2, 40.4, 118.9, 120.5])
FLUX_ADU = np.array([2e4, 3e3, 600.0, 0.0])


def gaussian(shape, x, y, flux, fwhm):
    """Pixel-integrated circular Gaussians (adu), so that the image sums to ``flux``."""
    from scipy.special import erf

    s = fwhm / (2 * np.sqrt(2 * np.log(2)))
    ny, nx = shape
    ex = np.arange(nx + 1) - 0.5
    ey = np.arange(ny + 1) - 0.5
    img = np.zeros(shape)
    for x0, y0, f in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux)):
        cx = np.diff(0.5 * erf((ex - x0) / (np.sqrt(2) * s)))
        cy = np.diff(0.5 * erf((ey - y0) / (np.sqrt(2) * s)))
        img += f * np.outer(cy, cx)
    return img


def moffat(shape, x, y, flux, fwhm, beta=3.0):
    """Point-sampled Moffat normalised to ``flux`` (adu)."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = (xx - x) ** 2 + (yy - y) ** 2
    return flux * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)


def noisy(model, rng):
    """Poisson in electrons plus Gaussian read noise, back in adu."""
    return (rng.poisson(model * GAIN) + rng.normal(0.0, RON, model.shape)) / GAIN


def test_aperture_radius_scales_with_fwhm():
    assert aperture_radius_for(4.3) == pytest.approx(8.6)
    assert aperture_radius_for(5.0, factor=1.5) == pytest.approx(7.5)
    assert annulus_for(8.6) == pytest.approx((12.9, 21.5))
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="fwhm"):
            aperture_radius_for(bad)


def test_flux_variance_formula():
    # F G + A (1 + A/A_ann) (B G + RON^2)
    v = flux_variance(1000.0, 50.0, 200.0, 800.0, 2.0, 5.0)
    assert v == pytest.approx(1000 * 2 + 200 * 1.25 * (50 * 2 + 25))
    assert flux_variance(-10.0, -1.0, 10.0, 100.0, 2.0, 3.0) == pytest.approx(10 * 1.1 * 9)


@pytest.mark.parametrize("profile_fn", [gaussian, moffat])
def test_flux_recovery_noise_free(profile_fn):
    model = SKY + sum(profile_fn(SHAPE, x, y, f, FWHM) for x, y, f in zip(XS, YS, FLUX_ADU))
    t = measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON)
    assert t.colnames == ["flux", "flux_err", "sky", "aper_radius", "n_masked", "n_sky",
                          "saturated", "nearest", "crowded", "contamination", "contaminated"]
    assert t["flux"].unit == "electron" and t["sky"].unit == "adu"
    np.testing.assert_allclose(t["sky"], SKY, rtol=1e-3)
    enclosed = 0.999 if profile_fn is gaussian else 0.93  # Moffat wings leave the aperture
    np.testing.assert_allclose(t["flux"][:3], FLUX_ADU[:3] * GAIN * enclosed,
                               rtol=1 - enclosed + 0.005)
    assert abs(t["flux"][3]) < 1.0
    assert np.all(t["aper_radius"] == pytest.approx(2 * FWHM))
    assert not np.any(t["saturated"]) and np.all(t["n_masked"] == 0)


def test_flux_pull_distribution():
    """Fluxes scatter as flux_err says over noise realisations (bright to zero flux)."""
    rng = np.random.default_rng(2024)
    model = SKY + gaussian(SHAPE, XS, YS, FLUX_ADU, FWHM)
    pulls = {"median": [], "mean": []}
    for _ in range(120):
        img = noisy(model, rng)
        for stat in pulls:
            t = measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON,
                              sky_statistic=stat)
            pulls[stat].append((t["flux"] - FLUX_ADU * GAIN) / t["flux_err"])
    for stat, p in pulls.items():
        p = np.asarray(p)  # (realisations, spots)
        std_all = np.std(p)
        assert std_all == pytest.approx(1.0, abs=0.08), stat
        assert np.all(np.abs(np.std(p, axis=0) - 1) < 0.2), stat
        assert abs(np.mean(p)) < 0.2, stat


def test_masked_pixels_excluded():
    rng = np.random.default_rng(1)
    model = SKY + gaussian(SHAPE, XS, YS, FLUX_ADU, FWHM)
    img = noisy(model, rng)
    ref = measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON)
    mask = np.zeros(SHAPE, bool)
    mask[int(YS[1]) - 12:int(YS[1]) + 12, int(XS[1]) + 4:int(XS[1]) + 12] = True  # cut spot 1
    img2 = img.copy()
    img2[mask] = 1e6  # garbage under the mask must not leak in
    img2[int(YS[2]), int(XS[2]) + 15] = np.nan  # a NaN in spot 2's annulus
    t = measure_spots(img2, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, mask=mask)
    assert t["n_masked"][1] > 20 and t["n_masked"][0] == 0
    assert 0.5 * ref["flux"][1] < t["flux"][1] < ref["flux"][1]  # lost part of the spot
    assert np.isfinite(t["flux"][2]) and t["flux"][2] == pytest.approx(ref["flux"][2], rel=0.02)
    assert t["flux"][0] == ref["flux"][0]
    # a NaN inside an aperture counts as masked
    img3 = img.copy()
    img3[int(round(YS[0])), int(round(XS[0]))] = np.nan
    t3 = measure_spots(img3, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON)
    assert t3["n_masked"][0] == 1 and np.isfinite(t3["flux"][0])
    # a spot off the image: no flux, whole aperture lost
    t4 = measure_spots(img, [-50.0], [20.0], fwhm=FWHM, gain=GAIN, read_noise=RON)
    assert np.isnan(t4["flux"][0]) and t4["n_masked"][0] == round(np.pi * (2 * FWHM) ** 2)


def test_saturation_flag():
    model = SKY + gaussian(SHAPE, XS, YS, FLUX_ADU, FWHM)
    peak = model[int(round(YS[0])), int(round(XS[0]))]
    t = measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON,
                      saturation=peak - 1)
    assert list(t["saturated"]) == [True, False, False, False]
    t = measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, saturation=peak + 1)
    assert not np.any(t["saturated"])


def test_options_and_errors():
    img = np.full(SHAPE, SKY)
    t = measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, aperture_radius=5,
                      annulus=(10, 15))
    assert np.all(t["aper_radius"] == 5.0)
    assert len(measure_spots(img, [], [], fwhm=FWHM, gain=GAIN, read_noise=RON)) == 0
    with pytest.raises(ValueError, match="mask shape"):
        measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, mask=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="annulus"):
        measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, annulus=(9, 5))
    with pytest.raises(ValueError, match="same length"):
        measure_spots(img, XS, YS[:2], fwhm=FWHM, gain=GAIN, read_noise=RON)
    with pytest.raises(ValueError, match="sky_statistic"):
        measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, sky_statistic="mode")


def test_stokes_from_measured_spots():
    """End to end on images: four spots of one polarized star -> q, u pulls ~ N(0, 1)."""
    from robopol_clean.stokes import stokes_from_fluxes

    rng = np.random.default_rng(99)
    q0, u0, total = 0.04, -0.03, 4e3  # adu over the four spots: sigma_q ~ 0.01
    f = {0: total / 4 * (1 + q0), 45: total / 4 * (1 + u0), 90: total / 4 * (1 - q0),
         135: total / 4 * (1 - u0)}
    order = (0, 45, 90, 135)  # spot i of XS, YS gets analyser angle order[i]
    model = SKY + gaussian(SHAPE, XS, YS, [f[a] for a in order], FWHM)
    pq, pu = [], []
    for _ in range(150):
        t = measure_spots(noisy(model, rng), XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON)
        r = stokes_from_fluxes(*t["flux"], *t["flux_err"])
        pq.append((r.q - q0) / r.q_err)
        pu.append((r.u - u0) / r.u_err)
    assert np.std(pq) == pytest.approx(1.0, abs=0.15)
    assert np.std(pu) == pytest.approx(1.0, abs=0.15)
    assert abs(np.mean(pq)) < 0.25 and abs(np.mean(pu)) < 0.25


def test_non_finite_positions():
    img = np.full(SHAPE, SKY)
    t = measure_spots(img, [np.nan, 80.0], [50.0, 80.0], fwhm=FWHM, gain=GAIN, read_noise=RON,
                      saturation=1e9)
    assert np.isnan(t["flux"][0]) and np.isnan(t["flux_err"][0]) and not t["saturated"][0]
    assert t["flux"][1] == pytest.approx(0.0, abs=1e-6)


def test_sky_map_handles_sky_steps():
    """A mask edge through the annulus biases a flat-sky estimate; a sky map fixes it."""
    trans = np.ones(SHAPE)
    trans[:, 124:] = 0.5  # a strip edge 5 px right of spot 1 (x = 118.7), inside its annulus
    model = SKY * trans + gaussian(SHAPE, XS, YS, FLUX_ADU, FWHM)
    flat = measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON)
    mapped = measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, sky_map=trans)
    truth = FLUX_ADU[1] * GAIN
    assert abs(flat["flux"][1] - truth) > 5 * flat["flux_err"][1]  # the step shows
    assert mapped["flux"][1] == pytest.approx(truth, rel=0.005)
    sky_under = SKY * np.mean(trans[40, 110:128])  # ~ mean sky under the aperture
    assert mapped["sky"][1] == pytest.approx(sky_under, rel=0.1)
    np.testing.assert_allclose(mapped["flux"][[0, 2]], flat["flux"][[0, 2]], rtol=1e-6)
    with pytest.raises(ValueError, match="sky_map shape"):
        measure_spots(model, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, sky_map=trans[:5])


def test_crowding_flag():
    img = np.full(SHAPE, SKY)
    x = np.array([40.0, 52.0, 120.0])
    y = np.array([40.0, 40.0, 120.0])
    t = measure_spots(img, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON)
    np.testing.assert_allclose(t["nearest"][:2], 12.0)
    assert list(t["crowded"]) == [True, True, False]  # default radius 4 x FWHM = 17.2 px
    t = measure_spots(img, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON, crowding_radius=10)
    assert not t["crowded"].any()
    t = measure_spots(img, x[:1], y[:1], fwhm=FWHM, gain=GAIN, read_noise=RON)
    assert t["nearest"][0] == np.inf and not t["crowded"][0]


# --- the vectorised implementation against photutils ---------------------------------
def test_overlap_weights_match_photutils_exact():
    from photutils.aperture import CircularAperture

    from robopol_clean.photometry import circle_overlap_weights

    rng = np.random.default_rng(5)
    fx, fy = rng.uniform(-0.5, 0.5, 20), rng.uniform(-0.5, 0.5, 20)
    for r in (0.7, 3.0, 8.6, 11.25):
        h = int(np.ceil(r)) + 1
        w = circle_overlap_weights(fx, fy, r, np.arange(-h, h + 1.0))
        for i in range(len(fx)):
            ref = CircularAperture((h + fx[i], h + fy[i]), r=r).to_mask(method="exact")
            np.testing.assert_allclose(w[i], ref.to_image((2 * h + 1, 2 * h + 1)), atol=1e-10)
        np.testing.assert_allclose(w.sum(axis=(1, 2)), np.pi * r**2, rtol=1e-12)


def test_clipped_sky_matches_astropy_sigma_clip():
    from astropy.stats import sigma_clip

    from robopol_clean.photometry import clipped_sky

    rng = np.random.default_rng(6)
    v = rng.normal(100.0, 5.0, (40, 700))
    v[:, :30] += rng.uniform(0, 400, (40, 30))  # a neighbour's wing in the annulus
    v[:4, 100:160] = np.nan
    v[5, :] = np.nan  # nothing usable
    level, count = clipped_sky(v, 3.0, 3.0, 5)
    for row, lev, cnt in zip(v, level, count):
        finite = row[np.isfinite(row)]
        if not finite.size:
            assert np.isnan(lev) and cnt == 0
            continue
        ref = sigma_clip(finite, sigma=3.0, maxiters=5)
        assert lev == pytest.approx(float(np.ma.median(ref)), abs=1e-9)
        assert cnt == ref.count()
    mean_level, _ = clipped_sky(v[:3], 3.0, 3.0, 5, statistic="mean")
    ref = [np.ma.mean(sigma_clip(r[np.isfinite(r)], sigma=3.0, maxiters=5)) for r in v[:3]]
    np.testing.assert_allclose(mean_level, ref, rtol=1e-9)


@pytest.mark.parametrize(("sigmas", "maxiters"), [((3.0, 3.0), 5), ((2.0, 3.5), 10), ((3.0, 2.0), 1)])
def test_clipped_sky_float32_outliers_match_astropy(sigmas, maxiters):
    """Many clipping passes on float32 rows with outliers on both sides, ties and
    infinite entries: the same kept set as astropy, pass by pass."""
    from astropy.stats import sigma_clip

    from robopol_clean.photometry import clipped_sky

    rng = np.random.default_rng(8)
    v = np.round(rng.normal(0.0, 4.0, (30, 500)), 1).astype(np.float32)  # ties
    v[:, :40] += rng.exponential(60.0, (30, 40)).astype(np.float32)
    v[:, 40:50] -= rng.exponential(30.0, (30, 10)).astype(np.float32)
    v[:6, 200:260] = np.inf
    v[7, 3:] = np.nan
    v[8] = 2.5  # constant
    level, count = clipped_sky(v, *sigmas, maxiters)
    for row, lev, cnt in zip(v, level, count):
        finite = row[np.isfinite(row)].astype(np.float64)
        ref = sigma_clip(finite, sigma_lower=sigmas[0], sigma_upper=sigmas[1], maxiters=maxiters)
        assert cnt == ref.count()
        assert lev == pytest.approx(float(np.ma.median(ref)), abs=1e-6)


def test_matches_photutils_aperture_photometry():
    """Fluxes and skies agree with photutils (aperture_photometry + ApertureStats)."""
    from astropy.stats import SigmaClip
    from photutils.aperture import (
        ApertureStats,
        CircularAnnulus,
        CircularAperture,
        aperture_photometry,
    )

    rng = np.random.default_rng(7)
    trans = np.ones(SHAPE)
    trans[:, 124:] = 0.5
    img = noisy(SKY * trans + gaussian(SHAPE, XS, YS, FLUX_ADU, FWHM), rng)
    r, (r_in, r_out) = 2 * FWHM, annulus_for(2 * FWHM)
    pos = np.column_stack([XS, YS])
    for sky_map in (None, trans):
        t = measure_spots(img, XS, YS, fwhm=FWHM, gain=GAIN, read_noise=RON, sky_map=sky_map)
        scaled = img if sky_map is None else img / sky_map
        med = ApertureStats(scaled, CircularAnnulus(pos, r_in, r_out),
                            sigma_clip=SigmaClip(sigma=3.0, maxiters=5)).median
        aper = CircularAperture(pos, r)
        raw = aperture_photometry(img, aper, method="exact")["aperture_sum"]
        smap = np.ones(SHAPE) if sky_map is None else sky_map
        sky_sum = med * aperture_photometry(smap, aper, method="exact")["aperture_sum"]
        # the annulus values are sorted in float32: agreement to ~1e-7 relative
        assert np.all(np.abs(t["flux"] - (raw - sky_sum) * GAIN) < 1e-5 * t["flux_err"])
        np.testing.assert_allclose(t["sky"], sky_sum / aper.area, rtol=1e-6)


def test_many_spots_vectorised_consistency():
    """Chunking and edge handling do not change the numbers."""
    rng = np.random.default_rng(8)
    x = rng.uniform(-5, SHAPE[1] + 5, 60)
    y = rng.uniform(-5, SHAPE[0] + 5, 60)
    img = noisy(SKY + gaussian(SHAPE, x, y, rng.uniform(100, 5e3, 60), FWHM), rng)
    a = measure_spots(img, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON, chunk_size=7)
    b = measure_spots(img, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON)
    for col in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[col]), np.asarray(b[col]))
    one = measure_spots(img, x[[10]], y[[10]], fwhm=FWHM, gain=GAIN, read_noise=RON)
    assert one["flux"][0] == b["flux"][10] and one["sky"][0] == b["sky"][10]


# --- crowding ---------------------------------------------------------------------------
def _pair_image(sep=16.0, f_bright=4e5, f_faint=3e3, beta=3.0):
    x = np.array([80.0, 80.0 + sep])
    y = np.array([80.0, 80.3])
    model = SKY + moffat(SHAPE, x[0], y[0], f_bright, FWHM, beta) + \
        moffat(SHAPE, x[1], y[1], f_faint, FWHM, beta)
    seg = np.zeros(SHAPE, np.int32)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for lab, (x0, y0, rad) in enumerate(((x[0], y[0], 7.0), (x[1], y[1], 4.0)), start=1):
        seg[(xx - x0) ** 2 + (yy - y0) ** 2 <= rad**2] = lab
    return model, x, y, seg


def test_annulus_leaves_out_other_footprints():
    """A bright neighbour in the annulus: excluding its footprint gives back the sky."""
    model, x, y, seg = _pair_image(sep=16.0)
    faint_alone = SKY + moffat(SHAPE, x[1], y[1], 3e3, FWHM)
    ref = measure_spots(faint_alone, x[1:], y[1:], fwhm=FWHM, gain=GAIN, read_noise=RON)
    plain = measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON)
    seg_t = measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON, segmentation=seg,
                          labels=[1, 2])
    # the neighbour's core is excluded: fewer sky pixels, a sky much closer to the truth
    assert seg_t["n_sky"][1] < plain["n_sky"][1]
    assert abs(seg_t["sky"][1] - SKY) < abs(plain["sky"][1] - SKY)
    # its own footprint stays in the annulus of the bright spot (no change there)
    assert seg_t["n_sky"][0] <= plain["n_sky"][0]
    assert np.isfinite(seg_t["flux"]).all() and ref["flux"][0] > 0
    with pytest.raises(ValueError, match="segmentation shape"):
        measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON, segmentation=seg[:5])
    with pytest.raises(ValueError, match="labels"):
        measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON, segmentation=seg,
                      labels=[1])


def test_contamination_estimate_and_flag():
    from robopol_clean.photometry import moffat_aperture_fraction

    model, x, y, _ = _pair_image(sep=14.0)
    t = measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON)
    # the bright spot's light in the faint aperture, computed on the pixel grid
    r = 2 * FWHM
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inside = (xx - x[1]) ** 2 + (yy - y[1]) ** 2 < r**2
    true_c = moffat(SHAPE, x[0], y[0], 4e5, FWHM)[inside].sum() * GAIN
    assert t["contamination"][1] == pytest.approx(true_c, rel=0.15)
    assert t["contaminated"][1] and not t["contaminated"][0]
    assert t["contamination"][1] > 2 * t["flux_err"][1]
    loose = measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON,
                          contamination_limit=1e6)
    assert not loose["contaminated"].any()
    far = measure_spots(model, x, y, fwhm=FWHM, gain=GAIN, read_noise=RON,
                        contamination_radius=5.0)
    assert np.all(far["contamination"] == 0)
    # fraction of a Moffat inside a centred circle: 1 - (1 + r^2 / alpha^2)^(1 - beta)
    alpha = FWHM / (2 * np.sqrt(2 ** (1 / 3) - 1))
    assert moffat_aperture_fraction(0.0, r, FWHM, 3.0) == pytest.approx(
        1 - (1 + r**2 / alpha**2) ** (-2), rel=1e-4)
    f = moffat_aperture_fraction(np.arange(0, 40.0, 2), r, FWHM, 3.0)
    assert np.all(np.diff(f) < 0)


def test_pipeline_photometry_columns(small_sim, profile, morphology):
    """The aperture method measures with the sky map and footprints, and flags blends."""
    from robopol_clean.config import PhotometryConfig
    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.quality import QualityFlag

    res = reduce_frame(small_sim.ccd, profile=profile, classifier=morphology,
                       photometry="aperture")
    spots, groups = res.spots, res.groups
    for col in ("flux", "flux_err", "n_sky", "contamination", "contaminated"):
        assert col in spots.colnames
    assert "pair_ratio_z" in groups.colnames and res.meta["photometry"] == "aperture"
    clean = groups[groups["clean"]]
    limit = PhotometryConfig().pair_ratio_z_max
    assert len(clean) and np.all(np.abs(clean["pair_ratio_z"]) <= limit)
    ids = np.concatenate([np.asarray(clean[f"spot_{ch}"]) for ch in profile.channels])
    assert not np.asarray(spots["contaminated"])[ids].any()
    # a contaminated spot flags its quadruplet instead of dropping it
    rows = res.stokes[(np.asarray(res.stokes["flags"]) & QualityFlag.BLENDED) > 0]
    for gid in rows["group_id"]:
        g = groups[groups["group_id"] == gid][0]
        members = [g[f"spot_{ch}"] for ch in profile.channels]
        assert np.asarray(spots["contaminated"])[members].any()
