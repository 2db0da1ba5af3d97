"""Resuming a run whose mixture weights changed: the epoch in progress finishes as it was planned, the new weights
apply from the next epoch, and every dataset's walk goes on without losing or repeating a record."""
from collections import Counter

import pytest
import torch

from mmlit.core import ConfigError
from mmlit.loader import LoaderConfig, make_loader
from mmlit.mixture import Mixture
from mmlit.sources import TensorList

A, B = 13, 7                               # records 0..12 and 100..106
EPOCH, BATCH = 10, 2                       # 5 batches an epoch


def loader(weights):
    mix = Mixture([TensorList([torch.tensor([i]) for i in range(A)]), TensorList([torch.tensor([100 + i]) for i in range(B)])],
                  weights, seed=4, epoch_length=EPOCH)
    return make_loader(mix, LoaderConfig(batch_size=BATCH, seed=4), collate=lambda recs: [int(r["input_ids"][0]) for r in recs])


def take(ld, batches: int) -> list[list[int]]:
    "The next `batches` batches (across epochs), each a list of record values."
    out = []
    while len(out) < batches:
        for b in ld:
            out.append(b)
            if len(out) == batches: break
    return out


def flat(batches): return [v for b in batches for v in b]


def even_walk(values, items) -> bool:
    "Every one of `items` drawn k or k+1 times: a walk without replacement, nothing lost or repeated."
    k, r = divmod(len(values), len(items))
    return sorted(values.count(i) for i in items) == [k] * (len(items) - r) + [k + 1] * r


def test_changed_weights_take_effect_at_the_next_epoch():
    old = loader([1, 1])
    seen = take(old, 7)                                     # epoch 0 and 2 batches of epoch 1
    state = old.state_dict()
    assert state["epoch"] == 1 and state["mixture_schedule"] == [[0, [0.5, 0.5]]]
    ref_rest = take(old, 3)                                 # the rest of epoch 1 under the old weights
    new = loader([4, 1])
    new.load_state_dict(state)
    rest = take(new, 3)
    assert rest == ref_rest                                 # the epoch in progress: as planned, no sample lost or repeated
    later = take(new, 4 * 5)                                # epochs 2..5 under the new weights
    for e in range(4):
        epoch = flat(later[5 * e: 5 * e + 5])
        assert sum(v >= 100 for v in epoch) == 2 and len(epoch) == EPOCH    # 0.2 of 10
    drawn = flat(seen + rest + later)
    assert even_walk([v for v in drawn if v < 100], range(A)) and even_walk([v for v in drawn if v >= 100], range(100, 100 + B))
    assert new.state_dict()["mixture_schedule"] == [[0, [0.5, 0.5]], [2, [0.8, 0.2]]]
    again = loader([4, 1])                                  # a second resume keeps the history
    again.load_state_dict(state)
    assert take(again, 23) == rest + later


def test_changed_weights_at_an_epoch_boundary_apply_to_that_epoch():
    old = loader([1, 1])
    take(old, 5)
    state = old.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    new = loader([4, 1])
    new.load_state_dict(state)
    assert sum(v >= 100 for v in flat(take(new, 5))) == 2


def test_a_state_without_weights_history_resumes_only_with_the_same_weights():
    old = loader([1, 1])
    take(old, 3)
    state = {k: v for k, v in old.state_dict().items() if k != "mixture_schedule"}   # as a loader without the history wrote it
    same = loader([1, 1])
    same.load_state_dict(state)
    assert take(same, 2) == take(old, 2)
    with pytest.raises(ConfigError, match="no mixture_schedule"):
        loader([4, 1]).load_state_dict(state)
