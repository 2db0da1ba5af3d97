"""Rows planned over the whole dataset (`PackedRows`) through the loader: full rows, deterministic, bad records reported."""
import torch

from mmlit.dataset import BadRecord, Skipped
from mmlit.demo import corpus_documents
from mmlit.loader import LoaderConfig, make_loader
from mmlit.packing import PackedRows, PackingCollator
from mmlit.text import lm_windows, train_tokenizer

DOCS = corpus_documents()[:10]


def _windows():
    tok = train_tokenizer(DOCS, vocab_size=300)
    wins = lm_windows(DOCS, tok, max_length=64, drop_last=False)
    return tok, [wins[i] for i in range(len(wins))]


def _epoch(rows, tok, workers, train=True):
    ld = make_loader(rows, LoaderConfig(batch_size=4, num_workers=workers, seed=0, train=train),
                     collate=PackingCollator(tok, max_length=256))
    return [b for b in ld], ld


def test_planned_rows_are_full_and_identical_across_workers():
    tok, items = _windows()
    rows = PackedRows(items, [len(w["input_ids"]) for w in items], max_length=256)
    a, _ = _epoch(rows, tok, 0)
    b, _ = _epoch(rows, tok, 2)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["shift_labels"], y["shift_labels"])
    real = sum(int((x["shift_labels"] != -100).sum()) for x in a)
    total = sum(x["input_ids"].numel() for x in a)
    assert real / total >= 0.97, real / total


def test_bad_record_inside_a_planned_row_is_reported():
    tok, items = _windows()
    bad = BadRecord("text", "corpus.txt", 3, "not valid UTF-8")
    items[3] = Skipped(bad)
    lengths = [64 if isinstance(w, Skipped) else len(w["input_ids"]) for w in items]
    rows = PackedRows(items, lengths, max_length=256)
    for workers in (0, 2):
        batches, ld = _epoch(rows, tok, workers, train=False)   # eval: every row, none dropped
        assert list(ld.report) == [bad]
        assert sum(len(r) for x in batches for r in x["packed_samples"]) == len(items) - 1  # every good window
