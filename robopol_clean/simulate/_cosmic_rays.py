"""Cosmic rays: sharp charge deposits (not photons: added after the Poisson noise)."""

from __future__ import annotations

import math

import numpy as np

from ._render import sample

# Neighbours a compact hit spreads into, in order of preference (dx, dy).
_NEIGHBOURS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1))


def _compact_hit(rng, e_peak: float, shape):
    """A hit on 1-4 adjacent pixels: the peak and 20-80 % of it on its neighbours."""
    ny, nx = shape
    npx = int(rng.integers(1, 5))
    cx, cy = int(rng.integers(0, nx)), int(rng.integers(0, ny))
    order = rng.permutation(npx - 1) if npx > 1 else np.array([], int)
    px = np.array([cx] + [cx + _NEIGHBOURS[j][0] for j in order])
    py = np.array([cy] + [cy + _NEIGHBOURS[j][1] for j in order])
    vals = np.concatenate([[e_peak], e_peak * rng.uniform(0.2, 0.8, npx - 1)])
    return px, py, vals, float(np.ptp(px) + 1), float(np.ptp(py) + 1)


def _track(rng, e_peak: float, shape):
    """A straight track 3-15 px long at any angle, sampled every 0.5 px (bilinear)."""
    ny, nx = shape
    length = rng.uniform(3.0, 15.0)
    ang = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
    tt = np.linspace(-length / 2, length / 2, int(length * 2) + 1)
    ptx, pty = cx + tt * math.cos(ang), cy + tt * math.sin(ang)
    fx, fy = np.floor(ptx).astype(int), np.floor(pty).astype(int)
    wx, wy = ptx - fx, pty - fy
    px = np.concatenate([fx, fx + 1, fx, fx + 1])
    py = np.concatenate([fy, fy, fy + 1, fy + 1])
    vals = np.concatenate([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy])
    vals = vals * e_peak / 2.0 * rng.uniform(0.7, 1.3, vals.size)
    return px, py, vals, length, 1.0


def _brightest(px: np.ndarray, py: np.ndarray, vals: np.ndarray) -> tuple[int, int, float]:
    """The pixel with the largest summed deposit: x, y and the sum."""
    pix, inv = np.unique(np.stack([px, py]), axis=1, return_inverse=True)
    sums = np.bincount(inv.ravel(), weights=vals)
    j = int(np.argmax(sums))
    return int(pix[0, j]), int(pix[1, j]), float(sums[j])


def cosmic_rays(rng: np.random.Generator, n_hits: int | None, sky: np.ndarray, *, exptime: float,
                area_frac: float, read_noise: float) -> tuple[np.ndarray, list[dict]]:
    """Draw cosmic-ray hits.

    70 % are compact hits of 1-4 pixels, the others short tracks; the peak deposit is
    log-uniform in 400-40 000 electrons.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    n_hits : int or None
        Number of hits; ``None`` draws Poisson(10) per 120 s and detector area.
    sky : ndarray
        Noiseless sky (electron/px), image shape; for the truth S/N.
    exptime : float
        Exposure time (s).
    area_frac : float
        Frame area / detector area (at most 1).
    read_noise : float
        Read noise (electron).

    Returns
    -------
    charge : ndarray
        Deposited charge (electron/px), float64, image shape.
    rows : list of dict
        One truth row per hit (see :func:`~robopol_clean.simulate._truth.artifact_table`).
    """
    shape = ny, nx = sky.shape
    n = int(n_hits) if n_hits is not None else int(rng.poisson(10.0 * exptime / 120.0 * area_frac))
    charge = np.zeros(ny * nx)
    rows = []
    for _ in range(n):
        e_peak = math.exp(rng.uniform(math.log(400.0), math.log(40000.0)))
        hit = _compact_hit if rng.random() < 0.7 else _track
        px, py, vals, length, width = hit(rng, e_peak, shape)
        keep = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        if keep.any():
            np.add.at(charge, py[keep] * nx + px[keep], vals[keep])
        bx, by, bv = _brightest(px, py, vals)
        snr = bv / math.sqrt(float(sample(sky, bx, by)) + read_noise ** 2)
        rows.append(dict(
            kind="cosmic_ray", x=float(bx), y=float(by), x_center=float(np.mean(px)),
            length=float(length), width=float(width), flux=float(vals.sum()),
            flux_in_frame=float(vals[keep].sum()), peak=bv, snr_peak=float(snr), parent=-1,
            pair_id=-1, mimics="", tail_dir=0,
        ))
    return charge.reshape(ny, nx), rows
