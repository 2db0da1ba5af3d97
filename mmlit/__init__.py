"""Notebook-first, literate PyTorch toolkit for multimodal (image + text) training

Modules:

- `mmlit.dataset`: Stage 1: sources that read image-text pairs, text corpora and Parquet shards into one record schema, deterministic wrappers, weighted mixtures, task formatting — and honest handling of bad input.
- `mmlit.loader`: Stage 4: loaders whose sample order is a pure function of `(seed, epoch)`, sharded across processes, resumable to the exact batch from an O(1) state, with bad records reported.
- `mmlit.storage`: Object storage for the sources: URIs resolved to fsspec filesystems, globbing, ranged reads, retries of transient faults (counted), clear errors for permanent ones, and an optional local cache."""

__version__ = "0.0.1"
