"""Launch a script as a multi-process gloo job on this machine, the way the distributed tests do."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(script, *args, launcher=("--standalone", "--nproc_per_node=2"), env: dict | None = None) -> subprocess.Popen:
    "Start `torch.distributed.run LAUNCHER script ARGS`: one thread a process, this checkout importable, `env` added; output piped."
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    "The output of each launch, all of which must exit 0 within `timeout` seconds together (all are killed otherwise)."
    deadline, outs = time.monotonic() + timeout, []
    try:
        for p in procs: outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
    except subprocess.TimeoutExpired:
        for p in procs: _stop(p)
        tails = [p.communicate()[0][-3000:] for p in procs[len(outs):]]
        raise AssertionError(f"torch.distributed.run did not finish within {timeout} s:\n" + "\n---\n".join(tails)) from None
    finally:
        for p in procs: _stop(p)
    for p, out in zip(procs, outs): assert p.returncode == 0, out[-6000:]
    return outs


def _stop(p: subprocess.Popen):
    "Stop a launch that is still running: SIGTERM, on which torch.distributed.run stops its workers; SIGKILL after 30 s."
    if p.poll() is not None: return
    p.terminate()
    try: p.wait(30)
    except subprocess.TimeoutExpired: p.kill(); p.wait(10)


def torchrun(script, *args, nproc: int = 2, timeout: float = 300, env: dict | None = None) -> str:
    "`torch.distributed.run --standalone` with `nproc` processes; asserts that it exits 0 within `timeout` s; its output."
    return wait_all([launch(script, *args, launcher=("--standalone", f"--nproc_per_node={nproc}"), env=env)], timeout)[0]
