import shutil
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from regions import Regions

from robopol_clean.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

PRODUCTS = ("_spots.ecsv", "_stokes.ecsv", "_rejected.reg", "_clean.fits")


def _reduce(*args):
    return main(["reduce", *map(str, args), "--classifier", "morphology", "-q"])


def test_help_everywhere(capsys):
    for cmd in ([], ["reduce"], ["demo"]):
        with pytest.raises(SystemExit) as info:
            main([*cmd, "--help"])
        assert info.value.code == 0
    assert "reduce" in capsys.readouterr().out


def test_reduce_writes_documented_products(small_fits, tmp_path):
    frame = tmp_path / "night1.fits"
    shutil.copy(small_fits, frame)
    before = frame.read_bytes()
    out = tmp_path / "out"
    assert _reduce(frame, "-o", out) == EXIT_OK
    assert frame.read_bytes() == before
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("night1")] == sorted("night1" + s for s in PRODUCTS)
    spots = Table.read(out / "night1_spots.ecsv")
    stokes = Table.read(out / "night1_stokes.ecsv")
    assert spots["x"].unit == "pix" and spots["flux"].unit == "electron"
    assert set(stokes["group_id"]) <= set(spots["group_id"][spots["group_id"] >= 0])
    regions = Regions.read(out / "night1_rejected.reg", format="ds9")
    rejected = spots[spots["rejected"] | spots["uncertain"]]
    assert len(regions) == len(rejected)
    if len(regions):
        centres = np.array([[r.center.x, r.center.y] for r in regions])
        np.testing.assert_allclose(np.sort(centres[:, 0]), np.sort(rejected["x"]), atol=0.01)
    with fits.open(out / "night1_clean.fits") as hdul:
        detected = ~(np.asarray(spots["forced"]) | np.asarray(spots["recovered"])
                     | np.asarray(spots["residual"]))
        assert hdul[0].header["RCLNSPOT"] == int(detected.sum())
        assert hdul["MASK"].data.shape == hdul[0].data.shape


def test_rerun_skips_done_frames_and_refuses_partial_products(small_fits, tmp_path, capsys):
    out = tmp_path / "out"
    assert _reduce(small_fits, "-o", out) == EXIT_OK
    stamp = (out / "small_spots.ecsv").stat().st_mtime_ns
    seconds = Table.read(out / "summary.ecsv")["seconds"][0]
    assert seconds > 0
    # A rerun skips a frame whose products all exist, and keeps the earlier record.
    assert main(["reduce", str(small_fits), "-o", str(out), "--classifier", "morphology"]) == EXIT_OK
    assert "skipped" in capsys.readouterr().err
    assert (out / "small_spots.ecsv").stat().st_mtime_ns == stamp
    assert Table.read(out / "summary.ecsv")["seconds"][0] == seconds
    # Some products but not all: another file is in the way; refuse, touch nothing.
    (out / "small_stokes.ecsv").unlink()
    assert _reduce(small_fits, "-o", out) == EXIT_FAILURE
    assert "small_spots.ecsv: output exists" in capsys.readouterr().err
    assert (out / "small_spots.ecsv").stat().st_mtime_ns == stamp
    assert _reduce(small_fits, "-o", out, "--overwrite") == EXIT_OK
    assert (out / "small_stokes.ecsv").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a fits file at all", "not a FITS file"), (b"", "empty file"),
     (b"SIMPLE  =                    T" + b"\0" * 100, "not a readable FITS file")],
)
def test_bad_file_one_line_error(tmp_path, capsys, content, message):
    bad = tmp_path / "broken.fits"
    bad.write_bytes(content)
    assert _reduce(bad, "-o", tmp_path / "out") == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()
    assert any(str(bad) in line and message in line for line in err)
    assert not any(line.startswith("Traceback") for line in err)
    assert not any("ignore_missing_simple" in line for line in err)  # not an option of ours
    assert not list((tmp_path / "out").glob("broken*"))
    failures = Table.read(tmp_path / "out" / "failures.ecsv")
    assert list(failures["file"]) == [str(bad)]


def test_missing_inputs_fail_like_bad_frames(small_fits, tmp_path, capsys):
    """A missing file and a pattern matching nothing: both failed inputs (exit 1)."""
    out = tmp_path / "out"
    assert _reduce(tmp_path / "nothing-*.fits", "-o", out) == EXIT_FAILURE
    assert "nothing-*.fits: no file matches this pattern" in capsys.readouterr().err
    assert _reduce(tmp_path / "missing.fits", "-o", out) == EXIT_FAILURE
    assert "missing.fits: no such file" in capsys.readouterr().err
    assert len(Table.read(out / "failures.ecsv")) == 1


