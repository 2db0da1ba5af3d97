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
    state = run.model.state_dict()
    if run.trainer.sharded:                                     # FSDP: each rank holds shards; gather the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save(state, out / f"rank{rank}.pt")
    if rank == 0:                                               # the first validation batch eval_embeddings.npz begins with
        from mmlit.loader import make_loader
        d = run.data
        torch.save(next(iter(make_loader(d.val_data, run.trainer.val_loader.config, transform=d.val_transform, collate=d.collate,
                                         rank=0, world_size=1))), out / "val_batch.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": run.trainer.world_size, "steps": result.steps,
                                                        "vocab": run.tokenizer.get_vocab(), "last_eval": result.last_eval}))
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
