"""nbdev's doc processors, tolerant of a cell that fails: the page is still built, the failure is shown and reported.

nbdev's `exec_show_docs` runs export cells, `show_doc` cells *and any cell containing an import*, and stops the whole
site at the first error. Two kinds of failure are common: a cell mixing an import with example code (nbdev's FAQ
warns against it: the example's variables do not exist there), and a `show_doc` of a function whose annotations
name a type imported only under `TYPE_CHECKING` (`eval_str=True` cannot resolve it: here those imports are run
for the docs after the cell that declares them). The page is always built:
an example cell run only for its imports is skipped with a warning; a failing export or `show_doc` cell shows the
error in place and is listed in the notebook's metadata (`site_errors`), which `docs/build.py` reports as an error.
"""
from __future__ import annotations

import ast
import sys

from nbdev.processors import FilterDefaults, exec_show_docs

_SHOW = {"export", "exports", "exporti", "exec_doc"}


def type_checking_imports(source: str) -> str:
    "The imports a cell makes only `if TYPE_CHECKING:` (show_doc evaluates annotations, so it needs them)."
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")]
    return "\n".join(ast.unparse(b) for n in blocks for b in n.body if isinstance(b, (ast.Import, ast.ImportFrom)))


class exec_show_docs_tolerant(exec_show_docs):
    "`exec_show_docs` that imports `TYPE_CHECKING`-only names for show_doc, records a failing cell and goes on."
    def __call__(self, cell):
        try:
            super().__call__(cell)
            extra = type_checking_imports(cell.source) if "TYPE_CHECKING" in cell.source and hasattr(self, "k") else ""
            if extra:
                self.k.run_cell(extra)
                self.k.exc = None  # best effort: a missing optional import only leaves its show_doc failing
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
