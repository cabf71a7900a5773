"""Sphinx configuration of jaxkd's documentation (built by tests/test_docs.py with warnings as errors).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import os
import shutil
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

# API reference, generated from the docstrings: a page per package (each of its modules a section) or module.
# The pages are written afresh by every build: stale ones (a module since renamed or moved) would name modules
# that no longer import.
shutil.rmtree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "api", "generated"), ignore_errors=True)
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
# The sidebar shows the current branch only. (Rendering the navigation tree on every page is what the theme
# costs; with one API page per module, about 150 pages, it was half of the build's time; see _templates.)
html_theme_options = {"show_toc_level": 2, "navigation_depth": 2, "collapse_navigation": True}

# Not nitpicky: the signatures' annotations name jax, numpy and flax types this offline build has no
# inventory for (jax.Array alone is ~860 unresolved references); a link that fails renders as code.


def resolve_reexports(app, env, node, contnode):
    """Links a reference to a re-exported name (``jaxkd.create``, ``jaxkd.data.Loader``,
    ``jaxkd.losses.reduce_loss``) to where the object is documented: the module that defines it."""
    import importlib

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("jaxkd."):
        return None
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        break
    else:
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or f"{module}.{qualname}" == target:
        return None
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                             f"{module}.{qualname}", node, contnode)


def setup(app):
    app.connect("missing-reference", resolve_reexports)
