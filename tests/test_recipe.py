"""`mmlit.recipe` and `mmlit train`: one YAML builds and trains a whole run and writes the run directory the contract
names; bad data paths are refused before anything is written."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmlit.core import ConfigError
from mmlit.demo import build_demo_parquet
from mmlit.recipe import RunConfig, build_run, split_by_group

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    path = build_demo_parquet(d / "demo.parquet", n=96, image_size=32)[0]
    return split_by_group(path, "digit_index", 0.25, d / "split")


def _config(run_dir, pairs) -> dict:
    train, val = pairs
    return {"run_dir": str(run_dir), "threads": 1,
            "data": {"data": str(train), "val_data": str(val), "preprocessor": "clip",
                     "preprocessor_options": {"size": 32, "uint8": True}, "max_length": 32,
                     "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(Path(run_dir) / "tokenizer")},
                     "loader": {"batch_size": 16}},
            "model": {"kind": "dual_encoder", "preset": "tiny", "options": {"embed_dim": 64, "mrl_dims": [64, 32]}},
            "schedule": {"max_steps": 3}, "eval": {"metric": "val/zeroshot_acc", "mode": "max"},
            "zero_shot": "digits", "label_column": "label", "log": {"progress": False}}


def test_mmlit_train_writes_the_run_directory(tmp_path, pairs):
    run_dir = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(run_dir, pairs)))
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "train", str(cfg)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out zero-shot digit accuracy" in p.stdout and "label-aware" in p.stdout
    for f in ("config.yaml", "metrics.csv", "metrics.jsonl", "loader_report.json", "loader_profile.json",
              "eval_embeddings.npz", "summary.json", "checkpoints"):
        assert (run_dir / f).exists(), f
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for k in ("train/loss", "train/loss_clip", "train/loss_mrl", "train/lr", "train/step", "train/epoch", "val/loss",
              "val/loss_clip", "val/loss_mrl", "val/i2t_r1", "val/t2i_r10", "val/i2t_r1@32", "val/zeroshot_acc", "val/hardneg_acc"):
        assert k in header, k
    emb = np.load(run_dir / "eval_embeddings.npz")
    n = len(emb["label"])
    assert emb["image"].shape == (n, 64) and emb["text"].shape == (n, 64) and emb["caption"].shape == (n,)
    np.testing.assert_allclose(np.linalg.norm(emb["image"], axis=1), 1, rtol=1e-5)
    assert (emb["label"] >= 0).all()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["loader"]["seed"] == 0 and resolved["optim"]["betas"] == [0.9, 0.95]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    # the same command again: resumed, nothing left to train
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "train", str(cfg)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("step-00000003")


def test_missing_data_path_names_the_key_and_writes_nothing(tmp_path, pairs):
    cfg = _config(tmp_path / "run", pairs)
    cfg["data"]["val_data"] = str(tmp_path / "nope.parquet")
    with pytest.raises(ConfigError, match="data.val_data: .*nope.parquet does not exist"): build_run(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_and_mistyped_keys_name_the_field(tmp_path, pairs):
    cfg = _config(tmp_path / "run", pairs)
    with pytest.raises(ConfigError, match="model.options.*embed_dims"):
        build_run({**cfg, "model": {"kind": "dual_encoder", "preset": "tiny", "options": {"embed_dims": 3}}})
    with pytest.raises(ConfigError, match="schedule.max_steps: expected int"):
        build_run({**cfg, "schedule": {"max_steps": "3"}})
    with pytest.raises(ConfigError, match="data: unknown config key"):
        build_run({**cfg, "data": {**cfg["data"], "batchsize": 3}})
    assert not (tmp_path / "run").exists()


def test_lm_task_validation_loss_falls(tmp_path):
    from mmlit.demo import corpus_documents
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:80]) + "\n")
    run = build_run({"run_dir": str(tmp_path / "lm"), "threads": 1, "log": {"progress": False},
                     "data": {"data": str(corpus), "task": "lm", "max_length": 64, "val_split": 0.1,
                              "tokenizer": {"train": {"vocab_size": 400}}, "loader": {"batch_size": 16}},
                     "model": {"kind": "causal_lm", "preset": "tiny"}, "optim": {"lr": 3e-3},
                     "schedule": {"max_steps": 40}, "eval": {"every": 20}})
    run.fit()
    ev = [r for r in run.trainer.history if "val/loss" in r]
    assert [r["train/step"] for r in ev] == [20, 40]
    assert ev[-1]["val/loss"] < ev[0]["val/loss"] and ev[-1]["val/perplexity"] < ev[0]["val/perplexity"]
