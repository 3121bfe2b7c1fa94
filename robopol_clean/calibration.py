"""Polarimetric calibration from standard stars: the fit, and the calibration file.

The model
---------
A standard of catalogue Stokes parameters :math:`(q_\\star, u_\\star)` observed at
detector position :math:`(x, y)` is measured, before any calibration, as

.. math::

   \\begin{pmatrix} q \\\\ u \\end{pmatrix} =
   \\begin{pmatrix} \\cos 2\\Delta & \\sin 2\\Delta \\\\ -\\sin 2\\Delta & \\cos 2\\Delta
   \\end{pmatrix}
   \\begin{pmatrix} q_\\star \\\\ u_\\star \\end{pmatrix} +
   \\begin{pmatrix} q_\\mathrm{inst}(x, y) \\\\ u_\\mathrm{inst}(x, y) \\end{pmatrix}

the exact inverse of the correction :func:`~robopol_clean.stokes.stokes_table` applies
(subtract :math:`(q_\\mathrm{inst}, u_\\mathrm{inst})`, then rotate by :math:`\\Delta`,
so :math:`\\theta' = \\theta + \\Delta`). :math:`q_\\mathrm{inst}` and
:math:`u_\\mathrm{inst}` are polynomials in the profile's normalised position
(``InstrumentProfile.instrumental_qu``, the terms of the geometry) of total degree up to
``order`` (0: a constant, the instrumental polarization where the standards were).

Every standard measurement enters one weighted least-squares fit (:func:`fit_measurements`):
the polarized standards fix :math:`\\Delta` and, together with the unpolarized ones,
the instrumental polarization. The catalogue values are not exact: with
``catalogue_errors`` (the default) each standard's true :math:`(q_\\star, u_\\star)` is a
parameter of the fit, tied to its catalogue value by the catalogue's error (a Gaussian
prior), so that a standard observed many times cannot pull the calibration beyond the
precision of the catalogue. Errors come from the covariance of the fit (not rescaled by
:math:`\\chi^2`, which is reported with its degrees of freedom).

Which quadruplet is the standard
--------------------------------
The standard is the frame's target: the brightest measured pattern within
``match_radius`` px of the position where it is expected, which is where the frame's
celestial WCS puts the standard when the frame has one, else the profile's target
position (``[mask] target``; RoboPol centres its target in the focal-plane mask), else
the frame centre. Its Stokes row must have ``flags == 0`` unless the flags are allowed
(``allow_flags``).

The calibration file
--------------------
TOML, written by :meth:`CalibrationFit.write` (``robopol-clean calibrate``); read by
:func:`load_calibration` and applied by ``reduce_frame(..., calibration=...)`` and
``robopol-clean reduce --calibration FILE``: its ``[calibration]`` table replaces the
profile's ``[calibration]`` values (the profile itself is unchanged), and the covariance
of the fitted parameters (``[fit] parameters`` and ``covariance``) is propagated into the
calibrated Stokes errors (:meth:`Calibration.covariance_at`). See :doc:`/calibration` for
the format.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from .config import _Settings
from .instrument import InstrumentProfile, SpotGeometry, load_profile, polynomial_terms

__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_VERSION", "CalibrationError", "Calibration",
           "CalibrationSettings", "CalibrationFit", "load_calibration", "as_calibration",
           "measure_standards", "fit_measurements", "fit_calibration", "term_degree"]

#: The ``format`` key of a calibration file.
CALIBRATION_FORMAT = "robopol-clean calibration"
#: The newest ``format_version`` this code reads and the one it writes.
CALIBRATION_VERSION = 1

#: A fitted coefficient's name in ``[fit] parameters``: ``q_inst[<term>]`` or ``u_inst[<term>]``.
_PARAMETER = re.compile(r"^(q_inst|u_inst)\[([^\]]+)\]$")


class CalibrationError(ValueError):
    """A calibration file is unusable, or standards cannot constrain what is asked; the
    message names the file (or the frames) and the problem."""


def term_degree(term: str) -> int:
    """Total degree of a polynomial term named by its monomial (``"1"``, ``"x"``, ``"x2y"``).

    >>> [term_degree(t) for t in ("1", "x", "y", "x2", "xy", "x2y")]
    [0, 1, 1, 2, 2, 3]
    """
    if term == "1":
        return 0
    return sum(int(p or 1) for _, p in re.findall(r"([xy])(\d*)", term))


# ---------------------------------------------------------------------------------
# The calibration file
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Calibration values that override a profile's ``[calibration]`` table.

    Attributes
    ----------
    instrument : str
        Name of the instrument profile it was made for (``[instrument] name``).
    angle_zero : float
        Angle zero point (deg).
    q_inst, u_inst : tuple of float
        Instrumental polarization polynomial coefficients, one per term.
    terms : tuple of str
        The terms (monomials of the normalised position) of the coefficients.
    center : (float, float)
        Normalisation centre (px) of the polynomials; must equal the profile geometry's.
    scale : float
        Normalisation scale (px); must equal the profile geometry's.
    source : str
        The file it was read from (``"<unsaved>"`` for a fit not yet written).
    sha256 : str
        SHA-256 of the file's bytes (of the text :meth:`CalibrationFit.write` would
        write, for an unsaved fit).
    parameters : tuple of str
        Names of the fitted parameters (``[fit] parameters``): ``angle_zero`` (deg),
        ``q_inst[<term>]``, ``u_inst[<term>]``. Empty when the calibration carries no
        covariance (a file without one); what is not named here is taken as exact.
    covariance : tuple of tuple of float
        Their covariance matrix (``[fit] covariance``; deg^2 for the angle zero point,
        deg for its products with a coefficient, dimensionless for the coefficients),
        propagated into the calibrated Stokes errors (:meth:`covariance_at`).
    """

    instrument: str
    angle_zero: float
    q_inst: tuple[float, ...]
    u_inst: tuple[float, ...]
    terms: tuple[str, ...]
    center: tuple[float, float]
    scale: float
    source: str = "<unsaved>"
    sha256: str = ""
    parameters: tuple[str, ...] = ()
    covariance: tuple[tuple[float, ...], ...] = ()

    @property
    def has_covariance(self) -> bool:
        """Whether the calibration carries the covariance of fitted parameters."""
        return len(self.parameters) > 0

    def covariance_at(self, x, y, geometry: SpotGeometry | None = None) -> np.ndarray:
        """Covariance of the calibration's corrections at source positions.

        The fitted parameters' covariance carried through the polynomial basis: for each
        source, the 3 x 3 covariance of the angle zero point (deg), of
        :math:`q_\\mathrm{inst}(x, y)` and of :math:`u_\\mathrm{inst}(x, y)`, the three
        corrections :func:`~robopol_clean.stokes.stokes_from_fluxes` applies (its
        ``calibration_covariance``). Parameters the fit did not vary contribute nothing.

        Parameters
        ----------
        x, y : array-like
            Source positions (pix, 0-based): detector pixels, or those of a region
            when ``geometry`` is the region's (``InstrumentProfile.for_region``).
        geometry : SpotGeometry, optional
            Its ``center`` and ``scale`` normalise the positions (the calibration's own
            ``center`` and ``scale``, detector pixels, when omitted).

        Returns
        -------
        ndarray
            Shape ``broadcast(x, y).shape + (3, 3)``, in the order (angle_zero, q_inst,
            u_inst); zeros when the calibration has no covariance.

        Examples
        --------
        An instrumental q known to 3e-4 at the centre and to 2e-4 per unit of the
        normalised x (independently) is known to 3.6e-4 half a scale away:

        >>> cal = Calibration("RoboPol", 0.0, (0.0, 0.0), (0.0, 0.0), ("1", "x"),
        ...                   (1024.0, 1024.0), 1024.0, parameters=("q_inst[1]", "q_inst[x]"),
        ...                   covariance=((9e-8, 0.0), (0.0, 4e-8)))
        >>> cov = cal.covariance_at([1024.0, 1536.0], [1024.0, 1024.0])
        >>> np.sqrt(cov[:, 1, 1]).round(6).tolist()
        [0.0003, 0.000316]
        """
        xa, ya = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        out = np.zeros(xa.shape + (3, 3))
        if not self.has_covariance:
            return out
        center = self.center if geometry is None else geometry.center
        scale = self.scale if geometry is None else geometry.scale
        basis = polynomial_terms((xa - center[0]) / scale, (ya - center[1]) / scale, self.terms)
        # d(angle_zero, q_inst(x, y), u_inst(x, y)) / d(parameters) at every source
        lin = np.zeros(xa.shape + (3, len(self.parameters)))
        for j, name in enumerate(self.parameters):
            if name == "angle_zero":
                lin[..., 0, j] = 1.0
            else:
                which, term = _PARAMETER.match(name).groups()
                lin[..., 1 if which == "q_inst" else 2, j] = basis[self.terms.index(term)]
        cov = np.asarray(self.covariance, float)
        return np.einsum("...ia,ab,...jb->...ij", lin, cov, lin)

    def apply(self, profile: str | os.PathLike | InstrumentProfile = "robopol") -> InstrumentProfile:
        """The profile with this calibration in place of its ``[calibration]`` values.

        Parameters
        ----------
        profile : str, path or InstrumentProfile
            The instrument profile.

        Returns
        -------
        InstrumentProfile
            A copy with ``angle_zero``, ``q_inst`` and ``u_inst`` replaced (coefficients
            in the profile's term order).

        Raises
        ------
        CalibrationError
            The calibration was made for another instrument, uses a term the profile
            lacks, or normalises positions differently.
        """
        prof = load_profile(profile)
        if self.instrument != prof.name:
            raise CalibrationError(f"{self.source}: a calibration for instrument "
                                   f"{self.instrument!r}, not for the {prof.name!r} profile")
        geo = prof.geometry
        missing = [t for t in self.terms if t not in geo.terms]
        if missing:
            raise CalibrationError(f"{self.source}: [calibration.terms] {', '.join(missing)} "
                                   f"not among the profile's terms ({', '.join(geo.terms)})")
        if not (np.allclose(self.center, geo.center, rtol=0, atol=1e-6)
                and math.isclose(self.scale, geo.scale, rel_tol=1e-9)):
            raise CalibrationError(f"{self.source}: [calibration] center {list(self.center)} and "
                                   f"scale {self.scale:g} differ from the {prof.name} profile's "
                                   f"{list(geo.center)} and {geo.scale:g}")
        q = np.zeros(len(geo.terms))
        u = np.zeros(len(geo.terms))
        for t, cq, cu in zip(self.terms, self.q_inst, self.u_inst):
            q[geo.terms.index(t)] = cq
            u[geo.terms.index(t)] = cu
        return prof.replace(angle_zero=float(self.angle_zero), q_inst=q, u_inst=u)

    def describe(self) -> dict:
        """What a reduction records about the calibration it applied (JSON-friendly)."""
        out = {"file": self.source, "sha256": self.sha256, "angle_zero": float(self.angle_zero),
               "terms": list(self.terms), "q_inst": [float(c) for c in self.q_inst],
               "u_inst": [float(c) for c in self.u_inst]}
        if self.has_covariance:
            out["parameters"] = list(self.parameters)
            out["covariance"] = [[float(v) for v in row] for row in self.covariance]
        return out


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read and check a calibration file.

    Parameters
    ----------
    path : path-like
        A TOML file written by ``robopol-clean calibrate`` (format in :doc:`/calibration`).

    Returns
    -------
    Calibration
        With ``source`` the path, ``sha256`` the hash of the file's bytes, and the
        ``parameters`` and ``covariance`` of ``[fit]`` (symmetrised).

    Raises
    ------
    CalibrationError
        The file cannot be read, is not TOML, is not a calibration file, is of a newer
        format version, or lacks a key or has a non-finite value, or its ``[fit]``
        covariance is not a symmetric, finite, positive semi-definite matrix of one row
        per named parameter; the message names the file and the key. A file without
        ``[fit] parameters`` and ``covariance`` is read with no covariance.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration ({exc.strerror or exc})") from None
    return _parse_calibration(raw, str(path))


