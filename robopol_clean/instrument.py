"""Instrument profiles: the instrument described as data.

An :class:`InstrumentProfile` holds everything the pipeline needs to know about a
multi-channel imaging polarimeter: detector constants, channel names and analyser
angles, the position-dependent spot geometry, the focal-plane mask, the usable region
and the polarimetric calibration. Profiles are TOML files read with the standard
library; RoboPol's ships with the package (``load_profile("robopol")``).

Coordinates are 0-based pixels in FITS orientation (x = column, y = row, y up).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ProfileError",
    "SpotGeometry",
    "MaskShape",
    "InstrumentProfile",
    "load_profile",
    "available_profiles",
    "polynomial_terms",
]

#: Monomials a geometry or calibration polynomial may use, in xn and yn.
_TERM_POWERS: dict[str, tuple[int, int]] = {
    "1": (0, 0),
    "x": (1, 0),
    "y": (0, 1),
    "x2": (2, 0),
    "xy": (1, 1),
    "y2": (0, 2),
    "x3": (3, 0),
    "x2y": (2, 1),
    "xy2": (1, 2),
    "y3": (0, 3),
}

_MASK_KINDS = {
    "circle": ("center", "radius"),
    "rect": ("center", "size"),
    "hband": ("y", "width"),
    "vband": ("x", "width"),
    "polygon": ("vertices",),
    "target_spots": ("size",),
}


class ProfileError(ValueError):
    """An instrument profile file is missing, unreadable or inconsistent."""


def polynomial_terms(xn, yn, terms: Sequence[str]) -> np.ndarray:
    """Evaluate the named monomials at normalised positions.

    Parameters
    ----------
    xn, yn : array-like
        Normalised coordinates (dimensionless).
    terms : sequence of str
        Monomial names, e.g. ``["1", "x", "y", "x2", "xy", "y2"]``.

    Returns
    -------
    ndarray
        Shape ``(len(terms),) + broadcast shape of xn, yn``.
    """
    xn, yn = np.broadcast_arrays(np.asarray(xn, float), np.asarray(yn, float))
    return np.stack([xn ** _TERM_POWERS[t][0] * yn ** _TERM_POWERS[t][1] for t in terms])


@dataclass(frozen=True)
class SpotGeometry:
    """Position-dependent offsets of each channel's spot from the pattern centre.

    The pattern centre is the mean of the spot positions. Each channel's offset
    ``(dx, dy)`` in pixels is a polynomial in ``xn = (x - center[0]) / scale`` and
    ``yn = (y - center[1]) / scale`` evaluated at the pattern centre.

    Parameters
    ----------
    channels : tuple of str
        Channel names, in profile order.
    terms : tuple of str
        Monomial names of the polynomials.
    coeffs : ndarray
        Shape ``(n_channels, 2, n_terms)``: for each channel, the dx and dy coefficients.
    center : tuple of float
        Normalisation centre (px).
    scale : float
        Normalisation scale (px).
    """

    channels: tuple[str, ...]
    terms: tuple[str, ...]
    coeffs: np.ndarray
    center: tuple[float, float] = (1024.0, 1024.0)
    scale: float = 1024.0

    def __post_init__(self):
        coeffs = np.asarray(self.coeffs, dtype=float)
        coeffs.setflags(write=False)
        object.__setattr__(self, "coeffs", coeffs)

    def _basis(self, x, y) -> np.ndarray:
        xn = (np.asarray(x, float) - self.center[0]) / self.scale
        yn = (np.asarray(y, float) - self.center[1]) / self.scale
        return polynomial_terms(xn, yn, self.terms)

    def offset_array(self, x, y) -> np.ndarray:
        """Offsets of every channel at pattern centres ``(x, y)``.

        Returns
        -------
        ndarray
            Shape ``(n_channels, 2) + shape of x``: ``[channel, (dx, dy), ...]`` in px.
        """
        return np.tensordot(self.coeffs, self._basis(x, y), axes=([2], [0]))

    def spot_positions(self, x, y) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Predicted spot positions of patterns centred at ``(x, y)``.

        Parameters
        ----------
        x, y : array-like
            Pattern centres (px), any shape.

        Returns
        -------
        dict
            ``{channel: (x_spot, y_spot)}`` with arrays shaped like ``x``.
        """
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        off = self.offset_array(x, y)
        return {ch: (x + off[i, 0], y + off[i, 1]) for i, ch in enumerate(self.channels)}

    def pattern_center(self, channel: str, x_spot, y_spot, n_iter: int = 4):
        """Invert the model: the pattern centre implied by one spot of a channel.

        Parameters
        ----------
        channel : str
            The channel the spot is assumed to belong to.
        x_spot, y_spot : array-like
            Spot positions (px).
        n_iter : int
            Fixed-point iterations (offsets vary slowly, 3-4 suffice).

        Returns
        -------
        x, y : ndarray
            Pattern centres (px).
        """
        i = self.channels.index(channel)
        xs = np.asarray(x_spot, float)
        ys = np.asarray(y_spot, float)
        xc, yc = xs.copy(), ys.copy()
        for _ in range(n_iter):
            off = np.tensordot(self.coeffs[i], self._basis(xc, yc), axes=([1], [0]))
            xc, yc = xs - off[0], ys - off[1]
        return xc, yc

    def shifted(self, shifts: Mapping[str, tuple[float, float]]) -> SpotGeometry:
        """A copy with constant ``(dx, dy)`` px added to some channels' offsets."""
        coeffs = self.coeffs.copy()
        i1 = self.terms.index("1")
        for ch, (dx, dy) in shifts.items():
            i = self.channels.index(ch)
            coeffs[i, 0, i1] += dx
            coeffs[i, 1, i1] += dy
        return dataclasses.replace(self, coeffs=coeffs)

    def with_coeffs(self, coeffs: np.ndarray) -> SpotGeometry:
        """A copy with new coefficients of the same shape."""
        coeffs = np.asarray(coeffs, float)
        if coeffs.shape != self.coeffs.shape:
            raise ValueError(f"coefficients must have shape {self.coeffs.shape}, got {coeffs.shape}")
        return dataclasses.replace(self, coeffs=coeffs)

    def design_matrix(self, x, y) -> np.ndarray:
        """Polynomial basis at ``(x, y)``, shape ``(n, n_terms)``, for least-squares fits."""
        return self._basis(np.ravel(x), np.ravel(y)).T


