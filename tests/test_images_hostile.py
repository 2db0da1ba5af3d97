"""Hostile images, built here, through every decode path: 16-bit and float modes, EXIF orientation,
extreme aspect ratios, JPEGs with valid headers and garbage scan data. Each one gives the right
pixels or a counted skip whose reason names the row and the problem — the same through stage 1
(`decode=True`), the reduced-size stage 2 path (`decode=False`), every preprocessor preset,
`mmlit inspect`, and the loader with 0 and 2 workers."""
import io, json, warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

from cli_helpers import inspect_json
from ds_files import image_bytes as encode
from mmlit.core import BadRecordError, np_rng
from mmlit.dataset import Skipped
from mmlit.images import displayed_size, load_image, open_image, to_8bit
from mmlit.sources import HFDataset, JsonlImageText, ParquetImageText
from mmlit.loader import LoaderConfig, make_loader
from mmlit.multimodal import build_preprocessor
from mmlit.preprocess import decode_rgb, image_preset, pad_to_square
from mmlit.patches import Qwen2VLPatcher

H, W = 24, 40   # stored size of the test images: landscape, so a quarter turn shows


# --- builders -----------------------------------------------------------------------------------

def rgb8(a: np.ndarray) -> np.ndarray:
    "The expected RGB pixels of a greyscale uint8 array."
    return np.repeat(a[..., None], 3, axis=2)


def texture(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    "A smooth, asymmetric RGB picture (JPEG keeps it recognisable; every flip or turn changes it)."
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y + seed * 37) % 256], axis=2)
    return a.astype(np.uint8)


RNG = np.random.default_rng(9)
U16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
U16[0, :4] = [0, 255, 257 * 200, 65535]
UNIT = RNG.random((H, W), dtype=np.float32); UNIT[0, :2] = [0, 1]
LEVELS = (RNG.random((H, W)) * 255).astype(np.float32); LEVELS[0, :2] = [0, 255]
SMALL_INT = RNG.integers(0, 256, (H, W)).astype(np.int32)


def with_nan(v):
    a = UNIT.copy(); a[3, 5] = v; return a


# name → (encoded bytes, expected RGB uint8 array | fragment of the skip reason)
DEPTH_CASES = {
    "png_I;16": (encode(Image.fromarray(U16), "PNG"), rgb8((U16 >> 8).astype(np.uint8))),
    "tiff_I;16": (encode(Image.fromarray(U16), "TIFF"), rgb8((U16 >> 8).astype(np.uint8))),
    "tiff_I;16_deflate": (encode(Image.fromarray(U16), "TIFF", compression="tiff_adobe_deflate"), rgb8((U16 >> 8).astype(np.uint8))),
    "tiff_I;16B": (encode(Image.fromarray(U16.astype(">u2")), "TIFF"), rgb8((U16 >> 8).astype(np.uint8))),
    "tiff_I_0_255": (encode(Image.fromarray(SMALL_INT), "TIFF"), rgb8(SMALL_INT.astype(np.uint8))),
    "tiff_I_32bit": (encode(Image.fromarray(SMALL_INT * 100_000), "TIFF"), "mode I (32-bit integer)"),
    "tiff_I_negative": (encode(Image.fromarray(SMALL_INT - 128), "TIFF"), "mode I (32-bit integer)"),
    "tiff_F_unit": (encode(Image.fromarray(UNIT), "TIFF"), rgb8(np.rint(UNIT * 255).astype(np.uint8))),
    "tiff_F_levels": (encode(Image.fromarray(LEVELS), "TIFF"), rgb8(np.rint(LEVELS).astype(np.uint8))),
    "tiff_F_float64_unit": (encode(Image.fromarray(UNIT.astype(np.float64)), "TIFF"), rgb8(np.rint(UNIT * 255).astype(np.uint8))),
    "tiff_F_nan": (encode(Image.fromarray(with_nan(np.nan)), "TIFF"), "mode F (32-bit float) image holds NaN or infinite"),
    "tiff_F_inf": (encode(Image.fromarray(with_nan(np.inf)), "TIFF"), "mode F (32-bit float) image holds NaN or infinite"),
    "tiff_F_minus_inf": (encode(Image.fromarray(with_nan(-np.inf)), "TIFF"), "mode F (32-bit float) image holds NaN or infinite"),
    "tiff_F_wide": (encode(Image.fromarray(LEVELS * 40 - 100), "TIFF"), "mode F (32-bit float) image has values in"),
}


def tiff(a: np.ndarray, **kw) -> bytes:
    "A TIFF written by tifffile (sample formats Pillow never writes itself)."
    import tifffile
    buf = io.BytesIO(); tifffile.imwrite(buf, a, **kw); return buf.getvalue()


