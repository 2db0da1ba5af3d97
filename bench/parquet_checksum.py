"""Cost of verifying Parquet page checksums: rows/s of `ParquetImageText` with `verify_checksums` on vs off.

Two files: the demo Parquet (written without page checksums, so verification has nothing to check:
the ratio shows the switch itself costs nothing) and a larger file that this script writes from the
demo rows with `write_page_checksum=True` (every page carries a CRC-32 that a verified read checks).
Each file is read `--repeats` times per setting, alternating on/off, and the best rate of each is
kept, in rows per CPU second of this process (steadier than wall time on a shared machine), at
three levels: `pages` (pyarrow reading every row group: where checksums weigh most), `read`
(`ParquetImageText` records with `decode=False`: pages, Python values, image headers) and
`decoded` (every image decoded: what training does). A control in the same run proves the verified reads
really check: one byte flipped inside a data page makes the verified read report that row group's
rows as bad, while the unverified read returns them.

    python bench/parquet_checksum.py            # demo 3,000 rows; 12,000 rows with checksums
    python bench/parquet_checksum.py --quick    # 1,000 and 4,000 rows
"""
from __future__ import annotations

import argparse, logging, tempfile, time
from pathlib import Path

import pyarrow.parquet as pq

from mmlit.sources import ParquetImageText
from mmlit.demo import build_demo_parquet


def rows_per_second(path: Path, verify: bool, level: str) -> float:
    "Rows per CPU second: Parquet pages only (`pages`), records (`read`) or records with decoded images (`decoded`)."
    t0 = time.process_time()                 # CPU time of this process: steadier than wall time on a shared machine
    if level == "pages":                     # what verification adds to: pyarrow reading every row group
        pf = pq.ParquetFile(path, page_checksum_verification=verify, memory_map=False, pre_buffer=False, buffer_size=1 << 16)
        n = sum(pf.read_row_group(g, use_threads=False).num_rows for g in range(pf.num_row_groups))
    else:
        ds = ParquetImageText(path, verify_checksums=verify, decode=level == "decoded")
        n = sum(bool(ds.get(i)) for i in range(len(ds)))
        if n != len(ds): raise SystemExit(f"{path}: {len(ds) - n} bad records in a clean file\n{ds.report}")
    return n / (time.process_time() - t0)


def with_checksums(src: Path, dst: Path, copies: int) -> Path:
    "`copies` times the rows of `src`, written with a CRC-32 in every page header, row groups of 256."
    table = pq.read_table(src)
    with pq.ParquetWriter(dst, table.schema, compression="snappy", write_page_checksum=True) as w:
        for _ in range(copies): w.write_table(table, row_group_size=256)
    return dst


def flip_check(path: Path, tmp: Path) -> tuple[int, int]:
    "Bad records found with verification on and off after flipping one byte inside row group 1's image pages."
    bad_file = tmp / "flipped.parquet"
    data = bytearray(path.read_bytes())
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)       # the image column
    start = col.dictionary_page_offset or col.data_page_offset
    data[start + col.total_compressed_size // 2] ^= 0xFF
    bad_file.write_bytes(bytes(data))
    found = []
    for verify in (True, False):
        ds = ParquetImageText(bad_file, verify_checksums=verify, decode=False)
        for i in range(len(ds)): ds.get(i)
        found.append(len(ds.report))
    return found[0], found[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller files")
    ap.add_argument("--repeats", type=int, default=5, help="reads per setting, alternating on/off; the best is kept")
    args = ap.parse_args()
    logging.getLogger("mmlit.dataset").setLevel(logging.ERROR)     # the flip control logs 256 skips
    n, copies = (1000, 4) if args.quick else (3000, 4)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        demo = build_demo_parquet(tmp / "demo.parquet", n=n)[0]
        big = with_checksums(demo, tmp / "checksummed.parquet", copies)
        print(f"demo: {n} rows, {demo.stat().st_size / 2**20:.1f} MiB, no page checksums; "
              f"larger: {n * copies} rows, {big.stat().st_size / 2**20:.1f} MiB, page checksums written")
        print(f"{'file':12} {'level':9} {'off rows/s':>11} {'on rows/s':>10} {'on/off':>7}")
        best = {}
        for name, path in (("demo", demo), ("checksummed", big)):
            for level in ("pages", "read", "decoded"):
                rates = {True: [], False: []}
                for _ in range(args.repeats):
                    for verify in (False, True): rates[verify].append(rows_per_second(path, verify, level))
                off, on = best[name, level] = max(rates[False]), max(rates[True])
                print(f"{name:12} {level:9} {off:11,.0f} {on:10,.0f} {on / off:7.2f}")
        off, on = best["checksummed", "pages"]
        extra = 1 / on - 1 / off                                    # CPU seconds verification adds per row
        share = lambda level: extra * best["checksummed", level][0]  # ... as a fraction of a row's cost at that level
        print(f"verification adds {extra * 1e6:.2f} µs per row of page reading: {share('read'):.1%} of a read record, "
              f"{share('decoded'):.1%} of a decoded one")
        on, off = flip_check(big, tmp)
        print(f"control, one byte flipped in row group 1: {on} bad records with verification, {off} without")
        if on == 0 or off != 0: raise SystemExit("the flipped byte was not caught by verification alone")


if __name__ == "__main__":
    main()
