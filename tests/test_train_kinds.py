"""Every model kind the recipe trains (`mmlit.kinds.MODEL_KINDS`): `mmlit config KIND` prints a config that reads back
as the recipe's typed config and that `mmlit train` runs; gradient checkpointing gives the loss and gradients of the
step without it and really recomputes; bf16 autocast on CPU trains each kind close to fp32 and resumes bit for bit."""
import contextlib, copy, io, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mmlit.cli import main
from mmlit.core import ConfigError, config_from_dict, config_to_dict
from mmlit.demo import build_demo_parquet, corpus_documents
from mmlit.recipe import RunConfig, build_run, example_config, split_by_group
from mmlit.kinds import MODEL_KINDS, ModelSpec, build_model
from mmlit.step import enable_gradient_checkpointing, load_config

ROOT = Path(__file__).resolve().parents[1]
KINDS = list(MODEL_KINDS)   # the aligner starts from a trained dual encoder: conftest.dual_encoder_run


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(*argv) -> tuple[int, str, str]:
    "`main(argv)` in-process: exit status, stdout, stderr."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_kinds_are_known():
    assert KINDS[:3] == ["dual_encoder", "causal_lm", "qwen2vl_embedder"]
    with pytest.raises(ConfigError, match="model.kind: unknown model kind 'clip'"): config_from_dict(RunConfig, {"model": {"kind": "clip"}})


# ------------------------------------------------------------------ mmlit config KIND -> mmlit train
@pytest.mark.parametrize("kind", KINDS)
def test_printed_example_trains(tmp_path, kind, request):
    "Print, write, read back as `RunConfig` (as printed), then `mmlit train` it in a new process with 2 steps."
    run_dir = tmp_path / "run"
    rc, text, err = cli("config", kind, "--run-dir", run_dir)
    assert rc == 0, err
    assert text.startswith(f"# mmlit train config: {kind}") and sum("# " in l for l in text.splitlines()[4:]) >= 30   # commented
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(RunConfig, printed) == example_config(kind, run_dir)         # unknown keys would be errors here
    small = yaml.safe_load(text)
    small["schedule"] = {**small["schedule"], "max_steps": 2}                       # a few steps of the printed run
    small["eval"] = {**small["eval"], "every": None, "max_batches": 2}
    small["data"]["loader"] = {**small["data"]["loader"], "num_workers": 0}
    if kind == "aligner": small["model"]["options"]["encoder_run"] = str(encoder_run(kind, request))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "train", "a.yaml", "--no-progress"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0
    assert np.isfinite(summary["metrics"]["val/loss"])
    if MODEL_KINDS.get(kind).retrieval:
        assert "held-out zero-shot digit accuracy" in p.stdout
        assert {"val/i2t_r1", "val/t2i_r5", "val/zeroshot_acc", "val/i2t_r1_label"} <= set(summary["metrics"])
        emb = np.load(run_dir / "eval_embeddings.npz")
        assert emb["image"].shape == emb["text"].shape and len(emb["caption"]) == len(emb["label"]) > 0
        import pyarrow.parquet as pq
        captions = pq.read_table(small["data"]["val_data"], columns=["caption"])["caption"].to_pylist()
        assert list(emb["caption"]) == captions[:len(emb["caption"])]            # each pair's caption (a chat's: its answer)
    else:
        assert "perplexity" in p.stdout and "val/perplexity" in summary["metrics"]


# ------------------------------------------------------------------ small runs of each kind
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, val = split_by_group(build_demo_parquet(d / "demo.parquet", n=96, image_size=64)[0], "digit_index", 0.25, d / "split")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()[:40]) + "\n")
    return {"train": str(train), "val": str(val), "corpus": str(corpus)}


def encoder_run(kind: str, request):
    "The aligner's `model.options.encoder_run`: the session's tiny dual encoder run (built on first use); None for other kinds."
    return request.getfixturevalue("dual_encoder_run")["run"] if kind == "aligner" else None


def small_config(kind: str, run_dir, data: dict, encoder_run=None, **over) -> dict:
    "The kind's example run (its tokenizer, lengths, model) on a small copy of the demo data, batches of 8, 4 steps."
    c = config_to_dict(example_config(kind, run_dir))
    if encoder_run is not None: c["model"]["options"]["encoder_run"] = str(encoder_run)
    d = c["data"]
    for k, v in (("data", data["corpus"] if kind == "causal_lm" else data["train"]), ("val_data", data["val"])):
        if k in d: d[k] = v
    d["loader"] = {"batch_size": 8}
    c.update(threads=1, log={"progress": False}, eval={**c["eval"], "every": None, "max_batches": 1},
             schedule={"max_steps": 4, "warmup_ratio": 0.0}, checkpoint={"every": 1, "keep": 4})
    return {**c, **over}


def _batch(run) -> dict:
    return next(iter(run.data.train_dataloader()))


# ------------------------------------------------------------------ gradient checkpointing
def _blocks(model: nn.Module) -> list[str]:
    "The names of the checkpointed blocks (a Hugging Face layer or a ModuleList item)."
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True and isinstance(m, GradientCheckpointingLayer)
            or "forward" in vars(m)]


