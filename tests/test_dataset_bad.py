"""Bad input under both policies: skipped, counted once and reported, or a clear error; never dummy data."""
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ds_files import (SPECS, bomb_png, corrupt_bytes, image_bytes, make_image, pixels, png_bytes, truncated_jpeg,
                      write_jsonl, write_parquet)
from mmlit.core import BadRecordError, ConfigError, TooManyBadRecords
from mmlit.dataset import BadRecord, SkipReport, Skipped, split_skipped
from mmlit.sources import HFDataset, JsonlImageText, ParquetImageText, TextCorpus
from mmlit.mixture import DeterministicDataset

# ---------------------------------------------------------------- JSONL: one bad line between good ones

# kind -> (JSON line or raw text, JsonlImageText kwargs, reason pattern)
JSONL_BAD = {
    "corrupt image": ({"text": "t", "image": "corrupt.png"}, {}, "not a readable image"),
    "truncated jpeg": ({"text": "t", "image": "trunc.jpg"}, {}, "truncated or corrupt"),
    "empty image file": ({"text": "t", "image": "empty.png"}, {}, "not a readable image"),
    "missing image file": ({"text": "t", "image": "missing.png"}, {}, "image file not found"),
    "one of several images missing": ({"text": "t", "image": ["good.png", "missing.png"]}, {}, "image file not found"),
    "invalid json": ('{"text": "unterminated', {}, "invalid JSON"),
    "json not an object": ('["text", "a list"]', {}, "expected a JSON object"),
    "missing text": ({"image": "good.png"}, {}, "missing required field 'text' or 'query'"),
    "text is int": ({"text": 5, "image": "good.png"}, {}, "field 'text' must be str, got int"),
    "negatives is dict": ({"text": "t", "negatives": {"a": 1}}, {}, "field 'negatives' must be a string or a list of strings, got dict"),
    "image is number": ({"text": "t", "image": 3}, {}, "field 'image' must be a string or a list of strings, got int"),
    "task is list": ({"text": "t", "task": ["qa"]}, {}, "field 'task' must be str, got list"),
    "bad messages": ({"text": "t", "messages": [{"role": "user"}]}, {}, "field 'messages'"),
    "bomb header (pillow limit)": ({"text": "t", "image": "bomb.png"}, {}, "DecompressionBomb"),
    "bomb header (mmlit limit)": ({"text": "t", "image": "bomb_small.png"}, {}, "over the limit"),
    "over max_image_pixels": ({"text": "t", "image": "good.png"}, {"max_image_pixels": 100}, "over the limit of 100"),
}


