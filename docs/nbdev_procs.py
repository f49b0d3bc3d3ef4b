"""nbdev's doc processors, tolerant of a cell that fails: the page is still built, the failure is shown and reported.

nbdev's `exec_show_docs` runs export cells, `show_doc` cells *and any cell containing an import*, and stops the whole
site at the first error. Two kinds of failure are common: a cell mixing an import with example code (nbdev's FAQ
warns against it: the example's variables do not exist there), and a `show_doc` of a function whose annotations
name a type imported only under `TYPE_CHECKING` (`eval_str=True` cannot resolve it). Here the page is still built:
an example cell run only for its imports is skipped with a warning; a failing export or `show_doc` cell shows the
error in place and is listed in the notebook's metadata (`site_errors`), which `docs/build.py` reports as an error.
"""
from __future__ import annotations

import sys

from nbdev.processors import FilterDefaults, exec_show_docs

_SHOW = {"export", "exports", "exporti", "exec_doc"}


class exec_show_docs_tolerant(exec_show_docs):
    "`exec_show_docs` that records a failing cell and goes on."
    def __call__(self, cell):
        try:
            super().__call__(cell)
        except Exception as e:
            self.k.exc = None
            cause = e.__cause__ or e
            msg = f"{type(cause).__name__}: {cause}"[:300]
            title = getattr(self.nb, "frontmatter_", {}).get("title", "")
            if (cell.directives_.keys() & _SHOW) or "show_doc(" in cell.source:
                self.nb.metadata.setdefault("site_errors", []).append(f"cell {cell.idx_}: {msg}")
                cell.outputs = [{"output_type": "stream", "name": "stderr",
                                 "text": f"(the documentation build could not run this cell: {msg})\n"}]
                print(f"ERROR {title}: cell {cell.idx_}: {msg}", file=sys.stderr)
            else:
                print(f"WARNING {title}: cell {cell.idx_} mixes imports with example code ({type(cause).__name__}); "
                      "skipped (nbdev_docs would stop here)", file=sys.stderr)


class SiteProcs(FilterDefaults):
    "nbdev's FilterDefaults with the tolerant show_doc executor."
    def base_procs(self):
        return [exec_show_docs_tolerant if p is exec_show_docs else p for p in super().base_procs()]
