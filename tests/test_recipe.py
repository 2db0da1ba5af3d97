"""`mmlit.recipe` and `mmlit train`: one YAML builds and trains a whole run and writes the run directory the contract
names; bad data paths are refused before anything is written; the same run as a two-process gloo DDP job evaluates
as one process does."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from torchrun_helpers import launch, torchrun, wait_all
import yaml

from mmlit.core import ConfigError
from mmlit.demo import build_demo_parquet
from mmlit.recipe import RunConfig, build_run, split_by_group

ROOT = Path(__file__).parent.parent
JOB = str(Path(__file__).parent / "recipe_job.py")


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


def test_ctrl_c_with_a_loader_worker_saves_and_exits(tmp_path, pairs):
    "SIGINT to the whole process group (a terminal's Ctrl-C, loader worker included): a checkpoint and status 130."
    import os, signal, time
    cfg = _config(tmp_path / "run", pairs)
    cfg["data"]["loader"].update(batch_size=8, num_workers=1)
    cfg["schedule"] = {"max_steps": 500}
    cfg["eval"] = {"at_epoch_end": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "mmlit.cli", "train", str(tmp_path / "c.yaml")], start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mj, t0 = tmp_path / "run" / "metrics.jsonl", time.time()
    while not (mj.exists() and len(mj.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() - t0 < 300, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    steps = [json.loads(l)["train/step"] for l in mj.read_text().splitlines()]
    ck = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ck and ck[-1].name == f"step-{steps[-1]:08d}" and steps[-1] < 500


@pytest.fixture(scope="module")
def odd_pairs(pairs, tmp_path_factory):
    "`pairs` with one validation row fewer: an odd count, so a two-rank evaluation pads its last step."
    import pyarrow.parquet as pq
    train, val = pairs
    table = pq.read_table(val)
    assert len(table) % 2 == 0
    odd = tmp_path_factory.mktemp("odd") / "val.parquet"
    pq.write_table(table.slice(0, len(table) - 1), odd)
    return train, odd


def test_fsdp_run_exports_one_model(tmp_path, odd_pairs):
    """`mmlit train` under FSDP (2 gloo ranks): the run finishes (every rank takes part in the final embedding pass), and
    `mmlit export` gathers its sharded checkpoint into a folder whose `from_pretrained` model gives the run's embeddings."""
    import torch
    from mmlit.checkpoint import read_manifest
    from mmlit.cli import main
    from mmlit.model import DualEncoder
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    cfg = _config(run_dir, odd_pairs)
    cfg["data"]["loader"]["batch_size"] = 8
    cfg["schedule"] = {"max_steps": 4}
    cfg["distributed"] = {"strategy": "fsdp"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(JOB, tmp_path / "c.yaml", out, timeout=300)
    final = run_dir / "checkpoints" / "step-00000004"
    assert read_manifest(final)["format"] == 2                                   # sharded
    assert main(["export", str(run_dir), str(tmp_path / "exported")]) == 0
    model = DualEncoder.from_pretrained(tmp_path / "exported").eval()
    trained = torch.load(out / "rank0.pt", weights_only=True)
    mine = model.state_dict()
    assert set(trained) == set(mine), (set(trained) ^ set(mine))
    assert all(torch.equal(v, trained[k].reshape(v.shape)) for k, v in mine.items())     # the run's scalars were 1-vectors
    batch, npz = torch.load(out / "val_batch.pt", weights_only=True), np.load(run_dir / "eval_embeddings.npz")
    with torch.no_grad(): got = model(**batch, return_loss=False)
    n = len(got.image_embeds)
    np.testing.assert_allclose(got.image_embeds.numpy(), npz["image"][:n], atol=1e-5)
    np.testing.assert_allclose(got.text_embeds.numpy(), npz["text"][:n], atol=1e-5)


def test_fsdp_composes_with_lora_checkpointing_and_accumulation(tmp_path, odd_pairs):
    """FSDP with LoRA adapters, gradient checkpointing and 2 micro-batches a step (2 gloo ranks) trains as DDP with the same
    parts does: the same losses and final weights (rel 1e-5), only the adapters and heads changed, and `mmlit export`
    folds the adapters into one model that `from_pretrained` loads."""
    import torch
    from mmlit.cli import main
    from mmlit.model import DualEncoder
    runs = {}
    for strategy in ("fsdp", "ddp"):
        cfg = _config(tmp_path / strategy / "run", odd_pairs)
        cfg["data"]["loader"]["batch_size"] = 4
        cfg["schedule"] = {"max_steps": 3, "accumulate": 2}
        cfg["gradient_checkpointing"] = True
        cfg["model"]["options"].update(                 # towers of transformer blocks: what FSDP wraps and LoRA adapts
            vision={"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 64},
            text={"model_type": "bert", "vocab_size": 1024, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64, "max_position_embeddings": 64},
            vision_pooling="cls", text_pooling="mean")
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}
        cfg["distributed"] = {"strategy": strategy}
        (tmp_path / strategy / "out").mkdir(parents=True)
        (tmp_path / f"{strategy}.yaml").write_text(yaml.safe_dump(cfg))
        runs[strategy] = launch(JOB, tmp_path / f"{strategy}.yaml", tmp_path / strategy / "out")
    wait_all(list(runs.values()), timeout=400)
    rows = {s: [json.loads(l) for l in (tmp_path / s / "run" / "metrics.jsonl").read_text().splitlines()] for s in runs}
    loss = {s: [r["train/loss"] for r in rows[s] if "train/loss" in r] for s in runs}
    assert len(loss["fsdp"]) == 3 and loss["fsdp"] == pytest.approx(loss["ddp"], rel=1e-5)
    f, d = (torch.load(tmp_path / s / "out" / "rank0.pt", weights_only=True) for s in ("fsdp", "ddp"))
    d = {k.removeprefix("module."): v for k, v in d.items()}
    assert f.keys() == d.keys() and any("lora_" in k for k in f)
    for k in f: torch.testing.assert_close(f[k].reshape(d[k].shape), d[k], rtol=1e-5, atol=1e-6)
    assert main(["export", str(tmp_path / "fsdp" / "run"), str(tmp_path / "exported")]) == 0
    model = DualEncoder.from_pretrained(tmp_path / "exported")
    assert not any("lora_" in k for k in model.state_dict())                    # the adapters were merged into the weights


def test_ddp_run_evaluates_as_one_process(tmp_path, odd_pairs):
    """`build_run` under `torchrun --nproc_per_node 2` (gloo): both ranks finish with the same tokenizer and weights, and the
    zero-shot accuracy, hard-negative accuracy and recalls rank 0 logs are those one process computes from the final weights."""
    import torch
    from mmlit.recipe import labels_in_gather_order
    from mmlit.datamodule import load_tokenizer
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    cfg = _config(run_dir, odd_pairs)
    cfg["data"]["loader"]["batch_size"] = 8
    cfg["schedule"] = {"max_steps": 4}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    torchrun(JOB, tmp_path / "c.yaml", out, timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["steps"]) for r in ranks] == [(2, 4), (2, 4)]
    saved = load_tokenizer(str(run_dir / "tokenizer")).get_vocab()          # rank 0 trained and saved it
    assert ranks[0]["vocab"] == saved and ranks[1]["vocab"] == saved
    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "val/zeroshot_acc" in r][-1]
    assert logged["train/step"] == 4
    # one process, the same config: resumes the DDP run's final checkpoint (nothing left to train) and evaluates it
    run = build_run(cfg)
    r = run.fit()
    assert r.resumed_from.endswith("step-00000004") and r.steps == 4
    assert all(torch.equal(v, w0[k]) for k, v in run.model.state_dict().items())
    assert run.trainer.val_loader.world_size == 1
    assert labels_in_gather_order(run.val_labels, run.trainer.val_loader) is run.val_labels
    single = {f"val/{k}": v for k, v in run.trainer.evaluate().items()}
    # the losses are not compared: a contrastive validation loss depends on which pairs share a batch (two ranks
    # gather theirs into one global batch); every retrieval and accuracy figure is over the whole validation set
    keys = sorted(k for k in single if "loss" not in k)
    assert "val/zeroshot_acc" in keys and "val/i2t_r1" in keys and "val/t2i_r5_label@32" in keys and "val/hardneg_acc" in keys
    assert {k: logged[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, rel=1e-6, abs=1e-6)
    # finish_run on rank 0, as `mmlit train` does: every validation pair's embedding beside its own label
    from mmlit.recipe import eval_embeddings
    assert json.loads((run_dir / "summary.json").read_text())["val_pairs"] == len(run.val_labels)
    ddp, one = np.load(run_dir / "eval_embeddings.npz"), eval_embeddings(run)
    assert len(ddp["label"]) == len(run.val_labels)
    np.testing.assert_array_equal(ddp["label"], one["label"]); np.testing.assert_array_equal(ddp["caption"], one["caption"])
    np.testing.assert_allclose(ddp["image"], one["image"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddp["text"], one["text"], rtol=1e-5, atol=1e-6)


def test_eval_max_batches_scores_the_labels_of_those_batches(tmp_path, pairs):
    "`eval.max_batches` with `label_column`: the labels of the batches evaluated, not the whole column."
    cfg = _config(tmp_path / "run", pairs)
    cfg["schedule"], cfg["eval"] = {"max_steps": 1}, {"metric": "val/zeroshot_acc", "mode": "max", "max_batches": 1}
    r = build_run(cfg).fit()
    assert 0 <= r.last_eval["val/zeroshot_acc"] <= 1 and "val/i2t_r1_label" in r.last_eval
