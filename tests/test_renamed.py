"""Old argument names that are still accepted, each with a DeprecationWarning naming the new one.

Remove a row here together with its `renamed_kwargs` alias once no branch calls the old name."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mmlit.collate import Padding, TextCollator
from mmlit.dataset import check_image_size, open_image
from mmlit.loader import _RENAMED_KEYS
from mmlit.packing import PackedRows, PackingCollator, pack_rows
from mmlit.preprocess import ImagePreprocessor, Qwen2VLPatcher, image_preset, pad_to_square
from mmlit.text import LMWindows


def _png(w=20, h=10) -> bytes:
    b = io.BytesIO(); Image.new("RGB", (w, h)).save(b, "PNG"); return b.getvalue()


def _old_and_new(call, old: dict, new: dict):
    "`call(**old)` warns once, naming the new name, and equals `call(**new)` (which does not warn)."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = call(**new)
        assert not w, [str(x.message) for x in w]
        b = call(**old)
    msgs = [str(x.message) for x in w if x.category is DeprecationWarning]
    assert len(msgs) == 1 and f"is renamed {next(iter(new))!r}" in msgs[0], msgs
    return a, b


def test_max_len_in_padding_and_collators():
    a, b = _old_and_new(lambda **k: Padding("max_length", **k), dict(max_len=12), dict(max_length=12))
    assert a == b
    s = [{"input_ids": torch.tensor([1, 2, 3])}]
    a, b = _old_and_new(lambda **k: TextCollator(pad_token_id=0, pad_mode="max_length", **k)(s)["input_ids"],
                        dict(max_len=6), dict(max_length=6))
    assert torch.equal(a, b) and a.shape == (1, 6)


def test_pad_mode_max_len_value():
    with pytest.warns(DeprecationWarning, match="'max_len' is renamed 'max_length'"):
        p = Padding("max_len", max_length=8)
    assert p.mode == "max_length" and p.length([3]) == 8


def test_packing_max_tokens_and_budget():
    s = [{"input_ids": torch.arange(1, 4)}, {"input_ids": torch.arange(1, 6)}]
    a, b = _old_and_new(lambda **k: PackingCollator(pad_token_id=0, **k)(s)["input_ids"], dict(max_tokens=8), dict(max_length=8))
    assert torch.equal(a, b)
    a, b = _old_and_new(lambda **k: pack_rows([3, 5, 4], **k), dict(budget=8), dict(max_length=8))
    assert a == b
    a, b = _old_and_new(lambda **k: PackedRows(s, [3, 5], **k).rows, dict(max_tokens=8), dict(max_length=8))
    assert a == b


def test_lm_windows_seq_len():
    a, b = _old_and_new(lambda **k: len(LMWindows(torch.arange(20), **k)), dict(seq_len=4), dict(max_length=4))
    assert a == b == 4


def test_bomb_limit_max_pixels_is_max_image_pixels():
    png = _png()
    with pytest.raises(Exception, match="over the limit of 100"):
        with pytest.warns(DeprecationWarning, match="'max_pixels' is renamed 'max_image_pixels'"):
            open_image(png, max_pixels=100)
    thin = Image.new("RGB", (300, 3))
    a, b = _old_and_new(lambda **k: pad_to_square(thin, **k).size, dict(max_pixels=100 * 100), dict(max_image_pixels=100 * 100))
    assert a == b == (100, 100)
    with pytest.warns(DeprecationWarning, match="max_image_pixels"):
        check_image_size(Image.open(io.BytesIO(png)), max_pixels=1000)


def test_norm_is_normalize():
    a, b = _old_and_new(lambda **k: ImagePreprocessor(size=8, **k).normalize, dict(norm="half"), dict(normalize="half"))
    assert a == b
    a, b = _old_and_new(lambda **k: Qwen2VLPatcher(**k).normalize, dict(norm="imagenet"), dict(normalize="imagenet"))
    assert a == b
    img = np.zeros((12, 12, 3), np.uint8)
    a, b = _old_and_new(lambda **k: image_preset("clip", size=8, **k)(Image.fromarray(img), None),
                        dict(norm="half"), dict(normalize="half"))
    assert torch.equal(a, b)


def test_loader_config_collator_keys(tmp_path):
    from mmlit.loader import build_loader
    assert _RENAMED_KEYS == {"collator": "collate", "collator_options": "collate_options"}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} says something about loaders and order" for i in range(40)))
    cfg = dict(data=str(corpus), task="lm", max_length=16, batch_size=4, tokenizer=dict(train=dict(vocab_size=300, min_frequency=1)))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        new = next(iter(build_loader({**cfg, "collate": "causal_lm", "collate_options": {"pad_to_multiple_of": 32}})))
        assert not [x for x in w if x.category is DeprecationWarning]
        old = next(iter(build_loader({**cfg, "collator": "causal_lm", "collator_options": {"pad_to_multiple_of": 32}})))
    msgs = sorted(str(x.message) for x in w if x.category is DeprecationWarning)
    assert msgs == ["loader config: 'collator' is renamed 'collate'; the old name will be removed",
                    "loader config: 'collator_options' is renamed 'collate_options'; the old name will be removed"]
    assert new["input_ids"].shape == (4, 32) and torch.equal(new["input_ids"], old["input_ids"])
