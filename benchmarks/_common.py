"""Shared pieces of the benchmarks: result sections, rendering, machine description
and small statistics. (Detections are labelled from the truth by the package's
:func:`robopol_clean.datasets.match_detections`.)

Nothing here is part of the robopol-clean package; the benchmarks import the package
like any user would.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Before TensorFlow or matplotlib load (the scripts import this module first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "agg")

from robopol_clean.classify.cnn import _jsonable  # noqa: E402  # the package's strict-JSON conversion

__all__ = ["REPO", "Section", "Context", "machine_description", "render_text", "render_rst",
           "roc_auc", "recall_at_frr", "fmt", "log", "Timer",
           "seeds_text", "plural", "rst_preamble",
           "cnn_model_path", "load_default_classifier"]

REPO = Path(__file__).resolve().parents[1]


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run, as printed into the results."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in argv])

#: Truth kinds that are reflection artifacts (what robopol-clean is for).
REFLECTION_KINDS = ("streak", "ghost")


def log(msg: str) -> None:
    """Progress message on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timer:
    """``with Timer() as t: ...; t.s`` -> wall seconds."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        return False


@dataclass
class Section:
    """One benchmark's result: a small table plus notes and the raw numbers."""

    key: str
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"          # ok | skipped | failed
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "status": self.status,
                "seconds": round(self.seconds, 2), "columns": self.columns, "rows": self.rows,
                "notes": self.notes, "data": _jsonable(self.data)}


@dataclass
class Context:
    """What the sections share within one run (settings and expensive caches)."""

    quick: bool
    cache: dict[str, Any] = field(default_factory=dict)


def seeds_text(seeds) -> str:
    """'seed 5' or 'seeds 5-9'."""
    seeds = list(seeds)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt(value, digits: int = 3) -> str:
    """Compact cell text: '-' for missing, fixed digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


# ---------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------
def output_paths(parser, args, committed: dict[str, Path], complete: bool, what: str) -> None:
    """Resolve ``--json``/``--rst``-style options: where results go.

    A run that ``complete``-ly reproduces the committed results writes them by default;
    any other run writes nothing unless its options say where, and may never name a
    committed file. ``committed`` maps option names (attributes of ``args``) to the
    committed paths; ``what`` names the full run in the error message.
    """
    for option, path in committed.items():
        given = getattr(args, option)
        if given is None:
            setattr(args, option, str(path) if complete else "")
        elif given and not complete and Path(given).resolve() == path:
            parser.error(f"--{option} {given}: only {what} writes the committed results; "
                         f"give another path")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _dist_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and library versions, load average now."""
    import astropy
    import photutils

    import robopol_clean

    versions = {"robopol_clean": robopol_clean.__version__,
                "robopol_clean_commit": robopol_clean._version_info.__commit__, "numpy": np.__version__,
                "astropy": astropy.__version__, "photutils": photutils.__version__,
                "tensorflow": _dist_version("tensorflow-cpu", "tensorflow"),
                "keras": _dist_version("keras"), "scikit-learn": _dist_version("scikit-learn")}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": None if load is None else [round(v, 2) for v in load],
        "git": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_line(m: dict) -> str:
    v = m["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    load, end = m.get("loadavg_start"), m.get("loadavg_end")
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}, "
            f"Python {m['python']}; {libs}"
            + (f"; 1-min load average {load[0]:.2f} at start" if load else "")
            + (f", {end[0]:.2f} at end" if end else ""))


# ---------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------
def _text_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
              for i, c in enumerate(columns)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths)), line]
    for r in rows:
        out.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                             for i, (v, w) in enumerate(zip(r, widths))))
    return out


def render_text(sections: list[Section], header: dict) -> str:
    """The plain-text report printed to the terminal."""
    lines = [f"robopol-clean benchmarks ({header['mode']})",
             f"command: {header['command']}",
             f"machine: {machine_line(header['machine'])}",
             f"date: {header['machine']['date']}; git {header['machine'].get('git')}; "
             f"total {header['seconds']:.0f} s", ""]
    for i, s in enumerate(sections, 1):
        lines.append(f"{i}. {s.title}  [{s.status}, {s.seconds:.0f} s]")
        if s.columns:
            lines.extend("   " + x for x in _text_table(s.columns, s.rows))
        for n in s.notes:
            lines.append(f"   * {n}")
        lines.append("")
    return "\n".join(lines)


def _rst_escape(text: str) -> str:
    text = str(text)
    for ch in ("\\", "*", "`", "|", "_"):
        text = text.replace(ch, "\\" + ch)
    return text or "\\ "


