"""A whole run under `torchrun`, as `mmlit train` does it (`build_run`, `fit`, `finish_run`), that also records what
each rank ended with: `python tests/recipe_job.py CONFIG.yaml OUT_DIR` writes `rank{r}.json` (the tokenizer's
vocabulary, the steps, the last evaluation) and `rank{r}.pt` (the final weights) for every rank."""
import json, sys
from pathlib import Path

import torch

from mmlit.recipe import build_run, finish_run

if __name__ == "__main__":
    config, out = sys.argv[1], Path(sys.argv[2])
    run = build_run(config)
    result = run.fit()
    finish_run(run, result)
    rank = run.trainer.rank
    torch.save(run.model.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": run.trainer.world_size, "steps": result.steps,
                                                        "vocab": run.tokenizer.get_vocab(), "last_eval": result.last_eval}))
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
