"""The retrieval demo's towers trained by mmlit's `Trainer` and by open_clip's own training loop: steps per CPU-second and held-out zero-shot accuracy.

Three runs of the same number of optimiser steps (`--steps`, default 200) on the demo's data, towers and
hyperparameters (`mmlit.recipe.demo_config`: the tiny dual encoder, 48 px uint8 images, batches of 64,
AdamW lr 3e-3, weight decay 0.1, betas (0.9, 0.95), gradient norm clipped to 1, 10% linear warmup then
cosine, the demo's torch threads and loader workers):

  a. mmlit, hard negatives on: `build_run(demo_config)` and `Run.fit`, the demo as it is (each caption's 11
     negatives tokenised, encoded and in the loss; the per-sample ledger, a checkpoint at every epoch's end,
     the evaluation at the end of the run);
  b. mmlit, hard negatives off: the same, with the data read without its `negatives` column and
     `hard_negative_weight: 0`;
  c. open_clip: `open_clip_train.train.train_one_epoch`, once per epoch, given run b's model (the same
     initial weights) wrapped as an open_clip-style model (`model(images, texts)` returning image and
     text features and `logit_scale`), open_clip's `ClipLoss`, its `cosine_lr` schedule over the same
     steps, AdamW with its weight-decay split (`main.py`), fp32. Its batches are exactly run b's: before
     the timed loop, run b's own training loader is read for the same epochs and steps (decoded,
     preprocessed, collated), and a plain `DataLoader` (batch_size=None, no workers) hands them out.
     The texts are token ids and attention mask stacked as one tensor `[B, 2, L]`.

The losses differ as the projects' do: mmlit's is CLIP at the top dimension (weight 0.25) plus CLIP at the
step's Matryoshka dimension (and, in a, the hard-negative term); open_clip's is CLIP.

Each run is a fresh interpreter (`--only a|b|c` prints one JSON line). Steps per CPU-second use
`time.process_time()` of the training process (all its threads) over `Run.fit` (a, b) or the
`train_one_epoch` calls (c), printed two ways: "as run" (everything fit does) and "training" (less the
evaluation and the checkpoint writes inside fit, each timed on its own; c has neither). The loader
worker's CPU (the decoding and tokenising the demo does in a separate process) is not in those figures;
"with workers" adds it (this process tree's CPU, from /proc, as bench/demo_profile.py reads it), and for c
it is zero because its batches were made before the clock started. Zero-shot accuracy is the run's
own evaluation (`Run.trainer.evaluate`: the held-out handwriting split, 36 prompts a digit) on each
trained model, so the scoring is identical; hard-negative accuracy only where the data has negatives.
A line says whether run c trained on the same batches as run b (a checksum of each step's pixels and
token ids, recorded by a forward hook in b).

`--profile` runs cProfile over b's and c's timed loops and prints where the CPU time goes, by part.

Environment. open-clip-torch imports torchvision, and the registry's torchvision is a CUDA build that
does not import beside mmlit's CPU torch 2.13; the bench runs in its own venv with torch 2.14.1 (a CUDA
build, ~5.5 GB, runs on the CPU here) and the matching torchvision, mmlit installed without its deps
(its torch pin excludes 2.14):

    python3 -m venv .venv-openclip
    .venv-openclip/bin/pip install "torch==2.14.1" "torchvision==0.29.1"
    .venv-openclip/bin/pip install open-clip-torch webdataset braceexpand pandas
    .venv-openclip/bin/pip install --no-deps -e .
    .venv-openclip/bin/pip install numpy "transformers>=5" tokenizers safetensors pyarrow pillow simplejpeg jinja2 \\
        matplotlib scikit-learn tqdm pyyaml fsspec fastcore peft torchmetrics
    .venv-openclip/bin/python bench/openclip.py [--steps 200] [--repeats 1] [--threads 1] [--profile]

A run that cannot import open_clip prints that as its result, with the error.

Measured on this project's 2-core machine (Intel Xeon, 2 vCPUs, shared with other jobs), one run of `--steps 200`,
torch threads 1, torch 2.14.1 (CUDA build, on the CPU), open_clip 3.3.0; steps per CPU-second of the training process.
AdamW on its fused kernels (`optim.impl: auto`, the default), with before it, back to back, the same script on the trainer
that used torch's default for-loop AdamW on the CPU (load average 13-18 all through, 2026-12-07):

    run                                   as run  training  +workers  wall steps/s  zero-shot  hard-neg
    a. mmlit, hard negatives on (demo)      8.29      8.72      5.09          1.33      0.182     0.196
    b. mmlit, hard negatives off           13.02     13.86      8.83          2.60      0.150         -
    c. open_clip train_one_epoch           14.83     14.83     14.75          3.31      0.141         -
    b / c: as run 0.88x, training 0.93x (goal >= 0.9x); c trained on b's batches: yes; a / b: 0.63x
    before (for-loop AdamW): b 12.28 / 13.07, c 14.49: as run 0.85x, training 0.90x

The fused kernel is one call over all the parameters; in 100-step runs of b (same code, `optim.impl` switched, CPU time
inside each part) the optimiser step with its clipping took 2.4-2.5 ms a step fused against 4.4-4.7 ms with the for-loop
(and 4.6 with foreach), of a 62-70 ms step. open_clip's `main.py` builds `torch.optim.AdamW` with torch's defaults,
which is the for-loop on the CPU. An earlier run at load average 3.5-4.8 with the for-loop gave b / c 0.83x as run and
0.88x training (13.73 / 14.55 against 16.62); absolute rates fall with the load, the ratios are the figures to compare.

Before the trainer kept freed memory (`mmlit.train.keep_freed_memory`, the `keep_freed_memory` key, on for `mmlit train`
and the demo), the same run at load average 9-10 gave b / c 0.77x as run and 0.81x training: glibc's malloc mapped the
step's activations and gradients anew every step and handed them back when they were freed, ~5,300 minor page faults a
step in the training process, the time showing up as system time and as slower kernels (own CPU time per step of conv2d
18.8 vs 15.0 ms, batch_norm 8.1 vs 6.3, max_pool2d 7.9 vs 5.9 in b against c, most likely the ops that first touch fresh
activation memory); now ~700 a step. Accuracies after 200 steps (~5 epochs) are little above chance (0.1) for all three
(the demo trains 1,900 steps); they say the runs are comparable, not which trains better. The same forward and backward
are no slower in mmlit's model and loss (best of 5 in one process with no loader beside it, one batch: mmlit's
forward+loss+backward 78.1 ms, the open_clip-style wrapper with `ClipLoss` 76.3 ms, 1.02x); what is left of the gap is
the trainer's per-step work, CPU time a step without a profiler (100-step runs of b): receiving the batch from the loader
worker 1.3-1.8 ms (most of it four socket connections a batch, one a tensor, to fetch each shared-memory file descriptor
from the worker), the per-sample ledger 1.2-1.4 ms (recomputing each pair's losses ~1.1 of it), the optimiser step with
its clipping ~2.4 ms, the log row and metrics files ~0.3 ms; and the loader worker decoding and tokenising on the other
core while the step runs (c's batches were made before its clock started; not isolated). Turning the negatives on costs
b's rate another 0.63-0.71x (11 more captions a pair encoded, the hard-negative loss, and more worker work).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"a": "mmlit, hard negatives on (the demo)", "b": "mmlit, hard negatives off", "c": "open_clip train_one_epoch"}


def load() -> str:
    "The load average, as printed beside each figure."
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def tree_cpu_s() -> float:
    "CPU seconds of this process, its reaped children and its live descendants (bench/demo_profile.py's reading)."
    sys.path.insert(0, str(HERE))
    from demo_profile import tree_cpu_s as cpu
    return cpu()


def run_config(run_dir: Path, steps: int, negatives: bool, threads: int | None):
    "The demo's config, cut to `steps` optimiser steps; without negatives: no `negatives` column read, no hard-negative loss."
    from mmlit.recipe import demo_config
    cfg = demo_config(run_dir)
    cfg.schedule.max_steps = steps
    cfg.log.progress = False
    if threads is not None: cfg.threads = threads
    if not negatives:
        cfg.data["data_options"] = {**cfg.data.get("data_options", {}), "negatives_column": None}
        cfg.model.options = {**cfg.model.options, "hard_negative_weight": 0.0}
    return cfg


def checksum(pixels, ids) -> list[int]:
    "A cheap fingerprint of one training batch: the sums of its pixels and token ids."
    return [int(pixels.sum()), int(ids.sum())]


def timed(fn, box: list):
    "`fn`, its CPU seconds (process_time) added to `box[0]`."
    def wrapper(*a, **k):
        c0 = time.process_time()
        try: return fn(*a, **k)
        finally: box[0] += time.process_time() - c0
    return wrapper


def scores(run) -> dict:
    "The run's own held-out evaluation of its model (zero-shot digit accuracy; hard negatives where the data has them)."
    m = run.trainer.evaluate()
    return {"zeroshot": m.get("zeroshot_acc"), "hardneg": m.get("hardneg_acc")}


def profile_parts(prof) -> dict:
    "CPU seconds of a cProfile run, by part: top functions by own time, and cumulative times of named parts."
    import pstats
    st = pstats.Stats(prof)
    rows = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in st.stats.items()), reverse=True)[:25]
    parts = {}
    for k, v in st.stats.items():
        name = f"{Path(k[0]).name}:{k[2]}"
        parts[name] = max(parts.get(name, 0.0), v[3])
    return {"total": st.total_tt, "top_own": [(round(t, 3), n) for t, n in rows], "cumulative": parts}


def mmlit_run(steps: int, negatives: bool, threads: int | None, profile: bool) -> dict:
    "Run a or b: the demo's run built and fitted for `steps` steps; CPU seconds of fit, of its evaluations and checkpoints."
    import torch
    from mmlit.recipe import build_run, machine
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(run_config(Path(tmp) / "run", steps, negatives, threads))
        t, seen, ev, ck = run.trainer, [], [0.0], [0.0]
        t.evaluate, t.save = timed(t.evaluate, ev), timed(t.save, ck)
        def hook(m, args, kw):
            if m.training: seen.append(checksum(kw["pixel_values"], kw["input_ids"]))
        run.model.register_forward_pre_hook(hook, with_kwargs=True)
        prof = None
        if profile:
            import cProfile
            prof = cProfile.Profile(time.process_time)
        tree0, c0, w0 = tree_cpu_s(), time.process_time(), time.perf_counter()
        if prof: prof.enable()
        run.fit()
        if prof: prof.disable()
        cpu, wall, tree = time.process_time() - c0, time.perf_counter() - w0, tree_cpu_s() - tree0
        out = dict(steps=t.step, cpu=cpu, eval_cpu=ev[0], ckpt_cpu=ck[0], tree_cpu=tree, wall=wall, threads=torch.get_num_threads(),
                   workers=t.train_loader.config.num_workers, epochs=math.ceil(t.step / t.steps_per_epoch), batches=seen, **scores(run), machine=machine(t.train_loader.config.num_workers))
        if prof: out["profile"] = profile_parts(prof)
        return out


def openclip_model(dual):
    "A `DualEncoder`'s towers as open_clip's loop calls a model: `model(images, texts)` → image and text features and `logit_scale`."
    import torch

    class OpenClipStyle(torch.nn.Module):
        def __init__(self, dual):
            super().__init__()
            self.dual = dual

        @property
        def logit_scale(self):                          # open_clip clamps it in place after each step
            return self.dual.logit_scale

        def forward(self, image, text):
            ids, mask = text.unbind(1)
            return {"image_features": self.dual.image_features(image), "text_features": self.dual.text_features(ids, mask),
                    "logit_scale": self.dual.logit_scale.exp()}
    return OpenClipStyle(dual)


def openclip_optimizer(model, lr: float, wd: float, betas, eps: float):
    "AdamW with open_clip's `main.py` split: no weight decay on gains, biases (ndim < 2, or 'bn'/'ln'/'bias' in the name) and logit_scale."
    import torch
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}],
                             lr=lr, betas=betas, eps=eps)


def epochs_of_batches(loader, steps: int) -> list[list]:
    "The training loader's batches, epoch by epoch, up to `steps` in all: `(pixel_values, [input_ids; attention_mask])` each."
    import torch
    out, n, e = [], 0, 0
    while n < steps:
        loader.set_epoch(e)
        ep = []
        for b in loader:
            ep.append((b["pixel_values"], torch.stack([b["input_ids"], b["attention_mask"]], 1)))
            n += 1
            if n == steps: break
        out.append(ep); e += 1
    return out


def openclip_run(steps: int, threads: int | None, profile: bool) -> dict:
    "Run c: run b's model, data and hyperparameters through open_clip's `train_one_epoch`."
    import argparse as ap
    import torch
    try:
        from open_clip import ClipLoss
        import open_clip
        from open_clip_train.data import DataInfo
        from open_clip_train.scheduler import cosine_lr
        from open_clip_train.train import train_one_epoch
    except Exception as e:                                  # reported as the run's result, never dropped
        return {"error": f"open_clip does not import: {type(e).__name__}: {e}"}
    from mmlit.recipe import build_run, machine
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(run_config(Path(tmp) / "run", steps, False, threads))
        cfg, loader = run.config, run.trainer.train_loader
        epochs = epochs_of_batches(loader, steps)
        per_epoch = run.trainer.steps_per_epoch
        torch.set_num_threads(cfg.threads if cfg.threads is not None else torch.get_num_threads())
        torch.manual_seed(cfg.seed)
        model = openclip_model(run.model)
        o = cfg.optim
        opt = openclip_optimizer(model, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        sched = cosine_lr(opt, o.lr, math.ceil(cfg.schedule.warmup_ratio * steps), steps)
        args = ap.Namespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False, grad_clip_norm=o.clip_grad,
                            horovod=False, log_every_n_steps=100, batch_size=loader.config.batch_size, world_size=1, rank=0, local_rank=0,
                            wandb=False)
        loss = ClipLoss()

        def data(ep):
            dl = torch.utils.data.DataLoader(ep, batch_size=None, shuffle=False, num_workers=0)
            dl.num_batches, dl.num_samples = per_epoch, per_epoch * args.batch_size   # the step index open_clip gives its schedule
            return {"train": DataInfo(dl)}
        prof = None
        if profile:
            import cProfile
            prof = cProfile.Profile(time.process_time)
        tree0, c0, w0 = tree_cpu_s(), time.process_time(), time.perf_counter()
        if prof: prof.enable()
        for e, ep in enumerate(epochs): train_one_epoch(model, data(ep), loss, e, opt, None, sched, None, args)
        if prof: prof.disable()
        cpu, wall, tree = time.process_time() - c0, time.perf_counter() - w0, tree_cpu_s() - tree0
        out = dict(steps=sum(map(len, epochs)), cpu=cpu, eval_cpu=0.0, ckpt_cpu=0.0, tree_cpu=tree, wall=wall, threads=torch.get_num_threads(),
                   workers=0, epochs=len(epochs), batches=[checksum(p, t[:, 0]) for ep in epochs for p, t in ep],
                   **scores(run), machine=machine(0), open_clip=open_clip.__version__, torch=torch.__version__)
        if prof: out["profile"] = profile_parts(prof)
        return out


def child(which: str, args) -> None:
    "One run in this interpreter; its result as one JSON line."
    os.environ.setdefault("WANDB_MODE", "offline"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        r = openclip_run(args.steps, args.threads, args.profile) if which == "c" else mmlit_run(args.steps, which == "a", args.threads, args.profile)
    except ImportError as e: r = {"error": f"does not import: {type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(r))


def spawn(which: str, args) -> dict:
    "Run `which` in a fresh interpreter; its JSON result (or the error it printed)."
    cmd = [sys.executable, __file__, "--only", which, "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--profile"] if args.profile else [])
    if args.profile_steps: cmd[cmd.index("--steps") + 1] = str(args.profile_steps)
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None: return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] or p.stdout[-300:]}"}
    return json.loads(line[len("RESULT "):])


def report_profile(name: str, prof: dict, steps: int) -> None:
    "Where one run's profiled CPU goes: named parts (cumulative ms a step) and the top functions by own time."
    print(f"\n  profile of {name}: {prof['total'] / steps * 1000:.1f} ms a step under cProfile")
    keys = {"forward (model)": ["module.py:_call_impl"], "backward": ["__init__.py:backward", "_tensor.py:backward", "graph.py:_engine_run_backward"],
            "optimizer step": ["optimizer.py:wrapper", "adamw.py:step", "adam.py:step"], "grad clip": ["clip_grad.py:clip_grad_norm_", "clip_grad.py:_clip_grads_with_norm_"],
            "loss (mmlit)": ["losses.py:contrastive_losses"], "loss (open_clip)": ["loss.py:forward"],
            "ledger": ["ledger.py:record_micro_batch"], "checkpoint save": ["train.py:save"], "evaluation": ["train.py:evaluate"],
            "log row (_update)": ["train.py:_update"], "metrics file": ["train.py:add"], "loader next": ["dataloader.py:__next__", "loader.py:__next__"],
            "scheduler": ["lr_scheduler.py:step", "scheduler.py:_lr_adjuster"], "zero_grad": ["optimizer.py:zero_grad"], "seed per step": ["train.py:_seed_micro"]}
    cum = prof["cumulative"]
    for part, names in keys.items():
        v = max(cum.get(n, 0.0) for n in names)                # nested names (a wrapper and what it calls): the outer one
        if v: print(f"    {part:22} {v / steps * 1000:7.2f} ms/step")
    print("    top own time: " + "; ".join(f"{n} {t / steps * 1000:.2f}" for t, n in prof["top_own"][:12]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of a, b, c (order rotated); figures are medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the demo's)")
    ap.add_argument("--only", choices=sorted(RUNS), help="one run in this interpreter (used by the parent)")
    ap.add_argument("--runs", default="abc", help="which runs (default: abc)")
    ap.add_argument("--profile", action="store_true", help="after the timed runs, b and c again under cProfile (CPU time)")
    ap.add_argument("--profile-steps", type=int, default=60, help="steps of each profiled run")
    args = ap.parse_args()
    if args.only: return child(args.only, args)
    from mmlit.recipe import cpu_model
    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores; load before {load()}; {args.steps} steps a run", flush=True)
    res = {k: [] for k in args.runs}
    profile, args.profile, steps_arg = args.profile, False, args.profile_steps
    args.profile_steps = None
    for r in range(args.repeats):
        order = args.runs[r % len(args.runs):] + args.runs[:r % len(args.runs)]
        for k in order:
            res[k].append(spawn(k, args))
            x = res[k][-1]
            print(f"  [{k}] " + (x["error"] if "error" in x else f"{x['steps'] / x['cpu']:.2f} steps/CPU-s as run, zero-shot {x['zeroshot']:.3f}; load {load()}"), flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"\n{'run':38} {'steps':>5} {'threads':>7} {'as run':>7} {'training':>8} {'+workers':>8} {'wall':>7} {'zero-shot':>9} {'hard-neg':>8}")
    print(f"{'':38} {'':>5} {'':>7} {'steps per CPU-second (process_time)':>34} {'steps/s':>7}")
    rate = {}
    for k, xs in res.items():
        ok = [x for x in xs if "error" not in x]
        if not ok: print(f"{k}. {RUNS[k]:35} {xs[0]['error']}"); continue
        st = ok[0]["steps"]
        as_run = med([x["steps"] / x["cpu"] for x in ok])
        train = med([x["steps"] / (x["cpu"] - x["eval_cpu"] - x["ckpt_cpu"]) for x in ok])
        tree = med([x["steps"] / (x["tree_cpu"] - x["eval_cpu"] - x["ckpt_cpu"]) for x in ok])
        wall = med([x["steps"] / x["wall"] for x in ok])
        zs = med([x["zeroshot"] for x in ok]); hn = ok[0]["hardneg"]
        rate[k] = (as_run, train)
        print(f"{k}. {RUNS[k]:35} {st:>5} {ok[0]['threads']:>7} {as_run:>7.2f} {train:>8.2f} {tree:>8.2f} {wall:>7.2f} {zs:>9.3f} "
              f"{'-' if hn is None else f'{hn:.3f}':>8}")
        extra = f"eval {med([x['eval_cpu'] for x in ok]):.1f} CPU-s, checkpoints {med([x['ckpt_cpu'] for x in ok]):.1f} CPU-s, {ok[0]['epochs']} epochs, loader workers {ok[0]['workers']}"
        print(f"   {extra}" + (f"; open_clip {ok[0]['open_clip']}, torch {ok[0]['torch']}" if k == "c" else ""))
    print("  'training' leaves out the evaluation and the checkpoint writes inside fit; '+workers' adds the loader workers' CPU to it.")
    if "b" in rate and "c" in rate:
        print(f"\nmmlit without negatives / open_clip, steps per CPU-second: as run {rate['b'][0] / rate['c'][0]:.2f}x, "
              f"training {rate['b'][1] / rate['c'][1]:.2f}x (goal >= 0.9x)")
        same = [x["batches"] for x in res["b"] if "batches" in x][:1] == [x["batches"] for x in res["c"] if "batches" in x][:1]
        print(f"open_clip trained on the same batches as mmlit without negatives: {'yes' if same else 'NO'}")
    if "a" in rate and "b" in rate:
        print(f"cost of the hard negatives: mmlit with / without, steps per CPU-second {rate['a'][1] / rate['b'][1]:.2f}x (training)")
    if profile:
        args.profile, args.profile_steps = True, steps_arg
        for k in ("b", "c"):
            x = spawn(k, args)
            if "error" in x: print(f"\n  profile of {k}: {x['error']}")
            else: report_profile(f"{k}. {RUNS[k]} ({x['steps']} steps)", x["profile"], x["steps"])
    m = next((x["machine"] for xs in res.values() for x in xs if "machine" in x), None)
    print(f"\nmeasured on {m['cpu'] if m else cpu_model()} ({os.cpu_count()} cores); load after {load()}")


if __name__ == "__main__":
    main()
