"""The aligner as a recipe kind: built from a trained dual encoder's run directory, frozen encoder left out of its
checkpoints, killed with SIGKILL and resumed bit for bit; a bad `encoder_run` is an error naming the field."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import yaml

from mmlit.checkpoint import WEIGHTS, CheckpointManager, safetensors_header
from mmlit.core import ConfigError
from mmlit.recipe import build_run
from mmlit.kinds import ModelSpec, model_config

from conftest import tiny_aligner_config

ROOT = Path(__file__).parent.parent
JOB = str(Path(__file__).parent / "recipe_job.py")


@pytest.fixture
def encoder_run(dual_encoder_run):
    "A dual encoder trained for 2 steps on 96 demo pairs (`conftest.dual_encoder_run`): the run directory an aligner starts from."
    return dual_encoder_run


def _aligner(run_dir, w, steps: int = 8) -> dict:
    return tiny_aligner_config(run_dir, w["train"], w["val"], w["run"], steps)


def _losses(run_dir) -> list[float]:
    try: rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError): return []
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_aligner_killed_resumes_bit_exactly(tmp_path, encoder_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    def job(name, **extra):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_aligner(tmp_path / name, encoder_run)))
        (tmp_path / f"{name}-out").mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, JOB, str(tmp_path / f"{name}.yaml"), str(tmp_path / f"{name}-out")],
                                env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = job("ref"); _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    p = job("run", MMLIT_CHECKPOINT_WRITE_DELAY="0.5")       # checkpoints every 2 steps, each write slowed: still running at 5
    t0 = time.time()
    while len(_losses(tmp_path / "run")) < 5:
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() - t0 < 300, "timed out waiting for 5 steps"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    ck = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert ck is not None and int(ck.name.split("-")[1]) < 8
    kept = [k for k in safetensors_header(ck / WEIGHTS) if k.startswith("encoder.")]
    assert not any(k.endswith((".weight", ".bias")) for k in kept), kept                   # the frozen encoder's weights are not checkpointed
    p = job("run"); _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    ref_w, got_w = torch.load(tmp_path / "ref-out" / "rank0.pt"), torch.load(tmp_path / "run-out" / "rank0.pt")
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref") and len(_losses(tmp_path / "ref")) == 8
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"]
    # the encoder did not move: it is the encoder run's checkpoint, bit for bit
    from safetensors.torch import load_file
    enc = load_file(str(CheckpointManager(encoder_run["run"] / "checkpoints").latest() / WEIGHTS))
    assert all(torch.equal(got_w[f"encoder.{k}"], v) for k, v in enc.items())


def test_bad_encoder_run_names_the_field(tmp_path, encoder_run):
    spec = lambda run: ModelSpec("aligner", options={"encoder_run": str(run)})
    with pytest.raises(ConfigError, match=r"model.options.encoder_run: .*missing does not exist"):
        build_run(_aligner(tmp_path / "a", {**encoder_run, "run": tmp_path / "missing"}))
    (tmp_path / "lm").mkdir(); (tmp_path / "lm" / "config.yaml").write_text("model: {kind: causal_lm}\n")
    with pytest.raises(ConfigError, match="model.options.encoder_run: .*lm is a causal_lm run, not a dual encoder"):
        model_config(spec(tmp_path / "lm"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) model.options.prefix"):
        model_config(ModelSpec("aligner", options={"encoder_run": str(encoder_run["run"]), "prefix": 3}))
    with pytest.raises(ConfigError, match="model.options: prefix_tokens must be a whole number >= 1"):
        model_config(ModelSpec("aligner", options={"encoder_run": str(encoder_run["run"]), "prefix_tokens": 0}))
