"""Loader throughput and peak memory on one Parquet of real JPEG photos (~500x375, from skimage.data), as ratios.

The Parquet is written as mmlit's own writers write image columns (`mmlit.sources.image_parquet_options`:
the image column plain and uncompressed, the caption snappy with a dictionary; 128-row row groups).

Prints, measured in this run: decode-only images/s (the per-core ceiling), mmlit's loader to
224x224 uint8 batches with 0 and 2 workers, and two HF `datasets` baselines
(`load_dataset("parquet")` + `with_transform` + DataLoader): plain (PIL decode, bicubic resize,
crop, float normalise per sample, default collate; 0 workers) and hand-tuned (draft()
reduced-size JPEG decode, box resize, uint8 batches; 0 and 2 workers); and the peak PSS of each.
images/s is the median of `--repeat` runs of each configuration, round robin (every run is
printed, with the load average: on a shared 2-core machine the 2-worker figures swing most).

Each configuration runs in a fresh interpreter (`--only NAME`, which prints one JSON line), so one
configuration's allocations never inflate the next one's peak; all of them import the same modules
(torch, datasets, mmlit), so the peaks differ only by what the loading itself costs. Peak memory:
while a configuration opens its dataset and drains its loader, a background thread sums, every
~20 ms, the proportional set size (PSS, from /proc/<pid>/smaps_rollup, else smaps) of that process
and all its descendants (its DataLoader workers), keeping the peak. PSS splits each shared page
among the processes mapping it, so pages the workers share with their parent after fork count
once; for the same reason the parent of this script stays light (stdlib only; the Parquet file and
HF cache are made in a `--prepare` subprocess) and the machine should be quiet: another process
mapping the same libraries (another torch process) lowers the figures. Reading smaps costs about
1 ms per process per sample, which would slow the 2-worker run on a 2-core machine by ~15%, so each
configuration runs twice: images/s from a run without the sampler, peak PSS from a run with it.
At the peak it also prints each process's PSS split three ways (smaps_rollup's Pss_Anon, Pss_File,
Pss_Shmem): its heap (private memory and its share of the pages it shares with its parent after fork),
mapped files (libraries; HF's memory-mapped Arrow cache) and shared memory (batches in flight from
the workers). The file part moves with whatever else maps the same libraries on the machine (another
torch process lowers it), so compare configurations of one run, and the heap part across runs.
Linux only (reads /proc).

A line after the goals compares shuffled training reads (0 workers, `train=True`: the
row-group-aware shuffle with `shuffle_span=8`, and a full shuffle, `shuffle_span=0`) with the
sequential 0-worker figure (timing only, no memory run).

Below the table, lines that explain the ratios: the CPU seconds each configuration spent per image
(the process and its workers, from /proc/<pid>/stat, so other load on the machine does not enter),
the mmlit loader's own time split (fetch / preprocess / collate, measured inside the workers), and
this machine's 2-process ceiling at the time of the run: the decode-only loop in one process, then
in two processes at once, with no loader at all. On a 2-core machine shared with other jobs that
ceiling is what bounds "2 workers / 0 workers".

Where a 2-worker run spends more CPU per image than one process (profiled per process with
`time.thread_time` around fetch, transform and collate; 1000 photos, batches of 32, 128-row row
groups): every batch travels through a fresh shared-memory file (the worker's collate writes
4.8 MB into new pages: ~2.5 ms a batch against ~0.4 ms into reused memory, plus passing the file
descriptor, ~1 ms a batch between worker and main process); the main process itself spends
~0.9 ms a batch, as a plain DataLoader's does; and, reading in order, consecutive batches went
to different workers, so each worker would read and decompress every row group (~10 ms of CPU
per 128-row group per worker): the loader hands the steps that share a row group to one worker
(`task_steps`), so each row group is read once. The shared-memory transfer is what every
DataLoader-based loader pays (the HF hand-tuned baseline at 2 workers included).

A last section reads the same photos from WebDataset tar shards (4 shards written by the
`webdataset` package's ShardWriter): mmlit's `WebDatasetShards` (random access through a cached
member index, exact resume) through the same loader and transform, against the `webdataset`
package's own pipeline on the same shards — plain (`.decode("pil")`, bicubic resize, crop, float
normalise per sample, DataLoader batching) and hand-tuned (raw bytes, draft() decode, box resize,
uint8, batched inside the pipeline) — with 0 and 2 workers (timing only).

A peers section (`--section peers`; also at the end of a full run) reads the same photos through
litdata (`optimize` + `StreamingDataLoader`), MosaicML streaming (`MDSWriter` + `StreamingDataset`), the
`webdataset` package and mmlit (over Parquet, and over the tar shards the `webdataset` package reads),
every one with the same mmlit image transform (so only the loading machinery differs), at 0 and 2
workers, beside two plain loops with no loader at all: one calls the transform on bytes already in
memory (no reading, no batches), the other reads the Parquet row groups with pyarrow and stacks batches
(what any loader must do, without its machinery); round robin, best of `--repeat`. Each mmlit ratio is
printed by wall time and by CPU per image (the process and its workers: steadier than wall time when
other jobs share the cores). It prints what each one guarantees: whether 0 and 2 workers gave the same
batches in this run (measured), and exact mid-epoch resume (documented by each project; mmlit's is
tested in tests/test_loader.py). A peer that cannot be imported is printed as such, with the error.

An overhead section (`--section overhead`, one process, mmlit only) builds mmlit's 0-worker path up
stage by stage from the plain loop — + the Parquet read (`ParquetImageText.get`: row groups, records),
+ a seeded generator per sample (`DeterministicDataset`), + batches (`default_collate`), + the loader
itself (`make_loader`: sampler, step fetch, skip-aware collate, timings, skip report) — the stages
taking turns batch by batch (so a change of load hits all alike), and prints the thread CPU per image
of each and what each stage adds; beside them, the read step from the same photos written with
pyarrow's default options (snappy, dictionary-encoded images), as files written by other tools often are.

The peers live in their own environment, apart from mmlit's (mosaicml-streaming pins
transformers<5, and the registry's torchvision, which it imports, is a CUDA build that does not
import with the CPU torch); the section runs with `--peers-python` (default: .venv-peers/bin/python
when it exists, else this interpreter), with this checkout on PYTHONPATH:

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install "torch==2.13.0"          # the CPU wheel; never an unpinned torch
    .venv-peers/bin/pip install "torch==2.13.0" litdata mosaicml-streaming webdataset pyarrow pillow \
        simplejpeg numpy fastcore pyyaml tqdm jinja2 fsspec
    .venv-peers/bin/pip uninstall -y torchvision     # the CUDA build: with it installed, transformers (mmlit's loader) fails to import

MosaicML streaming's package imports its `streaming.vision` datasets (torchvision) on import; when
torchvision does not import, that subpackage (unused here) is replaced by an empty module and the
output says so.

Measured on a 2-core Intel Xeon shared with other jobs (2026-12-07, load average 5-10 throughout, so
wall-time figures swing up to 2x between runs; CPU per image is the steadier measure; --n 1000 --repeat 3):

- peers, CPU us per image (0 w / 2 w): plain loop in memory 1330; plain loop over Parquet + batches 1520;
  mmlit over Parquet 1590 / 1830; mmlit over tar shards 1550 / 1850; litdata 1520 / 1960; MosaicML
  streaming 2090 / 2130; webdataset package 1580 / 2120. By CPU, mmlit over Parquet is 0.96x litdata,
  1.31x MosaicML, 0.99x webdataset at 0 workers and 1.07x, 1.16x, 1.16x at 2; over tar shards 0.98x,
  1.35x, 1.02x and 1.06x, 1.15x, 1.15x (goal >= 1.1 at both worker counts: met against MosaicML at
  both, against webdataset at 2 workers only, against litdata never). mmlit over Parquet at 0 workers
  is 0.84x the plain loop in memory by CPU (goal >= 0.95) and 0.96x the plain loop over Parquet.
  Wall-time ratios of that run ranged from 0.49x to 1.88x (load). The same batches with 0 and 2 workers:
  mmlit (both sources) and MosaicML yes, litdata and webdataset no. An earlier run at load ~10: mmlit over
  Parquet 1740 / 2090 us, litdata 1570 / 2030, MosaicML 2300 / 2520, webdataset 1920 / 2430, loop 1420.
- where mmlit's 0-worker time goes (`--section overhead`, thread CPU us per image, median of 5 epochs,
  two runs): plain loop 1374 / 1318; + Parquet read +174 / +157; + a generator per sample +23 / -9;
  + batches +18 / +53; + the loader itself +4 / +14; in all 0.86x / 0.86x the plain loop. The loader's
  own machinery (sampler, step fetch, skip report, timings) is under 1%; most of the gap is the Parquet
  read: row-group decompression and dictionary decoding, each group's images copied into Python bytes
  at once, and Arrow's scratch memory handed back to the OS after each group and faulted in again at the
  next. Two read variants measured in the same way, not adopted because each keeps memory the current
  reader hands back: the image column kept as an Arrow array with one `as_py()` per image (+108 us
  instead of +219 in that run), and Arrow's scratch memory kept (+118 us; now kept up to a bound, below). The generator is two
  SeedSequence hashes per sample (~20 us alone); batching is default_collate's copy into a new batch.
- the Parquet read, measured alone (thread CPU us per image, 1000 photos, 128-row groups): pyarrow reading a
  row group and `to_pylist` 41 us with pyarrow's default writer options, 21 us with the image column plain
  (no dictionary) and uncompressed (snappy alone: 4 us; dictionary encoding: 16-20 us, as its dictionary
  page holds the first ~1 MB of images and the rest falls back to plain pages; snappy saves 0.01% of the
  bytes); handing Arrow's freed memory back to the OS after every read ~8 us more on plain files, ~25 us on
  dictionary-encoded ones (page faults to get it back). Not adopted: slicing the offsets buffer into bytes
  (48 us against to_pylist's 41); `pre_buffer=True` (keeps the row group's bytes, 4.7 MB, in Arrow memory
  between reads); `memory_map=True` (the file's pages stay mapped into the process as it is read);
  `iter_batches` to bound the decoder's scratch (no smaller peak); a larger `buffer_size` (within noise).
- after the reader kept up to 32 MiB of Arrow's freed memory (`ARROW_SCRATCH_KEPT`) and the bench's Parquet
  was written with `image_parquet_options` (one run each, load average 15-17, 1000 photos; `--section
  overhead --n 1000 --repeat 5`): before: plain loop 1170; + Parquet read +95; + generator +48; + batches
  +50; + the loader +5; 0.86x the plain loop. After: plain loop 1157; + Parquet read +64 (the same photos
  written with pyarrow's defaults: +98); + generator +37; + batches +38; + the loader +15; 0.88x. `--section
  main --n 1000 --repeat 3` (load average 15-23, so wall-time ratios are loose): CPU per image mmlit 1560 ->
  1380 us (0 workers), 1720 -> 1560 (2 workers), HF hand-tuned 1920 / 2120 and 1760 / 2120 us in the same
  runs; mmlit / HF hand-tuned 1.09x / 1.09x -> 1.17x / 1.22x (0 / 2 workers); mmlit's peak PSS with 2
  workers 564 -> 562 MiB (0 workers 491 -> 466).
- peers after that change (`--section peers --n 1000 --repeat 3`, one run, load average 10-13), CPU us per
  image (0 w / 2 w): plain loop in memory 1130; plain loop over Parquet + batches 1270; mmlit over Parquet
  1280 / 1550; mmlit over tar shards 1290 / 1620; litdata 1260 / 1570; MosaicML streaming 1550 / 1740;
  webdataset package 1540 / 1840. By CPU, mmlit over Parquet is 0.98x litdata, 1.21x MosaicML, 1.20x
  webdataset at 0 workers and 1.01x, 1.12x, 1.19x at 2 (goal >= 1.1: met against MosaicML and webdataset,
  not against litdata); 0.88x the plain loop in memory at 0 workers (0.84x before; goal >= 0.95) and 0.99x
  the plain loop over Parquet. The same batches with 0 and 2 workers: mmlit (both sources) and MosaicML yes,
  litdata and webdataset no.
- main table, before and after these bench changes (the library unchanged; two runs): mmlit / HF
  hand-tuned 1.50x / 1.26x at 0 workers, 1.34x / 1.65x at 2; 2 workers / 0 workers 0.86x / 1.06x with
  the 2-process ceiling at 1.00x / 0.93x; CPU per image mmlit 1740 / 1600 us (0 w), 2080 / 1870 (2 w),
  HF hand-tuned 2240 / 1850 and 2690 / 2330; 2-worker peak PSS / HF hand-tuned 1.04x / 1.10x.
- where the 2-worker peak PSS goes, and the reader's Arrow memory handed back after every read inside workers
  (`ARROW_SCRATCH_KEPT_IN_WORKERS`; 1000 photos, 3 runs of each configuration of the code before and after,
  interleaved, on 2 cores shared with other jobs, load average 4-6, 2026-12-07; PSS at the peak as heap + files
  + shared memory, MiB). Before: mmlit 2 workers 670 (666-701): main 119 heap, each worker 157 heap, ~231 files in
  all, 0-37 shared memory; HF hand-tuned 2 workers 652 (main 118 heap, workers 123-127, ~275 files, 4-5 shared); HF
  hand-tuned 0 workers 623 (344-348 heap, 275 files); mmlit 0 workers 590. A worker kept one read's Arrow scratch
  (~12 MiB): its heap was 144-145 when it handed the memory back after every read or kept up to 8 MiB, 156-157
  when it kept up to 16 or 32 MiB. After: mmlit 2 workers 660 (658-667), heap 409-410 against 427-434 (each worker
  145); peak PSS / HF hand-tuned 1.08x -> 1.06x (HF with 0 workers) and 1.03x -> 1.01x (HF with 2 workers). CPU
  per image, median of 3 (runs 1330-1570 us either way at 0 workers): mmlit 1530 -> 1380 us (0 workers), 1690 ->
  1680 (2 workers); HF hand-tuned 1950 / 2220 us. What stays above HF: an mmlit worker's heap is ~20 MiB above an
  HF worker's because mmlit's reader holds its row group as Python bytes (5.6 MB for 128 photos) while HF
  memory-maps its Arrow cache (under files, where HF is ~45 MiB above mmlit in every configuration: per worker the
  two are level); ~18 MiB of shared memory in flight against HF's ~5, as a worker's task is the 4 steps that share
  a row group (`task_steps`: each row group read once), so up to 4 batches of 4.8 MB per worker wait to be taken
  against HF's 2 (`prefetch_factor`). Against HF hand-tuned at 0 workers the two workers' own heaps are the rest
  (mmlit at 0 workers is 0.95x HF's 0-worker peak).
- `--section overhead --n 1000 --repeat 5`, before then after a sample's generator is built only when the
  transform draws from it (`LazyGenerator`; this transform does not), two pairs of runs, load average 6-7: plain
  loop 1393 / 1341 -> 1412 / 1391; + Parquet read +79 / +79 -> +86 / +66; + a generator per sample +31 / +40 -> -2 /
  +9; + batches +64 / +50 -> +63 / +49; + the loader +9 / -15 -> +62 / +26 (noise: measured alone, the loader's
  machinery above fetching and collating is ~90 us a batch of 32, ~3 us a sample, before and after); 0.88x / 0.90x
  -> 0.87x / 0.90x the plain loop (by the min of 5 epochs 0.89x / 0.90x -> 0.90x / 0.90x). A batch's 32 generators
  took ~750 us of thread CPU before, ~15 us after; a generator that is drawn from costs what `np_rng`'s does
  (17.2 against 17.8 us). The rest of the gap: the read (~25 us an image for pyarrow's read and the copy into
  Python bytes, ~12 us for the record and its checks), and the batch copy (default_collate), which the plain loop
  over bytes in memory does not make.

    python bench/loader.py            # quick: 384 images
    python bench/loader.py --n 2000   # steadier figures
    python bench/loader.py --section main --n 1000   # the Parquet table only (no tar shards, no peers)
    python bench/loader.py --section webdataset   # the tar-shard section only
    python bench/loader.py --section peers        # the peers section only
    python bench/loader.py --section overhead     # mmlit's 0-worker path stage by stage against the plain loop
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Only the stdlib at module level: numpy, pyarrow, PIL, torch, datasets and mmlit are imported where
# used, in the --prepare and --only subprocesses, so the parent maps none of their pages (see above).

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CONFIGS = {"decode": "decode only (1 core)", "hf-plain": "HF plain, 0 workers", "hf-tuned": "HF hand-tuned, 0 workers",
           "hf-tuned-2": "HF hand-tuned, 2 workers", "mmlit-0": "mmlit, 0 workers", "mmlit-2": "mmlit, 2 workers"}   # --only NAME -> printed label
SHUFFLED = {"mmlit-0-shuffle": 8, "mmlit-0-fullshuffle": 0}   # mmlit 0 workers, train mode: shuffle_span (timing only)
WDS = {"wds-mmlit-0": "mmlit tar shards, 0 workers", "wds-mmlit-2": "mmlit tar shards, 2 workers",
       "wds-plain-0": "webdataset plain, 0 workers", "wds-plain-2": "webdataset plain, 2 workers",
       "wds-tuned-0": "webdataset hand-tuned, 0 w", "wds-tuned-2": "webdataset hand-tuned, 2 w"}   # timing only
WDS_SHARDS = 4
PEERS = {"loop": "plain loop, bytes in memory", "loop-parquet": "plain loop, Parquet + batches",
         "peer-mmlit-0": "mmlit over Parquet, 0 w", "peer-mmlit-2": "mmlit over Parquet, 2 w",
         "peer-wds-mmlit-0": "mmlit over tar shards, 0 w", "peer-wds-mmlit-2": "mmlit over tar shards, 2 w",
         "litdata-0": "litdata, 0 w", "litdata-2": "litdata, 2 w", "mds-0": "MosaicML streaming, 0 w",
         "mds-2": "MosaicML streaming, 2 w", "wdspkg-0": "webdataset package, 0 w", "wdspkg-2": "webdataset package, 2 w"}
MMLIT_PEERS = {"peer-mmlit": "mmlit over Parquet", "peer-wds-mmlit": "mmlit over tar shards"}
RESUME = {"peer-mmlit": "exact mid-epoch resume: yes (loader state_dict; tested in tests/test_loader.py)",
          "peer-wds-mmlit": "exact mid-epoch resume: yes (loader state_dict; WebDatasetShards reads by index)",
          "litdata": "mid-epoch resume: StreamingDataLoader.state_dict (documented)",
          "mds": "mid-epoch resume: StreamingDataLoader / StreamingDataset.state_dict (documented)",
          "wdspkg": "mid-epoch resume: none (an IterableDataset restarts its shards)"}


# --- memory: peak PSS of a process tree, from /proc ---

PSS_KINDS = ("Pss_Anon", "Pss_File", "Pss_Shmem")   # private heap, mapped files (libraries, memory-mapped data), shared memory


def pss_split_kb(pid: int) -> dict:
    "PSS of one process in kB, total (`Pss`) and by kind (`PSS_KINDS`; absent on kernels before 5.9): smaps_rollup, else the sum over smaps; {} once it is gone."
    for name in ("smaps_rollup", "smaps"):
        out = {}
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for l in f:
                    key = l.split(":", 1)[0]
                    if key == "Pss" or key in PSS_KINDS: out[key] = out.get(key, 0) + int(l.split()[1])
            return out
        except OSError: continue
    return {}


def child_pids(pid: int) -> list:
    "Direct children of `pid`: /proc/<pid>/task/*/children, else (kernels without it) a scan of /proc/*/stat."
    try: tasks = os.listdir(f"/proc/{pid}/task")
    except OSError: return []
    kids, found = [], False
    for tid in tasks:
        try: kids += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split()); found = True
        except OSError: pass
    if found: return kids
    for entry in os.listdir("/proc"):
        if not entry.isdigit(): continue
        try: stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError: continue
        if int(stat.rpartition(")")[2].split()[1]) == pid: kids.append(int(entry))   # field 4: ppid
    return kids


def tree_cpu_s(pid: int) -> float:
    "CPU seconds (user + system) used so far by `pid`, its live descendants and the children they have reaped."
    todo, ticks = [pid], 0
    while todo:
        p = todo.pop()
        try: fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError: continue
        ticks += sum(map(int, fields[11:15])); todo += child_pids(p)   # utime, stime, cutime, cstime (workers that exited)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_pss_kb(pid: int) -> dict:
    "PSS split (`pss_split_kb`) of `pid` and of each of its descendants, by process id, `pid` first."
    todo, out = [pid], {}
    while todo:
        p = todo.pop(0); out[p] = pss_split_kb(p); todo += child_pids(p)
    return out


class PeakPSS:
    "Context manager: a background thread samples this process tree's PSS every `interval` s; `.peak_kb` is the max."
    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_kb, self.split, self._stop = interval, 0, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak_mib(self) -> float: return self.peak_kb / 1024

    def sample(self):
        procs = tree_pss_kb(os.getpid())
        total = sum(p.get("Pss", 0) for p in procs.values())
        if total > self.peak_kb: self.peak_kb, self.split = total, procs

    def split_mib(self) -> dict:
        "At the peak: {'main' / 'worker 1' / ...: {'Pss', 'Pss_Anon', 'Pss_File', 'Pss_Shmem': MiB}} (workers in the order found)."
        return {("main" if k == 0 else f"worker {k}"): {key: v / 1024 for key, v in p.items()} for k, p in enumerate(self.split.values())}

    def _run(self):
        while not self._stop.wait(self.interval): self.sample()

    def __enter__(self):
        self.sample(); self._thread.start(); return self

    def __exit__(self, *exc):
        self._stop.set(); self._thread.join(); self.sample()


# --- the data and the loaders under test ---

def make_parquet(path: Path, n: int, seed: int = 0) -> Path:
    "n JPEGs of about 500x375 (random crops of skimage photos, resized, quality 90), written as mmlit's writers write image columns."
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    from mmlit.sources import image_parquet_options
    from PIL import Image
    from skimage import data
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in PHOTOS if hasattr(data, name)]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    blobs = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        buf = io.BytesIO()
        src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    table = pa.table(dict(image=blobs, caption=[f"photo {i}" for i in range(n)]))
    pq.write_table(table, path, row_group_size=128, **image_parquet_options(table.schema))   # images plain, uncompressed
    return path


def timed(fn) -> tuple:
    "fn()'s result and the seconds it took."
    t = time.perf_counter(); out = fn(); return out, time.perf_counter() - t


def timed_cpu(fn) -> tuple:
    "fn()'s result, the seconds it took, and the CPU seconds of this process and its (live) workers meanwhile."
    cpu0 = tree_cpu_s(os.getpid())
    out, secs = timed(fn)
    return out, secs, tree_cpu_s(os.getpid()) - cpu0


def decode_twice_at_once(path: Path) -> int:
    "decode_only in two forked processes at the same time (the machine's 2-process ceiling)."
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try: decode_only(path)
            finally: os._exit(0)
        pids.append(pid)
    return sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in pids) * decode_only_count(path)


def decode_only_count(path: Path) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows


def decode_only(path: Path) -> int:
    import pyarrow.parquet as pq
    from PIL import Image
    blobs = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    for b in blobs: Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs)


def drain(loader) -> int:
    return sum(len(b["pixel_values"]) for b in loader)


def hf_plain(rows: dict) -> dict:
    import numpy as np, torch
    from PIL import Image
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for b in rows["image"]:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        w, h = img.size; s = 224 / min(w, h)
        img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
        l, t = (img.width - 224) // 2, (img.height - 224) // 2
        x = torch.from_numpy(np.asarray(img.crop((l, t, l + 224, t + 224)), dtype=np.float32) / 255).permute(2, 0, 1)
        out.append((x - mean) / std)
    return {"pixel_values": out}


def hf_tuned(rows: dict) -> dict:
    import numpy as np, torch
    from PIL import Image
    out = []
    for b in rows["image"]:
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", (224, 224))                      # reduced-size DCT decode
        img = img.convert("RGB")
        w, h = img.size; s = 224 / min(w, h)
        img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BOX)
        l, t = (img.width - 224) // 2, (img.height - 224) // 2
        out.append(torch.from_numpy(np.asarray(img.crop((l, t, l + 224, t + 224))).copy()).permute(2, 0, 1))
    return {"pixel_values": out}


# --- one configuration per process ---

def prepare(tmp: Path, n: int) -> None:
    "Write tmp/photos.parquet and the same photos as tar shards; fill the HF cache and mmlit's tar index once, outside any measurement."
    import pyarrow.parquet as pq
    import webdataset as wds
    from datasets import load_dataset
    from mmlit.formats import WebDatasetShards
    path = make_parquet(tmp / "photos.parquet", n)
    load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp / "hf"))
    table = pq.read_table(path)
    with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=-(-n // WDS_SHARDS), verbose=0) as sink:
        for i, (img, cap) in enumerate(zip(table.column("image").to_pylist(), table.column("caption").to_pylist())):
            sink.write({"__key__": f"{i:08d}", "jpg": img, "txt": cap})
    WebDatasetShards(shard_pattern(tmp))                  # builds the member index into $MMLIT_CACHE


def shard_pattern(tmp: Path) -> str:
    return str(tmp / f"shard-{{000000..{WDS_SHARDS - 1:06d}}}.tar")


def wds_plain(sample: tuple):
    "webdataset plain: a PIL image from .decode('pil') -> bicubic resize, crop, float normalise."
    import numpy as np, torch
    from PIL import Image
    img = sample[0].convert("RGB")
    w, h = img.size; s = 224 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
    l, t = (img.width - 224) // 2, (img.height - 224) // 2
    x = torch.from_numpy(np.asarray(img.crop((l, t, l + 224, t + 224)), dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def wds_tuned(sample: tuple):
    "webdataset hand-tuned: raw JPEG bytes -> draft() reduced-size decode, box resize, crop, uint8."
    import numpy as np, torch
    from PIL import Image
    img = Image.open(io.BytesIO(sample[0]))
    img.draft("RGB", (224, 224))
    img = img.convert("RGB")
    w, h = img.size; s = 224 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BOX)
    l, t = (img.width - 224) // 2, (img.height - 224) // 2
    return torch.from_numpy(np.asarray(img.crop((l, t, l + 224, t + 224))).copy()).permute(2, 0, 1)


def wds_loader(kind: str, shards: str, bs: int, workers: int):
    "The webdataset package's pipeline on the shards: plain (decode + per-sample batching by the DataLoader) or hand-tuned."
    import webdataset as wds
    from torch.utils.data import DataLoader
    if kind == "plain":
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg").map(wds_plain)
        return DataLoader(ds, batch_size=bs, num_workers=workers, persistent_workers=workers > 0,   # workers' CPU still counted at the end
                          collate_fn=lambda xs: {"pixel_values": __import__("torch").stack(xs)})
    ds = (wds.WebDataset(shards, shardshuffle=False, empty_check=False).to_tuple("jpg").map(wds_tuned)
          .batched(bs, collation_fn=lambda xs: {"pixel_values": __import__("torch").stack(xs)}, partial=True))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def measure_one(name: str, path: Path, bs: int, cache_dir: Path, interval: float) -> dict:
    "Run configuration `name` here: images, images/s and peak PSS (MiB; None when `interval` <= 0: no sampling)."
    import torch
    from datasets import load_dataset
    from PIL import Image
    from torch.utils.data import DataLoader, default_collate
    from mmlit.sources import ParquetImageText
    from mmlit.loader import LoaderConfig, make_loader
    from mmlit.preprocess import ImagePreprocessor

    torch.set_num_threads(1)
    ip = ImagePreprocessor(size=224, fit="crop", uint8=True, resample=Image.BOX)  # the fast preset: box filter, one resize

    def mmlit_loader(workers: int, **train):
        ds = ParquetImageText(path, decode=False)
        opts = dict(train=True, drop_last=False, **train) if train else dict(train=False)
        return make_loader(ds, LoaderConfig(batch_size=bs, num_workers=workers, seed=0, **opts),
                           transform=lambda rec, rng: {"pixel_values": ip(rec["image"], rng)})

    if name in WDS:                                        # tar shards: timing only
        shards = shard_pattern(path.parent)
        workers = int(name.rpartition("-")[2])
        if name.startswith("wds-mmlit"):
            from mmlit.formats import WebDatasetShards
            ld = make_loader(WebDatasetShards(shards, decode=False), LoaderConfig(batch_size=bs, num_workers=workers, seed=0, train=False),
                             transform=lambda rec, rng: {"pixel_values": ip(rec["image"], rng)})
        else: ld = wds_loader(name.split("-")[1], shards, bs, workers)
        n, secs, cpu = timed_cpu(lambda: drain(ld))
        return {"config": name, "images": n, "images_per_s": n / secs, "cpu_s": cpu, "peak_pss_mib": None}
    pss, extra = PeakPSS(interval) if interval > 0 else None, {}
    if name == "decode-2":                                # the ceiling: one process, then two at once
        n, one, cpu1 = timed_cpu(lambda: decode_only(path))
        n2, two, cpu2 = timed_cpu(lambda: decode_twice_at_once(path))   # the children are reaped: their CPU counts
        assert n2 == 2 * n
        return {"config": name, "images": n, "images_per_s": n2 / two, "one_process_per_s": n / one, "peak_pss_mib": None,
                "cpu_us_one": 1e6 * cpu1 / n, "cpu_us_two": 1e6 * cpu2 / n2}
    with pss or contextlib.nullcontext():                 # opening the dataset and draining the loader
        if name == "decode":
            n, secs, cpu = timed_cpu(lambda: decode_only(path))
        elif name.startswith("hf-"):
            hf = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(cache_dir))
            fn, workers = (hf_plain, 0) if name == "hf-plain" else (hf_tuned, 2 if name == "hf-tuned-2" else 0)
            dl = DataLoader(hf.with_transform(fn), batch_size=bs, collate_fn=default_collate, num_workers=workers,
                            persistent_workers=workers > 0)   # workers' CPU still counted at the end, as mmlit's
            n, secs, cpu = timed_cpu(lambda: drain(dl))
        else:
            ld = mmlit_loader(0, shuffle_span=SHUFFLED[name]) if name in SHUFFLED else mmlit_loader(int(name.removeprefix("mmlit-")))
            n, secs, cpu = timed_cpu(lambda: drain(ld))   # persistent workers: still alive when it returns
            t = ld.timings                                # measured inside the workers, shipped with each batch
            extra = {"fetch_s": t.fetch, "preprocess_s": t.preprocess, "collate_s": t.collate}
    extra["cpu_s"] = cpu
    if name.startswith("mmlit-"):
        check = next(iter(mmlit_loader(0)))["pixel_values"]
        assert check.shape == (bs, 3, 224, 224) and check.dtype == torch.uint8
    if pss: extra["peak_split_mib"] = pss.split_mib()
    return {"config": name, "images": n, "images_per_s": n / secs, "peak_pss_mib": pss and pss.peak_mib, **extra}


def median_run(runs: list) -> dict:
    "The run with the median images/s (the upper one of an even count); `images_per_s_runs`: every run's figure."
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[len(ordered) // 2], "images_per_s_runs": [r["images_per_s"] for r in runs]}


def run_fresh(name: str, tmp: Path, bs: int, interval: float) -> dict:
    "measure_one in a fresh interpreter running this script; its JSON line."
    cmd = [sys.executable, __file__, "--only", name, "--parquet", str(tmp / "photos.parquet"),
           "--cache-dir", str(tmp / "hf"), "--batch-size", str(bs), "--interval", str(interval)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MMLIT_CACHE": str(tmp / "mmlit-cache")})
    if p.returncode != 0: raise SystemExit(f"{name} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- peers: litdata, MosaicML streaming, the webdataset package, each with mmlit's transform ---

def import_streaming():
    "MosaicML streaming's writer and dataset; its vision subpackage left out when torchvision cannot import. (module, note)."
    import importlib, types
    note = ""
    try: importlib.import_module("torchvision")
    except Exception as e:                                # a CUDA build with the CPU torch: RuntimeError, ImportError, ...
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
        note = f"its streaming.vision left out (torchvision does not import: {type(e).__name__}: {str(e).splitlines()[0][:80]})"
    import streaming
    return streaming, note


def prepare_peers(tmp: Path) -> None:
    "The photos as litdata chunks (tmp/litdata) and MDS shards (tmp/mds); tmp/peers.json: each peer's version or import error."
    import pyarrow.parquet as pq
    table = pq.read_table(tmp / "photos.parquet", columns=["image"]).column("image").to_pylist()
    status = {}
    try:
        import litdata
        litdata.optimize(fn=_lit_sample, inputs=[(i, b) for i, b in enumerate(table)], output_dir=str(tmp / "litdata"),
                         chunk_bytes="16MB", num_workers=1, mode="overwrite")
        status["litdata"] = f"litdata {litdata.__version__}"
    except Exception as e: status["litdata"] = f"error: {type(e).__name__}: {e}"
    try:
        streaming, note = import_streaming()
        with streaming.MDSWriter(out=str(tmp / "mds"), columns={"index": "int", "image": "bytes"}, size_limit="16mb") as w:
            for i, b in enumerate(table): w.write({"index": i, "image": b})
        status["mds"] = f"mosaicml-streaming {streaming.__version__}" + (f"; {note}" if note else "")
    except Exception as e: status["mds"] = f"error: {type(e).__name__}: {e}"
    try:
        import webdataset
        status["wdspkg"] = f"webdataset {webdataset.__version__}"
    except Exception as e: status["wdspkg"] = f"error: {type(e).__name__}: {e}"
    (tmp / "peers.json").write_text(json.dumps(status))


def _lit_sample(item):
    "litdata.optimize's function: one stored sample."
    return {"index": item[0], "image": item[1]}


def stack(xs: list) -> dict:
    import torch
    return {"pixel_values": torch.stack([x["pixel_values"] for x in xs]), "index": torch.tensor([x["index"] for x in xs])}


def peer_loader(name: str, tmp: Path, bs: int, transform):
    "Loader `name` (`peer-mmlit`, `peer-wds-mmlit`, `litdata`, `mds`, `wdspkg`) over the photos, `transform(bytes) -> pixels` per sample."
    import torch
    from torch.utils.data import DataLoader
    kind, _, w = name.rpartition("-"); workers = int(w)
    sample = lambda index, image: {"pixel_values": transform(image), "index": int(index)}
    if kind == "peer-mmlit":
        from mmlit.loader import LoaderConfig, make_loader
        from mmlit.sources import ParquetImageText
        return make_loader(ParquetImageText(tmp / "photos.parquet", decode=False),
                           LoaderConfig(batch_size=bs, num_workers=workers, seed=0, train=False),
                           transform=lambda rec, rng: sample(rec["meta"]["index"], rec["image"]))
    if kind == "peer-wds-mmlit":                          # the same tar shards the webdataset package reads
        from mmlit.formats import WebDatasetShards
        from mmlit.loader import LoaderConfig, make_loader
        return make_loader(WebDatasetShards(shard_pattern(tmp), decode=False),
                           LoaderConfig(batch_size=bs, num_workers=workers, seed=0, train=False),
                           transform=lambda rec, rng: sample(rec["meta"]["key"], rec["image"]))
    if kind == "litdata":
        import litdata
        class Photos(litdata.StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i); return sample(s["index"], s["image"])
        return litdata.StreamingDataLoader(Photos(str(tmp / "litdata"), shuffle=False), batch_size=bs, num_workers=workers,
                                           collate_fn=stack)
    if kind == "mds":
        streaming, _ = import_streaming()
        class Photos(streaming.StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i); return sample(s["index"], s["image"])
        return streaming.StreamingDataLoader(Photos(local=str(tmp / "mds"), shuffle=False, batch_size=bs), batch_size=bs,
                                             num_workers=workers, collate_fn=stack, persistent_workers=workers > 0)
    import webdataset as wds
    ds = (wds.WebDataset(shard_pattern(tmp), shardshuffle=False, empty_check=False).to_tuple("__key__", "jpg")
          .map(lambda kv: sample(int(kv[0]), kv[1])).batched(bs, collation_fn=stack, partial=True))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def measure_peer(name: str, tmp: Path, bs: int) -> dict:
    "Run peer configuration `name` here: images, images/s, CPU seconds, and each batch's sample indices."
    import torch
    from PIL import Image
    from mmlit.preprocess import ImagePreprocessor
    torch.set_num_threads(1)
    ip = ImagePreprocessor(size=224, fit="crop", uint8=True, resample=Image.BOX)   # the transform every loader here applies
    transform = lambda image: ip(image, None)
    if name == "loop":
        import pyarrow.parquet as pq
        blobs = pq.read_table(tmp / "photos.parquet", columns=["image"]).column("image").to_pylist()
        n, secs, cpu = timed_cpu(lambda: sum(len(transform(b)) > 0 for b in blobs))
        return {"config": name, "images": n, "images_per_s": n / secs, "cpu_s": cpu, "batches": None}
    if name == "loop-parquet":                            # what a loader does, with no machinery: read row groups, stack batches
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(tmp / "photos.parquet")       # its footer read before the clock starts, as mmlit's
        n, secs, cpu = timed_cpu(lambda: parquet_loop(pf, bs, transform))
        return {"config": name, "images": n, "images_per_s": n / secs, "cpu_s": cpu, "batches": None}
    try: ld = peer_loader(name, tmp, bs, transform)
    except Exception as e: return {"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    order = []
    def drain_ordered():
        for b in ld: order.append(b["index"].tolist()); assert b["pixel_values"].dtype == torch.uint8
        return sum(map(len, order))
    n, secs, cpu = timed_cpu(drain_ordered)
    return {"config": name, "images": n, "images_per_s": n / secs, "cpu_s": cpu, "batches": order}


def parquet_loop(pf, bs: int, transform) -> int:
    "The plain loop over an open `pq.ParquetFile`: each row group read, its bytes transformed, batches of `bs` stacked; images."
    import torch
    n, pending = 0, []
    for g in range(pf.num_row_groups):
        for b in pf.read_row_group(g, columns=["image"], use_threads=False).column("image").to_pylist():
            pending.append(transform(b))
            if len(pending) == bs: n += len(torch.stack(pending)); pending = []
    return n + (len(torch.stack(pending)) if pending else 0)


def run_peer(name: str, tmp: Path, bs: int, python: str) -> dict:
    "measure_peer in a fresh `python` (the peers' environment) with this checkout on PYTHONPATH; its JSON line or the error."
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "MMLIT_CACHE": str(tmp / "mmlit-cache"), "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([python, __file__, "--only-peer", name, "--parquet", str(tmp / "photos.parquet"), "--batch-size", str(bs)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0: return {"config": name, "error": (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def peers_section(tmp: Path, n: int, bs: int, repeat: int, python: str) -> None:
    "Prepare the peers' formats, run each configuration `repeat` times round robin; the best run of each, the peers' status."
    p = subprocess.run([python, __file__, "--prepare-peers", str(tmp)], capture_output=True, text=True,   # litdata's progress bars
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if p.returncode != 0: raise SystemExit(f"preparing the peers' formats failed:\n{p.stderr}")
    status = json.loads((tmp / "peers.json").read_text())
    runs = [run_peer(name, tmp, bs, python) for _ in range(repeat) for name in PEERS]
    best = {}
    for r in runs:
        if "error" in r: best.setdefault(r["config"], r); continue
        assert r["images"] == n, (r["config"], r["images"])
        if "images_per_s" not in best.get(r["config"], {}) or r["images_per_s"] > best[r["config"]]["images_per_s"]: best[r["config"]] = r
    return best, status


DEFAULT_READ = "read, pyarrow's default writer options"


def overhead_stages(path: Path, bs: int, repeat: int) -> None:
    "Print the thread CPU per image of mmlit's 0-worker path built up stage by stage, against the plain loop (min of `repeat` rounds)."
    import statistics, torch, pyarrow.parquet as pq
    from PIL import Image
    from torch.utils.data import default_collate
    from mmlit.loader import LoaderConfig, make_loader
    from mmlit.mixture import DeterministicDataset
    from mmlit.preprocess import ImagePreprocessor
    from mmlit.sources import ParquetImageText
    torch.set_num_threads(1)
    ip = ImagePreprocessor(size=224, fit="crop", uint8=True, resample=Image.BOX)
    sample = lambda rec, rng: {"pixel_values": ip(rec["image"], None), "index": int(rec["meta"]["index"])}
    blobs = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    default_path = path.with_name("photos-pyarrow-defaults.parquet")   # snappy, dictionary-encoded images
    pq.write_table(pq.read_table(path), default_path, row_group_size=128)
    n, steps = len(blobs), [list(range(a, min(a + bs, len(blobs)))) for a in range(0, len(blobs), bs)]
    def epoch():                                          # one stage's steps, from fresh datasets; each step yields its count
        ds, ds_default = ParquetImageText(path, decode=False), ParquetImageText(default_path, decode=False)
        d2, d3 = (DeterministicDataset(ParquetImageText(path, decode=False), sample) for _ in range(2))
        it = iter(make_loader(ParquetImageText(path, decode=False), LoaderConfig(batch_size=bs, num_workers=0, seed=0, train=False),
                              transform=sample))
        return {"plain loop, bytes in memory": lambda s: sum(len(ip(blobs[i], None)) > 0 for i in s),
                "+ Parquet read, records": lambda s: sum(len(sample(ds.get(i), None)["pixel_values"]) > 0 for i in s),
                "+ a generator per sample": lambda s: len(d2.__getitems__(s)),   # what DeterministicDataset adds
                "+ batches (default_collate)": lambda s: len(default_collate(d3.__getitems__(s))["pixel_values"]),
                "+ the loader (make_loader, 0 w)": lambda s: len(next(it)["pixel_values"]),   # sampler, StepFetcher, SkipAwareCollate, timings
                DEFAULT_READ: lambda s: sum(len(sample(ds_default.get(i), None)["pixel_values"]) > 0 for i in s)}
    cpu = {}
    for _ in range(repeat):                               # the stages take turns step by step: a load change hits all alike
        stages, spent = epoch(), {}
        for s in steps:
            for k, fn in stages.items():
                t = time.thread_time(); assert fn(s) == len(s); spent[k] = spent.get(k, 0.0) + time.thread_time() - t
        for k, v in spent.items(): cpu.setdefault(k, []).append(1e6 * v / n)
    print(f"[{cpu_model()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}] mmlit's 0-worker path stage by stage, "
          f"{n} photos, batches of {bs}, the stages interleaved step by step: thread CPU us per image, median (min) of {repeat} epochs")
    prev = None
    for k, v in cpu.items():
        if k == DEFAULT_READ: continue
        m = statistics.median(v)
        print(f"  {k:36} {m:6.0f} ({min(v):5.0f})" + (f"   {m - prev:+5.0f}" if prev is not None else ""))
        prev = m
    m, base = statistics.median(cpu[DEFAULT_READ]), statistics.median(cpu["plain loop, bytes in memory"])
    print(f"  the read step from the same photos written with pyarrow's defaults (snappy, dictionary): "
          f"{m:.0f} ({min(cpu[DEFAULT_READ]):.0f}), {m - base:+.0f} over the plain loop")
    base, last = (statistics.median(v) for v in (cpu["plain loop, bytes in memory"], cpu["+ the loader (make_loader, 0 w)"]))
    print(f"  plain loop / mmlit loader by CPU: {base / last:.2f}x")



def cpu_model() -> str:
    "This machine's CPU model, from /proc/cpuinfo."
    try: return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): return "unknown CPU"


def print_peers(best: dict, status: dict, n: int, bs: int, repeat: int, python: str) -> None:
    "The peers table: images/s and CPU per image at 0 and 2 workers, what each guarantees, mmlit's ratios (wall and CPU)."
    f = {k: r.get("images_per_s") for k, r in best.items()}
    cpu = {k: 1e6 * r["cpu_s"] / n for k, r in best.items() if "cpu_s" in r}   # us per image, the process and its workers
    print(f"[{cpu_model()}, {os.cpu_count()} cores; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch threads 1]")
    print(f"{n} JPEG photos ~500x375 -> 224x224 uint8 batches of {bs}, the same mmlit transform in every loader "
          f"(best of {repeat} round-robin runs; images/s is wall, CPU is the process and its workers; {python})")
    for k in ("loop", "loop-parquet"):
        if "error" in best[k]: print(f"  {PEERS[k]:30} failed: {best[k]['error']}"); continue
        print(f"  {PEERS[k]:30} {f[k]:8.0f} images/s   CPU {cpu[k]:5.0f} us/image")
    for kind in (*MMLIT_PEERS, "litdata", "mds", "wdspkg"):
        version = status.get(kind, "")
        if version.startswith("error"): print(f"  {PEERS[kind + '-0'].rsplit(',', 1)[0]}: cannot import ({version[7:]})"); continue
        for w in (0, 2):
            r = best[f"{kind}-{w}"]
            if "error" in r: print(f"  {PEERS[r['config']]:30} failed: {r['error']}"); continue
            print(f"  {PEERS[r['config']]:30} {r['images_per_s']:8.0f} images/s   CPU {cpu[r['config']]:5.0f} us/image")
        a, b = best[f"{kind}-0"].get("batches"), best[f"{kind}-2"].get("batches")
        same = "yes" if a is not None and a == b else "NO" if a is not None and b is not None else "?"
        print(f"    {version or MMLIT_PEERS[kind]}: the same batches with 0 and 2 workers here: {same}; {RESUME[kind]}")
    label = lambda k, w: PEERS[f"{k}-{w}"].rsplit(",", 1)[0]
    for kind, name in MMLIT_PEERS.items():
        for w in (0, 2):
            m, peers = f"{kind}-{w}", [f"{k}-{w}" for k in ("litdata", "mds", "wdspkg")]
            if not f.get(m): print(f"  {w} workers: {name}: no figure"); continue
            print(f"  {w} workers: {name} / " + ", ".join(f"{label(p[:-2], w)} {f[m] / f[p]:.2f}x" for p in peers if f.get(p))
                  + "   (goal >= 1.1); by CPU per image: " + ", ".join(f"{cpu[p] / cpu[m]:.2f}x" for p in peers if p in cpu))
        m = f"{kind}-0"
        if kind == next(iter(MMLIT_PEERS)) and f.get("loop"):   # what no loader can beat: the plain loop over each peer
            print("  0 workers, the most any loader could reach over each peer (the plain loop in memory / the peer, by CPU): "
                  + ", ".join(f"{label(k, 0)} {cpu[f'{k}-0'] / cpu['loop']:.2f}x" for k in ("litdata", "mds", "wdspkg")
                              if f"{k}-0" in cpu and "loop" in cpu))
        for loop in ("loop", "loop-parquet"):
            if f.get(m) and f.get(loop):
                print(f"  {name}, 0 workers / {PEERS[loop]}  {f[m] / f[loop]:.2f}x, by CPU per image {cpu[loop] / cpu[m]:.2f}x"
                      + ("   (goal >= 0.95)" if loop == "loop" else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=384, help="images in the Parquet file")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between PSS samples (with --only: 0, none)")
    ap.add_argument("--only", choices=[*CONFIGS, *SHUFFLED, *WDS, "decode-2"], help="measure one configuration here; print a JSON line")
    ap.add_argument("--section", choices=["all", "main", "webdataset", "peers", "overhead"], default="all",
                    help="main: the Parquet table only; webdataset: only the tar-shard section; peers: only the peers section; "
                    "overhead: mmlit's 0-worker path stage by stage against the plain loop")
    ap.add_argument("--overhead", type=Path, metavar="PARQUET", help=argparse.SUPPRESS)
    default_peers = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"
    ap.add_argument("--peers-python", default=str(default_peers) if default_peers.exists() else sys.executable,
                    help="the interpreter of the peers' environment (default: .venv-peers/bin/python if present)")
    ap.add_argument("--only-peer", choices=list(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--prepare-peers", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration, round robin: the median counts in the "
                    "main table, the best in the tar-shard and peers sections")
    ap.add_argument("--parquet", type=Path, help="with --only: the Parquet file to read")
    ap.add_argument("--cache-dir", type=Path, help="with --only: HF datasets cache directory (default: a temp dir)")
    ap.add_argument("--prepare", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bs = args.batch_size
    if args.prepare: prepare(args.prepare, args.n); return
    if args.prepare_peers: prepare_peers(args.prepare_peers); return
    if args.overhead: overhead_stages(args.overhead, bs, args.repeat); return
    if args.only_peer:
        if args.parquet is None: ap.error("--only-peer needs --parquet")
        print(json.dumps(measure_peer(args.only_peer, args.parquet.parent, bs))); return
    if args.only:
        if args.parquet is None: ap.error("--only needs --parquet")
        with tempfile.TemporaryDirectory(prefix="mmlit-bench-hf-") as tmp:
            print(json.dumps(measure_one(args.only, args.parquet, bs, args.cache_dir or Path(tmp), args.interval)))
        return

    with tempfile.TemporaryDirectory(prefix="mmlit-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--prepare", str(tmp), "--n", str(args.n)], check=True,
                       env={**os.environ, "MMLIT_CACHE": str(tmp / "mmlit-cache")})
        if args.section == "overhead":
            subprocess.run([sys.executable, __file__, "--overhead", str(tmp / "photos.parquet"), "--batch-size", str(bs),
                            "--repeat", str(args.repeat)], check=True, env={**os.environ, "MMLIT_CACHE": str(tmp / "mmlit-cache")})
            return
        if args.section == "peers":
            return print_peers(*peers_section(tmp, args.n, bs, args.repeat, args.peers_python), args.n, bs, args.repeat, args.peers_python)
        wds_runs = [] if args.section == "main" else [run_fresh(name, tmp, bs, 0) for _ in range(args.repeat) for name in WDS]   # round robin: load shifts hit all alike
        wds_figures = {name: max((r for r in wds_runs if r["config"] == name), key=lambda r: r["images_per_s"]) for name in WDS
                       if wds_runs}
        if args.section == "webdataset": return print_wds(wds_figures, args.n, bs)
        runs = [run_fresh(name, tmp, bs, 0) for _ in range(args.repeat) for name in CONFIGS]   # round robin
        timing = {CONFIGS[name]: median_run([r for r in runs if r["config"] == name]) for name in CONFIGS}
        memory = {CONFIGS[name]: run_fresh(name, tmp, bs, args.interval) for name in CONFIGS}
        ceiling = run_fresh("decode-2", tmp, bs, 0)
        shuffled = {name: run_fresh(name, tmp, bs, 0) for name in SHUFFLED}
        peers = None if args.section == "main" else peers_section(tmp, args.n, bs, args.repeat, args.peers_python)
    for label, r in [*timing.items(), *memory.items()]: assert r["images"] == args.n, (label, r["images"])
    figures = {label: r["images_per_s"] for label, r in timing.items()}
    peaks = {label: r["peak_pss_mib"] for label, r in memory.items()}

    base = figures["HF plain, 0 workers"]
    print(f"[{cpu_model()}, {os.cpu_count()} cores; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end]")
    print(f"{args.n} JPEG photos ~500x375 -> 224x224 batches of {bs} (torch threads 1; each configuration in "
          f"fresh processes, median of {args.repeat} round-robin runs; peak PSS of it and its workers, sampled every "
          f"{args.interval * 1000:.0f} ms)")
    for k, v in figures.items():
        runs = " ".join(f"{x:.0f}" for x in timing[k]["images_per_s_runs"])
        print(f"  {k:28} {v:8.0f} images/s   {v / base:5.2f}x HF plain   peak PSS {peaks[k]:6.0f} MiB   (runs: {runs})")
    m0, m2, tuned = figures["mmlit, 0 workers"], figures["mmlit, 2 workers"], figures["HF hand-tuned, 0 workers"]
    tuned2 = figures["HF hand-tuned, 2 workers"]
    print(f"  mmlit 0 workers / HF plain      {m0 / base:5.2f}x   (goal >= 2.2)")
    print(f"  mmlit / HF hand-tuned           {m0 / tuned:5.2f}x with 0 workers, {m2 / tuned2:5.2f}x with 2   (goal >= 1.15)")
    print(f"  mmlit 2 workers / 0 workers     {m2 / m0:5.2f}x   (goal >= 1.9; HF hand-tuned {tuned2 / tuned:.2f}x; 2 cores shared here)")
    pss_ratio = peaks["mmlit, 2 workers"] / peaks["HF hand-tuned, 0 workers"]
    pss_ratio2 = peaks["mmlit, 2 workers"] / peaks["HF hand-tuned, 2 workers"]
    print(f"  mmlit 2 workers peak PSS / HF hand-tuned peak PSS  {pss_ratio:.2f}x (goal <= 1.0; / HF hand-tuned with 2 workers "
          f"{pss_ratio2:.2f}x)")
    for label in ("mmlit, 0 workers", "HF hand-tuned, 0 workers", "mmlit, 2 workers", "HF hand-tuned, 2 workers"):
        split = memory[label].get("peak_split_mib") or {}
        print(f"  {label}: PSS at the peak, MiB (heap + files + shared memory): " + "; ".join(
            f"{who} {p.get('Pss', 0):.0f} = {p.get('Pss_Anon', 0):.0f} + {p.get('Pss_File', 0):.0f} + {p.get('Pss_Shmem', 0):.0f}"
            for who, p in split.items()))
    short = {"decode": "decode", "hf-plain": "HF plain", "hf-tuned": "HF hand-tuned", "hf-tuned-2": "HF hand-tuned 2 w",
             "mmlit-0": "mmlit 0 w", "mmlit-2": "mmlit 2 w"}
    cpu = {short[r["config"]]: 1e6 * r["cpu_s"] / r["images"] for r in timing.values()}
    print("  CPU us per image (process + workers): " + " | ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    for label in ("mmlit, 0 workers", "mmlit, 2 workers"):
        r = timing[label]
        split = {k: 1e6 * r[f"{k}_s"] / r["images"] for k in ("fetch", "preprocess", "collate")}
        print(f"  {label}: loader time split, us/image of wall time inside the workers: "
              + ", ".join(f"{k} {v:.0f}" for k, v in split.items()))
    sb, sf = shuffled["mmlit-0-shuffle"]["images_per_s"], shuffled["mmlit-0-fullshuffle"]["images_per_s"]
    print(f"  mmlit 0 workers shuffled (train) / sequential  {sb / m0:5.2f}x ({sb:.0f} images/s, row-group shuffle, "
          f"span 8; full shuffle: {sf / m0:.2f}x, {sf:.0f} images/s)")
    print(f"  2-process ceiling now: decode-only in 2 processes at once = "
          f"{ceiling['images_per_s'] / ceiling['one_process_per_s']:.2f}x one process (bounds mmlit 2 workers / 0 workers); "
          f"its CPU per image {ceiling['cpu_us_one']:.0f} us alone, {ceiling['cpu_us_two']:.0f} us two at once")
    if args.section == "main": return
    print_wds(wds_figures, args.n, bs)
    print_peers(*peers, args.n, bs, args.repeat, args.peers_python)


def print_wds(results: dict, n: int, bs: int) -> None:
    "The tar-shard section: images/s of each configuration and mmlit's ratios to the webdataset pipelines."
    for r in results.values(): assert r["images"] == n, (r["config"], r["images"])
    f = {name: r["images_per_s"] for name, r in results.items()}
    print(f"{n} JPEG photos ~500x375 in {WDS_SHARDS} WebDataset tar shards -> 224x224 batches of {bs} "
          "(best of the round-robin runs; CPU: the process and its workers)")
    for name, label in WDS.items():
        print(f"  {label:30} {f[name]:8.0f} images/s   CPU {1e6 * results[name]['cpu_s'] / n:5.0f} us/image")
    for w in (0, 2):
        m, plain, tuned = f[f"wds-mmlit-{w}"], f[f"wds-plain-{w}"], f[f"wds-tuned-{w}"]
        print(f"  {w} workers: mmlit tar shards / webdataset plain {m / plain:5.2f}x   / webdataset hand-tuned {m / tuned:5.2f}x   (goal >= 1.0)")


if __name__ == "__main__":
    main()
