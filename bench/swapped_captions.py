"""Does the per-sample ledger find wrong captions? The demo's training data with a known share of captions swapped for
the caption of another digit, the demo model trained on it briefly, then `mmlit samples --top N`: what share of its
rows are swapped ones (precision), and what share of the swapped rows it finds (recall).

    python bench/swapped_captions.py [--fraction 0.05] [--epochs 10] [--top N (default: the number swapped)]

Runs on CPU in a few minutes. It also writes the run's report (with the dataset map) and `dataset_map_swapped.png`,
the map with the swapped rows ringed, into the run directory.
"""
import argparse, contextlib, io, json, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmlit.cli import main as mmlit
from mmlit.core import Stream, derive_seed
from mmlit.ledger import read_ledger
from mmlit.recipe import build_run, demo_config, finish_run
from mmlit.report import dataset_map, plot_dataset_map


def swap_captions(src: Path, dst: Path, fraction: float, seed: int = 0) -> list[int]:
    "Copy the Parquet `src` to `dst` with `fraction` of its rows given the caption of a row of another digit; the rows swapped."
    t = pq.read_table(src)
    caps, labels = t.column("caption").to_pylist(), np.asarray(t.column("label").to_pylist())
    rng = np.random.default_rng(derive_seed(seed, 0, 0, Stream.VAL_SPLIT))
    rows = sorted(rng.choice(len(caps), size=round(fraction * len(caps)), replace=False).tolist())
    new = list(caps)
    for r in rows:
        other = np.flatnonzero(labels != labels[r])
        new[r] = caps[int(rng.choice(other))]
    t = t.set_column(t.schema.get_field_index("caption"), "caption", pa.array(new, type=pa.string()))
    pq.write_table(t, dst, row_group_size=256)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.05); ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--top", type=int, default=None); ap.add_argument("--run-dir", default=None, help="a folder for the data and the run (default: a new temporary one)")
    a = ap.parse_args()
    root = Path(a.run_dir or tempfile.mkdtemp(prefix="mmlit-swapped-")); root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    cfg = demo_config(run_dir, epochs=a.epochs)
    data = root / "train-swapped.parquet"
    swapped = swap_captions(Path(cfg.data["data"]), data, a.fraction)
    cfg.data["data"] = str(data)
    cfg.log.progress = False
    t0 = time.perf_counter()
    run = build_run(cfg)
    finish_run(run, run.fit())
    seconds = time.perf_counter() - t0
    top = a.top or len(swapped)
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rc = mmlit(["samples", str(run_dir), "--top", str(top), "--json"])
    if rc != 0: raise SystemExit(f"mmlit samples failed with status {rc}")
    found = json.loads(out.getvalue())
    rows = [r["row"] for r in found["top"]]
    hit = len(set(rows) & set(swapped))
    dm = dataset_map(read_ledger(run_dir))
    plot_dataset_map(dm, highlight=swapped, save=run_dir / "dataset_map_swapped.png")
    hard = dm[dm["region"] == "hard"]["sample"]
    mmlit(["report", str(run_dir)])
    n = len(pq.read_table(data, columns=["label"]))
    res = dict(rows=n, swapped=len(swapped), fraction=a.fraction, epochs=a.epochs, steps=run.trainer.step, top=top,
               epoch_ranked=found["epoch"], found=hit, precision=round(hit / top, 4), recall=round(hit / len(swapped), 4),
               swapped_in_hard_region=round(len(set(hard) & set(swapped)) / len(swapped), 4), hard_region_size=len(hard),
               train_s=round(seconds, 1), run_dir=str(run_dir))
    print(f"{len(swapped)} of {n} training captions ({a.fraction:.0%}) swapped for another digit's; {run.trainer.step} steps "
          f"({a.epochs} epochs, {seconds:.0f} s)")
    print(f"mmlit samples --top {top} (mean loss over epoch {found['epoch']}): {hit} swapped rows: precision {hit / top:.1%}, "
          f"recall {hit / len(swapped):.1%}")
    print(f"dataset map: {res['swapped_in_hard_region']:.1%} of the swapped rows in the hard region ({len(hard)} samples)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
