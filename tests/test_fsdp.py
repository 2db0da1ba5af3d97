"""FSDP2 (`distributed.strategy: fsdp`) under `torchrun` (gloo, CPU), in two waves of launches that run side by side:
1. a 2-rank and a 1-rank FSDP run, each killed with SIGKILL after 5 logged steps;
2. a 2-rank launch that resumes the first (past a newer checkpoint with a damaged shard), then trains an uninterrupted
   FSDP run and a DDP run; a 1-rank launch that resumes the second, trains an uninterrupted 1-rank FSDP run, and resumes a
   copy of the 2-rank run's checkpoint on one rank.
The tests then compare: FSDP == DDP, each resume bit for bit against the uninterrupted run of its world size, the
2-rank checkpoint continued on one rank close to the 2-rank run."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from torchrun_helpers import launch, wait_all

sys.path.insert(0, str(Path(__file__).parent))
from train_job import build, losses  # noqa: E402

from mmlit.checkpoint import CheckpointManager, read_manifest
from mmlit.core import ConfigError
from mmlit.step import TrainConfig
from mmlit.core import config_from_dict

JOB = Path(__file__).parent / "train_job.py"
MULTI = Path(__file__).parent / "fsdp_job.py"
FSDP = {"distributed": {"strategy": "fsdp"}}
DDP = {"distributed": {"strategy": "ddp"}}


def _n_losses(d):
    try: return len(losses(d))
    except (FileNotFoundError, json.JSONDecodeError): return 0


def _kill_after(procs_dirs, n=5, timeout=180):
    "SIGKILL each launch (the launcher and its workers) once its run has logged `n` steps."
    t0, left = time.time(), dict(procs_dirs)
    while left and time.time() - t0 < timeout:
        for p, d in list(left.items()):
            if _n_losses(d) >= n:
                _kill_tree(p.pid); p.wait(); del left[p]
            elif p.poll() is not None: raise AssertionError(f"{d}: exited before {n} steps: {p.stdout.read()[-3000:]}")
        time.sleep(0.05)
    assert not left, "timed out waiting for the runs to log 5 steps"


def _kill_tree(pid):
    "SIGKILL a process and all its descendants (torch.distributed.run and its workers), children first."
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    kids = {}
    for line in out.split("\n"):
        if line.strip():
            c, pp = map(int, line.split()); kids.setdefault(pp, []).append(c)
    todo, order = [pid], []
    while todo:
        x = todo.pop(); order.append(x); todo += kids.get(x, [])
    for x in reversed(order):
        try: os.kill(x, signal.SIGKILL)
        except ProcessLookupError: pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    noise = {"TRAIN_JOB_NUMPY_NOISE": "1"}                  # each rank draws from NumPy's global generator too
    slow = {"TRAIN_JOB_STEP_DELAY": "0.05", **noise}
    # wave 1: kill a 2-rank and a 1-rank FSDP run after 5 steps
    a = launch(JOB, d / "killed2", json.dumps({"config": FSDP}), env=slow)
    b = launch(JOB, d / "killed1", json.dumps({"config": FSDP}), launcher=("--standalone", "--nproc_per_node=1"), env=slow)
    _kill_after({a: d / "killed2", b: d / "killed1"})
    ck = CheckpointManager(d / "killed2" / "checkpoints")
    k = read_manifest(ck.latest())["step"]
    assert 4 <= k < 12
    for name in ("regrown", "same2"): shutil.copytree(d / "killed2", d / name)   # the same checkpoint, resumed on 1 and on 2 ranks
    # a newer checkpoint with one flipped bit in a shard (same size): never loaded
    torn = ck.dir / f"step-{k + 1:08d}"
    shutil.copytree(ck.latest(), torn)
    shard = sorted((torn / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes()); data[len(data) // 2] ^= 1; shard.write_bytes(bytes(data))
    # wave 2
    two = [[str(d / "killed2"), FSDP, 4, 0.1], [str(d / "fsdp2"), FSDP, 4, 0.1], [str(d / "ddp2"), DDP, 4, 0.1],
           [str(d / "same2"), FSDP, 4, 0.0]]
    one = [[str(d / "killed1"), FSDP, 4, 0.1], [str(d / "fsdp1"), FSDP, 4, 0.1], [str(d / "regrown"), FSDP, 8, 0.0]]
    (d / "two.json").write_text(json.dumps(two)); (d / "one.json").write_text(json.dumps(one))
    wait_all([launch(MULTI, d / "two.json", env=noise),
              launch(MULTI, d / "one.json", launcher=("--standalone", "--nproc_per_node=1"), env=noise)],
             timeout=400)
    return d, k


def _result(d): return json.loads((d / "result.json").read_text())
def _final(d): return torch.load(d / "final.pt", weights_only=True)


def test_fsdp_equals_ddp(runs):
    "Same loss sequence and final weights as DDP on 2 ranks (rel 1e-5 / atol 1e-6; on this CPU they agree bit for bit)."
    d, _ = runs
    assert _result(d / "fsdp2")["world_size"] == 2
    assert losses(d / "fsdp2") == pytest.approx(losses(d / "ddp2"), rel=1e-5, abs=1e-7)
    f, g = _final(d / "fsdp2"), _final(d / "ddp2")
    assert f.keys() == g.keys()
    for k in f: torch.testing.assert_close(f[k], g[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 1])
def test_sigkill_resume_is_bit_exact(runs, world):
    """Killed at step k and resumed with the same number of ranks: the uninterrupted run's losses and weights, bit for bit
    (dropout and each rank's own NumPy draws included: every rank restores its own generators)."""
    d, k = runs
    r = _result(d / f"killed{world}")
    assert r["resumed_from"] is not None and r["steps"] == _result(d / f"fsdp{world}")["steps"] and r["world_size"] == world
    if world == 2: assert r["resumed_from"].endswith(f"step-{k:08d}")     # the newer, damaged checkpoint was skipped
    assert losses(d / f"killed{world}") == losses(d / f"fsdp{world}")
    f, g = _final(d / f"killed{world}"), _final(d / f"fsdp{world}")
    assert all(torch.equal(f[n], g[n]) for n in g)


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    """DCP reshards: the 2-rank checkpoint continues on 1 rank (batch 8 = 2 x 4) as it does on 2 ranks, to float rounding
    (rel 1e-4 / atol 1e-5); both continue without dropout, whose masks depend on the rank layout."""
    d, k = runs
    r = _result(d / "regrown")
    assert r["world_size"] == 1 and r["resumed_from"].endswith(f"step-{k:08d}") and r["steps"] == _result(d / "same2")["steps"] == 12
    assert losses(d / "regrown")[:k] == losses(d / "fsdp2")[:k]              # the history came with the checkpoint
    assert losses(d / "regrown")[k:] == pytest.approx(losses(d / "same2")[k:], rel=1e-4)
    f, g = _final(d / "regrown"), _final(d / "same2")
    for n in g: torch.testing.assert_close(f[n], g[n], rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoint_is_refused_under_ddp(runs, tmp_path):
    "Switching strategy on a run directory is refused: its config fingerprint differs; the checkpoint loader says why too."
    d, _ = runs
    shutil.copytree(d / "fsdp2", tmp_path / "run")
    with pytest.raises(ConfigError, match="holds another run.*distributed.strategy"): build(tmp_path / "run", DDP)
    from mmlit.checkpoint import CheckpointError, load_checkpoint
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    with pytest.raises(CheckpointError, match="sharded checkpoint.*strategy 'fsdp'.*mmlit export"): load_checkpoint(latest)


def test_fsdp_without_process_group_and_unknown_strategy(tmp_path):
    "Clear errors: FSDP without torchrun, FSDP with fp16 (refused: bf16 or fp32 instead), an unknown strategy."
    with pytest.raises(ConfigError, match="needs a process group.*torchrun"): build(tmp_path / "run", FSDP)
    with pytest.raises(ConfigError, match="precision: fp16 is not supported with distributed.strategy fsdp.*use bf16"):
        build(tmp_path / "fp16", {**FSDP, "precision": "fp16"})
    with pytest.raises(ConfigError, match=r"distributed.strategy: expected one of \['ddp', 'fsdp'\], got 'zero3'"):
        config_from_dict(TrainConfig, {"distributed": {"strategy": "zero3"}})
