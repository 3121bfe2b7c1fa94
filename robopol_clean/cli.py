"""The ``robopol-clean`` command line: thin wrappers around the library API.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that sets
``func`` on its parser; ``func(args)`` returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import __version__

__all__ = ["main", "build_parser"]

log = logging.getLogger("robopol_clean")

#: Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_FAILURE = 1  # the job ran but some inputs failed
EXIT_USAGE = 2  # bad command line or unusable input


class CLIError(Exception):
    """An error to report as one line and exit with `EXIT_USAGE`."""


# --- subcommands (each helper adds its own block below) -------------------------------

def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


# Options shared by subcommands: one parent parser each, so every subcommand spells and
# documents them the same way.
def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


_PROFILE = _parent()
_PROFILE.add_argument("--profile", default="robopol", metavar="P",
                      help="instrument profile: a shipped name or a TOML file (default: robopol)")

_OVERWRITE = _parent()
_OVERWRITE.add_argument("--overwrite", action="store_true", help="replace existing outputs")

_TALK = _parent()
_talk = _TALK.add_mutually_exclusive_group()
_talk.add_argument("-q", "--quiet", action="store_true", help="print errors only")
_talk.add_argument("-v", "--verbose", action="store_true",
                   help="more detail (for reduce: every frame's result as it finishes, the Dask "
                        "dashboard address and worker events)")

_REDUCTION = _parent()
_REDUCTION.add_argument("--classifier", choices=["cnn", "morphology"], default="cnn",
                        help="artifact classifier (default: cnn, combined with the partner cues)")
_REDUCTION.add_argument("--model", default=None, metavar="MODEL",
                        help="use this trained network (.onnx or .keras, with its .json) instead of "
                             "the shipped one")
_REDUCTION.add_argument("--config", default=None, metavar="FILE.toml",
                        help="reduction settings (robopol_clean.config.ReductionConfig as TOML); "
                             "the options below override it")
_REDUCTION.add_argument("--threshold", type=_probability, default=None, metavar="T",
                        help="reject spots with p_artifact >= T (default: 0.5)")
_REDUCTION.add_argument("--uncertain-band", type=_probability, nargs=2, default=None,
                        metavar=("LO", "HI"),
                        help="flag kept spots with LO <= p_artifact < HI as uncertain "
                             "(default: 0.3 0.5)")
_REDUCTION.add_argument("--photometry", choices=["psf", "aperture"], default=None,
                        help="psf: every spot fitted together with the frame's PSF (default); "
                             "aperture: apertures of 2 FWHM")

_DATA = _parent()
_DATA.add_argument("--sim-frames", type=int, default=None, metavar="N",
                   help="simulated 1024 x 1024 frames to label from truth (default: 240 for train, "
                        "20 for evaluate)")
_DATA.add_argument("--seed", type=int, default=0, help="seed of simulation, split and training (default: 0)")
_DATA.add_argument("--ds9", nargs=2, action="append", default=[], metavar=("FRAME", "REGIONS"),
                   help="a real frame and its DS9 labels (red regions = artifacts, green = stars; "
                        "see 'robopol-clean label'); repeatable")


_COMBINING = _parent()
_combining = _COMBINING.add_argument_group(
    "combining exposures (combine; reduce --combine)",
    "settings of robopol_clean.combine.CombineConfig; recorded in the visit table")
_combining.add_argument("--combine-config", default=None, metavar="FILE.toml",
                        help="combine settings as TOML (CombineConfig); the options below "
                             "override it")
_combining.add_argument("--include-flagged", action="store_true", default=None,
                        help="let measurements with flags != 0 enter the means (default: only "
                             "flags == 0)")
_combining.add_argument("--significance", type=_probability, default=None, metavar="ALPHA",
                        help="flag a star 'disagree' when its exposures' chi-square has a "
                             "probability below ALPHA (default: 0.001)")
_combining.add_argument("--match", choices=["auto", "sky", "pixel"], default=None,
                        help="match stars by sky position (ra, dec) or pixel position (default: "
                             "auto, sky when every table has ra and dec)")
_combining.add_argument("--max-offset", type=float, default=None, metavar="PIX",
                        help="largest dither between exposures (default: 150 px)")
_combining.add_argument("--match-radius", type=float, default=None, metavar="PIX",
                        help="largest distance of a star's positions after the offset "
                             "(default: 3 px)")
_combining.add_argument("--inflate-errors", action="store_true", default=None,
                        help="multiply a star's errors by sqrt(chi2/dof) where that exceeds 1")


def _combine_config(args):
    """The CombineConfig of --combine-config, with the command line's options applied."""
    from dataclasses import replace

    from .combine import CombineConfig, load_combine_config
    from .config import ConfigError

    changes = {"include_flagged": args.include_flagged, "significance": args.significance,
               "match": args.match, "max_offset": args.max_offset,
               "match_radius": args.match_radius, "inflate_errors": args.inflate_errors}
    try:
        cfg = load_combine_config(args.combine_config) if args.combine_config else CombineConfig()
        return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    except (ConfigError, ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


def _reduction_config(args):
    """The configuration of --config, with the command line's own options applied."""
    from .config import ConfigError, ReductionConfig, load_config

    try:
        cfg = load_config(args.config) if args.config else ReductionConfig()
        cfg = cfg.updated(threshold=args.threshold, photometry_method=args.photometry)
        if args.uncertain_band is not None:
            cfg = cfg.updated(uncertain_band=tuple(args.uncertain_band))
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    return cfg


def _add_reduce(sub) -> None:
    p = sub.add_parser(
        "reduce", parents=[_PROFILE, _REDUCTION, _OVERWRITE, _TALK, _COMBINING],
        help="reduce frames: mask artifacts, write catalogues, regions and Stokes q/u",
        description="Reduce FITS frames. For each <stem>.fits, OUTDIR receives <stem>_spots.ecsv, "
                    "<stem>_stokes.ecsv, <stem>_rejected.reg and <stem>_clean.fits, and the night "
                    "summary.ecsv and stokes_all.ecsv. Inputs may be files, globs, folders or "
                    "@list.txt files. A rerun skips frames whose products all exist (--overwrite "
                    "redoes them), for one frame as for many. Exit status: 0 every frame reduced "
                    "or skipped; 1 some inputs failed (missing, unmatched pattern, not a usable "
                    "FITS frame: listed in OUTDIR/failures.ecsv); 2 usage error (bad option, "
                    "profile, --config file or output folder).")
    p.add_argument("inputs", nargs="+", metavar="FRAME", help="FITS frames, globs, folders or @list.txt")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument("--diagnostic", action="store_true", help="also write <stem>_diagnostic.png")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local Dask worker processes for several frames (default: one per core)")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="N",
                   help="threads per local Dask worker (default: 1)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use a running Dask scheduler (tcp://host:8786) instead of a local cluster")
    p.add_argument("--combine", action="store_true",
                   help="also combine consecutive frames of one field into visit tables: "
                        "OUTDIR/<first stem>_visit.ecsv and visits.ecsv (see 'combine')")
    p.add_argument("--calibration", default=None, metavar="FILE.toml",
                   help="apply this calibration file (from 'robopol-clean calibrate') in place of the "
                        "profile's angle zero point and instrumental polarization; its SHA-256 is "
                        "recorded in the header (RCLCAL) and the catalogues")
    p.set_defaults(func=_run_reduce)


