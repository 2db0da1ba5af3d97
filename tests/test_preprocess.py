"""Stage 2 against the reference implementations: HF's CLIP and Qwen2-VL image processors on real
photos, determinism by rng, truncation that never splits an image, bad images reported."""
import io
import warnings

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ds_files import bomb_png, image_bytes
from mmlit.core import BadRecordError, np_rng
from hypothesis import given, settings, strategies as st

from mmlit.preprocess import image_preset, resize_crop
from mmlit.patches import Qwen2VLPatcher, VideoPreprocessor


def _jpeg(arr, quality=92): return image_bytes(Image.fromarray(arr), "JPEG", quality=quality)

# Real photos of several shapes: square, landscape, portrait, grayscale, over Qwen's max_pixels.
PHOTOS = {
    "astronaut": skimage.data.astronaut(),                          # 512×512
    "coffee": skimage.data.coffee(),                                # 400×600 landscape
    "rocket": skimage.data.rocket(),                                # 427×640 landscape
    "chelsea_portrait": np.ascontiguousarray(np.rot90(skimage.data.chelsea())),  # 451×300 portrait
    "camera_gray": skimage.data.camera(),                           # 512×512 grayscale
    "hubble": skimage.data.hubble_deep_field(),                     # 872×1000
    "retina_big": skimage.data.retina(),                            # 1411×1411 > max_pixels
}


def _hf(cls_name):
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name)()   # defaults only, nothing downloaded


@pytest.fixture(scope="module")
def hf_clip(): return _hf("CLIPImageProcessorPil")   # the Pillow backend (torchvision may switch the default)


@pytest.fixture(scope="module")
def hf_qwen(): return _hf("Qwen2VLImageProcessorPil")


@pytest.mark.parametrize("name", list(PHOTOS))
def test_clip_eval_matches_hf(name, hf_clip):
    jpg = _jpeg(PHOTOS[name])
    ref = hf_clip(images=Image.open(io.BytesIO(jpg)), return_tensors="pt")["pixel_values"][0]
    ours = image_preset("clip", draft=False)(jpg)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-2                    # the tolerance ...
    assert (ours - ref).abs().max().item() <= 1e-5                    # ... and in fact the same pixels


