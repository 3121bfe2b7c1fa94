"""Reducing many files: one file's job, and whole nights.

:func:`reduce_file` is the unit of work (read, reduce, write products) and never
raises for a bad input: it returns a :class:`FileOutcome` saying what happened, so
one bad file never stops or loses the others.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .inputs import expand_inputs, precheck_frame, stem_of
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
    A reduced frame also carries its counts (``summary``) and, for the night report,
    every detection's ``p_artifact`` and ``snr`` (a few tens of kB).
    """

    path: str
    status: str
    error: str = ""
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    p_artifact: np.ndarray | None = None
    snr: np.ndarray | None = None

    def describe(self) -> str:
        """One line for logs: ``<path>: done: ...``, ``<path>: skipped ...`` or ``failed: <error>``."""
        if self.status == "failed":
            return f"failed: {self.error}"
        if self.status == "skipped":
            return f"{self.path}: skipped (products exist; --overwrite to redo)"
        s = self.summary
        return (f"{self.path}: done: {s['n_spots']} spots, {s['n_rejected']} rejected, "
                f"{s['n_uncertain']} uncertain, {s['n_clean']}/{s['n_quadruplets']} clean "
                f"quadruplets ({self.seconds:.1f} s)")


def reduce_file(path: str | os.PathLike, outdir: str | os.PathLike, *,
                profile: str | InstrumentProfile = "robopol", classifier=None, config=None,
                calibration=None, overwrite: bool = False, diagnostic: bool = False) -> FileOutcome:
    """Read, reduce and write the products of one frame; never raises for bad input.

    A frame whose products all exist in ``outdir`` is skipped (status ``"skipped"``)
    unless ``overwrite``: reruns resume where they stopped, for one frame as for many.
    A frame with only some of its products (another file of the same name, or a run
    killed between two writes) fails with a message naming the file in the way.

    The input is checked (:func:`~robopol_clean.inputs.precheck_frame`, then
    :func:`~robopol_clean.io.read_frame`) before the classifier is loaded, so a bad
    file costs milliseconds.

    Parameters
    ----------
    path : path-like
        Input FITS file (never modified).
    outdir : path-like
        Output folder.
    profile
        As for `robopol_clean.pipeline.reduce_frame`.
    classifier : str or SpotClassifier, optional
        A classifier, or a name/model path loaded once per process and reused
        (default ``"cnn"``, the shipped network).
    overwrite : bool
        Replace existing products.
    diagnostic : bool
        Also write the diagnostic PNG.
    config : ReductionConfig, optional
        Every setting of the reduction (the defaults if omitted).
    calibration : Calibration or path, optional
        A calibration file applied on top of the profile (see
        `robopol_clean.pipeline.reduce_frame`); load it once
        (:func:`~robopol_clean.calibration.load_calibration`) to give every frame the
        same one.

    Returns
    -------
    FileOutcome
    """
    path = str(path)
    stem = stem_of(path)
    t0 = time.perf_counter()
    if not overwrite:
        existing = [p for p in product_paths(outdir, stem).values() if p.exists()]
        if existing and products_exist(outdir, stem):
            return FileOutcome(path, "skipped")
        if existing:
            return FileOutcome(path, "failed", f"{existing[0]}: output exists but the other products "
                                               f"of {Path(path).name} do not (use --overwrite to redo it)")
    problem = precheck_frame(path)
    if problem:
        return FileOutcome(path, "failed", problem)
    caught: list[str] = []
    try:
        from .pipeline import added_by_photometry, reduce_frame

        prof = load_profile(profile)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            ccd = read_frame(path, prof)
            result = reduce_frame(ccd, profile=prof, classifier=cached_classifier(classifier),
                                  config=config, calibration=calibration, name=Path(path).name)
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
    summary["median_q_err"] = float(np.median(clean["q_err"])) if len(clean) else float("nan")
    detected = ~added_by_photometry(result.spots)
    return FileOutcome(path, "done", summary=summary, seconds=time.perf_counter() - t0,
                       warnings=caught,
                       p_artifact=np.asarray(result.spots["p_artifact"], np.float32)[detected],
                       snr=np.asarray(result.spots["snr"], np.float32)[detected])


def _unique_messages(records) -> list[str]:
    out: list[str] = []
    for r in records:
        msg = str(r.message)
        if msg not in out and not issubclass(r.category, DeprecationWarning):
            out.append(msg)
    return out


