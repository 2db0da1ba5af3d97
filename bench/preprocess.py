"""Images/s of mmlit's stage 2 image paths vs the Hugging Face image processors and vs decode only.

Each measurement runs one image at a time on one thread (what a DataLoader worker does), from JPEG
bytes (what a Parquet/WebDataset source hands over), and reports the ratios to baselines measured in
the same run. Quick by default (~2 s per measurement); `--seconds` changes that.

    python bench/preprocess.py [--seconds 2] [--sets native,large]

Sets: `native` = scikit-image photos at their own size (300x451 … 1411x1411); `large` = the same
photos resized so the longer side is 2048 (a typical camera/web photo, where `draft` pays off).
"""
import argparse
import io
import time
import warnings

import numpy as np
import skimage.data
import torch
from PIL import Image

from mmlit.preprocess import Qwen2VLPatcher, image_preset


def photos(kind: str) -> list[bytes]:
    arrs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea(),
            skimage.data.hubble_deep_field(), skimage.data.retina(), skimage.data.immunohistochemistry()]
    out = []
    for a in arrs:
        im = Image.fromarray(a)
        if kind == "large":
            s = 2048 / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        buf = io.BytesIO(); im.save(buf, "JPEG", quality=90); out.append(buf.getvalue())
    return out


def rate(fn, data: list[bytes], seconds: float) -> float:
    "Images per second of `fn(jpeg_bytes)` cycling over `data` for about `seconds`."
    for b in data: fn(b)                                   # warm-up, one pass
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for b in data: fn(b)
        n += len(data)
    return n / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--sets", default="native,large", help="comma-separated: native, large")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_clip, hf_qwen = transformers.CLIPImageProcessor(), transformers.Qwen2VLImageProcessor()
        hf_qwen256 = transformers.Qwen2VLImageProcessor(max_pixels=256 * 14 * 14)   # seed 000: image_max_patches=256
    print(f"transformers {transformers.__version__} ({type(hf_clip).__name__}, {type(hf_qwen).__name__}), "
          f"torch {torch.__version__}, 1 thread, {args.seconds:.1f} s per measurement")

    open_ = lambda b: Image.open(io.BytesIO(b))
    clip_exact, clip_draft = image_preset("clip", draft=False), image_preset("clip")
    clip_u8 = image_preset("clip", uint8=True)
    qwen_exact, qwen_draft = Qwen2VLPatcher(), Qwen2VLPatcher(draft=True)
    qwen256, qwen256_draft = Qwen2VLPatcher(image_max_patches=256), Qwen2VLPatcher(image_max_patches=256, draft=True)

    for kind in args.sets.split(","):
        data = photos(kind)
        # equality in the same run, on the same data
        d_clip = max((clip_exact(b) - hf_clip(images=open_(b), return_tensors="pt")["pixel_values"][0]).abs().max().item() for b in data)
        refs = [h(images=open_(b), return_tensors="pt") for h in (hf_qwen, hf_qwen256) for b in data]
        ours = [q(b) for q in (qwen_exact, qwen256) for b in data]
        d_qwen = max((o["pixel_values"] - r["pixel_values"]).abs().max().item() for o, r in zip(ours, refs))
        same_grid = all(torch.equal(o["image_grid_thw"], r["image_grid_thw"]) for o, r in zip(ours, refs))
        sizes = sorted({open_(b).size for b in data})
        print(f"\n== {kind}: {len(data)} JPEGs, sizes {sizes[0]} … {sizes[-1]}")
        print(f"   max |mmlit - HF|: CLIP {d_clip:.2e} (tolerance 1e-2), Qwen2-VL {d_qwen:.2e} (tolerance 1e-4), same grids: {same_grid}")

        r = {}
        r["decode only (PIL RGB)"] = rate(lambda b: open_(b).convert("RGB").load(), data, args.seconds)
        r["HF CLIPImageProcessor"] = rate(lambda b: hf_clip(images=open_(b), return_tensors="pt"), data, args.seconds)
        r["mmlit clip eval, exact"] = rate(lambda b: clip_exact(open_(b)), data, args.seconds)
        r["mmlit clip eval, draft"] = rate(lambda b: clip_draft(open_(b)), data, args.seconds)
        r["mmlit clip eval, draft, uint8"] = rate(lambda b: clip_u8(open_(b)), data, args.seconds)
        r["HF Qwen2VLImageProcessor"] = rate(lambda b: hf_qwen(images=open_(b), return_tensors="pt"), data, args.seconds)
        r["mmlit Qwen2VLPatcher, exact"] = rate(lambda b: qwen_exact(open_(b)), data, args.seconds)
        r["mmlit Qwen2VLPatcher, draft"] = rate(lambda b: qwen_draft(open_(b)), data, args.seconds)
        r["HF Qwen2VL, max 256 patches"] = rate(lambda b: hf_qwen256(images=open_(b), return_tensors="pt"), data, args.seconds)
        r["mmlit Qwen, 256 patches, exact"] = rate(lambda b: qwen256(open_(b)), data, args.seconds)
        r["mmlit Qwen, 256 patches, draft"] = rate(lambda b: qwen256_draft(open_(b)), data, args.seconds)
        dec, hc, hq = r["decode only (PIL RGB)"], r["HF CLIPImageProcessor"], r["HF Qwen2VLImageProcessor"]
        hq256 = r["HF Qwen2VL, max 256 patches"]
        print(f"   {'path':32s} {'images/s':>9s} {'vs decode':>10s} {'vs HF':>7s}")
        for name, v in r.items():
            base = hc if "clip" in name.lower() else hq256 if "256" in name else hq if "qwen" in name.lower() else None
            print(f"   {name:32s} {v:9.1f} {v / dec:10.2f} {'' if base is None else f'{v / base:6.2f}x':>7s}")


if __name__ == "__main__":
    main()
