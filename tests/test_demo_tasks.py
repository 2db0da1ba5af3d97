"""The demo's task scenes as a data source: the Parquet reader gives each record its conversation and the columns asked
for in `meta`, and the retrieval demo's training crops keep every caption's size and position words true."""
import numpy as np
import pytest

from mmlit.core import ConfigError, np_rng
from mmlit.demo import box_words, build_task_parquet, demo_row
from mmlit.multimodal import build_preprocessor
from mmlit.sources import open_source


def test_task_parquet_reads_conversations_and_meta_columns(tmp_path):
    path = build_task_parquet(tmp_path / "val.parquet", n=3, split="val")
    src = open_source(str(path), meta_columns=["target_boxes", "count"])
    recs = [src[i] for i in range(len(src))]
    assert [r["task"] for r in recs[:4]] == ["caption", "qa", "pointing", "counting"]
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"] == r["text"]
        assert 1 <= r["meta"]["count"] <= 4 and all(len(b) == 4 for b in r["meta"]["target_boxes"])
    with pytest.raises(ConfigError, match="no column 'boxez' \\(meta_columns\\)"): open_source(str(path), meta_columns=["boxez"])


def test_retrieval_crops_keep_caption_words(tok):
    "The demo's preprocessor options: the record's box (from `meta`) steers the crop, and every caption word stays true."
    from mmlit.preprocess import pil_to_chw
    opts = dict(size=48, uint8=True, flip=0.0, jitter=0.0, crop_scale=[0.5, 1.0], keep="box_words")   # as mmlit.recipe.demo_config
    pre = build_preprocessor("clip", tok, train=True, **opts)
    moved = 0
    for k in range(60):
        r = demo_row(k)
        rec = dict(image=r["image"], text=r["caption"], negatives=[], task="caption", meta=dict(box=r["box"]))
        out, (box,), _ = pre.images.fit_with_boxes(r["image"], np_rng(0, 0, k), [r["box"]])
        assert box_words(box, 48, 48) == dict(size=r["size"], position=r["position"])
        assert np.array_equal(pre(rec, np_rng(0, 0, k))["pixel_values"].numpy(), pil_to_chw(out).numpy())   # the same crop
        moved += not np.allclose(box, np.asarray(r["box"]) * 48 / 64)
    assert moved > 10                                           # crops were made, not only whole images


# ------------------------------------------------------------------ the generative demos' reports
def _demo(*argv) -> tuple[int, str]:
    "`mmlit demo ARGV` in-process: exit status and what it printed."
    import contextlib, io
    from mmlit.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rc = main(["demo", *map(str, argv), "--no-progress"])
    return rc, out.getvalue()


def _answers_part(page) -> str:
    text = page.read_text()
    return text[text.index('id="answers"'):text.index('id="failures"')]


def _table_row(html_text: str, needle: str) -> str:
    "The `<tr>` of a report table that holds `needle`."
    i = html_text.index(needle)
    return html_text[html_text.rindex("<tr>", 0, i):html_text.index("</tr>", i)]


