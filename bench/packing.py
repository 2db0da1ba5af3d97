"""Packing vs padding on the bundled text corpus: fraction of real (non-pad) tokens and collate time per batch.

Corpus: mmlit's bundled LM corpus (`mmlit.demo.build_demo_corpus`: the documentation topics the
Python standard library ships in `pydoc_data`), read with `mmlit.sources.TextCorpus` and tokenized
with a byte-level BPE trained on it here by `mmlit.text.train_tokenizer` (nothing downloaded). Two
sample sets: lines (`split="line"`: short, very uneven samples, like captions or chat turns) and
documents (`split="paragraph"`: one topic each) cut into `--max-length` windows (LM-style: most
windows are exactly `--max-length`, the last one of each document is shorter). Batches of `--batch`
samples in a seeded shuffled order (whole batches only, as a training loader with drop_last gives)
are collated by `TextCollator` (batch_max padding, the baseline) and by `PackingCollator` (rows of
at most `--row-tokens`). For document windows a packed row holds four full windows, so what packing
loses is the last, partly filled row of each batch: the real-token fraction rises with the number
of samples per batch, which the sweep shows — or rows are planned once over the whole dataset
(`PackedRows`), each row one loader item, which leaves only the dataset's last row partly filled.

A last section trains the tiny VLM (`mmlit.vlm`, model kind `vlm`) on the demo's task conversations
(`mmlit.demo.scene_records`: caption, question answering, pointing, counting; 56-pixel scenes as the
demo trains on, 4 image tokens each): the same batches as padded rows (`Qwen2VLCollator`) and as packed rows
(`PackingCollator`, rows of `--vlm-row-tokens`, mRoPE positions restarting per conversation), one thread, timing forward +
backward + optimiser step. Tokens/s counts real (non-pad) tokens per second of process CPU time,
which a machine shared with other jobs disturbs far less than wall time (both are printed).

    python bench/packing.py [--quick] [--batch 64] [--max-length 512] [--row-tokens 2048] [--vlm-only] [--vlm-row-tokens 256]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from mmlit.collate import TextCollator
from mmlit.core import np_rng
from mmlit.sources import TextCorpus
from mmlit.demo import build_demo_corpus
from mmlit.packing import PackedRows, PackingCollator
from mmlit.text import token_ids, train_tokenizer


def samples_of(texts: list[str], tok, max_length: int) -> list[dict]:
    "Stage-2 style samples: each text + EOS, cut into windows of at most `max_length` tokens."
    out = []
    for text in texts:
        ids = token_ids(tok, text) + [tok.eos_token_id]
        for i in range(0, len(ids), max_length):
            w = torch.tensor(ids[i:i + max_length])
            out.append(dict(input_ids=w, attention_mask=torch.ones_like(w), labels=w.clone()))
    return out


def batches_of(samples: list[dict], bsz: int) -> list[list[dict]]:
    order = np_rng(0).permutation(len(samples))
    return [[samples[i] for i in order[j:j + bsz]] for j in range(0, len(order) - bsz + 1, bsz)]


def run(collate, batches) -> tuple[float, float]:
    "(fraction of real tokens, mean ms per batch)."
    real = total = 0
    t0 = time.perf_counter()
    for b in batches:
        out = collate(b)
        flat = [x for s in b for x in (s if isinstance(s, list) else [s])]   # planned rows are lists of samples
        real += sum(len(s["input_ids"]) for s in flat)
        total += out["input_ids"].numel()
    return real / total, (time.perf_counter() - t0) / len(batches) * 1e3


def vlm_throughput(quick: bool, batch: int = 32, row_tokens: int = 256, px: int = 56) -> None:
    "Tokens/s of the tiny VLM's training step on the demo conversations (`px`-pixel images, as the demo), padded vs packed."
    from mmlit.causal_lm import CausalLM
    from mmlit.collate import Qwen2VLCollator
    from mmlit.demo import scene_records, scene_row
    from mmlit.multimodal import build_preprocessor
    from mmlit.vlm import vlm_config, vlm_loss
    torch.set_num_threads(1)
    recs = [r for i in range(16 if quick else 64) for r in scene_records(scene_row(i))]
    tok = train_tokenizer([m["content"] for r in recs for m in r["messages"]], vocab_size=512)
    pre = build_preprocessor("vlm", tok, min_pixels=px * px, max_pixels=px * px)
    samples = [pre(r) for r in recs]
    batches = batches_of(samples, batch)
    lens = torch.tensor([len(s["input_ids"]) for s in samples]).float()
    print(f"\n# VLM on the demo conversations: {len(samples)} samples, length mean {lens.mean():.0f} min {int(lens.min())} "
          f"max {int(lens.max())}; {len(batches)} batches of {batch}; tiny Qwen2-VL, 1 thread, forward + backward + AdamW step")
    print(f"{'collator':40s} {'real tokens':>11s} {'tokens/s (CPU)':>15s} {'tokens/s (wall)':>16s} {'loss':>8s}")
    results = {}
    for name, coll in (("padded (Qwen2VLCollator, batch_max)", Qwen2VLCollator(tok)),
                       (f"packed (PackingCollator, rows <= {row_tokens})", PackingCollator(tok, max_length=row_tokens))):
        model = CausalLM(vlm_config(tok), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        collated = [coll(b) for b in batches]
        real = sum(len(s["input_ids"]) for b in batches for s in b)
        total = sum(c["input_ids"].numel() for c in collated)
        loss = vlm_loss(model, collated[0]); loss.backward(); opt.zero_grad()        # warm-up, not timed
        c0, w0 = time.process_time(), time.perf_counter()
        for c in collated:
            loss = vlm_loss(model, c); loss.backward(); opt.step(); opt.zero_grad()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        results[name] = real / cpu
        if name.startswith("padded"): padded_real = real / total
        print(f"{name:40s} {real / total:11.3f} {real / cpu:15.0f} {real / wall:16.0f} {loss.item():8.4f}")
    (pad, packed) = results.values()
    print(f"{'packed / padded':40s} {'':11s} {packed / pad:15.2f}")
    print(f"# why not more: the conversations are {int(lens.min())}-{int(lens.max())} tokens, so padded rows are already "
          f"{padded_real:.0%} real tokens and packing can save at most {1 / padded_real:.2f}x of the work; a packed row attends "
          f"over its whole length (a cost growing with the square of the row length), so long rows give back what packing "
          f"saves; short rows (--vlm-row-tokens) lose less of it")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 20 documents only")
    ap.add_argument("--batch", type=int, default=64, help="samples per collate call")
    ap.add_argument("--max-length", type=int, default=512, help="longest sample (documents are cut into windows)")
    ap.add_argument("--row-tokens", type=int, default=2048, help="token budget of a packed row")
    ap.add_argument("--vlm-only", action="store_true", help="only the VLM section")
    ap.add_argument("--vlm-row-tokens", type=int, default=256, help="token budget of a packed row in the VLM section")
    a = ap.parse_args()
    if a.vlm_only: return vlm_throughput(a.quick, row_tokens=a.vlm_row_tokens)
    path = build_demo_corpus(Path(tempfile.mkdtemp()) / "corpus.txt")
    docs = [r["text"] for r in TextCorpus(path).records()][: 20 if a.quick else None]
    tok = train_tokenizer(docs, vocab_size=4000)
    lines = TextCorpus(path, split="line")
    units = {"lines": [r["text"] for r in lines.records()][: 2000 if a.quick else None],
             "document windows": docs}
    print(f"{'samples':17s} {'collator':44s} {'real tokens':>11s} {'ms/batch':>9s} {'time vs batch_max':>18s}")
    for unit, texts in units.items():
        samples = samples_of(texts, tok, a.max_length)
        bsz = min(a.batch, max(1, len(samples) // 4))  # --quick has few document windows
        batches = batches_of(samples, bsz)
        lens = torch.tensor([len(s["input_ids"]) for s in samples]).float()
        print(f"# {unit}: {len(samples)} samples, {int(lens.sum())} tokens, length mean {lens.mean():.0f} "
              f"median {lens.median():.0f} max {int(lens.max())}; {len(batches)} batches of {bsz}")
        base_frac, base_ms = run(TextCollator(tok), batches)
        print(f"{unit:17s} {'batch_max padding (TextCollator)':44s} {base_frac:11.3f} {base_ms:9.2f} {1:18.2f}")
        for name, coll, bs in (
                (f"packing, rows <= {a.row_tokens}", PackingCollator(tok, max_length=a.row_tokens), batches),
                ("  + pad_to_multiple_of=64", PackingCollator(tok, max_length=a.row_tokens, pad_to_multiple_of=64), batches),
                ("  without row balancing", PackingCollator(tok, max_length=a.row_tokens, balance=False), batches),
                ("  + 4-D block mask (first 4 batches)", PackingCollator(tok, max_length=a.row_tokens, mask="block"), batches[:4])):
            frac, ms = run(coll, bs)
            print(f"{unit:17s} {name:44s} {frac:11.3f} {ms:9.2f} {ms / base_ms:18.2f}")
        rows = PackedRows(samples, [len(s["input_ids"]) for s in samples], a.row_tokens)
        per = max(1, bsz * int(lens.mean()) // a.row_tokens)         # rows per batch: about the tokens of bsz samples
        planned = batches_of(list(range(len(rows))), per)
        frac, ms = run(PackingCollator(tok, max_length=a.row_tokens), [[rows[i] for i in b] for b in planned])
        print(f"{unit:17s} {f'rows planned over the dataset, {per} rows/batch':44s} {frac:11.3f} {ms:9.2f} {ms / base_ms:18.2f}")
        if unit == "document windows" and not a.quick:
            packer = PackingCollator(tok, max_length=a.row_tokens)
            for n in (32, 64, 128, 256):
                frac, ms = run(packer, batches_of(samples, n))
                print(f"{unit:17s} {f'packing, {n} samples per batch':44s} {frac:11.3f} {ms:9.2f}")
    vlm_throughput(a.quick, row_tokens=a.vlm_row_tokens)


if __name__ == "__main__":
    main()