#: Classifiers already loaded in this process, by name: the network is loaded once
#: per process (once per Dask worker), not once per frame.
_CLASSIFIERS: dict = {}


def cached_classifier(classifier=None):
    """``classifier`` itself, or the classifier of that name loaded once per process.

    Parameters
    ----------
    classifier : str or SpotClassifier, optional
        ``"cnn"`` (default), ``"morphology"``, a model path, or a classifier object
        (returned unchanged).
    """
    from .pipeline import get_classifier

    if classifier is None:
        classifier = "cnn"
    if not isinstance(classifier, str):
        return classifier
    if classifier not in _CLASSIFIERS:
        _CLASSIFIERS[classifier] = get_classifier(classifier)
    return _CLASSIFIERS[classifier]


# ---------------------------------------------------------------------------------
# Whole nights on Dask
# ---------------------------------------------------------------------------------
#: Dask's own loggers. A normal run shows none of their messages: scheduler and
#: worker chatter, and the connection errors some versions log while a cluster that
#: finished its work shuts down, say nothing the user can act on.
_DASK_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


def reduce_night(files: list[str], outdir: str | os.PathLike, *, profile="robopol",
                 classifier: str = "cnn", config=None, calibration=None, overwrite: bool = False,
                 diagnostic: bool = False,
                 workers: int | None = None, threads_per_worker: int = 1,
                 scheduler: str | None = None, progress: str | bool | None = None,
                 progress_interval: float = 30.0, max_in_flight: int | None = None,
                 verbose: bool = False) -> list[FileOutcome]:
    """Reduce many frames in parallel on Dask distributed.

    Every file is first checked cheaply (:func:`~robopol_clean.inputs.precheck_frame`):
    a missing or non-FITS file fails at once and never reaches a worker. Frames whose
    products all exist are skipped unless ``overwrite``. A bad frame becomes a
    ``failed`` outcome; the others go on. Tasks are streamed: at most
    ``max_in_flight`` frames are queued at once, so memory stays flat however long the
    night. Each worker process loads the classifier once.

    Parameters
    ----------
    files : list of str
        Input FITS files.
    outdir : path-like
        Output folder.
    profile, classifier, config, calibration, overwrite, diagnostic
        As for :func:`reduce_file`; ``classifier`` is a name, loaded once per worker,
        and every worker gets the same ``config`` and the same ``calibration`` (a path is
        read once, here, and the values sent to the workers).
    workers : int, optional
        Local worker processes (default: one per core). Ignored with ``scheduler``.
    threads_per_worker : int
        Threads per local worker.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``) to use instead of a
        local cluster.
    progress : {"bar", "log"} or bool, optional
        ``"bar"``: one tqdm bar on stderr; ``"log"``: a one-line log message every
        ``progress_interval`` seconds and at the end; False: nothing. Default: a bar when
        stderr is a terminal, else log lines.
    progress_interval : float
        Seconds between progress lines in ``"log"`` mode.
    max_in_flight : int, optional
        Frames queued at once (default: twice the cluster's threads).
    verbose : bool
        Log every frame's result as it arrives, the dashboard address and the
        scheduler's worker events (``distributed.scheduler`` at INFO level).

    Returns
    -------
    list of FileOutcome
        In the order of ``files``.
    """
    import sys

    from .calibration import as_calibration

    profile = load_profile(profile)
    calibration = as_calibration(calibration)
    results: dict[str, FileOutcome] = {}
    todo = []
    for path in files:
        problem = precheck_frame(path)
        if problem:
            results[path] = FileOutcome(path, "failed", problem)
        else:
            todo.append(path)
    if progress is None or progress is True:
        progress = "bar" if sys.stderr.isatty() else "log"
    report = _Progress(len(files), progress or None, progress_interval, every_frame=verbose)
    for path in files:
        if path in results:
            report(results[path])
    if todo:
        options = dict(profile=profile, classifier=classifier, config=config,
                       calibration=calibration, overwrite=overwrite, diagnostic=diagnostic)
        with _quiet_dask(verbose):
            results.update(_run_on_dask(todo, os.path.abspath(str(outdir)), options, report,
                                        workers=workers, threads_per_worker=threads_per_worker,
                                        scheduler=scheduler, max_in_flight=max_in_flight,
                                        verbose=verbose))
    report.close()
    return [results[f] for f in files]


