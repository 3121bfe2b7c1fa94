"""Sphinx configuration for robopol-clean (the shared sphinx-astropy v2 settings, adapted).

Build with ``sphinx-build -W -b html docs docs/_build/html`` (or ``tox -e build_docs``).
The build needs no network: intersphinx is off unless ROBOPOL_DOCS_INTERSPHINX=1.
"""

import os
import sys
from pathlib import Path

from sphinx_astropy.conf.v2 import *  # the Astropy-ecosystem defaults

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

# -- Project -------------------------------------------------------------------------
project = "robopol-clean"
author = "the robopol-clean developers"
copyright = f"2026, {author}"
from robopol_clean import __version__ as release  # noqa: E402 (the checkout's true version)

version = ".".join(release.split(".")[:2])

# -- Extensions ----------------------------------------------------------------------
extensions += [  # noqa: F405 (from the star import)
    "robopol_docs",  # docs/_ext: the command-line reference and the optional demo figure
]

# Inheritance diagrams need Graphviz, which a bare machine lacks: leave them out.
automodapi_inheritance_diagram = False
automodsumm_inherited_members = False
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

# Offline by default (CI has no internet): a failed inventory download is a warning,
# and warnings are errors. Set ROBOPOL_DOCS_INTERSPHINX=1 to link to other projects.
if os.environ.get("ROBOPOL_DOCS_INTERSPHINX") != "1":
    intersphinx_mapping = {}
else:
    intersphinx_mapping.update(  # noqa: F405
        {
            "ccdproc": ("https://ccdproc.readthedocs.io/en/latest/", None),
            "photutils": ("https://photutils.readthedocs.io/en/stable/", None),
            "regions": ("https://astropy-regions.readthedocs.io/en/stable/", None),
        }
    )

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "generated"]  # generated/: included pieces
default_role = "obj"
nitpicky = False

# -- HTML ----------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"{project} {release}"
html_static_path = [str(HERE / "_static")] if (HERE / "_static").is_dir() else []
html_theme_options = {
    **html_theme_options,  # noqa: F405
    "navigation_depth": 2,
    "show_toc_level": 2,
}
html_last_updated_fmt = None  # reproducible builds
html_show_sourcelink = False
