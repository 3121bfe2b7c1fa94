"""The instrument's own evidence: does a spot have the partner spots a star must have?

A real point source always produces all four spots, in flux ratios the instrument
fixes up to the source's (small) polarization. For each spot and each channel it
might belong to, the frame's fitted geometry predicts where the other three spots
must be; forced aperture sums there tell whether they are present. Two cues follow:

- **orphan** (evidence *for* an artifact): the expected partners are missing. The
  deficits of all observable partners below the faintest flux a star allows are added
  and compared with their noise, so a pair of moderately faint reflections whose
  complementary pair is absent is caught even when no single partner would be
  significant; the evidence also needs a good part of that light to be absent (a
  bright star whose own spot is boosted by a neighbour misses a few sigma, not most of
  it). Faint spots, whose partners would be lost in the noise, get no evidence either
  way.
- **support** (evidence *for* a star): every observable partner is present, clearly
  detected and within the flux range a star allows. No reflection, cosmic ray or dust
  ring produces that; a spot confirmed this way is not rejected for the looks of its
  cutout alone (see :func:`combine_evidence`).

The light ratio of the two analyser pairs varies over the field (on RoboPol by a factor
~5 from one side to the other); it is fitted per frame from the complete quadruplets
(:func:`~robopol_clean.stokes.pair_ratio_residuals`), so the expected partner fluxes
follow the frame, not a number in the code. Partners behind the focal-plane mask are
expected to be dimmer by at most the ratio of the mask transmissions.

The tolerances are settings of the reduction (:class:`~robopol_clean.config.CueConfig`,
carried by the :class:`~robopol_clean.classify.base.FrameScene`), recorded with every
catalogue; their defaults were chosen on the cue-tuning frames listed in
:doc:`/seeds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..cutouts import cutout_origin, extract_cutouts
from ..stokes import pair_ratio_residuals
from .base import FrameScene, noisy_or

__all__ = ["PartnerEvidence", "partner_evidence", "combine_evidence", "scores_table",
           "forced_sums", "fit_pair_ratio"]

@dataclass
class PartnerEvidence:
    """What the partner spots say about each spot of a frame.

    Attributes
    ----------
    p_orphan : ndarray
        0 = no evidence, 1 = the expected partners are certainly missing.
    z_orphan : ndarray
        Summed deficit of the observable partners under the spot's most star-like
        channel hypothesis (for a spot in a two-spot group: its group's channel), in
        units of its noise (sigma).
    support : ndarray of bool
        All observable partners (at least two) present at star-like flux ratios.
    channel : ndarray of str
        The channel under which the spot looks most like a star.
    log_pair_ratio : float or None
        Median fitted ``log((F45 + F135) / (F0 + F90))`` of the frame (None if it could
        not be fitted and the conservative fallback was used).
    support_keep : float
        Fraction of a learned score kept for supported spots (``CueConfig.support_keep``).
    """

    p_orphan: np.ndarray
    z_orphan: np.ndarray
    support: np.ndarray
    channel: np.ndarray
    log_pair_ratio: float | None = None
    support_keep: float = 0.0


def forced_sums(data: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Sum of ``data`` in circles of ``radius`` px at ``(x, y)``; NaN where off the image.

    A pixel counts when its centre lies strictly within ``radius`` of ``(x, y)`` (the
    'center' method of photutils apertures); circles reaching beyond the image give NaN.

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

    Returns
    -------
    ndarray
        Sums (adu, float64), the shape of ``x``.
    """
    shape = np.shape(x)
    xf, yf = np.ravel(x).astype(float), np.ravel(y).astype(float)
    ny, nx = data.shape
    inside = (xf >= radius) & (xf <= nx - 1 - radius) & (yf >= radius) & (yf <= ny - 1 - radius)
    out = np.full(xf.shape, np.nan)
    if inside.any():
        xi, yi = xf[inside], yf[inside]
        # Every pixel centre within the radius is within `half` pixels of the nearest one.
        half = int(np.ceil(radius + 0.5)) - 1
        size = 2 * half + 1
        x0, y0 = cutout_origin(xi, yi, size)
        offs = np.arange(size)
        dx2 = (x0[:, None] + offs - xi[:, None]) ** 2
        dy2 = (y0[:, None] + offs - yi[:, None]) ** 2
        disk = dy2[:, :, None] + dx2[:, None, :] < radius**2
        box = extract_cutouts(data, xi, yi, size, dtype=data.dtype)
        sums = np.where(disk, box, 0).sum(axis=(1, 2), dtype=np.float64)
        if mask is not None:
            touched = (extract_cutouts(mask, xi, yi, size, dtype=bool) & disk).any(axis=(1, 2))
            sums[touched] = np.nan
        out[inside] = sums
    return out.reshape(shape)


def fit_pair_ratio(scene: FrameScene, flux: np.ndarray, flux_err: np.ndarray):
    """Fit the frame's analyser-pair light ratio from its complete quadruplets.

    Parameters
    ----------
    scene : FrameScene
        The frame; ``spots`` needs ``group_id`` and ``channel``.
    flux, flux_err : ndarray
        A flux and its error for every spot (any common unit).

    Returns
    -------
    PairRatioCheck or None
        The fit (:meth:`~robopol_clean.stokes.PairRatioCheck.model_at` gives
        ``log((F45 + F135) / (F0 + F90))`` at normalised positions), or None with fewer
        than three usable quadruplets.
    """
    spots, prof = scene.spots, scene.profile
    if len(spots) < 12 or "group_id" not in spots.colnames or "channel" not in spots.colnames:
        return None
    gid = np.asarray(spots["group_id"], np.int64)
    chan = np.asarray(spots["channel"]).astype(str)
    order = [prof.channel_at_angle(a) for a in (0.0, 45.0, 90.0, 135.0)]
    grouped = gid >= 0
    ids, inverse = np.unique(gid[grouped], return_inverse=True)
    idx = np.full((ids.size, 4), -1, np.int64)
    for k, ch in enumerate(order):
        sel = chan[grouped] == ch
        idx[inverse[sel], k] = np.flatnonzero(grouped)[sel]
    idx = idx[(idx >= 0).all(axis=1)]
    if len(idx) < 3:
        return None
    x = np.asarray(spots["x"], float)[idx].mean(axis=1)
    y = np.asarray(spots["y"], float)[idx].mean(axis=1)
    geo = scene.geometry
    xn, yn = (x - geo.center[0]) / geo.scale, (y - geo.center[1]) / geo.scale
    f, e = flux[idx], flux_err[idx]
    # The spots' own fluxes are positive and finite in a usable quadruplet.
    fit_mask = np.all(np.isfinite(f) & (f > 3 * e), axis=1)
    if np.count_nonzero(fit_mask) < 3:
        return None
    check = pair_ratio_residuals(*f.T, *e.T, xn, yn, fit_mask=fit_mask)
    return check if len(check.powers) else None


def partner_evidence(scene: FrameScene, *, min_transmission: float = 0.1) -> PartnerEvidence:
    """Evidence from each spot's partner spots (orphan and support cues).

    Parameters
    ----------
    scene : FrameScene
        The frame (background-subtracted image, noise, spots, geometry).
    min_transmission : float
        Predicted partner positions where the focal-plane mask's sky transmission is
        below this are treated as unobservable.

    Returns
    -------
    PartnerEvidence
    """
    spots, prof, cues = scene.spots, scene.profile, scene.cues
    channels = prof.channels
    n = len(spots)
    if n == 0:
        z = np.zeros(0)
        return PartnerEvidence(z, z.copy(), np.zeros(0, bool), np.zeros(0, dtype="U1"))
    x = np.asarray(spots["x"], float)
    y = np.asarray(spots["y"], float)
    ny, nx = scene.data.shape
    radius = max(1.0, 0.85 * scene.fwhm)
    rms = np.asarray(scene.background_rms, float)
    gain = float(prof.gain) if prof.gain else 1.0
    transmission = prof.transmission(scene.data.shape)

    def noise_at(px, py, flux):
        """Aperture-sum noise (sky + photon) at positions (adu)."""
        ix = np.clip(np.round(px).astype(int), 0, nx - 1)
        iy = np.clip(np.round(py).astype(int), 0, ny - 1)
        sky = rms[iy, ix] * np.sqrt(np.pi) * radius
        return np.sqrt(sky**2 + np.maximum(np.nan_to_num(flux), 0.0) / gain), transmission[iy, ix]

    own = forced_sums(scene.data, x, y, radius)
    own = np.where(np.isfinite(own), own, np.asarray(spots["peak"], float) * np.pi * radius**2 / 4)
    own_err, own_t = noise_at(x, y, own)
    own_pos = np.maximum(own, 0.0)

    fit = fit_pair_ratio(scene, own, own_err)
    geo = scene.geometry
    qset, uset = set(prof.q_channels), set(prof.u_channels)
    z_h = np.zeros((len(channels), n))
    p_h = np.zeros((len(channels), n))
    support_h = np.zeros((len(channels), n), bool)
    for h, ch in enumerate(channels):
        xc, yc = geo.pattern_center(ch, x, y)
        pos = geo.spot_positions(xc, yc)
        others = [k for k in channels if k != ch]
        px = np.stack([pos[k][0] for k in others])
        py = np.stack([pos[k][1] for k in others])
        measured = forced_sums(scene.data, px, py, radius, mask=scene.mask)
        sigma, t_partner = noise_at(px, py, measured)
        if fit is not None:
            # (u pair)/(q pair) at the pattern centre; a q-channel spot expects R times
            # its flux in each u-channel partner and a u-channel spot 1/R.
            log_r = fit.model_at((xc - geo.center[0]) / geo.scale, (yc - geo.center[1]) / geo.scale)
            other_ratio = np.exp(log_r if ch in qset else -log_r)
            other_min = cues.other_pair_tolerance * other_ratio
        else:
            other_ratio = np.ones(n)
            other_min = np.full(n, cues.other_pair_fallback_ratio)
        same = np.array([{ch, k} <= qset or {ch, k} <= uset for k in others])[:, None]
        expected = np.where(same, 1.0, other_ratio[None, :])
        lowest = np.where(same, cues.same_pair_min_ratio, other_min[None, :])
        highest = expected**2 / lowest
        # Light behind the mask may be dimmed, never brightened.
        lowest = lowest * np.minimum(t_partner / np.maximum(own_t, 1e-3)[None, :], 1.0)
        visible = np.isfinite(measured) & (t_partner >= min_transmission)

        # orphan: summed deficit below the lowest plausible partner flux
        deficit = np.where(visible, np.clip(lowest * own_pos - measured, 0.0, None), 0.0)
        var = np.where(visible, sigma**2 + (lowest * own_err) ** 2, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = deficit.sum(axis=0) / np.sqrt(var.sum(axis=0))
            missing = deficit.sum(axis=0) / np.where(visible, lowest * own_pos, 0.0).sum(axis=0)
        z_h[h] = np.where(visible.any(axis=0), np.nan_to_num(z), 0.0)
        # Significant *and* a large part of the expected light absent: a bright star
        # whose own spot is boosted by a neighbour lacks a few sigma of partner light,
        # an artifact lacks nearly all of it.
        missing = np.clip(np.nan_to_num(missing, nan=0.0, posinf=1.0), 0.0, 1.0)
        p_h[h] = (np.clip(0.5 + (z_h[h] - cues.orphan_z_half) / cues.orphan_z_width, 0.0, 1.0)
                  * np.clip(0.5 + (missing - cues.missing_half) / cues.missing_width, 0.0, 1.0))

        # support: every observable partner clearly there, neither too faint nor too bright
        tol = np.sqrt(sigma**2 + (expected * own_err) ** 2)
        consistent = ((measured > lowest * own_pos - 2 * tol)
                      & (measured < highest * own_pos + 2 * tol)
                      & (measured > cues.support_min_snr * sigma))
        support_h[h] = (visible.sum(axis=0) >= 2) & np.all(consistent | ~visible, axis=0)

    # The spot is judged under its most star-like channel, except in a pair found by the
    # grouping: a pair is what a reflection through one analyser looks like, and its
    # channels are the hypothesis to test (in a crowded field another channel's
    # partners may land on unrelated spots by chance).
    best = np.argmin(p_h + 1e-3 * z_h, axis=0)
    if "channel" in spots.colnames and "group_id" in spots.colnames:
        gid = np.asarray(spots["group_id"], np.int64)
        chan = np.asarray(spots["channel"]).astype(str)
        hyp = np.full(n, -1)
        for h, ch in enumerate(channels):
            hyp[chan == ch] = h
        ids, counts = np.unique(gid, return_counts=True)
        in_pair = (gid >= 0) & (hyp >= 0) & (counts[np.searchsorted(ids, gid)] == 2)
        best = np.where(in_pair, hyp, best)
    z_orphan = z_h[best, np.arange(n)]
    p_orphan = p_h[best, np.arange(n)]
    log_ratio = None
    if fit is not None:
        log_ratio = float(np.nanmedian(fit.model)) if np.isfinite(fit.model).any() else None
    return PartnerEvidence(p_orphan, z_orphan, support_h.any(axis=0), np.asarray(channels)[best],
                           log_ratio, cues.support_keep)


def combine_evidence(p_learned: np.ndarray, evidence: PartnerEvidence | None,
                     support_keep: float | None = None) -> np.ndarray:
    """A classifier's artifact score combined with the partner evidence.

    ``p_artifact = noisy_or(p_learned * k, p_orphan)`` with ``k = support_keep`` for
    spots with full partner support and 1 otherwise: a spot in a confirmed quadruplet
    is a star whatever its cutout looks like (a learned classifier's false alarms on
    stars are mostly wide or blended spots of complete quadruplets), and missing
    partners reveal artifacts that look like stars in their own cutout.

    Parameters
    ----------
    p_learned : ndarray
        The classifier's own score per spot.
    evidence : PartnerEvidence or None
        From :func:`partner_evidence`; None returns ``p_learned``.
    support_keep : float, optional
        Fraction of ``p_learned`` kept for supported spots (default: the evidence's,
        from ``CueConfig.support_keep``).
    """
    p = np.asarray(p_learned, float)
    if evidence is None:
        return p
    support_keep = evidence.support_keep if support_keep is None else support_keep
    return noisy_or(np.where(evidence.support, support_keep * p, p), evidence.p_orphan)


def scores_table(name: str, p_learned: np.ndarray, evidence: PartnerEvidence | None) -> Table:
    """A classifier's score table: its own score ``name``, the partner cues, ``p_artifact``.

    With ``evidence`` None (cue disabled), ``p_orphan`` is 0, ``partner_support`` False
    and ``p_artifact`` equals the classifier's own score.
    """
    p = np.asarray(p_learned, float)
    if evidence is None:
        return Table({name: p, "p_orphan": np.zeros(p.size), "partner_support": np.zeros(p.size, bool),
                      "p_artifact": p.copy()})
    return Table({name: p, "p_orphan": np.asarray(evidence.p_orphan, float),
                  "partner_support": np.asarray(evidence.support, bool),
                  "p_artifact": combine_evidence(p, evidence)})
