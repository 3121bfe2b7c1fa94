"""Simulated polarimetry frames with full truth tables.

:func:`simulate_frame` renders one frame of a multi-channel imaging polarimeter
described by an :class:`~robopol_clean.instrument.InstrumentProfile`: field stars
split into one spot per channel (fluxes set by each star's q and u and the profile's
channel angles), the position-dependent spot geometry, a Moffat PSF, sky behind the
focal-plane mask, detector noise and saturation, and the things a reduction must not
mistake for stars -- reflection artifacts (horizontal streaks and compact ghosts, mostly
as *orphan pairs* laid out like one analyser pair of a pattern whose other pair is
missing), cosmic rays and flat-field dust donuts. Every injected object is listed in
truth tables, so detection, grouping, classification and photometry can be scored.

The simulated frame is in ADU, bias-subtracted unless ``include_bias=True``.

Photometric model
-----------------
A star of instrumental magnitude ``mag`` delivers
``exptime * 10 ** (-0.4 * (mag - zero_point))`` electrons in total over its spots
(:data:`ZERO_POINT` = 23.1 by default: an R = 15 star gives about 2.4e5 e- in 120 s,
and the brightest unsaturated stars are near R = 10.5 for RoboPol). The total is split
between the two analyser pairs in the ratio ``u-pair / q-pair = exp(pair_ratio_slope *
xn)`` (xn the normalised x of the pattern centre; measured as roughly exp(0.85 xn) on
RoboPol), and within each pair by the polarization::

    F(0 deg)  = I_q / 2 (1 + q)     F(90 deg)  = I_q / 2 (1 - q)
    F(45 deg) = I_u / 2 (1 + u)     F(135 deg) = I_u / 2 (1 - u)

so that ``q = (F0 - F90) / (F0 + F90)`` and ``u = (F45 - F135) / (F45 + F135)`` hold
for every star, wherever it sits (with ``I_q = I_u = I / 2`` this is ``I/4 (1 +/- q)``).
The q and u put into the spot fluxes are the star's true (q, u) rotated by
``-profile.angle_zero`` and offset by ``profile.instrumental_qu`` -- the inverse of the
calibration documented in the profile, or of the values given as ``calibration=`` -- and
are listed as ``q_obs``, ``u_obs``. ``standard=NAME`` makes the target a polarization
standard of the shipped catalogue (:mod:`robopol_clean.standards`).

Coordinates in the truth tables are 0-based pixels of the simulated image (FITS
orientation). A frame smaller than the detector is the detector region starting at
``origin`` (detector pixel ``(x0, y0)`` is image pixel ``(0, 0)``); geometry, mask and
vignetting are evaluated at detector coordinates.

:func:`simulate_frames` writes frames to disk with their truth tables under names of
their own (:func:`truth_paths`, ``<stem>_truth_<table>.ecsv``), which never clash with
the products of ``robopol-clean reduce``.
"""

# The simulator by component: _sky (sky and mask), _stars (PSF, geometry, stars and their
# spots), _reflections, _donuts, _cosmic_rays, _detector (noise, gain, saturation, bias),
# _truth (tables and header); _frame runs them in order and _files writes frames to disk.
from ._files import TRUTH_SUFFIXES, frame_seeds, simulate_frames, truth_paths
from ._frame import ZERO_POINT, SimulatedFrame, simulate_frame
from ._render import moffat_alpha
from ._truth import SIM_VERSION

__all__ = [
    "ZERO_POINT",
    "SIM_VERSION",
    "TRUTH_SUFFIXES",
    "SimulatedFrame",
    "simulate_frame",
    "simulate_frames",
    "frame_seeds",
    "truth_paths",
    "moffat_alpha",
]
