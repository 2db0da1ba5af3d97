"""The offline docs site builds (CI runs this): one page per notebook, executed, with show_doc entries, plots and working links."""
import json
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

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
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), str(out), "--workers", "2"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
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
    for name in ("plot_training_curves", "save_run_plots", "write_report", "plot_tokens"):
        assert re.search(rf"<h[234][^>]*>\s*{name}\s*<", viz) or f"{name}</h" in viz, f"no show_doc entry for {name}"
    assert "Traceback" not in viz
    core = site.joinpath("core.html").read_text()
    assert "derive_seed" in core and 'source{target=' not in core


def test_quarto_config_still_builds_with_nbdev_docs():
    "Where Quarto exists, nbdev-docs renders nbs/ with this config: keep it well-formed and pointing at the right places."
    q = yaml.safe_load((ROOT / "nbs" / "_quarto.yml").read_text())
    assert q["project"]["type"] == "website" and "nbdev.yml" in q["metadata-files"]
    nbdev_yml = yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text())
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["nbdev"]
    assert nbdev_yml["project"]["output-dir"] == cfg["doc_path"]
    assert json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"], "the landing page is empty"