def _parse_calibration(raw: bytes, source: str) -> Calibration:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CalibrationError(f"{source}: not a text (TOML) file") from None
    except tomllib.TOMLDecodeError as exc:
        raise CalibrationError(f"{source}: not valid TOML ({exc})") from None

    def fail(key: str, problem: str):
        raise CalibrationError(f"{source}: [{key}] {problem}")

    if data.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{source}: not a robopol-clean calibration file (format = "
                               f"{data.get('format')!r}, expected {CALIBRATION_FORMAT!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        fail("format_version", f"must be a positive integer, got {version!r}")
    if version > CALIBRATION_VERSION:
        fail("format_version", f"{version} is newer than this robopol-clean reads "
                               f"({CALIBRATION_VERSION}); upgrade robopol-clean")
    instrument = data.get("instrument")
    if not isinstance(instrument, str) or not instrument:
        fail("instrument", "is required: the name of the instrument profile")
    cal = data.get("calibration")
    if not isinstance(cal, dict):
        fail("calibration", "table is required")

    def number(key: str) -> float:
        value = cal.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"calibration.{key}", f"must be a number, got {value!r}")
        if not math.isfinite(value):
            fail(f"calibration.{key}", f"must be finite, got {value}")
        return float(value)

    def numbers(key: str, n: int | None) -> tuple[float, ...]:
        value = cal.get(key)
        if not isinstance(value, list) or (n is not None and len(value) != n):
            fail(f"calibration.{key}", f"must be a list of {n if n is not None else 'some'} "
                                       f"numbers, got {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            fail(f"calibration.{key}", "must hold numbers only")
        if not all(math.isfinite(v) for v in value):
            fail(f"calibration.{key}", "holds a non-finite value")
        return tuple(float(v) for v in value)

    angle_zero = number("angle_zero")
    terms = cal.get("terms")
    known = re.compile(r"^(1|x\d*|y\d*|x\d*y\d*)$")
    if (not isinstance(terms, list) or not terms or len(set(map(str, terms))) != len(terms)
            or not all(isinstance(t, str) and known.match(t) for t in terms)):
        fail("calibration.terms", f"must be distinct monomials like \"1\", \"x\", \"xy\", got {terms!r}")
    q_inst = numbers("q_inst", len(terms))
    u_inst = numbers("u_inst", len(terms))
    center = numbers("center", 2)
    scale = number("scale")
    if scale <= 0:
        fail("calibration.scale", f"must be positive, got {scale}")
    parameters, covariance = _parse_covariance(data.get("fit"), tuple(terms), fail)
    return Calibration(instrument=instrument, angle_zero=angle_zero, q_inst=q_inst, u_inst=u_inst,
                       terms=tuple(terms), center=(center[0], center[1]), scale=scale,
                       source=source, sha256=hashlib.sha256(raw).hexdigest(),
                       parameters=parameters, covariance=covariance)


def _parse_covariance(fit: Any, terms: tuple[str, ...], fail) -> tuple[tuple, tuple]:
    """``[fit] parameters`` and ``covariance``, checked; ``((), ())`` when the file has none."""
    if fit is None:
        return (), ()
    if not isinstance(fit, dict):
        fail("fit", "must be a table")
    names, cov = fit.get("parameters"), fit.get("covariance")
    if names is None and cov is None:
        return (), ()
    if names is None or cov is None:
        fail("fit", "has " + ("covariance without parameters" if names is None
                              else "parameters without covariance") + ": give both or neither")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        fail("fit.parameters", f"must be a list of distinct names, got {names!r}")
    for name in names:
        match = _PARAMETER.match(name)
        if name != "angle_zero" and not (match and match.group(2) in terms):
            fail("fit.parameters", f"{name!r} is not angle_zero, q_inst[<term>] or u_inst[<term>] "
                                   f"with a term of [calibration.terms]")
    n = len(names)
    if (not isinstance(cov, list) or len(cov) != n
            or not all(isinstance(r, list) and len(r) == n for r in cov)):
        fail("fit.covariance", f"must be a {n} x {n} matrix (one row and column per parameter)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in cov for v in r):
        fail("fit.covariance", "must hold numbers only")
    matrix = np.array(cov, float).reshape(n, n)
    if not np.all(np.isfinite(matrix)):
        fail("fit.covariance", "holds a non-finite value")
    scale = np.sqrt(np.abs(np.outer(np.diag(matrix), np.diag(matrix))))
    if not np.all(np.abs(matrix - matrix.T) <= 1e-8 * scale):
        fail("fit.covariance", "is not symmetric")
    matrix = 0.5 * (matrix + matrix.T)
    if np.any(np.diag(matrix) < 0):
        fail("fit.covariance", "has a negative variance on its diagonal")
    # positive semi-definite, judged on the correlation matrix (the units differ)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(scale > 0, matrix / scale, np.where(matrix == 0, 0.0, np.inf))
    if n and not (np.all(np.isfinite(corr)) and np.linalg.eigvalsh(corr).min() >= -1e-8):
        fail("fit.covariance", "is not positive semi-definite")
    return tuple(names), tuple(tuple(float(v) for v in r) for r in matrix)


def as_calibration(calibration: Calibration | str | os.PathLike | None) -> Calibration | None:
    """A :class:`Calibration` from None, itself or a path (:func:`load_calibration`)."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration)
    raise TypeError(f"calibration must be a Calibration or a path, got {type(calibration).__name__}")


# ---------------------------------------------------------------------------------
# Settings of a calibration fit
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSettings(_Settings):
    """Every choice of a calibration fit, recorded in the calibration file.

    Attributes
    ----------
    order : int
        Total degree of the instrumental-polarization polynomials (0: a constant).
    fit_angle : bool
        Fit the angle zero point (needs a polarized standard); else keep the profile's.
    fit_instrumental : bool
        Fit the instrumental polarization; else keep the profile's.
    catalogue_errors : bool
        Let each standard's true q and u vary within its catalogue errors (see the
        module docstring); else take the catalogue values as exact.
    allow_flags : int
        Quality-flag bits (:class:`~robopol_clean.quality.QualityFlag`) a standard's
        Stokes row may have (0: only ``flags == 0`` rows are used).
    match_radius : float
        The standard is the brightest pattern within this many px of where it is expected.
    sky_tolerance : float
        A frame is matched to a standard by position when its pointing lies within this
        many arcsec of it (when ``OBJECT`` names none).
    min_separation : float
        Standards closer than this (px) count as one position when checking that a
        polynomial map can be constrained.
    """

    order: int = 0
    fit_angle: bool = True
    fit_instrumental: bool = True
    catalogue_errors: bool = True
    allow_flags: int = 0
    match_radius: float = 25.0
    sky_tolerance: float = 60.0
    min_separation: float = 20.0

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order <= 3:
            raise ValueError(f"order must be an integer in 0-3, got {self.order!r}")
        if isinstance(self.allow_flags, bool) or not isinstance(self.allow_flags, int) \
                or self.allow_flags < 0:
            raise ValueError(f"allow_flags must be a non-negative integer, got {self.allow_flags!r}")
        for name in ("match_radius", "sky_tolerance", "min_separation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (self.fit_angle or self.fit_instrumental):
            raise ValueError("nothing to fit: fit_angle and fit_instrumental are both off")


def _as_settings(settings: CalibrationSettings | Mapping | None, **overrides) -> CalibrationSettings:
    """Settings from None, themselves or a dict, with ``overrides`` (None: not given) applied."""
    values = settings.as_dict() if isinstance(settings, CalibrationSettings) else dict(settings or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CalibrationSettings.from_dict(values, where="calibration settings")
    except ValueError as exc:  # ConfigError: unknown key or bad value
        raise CalibrationError(str(exc)) from None


# ---------------------------------------------------------------------------------
# Standard-star measurements
# ---------------------------------------------------------------------------------
#: Columns of the measurements table (:func:`measure_standards`), with unit and meaning.
_MEASUREMENT_COLUMNS = {
    "frame": (None, "frame (file name, or 'frame <n>' for an in-memory frame)"),
    "standard": (None, "the standard's catalogue name"),
    "matched_by": (None, "how the standard was recognised: OBJECT or WCS"),
    "located_by": (None, "where it was expected: WCS, target (profile) or centre (of the frame)"),
    "x": ("pix", "pattern centre x in the frame (0-based)"),
    "y": ("pix", "pattern centre y in the frame (0-based)"),
    "x_det": ("pix", "pattern centre x on the detector (0-based)"),
    "y_det": ("pix", "pattern centre y on the detector (0-based)"),
    "offset": ("pix", "distance from the expected position"),
    "flux": ("electron", "total flux of the four spots"),
    "flags": (None, "quality flags of the Stokes row"),
    "q": (None, "measured q before calibration"),
    "q_err": (None, "1-sigma error of q"),
    "u": (None, "measured u before calibration"),
    "u_err": (None, "1-sigma error of u"),
}


def _celestial_wcs(ccd=None, header=None):
    """The frame's celestial WCS (from the CCDData, else from its header), or None."""
    wcs = getattr(ccd, "wcs", None)
    if wcs is not None and wcs.has_celestial:
        return wcs
    if header is None or not any(str(k).startswith("CTYPE") for k in header):
        return None
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header)
        except Exception:  # noqa: BLE001 -- an unusable WCS is no WCS
            return None
    return wcs if wcs.has_celestial else None