def test_usage_errors(tmp_path, capsys):
    assert main(["reduce", "x.fits", "-o", str(tmp_path), "--profile", "nope"]) == EXIT_USAGE
    assert "nope" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _reduce(tmp_path / "x.fits", "-o", blocker / "sub") == EXIT_USAGE
    assert "not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["reduce", "x.fits", "-o", str(tmp_path), "--threshold", "3"])
    assert info.value.code == 2


def test_missing_header_keywords_warn(small_fits, tmp_path, capsys):
    frame = tmp_path / "nohdr.fits"
    with fits.open(small_fits) as hdul:
        data = hdul[0].data
    fits.PrimaryHDU(data).writeto(frame)
    out = tmp_path / "out"
    assert main(["reduce", str(frame), "-o", str(out), "--classifier", "morphology"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "header lacks GAIN" in err
    assert _reduce(frame, "-o", out, "--overwrite") == EXIT_OK
    assert capsys.readouterr().err == ""  # -q: errors only


def test_console_script_runs():
    exe = shutil.which("robopol-clean")
    cmd = [exe] if exe else [sys.executable, "-m", "robopol_clean.cli"]
    done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert "robopol-clean" in done.stdout


def test_config_file_is_applied_and_recorded(small_fits, tmp_path, capsys):
    cfg = tmp_path / "night.toml"
    cfg.write_text('threshold = 0.7\n[photometry]\nmethod = "aperture"\n')
    out = tmp_path / "out"
    assert _reduce(small_fits, "-o", out, "--config", cfg, "--threshold", "0.6") == EXIT_OK
    stokes = Table.read(out / "small_stokes.ecsv")
    assert stokes.meta["config"] == {"threshold": 0.6, "photometry.method": "aperture"}
    with fits.open(out / "small_clean.fits") as hdul:
        header = hdul[0].header
        assert header["RCLCFG"] == stokes.meta["config_hash"] and header["RCLTHRES"] == 0.6
        assert "robopol-clean config: photometry.method = aperture" in str(header["HISTORY"])
    cfg.write_text("threshold = 2\n")
    assert _reduce(small_fits, "-o", tmp_path / "o2", "--config", cfg) == EXIT_USAGE
    assert "night.toml: threshold must be in (0, 1]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def visit_products(visit_sims, tmp_path_factory):
    """The four visit frames written as FITS (header WCS) and reduced one by one (no cluster)."""
    folder = tmp_path_factory.mktemp("visit")
    for k, sim in enumerate(visit_sims):
        sim.ccd.write(folder / f"visit{k}.fits")
        assert _reduce(folder / f"visit{k}.fits", "-o", folder / "out") == EXIT_OK
    return folder / "out"


def test_combine_writes_a_visit_and_refuses_another_field(visit_products, tmp_path, capsys):
    stokes = [visit_products / f"visit{k}_stokes.ecsv" for k in range(4)]
    assert Table.read(stokes[0]).colnames[3:5] == ["ra", "dec"]  # from the file's header WCS
    out = tmp_path / "visit.ecsv"
    assert main(["combine", *map(str, stokes[:3]), "-o", str(out)]) == EXIT_OK
    assert "3 exposures (sky matching" in capsys.readouterr().err
    visit = Table.read(out)
    assert visit.meta["inputs"] == [p.name for p in stokes[:3]] and visit.meta["config"] == {}
    assert {"ra", "dec", "n_used", "chi2_dof", "p_debiased", "flags"} <= set(visit.colnames)
    assert (visit["n_used"] == 3).sum() >= 10
    # rerun: the output exists; another field: one line naming it, nothing written
    assert main(["combine", *map(str, stokes[:3]), "-o", str(out)]) == EXIT_USAGE
    assert "visit.ecsv: output exists" in capsys.readouterr().err
    out2 = tmp_path / "mixed.ecsv"
    assert main(["combine", *map(str, stokes), "-o", str(out2), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "visit3_stokes.ecsv: not the same field as" in err[0]
    assert "Traceback" not in err[0] and not out2.exists()
    assert not list(tmp_path.glob(".*part"))
    # options are applied and recorded; bad values are usage errors
    out3 = tmp_path / "loose.ecsv"
    assert main(["combine", str(visit_products / "visit*_stokes.ecsv"), "-o", str(out3),
                 "--match", "pixel", "--include-flagged", "--significance", "0.01"]) == EXIT_USAGE
    assert "visit3_stokes.ecsv: not the same field" in capsys.readouterr().err
    assert main(["combine", *map(str, stokes[:3]), "-o", str(out3), "--match", "pixel",
                 "--include-flagged", "--significance", "0.01"]) == EXIT_OK
    assert Table.read(out3).meta["config"] == {"match": "pixel", "significance": 0.01,
                                               "include_flagged": True}
    assert main(["combine", *map(str, stokes[:3]), "-o", str(tmp_path / "x.ecsv"),
                 "--max-offset", "-5"]) == EXIT_USAGE
    assert "max_offset must be a positive number" in capsys.readouterr().err
    assert main(["combine", str(stokes[0]), "-o", str(tmp_path / "y.ecsv")]) == EXIT_USAGE
    assert "at least two" in capsys.readouterr().err


@pytest.mark.slow
def test_reduce_combine_night(visit_sims, tmp_path):
    """reduce --combine on a night (local cluster): the three frames of one field make a
    visit; the frame of another field stands alone."""
    for k, sim in enumerate(visit_sims):
        sim.ccd.write(tmp_path / f"n{k}.fits")
    out = tmp_path / "out"
    assert main(["reduce", str(tmp_path / "n*.fits"), "-o", str(out), "--classifier", "morphology",
                 "--workers", "2", "--combine", "-q"]) == EXIT_OK
    visits = Table.read(out / "visits.ecsv")
    assert list(visits["visit"]) == ["n0_visit.ecsv"] and list(visits["frames"]) == ["n0,n1,n2"]
    visit = Table.read(out / "n0_visit.ecsv")
    assert visit.meta["match"] == "sky" and len(visit) == visits["n_stars"][0]
    assert (out / "summary.ecsv").exists() and (out / "n3_stokes.ecsv").exists()


def test_calibrate_then_reduce_with_the_calibration(standard_files, tmp_path, capsys):
    import hashlib

    out = tmp_path / "cal" / "night.toml"
    assert main(["calibrate", *map(str, standard_files), "-o", str(out), "--classifier",
                 "morphology", "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "calibration from 6 frame(s) of 2 standard(s)" in printed and "angle_zero" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["night.toml", "night_residuals.png"]
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    # reduce applies it and records it
    red = tmp_path / "red"
    assert _reduce(standard_files[0], "-o", red, "--calibration", out) == EXIT_OK
    with fits.open(red / "std_0_clean.fits") as hdul:
        assert hdul[0].header["RCLCAL"] == sha and hdul[0].header["RCLCALF"] == str(out)
    stokes = Table.read(red / "std_0_stokes.ecsv")
    assert stokes.meta["calibration_file"]["sha256"] == sha
    assert stokes.meta["angle_zero"] == pytest.approx(stokes.meta["calibration_file"]["angle_zero"])
    # an existing calibration is not replaced without --overwrite (checked before any work)
    assert main(["calibrate", str(standard_files[0]), "-o", str(out), "-q"]) == EXIT_USAGE
    assert "night.toml: output exists" in capsys.readouterr().err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha


@pytest.mark.parametrize(("which", "extra", "message"), [
    ("unpolarized", [], "no polarized standard among the frames (only HD 212311)"),
    ("field", [], "small.fits: OBJECT 'SIMULATED' is not a known standard"),
    ("all", ["--order", "1"], "needs standards at 3 or more positions"),
    ("all", ["--allow-flags", "poor_fitt"], "--allow-flags: unknown flag 'poor_fitt'"),
    ("all", ["--fix-angle", "--fix-instrumental"], "nothing to fit"),
])
def test_calibrate_refusals_write_nothing(standard_files, small_fits, tmp_path, capsys, which,
                                          extra, message):
    frames = {"unpolarized": standard_files[3:], "field": [standard_files[0], small_fits],
              "all": standard_files}[which]
    out = tmp_path / "out" / "cal.toml"
    rc = main(["calibrate", *map(str, frames), "-o", str(out), "--classifier", "morphology", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_USAGE
    assert any(message in line for line in err), err
    assert not any(line.startswith("Traceback") for line in err)
    assert not (tmp_path / "out").exists()


def test_reduce_with_a_wrong_calibration_writes_nothing(small_fits, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('format = "robopol-clean calibration"\nformat_version = 1\ninstrument = "RoboPol"\n'
                   '[calibration]\nangle_zero = inf\n')
    out = tmp_path / "out"
    assert _reduce(small_fits, "-o", out, "--calibration", bad) == EXIT_USAGE
    assert "bad.toml: [calibration.angle_zero] must be finite, got inf" in capsys.readouterr().err
    assert not out.exists()
    assert _reduce(small_fits, "-o", out, "--calibration", tmp_path / "none.toml") == EXIT_USAGE
    assert "none.toml: cannot read calibration" in capsys.readouterr().err
    assert not out.exists()
