"""A whole night on Dask: ``robopol-clean reduce`` over many full frames.

    python benchmarks/bench_night.py                 # 100 frames (the issue's target)
    python benchmarks/bench_night.py --quick         # 6 frames, to check that it works
    python benchmarks/bench_night.py --n-frames 30   # what fits in ~10 min on 2 shared cores

N full 2048 x 2048 RoboPol frames are simulated first with
``robopol_clean.simulate.simulate_frames(frames, N, seed)`` (150-900 stars each, drawn;
not timed). Then the real command line is timed as a subprocess, three times, each
into a fresh output folder, with the default classifier (the CNN + partner cues):

1. ``robopol-clean reduce FRAMES -o OUT1 --workers 1``  (a LocalCluster of 1 process)
2. ``robopol-clean reduce FRAMES -o OUT2 --workers 2``  (2 processes)
3. ``robopol-clean reduce FRAMES -o OUT3 --scheduler tcp://127.0.0.1:PORT`` against a
   ``dask scheduler`` and ``dask worker ... --nworkers 2 --nthreads 1`` started here as
   separate processes (already running and connected when the clock starts; killed,
   with their whole process groups, at the end).

Wall time covers the whole command: interpreter and imports, cluster start
(runs 1-2), the network loaded once per worker, every frame, and the night products
(``summary.ecsv``, ``stokes_all.ecsv``, ``night_report.png``), which are read back
from the per-frame catalogues. The command's per-frame log lines are time-stamped as
they arrive, which splits the wall time into start-up (until the first frame is done),
steady state (first to last frame) and tail (night products and shutdown).

Memory: the benchmark samples every process of the command's tree (and of the
``dask worker`` tree) every 0.2 s with psutil and keeps each process's peak resident
set (``VmHWM`` from ``/proc/PID/status`` where readable, else the sampled RSS); for
the external workers Dask's ``client.run`` also reads ``ru_maxrss`` at the end. CPU
seconds come from ``getrusage(RUSAGE_CHILDREN)`` around each command (the whole
LocalCluster tree) and from the external workers' own ``getrusage``.

Determinism: the three ``stokes_all.ecsv`` must have the same number of rows (and the
same total spots); the benchmark also compares their contents.

Prints a table; the full 100-frame night also writes ``benchmarks/results/night.json``
and ``docs/night_benchmark_table.rst`` (other runs write only where ``--json`` /
``--rst`` say, never over those committed files),
each with the machine description, load averages and the exact command. Timings on
the shared 2-core development machines are noisy: the load average before and after
each run is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    REPO,
    _jsonable,
    _rst_escape,
    _text_table,
    command_line,
    log,
    machine_description,
    machine_line,
    output_paths,
    rst_preamble,
)

#: Master seed of the simulated night (frame seeds derived with SeedSequence.spawn).
NIGHT_SEED = 50_000
#: Frames of the full night (the issue's target) and its committed results.
FULL_NIGHT = 100
COMMITTED_JSON = (HERE / "results" / "night.json").resolve()
COMMITTED_RST = (REPO / "docs" / "night_benchmark_table.rst").resolve()
#: psutil sampling interval, seconds.
SAMPLE_EVERY = 0.2
MIB = 2**20


# ---------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------
def _bin(name: str) -> str:
    """The console script beside this interpreter (same environment), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: command not found (is the package installed?)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set of a live process (bytes), from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "resource_tracker" in text or "forkserver" in text:
        return "helper"
    if "spawn_main" in text:
        return "worker"
    return "other"


