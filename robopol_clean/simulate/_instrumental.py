"""Instrumental effects and standard-star targets: what a calibration must undo.

The instrumental polarization map and the angle zero point are the profile's
``[calibration]`` values unless the frame is given its own (:func:`inject_calibration`);
the stars' fluxes then carry their true (q, u) rotated by ``-angle_zero`` plus
``instrumental_qu`` at their position (``_stars._observed_qu``), the inverse of the
correction, so reducing with the same values recovers the sky's (q, u).
:func:`standard_target` turns a standard's name into the target's q and u from the
shipped catalogue.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from ..instrument import InstrumentProfile

#: Magnitude of a simulated standard when the target's ``mag`` is not given: R = 11 in
#: 120 s is about 8e6 electrons, bright and unsaturated.
STANDARD_MAG = 11.0

_KEYS = ("angle_zero", "q_inst", "u_inst")


def inject_calibration(prof: InstrumentProfile, calibration) -> InstrumentProfile:
    """The profile with the instrumental effects a frame is simulated with.

    Parameters
    ----------
    prof : InstrumentProfile
        The instrument.
    calibration : Calibration, path or dict
        A calibration (object or file, :mod:`robopol_clean.calibration`), or a dict with
        any of ``angle_zero`` (deg), ``q_inst`` and ``u_inst`` (a number: the constant
        term; a list: coefficients in the profile's term order); missing keys keep the
        profile's values.

    Returns
    -------
    InstrumentProfile

    Raises
    ------
    ValueError
        Unknown keys, non-finite values or too many coefficients.
    """
    if not isinstance(calibration, Mapping):
        from ..calibration import as_calibration

        return as_calibration(calibration).apply(prof)
    unknown = sorted(set(calibration) - set(_KEYS))
    if unknown:
        raise ValueError(f"calibration: unknown key(s) {', '.join(unknown)} (use {', '.join(_KEYS)})")
    changes = {}
    if "angle_zero" in calibration:
        angle = float(calibration["angle_zero"])
        if not math.isfinite(angle):
            raise ValueError(f"calibration: angle_zero must be finite, got {angle}")
        changes["angle_zero"] = angle
    n_terms = len(prof.geometry.terms)
    for key in ("q_inst", "u_inst"):
        if key in calibration:
            coef = np.atleast_1d(np.asarray(calibration[key], float))
            if coef.ndim != 1 or not 1 <= coef.size <= n_terms or not np.all(np.isfinite(coef)):
                raise ValueError(f"calibration: {key} must be 1 to {n_terms} finite coefficients "
                                 f"(terms {', '.join(prof.geometry.terms)}), got {calibration[key]!r}")
            changes[key] = coef
    return prof.replace(**changes)


def is_identity(prof: InstrumentProfile) -> bool:
    """True when the profile's calibration changes nothing (zero angle, zero maps)."""
    return (prof.angle_zero == 0.0 and not np.any(np.asarray(prof.q_inst))
            and not np.any(np.asarray(prof.u_inst)))


def calibration_record(prof: InstrumentProfile) -> dict:
    """The instrumental effects of a frame, for the truth tables' metadata."""
    return {"angle_zero": float(prof.angle_zero),
            "q_inst": [float(c) for c in np.ravel(prof.q_inst)],
            "u_inst": [float(c) for c in np.ravel(prof.u_inst)],
            "terms": list(prof.geometry.terms),
            "convention": "fluxes carry R(-angle_zero) (q, u) + (q_inst, u_inst)(x, y)"}


def standard_target(prof: InstrumentProfile, target, standard: str | os.PathLike | None):
    """The target of a standard-star frame: the standard's catalogue q and u.

    Parameters
    ----------
    prof : InstrumentProfile
        The instrument (it must have a target position).
    target : dict, bool or None
        As for ``simulate_frame``; only ``mag`` may be given with a standard.
    standard : str or None
        The standard's name (any spelling :func:`~robopol_clean.standards.find_standard`
        recognises).

    Returns
    -------
    target : dict, bool or None
        ``target`` unchanged when ``standard`` is None, else ``{"mag", "q", "u"}``.
    name : str or None
        The standard's catalogue name.

    Raises
    ------
    ValueError
        Unknown standard, no target position in the profile, or q/u given as well.
    """
    if standard is None:
        return target, None
    from ..standards import find_standard, load_standards

    row = find_standard(str(standard))
    if row is None:
        known = ", ".join(str(n) for n in load_standards()["name"])
        raise ValueError(f"unknown standard {standard!r} (known: {known})")
    if prof.target is None:
        raise ValueError(f"profile {prof.name!r} has no target position for a standard star")
    given = dict(target) if isinstance(target, Mapping) else {}
    if target is False or "q" in given or "u" in given:
        raise ValueError("a standard sets the target's q and u: give standard or target q/u, not both")
    mag = float(given.get("mag", STANDARD_MAG))
    return {"mag": mag, "q": float(row["q"]), "u": float(row["u"])}, str(row["name"])
