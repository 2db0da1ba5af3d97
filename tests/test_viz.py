"""The visualizer on a real run directory: PNGs, the HTML report in headless Chromium, show-batch's exact batch, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ds_files import image_bytes  # noqa: E402
from run_dir_fixture import make_run_dir  # noqa: E402

from mmlit.cli import main  # noqa: E402
from mmlit.core import MmlitError  # noqa: E402
from mmlit.viz import PLOT_BORDER, read_embeddings, save_run_plots, write_report  # noqa: E402

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
    assert main(["report", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "lacks eval_embeddings.npz" in err and "loader_report.json" in err and "summary.json" in err
    assert main(["show-batch", str(tmp_path / "nothing"), "--step", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (partial / "config.yaml").unlink()
    assert main(["show-batch", str(partial), "--step", "0"]) == 2
    assert "lacks config.yaml" in capsys.readouterr().err
    with pytest.raises(MmlitError, match="lacks the array"):
        np.savez(tmp_path / "e.npz", image=np.zeros((2, 3)))
        read_embeddings(tmp_path / "e.npz")


def test_show_batch_equals_what_the_real_trainer_trained_on(tmp_path):
    "mmlit.recipe builds and trains a run; every batch its model is called with is recorded; show-batch rebuilds them."
    import torch
    from run_dir_fixture import damaged_demo
    from mmlit.cli import rebuild_step_batch
    from mmlit.recipe import build_run, finish_run
    from mmlit.viz import batch_digest
    data = damaged_demo(tmp_path / "data" / "demo.parquet", 96)
    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "seed": 3,
           "data": {"data": str(data), "kind": "parquet", "val_split": 16, "preprocessor": "clip", "max_length": 32,
                    "preprocessor_options": {"size": 32, "uint8": True},
                    "tokenizer": {"train": {"vocab_size": 320}, "save_dir": str(run_dir / "tokenizer")},
                    "loader": {"batch_size": 16, "seed": 3}},
           "model": {"kind": "dual_encoder", "preset": "tiny"}, "schedule": {"max_steps": 7}, "log": {"progress": False}}
    run = build_run(cfg)
    seen, forward = [], run.trainer.forward_model
    def recording(**batch):
        seen.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return forward(**batch)
    run.trainer.forward_model = recording
    finish_run(run, run.fit())
    assert len(seen) == 7 and json.loads((run_dir / "summary.json").read_text())["steps"] == 7
    for step in (1, 5, 6, 7):                        # 80 training rows in batches of 16: steps 6 and 7 are epoch 1
        batch, _, info = rebuild_step_batch(run_dir, step)
        trained = seen[step - 1]
        assert batch_digest({k: batch[k] for k in trained}) == batch_digest(trained), f"step {step} differs"
    assert info["epoch"] == 1 and batch_digest(seen[0]) != batch_digest(seen[5])
    assert main(["report", str(run_dir)]) == 0       # and the report reads the trainer's own run directory
