"""tools/readme.py, on a small notebook: what README.md gets of each kind of cell, and `--check` on drift.
(CI's `.ci/run` runs `python tools/readme.py --check` on nbs/index.ipynb itself.)"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import readme  # noqa: E402


def _nb(tmp_path) -> Path:
    cells = [("markdown", "# Title\n\n> One line."),
             ("code", "#| hide\nimport sys  # hidden plumbing"),
             ("markdown", "Install:\n\n<!-- ci:install -->\n```bash\npip install x\n```"),
             ("code", "print('to stdout')\nprint('to stderr', file=sys.stderr)\n6 * 7"),
             ("code", "#| echo: false\nprint('output without its code')"),
             ("code", "#| slow\nprint('too slow to run here')")]
    nb = {"cells": [{"cell_type": t, "id": f"c{i}", "metadata": {}, "source": s.splitlines(True),
                     **({"outputs": [], "execution_count": None} if t == "code" else {})} for i, (t, s) in enumerate(cells)],
          "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / "index.ipynb"; p.write_text(json.dumps(nb)); return p


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    return tmp, readme.render(_nb(tmp))


def test_title_summary_and_markdown(rendered):
    _, md = rendered
    assert md.startswith("# Title\n\n> One line.\n\n" + readme.NOTE + "\n\nInstall:\n\n<!-- ci:install -->\n```bash\npip install x\n```\n")


def test_code_cells_are_fenced_with_their_text_outputs(rendered):
    _, md = rendered
    assert "```python\nprint('to stdout')" in md
    assert "    to stdout\n" in md and "    42\n" in md                    # stdout and the cell's value, as indented blocks
    assert "print('to stderr', file=sys.stderr)" in md and "    to stderr" not in md              # the code shows; stderr output does not


def test_hidden_cells_directives_and_slow_cells(rendered):
    _, md = rendered
    assert "hidden plumbing" not in md and "#|" not in md
    assert "    output without its code" in md and "print('output without its code')" not in md   # echo: false
    assert "print('too slow to run here')" in md and "    too slow to run here" not in md         # shown, not run


def test_check_names_the_drift(rendered, tmp_path, capsys):
    _, md = rendered
    out = tmp_path / "README.md"
    out.write_text(md)
    assert readme.check(out, md) == 0
    out.write_text(md.replace("pip install x", "pip install y"))
    assert readme.check(out, md) == 1
    err = capsys.readouterr().err
    assert "edit nbs/index.ipynb, run `python tools/readme.py`" in err
    assert "-pip install y" in err and "+pip install x" in err


def test_readme_has_no_link_inside_a_link():
    "nbdev links a backticked API name itself; written by hand as a link after '(' it came out linked twice: [[`x`](url)](url)."
    import re
    nested = re.findall(r"\[\[`[^`]+`\]\([^)]*\)\]\(", (ROOT / "README.md").read_text())
    assert not nested, f"write these API names as plain `name` in nbs/index.ipynb: {nested}"
