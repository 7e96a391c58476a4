"""Sphinx settings for the boneage site. `boneage docs` copies this file and the pages beside it into a staging
folder with the executed notebooks and the API pages, then builds there; see contributing.md."""
import re

project = "boneage"
author = "the boneage contributors"
copyright = "the boneage contributors; RSNA data: Halabi et al., Radiology 2019"
extensions = ["myst_nb", "sphinx.ext.autodoc"]
root_doc = "index"
exclude_patterns = ["_build", "_site", "**.ipynb_checkpoints"]

nb_execution_mode = "off"      # papermill has executed the course notebooks; the site shows what they produced
nb_merge_streams = True
myst_heading_anchors = 3
html_theme = "furo"            # self-contained: no web fonts or CDN scripts, so every page works offline
html_title = "boneage"
html_static_path = []
html_favicon = "favicon.svg"  # browsers ask for one; without it every page logs a 404
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # Keras callbacks' docstrings are not ours, nor valid reStructuredText
autodoc_default_options = {"members": True}


def _markdown_code(app, what, name, obj, options, lines):
    "Docstrings are written in Markdown (nbdev style): `code` becomes a reStructuredText literal, a bare * stays a star."
    if what == "data":  # a constant has no docstring of its own: autodoc would show its type's
        del lines[:]
        return
    for i, line in enumerate(lines):
        parts = re.split(r"(`[^`]+`)", line)
        lines[i] = "".join(r"\ ``" + p[1:-1] + r"``\ " if k % 2 else p.replace("*", r"\*").replace("_ ", r"\_ ")
                           for k, p in enumerate(parts))


def setup(app):
    app.connect("autodoc-process-docstring", _markdown_code)
