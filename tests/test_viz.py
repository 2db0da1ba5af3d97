"""The visualizer on a real run directory: PNGs, the HTML report in headless Chromium, show-batch's exact batch, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ds_files import image_bytes  # noqa: E402
from run_dir_fixture import make_run_dir  # noqa: E402

from mmlit.cli import main  # noqa: E402
from mmlit.core import MmlitError  # noqa: E402
from mmlit.report import PLOT_BORDER, write_report  # noqa: E402
from mmlit.viz import read_embeddings, save_run_plots  # noqa: E402

STANDARD_PNGS = ["embedding_space", "loss_components", "lr_schedule", "mrl_performance", "similarity_matrix", "training_curves"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("viz") / "run", steps=30)


def chromium() -> str:
    "The headless browser; in CI a missing one is a failure, elsewhere a skip."
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("CI", "").lower() == "true": pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


def screenshot(html: Path, out: Path, width: int = 1400, height: int = 3400) -> np.ndarray:
    "A headless-Chromium screenshot of `html` as an RGB array."
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--window-size={width},{height}", f"--screenshot={out}", html.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.exists(), f"chromium wrote no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB"))


def plot_frames(shot: np.ndarray) -> list[np.ndarray]:
    "The insides of the report's plot frames (solid PLOT_BORDER rectangles) in a screenshot."
    from scipy import ndimage
    rgb = tuple(int(PLOT_BORDER[i:i + 2], 16) for i in (1, 3, 5))
    mask = (np.abs(shot.astype(int) - rgb).sum(-1) <= 6)
    lab, n = ndimage.label(mask)
    frames = []
    for sl in ndimage.find_objects(lab):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if h > 100 and w > 100:                                   # a frame, not a stray pixel of a plot
            frames.append(shot[sl[0].start + 10:sl[0].stop - 10, sl[1].start + 10:sl[1].stop - 10])
    return frames


def test_save_run_plots_writes_the_standard_pngs(run_dir, tmp_path):
    pngs = save_run_plots(run_dir, out_dir=tmp_path)
    assert sorted(pngs) == STANDARD_PNGS
    for name, p in pngs.items():
        im = np.asarray(Image.open(p).convert("L"), dtype=float)
        assert p == tmp_path / f"{name}.png" and im.shape[0] > 200 and im.std() > 10, name


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir)
    assert page == run_dir / "report.html"
    text = page.read_text()
    assert "<script" not in text and "src=\"http" not in text and "href=\"http" not in text   # self-contained
    shot = screenshot(page, tmp_path / "report.png")
    assert shot.std() > 20, "the page rendered blank"
    frames = plot_frames(shot)
    assert len(frames) == len(STANDARD_PNGS), f"found {len(frames)} plot frames, expected {len(STANDARD_PNGS)}"
    for f in frames:
        assert f.std() > 15, "a plot frame is blank"
        ink = f.min(-1) < 200
        rows, cols = np.nonzero(ink)
        assert ink.mean() > 0.01 and np.ptp(rows) > 0.6 * f.shape[0], "a plot frame holds almost no drawing"


def test_screenshot_check_catches_a_blank_plot(run_dir, tmp_path):
    "The check above can fail: a report whose plots are white images shows blank frames."
    import base64, re
    blank = image_bytes(Image.new("RGB", (700, 400), "white"))
    uri = "data:image/png;base64," + base64.b64encode(blank).decode()
    text = write_report(run_dir, tmp_path / "r.html").read_text()
    blanked = re.sub(r'(<figure class="plot[a-z ]*"><img alt="[a-z_]+" src=")[^"]+', lambda m: m.group(1) + uri, text)
    (tmp_path / "blank.html").write_text(blanked)
    frames = plot_frames(screenshot(tmp_path / "blank.html", tmp_path / "blank.png"))
    assert len(frames) == len(STANDARD_PNGS) and all(f.std() < 15 for f in frames)


def test_cli_report(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    for name in STANDARD_PNGS: assert (run_dir / f"{name}.png").is_file()


def test_show_batch_rebuilds_the_batch_the_trainer_saw(run_dir, tmp_path, capsys):
    seen = json.loads((run_dir / "batch_digests.json").read_text())   # recorded by the training loop, step by step
    for step in (1, 8, len(seen)):                                    # first epoch, a later epoch, the last step
        out = tmp_path / f"s{step}"
        assert main(["show-batch", str(run_dir), "--step", str(step), "--out", str(out)]) == 0
        meta = json.loads((out / "batch.json").read_text())
        assert meta["batch_digest"] == seen[step - 1], f"step {step}: rebuilt batch differs from the one trained on"
        assert (out / "batch_images.png").is_file() and (out / "batch_tokens.png").is_file()
    assert seen[0] != seen[1]


def test_bad_input_names_what_is_missing(run_dir, tmp_path, capsys):
    assert main(["show-batch", str(run_dir), "--step", "31"]) == 2
    assert "step 31 is beyond the run's end: " in capsys.readouterr().err
    assert main(["show-batch", str(run_dir), "--step", "0"]) == 2
    assert "steps count from 1" in capsys.readouterr().err
    partial = tmp_path / "partial"; partial.mkdir()
    for f in ("metrics.csv", "config.yaml"): shutil.copy(run_dir / f, partial / f)
    assert main(["report", str(partial)]) == 0 and "This run has not finished" in (partial / "report.html").read_text()   # a run in progress
    (partial / "metrics.csv").unlink()
    assert main(["report", str(partial)]) == 2 and "lacks metrics.csv or metrics.jsonl" in capsys.readouterr().err
    assert main(["show-batch", str(tmp_path / "nothing"), "--step", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (partial / "config.yaml").unlink()
    assert main(["show-batch", str(partial), "--step", "0"]) == 2
    assert "lacks config.yaml" in capsys.readouterr().err
    with pytest.raises(MmlitError, match="lacks the array"):
        np.savez(tmp_path / "e.npz", image=np.zeros((2, 3)))
        read_embeddings(tmp_path / "e.npz")


def train_recording_batches(cfg: dict) -> list[dict]:
    "Build, train and finish a run as `mmlit train` does (mmlit.recipe); the tensors of every batch its model was called with."
    import torch
    from mmlit.recipe import build_run, finish_run
    run = build_run(cfg)
    seen, forward = [], run.trainer.forward_model
    def recording(**batch):
        seen.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return forward(**batch)
    run.trainer.forward_model = recording
    finish_run(run, run.fit())
    return seen


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    "A run mmlit.recipe builds and trains (7 steps over 2 epochs, ledger on), with the tensors of every batch its model saw."
    from run_dir_fixture import damaged_demo
    tmp_path = tmp_path_factory.mktemp("trained")
    data = damaged_demo(tmp_path / "data" / "demo.parquet", 96)
    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "seed": 3,
           "data": {"data": str(data), "kind": "parquet", "val_split": 16, "preprocessor": "clip", "max_length": 32,
                    "preprocessor_options": {"size": 32, "uint8": True},
                    "tokenizer": {"train": {"vocab_size": 320}, "save_dir": str(run_dir / "tokenizer")},
                    "loader": {"batch_size": 16, "seed": 3}},
           "model": {"kind": "dual_encoder", "preset": "tiny"}, "schedule": {"max_steps": 7}, "log": {"progress": False}}
    return run_dir, train_recording_batches(cfg)


def test_show_batch_equals_what_the_real_trainer_trained_on(trained_run):
    "mmlit.recipe builds and trains a run; every batch its model is called with is recorded; show-batch rebuilds them."
    from mmlit.cli import rebuild_step_batch
    from mmlit.viz import batch_digest
    run_dir, seen = trained_run
    assert len(seen) == 7 and json.loads((run_dir / "summary.json").read_text())["steps"] == 7
    for step in (1, 5, 6, 7):                        # 80 training rows in batches of 16: steps 6 and 7 are epoch 1
        batch, _, info = rebuild_step_batch(run_dir, step)
        trained = seen[step - 1]
        assert batch_digest({k: batch[k] for k in trained}) == batch_digest(trained), f"step {step} differs"
    assert info["epoch"] == 1 and batch_digest(seen[0]) != batch_digest(seen[5])


def _section(text: str, sid: str) -> str:
    "The part of a report page from the heading `id=sid` to the next h2 or details."
    start = text.index(f'id="{sid}"')
    ends = [i for i in (text.find("<h2", start + 1), text.find("<details", start + 1)) if i > 0]
    return text[start:min(ends)]


def test_report_of_a_trained_run_reads_like_a_result(trained_run, tmp_path):
    "Headline and recall table first, the failure gallery with images, a dataset map from the ledger, raw metrics collapsed."
    import pandas as pd
    from mmlit.ledger import read_ledger
    from mmlit.report import _spikes_section, record_caption
    from mmlit.viz import metrics_frame
    run_dir, _ = trained_run
    assert main(["report", str(run_dir)]) == 0
    text = (run_dir / "report.html").read_text()
    order = [text.index(f'id="{s}"') for s in ("result", "failures", "plots", "spikes", "dataset-map", "bad-records", "all-metrics", "config")]
    assert order == sorted(order)
    result = _section(text, "result")
    assert "<td>training pairs</td><td>80</td>" in result and "<td>steps</td><td>7</td>" in result
    assert "<th>i2t@1</th>" in result and "<td>exact pair</td><td>64</td>" in result
    assert "val/" not in text[:text.index('<details id="all-metrics">')]      # raw metric keys only in the collapsed part
    assert '<span class="k">metrics.val/loss</span>' in _section(text, "all-metrics")
    fails = _section(text, "failures")
    assert "of 15 held-out images" in fails and 'alt="sample image"' in fails and "✗" in fails    # 16 held out, one bad
    emb = np.load(run_dir / "eval_embeddings.npz")                            # each pair names its record: the same caption
    for f, r, u, c in zip(emb["record_file"], emb["record_row"], emb["record_unit"], emb["caption"]):
        assert " ".join(record_caption({"file": f, "index": r, "unit": u}).lower().split()) == " ".join(c.lower().split())
    dmap = _section(text, "dataset-map")
    assert 'alt="dataset_map"' in dmap and "easy" in dmap and 'alt="sample image"' in dmap
    assert "No spikes in 7 logged steps" in _section(text, "spikes")
    # a spike: 30 steps whose last one jumps, its samples those of the ledger's step 7 (renumbered 30)
    m = metrics_frame([{"train/step": s, "train/loss": 3.0 - 0.02 * s + (1.5 if s == 30 else 0)} for s in range(1, 31)])
    ledger = read_ledger(run_dir)
    at7 = ledger[ledger["step"] == 7].assign(step=30)
    page = _spikes_section(m, at7, "")
    assert "Step 30: loss" in page and page.count('alt="sample image"') == 5
    top = at7.sort_values("loss", ascending=False).head(5)
    for r in top.itertuples():
        assert f"<td>{r.sample}</td><td>{r.loss:.4g}</td><td>demo.parquet row {r.row}</td>" in page
    import pyarrow.parquet as pq
    caps = pq.read_table(top["file"].iloc[0], columns=["caption"])["caption"].to_pylist()
    assert all(caps[r] in page for r in top["row"] if caps[r])


def test_report_without_ledger_or_held_out_data(trained_run, tmp_path):
    "A run without a ledger and without held-out embeddings still gets its page, which says what is missing."
    run_dir, _ = trained_run
    run = _copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "ledger"); (run / "eval_embeddings.npz").unlink()
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text()
    assert "No held-out embeddings (eval_embeddings.npz is missing)" in _section(text, "failures")
    for sid in ("spikes", "dataset-map"): assert "No per-sample ledger" in _section(text, sid) or "No spikes" in _section(text, sid)
    assert "No per-sample ledger" in _section(text, "dataset-map") and text.count('<figure class="plot') == 4


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("batches", "*.png", "report.html"))
    return dest


def test_report_replaces_files_never_writes_through_links(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    outside = tmp_path / "outside"; outside.mkdir()
    (outside / "page.html").write_text("someone else's page")
    (outside / "plot.png").write_bytes(b"someone else's picture")
    (run / "report.html").symlink_to(outside / "page.html")           # a link standing where the page goes
    (run / "training_curves.png").symlink_to(outside / "plot.png")
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert (outside / "page.html").read_text() == "someone else's page"
    assert (outside / "plot.png").read_bytes() == b"someone else's picture"
    for name in ("report.html", "training_curves.png"):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert (run / "report.html").read_text().rstrip().endswith("</html>")
    # a hard link shares the file itself: the page is replaced by a new file, not rewritten in place
    os.link(run / "report.html", outside / "hard.html")
    before = (outside / "hard.html").read_bytes()
    assert main(["report", str(run)]) == 0
    assert (outside / "hard.html").read_bytes() == before and not os.path.samefile(run / "report.html", outside / "hard.html")
    assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    # a folder where the page goes: an error naming it, nothing else touched
    (run / "report.html").unlink(); (run / "report.html").mkdir()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run / 'report.html'}" in err and "Traceback" not in err


def test_report_and_show_batch_name_a_malformed_file(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    good = {n: (run / n).read_text() for n in ("config.yaml", "summary.json", "data.json")}
    cases = [("config.yaml", "data: {data: [unclosed\n", "not valid YAML"), ("config.yaml", "- a list\n", "expected a mapping"),
             ("summary.json", '{"steps": 30, "val/loss"', "not valid JSON"), ("summary.json", '{"steps": "thirty"}', "'steps' must be"),
             ("data.json", "{", "not valid JSON"), ("data.json", '{"data": "x"}', "expected 'data'")]
    for name, text, reason in cases:
        (run / name).write_text(text)
        commands = [["show-batch", str(run), "--step", "1"]] + ([["report", str(run)]] if name != "data.json" else [])
        for argv in commands:
            if argv[0] == "report" and reason == "'steps' must be": continue   # the report shows the summary as it is
            assert main(argv) == 2, (argv, name)
            err = capsys.readouterr().err
            assert f"{run / name}: " in err and reason in err and "Traceback" not in err, (argv, name, err)
        (run / name).write_text(good[name])
    assert main(["show-batch", str(run), "--step", "1", "--out", str(tmp_path / "ok")]) == 0


def test_show_batch_finds_the_data_from_any_working_directory(tmp_path, monkeypatch, capsys):
    "A run trained on relative paths: show-batch reads the data data.json names, from another directory too."
    from run_dir_fixture import damaged_demo
    from mmlit.cli import rebuild_step_batch
    from mmlit.viz import batch_digest
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(); elsewhere.mkdir()
    monkeypatch.chdir(work)
    damaged_demo(Path("data/demo.parquet"), 64)
    cfg = {"run_dir": "runs/r", "seed": 1,
           "data": {"data": "data/demo.parquet", "kind": "parquet", "val_split": 16, "preprocessor": "clip", "max_length": 32,
                    "preprocessor_options": {"size": 32, "uint8": True},
                    "tokenizer": {"train": {"vocab_size": 320}, "save_dir": "runs/r/tokenizer"}, "loader": {"batch_size": 16}},
           "model": {"kind": "dual_encoder", "preset": "tiny"}, "schedule": {"max_steps": 3}, "log": {"progress": False}}
    seen = train_recording_batches(cfg)
    run_dir = (work / "runs/r").resolve()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["data"] == "data/demo.parquet"   # as the user wrote it
    assert json.loads((run_dir / "data.json").read_text())["data"]["data"] == str(work.resolve() / "data/demo.parquet")
    monkeypatch.chdir(elsewhere)
    for step in (1, 3):
        batch, _, info = rebuild_step_batch(run_dir, step)
        assert info["data_checked"] and batch_digest({k: batch[k] for k in seen[step - 1]}) == batch_digest(seen[step - 1]), step
    assert main(["show-batch", str(run_dir), "--step", "2"]) == 0
    assert (run_dir / "batches/step_2/batch.json").is_file() and not Path("runs").exists()
    # without data.json the relative paths in config.yaml are read from here: an error naming what is missing, and why
    (run_dir / "data.json").rename(run_dir / "data.json.bak")
    assert main(["show-batch", str(run_dir), "--step", "2"]) == 2
    err = capsys.readouterr().err
    assert "runs/r/tokenizer/tokenizer.json is missing" in err and "Traceback" not in err, err
    assert f"relative paths are read from the working directory {elsewhere}" in err
    shutil.copytree(run_dir / "tokenizer", elsewhere / "runs/r/tokenizer")
    assert main(["show-batch", str(run_dir), "--step", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the data {run_dir / 'config.yaml'} names is not there: no files match data/demo.parquet" in err, err
    shutil.rmtree(elsewhere / "runs")
    (run_dir / "data.json.bak").rename(run_dir / "data.json")
    # the data changed where data.json says it is: refused, naming what the run trained on and what is there now
    damaged_demo(work / "data/demo.parquet", 80)
    assert main(["show-batch", str(run_dir), "--step", "2"]) == 2
    err = capsys.readouterr().err
    stored = json.loads((run_dir / "data.json").read_text())
    assert "the data differs from what the run trained on" in err and str(run_dir / "data.json") in err, err
    assert stored["fingerprint"] in err and f"{stored['files'][0][1]:,} bytes" in err
    assert f"{(work / 'data/demo.parquet').stat().st_size:,} bytes" in err
