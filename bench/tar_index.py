"""What detecting a rewritten tar shard costs: the index stamp and the per-read header check of
`mmlit.formats`, against the same code without them (the stage 1 formats module as it was before:
a stamp of size and mtime only, members read without their header).

1. Loading the cached indexes of N shards (a dataset being made again): the stamp of size and mtime,
   the stamp with inode and ctime (one `stat` call either way), and for comparison a stamp that also
   hashes the first and last 64 KiB of each shard (page cache warm).
2. Indexing N shards (a cache miss): walking the headers, without and with hashing each member's header.
3. Reading samples: the image and caption member of each sample by `pread`, without and with the
   512 bytes of each member's header read along and compared.

    python bench/tar_index.py [--shards 100] [--samples 200] [--repeat 5]

Times are medians of `--repeat` runs on this machine; the page cache is warm (the shards were just written)."""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import mmlit.formats as F  # noqa: E402


def previous_formats(rev: str = "c57d4a7") -> types.ModuleType:
    "The stage 1 formats module at `rev` (before the rewrite checks), loaded beside the current one."
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mmlit/formats.py"], check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("mmlit.formats_before")
    mod.__package__ = "mmlit"
    sys.modules[mod.__name__] = mod                      # dataclasses look their module up there
    exec(compile(src, "formats_before.py", "exec"), mod.__dict__)
    return mod


def write_shards(folder: Path, n_shards: int, n_samples: int) -> list[Path]:
    rng = np.random.default_rng(0)
    buf = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpg = buf.getvalue()
    paths = []
    for s in range(n_shards):
        p = folder / f"shard-{s:05d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(n_samples):
                for ext, data in (("jpg", jpg), ("txt", f"caption {s} {i}".encode())):
                    ti = tarfile.TarInfo(f"{s:05d}{i:06d}.{ext}"); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
        paths.append(p)
    return paths


def head_tail_stamp(path: Path) -> str:
    "A stamp that also hashes the first and last 64 KiB (the alternative not taken)."
    st = path.stat()
    with open(path, "rb") as f:
        h = hashlib.blake2b(f.read(1 << 16), digest_size=16)
        f.seek(max(0, st.st_size - (1 << 16))); h.update(f.read(1 << 16))
    return json.dumps(dict(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                           ctime_ns=st.st_ctime_ns, hash=h.hexdigest()))


def median_times(fns, repeat: int) -> list[float]:
    "Median wall time of each of `fns`, run in turn `repeat` times (interleaved, so a busy moment hits them alike)."
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    old = previous_formats()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "shards").mkdir()
        paths = write_shards(d / "shards", a.shards, a.samples)
        size = sum(p.stat().st_size for p in paths)
        print(f"{a.shards} shards of {a.samples} samples (jpg + txt), {size / 1e6:.1f} MB, {os.cpu_count()} CPUs\n")

        # 1. cached index loads
        for mod, name in ((old, "old"), (F, "new")): [mod.load_tar_index(p, d / f"cache-{name}") for p in paths]
        real = F.shard_stamp
        def with_head_tail():
            F.shard_stamp = head_tail_stamp
            try: [F.load_tar_index(p, d / "cache-ht") for p in paths]
            finally: F.shard_stamp = real
        with_head_tail()
        t_old, t_new, t_ht = median_times([lambda: [old.load_tar_index(p, d / "cache-old") for p in paths],
                                           lambda: [F.load_tar_index(p, d / "cache-new") for p in paths], with_head_tail], a.repeat)
        print(f"1. load {a.shards} cached indexes      stamp size+mtime: {t_old * 1e3:7.1f} ms   "
              f"+inode+ctime: {t_new * 1e3:7.1f} ms   +head/tail hash: {t_ht * 1e3:7.1f} ms")

        # 2. index builds
        b_old, b_new = median_times([lambda: [old.index_tar(p) for p in paths], lambda: [F.index_tar(p) for p in paths]], a.repeat)
        print(f"2. index {a.shards} shards (cache miss)  without header hashes: {b_old * 1e3:7.1f} ms   "
              f"with: {b_new * 1e3:7.1f} ms   ({(b_new / b_old - 1) * 100:+.0f}%)")

        # 3. member reads
        ds_old = old.WebDatasetShards(paths, index_dir=d / "cache-old", decode=False)
        ds_new = F.WebDatasetShards(paths, index_dir=d / "cache-new", decode=False)
        picks = np.random.default_rng(1).permutation(len(ds_new))[:5000]
        def read_old():
            for i in picks.tolist():
                k, j = ds_old.locate(i)
                for off, n in ds_old.indexes[k].members(j).values(): ds_old._read(k, off, n, {})
        def read_new():
            for i in picks.tolist():
                k, j = ds_new.locate(i)
                for ext in ds_new.indexes[k].members(j): ds_new._member(k, j, ext, {})
        r_old, r_new = median_times([read_old, read_new], a.repeat)
        print(f"3. read {len(picks)} samples (2 members)   without header check: {r_old / len(picks) * 1e6:6.1f} us/sample   "
              f"with: {r_new / len(picks) * 1e6:6.1f} us/sample")
        d_old, d_new = median_times([lambda: [ds_old.load(i) for i in picks[:1000].tolist()],
                                     lambda: [ds_new.load(i) for i in picks[:1000].tolist()]], a.repeat)
        print(f"   whole records (image opened, not decoded): {d_old / 1000 * 1e6:6.1f} us -> {d_new / 1000 * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
