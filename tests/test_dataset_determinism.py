"""Determinism: DataLoader workers and access order, text dropout, and weighted mixtures."""
import tempfile
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torch.utils.data import DataLoader

from ds_files import SPECS, corrupt_bytes, make_image, png_bytes, write_jsonl, write_parquet
from mmlit.core import ConfigError, np_rng
from mmlit.dataset import Skipped, split_skipped
from mmlit.sources import JsonlImageText, ParquetImageText, TensorList, TextCorpus
from mmlit.mixture import DeterministicDataset, Mixture

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="mmlit-hypothesis-"))  # nothing written into the repo


# ---------------------------------------------------------------- DataLoader workers

def to_arrays(rec, rng):
    "Decode to arrays and make random draws from the record's rng (as a stage-2 transform would)."
    img = rec["image"]
    return dict(text=rec["text"], pixels=np.asarray(img.convert("RGB")) if img is not None else None,
                crop=rng.integers(0, 1000, size=2), flip=bool(rng.random() < 0.5),
                noise=torch.rand(3, generator=torch.Generator().manual_seed(int(rng.integers(1 << 62)))),
                index=rec["meta"]["index"], file=rec["meta"]["file"])


def keep_list(batch): return batch


def run_loader(ds, num_workers, order=None, collate=keep_list):
    out = []
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, sampler=order, collate_fn=collate)
    for batch in loader:
        out.extend(batch if collate is keep_list else [batch])
    return out


