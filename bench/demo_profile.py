"""Where `mmlit demo`'s CPU time goes: training step, loader wait, preprocessing (tokenising, PNG decode), evaluation.

A short run of the demo's own config (`demo_config`, `build_run`, `schedule.max_steps`) gives the shares;
the full demo's figures are projected from them (steps × CPU per step + evaluations × CPU per evaluation).

CPU seconds (user + sys) are the figures to compare: this process and its loader workers, read from
/proc (live workers) and `getrusage` (reaped ones), so other load on a shared machine does not enter.
Wall seconds are printed beside them, marked "wall". Every table line names the CPU model, the load
average and the thread counts it was measured with.

Sections:
  1. preprocessing, per training sample, in this process (no loader): the caption and its 11
     negatives tokenised, the 64×64 PNG decoded, the image transform, the whole preprocessor —
     with the token cache on and off, interleaved (off, on, off, on, ...), best of `--repeats`;
  2. a short training run (`--steps`, default 2 epochs) with the cache on and off: the main process's
     CPU (training step + waiting) and the worker's CPU (fetch + preprocess + collate), the loader
     profile (`loader_profile.json`'s fields, wall), and one evaluation (the zero-shot prompt set), CPU;
  3. the shares of the full demo (50 epochs, its evaluations) projected from section 2.

    python bench/demo_profile.py                 # ~2 minutes on a 2-core machine
    python bench/demo_profile.py --steps 150     # steadier
"""
import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    "The CPU's model name (`mmlit.recipe.cpu_model`), and the cores this process may use."
    from mmlit.recipe import cpu_model as name
    return f"{name()}, {len(os.sched_getaffinity(0))} cores"


def where() -> str:
    "CPU model, load average and torch threads: printed beside each figure."
    import torch
    return f"[{cpu_model()}; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch threads {torch.get_num_threads()}]"


def _stat(pid: int) -> list[str] | None:
    try: return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError: return None


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try: out += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError: pass
    return out


def tree_cpu_s(pid: int | None = None) -> float:
    "CPU seconds (user + sys) of `pid` (default: this process), its reaped children and its live descendants."
    tick, todo, total, first = os.sysconf("SC_CLK_TCK"), [pid or os.getpid()], 0, True
    while todo:
        p = todo.pop(); f = _stat(p)
        if f is None: continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])   # utime stime cutime cstime
        todo += _children(p)
    return total / tick


class Clock:
    "CPU (this process tree) and wall seconds between `start` and `stop`."
    def __enter__(self): self.c0, self.w0 = tree_cpu_s(), time.perf_counter(); return self
    def __exit__(self, *a): self.cpu, self.wall = tree_cpu_s() - self.c0, time.perf_counter() - self.w0


def dual_encoder_preprocessor(transform):
    "The `DualEncoderPreprocessor` inside the run's transform (wrapped by `WithTask`)."
    return getattr(transform, "preprocessor", transform)


def preprocessing_section(run, n: int, repeats: int):
    "CPU seconds per sample of each preprocessing part, cache off and on interleaved; best of `repeats`."
    import numpy as np
    from PIL import Image
    from mmlit.text import encode_text
    import io
    import pyarrow.parquet as pq
    pre = dual_encoder_preprocessor(run.data.transform)
    ds = run.data.train_data
    recs = [ds[i] for i in range(min(n, len(ds)))]
    png = [c["bytes"] for c in pq.read_table(run.config.data["data"], columns=["image"]).column("image")[: len(recs)].to_pylist()]
    fresh = lambda k: Image.open(io.BytesIO(png[k]))     # an undecoded image, as the source hands it over

    def tokenise(cache: bool):
        enc = pre.encode if cache else (lambda t: encode_text(pre.tokenizer, t, pre.max_length))
        for r in recs:
            enc(r["text"])
            for t in r["negatives"]: enc(t)

    def decode(_):
        for k in range(len(recs)): fresh(k).load()

    def image(_):
        for k in range(len(recs)): pre.images(fresh(k), np.random.default_rng(k))

    def whole(cache: bool):
        for k, r in enumerate(recs): pre({**r, "image": fresh(k)}, np.random.default_rng(k))

    parts = {"tokenise caption + 11 negatives": tokenise, "PNG decode (64x64)": decode,
             "image transform (decode + crop + resize)": image, "whole preprocessor": whole}
    best = {(name, c): float("inf") for name in parts for c in (False, True)}
    for _ in range(repeats):
        for name, fn in parts.items():
            for cache in (False, True):
                pre.clear_cache(); pre.cache_size = type(pre).cache_size if cache else 0
                if cache: fn(True)              # warm: the training loop sees each string every epoch
                t0 = time.process_time(); fn(cache); best[name, cache] = min(best[name, cache], time.process_time() - t0)
        pre.cache_size = type(pre).cache_size
    print(f"\n1. preprocessing, CPU ms per training sample (best of {repeats} interleaved runs over {len(recs)} samples) {where()}")
    print(f"   {'part':44} {'cache off':>10} {'cache on':>10} {'off/on':>7}")
    for name in parts:
        off, on = (best[name, c] / len(recs) * 1e3 for c in (False, True))
        print(f"   {name:44} {off:10.3f} {on:10.3f} {off / on if on else float('nan'):6.1f}x")
    return best


