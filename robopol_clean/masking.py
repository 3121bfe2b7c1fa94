"""Pixel masks: artifact footprints, combining masks, and apertures that touch them.

Masks are boolean images, True = do not use. Like ccdproc, masks are OR-ed, never
replaced, and inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "disk_structure",
    "dilate_mask",
    "footprint_mask",
    "combine_masks",
    "unusable_pixels",
    "apertures_touch_mask",
]

def unusable_pixels(data: np.ndarray, mask=None) -> np.ndarray:
    """The pixels no measurement may use: non-finite ones OR-ed with ``mask``.

    Parameters
    ----------
    data : ndarray
        2-D image.
    mask : array-like of bool, optional
        True = do not use; same shape as ``data``.

    Returns
    -------
    ndarray of bool
        A new array; the inputs are not modified.

    Raises
    ------
    ValueError
        If ``mask`` has another shape than ``data``.
    """
    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
        bad |= mask
    return bad


def disk_structure(radius: int) -> np.ndarray:
    """Boolean disk of ``radius`` pix (shape ``2 radius + 1`` square) for dilation."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx**2 + yy**2 <= r**2


def dilate_mask(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary dilation of a mask, cheap on big frames with few masked pixels.

    Parameters
    ----------
    mask : ndarray of bool
        2-D mask (not modified).
    structure : ndarray of bool
        Odd-sized structuring element (e.g. :func:`disk_structure`), centred.

    Returns
    -------
    ndarray of bool
        ``scipy.ndimage.binary_dilation(mask, structure)`` (nothing outside the frame).
        A sparse mask is dilated by setting the structure's pixels around each of its
        pixels, a denser one by ``binary_dilation`` on the bounding box of its pixels.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[2, 2] = True
    >>> int(dilate_mask(m, disk_structure(1)).sum())
    5
    """
    mask = np.asarray(mask, bool)
    offsets = np.argwhere(structure) - np.array(np.shape(structure)) // 2
    if np.count_nonzero(mask) * len(offsets) <= mask.size // 8:
        ys, xs = np.nonzero(mask)
        yy = (ys[:, None] + offsets[:, 0]).ravel()
        xx = (xs[:, None] + offsets[:, 1]).ravel()
        keep = (yy >= 0) & (yy < mask.shape[0]) & (xx >= 0) & (xx < mask.shape[1])
        out = np.zeros(mask.shape, bool)
        out[yy[keep], xx[keep]] = True
        return out
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.array(mask, copy=True)
    hy, hx = (n // 2 for n in np.shape(structure))
    win = (slice(max(rows[0] - hy, 0), min(rows[-1] + hy + 1, mask.shape[0])),
           slice(max(cols[0] - hx, 0), min(cols[-1] + hx + 1, mask.shape[1])))
    out[win] = ndimage.binary_dilation(mask[win], structure=structure)
    return out


def footprint_mask(shape: tuple[int, int], segmentation: np.ndarray, labels, *,
                   dilate: int = 2) -> np.ndarray:
    """Union of the segmentation footprints with the given labels, dilated.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``; must equal the segmentation's shape.
    segmentation : ndarray of int
        Segmentation image: 0 = background, footprint pixels carry their label.
    labels : array-like of int
        Labels to mask (e.g. the ``label`` of the rejected spots). Label 0 is ignored.
    dilate : int
        Grow the footprints by this many pixels (a disk), to cover faint wings the
        detection threshold missed. 0 disables.

    Returns
    -------
    ndarray of bool
        ``shape`` mask, True on the (dilated) footprints.

    Raises
    ------
    ValueError
        If the segmentation's shape differs from ``shape`` or ``dilate`` is negative.

    Examples
    --------
    >>> seg = np.zeros((5, 5), int); seg[2, 2] = 3; seg[0, 0] = 1
    >>> int(footprint_mask((5, 5), seg, [3], dilate=1).sum())
    5
    """
    segmentation = np.asarray(segmentation)
    shape = tuple(int(n) for n in shape)
    if segmentation.shape != shape:
        raise ValueError(f"segmentation shape {segmentation.shape} differs from image shape {shape}")
    if int(dilate) < 0:
        raise ValueError(f"dilate must be >= 0 pixels, got {dilate}")
    labels = np.unique(np.asarray(labels, dtype=np.int64).ravel())
    labels = labels[labels != 0]
    if labels.size == 0:
        return np.zeros(shape, dtype=bool)
    mask = np.isin(segmentation, labels)
    return dilate_mask(mask, disk_structure(dilate)) if dilate > 0 else mask


def combine_masks(existing: np.ndarray | None, new: np.ndarray | None) -> np.ndarray | None:
    """OR two boolean masks into a new array (either may be None; inputs untouched).

    Returns
    -------
    ndarray of bool or None
        ``existing | new``; a copy of the one given if the other is None; None if both are.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if existing is None and new is None:
        return None
    if existing is None:
        return np.array(new, dtype=bool, copy=True)
    if new is None:
        return np.array(existing, dtype=bool, copy=True)
    existing, new = np.asarray(existing, bool), np.asarray(new, bool)
    if existing.shape != new.shape:
        raise ValueError(f"cannot combine masks of shapes {existing.shape} and {new.shape}")
    return existing | new


def apertures_touch_mask(mask: np.ndarray, x, y, radius: float) -> np.ndarray:
    """Whether any masked pixel overlaps each circular aperture.

    Parameters
    ----------
    mask : ndarray of bool
        2-D mask, True = masked.
    x, y : array-like
        Aperture centres (pix, 0-based), same shape.
    radius : float
        Aperture radius (pix).

    Returns
    -------
    ndarray of bool
        Shaped like ``x``: True where a masked pixel overlaps the circle (any
        fractional overlap counts). Apertures partly off the image test the part
        on it; non-finite centres give False.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got {mask.ndim}-D")
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    radius = float(radius)
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    out = np.zeros(x.size, dtype=bool)
    ok = np.isfinite(x.ravel()) & np.isfinite(y.ravel())  # non-finite centres: False
    if not ok.any() or not mask.any():
        return out.reshape(x.shape)
    xs, ys = x.ravel()[ok], y.ravel()[ok]
    # A pixel overlaps the circle when its nearest point lies strictly inside: test the
    # pixels of a square window around each centre, all apertures at once.
    off = np.arange(-math.ceil(radius + 0.5), math.ceil(radius + 0.5) + 1)

    def window(centre, n):
        """Window pixel indices and squared distance from the centre to their nearest edge."""
        pix = np.floor(centre + 0.5).astype(np.int64)[:, None] + off
        gap = np.maximum(np.abs(pix - centre[:, None]) - 0.5, 0.0) ** 2
        gap[(pix < 0) | (pix >= n)] = np.inf  # off the frame
        return np.clip(pix, 0, n - 1), gap

    rows, gap_y = window(ys, mask.shape[0])
    cols, gap_x = window(xs, mask.shape[1])
    hit = mask[rows[:, :, None], cols[:, None, :]] & (gap_y[:, :, None] + gap_x[:, None, :] < radius**2)
    out[ok] = hit.any(axis=(1, 2))
    return out.reshape(x.shape)