def _run_reduce(args) -> int:
    from .inputs import expand_inputs

    # Cheap checks first: a bad command line is a usage error, found before anything
    # heavy (the network, a Dask cluster) loads; every frame is then checked before the
    # model loads (batch.reduce_file, batch.reduce_night).
    files = expand_inputs(args.inputs, strict=False)

    from .batch import reduce_file, reduce_night, write_night_products
    from .instrument import ProfileError, load_profile
    from .io import OutputError, check_writable

    config = _reduction_config(args)
    combine_config = _combine_config(args) if args.combine else None
    try:
        profile = load_profile(args.profile)
        calibration = _checked_calibration(args.calibration, profile)
        check_writable(args.outdir)
    except (ProfileError, OutputError) as exc:
        raise CLIError(str(exc)) from None
    classifier = args.model or args.classifier
    if args.model:  # a bad model is a usage error, found before any frame is reduced
        from .pipeline import get_classifier

        try:
            get_classifier(args.model)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    options = dict(profile=profile, config=config, calibration=calibration,
                   overwrite=args.overwrite, diagnostic=args.diagnostic)
    if len(files) == 1 and not args.scheduler:
        # One frame: no cluster to start; the frame is read before the model loads.
        outcomes = [reduce_file(files[0], args.outdir, classifier=classifier, **options)]
        _report_outcome(outcomes[0])
    else:
        outcomes = reduce_night(files, args.outdir, classifier=classifier, workers=args.workers,
                                threads_per_worker=args.threads_per_worker, scheduler=args.scheduler,
                                progress=False if args.quiet else None, verbose=args.verbose,
                                **options)
        for outcome in outcomes:  # results and failures were reported as they happened
            for w in outcome.warnings:
                log.warning("warning: %s: %s", outcome.path, w)
    write_night_products(outcomes, args.outdir)
    if combine_config is not None:
        _combine_night(outcomes, args.outdir, combine_config)
    failed = [o for o in outcomes if o.status == "failed"]
    log.info("%d frame(s): %d reduced, %d skipped (products exist; --overwrite to redo), "
             "%d failed%s", len(outcomes), sum(o.status == "done" for o in outcomes),
             sum(o.status == "skipped" for o in outcomes), len(failed),
             f" (listed in {Path(args.outdir) / 'failures.ecsv'})" if failed else "")
    return EXIT_FAILURE if failed else EXIT_OK


