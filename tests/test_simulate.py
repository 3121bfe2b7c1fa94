import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from robopol_clean.cli import main
from robopol_clean.instrument import load_profile
from robopol_clean.products import PRODUCT_SUFFIXES, product_paths
from robopol_clean.simulate import frame_seeds, simulate_frame, simulate_frames, truth_paths

WALOP = Path(__file__).parent / "data" / "walop_like.toml"
SMALL = (512, 512)


@pytest.fixture(scope="module")
def robopol():
    return load_profile("robopol")


def _tables_equal(a: Table, b: Table) -> bool:
    return a.colnames == b.colnames and all(np.array_equal(a[c], b[c]) for c in a.colnames)


def test_deterministic():
    kw = dict(shape=(256, 256), n_stars=30, n_artifact_sources=2, n_cosmic_rays=3, n_donuts=1)
    a = simulate_frame(seed=11, **kw)
    b = simulate_frame(seed=11, **kw)
    assert np.array_equal(a.ccd.data, b.ccd.data)
    for name in ("stars", "spots", "artifacts"):
        assert _tables_equal(getattr(a, name), getattr(b, name))
    c = simulate_frame(seed=12, **kw)
    assert not np.array_equal(a.ccd.data, c.ccd.data)
    assert not np.array_equal(a.stars["x"], c.stars["x"])


def test_header_and_types(robopol):
    sim = simulate_frame(seed=1, shape=(256, 256), n_stars=10)
    assert sim.ccd.data.dtype == np.float32
    assert sim.ccd.unit.to_string() == "adu"
    h = sim.ccd.header
    assert h["GAIN"] == pytest.approx(robopol.gain)
    assert h["RDNOISE"] == pytest.approx(robopol.read_noise)
    assert h["EXPTIME"] == 120.0
    assert h["SIMSEED"] == 1
    assert sim.ccd.data.max() <= robopol.saturation
    assert sim.stars["x"].unit == "pix" and sim.stars["flux"].unit == "electron"
    biased = simulate_frame(seed=1, shape=(256, 256), n_stars=10, include_bias=True)
    assert np.allclose(biased.ccd.data - robopol.bias, sim.ccd.data, atol=0.01)


def test_flux_conservation(robopol):
    sim = simulate_frame(seed=3, shape=SMALL, n_stars=40, n_artifact_sources=3, n_cosmic_rays=3,
                         n_donuts=2, noise=False, saturate=False)
    g = robopol.gain
    image = sim.ccd.data.astype(np.float64).sum() * g
    sky = sim.sky.astype(np.float64).sum() * g
    sources = sim.spots["flux_in_frame"][sim.spots["kind"] != "donut"].sum()
    assert image == pytest.approx(sky + sources, rel=1e-5)
    # stamps lying wholly inside the frame deposit their full flux
    x, y = sim.spots["x"], sim.spots["y"]
    inner = (x > 100) & (x < 400) & (y > 100) & (y < 400) & (sim.spots["kind"] == "star")
    assert np.allclose(sim.spots["flux_in_frame"][inner], sim.spots["flux"][inner], rtol=1e-9)
    # star flux = sum of its spots
    star = sim.spots[sim.spots["star_id"] == 0]
    assert star["flux"].sum() == pytest.approx(sim.stars["flux"][0])


def test_qu_convention_from_tables(robopol):
    sim = simulate_frame(seed=4, shape=(256, 256), n_stars=25, n_artifact_sources=0)
    spots = sim.spots[sim.spots["star_id"] >= 0]
    (c0, c90), (c45, c135) = robopol.q_channels, robopol.u_channels
    f = {ch: spots["flux"][spots["channel"] == ch] for ch in robopol.channels}
    q = (f[c0] - f[c90]) / (f[c0] + f[c90])
    u = (f[c45] - f[c135]) / (f[c45] + f[c135])
    assert np.allclose(q, sim.stars["q"]) and np.allclose(u, sim.stars["u"])  # zero calibration
    assert np.abs(sim.stars["q"]).max() > 1e-3
    # u-pair / q-pair light ratio varies as exp(0.85 xn)
    xn = (sim.stars["x"] - robopol.geometry.center[0]) / robopol.geometry.scale
    ratio = (f[c45] + f[c135]) / (f[c0] + f[c90])
    assert np.allclose(ratio, np.exp(0.85 * xn), rtol=1e-6)