def _uncalibrated(profile: InstrumentProfile) -> InstrumentProfile:
    """The profile with an identity calibration: measurements in the instrument's frame."""
    return profile.replace(angle_zero=0.0, q_inst=np.zeros(1), u_inst=np.zeros(1))


def _is_identity(meta: Mapping) -> bool:
    coeffs = list(meta.get("q_inst_coeffs", [0.0])) + list(meta.get("u_inst_coeffs", [0.0]))
    return float(meta.get("angle_zero", 0.0)) == 0.0 and not any(float(c) for c in coeffs)


def _stokes_product(path: Path, profile: InstrumentProfile):
    """A ``<stem>_stokes.ecsv`` product and the header of its ``<stem>_clean.fits``."""
    from astropy.io import fits

    try:
        stokes = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # noqa: BLE001 -- any reading failure is one line
        raise CalibrationError(f"{path}: not a readable Stokes table ({type(exc).__name__})") from None
    missing = [c for c in ("x", "y", "q", "q_err", "u", "u_err", "flags") if c not in stokes.colnames]
    if missing:
        raise CalibrationError(f"{path}: not a Stokes table of robopol-clean (no {', '.join(missing)})")
    if stokes.meta.get("profile", profile.name) != profile.name:
        raise CalibrationError(f"{path}: reduced with the {stokes.meta.get('profile')!r} profile, "
                               f"not {profile.name!r}")
    if not _is_identity(stokes.meta):
        raise CalibrationError(f"{path}: reduced with a calibration (angle_zero "
                               f"{stokes.meta.get('angle_zero')}); calibrate needs uncalibrated "
                               f"measurements: give the FITS frames, or reduce without one")
    clean = path.with_name(path.name[: -len("_stokes.ecsv")] + "_clean.fits")
    try:
        with fits.open(clean) as hdul:
            header = hdul[0].header.copy()
            shape = hdul[0].data.shape if hdul[0].data is not None else None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: its header is read from {clean.name} beside it, which "
                               f"cannot be read ({exc})") from None
    if shape is None:
        raise CalibrationError(f"{clean}: holds no image")
    return stokes, header, _celestial_wcs(None, header), shape


