"""One name per concept: an earlier name fails like any other wrong name, with no second spelling accepted."""
import io

import pytest
import torch
from PIL import Image

from mmlit.collate import Padding, TextCollator
from mmlit.core import ConfigError
from mmlit.images import check_image_size, open_image
from mmlit.packing import PackedRows, PackingCollator, pack_rows
from mmlit.preprocess import ImagePreprocessor, Qwen2VLPatcher, image_preset, pad_to_square
from mmlit.text import LMWindows


def _png() -> bytes:
    b = io.BytesIO(); Image.new("RGB", (20, 10)).save(b, "PNG"); return b.getvalue()


_S = [{"input_ids": torch.arange(1, 4)}]
OLD_KEYWORDS = {
    "max_len/Padding": lambda: Padding("max_length", max_len=12),
    "max_len/TextCollator": lambda: TextCollator(pad_token_id=0, pad_mode="max_length", max_len=6),
    "max_tokens/PackingCollator": lambda: PackingCollator(pad_token_id=0, max_tokens=8),
    "max_tokens/PackedRows": lambda: PackedRows(_S, [3], max_tokens=8),
    "budget/pack_rows": lambda: pack_rows([3, 5], budget=8),
    "seq_len/LMWindows": lambda: LMWindows(torch.arange(20), seq_len=4),
    "max_pixels/open_image": lambda: open_image(_png(), max_pixels=100),
    "max_pixels/check_image_size": lambda: check_image_size(Image.open(io.BytesIO(_png())), max_pixels=100),
    "max_pixels/pad_to_square": lambda: pad_to_square(Image.new("RGB", (30, 3)), max_pixels=100),
    "norm/ImagePreprocessor": lambda: ImagePreprocessor(size=8, norm="half"),
    "norm/Qwen2VLPatcher": lambda: Qwen2VLPatcher(norm="imagenet"),
    "norm/image_preset": lambda: image_preset("clip", size=8, norm="half"),
}


@pytest.mark.parametrize("name", OLD_KEYWORDS)
def test_old_keyword_is_an_unexpected_keyword(name):
    old = name.split("/")[0]
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
        OLD_KEYWORDS[name]()


def test_old_pad_mode_is_an_unknown_mode():
    with pytest.raises(ConfigError, match="pad mode must be 'batch_max', 'max_length' or 'to_N', got 'max_len'"):
        Padding("max_len", max_length=8)


@pytest.mark.parametrize("key", ["collator", "collator_options"])
def test_old_loader_config_key_is_an_unknown_key(key, tmp_path):
    from mmlit.loader import build_loader
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one paragraph\n\nanother paragraph")
    cfg = dict(data=str(corpus), task="lm", max_length=16, tokenizer=dict(train=dict(vocab_size=300, min_frequency=1)))
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\) \['{key}'\]; known: \[.*'collate_options'"):
        build_loader({**cfg, key: "causal_lm" if key == "collator" else {}})
