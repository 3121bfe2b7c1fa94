import numpy as np
import pytest
from astropy.table import Table

from robopol_clean.classify import (
    FrameScene,
    MorphologyClassifier,
    combine_evidence,
    decide,
    morphology_score,
    noisy_or,
    partner_evidence,
)
from robopol_clean.classify.orphan import fit_pair_ratio, forced_sums
from robopol_clean.instrument import load_profile

PROFILE = load_profile("robopol")
SIGMA = 4.3 / 2.355


def _gauss(img, x, y, flux, sx=SIGMA, sy=SIGMA):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img += flux / (2 * np.pi * sx * sy) * np.exp(-0.5 * (((xx - x) / sx) ** 2 + ((yy - y) / sy) ** 2))


@pytest.fixture(scope="module")
def scene():
    """A 600x600 corner of the detector: one star pattern, one orphan LR pair, one faint orphan."""
    rng = np.random.default_rng(0)
    img = np.zeros((600, 600), np.float32)
    star = (300.0, 300.0)
    pos = PROFILE.spot_positions(*star)
    xs, ys = [], []
    for ch in PROFILE.channels:
        _gauss(img, pos[ch][0], pos[ch][1], 20000.0)
        xs.append(float(pos[ch][0]))
        ys.append(float(pos[ch][1]))
    # An orphan pair placed like a left-right pair, with no top-bottom partners.
    pair = PROFILE.spot_positions(200.0, 480.0)
    for ch in ("left", "right"):
        _gauss(img, pair[ch][0], pair[ch][1], 20000.0)
        xs.append(float(pair[ch][0]))
        ys.append(float(pair[ch][1]))
    # A faint isolated spot whose partners would be lost in the noise anyway.
    _gauss(img, 480.0, 120.0, 150.0)
    xs.append(480.0)
    ys.append(120.0)
    rms = np.full(img.shape, 10.0, np.float32)
    img += rng.normal(0, 10.0, img.shape).astype(np.float32)
    n = len(xs)
    spots = Table({"x": xs, "y": ys, "peak": np.full(n, 1000.0), "snr": [100.0] * 6 + [3.0],
                   "group_id": [0, 0, 0, 0, -1, -1, -1]})
    return FrameScene(img, np.zeros_like(img), rms, spots, PROFILE, PROFILE.geometry, 4.3)


def test_orphan_cue_flags_pair_not_star(scene):
    ev = partner_evidence(scene)
    p = ev.p_orphan
    assert np.all(p[:4] < 0.05), p  # the star's spots have all their partners
    assert list(ev.channel[:4]) == list(PROFILE.channels)
    assert np.all(p[4:6] > 0.9), p  # a bright pair with no partners
    assert p[6] < 0.1  # a faint spot: no evidence either way
    # support: only the star's spots have all their partners at star-like fluxes
    assert ev.support.tolist() == [True] * 4 + [False] * 3
    assert ev.log_pair_ratio is None  # no channels in this table: the fallback ratio


def test_combine_evidence(scene):
    ev = partner_evidence(scene)
    p = combine_evidence(np.full(7, 0.9), ev)
    assert np.all(p[:4] < 0.05)  # a confirmed quadruplet overrides the cutout's verdict
    assert np.all(p[4:] >= 0.9)  # no support: the learned score stays (or rises)
    assert np.all(combine_evidence(np.full(7, 0.2), ev)[4:6] > 0.9)  # missing partners
    assert np.array_equal(combine_evidence(np.full(7, 0.3), None), np.full(7, 0.3))


def test_orphan_cue_ignores_partners_hidden_by_mask(scene):
    hidden = np.zeros(scene.data.shape, bool)
    pair = PROFILE.spot_positions(200.0, 480.0)
    for ch in ("top", "bottom"):
        x, y = (int(round(float(v))) for v in pair[ch])
        hidden[max(0, y - 8): y + 8, max(0, x - 8): x + 8] = True
    masked = FrameScene(scene.data, scene.background, scene.background_rms, scene.spots, PROFILE,
                        PROFILE.geometry, scene.fwhm, hidden)
    ev = partner_evidence(masked)
    assert np.all(ev.p_orphan[4:6] < 0.05)  # partners unobservable: no evidence
    assert not ev.support[4:6].any()