def _run_on_dask(files, outdir, options, report, *, workers, threads_per_worker, scheduler,
                 max_in_flight, verbose) -> dict[str, FileOutcome]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        n = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=":0" if verbose else None,
                               silence_logs=logging.INFO if verbose else logging.ERROR)
        client = Client(cluster)
    if verbose and client.dashboard_link and cluster is not None:
        log.info("Dask dashboard: %s", client.dashboard_link)
    results: dict[str, FileOutcome] = {}
    try:
        nthreads = sum(client.nthreads().values()) or 1
        if verbose:
            log.info("Dask cluster: %d worker(s), %d thread(s)", len(client.nthreads()), nthreads)
        pending = iter(files)
        futures = as_completed()
        # Task keys unique to this night: two nights sharing a scheduler (or the same frame
        # reduced into two folders) must not share tasks. key -> the caller's path.
        night, keys = uuid.uuid4().hex[:8], {}

        def submit(path):
            key = f"reduce-{night}-{len(keys)}"
            keys[key] = path
            futures.add(client.submit(reduce_file, os.path.abspath(path), outdir, **options,
                                      key=key, pure=False))

        for path in _take(pending, max_in_flight or 2 * nthreads):
            submit(path)
        for future in futures:
            path = keys.get(future.key, "?")
            try:
                outcome = future.result()
                outcome.path = path
            except Exception as exc:  # noqa: BLE001 -- e.g. a worker killed repeatedly
                outcome = FileOutcome(path, "failed", f"{path}: {type(exc).__name__}: {exc}")
            results[path] = outcome
            future.release()
            report(outcome)
            for path in _take(pending, 1):
                submit(path)
    finally:
        # A finished cluster may still log lost connections while it stops: hush them.
        for name in _DASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        client.close()
        if cluster is not None:
            cluster.close()
    return results


class _quiet_dask:
    """Keep Dask's logs out of a normal run, in this process and in worker processes.

    Worker processes configure their logging from the environment when they start
    (``DASK_LOGGING__DISTRIBUTED``), so the level is passed there too; levels the user
    set in the environment are respected. Everything is restored on exit.
    """

    def __init__(self, verbose: bool):
        self.level = logging.WARNING if verbose else logging.ERROR

    def __enter__(self):
        self.saved = {n: logging.getLogger(n).level for n in _DASK_LOGGERS}
        self.env = os.environ.get("DASK_LOGGING__DISTRIBUTED")
        for name in _DASK_LOGGERS:
            logging.getLogger(name).setLevel(self.level)
        if self.level == logging.WARNING:
            logging.getLogger("distributed.scheduler").setLevel(logging.INFO)  # worker events
        if self.env is None:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = logging.getLevelName(self.level).lower()
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("distributed.scheduler").setLevel(logging.NOTSET)
        if self.env is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
        return False


class _Progress:
    """Progress of a night: a tqdm bar (``"bar"``), periodic log lines (``"log"``) or nothing.

    A failed frame is always reported (through the bar or as a log warning).
    """

    def __init__(self, total: int, mode: str | None, interval: float, every_frame: bool = False):
        self.total, self.mode, self.interval = total, mode, float(interval)
        self.every_frame = every_frame
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", desc="reducing", dynamic_ncols=True)

    def __call__(self, outcome: FileOutcome) -> None:
        self.counts[outcome.status] += 1
        if outcome.status == "failed" or self.every_frame:
            if self.bar is not None:
                self.bar.write(outcome.describe())
            elif outcome.status == "failed":
                log.error(outcome.describe())
            else:
                log.info(outcome.describe())
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "log" and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            log.info(self.line())

    def line(self) -> str:
        n = sum(self.counts.values())
        return (f"{n}/{self.total} frames ({self.counts['done']} reduced, {self.counts['skipped']} "
                f"skipped, {self.counts['failed']} failed) in {time.monotonic() - self.t0:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _take(iterator, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


#: Columns of ``summary.ecsv``, one row per reduced frame.
_SUMMARY_COLUMNS = ("frame", "n_spots", "n_rejected", "n_uncertain", "n_quadruplets", "n_stokes",
                    "n_clean", "median_q_err", "seconds")


def _skipped_frame(name: str, spots_path: Path, stokes, earlier: dict):
    """Summary row (the earlier run's, else counted again) and scores of a skipped frame."""
    from astropy.table import Table

    from .pipeline import added_by_photometry

    spots = Table.read(spots_path, format="ascii.ecsv")
    detected = spots[~added_by_photometry(spots)]
    if name in earlier:
        row = earlier[name]
    else:
        clean = stokes[stokes["flags"] == 0]
        gid = np.asarray(spots["group_id"])
        row = {"frame": name, "n_spots": len(detected),
               "n_rejected": int(np.count_nonzero(detected["rejected"])),
               "n_uncertain": int(np.count_nonzero(detected["uncertain"])),
               "n_quadruplets": int(np.count_nonzero(np.bincount(gid[gid >= 0]) >= 4))
               if (gid >= 0).any() else 0,
               "n_stokes": len(stokes), "n_clean": len(clean),
               "median_q_err": float(np.median(clean["q_err"])) if len(clean) else np.nan}
    return row, np.asarray(detected["p_artifact"], float), np.asarray(detected["snr"], float)


def _earlier_summary(path: Path) -> dict[str, dict]:
    """Rows of an existing ``summary.ecsv`` by frame name (empty when none or unreadable)."""
    from astropy.table import Table

    if not path.is_file():
        return {}
    try:
        table = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError):
        return {}
    if "frame" not in table.colnames:
        return {}
    return {str(r["frame"]): {c: r[c] for c in table.colnames} for r in table}


