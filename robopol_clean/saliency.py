"""Saliency maps: which pixels of a cutout the network's decision is most sensitive to.

The vanilla-gradient map of Simonyan et al. (2014): ``|d p_artifact / d input|`` for
each pixel of a (normalised) cutout, computed with :class:`tf.GradientTape` in
batches. For a streak the map should light up along the tail and the head; for a
star spot, on the round core.
"""

from __future__ import annotations

import numpy as np

__all__ = ["saliency_maps"]


def saliency_maps(model, cutouts: np.ndarray, *, batch_size: int = 128,
                  normalise: bool = False) -> np.ndarray:
    """Absolute gradient of the network output with respect to each input pixel.

    Parameters
    ----------
    model : keras.Model or CNNClassifier
        The network (one sigmoid output), or a classifier holding one.
    cutouts : ndarray, shape (n, size, size) or (n, size, size, 1)
        Normalised cutouts (see :func:`~robopol_clean.classify.cnn.normalise_cutouts`).
    batch_size : int
        Cutouts per gradient evaluation (bounds memory).
    normalise : bool
        Scale each map to a maximum of 1 (for display); maps that are all zero stay zero.

    Returns
    -------
    ndarray, shape (n, size, size), float32
        ``|d p / d x|`` per pixel (in units of probability per unit of normalised input).
    """
    import tensorflow as tf

    net = getattr(model, "model", model)
    x = np.asarray(cutouts, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"cutouts must have shape (n, size, size[, 1]), got {x.shape}")
    out = np.empty(x.shape[:3], np.float32)

    @tf.function(reduce_retracing=True)
    def grad(batch):
        with tf.GradientTape() as tape:
            tape.watch(batch)
            p = net(batch, training=False)
        return tf.abs(tape.gradient(p, batch))[..., 0]

    for start in range(0, x.shape[0], int(batch_size)):
        out[start:start + batch_size] = grad(tf.constant(x[start:start + batch_size])).numpy()
    if normalise and out.size:
        peak = out.reshape(len(out), -1).max(axis=1)
        out /= np.where(peak > 0, peak, 1.0)[:, None, None]
    return out
