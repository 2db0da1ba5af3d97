"""The `vlm` model kind: packed and padded rows give the same loss on the same samples, and a run killed with SIGKILL
mid-training resumes bit for bit (weights and the logged losses of the uninterrupted run), its vision tower warmed up
and its attention taught as the example config says."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import yaml

from mmlit.causal_lm import CausalLM
from mmlit.checkpoint import CheckpointManager
from mmlit.collate import Qwen2VLCollator
from mmlit.core import config_to_dict
from mmlit.demo import build_task_parquet, scene_records, scene_row
from mmlit.multimodal import build_preprocessor
from mmlit.packing import PackingCollator
from mmlit.recipe import build_run, example_config
from mmlit.text import train_tokenizer
from mmlit.vlm import vlm_config, vlm_loss

ROOT = Path(__file__).resolve().parents[1]


def test_packed_and_padded_rows_give_the_same_loss():
    recs = [r for i in range(6) for r in scene_records(scene_row(i))]
    tok = train_tokenizer([m["content"] for r in recs for m in r["messages"]], vocab_size=300)
    pre = build_preprocessor("vlm", tok, min_pixels=112 * 112, max_pixels=112 * 112)
    samples = [pre(r) for r in recs]
    model = CausalLM(vlm_config(tok, text_config=dict(num_hidden_layers=1)), seed=0).eval()
    padded_batch = Qwen2VLCollator(tok)(samples)
    packed_batch = PackingCollator(tok, max_length=512)(samples)
    assert len(packed_batch["packed_samples"]) < len(samples)                # fewer rows than samples
    with torch.no_grad():
        padded, packed = float(vlm_loss(model, padded_batch)), float(vlm_loss(model, packed_batch))
    assert abs(packed - padded) < 1e-5, (packed, padded)
    with torch.no_grad():                     # the check can fail: a packed row whose positions run on is another loss
        pos = packed_batch["position_ids"].clone()
        pos[0] = torch.arange(pos.shape[-1]).expand_as(pos[0])
        pos[1:] = pos[0]
        assert abs(float(vlm_loss(model, {**packed_batch, "position_ids": pos})) - padded) > 1e-3


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _config(tmp_path: Path, run_dir: Path) -> dict:
    "The printed vlm example on 12 training / 4 validation scenes, batches of 8 packed, 12 steps, a checkpoint every 2."
    data = tmp_path / "data"
    if not (data / "val.parquet").is_file():
        build_task_parquet(data / "train.parquet", n=12, split="train")
        build_task_parquet(data / "val.parquet", n=4, split="val")
    c = config_to_dict(example_config("vlm", run_dir))
    c["data"].update(data=str(data / "train.parquet"), val_data=str(data / "val.parquet"),
                     tokenizer={"train": {"vocab_size": 300}, "save_dir": str(run_dir / "tokenizer")})
    c["data"]["loader"] = {**c["data"]["loader"], "batch_size": 8, "num_workers": 0}
    o = c["model"]["options"]                                           # the example's warm-ups, 3 steps each
    o["warm_vision"].update(data=str(data / "train.parquet"), steps=3, batch_size=4)
    o["teach_attention"].update(data=str(data / "train.parquet"), steps=3, batch_size=4)
    c.update(threads=1, log={"progress": False}, eval={**c["eval"], "every": None, "max_batches": 1},
             schedule={"max_steps": 12, "warmup_ratio": 0.0}, checkpoint={"every": 2, "keep": 2})
    return c


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    ref = build_run(_config(tmp_path, tmp_path / "ref"))
    assert ref.fit().steps == 12
    d = tmp_path / "run"
    d.mkdir()
    (d / "a.yaml").write_text(yaml.safe_dump(_config(tmp_path, d), sort_keys=False))
    p = subprocess.Popen([sys.executable, "-m", "mmlit.cli", "train", str(d / "a.yaml"), "--no-progress"], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cm, t0 = CheckpointManager(d / "checkpoints"), time.time()
    steps = lambda: [int(c.name.rsplit("-", 1)[-1]) for c in cm.steps()]
    while not any(s >= 4 for s in steps()):
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() - t0 < 600, "no checkpoint at step 4 within 10 minutes"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert 4 <= max(steps()) < 12                                      # killed mid-run
    run = build_run(_config(tmp_path, d))                                 # resume to the end in this process
    r = run.fit()
    assert r.resumed_from is not None and r.steps == 12
    a, b = ref.model.state_dict(), run.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = 12 - int(r.resumed_from.rsplit("-", 1)[-1])                   # the steps trained after the resume
    assert _losses(d)[-after:] == _losses(tmp_path / "ref")[-after:]      # logged bit for bit
    warm = json.loads((d / "vision_warmup" / "warm_vision.json").read_text())  # `mmlit train` warmed the tower up, as the example says
    assert warm["steps"] == 3 and warm["images"] == 12
    taught = json.loads((d / "attention_warmup" / "warm_attention.json").read_text())   # and taught its attention
    assert taught["steps"] == 3 and taught["records"] == 24                    # 12 pointing and 12 QA records
