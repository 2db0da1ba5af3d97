"""Object storage, measured against moto's S3 server on loopback (127.0.0.1, a free port).

1. Bytes one rank of N fetches in an epoch, against its share of the data (the column chunks of
   the row groups, divided by N) plus the footers: rank 0, and the mean and the most over all N
   ranks. Two orders: row-group-aligned (shuffle_span=1, row groups of the per-rank batch size:
   each rank's part of a step is whole row groups) and the default block shuffle (shuffle_span=8:
   a step mixes rows of 8 row groups). The block shuffle is measured with both rank splits: the
   default "stream" (rank r takes the r-th slice of each step, so every rank reads nearly every row
   group of the span) and "locality" (rank r takes the r-th part of the step by index, so it reads
   mostly its own row groups of the span, plus one or two that it shares with a neighbour).
   A third order shows row groups twice the per-rank batch: ranks share them.
2. The local range cache: what the first epoch pays to fill it and what the second saves
   (median wall time of 5 runs, and bytes over the wire), against the same two epochs without a cache.

    python bench/storage.py [--shards 8] [--rows 128] [--row-group 32]

The byte counts come from mmlit's own counters (loader.io) and are checked against the bytes the
loopback proxy saw leave the server."""
import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from s3_server import FaultProxy, make_bucket, moto_s3, s3_options   # loopback only  # noqa: E402

from mmlit.sources import ParquetImageText  # noqa: E402
from mmlit.loader import LoaderConfig, make_loader  # noqa: E402
from mmlit.storage import RangeCache, Store, io_stats  # noqa: E402


def shard(k: int, rows: int, row_group: int) -> bytes:
    "A shard of noise images (incompressible: bytes on the wire are image bytes) and captions."
    rng = np.random.default_rng(k)
    imgs = []
    for _ in range(rows):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(b, "PNG")
        imgs.append(b.getvalue())
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()), "caption": [f"shard {k} row {i}" for i in range(rows)]}),
                   buf, row_group_size=row_group)
    return buf.getvalue()


def data_bytes(files: dict) -> int:
    "The column chunks of every row group (what an epoch must read once over all ranks)."
    total = 0
    for data in files.values():
        md = pq.ParquetFile(io.BytesIO(data)).metadata
        total += sum(md.row_group(r).column(c).total_compressed_size for r in range(md.num_row_groups) for c in range(md.num_columns))
    return total


def collate(recs): return [r["meta"]["index"] for r in recs]


