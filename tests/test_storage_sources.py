"""Sources over a real S3 API (moto's server on 127.0.0.1, free port): Parquet, JSONL and text
sources read by URI equal the same sources over local copies, batch for batch through the loader;
Parquet reads by range (never a whole shard); faults on the wire leave the batches unchanged and
are counted in `loader.io` (a connection dropped once is sent again by aiohttp, below mmlit); the cache serves the second epoch; permanent faults name the URI;
`mmlit inspect s3://...` works; WebDataset tar shards are indexed and read by byte range."""
import io
import tarfile
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

import numpy as np
import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from ds_files import SPECS, make_image, png_bytes, write_jsonl, write_parquet, image_bytes
from s3_server import CREDS, FaultProxy, make_bucket, moto_s3, s3_options
from mmlit.sources import JsonlImageText, ParquetImageText, TextCorpus, open_source
from mmlit.formats import WebDatasetShards
from mmlit.loader import LoaderConfig, make_loader
from mmlit.storage import AccessDenied, Retry, StorageError, Store, io_stats

BUCKET = "mmlit-sources"
FAST = Retry(attempts=5, backoff=0.02, timeout=1.0)


def summary(recs):
    "What a batch holds, comparable across runs: caption, image size and a pixel checksum per record."
    return [(r["text"], None if r["image"] is None else (r["image"].size, int(np.asarray(r["image"]).sum())),
             r["meta"]["index"]) for r in recs]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Local files and the same files in a bucket: 3 Parquet shards (row groups of 6), a JSONL with images beside it, text."
    d = tmp_path_factory.mktemp("local")
    rng = np.random.default_rng(0)
    files = {}
    (d / "shards").mkdir()
    for k in range(3):                                     # noise images: shards of ~100-150 kB, past pyarrow's 64 kB footer read
        n = 20 + 4 * k
        imgs = [image_bytes(make_image((40 + i % 7, 30 + i % 5), noise_seed=int(rng.integers(1 << 30))), "PNG") for i in range(n)]
        write_parquet(d / "shards" / f"part-{k}.parquet", [f"shard {k} row {i}" for i in range(n)], imgs, row_group_size=6)
    (d / "img").mkdir()
    rows = []
    for i, (size, mode, color) in enumerate(SPECS):
        (d / "img" / f"{i}.png").write_bytes(png_bytes(size, mode, color))
        rows.append({"image": f"img/{i}.png", "text": f"picture {i}"})
    write_jsonl(d / "pairs.jsonl", rows)
    (d / "corpus.txt").write_text("".join(f"document {i}\nsecond line of {i}\n\n" for i in range(40)))
    write_jsonl(d / "docs.jsonl", [{"text": f"json document {i} " + "word " * (i % 9)} for i in range(2000)])   # ~90 kB
    (d / "wds").mkdir()
    for k in range(2):                                     # tar shards: a PNG and a caption per sample
        with tarfile.open(d / "wds" / f"shard-{k}.tar", "w") as tf:
            for i in range(10 + k):
                for ext, blob in (("png", png_bytes((20 + i, 16 + k), "RGB", (i * 20, k * 90, 7))), ("txt", f"tar {k} sample {i}".encode())):
                    ti = tarfile.TarInfo(f"s{k}{i:03d}.{ext}"); ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))
    for p in d.rglob("*"):
        if p.is_file(): files[str(p.relative_to(d))] = p.read_bytes()
    with moto_s3() as endpoint:
        make_bucket(endpoint, BUCKET, files)
        yield d, endpoint, files


def epochs(ds, epochs=(0, 1), **cfg):
    ld = make_loader(ds, LoaderConfig(**{"batch_size": 5, "seed": 3, **cfg}), collate=summary)
    out = []
    for e in epochs:
        ld.set_epoch(e)
        out.append(list(ld))
    return ld, out


