"""Hostile inputs for the JSONL, text and Parquet sources, built here: deeply nested JSON lines, text that is
not valid Unicode in every field and source, byte-order marks, damaged shards among good ones, shards with
different schemas, image paths read from another working directory and page checksums that do not match.
Each goes through the dataset under both policies, `mmlit inspect` (text and `--json`) and the loader with
0 and 2 workers: a good record, or a counted bad record naming its file and row/line — never a traceback."""
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli_helpers import inspect_json, run_cli
from ds_files import make_image, pixels, png_bytes, write_jsonl, write_parquet
from mmlit.core import BadRecordError, ConfigError
from mmlit.dataset import check_unicode, make_record
from mmlit.sources import HFDataset, JsonlImageText, ParquetImageText, TextCorpus, TorchDataset
from mmlit.jsonl import MAX_JSON_DEPTH, json_depth
from mmlit.loader import LoaderConfig, make_loader

LONE = "\ud800"                                    # half of a surrogate pair: what JSON's "\ud800" escape gives


def texts_of(rec, rng=None): return rec["text"]
def as_list(batch): return list(batch)


def loader_texts(ds, workers: int) -> tuple[list[str], list]:
    "Every text a loader delivers (in dataset order) and its report."
    ld = make_loader(ds, LoaderConfig(batch_size=3, shuffle=False, drop_last=False, num_workers=workers,
                                      collate=as_list), transform=texts_of)
    got = [t for batch in ld for t in batch]
    return got, list(ld.report)


def nested(depth: int, kind: str = "list") -> str:
    "A JSON value nested `depth` levels deep (0: a number)."
    return "[" * depth + "1" + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


# ================================================================ deep nesting

@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [1, 50, 64, 65, 500, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
def test_nesting_up_to_the_limit_is_a_good_line(tmp_path, depth, kind):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"text": "deep", "x": %s}\n' % nested(depth - 1, kind))   # the record object is level 1
    assert json_depth(f.read_bytes()) == depth
    ds = JsonlImageText(f, on_error="raise")
    assert ds[0]["text"] == "deep"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 5000, 100_000, 1_000_000])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nesting_over_the_limit_is_a_bad_line(tmp_path, depth, policy):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"text": "a"}\n{"text": "deep", "x": %s}\n{"text": "b"}\n' % nested(depth - 1))
    ds = JsonlImageText(f, on_error=policy)
    assert ds[0]["text"] == "a" and ds[2]["text"] == "b"
    if policy == "raise":
        with pytest.raises(BadRecordError, match=rf"deep.jsonl line 1: JSON nested {depth} levels deep"): ds[1]
    else:
        assert not ds[1]
        (bad,) = ds.report
        assert (bad.file, bad.index, bad.unit) == (str(f), 1, "line") and f"nested {depth} levels" in bad.reason


def test_a_bare_deep_array_and_unclosed_brackets_are_bad_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("[" * 200_000 + "\n" + "[" * 300 + '"text"' + "\n" + '{"text": "' + "[" * 3000 + '"}\n')
    ds = JsonlImageText(f)
    assert not ds[0] and not ds[1]
    assert ds[2]["text"] == "[" * 3000                      # brackets inside a string are text, not nesting
    assert [b.index for b in ds.report] == [0, 1]


def test_depth_verdict_does_not_depend_on_the_callers_stack(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "edge", "x": %s}\n{"text": "over", "x": %s}\n'
                 % (nested(MAX_JSON_DEPTH - 1), nested(MAX_JSON_DEPTH)))
    ds = JsonlImageText(f)
    def deep_call(n):
        return deep_call(n - 1) if n else (ds[0], ds[1])
    good, bad = deep_call(sys.getrecursionlimit() - 200)    # nearly the whole Python stack already used
    assert good["text"] == "edge" and not bad


def test_other_unparseable_lines_are_bad_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": 1' + b"0" * 5000 + b'}\n{"text": "\xff\xfe"}\n{"text": NaN2}\n'
                  b'{"text": "a"}}\n\x00\x00\x00{\n')
    ds = JsonlImageText(f)
    assert ds[0]["text"] == "ok" and not any(ds[i] for i in range(1, 6))
    assert [b.index for b in ds.report] == [1, 2, 3, 4, 5]
    assert all(b.reason.startswith("invalid JSON") for b in ds.report)


