"""Peak memory and time of ONE training step: a full fine-tune against LoRA, LoRA + gradient checkpointing and LoRA +
checkpointing + bf16 autocast, each variant in a fresh process, on a Qwen2-VL-shaped embedder of about 150M parameters
built from config (random init, nothing downloaded) and the same batch of bundled demo records.

    python bench/memory.py [--batch 8] [--pixels 224] [--threads 2] [--device cpu|cuda] [--steps 3] [--shape bench|2b|tiny] [--json]

The model is `mmlit.recipe`'s `qwen2vl_embedder` kind with a larger backbone (`--shape bench`, the default: text: 12
layers of 768, a 32k vocabulary; vision: 12 blocks of 384; `--shape 2b`: Qwen2-VL-2B's own sizes, for a GPU;
`--shape tiny`: a few thousand parameters, to check the code paths in seconds); the batch is `--batch` demo records through the `qwen2_vl` preprocessor and collator, the
images resized to `--pixels` squared (224: 256 patches, 64 image tokens each). LoRA comes from `peft` (`LoraConfig`,
`get_peft_model`) on the backbone's attention and MLP projections (rank 16); the embedder's projection head and
temperature stay trainable. Gradient checkpointing is `mmlit.step.enable_gradient_checkpointing`; bf16 is the trainer's
`autocast(device, "bf16")`.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` during the step, minus what was allocated before it; on CPU the
process's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs` once the model and batch are built, and
`malloc_trim` first, so the freed memory of building does not hide the step's) minus the resident set before the step.
The step is forward, backward and AdamW's update (its state is allocated in this first step). Step time: the median of
`--steps` further steps, wall clock and the process's CPU time (the steadier figure on a shared machine).
"""
import argparse, ctypes, gc, json, os, resource, statistics, subprocess, sys, time
from pathlib import Path

VARIANTS = {"full": "full fine-tune (fp32)", "lora": "LoRA (fp32)", "lora_gc": "LoRA + gradient checkpointing",
            "lora_gc_bf16": "LoRA + checkpointing + bf16"}
BACKBONE = {"text_config": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=4, vocab_size=32768,
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12])),
            "vision_config": dict(depth=12, embed_dim=384, num_heads=6, hidden_size=768, mlp_ratio=4)}
SHAPES = {
    "bench": BACKBONE,
    # Qwen2-VL-2B-Instruct's config.json: 1.5B text (28 layers of 1536, GQA 12/2 heads, 151,936 tokens) + 675M vision.
    "2b": {"text_config": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936,
                               rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])),
           "vision_config": dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4)},
    "tiny": {"text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1024,
                                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
             "vision_config": dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)},
}
EMBED = {"bench": (768, [768, 512, 256, 128]), "2b": (1536, [1536, 768, 256]), "tiny": (64, [64, 32])}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1", "fc2"]


def rss_bytes() -> int:
    "The process's resident set now."
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    "The process's peak resident set since start or the last `reset_peak_rss` (VmHWM; ru_maxrss where /proc has none)."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"): return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    "Return freed heap memory to the OS and reset the peak resident set to the current one (Linux); whether the reset worked."
    try: ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError): pass
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        return True
    except OSError: return False


def parts(batch_size: int, pixels: int, device, shape: str = "bench"):
    "The batch (demo records through the qwen2_vl preprocessor and collator) and the embedder, seeded."
    import torch
    from mmlit.collate import collators
    from mmlit.demo import ensure_demo
    from mmlit.multimodal import build_preprocessor
    from mmlit.kinds import ModelSpec, build_model
    from mmlit.sources import ParquetImageText
    from mmlit.text import train_tokenizer
    ds = ParquetImageText(ensure_demo()["parquet"])
    tok = train_tokenizer((ds.get(i)["text"] for i in range(500)), vocab_size=512)
    prep = build_preprocessor("qwen2_vl", tok, min_pixels=pixels * pixels, max_pixels=pixels * pixels, max_length=256)
    batch = collators.build("qwen2_vl", tok)([prep(ds.get(i)) for i in range(batch_size)])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    dim, mrl = EMBED[shape]
    spec = ModelSpec("qwen2vl_embedder", "tiny", {"backbone": SHAPES[shape], "embed_dim": dim, "mrl_dims": mrl})
    return batch, build_model(spec, tok, seed=0).to(device)


