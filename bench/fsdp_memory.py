"""Per-rank memory of parameters + gradients + AdamW state, FSDP (`distributed.strategy: fsdp`) against DDP, 2 gloo ranks.

    python bench/fsdp_memory.py [--layers 16 --width 512]

Runs `torchrun --nproc_per_node 2` twice (ddp, fsdp) on a transformer encoder of >= 50M parameters, one optimiser step
each, and prints the bytes each rank holds in parameters, `.grad` and optimiser state after that step (every tensor
counted once, by storage; DDP's reducer buckets, by default a second copy of the gradients, are not counted, which favours
DDP), the ratio FSDP / DDP, the peak resident memory of rank 0,
and the CPU model. The model is built on the meta device and materialised after wrapping, as FSDP runs should."""
import argparse, json, os, resource, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(tensors) -> int:
    "Bytes of the distinct storages behind `tensors` (DTensors by their local shard)."
    import torch
    seen, total = set(), 0
    for t in tensors:
        if t is None: continue
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0: continue
        seen.add(s.data_ptr()); total += s.nbytes()
    return total


def worker(strategy: str, layers: int, width: int, out: str):
    import torch, torch.distributed as dist
    from torch import nn
    from mmlit.fsdp import DistributedConfig, shard_model
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    n_params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp": shard_model(model, DistributedConfig("fsdp"), torch.device("cpu"))
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, nn.MultiheadAttention): m.reset_parameters()
        if isinstance(m, nn.MultiheadAttention): m._reset_parameters()
    step = nn.parallel.DistributedDataParallel(model) if strategy == "ddp" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 8, width)
    step(x).float().pow(2).mean().backward()
    opt.step()
    params = storage_bytes(model.parameters())
    grads = storage_bytes(p.grad for p in model.parameters())
    state = storage_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)
    row = {"strategy": strategy, "rank": dist.get_rank(), "params": n_params, "param_bytes": params, "grad_bytes": grads,
           "optim_bytes": state, "total_bytes": params + grads + state,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0: Path(out).write_text(json.dumps(rows))
    dist.barrier(); dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: return worker(a.worker, a.layers, a.width, a.out)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for s in ("ddp", "fsdp"):
            out = Path(d) / f"{s}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                            "--worker", s, "--out", str(out), "--layers", str(a.layers), "--width", str(a.width)],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res[s] = json.loads(out.read_text())
    mb = lambda b: f"{b / 2**20:8.1f}"
    from mmlit.recipe import cpu_model
    print(f"CPU: {cpu_model()}; torch {__import__('torch').__version__}; 2 gloo ranks; "
          f"model: TransformerEncoder {a.layers} x {a.width}, {res['ddp'][0]['params'] / 1e6:.1f}M parameters, AdamW")
    print(f"{'strategy':8} {'rank':>4} {'params MiB':>10} {'grads MiB':>10} {'optim MiB':>10} {'total MiB':>10} {'peak RSS MiB':>12}")
    for s in ("ddp", "fsdp"):
        for r in res[s]:
            print(f"{s:8} {r['rank']:>4} {mb(r['param_bytes']):>10} {mb(r['grad_bytes']):>10} {mb(r['optim_bytes']):>10} "
                  f"{mb(r['total_bytes']):>10} {mb(r['peak_rss_bytes']):>12}")
    ratio = max(r["total_bytes"] for r in res["fsdp"]) / max(r["total_bytes"] for r in res["ddp"])
    print(f"FSDP / DDP, params + grads + optimiser state per rank (the larger rank): {ratio:.2f}x (goal <= 0.6x)")
    return ratio


if __name__ == "__main__":
    main()
