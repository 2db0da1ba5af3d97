"""Trainer overhead: mmlit's `Trainer` step time against a minimal hand-written PyTorch loop on the same model, data and
loader, the cost of the per-sample loss ledger (the trainer with `log.ledger` on and off), the fraction of step time
spent waiting for data, and the time to write a checkpoint — all measured in one run.

    python bench/train.py [--steps 30] [--batch 64] [--repeats 3] [--threads 1]

The model is stage 5's tiny DualEncoder on the bundled demo data (32 px images); each repeat runs the hand loop and the
trainer (ledger on and off) on fresh, identically seeded copies, in a rotating order, and the figures are medians over
repeats. The machine may be shared, so CPU time (user + sys of this process) is the figure to trust; wall time is shown too.
"""
import argparse, json, statistics, tempfile, time
from pathlib import Path

import torch

from mmlit.checkpoint import CheckpointManager
from mmlit.core import Stream, derive_seed
from mmlit.demo import ensure_demo
from mmlit.loader import LoaderConfig
from mmlit.datamodule import build_data_module
from mmlit.model import DualEncoder, DualEncoderConfig
from mmlit.step import (CheckpointConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig,
                        build_optimizer, build_scheduler)
from mmlit.train import Trainer


def parts(batch: int, tok_dir: Path):
    paths = ensure_demo()
    tok = str(tok_dir) if (tok_dir / "tokenizer.json").is_file() else {"train": {"vocab_size": 512}, "save_dir": str(tok_dir)}
    dm = build_data_module(dict(data=str(paths["parquet"][0]), tokenizer=tok, preprocessor="clip",
                                preprocessor_options=dict(size=32, uint8=True, flip=0.0, jitter=0.0), max_length=32,
                                batch_size=batch, seed=0))
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    return dm.train_dataloader(), DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=vocab))


def hand_loop(loader, model, steps: int) -> tuple[float, float]:
    "Wall and CPU seconds per step of the plainest loop: forward, backward, clip, AdamW, schedule."
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, steps, ScheduleConfig())
    model.train()
    it, t0, c0 = iter(loader), time.perf_counter(), time.process_time()
    for s in range(steps):
        batch = next(it)
        model.set_step(0, s)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


LEDGER_CPU = []                                       # CPU seconds inside the ledger (per-sample losses, buffering, writes) per run


def timed(fn):
    "`fn`, its CPU time added to the last entry of LEDGER_CPU."
    def wrapper(*args, **kwargs):
        c0 = time.process_time()
        try: return fn(*args, **kwargs)
        finally: LEDGER_CPU[-1] += time.process_time() - c0
    return wrapper


