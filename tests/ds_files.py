"""Real files for the stage 1 tests (mmlit.dataset, mmlit.images, mmlit.sources): images made with Pillow, JSONL, text and Parquet sources."""
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# (size, mode, color) of the good images the fixtures write; sizes all differ so a record's image identifies it
SPECS = [((32 + 4 * i, 24 + 2 * i), "RGB" if i % 3 else "L", (17 * i % 256, 90, 200)) for i in range(12)]


def make_image(size=(32, 24), mode="RGB", color=(10, 90, 200), noise_seed=None) -> Image.Image:
    "A real image; with `noise_seed` its pixels are noise (so a JPEG of it is big enough to truncate)."
    if noise_seed is not None:
        a = np.random.default_rng(noise_seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return Image.fromarray(a, "RGB").convert(mode)
    c = color if mode == "RGB" else color[0]
    return Image.new(mode, size, c)


def image_bytes(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    "`img` encoded as `fmt` by Pillow (`options` go to `Image.save`, e.g. `quality=`)."
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_bytes(size=(32, 24), mode="RGB", color=(10, 90, 200)) -> bytes:
    return image_bytes(make_image(size, mode, color), "PNG")


def truncated_jpeg() -> bytes:
    "A JPEG whose header is intact (it opens) but whose entropy data stops halfway (decode fails)."
    data = image_bytes(make_image((128, 96), noise_seed=0), "JPEG")
    return data[: len(data) * 6 // 10]


def corrupt_bytes() -> bytes:
    return b"this is not an image at all, just some bytes" * 3


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    "A PNG whose header declares `w`x`h` pixels (a decompression-bomb header) with almost no data."
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_jsonl(path: Path, rows) -> Path:
    "Rows are dicts (dumped as JSON) or str (written as they are: invalid JSON, blank lines)."
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_parquet(path: Path, captions, images, *, struct_images: bool = True, row_group_size: int = 4,
                  extra: dict | None = None, caption_type=pa.string()) -> Path:
    "A Parquet file with a caption column and an image column (HF `{bytes, path}` struct or plain binary)."
    if struct_images:
        img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        img_col = pa.array([None if b is None else {"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)], img_type)
    else:
        img_col = pa.array(images, pa.binary())
    cols = {"image": img_col, "caption": pa.array(captions, caption_type)}
    for k, v in (extra or {}).items(): cols[k] = pa.array(v)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def pixels(img) -> np.ndarray:
    "The decoded pixels of an image (or of each of a list of images)."
    if isinstance(img, list): return [pixels(i) for i in img]
    return np.asarray(img.convert("RGB"))