def test_qu_recovered_from_image_apertures(robopol):
    sim = simulate_frame(seed=5, shape=SMALL, origin=(100, 100), n_stars=8, n_artifact_sources=0,
                         n_cosmic_rays=0, n_donuts=0, noise=False, saturate=False,
                         mag_range=(11.0, 13.0), max_polarization=0.1)
    data = sim.ccd.data.astype(np.float64) - sim.sky
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    sx = np.array([sim.spots["x"]]).ravel()
    sy = np.array([sim.spots["y"]]).ravel()
    checked = 0
    for star in sim.stars[sim.stars["complete"]]:
        own = sim.spots[sim.spots["star_id"] == star["star_id"]]
        # isolated: no foreign spot within 30 px of any of its spots
        foreign = sim.spots["star_id"] != star["star_id"]
        d = np.hypot(sx[foreign][:, None] - own["x"][None], sy[foreign][:, None] - own["y"][None])
        if d.min() < 30 or star["flux"] < 1e4:
            continue
        f = {}
        for row in own:
            ap = (xx - row["x"]) ** 2 + (yy - row["y"]) ** 2 <= 15 ** 2
            f[row["channel"]] = data[ap].sum()
        (c0, c90), (c45, c135) = robopol.q_channels, robopol.u_channels
        assert (f[c0] - f[c90]) / (f[c0] + f[c90]) == pytest.approx(star["q"], abs=2e-3)
        assert (f[c45] - f[c135]) / (f[c45] + f[c135]) == pytest.approx(star["u"], abs=2e-3)
        checked += 1
    assert checked >= 2


def test_geometry(robopol):
    sim = simulate_frame(seed=6, shape=SMALL, n_stars=30, geometry_jitter=0.0)
    pos = robopol.spot_positions(sim.stars["x"], sim.stars["y"])
    for ch in robopol.channels:
        assert np.allclose(sim.stars[f"x_{ch}"], pos[ch][0], atol=1e-6)
        assert np.allclose(sim.stars[f"y_{ch}"], pos[ch][1], atol=1e-6)
    # pattern centre = mean of the spots
    spot_x = [sim.stars[f"x_{c}"] for c in robopol.channels]
    assert np.allclose(sim.stars["x"], np.mean(spot_x, axis=0))
    jit = simulate_frame(seed=6, shape=SMALL, n_stars=30)
    pos = robopol.spot_positions(jit.stars["x"], jit.stars["y"])
    d = np.hypot(*(np.array([jit.stars[f"x_{c}"] - pos[c][0] for c in robopol.channels]),
                   np.array([jit.stars[f"y_{c}"] - pos[c][1] for c in robopol.channels])))
    assert 0.1 < d.max() < 2.6
    assert np.ptp(d, axis=1).max() < 1e-6  # one shift per channel, the same for all stars


def test_subregion_uses_detector_coordinates(robopol):
    x0, y0 = 900, 700
    sim = simulate_frame(seed=7, shape=(256, 256), origin=(x0, y0), n_stars=15, geometry_jitter=0.0,
                         noise=False, n_artifact_sources=0, n_cosmic_rays=0, n_donuts=0)
    pos = robopol.spot_positions(sim.stars["x"] + x0, sim.stars["y"] + y0)
    for ch in robopol.channels:
        assert np.allclose(sim.stars[f"x_{ch}"] + x0, pos[ch][0], atol=1e-6)
    trans = robopol.transmission((y0 + 256, x0 + 256))[y0:, x0:]
    ratio = sim.sky / trans
    assert np.ptp(ratio) / ratio.mean() < 0.1  # sky = level * smooth terms * transmission
    assert sim.ccd.header["DETX0"] == x0


