"""The instrument's own cue: a spot whose partner spots are missing cannot be a star.

A real point source always produces all four spots. For each spot and each channel it
might belong to, the frame's geometry predicts where the other three spots must be;
forced aperture sums at those places tell whether they are there. A bright spot (or
a bright left-right or top-bottom pair) whose expected partners are absent where they
would clearly be visible is spurious -- typically an internal reflection that passed
through one analyser only. Faint spots, whose partners would be lost in the noise,
get no evidence either way (score 0).
"""

from __future__ import annotations

import numpy as np
from photutils.aperture import CircularAperture

from .base import FrameScene

__all__ = ["orphan_score", "forced_sums"]

#: Smallest plausible partner/spot flux ratio: the same analyser pair (|q| <= 0.4)...
SAME_PAIR_MIN_RATIO = 0.4
#: ... and the other pair (the two pairs' light ratio varies ~0.4-2.3 across RoboPol).
OTHER_PAIR_MIN_RATIO = 0.25


def forced_sums(data: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Sum of ``data`` in circles of ``radius`` px at ``(x, y)``; NaN where off the image.

    Parameters
    ----------
    data : ndarray
        Background-subtracted image (adu).
    x, y : ndarray
        Centres (px), any shape.
    radius : float
        Aperture radius (px).
    mask : ndarray of bool, optional
        Pixels to exclude; apertures touching them give NaN.
    """
    shape = np.shape(x)
    xf, yf = np.ravel(x).astype(float), np.ravel(y).astype(float)
    ny, nx = data.shape
    inside = (xf >= radius) & (xf <= nx - 1 - radius) & (yf >= radius) & (yf <= ny - 1 - radius)
    out = np.full(xf.shape, np.nan)
    if inside.any():
        ap = CircularAperture(np.column_stack([xf[inside], yf[inside]]), r=radius)
        sums, _ = ap.do_photometry(data, method="center")
        if mask is not None:
            bad, _ = ap.do_photometry(mask.astype(np.float32), method="center")
            sums = np.where(bad > 0, np.nan, sums)
        out[inside] = sums
    return out.reshape(shape)


def orphan_score(scene: FrameScene, *, min_transmission: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Evidence that each spot's partner spots are missing.

    Parameters
    ----------
    scene : FrameScene
        The frame (background-subtracted image, noise, spots, geometry).
    min_transmission : float
        Predicted partner positions on the focal-plane mask below this sky
        transmission are treated as unknown (the mask may hide them).

    Returns
    -------
    p_orphan : ndarray
        0 = consistent with a star (or no evidence), 1 = partners certainly missing.
    best_channel : ndarray of str
        The channel under which the spot looks most like a star.
    """
    spots = scene.spots
    n = len(spots)
    channels = scene.profile.channels
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype="U1")
    x = np.asarray(spots["x"], float)
    y = np.asarray(spots["y"], float)
    radius = max(1.0, 0.85 * scene.fwhm)
    rms = np.asarray(scene.background_rms, float)
    own = forced_sums(scene.data, x, y, radius)
    own = np.where(np.isfinite(own), own, np.asarray(spots["peak"], float) * np.pi * radius**2 / 4)

    transmission = scene.profile.transmission(scene.data.shape)
    ny, nx = scene.data.shape
    n_ch = len(channels)
    p_h = np.zeros((n_ch, n))
    for h, ch in enumerate(channels):
        xc, yc = scene.geometry.pattern_center(ch, x, y)
        pos = scene.geometry.spot_positions(xc, yc)
        others = [k for k in channels if k != ch]
        px = np.stack([pos[k][0] for k in others])
        py = np.stack([pos[k][1] for k in others])
        measured = forced_sums(scene.data, px, py, radius, mask=scene.mask)
        ix = np.clip(np.round(px).astype(int), 0, nx - 1)
        iy = np.clip(np.round(py).astype(int), 0, ny - 1)
        visible = np.isfinite(measured) & (transmission[iy, ix] >= min_transmission)
        sigma = rms[iy, ix] * np.sqrt(np.pi) * radius
        pair = {frozenset(p) for p in (scene.profile.q_channels, scene.profile.u_channels)}
        ratio = np.array([SAME_PAIR_MIN_RATIO if frozenset((ch, k)) in pair else OTHER_PAIR_MIN_RATIO
                          for k in others])[:, None]
        expected = ratio * np.maximum(own, 0.0)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            support = np.clip(measured / expected, 0.0, 1.0)
            snr_expected = expected / sigma
        # Evidence only from partners that would stand out clearly from the noise.
        informative = visible & (snr_expected > 3.0)
        weight = np.clip((snr_expected - 3.0) / 4.0, 0.0, 1.0)
        missing = np.where(informative, weight * (1.0 - support), 0.0)
        # A hypothesis is refuted by its most clearly missing partner.
        p_h[h] = missing.max(axis=0)
    best = np.argmin(p_h, axis=0)
    return p_h.min(axis=0), np.asarray(channels)[best]