def test_text_corpus_jsonl_deep_lines(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two", "x": %s}\n{"text": "three"}\n' % nested(50_000))
    tc = TextCorpus(f)
    assert [r["text"] for r in tc.records()] == ["one", "three"]
    assert [(b.file, b.index) for b in tc.report] == [(str(f), 1)]


@pytest.mark.parametrize("workers", [0, 2])
def test_deep_lines_in_the_loader(tmp_path, workers):
    f = tmp_path / "d.jsonl"
    lines = ['{"text": "t%d"}' % i for i in range(8)]
    lines[2] = '{"text": "deep", "x": %s}' % nested(200_000)
    lines[5] = '{"text": "edge", "x": %s}' % nested(MAX_JSON_DEPTH - 1)
    f.write_text("\n".join(lines) + "\n")
    got, report = loader_texts(JsonlImageText(f), workers)
    assert got == [f"t{i}" for i in (0, 1, 3, 4)] + ["edge", "t6", "t7"]
    assert [(b.file, b.index, b.unit) for b in report] == [(str(f), 2, "line")]


def test_deep_lines_through_inspect(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n%s\n{"text": "b", "x": %s}\n' % (nested(100_000), nested(MAX_JSON_DEPTH - 1)))
    r = inspect_json(f)
    assert (r["rows"], r["good"]) == (3, 2) and [(b["index"], b["unit"]) for b in r["bad"]] == [(1, "line")]
    rc, out, err = run_cli("inspect", f)
    assert rc == 0 and "line 1: JSON nested 100000 levels deep" in out and "Traceback" not in err


# ================================================================ text that is not valid Unicode

JSONL_LONE = {            # field kind -> a record holding a lone surrogate there
    "text": {"text": f"a {LONE} b"},
    "query": {"query": LONE},
    "negatives (str)": {"text": "t", "negative": LONE},
    "negatives (list)": {"text": "t", "negatives": ["fine", f"x{LONE}"]},
    "task": {"text": "t", "task": LONE},
    "messages content": {"text": "t", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONE}]},
    "messages role": {"text": "t", "messages": [{"role": LONE, "content": "hi"}]},
    "low surrogate": {"text": "\udc00 alone"},
    "reversed pair": {"text": "\udc00\ud800"},
}


@pytest.mark.parametrize("kind", list(JSONL_LONE))
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_lone_surrogate_in_jsonl_is_a_bad_line(tmp_path, kind, policy):
    f = tmp_path / "u.jsonl"
    with open(f, "w") as fh:                       # json.dumps writes the surrogate as a \\udXXX escape
        for rec in ({"text": "before"}, JSONL_LONE[kind], {"text": "after 🐈", "negatives": ["ok \u00e9"]}):
            fh.write(json.dumps(rec) + "\n")
    assert "\\ud" in f.read_text()
    ds = JsonlImageText(f, on_error=policy)
    assert ds[0]["text"] == "before" and ds[2]["text"] == "after 🐈"
    if policy == "raise":
        with pytest.raises(BadRecordError, match=r"u.jsonl line 1: field '.*' is not valid Unicode"): ds[1]
    else:
        assert not ds[1]
        (bad,) = ds.report
        assert (bad.file, bad.index, bad.unit) == (str(f), 1, "line") and "not valid Unicode" in bad.reason


def test_a_valid_surrogate_pair_escape_is_good_text(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "cat \\ud83d\\udc08"}\n')
    assert JsonlImageText(f, on_error="raise")[0]["text"] == "cat 🐈"


