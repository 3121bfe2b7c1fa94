"""Reducing many files: one file's job, and whole nights.

:func:`reduce_file` is the unit of work (read, reduce, write products) and never
raises for a bad input: it returns a :class:`FileOutcome` saying what happened, so
one bad file never stops or loses the others.
"""

from __future__ import annotations

import glob
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .instrument import InstrumentProfile, load_profile
from .io import FrameError, OutputError, read_frame
from .products import product_paths, products_exist, write_products

__all__ = ["FileOutcome", "reduce_file", "reduce_night", "write_night_products", "expand_inputs",
           "stem_of"]

log = logging.getLogger(__name__)


@dataclass
class FileOutcome:
    """What happened to one input file.

    ``status`` is ``"done"``, ``"skipped"`` (products already there) or ``"failed"``.
    """

    path: str
    status: str
    error: str = ""
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def stem_of(path: str | os.PathLike) -> str:
    """The product stem of an input: the file name without ``.fits``/``.fit``/``.fts`` (+ ``.gz``)."""
    name = Path(path).name
    for ext in (".gz", ".fz", ".bz2"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    for ext in (".fits", ".fit", ".fts"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files from paths, globs, directories (``*.fits`` inside) and ``@list.txt`` files.

    Raises
    ------
    FileNotFoundError
        A pattern matches nothing, or a list file cannot be read.
    """
    files: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            try:
                lines = Path(item[1:]).read_text().splitlines()
            except OSError as exc:
                raise FileNotFoundError(f"{item[1:]}: cannot read list file ({exc.strerror})") from None
            files.extend(expand_inputs([ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]))
        elif os.path.isdir(item):
            found = sorted(p for ext in ("*.fits", "*.fit", "*.fts", "*.fits.gz")
                           for p in glob.glob(os.path.join(item, ext)))
            if not found:
                raise FileNotFoundError(f"{item}: no FITS files in this folder")
            files.extend(found)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"{item}: no file matches this pattern")
            files.extend(found)
        else:
            files.append(item)
    seen = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def reduce_file(path: str | os.PathLike, outdir: str | os.PathLike, *,
                profile: str | InstrumentProfile = "robopol", classifier=None,
                threshold: float | None = None, uncertain_band=None, overwrite: bool = False,
                resume: bool = False, diagnostic: bool = False, config=None) -> FileOutcome:
    """Read, reduce and write the products of one frame; never raises for bad input.

    Parameters
    ----------
    path : path-like
        Input FITS file (never modified).
    outdir : path-like
        Output folder.
    profile, classifier, threshold, uncertain_band
        As for `robopol_clean.pipeline.reduce_frame` (``None`` = its default).
    overwrite : bool
        Replace existing products.
    resume : bool
        Skip a file whose products all exist (unless ``overwrite``).
    diagnostic : bool
        Also write the diagnostic PNG.
    config : PhotometryConfig, optional
        Photometry and flag settings (the defaults if omitted).

    Returns
    -------
    FileOutcome
    """
    from .pipeline import DEFAULT_THRESHOLD, DEFAULT_UNCERTAIN_BAND, reduce_frame

    path = str(path)
    stem = stem_of(path)
    t0 = time.perf_counter()
    if resume and not overwrite and products_exist(outdir, stem):
        return FileOutcome(path, "skipped")
    if not overwrite:
        existing = [p for p in product_paths(outdir, stem).values() if p.exists()]
        if existing:
            return FileOutcome(path, "failed", f"{existing[0]}: output exists (use --overwrite to replace it)")
    caught: list[str] = []
    try:
        prof = load_profile(profile)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            ccd = read_frame(path, prof)
            result = reduce_frame(
                ccd, profile=prof, classifier=classifier,
                threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                uncertain_band=DEFAULT_UNCERTAIN_BAND if uncertain_band is None else uncertain_band,
                name=Path(path).name, config=config)
        caught = _unique_messages(records)
        write_products(result, outdir, stem, overwrite=overwrite, diagnostic=diagnostic)
    except (FrameError, OutputError) as exc:
        return FileOutcome(path, "failed", str(exc), seconds=time.perf_counter() - t0, warnings=caught)
    except Exception as exc:  # noqa: BLE001 -- one bad frame must not stop a night
        log.debug("unexpected failure on %s", path, exc_info=True)
        return FileOutcome(path, "failed", f"{path}: {type(exc).__name__}: {exc}",
                           seconds=time.perf_counter() - t0, warnings=caught)
    summary = result.summary()
    clean = result.stokes[result.stokes["flags"] == 0]
    summary["median_q_err"] = float(_median(clean["q_err"])) if len(clean) else float("nan")
    return FileOutcome(path, "done", summary=summary, seconds=time.perf_counter() - t0,
                       warnings=caught)


def _median(values) -> float:
    import numpy as np

    return float(np.median(np.asarray(values, float)))


def _unique_messages(records) -> list[str]:
    out: list[str] = []
    for r in records:
        msg = str(r.message)
        if msg not in out and not issubclass(r.category, DeprecationWarning):
            out.append(msg)
    return out


# ---------------------------------------------------------------------------------
# Whole nights on Dask
# ---------------------------------------------------------------------------------
#: Classifiers already loaded in this process (one per worker process): the network
#: is loaded once per worker, not once per frame.
_WORKER_CLASSIFIERS: dict = {}


def _worker_classifier(name):
    from .pipeline import get_classifier

    if not isinstance(name, str):
        return name
    if name not in _WORKER_CLASSIFIERS:
        _WORKER_CLASSIFIERS[name] = get_classifier(name)
    return _WORKER_CLASSIFIERS[name]


def _reduce_task(path: str, outdir: str, options: dict) -> FileOutcome:
    """The unit of work a Dask worker runs."""
    options = dict(options)
    options["classifier"] = _worker_classifier(options.get("classifier") or "cnn")
    return reduce_file(path, outdir, **options)


def reduce_night(files: list[str], outdir: str | os.PathLike, *, profile="robopol",
                 classifier: str = "cnn", threshold: float | None = None, uncertain_band=None,
                 config=None,
                 overwrite: bool = False, diagnostic: bool = False, workers: int | None = None,
                 threads_per_worker: int = 1, scheduler: str | None = None,
                 progress: bool | None = None, max_in_flight: int | None = None) -> list[FileOutcome]:
    """Reduce many frames in parallel on Dask distributed.

    Frames whose products all exist are skipped (resume) unless ``overwrite``. A bad
    frame becomes a ``failed`` outcome; the others go on. Tasks are streamed: at most
    ``max_in_flight`` frames are queued at once, so memory stays bounded however long
    the night.

    Parameters
    ----------
    files : list of str
        Input FITS files.
    outdir : path-like
        Output folder.
    profile, classifier, threshold, uncertain_band, config, overwrite, diagnostic
        As for :func:`reduce_file`; ``classifier`` is a name, loaded once per worker.
    workers : int, optional
        Local worker processes (default: one per core). Ignored with ``scheduler``.
    threads_per_worker : int
        Threads per local worker.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``) to use instead of a
        local cluster.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    max_in_flight : int, optional
        Frames queued at once (default: twice the cluster's threads).

    Returns
    -------
    list of FileOutcome
        In the order of ``files``.
    """
    import sys

    from dask.distributed import Client, LocalCluster, as_completed

    profile = load_profile(profile)
    options = dict(profile=profile, classifier=classifier, threshold=threshold, config=config,
                   uncertain_band=uncertain_band, overwrite=overwrite, resume=True,
                   diagnostic=diagnostic)
    # Absolute paths: workers of a --scheduler cluster run in folders of their own.
    outdir = os.path.abspath(str(outdir))
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        n = workers or max(1, os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    show = sys.stderr.isatty() if progress is None else progress
    results: dict[str, FileOutcome] = {}
    try:
        nthreads = sum(client.nthreads().values()) or 1
        window = max_in_flight or 2 * nthreads
        pending = iter(files)
        futures = as_completed()
        # Task keys unique to this night: two nights sharing a scheduler (or the same frame
        # reduced into two folders) must not share tasks. key -> the caller's path.
        night, keys = uuid.uuid4().hex[:8], {}

        def submit(path):
            key = f"reduce-{night}-{len(keys)}"
            keys[key] = path
            futures.add(client.submit(_reduce_task, os.path.abspath(path), outdir, options, key=key,
                                      pure=False))

        for path in _take(pending, window):
            submit(path)
        bar = _progress_bar(len(files), show)
        for future in futures:
            path = keys.get(future.key, "?")
            try:
                outcome = future.result()
                outcome.path = path
            except Exception as exc:  # noqa: BLE001 -- e.g. a worker killed repeatedly
                outcome = FileOutcome(path, "failed", f"{path}: {type(exc).__name__}: {exc}")
            results[outcome.path] = outcome
            future.release()
            bar(outcome)
            for path in _take(pending, 1):
                submit(path)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [results[f] for f in files]


def _take(iterator, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def _progress_bar(total: int, show: bool):
    """A callable advancing a tqdm bar (terminal) or logging one line per frame."""
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc="reducing")

        def step(outcome):
            bar.update(1)
            if outcome.status == "failed":
                bar.write(f"failed: {outcome.error}")
            if bar.n == total:
                bar.close()
        return step

    def log_line(outcome):
        log.info("%s: %s%s", outcome.path, outcome.status,
                 f" ({outcome.error})" if outcome.error else "")
    return log_line


def _complete_groups(spots) -> int:
    """Groups with a spot in every channel, counted from a spots table."""
    import numpy as np

    if not len(spots):
        return 0
    gid = np.asarray(spots["group_id"])
    counts = np.bincount(gid[gid >= 0]) if (gid >= 0).any() else np.zeros(0, int)
    return int(np.count_nonzero(counts >= 4))


def write_night_products(outcomes: list[FileOutcome], outdir: str | os.PathLike) -> dict[str, Path]:
    """Night products: ``summary.ecsv``, ``stokes_all.ecsv``, ``failures.ecsv``, ``night_report.png``.

    The per-frame catalogues are read back from ``outdir`` (frames reduced in an earlier,
    resumed run count too), so nothing large is held in memory while the night runs.
    """
    import numpy as np
    from astropy.table import Table, vstack

    from .io import write_atomic

    outdir = Path(outdir)
    written: dict[str, Path] = {}
    rows, stokes_tables, p_all, snr_all, rates = [], [], [], [], []
    for o in outcomes:
        if o.status == "failed":
            continue
        paths = product_paths(outdir, stem_of(o.path))
        try:
            spots = Table.read(paths["spots"], format="ascii.ecsv")
            stokes = Table.read(paths["stokes"], format="ascii.ecsv")
        except (OSError, ValueError) as exc:
            log.warning("%s: catalogues of a reduced frame cannot be read back (%s); left out of "
                        "the night products", o.path, exc)
            continue
        rows.append({
            "frame": Path(o.path).name, "n_spots": len(spots),
            "n_rejected": int(np.count_nonzero(spots["rejected"])) if len(spots) else 0,
            "n_uncertain": int(np.count_nonzero(spots["uncertain"])) if len(spots) else 0,
            "n_quadruplets": _complete_groups(spots),
            "n_clean": len(stokes),
            "median_q_err": float(np.median(stokes["q_err"])) if len(stokes) else np.nan,
            "seconds": o.seconds,
        })
        if len(stokes):
            stokes = stokes.copy()
            stokes.add_column(Path(o.path).name, name="frame", index=0)
            stokes.meta = {}
            stokes_tables.append(stokes)
        if len(spots):
            p_all.append(np.asarray(spots["p_artifact"], float))
            snr_all.append(np.asarray(spots["snr"], float))
            rates.append(float(np.mean(spots["rejected"])))
    if rows:
        summary = Table(rows=rows)
        summary["seconds"].unit = "s"
        write_atomic(outdir / "summary.ecsv", lambda p: summary.write(p, format="ascii.ecsv", overwrite=True),
                     overwrite=True)
        written["summary"] = outdir / "summary.ecsv"
    if stokes_tables:
        allq = vstack(stokes_tables, metadata_conflicts="silent")
        write_atomic(outdir / "stokes_all.ecsv", lambda p: allq.write(p, format="ascii.ecsv", overwrite=True),
                     overwrite=True)
        written["stokes_all"] = outdir / "stokes_all.ecsv"
    failed = [o for o in outcomes if o.status == "failed"]
    failures_path = outdir / "failures.ecsv"
    if failed:
        table = Table({"file": [o.path for o in failed], "error": [o.error for o in failed]})
        write_atomic(failures_path, lambda p: table.write(p, format="ascii.ecsv", overwrite=True),
                     overwrite=True)
        written["failures"] = failures_path
    else:
        failures_path.unlink(missing_ok=True)  # a resumed night that now succeeded
    if p_all:
        from .plots import plot_night_report

        p = np.concatenate(p_all)
        snr = np.concatenate(snr_all)
        write_atomic(outdir / "night_report.png",
                     lambda path: plot_night_report(p, snr, [r["frame"] for r in rows if r["n_spots"]],
                                                    rates, path), overwrite=True)
        written["night_report"] = outdir / "night_report.png"
    return written
