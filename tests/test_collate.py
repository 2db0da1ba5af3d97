"""Collators: equivalence with HF collators, real-model proofs (Qwen2-VL, packed Llama), fuzzing."""
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification, DataCollatorWithPadding

from collate_helpers import corpus, qwen_sample, text_sample, tiny_llama, tiny_qwen2_vl, tiny_tokenizer
from mmlit.collate import (CausalLMCollator, CollateError, ContrastiveCollator, EmptyBatchError, MaskedLMCollator,
                           MissingKeyError, MultimodalCollator, Qwen2VLCollator, TextCollator, collator_for, collators)
from mmlit.packing import PackingCollator, mrope_positions

TOK = {side: tiny_tokenizer(side) for side in ("right", "left")}
TEXTS = [" ".join(d.split()[:n]) for d, n in zip(corpus(12), [3, 17, 9, 30, 1, 12, 25, 5, 8, 40, 2, 14])]


class Skip:
    "Stage 1's skipped-record marker: falsy, with `.bad`."
    def __init__(self, bad): self.bad = bad
    def __bool__(self): return False


# --- equivalence with transformers' collators ---------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("hf_kw, ours_kw", [
    (dict(padding="longest"), dict()),
    (dict(padding="longest", pad_to_multiple_of=8), dict(pad_mode="to_8")),
    (dict(padding="longest", pad_to_multiple_of=16), dict(pad_to_multiple_of=16)),
    (dict(padding="max_length", max_length=64), dict(pad_mode="max_length", max_length=64)),
    (dict(padding="max_length", max_length=60, pad_to_multiple_of=16), dict(pad_mode="max_length", max_length=60, pad_to_multiple_of=16)),
])
def test_equals_hf_data_collator_with_padding(side, hf_kw, ours_kw):
    tok = TOK[side]
    feats = [tok(t) for t in TEXTS]
    hf = DataCollatorWithPadding(tok, return_tensors="pt", **hf_kw)(feats)
    ours = TextCollator(tok, **ours_kw)([text_sample(tok, t) for t in TEXTS])
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(ours[k], hf[k]), k
    # labels: -100 on padding, as DataCollatorForTokenClassification pads them
    hf_lab = DataCollatorForTokenClassification(tok, return_tensors="pt", **hf_kw)(
        [dict(f, labels=f["input_ids"]) for f in feats])
    assert torch.equal(ours["labels"], hf_lab["labels"])


def test_bad_records_are_returned_not_collated():
    tok = TOK["right"]
    samples = [text_sample(tok, TEXTS[0]), Skip("a.parquet row 3: truncated"), text_sample(tok, TEXTS[1])]
    for name in ("text", "causal_lm", "masked_lm"):
        batch, bad = collator_for(name=name, tokenizer=tok).collate_with_bad(samples)
        assert batch["input_ids"].shape[0] == 2 and bad == ["a.parquet row 3: truncated"]


# --- language modelling ---------------------------------------------------------------------------

def test_masked_lm_rates_match_hf():
    tok = TOK["right"]
    samples = [text_sample(tok, t) for t in TEXTS] * 40
    ours = MaskedLMCollator(tok, seed=3)(samples)
    hf_coll = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, seed=3, return_tensors="pt")
    hf = hf_coll([{"input_ids": s["input_ids"].tolist()} for s in samples])
    orig = TextCollator(tok)(samples)["input_ids"]
    special = torch.isin(orig, torch.tensor(tok.all_special_ids))
    n_real = (~special).sum().item()

    def rates(b):
        picked = b["labels"] != -100
        assert not (picked & special).any() and torch.equal(b["input_ids"][special], orig[special])
        assert torch.equal(b["labels"][picked], orig[picked])
        ids = b["input_ids"][picked]
        masked = (ids == tok.mask_token_id).float().mean().item()
        kept = (ids == orig[picked]).float().mean().item()
        return picked.sum().item() / n_real, masked, kept

    (p_o, m_o, k_o), (p_h, m_h, k_h) = rates(ours), rates(hf)
    n = (ours["labels"] != -100).sum().item()
    assert abs(p_o - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n_real) and abs(p_o - p_h) < 0.02
    assert abs(m_o - 0.8) < 4 * math.sqrt(0.16 / n) and abs(m_o - m_h) < 0.05
    # kept = 10% unchanged + the random draws that hit the same token (~1/vocab)
    assert abs(k_o - k_h) < 0.05 and 0.06 < k_o < 0.16


