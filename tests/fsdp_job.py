"""Several training runs of `train_job.build` in one `torchrun` launch: `python tests/fsdp_job.py RUNS.json`, where
RUNS.json is a list of `[run_dir, overrides, batch_size, dropout]`. Each run trains to its end; rank 0 writes `result.json` (steps,
resumed_from) and `final.pt` (the full final weights) into its run directory."""
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_job import build  # noqa: E402


def full_weights(model) -> dict:
    "Every parameter and buffer as a full tensor (gathered from the ranks when sharded; every rank calls it)."
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    for run_dir, overrides, batch_size, dropout in json.loads(Path(sys.argv[1]).read_text()):
        t = build(run_dir, overrides, batch_size=batch_size, dropout=dropout)
        r = t.fit()
        w = full_weights(t.model)
        if t.main:
            torch.save(w, Path(run_dir) / "final.pt")
            (Path(run_dir) / "result.json").write_text(json.dumps({"steps": r.steps, "resumed_from": r.resumed_from,
                                                                   "world_size": t.world_size}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
