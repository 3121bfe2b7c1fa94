"""Photometry of spots: PSF fitting of every spot together (default) or apertures.

- :mod:`~robopol_clean.photometry.psf`: the frame's PSF, fitted to its own isolated
  spots (:func:`fit_psf`), with a documented fallback;
- :mod:`~robopol_clean.photometry.fit`: simultaneous PSF photometry of all spots
  (:func:`fit_spots`);
- :mod:`~robopol_clean.photometry.aperture`: aperture photometry with a local annulus
  sky (:func:`measure_spots`).

All are array-in functions on a plain image in adu; fluxes come out in electrons with
uncertainties from the CCD noise model.
"""

from .aperture import (
    ANNULUS_RADIUS_FACTORS,
    APERTURE_FWHM_FACTOR,
    DEFAULT_CONTAMINATION_LIMIT,
    DEFAULT_PSF_BETA,
    annulus_for,
    aperture_radius_for,
    circle_overlap_weights,
    clipped_sky,
    flux_variance,
    measure_spots,
    moffat_aperture_fraction,
)
from .fit import fit_spots, solve_normal_equations
from .psf import PSFFallbackWarning, PSFModel, fit_psf, moffat_psf

__all__ = [
    "APERTURE_FWHM_FACTOR",
    "ANNULUS_RADIUS_FACTORS",
    "DEFAULT_PSF_BETA",
    "DEFAULT_CONTAMINATION_LIMIT",
    "aperture_radius_for",
    "annulus_for",
    "flux_variance",
    "measure_spots",
    "moffat_aperture_fraction",
    "clipped_sky",
    "circle_overlap_weights",
    "PSFModel",
    "PSFFallbackWarning",
    "fit_psf",
    "moffat_psf",
    "fit_spots",
    "solve_normal_equations",
]
