import tomllib
from importlib import resources

import numpy as np
import pytest

from robopol_clean.instrument import (
    InstrumentProfile,
    ProfileError,
    available_profiles,
    load_profile,
    profile_from_dict,
)


@pytest.fixture(scope="module")
def robopol():
    return load_profile("robopol")


@pytest.fixture
def raw():
    text = (resources.files("robopol_clean") / "profiles" / "robopol.toml").read_text()
    return tomllib.loads(text)


def test_shipped_profiles():
    assert "robopol" in available_profiles()
    prof = load_profile()
    assert isinstance(prof, InstrumentProfile)
    assert load_profile(prof) is prof
    assert prof.gain == pytest.approx(2.687)
    assert prof.shape == (2048, 2048)


def test_channel_convention(robopol):
    assert robopol.q_channels == ("right", "left")
    assert robopol.u_channels == ("bottom", "top")
    assert robopol.partner_pair("left") == ("bottom", "top")
    assert robopol.partner_pair("top") == ("right", "left")


def test_geometry_matches_measured_separations(robopol):
    # Separations measured on real frames (facts file): at the centre ~99.4 px (TB) and
    # ~99.5 px (LR); ~24 px change across the field.
    xs = np.array([1024.0, 1024.0, 100.0, 1948.0])
    ys = np.array([1024.0, 100.0, 1024.0, 1024.0])
    pos = robopol.spot_positions(xs, ys)
    sep_tb = pos["top"][1] - pos["bottom"][1]
    sep_lr = pos["right"][0] - pos["left"][0]
    assert sep_tb[0] == pytest.approx(99.41, abs=0.01)
    assert sep_lr[0] == pytest.approx(99.51, abs=0.01)
    yn = (100.0 - 1024.0) / 1024.0
    assert sep_tb[1] == pytest.approx(99.41 - 12.08 * yn + 9.87 * yn**2, abs=0.01)
    xn = (1948.0 - 1024.0) / 1024.0
    assert sep_lr[3] == pytest.approx(99.51 - 11.37 * xn + 10.01 * xn**2, abs=0.01)
    assert sep_lr.max() - sep_lr.min() > 15


def test_pattern_centre_is_mean_of_spots(robopol):
    rng = np.random.default_rng(1)
    x, y = rng.uniform(100, 1948, (2, 50))
    pos = robopol.spot_positions(x, y)
    mean_x = np.mean([p[0] for p in pos.values()], axis=0)
    mean_y = np.mean([p[1] for p in pos.values()], axis=0)
    # The measured offset model is centred on the spot mean to within a fraction of a pixel.
    assert np.all(np.abs(mean_x - x) < 0.5)
    assert np.all(np.abs(mean_y - y) < 0.5)


def test_pattern_centre_inverts_offsets(robopol):
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 2048, (2, 100))
    pos = robopol.spot_positions(x, y)
    for ch in robopol.channels:
        xc, yc = robopol.geometry.pattern_center(ch, *pos[ch])
        np.testing.assert_allclose(xc, x, atol=1e-3)
        np.testing.assert_allclose(yc, y, atol=1e-3)


def test_shifted_geometry(robopol):
    g = robopol.geometry.shifted({"top": (1.5, -2.0)})
    a = robopol.geometry.spot_positions(500.0, 600.0)
    b = g.spot_positions(500.0, 600.0)
    assert b["top"][0] - a["top"][0] == pytest.approx(1.5)
    assert b["top"][1] - a["top"][1] == pytest.approx(-2.0)
    assert b["left"][0] == pytest.approx(a["left"][0])


def test_transmission_mask(robopol):
    t = robopol.transmission((2048, 2048))
    assert t.dtype == np.float32
    # the pattern centre: inside the 0.5 central circle, between the target's own spots
    # (squares of 45 px at 0.25 around it), so the circle's value
    assert t[1043, 1026] == pytest.approx(0.5)
    assert t[1043, 300] == pytest.approx(0.5)  # central strip of the horizontal arm
    assert t[992, 300] == pytest.approx(0.75)  # outer strip
    assert t[1020, 300] == pytest.approx(1.0)  # gap between strips
    assert t[300, 300] == pytest.approx(1.0)
    pos = robopol.spot_positions(*robopol.target)
    x, y = (int(round(v)) for v in (pos["right"][0], pos["right"][1]))
    assert t[y, x] == pytest.approx(0.25)


