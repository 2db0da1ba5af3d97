"""Loader throughput on one Parquet of real JPEG photos (~500x375, from skimage.data), as ratios.

Prints, measured in this run: decode-only images/s (the per-core ceiling), mmlit's loader to
224x224 uint8 batches with 0 and 2 workers, and two HF `datasets` baselines
(`load_dataset("parquet")` + `with_transform` + DataLoader, 0 workers): plain (PIL decode,
bicubic resize, crop, float normalise per sample, default collate) and hand-tuned (draft()
reduced-size JPEG decode, box resize, uint8 batches).

    python bench/loader.py            # quick: 384 images
    python bench/loader.py --n 2000   # steadier figures
"""
import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def make_parquet(path: Path, n: int, seed: int = 0) -> Path:
    "n JPEGs of about 500x375: random crops of skimage photos, resized, quality 90."
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
    pq.write_table(pa.table(dict(image=blobs, caption=[f"photo {i}" for i in range(n)])), path, row_group_size=128)
    return path


def timed(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def decode_only(path: Path) -> int:
    blobs = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    for b in blobs: Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs)


def drain(loader) -> int:
    return sum(len(b["pixel_values"]) for b in loader)


def hf_plain(rows: dict) -> dict:
    out = []
    for b in rows["image"]:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        w, h = img.size; s = 224 / min(w, h)
        img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
        l, t = (img.width - 224) // 2, (img.height - 224) // 2
        x = torch.from_numpy(np.asarray(img.crop((l, t, l + 224, t + 224)), dtype=np.float32) / 255).permute(2, 0, 1)
        out.append((x - MEAN) / STD)
    return {"pixel_values": out}


def hf_tuned(rows: dict) -> dict:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=384, help="images in the Parquet file")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    path = make_parquet(tmp / "photos.parquet", args.n)

    from datasets import load_dataset
    from mmlit.dataset import ParquetImageText
    from mmlit.loader import LoaderConfig, make_loader
    from mmlit.preprocess import ImagePreprocessor

    hf = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp / "hf"))
    bs = args.batch_size
    ip = ImagePreprocessor(size=224, fit="crop", uint8=True, resample=Image.BOX)  # the fast preset: box filter, one resize

    def mmlit_loader(workers: int):
        ds = ParquetImageText(path, decode=False)
        return make_loader(ds, LoaderConfig(batch_size=bs, num_workers=workers, train=False, seed=0),
                           transform=lambda rec, rng: {"pixel_values": ip(rec["image"], rng)})

    figures = {}
    figures["decode only (1 core)"] = args.n / timed(lambda: decode_only(path))
    figures["HF plain, 0 workers"] = args.n / timed(lambda: drain(DataLoader(hf.with_transform(hf_plain), batch_size=bs, collate_fn=default_collate)))
    figures["HF hand-tuned, 0 workers"] = args.n / timed(lambda: drain(DataLoader(hf.with_transform(hf_tuned), batch_size=bs, collate_fn=default_collate)))
    for w in (0, 2):
        ld = mmlit_loader(w)
        n = [0]
        figures[f"mmlit, {w} workers"] = args.n / timed(lambda: n.__setitem__(0, drain(ld)))
        assert n[0] == args.n
    check = next(iter(mmlit_loader(0)))["pixel_values"]
    assert check.shape == (bs, 3, 224, 224) and check.dtype == torch.uint8

    base = figures["HF plain, 0 workers"]
    print(f"{args.n} JPEG photos ~500x375 -> 224x224 batches of {bs} (torch threads 1)")
    for k, v in figures.items(): print(f"  {k:28} {v:8.0f} images/s   {v / base:5.2f}x HF plain")
    m0, m2, tuned = figures["mmlit, 0 workers"], figures["mmlit, 2 workers"], figures["HF hand-tuned, 0 workers"]
    print(f"  mmlit 0 workers / HF plain      {m0 / base:5.2f}x   (goal >= 2.2)")
    print(f"  mmlit 0 workers / HF hand-tuned {m0 / tuned:5.2f}x   (goal >= 1.0)")
    print(f"  mmlit 2 workers / 0 workers     {m2 / m0:5.2f}x   (goal >= 1.7; 2 cores shared here)")


if __name__ == "__main__":
    main()