def key(s):
    "What identifies a sample's content, random draws included (comparable with ==)."
    if isinstance(s, Skipped): return ("skipped", s.bad)
    return (s["text"], s["pixels"].tobytes() if s["pixels"] is not None else None, tuple(s["crop"].tolist()),
            s["flip"], tuple(s["noise"].tolist()), s["index"], s["file"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    "A JSONL and a two-shard Parquet source, each with bad records among 12 good ones."
    d = tmp_path_factory.mktemp("loader")
    lines = []
    for i in range(14):
        if i == 3: lines.append('{"text": oops'); continue
        if i == 9: lines.append({"text": "gone", "image": "missing.png"}); continue
        make_image(*SPECS[i % 12]).save(d / f"{i}.png")
        lines.append({"text": f"jsonl {i}", "image": f"{i}.png"})
    jl = write_jsonl(d / "pairs.jsonl", lines)
    for s in range(2):
        caps = [f"parquet {s}.{i}" for i in range(7)]
        blobs = [png_bytes(*SPECS[(s * 7 + i) % 12]) for i in range(7)]
        blobs[2 + 3 * s] = corrupt_bytes()
        write_parquet(d / f"shard{s}.parquet", caps, blobs, row_group_size=3, struct_images=bool(s))
    return {"jsonl": lambda **kw: JsonlImageText(jl, **kw),
            "parquet": lambda **kw: ParquetImageText(str(d / "shard*.parquet"), **kw)}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_same_records_with_0_and_2_workers_and_reversed(sources, fmt):
    ds = DeterministicDataset(sources[fmt](text_dropout=0.25), to_arrays, seed=123)
    n = len(ds)
    ds.set_epoch(2)
    main = run_loader(ds, 0)
    workers = run_loader(ds, 2)
    rev = run_loader(ds, 2, order=list(reversed(range(n))))[::-1]
    rev0 = run_loader(ds, 0, order=list(reversed(range(n))))[::-1]
    assert len(main) == n
    assert [key(s) for s in main] == [key(s) for s in workers] == [key(s) for s in rev] == [key(s) for s in rev0]
    # the bad records reach the main process as Skipped, with where and why
    bad = [s.bad for s in workers if isinstance(s, Skipped)]
    assert len(bad) == 2 and all(b.reason for b in bad)
    if fmt == "jsonl": assert sorted((b.index, b.unit) for b in bad) == [(3, "line"), (9, "line")]
    else: assert sorted((b.file.rsplit("/", 1)[1], b.index) for b in bad) == [("shard0.parquet", 2), ("shard1.parquet", 5)]
    # a new epoch: same texts and pixels, other random draws
    ds.set_epoch(3)
    other = run_loader(ds, 2)
    good_now, good_before = [s for s in other if s], [s for s in workers if s]
    assert [g["pixels"].tobytes() for g in good_now] == [g["pixels"].tobytes() for g in good_before]
    assert [g["crop"].tolist() for g in good_now] != [g["crop"].tolist() for g in good_before]


def test_split_skipped_collate_in_workers(sources):
    keys = {}
    for nw in (0, 2):
        ds = DeterministicDataset(sources["jsonl"](), to_arrays, seed=5)
        batches = run_loader(ds, nw, collate=split_skipped)
        good = [g for gs, _ in batches for g in gs]
        bad = [b for _, bs in batches for b in bs]
        assert len(good) == len(ds) - 2 and sorted(b.index for b in bad) == [3, 9]
        # without workers the dataset counted them itself; with workers only the workers' copies did...
        assert len(ds.report) == (2 if nw == 0 else 0)
        # ...and the main process counts what they skipped, once each
        assert ds.report.extend(bad) == (0 if nw == 0 else 2)
        assert ds.report.extend(bad) == 0 and sorted(ds.report.indices()) == [3, 9]
        keys[nw] = [key(g) for g in good]
    assert keys[0] == keys[2]


def test_wrapper_rng_is_the_documented_one(sources):
    ds = DeterministicDataset(sources["jsonl"](), lambda rec, rng: rng.random(), seed=9)
    ds.set_epoch(4)
    assert ds[5] == np_rng(9, 4, 5).random()
    assert ds[6] != ds[5]
    with pytest.raises(ValueError):
        DeterministicDataset(sources["jsonl"](), seed=-1)



DRAWS = [("random", (3,)), ("integers", (0, 1 << 40, 4)), ("normal", (0.0, 1.0, 2)), ("uniform", (0.2, 0.9, 2)),
         ("choice", (50, 5, False)), ("permutation", (9,)), ("beta", (2.0, 3.0)), ("poisson", (4.0, 3)), ("bytes", (5,))]


def test_lazy_generator_draws_as_np_rng():
    "A LazyGenerator is np_rng(seed, epoch, index) built at first use: the same draws, method after method, and state."
    import pickle
    from mmlit.core import LazyGenerator
    keys = [(0, 0, 0), (7, 3, 12345), (2**40, 2**33 + 1, 999_999_999), (5, 0, np.int64(6))]
    for first in range(len(DRAWS)):                       # every method as the one that builds it
        for key in keys:
            lazy, eager = LazyGenerator(*key), np_rng(*key)
            for name, args in DRAWS[first:] + DRAWS[:first]:
                np.testing.assert_array_equal(getattr(lazy, name)(*args), getattr(eager, name)(*args), err_msg=f"{key} {name}")
            assert lazy.bit_generator.state == eager.bit_generator.state
    xs, ys = np.arange(8), np.arange(8)
    LazyGenerator(1, 2, 3).shuffle(xs); np_rng(1, 2, 3).shuffle(ys)
    assert list(xs) == list(ys)
    unpickled = pickle.loads(pickle.dumps(LazyGenerator(1, 2, 3)))   # a plain Generator in the same state
    assert type(unpickled) is np.random.Generator and unpickled.random() == np_rng(1, 2, 3).random()
    with pytest.raises(ValueError): LazyGenerator(1, 2, -3)


def test_wrapper_builds_no_generator_it_does_not_draw_from(sources):
    "A transform that never draws leaves its sample's generator unbuilt; one that draws gets np_rng's numbers."
    seen = []
    ds = DeterministicDataset(sources["parquet"](), lambda rec, rng: seen.append(rng) or rec["text"], seed=9)
    ds.__getitems__(list(range(6)))
    assert len(seen) > 0 and not any(r.built for r in seen)
    ds = DeterministicDataset(sources["parquet"](), lambda rec, rng: rng.integers(1 << 30, size=2), seed=9)
    ds.set_epoch(2)
    got = [x for x in ds.__getitems__(list(range(12))) if not isinstance(x, Skipped)]
    want = [np_rng(9, 2, i).integers(1 << 30, size=2) for i in range(12) if not isinstance(ds[i], Skipped)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))

# ---------------------------------------------------------------- text dropout

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "lines.txt"
    f.write_text("".join(f"document number {i}\n" for i in range(2000)))
    return f


def dropped(ds, epoch):
    ds.set_epoch(epoch)
    return np.array([ds[i]["text"] == "" for i in range(len(ds))])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_text_dropout_rate_and_determinism(corpus, rate):
    mk = lambda seed: DeterministicDataset(TextCorpus(corpus, split="line", text_dropout=rate), seed=seed)
    a, b = mk(1), mk(1)
    e0 = dropped(a, 0)
    assert abs(e0.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / len(e0))   # the configured rate
    assert np.array_equal(e0, dropped(b, 0))                                   # same (seed, epoch): same draws
    assert np.array_equal(e0[::-1], np.array([b[i]["text"] == "" for i in reversed(range(len(b)))]))
    e1 = dropped(a, 1)
    assert not np.array_equal(e0, e1) and abs(e1.mean() - rate) < 0.05         # other epoch: other draws
    assert not np.array_equal(e0, dropped(mk(2), 0))                           # other seed: other draws
    # the draw is the first number of np_rng(seed, epoch, index)
    a.set_epoch(0)
    assert all(e0[i] == (np_rng(1, 0, i).random() < rate) for i in range(0, 2000, 97))
    rec = a[int(np.flatnonzero(e0)[0])]
    assert rec["meta"]["text_dropped"] is True and rec["meta"]["index"] == int(np.flatnonzero(e0)[0])


def test_text_dropout_extremes(corpus):
    assert not dropped(DeterministicDataset(TextCorpus(corpus, split="line")), 0).any()
    assert dropped(DeterministicDataset(TextCorpus(corpus, split="line", text_dropout=1.0)), 0).all()


# ---------------------------------------------------------------- mixtures

def tensors(n, base):
    return TensorList([torch.tensor([base + i]) for i in range(n)])


def ids(mix, epoch):
    mix.set_epoch(epoch)
    return [(mix[i]["meta"]["mixture"], mix[i]["input_ids"].item()) for i in range(len(mix))]


def test_mixture_deterministic_and_differs_across_epochs():
    mk = lambda seed=0, **kw: Mixture([tensors(30, 0), tensors(11, 100), tensors(5, 200)], [0.5, 0.3, 0.2], seed=seed,
                                      names=["a", "b", "c"], **kw)
    m1, m2 = mk(), mk()
    assert ids(m1, 0) == ids(m2, 0) and ids(m1, 3) == ids(m2, 3)    # a pure function of (seed, epoch)
    assert ids(m1, 0) != ids(m1, 1)                                 # another epoch, another order
    assert ids(mk(seed=1), 0) != ids(m1, 0)
    assert ids(m2, 1) == ids(mk(), 1)                               # no hidden state from earlier epochs
    assert len(m1) == 46 and len(mk(epoch_length=500)) == 500      # default: the datasets' total; configurable
    m = mk(epoch_length=17)
    assert len(ids(m, 0)) == 17 and len(ids(m, 5)) == 17
    with pytest.raises(IndexError):
        m[17]
    # inside the deterministic wrapper, through DataLoader workers
    w = DeterministicDataset(mk(epoch_length=40), seed=0)
    w.set_epoch(2)
    a = [(r["meta"]["mixture"], r["input_ids"].item()) for r in run_loader(w, 0)]
    b = [(r["meta"]["mixture"], r["input_ids"].item()) for r in run_loader(w, 2)]
    assert a == b == ids(mk(epoch_length=40), 2)


def test_mixture_walks_each_dataset_without_replacement():
    sizes = [13, 7, 4]
    m = Mixture([tensors(n, 100 * k) for k, n in enumerate(sizes)], [0.5, 0.3, 0.2], seed=3, epoch_length=21)
    seen = {k: [] for k in range(3)}
    for e in range(12):
        for name, v in ids(m, e):
            seen[int(name[1:])].append(v - 100 * int(name[1:]))
    for k, n in enumerate(sizes):
        walk = seen[k]
        # consecutive passes over the dataset (continuing across epochs) are each a permutation
        full = len(walk) // n
        assert full >= 2
        for p in range(full):
            assert sorted(walk[p * n:(p + 1) * n]) == list(range(n)), (k, p)
        assert len(set(walk[full * n:])) == len(walk[full * n:])
        assert max(Counter(walk).values()) - min(Counter(walk).values()) <= 1


WEIGHTS = [[1, 1], [0.7, 0.2, 0.1], [5, 1, 0, 2], [0.01, 0.99], [1, 1, 1]]


def tolerance(n_epochs, epoch_length):
    "5 sigma of the proportion error when each epoch's rounding is an independent coin flip per dataset."
    return 5 * 0.5 * np.sqrt(n_epochs) / (n_epochs * epoch_length) + 1e-12


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("epoch_length", [7, 100, 1000])
def test_mixture_proportions_converge(weights, epoch_length):
    w = np.asarray(weights, float) / np.sum(weights)
    m = Mixture([tensors(9, 0) for _ in weights], weights, seed=7, epoch_length=epoch_length)
    total = np.zeros(len(w))
    n_epochs = 300 if epoch_length < 100 else 20
    for e in range(n_epochs):
        c = np.bincount(m.plan(e)[0], minlength=len(w))
        assert c.sum() == epoch_length and np.all(np.abs(c - w * epoch_length) < 1)   # every epoch within one sample
        total += c
    assert np.all(total[w == 0] == 0)
    # over many epochs the proportions converge to the weights: the rounding is not the same bias every
    # epoch (7 samples of [1, 1, 1] rounded the same way each epoch would stay 3/7, 2/7, 2/7)
    assert np.all(np.abs(total / total.sum() - w) < tolerance(n_epochs, epoch_length))
    # within an epoch, a prefix already follows the weights (the datasets are interleaved)
    if epoch_length >= 1000:
        head = np.bincount(m.plan(0)[0][:500], minlength=len(w)) / 500
        assert np.allclose(head, w, atol=0.07)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5).filter(lambda ws: sum(ws) > 0.1),
       st.integers(1, 60), st.integers(0, 2**31))
