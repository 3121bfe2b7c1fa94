"""Whole nights on a real Dask LocalCluster (worker processes)."""

import os
import shutil
import subprocess
import sys

import pytest
from astropy.table import Table

from robopol_clean.batch import expand_inputs, reduce_night, stem_of, write_night_products
from robopol_clean.cli import EXIT_FAILURE, main


@pytest.fixture(scope="module")
def night(small_fits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("night")
    for i in range(3):
        shutil.copy(small_fits, folder / f"frame{i}.fits")
    (folder / "frame_corrupt.fits").write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    return folder


def test_expand_inputs(night, tmp_path):
    files = expand_inputs([str(night)])
    assert len(files) == 4
    listing = tmp_path / "list.txt"
    listing.write_text(f"# frames\n{files[0]}\n{files[1]}\n")
    assert expand_inputs([f"@{listing}", str(night / "frame0.fits")]) == files[:2]
    assert expand_inputs([str(night / "frame[12].fits")]) == files[1:3]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs([str(night / "*.fz")])
    assert stem_of("a/b/x.fits.gz") == "x" and stem_of("y.FIT") == "y"


@pytest.mark.slow
def test_night_on_local_cluster_with_corrupt_frame_and_resume(night, tmp_path):
    out = tmp_path / "out"
    files = expand_inputs([str(night)])
    outcomes = reduce_night(files, out, classifier="morphology", workers=2, progress=False)
    status = {stem_of(o.path): o.status for o in outcomes}
    assert status == {"frame0": "done", "frame1": "done", "frame2": "done", "frame_corrupt": "failed"}
    written = write_night_products(outcomes, out)
    assert {"summary", "stokes_all", "failures", "night_report"} <= set(written)
    summary = Table.read(out / "summary.ecsv")
    assert len(summary) == 3 and (summary["n_clean"] > 0).all()
    stokes_all = Table.read(out / "stokes_all.ecsv")
    assert len(stokes_all) == summary["n_stokes"].sum() and "frame" in stokes_all.colnames
    assert (stokes_all["flags"] == 0).sum() == summary["n_clean"].sum()
    failures = Table.read(out / "failures.ecsv")
    assert list(failures["file"]) == [str(night / "frame_corrupt.fits")]
    assert not list(out.glob("frame_corrupt*"))  # no partial products
    assert not list(out.glob(".*part"))

    # Resume: the same command skips what is done and still reports the corrupt frame.
    stamp = (out / "frame0_spots.ecsv").stat().st_mtime_ns
    code = main(["reduce", str(night), "-o", str(out), "--classifier", "morphology",
                 "--workers", "2", "-q"])
    assert code == EXIT_FAILURE
    assert (out / "frame0_spots.ecsv").stat().st_mtime_ns == stamp
    assert len(Table.read(out / "summary.ecsv")) == 3


def _cli(*args, cwd):
    """The installed console script in a fresh process, as a user runs it (stderr not a tty)."""
    exe = shutil.which("robopol-clean")
    cmd = [exe] if exe else [sys.executable, "-m", "robopol_clean.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "TF_CPP"))}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.slow
def test_two_frame_reduce_is_quiet(small_fits, tmp_path):
    """A night on a real local cluster prints our own lines only: no Dask, ONNX Runtime or
    TensorFlow logs, no tracebacks; -q prints nothing; -v adds the dashboard address."""
    for i in range(2):
        shutil.copy(small_fits, tmp_path / f"f{i}.fits")
    frames = [tmp_path / "f0.fits", tmp_path / "f1.fits"]

    done = _cli("reduce", *frames, "-o", tmp_path / "out", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("2 frame(s): 2 reduced"), done.stderr
    assert done.stdout == ""

    quiet = _cli("reduce", *frames, "-o", tmp_path / "out_q", "--workers", "2", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""

    loud = _cli("reduce", *frames, "-o", tmp_path / "out_v", "--workers", "2", "-v", cwd=tmp_path)
    assert loud.returncode == 0
    assert "Dask dashboard: http" in loud.stderr
    assert "Traceback" not in loud.stderr and "CommClosedError" not in loud.stderr

    one = _cli("reduce", frames[0], "-o", tmp_path / "out1", cwd=tmp_path)
    lines = one.stderr.splitlines()
    assert one.returncode == 0 and len(lines) == 2, one.stderr
    assert lines[0].startswith(str(frames[0])) and lines[1].startswith("1 frame(s): 1 reduced")


@pytest.mark.slow
def test_every_worker_applies_the_same_calibration(standard_files, tmp_path):
    """A calibration given to a night is read once and reaches every Dask worker."""
    import hashlib

    from astropy.io import fits

    cal = tmp_path / "cal.toml"
    cal.write_text('format = "robopol-clean calibration"\nformat_version = 1\ninstrument = "RoboPol"\n'
                   '[calibration]\nangle_zero = 2.5\nterms = ["1"]\nq_inst = [0.001]\n'
                   'u_inst = [-0.002]\ncenter = [1024.0, 1024.0]\nscale = 1024.0\n')
    sha = hashlib.sha256(cal.read_bytes()).hexdigest()
    out = tmp_path / "out"
    outcomes = reduce_night([str(f) for f in standard_files[:3]], out, classifier="morphology",
                            calibration=cal, workers=2, progress=False)
    assert [o.status for o in outcomes] == ["done"] * 3
    for f in standard_files[:3]:
        assert fits.getheader(out / f"{f.stem}_clean.fits")["RCLCAL"] == sha
        meta = Table.read(out / f"{f.stem}_stokes.ecsv").meta
        assert meta["calibration_file"]["sha256"] == sha and meta["angle_zero"] == 2.5
        assert meta["q_inst_coeffs"][0] == 0.001 and meta["u_inst_coeffs"][0] == -0.002