def _block_leaves(model: nn.Module) -> list[str]:
    "The name of the first Linear / Conv2d inside each checkpointed block."
    return [next(f"{b}.{n}" for n, m in model.get_submodule(b).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
            for b in _blocks(model)]


def _count_calls(model: nn.Module, names: list[str]) -> dict:
    "A forward-call counter on each named module."
    counts = dict.fromkeys(names, 0)
    for n in names: model.get_submodule(n).register_forward_hook(lambda *_, n=n: counts.__setitem__(n, counts[n] + 1))
    return counts


def _step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    "Loss and gradients of one training step from a fixed seed."
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    if hasattr(model, "set_step"): model.set_step(0, 0)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_same_step_recomputed(tmp_path, small_data, kind, request):
    "Every kind: the same loss, gradients and buffers with checkpointing, and each checkpointed block runs twice a step."
    run = build_run(small_config(kind, tmp_path / "run", small_data, encoder_run(kind, request)))
    batch = _batch(run)
    plain = run.model
    if kind == "dual_encoder": plain = build_model(ModelSpec(kind, options={"text": {**config_to_dict(plain.config)["text"], "num_hidden_layers": 1}}),
                                                   run.tokenizer)          # a text tower with a layer to checkpoint
    ckpt = copy.deepcopy(plain)
    names = enable_gradient_checkpointing(ckpt)
    assert names, kind
    leaves = _block_leaves(ckpt)
    assert leaves and _block_leaves(plain) == [], f"{kind}: no checkpointed block"
    calls, calls_c = _count_calls(plain, leaves), _count_calls(ckpt, leaves)
    loss, grads = _step(plain, batch)
    loss_c, grads_c = _step(ckpt, batch)
    frozen = {leaf for b, leaf in zip(_blocks(ckpt), leaves)                # blocks with nothing to train: the aligner's encoder, the vlm's
              if not any(p.requires_grad for p in ckpt.get_submodule(b).parameters())}
    locked = kind == "aligner" or bool(run.config.model.freeze)       # example's warmed vision tower: at the input end, no backward through it
    assert len(frozen) < len(leaves) and locked == bool(frozen), frozen
    # A frozen part (the aligner's encoder, the vlm's warmed tower) runs once: nothing in it needs a gradient, so the
    # backward pass never reaches it; every trainable block is recomputed.
    assert min(calls.values()) >= 1 and calls_c == {n: c * (1 if n in frozen else 2) for n, c in calls.items()}, (calls, calls_c)
    before, before_c = dict(calls), dict(calls_c)
    with torch.no_grad(): plain.eval()(**batch); ckpt.eval()(**batch)
    assert {n: calls_c[n] - before_c[n] for n in leaves} == {n: calls[n] - before[n] for n in leaves}   # evaluation: no recompute
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-7)
    assert grads_c.keys() == grads.keys()
    for k in grads: torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{kind} {k}: {m}")
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()): assert torch.equal(a, b), k   # BatchNorm statistics too


def test_gradient_checkpointing_from_the_config(tmp_path, small_data):
    "`gradient_checkpointing: true` in a run config: the trainer checkpoints the model and trains the same steps."
    a = build_run(small_config("qwen2vl_embedder", tmp_path / "a", small_data))
    b = build_run(small_config("qwen2vl_embedder", tmp_path / "b", small_data, gradient_checkpointing=True))
    assert a.trainer.checkpointed == [] and b.trainer.checkpointed == ["backbone"]
    ra, rb = a.fit(), b.fit()
    loss = lambda run: [r["train/loss"] for r in run.trainer.history if "train/loss" in r]
    assert rb.steps == 4 and loss(b) == pytest.approx(loss(a), rel=1e-5)


# ------------------------------------------------------------------ bf16 on CPU
BF16_REL = 2e-2          # bf16 keeps 8 significant bits: the loss of each of 4 steps within 2% of fp32's


def _losses(run_dir) -> list[float]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_on_cpu_trains_close_to_fp32_and_resumes_exactly(tmp_path, small_data, kind, request):
    fp32 = build_run(small_config(kind, tmp_path / "fp32", small_data, encoder_run(kind, request), precision="fp32"))
    fp32.fit()
    bf16 = build_run(small_config(kind, tmp_path / "bf16", small_data, encoder_run(kind, request), precision="bf16"))
    assert bf16.trainer.device.type == "cpu" and bf16.trainer.precision == "bf16"
    bf16.fit()
    ref, got = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(got) == 4 and all(np.isfinite(got)), got
    assert got == pytest.approx(ref, rel=BF16_REL), (got, ref)
    assert got != ref                                                       # bf16 did run: not fp32's figures bit for bit
    assert all(np.isfinite(v) for k, v in bf16.trainer.last_eval.items()), bf16.trainer.last_eval
    # stopped after 2 steps, then resumed in a new build: the uninterrupted bf16 run, bit for bit
    cfg = small_config(kind, tmp_path / "resumed", small_data, encoder_run(kind, request), precision="bf16")
    r = build_run(cfg).fit(steps=2)
    assert r.steps == 2 and r.interrupted
    again = build_run(cfg)
    r = again.fit()
    assert r.resumed_from.endswith("step-00000002") and r.steps == 4
    assert _losses(tmp_path / "resumed") == got
    want = bf16.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.model.state_dict().items())
