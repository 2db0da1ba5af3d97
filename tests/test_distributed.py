"""mmlit.loader under `torchrun --nproc_per_node 2` (gloo, CPU): ranks are disjoint, their union
is the whole epoch and every rank makes the same number of steps; a state saved by the two
ranks resumes in one process on the same global stream."""
import json
import textwrap

import pytest
from torchrun_helpers import torchrun
import torch

from mmlit.sources import TensorList
from mmlit.loader import LoaderConfig, make_loader

N = 23  # not a multiple of 2 x 4: the last step is padded (or dropped)

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from mmlit.sources import TensorList
    from mmlit.loader import LoaderConfig, make_loader

    out, n = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for drop_last in (False, True):
        ds = TensorList([torch.tensor([i]) for i in range(n)])
        ld = make_loader(ds, LoaderConfig(batch_size=4, seed=11, num_workers=1, drop_last=drop_last),
                         collate=lambda s: torch.cat([r["input_ids"] for r in s]))
        assert (ld.rank, ld.world_size) == (rank, 2)
        epochs = []
        for epoch in range(2):
            ld.set_epoch(epoch)
            epochs.append([b.tolist() for b in ld])
        # stop after 2 steps of epoch 2 and hand the state over
        it = iter(ld); [next(it) for _ in range(2)]
        result[str(drop_last)] = dict(epochs=epochs, state=ld.state_dict(), len=len(ld))
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f: json.dump(gathered, f)
    dist.barrier()                 # tear down together: a rank that leaves while another still writes can abort the job
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def torchrun_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    script, out = d / "worker.py", d / "out.json"
    script.write_text(SCRIPT)
    torchrun(script, out, N, timeout=240)
    return json.loads(out.read_text())


def test_ranks_disjoint_and_complete_with_padding(torchrun_result):
    r0, r1 = (r["False"] for r in torchrun_result)
    for e in range(2):
        a, b = r0["epochs"][e], r1["epochs"][e]
        assert len(a) == len(b) == r0["len"] == 3          # ceil(23 / 8)
        flat = [i for batch in a + b for i in batch]
        assert set(flat) == set(range(N))                  # the union is the whole epoch
        assert len(flat) == N + 1                          # one padded sample (wrapped around) ...
        assert len(set(i for bt in a for i in bt) & set(i for bt in b for i in bt)) <= 1  # ... the only overlap
    assert r0["epochs"][0] != r0["epochs"][1]


def test_ranks_disjoint_with_drop_last(torchrun_result):
    r0, r1 = (r["True"] for r in torchrun_result)
    for e in range(2):
        a, b = r0["epochs"][e], r1["epochs"][e]
        assert len(a) == len(b) == 2                       # 23 // 8 whole steps
        sa, sb = {i for bt in a for i in bt}, {i for bt in b for i in bt}
        assert not sa & sb and len(sa | sb) == 16


def test_state_from_two_ranks_resumes_in_one_process(torchrun_result):
    r0, r1 = (r["False"] for r in torchrun_result)
    state = r0["state"]
    assert state == r1["state"] and state["world_size"] == 2 and (state["epoch"], state["position"]) == (2, 16)
    ds = TensorList([torch.tensor([i]) for i in range(N)])
    cfg = LoaderConfig(batch_size=4, seed=11, drop_last=False)
    collate = lambda s: torch.cat([r["input_ids"] for r in s])
    solo = make_loader(ds, cfg, collate=collate)
    solo.load_state_dict(state)
    rest = [i for b in solo for i in b.tolist()]
    ref = make_loader(ds, cfg, collate=collate)
    ref.set_epoch(2)
    assert rest == [i for b in ref for i in b.tolist()][16:]