def test_caption_demo_report_shows_marked_captions(tmp_path, dual_encoder_run, monkeypatch):
    "`mmlit demo --task caption` on tiny runs: the encoder trained first (both wall times printed), then the aligner's report."
    import html, json
    import mmlit.generate, mmlit.recipe
    from conftest import tiny_aligner_config, tiny_encoder_config
    from mmlit.core import config_from_dict
    from mmlit.generate import CAPTION_FIELDS, parse_caption
    from mmlit.recipe import RunConfig, caption_truths
    from mmlit.report import CAPTION_PROMPT
    d = dual_encoder_run
    monkeypatch.setattr(mmlit.recipe, "demo_config", lambda run_dir, epochs=50, **_: config_from_dict(RunConfig, tiny_encoder_config(run_dir, d["train"], d["val"])))
    monkeypatch.setattr(mmlit.recipe, "caption_demo_config", lambda run_dir, encoder_run, epochs=6, **_: config_from_dict(
        RunConfig, tiny_aligner_config(run_dir, d["train"], d["val"], encoder_run, steps=2)))
    truths = caption_truths(d["val"])
    wrong = f"a purple {(truths[0]['label'] + 1) % 10}"                                # the wrong digit: must be wrong
    real = mmlit.generate.generate
    monkeypatch.setattr(mmlit.generate, "generate", lambda *a, **k: [wrong, truths[1]["caption"], *real(*a, **k)[2:]])
    rc, out = _demo("--task", "caption", "--run-dir", tmp_path / "caption", "--encoder-run", tmp_path / "encoder")
    assert rc == 0, out
    assert "aligner wall time" in out and "retrieval demo wall time" in out and "(trained first: its run was missing)" in out
    assert f"report: {tmp_path / 'caption' / 'report.html'}" in out and f"retrieval demo report: {tmp_path / 'encoder' / 'report.html'}" in out
    answers = [json.loads(l) for l in (tmp_path / "caption" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == len(truths)
    for a, t in zip(answers, truths):                      # each mark: a field the true caption names, named right or not
        got, named = parse_caption(a["answer"]), parse_caption(t["caption"])
        want = {f: got[f] == t["label" if f == "digit" else f] for f in CAPTION_FIELDS if named[f] is not None}
        assert a["truth"] == t["caption"] and a["marks"] == want
        assert a["right"] == all(a["marks"].values())
    assert (answers[0]["right"], answers[0]["marks"]["digit"], answers[1]["right"]) == (False, False, True)
    part = _answers_part(tmp_path / "caption" / "report.html")
    assert "<td>digit</td>" in part and html.escape(CAPTION_PROMPT) in part and part.count('<img alt="sample image"') >= 2
    row = _table_row(part, html.escape(wrong))
    assert '<img alt="sample image"' in row and html.escape(truths[0]["caption"]) in row and "✗ wrong" in row and "✓ right" not in row
    assert "✓ right" in _table_row(part, f"<td>1</td><td><img")           # row 1: its own caption, right


def test_vlm_demo_report_shows_marked_answers(tmp_path, monkeypatch):
    "`mmlit demo --task vlm` on a tiny run: every held-out answer marked by its task's metric, shown with image, prompt and truth."
    import html, json
    import pyarrow.parquet as pq
    from pathlib import Path
    import mmlit.recipe, mmlit.vlm
    from mmlit.core import config_from_dict, config_to_dict
    from mmlit.generate import normalize, parse_count
    from mmlit.recipe import RunConfig, example_config
    build_task_parquet(tmp_path / "train.parquet", n=8, split="train")
    val = build_task_parquet(tmp_path / "val.parquet", n=3, split="val")

    def tiny(run_dir, epochs=None, **_):
        c = config_to_dict(example_config("vlm", run_dir))
        c["data"].update(data=str(tmp_path / "train.parquet"), val_data=str(val),
                         tokenizer={"train": {"vocab_size": 300}, "save_dir": str(Path(run_dir) / "tokenizer")})
        c["data"]["loader"] = {**c["data"]["loader"], "batch_size": 8, "num_workers": 0}
        c["model"]["options"] = {"text_config": {"num_hidden_layers": 1}}
        c.update(threads=1, eval={**c["eval"], "every": None, "max_batches": 1}, schedule={"max_steps": 2, "warmup_ratio": 0.0})
        return config_from_dict(RunConfig, c)
    monkeypatch.setattr(mmlit.recipe, "vlm_demo_config", tiny)
    rows = pq.read_table(val).to_pylist()
    wrong = {"caption": "a blue 3", "qa": str((rows[1]["target"] + 1) % 10), "pointing": "Point: <0.99, 0.99>", "counting": "Count: 9"}
    real = mmlit.vlm.task_answers
    def rigged(*a, **k):                                  # scene 0 answered wrong, scene 1 with its truths, scene 2 by the model
        texts, got = real(*a, **k)
        return [wrong[r["task"]] for r in rows[:4]] + [r["text"] for r in rows[4:8]] + texts[8:], got
    monkeypatch.setattr(mmlit.vlm, "task_answers", rigged)
    rc, out = _demo("--task", "vlm", "--run-dir", tmp_path / "vlm")
    assert rc == 0, out
    assert f"report: {tmp_path / 'vlm' / 'report.html'}" in out
    answers = [json.loads(l) for l in (tmp_path / "vlm" / "answers.jsonl").read_text().splitlines()]
    assert [a["task"] for a in answers] == [r["task"] for r in rows] and [a["right"] for a in answers[:8]] == [False] * 4 + [True] * 4
    for a, r in zip(answers, rows):
        assert (a["prompt"], a["truth"]) == (r["messages"][0]["content"], r["text"])
        if r["task"] == "qa": assert a["right"] == (normalize(a["answer"]) == str(r["target"]))
        if r["task"] == "counting": assert a["right"] == (parse_count(a["answer"]) == r["count"])
    part = _answers_part(tmp_path / "vlm" / "report.html")
    assert "<td>qa_digit_acc</td>" in part and part.count('<img alt="sample image"') >= 8
    for a in answers[:8]:
        row = _table_row(part, html.escape(a["prompt"]) + "</td><td>" + html.escape(a["truth"]) + "</td><td>" + html.escape(a["answer"]))
        assert '<img alt="sample image"' in row and ("✓ right" if a["right"] else "✗ wrong") in row
