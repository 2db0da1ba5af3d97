"""`mmlit eval`: on a run's own validation data it gives the trainer's figures; the `clip-benchmark` package, with
mmlit's model loader on the WebDataset mmlit writes, gives `mmlit eval`'s figures; bad input is a clear error.

The run is tiny and barely trained (six steps), so every figure is below 1: each comparison can fail."""
import json, math

import pytest
from cli_helpers import run_cli

from mmlit.demo import build_demo_parquet
from mmlit.recipe import build_run, finish_run, split_by_group

KS = (1, 5, 10)
TEMPLATES = ["a digit {c}", "the handwritten number {c}"]
CLASSNAMES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A six-step tiny dual-encoder run on demo data split by handwriting: its directory, validation Parquet and summary."
    tmp = tmp_path_factory.mktemp("eval")
    demo = build_demo_parquet(tmp / "demo.parquet", n=96, image_size=32)[0]
    train, val = split_by_group(demo, "digit_index", 0.25, tmp / "split")
    cfg = {"run_dir": str(tmp / "run"), "threads": 1, "log": {"progress": False},
           "data": {"data": str(train), "val_data": str(val), "preprocessor": "clip", "max_length": 32,
                    "preprocessor_options": {"size": 32, "uint8": True},
                    "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(tmp / "run" / "tokenizer")}, "loader": {"batch_size": 16}},
           "model": {"kind": "dual_encoder", "preset": "tiny", "options": {"embed_dim": 64, "mrl_dims": [64, 32]}},
           "schedule": {"max_steps": 6}, "zero_shot": "digits", "label_column": "label"}
    run = build_run(cfg)
    summary = finish_run(run, run.fit())
    return tmp / "run", val, summary, tmp


def _eval_json(run_dir, val, out, *extra) -> dict:
    rc, stdout, err = run_cli("eval", run_dir, "--data", val, "--json", out / "{task}.json", *extra)
    assert rc == 0, err
    assert "exact pair" in stdout
    return {t: json.loads((out / f"{t}.json").read_text()) for t in ("zeroshot_retrieval", "zeroshot_classification")
            if (out / f"{t}.json").is_file()}


def test_mmlit_eval_equals_the_trainers_evaluation(trained, tmp_path):
    run_dir, val, summary, _ = trained
    res = _eval_json(run_dir, val, tmp_path, "--label-column", "label")
    ret, cls = res["zeroshot_retrieval"], res["zeroshot_classification"]
    for r in (ret, cls):
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(r) and r["dataset"] == "val"
        assert r["pretrained"].endswith("step-00000006")
    trainer = {k.removeprefix("val/"): v for k, v in summary["metrics"].items()}
    assert not [k for k in trainer if not math.isclose(ret["mmlit"][k], trainer[k], abs_tol=1e-5)]
    for k in KS:
        assert ret["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(trainer[f"t2i_r{k}"], abs=1e-6)
        assert ret["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(trainer[f"i2t_r{k}"], abs=1e-6)
    assert cls["metrics"]["acc1"] == pytest.approx(trainer["zeroshot_acc"], abs=1e-6)
    figures = {**ret["metrics"], **cls["metrics"]}
    assert all(0 <= v < 1 for v in figures.values()), figures          # a barely trained model: nothing saturates
    assert sum(v > 0 for v in figures.values()) >= len(figures) - 2, figures


def test_bad_input_is_a_clear_error(trained, tmp_path):
    run_dir, val, _, tmp = trained
    rc, out, err = run_cli("eval", run_dir, "--data", val, "--label-column", "digit")
    assert rc == 2 and f"{val}: no column 'digit'" in err and "Traceback" not in err and not out
    rc, _, err = run_cli("eval", run_dir, "--data", tmp / "nope.parquet")
    assert rc == 2 and "nope.parquet" in err and "Traceback" not in err
    rc, _, err = run_cli("eval", run_dir, "--data", val, "--label-column", "label", "--templates", "a digit")
    assert rc == 2 and "without {c}" in err


def _wds_loader(root, transform, batch_size=8):
    "CLIP_benchmark's `wds/` dataset over `root` and its DataLoader: the package's own builder where it imports (it needs torchvision)."
    import torch
    try:
        from clip_benchmark.datasets.builder import build_wds_dataset
    except Exception:                     # torchvision missing or built for another torch: the same steps, as the builder takes them
        import webdataset as wds
        def build_wds_dataset(name, transform, split="test", data_dir="root", cache_dir=None):
            n = int((root / split / "nshards.txt").read_text())
            kind = (root / "dataset_type.txt").read_text().strip() if (root / "dataset_type.txt").is_file() else "classification"
            ds = wds.WebDataset(str(root / split / f"{{0..{n - 1}}}.tar"), nodesplitter=lambda s: s).decode(
                wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
            if kind == "retrieval":
                ds = ds.to_tuple(["webp", "png", "jpg", "jpeg"], "txt").map_tuple(transform, str.splitlines)
                ds.classes = ds.templates = None
            else:
                ds = ds.to_tuple(["webp", "png", "jpg", "jpeg"], "cls").map_tuple(transform, None)
                ds.classes = [l.strip() for l in (root / "classnames.txt").read_text().splitlines()]
                ds.templates = [l.strip() for l in (root / "zeroshot_classification_templates.txt").read_text().splitlines()]
            return ds
    ds = build_wds_dataset(root.name, transform, data_dir=str(root))
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    loader.dataset.classes, loader.dataset.templates = ds.classes, ds.templates
    return loader


def _accuracy(output, target, topk=(1,)):
    "clip_benchmark 1.6.2's `accuracy` with `.item()` where it calls `float()` on a 1-element array, which numpy 2.4 refuses."
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_clip_benchmark_package_gives_mmlit_evals_figures(trained, tmp_path, monkeypatch):
    pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval",
                        reason="the clip-benchmark package is not installed (pip install clip-benchmark; see tests/test_evaluate.py)")
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    try: zeroshot_classification.accuracy(__import__("torch").eye(2), __import__("torch").arange(2))
    except TypeError: monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    import pyarrow.parquet as pq
    from mmlit.evaluate import load_clip_benchmark, write_clip_benchmark_wds
    run_dir, val, _, _ = trained
    captions = pq.read_table(val)["caption"].to_pylist()
    assert len(set(captions)) == len(captions)        # no tied captions: tie order is not part of either definition
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    ours = _eval_json(run_dir, val, tmp_path, "--label-column", "label", "--templates", tmp_path / "templates.txt",
                      "--classnames", *CLASSNAMES)
    model, transform, tokenizer = load_clip_benchmark("mmlit", str(run_dir))
    ret_dir = write_clip_benchmark_wds(val, tmp_path / "wds" / "val")
    cls_dir = write_clip_benchmark_wds(val, tmp_path / "wds" / "val_cls", task="zeroshot_classification", label_column="label",
                                       classnames=CLASSNAMES, templates=TEMPLATES)
    theirs = zeroshot_retrieval.evaluate(model, _wds_loader(ret_dir, transform), tokenizer, device="cpu", amp=False, recall_k_list=list(KS))
    loader = _wds_loader(cls_dir, transform)
    theirs.update(zeroshot_classification.evaluate(model, loader, tokenizer, loader.dataset.classes, loader.dataset.templates,
                                                   device="cpu", amp=False))
    mine = {**ours["zeroshot_retrieval"]["metrics"], **ours["zeroshot_classification"]["metrics"]}
    assert sorted(theirs) == sorted(mine)
    assert all(theirs[k] == pytest.approx(mine[k], abs=1e-6) for k in mine), (theirs, mine)
    assert all(v < 1 for v in mine.values()), mine
    try: import clip_benchmark.cli  # noqa: F401  (its model zoo imports torchvision)
    except Exception: return
    from mmlit.evaluate import clip_benchmark_main
    clip_benchmark_main(["eval", "--model_type", "mmlit", "--model", "mmlit", "--pretrained", str(run_dir), "--dataset", "wds/val",
                         "--dataset_root", str(ret_dir), "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10",
                         "--no_amp", "--num_workers", "0", "--output", str(tmp_path / "cb.json"), "--quiet"])
    cb = json.loads((tmp_path / "cb.json").read_text())
    assert cb["task"] == "zeroshot_retrieval"
    assert all(cb["metrics"][k] == pytest.approx(v, abs=1e-6) for k, v in ours["zeroshot_retrieval"]["metrics"].items())
