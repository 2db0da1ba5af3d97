"""Launch a script as a multi-process gloo job on this machine, the way the distributed tests do."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    "`torch.distributed.run --standalone` with `nproc` processes of one thread each, this checkout importable; asserts exit 0 (output's tail on failure)."
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
