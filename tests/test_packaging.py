"""The distributions carry what an installed package needs, and the installed command runs.

Builds the sdist and, from it, the wheel (``python -m build``, as a release would), checks
that both contain the instrument profiles and the shipped model files, installs the wheel
into a fresh virtual environment and runs the ``robopol-clean`` entry point from outside
the source tree. The new environment reuses the current one's packages (TensorFlow is not
downloaded again), but not its (editable) robopol-clean.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robopol_clean"

#: Not copied into the build tree: version control, caches, build outputs, environments.
_IGNORE = shutil.ignore_patterns(
    ".git", ".tox", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]",
    ".pytest_cache", ".ruff_cache", ".benchmarks", "_build", "api", "robopol-demo",
    "_version.py",
)


def _package_files(sub: str, pattern: str = "*") -> list[str]:
    """Paths (relative to the repository) of shipped files under robopol_clean/<sub>."""
    folder = PACKAGE / sub
    return sorted(
        p.relative_to(ROOT).as_posix() for p in folder.glob(pattern)
        if p.is_file() and not p.name.startswith(".")
    )


def _run(cmd, *, cwd, env=None, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from a clean copy of the source tree."""
    pytest.importorskip("build", reason="needs the 'build' package (pip install build)")
    if not (ROOT / "setup.cfg").is_file():
        pytest.skip("not running from a source checkout")
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out = base / "dist"
    env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": "0.1.0.dev0"}
    _run([sys.executable, "-m", "build", "--outdir", out, src], cwd=base, env=env)
    sdists = list(out.glob("*.tar.gz"))
    wheels = list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


def test_distributions_contain_package_data(dists):
    sdist, wheel = dists
    expected = _package_files("profiles", "*.toml") + _package_files("data")
    assert "robopol_clean/profiles/robopol.toml" in expected
    # The shipped network (data/*.keras and its .json metadata) once it is in the tree.
    models = _package_files("data", "*.keras")
    for model in models:
        assert model[: -len(".keras")] + ".json" in expected, f"{model} has no .json metadata"

    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    missing = [f for f in expected if f not in in_wheel]
    assert not missing, f"not in the wheel: {missing}"
    entry_points = next(n for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "robopol-clean = robopol_clean.cli:main" in zf.read(entry_points).decode()
    assert not [n for n in in_wheel if n.startswith(("tests/", "docs/"))]

    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    prefix = names[0].split("/")[0]
    in_sdist = {n[len(prefix) + 1:] for n in names}
    must = expected + ["LICENSE", "README.md", "CHANGES.rst", "CITATION.cff", "setup.cfg",
                       "pyproject.toml", "docs/conf.py", "tests/conftest.py"]
    must += [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "data").glob("*")
             if p.is_file()]
    missing = [f for f in must if f not in in_sdist]
    assert not missing, f"not in the sdist: {missing}"


def test_installed_wheel_runs(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    # See the current environment's packages too (it may itself be a venv, whose packages
    # --system-site-packages does not reach). A plain path entry: the .pth files there,
    # such as an editable robopol-clean, are not processed.
    here = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    purelib = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_parent_env.pth").write_text("\n".join(dict.fromkeys(here)) + "\n")

    # --no-index: every dependency must already be satisfied, nothing is downloaded.
    _run([python, "-m", "pip", "install", "--no-index",
          "--disable-pip-version-check", "--quiet", wheel], cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = _run([python, "-c", "import robopol_clean, robopol_clean.instrument as i; "
                  "print(robopol_clean.__file__); print(i.load_profile('robopol').name)"],
                 cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), where[0]
    assert where[1] == "RoboPol"

    proc = _run([bindir / "robopol-clean", "--help"], cwd=tmp_path, env=env)
    assert "usage: robopol-clean" in proc.stdout and "reduce" in proc.stdout
    # The main job from the installed wheel: the shipped model and profile, no source tree.
    proc = _run([bindir / "robopol-clean", "demo", "-o", tmp_path / "demo", "--n-stars", "150"],
                cwd=tmp_path, env=env)
    assert "of them clean (flags == 0)" in proc.stdout
    assert (tmp_path / "demo" / "demo_input_stokes.ecsv").exists()