def test_mixture_proportions_hypothesis(weights, epoch_length, seed):
    w = np.asarray(weights) / np.sum(weights)
    m = Mixture([tensors(5, 0) for _ in weights], weights, seed=seed, epoch_length=epoch_length)
    assert np.array_equal(np.bincount(m.plan(3)[0], minlength=len(w)), m.counts(3))
    n_epochs, total = 200, np.zeros(len(w))
    for e in range(n_epochs):
        c = m.counts(e)
        assert c.sum() == epoch_length and np.all(np.abs(c - w * epoch_length) < 1 + 1e-9) and np.all(c >= 0)
        total += c
    assert np.all(np.abs(total / total.sum() - w) < tolerance(n_epochs, epoch_length))
    assert np.all(total[w == 0] == 0)


def test_mixture_bad_configs_and_skips(tmp_path):
    with pytest.raises(ConfigError):
        Mixture([tensors(3, 0)], [1, 2])
    with pytest.raises(ConfigError):
        Mixture([tensors(3, 0), tensors(3, 0)], [0, 0])
    with pytest.raises(ConfigError):
        Mixture([tensors(3, 0), tensors(3, 0)], [1, -1])
    with pytest.raises(ConfigError):
        Mixture([tensors(3, 0), TensorList([])], [1, 1])
    with pytest.raises(ConfigError):
        Mixture([tensors(3, 0)], [1], epoch_length=0)
    # a bad record in a child is skipped and reported by the mixture (the child's report)
    f = write_jsonl(tmp_path / "j.jsonl", [{"text": "a"}, "{bad", {"text": "c"}])
    jl = JsonlImageText(f)
    m = Mixture([jl, tensors(3, 0)], [1, 1], epoch_length=12, seed=0)
    out = [m[i] for i in range(12)]
    skipped = [o for o in out if isinstance(o, Skipped)]
    assert skipped and {s.bad.index for s in skipped} == {1} and len(m.report) == 1 and len(jl.report) == 1
    assert all(o["meta"]["mixture"] in ("d0", "d1") for o in out if o)
