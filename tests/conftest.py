"""Test-wide settings (nothing reaches the network or a screen) and the fixtures several test files share."""
import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    "mmlit's byte-level BPE tokenizer (2,000 tokens) trained offline on the stdlib's pydoc topics, loaded from its folder as a user would."
    import pydoc_data.topics
    from transformers import AutoTokenizer
    from mmlit.text import train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(list(pydoc_data.topics.topics.values()), vocab_size=2000, save_dir=d)
    return AutoTokenizer.from_pretrained(d)


TINY_IMAGES = dict(size=32, uint8=True, flip=0.0, jitter=0.0)


def tiny_encoder_config(run_dir, train, val, steps: int = 2) -> dict:
    "A tiny dual encoder run on 32-px demo pairs (batches of 16, `steps` steps): the encoder an aligner starts from in the tests."
    from pathlib import Path
    return {"run_dir": str(run_dir), "threads": 1, "log": {"progress": False},
            "data": {"data": str(train), "val_data": str(val), "preprocessor": "clip", "preprocessor_options": TINY_IMAGES,
                     "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(Path(run_dir) / "tokenizer")},
                     "max_length": 32, "loader": {"batch_size": 16}},
            "model": {"kind": "dual_encoder", "preset": "tiny"}, "schedule": {"max_steps": steps},
            "eval": {"at_epoch_end": False}}


@pytest.fixture(scope="session")
def dual_encoder_run(tmp_path_factory):
    "96 demo pairs split by handwriting, and a dual encoder trained on them for 2 steps: the run directory an aligner starts from."
    from mmlit.demo import build_demo_parquet
    from mmlit.recipe import build_run, split_by_group
    d = tmp_path_factory.mktemp("dual_encoder")
    train, val = split_by_group(build_demo_parquet(d / "demo.parquet", n=96, image_size=32)[0], "digit_index", 0.25, d / "split")
    build_run(tiny_encoder_config(d / "encoder", train, val)).fit()
    return dict(dir=d, run=d / "encoder", train=train, val=val)


def tiny_aligner_config(run_dir, train, val, encoder_run, steps: int = 8) -> dict:
    "An aligner run from `encoder_run` on 32-px demo pairs: 2 prefix tokens, a 32-wide language model, a checkpoint every 2 steps."
    from pathlib import Path
    return {"run_dir": str(run_dir), "threads": 1, "seed": 0, "log": {"progress": False},
            "data": {"data": str(train), "val_data": str(val), "preprocessor": "clip", "preprocessor_options": TINY_IMAGES,
                     "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(Path(run_dir) / "tokenizer")},
                     "max_length": 32, "loader": {"batch_size": 8, "num_workers": 0}},
            "model": {"kind": "aligner", "options": {"encoder_run": str(encoder_run), "prefix_tokens": 2,
                                                     "lm": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                                            "num_key_value_heads": 1}}},
            "optim": {"lr": 1e-3}, "schedule": {"max_steps": steps}, "checkpoint": {"every": 2, "keep": 10},
            "eval": {"at_epoch_end": False}}