def rst_preamble(script: str, anchor: str, measured: str, machine: dict, command: str) -> list[str]:
    """Opening lines of a generated reST table file: orphan marker, provenance comment,
    the include anchor, when/where it was measured and the command that regenerates it."""
    return [":orphan:", "",
            f".. Generated by {script} -- do not edit; rerun the command below.", "",
            f".. {anchor}", "", measured, "",
            f"Machine: {_rst_escape(machine_line(machine))}.", "",
            "Command::", "", f"    {command}", ""]


def render_rst(sections: list[Section], header: dict) -> str:
    """reST fragment (list-tables) for the documentation's performance page.

    The file starts with ``:orphan:`` so Sphinx builds cleanly even where no page
    includes it; a page includes the body with
    ``.. include:: performance_table.rst`` and ``:start-after: performance-table-start``.
    """
    m = header["machine"]
    out = rst_preamble("benchmarks/run.py", "performance-table-start",
                       f"Measured {m['date']} ({header['mode']} run, git {m.get('git')}), "
                       f"total {header['seconds']:.0f} s.", m, header["command"])
    for i, s in enumerate(sections, 1):
        title = f"{i}. {s.title}"
        out += [_rst_escape(title), "~" * len(_rst_escape(title)), ""]
        if s.columns:
            out += [".. list-table::", "   :header-rows: 1", ""]
            for row in [s.columns] + s.rows:
                out.append(f"   * - {_rst_escape(row[0])}")
                out.extend(f"     - {_rst_escape(v)}" for v in row[1:])
            out.append("")
        for n in s.notes:
            out.append(f"- {_rst_escape(n)}")
        if s.notes:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------
def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's); NaN for one class.

    Scored on ranks, which leave the AUC unchanged and let infinite scores through.
    """
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, rankdata(np.asarray(scores, float))))


def recall_at_frr(labels: np.ndarray, scores: np.ndarray, frr: float,
                  subset: np.ndarray | None = None) -> tuple[float, float]:
    """Recall on artifacts when the threshold rejects at most ``frr`` of the stars.

    The threshold is the smallest score at which the fraction of star spots with a
    score at or above it is <= ``frr``. Returns (recall, threshold). ``subset``
    restricts the artifacts counted (e.g. reflections only).
    """
    y = np.asarray(labels).astype(bool)
    s = np.nan_to_num(np.asarray(scores, float), nan=-1e300, posinf=1e300, neginf=-1e300)
    stars = np.sort(s[~y])
    if stars.size == 0 or y.sum() == 0:
        return float("nan"), float("nan")
    k = int(np.floor(frr * stars.size + 1e-9))   # stars allowed at/above the threshold
    levels = np.unique(stars)
    n_ge = stars.size - np.searchsorted(stars, levels, side="left")
    j = int(np.argmax(n_ge <= k)) if np.any(n_ge <= k) else levels.size
    # the smallest threshold above the next lower star level keeps the same star count
    thr = -np.inf if j == 0 else float(np.nextafter(levels[j - 1], np.inf))
    pos = y if subset is None else (y & np.asarray(subset, bool))
    if pos.sum() == 0:
        return float("nan"), thr
    return float(np.mean(s[pos] >= thr)), thr


# ---------------------------------------------------------------------------------
# The shipped CNN
# ---------------------------------------------------------------------------------
def cnn_model_path() -> Path | None:
    """The shipped model file if it exists (it is trained separately), else None."""
    try:
        from robopol_clean.classify.cnn import default_model_path
    except ImportError:
        return None
    p = default_model_path()
    return p if p.is_file() and p.with_suffix(".json").is_file() else None


def load_default_classifier(ctx: Context):
    """(classifier, name, load seconds, why-not) -- the CNN when shipped, else morphology.

    Cached in the context: the network is loaded once per run.
    """
    if "default_clf" in ctx.cache:
        return ctx.cache["default_clf"]
    from robopol_clean.pipeline import get_classifier

    why = None
    with Timer() as t:
        if cnn_model_path() is not None:
            try:
                clf, name = get_classifier("cnn"), "cnn"
            except Exception as exc:  # noqa: BLE001 -- report, fall back
                why = f"CNN model present but not loadable: {str(exc).splitlines()[0][:160]}"
                clf, name = get_classifier("morphology"), "morphology"
        else:
            why = "CNN model not available (robopol_clean/data/robopol_cnn.keras not trained yet)"
            clf, name = get_classifier("morphology"), "morphology"
    ctx.cache["default_clf"] = (clf, name, t.s, why)
    return ctx.cache["default_clf"]
