"""Generators are a pure function of (seed, epoch, index): same in any process and hash seed."""
import ast
import os
import subprocess
import sys

import multiprocessing as mp

from pathlib import Path

import numpy as np
import torch

import mmlit
from mmlit.core import Stream, derive_rngs, derive_seed


def _draw(key):
    r = derive_rngs(*key)
    return r.np.random(3).tolist(), torch.rand(3, generator=r.torch).tolist()


def test_same_in_spawned_processes():
    keys = [(0, 0, 0), (1234, 3, 99), (2**31, 7, 10**6)]
    here = [_draw(k) for k in keys]
    with mp.get_context("spawn").Pool(2) as pool:
        there = pool.map(_draw, keys)
    assert here == there


def test_independent_of_python_hash_seed():
    code = "from mmlit.core import derive_seed; print(derive_seed(5, 2, 11))"
    outs = set()
    for hs in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        outs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True).strip())
    assert outs == {str(derive_seed(5, 2, 11))}


def test_streams_look_independent():
    # numpy and torch generators of one key draw unrelated numbers; neighbouring indices differ
    rngs = [derive_rngs(0, 0, i) for i in range(2000)]
    a = np.array([r.np.random() for r in rngs])
    b = np.array([torch.rand(1, generator=r.torch).item() for r in rngs])
    for x in (a, b):
        assert 0.45 < x.mean() < 0.55
        assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.1
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
    assert not np.allclose(a, b, atol=1e-3)


def _stream_args(tree: ast.AST):
    "Every `stream` a call to derive_seed passes: the keyword, or the fourth positional argument."
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "derive_seed":
            yield from (kw.value for kw in node.keywords if kw.arg == "stream")
            if len(node.args) >= 4: yield node.args[3]


def test_every_stream_comes_from_the_table():
    # a bare number (or a name other than Stream.X) as a stream could collide with another use
    pkg = Path(mmlit.__file__).parent
    bad = []
    for f in sorted(pkg.glob("*.py")):
        if f.name in ("core.py", "_modidx.py"): continue
        for arg in _stream_args(ast.parse(f.read_text())):
            ok = isinstance(arg, ast.Attribute) and getattr(arg.value, "id", None) == "Stream" and arg.attr in Stream.__members__
            if not ok: bad.append(f"{f.name}:{arg.lineno}: {ast.unparse(arg)}")
    assert not bad, "streams not named in mmlit.core.Stream: " + "; ".join(bad)
    assert len(Stream) == len({int(s) for s in Stream})


def test_stream_check_catches_a_bare_number():
    tree = ast.parse("derive_seed(1, 2, 0, stream=4)\nderive_seed(1, 2, 0, 4)\nderive_seed(1, 2, 0, Stream.LOADER_ORDER)")
    got = [ast.unparse(a) for a in _stream_args(tree)]
    assert got == ["4", "4", "Stream.LOADER_ORDER"]

