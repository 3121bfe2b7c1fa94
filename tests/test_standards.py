"""Polarization standards through the whole chain: simulated frames whose central target
is a standard star (R band, Schmidt, Elston & Lupie 1992), reduced by the pipeline.

The target sits inside the focal-plane mask, on a sky 2-4 times fainter than the open
field and among the mask's sky steps, and is much brighter than the field stars: its
quadruplet must be found, measured and pass the pair-ratio check, and its q and u must
agree with the catalogue values within their errors.
"""

import numpy as np
import pytest

from robopol_clean.pipeline import reduce_frame
from robopol_clean.simulate import simulate_frame

#: name: (q, u, p, theta [deg]), R band
STANDARDS = {
    "BD+59 389": (-0.06172, -0.01803, 0.06430, 98.14),
    "HD 212311": (-0.00007, 0.00033, 0.00034, 51.0),
}


@pytest.fixture(scope="module", params=sorted(STANDARDS))
def reduced_standard(request, profile, morphology):
    name = request.param
    q, u = STANDARDS[name][:2]
    # a full-size frame (detection and the mask model work in detector coordinates) with
    # few field stars; R = 11 in 120 s: ~8e6 electrons, unsaturated
    sim = simulate_frame(profile, seed=5, n_stars=50, fwhm=4.5,
                         target=dict(mag=11.0, q=q, u=u))
    return name, sim, reduce_frame(sim.ccd, profile=profile, classifier=morphology)


def _target_row(sim, result):
    target = sim.stars[np.asarray(sim.stars["is_target"], bool)]
    assert len(target) == 1
    st = result.stokes
    d = np.hypot(np.asarray(st["x"]) - target["x"][0], np.asarray(st["y"]) - target["y"][0])
    assert len(st) and d.min() < 2.0, "the target's quadruplet got no Stokes row"
    return st[int(np.argmin(d))]


def test_target_is_detected_grouped_and_clean(reduced_standard, profile):
    name, sim, result = reduced_standard
    gx, gy = profile.target
    groups = result.groups
    g = groups[int(np.argmin(np.hypot(groups["x"] - gx, groups["y"] - gy)))]
    assert np.hypot(g["x"] - gx, g["y"] - gy) < 3.0
    assert g["complete"] and g["clean"], name
    members = result.spots[np.isin(result.spots["spot_id"],
                                   [g[f"spot_{ch}"] for ch in profile.channels])]
    assert len(members) == 4 and not members["saturated"].any()
    assert not members["rejected"].any() and g["flags"] == 0


def test_standard_recovered_within_errors(reduced_standard):
    name, sim, result = reduced_standard
    q, u, p, theta = STANDARDS[name]
    row = _target_row(sim, result)
    # photon limit for ~8e6 electrons: sigma_q ~ 1/sqrt(N_pair) ~ 5e-4
    assert 3e-4 < row["q_err"] < 1.5e-3 and 3e-4 < row["u_err"] < 1.5e-3
    assert abs(row["q"] - q) < 3 * row["q_err"], (name, row["q"], row["q_err"])
    assert abs(row["u"] - u) < 3 * row["u_err"], (name, row["u"], row["u_err"])
    if p > 0.01:  # the polarized standard: p and the angle too
        assert abs(row["p_debiased"] - p) < 3 * row["p_err"]
        assert abs(row["theta"] - theta) < 3 * row["theta_err"]
    else:  # the unpolarized one is consistent with zero
        assert row["snr"] < 3