U16_RGB = RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
TIFF_UNREADABLE = "a TIFF whose sample format Pillow cannot read"
DEPTH_CASES.update({
    "tifffile_u16_rgb": (tiff(U16_RGB), (U16_RGB >> 8).astype(np.uint8)),
    "tifffile_u16_big_endian": (tiff(U16, byteorder=">"), rgb8((U16 >> 8).astype(np.uint8))),
    "tifffile_f32_big_endian": (tiff(UNIT, byteorder=">"), rgb8(np.rint(UNIT * 255).astype(np.uint8))),
    "tifffile_i16_signed": (tiff((SMALL_INT - 128).astype(np.int16)), "mode I (32-bit integer)"),
    "tifffile_u32_full_range": (tiff((U16.astype(np.uint32) << 16) | 7), "mode I (32-bit integer)"),
    "tifffile_f64": (tiff(UNIT.astype(np.float64)), TIFF_UNREADABLE),
    "tifffile_f16": (tiff(UNIT.astype(np.float16)), TIFF_UNREADABLE),
    "tifffile_f32_rgb": (tiff(np.stack([UNIT] * 3, axis=2), photometric="rgb"), TIFF_UNREADABLE),
})


def oriented(o: int, fmt: str) -> bytes:
    "`texture()` stored as is, tagged with EXIF orientation `o`."
    im = Image.fromarray(texture(o))
    if fmt == "TIFF": return encode(im, fmt, tiffinfo={ExifTags.Base.Orientation: o})
    exif = Image.Exif(); exif[ExifTags.Base.Orientation] = o
    kw = {"JPEG": dict(quality=95), "WEBP": dict(lossless=True), "PNG": {}}[fmt]
    return encode(im, fmt, exif=exif, **kw)


def reference_upright(data: bytes) -> np.ndarray:
    "What Pillow + `exif_transpose` (HF's image loading) shows."
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


ORIENT_CASES = {f"{fmt.lower()}_orientation_{o}": (oriented(o, fmt), None)
                for fmt in ("JPEG", "PNG", "WEBP", "TIFF") for o in range(1, 9)}
for _k, (_b, _) in ORIENT_CASES.items(): ORIENT_CASES[_k] = (_b, reference_upright(_b))


def garbage_scan(data: bytes, seed: int, keep: int = 20) -> bytes:
    "`data` with everything after the first scan header replaced by random bytes (headers intact)."
    sos = data.index(b"\xff\xda") + keep
    return data[:sos] + np.random.default_rng(seed).integers(0, 256, len(data) - sos - 2, dtype=np.uint8).tobytes() + b"\xff\xd9"


