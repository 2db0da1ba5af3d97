"""Build mmlit's documentation as an offline HTML site, without Quarto.

    python tools/build_docs.py [OUT_DIR] [--workers N] [--only GLOB]

Every notebook in `nbs/` becomes one page, executed (cells flagged `slow`/`notest` skipped, as
`nbdev-test` does) so its outputs and plots are on the page, then passed through nbdev's own docs
processors (hidden cells dropped, directives removed, a `show_doc` entry for every exported
function and class) and rendered with `jupyter nbconvert`'s HTML exporter. Each page gets a
sidebar linking every page; `index.ipynb` is `index.html`. Page names follow nbdev's: the
numeric prefix is dropped (`07_viz.ipynb` → `viz.html`). A notebook's title cell should hold only
`# title` and `> summary`: nbdev takes that cell as the page's front matter and drops it whole, so
anything else in it is moved to a cell of its own here (with a warning). `tools/readme.py` builds
README.md from `index.ipynb` with the same steps.

On a machine with Quarto, `nbdev-docs` builds the published site from `nbs/_quarto.yml` instead.
"""
from __future__ import annotations

import argparse
import fnmatch
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_FLAGS = ["slow", "notest"]


def page_name(nb: Path) -> str:
    "nbdev's page name of a notebook: `07_viz.ipynb` → `viz.html`."
    return re.sub(r"^\d+[a-z]?_", "", nb.stem) + ".html"


def notebooks(nbs: Path, only: str | None = None) -> list[Path]:
    "The notebooks of the site in navigation order: index first, then by file name."
    nbs_list = sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    if only: nbs_list = [p for p in nbs_list if p.name == "index.ipynb" or fnmatch.fnmatch(p.name, only)]
    return sorted(nbs_list, key=lambda p: (p.name != "index.ipynb", p.name))


def _frontmatter(nb) -> dict:
    "Title and description from the notebook's `# title` / `> summary` cell (what nbdev turns into front matter)."
    for c in nb["cells"]:
        if c["cell_type"] != "markdown": continue
        src = "".join(c["source"])
        m = re.match(r"\s*#\s+(.+?)\s*\n(?:\s*\n)*(?:>\s*(.+))?", src + "\n")
        if m: return {"title": m.group(1).strip(), "description": (m.group(2) or "").strip()}
        break
    return {}


def split_title_cell(nb, name: str = "") -> bool:
    """Leave only `# title` and `> summary` in the notebook's title cell, the rest in a markdown cell right after it.

    nbdev reads the first markdown cell with a `# title` line as the page's front matter and drops that whole cell
    (`nbdev-docs` and `nbdev-readme` alike), so any other text in it would be missing from the page."""
    from fastcore.nbio import md_frontmatter, mk_cell
    i = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and md_frontmatter(c.source)), None)
    if i is None: return False
    lines = nb.cells[i].source.splitlines()
    t = next(k for k, l in enumerate(lines) if re.match(r"#\s+\S", l))
    end = t + 1
    while end < len(lines) and not lines[end].strip(): end += 1
    while end < len(lines) and lines[end].startswith(">"): end += 1
    head, rest = lines[t:end], lines[:t] + lines[end:]
    if not "".join(rest).strip(): return False
    print(f"{name}: its title cell holds more than `# title` and `> summary`; nbdev drops that whole cell, so the rest "
          "is put in a cell of its own here: do the same in the notebook", file=sys.stderr)
    nb.cells[i].source = "\n".join(head).rstrip()
    nb.cells.insert(i + 1, mk_cell("\n".join(rest).strip("\n"), "markdown"))
    return True


