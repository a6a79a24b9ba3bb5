"""Sphinx configuration of the documentation site (MyST markdown pages, the furo theme).

Built strictly, so that a broken link, a missing anchor or image, or a bad reference fails:

    .venv/bin/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html
"""

project = "Circuit Workbench"
author = "Circuit Workbench contributors"
copyright = "2026, Circuit Workbench contributors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `[text](page.md#a-heading)` links resolve to headings down to level 4, and a missing one warns
myst_heading_anchors = 4

html_theme = "furo"
html_title = "Circuit Workbench"
html_static_path: list[str] = []
nitpicky = True
