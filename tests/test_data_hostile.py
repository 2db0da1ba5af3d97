"""Stage 1 sources tried as a hostile user would, every input built here: a tar shard rewritten in place
with its modification time restored, one changed under a running dataset, repeated keys and `.png`
beside `.PNG`, a `png` after a hundred `jpg`s, gzip shards; image and video paths that leave their
image root in every format (and the Hugging Face cache's symlinks, which must keep working); a FIFO or
a device where a data file should be, lines past the length limit, JSON nested too deeply in COCO and
metadata files; video frame lists whose frames differ in size. Each gives the right records, a counted
bad record naming file, row and reason, or a clear error — never a traceback, wrong data, a read outside
the root, or a hang."""
import contextlib
import gzip
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ds_files import make_image, png_bytes, image_bytes, write_jsonl
import mmlit.formats as F
from mmlit.cli import main
from mmlit.core import BadRecordError, ConfigError
from mmlit.formats import CocoCaptions, Conversations, ImageFolder, WebDatasetShards, guess_kind, load_tar_index
from mmlit.loader import LoaderConfig, make_loader
from mmlit.sources import JsonlImageText, ParquetImageText, TextCorpus, check_frames
from mmlit.storage import NotRegularFile, Store, path_in_root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    "Tar indexes go to the test's own cache, never the user's."
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))


def write_tar(path, members, mtime: int = 1_700_000_000):
    "A tar file of `(name, bytes)` members, written in place (the same inode when `path` exists)."
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = mtime
            tf.addfile(ti, io.BytesIO(data))
    return path


def caption_shard(captions: dict[str, str]) -> list:
    "Members of a shard of samples with a PNG (its colour from the caption) and a caption each."
    out = []
    for key, text in captions.items():
        out += [(f"{key}.png", png_bytes((8, 8), "RGB", (len(text) * 9 % 256, 50, 90))), (f"{key}.txt", text.encode())]
    return out


def texts(ds) -> list:
    "Every record's text, or None for a bad one."
    return [r["text"] if r else None for r in (ds.get(i) for i in range(len(ds)))]


def inspect(*argv) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", *map(str, argv)])
    return rc, (json.loads(out.getvalue()) if rc == 0 and "--json" in argv else None), err.getvalue()


# ======================================================================== WebDataset: a shard rewritten in place

OLD = {"a": "a cat on a mat", "b": "a dog", "c": "two birds in a tree"}
NEW = {"a": "a cat", "b": "a dog on a long walk", "c": "two birds in a tree"}   # other offsets, same padded size


def rewrite(path, members, how: str):
    "Rewrite shard `path` as `rsync -t`, `cp -p` or an in-place writer would, then restore its size-and-mtime stamp."
    st = path.stat()
    if how == "in place": write_tar(path, members)
    elif how == "cp -p":                                   # copy2 writes the same inode and copies the times
        write_tar(path.with_suffix(".new"), members); shutil.copy2(path.with_suffix(".new"), path)
    else:                                                  # rsync -t: a temporary file renamed over the shard
        tmp = write_tar(path.with_name("." + path.name + ".tmp"), members); os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)   # what the old stamp saw


@pytest.mark.parametrize("how", ["in place", "cp -p", "rsync -t"])
def test_rewritten_shard_with_restored_mtime_is_indexed_again(tmp_path, how):
    shard = write_tar(tmp_path / "shard-000.tar", caption_shard(OLD))
    assert texts(WebDatasetShards(shard)) == list(OLD.values())
    rewrite(shard, caption_shard(NEW), how)
    ds = WebDatasetShards(shard)
    assert texts(ds) == list(NEW.values()) and len(ds.report) == 0     # the new captions, from a new index