def test_artifact_truth(robopol):
    sim = simulate_frame(seed=8, shape=(1024, 1024), n_stars=60, n_artifact_sources=12,
                         geometry_jitter=0.0)
    art = sim.artifacts
    refl = art[np.isin(art["kind"], ["streak", "ghost"])]
    assert len(refl) >= 12
    pairs = refl[refl["pair_id"] >= 0]
    assert len(pairs) >= 2
    for pid in np.unique(pairs["pair_id"]):
        m = pairs[pairs["pair_id"] == pid]
        assert len(m) == 2 and m["kind"][0] == m["kind"][1]
        ch1, ch2 = m["mimics"][0].split(",")
        assert {ch1, ch2} in ({*robopol.q_channels}, {*robopol.u_channels})
        # the second member sits where the geometry puts ch2 of a pattern whose ch1 is member 1
        xc, yc = robopol.geometry.pattern_center(ch1, m["x"][0], m["y"][0])
        px, py = robopol.spot_positions(xc, yc)[ch2]
        assert math.hypot(px - m["x"][1], py - m["y"][1]) < 1.5
        sep = math.hypot(m["x"][1] - m["x"][0], m["y"][1] - m["y"][0])
        assert 85 < sep < 125
    streaks = refl[(refl["kind"] == "streak") & (refl["tail_dir"] != 0)]
    assert np.all((streaks["length"] > 10) & (streaks["length"] < 60))
    assert np.all((refl["width"] >= 3) & (refl["width"] <= 8) | (refl["kind"] == "ghost"))
    assert refl["snr_peak"].min() < 10 and refl["snr_peak"].max() > 50
    # every artifact is a spots row
    sp = sim.spots[sim.spots["is_artifact"]]
    assert np.array_equal(sp["artifact_id"], art["artifact_id"])
    assert np.all(sp["star_id"] == -1) and np.all(sp["channel"] == "")
    assert set(sim.spots["kind"]) <= {"star", "streak", "ghost", "cosmic_ray", "donut"}
    # the injected peak is where the table says
    noiseless = simulate_frame(seed=8, shape=(1024, 1024), n_stars=60, n_artifact_sources=12,
                               geometry_jitter=0.0, noise=False, saturate=False)
    model = noiseless.ccd.data * robopol.gain - noiseless.sky * robopol.gain
    r = refl[np.argmax(refl["snr_peak"])]
    ix, iy = int(round(r["x"])), int(round(r["y"]))
    if 5 < ix < 1018 and 5 < iy < 1018:
        assert model[iy, ix] == pytest.approx(r["peak"], rel=0.1)


def test_default_counts():
    sim = simulate_frame(seed=21)
    assert 150 <= len(sim.stars) - sim.stars["is_target"].sum() <= 900
    assert 3.5 <= sim.ccd.header["FWHM"] <= 5.5
    assert sim.stars["is_target"].sum() == 1
    assert (sim.stars["mag"] > 17).sum() > (sim.stars["mag"] < 13).sum()


def test_second_profile():
    prof = load_profile(WALOP)
    sim = simulate_frame(prof, seed=9, n_stars=60, geometry_jitter=0.0, n_artifact_sources=4)
    assert sim.ccd.shape == prof.shape
    for ch in prof.channels:
        assert f"x_{ch}" in sim.stars.colnames
    assert set(sim.spots["channel"][sim.spots["star_id"] >= 0]) == set(prof.channels)
    assert sim.ccd.header["GAIN"] == prof.gain
    # calibration: undo instrumental (q, u) and the angle zero point -> the true values
    (c0, c90), (c45, c135) = prof.q_channels, prof.u_channels
    sp = sim.spots[sim.spots["star_id"] >= 0]
    f = {ch: sp["flux"][sp["channel"] == ch] for ch in prof.channels}
    q = (f[c0] - f[c90]) / (f[c0] + f[c90])
    u = (f[c45] - f[c135]) / (f[c45] + f[c135])
    qi, ui = prof.instrumental_qu(sim.stars["x"], sim.stars["y"])
    d = math.radians(2 * prof.angle_zero)
    qc = (q - qi) * math.cos(d) - (u - ui) * math.sin(d)
    uc = (q - qi) * math.sin(d) + (u - ui) * math.cos(d)
    assert np.allclose(qc, sim.stars["q"], atol=1e-9) and np.allclose(uc, sim.stars["u"], atol=1e-9)
    pairs = sim.artifacts[sim.artifacts["pair_id"] >= 0]
    for m in pairs.group_by("pair_id").groups:
        assert set(m["mimics"][0].split(",")) in ({*prof.q_channels}, {*prof.u_channels})