def _combine_night(outcomes, outdir, config) -> None:
    """Visit tables from the night's reduced (or skipped) frames, in input order."""
    from .batch import stem_of
    from .combine import combine_night
    from .products import product_paths

    paths = [product_paths(outdir, stem_of(o.path))["stokes"] for o in outcomes
             if o.status != "failed"]
    combine_night(paths, outdir, config=config)


def _checked_calibration(path, profile):
    """The calibration file of --calibration, read and checked against the profile (None
    without one): a bad file is a usage error, found before anything is written."""
    if not path:
        return None
    from .calibration import CalibrationError, load_calibration

    try:
        calibration = load_calibration(path)
        calibration.apply(profile)
    except CalibrationError as exc:
        raise CLIError(str(exc)) from None
    return calibration


def _report_outcome(outcome) -> None:
    for w in outcome.warnings:
        log.warning("warning: %s", w)
    (log.error if outcome.status == "failed" else log.info)(outcome.describe())


def _set_verbosity(args) -> None:
    """-q: errors only; default: progress and results; -v: also cluster details."""
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    log.setLevel(level)
    logging.getLogger("py.warnings").setLevel(max(level, logging.WARNING))


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", parents=[_PROFILE, _REDUCTION, _OVERWRITE, _TALK],
        help="fit the angle zero point and instrumental polarization to frames of standard stars",
        description="Measure the polarization standard in each frame (recognised by OBJECT, or by "
                    "position when the frame has a celestial WCS; the brightest pattern near the "
                    "target position) and fit the angle zero point (from polarized standards) and "
                    "the instrumental q and u (a constant, or with --order a polynomial over the "
                    "field) in one weighted least-squares fit. Writes the calibration file OUTPUT "
                    "(TOML: values, errors, covariance, chi2, per-standard residuals) and beside it "
                    "<stem>_residuals.png; 'reduce --calibration OUTPUT' applies it. FITS frames are "
                    "reduced here without a calibration; <stem>_stokes.ecsv products of a reduce "
                    "made without one are read as they are. Exit status 2, and nothing written, "
                    "when a frame shows no recognisable standard or the frames cannot constrain "
                    "what is asked (e.g. no polarized standard: no zero point).")
    p.add_argument("inputs", nargs="+", metavar="FRAME",
                   help="FITS frames of standards or <stem>_stokes.ecsv products (files, globs, "
                        "folders or @list.txt)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.toml",
                   help="the calibration file to write")
    p.add_argument("--order", type=int, choices=[0, 1, 2], default=0,
                   help="degree of the instrumental-polarization polynomial over the field (default: "
                        "0, a constant; 1 and 2 need standards at 3 and 6 positions)")
    p.add_argument("--fix-angle", action="store_true",
                   help="keep the profile's angle zero point; fit only the instrumental polarization")
    p.add_argument("--fix-instrumental", action="store_true",
                   help="keep the profile's instrumental polarization; fit only the zero point")
    p.add_argument("--exact-catalogue", action="store_true",
                   help="take the standards' catalogue q and u as exact (default: fitted within "
                        "their catalogue errors)")
    p.add_argument("--allow-flags", default="", metavar="NAMES",
                   help="comma-separated quality flags a standard's Stokes row may have, e.g. "
                        "poor_fit (default: none; only flags == 0 rows are used)")
    p.add_argument("--match-radius", type=float, default=None, metavar="PX",
                   help="the standard is the brightest pattern within PX of its expected position "
                        "(default: 25)")
    p.add_argument("--sky-tolerance", type=float, default=None, metavar="ARCSEC",
                   help="match a frame to a standard by WCS position within ARCSEC when OBJECT names "
                        "none (default: 60)")
    p.set_defaults(func=_run_calibrate)