def test_without_the_new_stamp_the_header_check_still_refuses_stale_offsets(tmp_path, monkeypatch):
    "Where a filesystem shows no ctime (some FUSE mounts), the stale index is used, and each read says so."
    shard = write_tar(tmp_path / "shard-000.tar", caption_shard(OLD))
    old_stamp = lambda p: json.dumps(dict(path=str(p), size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns))
    monkeypatch.setattr(F, "shard_stamp", old_stamp)
    WebDatasetShards(shard)
    rewrite(shard, caption_shard(NEW), "in place")
    ds = WebDatasetShards(shard)                           # the stale cached index: same size and mtime
    got = texts(ds)
    assert all(t in (None, NEW[k]) for t, k in zip(got, NEW)), got     # never another sample's caption
    assert got[2] == NEW["c"]                              # its header and bytes did not move
    assert [b.index for b in ds.report] == [0, 1]
    assert all(b.reason.startswith("shard changed since it was indexed: the tar header at byte") for b in ds.report)
    assert texts(WebDatasetShards(shard)) == list(NEW.values())        # the stale cache file was dropped


def test_shard_changed_under_a_running_dataset(tmp_path):
    shard = write_tar(tmp_path / "shard-000.tar", caption_shard(OLD))
    ds = WebDatasetShards(shard)
    swapped = {"a": OLD["b"], "b": OLD["a"], "c": OLD["c"]}  # same members, other order: sizes alone cannot tell
    write_tar(shard, [m for k in ("b", "a", "c") for m in caption_shard({k: swapped[k]})])
    ld = make_loader(ds, LoaderConfig(batch_size=3, shuffle=False, drop_last=False, num_workers=2, collate=list),
                     transform=lambda r, rng=None: r["text"])
    got = [t for batch in ld for t in batch]
    assert got == [OLD["c"]] and sorted(b.index for b in ld.report) == [0, 1]
    assert {b.reason.split(":")[0] for b in ld.report} == {"shard changed since it was indexed"}


def test_object_storage_shard_rewrite_changes_its_version(tmp_path):
    import fsspec
    fs = fsspec.filesystem("memory")
    uri = "memory://mmlit-hostile-wds/shard-000.tar"
    fs.pipe("/mmlit-hostile-wds/shard-000.tar", write_tar(tmp_path / "a.tar", caption_shard(OLD)).read_bytes())
    try:
        assert texts(WebDatasetShards(uri, storage_options=Store())) == list(OLD.values())
        fs.pipe("/mmlit-hostile-wds/shard-000.tar", write_tar(tmp_path / "b.tar", caption_shard(NEW)).read_bytes())
        assert texts(WebDatasetShards(uri, storage_options=Store())) == list(NEW.values())   # a new version tag: indexed again
    finally: fs.rm("/mmlit-hostile-wds", recursive=True)


# ======================================================================== WebDataset: keys, formats, compression

def test_repeated_keys_and_duplicate_extensions_are_bad_records(tmp_path):
    p8 = png_bytes((8, 8))
    shard = write_tar(tmp_path / "shard-000.tar", [
        ("a.png", p8), ("a.txt", b"first a"),
        ("b.png", p8), ("b.txt", b"b, once"), ("b.txt", b"b, twice"),            # one member name twice
        ("c.png", p8), ("c.PNG", png_bytes((9, 9))), ("c.txt", b"which image?"),  # extensions that differ in case
        ("d.png", p8), ("d.txt", b"fine"),
        ("a.json", b'{"caption": "a again"}'), ("a.txt", b"a again")])           # key a comes back
    ds = WebDatasetShards(shard)
    assert texts(ds) == ["first a", None, None, "fine", None]
    reasons = {b.index: b.reason for b in ds.report}
    assert reasons[1].startswith("sample 'b' has two 'txt' members (b.txt and b.txt)")
    assert reasons[2].startswith("sample 'c' has two 'png' members (c.png and c.PNG)")
    assert reasons[4].startswith("key 'a' was used by sample 0 of this shard already")
    assert all(b.file == str(shard) and b.unit == "sample" for b in ds.report)
    rc, r, err = inspect(shard, "--json")
    assert rc == 0 and (r["rows"], r["good"]) == (5, 2) and "Traceback" not in err


