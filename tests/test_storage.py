"""mmlit.storage against a real S3 API: moto's server on 127.0.0.1 (a free port) with buckets and
objects the tests create: listing, globbing, ranged reads (requests and bytes counted on both
sides of the wire), retries through a fault proxy, permanent faults naming the URI, the cache."""
import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from s3_server import FaultProxy, make_bucket, moto_s3, s3_options
from mmlit.storage import (AccessDenied, IOStats, ObjectNotFound, RangeCache, Retry, StorageUnavailable, Store,
                           io_stats)

FAST = Retry(attempts=5, backoff=0.02, timeout=1.0)


def parquet_bytes(n=400, rg=50, seed=0) -> bytes:
    t = pa.table({"caption": [f"caption {seed}-{i} " + "x" * (i % 40) for i in range(n)], "k": list(range(n))})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=rg)
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        files = {f"shards/part-{i}.parquet": parquet_bytes(seed=i) for i in range(3)}
        files.update({"shards/README.txt": b"not a shard", "shards/sub/part-9.parquet": parquet_bytes(seed=9),
                      "text/a.txt": b"first document\n\nsecond document\n"})
        make_bucket(endpoint, "mmlit-test", files)
        yield endpoint, files


def test_listing_and_globbing(s3):
    endpoint, files = s3
    st = Store(s3_options(endpoint), retry=FAST)
    assert st.glob("s3://mmlit-test/shards/*.parquet") == [f"s3://mmlit-test/shards/part-{i}.parquet" for i in range(3)]
    assert st.glob("s3://mmlit-test/shards/**/*.parquet")[-1] == "s3://mmlit-test/shards/sub/part-9.parquet"
    assert st.glob("s3://mmlit-test/shards", (".parquet",)) == sorted(
        [f"s3://mmlit-test/shards/part-{i}.parquet" for i in range(3)] + ["s3://mmlit-test/shards/sub/part-9.parquet"])
    assert st.glob("s3://mmlit-test/shards/part-1.parquet") == ["s3://mmlit-test/shards/part-1.parquet"]
    assert st.glob("s3://mmlit-test/shards/*.jsonl") == []
    assert st.size("s3://mmlit-test/shards/part-0.parquet") == len(files["shards/part-0.parquet"])
    assert st.is_file("s3://mmlit-test/text/a.txt") and not st.is_file("s3://mmlit-test/text/b.txt")


def test_credentials_and_endpoint_from_the_environment(s3, monkeypatch):
    endpoint, files = s3
    for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=endpoint).items():
        monkeypatch.setenv(k, v)
    st = Store(retry=FAST)   # no storage options at all
    assert st.read_bytes("s3://mmlit-test/text/a.txt") == files["text/a.txt"]


def test_ranged_reads_fetch_only_the_row_group(s3):
    endpoint, files = s3
    data = files["shards/part-0.parquet"]
    with FaultProxy(endpoint, lifetime=60) as proxy:     # no faults: it only counts the bytes on the wire
        st = Store(s3_options(proxy.endpoint), retry=FAST)
        uri = "s3://mmlit-test/shards/part-0.parquet"
        st.size(uri)                                     # one HEAD, outside the counts below
        io_stats.reset()
        before = proxy.down_bytes
        pf = pq.ParquetFile(st.open(uri, buffering=0), pre_buffer=False)
        footer = io_stats.take()
        assert footer["requests"] == 1 and footer["bytes"] == min(len(data), 64 << 10)  # pyarrow reads the tail once
        col = pf.metadata.row_group(5).column(0)
        got = pf.read_row_group(5, columns=["caption"]).column(0).to_pylist()
        rg = io_stats.take()
        assert got == [f"caption 0-{i} " + "x" * (i % 40) for i in range(250, 300)]
        assert rg["requests"] == 1 and rg["bytes"] == col.total_compressed_size   # exactly the column chunk
        time.sleep(0.2)
        wire = proxy.down_bytes - before
        assert footer["bytes"] + rg["bytes"] <= wire < footer["bytes"] + rg["bytes"] + 4096  # payload + HTTP headers