def test_morphology_scores():
    spots = Table({
        "elongation": [1.05, 3.5, 1.1, 1.0, 1.2],
        "fwhm": [4.3, 8.0, 1.2, 4.4, 4.2],
        "asymmetry": [0.02, 0.6, 0.0, 0.01, 0.05],
        "snr": [80.0, 80.0, 80.0, 4.0, 50.0],
        "saturated": [False] * 5,
        "group_id": [0, -1, -1, -1, 0],
    })
    s = morphology_score(spots, fwhm=4.3)
    assert s["p_morph"][0] < 0.1  # a round star
    assert s["p_morph"][1] > 0.9  # a lopsided streak
    assert s["p_sharp"][2] > 0.9  # a cosmic ray
    assert s["p_morph"][3] < 0.2  # faint round spot
    assert s["p_morph"][4] < 0.1


def test_morphology_classifier_combines_cue(scene):
    scene.spots["elongation"] = 1.0
    scene.spots["fwhm"] = 4.3
    scene.spots["asymmetry"] = 0.0
    scene.spots["saturated"] = False
    scores = MorphologyClassifier().score(scene)
    assert np.all(scores["p_artifact"][:4] < 0.1)
    assert np.all(scores["p_artifact"][4:6] > 0.9)
    no_cue = MorphologyClassifier(use_orphan_cue=False).score(scene)
    assert np.all(no_cue["p_artifact"][4:6] < 0.1)  # round spots look like stars on their own


def test_decide_and_combine():
    rej, unc = decide(np.array([0.1, 0.35, 0.5, 0.9]), 0.5, (0.3, 0.5))
    assert rej.tolist() == [False, False, True, True]
    assert unc.tolist() == [False, True, False, False]
    np.testing.assert_allclose(noisy_or(np.array([0.5]), np.array([0.5])), [0.75])


def _field_of_quadruplets(slope, rng, n_side=4, flux=8000.0, noise=5.0):
    """A 1000x1000 detector corner tiled with star patterns whose u/q pair ratio is
    exp(slope * xn); returns the image, the spots table (grouped) and the noise level."""
    img = np.zeros((1000, 1000), np.float32)
    geo = PROFILE.geometry
    (c0, c90), (c45, c135) = PROFILE.q_channels, PROFILE.u_channels
    rows = []
    for g, (cx, cy) in enumerate((x, y) for x in np.linspace(180, 820, n_side)
                                 for y in np.linspace(180, 820, n_side)):
        ratio = np.exp(slope * (cx - geo.center[0]) / geo.scale)
        iq = flux / (1 + ratio)
        fluxes = {c0: iq / 2, c90: iq / 2, c45: iq * ratio / 2, c135: iq * ratio / 2}
        pos = PROFILE.spot_positions(cx, cy)
        for ch in PROFILE.channels:
            _gauss(img, pos[ch][0], pos[ch][1], fluxes[ch])
            rows.append((float(pos[ch][0]), float(pos[ch][1]), g, ch))
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return img, rows


