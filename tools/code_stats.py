"""Readability figures of the notebooks and the package, computed from the files.

    python tools/code_stats.py [--json]

Prints: the median non-blank lines of an `#| export` cell, export cells over 70 lines, the largest
module, methods attached by assignment (`Cls.name = fn`), public methods without a docstring,
and the keyword spellings of the image normalisation preset.
"""
from __future__ import annotations

import ast
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = re.compile(r"^\s*#\|\s*export(s|i)?\b")
NORM_SPELLINGS = ("normalize", "normalise", "norm", "normalization", "normalisation")


def export_cells(nbs: Path) -> list[tuple[str, int]]:
    "(notebook, non-blank lines, directives included) of every `#| export` cell."
    out = []
    for nb in sorted(nbs.glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"]).splitlines()
            if c["cell_type"] == "code" and src and any(EXPORT.match(l) for l in src[:3]):
                out.append((nb.stem, sum(1 for l in src if l.strip())))
    return out


def modules(lib: Path) -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text()) for p in sorted(lib.glob("*.py")) if p.name != "_modidx.py"}


def assigned_methods(trees: dict[str, ast.Module]) -> list[str]:
    "`Cls.attr = function` statements at module level (methods attached by assignment)."
    out = []
    for name, t in trees.items():
        classes = {n.name for n in t.body if isinstance(n, ast.ClassDef)}
        for n in t.body:
            if not isinstance(n, ast.Assign): continue
            for tg in n.targets:
                for a in (tg.elts if isinstance(tg, ast.Tuple) else [tg]):
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id in classes:
                        out.append(f"{name}: {a.value.id}.{a.attr}")
    return out


def _is_patch(fn) -> str | None:
    "The class a `@patch` function is attached to, if it is one."
    if not any((isinstance(d, ast.Name) and d.id in ("patch", "patch_to")) or
               (isinstance(d, ast.Call) and getattr(d.func, "id", "") in ("patch", "patch_to")) for d in fn.decorator_list):
        return None
    a = fn.args.args[0].annotation if fn.args.args else None
    return ast.unparse(a) if a is not None else "?"


def public_methods(trees: dict[str, ast.Module]) -> list[tuple[str, bool]]:
    "(qualified name, has docstring) of every public method: in class bodies and `@patch`ed."
    out = []
    for name, t in trees.items():
        for n in t.body:
            if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
                for f in n.body:
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and not f.name.startswith("_"):
                        out.append((f"{name}:{n.name}.{f.name}", ast.get_docstring(f) is not None))
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_"):
                cls = _is_patch(n)
                if cls: out.append((f"{name}:{cls}.{n.name}", ast.get_docstring(n) is not None))
    return out


def norm_keywords(trees: dict[str, ast.Module]) -> set[str]:
    "Spellings of the normalisation preset used as a parameter or a config key."
    found = set()
    for t in trees.values():
        for n in ast.walk(t):
            names = []
            if isinstance(n, ast.arg): names.append(n.arg)
            elif isinstance(n, ast.keyword) and n.arg: names.append(n.arg)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str): names.append(n.value)
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name): names.append(n.target.id)
            found.update(s for s in names if s in NORM_SPELLINGS)
    return found


def stats(root: Path = ROOT) -> dict:
    cells = export_cells(root / "nbs")
    trees = modules(root / "mmlit")
    sizes = {p.name: len(p.read_text().splitlines()) for p in (root / "mmlit").glob("*.py") if p.name != "_modidx.py"}
    meths = public_methods(trees)
    big = max(sizes, key=sizes.get)
    return {
        "export cells": len(cells),
        "median lines of an export cell": statistics.median(n for _, n in cells),
        "export cells over 70 lines": sorted(((nb, n) for nb, n in cells if n > 70), key=lambda x: -x[1]),
        "largest module": f"{big}, {sizes[big]} lines",
        "methods attached by assignment": assigned_methods(trees),
        "public methods without a docstring": f"{sum(not d for _, d in meths)} of {len(meths)}",
        "undocumented": [m for m, d in meths if not d],
        "normalisation preset spellings": sorted(norm_keywords(trees)),
        "LICENSE": (root / "LICENSE").exists(),
    }


if __name__ == "__main__":
    s = stats()
    if "--json" in sys.argv: print(json.dumps(s, indent=1))
    else:
        for k, v in s.items():
            if k == "undocumented" and "-v" not in sys.argv: continue
            print(f"{k:40} {v}")
