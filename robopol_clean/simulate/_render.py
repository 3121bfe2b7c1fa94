"""Stamp rendering shared by the simulator's components, vectorised over sources.

Stamps are evaluated on integer pixel grids centred on the pixel nearest each source and
added into a flat (``ny * nx``) float64 accumulator with :func:`numpy.bincount`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["moffat_alpha"]


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width ``alpha`` (px) giving ``fwhm`` (px) for power ``beta``."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def grid(x: np.ndarray, y: np.ndarray, hx: int, hy: int):
    """Pixel grids of stamps centred on the pixels nearest ``(x, y)``.

    Parameters
    ----------
    x, y : ndarray
        Source positions (n,), 0-based image pixels.
    hx, hy : int
        Stamp half-sizes (px) along x and y.

    Returns
    -------
    gx, gy : ndarray
        Integer pixel coordinates, shapes (n, 1, 2 hx + 1) and (n, 2 hy + 1, 1).
    dx, dy : ndarray
        Offsets (px) of those pixels from the sources, same shapes.
    """
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    gx = ix[:, None, None] + np.arange(-hx, hx + 1)[None, None, :]
    gy = iy[:, None, None] + np.arange(-hy, hy + 1)[None, :, None]
    return gx, gy, gx - x[:, None, None], gy - y[:, None, None]


def moffat(dx, dy, alpha: float, beta: float, ell: float, theta: float) -> np.ndarray:
    """Elliptical Moffat profile, unnormalised (1 at the centre).

    Parameters
    ----------
    dx, dy : ndarray
        Offsets (px) from the centre (broadcast together).
    alpha : float
        Core width (px) of the circular profile of the same area.
    beta : float
        Moffat power.
    ell : float
        Ellipticity ``1 - b/a``.
    theta : float
        Position angle of the major axis (rad, from +x towards +y).
    """
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    a = alpha / math.sqrt(1.0 - ell)
    b = alpha * math.sqrt(1.0 - ell)
    return (1.0 + (u / a) ** 2 + (v / b) ** 2) ** (-beta)


def normalise(stamps: np.ndarray) -> np.ndarray:
    """Stamps (n, ky, kx) scaled to unit sum each."""
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


def deposit(acc: np.ndarray, gx, gy, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Add stamps into a flat image, dropping the pixels outside the frame.

    Parameters
    ----------
    acc : ndarray
        Flat float64 image (``ny * nx``), modified in place.
    gx, gy : ndarray
        Pixel grids of the stamps (from :func:`grid`).
    values : ndarray
        Stamp values (n, ky, kx), in the unit of ``acc``.
    shape : (ny, nx)
        Image shape.

    Returns
    -------
    ndarray
        The part of each stamp's sum (n,) that fell inside the frame.
    """
    ny, nx = shape
    gx, gy = np.broadcast_arrays(gx, gy)
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    if inside.any():
        flat = gy[inside] * nx + gx[inside]
        acc += np.bincount(flat, weights=values[inside], minlength=ny * nx)
    return np.where(inside, values, 0.0).sum(axis=(1, 2))


def inside(x, y, shape: tuple[int, int]) -> np.ndarray:
    """Whether positions ``(x, y)`` (px) lie inside a frame of ``shape`` (ny, nx)."""
    ny, nx = shape
    return (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)


def sample(arr: np.ndarray, x, y) -> np.ndarray:
    """Nearest-pixel values of a 2-D array at ``(x, y)`` (px), clipped into the array."""
    ny, nx = arr.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    return arr[iy, ix]
