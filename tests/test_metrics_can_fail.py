"""Every recall and accuracy `evaluate` reports can fall below 1 and above 0: a stand-in model with chosen embeddings
(some pairs aligned, some not) gets figures strictly between the two, equal to a brute-force count over the captions'
text and the labels; the set of figures checked is the set `evaluate` reports, so a new one must join it here."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmlit.collate import TextCollator
from mmlit.losses import mrl_prefix
from mmlit.metrics import NO_POSITIVE, caption_keys, evaluate
from mmlit.model import DualEncoder, DualEncoderConfig, DualEncoderOutput
from mmlit.text import encode_text, train_tokenizer

N, D, MRL = 24, 32, [32, 24]          # vectors in the first 24 of 32 dims: every MRL prefix sees the same geometry
KS = (1, 5, 10)


class ChosenEmbeddings(torch.nn.Module):
    "A stand-in dual encoder: image i (the row index in `pixel_values`) and each text (by its tokens) get chosen embeddings."
    def __init__(self, tokenizer, image, text_of: dict, negatives, negative_mask):
        super().__init__()
        self.config = SimpleNamespace(embed_dim=image.shape[1], mrl_dims=MRL)
        self.image, self.negatives, self.negative_mask = image, negatives, negative_mask
        ids = [encode_text(tokenizer, t)["input_ids"][None] for t in text_of]
        self.text = {int(caption_keys(i, torch.ones_like(i))[0]): v for i, v in zip(ids, text_of.values())}

    def encode_text(self, input_ids, attention_mask, dim=None):
        v = torch.stack([self.text[int(k)] for k in caption_keys(input_ids, attention_mask)])
        return mrl_prefix(v, dim or self.config.embed_dim)

    def forward(self, pixel_values, input_ids, attention_mask, **_):
        return DualEncoderOutput(loss=torch.tensor(0.0), image_embeds=self.image[pixel_values],
                                 text_embeds=self.encode_text(input_ids, attention_mask),
                                 negative_embeds=self.negatives[pixel_values], negative_mask=self.negative_mask[pixel_values])


def _setup():
    "Pairs 0-7 aligned; 8 another photo of item 0 with its caption; 9-23 captions pointing away; 23's image looks like item 1."
    e = torch.eye(D)[:N]
    captions = [f"item {i}" for i in range(N)]; captions[8] = captions[0]
    label = [0 if i == 8 else 1 if i == 23 else i % 3 if i < 8 else i - 6 for i in range(N)]          # 17 classes
    image = e.clone(); image[8], image[23] = e[0], e[1]
    text_of = {captions[i]: e[i] if i < 8 else -e[i] for i in range(N) if i != 8}
    prompts = {f"class {c}": F.normalize(sum(e[i] for i in range(8) if i % 3 == c), dim=-1) if c < 3 else -e[c + 6]
               for c in range(17)}                                   # right for the aligned images, wrong for pairs 9-22
    aligned = torch.tensor([i < 9 for i in range(N)])
    negatives = torch.stack([-image, torch.where(aligned[:, None], -image, image)], 1)   # the caption wins on pairs 0-8
    mask = torch.ones(N, 2, dtype=torch.bool); mask[::2, 1] = False
    tok = train_tokenizer(captions + list(prompts), vocab_size=300)
    model = ChosenEmbeddings(tok, image, {**text_of, **prompts}, negatives, mask)
    coll = TextCollator(tok)
    batches = [dict(coll([encode_text(tok, captions[i]) for i in range(s, s + 8)]), pixel_values=torch.arange(s, s + 8))
               for s in range(0, N, 8)]
    assert all((b["labels"] == -100).all() for b in batches)        # as stage 2 gives a contrastive batch
    text = torch.stack([text_of[c] for c in captions])
    return SimpleNamespace(tok=tok, model=model, batches=batches, captions=captions, label=label, image=image, text=text,
                           negatives=negatives, mask=mask, class_prompts=[[f"class {c}"] for c in range(17)], prompts=prompts)


@pytest.fixture(scope="module")
def setup():
    return _setup()


@pytest.fixture(scope="module")
def figures(setup):
    res = evaluate(setup.model, setup.batches, labels=setup.label, class_prompts=setup.class_prompts, tokenizer=setup.tok)
    return {k: v for k, v in res.items() if not k.startswith("loss")}


DIMS = ["", "@32", "@24"]
KEYS = [f"{d}_r{k}{kind}{at}" for kind in ("", "_caption", "_label") for at in DIMS for d in ("i2t", "t2i") for k in KS] + \
       [f"zeroshot_acc{at}" for at in DIMS] + ["hardneg_acc"]


def test_the_figures_checked_are_those_reported(figures):
    assert sorted(figures) == sorted(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_figure_is_strictly_between_0_and_1(figures, key):
    assert 0 < figures[key] < 1, (key, figures[key])


def _brute_recall(q, c, keys, k):
    "Recall@k by a stable descending sort of full score rows; positives: candidates with the query's key."
    hits = 0
    for i in range(len(q)):
        order = torch.sort(q[i] @ c.T, descending=True, stable=True).indices.tolist()
        rank = next((r for r, j in enumerate(order) if keys[j] == keys[i]), NO_POSITIVE)
        hits += rank < k
    return hits / len(q)


def test_figures_match_a_brute_force_count(setup, figures):
    "Caption identity from the captions' text, label identity from the labels, the exact pair from the index."
    kinds = {"": list(range(N)), "_caption": setup.captions, "_label": setup.label}
    for kind, keys in kinds.items():
        for at in DIMS:
            d = int(at[1:]) if at else D
            img, txt = mrl_prefix(setup.image, d), mrl_prefix(setup.text, d)
            for k in KS:
                assert figures[f"i2t_r{k}{kind}{at}"] == pytest.approx(_brute_recall(img, txt, keys, k)), (kind, at, k)
                assert figures[f"t2i_r{k}{kind}{at}"] == pytest.approx(_brute_recall(txt, img, keys, k)), (kind, at, k)
    clf = torch.stack([setup.prompts[f"class {c}"] for c in range(17)])
    right = sum(int((setup.image[i] @ clf.T).argmax()) == setup.label[i] for i in range(N))
    assert figures["zeroshot_acc"] == pytest.approx(right / N) == pytest.approx(10 / 24)
    pos = (setup.image * setup.text).sum(-1)
    wins = sum(bool(all((setup.image[i] @ setup.negatives[i, j]) < pos[i] for j in range(2) if setup.mask[i, j])) for i in range(N))
    assert figures["hardneg_acc"] == pytest.approx(wins / N) == pytest.approx(9 / 24)


def test_figures_by_hand(figures):
    "Exact pair: 0-7 at rank 0, 8 at rank 1 (pair 0's caption ties first); same caption: 8 at rank 0; same label: 23 too."
    assert (figures["i2t_r1"], figures["i2t_r5"], figures["i2t_r10"]) == (8 / 24, 9 / 24, 9 / 24)
    assert (figures["i2t_r1_caption"], figures["i2t_r1_label"]) == (9 / 24, 10 / 24)
    assert (figures["t2i_r1_label@24"], figures["t2i_r5_label@24"]) == (9 / 24, 10 / 24)


def test_labels_from_the_batch_count_alike(setup, figures):
    batches = [dict(b, label=torch.tensor(setup.label[s:s + 8])) for b, s in zip(setup.batches, range(0, N, 8))]
    res = evaluate(setup.model, batches, class_prompts=setup.class_prompts, tokenizer=setup.tok)
    assert {k: v for k, v in res.items() if not k.startswith("loss")} == figures


def test_an_untrained_model_is_not_credited_with_same_caption_hits():
    "A real tiny dual encoder, untrained, on captions of which some repeat (token labels all -100): near chance."
    torch.manual_seed(0)
    tok = train_tokenizer([f"a {c} digit {d}" for c in ("red", "blue") for d in range(10)], vocab_size=300)
    model = DualEncoder(DualEncoderConfig.preset("tiny", vocab_size=len(tok), embed_dim=64, mrl_dims=[64, 16]))
    captions = [f"a {('red', 'blue')[i % 2]} digit {i % 5}" for i in range(40)]          # 10 distinct, 4 of each
    batch = dict(TextCollator(tok)([encode_text(tok, c) for c in captions]),
                 pixel_values=torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8))
    res = evaluate(model, [batch])
    assert res["i2t_r1"] <= res["i2t_r1_caption"] < 0.5 and res["t2i_r1_caption"] < 0.5