def test_parquet_over_s3_equals_local_batch_for_batch(data):
    d, endpoint, files = data
    local = ParquetImageText(str(d / "shards" / "*.parquet"))
    remote = ParquetImageText(f"s3://{BUCKET}/shards/*.parquet", storage_options=s3_options(endpoint))
    assert [str(f) for f in remote.files] == [f"s3://{BUCKET}/shards/part-{k}.parquet" for k in range(3)]
    assert (len(remote), list(remote.blocks)) == (len(local), list(local.blocks))
    io_stats.reset()
    ld_r, got = epochs(remote)
    _, want = epochs(local)
    assert got == want and len(got[0]) == len(local) // 5
    assert ld_r.io.requests > 0 and ld_r.io.retries == 0
    # ranged reads: no request fetched a whole shard; one epoch fetched about the data once, plus footers
    sizes = sum(len(v) for k, v in files.items() if k.endswith(".parquet"))
    assert ld_r.io.bytes <= 2 * sizes + 3 * 2 * 8192


def test_parquet_reads_only_the_row_groups_asked_for(data):
    d, endpoint, files = data
    with FaultProxy(endpoint, lifetime=60) as proxy:      # no faults: it counts the bytes on the wire
        ds = ParquetImageText(f"s3://{BUCKET}/shards/part-2.parquet", storage_options=s3_options(proxy.endpoint))
        time.sleep(0.2)                                    # the opening's last bytes are through the proxy
        io_stats.reset()
        down = proxy.down_bytes
        rec = ds.get(13)                                   # row group 2 (rows 12..17) of one shard
        got = io_stats.take()
        time.sleep(0.2)
        wire = proxy.down_bytes - down
    md = pq.ParquetFile(io.BytesIO(files["shards/part-2.parquet"])).metadata
    chunks = [md.row_group(2).column(c).total_compressed_size for c in range(md.num_columns)]
    assert rec["text"] == "shard 2 row 13" and len(files["shards/part-2.parquet"]) > 2 * (64 << 10)
    assert (got["requests"], got["bytes"]) == (len(chunks), sum(chunks))   # the footer was read when the source opened
    assert sum(chunks) <= wire < sum(chunks) + 1024 * len(chunks)           # plus HTTP headers, nothing else


def test_jsonl_with_images_and_text_corpus_over_s3(data):
    d, endpoint, files = data
    opts = s3_options(endpoint)
    pairs_l, pairs_r = JsonlImageText(d / "pairs.jsonl"), JsonlImageText(f"s3://{BUCKET}/pairs.jsonl", storage_options=opts)
    assert pairs_r.image_root == f"s3://{BUCKET}"
    assert summary(pairs_r.records()) == summary(pairs_l.records())
    for name in ("corpus.txt", "docs.jsonl"):
        loc, rem = TextCorpus(d / name), TextCorpus(f"s3://{BUCKET}/{name}", storage_options=opts)
        assert [r["text"] for r in rem.records()] == [r["text"] for r in loc.records()]
    io_stats.reset()
    rem = TextCorpus(f"s3://{BUCKET}/docs.jsonl", storage_options=Store(opts))     # a new store: nothing read yet
    scan = io_stats.take()
    size = len(files["docs.jsonl"])
    assert size > 64 << 10 and scan["bytes"] == 3 + size and scan["requests"] <= 10   # BOM check, then reads ahead 4 kB, 8 kB, ...
    rem.get(17)
    one = io_stats.take()
    assert one["requests"] == 1 and one["bytes"] <= 4096                          # one record: one small read