@pytest.fixture
def image_dir(tmp_path):
    make_image(*SPECS[0]).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(corrupt_bytes())
    (tmp_path / "trunc.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(bomb_png(30000, 30000))        # over 2x Pillow's limit: Pillow refuses
    (tmp_path / "bomb_small.png").write_bytes(bomb_png(12000, 12000))  # 144 MP: over mmlit's 2**27, under Pillow's refusal
    return tmp_path


def bad_jsonl(folder, bad_line):
    "good (line 0), blank (line 1), the bad line (line 2), good (line 3): records 0, 1 (bad), 2."
    return write_jsonl(folder / "data.jsonl", [{"text": "first", "image": "good.png"}, "", bad_line,
                                               {"text": "last", "image": "good.png"}])


@pytest.mark.parametrize("kind", list(JSONL_BAD))
def test_jsonl_bad_record_skip(image_dir, kind, caplog):
    line, kwargs, reason = JSONL_BAD[kind]
    f = bad_jsonl(image_dir, line)
    ds = JsonlImageText(f, **kwargs)  # on_error="skip" is the default
    assert ds.on_error == "skip"
    with caplog.at_level(logging.WARNING, logger="mmlit.dataset"):
        out = [ds[i] for i in (1, 1, 1)]  # read three times: counted and logged once
    assert all(isinstance(o, Skipped) and not o for o in out)
    bad = out[0].bad
    assert (bad.source, bad.file, bad.index, bad.unit) == ("jsonl", str(f), 2, "line")
    assert re.search(reason, bad.reason), bad.reason
    assert len(ds.report) == 1 and list(ds.report) == [bad] and bad in ds.report
    assert len([r for r in caplog.records if "skipping bad record" in r.getMessage()]) == 1
    text = str(ds.report)
    assert "1 bad record" in text and str(f) in text and "line 2" in text and bad.reason in text and "jsonl" in text
    assert ds.report.to_dicts() == [dict(source="jsonl", file=str(f), index=2, reason=bad.reason, unit="line")]
    if kind != "over max_image_pixels":  # the good neighbours are untouched (no dummy data)
        assert ds[0]["text"] == "first" and ds[2]["text"] == "last"
        assert ds[2]["image"].size == SPECS[0][0]


@pytest.mark.parametrize("kind", list(JSONL_BAD))
def test_jsonl_bad_record_raise(image_dir, kind):
    line, kwargs, reason = JSONL_BAD[kind]
    f = bad_jsonl(image_dir, line)
    ds = JsonlImageText(f, on_error="raise", **kwargs)
    with pytest.raises(BadRecordError, match=reason) as e:
        ds[1]
    msg = str(e.value)
    assert str(f) in msg and "line 2" in msg and "[jsonl]" in msg
    assert (e.value.file, e.value.index, e.value.unit) == (str(f), 2, "line")
    assert len(ds.report) == 0


def test_truncated_jpeg_is_deferred_with_decode_false(image_dir):
    "Lazy opening reads only the header: the truncation shows when stage 2 decodes, not before."
    f = bad_jsonl(image_dir, {"text": "t", "image": "trunc.jpg"})
    img = JsonlImageText(f, decode=False, on_error="raise")[1]["image"]
    assert img.format == "JPEG" and img.size == (128, 96)
    with pytest.raises(OSError, match="truncated"):
        img.load()


def test_no_dummy_data_when_image_deleted_after_construction(image_dir):
    f = bad_jsonl(image_dir, {"text": "t", "image": "good.png"})
    ds = JsonlImageText(f)
    assert ds[1]["text"] == "t"
    (image_dir / "good.png").unlink()
    assert all(isinstance(ds[i], Skipped) for i in range(3))
    assert ds.report.indices() == [0, 2, 3]


# ---------------------------------------------------------------- Parquet: one bad row between good ones

STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PARQUET_BAD = {  # kind -> (image cell, caption, kwargs, reason)
    "corrupt bytes": ({"bytes": corrupt_bytes(), "path": None}, "c", {}, "not a readable image"),
    "truncated jpeg": ({"bytes": truncated_jpeg(), "path": None}, "c", {}, "truncated or corrupt"),
    "empty blob": ({"bytes": b"", "path": None}, "c", {}, "empty image blob"),
    "null image": (None, "c", {}, "is null"),
    "struct without bytes or path": ({"bytes": None, "path": None}, "c", {}, "neither bytes nor path"),
    "path to a missing file": ({"bytes": None, "path": "nowhere.png"}, "c", {}, "image file not found"),
    "null caption": ({"bytes": png_bytes(), "path": None}, None, {}, "missing required field 'caption'"),
    "bomb header": ({"bytes": bomb_png(), "path": None}, "c", {}, "DecompressionBomb"),
    "over max_image_pixels": ({"bytes": png_bytes((40, 40)), "path": None}, "c", {"max_image_pixels": 1000}, "over the limit of 1000"),
}


def bad_parquet(path, cell, caption, struct_images=True):
    "rows 0..5 with the bad one at row 4 (second row group)."
    good = {"bytes": png_bytes(*SPECS[1]), "path": None}
    cells = [good] * 4 + [cell, good]
    caps = ["g0", "g1", "g2", "g3", caption, "g5"]
    col = pa.array(cells, STRUCT) if struct_images else pa.array([None if c is None else c["bytes"] for c in cells], pa.binary())
    pq.write_table(pa.table({"image": col, "caption": pa.array(caps, pa.string())}), path, row_group_size=3)
    return path


@pytest.mark.parametrize("kind", list(PARQUET_BAD))
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_parquet_bad_record(tmp_path, kind, policy):
    cell, caption, kwargs, reason = PARQUET_BAD[kind]
    f = bad_parquet(tmp_path / "d.parquet", cell, caption)
    ds = ParquetImageText(f, on_error=policy, **kwargs)
    if policy == "raise":
        with pytest.raises(BadRecordError, match=reason) as e:
            ds[4]
        assert str(f) in str(e.value) and "row 4" in str(e.value)
        return
    out = ds[4]
    assert isinstance(out, Skipped)
    assert (out.bad.source, out.bad.file, out.bad.index, out.bad.unit) == ("parquet", str(f), 4, "row")
    assert re.search(reason, out.bad.reason)
    ds[4]
    assert len(ds.report) == 1 and "row 4" in str(ds.report) and str(f) in str(ds.report)
    assert not re.search(r"at 0x[0-9a-f]+", out.bad.reason)  # no object addresses: the same reason in every process
    if kind != "over max_image_pixels":
        assert [ds[i]["text"] for i in (0, 3, 5)] == ["g0", "g3", "g5"]


@pytest.mark.parametrize("kind", ["corrupt bytes", "empty blob", "null image", "truncated jpeg"])
def test_parquet_plain_binary_bad_record(tmp_path, kind):
    cell, caption, _, reason = PARQUET_BAD[kind]
    f = bad_parquet(tmp_path / "b.parquet", cell, caption, struct_images=False)
    ds = ParquetImageText(f)
    assert isinstance(ds[4], Skipped) and re.search(reason, ds[4].bad.reason)
    assert ds[5]["image"].size == SPECS[1][0]
    with pytest.raises(BadRecordError, match="row 4"):
        ParquetImageText(f, on_error="raise")[4]


def test_parquet_wrong_column_types(tmp_path):
    f = tmp_path / "w.parquet"
    pq.write_table(pa.table({"image": pa.array([1, 2], pa.int64()), "caption": pa.array([3, 4], pa.int64())}), f)
    ds = ParquetImageText(f)
    assert "field 'caption' must be str, got int" in ds[0].bad.reason
    ds2 = ParquetImageText(f, text_column="caption", image_column="image", on_error="raise")
    with pytest.raises(BadRecordError, match=r"row 1: field 'caption'"):
        ds2[1]
    f2 = tmp_path / "w2.parquet"
    pq.write_table(pa.table({"image": pa.array([1, 2], pa.int64()), "caption": ["a", "b"]}), f2)
    with pytest.raises(BadRecordError, match=r"row 0: image column 'image' holds int"):
        ParquetImageText(f2, on_error="raise")[0]


def test_bad_row_in_second_shard_names_that_shard(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", ["x", "y"], [png_bytes(), png_bytes()])
    b = write_parquet(tmp_path / "b.parquet", ["z", "w"], [png_bytes(), b""])
    ds = ParquetImageText(str(tmp_path / "*.parquet"))
    out = ds[3]
    assert (out.bad.file, out.bad.index) == (str(b), 1)
    with pytest.raises(BadRecordError, match=rf"{b}.*row 1"):
        ParquetImageText([a, b], on_error="raise")[3]


# ---------------------------------------------------------------- text corpora and HF

def test_text_corpus_bad_lines(tmp_path):
    j = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, "{broken", {"body": "no text field"}, {"text": 7}, {"text": "ok2"}])
    ds = TextCorpus(j)
    assert [ds[i]["text"] if ds[i] else ds[i].bad.index for i in range(5)] == ["ok", 1, 2, 3, "ok2"]
    assert [b.reason.split(" ")[0] for b in ds.report] == ["invalid", "missing", "field"]
    for i, pat in [(1, "line 1: invalid JSON"), (2, "line 2: missing required field 'text'"), (3, "line 3: field 'text' must be str")]:
        with pytest.raises(BadRecordError, match=pat):
            TextCorpus(j, on_error="raise")[i]
    t = tmp_path / "latin.txt"
    t.write_bytes("good doc\n\ncaf\u00e9\n".encode("latin-1"))
    assert TextCorpus(t)[0]["text"] == "good doc"
    assert "not valid UTF-8" in TextCorpus(t)[1].bad.reason
    with pytest.raises(BadRecordError, match=r"latin\.txt line 2: not valid UTF-8"):
        TextCorpus(t, on_error="raise")[1]