def add_lora(model):
    "LoRA (rank 16) on the backbone's projections through peft; the backbone's own weights frozen."
    try: from peft import LoraConfig, get_peft_model
    except ImportError: sys.exit("bench/memory.py: the LoRA variants need peft (pip install peft)")
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model


def measure(variant: str, a) -> dict:
    "Build the model and batch, then one step's peak memory and the median time of `a.steps` more steps."
    import torch
    from mmlit.step import autocast, enable_gradient_checkpointing
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    batch, model = parts(a.batch, a.pixels, device, a.shape)
    if variant != "full": add_lora(model)
    if "gc" in variant: enable_gradient_checkpointing(model)
    precision = "bf16" if variant.endswith("bf16") else "fp32"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        model.set_step(0, 0)
        with autocast(device, precision): loss = model(**batch).loss
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        return float(loss)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step(); torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated - allocated before the step"
    else:
        reset = reset_peak_rss()
        base = rss_bytes()
        loss = step()
        peak = peak_rss_bytes() - base
        method = "VmHWM (reset after build) - RSS before the step" if reset else "ru_maxrss - RSS before the step (peak not reset)"
    times, cpu = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time(); step()
        if device.type == "cuda": torch.cuda.synchronize()
        times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return {"variant": variant, "peak_bytes": peak, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "loss": loss, "method": method, "tokens": int(batch["attention_mask"].sum()),
            "parameters": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8); ap.add_argument("--pixels", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2); ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the measured one (median)")
    ap.add_argument("--variants", default=",".join(VARIANTS)); ap.add_argument("--json", action="store_true")
    ap.add_argument("--shape", choices=list(SHAPES), default="bench", help="the backbone's sizes (2b: Qwen2-VL-2B's)")
    ap.add_argument("--one", help=argparse.SUPPRESS)                     # the fresh process of one variant
    a = ap.parse_args()
    if a.one: return print(json.dumps(measure(a.one, a)))
    rows = []
    for v in a.variants.split(","):
        argv = [sys.executable, __file__, "--one", v, "--batch", str(a.batch), "--pixels", str(a.pixels), "--threads",
                str(a.threads), "--device", a.device, "--steps", str(a.steps), "--shape", a.shape]
        p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        if p.returncode: sys.exit(f"bench/memory.py: the {v} variant failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    import torch
    full = next((r for r in rows if r["variant"] == "full"), rows[0])
    for r in rows: r.update(peak_ratio=r["peak_bytes"] / full["peak_bytes"], time_ratio=r["step_s"] / full["step_s"],
                            cpu_ratio=r["cpu_s"] / full["cpu_s"])
    from mmlit.recipe import cpu_model
    where = cpu_model() + f", {a.threads} threads" if a.device == "cpu" else torch.cuda.get_device_name()
    if a.json: return print(json.dumps({"device": where, "batch": a.batch, "pixels": a.pixels, "shape": a.shape, "rows": rows}))
    print(f"{where}; torch {torch.__version__}; Qwen2-VL-shaped embedder, {full['parameters'] / 1e6:.1f}M parameters; "
          f"batch {a.batch}, images {a.pixels}x{a.pixels}; peak: {full['method']}")
    print(f"{'variant':32} {'trainable':>10} {'peak MiB':>9} {'x full':>7} {'step s':>7} {'x full':>7} {'CPU s':>7} {'x full':>7} {'loss':>7}")
    for r in rows:
        print(f"{VARIANTS[r['variant']]:32} {r['trainable'] / 1e6:9.2f}M {r['peak_bytes'] / 2**20:9.0f} {r['peak_ratio']:7.2f} "
              f"{r['step_s']:7.2f} {r['time_ratio']:7.2f} {r['cpu_s']:7.2f} {r['cpu_ratio']:7.2f} {r['loss']:7.3f}")


if __name__ == "__main__":
    main()