@pytest.mark.parametrize("workers", [0, 2])
def test_faults_on_the_wire_leave_the_epoch_unchanged_and_are_counted(data, workers):
    d, endpoint, files = data
    _, want = epochs(ParquetImageText(str(d / "shards" / "*.parquet")), epochs=(0,))
    with FaultProxy(endpoint, every=3, kinds=("drop", "503", "delay"), max_faults=6, delay=2.0, lifetime=120) as proxy:
        io_stats.reset()
        ds = ParquetImageText(f"s3://{BUCKET}/shards/*.parquet", storage_options=Store(s3_options(proxy.endpoint), retry=FAST))
        ld, got = epochs(ds, epochs=(0,), num_workers=workers)
    assert got == want
    assert len(proxy.faults) == 6
    assert [e["fault"] for e in proxy.log].count("drop*") == proxy.faults.count("drop"), proxy.report()  # each drop's resend dropped too
    reached = ld.io.retries + io_stats.take()["retries"]   # faults during construction happen before the loader exists
    assert reached == len(proxy.faults), f"{ld.io}; {proxy.faults}; the requests:\n{proxy.report()}"
    assert ld.io.retries > 0 and set(ld.io.retry_reasons) <= {"ServerDisconnectedError", "OSError", "ReadTimeoutError",
                                                             "ConnectionClosedError", "ClientOSError"}


def test_a_connection_dropped_once_is_resent_below_mmlit(data):
    "aiohttp sends a read again by itself when its connection closes before the reply: the read succeeds, no retry is counted."
    d, endpoint, files = data
    uri = f"s3://{BUCKET}/shards/part-1.parquet"
    with FaultProxy(endpoint, every=2, kinds=("drop",), max_faults=2, drop_resends=False, lifetime=60) as proxy:
        st = Store(s3_options(proxy.endpoint), retry=FAST)
        io_stats.reset()
        got = [st.read_range(uri, i * 1000, (i + 1) * 1000) for i in range(3)]
    assert b"".join(got) == files["shards/part-1.parquet"][:3000]
    log = [(e["fault"], e["requests"]) for e in proxy.log]
    assert [f for f, _ in log] == ["drop", "resent", None, "drop", "resent", None], proxy.report()
    assert log[0][1] == log[1][1] and log[3][1] == log[4][1]          # the same request, sent twice
    counted = io_stats.take()
    assert (counted["requests"], counted["retries"]) == (3, 0)


def test_cache_serves_the_second_epoch(data, tmp_path):
    d, endpoint, files = data
    io_stats.reset()                                       # this test's reads only
    ds = ParquetImageText(f"s3://{BUCKET}/shards/*.parquet",
                          storage_options=Store(s3_options(endpoint), cache_dir=tmp_path / "c", cache_bytes=10 << 20))
    ld = make_loader(ds, LoaderConfig(batch_size=5, seed=3), collate=summary)
    first = list(ld)
    one = ld.io.take()
    second = list(ld)      # epoch 1: a different order over the same row groups
    two = ld.io.take()
    assert first != second and len(first) == len(second) > 0
    assert one["requests"] > 0 and one["cache_writes"] == one["requests"]
    assert two["requests"] == 0 and two["bytes"] == 0 and two["cache_hits"] > 0


def test_permanent_faults_name_the_uri(data):
    d, endpoint, files = data
    with pytest.raises(FileNotFoundError, match=f"no files match s3://{BUCKET}/nothing-here/"):
        ParquetImageText(f"s3://{BUCKET}/nothing-here/*.parquet", storage_options=s3_options(endpoint))
    with pytest.raises(FileNotFoundError, match=f"no such file: s3://{BUCKET}/missing.jsonl"):
        JsonlImageText(f"s3://{BUCKET}/missing.jsonl", storage_options=s3_options(endpoint))
    ok = ParquetImageText(f"s3://{BUCKET}/shards/part-0.parquet", storage_options=s3_options(endpoint))
    with FaultProxy(endpoint, every=1, kinds=("403",), max_faults=100, lifetime=30) as proxy:
        with pytest.raises(AccessDenied, match=f"s3://{BUCKET}/shards/part-1.parquet: access denied"):
            ParquetImageText(f"s3://{BUCKET}/shards/part-1.parquet", storage_options=s3_options(proxy.endpoint))
        ok.store = type(ok.store)(s3_options(proxy.endpoint))
        ok.files = [type(f)(str(f), ok.store) for f in ok.files]
        with pytest.raises(StorageError, match=f"s3://{BUCKET}/shards/part-0.parquet: access denied"):
            ok.get(0)           # not a bad record: the run stops, naming the object
        assert len(ok.report) == 0


