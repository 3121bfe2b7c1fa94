"""The detector: photon and read noise, gain, saturation and bias."""

from __future__ import annotations

import numpy as np

from ..instrument import InstrumentProfile


def read_out(rng: np.random.Generator, expected: np.ndarray, charge: np.ndarray,
             prof: InstrumentProfile, *, noise: bool, saturate: bool,
             include_bias: bool) -> np.ndarray:
    """The recorded image.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    expected : ndarray
        Expected photo-electrons per pixel (sky and sources), float64.
    charge : ndarray
        Charge deposited directly (cosmic rays), electron/px, same shape.
    prof : InstrumentProfile
        Gain (electron/ADU), read noise (electron), saturation and bias levels (ADU).
    noise : bool
        Draw Poisson photon noise and Gaussian read noise (``False``: the expectation).
    saturate : bool
        Clip at ``prof.saturation`` (ADU, before the bias is added).
    include_bias : bool
        Add ``prof.bias``.

    Returns
    -------
    ndarray
        The image (ADU), float32.
    """
    if noise:
        img = rng.poisson(np.clip(expected, 0, None)).astype(np.float64)
        img += charge
        img += rng.normal(0.0, prof.read_noise, expected.shape)
    else:
        img = expected + charge
    img /= prof.gain
    if saturate:
        np.minimum(img, prof.saturation, out=img)
    if include_bias:
        img += prof.bias
    return img.astype(np.float32)