@dataclass(frozen=True)
class MaskShape:
    """One element of the focal-plane mask model (see the profile format docs)."""

    kind: str
    transmission: float
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstrumentProfile:
    """An imaging polarimeter described as data.

    Use :func:`load_profile` to build one from a TOML file; the attributes mirror the
    file's tables. All lengths are in pixels, angles in degrees.

    Attributes
    ----------
    name : str
        Instrument name.
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    gain : float
        Detector gain (e-/ADU).
    read_noise : float
        Read noise (e-).
    bias : float
        Bias level (ADU).
    saturation : float
        Level above bias (ADU) where the detector stops being linear.
    fwhm : float
        Default stellar FWHM (px).
    channels : tuple of str
        Channel names.
    channel_angles : dict
        Analyser angle (deg) of each channel; exactly 0, 45, 90 and 135 must appear.
    geometry : SpotGeometry
        Spot offsets as functions of position.
    mask_shapes : tuple of MaskShape
        Focal-plane mask model.
    target : tuple of float or None
        Position of the target's pattern centre, if the instrument has one.
    border : float
        Width of the unusable frame border.
    exclude : tuple
        Polygons (lists of ``(x, y)`` vertices) excluded from field-star measurements.
    angle_zero : float
        Instrumental angle zero point (deg).
    q_inst, u_inst : ndarray
        Instrumental polarization polynomials (same terms as the geometry).
    source : str
        Where the profile came from.
    """

    name: str
    shape: tuple[int, int]
    gain: float
    read_noise: float
    bias: float
    saturation: float
    fwhm: float
    channels: tuple[str, ...]
    channel_angles: Mapping[str, float]
    geometry: SpotGeometry
    mask_shapes: tuple[MaskShape, ...] = ()
    target: tuple[float, float] | None = None
    border: float = 0.0
    vignetting_radius: float | None = None
    exclude: tuple = ()
    angle_zero: float = 0.0
    q_inst: np.ndarray = field(default_factory=lambda: np.zeros(1))
    u_inst: np.ndarray = field(default_factory=lambda: np.zeros(1))
    fwhm_range: tuple[float, float] = (3.5, 5.5)
    pixel_scale: float | None = None
    default_exptime: float = 1.0
    frame_shift_max: float = 6.0
    match_tolerance: float = 3.0
    telescope: str = ""
    description: str = ""
    source: str = ""
    # Transmission maps already computed, by shape: detection, photometry and the orphan
    # cue all need the frame's map. Not an init field, so replace() starts a fresh cache.
    _maps: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- channels -------------------------------------------------------------------
    def channel_at_angle(self, angle: float) -> str:
        """Name of the channel whose analyser angle is ``angle`` degrees."""
        for ch, a in self.channel_angles.items():
            if math.isclose(a % 180.0, angle % 180.0):
                return ch
        raise KeyError(f"profile {self.name!r} has no channel at {angle} deg")

    @property
    def q_channels(self) -> tuple[str, str]:
        """The (0 deg, 90 deg) channels: q = (F0 - F90) / (F0 + F90)."""
        return self.channel_at_angle(0.0), self.channel_at_angle(90.0)

    @property
    def u_channels(self) -> tuple[str, str]:
        """The (45 deg, 135 deg) channels: u = (F45 - F135) / (F45 + F135)."""
        return self.channel_at_angle(45.0), self.channel_at_angle(135.0)

    def partner_pair(self, channel: str) -> tuple[str, str]:
        """The analyser pair (q or u) that does *not* contain ``channel``."""
        q, u = self.q_channels, self.u_channels
        return u if channel in q else q

    # -- geometry ------------------------------------------------------------------
    def spot_positions(self, x, y) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Predicted spot positions of patterns centred at ``(x, y)`` (see `SpotGeometry`)."""
        return self.geometry.spot_positions(x, y)

    # -- mask and usable region ----------------------------------------------------
    def transmission(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Sky transmission of the focal-plane mask, 1 = open sky.

        Parameters
        ----------
        shape : tuple of int, optional
            Image shape ``(ny, nx)``; the detector shape by default.

        Returns
        -------
        ndarray
            Read-only float32 array of ``shape`` with values in (0, 1], computed once
            per shape and profile.
        """
        ny, nx = shape if shape is not None else self.shape
        if (ny, nx) in self._maps:
            return self._maps[(ny, nx)]
        yy = np.arange(ny, dtype=np.float32)[:, None]
        xx = np.arange(nx, dtype=np.float32)[None, :]
        trans = np.ones((ny, nx), dtype=np.float32)
        for s in self.mask_shapes:
            inside = self._inside(s, xx, yy, (ny, nx))
            np.minimum(trans, np.where(inside, np.float32(s.transmission), np.float32(1.0)), out=trans)
        trans.setflags(write=False)  # shared by every caller
        self._maps[(ny, nx)] = trans
        return trans

    def _inside(self, s: MaskShape, xx, yy, shape) -> np.ndarray:
        p = s.params
        if s.kind == "circle":
            cx, cy = p["center"]
            return (xx - cx) ** 2 + (yy - cy) ** 2 <= p["radius"] ** 2
        if s.kind == "rect":
            (cx, cy), (w, h) = p["center"], p["size"]
            return (np.abs(xx - cx) <= w / 2) & (np.abs(yy - cy) <= h / 2)
        if s.kind == "hband":
            return np.broadcast_to(np.abs(yy - p["y"]) <= p["width"] / 2, shape)
        if s.kind == "vband":
            return np.broadcast_to(np.abs(xx - p["x"]) <= p["width"] / 2, shape)
        if s.kind == "polygon":
            return _points_in_polygon(xx, yy, np.asarray(p["vertices"], float))
        if s.kind == "target_spots":
            if self.target is None:
                return np.zeros(shape, bool)
            half = p["size"] / 2
            inside = np.zeros(shape, bool)
            for sx, sy in self.spot_positions(*self.target).values():
                inside |= (np.abs(xx - sx) <= half) & (np.abs(yy - sy) <= half)
            return inside
        raise ProfileError(f"unknown mask shape kind {s.kind!r}")  # guarded by validation

    def usable(self, x, y, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Whether positions lie in the usable region (inside the border, outside exclusions).

        Parameters
        ----------
        x, y : array-like
            Positions (px).
        shape : tuple of int, optional
            Image shape ``(ny, nx)``; the detector shape by default.
        """
        ny, nx = shape if shape is not None else self.shape
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        b = self.border
        ok = (x >= b) & (x <= nx - 1 - b) & (y >= b) & (y <= ny - 1 - b)
        for poly in self.exclude:
            ok &= ~_points_in_polygon(x, y, np.asarray(poly, float))
        return ok

    # -- calibration ---------------------------------------------------------------
    def instrumental_qu(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Instrumental (q, u) at pattern centres ``(x, y)`` from the calibration maps."""
        basis = self.geometry._basis(x, y)
        terms = len(self.geometry.terms)
        q = np.tensordot(np.resize(self.q_inst, terms) * (np.arange(terms) < len(self.q_inst)), basis, 1)
        u = np.tensordot(np.resize(self.u_inst, terms) * (np.arange(terms) < len(self.u_inst)), basis, 1)
        return q, u

    def for_region(self, x0: float, y0: float, shape: tuple[int, int] | None = None) -> InstrumentProfile:
        """The profile in the coordinates of a detector region (a windowed or cut frame).

        Parameters
        ----------
        x0, y0 : float
            Detector position (px) of the region's pixel (0, 0); FITS ``LTV1 = -x0``.
        shape : tuple of int, optional
            The region's shape ``(ny, nx)``.

        Returns
        -------
        InstrumentProfile
            Geometry, mask, exclusions and target shifted by ``(-x0, -y0)``.
        """
        if x0 == 0 and y0 == 0 and (shape is None or tuple(shape) == self.shape):
            return self
        dx, dy = float(x0), float(y0)

        def move(params: Mapping[str, Any]) -> dict:
            out = dict(params)
            if "center" in out:
                out["center"] = [out["center"][0] - dx, out["center"][1] - dy]
            if "x" in out:
                out["x"] = out["x"] - dx
            if "y" in out:
                out["y"] = out["y"] - dy
            if "vertices" in out:
                out["vertices"] = [[vx - dx, vy - dy] for vx, vy in out["vertices"]]
            return out

        geometry = dataclasses.replace(
            self.geometry, center=(self.geometry.center[0] - dx, self.geometry.center[1] - dy))
        return dataclasses.replace(
            self,
            shape=tuple(shape) if shape is not None else self.shape,
            geometry=geometry,
            mask_shapes=tuple(dataclasses.replace(m, params=move(m.params)) for m in self.mask_shapes),
            target=None if self.target is None else (self.target[0] - dx, self.target[1] - dy),
            exclude=tuple([[vx - dx, vy - dy] for vx, vy in poly] for poly in self.exclude),
        )

    def replace(self, **changes) -> InstrumentProfile:
        """A copy with some attributes changed (profiles are immutable)."""
        return dataclasses.replace(self, **changes)


def _points_in_polygon(x, y, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (x, y broadcast against each other)."""
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    inside = np.zeros(x.shape, dtype=bool)
    xv, yv = vertices[:, 0], vertices[:, 1]
    xv2, yv2 = np.roll(xv, -1), np.roll(yv, -1)
    for x1, y1, x2, y2 in zip(xv, yv, xv2, yv2):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


# ---------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------
def available_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    files = resources.files("robopol_clean") / "profiles"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load_profile(profile: str | Path | InstrumentProfile = "robopol") -> InstrumentProfile:
    """Load and validate an instrument profile.

    Parameters
    ----------
    profile : str, path or InstrumentProfile
        A shipped profile name (``"robopol"``), a path to a TOML file, or a profile
        (returned unchanged).

    Returns
    -------
    InstrumentProfile

    Raises
    ------
    ProfileError
        If the file is missing, not TOML, or its content is inconsistent; the message
        names the file and the offending key.
    """
    if isinstance(profile, InstrumentProfile):
        return profile
    path = Path(profile)
    if path.suffix != ".toml" and not path.exists():
        res = resources.files("robopol_clean") / "profiles" / f"{profile}.toml"
        if not res.is_file():
            raise ProfileError(
                f"{profile}: no such profile file, and not one of the shipped profiles "
                f"({', '.join(available_profiles())})"
            )
        text, source = res.read_text(encoding="utf-8"), f"{profile} (shipped)"
    else:
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read profile ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ProfileError(f"{path}: not a text (TOML) file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML ({exc})") from None
    return profile_from_dict(data, source=source)


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> InstrumentProfile:
    """Build and validate a profile from the parsed content of a profile file."""
    v = _Validator(data, source)
    name = v.get("instrument.name", str)
    shape = v.get("detector.shape", list)
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        v.fail("detector.shape", "must be two positive integers (ny, nx)")
    gain = v.positive("detector.gain")
    read_noise = v.positive("detector.read_noise", allow_zero=True)
    bias = v.number("detector.bias", default=0.0)
    saturation = v.positive("detector.saturation")
    fwhm = v.positive("psf.fwhm")
    fwhm_range = tuple(v.get("psf.fwhm_range", list, default=[0.8 * fwhm, 1.3 * fwhm]))

    channels = tuple(v.get("channels.names", list))
    if len(channels) < 4 or len(set(channels)) != len(channels):
        v.fail("channels.names", "must list at least four distinct channel names")
    angles_raw = v.get("channels.angle", dict)
    angles = {}
    for ch in channels:
        if ch not in angles_raw:
            v.fail(f"channels.angle.{ch}", "missing analyser angle for this channel")
        angles[ch] = v.number(f"channels.angle.{ch}")
    for need in (0.0, 45.0, 90.0, 135.0):
        if sum(math.isclose(a % 180, need) for a in angles.values()) != 1:
            v.fail("channels.angle", f"exactly one channel must have analyser angle {need:g} deg")

    terms = tuple(v.get("geometry.terms", list))
    unknown = [t for t in terms if t not in _TERM_POWERS]
    if unknown or "1" not in terms:
        v.fail("geometry.terms", f"terms must include '1' and come from {sorted(_TERM_POWERS)}")
    coeffs = np.zeros((len(channels), 2, len(terms)))
    for i, ch in enumerate(channels):
        for j, comp in enumerate(("dx", "dy")):
            key = f"geometry.offsets.{ch}.{comp}"
            c = v.get(key, list)
            if len(c) != len(terms) or not all(isinstance(a, (int, float)) for a in c):
                v.fail(key, f"must be {len(terms)} numbers, one per term")
            coeffs[i, j] = c
    if not np.allclose(coeffs[:, :, terms.index("1")].mean(axis=0), 0.0, atol=1.0):
        v.fail("geometry.offsets", "constant offsets must average to ~0 (the centre is the spot mean)")
    center = v.get("geometry.center", list, default=[shape[1] / 2, shape[0] / 2])
    scale = v.positive("geometry.scale", default=max(shape) / 2)
    geometry = SpotGeometry(channels, terms, coeffs, (float(center[0]), float(center[1])), float(scale))

    shapes = []
    for k, s in enumerate(v.get("mask.shapes", list, default=[])):
        where = f"mask.shapes[{k}]"
        if not isinstance(s, dict) or s.get("kind") not in _MASK_KINDS:
            v.fail(f"{where}.kind", f"must be one of {sorted(_MASK_KINDS)}")
        missing = [p for p in _MASK_KINDS[s["kind"]] if p not in s]
        if missing:
            v.fail(where, f"a {s['kind']} needs {', '.join(missing)}")
        t = s.get("transmission")
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            v.fail(f"{where}.transmission", "must be a number in [0, 1]")
        params = {p: s[p] for p in _MASK_KINDS[s["kind"]]}
        shapes.append(MaskShape(s["kind"], float(t), params))
    target = v.get("mask.target", list, default=None)

    exclude = tuple(v.get("usable.exclude", list, default=[]))
    for k, poly in enumerate(exclude):
        if len(poly) < 3 or not all(len(p) == 2 for p in poly):
            v.fail(f"usable.exclude[{k}]", "a polygon needs at least three [x, y] vertices")

    q_inst = np.asarray(v.get("calibration.q_inst", list, default=[0.0]), float)
    u_inst = np.asarray(v.get("calibration.u_inst", list, default=[0.0]), float)
    for key, arr in (("calibration.q_inst", q_inst), ("calibration.u_inst", u_inst)):
        if len(arr) > len(terms):
            v.fail(key, f"at most {len(terms)} coefficients (the geometry terms)")

    return InstrumentProfile(
        name=name,
        shape=(shape[0], shape[1]),
        gain=gain,
        read_noise=read_noise,
        bias=bias,
        saturation=saturation,
        fwhm=fwhm,
        fwhm_range=(float(fwhm_range[0]), float(fwhm_range[1])),
        channels=channels,
        channel_angles=angles,
        geometry=geometry,
        mask_shapes=tuple(shapes),
        target=None if target is None else (float(target[0]), float(target[1])),
        border=v.number("usable.border", default=0.0),
        vignetting_radius=v.get("usable.vignetting_radius", (int, float), default=None),
        exclude=exclude,
        angle_zero=v.number("calibration.angle_zero", default=0.0),
        q_inst=q_inst,
        u_inst=u_inst,
        pixel_scale=v.get("detector.pixel_scale", (int, float), default=None),
        default_exptime=v.positive("detector.default_exptime", default=1.0),
        frame_shift_max=v.positive("geometry.frame_shift_max", default=6.0),
        match_tolerance=v.positive("geometry.match_tolerance", default=3.0),
        telescope=v.get("instrument.telescope", str, default=""),
        description=v.get("instrument.description", str, default=""),
        source=source,
    )


class _Validator:
    """Dotted-key access into parsed TOML with errors naming the file and key."""

    _MISSING = object()

    def __init__(self, data: Mapping[str, Any], source: str):
        self.data = data
        self.source = source

    def fail(self, key: str, problem: str):
        raise ProfileError(f"{self.source}: [{key}] {problem}")

    def get(self, key: str, kind, default=_MISSING):
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is self._MISSING:
                    self.fail(key, "is required but missing")
                return default
            node = node[part]
        if not isinstance(node, kind) or isinstance(node, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(key, f"must be of type {names}, got {type(node).__name__}")
        return node

    def number(self, key: str, default=_MISSING) -> float:
        return float(self.get(key, (int, float), default))

    def positive(self, key: str, default=_MISSING, allow_zero: bool = False) -> float:
        value = self.number(key, default)
        if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
            self.fail(key, f"must be {'non-negative' if allow_zero else 'positive'}, got {value}")
        return value
