"""Sphinx configuration of jaxkd's documentation (built by tests/test_docs.py with warnings as errors).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's jaxkd, also without `pip install -e .`
# Importing jaxkd needs no device; keep the docs build on the CPU and away from any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "jaxkd"
copyright = "jaxkd authors"
author = "jaxkd authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the notebooks, rendered from their stored outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings' Google-style "Args:" / "Returns:" sections
    # sphinx.ext.viewcode (a highlighted copy of every module's source) would add ~13 s of CPU to every build.
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary writes its pages in reST
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# MyST: `#`-anchors for headings up to ###, so pages link to each other's sections as the README did.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# Notebooks are executed by tests/test_notebooks.py and committed with their outputs (plots included);
# the docs render those outputs instead of executing again.
nb_execution_mode = "off"

# API reference: one page per module, generated from the docstrings.
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields of their class: as `.. attribute::` entries they would document a Linen
# dataclass field (`dtype`) a second time next to autodoc's own entry.
napoleon_use_ivar = True

html_theme = "sphinx_book_theme"
html_title = "jaxkd"
# The sidebar shows the current branch only: rendering the whole navigation tree (about 150 API pages) on
# every page was half of the build's time.
html_theme_options = {"show_toc_level": 2, "navigation_depth": 2, "collapse_navigation": True}
