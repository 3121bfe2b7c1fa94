"""What the default classifier rejects on the real RoboPol frame J1428 (hand-labelled).

    python docs/scripts/real_frame.py [--shared ../shared/data] [--out docs/_static]

Needs the read-only reference folder beside the checkout (``../shared/data``), which
users and wheels do not have: without it the script says so and exits 0. Prints the
per-label outcome, writes ``real_frame_rejected.png`` and the numbers to
``benchmarks/results/real_frame.json`` (``--json``; the README's J1428 row is generated
from it by ``docs/scripts/results_tables.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "_static"))
    parser.add_argument("--classifier", default="cnn", choices=["cnn", "morphology"])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_frame.json"),
                        help="where to write the numbers (default: %(default)s)")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    if not (shared / "J1428.fits").exists():
        print(f"{shared}: the real frame is not available; nothing to do")
        return 0

    from astropy.table import Table
    from scipy.spatial import cKDTree

    from robopol_clean.instrument import load_profile
    from robopol_clean.io import read_frame
    from robopol_clean.pipeline import added_by_photometry, reduce_frame
    from robopol_clean.plots import plot_frame_diagnostic

    profile = load_profile("robopol")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rendering has no EXPTIME; expected
        ccd = read_frame(shared / "J1428.fits", profile)
    result = reduce_frame(ccd, profile=profile, classifier=args.classifier, name="J1428.fits")
    spots, mask = result.spots[~added_by_photometry(result.spots)], result.artifact_mask
    artifacts = Table.read(shared / "J1428_artifacts.ecsv")
    quads = Table.read(shared / "J1428_quads.ecsv")

    masked = mask[np.round(artifacts["y"]).astype(int), np.round(artifacts["x"]).astype(int)]
    numbers = {"frame": "J1428", "classifier": args.classifier, "n_spots": len(spots),
               "n_rejected": int(spots["rejected"].sum()), "n_uncertain": int(spots["uncertain"].sum()),
               "n_stokes": len(result.stokes), "n_clean": int(result.meta["n_clean"]),
               "artifacts": {}}
    print(f"J1428 ({args.classifier}): {len(spots)} spots, {int(spots['rejected'].sum())} rejected, "
          f"{int(spots['uncertain'].sum())} uncertain, {len(result.stokes)} quadruplets with q, u "
          f"({result.meta['n_clean']} with flags == 0)")
    for kind in ("streak", "cosmic_ray"):
        for conf in ("high", "low"):
            sel = (artifacts["kind"] == kind) & (artifacts["confidence"] == conf)
            if sel.any():
                numbers["artifacts"][f"{kind} ({conf})"] = [int(masked[sel].sum()), int(sel.sum())]
                print(f"  labelled {kind} ({conf} confidence): {int(masked[sel].sum())} of {int(sel.sum())} masked")
    tree = cKDTree(np.column_stack([spots["x"], spots["y"]]))
    star_xy = np.concatenate([np.column_stack([quads[f"x_{c}"], quads[f"y_{c}"]])
                              for c in profile.channels])
    dist, idx = tree.query(star_xy)
    found = dist < 3
    numbers.update(star_spots_labelled=len(star_xy), star_spots_detected=int(found.sum()),
                   star_spots_rejected=int(np.asarray(spots["rejected"])[idx[found]].sum()))
    print(f"  labelled star spots detected: {int(found.sum())} of {len(star_xy)}; "
          f"rejected: {int(np.asarray(spots['rejected'])[idx[found]].sum())}")
    groups = result.groups[result.groups["complete"]]
    gd, _ = cKDTree(np.column_stack([groups["x"], groups["y"]])).query(
        np.column_stack([quads["x"], quads["y"]]))
    numbers.update(quadruplets_labelled=len(quads), quadruplets_grouped=int((gd < 3).sum()))
    print(f"  labelled quadruplets found as complete groups: {int((gd < 3).sum())} of {len(quads)} "
          f"({int(quads['peak_sat'].sum())} have clipped spots: their rows are flagged saturated)")

    fig = plot_frame_diagnostic(result, n_zoom=0, dpi=70, title=(
        f"J1428 (real, 8-bit rendering): {int(spots['rejected'].sum())} rejected; labelled "
        "artifacts in cyan squares"))
    ax = fig.axes[0]
    ax.plot(artifacts["x"], artifacts["y"], "s", mfc="none", mec="cyan", ms=14, mew=1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "real_frame_rejected.png", bbox_inches="tight", dpi=70)
    print(f"  figure: {out / 'real_frame_rejected.png'}")
    Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")
    print(f"  numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