def test_image_format_is_decided_per_sample(tmp_path):
    jpg = image_bytes(make_image((12, 10), noise_seed=1), "JPEG")
    members = [m for i in range(100) for m in ((f"{i:04d}.jpg", jpg), (f"{i:04d}.txt", b"jpeg"))]
    members += [("0100.png", png_bytes((7, 5))), ("0100.txt", b"a png after a hundred jpegs"),
                ("0101.webp", image_bytes(make_image((6, 4)), "WEBP")), ("0101.txt", b"a webp")]
    write_tar(tmp_path / "shard-000.tar", members)
    write_tar(tmp_path / "shard-001.tar", [("p.png", png_bytes((3, 3))), ("p.txt", b"a png shard after a jpeg one"),
                                           ("two.jpg", jpg), ("two.png", png_bytes((3, 3))), ("two.txt", b"two images")])
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"))
    assert ds.image_keys == ("jpg",)                        # all the first 100 samples hold
    recs = [ds.get(i) for i in range(len(ds))]
    assert [(r["text"], r["image"].size) for r in recs[100:103]] == [("a png after a hundred jpegs", (7, 5)), ("a webp", (6, 4)),
                                                                     ("a png shard after a jpeg one", (3, 3))]
    assert not recs[103] and recs[103].bad.reason == "sample 'two' holds several images (jpg, png); pick one with image_key="
    assert WebDatasetShards(tmp_path / "shard-001.tar", image_key="png")[1]["image"].size == (3, 3)


@pytest.mark.parametrize("name,pack", [("shard-000.tar.gz", gzip.compress), ("shard-000.tgz", gzip.compress),
                                       ("shard-000.tar", gzip.compress), ("shard-000.tar", lzma.compress)])
def test_compressed_shards_are_refused_with_a_message(tmp_path, name, pack):
    plain = write_tar(tmp_path / "plain.tar", caption_shard(OLD)).read_bytes()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / name).write_bytes(pack(plain))
    kind = "gzip" if pack is gzip.compress else "xz"
    for given in (tmp_path / "shards" / name, tmp_path / "shards"):    # named, or found in its folder
        with pytest.raises(ConfigError, match=f"{name}: a {kind}-compressed tar shard; mmlit reads samples by byte range"):
            WebDatasetShards(given)
    rc, _, err = inspect(tmp_path / "shards" / name)
    assert rc == 2 and f"a {kind}-compressed tar shard" in err and "gunzip -k" in err and "Traceback" not in err
    assert guess_kind(tmp_path / "shards" / name) == "webdataset"


def test_a_tar_named_tar_gz_is_read(tmp_path):
    "The bytes decide, not the name: an uncompressed tar called .tar.gz reads."
    shard = write_tar(tmp_path / "mislabelled.tar.gz", caption_shard(OLD))
    assert texts(WebDatasetShards(shard)) == list(OLD.values())


# ======================================================================== paths that leave the image root

@pytest.fixture
def tree(tmp_path):
    "data/ (the image root) with imgs/in.png; secret.png beside data/, outside it."
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    make_image((11, 7)).save(tmp_path / "data" / "imgs" / "in.png")
    make_image((5, 5)).save(tmp_path / "secret.png")
    return tmp_path


ESCAPES = ["../secret.png", "imgs/../../secret.png", "./../secret.png"]


def absolute(tree) -> str: return str(tree / "secret.png")


def assert_left_root(report, n: int, file):
    bad = list(report)
    assert len(bad) == n and all(b.reason.startswith("path leaves image_root: ") for b in bad), [b.reason for b in bad]
    assert all(b.file == str(file) for b in bad)


