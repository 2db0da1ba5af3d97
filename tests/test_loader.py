"""mmlit.loader: determinism across workers, exact resume, elastic resume, persistent workers,
bad records skipped inside workers, mixtures. Real Parquet files with PNG images, written here."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ds_files import image_bytes, write_parquet
from mmlit.core import BadRecordError, ConfigError
from mmlit.sources import ParquetImageText
from mmlit.mixture import DeterministicDataset, Mixture
from mmlit.core import Stream, derive_seed
from mmlit.sources import TensorList
from mmlit.loader import LoaderConfig, epoch_order, make_loader, rank_steps
from mmlit.datamodule import RowSubset

N = 30
BAD_ROWS = {4: b"not an image", 17: "truncated"}   # row -> image bytes that fail to load
BAD_CAPTION_ROW = 23                                  # the transform rejects this one


def _png(rng: np.random.Generator) -> bytes:
    "A 24x24 PNG of noise drawn from `rng`."
    return image_bytes(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))


def _write(path, n: int, bad: bool, seed: int):
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        img = _png(rng)
        if bad and i in BAD_ROWS: img = img[:60] if BAD_ROWS[i] == "truncated" else BAD_ROWS[i]
        images.append(img)
        captions.append("BAD" if bad and i == BAD_CAPTION_ROW else f"photo {i}")
    return write_parquet(path, captions, images, struct_images=False, row_group_size=7)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    return dict(clean=_write(d / "clean.parquet", N, False, 0), bad=_write(d / "bad.parquet", N, True, 1),
                other=_write(d / "other.parquet", 11, False, 2))


def augment(rec, rng):
    "Random 16x16 crop, random flip and a noise vector: all drawn from the sample's rng."
    if rec["text"] == "BAD": raise BadRecordError("caption rejected by the transform")
    y, x = rng.integers(0, 9, 2)
    a = np.asarray(rec["image"].convert("RGB"))[y:y + 16, x:x + 16]
    if rng.random() < 0.5: a = a[:, ::-1]
    return dict(pixel_values=torch.from_numpy(a.copy()).permute(2, 0, 1),
                noise=torch.from_numpy(rng.standard_normal(3).astype(np.float32)),
                index=torch.tensor(rec["meta"]["index"]))


def as_bytes(batch) -> tuple:
    return tuple((k, str(batch[k].dtype), tuple(batch[k].shape), batch[k].numpy().tobytes()) for k in sorted(batch))


def samples(batch) -> list[tuple]:
    "Per-sample (index, pixel bytes, noise bytes)."
    return [(int(batch["index"][i]), batch["pixel_values"][i].numpy().tobytes(), batch["noise"][i].numpy().tobytes())
            for i in range(len(batch["index"]))]


def loader(path, transform=augment, **cfg):
    rank = cfg.pop("rank", None); world = cfg.pop("world_size", None)
    cfg = dict(dict(batch_size=4, seed=3, drop_last=False), **cfg)
    return make_loader(ParquetImageText(path), LoaderConfig(**cfg), transform=transform, rank=rank, world_size=world)


def run(ld, epochs: int, limit: int | None = None, fn=as_bytes) -> list:
    "Batches until `epochs` epochs are done (or `limit` batches), continuing from the loader's state."
    out = []
    while ld.state_dict()["epoch"] < epochs:
        for b in ld:
            out.append(fn(b))
            if limit is not None and len(out) == limit: return out
    return out


@pytest.fixture(scope="module")
def reference(files):
    return run(loader(files["clean"]), 2)


def test_reference_shape(reference):
    assert len(reference) == 2 * 8                      # ceil(30 / 4) per epoch
    assert reference[:8] != reference[8:]               # epoch 1 is another order and other crops


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_byte_identical_across_workers(files, reference, workers):
    assert run(loader(files["clean"], num_workers=workers), 2) == reference


@pytest.mark.parametrize("cut", [1, 5, 8, 11])          # mid-epoch 0, end of epoch 0, mid-epoch 1
def test_resume_gives_exactly_the_remaining_batches(files, reference, cut):
    a = loader(files["clean"])
    got = run(a, 2, limit=cut)
    state = a.state_dict()
    if cut == 8: assert (state["epoch"], state["position"]) == (1, 0)
    b = loader(files["clean"])
    b.load_state_dict(state)
    assert got + run(b, 2) == reference


def test_resume_twice_in_a_row_with_workers(files, reference):
    a = loader(files["clean"], num_workers=2)
    got = run(a, 2, limit=3)
    st = a.state_dict()
    assert st["position"] == 12                         # consumed, not prefetched
    b = loader(files["clean"], num_workers=2); b.load_state_dict(st)
    got += run(b, 2, limit=7)
    c = loader(files["clean"]); c.load_state_dict(b.state_dict())
    c.load_state_dict(c.state_dict())                   # a state of a fresh resume is itself resumable
    assert got + run(c, 2) == reference


def test_resume_does_not_replay_preprocessing(files):
    seen = []
    def counting(rec, rng):
        seen.append(rec["meta"]["index"]); return augment(rec, rng)
    a = loader(files["clean"]); run(a, 1, limit=5)
    b = loader(files["clean"], transform=counting); b.load_state_dict(a.state_dict())
    run(b, 1)
    rest = [i for s in rank_steps(N, 4, seed=3, start=20, blocks=b.blocks, shuffle_span=b.shuffle_span)
            for i in sorted(s.indices)]                 # a step is fetched in index order
    assert seen == rest



def test_a_step_reads_each_of_its_row_groups_once(files, reference, monkeypatch):
    "Fully shuffled steps jump between row groups; fetched in index order, a step reads each of them once, same batches."
    reads = []
    full = run(loader(files["clean"], shuffle_span=0), 2)
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: reads.append(i) or real(self, i, **k))
    assert run(loader(files["clean"], shuffle_span=0), 2) == full
    groups = [len({i // 7 for i in s.indices}) for e in range(2) for s in rank_steps(N, 4, seed=3, epoch=e)]  # 7 rows a group
    assert len(reads) <= sum(groups) < 2 * N            # in step order (one group cached) it is 49 reads

def test_in_order_workers_read_each_row_group_once(tmp_path, monkeypatch):
    "Read in order, the steps that share a row group make one worker task: 2 workers read each row group once, same batches, exact resume."
    rng = np.random.default_rng(5)
    path = write_parquet(tmp_path / "aligned.parquet", [f"photo {i}" for i in range(32)], [_png(rng) for _ in range(32)],
                         struct_images=False, row_group_size=8)   # 4 row groups of 8 rows: 4 steps of 2 each
    ref = run(loader(path, batch_size=2, train=False), 2)
    log, real = tmp_path / "reads.log", pq.ParquetFile.read_row_group
    def logged(self, i, **k):                           # in the workers too (forked), so the log is a file
        with open(log, "a") as f: f.write(f"{i}\n")
        return real(self, i, **k)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", logged)
    two = loader(path, batch_size=2, train=False, num_workers=2)
    assert two.task_steps == 4
    assert run(two, 2) == ref
    assert sorted(map(int, log.read_text().split())) == [0, 0, 1, 1, 2, 2, 3, 3]   # once per epoch, not once per worker
    a = loader(path, batch_size=2, train=False, num_workers=2)
    got = run(a, 2, limit=5)                            # stopped inside a task of 4 steps
    b = loader(path, batch_size=2, train=False, num_workers=2); b.load_state_dict(a.state_dict())
    assert a.state_dict()["position"] == 10 and got + run(b, 2) == ref


def _steps(loaders, steps: int) -> list[list]:
    "Lock-stepped ranks' samples, step by step: the global steps (each rank's share, rank after rank)."
    def epochs(l):
        while True: yield from l
    its = [epochs(l) for l in loaders]
    return [[s for it in its for s in samples(next(it))] for _ in range(steps)]


def _stream(loaders, steps: int) -> list:
    "Interleave lock-stepped ranks' samples step by step: the global stream."
    return [s for step in _steps(loaders, steps) for s in step]


def _same_steps(got: list[list], stream: list) -> bool:
    "Each global step holds the same samples as the stretch of the single-process `stream` it covers (in any order)."
    ends = np.cumsum([len(s) for s in got])
    return ends[-1] == len(stream) and all(sorted(s) == sorted(stream[e - len(s):e]) for s, e in zip(got, ends))


@pytest.mark.parametrize("shuffle,blocks,span", [(True, None, 0), (True, [7, 7, 7, 7, 2], 2), (True, [7, 7, 7, 7, 2], 8),
                                                     (False, None, 0)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("split", ["stream", "locality"])
def test_rank_split_keeps_each_global_step(shuffle, blocks, span, world, drop_last, split):
    """Each global step holds the same samples for any world size and split; "stream": rank r takes the r-th slice, in
    order; "locality": rank r takes the r-th B of them by index, in stream order."""
    order = epoch_order(N, 3, 1, shuffle, blocks, span)
    ranks = [rank_steps(N, 4, seed=3, epoch=1, shuffle=shuffle, rank=r, world_size=world, drop_last=drop_last, blocks=blocks,
                        shuffle_span=span, rank_split=split) for r in range(world)]
    assert len({len(steps) for steps in ranks}) == 1
    at = {int(i): p for p, i in enumerate(order)}            # each sample's position in the stream
    for k, steps in enumerate(zip(*ranks)):
        begin, b = k * 4 * world, len(steps[0].indices)
        assert [(len(s.indices), s.end, s.step) for s in steps] == [(b, steps[0].end, k * world + r) for r in range(world)]
        pos = np.arange(begin, begin + world * b)             # the step's positions; past the epoch's end: padding
        assert sorted(i for s in steps for i in s.indices) == sorted(order[pos % N].tolist())
        if split == "stream" or not shuffle:                  # the r-th slice of the step, in order (padding included)
            assert [s.indices for s in steps] == [order[pos[r * b:(r + 1) * b] % N].tolist() for r in range(world)]
        elif begin + world * b <= N:                          # "locality", no padding: ranks by index, each in stream order
            assert all(max(x.indices) < min(y.indices) for x, y in zip(steps, steps[1:]))
            assert all([at[i] for i in s.indices] == sorted(at[i] for i in s.indices) for s in steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_split_keeps_ranks_on_their_row_groups(seed):
    """Block shuffle over 32 row groups of the per-rank batch: with "locality" a rank reads about its share of them per
    span; with the default "stream" every rank reads all of them."""
    n, rg, span, blocks = 1024, 32, 8, [32] * 32
    def touched(indices_per_step, world):                   # row groups read per span (the loader caches a span)
        per = span * rg // (rg * world)                     # steps per span
        return sum(len({i // rg for s in indices_per_step[w:w + per] for i in s}) for w in range(0, len(indices_per_step), per))
    def ratios(world, split):                                 # row groups each rank reads over its share of them
        share = n // rg // world
        return [touched([s.indices for s in rank_steps(n, rg, seed=seed, rank=r, world_size=world, drop_last=True, blocks=blocks,
                                                       shuffle_span=span, rank_split=split)], world) / share for r in range(world)]
    for world, most in ((1, 1.0), (2, 1.25), (4, 2.0)):
        got = ratios(world, "locality")
        assert max(got) <= most and got[0] <= 1 + (world - 1) / 4, got
        assert min(ratios(world, "stream")) == world          # contiguous slices of each step: every rank reads all of them


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
@pytest.mark.parametrize("split", ["stream", "locality"])
def test_elastic_resume(files, before, after, split):
    ref = run(loader(files["clean"], batch_size=3), 2, fn=samples)
    ref = [s for b in ref for s in b]
    first = [loader(files["clean"], batch_size=3, rank=r, world_size=before, rank_split=split) for r in range(before)]
    got = _steps(first, 12 // (3 * before))           # 12 global samples
    state = first[0].state_dict()
    assert state["position"] == 12 and all(l.state_dict() == state for l in first)
    second = [loader(files["clean"], batch_size=3, rank=r, world_size=after, rank_split=split) for r in range(after)]
    for l in second: l.load_state_dict(state)
    steps_left = -(-(N - 12) // (3 * after)) + -(-N // (3 * after))
    got += _steps(second, steps_left)
    if split == "stream": assert [s for st in got for s in st] == ref   # the single process's stream, in order
    else:
        assert _same_steps(got, ref)                   # the same samples in every global step...
        if before == 1: assert [x for st in got[:4] for x in st] == ref[:12]   # ...and one process keeps the stream's order


@pytest.mark.parametrize("saved,resumed", [("stream", "locality"), ("locality", "stream"), (None, "locality")])
def test_resume_under_another_rank_split(files, saved, resumed):
    "The split decides only which rank takes which sample of a step: a state resumes under the other on the same global steps."
    ref = [s for b in run(loader(files["clean"], batch_size=4), 1, fn=samples) for s in b]
    first = [loader(files["clean"], batch_size=2, rank=r, world_size=2, rank_split=saved or "stream") for r in range(2)]
    got = _steps(first, 2)
    state = first[0].state_dict()
    if saved is None: del state["rank_split"]          # a state without rank_split: the default split
    assert state.get("rank_split") == saved
    second = [loader(files["clean"], batch_size=2, rank=r, world_size=2, rank_split=resumed) for r in range(2)]
    for l in second: l.load_state_dict(state)
    got += _steps(second, -(-(N - 8) // 4))
    assert _same_steps(got, ref)
    with pytest.raises(ConfigError, match="rank_split='index'"): second[0].load_state_dict({**state, "rank_split": "index"})


def test_rank_split_is_checked_and_ignored_without_shuffle(files):
    with pytest.raises(ConfigError, match=r"rank_split must be one of \('stream', 'locality'\), got 'index'"):
        LoaderConfig(rank_split="index")
    with pytest.raises(ConfigError, match="rank_split must be one of"): rank_steps(8, 2, rank_split="by index")
    plain = [loader(files["clean"], shuffle=False, drop_last=True, rank=r, world_size=2) for r in range(2)]
    local = [loader(files["clean"], shuffle=False, drop_last=True, rank=r, world_size=2, rank_split="locality") for r in range(2)]
    assert all(l.rank_split == "stream" and l.state_dict()["rank_split"] == "stream" for l in local)
    assert [[as_bytes(b) for b in l] for l in local] == [[as_bytes(b) for b in l] for l in plain]
    assert [int(i) for b in plain[0] for i in b["index"]] == [i for k in (0, 8, 16) for i in range(k, k + 4)]


def test_persistent_workers_follow_epochs(files):
    a = loader(files["clean"], num_workers=2, persistent_workers=True)
    e0 = [as_bytes(b) for b in a]
    it0 = a.dataloader._iterator
    e1 = [as_bytes(b) for b in a]
    assert a.dataloader._iterator is it0                # the same workers served epoch 1
    assert e0 != e1
    fresh = loader(files["clean"]); fresh.set_epoch(1)
    assert [as_bytes(b) for b in fresh] == e1


def test_bad_records_skipped_in_workers_and_reported(files):
    ds = ParquetImageText(files["bad"])
    ld = make_loader(ds, LoaderConfig(batch_size=4, seed=3, num_workers=2, drop_last=False), transform=augment)
    got = [samples(b) for b in ld]
    idx = [s[0] for b in got for s in b]
    bad = {4, 17, BAD_CAPTION_ROW}
    assert sorted(idx) == sorted(set(range(N)) - bad)
    assert sorted(ld.report.indices()) == sorted(bad)
    assert {b.index: b.reason for b in ld.report}[BAD_CAPTION_ROW] == "caption rejected by the transform"
    assert all(b.file == str(files["bad"]) for b in ld.report)
    assert len(ds.report) == 0                          # the workers' copies saw them; the loader merged them
    assert sorted(len(b) for b in got)[0] < 4           # batches with a bad record are smaller
    assert len(got) == 8


def _mixture(files):
    return Mixture([ParquetImageText(files["clean"]), ParquetImageText(files["other"])], [0.6, 0.4],
                   seed=5, epoch_length=20)


def test_mixture_keeps_guarantees(files):
    cfg = dict(batch_size=4, seed=3)
    ref = run(make_loader(_mixture(files), LoaderConfig(**cfg), transform=augment), 2)
    assert len(ref) == 10 and ref[:5] != ref[5:]
    assert run(make_loader(_mixture(files), LoaderConfig(num_workers=2, **cfg), transform=augment), 2) == ref
    a = make_loader(_mixture(files), LoaderConfig(**cfg), transform=augment)
    got = run(a, 2, limit=7)
    b = make_loader(_mixture(files), LoaderConfig(num_workers=2, **cfg), transform=augment)
    b.load_state_dict(a.state_dict())
    assert got + run(b, 2) == ref


def test_deterministic_dataset_and_set_epoch(files):
    dd = DeterministicDataset(ParquetImageText(files["clean"]), augment, seed=3)
    a = make_loader(dd, LoaderConfig(batch_size=4, seed=3, drop_last=False))
    a.set_epoch(1)
    assert [as_bytes(b) for b in a] == run(loader(files["clean"]), 2)[8:]
    with pytest.raises(ConfigError, match="already a DeterministicDataset"):
        make_loader(dd, LoaderConfig(batch_size=4), transform=augment)


def test_build_loader_from_yaml_with_local_tokenizer(files, tmp_path):
    import yaml
    from mmlit.datamodule import build_data_module, build_loader
    from mmlit.text import train_tokenizer
    tok_dir = tmp_path / "tok"
    train_tokenizer([f"photo {i} of a thing" for i in range(50)], vocab_size=300, min_frequency=1, save_dir=tok_dir)
    cfg = dict(data=str(files["bad"]), tokenizer=str(tok_dir), preprocessor="clip", preprocessor_options=dict(size=16),
               max_length=8, task="retrieval", loader=dict(batch_size=4, num_workers=2, seed=1, drop_last=False))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    ld = build_loader(tmp_path / "cfg.yaml")
    batches = list(ld)
    assert sum(len(b["input_ids"]) for b in batches) == N - 2    # rows 4 and 17 cannot be read (23's caption is fine here)
    assert batches[0]["pixel_values"].shape[1:] == (3, 16, 16) and batches[0]["input_ids"].shape[1] <= 8
    assert sorted(ld.report.indices()) == [4, 17]
    again = build_loader(cfg)                                      # dict form, same batches
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in batches]
    dm = build_data_module(dict(cfg, val_split=0.2))
    assert len(dm.val_data) == 6 and len(dm.train_data) == 24


def test_one_liner_config_takes_rank_split(files):
    from mmlit.datamodule import build_loader, loader_parts
    cfg = dict(data=str(files["clean"]), tokenizer=dict(train=dict(vocab_size=300, min_frequency=1)),
               preprocessor_options=dict(size=16), max_length=8, batch_size=4)
    assert loader_parts(cfg)["loader_config"].rank_split == "stream"        # the default
    assert loader_parts({**cfg, "rank_split": "locality"})["loader_config"].rank_split == "locality"
    lds = [build_loader({**cfg, "loader": dict(rank_split="locality")}, rank=r, world_size=2) for r in range(2)]
    assert [l.sampler.rank_split for l in lds] == ["locality"] * 2 and lds[0].state_dict()["rank_split"] == "locality"
    with pytest.raises(ConfigError, match=r"rank_split: expected one of \['stream', 'locality'\], got 'index'"):
        loader_parts({**cfg, "rank_split": "index"})


def test_build_loader_lm_windows(tmp_path):
    from mmlit.datamodule import build_loader
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} says something about loaders and order" for i in range(40)))
    ld = build_loader(dict(data=str(corpus), task="lm", max_length=16, batch_size=4,
                           tokenizer=dict(train=dict(vocab_size=300, min_frequency=1))))
    b = next(iter(ld))
    assert b["input_ids"].shape == b["labels"].shape == (4, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels are the next tokens


# --- row-group-aware shuffle ---

def _spans_needed(order, block_of, span: int) -> int:
    "Fewest consecutive stretches of `order` that each touch at most `span` blocks (greedy)."
    count, seen = 0, set()
    for i in order:
        b = block_of[i]
        if b not in seen and len(seen) == span: count, seen = count + 1, set()
        seen.add(b)
    return count + bool(seen)


@pytest.mark.parametrize("seed,epoch", [(0, 0), (3, 1), (7, 5)])
def test_block_order_is_a_pure_permutation(seed, epoch):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 12, 40); n = int(blocks.sum())
    o = epoch_order(n, seed, epoch, blocks=blocks, shuffle_span=4)
    assert o.dtype == np.int64 and sorted(o.tolist()) == list(range(n))
    assert np.array_equal(o, epoch_order(n, seed, epoch, blocks=blocks, shuffle_span=4))
    assert not np.array_equal(o, epoch_order(n, seed, epoch + 1, blocks=blocks, shuffle_span=4))
    old = np.random.default_rng(derive_seed(seed, epoch, 0, Stream.LOADER_ORDER)).permutation(n)   # the pinned full shuffle
    assert np.array_equal(epoch_order(n, seed, epoch), old)
    assert np.array_equal(epoch_order(n, seed, epoch, blocks=blocks, shuffle_span=0), old)
    with pytest.raises(ConfigError, match="summing to"): epoch_order(n + 1, seed, epoch, blocks=blocks, shuffle_span=4)


@pytest.mark.parametrize("span", [1, 3, 8])
def test_each_span_holds_at_most_span_blocks(span):
    blocks = np.random.default_rng(span).integers(1, 20, 33); n = int(blocks.sum())
    block_of = np.repeat(np.arange(len(blocks)), blocks)
    o = epoch_order(n, 1, 2, blocks=blocks, shuffle_span=span)
    assert _spans_needed(o, block_of, span) == -(-len(blocks) // span)       # spans of `span` blocks each
    cut = np.cumsum(np.bincount(np.arange(len(blocks)) // span, weights=blocks[np.random.default_rng(
        derive_seed(1, 2, 0, Stream.LOADER_ORDER)).permutation(len(blocks))]).astype(int))
    for a, b in zip(np.r_[0, cut[:-1]], cut): assert len(set(block_of[o[a:b]])) <= span
    if span < len(blocks): assert _spans_needed(epoch_order(n, 1, 2), block_of, span) > 2 * -(-len(blocks) // span)


@pytest.fixture(scope="module")
def blocked(files):
    "Two epochs of a block-shuffled loader (spans of 2 row groups of 7 rows)."
    return run(loader(files["clean"], shuffle_span=2), 2)


def test_block_shuffle_follows_the_blocked_order(files, blocked):
    ld = loader(files["clean"], shuffle_span=2)
    assert ld.blocks.tolist() == [7, 7, 7, 7, 2] and ld.shuffle_span == 2 and ld.dataset.dataset.cache_row_groups == 2
    got = [i for e in range(2) for b in run(loader(files["clean"], shuffle_span=2), e + 1, fn=samples)[8 * e:] for i, *_ in b]
    want = [i for e in range(2) for s in rank_steps(N, 4, seed=3, epoch=e, blocks=[7, 7, 7, 7, 2], shuffle_span=2)
            for i in s.indices]
    assert got == want and got != [i for b in run(loader(files["clean"], shuffle_span=0), 2, fn=samples) for i, *_ in b]
    seq = loader(files["clean"], train=False)
    assert seq.shuffle_span == 0 and seq.dataset.dataset.cache_row_groups == 1   # reading in order: one row group cached


@pytest.mark.parametrize("workers", [1, 2])
def test_block_shuffle_byte_identical_across_workers(files, blocked, workers):
    assert run(loader(files["clean"], shuffle_span=2, num_workers=workers), 2) == blocked


@pytest.mark.parametrize("cut", [3, 11])
def test_block_shuffle_resume(files, blocked, cut):
    a = loader(files["clean"], shuffle_span=2)
    got = run(a, 2, limit=cut)
    state = a.state_dict()
    assert state["shuffle_span"] == 2
    b = loader(files["clean"], shuffle_span=2, num_workers=2); b.load_state_dict(state)
    assert got + run(b, 2) == blocked
    with pytest.raises(ConfigError, match="shuffle_span=2"): loader(files["clean"], shuffle_span=3).load_state_dict(state)
    named = {("shuffle_window" if k == "shuffle_span" else k): v for k, v in state.items()}   # the span under its other key
    c = loader(files["clean"], shuffle_span=2); c.load_state_dict(named)
    assert got + run(c, 2) == blocked


def test_block_shuffle_elastic_resume(files):
    ref = [s for b in run(loader(files["clean"], batch_size=3, shuffle_span=2), 2, fn=samples) for s in b]
    for split in ("stream", "locality"):
        first = [loader(files["clean"], batch_size=3, shuffle_span=2, rank=r, world_size=2, rank_split=split) for r in range(2)]
        got = _steps(first, 2)
        second = loader(files["clean"], batch_size=3, shuffle_span=2); second.load_state_dict(first[0].state_dict())
        if split == "stream": assert [s for st in got for s in st] + [s for b in run(second, 2, fn=samples) for s in b] == ref
        else: assert _same_steps(got + run(second, 2, fn=samples), ref)


def test_wrappers_without_blocks_get_a_full_shuffle(files):
    mix = make_loader(_mixture(files), LoaderConfig(batch_size=4), transform=augment)
    sub = make_loader(RowSubset(ParquetImageText(files["clean"]), range(0, N, 2)), LoaderConfig(batch_size=4), transform=augment)
    plain = make_loader(TensorList([torch.tensor([i]) for i in range(10)]), LoaderConfig(batch_size=4))
    assert [(l.blocks, l.shuffle_span) for l in (mix, sub, plain)] == [(None, 0)] * 3


def test_block_shuffle_reads_far_fewer_row_groups(tmp_path, monkeypatch):
    "200 rows in 20 row groups: a full shuffle re-reads row groups at nearly every sample, a blocked one about once each."
    path = tmp_path / "many.parquet"
    blob = _png(np.random.default_rng(0))
    pq.write_table(pa.table(dict(image=[blob] * 200, caption=[f"c{i}" for i in range(200)])), path, row_group_size=10)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: reads.append(i) or real(self, i, **k))
    counts = {}
    for span in (0, 4):
        reads.clear()
        run(loader(path, transform=augment, batch_size=8, shuffle_span=span), 1)
        counts[span] = len(reads)
    print(counts)
    assert counts[4] <= 2 * 20 and counts[0] >= 4 * counts[4], counts


# --- masked LM: masks from the loader's (epoch, step), exact resume with any worker count ---

def _mlm_corpus(tmp_path):
    from collate_helpers import corpus
    lines = [" ".join(d.split()[:12]) for d in corpus(60) if len(d.split()) >= 12][:44]
    path = tmp_path / "mlm.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _encode(rec, rng):
    from collate_helpers import tiny_tokenizer
    global _TOK
    if "_TOK" not in globals(): _TOK = tiny_tokenizer()
    ids = torch.tensor(_TOK(rec["text"])["input_ids"])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _mlm_loader(path, workers):
    from collate_helpers import tiny_tokenizer
    from mmlit.sources import TextCorpus
    return make_loader(TextCorpus(path, split="line"), LoaderConfig(batch_size=4, seed=3, num_workers=workers),
                       transform=_encode, collate="masked_lm", collate_options=dict(tokenizer=tiny_tokenizer(), seed=7))


def _masked(b): return (b["input_ids"].numpy().tobytes(), b["labels"].numpy().tobytes())


@pytest.mark.parametrize("workers", [0, 2])
def test_masked_lm_resumes_exactly(tmp_path, workers):
    "Same seed, 7 batches, state saved mid-epoch, resumed: the batches (masks included) are the uninterrupted run's."
    path = _mlm_corpus(tmp_path)
    ref = run(_mlm_loader(path, 0), 2, fn=_masked)
    assert len(ref) == 22 and len(set(ref)) == 22                  # 11 steps an epoch, every batch masked its own way
    assert run(_mlm_loader(path, workers), 2, fn=_masked) == ref   # the worker count changes nothing
    a = _mlm_loader(path, workers)
    got = run(a, 2, limit=7, fn=_masked)
    state = a.state_dict()
    assert (state["epoch"], state["position"]) == (0, 28)
    b = _mlm_loader(path, workers)
    b.load_state_dict(state)
    assert got + run(b, 2, fn=_masked) == ref


# --- every path fills loader.report; max_bad_fraction over all workers; the data's fingerprint ---

def test_lm_one_liner_reports_bad_paragraphs(tmp_path):
    from mmlit.datamodule import build_data_module, build_loader
    corpus = tmp_path / "corpus.txt"
    paras = [f"paragraph {i} says something about loaders and order".encode() for i in range(40)]
    paras[5] = b"paragraph five is \xff\xfe not utf-8"
    corpus.write_bytes(b"\n\n".join(paras) + b"\n")
    cfg = dict(data=str(corpus), task="lm", max_length=16, batch_size=4, tokenizer=dict(train=dict(vocab_size=300, min_frequency=1)))
    ld = build_loader(cfg)
    assert [(b.file, b.index, b.unit) for b in ld.report] == [(str(corpus), 10, "line")]   # paragraph 5 starts on line 10
    assert "UTF-8" in next(iter(ld.report)).reason
    assert next(iter(ld))["input_ids"].shape == (4, 16)
    assert len(build_data_module(dict(cfg, val_split=2)).train_dataloader().report) == 1


def test_max_bad_fraction_counts_all_workers(files):
    "3 bad rows of 30; with 2 workers neither sees more than 2 of them, yet 3 > 0.08 * 30 is refused."
    from mmlit.core import TooManyBadRecords
    steps = rank_steps(N, 4, seed=3, blocks=[7, 7, 7, 7, 2], shuffle_span=8)
    per_worker = [sum(i in (4, 17, BAD_CAPTION_ROW) for s in steps[w::2] for i in s.indices) for w in range(2)]
    assert max(per_worker) <= 2                                      # no worker alone is over the limit
    for workers in (0, 2):
        ld = make_loader(ParquetImageText(files["bad"], max_bad_fraction=0.08),
                         LoaderConfig(batch_size=4, seed=3, num_workers=workers, drop_last=False), transform=augment)
        assert ld.shuffle_span == 8 and ld.blocks.tolist() == [7, 7, 7, 7, 2]
        with pytest.raises(TooManyBadRecords, match=r"3 of 30 records are bad"):
            list(ld)
    ok = make_loader(ParquetImageText(files["bad"], max_bad_fraction=0.1),
                     LoaderConfig(batch_size=4, seed=3, num_workers=2, drop_last=False), transform=augment)
    assert sum(len(b["index"]) for b in ok) == N - 3 and len(ok.report) == 3   # 3 <= 0.1 * 30: allowed


def test_state_for_other_data_is_refused(files, tmp_path):
    a = loader(files["clean"])
    run(a, 1, limit=2)
    state = a.state_dict()
    same_len = _write(tmp_path / "clean.parquet", N, False, 9)       # same name, same length, other pixels
    assert pq.ParquetFile(same_len).metadata.num_rows == N and same_len.stat().st_size != files["clean"].stat().st_size
    with pytest.raises(ConfigError, match="saved for other data"):
        loader(same_len).load_state_dict(state)
    with pytest.raises(ConfigError, match="no data fingerprint"):
        loader(files["clean"]).load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})
    moved = tmp_path / "moved"; moved.mkdir()
    (moved / files["clean"].name).write_bytes(files["clean"].read_bytes())
    b = loader(moved / files["clean"].name)                           # the same file in another folder resumes
    b.load_state_dict(state)
    assert run(b, 1, limit=1) == run(loader(files["clean"]), 1, limit=3)[2:]
    t = make_loader(TensorList([torch.tensor([i]) for i in range(N)]), LoaderConfig(batch_size=4))
    with pytest.raises(ConfigError, match="saved for other data"):   # no files: its type and length tell it apart
        t.load_state_dict(dict(t.state_dict(), fingerprint=state["fingerprint"]))


def test_worker_batches_reach_the_main_process_in_one_shared_block(files):
    "With workers, a batch's small tensors arrive as views of one shared block (one file descriptor); same batches as 0 workers."
    zero = list(loader(files["clean"], collate="vision"))
    two = list(loader(files["clean"], collate="vision", num_workers=2))
    assert [as_bytes(b) for b in zero] == [as_bytes(b) for b in two]
    assert all(len({b[k].untyped_storage().data_ptr() for k in ("pixel_values", "noise", "index")}) == 1 for b in two)
    assert all(len({b[k].untyped_storage().data_ptr() for k in b}) == 3 for b in zero)   # without workers: as collated