def test_hf_bad_image_both_policies():
    datasets = pytest.importorskip("datasets")
    blobs = [png_bytes(), corrupt_bytes(), png_bytes((7, 7))]
    for decode in (True, False):
        hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "text": ["a", "b", "c"]},
                                        features=datasets.Features({"image": datasets.Image(decode=decode),
                                                                    "text": datasets.Value("string")}))
        ds = HFDataset(hf)
        assert isinstance(ds[1], Skipped) and ds[1].bad.index == 1 and ds[2]["image"].size == (7, 7)
        assert not re.search(r"at 0x[0-9a-f]+", ds[1].bad.reason)
        with pytest.raises(BadRecordError, match="row 1"):
            HFDataset(hf, on_error="raise")[1]
    hf = datasets.Dataset.from_dict({"text": ["a", None, "c"]})
    assert "missing required field 'text'" in HFDataset(hf)[1].bad.reason


# ---------------------------------------------------------------- max_bad_fraction

def ten_lines_three_bad(folder):
    rows = [{"text": f"t{i}"} if i not in (2, 5, 8) else "{not json" for i in range(10)]
    return write_jsonl(folder / "ten.jsonl", rows)


def test_max_bad_fraction_raises_once_exceeded_not_before(tmp_path):
    f = ten_lines_three_bad(tmp_path)
    ds = JsonlImageText(f, max_bad_fraction=0.2)  # 2 of 10 allowed
    for i in range(8):
        ds[i]
        ds[i]  # re-reading a bad record does not count it again
    assert len(ds.report) == 2
    ds[9]
    with pytest.raises(TooManyBadRecords, match=r"3 of 10 records are bad.*max_bad_fraction=0.2") as e:
        ds[8]
    assert "line 8" in str(e.value)  # the message carries the report
    ok = JsonlImageText(f, max_bad_fraction=0.3)  # exactly at the limit: fine
    assert sum(isinstance(ok[i], Skipped) for i in range(10)) == 3
    strict = JsonlImageText(f, max_bad_fraction=0.0)
    assert strict[0]["text"] == "t0"
    with pytest.raises(TooManyBadRecords):
        strict[2]