def test_masked_lm_is_seeded_by_seed_epoch_step():
    tok = TOK["right"]
    samples = [text_sample(tok, t) for t in TEXTS]
    a, b = MaskedLMCollator(tok, seed=1), MaskedLMCollator(tok, seed=1)
    a1, a2 = a(samples), a(samples)
    b.set_step(0, 1)
    assert torch.equal(b(samples)["input_ids"], a2["input_ids"])
    assert not torch.equal(a1["labels"], a2["labels"])


def test_causal_lm_keeps_eos_when_pad_is_eos():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    samples = [dict(input_ids=torch.tensor(tok(t)["input_ids"] + [eos])) for t in TEXTS[:4]]
    ours = CausalLMCollator(tok)(samples)
    hf = DataCollatorForLanguageModeling(tok, mlm=False, return_tensors="pt")([{"input_ids": s["input_ids"].tolist()} for s in samples])
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        assert ours["labels"][i, n - 1] == eos and (ours["labels"][i, n:] == -100).all()
        assert hf["labels"][i, n - 1] == -100  # the HF collator loses the EOS target here
    assert torch.equal(ours["input_ids"], hf["input_ids"])


# --- Qwen2-VL: the batch is exactly what the model takes ------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_qwen2_vl_model_takes_the_batch(side):
    tok = TOK[side]
    model = tiny_qwen2_vl(tok)
    samples = [qwen_sample(tok, [[1, 4, 4]], TEXTS[1], seed=1), qwen_sample(tok, [[1, 2, 4], [1, 4, 6]], TEXTS[0], seed=2),
               qwen_sample(tok, [], TEXTS[3]), Skip("x.jsonl line 9: bad image")]
    batch, bad = Qwen2VLCollator(tok, pad_to_multiple_of=8).collate_with_bad(samples)
    assert bad == ["x.jsonl line 9: bad image"]
    assert batch["pixel_values"].shape == (16 + 8 + 24, 1176) and batch["image_grid_thw"].shape == (3, 3)
    assert batch["input_ids"].shape[1] % 8 == 0
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # padding changes nothing: sample 0's logits alone equal its logits in the batch
    alone = Qwen2VLCollator(tok)([samples[0]])
    with torch.no_grad():
        la = model(**alone).logits[0]
        lb = model(**batch).logits[0]
    n = len(samples[0]["input_ids"])
    lb = lb[:n] if side == "right" else lb[-n:]
    assert torch.allclose(la, lb, atol=1e-5)


def test_mrope_positions_match_the_model():
    tok = TOK["right"]
    model = tiny_qwen2_vl(tok)
    for grids in ([[1, 4, 4]], [[1, 2, 4], [1, 6, 4]], [], [[2, 4, 4]]):
        s = qwen_sample(tok, grids, TEXTS[2])
        ref, _ = model.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None],
                                            image_grid_thw=s["image_grid_thw"] if grids else None)
        assert torch.equal(mrope_positions(s["mm_token_type_ids"], s["image_grid_thw"]), ref[:, 0])


# --- packing: zero leakage ----------------------------------------------------------------------

def _alone_logits(model, s):
    with torch.no_grad():
        return model(input_ids=s["input_ids"][None]).logits[0]


