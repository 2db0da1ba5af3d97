"""LM windows give Hugging Face causal-LM models the right loss: next-token targets, never shifted twice."""
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mmlit.collate import CausalLMCollator
from mmlit.packing import PackingCollator
from mmlit.text import lm_windows, train_tokenizer
from mmlit.demo import corpus_documents


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_hf_model_loss_uses_next_token_targets():
    docs = corpus_documents()[:6]
    tok = train_tokenizer(docs, vocab_size=300)
    wins = lm_windows(docs, tok, max_length=32)
    batch = CausalLMCollator(tok)([wins[i] for i in range(4)])
    model = _model(len(tok))
    with torch.no_grad():
        got = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    assert torch.allclose(got, want, atol=1e-6)
    shifted_twice = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    assert not torch.allclose(got, shifted_twice)  # what `labels` alone would have given


def test_packed_windows_keep_their_targets():
    docs = corpus_documents()[:6]
    tok = train_tokenizer(docs, vocab_size=300)
    wins = lm_windows(docs, tok, max_length=16, drop_last=False)
    samples = [wins[i] for i in range(5)] + [wins[len(wins) - 1]]      # the last window is shorter
    batch = PackingCollator(tok, max_length=64)(samples)
    for r, row in enumerate(batch["packed_samples"]):
        want = torch.cat([samples[i]["labels"] for i in row])
        assert torch.equal(batch["shift_labels"][r, : len(want)], want)
        assert (batch["shift_labels"][r, len(want):] == -100).all()