def test_jsonl_image_and_video_paths(tree):
    d = tree / "data"
    rows = [{"text": "in", "image": "imgs/in.png"}] + [{"text": e, "image": e} for e in ESCAPES]
    rows += [{"text": "abs", "image": absolute(tree)}, {"text": "list", "image": ["imgs/in.png", "../secret.png"]},
             {"text": "frames", "video": ["imgs/in.png", "../secret.png"]}, {"text": "clip", "video": "../clip.mp4"}]
    (tree / "clip.mp4").write_bytes(b"not read")
    f = write_jsonl(d / "pairs.jsonl", rows)
    ds = JsonlImageText(f)
    assert texts(ds) == ["in"] + [None] * 7
    assert_left_root(ds.report, 7, f)
    assert [b.index for b in ds.report] == list(range(1, 8))
    ok = JsonlImageText(f, allow_absolute_paths=True)
    assert ok[4]["image"].size == (5, 5) and not ok[1]      # an absolute path is allowed; climbing out is not
    with pytest.raises(BadRecordError, match=r"pairs.jsonl line 1: path leaves image_root: '../secret.png' resolves to"):
        JsonlImageText(f, on_error="raise")[1]


def test_parquet_path_column_plain_and_struct(tree):
    d = tree / "data"
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    refs = ["imgs/in.png"] + ESCAPES + [absolute(tree)]
    pq.write_table(pa.table({"image": refs, "caption": refs}), d / "plain.parquet")
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": r} for r in refs], struct), "caption": refs}), d / "struct.parquet")
    for f in (d / "plain.parquet", d / "struct.parquet"):
        ds = ParquetImageText(f)
        assert texts(ds) == ["imgs/in.png"] + [None] * 4
        assert_left_root(ds.report, 4, f)
        assert ParquetImageText(f, allow_absolute_paths=True)[4]["image"].size == (5, 5)


def test_coco_file_names(tree):
    d = tree / "data"
    names = ["imgs/in.png"] + ESCAPES + [absolute(tree)]
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i, "image_id": i, "caption": n} for i, n in enumerate(names)]}
    (d / "captions.json").write_text(json.dumps(coco))
    cc = CocoCaptions(d / "captions.json")
    assert texts(cc) == ["imgs/in.png"] + [None] * 4
    assert_left_root(cc.report, 4, d / "captions.json")
    assert CocoCaptions(d / "captions.json", allow_absolute_paths=True)[4]["image"].size == (5, 5)


def test_conversation_images_parts_and_videos(tree):
    d = tree / "data"
    turn = lambda v: [{"from": "human", "value": v}, {"from": "gpt", "value": "ok"}]
    items = [{"image": "imgs/in.png", "conversations": turn("<image>")},
             {"image": "../secret.png", "conversations": turn("<image>")},
             {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/../../secret.png"}}]},
                           {"role": "assistant", "content": "ok"}]},
             {"images": [absolute(tree)], "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]},
             {"video": ["imgs/in.png", "../secret.png"], "conversations": turn("<video>")}]
    f = write_jsonl(d / "chat.jsonl", items)
    cv = Conversations(f)
    assert [bool(r) for r in (cv.get(i) for i in range(5))] == [True, False, False, False, False]
    assert_left_root(cv.report, 4, f)
    assert Conversations(f, allow_absolute_paths=True)[3]["image"][0].size == (5, 5)


def test_image_folder_metadata_file_names(tree):
    d = tree / "data"
    rows = [{"file_name": "imgs/in.png", "text": "in"}] + [{"file_name": e, "text": e} for e in ESCAPES]
    rows.append({"file_name": absolute(tree), "text": "abs"})
    write_jsonl(d / "metadata.jsonl", rows)
    ds = ImageFolder(d)
    assert texts(ds) == ["in"] + [None] * 4
    assert_left_root(ds.report, 4, d / "metadata.jsonl")
    assert ImageFolder(d, allow_absolute_paths=True)[4]["image"].size == (5, 5)
    rc, r, err = inspect(d, "--json")
    assert rc == 0 and (r["rows"], r["good"]) == (5, 1) and "Traceback" not in err


