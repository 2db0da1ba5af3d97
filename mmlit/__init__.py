"""Notebook-first, literate PyTorch toolkit for multimodal (image + text) training

Modules:

- `mmlit.dataset`: Stage 1: sources that read image-text pairs, text corpora and Parquet shards into one record schema, deterministic wrappers, weighted mixtures, task formatting — and honest handling of bad input."""

__version__ = "0.0.1"
