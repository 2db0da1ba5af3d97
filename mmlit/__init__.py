"""Notebook-first, literate PyTorch toolkit for multimodal (image + text) training

Modules:

- `mmlit.dataset`: The record every mmlit source returns, the `MMDataset` base class with its bad-record policy, and the report of skipped records.
- `mmlit.images`: Images for every source: opened lazily, refused before decoding when their header is absurd, decoded strictly, upright and with 8 bits per channel.
- `mmlit.loader`: Stage 4: loaders whose sample order is a pure function of `(seed, epoch)`, sharded across processes, resumable to the exact batch from an O(1) state, with bad records reported.
- `mmlit.mixture`: Deterministic epochs over sources: `DeterministicDataset` makes sample `i` of epoch `e` a pure function of `(seed, epoch, i)`, and `Mixture` interleaves several sources by weight.
- `mmlit.sources`: Stage 1 sources: image-text pairs from JSON lines and Parquet shards, text corpora for causal LM, adapters for HF, torch and tensor datasets, and `open_source`.
- `mmlit.storage`: Object storage for the sources: URIs resolved to fsspec filesystems, globbing, ranged reads, retries of transient faults (counted), clear errors for permanent ones, and an optional local cache.
- `mmlit.tasks`: Task formats: a record's task (caption, question answering, pointing, counting) as the chat turns that stage 2 tokenizes."""

__version__ = "0.0.1"
