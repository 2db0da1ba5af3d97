"""What handing a batch from a loader worker to the main process costs, per batch.

A 2-worker `DataLoader` over premade samples (no decoding: the workers only collate), persistent
workers, batches drained after a warm-up. Per batch it prints the CPU the workers spent (collate,
then pickling the batch onto the queue: a tensor not already in shared memory is first copied into
a new shared-memory segment), the CPU the main process spent receiving it (unpickling: one file
descriptor per tensor storage, each fetched from the worker over a Unix socket), and the wall time.

Three ways to build the batch, with the same values:
- `stack`: every tensor built in private memory (`torch.stack`, padding into a new tensor), then
  copied into its own shared-memory segment by the pickler: one descriptor per tensor;
- `shared`: the tensors of 1 MiB or more built straight in shared memory inside a worker
  (`mmlit.collate.batch_empty`, `stack`), so pickling them copies nothing;
- `one-block`: `shared`, then the small tensors copied into one shared block and handed over as
  views (`mmlit.collate.one_block`, which `mmlit.loader` applies to every batch a worker collates).

Two batches: 64 images of 3x224x224 uint8 with an int label, and one shaped like `mmlit demo`'s
(64 samples: 3x48x48 uint8 images, captions of 8-32 tokens and 11 negatives each, contrastive
collator over the multimodal one).

Measured on a 2-core Intel Xeon shared with other jobs (2026-12-07, load average ~3.5;
`--batches 300 --rounds 3`), ms per batch, worker CPU / main-process CPU:

- 64 images 3x224x224 uint8: stack 8.10 / 0.95; shared 6.43 / 0.88; one-block 6.93 / 1.04 (the image
  tensor is the only big one and the label alone has nothing to share a block with: the same as shared).
- demo-shaped: stack 11.17 / 1.20; shared 10.60 / 1.20; one-block 9.57 / 0.62. Receiving costs the main
  process ~0.1 ms per tensor, so seven tensors in one block halve its share.
- `mmlit demo`'s own train loader (1 worker, its seven batch tensors; 3 epochs of 37 batches, median of
  3 rounds, load ~2): main-process CPU 1.67 ms per batch with every tensor copied and sent on its own,
  1.04 ms with the current collators (big tensors built in shared memory, the rest in one block).

    python bench/transfer.py                 # both batches, 200 batches each, 3 rounds
    python bench/transfer.py --batches 400 --rounds 5
"""
import argparse
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mmlit.collate import ContrastiveCollator, VisionCollator, one_block


def cpu_s(pid: int) -> float:
    "utime + stime of a process, in seconds (from /proc)."
    with open(f"/proc/{pid}/stat") as f: parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


class Premade(Dataset):
    "The same premade samples for every batch: the workers only collate."
    def __init__(self, samples: list, n: int): self.samples, self.n = samples, n
    def __len__(self): return self.n
    def __getitems__(self, idx): return [self.samples[i % len(self.samples)] for i in idx]


class Plain:
    "The collator as it would run with `torch.stack` into private memory (`mmlit.collate` told it is not in a worker)."
    def __init__(self, collate): self.collate = collate
    def __call__(self, samples):
        import mmlit.collate as mc
        real, mc.get_worker_info = mc.get_worker_info, lambda: None
        try: return self.collate(samples)
        finally: mc.get_worker_info = real


class OneBlock:
    "The collator, then `one_block` inside a worker (what `mmlit.loader` does with every batch)."
    def __init__(self, collate): self.collate = collate
    def __call__(self, samples):
        batch = self.collate(samples)
        return one_block(batch) if get_worker_info() is not None else batch


def image_samples(n: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    return [dict(pixel_values=torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=g), label=i % 10) for i in range(n)]


def demo_samples(n: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    def ids(): return torch.randint(5, 500, (int(torch.randint(8, 33, (), generator=g)),), generator=g)
    out = []
    for i in range(n):
        x = ids()
        negs = [ids() for _ in range(11)]
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), label=i % 10,
                        pixel_values=torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g),
                        negative_input_ids=negs, negative_attention_mask=[torch.ones_like(t) for t in negs]))
    return out


def measure(samples: list, collate, batches: int, bs: int = 64, workers: int = 2, warm: int = 20) -> dict:
    "Per batch: worker CPU, main-process CPU and wall, in ms, over `batches` after `warm`."
    dl = DataLoader(Premade(samples, (batches + warm) * bs), batch_size=bs, collate_fn=collate, num_workers=workers,
                    persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    it = iter(dl)
    for _ in range(warm): next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    w0, m0, t0 = sum(cpu_s(p) for p in pids), time.process_time(), time.perf_counter()
    for _ in range(batches): next(it)
    w1, m1, t1 = sum(cpu_s(p) for p in pids), time.process_time(), time.perf_counter()
    del it, dl
    return dict(worker=(w1 - w0) / batches * 1e3, main=(m1 - m0) / batches * 1e3, wall=(t1 - t0) / batches * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = {"images 64x3x224x224 uint8": (image_samples(), VisionCollator()),
             "demo-shaped (64, 48px, 11 negatives)": (demo_samples(), ContrastiveCollator(base="multimodal", pad_token_id=0))}
    print(f"load average {os.getloadavg()[0]:.1f}; {args.batches} batches of 64, 2 workers; median of {args.rounds} rounds, ms per batch")
    for name, (samples, col) in cases.items():
        ways = {"stack": Plain(col), "shared": col, "one-block": OneBlock(col)}
        runs = {w: [] for w in ways}
        for _ in range(args.rounds):                       # round robin: a change of load hits every way alike
            for w, c in ways.items(): runs[w].append(measure(samples, c, args.batches))
        print(name)
        for w, rs in runs.items():
            med = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]}
            print(f"  {w:10s} worker CPU {med['worker']:6.2f}  main CPU {med['main']:6.2f}  wall {med['wall']:6.2f}")


if __name__ == "__main__":
    main()