def test_pair_ratio_fitted_from_quadruplets_sharpens_orphan_cue():
    rng = np.random.default_rng(3)
    img, rows = _field_of_quadruplets(1.5, rng)
    # An orphan top-bottom pair (u channels) in the frame's faint-u region: each missing
    # q partner is expected ~2x brighter than the pair itself there.
    pair = PROFILE.spot_positions(500.0, 500.0)
    for ch in PROFILE.u_channels:  # grouped as a pair, as the grouping step would
        _gauss(img, pair[ch][0], pair[ch][1], 400.0)
        rows.append((float(pair[ch][0]), float(pair[ch][1]), 99, ch))
    x, y, gid, ch = (list(v) for v in zip(*rows))
    spots = Table({"x": x, "y": y, "peak": np.full(len(x), 100.0), "group_id": gid, "channel": ch})
    rms = np.full(img.shape, 5.0, np.float32)
    scene = FrameScene(img, np.zeros_like(img), rms, spots, PROFILE, PROFILE.geometry, 4.3)
    own = np.asarray([1.0] * len(x))
    fit = fit_pair_ratio(scene, own, own * 0.01)
    assert fit is not None
    ev = partner_evidence(scene)
    geo = PROFILE.geometry
    expected = 1.5 * (np.mean(x[:-2]) - geo.center[0]) / geo.scale
    assert ev.log_pair_ratio == pytest.approx(expected, abs=0.1)
    assert ev.support[:-2].all() and not ev.support[-2:].any()
    assert np.all(ev.p_orphan[:-2] < 0.05)
    assert np.all(ev.p_orphan[-2:] > 0.9), ev.z_orphan[-2:]
    # Without the fitted ratio (no channels known) the same pair is only weakly suspect.
    blind = FrameScene(img, np.zeros_like(img), rms, spots[["x", "y", "peak"]], PROFILE,
                       PROFILE.geometry, 4.3)
    ev_blind = partner_evidence(blind)
    assert ev_blind.log_pair_ratio is None
    assert np.all(ev_blind.z_orphan[-2:] < ev.z_orphan[-2:] - 3)


def test_boosted_star_spot_is_not_an_orphan():
    """A bright star whose spot carries a neighbour's light: its partners lack many
    sigma but only a small fraction of the expected light -- not an orphan."""
    rng = np.random.default_rng(5)
    img = np.zeros((400, 400), np.float32)
    pos = PROFILE.spot_positions(200.0, 200.0)
    xs, ys = [], []
    for ch in PROFILE.channels:
        _gauss(img, pos[ch][0], pos[ch][1], 200000.0)
        xs.append(float(pos[ch][0]))
        ys.append(float(pos[ch][1]))
    _gauss(img, xs[0], ys[0], 200000.0)  # a neighbour exactly on the first spot
    img += rng.normal(0, 10.0, img.shape).astype(np.float32)
    spots = Table({"x": xs, "y": ys, "peak": np.full(4, 1000.0)})
    scene = FrameScene(img, np.zeros_like(img), np.full(img.shape, 10.0, np.float32), spots,
                       PROFILE, PROFILE.geometry, 4.3)
    ev = partner_evidence(scene)
    assert ev.z_orphan[0] > 5  # the deficit is significant...
    assert ev.p_orphan[0] < 0.5  # ...but most of the partner light is there
    assert np.all(ev.p_orphan[1:] < 0.05)


@pytest.mark.parametrize("radius", [0.7, 1.0, 2.5, 3.0, 4.03])
def test_forced_sums_match_brute_force(radius):
    """Pixels whose centre lies strictly within the radius; NaN off the image or on a mask."""
    rng = np.random.default_rng(3)
    data = rng.normal(0, 10, (40, 50)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[20, 30] = True
    x = np.concatenate([rng.uniform(-3, 53, 150), np.arange(2.0, 48.0, 5.5)])  # incl. half-integers
    y = np.concatenate([rng.uniform(-3, 43, 150), np.full(9, 17.0)])
    x[:5], y[:5] = [30.0, 33.0, 30.4, 2.9, 25.0], [20.0, 20.0, 23.0, 10.0, 0.5]  # on/near the mask, edges
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    ref = np.full(x.size, np.nan)
    for i in range(x.size):
        disk = (xx - x[i]) ** 2 + (yy - y[i]) ** 2 < radius**2
        fits = radius <= x[i] <= data.shape[1] - 1 - radius and radius <= y[i] <= data.shape[0] - 1 - radius
        if fits and not (disk & mask).any():
            ref[i] = data[disk].sum(dtype=np.float64)
    got = forced_sums(data, x.reshape(-1, 1), y.reshape(-1, 1), radius, mask=mask)
    assert got.shape == (x.size, 1)
    np.testing.assert_array_equal(np.isnan(got[:, 0]), np.isnan(ref))
    np.testing.assert_allclose(got[:, 0], ref, rtol=1e-12, atol=1e-9)
    assert np.isfinite(ref).sum() > 50
    assert np.isnan(got[0, 0]) and np.isfinite(forced_sums(data, x[:1], y[:1], radius)[0])  # the mask
