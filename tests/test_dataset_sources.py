"""Every mmlit.sources source reads the right records from real files; images open lazily."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ds_files import (SPECS, image_bytes, make_image, pixels, png_bytes, write_jsonl, write_parquet)
from mmlit.core import BadRecordError, ConfigError, UnknownNameError
from mmlit.dataset import RECORD_KEYS, Skipped, make_record
from mmlit.sources import (HFDataset, JsonlImageText, ParquetImageText, TensorList, TextCorpus, TorchDataset,
                           as_mm_dataset, open_source)
from mmlit.mixture import DeterministicDataset
from mmlit.tasks import format_messages, task_formats


def check_schema(rec):
    assert not isinstance(rec, Skipped), rec
    assert set(RECORD_KEYS) <= set(rec)
    assert isinstance(rec["negatives"], list)
    assert {"source", "file", "index", "unit"} <= set(rec["meta"])


def is_lazy(img: Image.Image) -> bool:
    "Opened but pixels not decoded: the tile list is still pending."
    return bool(getattr(img, "tile", None))


# ---------------------------------------------------------------- JSONL image-text

@pytest.fixture
def jsonl_pairs(tmp_path):
    (tmp_path / "imgs").mkdir()
    paths = []
    for i, (size, mode, col) in enumerate(SPECS[:4]):
        p = tmp_path / "imgs" / f"{i}.{'png' if i % 2 else 'jpg'}"
        make_image(size, mode, col).save(p)
        paths.append(p)
    other = tmp_path.parent / f"{tmp_path.name}_abs.png"  # outside the JSONL's folder: absolute path only
    make_image((50, 40), "RGB", (1, 2, 3)).save(other)
    rows = [
        {"text": "a relative png", "image": "imgs/1.png", "negatives": ["wrong one", "wrong two"], "task": "caption"},
        "",  # blank line: not a record, but line numbers still count it
        {"query": "an absolute path", "image": str(other), "negative": "single negative"},
        {"text": "two images", "image": ["imgs/0.jpg", "imgs/3.png"]},
        {"text": "no image at all", "task": "lm"},
        {"text": "chat", "image": "imgs/2.jpg", "messages": [{"role": "user", "content": "<image> what?"},
                                                             {"role": "assistant", "content": "a box"}]},
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    yield f, paths, other
    other.unlink(missing_ok=True)


def test_jsonl_reads_every_field(jsonl_pairs):
    f, paths, other = jsonl_pairs
    assert not JsonlImageText(f)[1]                        # an absolute path is refused unless allowed
    ds = JsonlImageText(f, allow_absolute_paths=True)
    assert len(ds) == 5 and ds.n_rows == 5
    recs = [ds[i] for i in range(len(ds))]
    for r in recs: check_schema(r)
    r0, r1, r2, r3, r4 = recs
    assert (r0["text"], r0["negatives"], r0["task"]) == ("a relative png", ["wrong one", "wrong two"], "caption")
    assert (r0["image"].size, r0["image"].mode, r0["image"].format) == (SPECS[1][0], SPECS[1][1], "PNG")
    assert r0["meta"] == dict(source="jsonl", file=str(f), index=0, unit="line")
    # `query` stands for `text`, `negative` for `negatives`; the absolute path is used as is (it is allowed here)
    assert (r1["text"], r1["negatives"], r1["task"]) == ("an absolute path", ["single negative"], None)
    assert r1["image"].size == (50, 40)
    assert r1["meta"]["index"] == 2  # the blank line 1 is counted in line numbers
    # a list of images stays a list, in order, JPEG and PNG
    assert isinstance(r2["image"], list) and [im.size for im in r2["image"]] == [SPECS[0][0], SPECS[3][0]]
    assert [im.format for im in r2["image"]] == ["JPEG", "PNG"]
    assert [im.mode for im in r2["image"]] == [SPECS[0][1], SPECS[3][1]]
    assert (r3["image"], r3["task"], r3["messages"]) == (None, "lm", None)
    assert r4["messages"][0] == {"role": "user", "content": "<image> what?"} and len(r4["messages"]) == 2
    # the decoded pixels are the ones written (PNG is lossless)
    assert np.array_equal(pixels(r0["image"]), pixels(make_image(*SPECS[1])))


def test_jsonl_image_root(tmp_path):
    root = tmp_path / "elsewhere"
    root.mkdir()
    make_image((9, 7)).save(root / "x.png")
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "image": "x.png"}])
    assert JsonlImageText(f, image_root=root)[0]["image"].size == (9, 7)
    assert isinstance(JsonlImageText(f)[0], Skipped)  # not next to the JSONL


def test_jsonl_opens_no_image_at_construction(jsonl_pairs, monkeypatch):
    f, paths, _ = jsonl_pairs
    calls = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    ds = JsonlImageText(f, on_error="raise")
    assert calls == []
    ds.get(0)
    assert len(calls) == 1
    # an image removed after construction is an error at read time only
    paths[1].unlink()
    with pytest.raises(Exception, match="not found"):
        ds.get(0)


def test_jsonl_decode_false_leaves_pixels_unloaded(jsonl_pairs):
    f, _, _ = jsonl_pairs
    lazy = JsonlImageText(f, decode=False)[0]["image"]
    eager = JsonlImageText(f, decode=True)[0]["image"]
    assert is_lazy(lazy) and not is_lazy(eager)
    assert lazy.size == eager.size and lazy.mode == eager.mode
    assert np.array_equal(pixels(lazy), pixels(eager))


# ---------------------------------------------------------------- text corpora

TEXT = "First paragraph\n  spans two lines.\n\n\n\nSecond one.\n\nThird\nand last\n"


def test_text_paragraph_split(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    ds = TextCorpus(f)
    assert len(ds) == 3
    recs = [ds[i] for i in range(3)]
    for r in recs: check_schema(r)
    assert [r["text"] for r in recs] == ["First paragraph\n  spans two lines.", "Second one.", "Third\nand last"]  # indentation kept
    assert [r["meta"]["index"] for r in recs] == [0, 5, 7]
    assert {(r["task"], r["meta"]["unit"], r["meta"]["file"], r["image"]) for r in recs} == {("lm", "line", str(f), None)}


def test_text_line_split_and_several_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text("no trailing newline")
    ds = TextCorpus([a, b], split="line")
    texts = [ds[i]["text"] for i in range(len(ds))]
    assert texts == ["First paragraph", "  spans two lines.", "Second one.", "Third", "and last", "no trailing newline"]
    assert [ds[i]["meta"]["index"] for i in range(len(ds))] == [0, 1, 5, 7, 8, 0]
    assert ds[5]["meta"]["file"] == str(b)
    # a directory (and a glob) picks the same files
    assert len(TextCorpus(tmp_path, split="line")) == 6 == len(TextCorpus(str(tmp_path / "*.txt"), split="line"))
    with pytest.raises(ConfigError, match="split"):
        TextCorpus(a, split="sentence")


def test_text_jsonl_custom_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": "doc one", "text": "not this"}, "", {"body": "doc two"}])
    ds = TextCorpus(f, field="body")
    assert [ds[i]["text"] for i in range(len(ds))] == ["doc one", "doc two"]
    assert [ds[i]["meta"]["index"] for i in range(len(ds))] == [0, 2]
    assert TextCorpus(f)[0]["text"] == "not this"
    assert isinstance(TextCorpus(f)[1], Skipped)  # default field 'text' missing on line 2


# ---------------------------------------------------------------- Parquet

@pytest.mark.parametrize("struct_images", [True, False])
def test_parquet_one_file(tmp_path, struct_images):
    blobs = [png_bytes(*s) for s in SPECS[:10]]
    caps = [f"caption {i}" for i in range(10)]
    f = write_parquet(tmp_path / "one.parquet", caps, blobs, struct_images=struct_images, row_group_size=3,
                      extra={"negatives": [[f"neg {i}"] for i in range(10)], "task": ["caption"] * 10})
    ds = ParquetImageText(f)
    assert len(ds) == 10
    for i in [0, 9, 3, 2, 4, 7]:  # across row-group boundaries, out of order
        r = ds[i]
        check_schema(r)
        assert r["text"] == caps[i] and r["negatives"] == [f"neg {i}"] and r["task"] == "caption"
        assert (r["image"].size, r["image"].mode) == SPECS[i][:2]
        assert np.array_equal(pixels(r["image"]), pixels(make_image(*SPECS[i])))
        assert r["meta"] == dict(source="parquet", file=str(f), index=i, unit="row")


def test_parquet_shards_glob_and_list(tmp_path):
    files = []
    for s in range(3):
        idx = range(4 * s, 4 * s + 4)
        files.append(write_parquet(tmp_path / f"shard-{s:02d}.parquet", [f"c{i}" for i in idx],
                                   [png_bytes(*SPECS[i]) for i in idx], struct_images=s % 2 == 0, row_group_size=3))
    for src in (str(tmp_path / "shard-*.parquet"), files, tmp_path):
        ds = ParquetImageText(src)
        assert len(ds) == 12
        recs = [ds[i] for i in range(12)]
        assert [r["text"] for r in recs] == [f"c{i}" for i in range(12)]
        assert [r["image"].size for r in recs] == [s[0] for s in SPECS]
        assert [(r["meta"]["file"], r["meta"]["index"]) for r in recs] == [(str(files[i // 4]), i % 4) for i in range(12)]


def test_parquet_custom_columns(tmp_path):
    import pyarrow.parquet as pq
    t = pa.table({"jpg": [png_bytes(), png_bytes((5, 5))], "txt": ["a", "b"],
                  "negs": [["x"], ["y", "z"]], "kind": ["qa", "caption"]})
    pq.write_table(t, tmp_path / "c.parquet")
    ds = ParquetImageText(tmp_path / "c.parquet", image_column="jpg", text_column="txt",
                          negatives_column="negs", task_column="kind")
    r = ds[1]
    assert (r["text"], r["image"].size) == ("b", (5, 5))
    assert r["negatives"] == ["y", "z"] and r["task"] == "caption"
    # text-only Parquet
    assert ParquetImageText(tmp_path / "c.parquet", image_column=None, text_column="txt")[0]["image"] is None
    # the caption and image columns are found among common names; a named column must exist
    assert ParquetImageText(tmp_path / "c.parquet")[1]["text"] == "b"
    with pytest.raises(ConfigError, match="no column 'caption'"):
        ParquetImageText(tmp_path / "c.parquet", image_column="jpg", text_column="caption")


def test_parquet_reads_lazily(tmp_path, monkeypatch):
    f = write_parquet(tmp_path / "p.parquet", ["a", "b", "c"], [png_bytes(*SPECS[i]) for i in range(3)], row_group_size=1)
    calls, read_groups = [], []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    import pyarrow.parquet as pq
    real_rg = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: read_groups.append(i) or real_rg(self, i, **k))
    ds = ParquetImageText(f, decode=False)
    assert calls == [] and read_groups == []
    img = ds[2]["image"]
    assert calls == [1] and read_groups == [2]  # one row group read, one image opened
    assert is_lazy(img) and img.size == SPECS[2][0]



def test_parquet_keeps_rows_as_python_values_not_arrow_buffers(tmp_path):
    "A read row group becomes Python lists at once: no Arrow memory is held between reads, one group is cached."
    f = write_parquet(tmp_path / "p.parquet", [f"t{i}" for i in range(6)], [png_bytes(*SPECS[i]) for i in range(6)], row_group_size=2)
    ds = ParquetImageText(f, decode=False)
    held = pa.total_allocated_bytes()
    recs = [ds[i] for i in range(6)]
    assert pa.total_allocated_bytes() == held and len(ds._cache) == 1
    assert [r["text"] for r in recs] == [f"t{i}" for i in range(6)] and [r["image"].size for r in recs] == [SPECS[i][0] for i in range(6)]

def test_parquet_hands_arrow_memory_back_past_a_bound(tmp_path, monkeypatch):
    "Arrow's freed memory is kept between reads until Arrow has allocated more than ARROW_SCRATCH_KEPT since the last hand-back; in a loader worker after every read."
    import mmlit.sources as S
    f = write_parquet(tmp_path / "p.parquet", [f"t{i}" for i in range(5)], [png_bytes(*SPECS[i]) for i in range(5)], row_group_size=1)
    extra, released = {"mb": 0}, []
    real_pool = pa.default_memory_pool()
    class Spy:                                                      # the real pool, with `extra` MB more allocated in all
        def total_bytes_allocated(self): return real_pool.total_bytes_allocated() + (extra["mb"] << 20)
        def release_unused(self): released.append(extra["mb"]); real_pool.release_unused()
    monkeypatch.setattr(S, "_released_at", {})
    monkeypatch.setattr(S.pa, "default_memory_pool", lambda: Spy())
    ds = ParquetImageText(f, decode=False)
    for i, more_mb in enumerate([0, 10, 30, 0, 20]):              # what Arrow allocated elsewhere before reading row group i
        extra["mb"] += more_mb
        assert ds[i]["text"] == f"t{i}"
        assert ds[i]["text"] == f"t{i}"                             # cached: no second read
    assert released == [0, 40]                                      # the first read; the read 40 MB past it; not 20 MB past that
    monkeypatch.setattr(S.torch.utils.data, "get_worker_info", lambda: object())   # as inside a DataLoader worker
    released.clear(); ds = ParquetImageText(f, decode=False); [ds[i] for i in range(5)]
    assert len(released) == 5                                       # every read hands it back


def test_mmlit_writers_store_image_columns_plain(tmp_path):
    "The demo data and split_by_group write image bytes uncompressed without a dictionary, the other columns with one."
    import pyarrow.parquet as pq
    from mmlit.demo import build_demo_parquet, build_task_parquet
    from mmlit.recipe import split_by_group
    demo = build_demo_parquet(tmp_path / "demo.parquet", n=8, row_group_size=4)[0]
    task = build_task_parquet(tmp_path / "task.parquet", n=2, row_group_size=1, image_size=32)
    for f in (demo, task, *split_by_group(demo, "digit_index", 0.5, tmp_path / "split")):
        rg = pq.ParquetFile(f).metadata.row_group(0)
        cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
        assert (cols["image.bytes"].compression, cols["image.bytes"].has_dictionary_page) == ("UNCOMPRESSED", False), f
        assert all(c.compression == "SNAPPY" and c.has_dictionary_page for p, c in cols.items() if not p.startswith("image.")), f
    assert [r["text"] for r in ParquetImageText(demo).records()] == pq.read_table(demo)["caption"].to_pylist()


# ---------------------------------------------------------------- adapters

@pytest.fixture
def hf_blobs():
    return [png_bytes(*SPECS[i]) for i in range(4)]


def test_hf_dataset_image_feature_decoded(hf_blobs):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                               "negatives": datasets.Sequence(datasets.Value("string"))})
    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in hf_blobs],
                                     "text": [f"t{i}" for i in range(4)],
                                     "negatives": [[f"n{i}"] for i in range(4)]}, features=feats)
    ds = as_mm_dataset(hf)
    assert isinstance(ds, HFDataset) and len(ds) == 4
    for i in range(4):
        r = ds[i]
        check_schema(r)
        assert (r["text"], r["negatives"], r["image"].size, r["image"].mode) == (f"t{i}", [f"n{i}"], *SPECS[i][:2])
        assert r["meta"]["index"] == i and r["meta"]["source"] == "hf"
    assert np.array_equal(pixels(ds[3]["image"]), pixels(make_image(*SPECS[3])))
    with pytest.raises(ConfigError, match="no column"):
        HFDataset(hf, text_column="caption")


def test_hf_dataset_image_feature_not_decoded(hf_blobs):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in hf_blobs],
                                     "text": [f"t{i}" for i in range(4)]},
                                    features=datasets.Features({"image": datasets.Image(decode=False),
                                                                "text": datasets.Value("string")}))
    assert isinstance(hf[0]["image"], dict)  # HF hands over the raw struct
    lazy = HFDataset(hf, decode=False)[2]["image"]
    assert is_lazy(lazy) and (lazy.size, lazy.mode) == SPECS[2][:2]
    eager = HFDataset(hf)[2]["image"]
    assert not is_lazy(eager) and np.array_equal(pixels(eager), pixels(lazy))


class PairsDataset(torch.utils.data.Dataset):
    "A plain map-style torch dataset of (PIL image, caption) pairs."
    def __len__(self): return 3
    def __getitem__(self, i): return make_image(SPECS[i][0]), f"pair {i}"


class DictDataset(torch.utils.data.Dataset):
    def __len__(self): return 2
    def __getitem__(self, i): return {"text": f"d{i}", "task": "qa", "meta": {"question": "q?"}, "label": i}


def test_torch_dataset_adapter():
    ds = as_mm_dataset(PairsDataset())
    assert isinstance(ds, TorchDataset) and len(ds) == 3
    r = ds[2]
    check_schema(r)
    assert (r["text"], r["image"].size, r["negatives"], r["meta"]["index"]) == ("pair 2", SPECS[2][0], [], 2)
    d = as_mm_dataset(DictDataset())[1]
    check_schema(d)
    assert (d["text"], d["task"], d["label"], d["meta"]["question"], d["meta"]["source"]) == ("d1", "qa", 1, "q?", "torch")
    custom = TorchDataset(PairsDataset(), to_record=lambda item: make_record(text=item[1].upper()))
    assert custom[0]["text"] == "PAIR 0"


def test_tensor_list_adapter():
    ts = [torch.arange(n, dtype=torch.int64) for n in (3, 5, 1)]
    ds = as_mm_dataset(ts)
    assert isinstance(ds, TensorList) and len(ds) == 3
    r = ds[1]
    check_schema(r)
    assert torch.equal(r["input_ids"], ts[1]) and r["task"] == "lm" and r["text"] is None
    assert r["meta"] == dict(source="tensors", file=None, index=1, unit="row")
    assert torch.equal(TensorList(ts, key="tokens")[2]["tokens"], ts[2])
    with pytest.raises(ConfigError, match="item 1"):
        TensorList([ts[0], [1, 2]])
    with pytest.raises(ConfigError):
        as_mm_dataset(42)
    with pytest.raises(IndexError):
        ds[3]


def test_index_checks(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    ds = JsonlImageText(f)
    assert ds[-1]["text"] == "b" and ds[np.int64(0)]["text"] == "a"
    for bad in (2, -3):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]


# ---------------------------------------------------------------- open_source

def test_open_source_picks_class(tmp_path):
    pq_file = write_parquet(tmp_path / "p.parquet", ["a"], [png_bytes()])
    jl = write_jsonl(tmp_path / "j.jsonl", [{"text": "a"}])
    txt = tmp_path / "t.txt"
    txt.write_text("doc\n")
    assert type(open_source(pq_file)) is ParquetImageText
    assert type(open_source(str(tmp_path / "*.parquet"))) is ParquetImageText
    assert type(open_source(tmp_path)) is ParquetImageText  # a folder of shards
    assert type(open_source([pq_file, pq_file])) is ParquetImageText
    assert type(open_source(jl)) is JsonlImageText
    assert type(open_source(txt)) is TextCorpus
    assert type(open_source(jl, kind="text")) is TextCorpus  # explicit kind wins
    assert open_source(txt, split="line", on_error="raise").on_error == "raise"  # kwargs reach the class


def test_open_source_errors(tmp_path):
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"cannot tell the format.*data\.csv"):
        open_source(odd)
    with pytest.raises(ConfigError, match="unknown source kind 'csv'"):
        open_source(odd, kind="csv")
    for missing in ("nope.parquet", "nope.jsonl", "nope.txt", "none-*.parquet"):
        with pytest.raises(FileNotFoundError, match="nope|none"):
            open_source(tmp_path / missing)
    txt = tmp_path / "t.txt"
    txt.write_text("x\n")
    with pytest.raises(ConfigError, match="on_error"):
        open_source(txt, on_error="ignore")


# ---------------------------------------------------------------- task formatting

def test_format_caption_and_qa():
    img = make_image((100, 50))
    cap = format_messages(make_record("a red box", img, task="caption"))
    assert cap["messages"] == [{"role": "user", "content": "Describe this image."},
                               {"role": "assistant", "content": "a red box"}]
    assert format_messages(make_record("x", img))["messages"][1]["content"] == "x"  # no task: caption
    qa = format_messages(make_record("fallback", img, task="qa", meta={"question": "What colour?", "answer": "red"}))
    assert qa["messages"] == [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]
    assert format_messages(make_record("red", img, task="qa", meta={"question": "Q"}))["messages"][1]["content"] == "red"
    with pytest.raises(BadRecordError, match="question"):
        format_messages(make_record("red", img, task="qa"))
    own = [{"role": "user", "content": "hi"}]
    assert format_messages(make_record("t", img, messages=own))["messages"] == own  # kept


def test_format_pointing_normalises_to_image_size():
    rec = make_record("", make_image((200, 100)), task="pointing", meta={"points": [(50, 25), (150, 100)], "label": "dot"})
    m = format_messages(rec)["messages"]
    assert m[0] == {"role": "user", "content": "Point to the dot."}
    assert m[1] == {"role": "assistant", "content": "Point: <0.250, 0.250>; <0.750, 1.000>"}
    # a list of images: normalised to the first
    rec2 = make_record("", [make_image((40, 80)), make_image((10, 10))], task="pointing", meta={"points": [(10, 20)]})
    assert format_messages(rec2)["messages"][1]["content"] == "Point: <0.250, 0.250>"
    with pytest.raises(ConfigError, match="image"):
        format_messages(make_record("", None, task="pointing", meta={"points": [(1, 1)]}))


def test_format_counting():
    img = make_image((10, 10))
    assert format_messages(make_record("", img, task="counting", meta={"count": 7, "label": "cats"}))["messages"] == [
        {"role": "user", "content": "How many cats are there?"}, {"role": "assistant", "content": "Count: 7"}]
    pts = make_record("", img, task="counting", meta={"points": [(1, 1)] * 3, "question": "How many?"})
    assert format_messages(pts)["messages"] == [{"role": "user", "content": "How many?"},
                                               {"role": "assistant", "content": "Count: 3"}]


def test_custom_registered_task():
    name = "test_ocr_task"
    if name not in task_formats:
        @task_formats.register(name)
        def format_ocr(rec):
            return [{"role": "user", "content": "Read the text."}, {"role": "assistant", "content": rec["text"].upper()}]
    assert format_messages(make_record("hello", make_image(), task=name))["messages"][1]["content"] == "HELLO"
    assert format_messages(make_record("hello", make_image()), task=name)["messages"][0]["content"] == "Read the text."
    with pytest.raises(UnknownNameError, match="no_such_task"):
        format_messages(make_record("x", None, task="no_such_task"))
    with pytest.raises(ConfigError, match="already registered"):
        task_formats.register(name)(lambda rec: [])