def test_simulate_frames_and_cli(tmp_path, capsys):
    out = tmp_path / "sims"
    rc = main(["simulate", "-o", str(out), "--n-frames", "2", "--seed", "3", "--size", "256",
               "--n-stars", "12"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sim_0001.fits" in printed
    for i in range(2):
        stem = out / f"sim_{i:04d}"
        with fits.open(stem.with_suffix(".fits")) as hdul:
            data = hdul[0].data
            hdr = hdul[0].header
        assert data.shape == (256, 256) and data.dtype.kind == "f" and data.dtype.itemsize == 4
        assert hdr["SIMSEED"] == frame_seeds(3, 2)[i]
        truth = truth_paths(out, stem.name)
        assert truth["stars"].name == f"sim_{i:04d}_truth_stars.ecsv"
        for name, path in truth.items():
            t = Table.read(path, format="ascii.ecsv")
            assert len(t) >= (12 if name == "stars" else 0)
        stars = Table.read(truth["stars"])
        assert stars["x"].unit == "pix"
        again = simulate_frame(seed=hdr["SIMSEED"], shape=(256, 256), n_stars=12)
        assert np.array_equal(again.ccd.data, data)
    assert not list(out.glob(".*part"))
    # existing outputs are not overwritten silently
    with pytest.raises(OSError):
        simulate_frames(out, 1, 3, shape=(256, 256), n_stars=3)
    simulate_frames(out, 1, 3, shape=(256, 256), n_stars=3, overwrite=True)


def test_small_sim_has_reflections(small_sim):
    """The shared small frame (conftest) keeps the reflections the pipeline tests score."""
    art = small_sim.artifacts
    refl = art[np.isin(art["kind"], ["streak", "ghost"]) & (art["x"] >= 0) & (art["x"] < 768)
               & (art["y"] >= 0) & (art["y"] < 768)]
    assert {"streak", "ghost"} <= set(refl["kind"]) and len(refl) >= 4
    assert (refl["pair_id"] >= 0).any()


def test_bad_shape():
    with pytest.raises(ValueError, match="too small"):
        simulate_frame(seed=1, shape=(8, 8))


def test_truth_files_never_collide_with_reduce_products(tmp_path):
    """Reducing into the simulation folder, even with --overwrite, cannot replace the truth."""
    written = simulate_frames(tmp_path, 2, 5, shape=(64, 64), n_stars=2, prefix="night")
    truth = {p for f in written for p in truth_paths(tmp_path, f.stem).values()}
    assert truth == set(tmp_path.glob("*.ecsv"))
    # the products of every frame written, and of a reduce's own <stem>_clean.fits fed back
    stems = [f.stem for f in written] + [f"{f.stem}_clean" for f in written]
    assert not truth & {p for s in stems for p in product_paths(tmp_path, s).values()}
    # the only input whose products could clash, <stem>_truth.fits, is never written
    for path in truth:
        for suffix in PRODUCT_SUFFIXES.values():
            if path.name.endswith(suffix):
                assert not (tmp_path / f"{path.name.removesuffix(suffix)}.fits").exists()


def _fluxes_qu(sim, prof):
    """q and u of every star from its spot fluxes (what the frame carries)."""
    (c0, c90), (c45, c135) = prof.q_channels, prof.u_channels
    sp = sim.spots[sim.spots["star_id"] >= 0]
    f = {ch: np.asarray(sp["flux"][sp["channel"] == ch]) for ch in prof.channels}
    return (f[c0] - f[c90]) / (f[c0] + f[c90]), (f[c45] - f[c135]) / (f[c45] + f[c135])


def test_injected_instrumental_effects(robopol):
    """An angle zero point and an instrumental map go in as the inverse of the correction."""
    injected = {"angle_zero": 3.0, "q_inst": [0.004, 0.001], "u_inst": -0.003}
    sim = simulate_frame(seed=4, shape=(256, 256), origin=(900, 900), n_stars=25,
                         n_artifact_sources=0, calibration=injected)
    prof = robopol.replace(angle_zero=3.0, q_inst=np.array([0.004, 0.001]), u_inst=np.array([-0.003]))
    q, u = _fluxes_qu(sim, prof)
    assert np.allclose(q, sim.stars["q_obs"]) and np.allclose(u, sim.stars["u_obs"])
    # reducing with the same values (the Stokes convention) gives the sky's q and u back
    xd, yd = np.asarray(sim.stars["x"]) + 900, np.asarray(sim.stars["y"]) + 900
    qi, ui = prof.instrumental_qu(xd, yd)
    assert np.ptp(qi) > 1e-4  # the x term varies over the frame
    d = math.radians(6.0)
    qc = (q - qi) * math.cos(d) - (u - ui) * math.sin(d)
    uc = (q - qi) * math.sin(d) + (u - ui) * math.cos(d)
    assert np.allclose(qc, sim.stars["q"], atol=1e-12) and np.allclose(uc, sim.stars["u"], atol=1e-12)
    # recorded in the tables and the header
    for table in (sim.stars, sim.spots, sim.artifacts):
        rec = table.meta["instrumental"]
        assert rec["angle_zero"] == 3.0 and rec["q_inst"] == [0.004, 0.001]
        assert rec["u_inst"] == [-0.003] and rec["terms"][:2] == ["1", "x"]
    h = sim.ccd.header
    assert (h["SIMAZERO"], h["SIMQINST"], h["SIMUINST"]) == (3.0, 0.004, -0.003)


def test_defaults_unchanged_by_the_new_inputs():
    """Without injected effects (or with an identity) a frame is what it always was."""
    kw = dict(seed=7, shape=(256, 256), n_stars=20)
    plain = simulate_frame(**kw)
    same = simulate_frame(**kw, calibration={"angle_zero": 0.0, "q_inst": 0.0})
    assert np.array_equal(plain.ccd.data, same.ccd.data)
    assert "instrumental" not in plain.stars.meta and "SIMAZERO" not in plain.ccd.header
    assert plain.ccd.header["OBJECT"] == "SIMULATED"
    assert np.array_equal(plain.stars["q_obs"], plain.stars["q"])


def test_standard_star_frame(robopol):
    sim = simulate_frame(seed=5, shape=(512, 512), origin=(770, 787), n_stars=10,
                         standard="hilt960", calibration={"angle_zero": -2.0})
    target = sim.stars[sim.stars["is_target"]]
    assert len(target) == 1 and sim.ccd.header["OBJECT"] == "Hiltner 960"
    assert (target["q"][0], target["u"][0], target["mag"][0]) == (-0.01703, 0.04924, 11.0)
    assert target["x"][0] + 770 == pytest.approx(robopol.target[0])
    # the rotation by -angle_zero: theta_obs = theta - (-2 deg)
    theta = 0.5 * math.degrees(math.atan2(target["u_obs"][0], target["q_obs"][0])) % 180
    assert theta == pytest.approx(54.54 + 2.0, abs=0.02)
    bright = simulate_frame(seed=5, shape=(512, 512), origin=(770, 787), n_stars=10,
                            standard="HD 212311", target={"mag": 12.5})
    assert bright.stars["mag"][bright.stars["is_target"]][0] == 12.5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"standard": "M31"}, "unknown standard 'M31' \\(known: BD\\+59 389"),
    ({"standard": "HD 212311", "target": {"q": 0.1}}, "give standard or target q/u, not both"),
    ({"calibration": {"zero": 1.0}}, "unknown key\\(s\\) zero"),
    ({"calibration": {"q_inst": [0.0] * 7}}, "q_inst must be 1 to 6 finite coefficients"),
    ({"calibration": {"angle_zero": float("nan")}}, "angle_zero must be finite"),
])
def test_bad_simulation_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_frame(seed=1, shape=(256, 256), n_stars=3, **kwargs)


def test_simulate_cli_standard_with_effects(tmp_path, capsys):
    out = tmp_path / "std"
    assert main(["simulate", "-o", str(out), "--size", "256", "--n-stars", "5", "--standard",
                 "BD+59 389", "--angle-zero", "2.5", "--q-inst", "0.001", "--u-inst", "-0.002",
                 "--target-mag", "11.5"]) == 0
    h = fits.getheader(out / "sim_0000.fits")
    assert (h["OBJECT"], h["SIMAZERO"], h["SIMQINST"], h["SIMUINST"]) == ("BD+59 389", 2.5, 0.001, -0.002)
    assert Table.read(out / "sim_0000_truth_stars.ecsv").meta["instrumental"]["angle_zero"] == 2.5
    capsys.readouterr()
    assert main(["simulate", "-o", str(tmp_path / "x"), "--size", "256", "--standard", "Vega"]) == 2
    assert "unknown standard 'Vega'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "sim_0000.fits").exists()