def test_usable_region(robopol):
    ok = robopol.usable([500, 1000, 30, 2000, 500], [500, 1000, 500, 500, 2010])
    assert ok.tolist() == [True, False, False, False, False]


def test_calibration_default_zero(robopol):
    q, u = robopol.instrumental_qu(np.array([10.0, 1500.0]), np.array([20.0, 40.0]))
    assert np.all(q == 0) and np.all(u == 0)
    assert robopol.angle_zero == 0.0


def test_calibration_map(raw):
    raw["calibration"]["q_inst"] = [0.001, 0.002]
    raw["calibration"]["angle_zero"] = 3.0
    prof = profile_from_dict(raw)
    q, u = prof.instrumental_qu(np.array([1024.0, 2048.0]), np.array([1024.0, 1024.0]))
    np.testing.assert_allclose(q, [0.001, 0.003])
    np.testing.assert_allclose(u, 0.0)
    assert prof.angle_zero == 3.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["detector"].pop("gain"), r"\[detector.gain\] is required"),
        (lambda d: d["detector"].update(gain=-1.0), r"\[detector.gain\] must be positive"),
        (lambda d: d["detector"].update(gain="high"), r"\[detector.gain\] must be of type"),
        (lambda d: d["channels"]["angle"].update(top=0.0), "exactly one channel"),
        (lambda d: d["channels"].update(names=["a", "b"]), "at least four"),
        (lambda d: d["geometry"]["offsets"]["top"].update(dx=[1.0]), "6 numbers"),
        (lambda d: d["geometry"].update(terms=["x", "y"]), "must include '1'"),
        (lambda d: d["mask"]["shapes"][0].update(kind="blob"), "must be one of"),
        (lambda d: d["mask"]["shapes"][0].pop("radius"), "needs radius"),
        (lambda d: d["mask"]["shapes"][0].update(transmission=2), r"in \[0, 1\]"),
        (lambda d: d["usable"].update(exclude=[[[0, 0]]]), "three"),
    ],
)
def test_validation_errors(raw, edit, message):
    edit(raw)
    with pytest.raises(ProfileError, match=message) as info:
        profile_from_dict(raw, source="bad.toml")
    assert str(info.value).startswith("bad.toml: ")


def test_file_errors(tmp_path):
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile("nonexistent-instrument")
    missing = tmp_path / "missing.toml"
    with pytest.raises(ProfileError, match="missing.toml: cannot read"):
        load_profile(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[detector\ngain = 1\n")
    with pytest.raises(ProfileError, match="bad.toml: not valid TOML"):
        load_profile(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ProfileError, match="binary.toml"):
        load_profile(binary)


def test_user_profile_file(tmp_path):
    text = (resources.files("robopol_clean") / "profiles" / "robopol.toml").read_text()
    text = text.replace('name = "RoboPol"', 'name = "MyPol"').replace("gain = 2.687", "gain = 1.5")
    path = tmp_path / "mypol.toml"
    path.write_text(text)
    prof = load_profile(path)
    assert prof.name == "MyPol" and prof.gain == 1.5
    assert prof.source == str(path)


def test_profile_for_region(robopol):
    sub = robopol.for_region(500.0, 300.0, (400, 600))
    assert sub.shape == (400, 600)
    full = robopol.spot_positions(800.0, 700.0)
    part = sub.spot_positions(300.0, 400.0)
    for ch in robopol.channels:
        assert part[ch][0] == pytest.approx(full[ch][0] - 500.0)
        assert part[ch][1] == pytest.approx(full[ch][1] - 300.0)
    np.testing.assert_array_equal(sub.transmission(), robopol.transmission()[300:700, 500:1100])
    assert robopol.for_region(0, 0) is robopol