def test_raw_utf8_encoded_surrogate_bytes_in_jsonl(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xed\xa0\x80"}\n')     # UTF-8's form of U+D800: not valid UTF-8
    ds = JsonlImageText(f)
    assert ds[0]["text"] == "ok" and not ds[1] and len(ds.report) == 1


def test_text_corpus_lone_surrogates(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"body": "good"}\n{"body": "bad \\udfff"}\n')
    t = tmp_path / "c.txt"
    t.write_bytes(b"good para\n\nbad \xed\xa0\x80 para\n\nlast\n")      # surrogate bytes inside a .txt
    tc = TextCorpus([t, j], field="body")
    assert [r["text"] for r in tc.records()] == ["good para", "last", "good"]
    assert sorted((b.file, b.index) for b in tc.report) == [(str(j), 1), (str(t), 2)]


def _bad_utf8_strings(values: list[bytes | None], list_of=False) -> pa.Array:
    "A string (or list<string>) array holding these bytes unchecked, as a careless writer stores them."
    if list_of: return pa.array(values, pa.list_(pa.binary())).cast(pa.list_(pa.string()), safe=False)
    return pa.array(values, pa.binary()).view(pa.string())


@pytest.mark.parametrize("field", ["caption", "negatives", "task"])
@pytest.mark.parametrize("bad", [b"\xff", b"\xed\xa0\x80", b"ok \xc3"])
def test_parquet_strings_that_are_not_utf8_are_bad_rows(tmp_path, field, bad):
    png = png_bytes()
    cols = {"image": pa.array([png] * 4, pa.binary()),
            "caption": _bad_utf8_strings([b"c0", b"c1", b"c2", b"c3"]),
            "negatives": _bad_utf8_strings([[b"n0"], [b"n1"], [b"n2"], [b"n3"]], list_of=True),
            "task": _bad_utf8_strings([b"caption"] * 4)}
    if field == "negatives": cols[field] = _bad_utf8_strings([[b"n0"], [b"n1", bad], [b"n2"], [b"n3"]], list_of=True)
    else: cols[field] = _bad_utf8_strings([b"x0", bad, b"x2", b"x3"])
    f = tmp_path / "s.parquet"
    pq.write_table(pa.table(cols), f, row_group_size=4)
    ds = ParquetImageText(f)
    good = [ds[i] for i in (0, 2, 3)]
    assert all(good) and not ds[1]                          # only that row, not its whole row group
    (b,) = ds.report
    assert (b.file, b.index) == (str(f), 1) and "not valid Unicode" in b.reason
    with pytest.raises(BadRecordError, match=r"s.parquet row 1: field '.*' is not valid Unicode"):
        ParquetImageText(f, on_error="raise")[1]
    r = inspect_json(f)
    assert (r["rows"], r["good"], [x["index"] for x in r["bad"]]) == (4, 3, [1])


def test_hf_adapter_text_that_is_not_unicode():
    datasets = pytest.importorskip("datasets")
    good = datasets.Dataset.from_dict({"text": ["a", "b"], "negatives": [["x"], ["y"]]})
    assert HFDataset(good, on_error="raise")[1]["text"] == "b"
    table = pa.table({"text": _bad_utf8_strings([b"fine", b"\xff"])})
    bad = HFDataset(datasets.Dataset(table))
    assert bad[0]["text"] == "fine" and not bad[1]
    assert [b.index for b in bad.report] == [1]


@pytest.mark.parametrize("field,value", [("text", LONE), ("negatives", ["a", LONE]), ("task", LONE),
                                         ("messages", [{"role": "user", "content": [{"type": "text", "text": LONE}]}])])
def test_torch_adapter_text_that_is_not_unicode(field, value):
    items = [{"text": "ok"}, {"text": "ok", field: value} if field != "text" else {"text": value}]
    ds = TorchDataset(items)
    assert ds[0]["text"] == "ok" and not ds[1]
    assert [b.index for b in ds.report] == [1] and "not valid Unicode" in next(iter(ds.report)).reason


def test_check_unicode_leaves_meta_alone():
    rec = make_record("ok", meta={"note": LONE})            # meta is the user's: not text a tokenizer reads
    assert check_unicode(rec) is rec


@pytest.mark.parametrize("workers", [0, 2])
def test_lone_surrogates_never_reach_the_collator(tmp_path, workers):
    f = tmp_path / "u.jsonl"
    recs = [{"text": f"t{i}"} for i in range(7)]
    recs[1] = {"text": LONE}
    recs[4] = {"text": "t4", "negatives": [LONE]}
    write_jsonl(f, recs)
    def must_encode(batch):
        for t in batch: t.encode("utf-8")                  # what a tokenizer does first
        return list(batch)
    ds = JsonlImageText(f)
    got, report = loader_texts(ds, workers)
    assert got == ["t0", "t2", "t3", "t5", "t6"]
    assert [(b.file, b.index) for b in report] == [(str(f), 1), (str(f), 4)]
    if workers == 0:
        ld = make_loader(JsonlImageText(f), LoaderConfig(batch_size=7, shuffle=False, drop_last=False,
                                                          collate=must_encode), transform=texts_of)
        seen = [t for b in ld for t in b]
        assert len(seen) == 5


# ================================================================ byte-order marks

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("split", ["paragraph", "line"])
def test_bom_is_stripped_from_a_text_corpus(tmp_path, split):
    f = tmp_path / "c.txt"
    f.write_bytes(BOM + "Première ligne.\n\nSecond.\n".encode())
    tc = TextCorpus(f, split=split)
    assert [r["text"] for r in tc.records()] == ["Première ligne.", "Second."]
    assert [tc[i]["meta"]["index"] for i in range(2)] == [0, 2]


def test_bom_followed_by_blank_lines_and_a_bom_only_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(BOM + b"\n\nfirst\n")
    b.write_bytes(BOM)
    assert [r["text"] for r in TextCorpus(a).records()] == ["first"]
    assert TextCorpus(a)[0]["meta"]["index"] == 2
    assert len(TextCorpus(b)) == 0 and len(TextCorpus(b, split="line")) == 0


def test_bom_only_at_the_start_is_stripped(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(BOM + b"one\n\n" + BOM + b"two\n")         # a BOM inside the file is text: left alone
    assert [r["text"] for r in TextCorpus(f).records()] == ["one", "\ufefftwo"]


def test_bom_in_jsonl_first_line(tmp_path):
    img = make_image((20, 10))
    img.save(tmp_path / "i.png")
    f = tmp_path / "p.jsonl"
    f.write_bytes(BOM + b'{"text": "first", "image": "i.png"}\n{"text": "second"}\n')
    ds = JsonlImageText(f, on_error="raise")
    assert ds[0]["text"] == "first" and ds[0]["image"].size == (20, 10) and ds[1]["text"] == "second"
    assert len(JsonlImageText(tmp_path / "p.jsonl")) == 2
    only = tmp_path / "o.jsonl"
    only.write_bytes(BOM + b"\n" + b'{"text": "after a BOM-only line"}\n')
    d2 = JsonlImageText(only, on_error="raise")
    assert len(d2) == 1 and d2[0]["text"] == "after a BOM-only line" and d2[0]["meta"]["index"] == 1
    c = TextCorpus(f)
    assert [r["text"] for r in c.records()] == ["first", "second"]
    r = inspect_json(f)
    assert (r["good"], r["bad"]) == (2, [])


# ================================================================ damaged shards among good ones

def _good_shard(path, start: int, n: int = 6):
    caps = [f"row {start + i}" for i in range(n)]
    return write_parquet(path, caps, [png_bytes((20 + i, 10)) for i in range(n)], row_group_size=4)


def _damage(path, how: str):
    b = path.read_bytes()
    if how == "truncated": path.write_bytes(b[: len(b) // 2])
    elif how == "garbage": path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif how == "zero-byte": path.write_bytes(b"")
    elif how == "damaged footer":                      # the magic bytes stay; the metadata between is scrambled
        n = int.from_bytes(b[-8:-4], "little")
        d = bytearray(b)
        for i in range(len(b) - 8 - n + 3, len(b) - 8, 7): d[i] ^= 0x5A
        path.write_bytes(bytes(d))
    elif how == "footer length": path.write_bytes(b[:-8] + (10**9).to_bytes(4, "little") + b"PAR1")
    elif how == "magic only": path.write_bytes(b"PAR1")
    else: raise ValueError(how)


DAMAGE = ["truncated", "garbage", "zero-byte", "damaged footer", "footer length", "magic only"]


@pytest.fixture
def shards(tmp_path):
    "Three shards of 6 rows in a folder; the middle one is damaged by each test."
    d = tmp_path / "shards"
    d.mkdir()
    return [_good_shard(d / f"part-{k}.parquet", 6 * k) for k in range(3)]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("given", ["dir", "glob", "list"])
def test_damaged_shard_is_skipped_and_named(shards, how, given):
    _damage(shards[1], how)
    arg = {"dir": shards[0].parent, "glob": str(shards[0].parent / "*.parquet"), "list": shards}[given]
    ds = ParquetImageText(arg)
    assert len(ds) == 12
    assert [ds[i]["text"] for i in range(12)] == [f"row {i}" for i in (*range(6), *range(12, 18))]
    assert [ds[i]["meta"]["file"] for i in (5, 6)] == [str(shards[0]), str(shards[2])]
    (bad,) = ds.report
    assert (bad.file, bad.unit) == (str(shards[1]), "file")
    assert "not a readable Parquet file" in bad.reason and "rows are unknown" in bad.reason
    assert str(bad).startswith(f"{shards[1]}: not a readable Parquet file")


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_shard_raises_naming_it(shards, how):
    _damage(shards[1], how)
    with pytest.raises(BadRecordError, match=r"part-1\.parquet: not a readable Parquet file") as e:
        ParquetImageText(shards[0].parent, on_error="raise")
    assert (e.value.file, e.value.unit) == (str(shards[1]), "file")


@pytest.mark.parametrize("how", ["garbage", "zero-byte"])
def test_no_readable_shard_is_an_error_under_both_policies(tmp_path, how):
    fs = [_good_shard(tmp_path / f"p{k}.parquet", 0) for k in range(2)]
    for f in fs: _damage(f, how)
    for policy in ("skip", "raise"):
        with pytest.raises(BadRecordError, match="p0.parquet: not a readable Parquet file"):
            ParquetImageText(fs, on_error=policy)


def test_max_bad_fraction_counts_a_damaged_shard(shards):
    _damage(shards[2], "garbage")
    from mmlit.core import TooManyBadRecords
    with pytest.raises(TooManyBadRecords, match="part-2.parquet"):
        ParquetImageText(shards, max_bad_fraction=0.01)
    assert len(ParquetImageText(shards, max_bad_fraction=0.1)) == 12


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "damaged footer"])
def test_damaged_shard_through_inspect(shards, how):
    _damage(shards[1], how)
    r = inspect_json(shards[0].parent)
    assert (r["rows"], r["good"]) == (12, 12) and len(r["files"]) == 3
    (b,) = r["bad"]
    assert (b["file"], b["unit"]) == (str(shards[1]), "file") and "rows are unknown" in b["reason"]
    rc, out, err = run_cli("inspect", str(shards[0].parent / "*.parquet"))
    assert rc == 0 and "Traceback" not in err and f"{shards[1]}: not a readable Parquet file" in out
    assert run_cli("inspect", shards[0].parent, "--max-bad-fraction", "0.01")[0] == 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_shard_through_the_loader(shards, how, workers):
    _damage(shards[0], how)
    ds = ParquetImageText(shards[0].parent)
    got, report = loader_texts(ds, workers)
    assert got == [f"row {i}" for i in range(6, 18)]
    assert [(b.file, b.unit) for b in ds.report] == [(str(shards[0]), "file")]
    assert all(b.unit == "file" for b in report)             # no row of a good shard was lost or bad


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_pages_in_one_shard_are_its_rows(shards, workers):
    "A shard whose footer reads but whose pages are overwritten: its rows are the bad records, by row group."
    f = shards[1]
    b = bytearray(f.read_bytes())
    col = pq.ParquetFile(f).metadata.row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    b[start + 8: start + col.total_compressed_size] = b"\x55" * (col.total_compressed_size - 8)
    f.write_bytes(bytes(b))
    ds = ParquetImageText(shards)
    got, report = loader_texts(ds, workers)
    assert got == [f"row {i}" for i in (*range(6), 10, 11, *range(12, 18))]   # row group 0 of shard 1: rows 0-3
    assert [(x.file, x.index) for x in report] == [(str(f), i) for i in range(4)]
    assert all("row group 0 is unreadable" in x.reason for x in report)
    r = inspect_json(shards[0].parent)
    assert (r["rows"], r["good"]) == (18, 14)


# ================================================================ page checksums

def caption(i: int) -> str: return f"caption number {i:02d} of the checksummed shard"


def _checksummed(path, n=12, row_group_size=4):
    "Pages stored plainly (no compression, no dictionary), so a flipped byte reads as data unless checked."
    imgs = [{"bytes": png_bytes((16 + i, 8)), "path": None} for i in range(n)]
    t = pa.table({"image": pa.array(imgs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "caption": [caption(i) for i in range(n)]})
    pq.write_table(t, path, row_group_size=row_group_size, write_page_checksum=True, use_dictionary=False,
                   compression="none")
    return path


CAPTION_LEAF = 2  # leaf columns: image.bytes, image.path, caption


def _flip_in_page(path, needle: bytes, row_group: int, column: int):
    "Flip one byte in the middle of `needle` where it lies in that column chunk's pages (not its header or footer)."
    col = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    lo, hi = col.data_page_offset, col.data_page_offset + col.total_compressed_size
    b = bytearray(path.read_bytes())
    at = [i for i in range(lo, hi) if b[i:i + len(needle)] == needle]
    assert at, "the value is not stored verbatim in that chunk"
    b[at[-1] + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("column", ["image", "caption"])
def test_checksum_mismatch_is_a_bad_row_group_naming_file_and_group(tmp_path, column):
    f = _checksummed(tmp_path / "c.parquet")
    clean = [ParquetImageText(f)[i] for i in range(12)]
    needle = png_bytes((21, 8))[40:80] if column == "image" else caption(5).encode()
    _flip_in_page(f, needle, 1, 0 if column == "image" else CAPTION_LEAF)     # row 5 lies in row group 1 (rows 4-7)
    ds = ParquetImageText(f)
    recs = [ds[i] for i in range(12)]
    assert [bool(r) for r in recs] == [True] * 4 + [False] * 4 + [True] * 4
    for i in (*range(4), *range(8, 12)):
        assert recs[i]["text"] == clean[i]["text"] and (pixels(recs[i]["image"]) == pixels(clean[i]["image"])).all()
    assert [b.index for b in ds.report] == [4, 5, 6, 7]
    assert all(b.file == str(f) and b.reason.startswith("row group 1 is unreadable") and "CRC checksum" in b.reason
               for b in ds.report)
    with pytest.raises(BadRecordError, match=r"c.parquet row 4: row group 1 is unreadable .*CRC checksum"):
        ParquetImageText(f, on_error="raise")[4]


def test_without_verification_the_flip_goes_unnoticed(tmp_path):
    "What the check buys: the same flipped byte, unverified, is silently read as a changed caption."
    f = _checksummed(tmp_path / "c.parquet")
    _flip_in_page(f, caption(5).encode(), 1, CAPTION_LEAF)
    ds = ParquetImageText(f, verify_checksums=False, on_error="raise")
    texts = [ds[i]["text"] for i in range(12)]
    assert texts[5] != caption(5) and len(texts[5]) == len(caption(5))
    assert texts[:5] + texts[6:] == [caption(i) for i in (*range(5), *range(6, 12))]


def test_checksum_mismatch_through_inspect_and_workers(tmp_path):
    f = _checksummed(tmp_path / "c.parquet")
    _flip_in_page(f, caption(9).encode(), 2, CAPTION_LEAF)
    r = inspect_json(f)
    assert (r["rows"], r["good"], [b["index"] for b in r["bad"]]) == (12, 8, [8, 9, 10, 11])
    got, report = loader_texts(ParquetImageText(f), 2)
    assert got == [caption(i) for i in range(8)] and [b.index for b in report] == [8, 9, 10, 11]


def test_files_without_checksums_read_the_same_verified_or_not(tmp_path):
    f = write_parquet(tmp_path / "p.parquet", ["a", "b"], [png_bytes(), png_bytes((8, 8))])
    for verify in (True, False):
        ds = ParquetImageText(f, verify_checksums=verify, on_error="raise")
        assert [ds[i]["text"] for i in range(2)] == ["a", "b"]


# ================================================================ shards with different schemas

def test_optional_columns_read_per_shard(tmp_path):
    "The second shard has negatives/task, the first does not (and the other way round): each keeps its own."
    a = write_parquet(tmp_path / "a.parquet", ["a0", "a1"], [png_bytes()] * 2)
    b = write_parquet(tmp_path / "b.parquet", ["b0", "b1"], [png_bytes()] * 2,
                      extra={"negatives": [["n0"], ["n1", "m1"]], "task": ["retrieval", "caption"]})
    for order in ([a, b], [b, a]):
        ds = ParquetImageText(order)
        recs = {r["text"]: r for r in ds.records()}
        assert recs["b1"]["negatives"] == ["n1", "m1"] and recs["b0"]["task"] == "retrieval"
        assert recs["a0"]["negatives"] == [] and recs["a0"]["task"] is None
        assert ds.file_columns == [["image", "caption"] if f == a else ["image", "caption", "negatives", "task"] for f in order]


def test_column_types_differ_between_shards(tmp_path):
    png = png_bytes()
    (tmp_path / "i.png").write_bytes(png)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": png, "path": None}], struct), "caption": ["s0"],
                             "negatives": [["x", "y"]], "task": ["qa"]}), tmp_path / "s0.parquet")
    pq.write_table(pa.table({"image": pa.array([png], pa.binary()), "caption": pa.array(["s1"], pa.large_string()),
                             "negatives": ["z"], "task": pa.array(["caption"]).dictionary_encode()}), tmp_path / "s1.parquet")
    pq.write_table(pa.table({"image": ["i.png"], "caption": pa.array(["s2"], pa.string()),
                             "negatives": pa.array([["w"]], pa.large_list(pa.large_string()))}), tmp_path / "s2.parquet")
    pq.write_table(pa.table({"image": [png], "caption": [7], "task": [3]}), tmp_path / "s3.parquet")   # wrong types
    ds = ParquetImageText(tmp_path)
    r = [ds[i] for i in range(4)]
    assert [(x["text"], x["negatives"], x["task"]) for x in r[:3]] == [("s0", ["x", "y"], "qa"), ("s1", ["z"], "caption"),
                                                                       ("s2", ["w"], None)]
    assert all(pixels(x["image"]).shape == (24, 32, 3) for x in r[:3])
    assert not r[3]
    (b,) = ds.report
    assert b.file == str(tmp_path / "s3.parquet") and "field 'caption' must be str, got int" in b.reason


def test_required_column_missing_in_one_shard_names_it(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["a"], [png_bytes()])
    pq.write_table(pa.table({"image": [png_bytes()], "text": ["b"]}), tmp_path / "b.parquet")
    for policy in ("skip", "raise"):
        with pytest.raises(ConfigError, match=r"b\.parquet: no column 'caption'"):
            ParquetImageText(tmp_path, on_error=policy)
    rc, out, err = run_cli("inspect", tmp_path)
    assert rc == 2 and "b.parquet: no column 'caption'" in err and "Traceback" not in err


# ================================================================ image paths: against the shard's folder

@pytest.fixture
def path_shards(tmp_path):
    "Shards in data/ whose image column holds plain paths or {path} structs, relative and absolute."
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    make_image((30, 20)).save(data / "imgs" / "rel.png")
    elsewhere_img = tmp_path / "abs.png"
    make_image((12, 34)).save(elsewhere_img)
    plain = data / "plain.parquet"
    pq.write_table(pa.table({"image": ["imgs/rel.png", str(elsewhere_img), "imgs/missing.png"],
                             "caption": ["rel", "abs", "missing"]}), plain)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    structs = data / "structs.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "imgs/rel.png"},
                                                {"bytes": None, "path": str(elsewhere_img)},
                                                {"bytes": None, "path": "imgs/missing.png"}], struct),
                             "caption": ["rel", "abs", "missing"]}), structs)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "imgs").mkdir()
    make_image((99, 99)).save(tmp_path / "cwd" / "imgs" / "rel.png")   # a decoy: the wrong folder's image
    return plain, structs