def run_section(root: Path, steps: int, cache: bool, tag: str):
    "A short demo run (cache on or off): CPU of the fit (main, workers), the loader profile, one evaluation."
    import json
    from mmlit.recipe import build_run, demo_config
    cfg = demo_config(root / f"run-{tag}")
    cfg.schedule.max_steps, cfg.log.progress = steps, False
    run = build_run(cfg)
    pre = dual_encoder_preprocessor(run.data.transform)
    pre.cache_size = type(pre).cache_size if cache else 0
    main0, all0, w0 = resource.getrusage(resource.RUSAGE_SELF), tree_cpu_s(), time.perf_counter()
    run.fit()
    main1, all1, wall = resource.getrusage(resource.RUSAGE_SELF), tree_cpu_s(), time.perf_counter() - w0
    main_cpu = (main1.ru_utime + main1.ru_stime) - (main0.ru_utime + main0.ru_stime)
    prof = json.loads((Path(cfg.run_dir) / "loader_profile.json").read_text())
    with Clock() as ev: run.trainer.evaluate()
    return dict(steps=run.trainer.step, fit_cpu=all1 - all0, main_cpu=main_cpu, worker_cpu=all1 - all0 - main_cpu,
                fit_wall=wall, eval_cpu=ev.cpu, eval_wall=ev.wall, prof=prof, epoch_steps=len(run.trainer.train_loader),
                full_steps=len(run.trainer.train_loader) * 50, eval_every=cfg.eval.every)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=76, help="optimiser steps of each short run (the demo: 38 an epoch)")
    ap.add_argument("--samples", type=int, default=512, help="samples in the preprocessing section")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-runs", action="store_true", help="the preprocessing section only")
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    from mmlit.recipe import build_run, demo_config
    torch.set_num_threads(1)                                       # the demo's `threads=1`
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = demo_config(root / "probe"); cfg.schedule.max_steps = 1; cfg.log.progress = False
        probe = build_run(cfg)
        print(f"mmlit demo profile {where()}; loader workers {cfg.data['loader']['num_workers']}")
        preprocessing_section(probe, a.samples, a.repeats)
        del probe
        if a.skip_runs: return
        res = {}
        for k, cache in enumerate((False, True, False, True)):    # interleaved: off, on, off, on
            r = run_section(root, a.steps, cache, f"{k}")
            key = "on" if cache else "off"
            res[key] = r if key not in res or r["fit_cpu"] < res[key]["fit_cpu"] else res[key]
        print(f"\n2. short demo runs ({a.steps} steps, best of 2 interleaved each), seconds {where()}")
        print(f"   {'':34} {'cache off':>10} {'cache on':>10}")
        rows = [("fit CPU, all processes", "fit_cpu"), ("  main process CPU (step + wait)", "main_cpu"),
                ("  loader worker CPU", "worker_cpu"), ("fit wall", "fit_wall"), ("one evaluation CPU", "eval_cpu"),
                ("one evaluation wall", "eval_wall")]
        for label, k in rows: print(f"   {label:34} {res['off'][k]:10.2f} {res['on'][k]:10.2f}")
        for label, k in (("loader profile: step_s (wall)", "step_s"), ("loader profile: wait_s (wall)", "wait_s"),
                         ("loader profile: preprocess (wall)", "preprocess"), ("loader profile: fetch (wall)", "fetch"),
                         ("loader profile: collate (wall)", "collate")):
            print(f"   {label:34} {res['off']['prof'].get(k, float('nan')):10.2f} {res['on']['prof'].get(k, float('nan')):10.2f}")
        print(f"\n3. the full demo ({res['on']['full_steps']} steps, {res['on']['full_steps'] // res['on']['eval_every'] + 1} "
              f"evaluations), projected CPU seconds and shares {where()}")
        print(f"   {'':34} {'cache off':>16} {'cache on':>16}")
        proj = {}
        for key, r in res.items():
            per = r["full_steps"] / r["steps"]
            n_eval = r["full_steps"] // r["eval_every"] + 1
            pw = r["prof"]
            busy = pw["fetch"] + pw["preprocess"] + pw["collate"] or 1.0
            worker = r["worker_cpu"] * per
            proj[key] = {"main process: training step + loop": r["main_cpu"] * per,
                         "loader worker: preprocess": worker * pw["preprocess"] / busy,   # split by the worker's own wall shares
                         "loader worker: fetch + collate": worker * (pw["fetch"] + pw["collate"]) / busy,
                         "evaluation": r["eval_cpu"] * n_eval}
            proj[key]["total"] = sum(proj[key].values())
        for label in proj["off"]:
            cells = [f"{proj[k][label]:8.0f} ({proj[k][label] / proj[k]['total']:4.0%})" for k in ("off", "on")]
            print(f"   {label:34} {cells[0]:>16} {cells[1]:>16}")
        wait = {k: res[k]["prof"]["wait_fraction"] for k in res}
        print(f"   loader wait, share of the main loop's wall time: off {wait['off']:.1%}, on {wait['on']:.1%} (wall)")
        print(f"   total CPU, cache on / off: {proj['on']['total'] / proj['off']['total']:.3f}")


if __name__ == "__main__":
    main()
