"""Generated text is a pure function of the model, the data and the seed: two runs, and 0 or 2 loader workers, give the same strings."""
import pytest
import torch

from mmlit.causal_lm import build_causal_lm
from mmlit.collate import collator_for
from mmlit.generate import PromptOnly, generate
from mmlit.loader import make_loader
from mmlit.multimodal import ChatPreprocessor

WORDS = ["red", "blue", "a green seven", "three", "the white one", "purple", "an orange nine", "cyan"]


@pytest.fixture(scope="module")
def setup(tok):
    torch.manual_seed(0)
    records = [dict(messages=[dict(role="user", content=f"Say {w}." + " please" * (i % 3)), dict(role="assistant", content=w)])
               for i, w in enumerate(WORDS)]
    lm = build_causal_lm("tiny", vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)           # untied: a random model that does not just echo its input
    prompts = PromptOnly(ChatPreprocessor(tok, max_length=64, chat_template="chatml"))
    left = collator_for(name="text", tokenizer=tok, padding_side="left")
    def run(workers, **options):
        loader = make_loader(records, dict(batch_size=3, num_workers=workers, shuffle=False, drop_last=False),
                             transform=prompts, collate=left)
        return generate(lm, loader, tok, max_new_tokens=6, **options)
    return run


def test_greedy_same_across_runs_and_workers(setup):
    first = setup(0)
    assert len(first) == len(WORDS) and all(isinstance(t, str) for t in first) and len(set(first)) > 1
    assert setup(0) == first
    assert setup(2) == first


def test_sampling_seeded_and_same_across_workers(setup):
    a = setup(0, do_sample=True, temperature=1.5, seed=7)
    assert setup(2, do_sample=True, temperature=1.5, seed=7) == a
    assert a != setup(0, do_sample=True, temperature=1.5, seed=8)       # another seed, other draws
    assert a != setup(0)                                                  # sampling is not greedy


def test_metrics_on_hand_made_answers_with_malformed_ones():
    from mmlit.generate import TextScore, caption_bleu, caption_fields, counting_accuracy, exact_match, pointing_accuracy
    truth = [dict(label=4, colour="green", size="large", position="bottom right", caption="a large green digit 4 in the bottom right"),
             dict(label=0, colour="white", size="small", position="top", caption="a small white digit 0 in the top")]
    good, half = [t["caption"] for t in truth], ["a large green digit 4 in the bottom right", "a small pink 9 (nine) in the top"]
    malformed = ["", "4 or 5 in red and blue"]
    assert all(s.value == 1.0 and s.malformed == 0 for s in caption_fields(good, truth).values())
    f = caption_fields(half, truth)
    assert f["digit"] == TextScore(0.5, 2, 0) and f["colour"] == TextScore(0.5, 2, 0) and f["position"].value == 1.0
    f = caption_fields(malformed, truth)
    assert all(s.value == 0.0 and s.malformed == 2 for k, s in f.items() if k in ("digit", "colour"))
    assert 0 < caption_bleu(half, [t["caption"] for t in truth]).value < 1 and caption_bleu(malformed, good).value == 0.0
    assert exact_match(["A large green digit 4 in the bottom right.", None], good) == TextScore(0.5, 2, 1)
    assert pointing_accuracy(["Point: <0.75, 0.75>", "Point: <0.1, 0.9>", "the four"], [(0.5, 0.5, 1, 1)] * 3) == TextScore(1 / 3, 3, 1)
    assert counting_accuracy(["Count: 2", "Count: 3", "Count:", "2 or 3"], [2, 2, 2, 2]) == TextScore(0.25, 4, 2)
