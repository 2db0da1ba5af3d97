"""Retrieval recall against a brute-force reference (stable descending sort of full score rows), with exact
ties and duplicate captions; chunking never changes a rank; zero-shot and hard-negative accuracy by hand."""
import pytest
import torch
import torch.nn.functional as F

from mmlit.metrics import NO_POSITIVE, caption_keys, hard_negative_hits, positive_ranks, recall_at, zero_shot_accuracy


def brute(q, c, ql=None, cl=None):
    out = []
    for i in range(len(q)):
        order = torch.sort(q[i] @ c.T, descending=True, stable=True).indices.tolist()
        pos = [j for j in order if (j == i if ql is None else cl[j] == ql[i])]
        out.append(order.index(pos[0]) if pos else NO_POSITIVE)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_ranks_match_brute_force_with_ties_and_duplicates(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    n = 50
    q = torch.randint(-1, 2, (n, 3), generator=g).float()                  # 27 distinct vectors: many exact ties
    c = q.clone()
    dup = torch.randint(0, n, (15,), generator=g)
    c[dup] = c[torch.randint(0, n, (15,), generator=g)]                   # duplicate captions
    labels = torch.randint(0, 6, (n,), generator=g)
    assert torch.equal(positive_ranks(q, c, chunk=chunk), brute(q, c))
    assert torch.equal(positive_ranks(c, q, chunk=chunk), brute(c, q))
    assert torch.equal(positive_ranks(q, c, labels, labels, chunk=chunk), brute(q, c, labels, labels))
    keys = caption_keys(c.long() + 1, torch.ones_like(c, dtype=torch.long))   # identical rows, identical keys
    assert torch.equal(positive_ranks(q, c, keys, keys, chunk=chunk), brute(q, c, keys, keys))
    # a positive set that contains the exact partner can only rank better
    assert (positive_ranks(q, c, labels, labels) <= positive_ranks(q, c)).all()


def test_ties_are_broken_by_candidate_index():
    q = torch.tensor([[1.0, 0.0]] * 3)
    c = torch.tensor([[1.0, 0.0]] * 3)                  # every score ties
    assert positive_ranks(q, c).tolist() == [0, 1, 2]   # the partner of query i has i candidates before it
    assert recall_at(positive_ranks(q, c), (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_no_positive_is_a_miss_and_bad_calls_raise():
    q = F.normalize(torch.randn(4, 3), dim=-1)
    r = positive_ranks(q, q, torch.tensor([0, 1, 2, 3]), torch.tensor([9, 1, 2, 3]))
    assert r[0] == NO_POSITIVE and recall_at(r, (10,))[10] == 0.75
    with pytest.raises(ValueError, match="as many queries as candidates"): positive_ranks(q, q[:3])
    with pytest.raises(ValueError, match="both query_labels and candidate_labels"): positive_ranks(q, q, torch.zeros(4))


def test_zero_shot_and_hard_negatives_by_hand():
    img = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0]]), dim=-1)
    clf = torch.eye(2)
    assert zero_shot_accuracy(img, torch.tensor([0, 1, 1]), clf) == pytest.approx(2 / 3)   # row 2 ties: class 0 wins
    txt = img.clone()
    negs = torch.stack([img.flip(0), img], 1)
    assert hard_negative_hits(img, txt, negs, torch.tensor([[True, False], [True, False], [True, True]])) == (1, 3)
