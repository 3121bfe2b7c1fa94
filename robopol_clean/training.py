"""Training data and training of the artifact CNN.

Datasets
--------
:func:`cutout_dataset_from_simulation` simulates frames, runs the **real** detection on
them (so the network is trained on exactly what it will score: detected spots,
centred as detected, normalised by :func:`~robopol_clean.classify.cnn.spot_cutouts`),
and labels each detection from the simulation's truth:

- a detection within ``match_radius`` (3 px) of a true star spot is a star spot
  (label 0);
- one within ``match_radius`` of a true artifact position, inside the extent of a
  reflection streak (its tail), or on a dust donut's ring (and on no star spot), is an
  artifact (label 1);
- detections matching both (a star spot on a streak) or neither (noise peaks,
  fragments of bright halos, mask-edge features) are left out, as are artifact kinds
  in ``ignore_kinds``. (The simulator's donuts change the sky by 1-4 %: they are
  almost never detected as spots, so a donut class needs brighter ones.)

Label 1 means "must be rejected": internal reflections (``streak``, ``ghost``) and,
by default, **cosmic rays** too -- they are not stars, and a sharp hit on a spot
corrupts its flux. Dust donuts are ignored by default (neither class): they are the
example of a *new* artifact class taught by transfer learning
(``train(..., init_from="default")``).

All artifacts are kept (including faint, tail-less reflections, the hard cases);
star spots are subsampled per frame, stratified in log(SNR), so faint and bright
stars are equally represented (training only on bright stars makes faint stars look
like artifacts), and saturated stars are always kept.

:func:`cutout_dataset_from_ds9` labels a real frame from DS9 regions drawn by an
astronomer around artifacts.

Training
--------
:func:`train` trains (or fine-tunes) a network with a validation split by frame,
flip and clipping augmentation, class weights and early stopping, and writes the
model, its metadata and an evaluation report. :func:`train_default_model` is the one
command that makes the shipped model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack
from scipy.spatial import cKDTree

from .classify.cnn import (
    CUTOUT_SIZE,
    DEFAULT_MODEL_NAME,
    CNNClassifier,
    _jsonable,
    build_model,
    compile_model,
    conv_layer_names,
    default_model_path,
    normalisation_params,
    save_model,
    spot_cutouts,
)
from .instrument import InstrumentProfile, load_profile

__all__ = [
    "CutoutDataset",
    "TrainResult",
    "DEFAULT_ARTIFACT_KINDS",
    "DEFAULT_IGNORE_KINDS",
    "frame_cutouts",
    "match_detections",
    "cutout_dataset_from_simulation",
    "cutout_dataset_from_ds9",
    "synthetic_cutouts",
    "augment_batch",
    "split_by_frame",
    "train",
    "train_default_model",
]

log = logging.getLogger(__name__)

#: Truth kinds labelled 1 (artifact) by default.
DEFAULT_ARTIFACT_KINDS = ("streak", "ghost", "cosmic_ray")
#: Truth kinds left out of the default training set (the transfer-learning example).
DEFAULT_IGNORE_KINDS = ("donut",)


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
        """Rows selected by a boolean mask or integer index."""
        index = np.asarray(index)
        return CutoutDataset(self.cutouts[index], self.labels[index], self.table[index],
                             dict(self.normalisation), dict(self.description))

    def counts(self) -> dict[str, int]:
        """Number of cutouts per label and per kind."""
        out = {"n": len(self), "artifacts": int(np.sum(self.labels == 1)),
               "stars": int(np.sum(self.labels == 0))}
        if len(self) and "kind" in self.table.colnames:
            kinds, n = np.unique(np.asarray(self.table["kind"]).astype(str), return_counts=True)
            out.update({f"kind_{k}": int(c) for k, c in zip(kinds, n)})
        return out

    @staticmethod
    def concatenate(datasets: list[CutoutDataset]) -> CutoutDataset:
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
        """Write the dataset to one compressed ``.npz`` file (atomically)."""
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
    :func:`~robopol_clean.detection.estimate_background`, detection with
    :func:`~robopol_clean.detection.detect_spots`, cutouts of the background-subtracted
    frame (masked pixels = sky) through
    :func:`~robopol_clean.classify.cnn.spot_cutouts`.

    Returns
    -------
    spots : Table
        The detection table.
    cutouts : ndarray, shape (n, size, size), float32
    """
    from .detection import detect_spots, estimate_background

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


