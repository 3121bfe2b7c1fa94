"""robopol-clean: artifact-aware reduction for four-channel imaging polarimeters.

The public API is short: :func:`reduce_frame` (one frame, every catalogue),
:func:`clean_artifacts` (the same as a ccdproc-style step), :func:`load_profile`
(instrument profiles) and :func:`simulate_frame` (realistic test frames).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("robopol-clean")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0.dev0"

from .instrument import InstrumentProfile, ProfileError, load_profile  # noqa: E402
from .pipeline import FrameResult, clean_artifacts, reduce_frame  # noqa: E402
from .simulate import simulate_frame  # noqa: E402

__all__ = ["__version__", "InstrumentProfile", "ProfileError", "load_profile", "FrameResult",
           "reduce_frame", "clean_artifacts", "simulate_frame"]