@pytest.mark.parametrize("attn, mask", [("eager", "block"), ("eager", "positions"), ("sdpa", "positions"), ("sdpa", "block")])
def test_packed_llama_equals_each_sequence_alone(attn, mask):
    tok = TOK["right"]
    model = tiny_llama(len(tok), attn)
    samples = [text_sample(tok, t) for t in TEXTS]
    coll = PackingCollator(tok, max_length=48, mask=mask, pad_to_multiple_of=16)
    batch = coll(samples)
    assert batch["input_ids"].shape[1] % 16 == 0 and len(batch["packed_samples"]) < len(samples)
    kw = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask", "use_cache") if k in batch}
    with torch.no_grad():
        packed = model(**kw).logits
    for r, row in enumerate(batch["packed_samples"]):
        start = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            ref = _alone_logits(model, samples[i])
            assert (packed[r, start:start + n] - ref).abs().max() < 1e-5, (r, i)
            start += n
    loss = model(**kw, labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_packed_qwen2_vl_equals_each_sequence_alone():
    tok = TOK["right"]
    model = tiny_qwen2_vl(tok, "sdpa")
    samples = [qwen_sample(tok, [[1, 4, 4]], TEXTS[1], seed=1), qwen_sample(tok, [[1, 2, 4], [1, 4, 6]], TEXTS[0], seed=2),
               qwen_sample(tok, [], TEXTS[3]), qwen_sample(tok, [[1, 6, 2]], TEXTS[7], seed=3)]
    batch = PackingCollator(tok, max_length=64, pad_to_multiple_of=8)(samples)
    assert batch["position_ids"].shape[0] == 4 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "packed_samples"}).logits
        for r, row in enumerate(batch["packed_samples"]):
            start = 0
            for i in row:
                s = samples[i]
                kw = dict(input_ids=s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None])
                if len(s["image_grid_thw"]): kw.update(pixel_values=s["pixel_values"], image_grid_thw=s["image_grid_thw"])
                ref = model(**kw).logits[0]
                n = len(s["input_ids"])
                assert (packed[r, start:start + n] - ref).abs().max() < 1e-5, (r, i)
                start += n


# --- fuzzing: any batch either collates with consistent shapes or raises a documented error ------

sample_spec = st.tuples(st.integers(0, 40), st.integers(0, 3), st.integers(0, 3), st.booleans())