def process_notebook(src: Path, work: Path):
    """Execute the notebook `src` (a copy: it is overwritten) and pass it through nbdev's docs processors.

    `work` holds `pyproject.toml` (nbdev reads its settings from there). Returns `(meta, nb)`: the page's title and
    summary, and the processed notebook with its outputs, directives removed and hidden cells dropped."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    from fastcore.nbio import mk_cell, read_nb, write_nb
    from nbdev.test import test_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, add_show_docs, exec_show_docs, populate_language
    meta = _frontmatter(json.loads(src.read_text()))
    cwd = os.getcwd()
    os.chdir(work)                          # nbdev's processors read pyproject.toml from here
    try:
        nb = read_nb(src)                   # 1. a show_doc cell for every exported name that has none
        split_title_cell(nb, src.name)
        NBProcessor(nb=nb, procs=[populate_language, add_show_docs], rm_directives=False).process()
        for c in nb.cells:
            for k in [k for k in c if k.endswith("_") or k in ("has_sd", "idx_")]: del c[k]
        nb.cells.insert(0, mk_cell("#| hide\nfrom nbdev.showdoc import show_doc", "code"))   # as nbdev's exec_show_docs does
        write_nb(nb, src)
        # 2. run the whole notebook, as nbdev-test does, keeping the outputs (in `src`, a copy)
        ok, _ = test_nb(src, skip_flags=SKIP_FLAGS, save=True, profile=False, showerr=True)
        if not ok: raise RuntimeError(f"{src.name}: a cell failed while executing the notebook (see the traceback above)")
        # 3. nbdev's docs processors, minus re-executing show_doc cells (their outputs are already there)
        nb = read_nb(src)
        class Procs(FilterDefaults):
            def base_procs(self): return [p for p in super().base_procs() if p is not exec_show_docs]
        Procs()(nb)
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"): c.source = ""   # front matter: our own title instead
        if c.cell_type == "code":
            lines = c.source.splitlines()
            if "echo: false" in {l[2:].strip() for l in lines if l.startswith("#|")}:
                c.metadata.setdefault("tags", []).append("remove_input")
            c.source = "\n".join(l for l in lines if not l.startswith("#|"))
        for k in [k for k in c if k not in ("cell_type", "id", "metadata", "source", "outputs", "execution_count", "attachments")]:
            del c[k]                        # nbdev's working keys (directives_, has_sd, ...) are not notebook format
        c.metadata.pop("execution", None)   # execnb's timings (not in the notebook schema's form)
    nb.cells = [c for c in nb.cells if c.get("source") or c.get("outputs")]
    return meta, nb


def build_page(args: tuple[str, str, str]) -> dict:
    "Execute, process and render one notebook as an HTML page (run in a worker process)."
    src, work, out = map(Path, args)
    import nbconvert, nbformat
    from fastcore.nbio import write_nb
    from traitlets.config import Config
    t0 = time.perf_counter()
    meta, nb = process_notebook(src, work)
    write_nb(nb, work / "processed" / src.name)
    node = nbformat.read(work / "processed" / src.name, as_version=4)
    cfg = Config()
    cfg.TagRemovePreprocessor.enabled = True
    cfg.TagRemovePreprocessor.remove_input_tags = {"remove_input"}
    cfg.HTMLExporter.exclude_input_prompt = cfg.HTMLExporter.exclude_output_prompt = True
    body, _ = nbconvert.HTMLExporter(config=cfg, template_name="lab").from_notebook_node(node)
    Path(out).write_text(body, encoding="utf-8")
    return {"notebook": src.name, "page": Path(out).name, **meta, "seconds": round(time.perf_counter() - t0, 1)}


def _nav(pages: list[dict], current: str) -> str:
    items = "".join(
        f'<li{" class=current" if p["page"] == current else ""}><a href="{p["page"]}">{html.escape(p.get("title") or p["page"])}</a>'
        f'<div class=desc>{html.escape(p.get("description", ""))[:110]}</div></li>' for p in pages)
    return f'<nav class="mmlit-nav"><a class=home href="index.html">mmlit docs</a><ul>{items}</ul></nav>'


_NAV_CSS = """<style>
nav.mmlit-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 250px; overflow-y: auto; background: #f4f6f8;
  border-right: 1px solid #dde2e7; padding: 14px 12px; font: 14px system-ui, sans-serif; box-sizing: border-box; }