class TreeSampler:
    """Peak memory of every process under some roots, sampled in a thread."""

    def __init__(self, roots: dict[str, int], every: float = SAMPLE_EVERY):
        import psutil

        self._psutil = psutil
        self.roots = roots          # label -> pid
        self.every = every
        self.peak: dict[int, int] = {}
        self.info: dict[int, dict] = {}
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.tree_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _procs(self):
        ps = self._psutil
        for label, pid in self.roots.items():
            try:
                root = ps.Process(pid)
                yield label, root, True
                for child in root.children(recursive=True):
                    yield label, child, False
            except ps.Error:
                continue

    def _loop(self):
        ps = self._psutil
        while not self._stop.is_set():
            total = 0
            for label, proc, is_root in self._procs():
                try:
                    rss = proc.memory_info().rss
                    if proc.pid not in self.info:
                        self.info[proc.pid] = {"tree": label, "root": is_root,
                                               "role": "main" if is_root else _role(proc.cmdline())}
                except ps.Error:
                    continue
                try:
                    ct = proc.cpu_times()
                    cpu = ct.user + ct.system
                    self.cpu_first.setdefault(proc.pid, cpu)
                    self.cpu_last[proc.pid] = cpu
                except ps.Error:
                    pass
                hwm = _vm_hwm(proc.pid)
                total += rss
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss, hwm or 0)
            self.tree_peak = max(self.tree_peak, total)
            self.samples += 1
            self._stop.wait(self.every)

    def cpu_delta(self, tree: str) -> float:
        """CPU seconds used while sampled by the processes of one tree (first to last sample)."""
        return sum(self.cpu_last[pid] - self.cpu_first[pid] for pid in self.cpu_last
                   if self.info.get(pid, {}).get("tree") == tree)

    def summary(self) -> dict:
        """Peak MiB (and sampled CPU seconds) per process, grouped by tree and role."""
        out: dict = {"samples": self.samples, "tree_peak_mib": round(self.tree_peak / MIB, 1),
                     "processes": []}
        for pid, peak in sorted(self.peak.items()):
            out["processes"].append({"pid": pid, **self.info.get(pid, {}),
                                     "peak_mib": round(peak / MIB, 1),
                                     "cpu_s": round(self.cpu_last.get(pid, 0.0)
                                                    - self.cpu_first.get(pid, 0.0), 2)})
        return out


def _stream_lines(stream, sink: list, t0: float, echo: bool) -> None:
    for line in iter(stream.readline, ""):
        sink.append((time.perf_counter() - t0, line.rstrip("\n")))
        if echo:
            print(f"    | {line.rstrip()}", file=sys.stderr, flush=True)
    stream.close()


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group this benchmark started (by its id), then SIGKILL."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if proc.poll() is None and pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    if pgid is not None:
        try:  # anything left in the group (e.g. worker processes of a killed nanny)
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------
# One timed command
# ---------------------------------------------------------------------------------
def run_reduce(label: str, frames: list[str], outdir: Path, extra: list[str], *,
               watch: dict[str, int] | None = None, timeout: float, echo: bool) -> dict:
    """Run ``robopol-clean reduce`` once; wall time, log time stamps, memory, CPU."""
    # -v: one time-stamped line per frame as it finishes (start-up / steady / tail split)
    cmd = [_bin("robopol-clean"), "reduce", *frames, "-o", str(outdir), "-v", *extra]
    shown = ["robopol-clean", "reduce", "FRAMES/sim_*.fits", "-o", outdir.name, "-v", *extra]
    log(f"{label}: {' '.join(shown)}")
    import psutil

    load0 = os.getloadavg()
    busy0 = _busy_cpu(psutil)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=str(outdir.parent))
    reader = threading.Thread(target=_stream_lines, args=(proc.stdout, lines, t0, echo), daemon=True)
    reader.start()
    timed_out = False
    with TreeSampler({"cli": proc.pid, **(watch or {})}) as sampler:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        except BaseException:  # Ctrl-C / SIGTERM: its own session gets no signal, so end it
            _kill_group(proc, grace=5)
            raise
    wall = time.perf_counter() - t0
    reader.join(10)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1 = os.getloadavg()
    busy = _busy_cpu(psutil) - busy0
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    watched = sum(sampler.cpu_delta(k) for k in (watch or {}))

    # per-frame log lines (-v): "<path>: done: ..." / "<path>: skipped ..."
    names = {os.path.basename(f) for f in frames}
    pat = re.compile(r"^(?P<path>\S+): (?P<status>done|failed|skipped)\b")
    frame_t = [t for t, ln in lines
               if (m := pat.match(ln)) and os.path.basename(m["path"]) in names]
    mem = sampler.summary()
    res = {"label": label, "command": " ".join(shlex.quote(a) for a in shown), "argv": cmd,
           "rc": rc, "timed_out": timed_out, "wall_s": wall, "cpu_s_cli_tree": cpu,
           "cpu_s_watched": watched, "cpu_s": cpu + watched,
           "other_cores": max(0.0, (busy - cpu - watched) / wall),
           "loadavg_before": [round(v, 2) for v in load0],
           "loadavg_after": [round(v, 2) for v in load1],
           "frame_lines": len(frame_t), "memory": mem, "log_tail": [ln for _, ln in lines[-15:]]}
    if frame_t:
        res["first_frame_s"] = frame_t[0]
        res["last_frame_s"] = frame_t[-1]
        res["tail_s"] = wall - frame_t[-1]
        if len(frame_t) > 1 and frame_t[-1] > frame_t[0]:
            res["steady_fps"] = (len(frame_t) - 1) / (frame_t[-1] - frame_t[0])
    res.update(_products(outdir))
    status = "ok" if rc == 0 else ("TIMED OUT" if timed_out else f"exit {rc}")
    log(f"{label}: {wall:.1f} s wall, {cpu + watched:.0f} s CPU, others used "
        f"{res['other_cores']:.2f} cores meanwhile, {status}")
    if rc != 0:
        log(f"{label}: last output lines:\n" + "\n".join(res["log_tail"]))
    return res


