"""The dual-encoder preprocessor's token cache is exact: the same batches (every tensor equal) with the
cache on and off, with 0 and 2 workers, with a cache too small to hold the texts, and across a resume."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ds_files import image_bytes, write_parquet
from mmlit.loader import make_loader, resolve_collate
from mmlit.datamodule import loader_parts

CAPTIONS = ["a red seven at the centre", "a blue two, small", "a green one on grey", "a large black nine", "a tiny white zero"]
N = 20


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    "A Parquet of 20 PNGs whose captions and hard negatives repeat (as the demo's do), and its loader parts."
    from mmlit.text import train_tokenizer
    d = tmp_path_factory.mktemp("token_cache")
    rng = np.random.default_rng(0)
    images = [image_bytes(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))) for _ in range(N)]
    captions = [CAPTIONS[i % 5] for i in range(N)]
    negatives = [[c for c in CAPTIONS if c != captions[i]][: 1 + i % 4] for i in range(N)]
    path = write_parquet(d / "pairs.parquet", captions, images, row_group_size=5, extra={"negatives": negatives})
    train_tokenizer(CAPTIONS * 4, vocab_size=300, min_frequency=1, save_dir=d / "tok")
    return loader_parts(dict(data=str(path), tokenizer=str(d / "tok"), preprocessor="clip", max_length=6,
                             preprocessor_options=dict(size=16, uint8=True), batch_size=4, seed=5, drop_last=False))


def loader(parts, cache_size: int | None, workers: int = 0):
    "The loader over `parts` with the preprocessor's cache of `cache_size` texts (0: off; None: its default)."
    transform = parts["transform"]
    pre = getattr(transform, "preprocessor", transform)
    if cache_size is not None: pre.cache_size = cache_size
    else: pre.cache_size = type(pre).cache_size
    pre.clear_cache()
    cfg = dataclasses.replace(parts["loader_config"], num_workers=workers, persistent_workers=None, prefetch_factor=None)
    return make_loader(parts["data"], cfg, transform=transform, collate=resolve_collate(parts["collate"], **parts["collate_options"]))


def batches(ld, epochs: int = 2, limit: int | None = None) -> list[dict]:
    "Batches until `epochs` epochs are done (or `limit` batches), continuing from the loader's state."
    out = []
    while ld.state_dict()["epoch"] < epochs:
        for b in ld:
            out.append(b)
            if limit is not None and len(out) == limit: return out
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    "Equal batches: the same keys, every tensor equal in dtype, shape and values, everything else equal."
    if len(a) != len(b): return False
    for x, y in zip(a, b):
        if x.keys() != y.keys(): return False
        for k in x:
            if torch.is_tensor(x[k]):
                if not (torch.is_tensor(y[k]) and x[k].dtype == y[k].dtype and torch.equal(x[k], y[k])): return False
            elif x[k] != y[k]: return False
    return True


@pytest.fixture(scope="module")
def reference(parts):
    return batches(loader(parts, 0))


def test_reference_has_negatives_and_repeats(reference):
    assert len(reference) == 10 and "negative_input_ids" in reference[0]
    assert not same(reference[:5], reference[5:])                       # epoch 1: another order and other crops


def test_cache_hits_and_stays_bounded(parts, reference, monkeypatch):
    import mmlit.multimodal as mm
    calls = []
    real = mm.encode_text
    monkeypatch.setattr(mm, "encode_text", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    got = batches(loader(parts, None))
    assert same(got, reference)
    assert sorted(set(calls)) == sorted(CAPTIONS) and len(calls) == len(CAPTIONS)   # each text tokenised once
    assert len(getattr(parts["transform"], "preprocessor", parts["transform"])._tokens) == len(CAPTIONS)


@pytest.mark.parametrize("cache_size,workers", [(None, 2), (2, 0)])   # 2: smaller than the 5 texts, entries evicted
def test_same_batches_with_the_cache(parts, reference, cache_size, workers):
    assert same(batches(loader(parts, cache_size, workers)), reference)


@pytest.mark.parametrize("cut,workers", [(3, 2), (7, 0)])             # mid-epoch 0 with workers, mid-epoch 1 without
def test_resume_with_the_cache(parts, reference, cut, workers):
    a = loader(parts, None, workers)
    got = batches(a, limit=cut)
    state = a.state_dict()
    b = loader(parts, None, workers)                                    # a fresh process's cache is empty
    b.load_state_dict(state)
    assert same(got + batches(b), reference)