def _reduced(frame, index: int, profile, classifier, config):
    """Reduce one frame (a path or a CCDData) with the identity calibration."""
    from astropy.nddata import CCDData

    from .io import read_frame
    from .pipeline import reduce_frame

    uncal = _uncalibrated(profile)
    if isinstance(frame, CCDData):
        name = f"frame {index}"
        ccd = frame
    else:
        name = str(frame)
        ccd = read_frame(frame, uncal)
    result = reduce_frame(ccd, profile=uncal, classifier=classifier, config=config,
                          name=Path(name).name)
    return name, result.stokes, result.ccd.meta, _celestial_wcs(ccd, ccd.meta), ccd.shape


def _locate(stokes: Table, header, wcs, shape, profile: InstrumentProfile,
            settings: CalibrationSettings, standards, name: str) -> dict:
    """The standard's measurement in one frame (see the module docstring for the rule)."""
    from astropy.coordinates import SkyCoord

    from .io import detector_origin
    from .quality import describe_flags
    from .standards import match_frame

    ny, nx = shape
    x0, y0 = detector_origin(header)
    region = profile.for_region(x0, y0, (ny, nx))
    target = region.target
    pointing = target if target is not None else ((nx - 1) / 2.0, (ny - 1) / 2.0)
    match = match_frame(header, wcs, pointing=pointing, tolerance=settings.sky_tolerance,
                        standards=standards, name=name)
    std = match.standard
    if wcs is not None:
        coord = SkyCoord(float(std["ra"]), float(std["dec"]), unit="deg")
        ex, ey = (float(v) for v in wcs.world_to_pixel(coord))
        located = "WCS"
        if not (np.isfinite(ex) and np.isfinite(ey)
                and -0.5 <= ex <= nx - 0.5 and -0.5 <= ey <= ny - 0.5):
            raise CalibrationError(f"{name}: its WCS puts {match.name} at pixel ({ex:.0f}, {ey:.0f}), "
                                   f"outside the {nx} x {ny} frame")
    else:
        ex, ey = pointing
        located = "target" if target is not None else "centre"
    x = np.asarray(stokes["x"], float)
    y = np.asarray(stokes["y"], float)
    d = np.hypot(x - ex, y - ey)
    near = np.flatnonzero(d <= settings.match_radius)
    if not near.size:
        raise CalibrationError(f"{name}: no measured quadruplet within {settings.match_radius:g} px "
                               f"of ({ex:.1f}, {ey:.1f}), where {match.name} should be "
                               f"(by the {'WCS' if located == 'WCS' else located + ' position'})")
    flux_cols = [c for c in stokes.colnames if c.startswith("flux_")]
    if flux_cols:
        flux = np.sum([np.asarray(stokes[c], float) for c in flux_cols], axis=0)
        i = int(near[np.argmax(np.nan_to_num(flux[near], nan=-np.inf))])
    else:
        flux = np.full(len(stokes), np.nan)
        i = int(near[np.argmin(d[near])])
    row = stokes[i]
    flags = int(row["flags"])
    bad = flags & ~int(settings.allow_flags)
    if bad:
        raise CalibrationError(f"{name}: the Stokes row of {match.name} at ({x[i]:.1f}, {y[i]:.1f}) "
                               f"is flagged {', '.join(describe_flags(bad))} (flags {flags}); "
                               f"leave the frame out, or allow those flags")
    values = [float(row[c]) for c in ("q", "q_err", "u", "u_err")]
    if not (all(np.isfinite(values)) and values[1] > 0 and values[3] > 0):
        raise CalibrationError(f"{name}: the Stokes row of {match.name} has no finite q, u and "
                               f"positive errors")
    return {"frame": name, "standard": match.name, "matched_by": match.by, "located_by": located,
            "x": x[i], "y": y[i], "x_det": x[i] + x0, "y_det": y[i] + y0, "offset": d[i],
            "flux": flux[i], "flags": flags, "q": values[0], "q_err": values[1],
            "u": values[2], "u_err": values[3]}


