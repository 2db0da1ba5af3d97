"""Peak memory of streaming a Parquet file through `ParquetImageText`: a file and one 10x larger.

`ParquetImageText` reads one row group at a time (plus a small cache), so reading and decoding every
record of a 10x larger file must not raise peak RSS by more than 20%. Each measurement runs in a
fresh subprocess (peaks never mix) and reads the process's high-water mark (VmHWM, else ru_maxrss).
As a control measured in the same run, a naive reader (`pyarrow.parquet.read_table` of the whole
file, then decode every image) shows what the check would catch.

    python bench/parquet_memory.py            # 2,000 vs 20,000 rows of 128 px PNG (about 9 vs 90 MB)
    python bench/parquet_memory.py --quick    # 500 vs 5,000 rows of 96 px
Exit status 1 when the larger file raises ParquetImageText's peak RSS by more than --max-increase.
"""
from __future__ import annotations

import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path


def peak_rss_mb() -> float:
    "This process's peak resident set size in MiB (VmHWM on Linux, ru_maxrss elsewhere)."
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)   # bytes on macOS, KiB on Linux


def child(path: str, reader: str) -> None:
    "Read and decode every record of `path`; print one JSON line with counts and peak RSS."
    from mmlit.images import open_image
    from mmlit.sources import ParquetImageText
    before = peak_rss_mb()
    t0, good, pixels = time.perf_counter(), 0, 0
    if reader == "mmlit":
        ds = ParquetImageText(path)                                  # decode=True: every image fully decoded
        for i in range(len(ds)):
            rec = ds.get(i)
            if rec: good += 1; pixels += rec["image"].width * rec["image"].height
        rows = len(ds)
    else:                                                            # control: the whole table in memory
        import pyarrow.parquet as pq
        table = pq.read_table(path, columns=["image", "caption"])
        images = table.column("image").to_pylist()
        for cell in images:
            im = open_image(cell["bytes"]); good += 1; pixels += im.width * im.height
        rows = table.num_rows
    print(json.dumps({"rows": rows, "good": good, "pixels": pixels, "rss_before_mb": before,
                      "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}))


def measure(path: Path, reader: str) -> dict:
    "Run `child` in a fresh interpreter and return its report."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, __file__, "--child", str(path), "--reader", reader],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0: raise SystemExit(f"child failed ({reader}, {path}):\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="rows of the small file (the large one has 10x)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--row-group-size", type=int, default=256)
    ap.add_argument("--max-increase", type=float, default=0.20, help="allowed relative rise of peak RSS")
    ap.add_argument("--quick", action="store_true", help="500 vs 5,000 rows of 96 px")
    ap.add_argument("--no-control", action="store_true", help="skip the naive whole-table reader")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reader", default="mmlit", choices=["mmlit", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child: child(args.child, args.reader); return 0
    if args.quick: args.rows, args.image_size = 500, 96

    from mmlit.demo import build_demo_parquet
    with tempfile.TemporaryDirectory(prefix="mmlit-bench-") as tmp:
        t0 = time.perf_counter()
        small, large = (build_demo_parquet(Path(tmp) / f"{name}.parquet", n=n, image_size=args.image_size,
                                           row_group_size=args.row_group_size)[0]
                        for name, n in (("small", args.rows), ("large", 10 * args.rows)))
        mb = lambda p: p.stat().st_size / 2**20
        print(f"built {args.rows:,} and {10 * args.rows:,} rows of {args.image_size} px PNG "
              f"({mb(small):.1f} MiB, {mb(large):.1f} MiB; row groups of {args.row_group_size}) "
              f"in {time.perf_counter() - t0:.1f} s")
        readers = ["mmlit"] + ([] if args.no_control else ["naive"])
        res = {(r, n): measure(p, r) for r in readers for n, p in (("small", small), ("large", large))}

    print(f"\n{'reader':<26}{'file':>7}{'rows':>9}{'good':>9}{'start MiB':>11}{'peak MiB':>10}{'rec/s':>9}")
    for (r, n), m in res.items():
        name = "ParquetImageText" if r == "mmlit" else "read_table (control)"
        print(f"{name:<26}{n:>7}{m['rows']:>9,}{m['good']:>9,}{m['rss_before_mb']:>11.0f}{m['peak_mb']:>10.0f}"
              f"{m['rows'] / m['seconds']:>9,.0f}")
    print()
    failed = False
    for r in readers:
        s, l = res[(r, "small")], res[(r, "large")]
        assert l["good"] == 10 * s["good"] == 10 * args.rows, "every record must be read and decoded"
        ratio = l["peak_mb"] / s["peak_mb"]
        grow = (l["peak_mb"] - l["rss_before_mb"]) / max(s["peak_mb"] - s["rss_before_mb"], 1e-9)
        name = "ParquetImageText" if r == "mmlit" else "read_table (control)"
        verdict = "" if r != "mmlit" else ("  OK" if ratio <= 1 + args.max_increase else "  FAIL")
        print(f"{name}: peak RSS large/small = {ratio:.3f} (allowed <= {1 + args.max_increase:.2f}); "
              f"growth during the scan large/small = {grow:.2f}x{verdict}")
        if r == "mmlit" and ratio > 1 + args.max_increase: failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