@pytest.mark.parametrize("name", ["text", "causal_lm", "masked_lm", "multimodal", "qwen2_vl", "contrastive", "packing"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(sample_spec, min_size=0, max_size=6), side=st.sampled_from(["right", "left"]),
       mode=st.sampled_from([{}, {"pad_mode": "to_8"}, {"pad_mode": "max_length", "max_length": 32},
                             {"max_length": 24, "overflow": "truncate"}, {"max_length": 24}]))
def test_fuzz_collators(name, specs, side, mode):
    tok = TOK[side]
    vocab = torch.arange(20, 60)
    samples = []
    for j, (n, n_img, n_neg, bad) in enumerate(specs):
        if bad: samples.append(Skip(f"row {j}")); continue
        ids = vocab[torch.arange(n) % len(vocab)]
        s = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), task="t")
        if name == "multimodal":
            T = 2
            ids = torch.cat([torch.full((n_img * T,), 6), ids])
            s = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), task="t",
                     images=torch.zeros(n_img, 3, 4, 4), image_input_idx=torch.arange(n_img * T).view(n_img, T))
        if name in ("qwen2_vl", "packing"):
            s = qwen_sample(tok, [[1, 2, 2 * (k + 1)] for k in range(n_img)], " ".join(["the"] * n))
        if name == "contrastive":
            s["negative_input_ids"] = [vocab[: (n + k) % 7 + 1] for k in range(n_neg)]
        samples.append(s)
    kw = dict(mode)
    if name == "packing":
        kw = dict(max_length=kw.get("max_length", 64), overflow=kw.get("overflow", "raise"))
    good = [s for s in samples if not isinstance(s, Skip)]
    limit = kw.get("max_length")
    too_long = limit is not None and any(len(s["input_ids"]) > limit for s in good)
    try:
        batch, bad = collator_for(name=name, tokenizer=tok, **kw).collate_with_bad(samples)
    except EmptyBatchError:
        assert not samples                              # only an empty list is refused as empty
        return
    except CollateError as e:                           # only a sequence over the limit may be refused
        assert too_long, f"{name} refused a batch whose sequences all fit: {e}"
        assert re.search(r"max_length|truncat", str(e)), e
        return
    assert len(bad) == len(samples) - len(good)
    if batch is None:
        assert not good
        return
    ids = batch["input_ids"]
    if name == "packing":
        assert sorted(i for r in batch["packed_samples"] for i in r) == list(range(len(good)))
        assert int(batch["cu_seq_lens"][-1]) == ids.numel()
        return
    assert ids.shape[0] == len(good)
    lens = batch["attention_mask"].sum(-1)
    want = torch.tensor([min(len(s["input_ids"]), kw.get("max_length") or 10**9) for s in good])
    assert torch.equal(lens, want)
    if kw.get("pad_mode") == "max_length": assert ids.shape[1] == 32
    if kw.get("pad_mode") == "to_8": assert ids.shape[1] % 8 == 0
    for k in ("labels", "attention_mask"):
        assert batch[k].shape == ids.shape
    if name == "multimodal":
        assert batch["images"].shape[:2] == batch["image_masks"].shape == batch["image_input_idx"].shape[:2]
        pos = batch["image_input_idx"]
        assert (torch.gather(ids, 1, pos.clamp(min=0).flatten(1))[pos.flatten(1) >= 0] == 6).all()
    if name == "qwen2_vl" and "image_grid_thw" in batch:
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert int(batch["mm_token_type_ids"].sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    if name == "contrastive":
        assert batch["negative_input_ids"].shape[:2] == batch["negative_mask"].shape


def test_masked_lm_in_plain_dataloader_workers_uses_global_batch_index():
    "Not told the step (a plain torch DataLoader), each worker maps its own count to the global batch index."
    tok = TOK["right"]
    ds = [text_sample(tok, t) for t in TEXTS[:4]] * 4
    ref = MaskedLMCollator(tok, seed=5)
    want = [ref(ds[i:i + 4])["input_ids"] for i in range(0, 16, 4)]
    assert len({tuple(w.flatten().tolist()) for w in want}) == 4      # same texts, other masks in each batch
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=MaskedLMCollator(tok, seed=5))
    got = [b["input_ids"] for b in loader]
    assert len(got) == len(want) == 4
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class SharedFlags:
    "Collate with `collator` and say, per batch tensor, whether it was built in shared memory (seen in the worker)."
    def __init__(self, collator): self.collator = collator
    def __call__(self, samples):
        batch = self.collator(samples)
        return batch, {k: v.is_shared() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_worker_builds_batches_in_shared_memory_with_the_same_values():
    "In a DataLoader worker big batch tensors (1 MiB or more) are built in shared memory (no copy when sent); batches equal 0 workers'."
    tok, g = TOK["right"], torch.Generator().manual_seed(0)
    def sample(i):
        negs = [text_sample(tok, t)["input_ids"] for t in TEXTS[i % 5:i % 5 + 1 + i % 3]]   # 1-3 negatives: both ways of padding them
        return dict(text_sample(tok, TEXTS[i % 12]), pixel_values=torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8, generator=g),
                    label=i, negative_input_ids=negs)
    ds = [sample(i) for i in range(24)]
    sampler = [list(range(a, a + 4)) for a in range(0, 24, 4)] + [[0, 3, 6, 9]]   # the last batch: one negative each
    def run(workers):
        col = SharedFlags(ContrastiveCollator(tok, base="multimodal"))
        return list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=col))
    zero, two = run(0), run(2)
    assert all(not any(flags.values()) for _, flags in zero)            # no worker: plain tensors
    assert all(flags["pixel_values"] and not any(v for k, v in flags.items() if k != "pixel_values") for _, flags in two)   # 4 x 270 kB: big
    for (a, _), (b, _) in zip(zero, two, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor): assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else: assert a[k] == b[k], k


def test_masked_lm_told_the_step_ignores_its_call_count():
    tok = TOK["right"]
    samples = [text_sample(tok, t) for t in TEXTS]
    a, b = MaskedLMCollator(tok, seed=2), MaskedLMCollator(tok, seed=2)
    for _ in range(3): a(samples)                       # a has collated three batches, b none
    a.set_step(4, 9); b.set_step(4, 9)
    assert torch.equal(a(samples)["input_ids"], b(samples)["input_ids"])
    b.set_step(5, 10)                                   # a is at (4, 10) now: another epoch, other masks
    assert not torch.equal(a(samples)["input_ids"], b(samples)["input_ids"])