def measure_standards(frames: Sequence, *, profile: str | os.PathLike | InstrumentProfile = "robopol",
                      classifier=None, config=None,
                      settings: CalibrationSettings | Mapping | None = None,
                      standards: Table | None = None) -> Table:
    """The uncalibrated q and u of the standard in each frame.

    Parameters
    ----------
    frames : sequence
        FITS files of standard stars (reduced here with the profile's calibration
        switched off, one classifier for all), ``<stem>_stokes.ecsv`` products of
        ``robopol-clean reduce`` made without a calibration (their header is read from
        ``<stem>_clean.fits`` beside them), or `~astropy.nddata.CCDData` frames.
    profile : str, path or InstrumentProfile
        The instrument.
    classifier : str or SpotClassifier, optional
        As for :func:`~robopol_clean.pipeline.reduce_frame` (loaded once).
    config : ReductionConfig or path, optional
        Reduction settings, as for :func:`~robopol_clean.pipeline.reduce_frame`.
    settings : CalibrationSettings or dict, optional
        ``match_radius``, ``sky_tolerance`` and ``allow_flags`` are used here.
    standards : Table, optional
        The standards catalogue (:func:`~robopol_clean.standards.load_standards`).

    Returns
    -------
    Table
        One row per frame: frame, standard, how it was matched and located, position
        (frame and detector px), offset from the expected position, flux, flags and
        the uncalibrated q, u and their errors.

    Raises
    ------
    CalibrationError, StandardError, FrameError
        A frame cannot be read or reduced, shows no recognisable standard, or the
        standard's measurement is missing or flagged; the message names the frame.
    """
    from .pipeline import get_classifier
    from .standards import load_standards

    prof = load_profile(profile)
    settings = _as_settings(settings)
    table = standards if standards is not None else load_standards()
    clf = None
    rows = []
    for i, frame in enumerate(frames):
        if isinstance(frame, (str, os.PathLike)) and str(frame).endswith("_stokes.ecsv"):
            path = Path(frame)
            stokes, header, wcs, shape = _stokes_product(path, prof)
            name = str(path)
        else:
            if clf is None:
                clf = get_classifier(classifier)
            name, stokes, header, wcs, shape = _reduced(frame, i, prof, clf, config)
        rows.append(_locate(stokes, header, wcs, shape, prof, settings, table, name))
    if not rows:
        raise CalibrationError("no frames given: calibrate needs frames of standard stars")
    out = Table(rows=[[r[c] for c in _MEASUREMENT_COLUMNS] for r in rows],
                names=list(_MEASUREMENT_COLUMNS))
    for col, (unit, text) in _MEASUREMENT_COLUMNS.items():
        out[col].unit = unit
        out[col].description = text
    out.meta["profile"] = prof.name
    return out


# ---------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------
@dataclass
class CalibrationFit:
    """The result of a calibration fit.

    Attributes
    ----------
    calibration : Calibration
        The fitted calibration (fixed parameters keep the profile's values).
    parameters : list of str
        Names of the fitted calibration parameters: ``angle_zero`` (deg),
        ``q_inst[<term>]``, ``u_inst[<term>]``.
    values, errors : ndarray
        Their values and 1-sigma errors.
    covariance : ndarray
        Their covariance (marginalised over the standards' true q and u).
    chi2 : float
        Chi-square of the fit (measurements, and catalogue terms when
        ``catalogue_errors``).
    dof : int
        Degrees of freedom: 2 per measurement minus the calibration parameters.
    measurements : Table
        The measurements (:func:`measure_standards`) with the model (``q_model``,
        ``u_model``), residuals and normalised residuals (``z_q``, ``z_u``).
    standards : Table
        One row per standard: catalogue values, frames, mean residuals, chi-square.
    settings : CalibrationSettings
        The settings of the fit.
    meta : dict
        Provenance: creation time, package version and commit, profile source.
    """

    calibration: Calibration
    parameters: list[str]
    values: np.ndarray
    errors: np.ndarray
    covariance: np.ndarray
    chi2: float
    dof: int
    measurements: Table
    standards: Table
    settings: CalibrationSettings
    meta: dict = field(default_factory=dict)

    def value(self, name: str) -> tuple[float, float]:
        """Value and error of one fitted parameter (e.g. ``"angle_zero"``, ``"q_inst[1]"``)."""
        i = self.parameters.index(name)
        return float(self.values[i]), float(self.errors[i])

    def to_toml(self) -> str:
        """The calibration file's text (see :doc:`/calibration`)."""
        cal = self.calibration
        s = self.settings
        doc = {
            "format": CALIBRATION_FORMAT,
            "format_version": CALIBRATION_VERSION,
            "instrument": cal.instrument,
            "created": self.meta.get("created", ""),
            "robopol_clean_version": self.meta.get("version", ""),
            "robopol_clean_commit": self.meta.get("commit", "") or "",
            "profile_source": self.meta.get("profile_source", ""),
            "calibration": {
                "angle_zero": float(cal.angle_zero),
                "terms": list(cal.terms),
                "q_inst": [float(c) for c in cal.q_inst],
                "u_inst": [float(c) for c in cal.u_inst],
                "center": [float(c) for c in cal.center],
                "scale": float(cal.scale),
            },
            "fit": {
                "parameters": list(self.parameters),
                "values": [float(v) for v in self.values],
                "errors": [float(v) for v in self.errors],
                "covariance": [[float(v) for v in r] for r in self.covariance],
                "chi2": float(self.chi2),
                "dof": int(self.dof),
                "n_frames": len(self.measurements),
                "standards": [str(n) for n in self.standards["name"]],
                "catalogue": self.meta.get("catalogue", ""),
                "settings": {f.name: getattr(s, f.name) for f in fields(s)},
            },
            "standards": [{c: _plain(r[c]) for c in self.standards.colnames}
                          for r in self.standards],
            "frames": [{c: _plain(r[c]) for c in self.measurements.colnames}
                       for r in self.measurements],
        }
        head = ("# robopol-clean calibration file, written by `robopol-clean calibrate`.\n"
                "# `robopol-clean reduce --calibration FILE` and reduce_frame(..., calibration=FILE)\n"
                "# apply the [calibration] table in place of the instrument profile's\n"
                "# [calibration] values: q, u -= (q_inst, u_inst)(x, y), then rotated by angle_zero\n"
                "# (deg); the [fit] covariance of the parameters goes into the Stokes errors.\n"
                "# [fit], [[standards]] and [[frames]] record how it was obtained.\n")
        return head + _toml_dumps(doc)

    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the calibration file atomically.

        Parameters
        ----------
        path : path-like
            The ``.toml`` file.
        overwrite : bool
            Replace an existing file.

        Returns
        -------
        Path

        Raises
        ------
        OutputError
            The file exists (and not ``overwrite``) or cannot be written.
        """
        from .io import write_atomic

        text = self.to_toml()
        return write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"),
                            overwrite=overwrite)

    def summary(self) -> str:
        """A few lines for a terminal: the fitted values, chi-square and per-standard residuals."""
        lines = []
        for name, v, e in zip(self.parameters, self.values, self.errors):
            unit = " deg" if name == "angle_zero" else ""
            lines.append(f"  {name:<14} = {v:+.5f} +/- {e:.5f}{unit}")
        red = self.chi2 / self.dof if self.dof > 0 else float("nan")
        lines.append(f"  chi2 = {self.chi2:.2f} for {self.dof} degrees of freedom (reduced {red:.2f})")
        for r in self.standards:
            lines.append(f"  {r['name']:<12} {'polarized' if r['polarized'] else 'unpolarized':<11} "
                         f"{r['n_frames']} frame(s): mean residual q {1e3 * r['q_residual']:+.2f}e-3, "
                         f"u {1e3 * r['u_residual']:+.2f}e-3, chi2 {r['chi2']:.2f}")
        return "\n".join(lines)


def _plain(value):
    """A table value as a TOML-writable Python value."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return str(value)


