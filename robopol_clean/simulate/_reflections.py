"""Reflection artifacts: horizontal streaks (a head with a tail) and compact ghosts.

Most come as *orphan pairs*: two members laid out like one analyser pair of a pattern
whose other pair is missing. Each group is placed near its parent star (drawn with weight
flux**1.5), beside a real pattern, or anywhere; its peak S/N is drawn so that many are
faint, most moderate and a few saturate.
"""

from __future__ import annotations

import math

import numpy as np

from ..instrument import InstrumentProfile, SpotGeometry
from ._render import deposit, grid, moffat, moffat_alpha, sample
from ._stars import StarField

# Stamp half-sizes (px) of a reflection along x and y.
_HX, _HY = 64, 20


def _draw_group_count(rng: np.random.Generator, n_groups: int | None, area_frac: float) -> int:
    """Number of reflection groups (an orphan pair or a single).

    ``n_groups`` if given; else none on 20 % of full frames and 1 + Poisson(2.3) on the
    others, thinned by the frame's area fraction.
    """
    if n_groups is not None:
        return int(n_groups)
    n = 1 + int(rng.poisson(2.3)) if rng.random() < 0.8 else 0
    return int(rng.binomial(n, area_frac)) if area_frac < 1 else n


def _draw_members(rng, prof, geometry, stars, n_groups, spot_offset, shape, origin,
                  fwhm) -> list[dict]:
    """Position, kind, parent, pair and shape parameters of every reflection (one dict each)."""
    ny, nx = shape
    x0, y0 = origin
    field_ids = np.flatnonzero(~stars.is_target)
    weight = stars.flux[field_ids] ** 1.5
    p_parent = weight / weight.sum() if weight.sum() > 0 else None
    pairs = (prof.q_channels, prof.u_channels)
    members: list[dict] = []
    n_pairs = 0
    for _ in range(n_groups):
        kind = "streak" if rng.random() < 0.7 else "ghost"
        is_pair = rng.random() < 0.65
        which = int(rng.integers(0, 2))
        parent = int(rng.choice(field_ids, p=p_parent)) if p_parent is not None else -1
        if rng.random() < 0.2 and len(field_ids):  # beside or on a real pattern
            other = int(rng.choice(field_ids))
            vx = stars.x[other] + rng.normal(0, 25)
            vy = stars.y[other] + rng.normal(0, 25)
        elif parent >= 0:
            r = rng.uniform(80.0, 700.0)
            a = rng.uniform(0, 2 * math.pi)
            vx, vy = stars.x[parent] + r * math.cos(a), stars.y[parent] + r * math.sin(a)
        else:
            vx, vy = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        # keep the members on the frame (a pair's members sit ~spot_offset px from its centre)
        if is_pair:
            mx, my = min(spot_offset + 8.0, (nx - 1) / 2), min(spot_offset + 8.0, (ny - 1) / 2)
        else:
            mx, my = 20.0, 20.0
        vx = float(np.clip(vx, mx, nx - 1 - mx))
        vy = float(np.clip(vy, my, ny - 1 - my))
        if is_pair:
            chs = pairs[which]
            pos = geometry.spot_positions(vx + x0, vy + y0)
            places = [(float(pos[ch][0]) - x0, float(pos[ch][1]) - y0) for ch in chs]
            pid, mimics = n_pairs, ",".join(chs)
            n_pairs += 1
        else:
            places = [(vx, vy)]
            pid, mimics = -1, ""
        # peak S/N: many faint (the hard cases), most moderate, a few up to saturation
        u_b = rng.random()
        faint = u_b < 0.4
        if faint:
            snr0 = rng.uniform(3.0, 8.0)
        elif u_b < 0.85:
            snr0 = math.exp(rng.uniform(math.log(8.0), math.log(100.0)))
        else:
            snr0 = math.exp(rng.uniform(math.log(100.0), math.log(1.0e4)))
        width0 = float(np.clip(fwhm * math.exp(rng.normal(0.05, 0.15)), 3.0, 8.0))
        length0 = rng.uniform(15.0, 50.0)
        tail_dir = -1 if rng.random() < 0.7 else 1
        for x, y in places:
            members.append(dict(
                kind=kind, x=x, y=y, parent=parent, pair_id=pid, mimics=mimics,
                snr_target=snr0 * math.exp(rng.normal(0.0, 0.25)),
                width=float(np.clip(width0 * math.exp(rng.normal(0, 0.05)), 3.0, 8.0)),
                length=length0 * math.exp(rng.normal(0, 0.1)),
                tail_dir=tail_dir, tail_amp=rng.uniform(0.15, 0.5),
                no_tail=(faint and rng.random() < 0.7) or kind == "ghost",
                ghost_fwhm=fwhm * rng.uniform(1.0, 1.5), ghost_q=rng.uniform(1.0, 1.3),
            ))
    return members


