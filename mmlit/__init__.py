"""Notebook-first, literate PyTorch toolkit for multimodal (image + text) training

Modules:

- `mmlit.datamodule`: From a config to loaders: `build_loader(config)` and `build_data_module(config)` read a dict or a YAML file naming data, tokenizer, preprocessor and batch size; `LoaderDataModule` gives the train and validation `ResumableLoader`s the trainer (or Lightning) asks for.
- `mmlit.dataset`: The record every mmlit source returns, the `MMDataset` base class with its bad-record policy, and the report of skipped records.
- `mmlit.images`: Images for every source: opened lazily, refused before decoding when their header is absurd, decoded strictly, upright and with 8 bits per channel.
- `mmlit.jsonl`: Lines and JSON records read safely: each line's byte offset indexed once, a line read in bounded pieces (a longer one is a bad record), a UTF-8 byte-order mark skipped, one JSON array read as records, and nesting too deep to parse refused. The JSONL and text sources (`mmlit.sources`) and the formats read their files through these.
- `mmlit.kinds`: The models a run can train, by name: a dual encoder, a causal LM, a Qwen2-VL embedder, a VLM and an aligner. Each kind says how its config is made, how the model is built, how it is evaluated and what its example run is.
- `mmlit.loader`: Stage 4: loaders whose sample order is a pure function of `(seed, epoch)`, sharded across processes, resumable to the exact batch from an O(1) state, with bad records reported.
- `mmlit.mixture`: Deterministic epochs over sources: `DeterministicDataset` makes sample `i` of epoch `e` a pure function of `(seed, epoch, i)`, and `Mixture` interleaves several sources by weight.
- `mmlit.patches`: Images and videos as Qwen2-VL sees them: smart-resized to its pixel budget, cut into 14×14 patches in the order its patch merger expects, and video frames sampled (uniformly, or at random per segment) before decoding.
- `mmlit.sources`: Stage 1 sources: image-text pairs from JSON lines and Parquet shards, text corpora for causal LM, adapters for HF, torch and tensor datasets, and `open_source`.
- `mmlit.step`: A run's configuration, and what a training step is built from: AdamW with its warmup + cosine schedule, the device and precision (autocast), gradient checkpointing, the process group and the wrapped model, and the loss of a model's output. `mmlit.train`'s `Trainer` puts them together.
- `mmlit.storage`: Object storage for the sources: URIs resolved to fsspec filesystems, globbing, ranged reads, retries of transient faults (counted), clear errors for permanent ones, and an optional local cache.
- `mmlit.tasks`: Task formats: a record's task (caption, question answering, pointing, counting) as the chat turns that stage 2 tokenizes."""

__version__ = "0.0.1"