@pytest.mark.parametrize("which", [0, 1])
def test_image_paths_resolve_against_the_shard(path_shards, tmp_path, monkeypatch, which):
    monkeypatch.chdir(tmp_path / "cwd")
    f = path_shards[which]
    ds = ParquetImageText(f, allow_absolute_paths=True)
    assert ds[0]["image"].size == (30, 20)                  # data/imgs/rel.png, not cwd/imgs/rel.png
    assert ds[1]["image"].size == (12, 34)                  # an allowed absolute path stays as it is
    assert not ds[2]
    (b,) = ds.report
    assert b.file == str(f) and b.index == 2 and str(f.parent / "imgs" / "missing.png") in b.reason
    strict = ParquetImageText(f)                            # by default an absolute path is a bad record
    assert not strict[1] and [b.reason.split(":")[0] for b in strict.report] == ["path leaves image_root"]


def test_plain_and_struct_paths_agree_through_a_glob_from_elsewhere(path_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "cwd")
    ds = ParquetImageText("../data/*.parquet", allow_absolute_paths=True)   # a relative glob: shard folders are relative too
    sizes = [r["image"].size for r in ds.records()]
    assert sizes == [(30, 20), (12, 34)] * 2 and len(ds.report) == 2
    r = inspect_json("../data")                              # the absolute paths are bad records there
    assert (r["rows"], r["good"]) == (6, 2)
    assert sorted(b["reason"].split(":")[0] for b in r["bad"]).count("path leaves image_root") == 2


def test_empty_and_wrong_typed_paths(tmp_path):
    pq.write_table(pa.table({"image": ["", "x.png"], "caption": ["empty", "missing"]}), tmp_path / "p.parquet")
    ds = ParquetImageText(tmp_path / "p.parquet")
    assert not ds[0] and not ds[1]
    assert [b.reason.split(":")[0] for b in ds.report] == ["image column 'image' holds an empty path",
                                                           "image file not found"]
