"""robopol-clean: artifact-aware reduction for four-channel imaging polarimeters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("robopol-clean")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0.dev0"

from .instrument import InstrumentProfile, ProfileError, load_profile

__all__ = ["__version__", "InstrumentProfile", "ProfileError", "load_profile"]