_jpeg = encode(Image.fromarray(texture(1, 64, 96)), "JPEG", quality=90)
_prog = encode(Image.fromarray(texture(2, 64, 96)), "JPEG", quality=90, progressive=True)
_grey = encode(Image.fromarray(texture(3, 64, 96)[..., 0]), "JPEG", quality=90)
_cmyk = encode(Image.fromarray(texture(4, 64, 96)).convert("CMYK"), "JPEG", quality=90)
CORRUPT = "cannot decode image, truncated or corrupt"
JPEG_CASES = {
    **{f"jpeg_garbage_scan_{s}": (garbage_scan(_jpeg, s), CORRUPT) for s in range(4)},
    "jpeg_progressive_garbage": (garbage_scan(_prog, 5), CORRUPT),
    "jpeg_grey_garbage": (garbage_scan(_grey, 6), CORRUPT),
    "jpeg_cmyk_garbage": (garbage_scan(_cmyk, 7), CORRUPT),
    "jpeg_truncated": (_jpeg[: len(_jpeg) * 2 // 3], CORRUPT),
    "jpeg_good": (_jpeg, np.asarray(Image.open(io.BytesIO(_jpeg)).convert("RGB"))),
    "jpeg_grey_good": (_grey, rgb8(np.asarray(Image.open(io.BytesIO(_grey))))),
    "jpeg_cmyk_good": (_cmyk, np.asarray(Image.open(io.BytesIO(_cmyk)).convert("RGB"))),
    "jpeg_progressive_good": (_prog, np.asarray(Image.open(io.BytesIO(_prog)).convert("RGB"))),
}

CASES = {**DEPTH_CASES, **ORIENT_CASES, **JPEG_CASES}
GOOD = {k for k, (_, e) in CASES.items() if isinstance(e, np.ndarray)}
BAD = {k: e for k, (_, e) in CASES.items() if isinstance(e, str)}

# decoded fine, but too long and thin for any preset: refused before anything is allocated for it
THIN = {"thin_png_2000_to_1": encode(Image.new("RGB", (20_000, 10), (9, 99, 199)), "PNG"),
        "thin_jpeg_1_to_300": encode(Image.new("RGB", (8, 2400), (9, 99, 199)), "JPEG")}


# --- one image, every decode function -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_every_decode_path_agrees(name):
    data, expected = CASES[name]
    where = dict(source="t", file="t.parquet", index=7, unit="row")
    paths = {
        "stage 1 decode": lambda: to_rgb_array(open_image(data, where=where)),
        "lazy + load_image": lambda: to_rgb_array(load_image(open_image(data, decode=False), where=where)),
        "decode_rgb": lambda: np.asarray(decode_rgb(data, draft=False)),
        "decode_rgb draft": lambda: np.asarray(decode_rgb(data, min_size=(8, 8))),
    }
    if not (isinstance(expected, str) and expected == TIFF_UNREADABLE):   # Pillow cannot even open those
        paths["decode_rgb of a lazy PIL"] = lambda: np.asarray(decode_rgb(Image.open(io.BytesIO(data)), draft=False))
    for path, run in paths.items():
        if isinstance(expected, str):
            with pytest.raises(BadRecordError, match=expected.replace("(", r"\(").replace(")", r"\)")):
                run()
        else:
            got = run()
            if path == "decode_rgb draft": got = got if got.shape == expected.shape else None   # may shrink a JPEG
            if got is not None: np.testing.assert_array_equal(got, expected, err_msg=f"{name}: {path}")
    if isinstance(expected, str):   # the reason names the row
        with pytest.raises(BadRecordError, match=r"t.parquet row 7: "):
            open_image(data, where=where)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    assert im.mode in ("L", "RGB", "CMYK"), im.mode   # stage 1 hands over 8-bit images only
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_displayed_size_is_known_before_decoding(fmt):
    for o in range(1, 9):
        lazy = open_image(oriented(o, fmt), decode=False)
        assert displayed_size(lazy) == ((H, W) if o >= 5 else (W, H)), (fmt, o)
        assert open_image(oriented(o, fmt)).size == displayed_size(lazy)


def test_orientation_is_applied_once():
    up = open_image(oriented(6, "JPEG"))              # stage 1 turned it upright ...
    assert np.array_equal(np.asarray(decode_rgb(up)), np.asarray(up.convert("RGB")))   # ... stage 2 does not turn it again


def test_reduced_scale_jpeg_follows_the_orientation():
    big = Image.fromarray(texture(5, 480, 800))       # stored 800 wide, 480 high
    exif = Image.Exif(); exif[ExifTags.Base.Orientation] = 8
    data = encode(big, "JPEG", quality=95, exif=exif)
    small = decode_rgb(data, min_size=(120, 200))       # upright: 480 wide, 800 high
    assert small.size == (120, 200)                      # 1/4 scale, upright
    full = reference_upright(data)
    assert np.abs(np.asarray(small.resize((480, 800), Image.BILINEAR), np.int16) - full).mean() < 12


def test_truncated_images_stay_bad_when_pillow_is_told_to_load_them():
    png = encode(Image.fromarray(texture(0, 200, 300)), "PNG")
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        for data in (png[: len(png) // 2], _jpeg[: len(_jpeg) // 2], garbage_scan(_jpeg, 0)):
            with pytest.raises(BadRecordError, match="truncated or corrupt"): open_image(data)
            with pytest.raises(BadRecordError, match="truncated or corrupt"): decode_rgb(data)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True   # the caller's setting is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_in_memory_images_of_every_depth():
    assert np.asarray(to_8bit(Image.fromarray(np.full((2, 2), 0x1234, np.uint16)))).tolist() == [[0x12] * 2] * 2
    assert decode_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(BadRecordError, match="mode F"): decode_rgb(Image.fromarray(np.full((2, 2), np.nan, np.float32)))
    for mode in ("1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I;16L", "I;16N"):
        assert decode_rgb(Image.new(mode, (3, 2))).mode == "RGB", mode


# --- extreme aspect ratios: bounded before allocation ------------------------------------------------

@pytest.mark.parametrize("preset", ["clip", "imagenet", "molmo", "cifar"])
@pytest.mark.parametrize("train", [False, True])
def test_every_image_preset_refuses_banners(preset, train):
    pre = image_preset(preset, train)
    for name, data in THIN.items():
        with pytest.raises(BadRecordError, match="over max_aspect_ratio=200"):
            pre(data, np_rng(0, 0, 0))
        with pytest.raises(BadRecordError, match="over max_aspect_ratio=200"):
            pre(open_image(data), np_rng(0, 0, 0))       # an already decoded image too


def test_qwen_refuses_banners():
    for data in THIN.values():
        with pytest.raises(BadRecordError, match="over max_aspect_ratio=200"): Qwen2VLPatcher()(data)
    with pytest.raises(BadRecordError, match="over max_aspect_ratio=50"): Qwen2VLPatcher(max_aspect_ratio=50)(encode(Image.new("RGB", (600, 10)), "PNG"))


def test_pad_canvas_never_exceeds_max_image_pixels(monkeypatch):
    canvases = []
    new = Image.new
    def spy(mode, size, *a, **k):
        canvases.append(size[0] * size[1]); return new(mode, size, *a, **k)
    monkeypatch.setattr(Image, "new", spy)
    limit = 1500 ** 2
    for size in ((4000, 20), (20, 4000), (4000, 200)):                      # squares of 16 Mpx, over the limit
        for train in (False, True):
            x = image_preset("molmo", train, max_image_pixels=limit, uint8=True)(
                encode(Image.new("RGB", size, (200, 10, 10)), "PNG"), np_rng(0, 0, 0))
            assert x.shape == (3, 336, 336)
    x = image_preset("molmo", max_image_pixels=limit, uint8=True)(encode(Image.new("RGB", (4000, 200), (200, 10, 10)), "PNG"))
    assert x[:, 168, 100].tolist() == [200, 10, 10] and x[:, 10, 100].tolist() != [200, 10, 10]   # whole, centred
    assert canvases and max(canvases) <= limit
    exact = image_preset("molmo", uint8=True)(encode(Image.new("RGB", (400, 20), (200, 10, 10)), "PNG"))
    assert exact[:, 168, 100].tolist() == [200, 10, 10]


def test_aspect_limit_is_configurable_through_the_presets(tok):
    data = THIN["thin_jpeg_1_to_300"]
    rec = record([data], 0)
    for name in ("clip", "molmo", "qwen2_vl"):
        with pytest.raises(BadRecordError, match=r"t.parquet row 0: image aspect ratio 300"):
            build_preprocessor(name, tok)(rec)
        build_preprocessor(name, tok, max_aspect_ratio=400)(record([data], 0))


# --- presets, sources, inspect, loader ---------------------------------------------------------------

def record(images, index, file="t.parquet"):
    return {"text": "a picture", "image": images, "negatives": [], "task": "caption", "messages": None,
            "meta": {"source": "t", "file": file, "index": index, "unit": "row"}}


PRESETS = ["clip", "molmo", "qwen2_vl"]
ORDER = sorted(CASES) + sorted(THIN)     # row i of the files below is ORDER[i]


def pixels(out: dict) -> torch.Tensor:
    return out["images"] if "images" in out else out["pixel_values"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_see_the_expected_pixels(tok, preset):
    pre = build_preprocessor(preset, tok)
    for name in sorted(CASES):
        data, expected = CASES[name]
        if isinstance(expected, str):
            with pytest.raises(BadRecordError, match=r"t.parquet row 3: "): pre(record([data], 3))
            continue
        want = pre(record([Image.fromarray(expected)], 3))
        for got in (pre(record([data], 3)), pre(record([open_image(data)], 3))):
            assert torch.equal(pixels(got), pixels(want)), (preset, name)
            if preset == "qwen2_vl": assert torch.equal(got["image_grid_thw"], want["image_grid_thw"]), name


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    blobs = [CASES[n][0] if n in CASES else THIN[n] for n in ORDER]
    lines = []
    for i, (n, b) in enumerate(zip(ORDER, blobs)):
        (d / f"{i:03d}_{n}.img").write_bytes(b)
        lines.append(json.dumps({"text": n, "image": f"{i:03d}_{n}.img"}))
    (d / "hostile.jsonl").write_text("\n".join(lines) + "\n")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs], struct),
                      "caption": pa.array(ORDER, pa.string())})
    pq.write_table(table, d / "hostile.parquet", row_group_size=8)
    return {"jsonl": d / "hostile.jsonl", "parquet": d / "hostile.parquet"}


def open_src(sources, kind, decode=True):
    if kind == "jsonl": return JsonlImageText(sources["jsonl"], decode=decode)
    return ParquetImageText(sources["parquet"], decode=decode)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sources_and_inspect_agree(sources, kind):
    ds = open_src(sources, kind)
    got = [ds.get(i) for i in range(len(ds))]
    bad_stage1 = {ORDER[i]: g.bad for i, g in enumerate(got) if isinstance(g, Skipped)}
    assert set(bad_stage1) == set(BAD), set(bad_stage1) ^ set(BAD)
    for n, b in bad_stage1.items():
        assert BAD[n] in b.reason and b.file == str(sources[kind]), (n, b)
    for i, g in enumerate(got):
        n = ORDER[i]
        if n in GOOD: np.testing.assert_array_equal(to_rgb_array(g["image"]), CASES[n][1], err_msg=n)
    r = inspect_json(sources[kind])
    assert r["rows"] == len(ORDER) and r["good"] == len(ORDER) - len(BAD)
    assert sorted((b["index"], b["reason"]) for b in r["bad"]) == sorted((b.index, b.reason) for b in bad_stage1.values())
    lazy = open_src(sources, kind, decode=False)        # the reduced-size path rejects the same JPEGs
    q = Qwen2VLPatcher(draft=True, max_pixels=32 * 32 * 4)
    for i, n in enumerate(ORDER):
        rec = lazy.get(i)
        if isinstance(rec, Skipped): continue             # unreadable header: the same reason as above
        try: q(rec["image"])
        except BadRecordError as e: assert n in BAD or n in THIN, (n, e)
        else: assert n in GOOD, n


@pytest.mark.parametrize("hf_decodes", [True, False])
def test_hf_dataset_images_agree_with_files(hf_decodes):
    # HF's Image feature would decode a JPEG with garbage scan data; the adapter must skip it like a file
    hfds = pytest.importorskip("datasets")
    names = sorted(CASES)
    ds = hfds.Dataset.from_dict({"image": [{"bytes": CASES[n][0], "path": None} for n in names], "text": names})
    hd = HFDataset(ds.cast_column("image", hfds.Image(decode=hf_decodes)))
    for i, n in enumerate(names):
        rec = hd.get(i)
        if n in BAD:
            assert isinstance(rec, Skipped) and BAD[n] in rec.bad.reason, (n, rec)
        else:
            np.testing.assert_array_equal(to_rgb_array(rec["image"]), CASES[n][1], err_msg=n)
    assert len(hd.report) == len(BAD)


def tagged(samples):
    "Collate: keep each sample as it is (the rows are compared one by one)."
    return list(samples)


class Tagged:
    "A preprocessor that also says which row each sample came from."
    def __init__(self, pre): self.pre = pre
    def __call__(self, rec, rng):
        out = self.pre(rec, rng)
        out["_name"] = rec["text"]
        return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("preset", PRESETS)
def test_loader_counts_every_hostile_record(tok, sources, kind, preset, workers):
    pre = build_preprocessor(preset, tok)
    for decode in (True, False):
        ds = open_src(sources, kind, decode)
        ld = make_loader(ds, LoaderConfig(batch_size=5, num_workers=workers, shuffle=False, drop_last=False),
                         transform=Tagged(pre), collate=tagged)
        seen = {s["_name"]: s for batch in ld for s in batch}
        assert set(seen) == GOOD, set(seen) ^ GOOD                       # no good record lost, no bad one kept
        assert len(ld.report) == len(BAD) + len(THIN)
        assert {b.file for b in ld.report} == {str(sources[kind])}
        reasons = {ORDER[b.index]: b.reason for b in ld.report}          # the 0-based line or row
        for n, frag in BAD.items(): assert frag in reasons[n], (n, reasons[n])
        for n in THIN: assert "over max_aspect_ratio=200" in reasons[n], reasons[n]
        for n in ("png_I;16", "tiff_F_unit", "jpeg_orientation_6", "webp_orientation_7", "tiff_orientation_5", "jpeg_good"):
            want = pre(record([Image.fromarray(CASES[n][1])], 0))
            assert torch.equal(pixels(seen[n]), pixels(want)), (n, decode)


def test_banners_are_refused_before_decoding(tok, monkeypatch):
    import mmlit.images, mmlit.preprocess
    def no_decode(*a, **k): raise AssertionError("decoded a refused image")
    monkeypatch.setattr(mmlit.images, "_load", no_decode)
    monkeypatch.setattr(mmlit.preprocess, "load_image", no_decode)
    png = THIN["thin_png_2000_to_1"]                     # a PNG: its EXIF could follow the pixels, yet no decode
    for pre in (image_preset("molmo"), image_preset("clip"), Qwen2VLPatcher()):
        with pytest.raises(BadRecordError, match="over max_aspect_ratio"): pre(png)
    for name in PRESETS:
        with pytest.raises(BadRecordError, match="over max_aspect_ratio"):
            build_preprocessor(name, tok)(record([open_image(png, decode=False)], 0))
