"""Trainer guarantees on CPU: exact resume after SIGKILL (also mid-checkpoint-write) and SIGINT, with 0, 1 or 2 loader
workers and a per-sample augmentation, torn checkpoints never
loaded, resume at an epoch boundary and twice in one run, DDP (gloo) equals one process, wandb offline, config errors."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
from torchrun_helpers import torchrun
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_job import build, losses  # noqa: E402

from mmlit.checkpoint import MANIFEST, STATE, WEIGHTS, WRITE_DELAY_ENV, CheckpointManager, read_manifest, CheckpointError
from mmlit.core import ConfigError, config_from_dict
from mmlit.step import TrainConfig, config_to_yaml, load_config

JOB = str(Path(__file__).parent / "train_job.py")
ROOT = Path(__file__).parent.parent


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The uninterrupted run: 3 epochs of 8 steps (2 micro-batches each), eval every 5, checkpoint every 2."
    d = tmp_path_factory.mktemp("ref")
    t = build(d)
    r = t.fit()
    assert (r.steps, r.epochs_done, r.interrupted) == (24, 3, False)
    return _weights(t), losses(d)


def _wait_for(pred, proc, timeout=60.0, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred(): return
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.02)
    proc.kill(); raise AssertionError(f"timed out waiting for {what}")


def _n_losses(d):
    try: return len(losses(d))
    except (FileNotFoundError, json.JSONDecodeError): return 0


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_sigkill_twice_then_resume_is_bit_exact(tmp_path, reference, workers):
    "Killed twice and interrupted once with `workers` loader workers, resumed: the run of the reference (no workers)."
    ref_w, ref_losses = reference
    d = tmp_path / "run"
    job = [sys.executable, JOB, str(d), json.dumps({"num_workers": workers})]
    # 1. SIGKILL after 5 logged steps (mid-epoch, between checkpoints at 4 and 6)
    p = subprocess.Popen(job, env=_env(TRAIN_JOB_STEP_DELAY="0.03"), stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: _n_losses(d) >= 5, p, what="5 steps")
    p.send_signal(signal.SIGKILL); p.wait()
    ck = CheckpointManager(d / "checkpoints")
    assert ck.latest() is not None and 4 <= read_manifest(ck.latest())["step"] < 24
    # 2. SIGKILL while a checkpoint is being written: the weights are in a temporary directory, no manifest yet
    left = set((d / "checkpoints").iterdir())                # the kill above may itself have landed inside a write
    p = subprocess.Popen(job, env=_env(**{WRITE_DELAY_ENV: "30"}), stdout=subprocess.PIPE, text=True)
    tmp_dirs = lambda: [x for x in (d / "checkpoints").iterdir() if x.name.startswith(".tmp-") and (x / WEIGHTS).exists() and x not in left]
    _wait_for(lambda: bool(tmp_dirs()), p, what="a checkpoint write")
    p.send_signal(signal.SIGKILL); p.wait()
    torn = tmp_dirs()[0]
    assert not (torn / MANIFEST).exists()
    # 3. SIGINT (Ctrl-C): a checkpoint at the end of the current step and a clean exit
    p = subprocess.Popen(job, env=_env(TRAIN_JOB_STEP_DELAY="0.03"), stdout=subprocess.PIPE, text=True)
    start = _n_losses(d)
    _wait_for(lambda: _n_losses(d) >= start + 3, p, what="3 more steps")
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["interrupted"] and res["steps"] < 24
    assert read_manifest(ck.latest())["step"] == res["steps"]
    # 4. resume to the end in this process
    t = build(d, num_workers=workers)
    r = t.fit()
    assert r.resumed_from.endswith(f"step-{res['steps']:08d}") and r.steps == 24
    assert not torn.exists()                                  # the torn write was cleaned up, never loaded
    assert _same(_weights(t), ref_w)
    assert losses(d) == ref_losses                            # the logged sequence too, bit for bit


def test_epoch_boundary_and_two_resumes(tmp_path, reference):
    ref_w, ref_losses = reference
    d = tmp_path / "run"
    r = build(d).fit(steps=8)                                 # exactly one epoch (8 steps of 2 micro-batches)
    assert (r.steps, r.epochs_done, r.interrupted) == (8, 1, True)
    state = torch.load(CheckpointManager(d / "checkpoints").latest() / STATE, weights_only=True)
    assert (state["loader"]["epoch"], state["loader"]["position"]) == (1, 0)
    r = build(d).fit(steps=5)                                 # second resume: stops mid-epoch
    assert r.steps == 13
    t = build(d)
    r = t.fit()
    assert r.resumed_from.endswith("step-00000013")
    assert _same(_weights(t), ref_w) and losses(d) == ref_losses
    # each micro-batch's step reached the model exactly once over the three processes: the last ones here
    assert t.model.steps[0] == (1, 10) and t.model.steps[-1] == (2, 15)


def test_torn_checkpoint_is_never_loaded(tmp_path):
    d = tmp_path / "run"
    cfg = {"eval": {"every": None}}
    build(d, cfg).fit(steps=6)                                # checkpoints at steps 2, 4, 6 (keep 2: 4 and 6)
    ck = CheckpointManager(d / "checkpoints")
    newest = ck.latest()
    assert newest.name == "step-00000006"
    data = (newest / WEIGHTS).read_bytes()
    (newest / WEIGHTS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))          # one flipped bit: same size
    with pytest.raises(CheckpointError, match="checksum"): read_manifest(newest)
    (d / "checkpoints" / "step-00000009").mkdir()                              # a directory without a manifest
    (d / "checkpoints" / "step-00000009" / WEIGHTS).write_bytes(data[: len(data) // 2])
    r = build(d, cfg).fit(steps=1)
    assert r.resumed_from.endswith("step-00000004") and r.steps == 5


def test_ddp_gloo_matches_single_process(tmp_path):
    single = build(tmp_path / "single", {"checkpoint": {"every": None}}, batch_size=8, dropout=0.0)
    single.fit()
    torchrun(JOB, tmp_path / "ddp", json.dumps({"config": {"checkpoint": {"every": None}}, "batch_size": 4, "dropout": 0.0}), timeout=240)
    t = build(tmp_path / "ddp", {"checkpoint": {"every": None}}, batch_size=8, dropout=0.0)   # loads the DDP run's last checkpoint
    r = t.fit()
    assert r.resumed_from is not None and r.steps == 12   # nothing left to train: only loaded
    for k, v in _weights(single).items(): torch.testing.assert_close(t.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


def test_wandb_offline_writes_run_files(tmp_path):
    pytest.importorskip("wandb")
    d = tmp_path / "run"
    build(d, {"log": {"wandb": True}, "schedule": {"epochs": 1}}).fit()
    runs = list((d / "wandb").glob("offline-run-*"))
    assert runs, sorted(p.name for p in d.rglob("*"))
    assert list(runs[0].glob("*.wandb"))


def test_config_yaml_round_trip(tmp_path):
    c = config_from_dict(TrainConfig, {"run_dir": "r", "optim": {"lr": 3e-4, "betas": [0.8, 0.9], "clip_grad": None},
                                       "schedule": {"max_steps": 7, "accumulate": 4}, "eval": {"metric": "val/i2t_r1", "mode": "max"}})
    p = tmp_path / "c.yaml"
    p.write_text(config_to_yaml(c))
    assert load_config(TrainConfig, p) == c
    d = tmp_path / "run"
    build(d, {"schedule": {"epochs": 1}}).fit(steps=1)
    written = load_config(TrainConfig, d / "config.yaml")     # the run directory's resolved config loads back
    assert written.run_dir == str(d) and written.schedule.accumulate == 2


@pytest.mark.parametrize("bad, msg", [
    ({"optim": {"lr": 1e-3, "momentum": 0.9}}, "optim.momentum"),
    ({"schedule": {"accumulate": "2"}}, "schedule.accumulate: expected int"),
    ({"checkpoint": {"keep": 2.5}}, "checkpoint.keep"),
    ({"log": {"wandb": "yes"}}, "log.wandb: expected bool"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"epochs": 3}, "unknown config key(s) epochs"),
])
def test_bad_config_names_the_field(bad, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")): config_from_dict(TrainConfig, bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"): load_config(TrainConfig, tmp_path / "nope.yaml")


def test_foreign_run_dir_is_refused_untouched(tmp_path):
    d = tmp_path / "run"
    build(d, {"schedule": {"epochs": 1}}).fit(steps=2)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds another run.*optim.lr"):
        build(d, {"schedule": {"epochs": 1}, "optim": {"lr": 0.5}})
    # checkpoints of another run under a matching config.yaml: refused too
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 5}))
    before[d / "config.yaml"] = (d / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="checkpoints of another run"):
        build(d, {"schedule": {"epochs": 1}, "seed": 5})
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_new_cadence_on_resume_is_bit_exact(tmp_path, reference):
    "Stopped and resumed twice under other log / eval / checkpoint cadences (and keep): the reference run's weights and losses."
    ref_w, ref_losses = reference
    d = tmp_path / "run"
    r = build(d, {"eval": {"every": 3}, "checkpoint": {"every": 4, "keep": 1}, "log": {"every": 2}}).fit(steps=7)
    assert r.steps == 7
    r = build(d, {"eval": {"every": None, "at_epoch_end": False}, "checkpoint": {"every": None, "at_epoch_end": False, "keep": 5}}).fit(steps=6)
    assert r.resumed_from.endswith("step-00000007") and r.steps == 13
    t = build(d)                                                # the reference's own cadence for the rest
    r = t.fit()
    assert r.resumed_from.endswith("step-00000013") and r.steps == 24
    assert _same(_weights(t), ref_w)
    logged = losses(d)                                          # every other step up to 7, then every step
    assert logged[-17:] == ref_losses[-17:] and logged[:3] == ref_losses[1:7:2]
