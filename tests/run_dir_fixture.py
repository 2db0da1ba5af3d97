"""A small real run directory, laid out as the trainer writes one, for the visualizer's tests and notebook.

Stages 1–4 are real (demo Parquet with two damaged rows, a trained tokenizer, the CLIP preprocessor,
the contrastive collator, the resumable loader and its profiler). The model is a deliberately tiny
dual encoder (a linear image tower, a bag-of-tokens text tower) trained for a few steps with a CLIP
loss plus a Matryoshka loss, so the curves, embeddings and recalls are real numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml

from mmlit.sources import ParquetImageText
from mmlit.demo import build_demo_parquet
from mmlit.loader import profile_loader
from mmlit.datamodule import build_data_module, load_tokenizer
from mmlit.viz import batch_digest
from mmlit.multimodal import build_preprocessor
from mmlit.recipe import record_data
from mmlit.text import train_tokenizer

DIMS = (8, 16, 32)          # Matryoshka dimensions; the top one is the embedding size
BAD_ROWS = {5: b"\x89PNG\r\n\x1a\n not really a png", 11: b""}   # a corrupt and an empty image
NO_CAPTION_ROW = 17                                                  # a good image without its caption


def damaged_demo(path: Path, n: int) -> Path:
    "The demo Parquet with the rows in `BAD_ROWS` given broken image bytes."
    p = build_demo_parquet(path, n=n, row_group_size=16)[0]
    t = pq.read_table(p)
    cells = t.column("image").to_pylist()
    for i, b in BAD_ROWS.items(): cells[i] = {"bytes": b, "path": None}
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(cells, type=t.schema.field("image").type))
    caps = t.column("caption").to_pylist(); caps[NO_CAPTION_ROW] = None
    t = t.set_column(t.schema.get_field_index("caption"), "caption", pa.array(caps, type=pa.string()))
    pq.write_table(t, p, row_group_size=16)
    return p


class TinyDualEncoder(torch.nn.Module):
    "Linear image tower on 8×8 pooled pixels, mean-of-embeddings text tower; unit-norm outputs."
    def __init__(self, vocab: int, dim: int = DIMS[-1]):
        super().__init__()
        self.image = torch.nn.Linear(3 * 8 * 8, dim)
        self.text = torch.nn.Embedding(vocab, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, pixel_values, dim=None):
        x = self.image(F.adaptive_avg_pool2d(pixel_values.float(), 8).flatten(1))
        return F.normalize(x[:, :dim], dim=-1)

    def encode_text(self, input_ids, attention_mask, dim=None):
        m = attention_mask[..., None].float()
        x = (self.text.weight[input_ids] * m).sum(1) / m.sum(1)
        return F.normalize(x[:, :dim], dim=-1)

    def losses(self, batch):
        "total, CLIP (top dim) and MRL (mean over dims) losses."
        def clip(dim):
            i, t = self.encode_image(batch["pixel_values"], dim), self.encode_text(batch["input_ids"], batch["attention_mask"], dim)
            logits = self.logit_scale.exp() * i @ t.T
            y = torch.arange(len(i))
            return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        l_clip = clip(None)
        l_mrl = torch.stack([clip(d) for d in DIMS]).mean()
        return 0.25 * l_clip + l_mrl, l_clip, l_mrl


def recall_at(sim: np.ndarray, k: int) -> float:
    "Fraction of rows whose matching column (the diagonal) is among the `k` highest."
    ranks = (sim > np.diag(sim)[:, None]).sum(1)
    return float((ranks < k).mean())


@torch.no_grad()
def evaluate(model, loader) -> tuple[dict, dict]:
    "Validation losses and recalls at every dimension; the top-dim embeddings."
    model.eval()
    ims, txs, losses = [], [], []
    for b in loader:
        losses.append([float(x) for x in model.losses(b)])
        ims.append(model.encode_image(b["pixel_values"])); txs.append(model.encode_text(b["input_ids"], b["attention_mask"]))
    model.train()
    im, tx = torch.cat(ims).numpy(), torch.cat(txs).numpy()
    loss, l_clip, l_mrl = np.mean(losses, 0)
    out = {"val/loss": loss, "val/loss_clip": l_clip, "val/loss_mrl": l_mrl}
    for dim in (None, *DIMS):
        a, b = im[:, :dim], tx[:, :dim]
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        s = a @ b.T
        for k in (1, 5, 10):
            sfx = "" if dim is None else f"@{dim}"
            out[f"val/i2t_r{k}{sfx}"], out[f"val/t2i_r{k}{sfx}"] = recall_at(s, k), recall_at(s.T, k)
    return out, {"image": im, "text": tx}


def make_run_dir(root: str | Path, steps: int = 30, n: int = 96, n_val: int = 32, batch_size: int = 16,
                 size: int = 32, seed: int = 0, eval_every: int = 10, lr: float = 3e-2, warmup: int = 5) -> Path:
    "Train the tiny dual encoder on demo data and write a run directory as the trainer does."
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    data = damaged_demo(root / "data" / "demo.parquet", n + n_val)
    # the data section is stage 4's one-liner config, as in the trainer's config.yaml; the loaders come from it
    data_cfg = {"data": str(data), "kind": "parquet", "val_split": n_val,
                "tokenizer": {"train": {"vocab_size": 320}, "save_dir": str(root / "tokenizer")},
                "preprocessor": "clip", "preprocessor_options": {"size": size},
                "loader": {"batch_size": batch_size, "seed": seed}}
    dm = build_data_module(data_cfg)
    full = dm.train_data.parent
    loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    tok = load_tokenizer(str(root / "tokenizer"))   # the tokenizer the one-liner trained and saved

    torch.manual_seed(seed)
    model = TinyDualEncoder(len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rows, digests, step, epoch = [], [], 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            digests.append(batch_digest(batch))
            loss, l_clip, l_mrl = model.losses(batch)
            opt.zero_grad(); loss.backward(); opt.step()
            rows.append({"train/step": step + 1, "train/epoch": epoch, "train/loss": loss.item(), "train/loss_clip": l_clip.item(),
                         "train/loss_mrl": l_mrl.item(), "train/lr": sched.get_last_lr()[0]})
            sched.step(); step += 1
            if step % eval_every == 0 or step == steps:
                val, emb = evaluate(model, val_loader)
                rows.append({"train/step": step, "train/epoch": epoch, **val})
            if step == steps: break
        epoch += 1

    df = pd.DataFrame(rows)
    df.to_csv(root / "metrics.csv", index=False)
    with open(root / "metrics.jsonl", "w") as f:
        for r in rows: f.write(json.dumps(r) + "\n")
    val_rows = dm.val_data.indices
    labels = pq.read_table(data, columns=["label"]).column("label").to_numpy()
    good = [int(i) for i in val_rows if full.get(int(i))]
    np.savez(root / "eval_embeddings.npz", image=emb["image"].astype(np.float32), text=emb["text"].astype(np.float32),
             label=labels[good].astype(np.int64), caption=np.array([full.get(i)["text"] for i in good]))
    (root / "batch_digests.json").write_text(json.dumps(digests))   # what steps 1, 2, ... trained on (for tests)
    rep = {"train": loader.report.to_dicts(), "val": []}
    (root / "loader_report.json").write_text(json.dumps({"bad": sum(map(len, rep.values())), **rep}, indent=1))
    prof = profile_loader(loader, steps=2, progress=False)
    (root / "loader_profile.json").write_text(json.dumps(dataclasses.asdict(prof), indent=1))
    config = {"run_dir": str(root), "seed": seed, "data": data_cfg,
              "model": {"name": "tiny-linear-dual-encoder", "dims": list(DIMS)},
              "optimiser": {"name": "adamw", "lr": lr, "weight_decay": 0.01},
              "schedule": {"name": "warmup_cosine", "warmup_steps": warmup, "total_steps": steps},
              "eval": {"every": eval_every}, "checkpoint": {"dir": "checkpoints"}, "logging": {"metrics": "metrics.csv"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    record_data(root, data_cfg, loader)                              # data.json: absolute paths and the data's fingerprint
    (root / "checkpoints").mkdir(exist_ok=True)
    last_train = next(r for r in reversed(rows) if "train/loss" in r)
    summary = {k: float(v) for k, v in val.items()} | {"train/loss": last_train["train/loss"], "steps": steps}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return root