def test_policy_arguments_are_checked(tmp_path):
    f = ten_lines_three_bad(tmp_path)
    for kw in (dict(on_error="ignore"), dict(max_bad_fraction=1.5), dict(max_bad_fraction=-0.1), dict(text_dropout=2)):
        with pytest.raises(ConfigError):
            JsonlImageText(f, **kw)


# ---------------------------------------------------------------- report object

def test_skip_report_and_split_skipped():
    a = BadRecord("jsonl", "/x.jsonl", 3, "invalid JSON (x)", "line")
    b = BadRecord("parquet", "/y.parquet", 1, "empty image blob", "row")
    r = SkipReport([b, a, a])
    assert len(r) == 2 and list(r) == [a, b] and r.indices() == [3, 1]
    assert r.reasons() == {"invalid JSON (x)": 1, "empty image blob": 1}
    assert r.extend([a, BadRecord("jsonl", "/x.jsonl", 4, "r", "line")]) == 1
    assert "... and 1 more" in r.table(max_rows=2) and str(a) == "/x.jsonl line 3: invalid JSON (x)"
    good, bad = split_skipped([{"text": "a"}, Skipped(a), {"text": "b"}, Skipped(b)])
    assert good == [{"text": "a"}, {"text": "b"}] and bad == [a, b]
    import pickle
    s = pickle.loads(pickle.dumps(Skipped(a)))
    assert s == Skipped(a) and not s and s.bad is not a


# ---------------------------------------------------------------- skipping does not change the good records

def draw_transform(rec, rng):
    "A transform that draws from the record's rng (and keeps what identifies the record)."
    return dict(text=rec["text"], pixels=pixels(rec["image"]) if rec["image"] is not None else None,
                draw=int(rng.integers(1 << 30)), dropped=rec["meta"].get("text_dropped", False))


