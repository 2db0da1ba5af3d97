"""Packing vs padding on a real text corpus: fraction of real (non-pad) tokens and collate time per batch.

Corpus: the stdlib's pydoc topic documents (`pydoc_data.topics`), tokenized with a byte-level BPE
trained on them here (nothing downloaded), cut two ways: into paragraphs (short, very uneven
samples, like captions or chat turns) and into `--max-len` windows of each document (LM-style:
most windows are exactly `--max-len`). Samples longer than `--max-len` are cut into windows.
Batches of `--batch` samples, in a seeded shuffled order, are collated by `TextCollator`
(batch_max padding, the baseline) and by `PackingCollator` (rows of at most `--row-tokens`).
Usage: python bench/packing.py [--quick] [--batch 64] [--max-len 512] [--row-tokens 2048]
"""
import argparse
import re
import time

import pydoc_data.topics
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmlit.collate import TextCollator
from mmlit.core import np_rng
from mmlit.packing import PackingCollator


def tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=4000, special_tokens=["[PAD]", "[UNK]", "<eos>"],
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<eos>")


def samples_of(texts: list[str], tok, max_len: int) -> list[dict]:
    "Stage-2 style samples: each text + EOS, cut into windows of at most `max_len` tokens."
    out = []
    for ids in tok(texts)["input_ids"]:
        ids = ids + [tok.eos_token_id]
        for i in range(0, len(ids), max_len):
            w = torch.tensor(ids[i:i + max_len])
            out.append(dict(input_ids=w, attention_mask=torch.ones_like(w), labels=w.clone()))
    return out


def run(collate, batches) -> tuple[float, float]:
    "(fraction of real tokens, mean ms per batch)."
    real = total = 0
    t0 = time.perf_counter()
    for b in batches:
        out = collate(b)
        real += sum(len(s["input_ids"]) for s in b)
        total += out["input_ids"].numel()
    return real / total, (time.perf_counter() - t0) / len(batches) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 documents instead of all")
    ap.add_argument("--batch", type=int, default=64, help="samples per collate call")
    ap.add_argument("--max-len", type=int, default=512, help="longest sample (documents are cut into windows)")
    ap.add_argument("--row-tokens", type=int, default=2048, help="token budget of a packed row")
    a = ap.parse_args()
    docs = [t for t in pydoc_data.topics.topics.values() if t.strip()][: 20 if a.quick else None]
    tok = tokenizer(docs)
    units = {"paragraphs": [p for d in docs for p in re.split(r"\n\s*\n", d) if p.strip()], "document windows": docs}
    print(f"{'samples':17s} {'collator':42s} {'real tokens':>11s} {'ms/batch':>9s} {'time vs batch_max':>18s}")
    for unit, texts in units.items():
        samples = samples_of(texts, tok, a.max_len)
        order = np_rng(0).permutation(len(samples))
        bsz = min(a.batch, max(1, len(samples) // 4))  # --quick has few document windows
        batches = [[samples[i] for i in order[j:j + bsz]] for j in range(0, len(order) - bsz + 1, bsz)]
        lens = torch.tensor([len(s["input_ids"]) for s in samples]).float()
        print(f"# {unit}: {len(samples)} samples, {int(lens.sum())} tokens, length mean {lens.mean():.0f} "
              f"median {lens.median():.0f} max {int(lens.max())}; {len(batches)} batches of {bsz}")
        base_frac, base_ms = run(TextCollator(tok), batches)
        print(f"{unit:17s} {'batch_max padding (TextCollator)':42s} {base_frac:11.3f} {base_ms:9.2f} {1:18.2f}")
        for name, coll, bs in (
                (f"packing, rows <= {a.row_tokens}", PackingCollator(tok, max_tokens=a.row_tokens), batches),
                ("  + pad_to_multiple_of=64", PackingCollator(tok, max_tokens=a.row_tokens, pad_to_multiple_of=64), batches),
                ("  without row balancing", PackingCollator(tok, max_tokens=a.row_tokens, balance=False), batches),
                ("  + 4-D block mask (first 4 batches)", PackingCollator(tok, max_tokens=a.row_tokens, mask="block"), batches[:4])):
            frac, ms = run(coll, bs)
            print(f"{unit:17s} {name:42s} {frac:11.3f} {ms:9.2f} {ms / base_ms:18.2f}")


if __name__ == "__main__":
    main()
