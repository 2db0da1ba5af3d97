"""`nbdev-docs` runs, with nothing else of a notebook before them, its exported and `show_doc` cells and EVERY cell
holding an import anywhere (nbdev's `_do_eval`). Such a cell must not use a name that only a skipped cell defines.

Two checks. A static one, per notebook (a second or so): nbdev's own `_do_eval` picks the cells; a name a picked cell reads must be a builtin,
bound in that cell, or bound by an earlier picked cell (or be nbdev's `show_doc`). And the real thing: nbdev's `proc_nbs` (what `nbdev-proc-nbs` runs) over a copy of
`nbs/` (about 10-20 s), which also catches what a static check cannot (a path relative to the working directory)."""
import ast
import builtins
from pathlib import Path

import pytest
from nbdev.process import NBProcessor
from nbdev.processors import _do_eval

NBS = Path(__file__).resolve().parents[1] / "nbs"


def _bound(tree: ast.AST) -> set[str]:
    "Every name `tree` binds anywhere: assignments, loop and `with` targets, defs, classes, imports, arguments."
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)): out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(n.name)
        elif isinstance(n, ast.alias): out.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.arg): out.add(n.arg)
        elif isinstance(n, ast.ExceptHandler) and n.name: out.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)): out.update(n.names)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name: out.add(n.name)
    return out


def _reads(tree: ast.AST) -> tuple[set[str], set[str]]:
    "Names `tree` reads when it runs, and names read only inside function bodies (when those are called, maybe later)."
    now, later = set(), set()
    def visit(n, deferred):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load): (later if deferred else now).add(n.id)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in [*n.decorator_list, *n.args.defaults, *filter(None, n.args.kw_defaults)]: visit(d, deferred)
            for b in [*n.body, n.args, *([n.returns] if n.returns else [])]: visit(b, True)   # annotations: deferred too
        elif isinstance(n, ast.Lambda): visit(n.args, deferred); visit(n.body, True)
        else:
            for c in ast.iter_child_nodes(n): visit(c, deferred)
    visit(tree, False)
    return now, later


def unbound_in_docs_cells(path: Path) -> list[str]:
    "One line per cell `nbdev-docs` runs that reads a name no earlier run cell (nor the cell itself) binds."
    nb = NBProcessor(path, procs=[]).nb
    known, bad, deferred = set(dir(builtins)) | {"show_doc", "__file__", "get_ipython"}, [], []
    for cell in nb.cells:
        if not _do_eval(cell): continue
        trees = cell.parsed_()
        bound = set().union(*(_bound(t) for t in trees))
        now, later = (set().union(*x) for x in zip(*(_reads(t) for t in trees)))
        deferred.append((cell, later - bound))
        if missing := sorted(now - bound - known): bad.append(_msg(path, cell, missing))
        known |= bound
    flagged = {b.split(":")[0] for b in bad}
    bad += [m for cell, later in deferred if later - known and (m := _msg(path, cell, sorted(later - known))).split(":")[0] not in flagged]
    return bad


def _msg(path, cell, missing):
    return (f"{path.name} cell {cell.idx_} (id {cell.get('id')}): {missing} come from cells nbdev-docs skips; "
            f"move the cell's imports into the notebook's `#| hide` import cell")


def test_rule_catches_an_import_cell_using_a_skipped_cells_name(tmp_path):
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("tmp = 1"),
                                         nbformat.v4.new_code_cell("import os\nprint(os.sep, tmp)"),
                                         nbformat.v4.new_code_cell("#| export\nimport re\ndef f(): return re")])
    nbformat.write(nb, tmp_path / "x.ipynb")
    bad = unbound_in_docs_cells(tmp_path / "x.ipynb")
    assert len(bad) == 1 and "cell 1 " in bad[0] and "['tmp']" in bad[0], bad


@pytest.mark.parametrize("nb", sorted(p.name for p in NBS.glob("*.ipynb")))
def test_docs_cells_run_alone(nb):
    assert not (bad := unbound_in_docs_cells(NBS / nb)), "\n".join(bad)


def test_nbdev_docs_processors_run(tmp_path):
    """nbdev's own docs step (`exec_show_docs` and the other processors) over every notebook, in a copy: the `proc_nbs`
    that `nbdev-proc-nbs` runs, called directly because `nbdev-proc-nbs` first tries to install Quarto (with sudo)."""
    import os, shutil, subprocess, sys
    root = NBS.parent
    shutil.copytree(NBS, tmp_path / "nbs"); shutil.copy(root / "pyproject.toml", tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MPLBACKEND": "Agg",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from nbdev.serve import proc_nbs; proc_nbs(n_workers=2, force=True)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    assert {p.name for p in (tmp_path / "_proc").glob("*.ipynb")} == {p.name for p in NBS.glob("*.ipynb")}