def _flag_bits(text: str) -> int:
    from .quality import QualityFlag

    bits = 0
    for name in (n.strip() for n in text.split(",") if n.strip()):
        try:
            bits |= int(QualityFlag[name.upper()])
        except KeyError:
            known = ", ".join(f.name.lower() for f in QualityFlag)
            raise CLIError(f"--allow-flags: unknown flag {name!r} (known: {known})") from None
    return bits


def _run_calibrate(args) -> int:
    import io

    from .calibration import CalibrationError, fit_calibration
    from .inputs import expand_inputs
    from .instrument import ProfileError, load_profile
    from .io import FrameError, OutputError, write_atomic
    from .standards import StandardError

    output = Path(args.output)
    figure = output.with_name(f"{output.stem}_residuals.png")
    for path in (output, figure):
        if path.exists() and not args.overwrite:
            raise CLIError(f"{path}: output exists (use --overwrite to replace it)")
    if output.parent.exists() and not output.parent.is_dir():
        raise CLIError(f"{output.parent}: not a folder")
    try:
        files = expand_inputs(args.inputs, strict=True)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    settings = dict(order=args.order, fit_angle=not args.fix_angle,
                    fit_instrumental=not args.fix_instrumental,
                    catalogue_errors=not args.exact_catalogue,
                    allow_flags=_flag_bits(args.allow_flags), match_radius=args.match_radius,
                    sky_tolerance=args.sky_tolerance)
    config = _reduction_config(args)
    try:
        profile = load_profile(args.profile)
        for path in files:
            if not Path(path).is_file():
                raise CLIError(f"{path}: no such file")
        log.info("calibrating from %d frame(s)...", len(files))
        fit = fit_calibration(files, profile=profile, classifier=args.model or args.classifier,
                              config=config, **settings)
    except (CalibrationError, StandardError, FrameError, ProfileError) as exc:
        raise CLIError(str(exc)) from None
    from .plots import plot_calibration_residuals

    png = io.BytesIO()  # drawn before anything is written: a failure leaves nothing behind
    plot_calibration_residuals(fit).savefig(png, format="png")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fit.write(output, overwrite=args.overwrite)
        write_atomic(figure, lambda p: Path(p).write_bytes(png.getvalue()), overwrite=args.overwrite)
    except (OutputError, OSError) as exc:
        raise CLIError(str(exc)) from None
    print(f"{output}: calibration from {len(fit.measurements)} frame(s) of "
          f"{len(fit.standards)} standard(s); residuals in {figure}")
    print(fit.summary())
    return EXIT_OK


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", parents=[_TALK],
        help="simulate a RoboPol frame with artifacts, reduce it and report",
        description="Simulate a RoboPol frame with reflection artifacts (no download needed), "
                    "reduce it, write every product plus a diagnostic PNG into OUTDIR, and "
                    "compare with the simulation's truth. The demo folder is overwritten.")
    p.add_argument("-o", "--outdir", default="robopol-demo", help="output folder (default: robopol-demo)")
    p.add_argument("--seed", type=int, default=2026, help="simulation seed (default: 2026)")
    p.add_argument("--n-stars", type=int, default=600, help="stars in the field (default: 600)")
    p.add_argument("--classifier", choices=["cnn", "morphology"], default="cnn",
                   help="artifact classifier (default: cnn)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo
    from .io import OutputError

    try:
        report = run_demo(args.outdir, seed=args.seed, n_stars=args.n_stars,
                          classifier=args.classifier)
    except OutputError as exc:
        raise CLIError(str(exc)) from None
    print(report)
    return EXIT_OK


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate", parents=[_PROFILE, _OVERWRITE, _TALK],
        help="simulate frames with reflection artifacts and truth tables",
        description="Write N simulated frames OUTDIR/sim_0000.fits ... with their truth tables "
                    "sim_0000_truth_stars.ecsv, sim_0000_truth_spots.ecsv and "
                    "sim_0000_truth_artifacts.ecsv. "
                    "The same seed gives the same frames.")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if needed)")
    p.add_argument("--n-frames", type=int, default=1, metavar="N", help="number of frames (default: 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="master seed (default: 0)")
    p.add_argument("--n-stars", type=int, default=None, metavar="N",
                   help="stars per frame (default: drawn, 150-900 per full detector)")
    p.add_argument("--size", type=int, default=None, metavar="NX",
                   help="simulate an NX x NX corner of the detector (default: the whole detector)")
    p.add_argument("--standard", default=None, metavar="NAME",
                   help="make the target this polarization standard (its catalogue q and u; OBJECT "
                        "set to its name), e.g. 'BD+59 389' or 'HD 212311'")
    p.add_argument("--target-mag", type=float, default=None, metavar="MAG",
                   help="magnitude of the target (default: drawn; 11 for a standard)")
    p.add_argument("--angle-zero", type=float, default=None, metavar="DEG",
                   help="inject this angle zero point (default: the profile's)")
    p.add_argument("--q-inst", type=float, default=None, metavar="Q",
                   help="inject this constant instrumental q (default: the profile's map)")
    p.add_argument("--u-inst", type=float, default=None, metavar="U",
                   help="inject this constant instrumental u (default: the profile's map)")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from .instrument import ProfileError, load_profile
    from .io import OutputError
    from .simulate import simulate_frames

    if args.n_frames < 1:
        raise CLIError(f"--n-frames must be at least 1, got {args.n_frames}")
    if args.size is not None and args.size < 16:
        raise CLIError(f"--size must be at least 16 px, got {args.size}")
    if args.n_stars is not None and args.n_stars < 0:
        raise CLIError(f"--n-stars must not be negative, got {args.n_stars}")
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise CLIError(str(exc)) from None
    kw = {"n_stars": args.n_stars}
    if args.size is not None:
        kw["shape"] = (args.size, args.size)
    if args.standard is not None:
        kw["standard"] = args.standard
    if args.target_mag is not None:
        kw["target"] = {"mag": args.target_mag}
    injected = {key: value for key, value in (("angle_zero", args.angle_zero),
                                               ("q_inst", args.q_inst), ("u_inst", args.u_inst))
                if value is not None}
    if injected:
        kw["calibration"] = injected
    n_written = 0

    def report(path, sim) -> None:
        nonlocal n_written
        n_written += 1
        art = sim.artifacts
        n_refl = int(sum(k in ("streak", "ghost") for k in art["kind"]))
        print(f"{path}: {len(sim.stars)} stars, {n_refl} reflection artifacts, "
              f"{len(art) - n_refl} other artifacts (seed {sim.ccd.header['SIMSEED']})")

    try:
        simulate_frames(args.outdir, args.n_frames, args.seed, profile, overwrite=args.overwrite,
                        callback=report, **kw)
    except (OutputError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {n_written} simulated frame(s) with truth tables to {args.outdir}")
    return EXIT_OK


def _add_label(sub) -> None:
    p = sub.add_parser(
        "label", parents=[_PROFILE, _REDUCTION, _OVERWRITE, _TALK],
        help="write a starting DS9 region file for labelling a frame by hand",
        description="Reduce FRAME and write every detected spot as a DS9 region coloured by the "
                    "current decision (red = artifact, orange = uncertain, green = star) and "
                    "labelled with p_artifact. Correct the colours in DS9 (red for artifacts, "
                    "green for stars; delete what you cannot judge), save in image coordinates, "
                    "and give the pair to 'robopol-clean train --ds9 FRAME REGIONS'.")
    p.add_argument("frame", help="FITS frame")
    p.add_argument("-o", "--output", default=None,
                   help="region file to write (default: <stem>_labels.reg beside the frame)")
    p.set_defaults(func=_run_label)


def _run_label(args) -> int:
    from .batch import stem_of
    from .instrument import ProfileError, load_profile
    from .io import FrameError, read_frame
    from .pipeline import reduce_frame
    from .regions_io import spots_to_regions, write_regions

    output = Path(args.output or Path(args.frame).with_name(f"{stem_of(args.frame)}_labels.reg"))
    if output.exists() and not args.overwrite:
        raise CLIError(f"{output}: output exists (use --overwrite to replace it)")
    try:
        profile = load_profile(args.profile)
        result = reduce_frame(read_frame(args.frame, profile), profile=profile,
                              classifier=args.model or args.classifier,
                              config=_reduction_config(args),
                              name=Path(args.frame).name)
    except (FrameError, ProfileError) as exc:
        raise CLIError(str(exc)) from None
    ccd = result.ccd
    wcs = ccd.wcs if ccd.wcs is not None and ccd.wcs.has_celestial else None
    regions = spots_to_regions(result.spots, wcs=wcs, radius=2.0 * result.meta["fwhm"])
    try:
        write_regions(regions, output, overwrite=args.overwrite)
    except OSError as exc:
        raise CLIError(f"{output}: cannot write ({exc})") from None
    m = result.meta
    print(f"{output}: {m['n_spots']} spots ({m['n_rejected']} red = artifact, {m['n_uncertain']} "
          f"orange = uncertain, {m['n_spots'] - m['n_rejected'] - m['n_uncertain']} green = star)")
    return EXIT_OK



def _add_combine(sub) -> None:
    p = sub.add_parser(
        "combine", parents=[_OVERWRITE, _TALK, _COMBINING],
        help="combine the Stokes tables of repeated exposures of one field into a visit table",
        description="Cross-match the stars of several <stem>_stokes.ecsv tables of one field "
                    "(by sky position when every table has ra and dec, else by pixel position "
                    "after a fitted per-frame offset; the first table is the reference) and "
                    "write one row per star: weighted mean q and u, their errors, chi2/dof, "
                    "the exposures used, p (debiased), theta and flags (disagreeing exposures). "
                    "Only flags == 0 measurements enter the means unless --include-flagged. "
                    "Tables of another field, profile, band or calibration are refused with "
                    "one line naming the file, and nothing is written. Exit status: 0 written; "
                    "2 refused or usage error.")
    p.add_argument("inputs", nargs="+", metavar="STOKES_FILE",
                   help="per-frame Stokes tables (ECSV), globs or @list.txt")
    p.add_argument("-o", "--output", required=True, help="the visit table to write (ECSV)")
    p.set_defaults(func=_run_combine)


def _run_combine(args) -> int:
    from .combine import CombineError, combine_files
    from .inputs import expand_inputs
    from .io import OutputError

    config = _combine_config(args)
    try:
        files = expand_inputs(args.inputs)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if len(files) < 2:
        raise CLIError("give at least two Stokes tables of one field to combine")
    try:
        visit = combine_files(files, args.output, config=config, overwrite=args.overwrite)
    except (CombineError, OutputError) as exc:
        raise CLIError(str(exc)) from None
    t = visit.table
    shifts = ", ".join(f"({dx:+.1f}, {dy:+.1f})" for dx, dy in visit.offsets[1:])
    log.info("%s: %d exposures (%s matching; offsets %s px): %d stars, %d with flags == 0",
             args.output, len(files), visit.match, shifts, len(t),
             int(np.count_nonzero(np.asarray(t["flags"]) == 0)))
    return EXIT_OK


def _labelled_data(args, *, seed_offset: int = 0):
    """Cutouts from simulated frames and DS9-labelled real frames, as one dataset."""
    from .datasets import CutoutDataset, cutout_dataset_from_ds9, cutout_dataset_from_simulation
    from .instrument import ProfileError, load_profile
    from .io import FrameError

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise CLIError(str(exc)) from None
    parts = []
    if args.sim_frames is None:
        args.sim_frames = 240 if args.command == "train" else 20
    if args.sim_frames > 0:
        log.info("simulating and detecting %d frames (seed %d)...", args.sim_frames, args.seed + seed_offset)
        parts.append(cutout_dataset_from_simulation(args.sim_frames, args.seed + seed_offset, profile))
    for i, (frame, regions) in enumerate(args.ds9):
        try:
            parts.append(cutout_dataset_from_ds9(frame, regions, profile=profile, artifact_color="red",
                                                 star_color="green", frame_index=100_000 + i))
        except (FrameError, OSError, ValueError) as exc:
            raise CLIError(f"{frame} / {regions}: {exc}") from None
    if not parts:
        raise CLIError("no data: give --sim-frames > 0 or --ds9 FRAME REGIONS")
    data = parts[0] if len(parts) == 1 else CutoutDataset.concatenate(parts)
    if len(np.unique(data.labels)) < 2:
        raise CLIError("the labelled data hold only one class (need artifacts and stars)")
    return data


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", parents=[_DATA, _PROFILE, _OVERWRITE, _TALK],
        help="train or fine-tune the artifact CNN on simulated and DS9-labelled frames",
        description="Train the artifact CNN (seeded, validation split by frame, early stopping) and "
                    "write OUTDIR/<name>.keras, OUTDIR/<name>.json (normalisation, data, metrics, "
                    "threshold) and a report folder of figures (loss curves, ROC, confusion matrix, "
                    "reliability, galleries, saliency maps). The shipped model is made by "
                    "'robopol-clean train -o robopol_clean/data --sim-frames 240'.")
    p.add_argument("-o", "--outdir", required=True, help="where the model and its report go")
    p.add_argument("--name", default="robopol_cnn", help="model name (default: robopol_cnn)")
    p.add_argument("--variant", choices=["3conv", "4conv"], default="3conv", help="architecture")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs (early stopping; default 40)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="fine-tune: start from 'default' (the shipped model) or a .keras file")
    p.add_argument("--train-conv", action="store_true",
                   help="with --init-from: also retrain the convolutional layers (default: only the "
                        "dense head is trained: transfer learning)")
    p.set_defaults(func=_run_train)


