"""Labelled cutouts of detected spots: the training and evaluation data of the artifact CNN.

:func:`cutout_dataset_from_simulation` simulates frames, runs the **real** detection on
them (so the network is trained on exactly what it will score: detected spots,
centred as detected, normalised by :func:`~robopol_clean.classify.cnn.spot_cutouts`),
and labels each detection from the simulation's truth with :func:`match_detections`:

- a detection within :data:`MATCH_RADIUS` (3 px) of a true star spot is a star spot
  (label 0);
- one within :data:`MATCH_RADIUS` of a true artifact position, inside the extent of a
  reflection streak (its tail, with a margin of :data:`STREAK_MARGIN`), or on a dust
  donut's ring (and on no star spot), is an artifact (label 1);
- detections matching both (a star spot on a streak) or neither (noise peaks,
  fragments of bright halos, mask-edge features) are left out, as are artifact kinds
  in ``ignore_kinds``. (The simulator's donuts change the sky by 1-4 %: they are
  almost never detected as spots, so a donut class needs brighter ones.)

The benchmarks label their held-out detections with the same function, so training
and benchmark labels follow one rule.

Label 1 means "must be rejected": internal reflections (``streak``, ``ghost``) and,
by default, **cosmic rays** too -- they are not stars, and a sharp hit on a spot
corrupts its flux. Dust donuts are ignored by default (neither class): they are the
example of a *new* artifact class taught by transfer learning
(``train(..., init_from="default")``, :mod:`robopol_clean.training`).

All artifacts are kept (including faint, tail-less reflections, the hard cases);
star spots are subsampled per frame, stratified in log(SNR), so faint and bright
stars are equally represented (training only on bright stars makes faint stars look
like artifacts), and saturated stars are always kept.

:func:`cutout_dataset_from_ds9` labels a real frame from DS9 regions drawn by an
astronomer around artifacts; :func:`synthetic_cutouts` makes idealised cutouts for
tests and examples.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack
from scipy.spatial import cKDTree

from .classify.cnn import CUTOUT_SIZE, _jsonable, normalisation_params, spot_cutouts
from .instrument import InstrumentProfile, load_profile

__all__ = [
    "CutoutDataset",
    "DEFAULT_ARTIFACT_KINDS",
    "DEFAULT_IGNORE_KINDS",
    "MATCH_RADIUS",
    "STREAK_MARGIN",
    "frame_cutouts",
    "truth_table",
    "match_detections",
    "cutout_dataset_from_simulation",
    "cutout_dataset_from_ds9",
    "synthetic_cutouts",
]

log = logging.getLogger(__name__)

#: Truth kinds labelled 1 (artifact) by default.
DEFAULT_ARTIFACT_KINDS = ("streak", "ghost", "cosmic_ray")
#: Truth kinds left out of the default training set (the transfer-learning example).
DEFAULT_IGNORE_KINDS = ("donut",)
#: Largest distance (pix) between a detection and the true position it matches.
MATCH_RADIUS = 3.0
#: Margin (pix) beyond a streak's end (and a donut's outer radius) within which a
#: detection still belongs to it. A streak's ``length`` is its extent above 3 % of the
#: peak in the noiseless model; a detected fragment of the tail is as uncertain in
#: position as any detection, so the margin is the point-match radius.
STREAK_MARGIN = MATCH_RADIUS


# ---------------------------------------------------------------------------------
# Dataset container
# ---------------------------------------------------------------------------------
@dataclass
class CutoutDataset:
    """Normalised cutouts with labels and a per-cutout table.

    Attributes
    ----------
    cutouts : ndarray, shape (n, size, size), float32
        Normalised cutouts (see :func:`~robopol_clean.classify.cnn.normalise_cutouts`).
    labels : ndarray, shape (n,), int8
        1 = artifact, 0 = star spot.
    table : Table
        One row per cutout: ``frame`` (index), ``x``, ``y`` (pix), ``label``, ``kind``,
        ``snr``, ``peak``, ``sky_rms``, ``saturated``, ``source`` and more.
    normalisation : dict
        Version and parameters of the normalisation applied.
    description : dict
        How the data were made (generator, seeds, counts), stored with trained models.
    """

    cutouts: np.ndarray
    labels: np.ndarray
    table: Table
    normalisation: dict = field(default_factory=normalisation_params)
    description: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int8)
        if len(self.cutouts) != len(self.labels) or len(self.table) != len(self.labels):
            raise ValueError("cutouts, labels and table must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> CutoutDataset:
        """Rows selected by a boolean mask or integer index (a new dataset)."""
        index = np.asarray(index)
        return CutoutDataset(self.cutouts[index], self.labels[index], self.table[index],
                             dict(self.normalisation), dict(self.description))

    def counts(self) -> dict[str, int]:
        """Number of cutouts: ``n``, ``artifacts``, ``stars`` and ``kind_<kind>`` per kind."""
        out = {"n": len(self), "artifacts": int(np.sum(self.labels == 1)),
               "stars": int(np.sum(self.labels == 0))}
        if len(self) and "kind" in self.table.colnames:
            kinds, n = np.unique(np.asarray(self.table["kind"]).astype(str), return_counts=True)
            out.update({f"kind_{k}": int(c) for k, c in zip(kinds, n)})
        return out

    @staticmethod
    def concatenate(datasets: Sequence[CutoutDataset]) -> CutoutDataset:
        """Join datasets (same normalisation); frame indices are renumbered to stay distinct."""
        datasets = [d for d in datasets if len(d)]
        if not datasets:
            raise ValueError("nothing to concatenate")
        norm = datasets[0].normalisation
        if any(d.normalisation != norm for d in datasets):
            raise ValueError("datasets were normalised differently")
        tables, offset = [], 0
        for d in datasets:
            t = d.table.copy()
            t["frame"] = np.asarray(t["frame"]) + offset
            offset = int(np.max(t["frame"])) + 1
            tables.append(t)
        return CutoutDataset(np.concatenate([d.cutouts for d in datasets]),
                             np.concatenate([d.labels for d in datasets]),
                             vstack(tables, metadata_conflicts="silent"), dict(norm),
                             {"combined": [d.description for d in datasets]})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dataset to one compressed ``.npz`` file (atomically); returns its path."""
        from .io import write_atomic

        path = Path(path)
        cols = {f"col_{c}": np.asarray(self.table[c]) for c in self.table.colnames}
        meta = json.dumps(_jsonable({"normalisation": self.normalisation, "description": self.description}))

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, cutouts=self.cutouts, labels=self.labels, meta=np.array(meta), **cols)

        return write_atomic(path, write, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CutoutDataset:
        """Read a dataset written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            table = Table({k[4:]: f[k] for k in f.files if k.startswith("col_")})
            return cls(f["cutouts"], f["labels"], table, meta["normalisation"], meta["description"])


# ---------------------------------------------------------------------------------
# Detection + cutouts, exactly as in the pipeline
# ---------------------------------------------------------------------------------
def frame_cutouts(data: np.ndarray, *, profile: InstrumentProfile, mask: np.ndarray | None = None,
                  threshold: float = 5.0, size: int = CUTOUT_SIZE,
                  normalisation: dict | None = None) -> tuple[Table, np.ndarray]:
    """Detect the spots of a frame and return them with their normalised cutouts.

    Follows :func:`robopol_clean.pipeline.reduce_frame`: background from
    :func:`~robopol_clean.background.estimate_background`, detection with
    :func:`~robopol_clean.detection.detect_spots`, cutouts of the background-subtracted
    frame (masked pixels = sky) through
    :func:`~robopol_clean.classify.cnn.spot_cutouts`.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        The frame (adu).
    profile : InstrumentProfile
        The instrument (for a detector region: ``profile.for_region(...)``).
    mask : ndarray of bool, optional
        Bad pixels.
    threshold : float
        Detection threshold (sky sigma).
    size : int
        Cutout size (pix).
    normalisation : dict, optional
        Normalisation parameters (default: the current version's).

    Returns
    -------
    spots : Table
        The detection table.
    cutouts : ndarray, shape (n, size, size), float32
        Normalised cutouts, one per detection.
    """
    from .background import estimate_background
    from .detection import detect_spots

    data = np.asarray(data, np.float32)
    bad = None if mask is None else np.asarray(mask, bool)
    background, background_rms = estimate_background(data, mask=bad, profile=profile)
    det = detect_spots(data, profile=profile, mask=bad, threshold=threshold,
                       background=background, background_rms=background_rms)
    residual = data - background
    if bad is not None:
        residual = np.where(bad, np.float32(0.0), residual)
    norm = normalisation or normalisation_params()
    cut = spot_cutouts(residual, det.spots, size=size, background_subtracted=True,
                       version=int(norm["version"]), params=norm)
    return det.spots, cut


# ---------------------------------------------------------------------------------
# Labels from a simulation's truth
# ---------------------------------------------------------------------------------
def truth_table(sim) -> Table:
    """A simulation's true spots with the extents of its artifacts, for :func:`match_detections`.

    Parameters
    ----------
    sim : SimulatedFrame
        From :func:`robopol_clean.simulate.simulate_frame`.

    Returns
    -------
    Table
        One row per true spot (star spots and artifacts): ``x``, ``y`` (pix, an
        artifact's brightest point), ``kind``, and the artifact's ``x_center``,
        ``length`` and ``width`` (pix; NaN for star spots).
    """
    spots, arts = sim.spots, sim.artifacts
    t = Table({"x": np.asarray(spots["x"], float), "y": np.asarray(spots["y"], float),
               "kind": np.asarray(spots["kind"]).astype(str)})
    extent = {c: np.full(len(t), np.nan) for c in ("x_center", "length", "width")}
    if len(arts) and "artifact_id" in spots.colnames:
        ids = np.asarray(arts["artifact_id"])
        order = np.argsort(ids)
        aid = np.asarray(spots["artifact_id"])
        row = order[np.clip(np.searchsorted(ids, aid, sorter=order), 0, ids.size - 1)]
        known = np.asarray(spots["is_artifact"], bool) & (ids[row] == aid)
        for c in extent:
            extent[c][known] = np.asarray(arts[c], float)[row[known]]
    for c, v in extent.items():
        t[c] = v
    return t


def match_detections(spots: Table, truth: Table, *, match_radius: float = MATCH_RADIUS,
                     artifact_kinds: Sequence[str] = DEFAULT_ARTIFACT_KINDS,
                     ignore_kinds: Sequence[str] = DEFAULT_IGNORE_KINDS,
                     streak_margin: float = STREAK_MARGIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label detections from a simulation's truth.

    Parameters
    ----------
    spots : Table
        Detections (``x``, ``y``, pix).
    truth : Table
        The true spots (``x``, ``y``, ``kind``), for artifacts with their extent
        (``x_center``, ``length``, ``width``) when available: :func:`truth_table`.
    match_radius : float
        Largest distance (pix) between a detection and a true position.
    artifact_kinds, ignore_kinds : sequence of str
        Truth kinds labelled 1, and kinds whose detections are left out. Other
        artifact kinds are left out too.
    streak_margin : float
        Margin (pix) beyond a streak's end within which detections of its tail count
        as the streak (``|x - x_center| <= length / 2 + streak_margin`` and
        ``|y - y_peak| <= max(width, match_radius)``), and beyond a donut's outer
        radius.

    Returns
    -------
    labels : ndarray of int
        1 artifact, 0 star, -1 left out (no match, ambiguous, or an ignored kind).
    kind : ndarray of str
        The matched truth kind ('' when none; 'ambiguous' when a star and an artifact
        both match).
    distance : ndarray
        Distance (pix) to the matched truth position (NaN when none).
    """
    n = len(spots)
    labels = np.full(n, -1, int)
    kind = np.full(n, "", dtype="U16")
    dist = np.full(n, np.nan)
    if n == 0 or len(truth) == 0:
        return labels, kind, dist
    xy = np.column_stack([np.asarray(spots["x"], float), np.asarray(spots["y"], float)])
    t_kind = np.asarray(truth["kind"]).astype(str)
    is_star = t_kind == "star"
    txy = np.column_stack([np.asarray(truth["x"], float), np.asarray(truth["y"], float)])

    star_d = np.full(n, np.inf)
    if is_star.any():
        star_d, _ = cKDTree(txy[is_star]).query(xy, distance_upper_bound=match_radius)
    art_d = np.full(n, np.inf)
    art_kind = np.full(n, "", dtype="U16")
    art = ~is_star
    if art.any():
        d, i = cKDTree(txy[art]).query(xy, distance_upper_bound=match_radius)
        ok = np.isfinite(d)
        art_d[ok] = d[ok]
        art_kind[ok] = t_kind[art][i[ok]]
        # Tails: detections inside a streak's extent (the head is at truth x, y).
        if {"x_center", "length", "width"} <= set(truth.colnames):
            streak = art & (t_kind == "streak")
            if streak.any():
                xc = np.asarray(truth["x_center"], float)[streak]
                half = 0.5 * np.asarray(truth["length"], float)[streak] + streak_margin
                hw = np.maximum(np.asarray(truth["width"], float)[streak], match_radius)
                ys = txy[streak, 1]
                inside = ((np.abs(xy[:, 0:1] - xc[None, :]) <= half[None, :])
                          & (np.abs(xy[:, 1:2] - ys[None, :]) <= hw[None, :]))
                tail = inside.any(axis=1) & ~ok
                art_d[tail] = np.abs(xy[tail, 1] - ys[np.argmax(inside[tail], axis=1)])
                art_kind[tail] = "streak"
    star_ok = np.isfinite(star_d)
    # Donuts (rings in the sky): detections on the ring, if any, that match nothing else.
    if art.any() and "length" in truth.colnames:
        donut = art & (t_kind == "donut")
        if donut.any():
            d, i = cKDTree(txy[donut]).query(xy)
            radius = 0.5 * np.asarray(truth["length"], float)[donut][i] + streak_margin
            ring = (d <= radius) & ~star_ok & ~np.isfinite(art_d)
            art_d[ring] = d[ring]
            art_kind[ring] = "donut"
    art_ok = np.isfinite(art_d)
    only_star = star_ok & ~art_ok
    only_art = art_ok & ~star_ok
    labels[only_star] = 0
    kind[only_star] = "star"
    dist[only_star] = star_d[only_star]
    kind[star_ok & art_ok] = "ambiguous"
    labels[only_art & np.isin(art_kind, list(artifact_kinds))] = 1
    kind[only_art] = art_kind[only_art]
    dist[only_art] = art_d[only_art]
    # Ignored and unknown artifact kinds stay -1 (their kind is still reported).
    if ignore_kinds:
        labels[np.isin(kind, list(ignore_kinds))] = -1
    return labels, kind, dist


# ---------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------
def _stratified_stars(snr: np.ndarray, saturated: np.ndarray, n_keep: int, rng: np.random.Generator,
                      max_saturated: int) -> np.ndarray:
    """Indices of the star spots to keep, at most ``n_keep`` (more only with saturated ones).

    All saturated spots (up to ``max_saturated``), then round-robin over bins of 0.25
    dex in SNR (in random order within a bin), so every SNR range is represented.
    """
    idx = np.arange(snr.size)
    sat = idx[saturated]
    if sat.size > max_saturated:
        sat = rng.choice(sat, max_saturated, replace=False)
    rest = idx[~saturated]
    n_rest = max(0, n_keep - sat.size)
    if rest.size <= n_rest:
        return np.concatenate([sat, rest])
    bins = np.floor(np.log10(np.maximum(snr[rest], 1.0)) / 0.25).astype(int)
    order = rng.permutation(rest.size)
    # Rank of each spot within its bin (in random order): take rank 0 of all bins first...
    rank = np.empty(rest.size, int)
    for b in np.unique(bins):
        members = order[bins[order] == b]
        rank[members] = np.arange(members.size)
    pick = np.lexsort((rng.random(rest.size), rank))[:n_rest]
    return np.concatenate([sat, rest[pick]])


def _table_rows(spots: Table, keep: np.ndarray, labels, kinds, dist, frame: int, source: str,
                extra: dict | None = None) -> Table:
    """The dataset table rows of detections ``keep`` of one frame (``extra``: constant columns)."""
    cols = {
        "frame": np.full(keep.size, frame, int),
        "spot_id": np.asarray(spots["spot_id"])[keep] if "spot_id" in spots.colnames else keep,
        "x": np.asarray(spots["x"], float)[keep],
        "y": np.asarray(spots["y"], float)[keep],
        "label": np.asarray(labels)[keep].astype(np.int8),
        "kind": np.asarray(kinds).astype("U16")[keep],
        "snr": np.asarray(spots["snr"], float)[keep],
        "peak": np.asarray(spots["peak"], float)[keep],
        "sky_rms": np.asarray(spots["sky_rms"], float)[keep],
        "elongation": np.asarray(spots["elongation"], float)[keep],
        "saturated": np.asarray(spots["saturated"], bool)[keep],
        "match_dist": np.asarray(dist, float)[keep],
        "source": np.full(keep.size, source, dtype="U8"),
    }
    for k, v in (extra or {}).items():
        cols[k] = np.full(keep.size, v)
    t = Table(cols)
    for c, unit in (("x", "pix"), ("y", "pix"), ("peak", "adu"), ("sky_rms", "adu"), ("match_dist", "pix")):
        t[c].unit = unit
    return t


def cutout_dataset_from_simulation(
    n_frames: int,
    seed: int,
    profile: str | os.PathLike | InstrumentProfile = "robopol",
    *,
    shape: tuple[int, int] = (1024, 1024),
    n_artifact_sources: tuple[int, int] | int | None = (6, 16),
    star_ratio: float = 2.0,
    min_stars_per_frame: int = 20,
    max_saturated_per_frame: int = 10,
    match_radius: float = MATCH_RADIUS,
    artifact_kinds: Sequence[str] = DEFAULT_ARTIFACT_KINDS,
    ignore_kinds: Sequence[str] = DEFAULT_IGNORE_KINDS,
    keep_all_stars: bool = False,
    sim_kwargs: dict | None = None,
    normalisation: dict | None = None,
    frame_offset: int = 0,
) -> CutoutDataset:
    """Labelled cutouts of detections in simulated frames.

    Parameters
    ----------
    n_frames : int
        Number of frames to simulate.
    seed : int
        Master seed (frame seeds from :func:`robopol_clean.simulate.frame_seeds`).
    profile : str, path or InstrumentProfile
        The instrument.
    shape : (ny, nx)
        Frame size (pix); smaller than the detector gives a region at a random origin (so
        the whole field -- mask, arms, vignetting -- is sampled). Detection cost grows with
        area: 1024 x 1024 frames take ~1 s each.
    n_artifact_sources : (lo, hi), int or None
        Reflection sources per frame (drawn uniformly in [lo, hi]); None: the simulator's
        default. More than a real frame's few, to get enough examples.
    star_ratio : float
        Star spots kept per artifact in each frame (at least ``min_stars_per_frame``).
    min_stars_per_frame, max_saturated_per_frame : int
        See the module notes on star sampling.
    match_radius : float
        Detection-to-truth matching radius (pix).
    artifact_kinds, ignore_kinds : sequence of str
        See :func:`match_detections`.
    keep_all_stars : bool
        Keep every star spot (for evaluation sets with the natural class mix).
    sim_kwargs : dict, optional
        Extra arguments to :func:`~robopol_clean.simulate.simulate_frame`.
    normalisation : dict, optional
        Normalisation parameters (default: the current version's).
    frame_offset : int
        Added to the frame indices in the table.

    Returns
    -------
    CutoutDataset
    """
    from .simulate import frame_seeds, simulate_frame

    prof = load_profile(profile)
    norm = normalisation or normalisation_params()
    rng = np.random.default_rng(seed)
    ny_det, nx_det = prof.shape
    shape = (min(shape[0], ny_det), min(shape[1], nx_det))
    cut_list, lab_list, tables = [], [], []
    n_left_out: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, fseed in enumerate(frame_seeds(seed, n_frames)):
        origin = (int(rng.integers(0, nx_det - shape[1] + 1)), int(rng.integers(0, ny_det - shape[0] + 1)))
        kw = dict(sim_kwargs or {})
        if isinstance(n_artifact_sources, tuple):
            kw.setdefault("n_artifact_sources", int(rng.integers(n_artifact_sources[0], n_artifact_sources[1] + 1)))
        elif n_artifact_sources is not None:
            kw.setdefault("n_artifact_sources", int(n_artifact_sources))
        sim = simulate_frame(prof, seed=fseed, shape=shape, origin=origin, **kw)
        data = np.asarray(sim.ccd.data, np.float32)
        mask = None if sim.ccd.mask is None else np.asarray(sim.ccd.mask, bool)
        spots, cut = frame_cutouts(data, profile=prof.for_region(*origin, data.shape), mask=mask,
                                   normalisation=norm)
        labels, kinds, dist = match_detections(spots, truth_table(sim), match_radius=match_radius,
                                               artifact_kinds=artifact_kinds, ignore_kinds=ignore_kinds)
        left_kinds, left_n = np.unique(kinds[labels < 0], return_counts=True)
        for k, c in zip(left_kinds, left_n):
            key = str(k) or "unmatched"
            n_left_out[key] = n_left_out.get(key, 0) + int(c)
        art_idx = np.flatnonzero(labels == 1)
        star_idx = np.flatnonzero(labels == 0)
        if not keep_all_stars:
            n_keep = max(min_stars_per_frame, int(round(star_ratio * art_idx.size)))
            pick = _stratified_stars(np.asarray(spots["snr"], float)[star_idx],
                                     np.asarray(spots["saturated"], bool)[star_idx], n_keep, rng,
                                     max_saturated_per_frame)
            star_idx = star_idx[pick]
        keep = np.sort(np.concatenate([art_idx, star_idx]))
        cut_list.append(cut[keep])
        lab_list.append(labels[keep])
        tables.append(_table_rows(spots, keep, labels, kinds, dist, frame_offset + i, "sim",
                                  {"frame_seed": fseed, "origin_x": origin[0], "origin_y": origin[1],
                                   "fwhm_true": float(sim.params.get("fwhm", np.nan))}))
        log.info("frame %d/%d: %d detections, %d artifacts, %d stars kept", i + 1, n_frames, len(spots),
                 art_idx.size, star_idx.size)
    size = cut_list[0].shape[1] if cut_list else CUTOUT_SIZE
    table = vstack(tables, metadata_conflicts="silent") if tables else Table()
    ds = CutoutDataset(
        np.concatenate(cut_list) if cut_list else np.zeros((0, size, size), np.float32),
        np.concatenate(lab_list) if lab_list else np.zeros(0, np.int8),
        table, dict(norm),
        {"generator": "cutout_dataset_from_simulation", "n_frames": int(n_frames), "seed": int(seed),
         "profile": prof.name, "shape": list(shape), "n_artifact_sources": n_artifact_sources,
         "star_ratio": star_ratio, "match_radius": match_radius,
         "artifact_kinds": list(artifact_kinds), "ignore_kinds": list(ignore_kinds or ()),
         "keep_all_stars": keep_all_stars, "left_out": n_left_out,
         "seconds": round(time.perf_counter() - t0, 1)})
    ds.description.update(ds.counts())
    return ds


def cutout_dataset_from_ds9(frame_path: str | os.PathLike, region_path: str | os.PathLike, *,
                            profile: str | os.PathLike | InstrumentProfile = "robopol",
                            artifact_color: str | None = None, star_color: str | None = None,
                            frame_index: int = 0, hdu: int | None = None,
                            normalisation: dict | None = None) -> CutoutDataset:
    """Labelled cutouts of a real frame, from DS9 regions drawn around artifacts.

    Every detected spot inside an (artifact) region is an artifact (label 1); every
    other detection is a star spot (label 0) -- or, with ``star_color``, only those
    inside regions of that colour are, and the rest are left out (for files that mark
    both classes, e.g. green circles on stars and red boxes on artifacts).

    Parameters
    ----------
    frame_path : path-like
        FITS frame (read with :func:`robopol_clean.io.read_frame`).
    region_path : path-like
        DS9 region file (image coordinates, 1-based as DS9 writes them).
    profile : str, path or InstrumentProfile
        The instrument.
    artifact_color : str, optional
        Only regions of this colour mark artifacts (default: every region).
    star_color : str, optional
        Regions of this colour mark star spots (see above).
    frame_index : int
        Frame number written to the table (for splitting by frame).
    hdu : int, optional
        HDU to read.
    normalisation : dict, optional
        Normalisation parameters (default: the current version's).

    Returns
    -------
    CutoutDataset
        ``kind`` is 'artifact' or 'star'; ``source`` is 'ds9'.
    """
    from regions import Regions

    from .io import read_frame
    from .regions_io import labels_from_regions, read_regions

    prof = load_profile(profile)
    ccd = read_frame(frame_path, prof, hdu=hdu)
    data = np.asarray(ccd.data, np.float32)
    mask = None if ccd.mask is None else np.asarray(ccd.mask, bool)
    norm = normalisation or normalisation_params()
    spots, cut = frame_cutouts(data, profile=prof, mask=mask, normalisation=norm)
    regs = read_regions(region_path)
    x, y = np.asarray(spots["x"], float), np.asarray(spots["y"], float)

    def colour(reg):
        # `regions` keeps a shape's DS9 colour as edgecolor/facecolor, a point's as color.
        vis = reg.visual
        return str(vis.get("color") or vis.get("edgecolor") or vis.get("facecolor") or "green").lower()

    def inside(colour_wanted: str | None) -> np.ndarray:
        sel = Regions([r for r in regs if colour_wanted is None or colour(r) == colour_wanted.lower()])
        return labels_from_regions(sel, x, y) if len(sel) else np.zeros(len(spots), bool)

    in_artifact = inside(artifact_color)
    if star_color is None:
        labels = np.where(in_artifact, 1, 0)
    else:
        labels = np.where(in_artifact, 1, np.where(inside(star_color), 0, -1))
    kinds = np.where(labels == 1, "artifact", np.where(labels == 0, "star", ""))
    keep = np.flatnonzero(labels >= 0)
    table = _table_rows(spots, keep, labels, kinds, np.full(len(spots), np.nan), frame_index, "ds9",
                        {"file": Path(frame_path).name})
    ds = CutoutDataset(cut[keep], labels[keep], table, dict(norm),
                       {"generator": "cutout_dataset_from_ds9", "frame": str(frame_path),
                        "regions": str(region_path), "artifact_color": artifact_color,
                        "star_color": star_color, "n_detections": len(spots)})
    ds.description.update(ds.counts())
    return ds


# ---------------------------------------------------------------------------------
# Synthetic cutouts (tests, demonstrations)
# ---------------------------------------------------------------------------------
def synthetic_cutouts(n: int, *, seed: int = 0, size: int = CUTOUT_SIZE, artifact_fraction: float = 0.5,
                      sky: float = 200.0, sky_rms: float = 10.0) -> tuple[np.ndarray, np.ndarray, Table]:
    """Raw cutouts of round star spots and comet-like streaks, for tests and examples.

    Stars are round Gaussians (FWHM 3.5-5.5 px); artifacts are horizontal streaks
    15-50 px long and 3-8 px tall (FWHM) with a bright head and an exponentially
    fading tail. Peak SNR is log-uniform in 8-500. Sky and Gaussian noise are added.

    Parameters
    ----------
    n : int
        Number of cutouts.
    seed : int
        Random seed.
    size : int
        Cutout size (pix).
    artifact_fraction : float
        Probability that a cutout is an artifact.
    sky, sky_rms : float
        Sky level and its Gaussian noise (adu).

    Returns
    -------
    cutouts : ndarray, shape (n, size, size), float32
        Raw cutouts (adu, with sky).
    labels : ndarray of int8
        1 = artifact, 0 = star spot.
    table : Table
        ``frame`` (i // 50), ``label``, ``kind``, ``snr``, ``sky``, ``sky_rms``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - size // 2
    labels = (rng.random(n) < artifact_fraction).astype(np.int8)
    snr = np.exp(rng.uniform(np.log(8), np.log(500), n))
    out = np.empty((n, size, size), np.float32)
    # One cutout at a time: the draws of each depend on its class (the seed fixes the set).
    for i in range(n):
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        if labels[i]:
            length = rng.uniform(15, 50)
            sy = rng.uniform(3, 8) / 2.355
            sx = rng.uniform(1.5, 2.5)
            direction = rng.choice([-1.0, 1.0])
            u = (xx - dx) * direction
            tail = np.where(u >= 0, np.exp(-u / (0.35 * length)) * (u <= length), 0.0)
            head = np.exp(-0.5 * (u / sx) ** 2)
            prof_x = np.maximum(head, 0.6 * tail)
            img = prof_x * np.exp(-0.5 * ((yy - dy) / sy) ** 2)
        else:
            s = rng.uniform(3.5, 5.5) / 2.355
            img = np.exp(-0.5 * (((xx - dx) / s) ** 2 + ((yy - dy) / s) ** 2))
        out[i] = sky + snr[i] * sky_rms * img + rng.normal(0, sky_rms, (size, size))
    table = Table({"frame": np.arange(n) // 50, "label": labels,
                   "kind": np.where(labels == 1, "streak", "star"), "snr": snr,
                   "sky": np.full(n, sky), "sky_rms": np.full(n, sky_rms)})
    return out, labels, table