def _positions(x: np.ndarray, y: np.ndarray, min_separation: float) -> int:
    """Number of distinct positions: points within ``min_separation`` px join one group."""
    centres: list[tuple[float, float]] = []
    for px, py in zip(x, y):
        if not any(math.hypot(px - cx, py - cy) < min_separation for cx, cy in centres):
            centres.append((float(px), float(py)))
    return len(centres)


class _Model:
    """The measurement model and its Jacobian (see the module docstring).

    Parameter vector: [angle_zero (deg) if fitted] + q coefficients + u coefficients (if
    fitted) + true (q, u) of every standard (if catalogue_errors).
    """

    def __init__(self, q, q_err, u, u_err, basis, std_index, t_cat, t_err, fixed_angle,
                 fixed_q, fixed_u, fit_angle, fit_inst, catalogue_errors):
        self.q, self.u = q, u
        self.wq, self.wu = 1.0 / q_err, 1.0 / u_err
        self.basis, self.s = basis, std_index
        self.t_cat, self.t_err = t_cat, t_err
        self.fixed_angle, self.fixed_q, self.fixed_u = fixed_angle, fixed_q, fixed_u
        self.fit_angle, self.fit_inst, self.cat = fit_angle, fit_inst, catalogue_errors
        self.k = basis.shape[1] if fit_inst else 0
        self.n_std = len(t_cat)
        self.n_cal = int(fit_angle) + 2 * self.k
        self.n = self.n_cal + (2 * self.n_std if catalogue_errors else 0)

    def unpack(self, p):
        i = 0
        angle = self.fixed_angle
        if self.fit_angle:
            angle, i = p[0], 1
        if self.fit_inst:
            cq, cu = p[i:i + self.k], p[i + self.k:i + 2 * self.k]
            inst_q, inst_u = self.basis @ cq, self.basis @ cu
            i += 2 * self.k
        else:
            inst_q, inst_u = self.fixed_q, self.fixed_u
        t = p[i:].reshape(-1, 2) if self.cat else self.t_cat
        return angle, inst_q, inst_u, t

    def predict(self, p):
        angle, inst_q, inst_u, t = self.unpack(p)
        c, s = math.cos(math.radians(2 * angle)), math.sin(math.radians(2 * angle))
        tq, tu = t[self.s, 0], t[self.s, 1]
        return tq * c + tu * s + inst_q, -tq * s + tu * c + inst_u

    def residuals(self, p):
        qm, um = self.predict(p)
        out = [(self.q - qm) * self.wq, (self.u - um) * self.wu]
        if self.cat:
            t = self.unpack(p)[3]
            out.append(((t - self.t_cat) / self.t_err).ravel())
        return np.concatenate(out)

    def jacobian(self, p):
        """d residuals / d p."""
        angle, _, _, t = self.unpack(p)
        m = len(self.q)
        rows = 2 * m + (2 * self.n_std if self.cat else 0)
        jac = np.zeros((rows, self.n))
        c, s = math.cos(math.radians(2 * angle)), math.sin(math.radians(2 * angle))
        tq, tu = t[self.s, 0], t[self.s, 1]
        col = 0
        if self.fit_angle:
            k = math.radians(2.0)  # d(2 angle [rad]) / d angle [deg]
            jac[:m, 0] = -(-tq * s + tu * c) * k * self.wq
            jac[m:2 * m, 0] = -(-tq * c - tu * s) * k * self.wu
            col = 1
        if self.fit_inst:
            jac[:m, col:col + self.k] = -self.basis * self.wq[:, None]
            jac[m:2 * m, col + self.k:col + 2 * self.k] = -self.basis * self.wu[:, None]
            col += 2 * self.k
        if self.cat:
            idx = np.arange(m)
            jac[idx, col + 2 * self.s] = -c * self.wq
            jac[idx, col + 2 * self.s + 1] = -s * self.wq
            jac[m + idx, col + 2 * self.s] = s * self.wu
            jac[m + idx, col + 2 * self.s + 1] = -c * self.wu
            prior = np.arange(2 * self.n_std)
            jac[2 * m + prior, col + prior] = 1.0 / self.t_err.ravel()
        return jac

    def linear_fit(self, angle: float) -> np.ndarray:
        """The best parameters for a fixed angle: the model is linear in the others."""
        p0 = np.zeros(self.n)
        if self.fit_angle:
            p0[0] = angle
        if self.cat:
            p0[self.n_cal:] = self.t_cat.ravel()
        jac = self.jacobian(p0)
        free = np.arange(int(self.fit_angle), self.n)
        if not free.size:
            return p0
        step, *_ = np.linalg.lstsq(jac[:, free], -self.residuals(p0), rcond=None)
        p0[free] += step
        return p0