def write_night_products(outcomes: list[FileOutcome], outdir: str | os.PathLike) -> dict[str, Path]:
    """Night products: ``summary.ecsv``, ``stokes_all.ecsv``, ``failures.ecsv``, ``night_report.png``.

    ``night_report.png`` is drawn when at least two frames have spots.

    Reduced frames report their counts and scores in their outcome; the Stokes
    catalogues, and the spots of frames skipped on a rerun (whose earlier summary row
    is kept), are read back from ``outdir``, so nothing large is held in memory while
    the night runs.
    """
    from astropy.table import Table, vstack

    from .io import write_atomic, write_ecsv

    outdir = Path(outdir)
    written: dict[str, Path] = {}
    earlier = _earlier_summary(outdir / "summary.ecsv")
    rows, stokes_tables, p_all, snr_all, rates, names = [], [], [], [], [], []
    for o in outcomes:
        if o.status == "failed":
            continue
        name = Path(o.path).name
        paths = product_paths(outdir, stem_of(o.path))
        try:
            stokes = Table.read(paths["stokes"], format="ascii.ecsv")
            if o.status == "done":
                row = {"frame": name, **o.summary, "seconds": o.seconds}
                p, snr = o.p_artifact, o.snr
            else:  # skipped: the earlier record, and the scores from its catalogue
                row, p, snr = _skipped_frame(name, paths["spots"], stokes, earlier)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: catalogues of a reduced frame cannot be read back (%s); left out of "
                        "the night products", o.path, exc)
            continue
        rows.append({k: row.get(k, np.nan) for k in _SUMMARY_COLUMNS})
        if len(stokes):
            stokes.add_column(name, name="frame", index=0)
            stokes.meta = {}
            stokes_tables.append(stokes)
        if p is not None and len(p):
            p_all.append(np.asarray(p, float))
            snr_all.append(np.asarray(snr, float))
            rates.append(float(row["n_rejected"]) / len(p))
            names.append(name)
    if rows:
        summary = Table(rows=rows, names=_SUMMARY_COLUMNS)
        summary["seconds"].unit = "s"
        write_ecsv(summary, outdir / "summary.ecsv", overwrite=True)
        written["summary"] = outdir / "summary.ecsv"
    if stokes_tables:
        allq = vstack(stokes_tables, metadata_conflicts="silent")
        write_ecsv(allq, outdir / "stokes_all.ecsv", overwrite=True)
        written["stokes_all"] = outdir / "stokes_all.ecsv"
    failed = [o for o in outcomes if o.status == "failed"]
    failures_path = outdir / "failures.ecsv"
    if failed:
        table = Table({"file": [o.path for o in failed], "error": [o.error for o in failed]})
        write_ecsv(table, failures_path, overwrite=True)
        written["failures"] = failures_path
    else:
        failures_path.unlink(missing_ok=True)  # a resumed night that now succeeded
    if len(p_all) > 1:  # a night of several frames (one frame has its own products)
        from .plots import plot_night_report

        p = np.concatenate(p_all)
        snr = np.concatenate(snr_all)
        write_atomic(outdir / "night_report.png",
                     lambda path: plot_night_report(p, snr, names, rates, path), overwrite=True)
        written["night_report"] = outdir / "night_report.png"
    return written
