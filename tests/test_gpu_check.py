"""bench/gpu_check.py stays runnable: its dry run (CPU, tiny shapes) takes every path the GPU check takes."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def test_dry_run_reports_every_figure():
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json"], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["dry_run"] and r["device"] == "cpu" and r["compile_backend"] == "aot_eager"
    d = r["demo"]
    assert d["steps"] == 5 and d["steps_per_s"] > 0 and 0 <= d["wait_share"] < 1 and d["bytes"] > 0
    assert d["pinned_s"] is None and d["pinned_memory"] is False          # no CUDA: nothing pinned, no transfer timed
    rows = {row["variant"]: row for row in r["qwen2vl"]["rows"]}
    assert set(rows) == {"full", "lora_gc_bf16"} and r["qwen2vl"]["shape"] == "tiny"
    assert all(row["tokens_per_s"] > 0 and row["peak_bytes"] > 0 for row in rows.values())
    assert rows["lora_gc_bf16"]["trainable"] < rows["full"]["trainable"]        # LoRA froze the backbone
    c = r["compile"]
    assert c["eager"]["step_s"] > 0 and c["compiled"]["step_s"] > 0
    assert c["loss_diff"] < 1e-2, c                                             # the same weights give the same loss
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check import table
    text = table(r)
    assert "DRY RUN" in text and "loader wait / step time" in text and "Qwen2-VL-tiny, lora_gc_bf16" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_unless_dry_run():
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode != 0 and "no CUDA device here; --dry-run" in p.stderr
