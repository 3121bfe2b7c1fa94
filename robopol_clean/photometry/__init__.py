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

from . import aperture, fit, psf
from .aperture import *  # noqa: F403
from .fit import *  # noqa: F403
from .psf import *  # noqa: F403

__all__ = aperture.__all__ + fit.__all__ + psf.__all__