def trainer_run(loader, model, steps: int, run_dir: Path, ledger: bool = True) -> tuple[float, float, float, Trainer]:
    "Wall and CPU seconds per step of `Trainer.fit` (its final checkpoint write excluded; the ledger's write included), the fraction waiting for data."
    cfg = TrainConfig(run_dir=str(run_dir), schedule=ScheduleConfig(max_steps=steps), eval=EvalConfig(at_epoch_end=False),
                      checkpoint=CheckpointConfig(at_epoch_end=False), log=LogConfig(progress=False, ledger=ledger))
    t = Trainer(model, cfg, loader)
    LEDGER_CPU.append(0.0)
    if t.ledger is not None: t.ledger.flush = timed(t.ledger.flush)
    save = t.save
    t.save = lambda best=False: None                  # time the steps alone; the checkpoint is timed below
    t0, c0 = time.perf_counter(), time.process_time()
    t.fit()
    per_step, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    t.save = save
    return per_step, cpu, t.wait_s / (t.wait_s + t.step_s), t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30); ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3); ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import mmlit.train
    mmlit.train.record_micro_batch = timed(mmlit.train.record_micro_batch)   # the ledger's work in the step, timed directly
    tmp = Path(tempfile.mkdtemp(prefix="mmlit-bench-train-"))
    hand, trainer, wait, hand_cpu, trainer_cpu, bare, bare_cpu, ledger_cpu = [], [], [], [], [], [], [], []
    kinds = ["hand", "trainer", "no-ledger"]
    for r in range(a.repeats):
        for kind in kinds[r % 3:] + kinds[:r % 3]:            # each kind first, middle and last in turn
            torch.manual_seed(derive_seed(0, 0, 0, Stream.MODEL_INIT))
            loader, model = parts(a.batch, tmp / "tok")
            if kind == "hand":
                s, c = hand_loop(loader, model, a.steps)
                hand.append(s); hand_cpu.append(c)
            elif kind == "trainer":
                s, c, w, t = trainer_run(loader, model, a.steps, tmp / f"run{r}")
                trainer.append(s); trainer_cpu.append(c); wait.append(w); ledger_cpu.append(LEDGER_CPU[-1] / a.steps)
                assert (t.run_dir / "ledger").is_dir(), "the ledger wrote nothing"
            else:
                s, c, _, _ = trainer_run(loader, model, a.steps, tmp / f"bare{r}", ledger=False)
                bare.append(s); bare_cpu.append(c)
    ck = []
    for k in range(5):
        t0 = time.perf_counter(); t.step += 1; t.save(); ck.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in CheckpointManager(t.run_dir / "checkpoints").latest().iterdir())
    med = statistics.median
    res = dict(steps=a.steps, batch=a.batch, repeats=a.repeats, threads=a.threads,
               hand_s_per_step=round(med(hand), 4), trainer_s_per_step=round(med(trainer), 4),
               trainer_over_hand=round(med(trainer) / med(hand), 3),
               hand_cpu_s_per_step=round(med(hand_cpu), 4), trainer_cpu_s_per_step=round(med(trainer_cpu), 4),
               trainer_over_hand_cpu=round(med(trainer_cpu) / med(hand_cpu), 3), wait_fraction=round(med(wait), 4),
               no_ledger_s_per_step=round(med(bare), 4), no_ledger_cpu_s_per_step=round(med(bare_cpu), 4),
               ledger_over_off=round(med(trainer) / med(bare), 4), ledger_over_off_cpu=round(med(trainer_cpu) / med(bare_cpu), 4),
               ledger_over_off_cpu_paired=round(med([a_ / b_ for a_, b_ in zip(trainer_cpu, bare_cpu)]), 4),
               ledger_cpu_s_per_step=round(med(ledger_cpu), 6), ledger_share_of_step_cpu=round(med([l / c for l, c in zip(ledger_cpu, trainer_cpu)]), 5),
               checkpoint_write_s=round(med(ck), 4), checkpoint_mb=round(size / 2**20, 2),
               checkpoint_over_step=round(med(ck) / med(trainer), 2))
    print(f"trainer {res['trainer_s_per_step'] * 1e3:.1f} ms/step vs hand-written loop {res['hand_s_per_step'] * 1e3:.1f} ms/step: "
          f"{res['trainer_over_hand']:.3f}x wall (goal <= 1.05x); CPU time {res['trainer_cpu_s_per_step'] * 1e3:.1f} vs "
          f"{res['hand_cpu_s_per_step'] * 1e3:.1f} ms/step: {res['trainer_over_hand_cpu']:.3f}x")
    print(f"per-sample ledger: CPU time {res['trainer_cpu_s_per_step'] * 1e3:.2f} vs {res['no_ledger_cpu_s_per_step'] * 1e3:.2f} ms/step "
          f"with it on and off: {res['ledger_over_off_cpu'] - 1:+.2%} (median of per-repeat ratios {res['ledger_over_off_cpu_paired'] - 1:+.2%}); "
          f"wall {res['ledger_over_off'] - 1:+.2%}; timed inside the step: {res['ledger_cpu_s_per_step'] * 1e3:.2f} ms of CPU a step, "
          f"{res['ledger_share_of_step_cpu']:.2%} of the step's CPU time (goal <= 2%)")
    print(f"waiting for data: {res['wait_fraction']:.1%} of step time")
    print(f"checkpoint write: {res['checkpoint_write_s'] * 1e3:.0f} ms for {res['checkpoint_mb']} MB "
          f"({res['checkpoint_over_step']:.1f} steps' time)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