def test_a_missing_key_names_the_uri(s3):
    st = Store(s3_options(s3[0]), retry=FAST)
    io_stats.reset()
    with pytest.raises(ObjectNotFound, match="s3://mmlit-test/shards/nope.parquet: no such object"):
        st.read_bytes("s3://mmlit-test/shards/nope.parquet")
    with pytest.raises(ObjectNotFound, match="s3://no-such-bucket-here/x.parquet: no such object"):
        st.read_bytes("s3://no-such-bucket-here/x.parquet")
    assert io_stats.retries == 0                        # permanent: not retried


def test_denied_access_names_the_uri(s3):
    with FaultProxy(s3[0], every=1, kinds=("403",), max_faults=50, lifetime=30) as proxy:
        st = Store(s3_options(proxy.endpoint), retry=FAST)
        io_stats.reset()
        with pytest.raises(AccessDenied, match="s3://mmlit-test/shards/part-0.parquet: access denied"):
            st.read_bytes("s3://mmlit-test/shards/part-0.parquet")
        assert io_stats.retries == 0 and len(proxy.faults) == 1


@pytest.mark.parametrize("kind", ["drop", "503", "delay"])
def test_transient_faults_are_retried_and_counted(s3, kind):
    endpoint, files = s3
    uri = "s3://mmlit-test/shards/part-2.parquet"
    with FaultProxy(endpoint, every=2, kinds=(kind,), max_faults=3, delay=2.5, lifetime=60) as proxy:
        st = Store(s3_options(proxy.endpoint), retry=Retry(attempts=4, backoff=0.02, timeout=1.0))
        io_stats.reset()
        got = [st.read_range(uri, i * 1000, (i + 1) * 1000) for i in range(8)]
        assert b"".join(got) == files["shards/part-2.parquet"][:8000]
        assert len(proxy.faults) == 3
        assert io_stats.retries == 3, (io_stats, proxy.faults)   # each fault reached mmlit once, and was retried once
        assert sum(io_stats.retry_reasons.values()) == 3


def test_retries_give_up_with_the_uri(s3):
    with FaultProxy(s3[0], every=1, kinds=("503",), max_faults=100, lifetime=30) as proxy:
        st = Store(s3_options(proxy.endpoint), retry=Retry(attempts=3, backoff=0.01, timeout=1.0))
        io_stats.reset()
        with pytest.raises(StorageUnavailable, match=r"s3://mmlit-test/text/a.txt: cannot look up: 3 attempts failed"):
            st.read_bytes("s3://mmlit-test/text/a.txt")
        assert io_stats.retries == 2


def test_cache_second_read_from_disk_within_its_limit(s3, tmp_path):
    endpoint, files = s3
    st = Store(s3_options(endpoint), retry=FAST, cache_dir=tmp_path / "cache", cache_bytes=30_000)
    uris = [f"s3://mmlit-test/shards/part-{i}.parquet" for i in range(3)]
    io_stats.reset()
    for u in uris[:1]: assert st.read_range(u, 0, 8000) == files[u[len("s3://mmlit-test/"):]][:8000]
    first = io_stats.take()
    assert (first["requests"], first["cache_hits"], first["cache_writes"]) == (1, 0, 1)
    st2 = Store(s3_options(endpoint), retry=FAST, cache_dir=tmp_path / "cache", cache_bytes=30_000)  # e.g. another worker
    assert st2.read_range(uris[0], 0, 8000) == files["shards/part-0.parquet"][:8000]
    second = io_stats.take()
    assert (second["requests"], second["bytes"], second["cache_hits"], second["cache_hit_bytes"]) == (0, 0, 1, 8000)
    for u in uris:                                       # 3 x 12000 bytes: over the 30000 limit
        st.read_range(u, 0, 12_000)
    assert st.cache.size() <= 30_000 and io_stats.cache_evictions >= 1
