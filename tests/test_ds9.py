"""Round trip through the real SAOImage DS9, run headless under Xvfb.

Skipped when ``ds9`` or ``Xvfb`` is not on PATH. DS9 loads a FITS frame and a region
file written as ``reduce`` writes it (:func:`spots_to_ds9`), saves the regions back in image coordinates,
and the result must match what was written. Debian's DS9 needs the Tcl package
``img::window`` for ``-saveimage`` (otherwise it blocks on an error dialog), so it is
loaded with ``-source``; the same file turns DS9's error dialogs into messages on
stderr so that a failure ends the run instead of waiting for a click.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from robopol_clean.regions_io import read_regions, spots_to_ds9, write_regions

pytestmark = [
    pytest.mark.ds9,
    pytest.mark.skipif(shutil.which("ds9") is None or shutil.which("Xvfb") is None,
                       reason="needs SAOImage DS9 and Xvfb on PATH"),
]


TCL_SETUP = """package require img::window
proc tk_messageBox {args} {puts stderr "DS9ERROR: $args"; return ok}
proc Error {message} {puts stderr "DS9ERROR: $message"}
"""


@pytest.fixture(scope="module")
def display():
    """Start Xvfb on a free display number (it picks one: -displayfd) and stop it after.

    The screen must hold the whole DS9 window, or ``-saveimage`` fails.
    """
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as fh:
            number = fh.readline().strip()  # blocks until the server is ready
        if not number.isdigit():
            pytest.skip("Xvfb did not start")
        yield f":{number}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_ds9(args, display, cwd):
    env = dict(os.environ, DISPLAY=display)
    return subprocess.run(["ds9", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_ds9_reads_our_regions(tmp_path, display):
    rng = np.random.default_rng(0)
    fits.writeto(tmp_path / "frame.fits", rng.normal(100, 5, (128, 160)).astype(np.float32))
    spots = Table({
        "spot_id": [0, 1, 2],
        "x": [10.0, 50.5, 130.25],
        "y": [20.0, 60.0, 100.75],
        "p_artifact": [0.97, 0.41, 0.08],
        "rejected": [True, False, False],
        "uncertain": [False, True, False],
    })
    written = write_regions(spots_to_ds9(spots, radius=6.0), tmp_path / "in.reg")  # as reduce writes
    (tmp_path / "fix.tcl").write_text(TCL_SETUP)
    proc = run_ds9(["-source", "fix.tcl", "frame.fits", "-scale", "zscale",
                    "-regions", "load", written.name, "-regions", "system", "image",
                    "-regions", "save", "out.reg", "-saveimage", "png", "view.png", "-exit"],
                   display, tmp_path)
    assert proc.returncode == 0 and "DS9ERROR" not in proc.stderr, proc.stderr
    assert (tmp_path / "view.png").stat().st_size > 0
    saved = (tmp_path / "out.reg").read_text()
    assert "image" in saved and "circle(11,21,6)" in saved  # 1-based in the file
    back = read_regions(tmp_path / "out.reg")
    assert len(back) == 3
    np.testing.assert_allclose([r.center.x for r in back], spots["x"], atol=1e-6)
    np.testing.assert_allclose([r.center.y for r in back], spots["y"], atol=1e-6)
    np.testing.assert_allclose([r.radius for r in back], 6.0)
    assert [r.meta.get("text") for r in back] == ["p=0.97", "p=0.41", "p=0.08"]
    # DS9 omits the colour equal to its global default (green)
    assert [r.visual.get("edgecolor") for r in back] == ["red", "orange", "green"]
