"""Regenerate the documentation figures from simulated data.

Usage (from the repository root)::

    python docs/scripts/make_figures.py [--outdir docs/_static]

Writes

* ``tutorial_frame.png``: the second frame of the tutorial's simulated night after the
  ccdproc chain of ``docs/tutorial.rst`` (bias subtracted, reduced with the morphology
  classifier), drawn by :func:`robopol_clean.plots.plot_frame_diagnostic`;
* ``demo.png``: the diagnostic picture of ``robopol-clean demo`` (the same code path,
  :func:`robopol_clean.demo.run_demo`, with its default seed and the shipped network).

Everything is simulated with fixed seeds, so the figures are reproducible. The
realism figures come from ``docs/scripts/realism_check.py`` (it needs the real frame).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["tutorial_night", "make_tutorial_figure", "make_demo_figure", "main"]

STATIC = Path(__file__).resolve().parents[1] / "_static"


def tutorial_night(seeds=(1, 2, 3)):
    """The tutorial's night: small simulated frames with the bias level left in."""
    from robopol_clean.simulate import simulate_frame

    return [simulate_frame("robopol", seed=s, shape=(512, 512), n_stars=30, include_bias=True)
            for s in seeds]


def make_tutorial_figure(outdir: Path) -> Path:
    """The tutorial frame with clean patterns and rejected spots marked."""
    import ccdproc
    import matplotlib.pyplot as plt
    from astropy.nddata import CCDData

    from robopol_clean.pipeline import reduce_frame
    from robopol_clean.plots import plot_frame_diagnostic

    raw = tutorial_night()[1].ccd
    master_bias = CCDData(np.full(raw.shape, raw.header["BIAS"], np.float32), unit="adu")
    ccd = ccdproc.subtract_bias(raw, master_bias)
    result = reduce_frame(ccd, classifier="morphology", name="night_1")
    path = outdir / "tutorial_frame.png"
    fig = plot_frame_diagnostic(result)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def make_demo_figure(outdir: Path) -> Path:
    """``robopol-clean demo``'s diagnostic picture, copied to ``demo.png``."""
    from robopol_clean.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        print(run_demo(Path(tmp) / "demo"))
        path = outdir / "demo.png"
        shutil.copyfile(Path(tmp) / "demo" / "demo_input_diagnostic.png", path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", type=Path, default=STATIC)
    args = ap.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for make in (make_tutorial_figure, make_demo_figure):
        print("wrote", make(args.outdir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
