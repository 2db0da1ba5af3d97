"""The offline docs site builds (CI runs this): one page per notebook, executed, with show_doc entries, plots and working links."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mistune
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_docs import notebooks, page_name  # noqa: E402


class Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.imgs, self.h3 = [], [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"): self.imgs.append(a["src"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site, built into a temporary directory (or the one MMLIT_DOCS_SITE names, built before with tools/build_docs.py)."
    if os.environ.get("MMLIT_DOCS_SITE"): return Path(os.environ["MMLIT_DOCS_SITE"])
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), str(out), "--workers", "2"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, f"the docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return out


def test_one_page_per_notebook(site):
    want = {page_name(nb) for nb in notebooks(ROOT / "nbs")}
    assert want <= {p.name for p in site.glob("*.html")}
    assert "index.html" in want and "viz.html" in want
    for p in want: assert (site / p).stat().st_size > 20_000, p


def test_navigation_links_resolve(site):
    pages = sorted(site.glob("*.html"))
    for page in pages:
        parser = Links(); parser.feed(page.read_text())
        local = [h.split("#")[0] for h in parser.hrefs if not re.match(r"^(https?:|mailto:|#|data:)", h)]
        assert {p.name for p in pages} <= set(local), f"{page.name}: the sidebar does not link every page"
        broken = [h for h in local if h and not (site / h).exists()]
        assert not broken, f"{page.name} links to missing pages: {broken}"


def test_pages_hold_outputs_api_entries_and_plots(site):
    viz = site.joinpath("viz.html").read_text()
    parser = Links(); parser.feed(viz)
    plots = [s for s in parser.imgs if s.startswith("data:image/png;base64,")]
    assert len(plots) >= 5, f"viz.html embeds {len(plots)} plot images"
    report = site.joinpath("report.html").read_text()
    for page, text, names in (("viz.html", viz, ("plot_training_curves", "save_run_plots", "plot_tokens")),
                              ("report.html", report, ("write_report", "dataset_map"))):
        for name in names:
            assert re.search(rf"<h[234][^>]*>\s*{name}\s*<", text) or f"{name}</h" in text, f"{page}: no show_doc entry for {name}"
        assert "Traceback" not in text, page
    core = site.joinpath("core.html").read_text()
    assert "derive_seed" in core and 'source{target=' not in core


_NOT_CONTENT = re.compile(r"<head.*?</head>|<nav\b.*?</nav>|<style.*?</style>|<script.*?</script>"
                          r"|<h1 class=\"mmlit-title\">.*?</h1>|<p class=\"mmlit-sub\">.*?</p>|<a class=\"anchor-link\".*?</a>", re.S)


def page_text(page: str) -> str:
    "The text a reader sees in a page's main part: not the sidebar, the page's title and summary, styles or scripts."
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", _NOT_CONTENT.sub(" ", page))).split())


def prose_openings(nb: Path, n_words: int = 8) -> list[str]:
    "The first words of every markdown cell of a notebook after its title cell, as the page shows them."
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown"]
    out = []
    for c in cells:
        src = "".join(c["source"])
        if re.match(r"\s*#\s+\S", src): src = re.sub(r"\A\s*#\s.*\n(\s*\n)*(>.*\n?)*", "", src)   # the title cell: title and summary
        words = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", mistune.html(src))).split()).split()
        if words: out.append(" ".join(words[:n_words]))
    return out


MIN_WORDS = 150


def test_every_page_has_content(site):
    "A page holds more than its title and summary: at least MIN_WORDS words of prose, code and outputs."
    short = {p.name: len(page_text(p.read_text()).split()) for p in site.glob("*.html")}
    short = {k: v for k, v in short.items() if v < MIN_WORDS}
    assert not short, f"pages with (almost) nothing besides their title and summary (words of content): {short}"


def test_every_markdown_cell_is_on_its_page(site):
    "Each markdown cell's opening words are on the notebook's page: none is dropped on the way (nbdev drops a title cell whole)."
    missing = []
    for nb in notebooks(ROOT / "nbs"):
        if not (site / page_name(nb)).exists(): continue          # a missing page fails test_one_page_per_notebook
        text = page_text((site / page_name(nb)).read_text())
        missing += [f"{nb.name}: {w!r}" for w in prose_openings(nb) if w not in text]
    assert not missing, "markdown missing from the pages:\n" + "\n".join(missing)


def test_page_text_and_prose_openings(tmp_path):
    "The two helpers above see what a reader sees: no sidebar, no title, and markdown as rendered text."
    page = ('<html><head><title>x</title><style>p {}</style></head><body><nav class="mmlit-nav"><a>core</a></nav>'
            '<h1 class="mmlit-title">mmlit</h1><p class="mmlit-sub">One line.</p><div><h2>A<a class="anchor-link" href="#A">¶</a></h2>'
            '<p>Some <em>real</em> &amp; text</p></div></body></html>')
    assert page_text(page) == "A Some real & text"
    nb = tmp_path / "x.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": ["# T\n", "\n", "> summary\n", "\n", "Kept **bold** `code`"]},
                                        {"cell_type": "code", "source": ["x = 1"]},
                                        {"cell_type": "markdown", "source": ["## A [link](x.html) here"]}]}))
    assert prose_openings(nb) == ["Kept bold code", "A link here"]


def test_nbdev_yml_is_what_nbdev_docs_writes(tmp_path):
    "`nbdev-docs` (with Quarto) first rewrites nbs/nbdev.yml from pyproject.toml: the committed one must be that file."
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs"); shutil.copy(ROOT / "pyproject.toml", tmp_path)
    r = subprocess.run([sys.executable, "-c", "from nbdev.quarto import refresh_quarto_yml; refresh_quarto_yml()"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("nbdev.yml", "_quarto.yml"):
        assert (tmp_path / "nbs" / f).read_text() == (ROOT / "nbs" / f).read_text(), \
            f"nbs/{f} differs from what nbdev writes from pyproject.toml: run nbdev's refresh_quarto_yml() and commit it"
