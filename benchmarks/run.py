"""robopol-clean side by side with what astronomers would use instead.

    python benchmarks/run.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick    # short version (a few minutes)
    python benchmarks/run.py --quick --only stages,baselines

Sections (``--only`` takes their keys, comma-separated):

  maximask   the learned peer MaxiMask (own venv: bash benchmarks/setup_maximask.sh)
  baselines  morphology, DAOStarFinder cuts, random forest vs the CNN on held-out spots
  cnn_cost   3-conv vs 4-conv network: AUC, parameters, training time, throughput vs GEMM
  stokes     q/u accuracy with and without artifact cleaning
  crowding   Stokes completeness and pulls across crowding and seeing, per photometry method
  psf        PSF photometry vs photutils PSFPhotometry and apertures on crowded star fields
  stages     time per pipeline stage for one 2048 x 2048 frame with ~800 stars

Prints one table per section. A full run of every section also writes the same results
to ``benchmarks/results/latest.json`` and ``docs/performance_table.rst`` (reST, for the
documentation's performance page), each with the machine description and the exact
command. A quick or partial run never touches those committed files: it writes only
where ``--json`` / ``--rst`` say. Everything is simulated with fixed seeds: rerunning the command reproduces
the accuracy numbers; timings depend on the machine and its load (the load average is
recorded).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    REPO,
    Context,
    Section,
    command_line,
    log,
    machine_description,
    output_paths,
    render_rst,
    render_text,
)

#: The committed results: written by a full run of every section, and only by one.
COMMITTED_JSON = (HERE / "results" / "latest.json").resolve()
COMMITTED_RST = (REPO / "docs" / "performance_table.rst").resolve()

#: Section key -> module, in report order.
SECTIONS = {
    "maximask": "bench_maximask",
    "baselines": "bench_baselines",
    "cnn_cost": "bench_cnn_cost",
    "stokes": "bench_stokes",
    "crowding": "bench_crowding",
    "psf": "bench_psf",
    "stages": "bench_stages",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true", help="short version (small frames, few seeds)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help=f"where to write the JSON results (full run of every section: "
                             f"default {COMMITTED_JSON.relative_to(REPO)}; otherwise not written "
                             f"unless given)")
    parser.add_argument("--rst", default=None, metavar="PATH",
                        help=f"where to write the reST tables (full run of every section: default "
                             f"{COMMITTED_RST.relative_to(REPO)}; otherwise not written unless given)")
    args = parser.parse_args(argv)

    keys = [k.strip() for k in args.only.split(",") if k.strip()] or list(SECTIONS)
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    keys = [k for k in SECTIONS if k in keys]
    complete = not args.quick and keys == list(SECTIONS)
    output_paths(parser, args, {"json": COMMITTED_JSON, "rst": COMMITTED_RST}, complete,
                 "a full run of every section")

    t0 = time.perf_counter()
    machine = machine_description()
    ctx = Context(quick=args.quick)
    ctx.cache["sections"] = tuple(keys)
    sections: list[Section] = []
    failed = False
    for key in keys:
        log(f"section {key} ({'quick' if args.quick else 'full'})")
        mod = importlib.import_module(SECTIONS[key])
        t1 = time.perf_counter()
        try:
            sec = mod.run(ctx)
        except Exception as exc:  # noqa: BLE001 -- one broken section must not hide the others
            failed = True
            traceback.print_exc()
            sec = Section(key, getattr(mod, "TITLE", key), status="failed",
                          notes=[f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                 if str(exc) else f"FAILED: {type(exc).__name__}"])
        sec.seconds = time.perf_counter() - t1
        sections.append(sec)
        log(f"section {key} done in {sec.seconds:.0f} s [{sec.status}]")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine["loadavg_end"] = None if load is None else [round(v, 2) for v in load]
    header = {"mode": "quick" if args.quick else "full", "command": command_line(argv),
              "machine": machine, "seconds": time.perf_counter() - t0}
    text = render_text(sections, header)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**header, "sections": [s.to_json() for s in sections]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
        log(f"wrote {path}")
    if args.rst:
        path = Path(args.rst)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(render_rst(sections, header))
        os.replace(tmp, path)
        log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
