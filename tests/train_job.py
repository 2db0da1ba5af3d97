"""A small training run for the crash-recovery, DDP and wandb tests: run in-process (`build`) or as a subprocess
(`python tests/train_job.py RUN_DIR [JSON overrides]`), also under `torchrun`."""
import json, os, sys, time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmlit.core import Stream, config_from_dict, derive_seed, torch_rng
from mmlit.loader import LoaderConfig, make_loader
from mmlit.train import Trainer
from mmlit.step import TrainConfig


class Regress(nn.Module):
    """Predicts `y` from `x` through a small MLP with dropout; records the `(epoch, micro_batch)` pairs `set_step` saw.
    With `TRAIN_JOB_NUMPY_NOISE=1` (and dropout) its loss is also scaled by a draw from NumPy's global generator, which the
    trainer does not reseed: only the checkpoint's saved generator state (each rank's own) makes a resume exact."""
    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.delay = float(os.environ.get("TRAIN_JOB_STEP_DELAY", 0) or 0)
        self.noise = dropout > 0 and os.environ.get("TRAIN_JOB_NUMPY_NOISE") == "1"
        self.steps = []

    def set_step(self, epoch: int, micro_batch: int): self.steps.append((epoch, micro_batch))

    def forward(self, x, y, **_):
        if self.delay and self.training: time.sleep(self.delay)
        err = self.net(x).squeeze(-1) - y
        if self.noise and self.training: err = err * (1 + 0.01 * float(np.random.rand()))
        return {"loss": (err ** 2).mean(), "loss_abs": err.abs().mean(), "sample_loss": err.detach() ** 2}   # the ledger's per-sample loss


def jitter(record: dict, rng) -> dict:
    "A per-sample augmentation drawn from the loader's `(seed, epoch, index)` generator (in the worker that loads it)."
    return {"x": record["x"] + torch.from_numpy(rng.normal(0.0, 0.05, record["x"].shape).astype("float32")), "y": record["y"]}


def make_data(n: int = 96) -> list[dict]:
    g = torch_rng(7)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :3].sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def default_config(run_dir) -> dict:
    return {"run_dir": str(run_dir), "seed": 0, "log": {"progress": False},
            "optim": {"lr": 1e-2}, "schedule": {"epochs": 3, "accumulate": 2},
            "eval": {"every": 5}, "checkpoint": {"every": 2, "keep": 2}}


def merge(a: dict, b: dict) -> dict:
    return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()}}


def build(run_dir, overrides: dict | None = None, batch_size: int = 4, dropout: float = 0.1, num_workers: int = 0) -> Trainer:
    from mmlit.step import setup_distributed
    setup_distributed()                                    # under torchrun: before the loaders, so they shard
    cfg = config_from_dict(TrainConfig, merge(default_config(run_dir), overrides or {}))
    torch.manual_seed(derive_seed(0, 0, 0, Stream.MODEL_INIT))
    if os.environ.get("TRAIN_JOB_NUMPY_NOISE") == "1":                 # each rank's own NumPy stream (restored on resume)
        np.random.seed(100 + (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0))
    data = make_data()
    train = make_loader(data[:64], LoaderConfig(batch_size=batch_size, seed=0, num_workers=num_workers), transform=jitter)
    val = make_loader(data[64:], LoaderConfig(batch_size=8, train=False))
    return Trainer(Regress(dropout), cfg, train, val)


def losses(run_dir) -> list[float]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


if __name__ == "__main__":
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    t = build(sys.argv[1], args.pop("config", None), **args)
    r = t.fit()
    if t.main: print(json.dumps({"steps": r.steps, "interrupted": r.interrupted, "resumed_from": r.resumed_from}), flush=True)
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
