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
