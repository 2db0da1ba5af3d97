"""The GPU check: one command that prints what a GPU box does with mmlit, in one table.

    python bench/gpu_check.py [--demo-steps 300] [--workers 4] [--json]     # on a CUDA machine
    python bench/gpu_check.py --dry-run [--json]                             # CPU, tiny shapes, about a minute

1. The demo's run (`mmlit demo`'s data, tiny dual encoder, hard negatives) trained in bf16 for `--demo-steps` steps:
   optimiser steps a second, the share of step time the training loop waits for the loader (goal < 2%), and the time to
   move one batch to the GPU from pinned memory against pageable memory (and as a share of the step).
2. A Qwen2-VL-2B-shaped embedder built from config (random init, nothing downloaded) through `bench/memory.py`: one step
   per variant (full fine-tune, LoRA, LoRA + gradient checkpointing, LoRA + checkpointing + bf16), each in a fresh
   process; tokens a second and peak GPU memory.
3. The demo's dual encoder compiled (`torch.compile`, inductor) against eager: ms a training step, the first compiled
   training step's time (compilation), and the loss of both in eval mode (no dropout) from the same weights.

`--dry-run` runs every path on the CPU with tiny shapes (5 demo steps, a Qwen2-VL of a few thousand parameters, the
compiled step through the `aot_eager` backend, which needs no C++ compiler) so that CI keeps the script working; its
figures mean nothing. Without CUDA and without `--dry-run` the script refuses to run.
"""
import argparse, copy, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def sync(device: torch.device) -> None:
    if device.type == "cuda": torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    "Median seconds of `fn()` over `repeats` calls, the device synchronised around each."
    out = []
    for _ in range(repeats):
        sync(device); t0 = time.perf_counter(); fn(); sync(device); out.append(time.perf_counter() - t0)
    return statistics.median(out)


def demo_run(a, device: torch.device, run_dir: Path):
    "The demo's run config, shortened to `--demo-steps` steps in bf16 on `device`, built and trained."
    from mmlit.recipe import build_run, demo_config
    cfg = demo_config(run_dir)
    cfg.device, cfg.precision, cfg.threads = str(device), "bf16", a.threads
    cfg.schedule.max_steps = a.demo_steps
    cfg.eval.every, cfg.eval.at_epoch_end = 10**9, False     # the check times training; `mmlit demo` evaluates
    cfg.log.progress, cfg.log.wandb = False, False
    cfg.data["loader"] = {**cfg.data["loader"], "num_workers": a.workers, **({"batch_size": 16} if a.dry_run else {})}
    run = build_run(cfg)
    run.fit()
    return run


def transfer_times(batch: dict, device: torch.device, repeats: int = 20) -> dict:
    "Seconds to move `batch` to `device` from pinned and from pageable host memory, and its size."
    from mmlit.step import to_device
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    if device.type != "cuda": return {"bytes": nbytes, "pinned_s": None, "pageable_s": None}
    pinned = {k: v.pin_memory() for k, v in tensors.items()}
    pageable = {k: v.clone() for k, v in tensors.items()}
    assert all(v.is_pinned() for v in pinned.values()) and not any(v.is_pinned() for v in pageable.values())
    return {"bytes": nbytes, "pinned_s": timed(lambda: to_device(pinned, device), device, repeats),
            "pageable_s": timed(lambda: to_device(pageable, device), device, repeats)}


def check_demo(a, device: torch.device, tmp: Path) -> dict:
    run = demo_run(a, device, tmp / "demo")
    t = run.trainer
    busy = t.wait_s + t.step_s
    batch = next(iter(run.data.train_dataloader()))
    return {"steps": t.step, "steps_per_s": t.step / busy, "step_s": t.step_s / t.step, "wait_share": t.wait_s / busy,
            "pinned_memory": all(v.is_pinned() for v in batch.values() if torch.is_tensor(v)), **transfer_times(batch, device),
            "vocab": len(run.tokenizer), "batch": batch}