nav.mmlit-nav .home { font-weight: 700; font-size: 17px; color: #1d232a; text-decoration: none; }
nav.mmlit-nav ul { list-style: none; padding: 0; margin: 12px 0 0; }
nav.mmlit-nav li { margin: 0 0 10px; } nav.mmlit-nav li.current > a { font-weight: 700; }
nav.mmlit-nav .desc { color: #6a737d; font-size: 11.5px; line-height: 1.3; }
body.jp-Notebook, body { margin-left: 260px !important; }
.mmlit-title { margin: 18px 0 0 20px; font: 700 30px system-ui, sans-serif; }
.mmlit-sub { margin: 4px 0 10px 20px; color: #5a6570; font: 15px system-ui, sans-serif; }
</style>"""


def finish_pages(out: Path, pages: list[dict]) -> None:
    "Add the sidebar and title to every page; point `.ipynb` links at the pages."
    by_nb = {p["notebook"]: p["page"] for p in pages}
    for p in pages:
        f = out / p["page"]
        text = f.read_text(encoding="utf-8")
        for nb, page in by_nb.items(): text = text.replace(f'href="{nb}', f'href="{page}')
        text = re.sub(r'\{target="_blank"[^}]*\}', "", text)        # Pandoc link attributes of nbdev's "source" links
        title = (f'<h1 class="mmlit-title">{html.escape(p["title"])}</h1>' if p.get("title") else "") + \
                (f'<p class="mmlit-sub">{html.escape(p["description"])}</p>' if p.get("description") else "")
        text = text.replace("</head>", _NAV_CSS + "</head>", 1)
        text = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(pages, p["page"]) + title, text, count=1)
        if p.get("title"): text = re.sub(r"<title>.*?</title>", f"<title>mmlit: {html.escape(p['title'])}</title>", text, count=1, flags=re.S)
        f.write_text(text, encoding="utf-8")


def build_site(out: str | Path, workers: int = 2, only: str | None = None) -> list[dict]:
    "Build the site into `out`; returns one dict per page (notebook, page, title, seconds)."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmlit-docs-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "nbs", work / "nbs")             # executed copies: the sources stay clean
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        (work / "tests").symlink_to(ROOT / "tests")              # notebooks may import test fixtures as ../tests
        (work / "processed").mkdir()
        nbs = notebooks(work / "nbs", only)
        jobs = [(str(nb), str(work), str(out / page_name(nb))) for nb in nbs]
        env_path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
        if workers > 1:
            import multiprocessing
            sys.path.insert(0, str(Path(__file__).parent))
            import build_docs   # by module name: executing a notebook replaces a worker's __main__
            # a fresh process per notebook: a notebook's registrations and globals must not leak into the next
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as ex:
                pages = list(ex.map(build_docs.build_page, jobs))
        else:
            import subprocess   # one process per notebook here too
            pages = [json.loads(subprocess.run([sys.executable, __file__, "--page", json.dumps(j)], check=True,
                                               capture_output=True, text=True).stdout.splitlines()[-1]) for j in jobs]
    finish_pages(out, pages)
    (out / "pages.json").write_text(json.dumps(pages, indent=1))
    return pages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(ROOT / "_site"), help="output directory (default: _site)")
    ap.add_argument("--workers", type=int, default=2, help="notebooks built in parallel (default: 2)")
    ap.add_argument("--only", help="build only the notebooks matching this glob (and the index)")
    ap.add_argument("--page", help=argparse.SUPPRESS)   # internal: build one page, print its JSON
    a = ap.parse_args(argv)
    if a.page: print(json.dumps(build_page(tuple(json.loads(a.page))))); return 0
    t0 = time.perf_counter()
    pages = build_site(a.out, a.workers, a.only)
    for p in pages: print(f"{p['page']:<18} {p['seconds']:>6.1f}s  {p.get('title', '')}")
    print(f"{len(pages)} pages in {a.out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__": sys.exit(main())
