"""Sphinx configuration of the histovi documentation (build: `sphinx-build -W -b html docs docs/_build/html`)."""

import os
from importlib.metadata import version as _version

project = "histovi"
author = "histovi developers"
copyright = "2026, histovi developers"  # noqa: A001
try:
    release = _version("histovi")
except Exception:  # pragma: no cover - docs built from a source tree without install
    release = "0.0.0"
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "sphinxcontrib.bibtex",
]

# Tutorials are committed executed (see tutorials/README); the docs only render them.
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "comma"
always_document_param_types = False

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}
# Offline builds (.ci/docs sets HISTOVI_DOCS_OFFLINE=1 unless told otherwise) skip the
# inventories, which -W would otherwise turn into errors; links to other projects then render as
# plain text. Read the Docs has network and gets the links.
if os.environ.get("HISTOVI_DOCS_OFFLINE", "0") == "1":
    intersphinx_mapping = {}
intersphinx_timeout = 5
nitpicky = False
suppress_warnings = ["config.cache", "intersphinx.external", "myst.header"]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
html_theme = "sphinx_book_theme"
html_title = "histovi"
html_static_path = []
html_theme_options = {
    "repository_url": "https://github.com/histovi/histovi",
    "use_repository_button": False,
    "show_toc_level": 2,
}

# The tutorials are kept at the top of the repository (tutorials/*.ipynb) and copied next to
# these pages at build time, since Sphinx only reads sources below its source folder.
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

_here = Path(__file__).resolve().parent
_nb_out = _here / "generated_tutorials"
_nb_out.mkdir(exist_ok=True)
for _nb in sorted((_here.parent / "tutorials").glob("*.ipynb")):
    _dst = _nb_out / _nb.name
    if not _dst.exists() or _dst.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dst)
