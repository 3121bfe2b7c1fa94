"""Pixel masks: artifact footprints, combining masks, and apertures that touch them.

Masks are boolean images, True = do not use. Like ccdproc, masks are OR-ed, never
replaced, and inputs are never modified. An optional ``uint8`` bit-mask keeps the
reason a pixel is masked (:data:`ARTIFACT`, :data:`SATURATED`,
:data:`INSTRUMENT_MASK`).
"""

from __future__ import annotations

import numpy as np
from photutils.aperture import CircularAperture
from scipy import ndimage

__all__ = [
    "ARTIFACT",
    "SATURATED",
    "INSTRUMENT_MASK",
    "disk_structure",
    "footprint_mask",
    "combine_masks",
    "apertures_touch_mask",
    "bitmask_from",
]

#: Bit set for pixels of a rejected artifact's (dilated) footprint.
ARTIFACT = np.uint8(1)
#: Bit set for saturated pixels.
SATURATED = np.uint8(2)
#: Bit set for pixels masked by the instrument or the input frame (bad, non-finite).
INSTRUMENT_MASK = np.uint8(4)


def disk_structure(radius: int) -> np.ndarray:
    """Boolean disk of ``radius`` pix (shape ``2 radius + 1`` square) for dilation."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx**2 + yy**2 <= r**2


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
    if dilate > 0 and mask.any():
        # dilate only the bounding box of the footprints (plus margin): cheap on big frames
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        d = int(dilate)
        y0, y1 = max(rows[0] - d, 0), min(rows[-1] + d + 1, shape[0])
        x0, x1 = max(cols[0] - d, 0), min(cols[-1] + d + 1, shape[1])
        mask[y0:y1, x0:x1] = ndimage.binary_dilation(mask[y0:y1, x0:x1],
                                                     structure=disk_structure(d))
    return mask


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
    if not float(radius) > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    out = np.zeros(x.size, dtype=bool)
    ok = np.isfinite(x.ravel()) & np.isfinite(y.ravel())  # non-finite centres: False
    if not ok.any() or not mask.any():
        return out.reshape(x.shape)
    ap = CircularAperture(np.column_stack([x.ravel()[ok], y.ravel()[ok]]), r=float(radius))
    overlap, _ = ap.do_photometry(mask.astype(np.float32), method="exact")
    out[ok] = np.nan_to_num(overlap) > 0
    return out.reshape(x.shape)


def bitmask_from(shape: tuple[int, int], *, artifact: np.ndarray | None = None,
                 saturated: np.ndarray | None = None,
                 instrument: np.ndarray | None = None) -> np.ndarray:
    """A ``uint8`` bit-mask recording why pixels are masked.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``.
    artifact, saturated, instrument : ndarray of bool, optional
        Masks whose pixels get :data:`ARTIFACT`, :data:`SATURATED` and
        :data:`INSTRUMENT_MASK` set.

    Returns
    -------
    ndarray of uint8
        The bits OR-ed together (0 = good pixel); ``bits != 0`` is the boolean mask.
    """
    bits = np.zeros(tuple(int(n) for n in shape), dtype=np.uint8)
    for m, bit, name in ((artifact, ARTIFACT, "artifact"), (saturated, SATURATED, "saturated"),
                         (instrument, INSTRUMENT_MASK, "instrument")):
        if m is None:
            continue
        m = np.asarray(m, bool)
        if m.shape != bits.shape:
            raise ValueError(f"{name} mask shape {m.shape} differs from {bits.shape}")
        bits[m] |= bit
    return bits
