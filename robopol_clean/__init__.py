"""robopol-clean: artifact-aware reduction for four-channel imaging polarimeters.

The public API is short: :func:`reduce_frame` (one frame, every catalogue),
:func:`clean_artifacts` (the same as a ccdproc-style step), :func:`load_profile`
(instrument profiles) and :func:`simulate_frame` (realistic test frames).

They are imported on first use (PEP 562), so ``import robopol_clean`` and the command
line's argument checks stay fast.
"""

from importlib import import_module

from ._version_info import __version__

__all__ = ["__version__", "InstrumentProfile", "ProfileError", "load_profile", "FrameResult",
           "reduce_frame", "clean_artifacts", "simulate_frame"]

_LAZY = {
    "InstrumentProfile": "instrument", "ProfileError": "instrument", "load_profile": "instrument",
    "FrameResult": "pipeline", "reduce_frame": "pipeline", "clean_artifacts": "pipeline",
    "simulate_frame": "simulate",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
