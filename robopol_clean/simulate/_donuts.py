"""Dust donuts: rings in the sky, as left by dust on the optics and an imperfect flat field."""

from __future__ import annotations

import math

import numpy as np

from ._render import deposit, grid, sample


def add_donuts(rng: np.random.Generator, sky: np.ndarray, n_donuts: int | None, *,
               area_frac: float, contrast: tuple[float, float], radius: tuple[float, float],
               bright_fraction: float, read_noise: float) -> list[dict]:
    """Draw dust donuts and add them to the sky.

    A donut is a ring with a Gaussian cross-section (width 1.5-3.5 px) whose amplitude is
    a fraction of the local sky; it is part of the sky map, not a source.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    sky : ndarray
        Noiseless sky (electron/px), C-contiguous float64; modified in place.
    n_donuts : int or None
        Number of donuts; ``None`` draws Poisson(2) per detector area.
    area_frac : float
        Frame area / detector area (at most 1).
    contrast : (low, high)
        Range of the ring amplitude as a fraction of the local sky.
    radius : (low, high)
        Range of the ring radius (px).
    bright_fraction : float
        Fraction of donuts brighter than the sky (the others are darker).
    read_noise : float
        Read noise (electron), for the truth S/N.

    Returns
    -------
    list of dict
        One truth row per donut (see :func:`~robopol_clean.simulate._truth.artifact_table`).
    """
    ny, nx = sky.shape
    flat = sky.reshape(-1)  # a view: rings go into ``sky``
    n = int(n_donuts) if n_donuts is not None else int(rng.poisson(2.0 * area_frac))
    rows = []
    for _ in range(n):
        xc, yc = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        rad = rng.uniform(*radius)
        wid = rng.uniform(1.5, 3.5)
        amp = rng.uniform(*contrast) * (-1 if rng.random() < 1.0 - bright_fraction else 1)
        h = int(rad + 4 * wid) + 1
        gx, gy, dx, dy = grid(np.array([xc]), np.array([yc]), h, h)
        ring = np.exp(-0.5 * ((np.hypot(dx, dy) - rad) / wid) ** 2)
        local = float(sample(sky, xc, yc))  # includes the donuts added before
        vals = ring * amp * local
        in_frame = deposit(flat, gx, gy, vals, (ny, nx))
        rows.append(dict(
            kind="donut", x=xc, y=yc, x_center=xc, length=2 * (rad + wid), width=2 * (rad + wid),
            flux=float(vals.sum()), flux_in_frame=float(in_frame[0]), peak=amp * local,
            snr_peak=abs(amp) * local / math.sqrt(local + read_noise ** 2), parent=-1, pair_id=-1,
            mimics="", tail_dir=0,
        ))
    return rows
