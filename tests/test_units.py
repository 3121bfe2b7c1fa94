"""ccdproc conventions: the unit and uncertainty a reduction chain hands over are honoured."""

import numpy as np
import pytest
from astropy.nddata import CCDData

from robopol_clean.pipeline import reduce_frame

COLUMNS = ("q", "u", "q_err", "u_err", "flags")


@pytest.fixture(scope="module")
def in_adu(small_sim, profile, morphology):
    return reduce_frame(small_sim.ccd, profile=profile, classifier=morphology)


def test_frame_in_electrons_gives_the_same_stokes(small_sim, profile, morphology, in_adu):
    """After ccdproc.gain_correct the frame is in electrons: the gain is not applied twice."""
    ccd = small_sim.ccd
    electrons = CCDData(ccd.data * np.float32(ccd.header["GAIN"]), unit="electron",
                        meta=ccd.meta.copy(), mask=ccd.mask)
    result = reduce_frame(electrons, profile=profile, classifier=morphology)
    assert len(in_adu.stokes) > 20 and len(result.stokes) == len(in_adu.stokes)
    for col in COLUMNS:
        np.testing.assert_allclose(result.stokes[col], in_adu.stokes[col], rtol=2e-4, atol=1e-7,
                                   err_msg=col)
    # CCDData in, CCDData out: the product keeps the chain's unit and data, with the mask added.
    assert result.ccd.unit == "electron"
    np.testing.assert_array_equal(result.ccd.data, electrons.data)


def test_uncertainty_masks_unusable_pixels_only(small_sim, profile, morphology, in_adu):
    """A chain's uncertainty does not change the noise model; pixels it calls unusable are masked."""
    from astropy.nddata import StdDevUncertainty

    ccd = small_sim.ccd
    gain, ron = float(ccd.header["GAIN"]), float(ccd.header["RDNOISE"])
    std = np.sqrt(np.clip(ccd.data, 0, None) / gain + (ron / gain) ** 2)
    with_unc = CCDData(ccd.data, unit="adu", meta=ccd.meta.copy(), mask=ccd.mask,
                       uncertainty=StdDevUncertainty(std))
    same = reduce_frame(with_unc, profile=profile, classifier=morphology)
    for col in COLUMNS:
        np.testing.assert_array_equal(same.stokes[col], in_adu.stokes[col], err_msg=col)

    row = in_adu.stokes[in_adu.stokes["flags"] == 0][0]
    spot = in_adu.spots[(in_adu.spots["group_id"] == row["group_id"])][0]
    bad = std.copy()
    iy, ix = int(round(spot["y"])), int(round(spot["x"]))
    bad[iy - 1:iy + 2, ix - 1:ix + 2] = np.nan  # the chain says: no idea what these are worth
    holed = reduce_frame(CCDData(ccd.data, unit="adu", meta=ccd.meta.copy(), mask=ccd.mask,
                                 uncertainty=StdDevUncertainty(bad)), profile=profile,
                         classifier=morphology)
    assert holed.ccd.mask[iy, ix]  # OR-ed into the product's mask
    flags = holed.stokes["flags"][holed.stokes["group_id"] == row["group_id"]]
    assert len(flags) == 0 or flags[0] & 2  # the spot lost its core: masked flag (bit 2)
