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
demo trains on, 4 image tokens each): the same batches (the same samples per step) as padded rows (`Qwen2VLCollator`,
each batch padded to its longest sample: what a run without packing trains on) and as packed rows (`PackingCollator`,
rows of `--vlm-row-tokens`, 1024 as the vlm example; mRoPE positions restarting per conversation), one thread, timing
forward + backward + optimiser step in a few interleaved rounds (the fastest kept). Tokens/s counts real (non-pad) tokens
per second of process CPU time, which a machine shared with other jobs disturbs far less than wall time (both are
printed). Three cases: every weight trained; the vision tower frozen, as the vlm example trains; and, not the demo's
data, a more uneven mix (per scene one chat of 1 task, 60%, or of 2-4 tasks as turns), where padding wastes more.

Measured (Intel Xeon, 2 cores shared with other jobs, load average 5-8, 2026-12-07; real tokens per CPU-second,
packed / padded): the demo conversations 1.23x (rows <= 256) and 1.29x (rows <= 1024; 1.00x before packed rows were
attended per sequence by `mmlit.packing.packed_attention`), vision tower frozen 1.24x / 1.31x; the padded rows are
68.5% real tokens, so a cost linear in tokens caps packing at 1.46x (lower still with the vision tower's fixed share);
the more uneven mix 1.39x / 1.50x against a cap of 1.87x.

    python bench/packing.py [--quick] [--batch 64] [--max-length 512] [--row-tokens 2048] [--vlm-only] [--vlm-row-tokens 256 1024]
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


def vlm_conversations(scenes: int, varied: bool) -> list[dict]:
    "The demo's task records of `scenes` scenes; `varied`: per scene one chat of its first k tasks as turns (k = 1, 2, 3, 4 with odds .6, .1, .1, .2, seeded)."
    from mmlit.demo import scene_records, scene_row
    recs = [scene_records(scene_row(i)) for i in range(scenes)]
    if not varied: return [r for rs in recs for r in rs]
    turns = np_rng(0).choice([1, 2, 3, 4], size=scenes, p=[0.6, 0.1, 0.1, 0.2])     # mostly one question, a tail of long chats
    return [{**rs[0], "messages": [m for r in rs[:k] for m in r["messages"]]} for rs, k in zip(recs, turns)]


def vlm_throughput(quick: bool, batch: int = 32, row_tokens: tuple[int, ...] = (256, 1024), px: int = 56, rounds: int = 5) -> None:
    "Tokens/s of the tiny VLM's training step on the demo conversations (`px`-pixel images, as the demo), padded vs packed."
    from mmlit.causal_lm import CausalLM
    from mmlit.collate import Qwen2VLCollator
    from mmlit.multimodal import build_preprocessor
    from mmlit.vlm import vlm_config, vlm_loss
    torch.set_num_threads(1)
    scenes = 16 if quick else 64
    tok = train_tokenizer([m["content"] for r in vlm_conversations(scenes, False) for m in r["messages"]], vocab_size=512)
    pre = build_preprocessor("vlm", tok, min_pixels=px * px, max_pixels=px * px)
    print(f"\n# VLM: tiny Qwen2-VL, 1 thread, forward + backward + AdamW step; padded (Qwen2VLCollator: each batch padded to its "
          f"longest sample) vs packed (PackingCollator: the same samples per step in rows of at most the given tokens, 1024 as the vlm "
          f"example, mRoPE positions restarting per conversation); {rounds} interleaved rounds over the batches, the fastest kept")
    for title, varied, frozen in (("the demo's task conversations (one task each), all weights trained", False, False),
                                  ("the same, vision tower frozen (as the vlm example trains)", False, True),
                                  ("a more uneven mix, not the demo's: per scene one chat of 1 task (60%) or 2-4 tasks as turns", True, False)):
        samples = [pre(r) for r in vlm_conversations(scenes * (2 if varied else 1), varied)]
        batches = batches_of(samples, batch if not (varied and quick) else batch // 2)
        lens = torch.tensor([len(s["input_ids"]) for s in samples]).float()
        print(f"\n## {title}: {len(samples)} samples, length mean {lens.mean():.0f} min {int(lens.min())} max {int(lens.max())}; "
              f"{len(batches)} batches of {len(batches[0])}")
        print(f"{'collator':40s} {'real tokens':>11s} {'tokens/s (CPU)':>15s} {'tokens/s (wall)':>16s} {'loss':>8s}")
        runs = {}
        for name, coll in (("padded (Qwen2VLCollator, batch_max)", Qwen2VLCollator(tok)),
                           *((f"packed (PackingCollator, rows <= {n})", PackingCollator(tok, max_length=n)) for n in row_tokens)):
            model = CausalLM(vlm_config(tok), seed=0)
            if frozen: model.model.model.visual.requires_grad_(False)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            collated = [coll(b) for b in batches]
            loss = vlm_loss(model, collated[0]); loss.backward(); opt.zero_grad()        # warm-up, not timed
            runs[name] = dict(model=model, opt=opt, collated=collated, cpu=float("inf"), wall=float("inf"),
                              real=sum(len(s["input_ids"]) for b in batches for s in b),
                              total=sum(c["input_ids"].numel() for c in collated))
        for _ in range(rounds):            # interleaved batch by batch: a machine shared with other jobs slows all alike
            spent = {name: [0.0, 0.0] for name in runs}
            for i in range(len(batches)):
                for name, r in runs.items():
                    c0, w0 = time.process_time(), time.perf_counter()
                    loss = vlm_loss(r["model"], r["collated"][i]); loss.backward(); r["opt"].step(); r["opt"].zero_grad()
                    spent[name][0] += time.process_time() - c0; spent[name][1] += time.perf_counter() - w0
                    r.setdefault("losses", []).append(loss.item())
            for name, r in runs.items():
                r["cpu"], r["wall"] = min(r["cpu"], spent[name][0]), min(r["wall"], spent[name][1])
                r["loss"] = r["losses"][len(batches) - 1]    # the first round's last loss: the same weights, steps and samples
        for name, r in runs.items():
            print(f"{name:40s} {r['real'] / r['total']:11.3f} {r['real'] / r['cpu']:15.0f} {r['real'] / r['wall']:16.0f} {r['loss']:8.4f}")
        pad, *packed = runs.values()
        for n, p in zip(row_tokens, packed):
            print(f"{f'packed (rows <= {n}) / padded':40s} {'':11s} {pad['cpu'] / p['cpu']:15.2f} {pad['wall'] / p['wall']:16.2f}")
        print(f"# at most {pad['total'] / min(p['total'] for p in packed):.2f}x if a step cost the same per token, padded or packed "
              f"({1 / (pad['real'] / pad['total']):.2f}x with no padding left at all); the vision tower costs the same in both (the same images), "
              f"which lowers it")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 20 documents only")
    ap.add_argument("--batch", type=int, default=64, help="samples per collate call")
    ap.add_argument("--max-length", type=int, default=512, help="longest sample (documents are cut into windows)")
    ap.add_argument("--row-tokens", type=int, default=2048, help="token budget of a packed row")
    ap.add_argument("--vlm-only", action="store_true", help="only the VLM section")
    ap.add_argument("--vlm-row-tokens", type=int, nargs="+", default=[256, 1024], help="token budgets of a packed row in the VLM section")
    a = ap.parse_args()
    if a.vlm_only: return vlm_throughput(a.quick, row_tokens=tuple(a.vlm_row_tokens))
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
    vlm_throughput(a.quick, row_tokens=tuple(a.vlm_row_tokens))


if __name__ == "__main__":
    main()