def same(a, b):
    return (a["text"], a["draw"], a["dropped"]) == (b["text"], b["draw"], b["dropped"]) and \
        (a["pixels"] is None) == (b["pixels"] is None) and (a["pixels"] is None or np.array_equal(a["pixels"], b["pixels"]))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_skipping_keeps_the_good_records(tmp_path, fmt):
    n, bad_at = 12, {1, 4, 5, 10}
    good_rows = [(f"caption {i}", SPECS[i]) for i in range(n)]
    keep = [i for i in range(n) if i not in bad_at]

    def build(name, rows):
        "A file from rows: (caption, spec) or None (a bad row); returns a function making its dataset."
        if fmt == "jsonl":
            lines = []
            for i, r in enumerate(rows):
                if r is None: lines.append('{"text": broken' if i % 2 else {"text": "t", "image": "nope.png"}); continue
                make_image(*r[1]).save(tmp_path / f"{name}_{i}.png")
                lines.append({"text": r[0], "image": f"{name}_{i}.png"})
            f = write_jsonl(tmp_path / f"{name}.jsonl", lines)
            return lambda **kw: JsonlImageText(f, **kw)
        caps = [None if r is None else r[0] for r in rows]
        blobs = [corrupt_bytes() if r is None else png_bytes(*r[1]) for r in rows]
        f = write_parquet(tmp_path / f"{name}.parquet", caps, blobs, row_group_size=5)
        return lambda **kw: ParquetImageText(f, **kw)

    with_bad = build("bad", [None if i in bad_at else good_rows[i] for i in range(n)])
    fixed = build("fixed", good_rows)                            # the bad rows repaired in place
    removed = build("removed", [good_rows[i] for i in keep])     # the bad rows deleted
    bad_ds = with_bad(text_dropout=0.3)
    dropped = {}
    for epoch in (0, 3):
        dbad, dfixed = DeterministicDataset(bad_ds, draw_transform, seed=11), DeterministicDataset(fixed(text_dropout=0.3), draw_transform, seed=11)
        for d in (dbad, dfixed): d.set_epoch(epoch)
        forward = [dbad[i] for i in range(n)]
        backward = [dbad[i] for i in reversed(range(n))][::-1]
        assert [i for i, r in enumerate(forward) if isinstance(r, Skipped)] == sorted(bad_at)
        for i in keep:  # same index: same record, same random draws, same text dropout
            assert same(forward[i], dfixed[i]) and same(forward[i], backward[i])
        dropped[epoch] = [i for i in keep if forward[i]["dropped"]]
        assert 0 < len(dropped[epoch]) < len(keep), dropped  # dropout really ran, and not on everything
        good, bad = split_skipped(forward)
        assert sorted(b.index for b in bad) == sorted(bad_at)
    assert dropped[0] != dropped[3]  # each epoch drops its own texts
    # without dropout the good records of an epoch are exactly the file without its bad rows, in order
    good, bad = split_skipped(DeterministicDataset(with_bad(), draw_transform)[i] for i in range(n))
    clean = [DeterministicDataset(removed(), draw_transform)[j] for j in range(len(keep))]
    assert [g["text"] for g in good] == [c["text"] for c in clean] == [good_rows[i][0] for i in keep]
    assert all(np.array_equal(g["pixels"], c["pixels"]) for g, c in zip(good, clean))
    assert len(bad_ds.report) == len(bad_at)  # counted once over two epochs and two orders


def test_transform_bad_record_uses_the_policy(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "", {"text": "reject me"}])

    def strict(rec, rng):
        if rec["text"].startswith("reject"): raise BadRecordError("transform refused the record")
        return rec

    skip = DeterministicDataset(JsonlImageText(f), strict)
    out = skip[1]
    assert isinstance(out, Skipped) and (out.bad.file, out.bad.index, out.bad.unit) == (str(f), 2, "line")
    assert skip.report.reasons() == {"transform refused the record": 1}
    with pytest.raises(BadRecordError, match=r"d\.jsonl line 2: transform refused the record"):
        DeterministicDataset(JsonlImageText(f, on_error="raise"), strict)[1]