def one_rank(uri: str, store: Store, rank: int, world: int, batch: int, span: int, epochs: int = 1, split: str = "stream"):
    "Footer bytes at open, then (bytes, requests, seconds) per epoch of rank `rank` of `world`."
    io_stats.reset()
    ds = ParquetImageText(uri, image_column="image", decode=False, storage_options=store)
    footer = io_stats.take()
    ld = make_loader(ds, LoaderConfig(batch_size=batch, seed=0, shuffle_span=span, drop_last=True, rank_split=split),
                     collate=collate, rank=rank, world_size=world)
    out = []
    for e in range(epochs):
        t = time.perf_counter()
        ld.set_epoch(e)
        n = sum(len(b) for b in ld)
        got = ld.io.take()
        out.append(dict(bytes=got["bytes"], requests=got["requests"], cache_hit_bytes=got["cache_hit_bytes"],
                        seconds=time.perf_counter() - t, samples=n))
    return footer, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=128, help="rows per shard")
    ap.add_argument("--row-group", type=int, default=32, help="rows per row group (= the per-rank batch)")
    args = ap.parse_args()
    files = {f"train/part-{k:02d}.parquet": shard(k, args.rows, args.row_group) for k in range(args.shards)}
    total, share_all = sum(map(len, files.values())), data_bytes(files)
    uri = "s3://mmlit-bench/train/*.parquet"
    print(f"{args.shards} shards, {args.shards * args.rows} rows, row groups of {args.row_group}: "
          f"{total:,} bytes in all, {share_all:,} in column chunks")
    with moto_s3() as endpoint:
        make_bucket(endpoint, "mmlit-bench", files)
        print("\n1. bytes fetched in one epoch by rank 0 of N (read by range: footer, then the row groups it needs)")
        print(f"{'N':>3} {'order':<32} {'share':>11} {'footers':>9} {'fetched':>11} {'fetched/share':>14} {'(share+footers)':>16} "
              f"{'on the wire':>12} {'all ranks: mean':>16} {'most':>6}")
        for world in (1, 2, 4):
            for span, batch, split, name in ((1, args.row_group, "stream", "aligned (span=1)"),
                                             (1, args.row_group // 2, "stream", "span=1, batch=rg/2"),
                                             (8, args.row_group, "stream", "block shuffle (span=8)"),
                                             (8, args.row_group, "locality", "block shuffle (span=8), locality")):
                share, ratios = share_all / world, []
                for rank in range(world):
                    with FaultProxy(endpoint, lifetime=600) as proxy:    # no faults: counts the bytes leaving the server
                        store = Store(s3_options(proxy.endpoint))
                        f, (e,) = one_rank(uri, store, rank, world, batch, span, split=split)
                        if rank == 0: footer, ep, wire = f, e, proxy.down_bytes
                    ratios.append(e["bytes"] / share)
                print(f"{world:>3} {name:<32} {share:>11,.0f} {footer['bytes']:>9,} {ep['bytes']:>11,} {ep['bytes'] / share:>14.3f} "
                      f"{(ep['bytes'] + footer['bytes']) / (share + footer['bytes']):>16.3f} {wire:>12,} "
                      f"{np.mean(ratios):>16.3f} {max(ratios):>6.3f}")
        print("   fetched/share: 1.000 means the rank read exactly its share; the goal is <= 1.10 (plus footers)")

        print("\n2. the local cache (rank 0 of 1, two epochs, block shuffle): cost in epoch 1, saving in epoch 2")
        tmp = Path(tempfile.mkdtemp(prefix="mmlit-cache-bench-"))
        try:
            kinds = {"no cache": {}, "cache": dict(cache_dir=tmp / "cache", cache_bytes=4 * total)}
            runs = {label: [] for label in kinds}
            for rep in range(5):                          # interleaved, median of 5 (a shared machine); a fresh cache each time
                for label, kw in kinds.items():
                    shutil.rmtree(tmp / "cache", ignore_errors=True)
                    store = Store(s3_options(endpoint), **kw)
                    runs[label].append(one_rank(uri, store, 0, 1, args.row_group, 8, epochs=2)[1])
                    if kw: disk, entries = store.cache.size(), [p.read_bytes() for _, _, p in store.cache.entries()]
            rows = {label: [{**r[0][e], "seconds": float(np.median([x[e]["seconds"] for x in r]))} for e in range(2)]
                    for label, r in runs.items()}
            for label, best in rows.items():
                print(f"   {label:<9} epoch 1: {best[0]['seconds']:.3f}s, {best[0]['bytes']:>11,} bytes fetched | "
                      f"epoch 2: {best[1]['seconds']:.3f}s, {best[1]['bytes']:>11,} bytes fetched, {best[1]['cache_hit_bytes']:>11,} from disk"
                      + (f" | cache on disk: {disk:,} bytes" if label == "cache" else ""))
            replay = RangeCache(tmp / "replay", 4 * total)   # the cache's own work, without the network around it
            t = time.perf_counter()
            for i, data in enumerate(entries): replay.put(RangeCache.key("s3://replay", "v", i, i + len(data)), data)
            put_s = time.perf_counter() - t
            a, b = rows["no cache"], rows["cache"]
            print(f"   writing the {len(entries)} ranges ({disk:,} bytes) into a cache alone: {put_s:.3f}s "
                  f"= {put_s / a[0]['seconds']:.2f}x the uncached epoch 1")
            print(f"   cost   (epoch 1, cache / no cache): {b[0]['seconds'] / a[0]['seconds']:.2f}x time")
            print(f"   saving (epoch 2, cache / no cache): {b[1]['seconds'] / a[1]['seconds']:.2f}x time, "
                  f"{b[1]['bytes'] / max(a[1]['bytes'], 1):.3f}x bytes over the network")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
