"""nbdev's doc processors, with one tolerance: an example cell that nbdev runs only because it imports something.

nbdev's `exec_show_docs` runs export cells, `show_doc` cells *and any cell containing an import*; a cell mixing an
import with example code (nbdev's FAQ warns against it) then fails for lack of the example's variables and stops
the whole page. Here such a failure is reported and skipped; a failing export or `show_doc` cell still fails.
"""
from __future__ import annotations

import sys

from nbdev.processors import FilterDefaults, exec_show_docs

_SHOW = {"export", "exports", "exporti", "exec_doc"}


class exec_show_docs_tolerant(exec_show_docs):
    "`exec_show_docs` that skips (with a warning) a non-export cell run only for its imports."
    def __call__(self, cell):
        try:
            super().__call__(cell)
        except Exception as e:
            if (cell.directives_.keys() & _SHOW) or "show_doc(" in cell.source:
                raise
            self.k.exc = None
            print(f"WARNING {getattr(self.nb, 'frontmatter_', {}).get('title', '')}: cell {cell.idx_} mixes imports "
                  f"with example code ({type(e.__cause__).__name__}); nbdev_docs would stop here", file=sys.stderr)


class SiteProcs(FilterDefaults):
    "nbdev's FilterDefaults with the tolerant show_doc executor."
    def base_procs(self):
        return [exec_show_docs_tolerant if p is exec_show_docs else p for p in super().base_procs()]
