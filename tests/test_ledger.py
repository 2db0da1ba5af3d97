"""The per-sample loss ledger: its samples are `mmlit show-batch`'s, its rows average to the logged loss, it is complete
after SIGKILL and resume, `mmlit samples` reads it, and excluding samples at a resume sees every other one once."""
import json, shutil, signal, subprocess, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import run_cli  # noqa: E402
from train_job import build, losses  # noqa: E402
from test_train import JOB, _env, _wait_for  # noqa: E402

from mmlit.core import ConfigError
from mmlit.demo import build_demo_parquet
from mmlit.ledger import ledger_parts, read_ledger
from mmlit.recipe import build_run


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
    "A tiny dual encoder with hard negatives: 48 pairs, batches of 8, 2 micro-batches a step, 2 epochs (6 steps)."
    d = tmp_path_factory.mktemp("ledger")
    data = build_demo_parquet(d / "demo.parquet", n=48, image_size=32)[0]
    run_dir = d / "run"
    cfg = {"run_dir": str(run_dir), "threads": 1,
           "data": {"data": str(data), "preprocessor": "clip", "preprocessor_options": {"size": 32, "uint8": True}, "max_length": 32,
                    "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(run_dir / "tokenizer")}, "loader": {"batch_size": 8}},
           "model": {"kind": "dual_encoder", "preset": "tiny", "options": {"embed_dim": 64, "mrl_dims": [64, 32], "hard_negative_weight": 1.0}},
           "schedule": {"epochs": 2, "accumulate": 2}, "log": {"progress": False}}
    run = build_run(cfg)
    assert run.fit().steps == 6
    return run_dir, data


def test_ledger_samples_are_show_batch_samples(contrastive_run, tmp_path):
    run_dir, _ = contrastive_run
    df = read_ledger(run_dir)
    for k in (1, 5):                                          # one step in each epoch
        rc, _, err = run_cli("show-batch", run_dir, "--step", k, "--out", tmp_path / f"s{k}")
        assert rc == 0, err
        shown = json.loads((tmp_path / f"s{k}" / "batch.json").read_text())["samples"]
        rows = df[(df["step"] == k) & (df["micro"] == 0)]      # show-batch draws a step's first micro-batch
        assert rows["sample"].tolist() == shown and len(shown) == 8


def test_ledger_rows_average_to_the_logged_loss(contrastive_run):
    run_dir, data = contrastive_run
    df = read_ledger(run_dir)
    assert len(df) == 6 * 16 and not df.duplicated(["step", "micro", "position"]).any()
    for cols in (["loss_i2t", "loss_t2i", "loss_hardneg", "loss_mrl"],): assert df[cols].notna().all().all()
    for e in (0, 1): assert sorted(df[df["epoch"] == e]["sample"]) == list(range(48))   # each pair once an epoch
    assert set(df["file"]) == {str(data)} and (df["row"] == df["sample"]).all()
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["train/step"]: r for r in logged if "train/loss" in r}
    means = df.groupby("step")[["loss", "loss_clip", "loss_hardneg"]].mean()
    for step, r in logged.items():
        for k in ("loss", "loss_clip", "loss_hardneg"):
            assert means.loc[step, k] == pytest.approx(r[f"train/{k}"], rel=1e-4), (step, k)


def test_mmlit_samples(contrastive_run, tmp_path):
    run_dir, data = contrastive_run
    rc, out, err = run_cli("samples", run_dir, "--top", 5, "--json")
    assert rc == 0, err
    got = json.loads(out)
    df = read_ledger(run_dir)
    mean = df[df["epoch"] == 1].groupby("sample")["loss"].mean().sort_values(ascending=False)
    assert got["epoch"] == 1 and [t["sample"] for t in got["top"]] == mean.index[:5].tolist()
    assert got["top"][0]["loss"] == pytest.approx(mean.iloc[0]) and got["top"][0]["file"] == str(data)
    rc, out, _ = run_cli("samples", run_dir, "--top", 3)
    assert rc == 0 and f"{data} row {got['top'][0]['row']}" in out.splitlines()[2]
    rc, _, err = run_cli("samples", tmp_path)
    assert rc == 2 and "has no per-sample loss ledger" in err


def test_ledger_complete_after_sigkill_and_resume(tmp_path):
    "Killed between checkpoints and resumed: every step once, the same rows as the run that was never killed."
    ref = tmp_path / "ref"
    assert build(ref).fit().steps == 24
    d = tmp_path / "run"
    every_step = {"config": {"log": {"ledger_every": 1}}}      # rows reach the disk past the last checkpoint (every 2 steps)
    p = subprocess.Popen([sys.executable, JOB, str(d), json.dumps(every_step)], env=_env(TRAIN_JOB_STEP_DELAY="0.03"),
                         stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: any(last == 3 for *_, last in ledger_parts(d)), p, what="the ledger of step 3")   # checkpointed: step 2
    p.send_signal(signal.SIGKILL); p.wait()
    for ck in (d / "checkpoints").glob("step-*"):            # as if killed before step 4's checkpoint: resume at step 2
        if int(ck.name[5:]) > 2: shutil.rmtree(ck)
    on_disk = read_ledger(d)["step"].max()
    assert build(d).fit().resumed_from.endswith("step-00000002")   # resumed with parts of 500 steps: other file names
    a, b = read_ledger(d), read_ledger(ref)
    assert sorted(a["step"].unique()) == list(range(1, 25)) and len(a) == 24 * 8 and on_disk >= 3
    assert not a.duplicated(["step", "micro", "position"]).any()
    keys = ["step", "epoch", "micro", "position", "sample", "loss"]
    assert a[keys].equals(b[keys])                            # the resume is exact, so are the per-sample losses


def test_exclude_at_resume_sees_every_other_sample_once(tmp_path):
    ref = tmp_path / "ref"
    build(ref).fit()
    full = read_ledger(ref)
    d = tmp_path / "run"
    build(d).fit(steps=3)                                     # stopped mid-epoch 0, after 24 of its 64 samples
    seen = set(read_ledger(d)["sample"])
    unseen = [s for s in full[full["epoch"] == 0]["sample"] if s not in seen]
    drop = [unseen[0], unseen[5], sorted(seen)[0]]            # two not yet seen in this epoch, one already seen
    t = build(d, {"exclude": drop})
    assert t.fit().resumed_from is not None
    df = read_ledger(d)
    e0 = df[df["epoch"] == 0]
    assert sorted(e0["sample"]) == sorted(set(range(64)) - set(drop[:2]))   # each remaining sample once
    rest = [s for s in full[(full["epoch"] == 0) & (full["step"] > 3)]["sample"] if s not in drop]
    assert e0[e0["step"] > 3]["sample"].tolist() == rest                      # in the order it had
    for e in (1, 2):
        got = df[df["epoch"] == e]["sample"]
        assert sorted(got) == sorted(set(range(64)) - set(drop))
        assert got.tolist() == [s for s in full[full["epoch"] == e]["sample"] if s not in drop]
    with pytest.raises(ConfigError, match="no sample 64"): build(tmp_path / "bad", {"exclude": [3, 64]})
    (tmp_path / "ids.txt").write_text("3\nfour\n")
    with pytest.raises(ConfigError, match="line 2"): build(tmp_path / "bad", {"exclude": str(tmp_path / "ids.txt")})