def fit_measurements(measurements: Table,
                     profile: str | os.PathLike | InstrumentProfile = "robopol",
                     settings: CalibrationSettings | Mapping | None = None, *,
                     standards: Table | None = None) -> CalibrationFit:
    """Fit the angle zero point and the instrumental polarization to standard measurements.

    Parameters
    ----------
    measurements : Table
        Uncalibrated measurements of standards, as :func:`measure_standards` returns
        (at least ``frame``, ``standard``, ``x_det``, ``y_det``, ``q``, ``q_err``, ``u``,
        ``u_err``).
    profile : str, path or InstrumentProfile
        The instrument: its polynomial terms and normalisation, and the values kept for
        what is not fitted.
    settings : CalibrationSettings or dict, optional
        ``order``, ``fit_angle``, ``fit_instrumental``, ``catalogue_errors`` and
        ``min_separation`` are used here.
    standards : Table, optional
        The standards catalogue (:func:`~robopol_clean.standards.load_standards`).

    Returns
    -------
    CalibrationFit

    Raises
    ------
    CalibrationError
        The measurements cannot constrain what is asked: no polarized standard for the
        angle zero point, fewer distinct positions than polynomial terms, an unknown
        standard, or a degenerate set (the message names the parameters it cannot
        separate).

    Examples
    --------
    Measurements of a polarized and an unpolarized standard, made with an angle zero
    point of 2 deg and an instrumental polarization of (0.004, -0.003):

    >>> import numpy as np
    >>> from astropy.table import Table
    >>> c, s = np.cos(np.radians(4.0)), np.sin(np.radians(4.0))
    >>> rows = []
    >>> for name, (q, u) in (("BD+59 389", (-0.06172, -0.01803)), ("HD 212311", (-7e-5, 3.3e-4))):
    ...     rows += [(name, 1026.0, 1043.0, q * c + u * s + 0.004, 5e-4, -q * s + u * c - 0.003, 5e-4)] * 3
    >>> m = Table(rows=rows, names=("standard", "x_det", "y_det", "q", "q_err", "u", "u_err"))
    >>> fit = fit_measurements(m, "robopol")
    >>> angle, err = fit.value("angle_zero")
    >>> round(angle, 2), round(fit.value("q_inst[1]")[0], 4), round(fit.value("u_inst[1]")[0], 4)
    (2.0, 0.004, -0.003)
    """
    from ._version_info import __commit__, __version__
    from .standards import find_standard, load_standards

    prof = load_profile(profile)
    settings = _as_settings(settings)
    table = standards if standards is not None else load_standards()
    m = measurements
    need = [c for c in ("standard", "x_det", "y_det", "q", "q_err", "u", "u_err") if c not in m.colnames]
    if need:
        raise CalibrationError(f"measurements lack column(s) {', '.join(need)}")
    if not len(m):
        raise CalibrationError("no standard-star measurements to fit")
    q, q_err, u, u_err, xd, yd = (np.asarray(m[c], float) for c in
                                  ("q", "q_err", "u", "u_err", "x_det", "y_det"))
    if not (np.all(np.isfinite([q, u, xd, yd])) and np.all(q_err > 0) and np.all(u_err > 0)):
        raise CalibrationError("measurements must have finite q, u, positions and positive errors")

    names: list[str] = []
    rows = []
    for n in (str(v) for v in m["standard"]):
        row = find_standard(n, table)
        if row is None:
            raise CalibrationError(f"{n!r} is not in the standards catalogue")
        if str(row["name"]) not in names:
            names.append(str(row["name"]))
            rows.append(row)
    std_index = np.array([names.index(str(find_standard(str(v), table)["name"]))
                          for v in m["standard"]])
    polarized = np.array([bool(r["polarized"]) for r in rows])
    t_cat = np.array([[float(r["q"]), float(r["u"])] for r in rows])
    t_err = np.array([[float(r["q_err"]), float(r["u_err"])] for r in rows])
    frames_text = ", ".join(names)

    if settings.fit_angle and not polarized.any():
        raise CalibrationError(
            f"no polarized standard among the frames (only {frames_text}): the angle zero "
            f"point cannot be fitted; add frames of a polarized standard "
            f"({', '.join(str(r['name']) for r in table if r['polarized'])}) or keep the "
            f"profile's zero point (fit_angle=False, --fix-angle)")
    geo = prof.geometry
    fit_terms = [t for t in geo.terms if term_degree(t) <= settings.order]
    if settings.fit_instrumental:
        if max(term_degree(t) for t in geo.terms) < settings.order:
            raise CalibrationError(f"order {settings.order} needs polynomial terms the {prof.name} "
                                   f"profile lacks (its terms: {', '.join(geo.terms)})")
        n_pos = _positions(xd, yd, settings.min_separation)
        if n_pos < len(fit_terms):
            raise CalibrationError(
                f"an instrumental-polarization map of order {settings.order} has {len(fit_terms)} "
                f"terms and needs standards at {len(fit_terms)} or more positions (at least "
                f"{settings.min_separation:g} px apart); the frames put them at {n_pos}")
    basis = geo.design_matrix(xd, yd)[:, [geo.terms.index(t) for t in fit_terms]]
    fixed_q, fixed_u = prof.instrumental_qu(xd, yd)
    model = _Model(q, q_err, u, u_err, basis, std_index, t_cat, t_err, float(prof.angle_zero),
                   np.asarray(fixed_q, float), np.asarray(fixed_u, float), settings.fit_angle,
                   settings.fit_instrumental, settings.catalogue_errors)
    cal_names = ((["angle_zero"] if settings.fit_angle else [])
                 + ([f"q_inst[{t}]" for t in fit_terms] + [f"u_inst[{t}]" for t in fit_terms]
                    if settings.fit_instrumental else []))
    _check_rank(model, cal_names, frames_text)

    # The model is linear in everything but the angle: scan the angle, solve the rest
    # exactly at each step, then refine all parameters together.
    if settings.fit_angle:
        grid = np.arange(-90.0, 90.0, 1.0)
        chi = [float(np.sum(model.residuals(model.linear_fit(a)) ** 2)) for a in grid]
        p0 = model.linear_fit(float(grid[int(np.argmin(chi))]))
    else:
        p0 = model.linear_fit(float(prof.angle_zero))
    p = _gauss_newton(model, p0)
    jac = model.jacobian(p)
    cov_all = np.linalg.inv(jac.T @ jac)
    res = model.residuals(p)
    chi2 = float(res @ res)
    dof = int(2 * len(q) - model.n_cal)
    cov = cov_all[:model.n_cal, :model.n_cal]
    values = p[:model.n_cal].copy()
    if settings.fit_angle:
        values[0] = (values[0] + 90.0) % 180.0 - 90.0
    errors = np.sqrt(np.diag(cov))

    angle = values[0] if settings.fit_angle else float(prof.angle_zero)
    q_coef = np.resize(np.asarray(prof.q_inst, float), len(geo.terms)) * (
        np.arange(len(geo.terms)) < len(prof.q_inst))
    u_coef = np.resize(np.asarray(prof.u_inst, float), len(geo.terms)) * (
        np.arange(len(geo.terms)) < len(prof.u_inst))
    if settings.fit_instrumental:
        k = len(fit_terms)
        off = int(settings.fit_angle)
        q_coef = np.zeros(len(geo.terms))
        u_coef = np.zeros(len(geo.terms))
        for j, t in enumerate(fit_terms):
            q_coef[geo.terms.index(t)] = values[off + j]
            u_coef[geo.terms.index(t)] = values[off + k + j]
    calibration = Calibration(instrument=prof.name, angle_zero=float(angle),
                              q_inst=tuple(float(c) for c in q_coef),
                              u_inst=tuple(float(c) for c in u_coef), terms=tuple(geo.terms),
                              center=(float(geo.center[0]), float(geo.center[1])),
                              scale=float(geo.scale), parameters=tuple(cal_names),
                              covariance=tuple(tuple(float(v) for v in r)
                                               for r in 0.5 * (cov + cov.T)))

    out = m.copy(copy_data=True)
    qm, um = model.predict(p)
    for col, vals, text in (
            ("q_model", qm, "fitted model of the measured q"),
            ("u_model", um, "fitted model of the measured u"),
            ("q_residual", q - qm, "measured minus model q"),
            ("u_residual", u - um, "measured minus model u"),
            ("z_q", (q - qm) / q_err, "q residual in units of its error"),
            ("z_u", (u - um) / u_err, "u residual in units of its error")):
        out[col] = vals
        out[col].description = text
    summary = _standards_summary(names, rows, std_index, out, model, p)
    meta = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "version": __version__, "commit": __commit__, "profile_source": prof.source,
            "catalogue": f"{table.meta.get('source', 'standards catalogue')}: "
                         f"{table.meta.get('bibcode', '')}".rstrip(": ")}
    fit = CalibrationFit(calibration, cal_names, values, errors, cov, chi2, dof, out, summary,
                         settings, meta)
    digest = hashlib.sha256(fit.to_toml().encode("utf-8")).hexdigest()
    fit.calibration = _replace(calibration, sha256=digest)
    return fit


