"""Shared fixtures: small simulated frames made in well under a second, and the real frame."""

from pathlib import Path

import pytest

from robopol_clean.instrument import load_profile

#: The read-only reference folder beside the checkout (absent for users and wheels).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def profile():
    return load_profile("robopol")


@pytest.fixture(scope="session")
def small_sim(profile):
    """A 768 x 768 corner of a RoboPol frame with stars and reflection artifacts.

    90 field stars and the target, and six reflections: a bright streak pair, a faint
    single streak (peak S/N 10), a ghost pair and a single ghost. Made in about 0.1 s.
    """
    from robopol_clean.simulate import simulate_frame

    return simulate_frame(profile, seed=11, shape=(768, 768), n_stars=90, n_artifact_sources=4)


@pytest.fixture(scope="session")
def small_fits(small_sim, tmp_path_factory):
    """``small_sim`` written to a FITS file (read-only use: copy before changing)."""
    path = tmp_path_factory.mktemp("frames") / "small.fits"
    small_sim.ccd.write(path)
    return path


@pytest.fixture(scope="session")
def morphology():
    from robopol_clean.classify import MorphologyClassifier

    return MorphologyClassifier()


@pytest.fixture(scope="session")
def real_frame():
    """The real J1428 frame (8-bit rendering) and its labels; skipped when absent."""
    path = SHARED_DATA / "J1428.fits"
    if not path.exists():
        pytest.skip("the real RoboPol frame (../shared/data) is not available")
    return SHARED_DATA


#: Dithers (px) of the three exposures of ``visit_sims``.
VISIT_DITHERS = ((0.0, 0.0), (14.5, -21.3), (-26.1, 8.7))


@pytest.fixture(scope="session")
def visit_sims(profile):
    """Three dithered 640 x 640 exposures of one field, then one of another field.

    90 field stars (the same in the three, with their own noise, PSF, sky and one
    reflection source each) and a celestial TAN WCS that follows the dithers; the other
    field points 0.41 deg away. Made in about 0.3 s.
    """
    from robopol_clean.simulate import simulate_frame

    kw = dict(shape=(640, 640), origin=(300, 300), n_stars=90, target=False,
              n_artifact_sources=1)
    same = [simulate_frame(profile, seed=21 + k, field_seed=5, dither=d,
                           sky_center=(210.0, 35.0), **kw) for k, d in enumerate(VISIT_DITHERS)]
    other = simulate_frame(profile, seed=24, field_seed=6, sky_center=(210.5, 35.0), **kw)
    return [*same, other]


@pytest.fixture(scope="session")
def visit_reduced(visit_sims, morphology):
    """``visit_sims`` reduced (morphology classifier): four FrameResults, about 1 s."""
    from robopol_clean.pipeline import reduce_frame

    return [reduce_frame(sim.ccd, classifier=morphology, name=f"visit{k}.fits")
            for k, sim in enumerate(visit_sims)]


#: Instrumental effects injected into the simulated standard-star frames.
INJECTED = {"angle_zero": 3.0, "q_inst": 0.004, "u_inst": -0.003}
#: A 1024 x 1024 detector region around RoboPol's target position (1026, 1043).
STANDARD_WINDOW = {"shape": (1024, 1024), "origin": (514, 531)}


@pytest.fixture(scope="session")
def standard_sims(profile):
    """Three frames of the polarized BD+59 389 and three of the unpolarized HD 212311
    (1024 x 1024 regions around the target, 150 field stars), made with an angle zero
    point of 3 deg and an instrumental polarization of (0.004, -0.003). About 1 s.

    Seeds 20-24 and 26: in seed 25's window the PSF, fitted to few stars, leaves the
    target a poor fit (flagged), which calibrate refuses by default."""
    from robopol_clean.simulate import simulate_frame

    names = ["BD+59 389"] * 3 + ["HD 212311"] * 3
    seeds = [20, 21, 22, 23, 24, 26]
    return [simulate_frame(profile, seed=seed, n_stars=150, standard=name, calibration=INJECTED,
                           **STANDARD_WINDOW) for seed, name in zip(seeds, names)]


@pytest.fixture(scope="session")
def standard_files(standard_sims, tmp_path_factory):
    """``standard_sims`` as FITS files std_0.fits ... std_5.fits (read-only use)."""
    folder = tmp_path_factory.mktemp("standards")
    paths = []
    for i, sim in enumerate(standard_sims):
        paths.append(folder / f"std_{i}.fits")
        sim.ccd.write(paths[-1])
    return paths