def _require_training_tools(command: str) -> None:
    """train and evaluate need the [train] extra; reduce does not."""
    from importlib.util import find_spec

    missing = [m for m in ("tensorflow", "keras", "onnx", "sklearn") if find_spec(m) is None]
    if missing:
        raise CLIError(f"'{command}' needs the training tools ({', '.join(missing)} not installed): "
                       f"pip install 'robopol-clean[train]'")


def _run_train(args) -> int:
    _require_training_tools("train")
    from .io import OutputError, check_writable
    from .training import DEFAULT_MODEL_CONFIG, train

    try:
        outdir = check_writable(args.outdir)
    except OutputError as exc:
        raise CLIError(str(exc)) from None
    if (outdir / f"{args.name}.keras").exists() and not args.overwrite:
        raise CLIError(f"{outdir / (args.name + '.keras')}: output exists (use --overwrite to replace it)")
    data = _labelled_data(args)
    log.info("training on %d cutouts (%s)", len(data), data.counts())
    config = DEFAULT_MODEL_CONFIG.replace(variant=args.variant, epochs=args.epochs, seed=args.seed,
                                         init_from=args.init_from,
                                         freeze_conv=False if args.train_conv else None)
    result = train(data, config, out_dir=outdir, name=args.name)
    m = result.metrics
    print(f"{result.model_path}: validation AUC {m.get('auc') or float('nan'):.4f}, "
          f"trained in {result.seconds:.0f} s; report in {result.report_dir}")
    return EXIT_OK


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", parents=[_DATA, _PROFILE, _TALK],
        help="evaluate a model on labelled data (metrics and report figures)",
        description="Score labelled cutouts (fresh simulated frames and/or DS9-labelled real frames) "
                    "with a model and write metrics.json plus the report figures into OUTDIR.")
    p.add_argument("--model", default="default", help="a .keras file, or 'default' (the shipped model)")
    p.add_argument("-o", "--outdir", required=True, help="report folder")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    _require_training_tools("evaluate")
    import json

    from .classify.cnn import CNNClassifier, ModelError
    from .evaluation import evaluate

    try:
        clf = CNNClassifier.load(None if args.model == "default" else args.model)
    except ModelError as exc:
        raise CLIError(str(exc)) from None
    # Frames from another seed stream than training's, so nothing evaluated was trained on.
    data = _labelled_data(args, seed_offset=1_000_003)
    metrics = evaluate(clf, data.cutouts, data.labels, data.table, args.outdir, name=str(args.model))
    shown = {k: metrics.get(k) for k in ("n", "n_artifacts", "n_stars", "auc", "recall",
                                         "false_rejection_rate")}
    print(json.dumps(shown, default=float))
    print(f"report: {args.outdir}")
    return EXIT_OK



# --- main ------------------------------------------------------------------------------
#: Subcommands in display order (helpers add their _add_* functions here).
_SUBCOMMANDS: list = [_add_demo, _add_reduce, _add_calibrate, _add_combine, _add_simulate, _add_label,
                      _add_train, _add_evaluate]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="robopol-clean",
        description="Artifact-aware reduction of four-channel imaging polarimetry frames.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _one_line_warnings() -> logging.Handler:
    """Python warnings as 'warning: message' lines, without source code excerpts."""

    class _Formatter(logging.Formatter):
        def format(self, record):
            text = str(record.args[0] if record.args else record.getMessage())
            first = text.strip().splitlines()[0]
            # "file:line: Category: message" -> "message"
            return "warning: " + first.split(": ", 2)[-1]

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    return handler


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our messages go to stderr through our own handler; other libraries' loggers keep
    # Python's defaults (warnings and errors only), so nothing third-party chatters.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers[:] = [_one_line_warnings()]
    logging.getLogger("py.warnings").propagate = False
    _set_verbosity(args)
    try:
        return int(args.func(args) or EXIT_OK)
    except CLIError as exc:
        print(f"robopol-clean {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