def check_qwen2vl(a) -> dict:
    "bench/memory.py's variants on the Qwen2-VL-2B shape (tiny in a dry run), each in a fresh process."
    shape, variants = ("tiny", "full,lora_gc_bf16") if a.dry_run else ("2b", "full,lora,lora_gc,lora_gc_bf16")
    argv = [sys.executable, str(HERE / "memory.py"), "--json", "--shape", shape, "--variants", variants, "--steps", "1",
            "--device", "cpu" if a.dry_run else "cuda", "--batch", str(2 if a.dry_run else a.vlm_batch),
            "--pixels", str(56 if a.dry_run else 448), "--threads", str(a.threads)]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode: return {"error": (p.stdout + p.stderr)[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for r in res["rows"]: r["tokens_per_s"] = r["tokens"] / r["step_s"]
    return res


def check_compile(a, device: torch.device, vocab: int, batch: dict) -> dict:
    "ms a training step of the demo's dual encoder, eager and compiled, from the same weights on the same batch."
    from mmlit.model import DualEncoder, DualEncoderConfig
    from mmlit.step import autocast, to_device
    torch.manual_seed(0)
    base = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=vocab, hard_negative_weight=1.0)).to(device)
    batch = to_device(batch, device)
    out = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(base).train()
        fwd = torch.compile(model, backend=a.compile_backend) if name == "compiled" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            model.set_step(0, 0)
            with autocast(device, "bf16"): loss = fwd(**batch).loss
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return float(loss)

        model.eval()                                     # no dropout: the same weights give the same loss
        with torch.no_grad(), autocast(device, "bf16"): first = float(fwd(**batch).loss)
        model.train()
        sync(device); t0 = time.perf_counter(); step(); sync(device)
        out[name] = {"first_step_s": time.perf_counter() - t0, "first_loss": first,
                     "step_s": timed(step, device, 3 if a.dry_run else 20)}
    out["speedup"] = out["eager"]["step_s"] / out["compiled"]["step_s"]
    out["loss_diff"] = abs(out["eager"]["first_loss"] - out["compiled"]["first_loss"])
    return out


def table(r: dict) -> str:
    "The check's figures as a plain-text table."
    d, q, c = r["demo"], r["qwen2vl"], r["compile"]
    ms = lambda s: "n/a (no CUDA)" if s is None else f"{s * 1e3:.3f} ms"
    rows = [("demo, bf16", "steps/s", f"{d['steps_per_s']:.1f} ({d['steps']} steps, {d['step_s'] * 1e3:.1f} ms each)", ""),
            ("", "loader wait / step time", f"{d['wait_share']:.2%}", "< 2%"),
            ("", "batch to GPU, pinned", ms(d["pinned_s"]) + (f" = {d['pinned_s'] / d['step_s']:.1%} of a step" if d["pinned_s"] else ""), ""),
            ("", "batch to GPU, pageable", ms(d["pageable_s"]) + f" ({d['bytes'] / 2**20:.2f} MiB a batch; the loader's batches pinned: {d['pinned_memory']})", "")]
    if "error" in q: rows.append(("Qwen2-VL-2B-shaped", "FAILED", q["error"].strip().splitlines()[-1], ""))
    for row in q.get("rows", []):
        rows.append((f"Qwen2-VL-{q['shape']}, {row['variant']}", "tokens/s | peak MiB",
                     f"{row['tokens_per_s']:.0f} | {row['peak_bytes'] / 2**20:.0f} ({row['trainable'] / 1e6:.1f}M of "
                     f"{row['parameters'] / 1e6:.1f}M trainable)", ""))
    rows += [("dual encoder", "eager ms/step", f"{c['eager']['step_s'] * 1e3:.2f}", ""),
             ("", f"compiled ({r['compile_backend']}) ms/step", f"{c['compiled']['step_s'] * 1e3:.2f} = {c['speedup']:.2f}x eager "
              f"(first step {c['compiled']['first_step_s']:.1f} s)", "> 1x"),
             ("", "eval loss, eager vs compiled", f"{c['eager']['first_loss']:.4f} vs {c['compiled']['first_loss']:.4f}", "equal (bf16)")]
    w = [max(len(x[i]) for x in rows) for i in range(4)]
    head = [f"mmlit GPU check{' (DRY RUN: CPU, tiny shapes; the figures mean nothing)' if r['dry_run'] else ''}",
            f"device: {r['device']}; CPU: {r['cpu']}; torch {r['torch']}"]
    return "\n".join(head + ["  ".join(x[i].ljust(w[i]) for i in range(4)).rstrip() for x in rows])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check that every path runs")
    ap.add_argument("--demo-steps", type=int, default=300); ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--vlm-batch", type=int, default=8); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; aot_eager in a dry run)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available(): sys.exit("bench/gpu_check.py: no CUDA device here; --dry-run checks the paths on the CPU")
    if a.dry_run: a.demo_steps, a.workers = min(a.demo_steps, 5), min(a.workers, 1)
    a.compile_backend = a.compile_backend or ("aot_eager" if a.dry_run else "inductor")
    torch.set_num_threads(a.threads)
    device = torch.device("cpu" if a.dry_run else "cuda")
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory(prefix="mmlit-gpu-check-") as tmp:
        demo = check_demo(a, device, Path(tmp))
    batch, vocab = demo.pop("batch"), demo.pop("vocab")
    from mmlit.recipe import cpu_model
    r = {"dry_run": a.dry_run, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpu": cpu_model(),
         "torch": torch.__version__, "compile_backend": a.compile_backend, "demo": demo, "qwen2vl": check_qwen2vl(a),
         "compile": check_compile(a, device, vocab, batch)}
    print(json.dumps(r) if a.json else table(r))
    if "error" in r["qwen2vl"]: sys.exit(1)
    return r


if __name__ == "__main__":
    main()
