"""The sky: level, gradient, vignetting and the focal-plane mask's transmission."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..instrument import InstrumentProfile


@dataclass(frozen=True)
class SkyConditions:
    """The drawn sky of one frame.

    Attributes
    ----------
    level : float
        Open-sky level (electron/px) at the detector centre before vignetting.
    gradient : float
        Fractional change of the level across the detector's larger side.
    gradient_angle : float
        Direction of the gradient (rad, from +x towards +y).
    vignetting_depth : float
        Fractional loss of light at the detector corners (before the 0.2 floor).
    """

    level: float
    gradient: float
    gradient_angle: float
    vignetting_depth: float


def draw_sky(rng: np.random.Generator, level: float | None, level_range: tuple[float, float],
             exptime: float) -> SkyConditions:
    """Draw the sky level (unless given), its gradient and the vignetting depth.

    Parameters
    ----------
    rng : Generator
        The frame's random generator (four or three draws).
    level : float or None
        Open-sky level (electron/px); ``None`` draws it log-uniformly in ``level_range``
        and scales it by ``exptime`` / 120 s.
    level_range : (low, high)
        Range of the drawn level for 120 s (electron/px).
    exptime : float
        Exposure time (s).
    """
    level = float(level if level is not None else
                  math.exp(rng.uniform(*np.log(level_range))) * exptime / 120.0)
    return SkyConditions(level=level, gradient=rng.uniform(0.0, 0.08),
                         gradient_angle=rng.uniform(0.0, 2 * math.pi),
                         vignetting_depth=rng.uniform(0.45, 0.65))


def vignetting(prof: InstrumentProfile, depth: float, x, y) -> np.ndarray:
    """Fraction of light reaching detector pixel ``(x, y)``.

    Flat out to 0.7 ``prof.vignetting_radius`` (px from the detector centre), then falling
    quadratically to ``1 - depth`` at the corners, never below 0.2; 1 everywhere when the
    profile has no vignetting radius.

    Parameters
    ----------
    prof : InstrumentProfile
        The instrument.
    depth : float
        Fractional loss at the detector corners.
    x, y : ndarray
        Detector coordinates (px, 0-based), broadcast together.

    Returns
    -------
    ndarray
        The transmitted fraction (float32).
    """
    if prof.vignetting_radius is None:
        return np.ones(np.broadcast(x, y).shape, np.float32)
    det_ny, det_nx = prof.shape
    cx, cy = (det_nx - 1) / 2.0, (det_ny - 1) / 2.0
    r_in = 0.7 * float(prof.vignetting_radius)
    r_corner = max(math.hypot(cx, cy), r_in + 1.0)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = np.clip((r - r_in) / (r_corner - r_in), 0.0, None)
    return np.clip(1.0 - depth * t ** 2, 0.2, 1.0).astype(np.float32)


def sky_image(prof: InstrumentProfile, sky: SkyConditions, shape: tuple[int, int],
              origin: tuple[int, int]) -> np.ndarray:
    """The noiseless sky of the frame.

    The level times a linear gradient, the vignetting and the transmission of the
    focal-plane mask, all evaluated at detector coordinates.

    Parameters
    ----------
    prof : InstrumentProfile
        The instrument.
    sky : SkyConditions
        The drawn sky.
    shape : (ny, nx)
        Image shape.
    origin : (x0, y0)
        Detector pixel of image pixel (0, 0).

    Returns
    -------
    ndarray
        Sky (electron/px), float64, shape ``shape``.
    """
    ny, nx = shape
    x0, y0 = origin
    det_ny, det_nx = prof.shape
    yy = np.arange(ny, dtype=np.float32)[:, None] + y0
    xx = np.arange(nx, dtype=np.float32)[None, :] + x0
    cx, cy = (det_nx - 1) / 2.0, (det_ny - 1) / 2.0
    gx = (xx - cx) / max(det_nx, det_ny)
    gy = (yy - cy) / max(det_nx, det_ny)
    angle = sky.gradient_angle
    plane = 1.0 + sky.gradient * (math.cos(angle) * gx + math.sin(angle) * gy)
    if x0 or y0:
        trans = prof.transmission((y0 + ny, x0 + nx))[y0:, x0:]
    else:
        trans = prof.transmission((ny, nx))
    vig = vignetting(prof, sky.vignetting_depth, xx, yy)
    return (sky.level * plane * vig * trans).astype(np.float64)