def _stamp(rng, m: dict, dx: np.ndarray, dy: np.ndarray, along_x: np.ndarray):
    """One member's unnormalised stamp and its noiseless profile along x through the peak.

    Returns the stamp (on ``dx``, ``dy``), the profile (on ``along_x``), the vertical FWHM
    (px) and the tail direction (0: none).
    """
    if m["kind"] == "ghost":  # an elongated Moffat (beta 3), major axis along x
        alpha = moffat_alpha(m["ghost_fwhm"], 3.0)
        e = 1.0 - 1.0 / m["ghost_q"]
        stamp = moffat(dx, dy, alpha, 3.0, e, 0.0)
        profile = (1.0 + (along_x / (alpha / math.sqrt(1 - e))) ** 2) ** -3.0
        width = 2 * alpha * math.sqrt(1 - e) * math.sqrt(2 ** (1 / 3.0) - 1)
        return stamp, profile, width, 0
    # a streak: Gaussian across; along x a Gaussian core plus an exponential tail
    sv = m["width"] / 2.3548
    if m["no_tail"]:
        sh = sv * rng.uniform(1.1, 1.8)
        t, tau, tail_dir = 0.0, 1.0, 0
    else:
        sh = sv * rng.uniform(1.2, 2.0)
        t = m["tail_amp"]
        tail_dir = m["tail_dir"]
        tau = max((m["length"] - 2.65 * sh) / math.log(t / 0.03), 1.5)  # tail reaches 3 % at length

    def along(u):
        ahead = np.clip(u, 0, None)
        core = np.exp(-0.5 * (u / sh) ** 2)
        return core + t * np.exp(-ahead / tau) * (1 - np.exp(-0.5 * (ahead / sh) ** 2))

    sign = tail_dir or 1
    stamp = along(dx * sign) * np.exp(-0.5 * (dy / sv) ** 2)
    return stamp, along(along_x * sign), m["width"], tail_dir


def add_reflections(rng: np.random.Generator, prof: InstrumentProfile, geometry: SpotGeometry,
                    stars: StarField, light: np.ndarray, sky: np.ndarray, *, n_groups: int | None,
                    area_frac: float, spot_offset: float, origin: tuple[int, int],
                    fwhm: float) -> list[dict]:
    """Draw the reflection artifacts and add them into the image.

    Parameters
    ----------
    rng : Generator
        The frame's random generator.
    prof : InstrumentProfile
        The instrument (read noise, analyser pairs).
    geometry : SpotGeometry
        The frame's spot geometry (pairs are laid out with it).
    stars : StarField
        The stars (parents and neighbours).
    light : ndarray
        Flat float64 image (electron) the reflections are added into.
    sky : ndarray
        Noiseless sky (electron/px), image shape; sets each peak from its S/N.
    n_groups : int or None
        Number of groups (an orphan pair or a single); ``None`` draws it.
    area_frac : float
        Frame area / detector area (at most 1).
    spot_offset : float
        Largest spot offset (px) from a pattern centre.
    origin : (x0, y0)
        Detector pixel of image pixel (0, 0).
    fwhm : float
        The stars' FWHM (px); reflections are about as wide, ghosts 1-1.5 times.

    Returns
    -------
    list of dict
        One truth row per reflection (see :func:`~robopol_clean.simulate._truth.artifact_table`).
    """
    shape = sky.shape
    n = _draw_group_count(rng, n_groups, area_frac)
    members = _draw_members(rng, prof, geometry, stars, n, spot_offset, shape, origin, fwhm)
    if not members:
        return []
    x = np.array([m["x"] for m in members])
    y = np.array([m["y"] for m in members])
    gx, gy, dx, dy = grid(x, y, _HX, _HY)
    stamps = np.empty(dx.shape[:1] + (2 * _HY + 1, 2 * _HX + 1))
    along_x = np.linspace(-_HX, _HX, 8 * (2 * _HX) + 1)
    morphology = []
    for i, m in enumerate(members):
        ddx, ddy = np.broadcast_arrays(dx[i], dy[i])
        stamp, profile, width, tail_dir = _stamp(rng, m, ddx, ddy, along_x)
        stamps[i] = stamp / stamp.sum()
        # truth morphology from the noiseless profile: peak offset, extent above 3 % of the peak
        k = int(np.argmax(profile))
        above = along_x[profile >= 0.03 * profile[k]]
        morphology.append((along_x[k], float(above.max() - above.min()), float(above.mean()), width,
                           tail_dir))
    snr = np.array([m["snr_target"] for m in members])
    peaks = np.sqrt(sample(sky, x, y) + prof.read_noise ** 2) * snr
    fluxes = peaks / stamps.max(axis=(1, 2))
    in_frame = deposit(light, gx, gy, stamps * fluxes[:, None, None], shape)
    rows = []
    for i, m in enumerate(members):
        x_peak, length, x_mid, width, tail_dir = morphology[i]
        rows.append(dict(
            kind=m["kind"], x=m["x"] + x_peak, y=m["y"],
            x_center=m["x"] + (x_mid if length else 0.0), length=length, width=width,
            flux=fluxes[i], flux_in_frame=in_frame[i], peak=peaks[i], snr_peak=m["snr_target"],
            parent=m["parent"], pair_id=m["pair_id"], mimics=m["mimics"], tail_dir=tail_dir,
        ))
    return rows