def test_huggingface_cache_symlinks_keep_working(tmp_path):
    "A hub snapshot's files are links into ../../blobs/, outside the snapshot folder: the lexical path decides."
    repo = tmp_path / "hub" / "datasets--me--pets"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    (snap / "images").mkdir(parents=True)
    make_image((13, 9)).save(repo / "blobs" / "aa11", "PNG")
    (snap / "images" / "cat.png").symlink_to("../../../blobs/aa11")
    (repo / "blobs" / "bb22").write_text(json.dumps({"text": "a cat", "image": "images/cat.png"}) + "\n"
                                         + json.dumps({"text": "the blob", "image": "../../blobs/aa11"}) + "\n")
    (snap / "pairs.jsonl").symlink_to("../../blobs/bb22")
    ds = JsonlImageText(snap / "pairs.jsonl")                # the root: the link's folder, not the blob's
    assert ds.image_root == snap and ds[0]["image"].size == (13, 9)
    assert not ds[1] and ds.report.reasons() == {"path leaves image_root": 1}   # a record may not climb out itself
    (snap / "images" / "link").symlink_to(tmp_path)          # a link in the root to elsewhere: `link/..` stays lexical
    assert path_in_root(snap, "images/link/../cat.png") == snap / "images" / "cat.png"


def test_uri_paths_are_checked_on_the_normalised_uri(tmp_path):
    import fsspec
    fs = fsspec.filesystem("memory")
    fs.pipe({"/mmlit-hostile/data/in.png": png_bytes((4, 3)), "/mmlit-hostile/secret.png": png_bytes((5, 5)),
             "/mmlit-hostile/data/pairs.jsonl": "\n".join(json.dumps(r) for r in [
                 {"text": "in", "image": "in.png"}, {"text": "up", "image": "../secret.png"},
                 {"text": "deeper", "image": "x/../../secret.png"}, {"text": "uri", "image": "memory://mmlit-hostile/secret.png"}]).encode()})
    try:
        ds = JsonlImageText("memory://mmlit-hostile/data/pairs.jsonl", storage_options=Store())
        assert texts(ds) == ["in", None, None, None]
        assert ds.report.reasons() == {"path leaves image_root": 3}
        assert JsonlImageText("memory://mmlit-hostile/data/pairs.jsonl", storage_options=Store(),
                              allow_absolute_paths=True)[3]["image"].size == (5, 5)
    finally: fs.rm("/mmlit-hostile", recursive=True)


# ======================================================================== FIFOs, devices, long lines, deep JSON

def finishes(fn, fifo, seconds: float = 30):
    "`fn()`'s result or exception; if it is still running after `seconds` (blocked on `fifo`), wake it and fail."
    out = {}
    def run():
        try: out["value"] = fn()
        except BaseException as e: out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start(); t.join(seconds)
    if t.is_alive():
        for _ in range(2):                                 # a reader blocked in open() wakes when a writer comes and goes
            with contextlib.suppress(OSError): os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"reading {fifo} did not return within {seconds} s: a FIFO was opened to be read")
    return out.get("error", out.get("value"))


FIFO_SOURCES = {
    "imagefolder metadata.jsonl": ("data/metadata.jsonl", lambda d: ImageFolder(d / "data")),
    "imagefolder metadata.csv": ("data/metadata.csv", lambda d: ImageFolder(d / "data")),
    "jsonl": ("pairs.jsonl", lambda d: JsonlImageText(d / "pairs.jsonl")),
    "conversations": ("chat.json", lambda d: Conversations(d / "chat.json")),
    "coco": ("captions.json", lambda d: CocoCaptions(d / "captions.json")),
    "text corpus": ("docs.txt", lambda d: TextCorpus(d / "docs.txt")),
    "text corpus folder": ("docs.txt", lambda d: TextCorpus(d)),
    "parquet glob": ("a.parquet", lambda d: ParquetImageText(str(d / "*.parquet"))),
    "tar shard": ("shard-000.tar", lambda d: WebDatasetShards(d / "shard-000.tar")),
    "tar folder": ("shard-000.tar", lambda d: WebDatasetShards(d)),
}


