"""The project's own promises: README ↔ index notebook, CI script ↔ README commands, no drift."""
import json
import os
import sys
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md lacks the {marker} block"
    return m.group(1).strip()


def test_readme_has_the_two_setup_commands():
    install, tests = _readme_block("ci:install"), _readme_block("ci:test")
    assert "torch==2.13.0" in install and install.rstrip().endswith("mmlit demo")
    assert tests.index("nbdev-test") < tests.index("pytest tests")
    assert tests.rstrip().endswith("pytest tests"), "pytest must run last so its summary closes the run"


def test_index_notebook_matches_readme():
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    readme = (ROOT / "README.md").read_text()
    body = readme.split("\n", 1)[1].strip()  # without the "# mmlit" title line
    assert body in md, "nbs/index.ipynb and README.md differ: update both"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'readme_block "ci:install"' in ci and 'readme_block "ci:test"' in ci
    out = subprocess.run(["bash", "-c", f"source <(sed -n '/^readme_block()/p' {ROOT/'.ci'/'run'}); cd {ROOT}; readme_block ci:test"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == _readme_block("ci:test")


def test_nbdev_settings_live_in_pyproject():
    import tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["nbdev"]["lib_path"] == "mmlit"
    assert "slow" in cfg["tool"]["nbdev"]["tst_flags"].split()
    assert not (ROOT / "settings.ini").exists()
    assert (ROOT / "nbs" / "_quarto.yml").exists()


def test_readme_tour_runs(tmp_path, monkeypatch):
    "The README's Python tour runs as written (demo data built into a temporary cache)."
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## A tour.*?```python\n(.*?)```", text, re.S)
    assert m, "README.md lacks the tour"
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "MMLIT_CACHE": str(tmp_path)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'pixel_values': (32, 3, 224, 224)" in out.stdout and "'position': 64" in out.stdout