def test_inspect_cli_over_s3(data, monkeypatch, capsys):
    d, endpoint, files = data
    from mmlit.cli import main
    for k, v in dict(CREDS, AWS_ENDPOINT_URL=endpoint).items(): monkeypatch.setenv(k, v)
    assert main(["inspect", f"s3://{BUCKET}/shards/*.parquet", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["rows"], r["good"], r["bad"]) == (20 + 24 + 28, 72, [])
    assert r["files"] == [f"s3://{BUCKET}/shards/part-{k}.parquet" for k in range(3)]
    assert main(["inspect", f"s3://{BUCKET}/corpus.txt"]) == 0
    assert "40" in capsys.readouterr().out
    assert main(["inspect", f"s3://{BUCKET}/nope/*.parquet"]) == 2
    assert f"no files match s3://{BUCKET}/nope/*.parquet" in capsys.readouterr().err


def test_webdataset_shards_over_s3_by_byte_range(data, tmp_path, monkeypatch, capsys):
    d, endpoint, files = data
    local = WebDatasetShards(str(d / "wds" / "shard-{0..1}.tar"), index_dir=tmp_path / "local")
    io_stats.reset()
    opts = s3_options(endpoint)
    remote = WebDatasetShards(f"s3://{BUCKET}/wds/shard-{{0..1}}.tar", storage_options=Store(opts), index_dir=tmp_path / "s3")
    built = io_stats.take()
    assert [str(f) for f in remote.files] == [f"s3://{BUCKET}/wds/shard-{k}.tar" for k in range(2)]
    sizes = [len(files[f"wds/shard-{k}.tar"]) for k in range(2)]
    assert built["requests"] == 2 and built["bytes"] == sum(sizes)          # indexing: one buffered pass per shard
    _, got = epochs(remote)
    _, want = epochs(local)
    assert got == want and len(got[0]) == 21 // 5                   # whole batches of 5
    members = remote.indexes[1].members(3)
    io_stats.reset()
    rec = remote.get(10 + 3)
    one = io_stats.take()
    assert rec["text"] == "tar 1 sample 3"
    assert (one["requests"], one["bytes"]) == (len(members), sum(512 + s for _, s in members.values()))  # its members (and their headers) only
    again = WebDatasetShards(f"s3://{BUCKET}/wds/shard-{{0..1}}.tar", storage_options=Store(opts), index_dir=tmp_path / "s3")
    assert io_stats.take()["requests"] == 0 and len(again) == len(local)   # the index came from the cache (size and ETag match)
    from mmlit.cli import main                                            # the command line: options given as JSON
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))
    assert main(["inspect", f"s3://{BUCKET}/wds/shard-{{0..1}}.tar", "--json", "--storage-options", json.dumps(opts)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["rows"], r["good"], r["bad"]) == (21, 21, [])


def test_webdataset_shard_rewritten_on_s3_is_indexed_again(data, tmp_path):
    "The same key rewritten with the same size (its samples in another order): a new ETag, so a new index and the right captions."
    d, endpoint, files = data
    def shard(order):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in order:
                for ext, blob in (("png", png_bytes((8, 8), "RGB", (i * 40, 9, 9))), ("txt", f"caption {i}".encode())):
                    ti = tarfile.TarInfo(f"k{i}.{ext}"); ti.size = len(blob); tf.addfile(ti, io.BytesIO(blob))
        return buf.getvalue()
    uri = f"s3://{BUCKET}/wds-rewrite/shard.tar"
    fs, key = Store(s3_options(endpoint)).fs(uri)
    first, second = shard([0, 1, 2]), shard([2, 0, 1])
    assert len(first) == len(second)
    fs.pipe_file(key, first)
    read = lambda: [r["text"] for r in WebDatasetShards(uri, storage_options=Store(s3_options(endpoint)), index_dir=tmp_path).records()]
    assert read() == ["caption 0", "caption 1", "caption 2"]
    fs.pipe_file(key, second)
    assert read() == ["caption 2", "caption 0", "caption 1"]
