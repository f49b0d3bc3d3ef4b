"""Build the documentation site without Quarto: `python docs/build.py site` (= `make docs`), `... readme`.

nbdev's own `nbdev_docs` needs the Quarto binary, which cannot be installed on machines without internet (the
PyPI `quarto-cli` downloads it at install time). This script does the same steps with Python-only tools:

1. **execute** each notebook of `nbs/` that has no saved outputs, as `nbdev_test` does (in its own folder,
   `IN_TEST=1`, cells flagged `slow`/`kafka`/`notest` or `eval: false` skipped), into `_exec/` (a cache outside
   git: a notebook is run again only when it changed). Notebooks with saved outputs are shown as saved.
2. **process** them with nbdev's own processors (`nbdev.processors.FilterDefaults`, the processors
   `nbdev_proc_nbs` runs: hidden cells dropped, `show_doc` added for every export, directives stripped) into `_proc/`
   (tolerant of a failing cell: the page is built, the failure shown and reported; see docs/nbdev_procs.py).
3. **adapt** for Sphinx: front matter → title, Quarto `echo`/`output`/`include` options → myst-nb tags, Altair
   charts → PNG (vl-convert, offline), a toctree on the front page.
4. **render** `_proc/` with Sphinx + myst-nb (theme furo; via `_build/`) into `_site/`: plain static HTML, no CDN
   assets (checked: the build warns about any page loading a remote script, stylesheet or image).

`readme` writes README.md from `nbs/index.ipynb` (what `nbdev_readme` does with Quarto).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
EXEC, PROC, SITE = ROOT / "_exec", ROOT / "_proc", ROOT / "_site"  # all outside git (.gitignore)
SKIP_FLAGS = {"slow", "kafka", "notest"}  # as `nbdev_test` without --flags
VEGALITE = re.compile(r"application/vnd\.vegalite\.v\d+[+.]json")


def notebooks(only: list[str] | None = None) -> list[Path]:
    "Notebooks of nbs/ (sub-folders too; names starting with `_` or `.` skipped, like nbdev), or the `only` ones."
    found = sorted(p for p in NBS.rglob("*.ipynb")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))
    if not only:
        return found
    want = {o.removesuffix(".ipynb") for o in only}
    picked = [p for p in found if str(p.relative_to(NBS).with_suffix("")) in want or p.stem in want]
    missing = want - {str(p.relative_to(NBS).with_suffix("")) for p in picked} - {p.stem for p in picked}
    if missing:
        raise SystemExit(f"no such notebook(s) in nbs/: {sorted(missing)}")
    return picked


def readme(check: bool = False) -> bool:
    "README.md from nbs/index.ipynb's markdown cells (returns False when `check` finds it out of date)."
    nb = json.loads((NBS / "index.ipynb").read_text())
    text = "\n\n".join("".join(c["source"]).strip("\n") for c in nb["cells"] if c["cell_type"] == "markdown") + "\n"
    out = ROOT / "README.md"
    if check:
        return out.read_text() == text
    out.write_text(text)
    print(f"README.md written from nbs/index.ipynb ({len(text.splitlines())} lines)")
    return True


# -- 1. execute -------------------------------------------------------------------------------------------------
def needs_run(nb: dict) -> bool:
    "A notebook with code and no saved output at all (one with outputs is shown as saved)."
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return bool(code) and not any(c.get("outputs") for c in code)


def execute_one(src: Path, dst: Path) -> str | None:
    "Run `src` like nbdev_test (flags skipped) and save it with outputs at `dst`; the first error, or None."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives

    def skip(cell) -> bool:
        if cell.cell_type != "code" or "nbdev_export(" in cell.source:
            return True
        d = extract_directives(AttrDict(source=cell.source, cell_type="code"), remove=False)
        return d.get("eval:", [""])[0].lower() == "false" or bool(SKIP_FLAGS & d.keys())

    os.environ["IN_TEST"] = "1"
    nb = read_nb(src)
    shell = CaptureShell(src)
    shell.run_cell("import altair as _alt; _alt.renderers.enable('mimetype')")  # the spec itself: no CDN script
    os.chdir(src.parent)
    shell.run_all(nb, exc_stop=False, preproc=skip)
    write_nb(nb, dst)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return f"{errors[0]['ename']}: {errors[0]['evalue']}"[:300] if errors else None


def execute(nbs: list[Path], jobs: int) -> list[str]:
    "Executed copies of `nbs` under _exec/ (cached by mtime); the failures as messages."
    failures: list[str] = []

    def one(src: Path) -> None:
        rel = src.relative_to(NBS)
        dst = EXEC / rel
        if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not needs_run(json.loads(src.read_text())):
            shutil.copy2(src, dst)
            return
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "_execute", str(src), str(dst)], capture_output=True, text=True)
        msg = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode or msg.startswith("ERROR"):
            failures.append(f"{rel}: {msg or r.stderr.strip()[-300:]}")
            dst.unlink(missing_ok=True)  # run again next time
        print(f"  executed {rel} in {time.time() - t:.0f} s{' (with errors)' if r.returncode or msg else ''}", flush=True)

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, nbs))
    return failures


# -- 2. nbdev's processors ---------------------------------------------------------------------------------------
def process(nbs: list[Path], jobs: int) -> None:
    "nbdev's doc processors (what `nbdev_proc_nbs` runs) over the executed notebooks, into _proc/."
    import nbdev.serve_drv
    from fastcore.parallel import parallel
    sys.path.insert(0, str(ROOT / "docs"))
    from nbdev_procs import SiteProcs
    shutil.rmtree(PROC, ignore_errors=True)
    items = []
    for src in nbs:
        dst = PROC / src.relative_to(NBS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        items.append((EXEC / src.relative_to(NBS), dst, SiteProcs))
    parallel(nbdev.serve_drv.main, items, n_workers=jobs, pause=0.01, method="spawn")


# -- 3. adapt for Sphinx + myst-nb -------------------------------------------------------------------------------
QUARTO_TAGS = {("echo", "false"): "remove-input", ("output", "false"): "remove-output", ("include", "false"): "remove-cell"}


def _front_matter(cell: dict) -> str | None:
    "A raw `---` YAML cell (nbdev's front matter) as a markdown title and summary."
    import yaml
    src = "".join(cell["source"]).strip()
    if cell["cell_type"] != "raw" or not src.startswith("---"):
        return None
    fm = yaml.safe_load(src.strip("-\n")) or {}
    return f"# {fm.get('title', '')}\n\n> {fm['description']}" if fm.get("description") else f"# {fm.get('title', '')}"


def _chart_png(spec: dict) -> str:
    import vl_convert as vlc
    return base64.b64encode(vlc.vegalite_to_png(spec, scale=1.5)).decode()


def adapt(path: Path) -> list[str]:
    "Front matter → title, Quarto cell options → myst-nb tags, Vega-Lite outputs → PNG; the cells nbdev could not run."
    nb = json.loads(path.read_text())
    errors = nb["metadata"].pop("site_errors", [])
    for cell in nb["cells"]:
        for k in set(cell) - {"cell_type", "id", "metadata", "source", "outputs", "execution_count", "attachments"}:
            cell.pop(k)  # nbdev's bookkeeping (`has_sd`, ...) is not valid nbformat
        md = _front_matter(cell)
        if md is not None:
            cell.update(cell_type="markdown", source=md)
            cell.pop("outputs", None); cell.pop("execution_count", None)
            continue
        if cell["cell_type"] != "code":
            continue
        lines, tags = "".join(cell["source"]).splitlines(keepends=True), cell.setdefault("metadata", {}).setdefault("tags", [])
        while lines and lines[0].startswith("#|"):
            key, _, val = lines.pop(0)[2:].strip().partition(":")
            tag = QUARTO_TAGS.get((key.strip(), val.strip().lower()))
            if tag: tags.append(tag)
        cell["source"] = "".join(lines)
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            spec = next((v for k, v in data.items() if VEGALITE.fullmatch(k)), None)
            if spec is not None:
                out["data"] = {"image/png": _chart_png(spec), "text/plain": "<Altair chart>"}
            md = data.get("text/markdown")
            if md is not None:  # show_doc starts with a rule, which docutils does not allow inside an output
                md = "".join(md)
                data["text/markdown"] = md[3:].lstrip("\n") if md.startswith("---") else md
    path.write_text(json.dumps(nb, indent=1))
    return errors


def add_toctree(nbs: list[Path]) -> None:
    "The front page lists every page (Sphinx's navigation): modules, then each sub-folder (tutorials)."
    index = PROC / "index.ipynb"
    nb = json.loads(index.read_text())
    pages = [p.relative_to(NBS).with_suffix("").as_posix() for p in nbs if p.name != "index.ipynb"]
    groups: dict[str, list[str]] = {}
    for p in pages:
        groups.setdefault(p.split("/")[0].replace("_", " ").capitalize() if "/" in p else "Modules", []).append(p)
    for caption, items in groups.items():
        src = "```{toctree}\n:hidden:\n:caption: " + caption + "\n\n" + "\n".join(items) + "\n```"
        nb["cells"].append({"cell_type": "markdown", "id": f"toc{len(nb['cells'])}", "metadata": {}, "source": src})
    index.write_text(json.dumps(nb, indent=1))


# -- 4. render -------------------------------------------------------------------------------------------------
def render(jobs: int, out: Path, work: Path) -> None:
    "Sphinx into work/_build (myst-nb keeps its image folder beside the HTML folder), then the HTML to `out`."
    build = work / "_build"
    shutil.rmtree(build, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", str(jobs), "-c", str(ROOT / "docs"),
           "-d", str(build / "doctrees"), str(PROC), str(build / "html")]
    subprocess.run(cmd, check=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(build / "html", out)


def remote_assets(site: Path) -> list[str]:
    "Scripts, stylesheets and images the pages would fetch from the internet (none expected)."
    pat = re.compile(r"""<(?:script|link|img)\b[^>]*?(?:src|href)=["'](https?://[^"']+)""")
    return sorted({f"{p.relative_to(site)}: {u}" for p in site.rglob("*.html") for u in pat.findall(p.read_text())
                   if not u.startswith("https://github.com")})


def site(only: list[str] | None, jobs: int, out: Path, keep_going: bool, work: Path = ROOT) -> int:
    global EXEC, PROC
    EXEC, PROC = work / "_exec", work / "_proc"
    t0 = time.time()
    nbs = notebooks(only)
    if (NBS / "index.ipynb") not in nbs:
        nbs.insert(0, NBS / "index.ipynb")
    print(f"1/4 executing notebooks without saved outputs ({len(nbs)} pages; cache {EXEC})", flush=True)
    failures = execute(nbs, jobs)
    nbs = [p for p in nbs if (EXEC / p.relative_to(NBS)).exists()]
    print(f"2/4 nbdev processors → {PROC} (at {time.time() - t0:.0f} s)", flush=True)
    process(nbs, jobs)
    print(f"3/4 adapting for myst-nb (at {time.time() - t0:.0f} s)", flush=True)
    for p in nbs:
        failures += [f"{p.relative_to(NBS)} (show_doc) {e}" for e in adapt(PROC / p.relative_to(NBS))]
    add_toctree(nbs)
    print(f"4/4 Sphinx + myst-nb → {out} (at {time.time() - t0:.0f} s)", flush=True)
    render(jobs, out, work)
    remote = remote_assets(out)
    for r in remote:
        print(f"WARNING: page loads a remote asset: {r}")
    for f in failures:
        print(f"ERROR executing {f}")
    print(f"site: {out / 'index.html'} ({len(nbs)} pages, {time.time() - t0:.0f} s)")
    return 1 if failures and not keep_going else 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "_execute":  # worker: one notebook in a fresh process
        err = execute_one(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())
        print(f"ERROR {err}" if err else "")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("site", help="build the HTML site into _site/")
    s.add_argument("--only", nargs="*", help="notebook names (e.g. 01_simulate tutorials/01_explore_data); default all")
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--out", type=Path, default=SITE)
    s.add_argument("--work", type=Path, default=ROOT, help="folder for the _exec/ cache and _proc/ (default: the checkout)")
    s.add_argument("--keep-going", action="store_true", help="exit 0 even when a notebook failed to execute")
    r = sub.add_parser("readme", help="write README.md from nbs/index.ipynb")
    r.add_argument("--check", action="store_true", help="exit 1 if README.md differs from nbs/index.ipynb")
    a = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "docs"), *filter(None, [os.environ.get("PYTHONPATH")])])
    import fraud_detection  # noqa: F401 - its __init__ sets OMP_WAIT_POLICY before a notebook loads xgboost
    if a.cmd == "readme":
        ok = readme(a.check)
        if not ok: print("README.md is not what nbs/index.ipynb generates: run `make readme`")
        return 0 if ok else 1
    return site(a.only, a.jobs, a.out.resolve(), a.keep_going, a.work.resolve())


if __name__ == "__main__":
    sys.exit(main())