@pytest.mark.parametrize("which", FIFO_SOURCES)
def test_a_fifo_as_a_data_file_is_refused_not_read_forever(tmp_path, which):
    name, make = FIFO_SOURCES[which]
    (tmp_path / "data").mkdir()
    make_image((4, 4)).save(tmp_path / "data" / "x.png")
    os.mkfifo(tmp_path / name)
    err = finishes(lambda: make(tmp_path), tmp_path / name)
    assert isinstance(err, NotRegularFile) and isinstance(err, OSError), repr(err)
    assert f"{tmp_path / name}: is a FIFO (named pipe), not a regular file" in str(err)


def test_a_fifo_through_inspect_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "metadata.jsonl")
    rc, _, err = finishes(lambda: inspect(tmp_path / "data"), tmp_path / "data" / "metadata.jsonl")
    assert rc == 2 and "metadata.jsonl: is a FIFO (named pipe), not a regular file" in err and "Traceback" not in err


def test_fifo_images_and_videos_are_bad_records(tmp_path):
    os.mkfifo(tmp_path / "pipe.png"); os.mkfifo(tmp_path / "pipe.mp4")
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "img", "image": "pipe.png"}, {"text": "vid", "video": "pipe.mp4"}])
    ds = JsonlImageText(f)
    assert finishes(lambda: texts(ds), tmp_path / "pipe.png") == [None, None]
    assert [b.reason for b in ds.report] == [f"{tmp_path / 'pipe.png'}: is a FIFO (named pipe), not a regular file; mmlit reads "
                                             "data only from regular files (reading a pipe or device could block or never end)",
                                             f"video path {tmp_path / 'pipe.mp4'} is a FIFO (named pipe), not a file or folder"]


def test_a_device_as_metadata_is_refused(tmp_path):
    "A link to /dev/zero as metadata.jsonl (read in a child process, killed if it never ends)."
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").symlink_to("/dev/zero")
    code = ("import sys\nfrom mmlit.formats import ImageFolder\n"
            "try: ImageFolder(sys.argv[1])\nexcept OSError as e: print(e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "metadata.jsonl: is a character device, not a regular file" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("which", ["jsonl", "conversations", "text jsonl", "text paragraphs", "imagefolder"])
def test_a_line_over_the_limit_is_a_bad_record_and_is_never_held(tmp_path, which):
    "A 40 MB line (no newline until the end) with max_line_bytes=1 MB: one bad record naming its line; indexing stays small."
    make_image((4, 4)).save(tmp_path / "x.png")
    good = {"text": "good", "image": "x.png", "file_name": "x.png", "conversations": [{"from": "human", "value": "hi"}]}
    huge = json.dumps({"text": "x" * (40 << 20)}).encode()
    name = {"imagefolder": "metadata.jsonl", "text paragraphs": "docs.txt", "conversations": "chat.jsonl"}.get(which, "pairs.jsonl")
    body = (b"first paragraph\n\n" + huge + b"\n\nlast paragraph\n") if which == "text paragraphs" else \
           (json.dumps(good).encode() + b"\n" + huge + b"\n" + json.dumps(good).encode() + b"\n")
    (tmp_path / name).write_bytes(body)
    make = {"jsonl": lambda: JsonlImageText(tmp_path / name, max_line_bytes=1 << 20),
            "conversations": lambda: Conversations(tmp_path / name, max_line_bytes=1 << 20),
            "text jsonl": lambda: TextCorpus(tmp_path / name, max_line_bytes=1 << 20),
            "text paragraphs": lambda: TextCorpus(tmp_path / name, max_line_bytes=1 << 20),
            "imagefolder": lambda: ImageFolder(tmp_path, max_line_bytes=1 << 20)}[which]
    tracemalloc.start()
    ds = make()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"indexing held {peak / 1e6:.1f} MB"      # pieces of at most 1 MB, never the 40 MB line
    got = [bool(r) for r in (ds.get(i) for i in range(len(ds)))]
    assert got == [True, False, True], got
    (bad,) = ds.report
    assert (bad.file, bad.index, bad.unit) == (str(tmp_path / name), 1 if which != "text paragraphs" else 2, "line")
    assert "longer than max_line_bytes=1048576 bytes" in bad.reason


def test_a_file_without_newlines_is_one_bad_line(tmp_path):
    (tmp_path / "blob.jsonl").write_bytes(os.urandom(5 << 20).replace(b"\n", b"x"))
    ds = JsonlImageText(tmp_path / "blob.jsonl", max_line_bytes=1 << 20, text_field="text", image_field=None)
    assert len(ds) == 1 and not ds[0] and "line longer than max_line_bytes" in ds.report.to_dicts()[0]["reason"]
    with pytest.raises(ConfigError, match="max_line_bytes must be a whole number >= 1"): JsonlImageText(tmp_path / "blob.jsonl", max_line_bytes=0)


def test_deep_json_in_coco_is_a_clear_error(tmp_path):
    for depth in (951, 5000, 200_000):
        f = tmp_path / f"deep{depth}.json"
        f.write_text('{"images": [], "annotations": [], "x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
        with pytest.raises(ConfigError, match=rf"deep{depth}.json: not a readable COCO annotation file: JSON nested {depth} levels deep"):
            CocoCaptions(f)
        rc, _, err = inspect(f)
        assert rc == 2 and "Traceback" not in err and "RecursionError" not in err
    ok = tmp_path / "ok.json"
    make_image((3, 3)).save(tmp_path / "a.png")
    ok.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "x": json.loads("[" * 900 + "]" * 900)}],
                              "annotations": [{"image_id": 1, "caption": "deep but allowed"}]}))
    assert CocoCaptions(ok)[0]["text"] == "deep but allowed"


