"""The version and commit this code really is, for provenance.

An installed wheel knows its version from ``_version.py``, written by setuptools_scm
when it was built. An editable install of a git checkout would report the commit it
was installed at, however many commits ago; so when the package runs from a git
checkout, the version is computed from the checkout itself (setuptools_scm's scheme:
``<release>.dev<commits>+g<hash>``, ``.dirty`` when tracked files are modified).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["__version__", "__commit__"]

#: The release the development versions lead to (setuptools_scm's fallback).
_NEXT_RELEASE = "0.1.0"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _from_checkout() -> tuple[str, str] | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    commit = _git(root, "rev-parse", "--short=9", "HEAD")
    count = _git(root, "rev-list", "--count", "HEAD")
    if not commit or not count:
        return None
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    suffix = ".dirty" if dirty else ""
    return f"{_NEXT_RELEASE}.dev{count}+g{commit}{suffix}", commit + ("-dirty" if dirty else "")


def _installed() -> tuple[str, str]:
    try:
        from ._version import __commit_id__, __version__
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("robopol-clean"), ""
        except PackageNotFoundError:
            return f"{_NEXT_RELEASE}.dev0", ""
    return __version__, (__commit_id__ or "").removeprefix("g")


__version__, __commit__ = _from_checkout() or _installed()