@pytest.mark.parametrize("size", [224, 336, 100])
def test_clip_eval_pixels_are_hfs_bit_for_bit(size):
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_u8 = transformers.CLIPImageProcessorPil(do_rescale=False, do_normalize=False, size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size})
    ours = image_preset("clip", draft=False, uint8=True, size=size)
    for name, arr in PHOTOS.items():
        jpg = _jpeg(arr)
        ref = hf_u8(images=Image.open(io.BytesIO(jpg)), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(ours(jpg), ref.to(torch.uint8)), name


@settings(max_examples=150, deadline=None)
@given(w=st.integers(4, 260), h=st.integers(4, 260), rw=st.integers(4, 260), rh=st.integers(4, 260),
       resample=st.sampled_from([Image.BICUBIC, Image.BILINEAR, Image.LANCZOS, Image.BOX, Image.HAMMING]), data=st.data())
def test_resize_crop_is_resize_then_crop(w, h, rw, rh, resample, data):
    left, top = data.draw(st.integers(0, rw - 1)), data.draw(st.integers(0, rh - 1))
    box = (left, top, data.draw(st.integers(left + 1, rw)), data.draw(st.integers(top + 1, rh)))
    src = Image.fromarray(PHOTOS["coffee"]).resize((w, h), Image.BILINEAR)
    assert np.array_equal(np.asarray(resize_crop(src, (rw, rh), box, resample)),
                          np.asarray(src.resize((rw, rh), resample).crop(box)))


@pytest.mark.parametrize("kw", [{}, {"image_max_patches": 256}, {"min_pixels": 200_000}])
def test_qwen_patches_match_hf(kw, hf_qwen):
    import transformers
    hf = hf_qwen if not kw else type(hf_qwen)(**{k: v for k, v in kw.items() if k != "image_max_patches"},
                                              **({"max_pixels": kw["image_max_patches"] * 196} if "image_max_patches" in kw else {}))
    ours = Qwen2VLPatcher(**kw)
    jpgs = [_jpeg(p) for p in PHOTOS.values()]
    ref = hf(images=[Image.open(io.BytesIO(j)) for j in jpgs], return_tensors="pt")
    got = ours(jpgs)
    assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    assert got["pixel_values"].dtype == torch.float32
    assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-4
    assert len(set(map(tuple, got["image_grid_thw"].tolist()))) >= 4   # several aspect ratios


def test_qwen_token_count_matches_hf_rule(hf_qwen):
    q = Qwen2VLPatcher()
    for arr in PHOTOS.values():
        h, w = arr.shape[:2]
        grid = q(arr)["image_grid_thw"][0]
        assert int(grid.prod()) == hf_qwen.get_number_of_image_patches(h, w)
        assert q.num_tokens(grid) == int(grid.prod()) // 4


def test_augmentation_is_determined_by_rng():
    jpg = _jpeg(PHOTOS["coffee"])
    tr = image_preset("clip", train=True, hue=0.05)
    a = [tr(jpg, np_rng(7, e, i)) for e in range(2) for i in range(3)]
    b = [tr(jpg, np_rng(7, e, i)) for e in range(2) for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({x.sum().item() for x in a}) == len(a)       # different (epoch, index) → different views
    v = VideoPreprocessor(max_frames=4, sampling="random", images=image_preset("clip", train=True))
    vid = np.stack([PHOTOS["astronaut"]] * 12)
    assert torch.equal(v(vid, np_rng(1, 0, 3)), v(vid, np_rng(1, 0, 3)))


@pytest.mark.parametrize("make", [
    lambda: bomb_png(60_000, 60_000),
    lambda: _jpeg(PHOTOS["coffee"])[:5000],
    lambda: _jpeg(PHOTOS["coffee"])[:200],
    lambda: b"\xff\xd8\xff" + b"\x00" * 100,
])
@pytest.mark.parametrize("pre", [lambda: image_preset("clip"), lambda: image_preset("clip", train=True),
                                 lambda: Qwen2VLPatcher(), lambda: Qwen2VLPatcher(draft=True)])
def test_bad_images_raise_bad_record(make, pre):
    with pytest.raises(BadRecordError):
        pre()(make(), np_rng(0))


def test_bomb_is_rejected_before_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr(Image.Image, "load", lambda self: calls.append(1))
    with pytest.raises(BadRecordError, match="decompression bomb"):
        image_preset("clip")(bomb_png(30_000, 30_000))
    assert not calls


# ---- text and the multimodal preprocessor -------------------------------------------------------
from mmlit.multimodal import build_preprocessor  # noqa: E402
from mmlit.text import IMAGE_PAD, encode_chat  # noqa: E402


_turns = st.lists(st.tuples(st.integers(0, 2), st.text("abc xyz.?", min_size=1, max_size=30),
                            st.text("abc xyz.", min_size=1, max_size=30)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(turns=_turns, counts_seed=st.integers(0, 10**6), max_length=st.integers(1, 400),
       template=st.sampled_from(["chatml", "plain"]))
def test_truncation_never_splits_an_image_run(tok, turns, counts_seed, max_length, template):
    msgs = []
    for n_img, q, a in turns:
        msgs += [{"role": "user", "content": "<image>" * n_img + q}, {"role": "assistant", "content": a}]
    n = sum(t[0] for t in turns)
    counts = np.random.default_rng(counts_seed).integers(1, 40, n).tolist()
    full = encode_chat(tok, msgs, counts, chat_template=template)
    try:
        out = encode_chat(tok, msgs, counts, max_length=max_length, chat_template=template)
    except BadRecordError:
        return
    L = len(out["input_ids"])
    assert L <= max_length or L == len(full["input_ids"]) <= max_length
    assert torch.equal(out["input_ids"], full["input_ids"][:L]) and torch.equal(out["labels"], full["labels"][:L])
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    k = out["num_images"]
    assert int((out["input_ids"] == pad).sum()) == sum(counts[:k])          # every kept image whole
    for i in range(k):
        idx = out["image_input_idx"][i]
        idx = idx[idx >= 0]
        assert len(idx) == counts[i] and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + counts[i]))
        assert (out["input_ids"][idx] == pad).all()
    assert (out["labels"] != -100).any()                                    # ends on a trained reply


def test_eos_is_trained_when_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = encode_chat(tok, msgs, chat_template="plain")
    assert (out["labels"] == tok.eos_token_id).sum() == 1


def _record(images, text, index=0):
    return {"text": text, "image": [Image.open(io.BytesIO(b)) for b in images], "negatives": [], "task": "caption",
            "messages": None, "meta": {"source": "t", "file": "t.parquet", "index": index, "unit": "row"}}


@pytest.mark.parametrize("name", ["clip", "qwen2_vl", "molmo"])
def test_preprocessors_are_deterministic_by_rng(tok, name):
    pre = build_preprocessor(name, tok, train=True, **({"image_max_patches": 128} if name == "qwen2_vl" else {}))
    jpgs = [_jpeg(PHOTOS["coffee"])] if name == "clip" else [_jpeg(PHOTOS["coffee"]), _jpeg(PHOTOS["rocket"])]
    a = pre(_record(jpgs, "A photo."), np_rng(3, 1, 4))
    b = pre(_record(jpgs, "A photo."), np_rng(3, 1, 4))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor): assert torch.equal(a[k], b[k]), k
    assert a["input_ids"].dtype == torch.int64 and a["labels"].shape == a["input_ids"].shape


def test_qwen_preprocessor_matches_hf_pixels(tok, hf_qwen):
    jpgs = [_jpeg(PHOTOS["chelsea_portrait"]), _jpeg(PHOTOS["hubble"])]
    out = build_preprocessor("qwen2_vl", tok)(_record(jpgs, "Two photos."))
    ref = hf_qwen(images=[Image.open(io.BytesIO(j)) for j in jpgs], return_tensors="pt")
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert (out["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-4
    assert int(out["mm_token_type_ids"].sum()) == int(ref["image_grid_thw"].prod(1).sum()) // 4


def test_bad_image_in_a_record_names_the_row(tok):
    pre = build_preprocessor("qwen2_vl", tok)
    with pytest.raises(BadRecordError, match=r"\[t\] t.parquet row 12: .*decompression bomb"):
        pre({**_record([], "x", 12), "image": bomb_png(70_000, 70_000)})
    with pytest.raises(BadRecordError, match="row 5: cannot decode image"):
        pre(_record([_jpeg(PHOTOS["coffee"])[:3000]], "x", 5))