# --- a sample without a key a collator needs: a CollateError naming the key -----------------------

def _full(name, tok):
    "Two valid samples for collator `name`, with every key it can use."
    if name in ("qwen2_vl", "packing"):
        return [qwen_sample(tok, [[1, 4, 4]], TEXTS[1], seed=1), qwen_sample(tok, [[1, 2, 4]], TEXTS[0], seed=2)]
    if name in ("vision", "default"):
        return [dict(pixel_values=torch.zeros(3, 4, 4, dtype=torch.uint8), label=i) for i in range(2)]
    samples = [text_sample(tok, t, task="t") for t in TEXTS[:2]]
    if name == "multimodal":
        samples = [dict(s, input_ids=torch.cat([torch.full((2,), 6), s["input_ids"]]),
                        attention_mask=torch.ones(len(s["input_ids"]) + 2, dtype=torch.long),
                        labels=torch.cat([torch.full((2,), -100), s["labels"]]),
                        images=torch.zeros(1, 3, 4, 4), image_input_idx=torch.arange(2).view(1, 2)) for s in samples]
    if name == "contrastive":
        samples = [dict(s, negative_input_ids=[s["input_ids"][:3]], negative_attention_mask=[torch.ones(3, dtype=torch.long)])
                   for s in samples]
    return samples


ALL_COLLATORS = sorted(collators)
MUST_NAME = {"text": "input_ids", "causal_lm": "input_ids", "masked_lm": "attention_mask", "vision": "pixel_values",
             "multimodal": "image_input_idx", "qwen2_vl": "image_grid_thw", "contrastive": "negative_input_ids",
             "packing": "input_ids", "default": None}


def _build(name, tok):
    if name in ("vision", "default"): return collator_for(name=name)
    return collator_for(name=name, tokenizer=tok, **({"max_length": 64} if name == "packing" else {}))


def _needs(name, kept) -> set:
    "The keys collator `name` needs from samples holding `kept` (the spec the fuzz test checks against)."
    images = {"multimodal": {"image_input_idx"} if "images" in kept else set(),
              "packing": {"image_grid_thw", "mm_token_type_ids", "pixel_values"} if kept & {"image_grid_thw", "pixel_values"} else set()}
    base = {"text": {"input_ids"}, "causal_lm": {"input_ids"}, "masked_lm": {"input_ids", "attention_mask"},
            "vision": {"pixel_values"}, "multimodal": {"input_ids"}, "qwen2_vl": {"input_ids", "pixel_values", "image_grid_thw"},
            "contrastive": {"input_ids", "negative_input_ids"}, "packing": {"input_ids"}, "default": set()}[name]
    return base | images.get(name, set())


def test_every_collator_is_covered():
    assert set(ALL_COLLATORS) == set(MUST_NAME)


@pytest.mark.parametrize("name", ALL_COLLATORS)
def test_a_missing_key_is_named(name):
    tok = TOK["right"]
    full = _full(name, tok)
    assert _build(name, tok)(full) is not None           # every key there: it collates
    key = MUST_NAME[name]
    if key is None: return                                # default_collate needs no particular key
    with pytest.raises(MissingKeyError, match=f"needs .*'{key}'"):
        _build(name, tok)([{k: v for k, v in s.items() if k != key} for s in full])


@pytest.mark.parametrize("name", ALL_COLLATORS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_missing_keys_fuzz(name, data):
    "Any subset of the keys dropped from every sample: the batch collates, or a CollateError names a dropped key."
    tok = TOK["right"]
    full = _full(name, tok)
    drop = data.draw(st.sets(st.sampled_from(sorted(full[0]))), label="drop")
    samples = [{k: v for k, v in s.items() if k not in drop} for s in full]
    if not samples[0]: return                             # nothing left: nothing to name
    missing = _needs(name, set(samples[0])) & drop
    try:
        batch = _build(name, tok)(samples)
    except CollateError as e:
        assert missing, f"{name} refused samples holding every key it needs: {e}"
        assert isinstance(e, MissingKeyError) and all(f"'{k}'" in str(e) for k in missing), e
        return
    assert not missing, f"{name} collated samples without {missing}"
    assert batch is not None
