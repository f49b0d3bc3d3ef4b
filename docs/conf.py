"""Sphinx configuration of the documentation site (rendered from nbdev's `_proc/` by `docs/build.py`)."""
project = "fraud-detection-service"
author = "fraud-detection-service contributors"
copyright = "2026 onwards, fraud-detection-service contributors"
root_doc = "index"
extensions = ["myst_nb"]
exclude_patterns = ["_quarto.yml", "nbdev.yml", "sidebar.yml", "**/.ipynb_checkpoints"]
nb_execution_mode = "off"  # docs/build.py executed the notebooks (nbdev flags honoured) before nbdev's processors
nb_render_markdown_format = "myst"  # show_doc writes markdown tables
nb_mime_priority_overrides = [("html", "text/html", 5)]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "fraud-detection-service"
html_show_sourcelink = False
html_copy_source = False
# the pages are read offline: no MathJax from a CDN (no page uses math), nothing else remote
mathjax_path = "about:blank"
suppress_warnings = ["myst.header", "misc.highlighting_failure", "mystnb.unknown_mime_type", "toc.not_included",
                     "myst.xref_missing", "config.cache"]
html_static_path = ["_static"]
html_css_files = ["site.css"]