def test_deep_json_in_metadata_and_conversation_lines(tmp_path):
    make_image((3, 3)).save(tmp_path / "a.png")
    deep = "[" * 3000 + "]" * 3000
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n"
                                             + '{"file_name": "a.png", "text": "deep", "x": ' + deep + "}\n")
    ds = ImageFolder(tmp_path)
    assert texts(ds) == ["ok", None] and ds.report.to_dicts()[0]["reason"].startswith("JSON nested 3001 levels deep")
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "chat.jsonl").write_text('{"conversations": ' + deep + "}\n")
    cv = Conversations(tmp_path / "chat.jsonl")
    assert not cv[0] and cv.report.to_dicts()[0]["reason"].startswith("JSON nested 3001 levels deep")


# ======================================================================== video frame lists

def test_frames_of_different_sizes_are_a_bad_record(tmp_path):
    (tmp_path / "f").mkdir()
    for i, size in enumerate([(16, 12), (16, 12), (12, 16), (16, 12)]): make_image(size).save(tmp_path / "f" / f"{i}.png")
    make_image((12, 16)).save(tmp_path / "f" / "turned.jpg", exif=_exif_orientation(6))    # stored 12x16, shown 16x12
    rows = [{"text": "same", "video": ["f/0.png", "f/1.png", "f/3.png"]},
            {"text": "mixed", "video": ["f/0.png", "f/1.png", "f/2.png", "f/3.png"]},
            {"text": "turned upright", "video": ["f/0.png", "f/turned.jpg"]}]
    f = write_jsonl(tmp_path / "clips.jsonl", rows)
    ds = JsonlImageText(f)
    assert texts(ds) == ["same", None, "turned upright"]
    (bad,) = ds.report
    assert (bad.file, bad.index) == (str(f), 1)
    assert bad.reason == "frames of one video differ in size (0.png is 16x12, 2.png is 12x16); stage 2 cannot stack them"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"video": r["video"], "conversations": [{"from": "human", "value": "<video>"}]} for r in rows])
    cv = Conversations(chat)
    assert [bool(cv.get(i)) for i in range(3)] == [True, False, True] and len(cv.report) == 1
    assert check_frames([tmp_path / "f" / "0.png", tmp_path / "f" / "turned.jpg"]) == (16, 12)


def _exif_orientation(o: int) -> bytes:
    ex = Image.Exif(); ex[0x0112] = o
    return ex.tobytes()
