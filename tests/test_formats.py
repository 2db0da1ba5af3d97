"""mmlit.formats on files written by other people's tools: `webdataset.ShardWriter` shards (one cut short, one
sample without its image, one image that does not decode), an HF `Dataset.to_parquet` file, LLaVA / ShareGPT
conversation files, a COCO captions file and an HF-style image folder (cross-checked with `datasets`)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import inspect_json, run_cli
from ds_files import image_bytes
from mmlit.core import ConfigError
from mmlit.sources import ParquetImageText
from mmlit.formats import (CocoCaptions, Conversations, ImageFolder, WebDatasetShards, guess_kind, index_tar,
                           open_dataset)
from mmlit.loader import LoaderConfig, make_loader

wds = pytest.importorskip("webdataset")

N, PER_SHARD = 30, 8
NO_IMAGE, BAD_IMAGE, CUT_IN = 13, 5, 20           # sample numbers; CUT_IN: shard 2 is cut inside this sample's image


def photo(i: int) -> Image.Image:
    "A distinct 24×24 image per sample."
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    "Four shards written by webdataset's ShardWriter; shard 2 is then cut inside sample 20's image."
    d = tmp_path_factory.mktemp("wds")
    with wds.ShardWriter(str(d / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(N):
            sample = {"__key__": f"{i:06d}", "txt": f"photo {i}", "json": {"n": i, "caption": f"json caption {i}"}}
            if i == BAD_IMAGE: sample["png"] = b"this is not an image"
            elif i != NO_IMAGE: sample["png"] = image_bytes(photo(i))
            sink.write(sample)
    paths = sorted(d.glob("shard-*.tar"))
    assert len(paths) == 4
    cut = paths[2]
    ix = index_tar(cut)
    off, size = ix.members(CUT_IN - 2 * PER_SHARD)["png"]
    cut.write_bytes(cut.read_bytes()[: off + size // 2])
    return paths


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    "Tar indexes go to a temporary cache, never the user's."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    "A cache of the test's own."
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- WebDataset -----------------------------------------------------------------------------------

def test_shards_read_as_webdataset_wrote_them(shards):
    ds = WebDatasetShards(shards)
    assert len(ds) == 8 + 8 + (4 + 1) + 6                   # shard 2: four whole samples, then one record for the cut
    assert (ds.image_keys, ds.text_key) == (("png",), "txt")
    good = [r for r in (ds.get(i) for i in range(len(ds))) if r]
    keys = [int(r["meta"]["key"]) for r in good]
    assert keys == [i for i in range(N) if i not in (NO_IMAGE, BAD_IMAGE) and not CUT_IN <= i < 3 * PER_SHARD]
    for r in good:
        i = int(r["meta"]["key"])
        assert r["text"] == f"photo {i}"
        assert np.array_equal(np.asarray(r["image"]), np.asarray(photo(i)))
    bad = {(p.split("/")[-1], b.index): b.reason for b in ds.report for p in [b.file]}
    assert sorted(bad) == [("shard-000000.tar", BAD_IMAGE), ("shard-000001.tar", NO_IMAGE - PER_SHARD),
                           ("shard-000002.tar", CUT_IN - 2 * PER_SHARD)]
    assert bad["shard-000000.tar", BAD_IMAGE].startswith("not a readable image")
    assert bad["shard-000001.tar", NO_IMAGE - PER_SHARD] == "sample '000013' has no image (png); its members are ['json', 'txt']"
    assert bad["shard-000002.tar", CUT_IN - 2 * PER_SHARD].startswith("truncated shard: member 000020.png needs bytes up to")
    assert {b.unit for b in ds.report} == {"sample"}


def test_same_samples_as_the_webdataset_pipeline(shards):
    "On the whole shards, mmlit's records are the webdataset package's samples, in the same order."
    whole = [p for k, p in enumerate(shards) if k != 2]
    theirs = [(s["__key__"], s["txt"].decode()) for s in wds.WebDataset([str(p) for p in whole], shardshuffle=False)]
    ds = WebDatasetShards(whole)
    ours = [(ds.indexes[k].keys[j], ds.get(i) and ds.get(i)["text"]) for i in range(len(ds)) for k, j in [ds.locate(i)]]
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert [t for (k, t) in ours if t] == [t for (k, t) in theirs if int(k) not in (NO_IMAGE, BAD_IMAGE)]


def test_caption_from_the_json_member_and_brace_patterns(shards):
    pattern = str(shards[0].parent / "shard-{000000..000001}.tar")
    ds = WebDatasetShards(pattern, text_key="json")
    assert (len(ds), ds.text_field, ds[0]["text"]) == (16, "caption", "json caption 0")
    assert guess_kind(pattern) == "webdataset"


def test_index_is_cached_and_rebuilt_when_a_shard_changes(shards, cache_dir, monkeypatch, tmp_path):
    import shutil
    import mmlit.formats as F
    copy = tmp_path / "copy-000.tar"
    shutil.copy(shards[0], copy)
    first = WebDatasetShards(copy)
    assert len(list(cache_dir.glob("tar_index/*.npz"))) == 1
    calls = []
    real = F.index_tar
    monkeypatch.setattr(F, "index_tar", lambda p: calls.append(p) or real(p))
    again = WebDatasetShards(copy)
    assert calls == [] and again.indexes[0].keys == first.indexes[0].keys          # read from the cache
    with open(copy, "r+b") as f: f.truncate(copy.stat().st_size - 10240)          # the shard changes
    WebDatasetShards(copy)
    assert len(calls) == 1


def test_reads_are_byte_ranges(shards, monkeypatch):
    ds = WebDatasetShards(shards)
    reads = []
    real = WebDatasetShards._read
    monkeypatch.setattr(WebDatasetShards, "_read", lambda self, k, off, size, where: reads.append(size) or real(self, k, off, size, where))
    r = ds.get(1)
    assert sum(reads) == 512 + len(image_bytes(photo(1))) + 512 + len("photo 1")   # the image and caption members only, each with its header
    assert sum(reads) < shards[0].stat().st_size / 5


def _augment(rec, rng):
    "A random 16×16 crop and flip plus a noise vector, all drawn from the sample's rng."
    y, x = rng.integers(0, 9, 2)
    a = np.asarray(rec["image"].convert("RGB"))[y:y + 16, x:x + 16]
    if rng.random() < 0.5: a = a[:, ::-1]
    return dict(pixel_values=torch.from_numpy(a.copy()).permute(2, 0, 1),
                noise=torch.from_numpy(rng.standard_normal(3).astype(np.float32)),
                key=torch.tensor(int(rec["meta"]["key"])))


def _loader(shards, **cfg):
    return make_loader(WebDatasetShards(shards), LoaderConfig(**{**dict(batch_size=4, seed=3, drop_last=False), **cfg}),
                       transform=_augment)


def _run(ld, epochs: int, limit: int | None = None) -> list:
    out = []
    while ld.state_dict()["epoch"] < epochs:
        for b in ld:
            out.append(tuple((k, b[k].numpy().tobytes()) for k in sorted(b)))
            if limit is not None and len(out) == limit: return out
    return out


@pytest.fixture(scope="module")
def reference(shards):
    return _run(_loader(shards, shuffle=True), 2)


def test_zero_and_two_workers_give_identical_batches(shards, reference):
    ld = _loader(shards, shuffle=True, num_workers=2)
    assert _run(ld, 2) == reference
    assert len(reference) == 2 * 7                                 # 27 positions a epoch in batches of 4; bad ones dropped
    assert sum(len(dict(b)["key"]) // 8 for b in reference) == 2 * 24
    assert len(ld.report) == 3


@pytest.mark.parametrize("cut", [2, 7])                             # mid-epoch 0, mid-epoch 1
def test_mid_epoch_resume_is_exact(shards, reference, cut):
    a = _loader(shards, shuffle=True, num_workers=2)
    got = _run(a, 2, limit=cut)
    b = _loader(shards, shuffle=True)
    b.load_state_dict(a.state_dict())
    assert got + _run(b, 2) == reference


# --- Parquet written by HF datasets; column detection -----------------------------------------------

def test_hf_to_parquet_just_works(tmp_path):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"image": [photo(i) for i in range(5)], "text": [f"photo {i}" for i in range(5)]})
    hf = hf.cast_column("image", datasets.Image())
    path = tmp_path / "hf.parquet"
    hf.to_parquet(str(path))
    ds = ParquetImageText(path)
    assert (ds.text_column, ds.image_column, ds[3]["text"]) == ("text", "image", "photo 3")
    assert np.array_equal(np.asarray(ds[3]["image"]), np.asarray(photo(3)))
    r = inspect_json(str(path))
    assert (r["kind"], r["rows"], r["good"], r["captions"]["count"]) == ("parquet", 5, 5, 5)

    both = datasets.Dataset.from_dict({"image": [photo(0)], "text": ["a"], "caption": ["b"]}).cast_column("image", datasets.Image())
    both.to_parquet(str(tmp_path / "both.parquet"))
    with pytest.raises(ConfigError, match=r"several columns could be the caption: \['text', 'caption'\]; columns are "
                                          r"\['image', 'text', 'caption'\]; pick one with text_column="):
        ParquetImageText(tmp_path / "both.parquet")
    rc, _, err = run_cli("inspect", str(tmp_path / "both.parquet"))
    assert rc == 2 and "pick one with --text-column" in err
    r = inspect_json(str(tmp_path / "both.parquet"), "--text-column", "caption")
    assert r["good"] == 1


def test_inspect_tar_shards_and_errors(shards):
    r = inspect_json(str(shards[0].parent / "shard-{000000..000003}.tar"))
    assert (r["kind"], r["rows"], r["good"], len(r["bad"])) == ("webdataset", 27, 24, 3)
    assert r["images"]["count"] == 24 and r["captions"]["count"] == 24
    rc, _, err = run_cli("inspect", str(shards[0]), "--text-column", "caption")
    assert rc == 2 and "no column 'caption'" in err and "pick one with --text-column" in err


# --- conversations ----------------------------------------------------------------------------------

@pytest.fixture
def chat_files(tmp_path):
    sizes = {"a.png": (30, 20), "b.png": (12, 40), "c.png": (16, 16)}
    for name, size in sizes.items(): Image.new("RGB", size, "white").save(tmp_path / name)
    llava = [{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                             {"from": "gpt", "value": "A white box."}]},
             {"id": "1", "image": ["b.png", "a.png"],
              "conversations": [{"from": "system", "value": "Answer briefly."},
                                {"from": "human", "value": "<image>\nand\n<image>\nWhich is taller?"},
                                {"from": "gpt", "value": "The first."}, {"from": "human", "value": "Sure?"},
                                {"from": "gpt", "value": "Yes."}]},
             {"id": "2", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>Two?"},
                                                             {"from": "gpt", "value": "No."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava, indent=2))
    sharegpt = [{"messages": [{"role": "user", "content": "<image>Compare with <image>."},
                              {"role": "assistant", "content": "The second is square."}], "images": ["a.png", "c.png"]},
                {"messages": [{"role": "user", "content": [{"type": "image", "image": "c.png"}, {"type": "text", "text": "Size?"}]},
                              {"role": "assistant", "content": "Sixteen."}]}]
    (tmp_path / "sharegpt.jsonl").write_text("\n".join(json.dumps(o) for o in sharegpt) + "\n")
    return tmp_path, sizes


def test_llava_json_array_and_sharegpt_jsonl(chat_files):
    d, sizes = chat_files
    lv = open_dataset(d / "llava.json")
    assert isinstance(lv, Conversations) and len(lv) == 3
    r = lv[1]
    assert [im.size for im in r["image"]] == [sizes["b.png"], sizes["a.png"]]              # placeholder order
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert r["messages"][1]["content"] == "<image>\nand\n<image>\nWhich is taller?"
    assert r["meta"] == dict(source="conversations", file=str(d / "llava.json"), index=1, unit="item", id="1")
    assert not lv[2] and [b.reason for b in lv.report] == ["2 <image> placeholder(s) for 1 image(s)"]
    sg = open_dataset(d / "sharegpt.jsonl")
    assert isinstance(sg, Conversations)
    assert [im.size for im in sg[0]["image"]] == [sizes["a.png"], sizes["c.png"]]
    assert sg[1]["messages"][0]["content"] == "<image>Size?"
    r = inspect_json(str(d / "llava.json"))
    assert (r["kind"], r["rows"], r["good"], r["images"]["count"]) == ("conversations", 3, 2, 3)


def test_conversations_feed_the_chat_preprocessor(chat_files):
    from collate_helpers import tiny_tokenizer
    from mmlit.multimodal import build_preprocessor
    d, sizes = chat_files
    tok = tiny_tokenizer()
    pre = build_preprocessor("qwen2_vl", tok)
    out = pre(Conversations(d / "llava.json")[1])
    assert out["image_grid_thw"].shape == (2, 3)
    runs = out["image_input_idx"]
    assert runs.shape[0] == 2 and int((out["mm_token_type_ids"] == 1).sum()) == sum(pre.vision.num_tokens(g) for g in out["image_grid_thw"])
    trained = tok.decode(out["input_ids"][out["labels"] != -100])
    assert trained.startswith("The first") and trained.count("<eos>") == 2          # both replies (the 2nd: [UNK] in this vocab)
    assert "Which" not in trained and "Sure" not in trained and "Answer" not in trained


# --- COCO and image folders -------------------------------------------------------------------------

def test_coco_captions(tmp_path):
    (tmp_path / "val2017").mkdir()
    for i in (1, 2): photo(i).save(tmp_path / "val2017" / f"{i:012d}.jpg")
    coco = {"info": {"description": "test"}, "licenses": [],
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 24, "width": 24} for i in (1, 2)],
            "annotations": [{"id": 100 + k, "image_id": 1 + k % 2, "caption": f"caption {k}"} for k in range(5)]}
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps(coco))
    assert guess_kind(ann) == "coco"
    cc = open_dataset(ann, image_root=tmp_path / "val2017")
    assert isinstance(cc, CocoCaptions) and len(cc) == 5
    assert (cc[3]["text"], cc[3]["meta"]["image_id"], cc[3]["image"].size) == ("caption 3", 2, (24, 24))
    per = CocoCaptions(ann, image_root=tmp_path / "val2017", per_image=True)
    assert len(per) == 2 and per[0]["captions"] == ["caption 0", "caption 2", "caption 4"]
    r = inspect_json(str(ann), "--image-root", str(tmp_path / "val2017"))
    assert (r["kind"], r["good"]) == ("coco", 5)
    r = inspect_json(str(ann), "--image-root", str(tmp_path / "val2017"), "--per-image")
    assert (r["rows"], r["good"]) == (2, 2)


def test_image_folder_matches_hf_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / "classes" / cls).mkdir(parents=True)
        for n in range(3): photo(10 * k + n).save(tmp_path / "classes" / cls / f"{n}.png")
    ours = ImageFolder(tmp_path / "classes")
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "classes"), split="train")
    assert [r["meta"]["label"] for r in ours.records()] == theirs["label"]
    assert [ours.classes[r["meta"]["label"]] for r in ours.records()] == [theirs.features["label"].int2str(l) for l in theirs["label"]]

    for split, classes in (("train", ["cat", "dog"]), ("test", ["dog", "owl"])):
        for k, cls in enumerate(classes):
            (tmp_path / "splits" / split / cls).mkdir(parents=True)
            for n in range(2): photo(100 + 10 * k + n).save(tmp_path / "splits" / split / cls / f"{n}.png")
    hf = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "splits"))
    for split in ("train", "test"):
        ours = ImageFolder(tmp_path / "splits", split=split)
        names = hf[split].features["label"].names
        assert ours.classes == names
        assert [r["meta"]["label"] for r in ours.records()] == hf[split]["label"]

    meta = tmp_path / "captioned"
    meta.mkdir()
    for n in range(3): photo(n).save(meta / f"{n}.png")
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{n}.png", "text": f"photo {n}", "n": n}) for n in range(3)))
    ours = ImageFolder(meta)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(meta), split="train")
    assert [r["text"] for r in ours.records()] == theirs["text"]
    assert [np.asarray(r["image"]).tobytes() for r in ours.records()] == [np.asarray(im).tobytes() for im in theirs["image"]]
    r = inspect_json(str(meta))
    assert (r["kind"], r["good"]) == ("imagefolder", 3)


def test_llava_jsonl_in_mmlit_inspect(chat_files):
    "The issue's case: a LLaVA-style JSONL is a conversation file, not image-text pairs missing 'text'."
    d, _ = chat_files
    rows = json.loads((d / "llava.json").read_text())
    (d / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = inspect_json(str(d / "llava.jsonl"))
    assert (r["kind"], r["rows"], r["good"]) == ("conversations", 3, 2)
    assert [(b["unit"], b["index"]) for b in r["bad"]] == [("line", 2)]
    rc, _, err = run_cli("inspect", str(d / "llava.jsonl"), "--kind", "jsonl")
    assert rc == 2 and "no column looks like the caption" in err and "pick one with --text-column" in err
    assert "a conversation file? open it with mmlit.formats.Conversations" in err
    r = inspect_json(str(d / "llava.json"), "--kind", "conversations")
    assert r["good"] == 2


def test_image_text_pairs_in_one_json_array(tmp_path):
    for i in range(3): photo(i).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "caption": f"photo {i}"} for i in range(3)] + [{"image": "9.png", "caption": "gone"}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows, indent=2))
    ds = open_dataset(tmp_path / "pairs.json")
    assert type(ds).__name__ == "JsonlImageText" and ds.text_fields == ("caption",)
    assert [r["text"] for r in ds.records()] == ["photo 0", "photo 1", "photo 2"]
    assert [(b.unit, b.index) for b in ds.report] == [("item", 3)]
    r = inspect_json(str(tmp_path / "pairs.json"))
    assert (r["kind"], r["rows"], r["good"]) == ("jsonl", 4, 3)
