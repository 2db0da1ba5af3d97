"""Stage 5 under `torchrun --nproc_per_node 2` (gloo, CPU): the contrastive loss sees the global batch.
Loss and DDP-averaged gradients of two ranks (uneven local batches, different numbers of hard negatives)
equal one process over the same global batch; `evaluate` gives every rank the figures of the whole set."""
import json
import textwrap
from pathlib import Path

import pytest
from torchrun_helpers import torchrun
import torch

COMMON = textwrap.dedent("""
    import torch
    from mmlit.model import DualEncoder, DualEncoderConfig

    def make_model():
        cfg = DualEncoderConfig.preset("tiny", vocab_size=40, embed_dim=32, mrl_dims=[32, 16, 8], siglip_weight=0.5,
            vision=dict(model_type="vit", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64),
            vision_pooling="cls", text_pooling="attention")
        cfg.text.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # no dropout: ranks draw nothing
        return DualEncoder(cfg)

    def global_batch(n=8, k=3):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 40, (n, 6), generator=g)
        nmask = torch.ones(n, k, dtype=torch.bool); nmask[:3, 2] = False; nmask[5, 1:] = False
        return dict(pixel_values=torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), input_ids=ids,
                    attention_mask=torch.ones_like(ids), negative_input_ids=torch.randint(4, 40, (n, k, 5), generator=g),
                    negative_attention_mask=torch.ones(n, k, 5, dtype=torch.long), negative_mask=nmask,
                    label=torch.arange(n) % 3)

    def local(batch, lo, hi, k=None):
        out = {key: v[lo:hi] for key, v in batch.items()}
        if k is not None:
            for key in ("negative_input_ids", "negative_attention_mask", "negative_mask"): out[key] = out[key][:, :k]
        return out

    def step(model, batch):
        model.train(); model.set_step(0, 5)
        out = model(**batch)
        out.loss.backward()
        return out
""")

WORKER = COMMON + textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mmlit.metrics import evaluate
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)                                  # ranks' global generators differ: nothing may depend on them
    batch = global_batch()
    mine = local(batch, 0, 3, k=2) if rank == 0 else local(batch, 3, 8)   # 3 and 5 rows; rank 0 has no 3rd negative
    model = make_model()
    out = step(model, mine)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g); grads[name] = (g / dist.get_world_size()).tolist()   # what DDP does
    res = evaluate(model, [mine], labels_key="label")
    if rank == 0:
        json.dump(dict(loss=out.loss.item(), loss_clip=out.loss_clip.item(), loss_mrl=out.loss_mrl.item(),
                       loss_siglip=out.loss_siglip.item(), loss_hardneg=out.loss_hardneg.item(), grads=grads, eval=res), open(sys.argv[1], "w"))
    else:
        json.dump(dict(eval=res), open(sys.argv[1] + ".1", "w"))
    dist.barrier()                 # tear down together: a rank that leaves while another still writes can abort the job
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_model")
    script, out = d / "worker.py", d / "out.json"
    script.write_text(WORKER)
    torchrun(script, out, timeout=300)
    return json.loads(out.read_text()), json.loads(Path(str(out) + ".1").read_text())


def single():
    ns = {}
    exec(COMMON, ns)
    model = ns["make_model"]()
    out = ns["step"](model, ns["global_batch"]())
    return model, out, ns


def test_two_ranks_loss_equals_one_process_over_the_global_batch(two_ranks):
    r0, _ = two_ranks
    _, out, _ = single()
    for k in ("loss", "loss_clip", "loss_mrl", "loss_siglip", "loss_hardneg"):
        assert abs(r0[k] - getattr(out, k).item()) < 1e-5, k


def test_two_ranks_gradients_equal_one_process(two_ranks):
    r0, _ = two_ranks
    model, _, _ = single()
    for name, p in model.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        got = torch.tensor(r0["grads"][name])
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4), (name, (got - want).abs().max())
    assert model.logit_scale.grad.abs() > 0


def test_evaluate_across_ranks_equals_one_process(two_ranks):
    r0, r1 = two_ranks
    from mmlit.metrics import evaluate
    model, _, ns = single()
    want = evaluate(model, [ns["global_batch"]()], labels_key="label")
    assert r0["eval"].keys() == r1["eval"].keys() == want.keys()
    for k, v in want.items():
        assert abs(r0["eval"][k] - v) < 1e-5 and abs(r1["eval"][k] - v) < 1e-5, k