def _busy_cpu(psutil) -> float:
    """Machine-wide busy CPU seconds so far (all cores, all users)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) \
        - getattr(t, "guest_nice", 0.0)


def _products(outdir: Path) -> dict:
    from astropy.table import Table

    out: dict = {}
    s = outdir / "summary.ecsv"
    if s.is_file():
        t = Table.read(s, format="ascii.ecsv")
        out.update(n_frames_done=len(t), total_spots=int(sum(t["n_spots"])),
                   total_rejected=int(sum(t["n_rejected"])), total_clean=int(sum(t["n_clean"])),
                   task_s_sum=float(sum(t["seconds"])),
                   task_s_median=float(sorted(t["seconds"])[len(t) // 2]) if len(t) else None)
    a = outdir / "stokes_all.ecsv"
    out["stokes_all_rows"] = len(Table.read(a, format="ascii.ecsv")) if a.is_file() else None
    f = outdir / "failures.ecsv"
    out["n_failed"] = len(Table.read(f, format="ascii.ecsv")) if f.is_file() else 0
    return out


def _compare_stokes(dirs: list[Path]) -> dict:
    """Same rows, same frames/groups, and the largest difference in q and u."""
    import numpy as np
    from astropy.table import Table

    tables = []
    for d in dirs:
        p = d / "stokes_all.ecsv"
        if not p.is_file():
            return {"comparable": False, "why": f"{p} missing"}
        tables.append(Table.read(p, format="ascii.ecsv"))
    ref = tables[0]
    out = {"comparable": True, "rows": [len(t) for t in tables], "same_rows": True,
           "same_keys": True, "max_abs_dq": 0.0, "max_abs_du": 0.0}
    for t in tables[1:]:
        if len(t) != len(ref):
            out["same_rows"] = out["same_keys"] = False
            continue
        if not (np.all(t["frame"] == ref["frame"]) and np.all(t["group_id"] == ref["group_id"])):
            out["same_keys"] = False
            continue
        out["max_abs_dq"] = max(out["max_abs_dq"], float(np.max(np.abs(t["q"] - ref["q"]), initial=0)))
        out["max_abs_du"] = max(out["max_abs_du"], float(np.max(np.abs(t["u"] - ref["u"]), initial=0)))
    out["identical"] = out["same_rows"] and out["same_keys"] and out["max_abs_dq"] == 0 \
        and out["max_abs_du"] == 0
    return out


# ---------------------------------------------------------------------------------
# External scheduler + workers
# ---------------------------------------------------------------------------------
class ExternalCluster:
    """``dask scheduler`` + ``dask worker --nworkers N --nthreads 1`` on 127.0.0.1."""

    def __init__(self, workdir: Path, nworkers: int = 2, timeout: float = 180.0):
        self.workdir = workdir
        self.nworkers = nworkers
        self.timeout = timeout
        self.scheduler = self.worker = None
        self.address = None
        self.commands: list[str] = []
        self._logs: list = []

    def __enter__(self):
        import atexit

        atexit.register(self.close)
        dask = _bin("dask")
        for attempt in range(3):
            port = _free_port()
            self.address = f"tcp://127.0.0.1:{port}"
            sched = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"]
            self.scheduler = subprocess.Popen(
                sched, stdout=self._log("scheduler.log"), stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(self.workdir))
            if self._wait_port(port):
                break
            _kill_group(self.scheduler, grace=2)
            log(f"scheduler on port {port} did not start (attempt {attempt + 1})")
        else:
            raise RuntimeError("dask scheduler did not start; see " + str(self.workdir / "scheduler.log"))
        work = [dask, "worker", self.address, "--nworkers", str(self.nworkers), "--nthreads", "1",
                "--no-dashboard", "--local-directory", str(self.workdir / "dask-worker-space")]
        self.worker = subprocess.Popen(
            work, stdout=self._log("worker.log"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(self.workdir))
        self.commands = [" ".join(["dask", *sched[1:]]),
                         " ".join(["dask", *work[1:-1], "WORKDIR/dask-worker-space"])]
        from dask.distributed import Client

        t0 = time.perf_counter()
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(self.nworkers, timeout=self.timeout)
        log(f"external cluster {self.address}: {self.nworkers} workers up in "
            f"{time.perf_counter() - t0:.1f} s")
        return self

    def _log(self, name: str):
        fh = open(self.workdir / name, "w")  # noqa: SIM115 -- closed in close()
        self._logs.append(fh)
        return fh

    def _wait_port(self, port: int, limit: float = 60.0) -> bool:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit:
            if self.scheduler.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.3)
        return False

    def worker_usage(self) -> dict:
        """ru_maxrss (MiB) and CPU seconds of each worker process, via client.run."""
        from dask.distributed import Client

        def usage():
            import resource as r

            u = r.getrusage(r.RUSAGE_SELF)
            return {"maxrss_mib": round(u.ru_maxrss / 1024, 1), "cpu_s": u.ru_utime + u.ru_stime}

        with Client(self.address, timeout=60) as client:
            return client.run(usage)

    def close(self, *exc):
        _kill_group(self.worker)
        _kill_group(self.scheduler)
        self.worker = self.scheduler = None
        for fh in self._logs:
            fh.close()
        self._logs = []
        return False

    __exit__ = close


# ---------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------
def _f(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _worker_peak(run: dict) -> float | None:
    """Largest peak RSS among the worker processes (MiB)."""
    usage = run.get("worker_usage")
    if usage:
        return max(u["maxrss_mib"] for u in usage.values())
    peaks = [p["peak_mib"] for p in run["memory"]["processes"] if p.get("role") == "worker"]
    return max(peaks) if peaks else None


def _main_peak(run: dict) -> float | None:
    peaks = [p["peak_mib"] for p in run["memory"]["processes"] if p.get("tree") == "cli" and p["root"]]
    return max(peaks) if peaks else None


def build_report(runs: list[dict], n_frames: int, header: dict, det: dict) -> dict:
    t1 = runs[0]["wall_s"]
    t2 = runs[1]["wall_s"]
    eff = t1 / (2 * t2)
    s1, s2 = runs[0].get("steady_fps"), runs[1].get("steady_fps")
    eff_steady = s2 / (2 * s1) if s1 and s2 else None
    columns = ["run", "wall s", "frames/s", "s/frame", "start-up s", "steady frames/s", "tail s",
               "median task s", "CPU s/frame", "peak RSS/worker MiB", "peak RSS CLI MiB",
               "total spots", "stokes_all rows", "load avg before/after", "others' cores", "exit"]
    rows = []
    for r in runs:
        rows.append([
            r["label"], _f(r["wall_s"]), _f(n_frames / r["wall_s"], 3), _f(r["wall_s"] / n_frames, 2),
            _f(r.get("first_frame_s")), _f(r.get("steady_fps"), 3), _f(r.get("tail_s")),
            _f(r.get("task_s_median"), 2),
            _f(r["cpu_s"] / n_frames, 2), _f(_worker_peak(r), 0), _f(_main_peak(r), 0),
            _f(r.get("total_spots")), _f(r.get("stokes_all_rows")),
            f"{r['loadavg_before'][0]:.2f}/{r['loadavg_after'][0]:.2f}", _f(r["other_cores"], 2),
            "ok" if r["rc"] == 0 else ("timeout" if r["timed_out"] else str(r["rc"]))])
    rows_equal = len({r.get("stokes_all_rows") for r in runs}) == 1 and runs[0].get("stokes_all_rows") is not None
    spots_equal = len({r.get("total_spots") for r in runs}) == 1
    notes = [
        f"{n_frames} simulated 2048x2048 RoboPol frames (simulate_frames, master seed "
        f"{header['seed']}, stars drawn 150-900 per frame: {header['n_stars_total']} stars, "
        f"{header['n_stars_min']}-{header['n_stars_max']} per frame); simulated in "
        f"{header['simulate_s']:.0f} s, not timed.",
        "Classifier: the default (CNN + partner cues), loaded once per worker. Wall time = the "
        "whole command (Python and imports, cluster start for the LocalCluster runs, model "
        "load, frames, night products). The --scheduler run's processes were started and "
        "connected before the clock started, so its wall time excludes worker start-up.",
        f"Parallel efficiency t1 / (2 t2) = {eff:.2f} (whole command)"
        + (f"; steady state (first to last frame, start-up and night products excluded) "
           f"{eff_steady:.2f}" if eff_steady else "") + ". Target: >= 0.9."
        + (f" A frame's task takes {runs[1]['task_s_median'] / runs[0]['task_s_median']:.2f} "
           "times as long with two workers side by side as with one (median task seconds): "
           "the two cores share caches and memory bandwidth."
           if runs[0].get("task_s_median") and runs[1].get("task_s_median") else ""),
        "Rough extrapolation to 100 frames with --workers 2 (start-up + 99 frames at the steady "
        "rate + tail): "
        + (f"{(runs[1]['first_frame_s'] + 99 / s2 + runs[1]['tail_s']):.0f} s" if s2 else "-")
        + " (target: <= 90 s on 2 cores).",
        f"Determinism: stokes_all.ecsv rows {', '.join(_f(r.get('stokes_all_rows')) for r in runs)} -> "
        + ("identical counts" if rows_equal else "COUNTS DIFFER")
        + ("; total spots identical" if spots_equal else "; TOTAL SPOTS DIFFER")
        + (f"; contents {'identical' if det.get('identical') else 'differ'} "
           f"(max |dq| {det.get('max_abs_dq', float('nan')):.2g}, max |du| "
           f"{det.get('max_abs_du', float('nan')):.2g})" if det.get("comparable") else "") + ".",
        "start-up = until the first frame's log line; steady frames/s = (frames - 1) / (last - "
        "first frame line); tail = last frame line to exit (night products + shutdown); median "
        "task s = the median of summary.ecsv's per-frame seconds (read to products written, in "
        "the worker). CPU s/frame = user + system CPU of the command's process tree (plus the "
        "external dask worker processes during the run) / frames. Others' cores = machine-wide "
        "busy CPU not used by these processes / wall time: what the other users of the machine "
        "took meanwhile (2 cores in all).",
        "Peak RSS per worker: the largest worker process's peak resident set (VmHWM sampled every "
        f"{SAMPLE_EVERY} s with psutil; ru_maxrss via client.run for the external workers). "
        "Peak RSS CLI: the command's own process (scheduler + client for the LocalCluster runs).",
    ]
    return {"columns": columns, "rows": rows, "notes": notes, "efficiency": eff,
            "efficiency_steady": eff_steady, "stokes_rows_equal": rows_equal,
            "total_spots_equal": spots_equal}


def _by_metric(report: dict) -> tuple[list[str], list[list[str]]]:
    """The table turned: one row per metric, one column per run."""
    cols = ["metric"] + [r[0] for r in report["rows"]]
    rows = [[name] + [r[i] for r in report["rows"]] for i, name in enumerate(report["columns"]) if i]
    return cols, rows


def render_text(report: dict, header: dict) -> str:
    m = header["machine"]
    lines = [f"robopol-clean night benchmark ({header['n_frames']} frames)",
             f"command: {header['command']}", f"machine: {machine_line(m)}",
             f"date: {m['date']}; git {m.get('git')}; total {header['seconds']:.0f} s", ""]
    lines += _text_table(*_by_metric(report))
    lines += [f"* {n}" for n in report["notes"]]
    lines += ["", "commands timed:"] + [f"  {c}" for c in header["commands"]]
    return "\n".join(lines)


def render_rst(report: dict, header: dict) -> str:
    m = header["machine"]
    out = rst_preamble("benchmarks/bench_night.py", "night-benchmark-start",
                       f"Measured {m['date']} (git {m.get('git')}) on **{header['n_frames']} frames**, "
                       f"benchmark total {header['seconds']:.0f} s.", m, header["command"])
    out += ["Commands timed (FRAMES = the simulated frames, each run into a fresh folder)::", ""]
    out += [f"    {c}" for c in header["commands"]]
    out += ["", ".. list-table::", "   :header-rows: 1", ""]
    cols, rows = _by_metric(report)
    for row in [cols] + rows:
        out.append(f"   * - {_rst_escape(row[0])}")
        out.extend(f"     - {_rst_escape(v)}" for v in row[1:])
    out.append("")
    out += [f"- {_rst_escape(n)}" for n in report["notes"]]
    return "\n".join(out).rstrip() + "\n"


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    log(f"wrote {p}")


# ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--n-frames", type=int, default=FULL_NIGHT, metavar="N",
                        help=f"frames (default {FULL_NIGHT})")
    parser.add_argument("--quick", action="store_true", help="6 frames (overrides --n-frames)")
    parser.add_argument("--seed", type=int, default=NIGHT_SEED, help=f"master seed (default {NIGHT_SEED})")
    parser.add_argument("--workdir", default=None,
                        help="folder for frames and products (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed per command (default: 60 + 20 s per frame)")
    parser.add_argument("--echo", action="store_true", help="echo the commands' output")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the JSON results (the full 100-frame run: default "
                             "benchmarks/results/night.json; otherwise not written unless given)")
    parser.add_argument("--rst", default=None, metavar="PATH",
                        help="where to write the reST table (the full 100-frame run: default "
                             "docs/night_benchmark_table.rst; otherwise not written unless given)")
    args = parser.parse_args(argv)
    n = 6 if args.quick else args.n_frames
    if n < 2:
        parser.error("--n-frames must be at least 2")
    full = n == FULL_NIGHT and args.seed == NIGHT_SEED
    output_paths(parser, args, {"json": COMMITTED_JSON, "rst": COMMITTED_RST}, full,
                 f"the full {FULL_NIGHT}-frame night")
    timeout = args.timeout or 60 + 20 * n

    t_start = time.perf_counter()
    machine = machine_description()
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        work = Path(tempfile.mkdtemp(prefix="robopol-night-"))
        cleanup = not args.keep
    for sig in (signal.SIGTERM, signal.SIGHUP):  # run `finally` (kill the cluster) on these too
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    try:
        from astropy.io import fits

        from robopol_clean.simulate import simulate_frames

        frames_dir = work / "frames"
        log(f"simulating {n} frames into {frames_dir} (not timed)")
        t0 = time.perf_counter()
        stars: list[int] = []
        paths = simulate_frames(frames_dir, n, args.seed, overwrite=True,
                                callback=lambda p, sim: stars.append(len(sim.stars)))
        sim_s = time.perf_counter() - t0
        frames = [str(p) for p in paths]
        mb = sum(os.path.getsize(p) for p in frames) / n / 1e6
        shape = fits.getdata(frames[0]).shape
        log(f"simulated {n} frames {shape[1]}x{shape[0]} ({mb:.0f} MB each, {sum(stars)} stars) "
            f"in {sim_s:.0f} s")

        runs = []
        for label, extra in (("--workers 1", ["--workers", "1"]), ("--workers 2", ["--workers", "2"])):
            out = work / f"out_w{extra[-1]}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_reduce(label, frames, out, extra, timeout=timeout, echo=args.echo))
        cluster_cmds: list[str] = []
        with ExternalCluster(work, nworkers=2) as cluster:
            out = work / "out_sched"
            shutil.rmtree(out, ignore_errors=True)
            r = run_reduce("--scheduler (2 x 1 thread)", frames, out, ["--scheduler", cluster.address],
                           watch={"dask-worker": cluster.worker.pid}, timeout=timeout, echo=args.echo)
            try:
                r["worker_usage"] = cluster.worker_usage()
            except Exception as exc:  # noqa: BLE001 -- the sampled numbers remain
                log(f"client.run(getrusage) failed: {exc}")
            r["command"] = r["command"].replace(cluster.address, "tcp://127.0.0.1:PORT")
            port = cluster.address.rsplit(":", 1)[1]
            cluster_cmds = [c.replace(cluster.address, "tcp://127.0.0.1:PORT")
                            .replace(f"--port {port}", "--port PORT") for c in cluster.commands]
            runs.append(r)
        det = _compare_stokes([work / "out_w1", work / "out_w2", work / "out_sched"])

        load = os.getloadavg()
        machine["loadavg_end"] = [round(v, 2) for v in load]
        header = {"command": command_line(argv), "machine": machine, "n_frames": n, "seed": args.seed,
                  "frame_shape": list(shape), "frame_mb": round(mb, 1), "simulate_s": sim_s,
                  "n_stars_total": sum(stars), "n_stars_min": min(stars), "n_stars_max": max(stars),
                  "commands": [runs[0]["command"], runs[1]["command"],
                               *[f"{c} &" for c in cluster_cmds], runs[2]["command"]],
                  "timeout_s": timeout, "seconds": time.perf_counter() - t_start}
        report = build_report(runs, n, header, det)
        print(render_text(report, header))
        if args.json:
            payload = {**header, "efficiency": report["efficiency"],
                       "efficiency_steady": report["efficiency_steady"],
                       "stokes_rows_equal": report["stokes_rows_equal"], "determinism": det,
                       "columns": report["columns"], "rows": report["rows"], "notes": report["notes"],
                       "runs": runs}
            _write(args.json, json.dumps(_jsonable(payload), indent=1) + "\n")
        if args.rst:
            _write(args.rst, render_rst(report, header))
        ok = all(r["rc"] == 0 for r in runs) and report["stokes_rows_equal"]
        return 0 if ok else 1
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