def match_detections(spots: Table, truth: Table, *, match_radius: float = 3.0,
                     artifact_kinds=DEFAULT_ARTIFACT_KINDS, ignore_kinds=DEFAULT_IGNORE_KINDS,
                     streak_margin: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label detections from a simulation's truth.

    Parameters
    ----------
    spots : Table
        Detections (``x``, ``y``).
    truth : Table
        The simulation's spots table (``x``, ``y``, ``kind``, ``is_artifact``) joined,
        for artifacts, with the artifact extent (``x_center``, ``length``, ``width``)
        when available.
    match_radius : float
        Largest distance (pix) between a detection and a true position.
    artifact_kinds, ignore_kinds : sequence of str
        Truth kinds labelled 1, and kinds whose detections are left out. Other
        artifact kinds are left out too.
    streak_margin : float
        Extra margin (pix) around a streak's extent within which detections of its
        tail count as the streak.

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
    both = star_ok & art_ok
    only_star = star_ok & ~art_ok
    only_art = art_ok & ~star_ok
    labels[only_star] = 0
    kind[only_star] = "star"
    dist[only_star] = star_d[only_star]
    kind[both] = "ambiguous"
    is_target = np.isin(art_kind, list(artifact_kinds))
    use_art = only_art & is_target
    labels[use_art] = 1
    kind[only_art] = art_kind[only_art]
    dist[only_art] = art_d[only_art]
    # Ignored and unknown artifact kinds stay -1 (their kind is still reported).
    if ignore_kinds:
        labels[np.isin(kind, list(ignore_kinds))] = -1
    return labels, kind, dist


def _stratified_stars(snr: np.ndarray, saturated: np.ndarray, n_keep: int, rng,
                      max_saturated: int) -> np.ndarray:
    """Indices of star spots to keep: all saturated (up to a cap), then round-robin over log-SNR bins."""
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
    match_radius: float = 3.0,
    artifact_kinds=DEFAULT_ARTIFACT_KINDS,
    ignore_kinds=DEFAULT_IGNORE_KINDS,
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
        Frame size; smaller than the detector gives a region at a random origin (so the
        whole field -- mask, arms, vignetting -- is sampled). Detection cost grows with
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
        truth = _truth_with_extent(sim)
        labels, kinds, dist = match_detections(spots, truth, match_radius=match_radius,
                                               artifact_kinds=artifact_kinds, ignore_kinds=ignore_kinds)
        for k in np.unique(kinds[labels < 0]):
            n_left_out[k or "unmatched"] = n_left_out.get(k or "unmatched", 0) + int(np.sum(kinds[labels < 0] == k))
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


def _truth_with_extent(sim) -> Table:
    """The simulation's spots table, with artifact extents joined in (NaN for stars)."""
    spots = sim.spots
    t = Table({"x": np.asarray(spots["x"], float), "y": np.asarray(spots["y"], float),
               "kind": np.asarray(spots["kind"]).astype(str)})
    n = len(t)
    xc, length, width = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    arts = sim.artifacts
    if len(arts) and "artifact_id" in spots.colnames:
        aid = np.asarray(spots["artifact_id"])
        lookup = {int(a): j for j, a in enumerate(np.asarray(arts["artifact_id"]))}
        for j in np.flatnonzero(np.asarray(spots["is_artifact"], bool)):
            r = lookup.get(int(aid[j]))
            if r is not None:
                xc[j] = float(arts["x_center"][r])
                length[j] = float(arts["length"][r])
                width[j] = float(arts["width"][r])
    t["x_center"], t["length"], t["width"] = xc, length, width
    return t


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

    def colour(reg):
        # `regions` keeps a shape's DS9 colour as edgecolor/facecolor, a point's as color.
        vis = reg.visual
        return str(vis.get("color") or vis.get("edgecolor") or vis.get("facecolor") or "green").lower()

    art_regs = Regions([r for r in regs if artifact_color is None or colour(r) == artifact_color.lower()])
    x, y = np.asarray(spots["x"], float), np.asarray(spots["y"], float)
    inside = labels_from_regions(art_regs, x, y) if len(art_regs) else np.zeros(len(spots), bool)
    labels = np.where(inside, 1, 0)
    if star_color is not None:
        star_regs = Regions([r for r in regs if colour(r) == star_color.lower()])
        in_star = labels_from_regions(star_regs, x, y) if len(star_regs) else np.zeros(len(spots), bool)
        labels = np.where(inside, 1, np.where(in_star, 0, -1))
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

    Returns
    -------
    cutouts : ndarray, shape (n, size, size), float32 (adu, with sky)
    labels : ndarray of int8
    table : Table
        ``frame`` (i // 50), ``label``, ``kind``, ``snr``, ``sky``, ``sky_rms``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - size // 2
    labels = (rng.random(n) < artifact_fraction).astype(np.int8)
    snr = np.exp(rng.uniform(np.log(8), np.log(500), n))
    out = np.empty((n, size, size), np.float32)
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


# ---------------------------------------------------------------------------------
# Augmentation and training
# ---------------------------------------------------------------------------------
def augment_batch(x: np.ndarray, rng: np.random.Generator, *, flips: bool = True,
                  clip_fraction: float = 0.4, clip_sigma: tuple[float, float] = (4.0, 300.0),
                  normalisation: dict | None = None) -> np.ndarray:
    """Random flips and saturation-like clipping of normalised cutouts (new array).

    - flips: horizontal and vertical, each with probability 1/2 (a reflection's tail
      may point either way; the network must not learn a direction);
    - clipping: a fraction of cutouts is cut flat at a level drawn log-uniformly in
      ``clip_sigma`` (in units of the sky noise), as a saturated or 8-bit-clipped
      frame would show them, and half of those also clipped from below at 0.5-3
      sigma under the sky (clipped display renderings). Clipping commutes with the
      monotonic stretch, so it is applied to normalised values directly.
    """
    norm = normalisation or normalisation_params()
    out = np.array(x, np.float32, copy=True)
    n = out.shape[0]
    if flips:
        fx = rng.random(n) < 0.5
        fy = rng.random(n) < 0.5
        out[fx] = out[fx][:, :, ::-1]
        out[fy] = out[fy][:, ::-1, :]
    if clip_fraction > 0:
        sel = np.flatnonzero(rng.random(n) < clip_fraction)
        if sel.size:
            k, scale = float(norm["k"]), float(norm["scale"])
            z_hi = np.exp(rng.uniform(np.log(clip_sigma[0]), np.log(clip_sigma[1]), sel.size))
            hi = (scale * np.arcsinh(z_hi / k)).astype(np.float32)
            sub = np.minimum(out[sel], hi[:, None, None])
            low = rng.random(sel.size) < 0.5
            lo = (-scale * np.arcsinh(rng.uniform(0.5, 3.0, sel.size) / k)).astype(np.float32)
            sub = np.where(low[:, None, None], np.maximum(sub, lo[:, None, None]), sub)
            out[sel] = sub
    return out


def split_by_frame(frames: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/validation masks holding whole frames apart.

    Cutouts of one frame share its seeing, sky and artifacts (pairs from one bright
    star), so a split by cutout would leak; with a single frame the split falls back
    to cutouts.
    """
    frames = np.asarray(frames)
    uniq = np.unique(frames)
    rng = np.random.default_rng(seed)
    if uniq.size < 2:
        val = rng.random(frames.size) < val_fraction
    else:
        n_val = min(uniq.size - 1, max(1, int(round(val_fraction * uniq.size))))
        val_frames = rng.choice(uniq, n_val, replace=False)
        val = np.isin(frames, val_frames)
    return ~val, val


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : keras.Model
        The trained network (best weights).
    classifier : CNNClassifier
        The same network wrapped for inference, with its metadata.
    history : dict
        Per-epoch training and validation loss/accuracy/AUC.
    metrics : dict
        Evaluation on the validation frames (see :func:`robopol_clean.evaluation.evaluate`).
    metadata : dict
        What was written to ``<name>.json``.
    model_path, metadata_path, report_dir : Path or None
        Files written (None when ``out_dir`` is None).
    train_index, val_index : ndarray
        Rows of the dataset used for training and validation.
    seconds : float
        Training wall time.
    """

    model: Any
    classifier: CNNClassifier
    history: dict
    metrics: dict
    metadata: dict
    model_path: Path | None
    metadata_path: Path | None
    report_dir: Path | None
    train_index: np.ndarray
    val_index: np.ndarray
    seconds: float


def _batches(x, y, w, batch_size, rng, augment_kw):
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.order = rng.permutation(len(y))

        def __len__(self):
            return int(np.ceil(len(y) / batch_size))

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            xb = x[idx]
            if augment_kw is not None:
                xb = augment_batch(xb, rng, **augment_kw)
            return xb[..., None], y[idx].astype(np.float32), w[idx]

        def on_epoch_end(self):
            self.order = rng.permutation(len(y))

    return Batches()


def _calibrate(clf: CNNClassifier, val: CutoutDataset, target: float, threshold: float) -> dict:
    """Logit offset putting ``threshold`` at the (1 - target) quantile of the raw
    scores of validation star spots with SNR >= 10 (see ``train``)."""
    from .evaluation import STAR_SNR_MIN

    p = clf.predict_cutouts(val.cutouts)
    snr = np.asarray(val.table["snr"], float) if "snr" in val.table.colnames else np.full(len(val), np.inf)
    sel = (val.labels == 0) & (snr >= STAR_SNR_MIN)
    if sel.sum() < 20:
        log.warning("too few validation star spots (%d) to calibrate; no calibration", int(sel.sum()))
        return {"logit_offset": 0.0, "method": "none (too few validation stars)"}
    raw = float(np.clip(np.quantile(p[sel], 1.0 - target), 1e-4, 1 - 1e-4))
    offset = float(np.log(threshold / (1 - threshold)) - np.log(raw / (1 - raw)))
    return {"logit_offset": offset, "raw_threshold": raw, "target_star_false_rejection": target,
            "n_validation_stars": int(sel.sum()),
            "method": (f"prior shift: logit(p) + offset, placing the threshold {threshold} at the raw score "
                       f"exceeded by {target:.3%} of the validation star spots with SNR >= {STAR_SNR_MIN:g}")}


def _canonical(norm: dict) -> dict:
    """Validated normalisation parameters in canonical form (for storage and comparison)."""
    return normalisation_params(int(norm["version"]),
                                **{k: v for k, v in norm.items() if k not in ("version", "stretch")})


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    from . import __version__

    return {"robopol_clean": __version__, "keras": keras.__version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "backend": keras.backend.backend()}


def train(dataset: CutoutDataset, *, variant: str = "3conv", epochs: int = 30, batch_size: int = 64,
          seed: int = 0, val_split_by_frame: bool = True, val_fraction: float = 0.2,
          val_dataset: CutoutDataset | None = None, early_stopping: bool = True, patience: int = 5,
          learning_rate: float | None = None, init_from: str | os.PathLike | None = None,
          freeze_conv: bool | None = None, augment: bool = True, clip_fraction: float = 0.4,
          clip_sigma: tuple[float, float] = (4.0, 300.0),
          class_weight: bool = True, threshold: float = 0.5,
          target_false_rejection: float | None = None, out_dir: str | os.PathLike | None = None,
          name: str = DEFAULT_MODEL_NAME, report: bool = True,
          report_dir: str | os.PathLike | None = None, overwrite: bool = True,
          verbose: int = 0) -> TrainResult:
    """Train (or fine-tune) the artifact CNN and write model, metadata and report.

    Parameters
    ----------
    dataset : CutoutDataset
        Normalised, labelled cutouts with a ``frame`` column.
    variant : {"3conv", "4conv"}
        Architecture (ignored with ``init_from``).
    epochs, batch_size : int
        Upper limit of epochs (early stopping usually ends sooner) and batch size.
    seed : int
        Seeds weights, split, shuffling, augmentation and dropout
        (:func:`keras.utils.set_random_seed`); the same seed and data give the same model
        on the same machine.
    val_split_by_frame : bool
        Hold out whole frames (default) rather than random cutouts.
    val_fraction : float
        Fraction of frames (or cutouts) for validation.
    val_dataset : CutoutDataset, optional
        An explicit validation set (then ``dataset`` is all training data).
    early_stopping : bool
        Stop when the validation loss has not improved for ``patience`` epochs and
        restore the best weights.
    learning_rate : float, optional
        Adam learning rate (default 1e-3; 3e-4 when fine-tuning).
    init_from : "default", path or None
        Start from a trained model ("default" = the shipped one): transfer learning.
    freeze_conv : bool, optional
        Freeze the convolution layers (default: True with ``init_from``, else False),
        so only the dense head is retrained.
    augment : bool
        Random flips and clipping (see :func:`augment_batch`).
    clip_fraction : float
        Fraction of training cutouts clipped flat (saturation robustness).
    clip_sigma : (float, float)
        Range of clipping levels (sky sigma), drawn log-uniformly.
    class_weight : bool
        Weight classes inversely to their frequency.
    threshold : float
        Decision threshold stored in the metadata and used for the metrics.
    target_false_rejection : float, optional
        Recalibrate the output (a prior shift: a constant added to the logit, stored
        as ``calibration.logit_offset`` in the metadata and applied by
        :class:`~robopol_clean.classify.cnn.CNNClassifier`) so that this fraction of the
        validation star spots with SNR >= 10 reaches ``threshold``. Training uses
        balanced classes; real frames hold far fewer artifacts, and a rejected star
        spot costs a whole quadruplet. The ranking (AUC) is unchanged.
    out_dir : path-like, optional
        Write ``<name>.keras``, ``<name>.json`` and ``<name>_report/`` here.
    name : str
        Model name.
    report : bool
        Write the evaluation figures and metrics.
    report_dir : path-like, optional
        Where (default ``<out_dir>/<name>_report``).
    overwrite : bool
        Replace an existing model of that name.
    verbose : int
        Keras verbosity.

    Returns
    -------
    TrainResult
    """
    import keras

    from .evaluation import evaluate

    if len(dataset) == 0:
        raise ValueError("empty training dataset")
    t0 = time.perf_counter()
    keras.utils.set_random_seed(int(seed))
    rng = np.random.default_rng(seed)
    norm = _canonical(dataset.normalisation)

    if val_dataset is not None:
        train_ds, val_ds = dataset, val_dataset
        tr_idx, va_idx = np.arange(len(dataset)), np.arange(0)
    else:
        frames = np.asarray(dataset.table["frame"]) if "frame" in dataset.table.colnames else np.arange(len(dataset))
        if val_split_by_frame:
            tr, va = split_by_frame(frames, val_fraction, seed)
        else:
            va = rng.random(len(dataset)) < val_fraction
            tr = ~va
        tr_idx, va_idx = np.flatnonzero(tr), np.flatnonzero(va)
        train_ds, val_ds = dataset.subset(tr_idx), dataset.subset(va_idx)
    if len(val_ds) == 0 or len(np.unique(val_ds.labels)) < 2:
        log.warning("validation set is empty or has a single class: metrics will be limited")

    frozen: list[str] = []
    if init_from is not None:
        base = CNNClassifier.load(None if str(init_from) == "default" else init_from)
        if base.normalisation != _canonical(norm):
            raise ValueError(f"dataset normalisation {norm} differs from the model's {base.normalisation}")
        model = base.model
        variant = base.metadata.get("variant", variant)
        if freeze_conv is None:
            freeze_conv = True
        lr = 3e-4 if learning_rate is None else learning_rate
    else:
        model = build_model(variant, size=dataset.cutouts.shape[1], seed=seed, compile=False)
        freeze_conv = bool(freeze_conv)
        lr = 1e-3 if learning_rate is None else learning_rate
    if freeze_conv:
        for layer in model.layers:
            if layer.name in conv_layer_names(model):
                layer.trainable = False
                frozen.append(layer.name)
    compile_model(model, learning_rate=lr)

    y = train_ds.labels.astype(np.float32)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if class_weight and n_pos and n_neg:
        cw = {0: y.size / (2.0 * n_neg), 1: y.size / (2.0 * n_pos)}
    else:
        cw = {0: 1.0, 1: 1.0}
    w = np.where(y == 1, cw[1], cw[0]).astype(np.float32)
    augment_kw = ({"flips": True, "clip_fraction": clip_fraction, "clip_sigma": tuple(clip_sigma),
                   "normalisation": norm} if augment else None)
    batches = _batches(train_ds.cutouts, y, w, batch_size, rng, augment_kw)
    validation = None
    if len(val_ds):
        yv = val_ds.labels.astype(np.float32)
        wv = np.where(yv == 1, cw[1], cw[0]).astype(np.float32)
        validation = (val_ds.cutouts[..., None], yv, wv)
    callbacks = []
    if early_stopping and validation is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True))
    fit = model.fit(batches, validation_data=validation, epochs=epochs, callbacks=callbacks, verbose=verbose)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    seconds = time.perf_counter() - t0
    best_epoch = (int(np.argmin(history["val_loss"])) + 1) if "val_loss" in history else len(history.get("loss", []))

    meta: dict[str, Any] = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variant": variant,
        "cutout_size": int(dataset.cutouts.shape[1]),
        "n_params": int(model.count_params()),
        "normalisation": norm,
        "threshold": float(threshold),
        "labels": {"0": "star spot", "1": "artifact (reflection streak/ghost, cosmic ray, ...)"},
        "data": {"train": {**dataset.description, **train_ds.counts()},
                 "validation": val_ds.counts() if len(val_ds) else {}},
        "training": {
            "epochs_run": len(history.get("loss", [])), "best_epoch": best_epoch, "max_epochs": epochs,
            "batch_size": batch_size, "seed": seed, "learning_rate": lr, "optimizer": "Adam",
            "loss": "binary_crossentropy", "class_weight": cw, "augmentation": augment_kw or {},
            "early_stopping": {"enabled": early_stopping, "patience": patience, "monitor": "val_loss"},
            "val_split_by_frame": val_split_by_frame, "val_fraction": val_fraction,
            "init_from": None if init_from is None else str(init_from), "frozen_layers": frozen,
            "seconds": round(seconds, 1), "machine": f"{platform.machine()} x{os.cpu_count()} cpu",
        },
        "versions": _versions(),
    }
    clf = CNNClassifier(model, meta)
    if report and len(val_ds) and (report_dir is not None or out_dir is not None):
        report_dir = Path(report_dir) if report_dir is not None else Path(out_dir) / f"{name}_report"
    else:
        report_dir = None
    if target_false_rejection is not None and len(val_ds):
        meta["calibration"] = _calibrate(clf, val_ds, float(target_false_rejection), threshold)
        clf.logit_offset = meta["calibration"]["logit_offset"]
    metrics: dict[str, Any] = {}
    if len(val_ds):
        metrics = evaluate(clf, val_ds.cutouts, val_ds.labels, val_ds.table, report_dir,
                           history=history, threshold=threshold, name=f"{name}: validation frames")
    meta["metrics"] = {k: v for k, v in metrics.items() if k != "figures"}
    clf.metadata = meta
    model_path = metadata_path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model_path, metadata_path = save_model(model, Path(out_dir) / f"{name}.keras", meta, overwrite=overwrite)
        clf.path = model_path
        log.info("wrote %s (%.0f kB) and %s", model_path, model_path.stat().st_size / 1e3, metadata_path)
    return TrainResult(model, clf, history, metrics, meta, model_path, metadata_path, report_dir,
                       tr_idx, va_idx, seconds)