def _replace(cal: Calibration, **changes) -> Calibration:
    from dataclasses import replace

    return replace(cal, **changes)


def _gauss_newton(model: _Model, p: np.ndarray, max_iter: int = 50) -> np.ndarray:
    """Minimise the sum of squared residuals from ``p`` (nearly linear: a few steps)."""
    for _ in range(max_iter):
        jac = model.jacobian(p)
        step, *_ = np.linalg.lstsq(jac, -model.residuals(p), rcond=None)
        p = p + step
        if np.all(np.abs(step) <= 1e-12 * (1.0 + np.abs(p))):
            break
    return p


def _check_rank(model: _Model, cal_names: list[str], frames_text: str) -> None:
    """Refuse when the measurements cannot determine every calibration parameter."""
    p0 = np.zeros(model.n)
    if model.fit_angle:
        p0[0] = model.fixed_angle
    if model.cat:
        p0[model.n_cal:] = model.t_cat.ravel()
    m = len(model.q)
    a = model.jacobian(p0)[:2 * m, :model.n_cal]
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms == 0):
        bad = [cal_names[i] for i in np.flatnonzero(norms == 0)]
        raise CalibrationError(f"the standards ({frames_text}) do not constrain {', '.join(bad)}")
    _, sv, vt = np.linalg.svd(a / norms, full_matrices=False)
    if len(sv) < model.n_cal or sv[-1] < 1e-8 * sv[0]:
        null = np.abs(vt[-1]) if len(sv) == model.n_cal else np.ones(model.n_cal)
        bad = [cal_names[i] for i in np.flatnonzero(null > 0.1)]
        raise CalibrationError(
            f"the standards ({frames_text}) cannot separate {', '.join(bad)}: add an "
            f"unpolarized standard, a polarized one at another angle, or standards at more "
            f"positions (or fit fewer parameters)")


def _standards_summary(names, rows, std_index, meas: Table, model: _Model, p) -> Table:
    t_fit = model.unpack(p)[3]
    out = []
    for j, (name, row) in enumerate(zip(names, rows)):
        sel = std_index == j
        zq, zu = np.asarray(meas["z_q"])[sel], np.asarray(meas["z_u"])[sel]
        chi = float(np.sum(zq**2 + zu**2))
        if model.cat:
            chi += float(np.sum(((t_fit[j] - model.t_cat[j]) / model.t_err[j]) ** 2))
        out.append({
            "name": name, "polarized": bool(row["polarized"]), "n_frames": int(sel.sum()),
            "q_cat": float(row["q"]), "u_cat": float(row["u"]),
            "q_cat_err": float(row["q_err"]), "u_cat_err": float(row["u_err"]),
            "q_fit": float(t_fit[j][0]), "u_fit": float(t_fit[j][1]),
            "q_residual": float(np.mean(np.asarray(meas["q_residual"])[sel])),
            "u_residual": float(np.mean(np.asarray(meas["u_residual"])[sel])),
            "chi2": chi,
        })
    table = Table(rows=[list(r.values()) for r in out], names=list(out[0]))
    for col, text in (("q_fit", "the standard's q in the fit (its catalogue q when exact)"),
                      ("q_residual", "mean measured minus model q over its frames"),
                      ("chi2", "its share of the chi-square (measurements and catalogue term)")):
        table[col].description = text
    return table


def fit_calibration(frames: Sequence, *, profile: str | os.PathLike | InstrumentProfile = "robopol",
                    classifier=None, config=None,
                    settings: CalibrationSettings | Mapping | None = None,
                    standards: Table | None = None, **options: Any) -> CalibrationFit:
    """Calibration from frames of standard stars: :func:`measure_standards`, then
    :func:`fit_measurements`.

    Parameters
    ----------
    frames : sequence
        FITS files, ``<stem>_stokes.ecsv`` products made without a calibration, or
        `~astropy.nddata.CCDData` frames of polarization standards.
    profile, classifier, config, standards
        As for :func:`measure_standards`.
    settings : CalibrationSettings or dict, optional
        Every choice of the fit (defaults: a constant instrumental polarization and the
        angle zero point, catalogue errors included).
    **options
        Fields of :class:`CalibrationSettings` overriding ``settings`` (e.g.
        ``order=1``, ``fit_angle=False``).

    Returns
    -------
    CalibrationFit
        ``fit.write("calibration.toml")`` writes the file ``reduce`` applies.

    Raises
    ------
    CalibrationError, StandardError, FrameError
        See :func:`measure_standards` and :func:`fit_measurements`.
    """
    prof = load_profile(profile)
    settings = _as_settings(settings, **options)
    meas = measure_standards(frames, profile=prof, classifier=classifier, config=config,
                             settings=settings, standards=standards)
    return fit_measurements(meas, prof, settings, standards=standards)


# ---------------------------------------------------------------------------------
# A small TOML writer (the standard library reads TOML but does not write it)
# ---------------------------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_dumps(data: Mapping, prefix: str = "") -> str:
    """TOML text of nested dicts: scalars and arrays, tables, arrays of tables."""
    lines = []
    tables, arrays = [], []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{_toml_key(key)}"
        out += f"\n[{name}]\n" + _toml_dumps(value, name + ".")
    for key, items in arrays:
        name = f"{prefix}{_toml_key(key)}"
        for item in items:
            out += f"\n[[{name}]]\n" + _toml_dumps(item, name + ".")
    return out
