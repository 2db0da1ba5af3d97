"""Two "nodes" on loopback: two `torchrun --nnodes 2 --nproc_per_node 1` launches (static rendezvous on
127.0.0.1 at a free port, gloo) read Parquet shards from moto's S3 server on 127.0.0.1. The ranks'
batches, laid side by side, are a single-process run's global batches (disjoint and complete); a
state saved by 2 nodes x 1 process resumes under 1 node x 2 processes on the same global order."""
import json
import os
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from s3_server import CREDS, HOST, free_port, make_bucket, moto_s3
from torchrun_helpers import launch, torchrun, wait_all
from mmlit.sources import open_source
from mmlit.loader import LoaderConfig, make_loader

N, B, SEED = 90, 4, 5          # 90 rows in 3 shards of row groups of 10; 2 ranks x 4 per global step
CFG = dict(batch_size=B, seed=SEED, drop_last=True, shuffle_span=2)

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mmlit.sources import open_source
    from mmlit.loader import LoaderConfig, make_loader

    source, cfg, out, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = open_source(source, kind="parquet", image_column=None)
    ld = make_loader(ds, LoaderConfig(**cfg), collate=lambda recs: [r["text"] for r in recs])
    assert (ld.rank, ld.world_size) == (rank, world)
    epochs = []
    if mode == "train":                       # epoch 0, then 3 steps of epoch 1, then stop
        epochs.append(list(ld))
        it = iter(ld)
        epochs.append([next(it) for _ in range(3)])
        state = ld.state_dict()
    else:                                     # resume from the saved state to the end of its epoch
        ld.load_state_dict(json.load(open(mode)))
        epochs.append(list(ld))
        state = None
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(rank=rank, epochs=epochs, state=state, io=ld.io.requests, node=sys.argv[5]))
    if rank == 0:
        with open(out, "w") as f: json.dump(gathered, f)
    dist.barrier()                 # tear down together: a rank that leaves while another still writes can abort the job
    dist.destroy_process_group()
""")


def shard(k: int) -> bytes:
    import io
    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": [f"row {k * 30 + i}" for i in range(30)]}), buf, row_group_size=10)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("nodes")
    (d / "worker.py").write_text(SCRIPT)
    with moto_s3() as endpoint:
        make_bucket(endpoint, "mmlit-nodes", {f"train/part-{k}.parquet": shard(k) for k in range(3)})
        env = dict(GLOO_SOCKET_IFNAME="lo", AWS_ENDPOINT_URL=endpoint, **CREDS)   # credentials and endpoint from the environment
        yield d, env, "s3://mmlit-nodes/train/*.parquet"


@pytest.fixture(scope="module")
def two_nodes(cluster):
    d, env, source = cluster
    port, out = free_port(), d / "two_nodes.json"
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", HOST, "--master_port", str(port),
              "--local_addr", HOST]
    procs = [launch(d / "worker.py", source, json.dumps(CFG), out, "train", f"node{i}", launcher=[*common, "--node_rank", str(i)],
                    env=env) for i in range(2)]
    wait_all(procs, timeout=240)
    return json.loads(out.read_text())


def reference(source, env, epoch: int) -> list[list[str]]:
    "A single process with the global batch size (2 x B): the global batches of `epoch`."
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", *CREDS)})
    try:
        ds = open_source(source, kind="parquet", image_column=None)
        ld = make_loader(ds, LoaderConfig(**{**CFG, "batch_size": 2 * B}), collate=lambda recs: [r["text"] for r in recs])
        ld.set_epoch(epoch)
        return list(ld)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


def test_two_nodes_make_the_global_batches(cluster, two_nodes):
    d, env, source = cluster
    r0, r1 = sorted(two_nodes, key=lambda r: r["rank"])
    assert (r0["node"], r1["node"]) == ("node0", "node1")       # one rank on each launch
    assert r0["io"] > 0 and r1["io"] > 0                        # both read from the S3 server
    for epoch in (0,):
        ref = reference(source, env, epoch)
        a, b = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(a) == len(b) == len(ref) == N // (2 * B)
        for k in range(len(ref)):
            assert a[k] + b[k] == ref[k]                        # rank 0 then rank 1: the global batch
            assert not set(a[k]) & set(b[k])
        seen = [t for k in range(len(ref)) for t in a[k] + b[k]]
        assert len(seen) == len(set(seen)) == N // (2 * B) * 2 * B   # disjoint; complete but the dropped tail
    ref1 = reference(source, env, 1)
    assert [x + y for x, y in zip(r0["epochs"][1], r1["epochs"][1])] == ref1[:3]


def test_resume_two_nodes_state_on_one_node_with_two_processes(cluster, two_nodes):
    d, env, source = cluster
    state = two_nodes[0]["state"]
    assert state == two_nodes[1]["state"] and (state["epoch"], state["position"], state["world_size"]) == (1, 3 * 2 * B, 2)
    (d / "state.json").write_text(json.dumps(state))
    out = d / "resumed.json"
    torchrun(d / "worker.py", source, json.dumps(CFG), out, d / "state.json", "single", nproc=2, env=env, timeout=240)
    r0, r1 = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    ref1 = reference(source, env, 1)
    assert [x + y for x, y in zip(r0["epochs"][0], r1["epochs"][0])] == ref1[3:]