def train_default_model(out_dir: str | os.PathLike | None = None, seed: int = 0, n_frames: int = 240, *,
                        quick: bool = False, epochs: int = 40, name: str = DEFAULT_MODEL_NAME,
                        n_test_frames: int | None = None, target_false_rejection: float = 0.005,
                        report_dir: str | os.PathLike | None = None,
                        threads: int | None = None) -> TrainResult:
    """Make the shipped model: simulate, detect, label, train, evaluate, save.

    ``train_default_model()`` writes ``robopol_clean/data/robopol_cnn.keras`` + ``.json``
    and the report ``./robopol_cnn_report/``; about 8 minutes on two CPU cores (dataset ~4 min,
    training ~4 min). A separate set of test frames (another seed, natural mix of
    stars and artifacts) is evaluated into ``<name>_report/test/``.

    Parameters
    ----------
    out_dir : path-like, optional
        Output folder (default: the package's ``data`` folder).
    seed : int
        Master seed (dataset frames, split, training).
    report_dir : path-like, optional
        Evaluation report folder (default ``<out_dir>/<name>_report``, or
        ``./<name>_report`` when writing into the package).
    n_frames : int
        Simulated 1024 x 1024 frames for training + validation.
    quick : bool
        A smoke run: 12 frames, 3 epochs (minutes -> seconds; not a usable model).
    epochs : int
        Maximum epochs.
    name : str
        Model name.
    n_test_frames : int, optional
        Independent test frames (default n_frames // 6; 0 to skip).
    target_false_rejection : float
        Calibration target (see :func:`train`): the fraction of validation star spots
        with SNR >= 10 allowed at or above the threshold (0.5 %; on independent frames
        this gave ~0.8 %).
    threads : int, optional
        TensorFlow intra-op threads (set before TensorFlow starts; default: all cores).

    Returns
    -------
    TrainResult
        ``metrics`` are the validation ones; ``metadata['test_metrics']`` the test ones.
    """
    if threads:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialised
            log.warning("TensorFlow threads already set; 'threads' ignored")
    if quick:
        n_frames, epochs = 12, 3
    out = Path(out_dir) if out_dir is not None else default_model_path().parent
    t0 = time.perf_counter()
    ds = cutout_dataset_from_simulation(n_frames, seed)
    log.info("dataset: %s in %.0f s", ds.counts(), time.perf_counter() - t0)
    if report_dir is None:
        # Figures do not belong in the installed package: beside it only for other folders.
        report_dir = (Path.cwd() if out_dir is None else out) / f"{name}_report"
    result = train(ds, variant="3conv", epochs=epochs, seed=seed, out_dir=out, name=name,
                   target_false_rejection=target_false_rejection, report_dir=report_dir)
    n_test = max(2, n_frames // 6) if n_test_frames is None else n_test_frames
    if n_test:
        from .evaluation import evaluate

        test = cutout_dataset_from_simulation(n_test, seed + 1_000_003, keep_all_stars=True)
        report = None if result.report_dir is None else result.report_dir / "test"
        tm = evaluate(result.classifier, test.cutouts, test.labels, test.table, report,
                      threshold=result.classifier.threshold, name=f"{name}: independent test frames")
        result.metadata["test_metrics"] = {k: v for k, v in tm.items() if k != "figures"}
        result.metadata["data"]["test"] = {**test.description}
    result.metadata["training"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    result.metadata["command"] = (f"python -c 'from robopol_clean.training import train_default_model; "
                                  f"train_default_model(seed={seed}, n_frames={n_frames})'")
    save_model(result.model, out / f"{name}.keras", result.metadata, overwrite=True)
    return result
