"""The demo's task scenes as a data source: the Parquet reader gives each record its conversation and the columns asked
for in `meta`, and the retrieval demo's training crops keep every caption's size and position words true."""
import numpy as np
import pytest

from mmlit.core import ConfigError, np_rng
from mmlit.demo import box_words, build_task_parquet, demo_row
from mmlit.multimodal import build_preprocessor
from mmlit.sources import open_source


def test_task_parquet_reads_conversations_and_meta_columns(tmp_path):
    path = build_task_parquet(tmp_path / "val.parquet", n=3, split="val")
    src = open_source(str(path), meta_columns=["target_boxes", "count"])
    recs = [src[i] for i in range(len(src))]
    assert [r["task"] for r in recs[:4]] == ["caption", "qa", "pointing", "counting"]
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"] == r["text"]
        assert 1 <= r["meta"]["count"] <= 4 and all(len(b) == 4 for b in r["meta"]["target_boxes"])
    with pytest.raises(ConfigError, match="no column 'boxez' \\(meta_columns\\)"): open_source(str(path), meta_columns=["boxez"])


def test_retrieval_crops_keep_caption_words(tok):
    "The demo's preprocessor options: the record's box (from `meta`) steers the crop, and every caption word stays true."
    from mmlit.preprocess import pil_to_chw
    opts = dict(size=48, uint8=True, flip=0.0, jitter=0.0, crop_scale=[0.5, 1.0], keep="box_words")   # as mmlit.recipe.demo_config
    pre = build_preprocessor("clip", tok, train=True, **opts)
    moved = 0
    for k in range(60):
        r = demo_row(k)
        rec = dict(image=r["image"], text=r["caption"], negatives=[], task="caption", meta=dict(box=r["box"]))
        out, (box,), _ = pre.images.fit_with_boxes(r["image"], np_rng(0, 0, k), [r["box"]])
        assert box_words(box, 48, 48) == dict(size=r["size"], position=r["position"])
        assert np.array_equal(pre(rec, np_rng(0, 0, k))["pixel_values"].numpy(), pil_to_chw(out).numpy())   # the same crop
        moved += not np.allclose(box, np.asarray(r["box"]) * 48 / 64)
    assert moved > 10                                           # crops were made, not only whole images
