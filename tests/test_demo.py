"""Demo data: concurrent cache builds, HF `datasets` reads the Parquet's image column as an `Image` feature,
and the demo Parquet streams through `ParquetImageText` with captions matching stored labels."""
import json, os, subprocess, sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmlit.sources import ParquetImageText, JsonlImageText, TextCorpus
from mmlit.demo import DIGIT_WORDS, build_demo_parquet, ensure_demo

ROOT = Path(__file__).resolve().parents[1]


def test_concurrent_ensure_demo(tmp_path):
    "Two processes building the same demo set at once both end up with one intact copy."
    code = ("import sys, json; from mmlit.demo import ensure_demo; "
            "d = ensure_demo(sys.argv[1], n=300, jsonl_n=16); print(json.dumps(str(d['root'])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    roots = {json.loads(p.communicate(timeout=300)[0]) for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(roots) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(roots.pop()).name]   # no leftover build dirs
    d = ensure_demo(tmp_path, n=300, jsonl_n=16)
    assert pq.ParquetFile(d["parquet"][0]).metadata.num_rows == 300


def test_demo_sources_read_by_mmlit_dataset(tmp_path):
    d = ensure_demo(tmp_path, n=300, jsonl_n=16, shards=2)
    ds = ParquetImageText(d["parquet"])
    assert len(ds) == 300 and len(d["parquet"]) == 2
    labels = pq.read_table(d["parquet"][0], columns=["label"])["label"].to_pylist()
    for i in (0, 1, 149):
        rec = ds.get(i)
        assert rec["image"].size == (64, 64) and rec["task"] == "caption" and len(rec["negatives"]) == 11
        assert str(labels[i]) in rec["text"] or DIGIT_WORDS[labels[i]] in rec["text"]
    assert len(JsonlImageText(d["jsonl"])) == 16
    assert len(TextCorpus(d["corpus"])) == len(TextCorpus(d["corpus_jsonl"])) > 50
    # the same documents, indentation included, from the .txt and the JSONL variant
    assert [r["text"] for r in map(TextCorpus(d["corpus"]).get, range(3))] == \
           [r["text"] for r in map(TextCorpus(d["corpus_jsonl"]).get, range(3))]


def test_hf_datasets_reads_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    f = build_demo_parquet(tmp_path / "demo.parquet", n=20)[0]
    ds = datasets.Dataset.from_parquet(str(f), cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[3]["image"].size == (64, 64) and ds[3]["caption"] == pq.read_table(f)["caption"][3].as_py()
