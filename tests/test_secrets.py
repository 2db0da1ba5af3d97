"""Credentials in a run config reach the data and nothing else: `mmlit train` on `memory://` (and S3) data with
secrets in `storage_options` and wandb offline, then every file of the run directory (wandb's included), the
HTML report and every captured log line are searched for them; a rotated secret resumes the same run."""
import json, logging, subprocess, sys, uuid
from pathlib import Path

import fsspec
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import run_cli  # noqa: E402
from mmlit.core import SECRET_MASK, redact  # noqa: E402
from mmlit.demo import build_demo_parquet  # noqa: E402
from mmlit.recipe import split_by_group  # noqa: E402
from mmlit.storage import Store  # noqa: E402


def secrets(tag: str) -> dict:
    "Distinctive credential values, one of each kind of field `redact` must catch."
    return {"key": f"AKIA{tag}KEYID", "secret": f"secret-{tag}-value", "token": f"token-{tag}-value",
            "password": f"password-{tag}-value",
            "client_kwargs": {"aws_session_token": f"session-{tag}-value",
                              "headers": [{"Authorization": f"Bearer auth-{tag}-value"}]}}


def secret_values(opts) -> list[str]:
    out = []
    for k, v in opts.items():
        if isinstance(v, dict): out += secret_values(v)
        elif isinstance(v, list): out += [s for x in v for s in secret_values(x)]
        elif isinstance(v, str) and k != "endpoint_url": out.append(v)
    return out


@pytest.fixture(scope="module")
def memory_pairs(tmp_path_factory):
    "Demo train/val Parquet (split by handwriting) copied into fsspec's in-memory filesystem."
    d = tmp_path_factory.mktemp("pairs")
    train, val = split_by_group(build_demo_parquet(d / "demo.parquet", n=96, image_size=32)[0], "digit_index", 0.25, d / "split")
    root = f"/secrets-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/train/part-0.parquet", train.read_bytes()); fs.pipe(f"{root}/val.parquet", val.read_bytes())
    return f"memory://{root}"


def run_config(run_dir: Path, data_root: str, opts: dict, **extra) -> dict:
    return {"run_dir": str(run_dir), "threads": 1,
            "data": {"data": f"{data_root}/train/*.parquet", "val_data": f"{data_root}/val.parquet", "preprocessor": "clip",
                     "data_options": {"storage_options": opts}, "preprocessor_options": {"size": 32, "uint8": True},
                     "max_length": 32, "tokenizer": {"train": {"vocab_size": 300}, "save_dir": str(run_dir / "tokenizer")},
                     "loader": {"batch_size": 16}},
            "model": {"kind": "dual_encoder", "preset": "tiny", "options": {"embed_dim": 64, "mrl_dims": [64, 32]}},
            "schedule": {"max_steps": 4}, "checkpoint": {"every": 2}, "eval": {"metric": "val/zeroshot_acc", "mode": "max"},
            "zero_shot": "digits", "label_column": "label", "log": {"progress": False}, **extra}


def files_holding(root: Path, values: list[str]) -> dict[str, list[str]]:
    "Every file under `root` (bytes, recursively) that holds one of `values`, with the values it holds."
    hits = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found = [v for v in values if v.encode() in data]
            if found: hits[str(p.relative_to(root))] = found
    return hits


def test_a_secret_in_the_config_is_written_nowhere(tmp_path, memory_pairs, caplog, capfd):
    pytest.importorskip("wandb")
    caplog.set_level(logging.DEBUG)                               # every logger, every level
    run_dir, opts = tmp_path / "run", secrets("first")
    values = secret_values(opts)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(run_dir, memory_pairs, opts, log={"progress": False, "wandb": True})))
    rc, out, err = run_cli("train", cfg_file)
    assert rc == 0, err[-3000:]
    written = {p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*")}
    assert {"config.yaml", "report.html", "data.json", "summary.json", "checkpoints", "wandb", "tokenizer"} <= written, written
    wandb_files = [p.name for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    assert any(n.endswith(".wandb") for n in wandb_files), wandb_files
    assert files_holding(run_dir, values) == {}
    logs = caplog.text + out + err + "".join(capfd.readouterr())
    assert caplog.records and not [v for v in values if v in logs]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["data_options"]["storage_options"]
    assert saved == redact(opts) and saved["secret"] == SECRET_MASK and saved["client_kwargs"]["headers"][0]["Authorization"] == SECRET_MASK
    # the search finds a secret where one is: the same search over a file that holds it
    (tmp_path / "leak.yaml").write_text(yaml.safe_dump(opts))
    assert set(files_holding(tmp_path, values)) == {"leak.yaml", "run.yaml"}


def test_a_rotated_secret_resumes_the_run(tmp_path, memory_pairs):
    run_dir, cfg_file = tmp_path / "run", tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(run_dir, memory_pairs, secrets("old"))))
    rc, _, err = run_cli("train", cfg_file, "--steps", "2")
    assert rc == 130, err[-3000:]                                  # stopped early: the status of an interrupted run
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    cfg_file.write_text(yaml.safe_dump(run_config(run_dir, memory_pairs, secrets("rotated"))))
    rc, _, err = run_cli("train", cfg_file)
    assert rc == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step-00000002"), summary
    assert files_holding(run_dir, secret_values(secrets("old")) + secret_values(secrets("rotated"))) == {}
    # credentials moved to the environment (the config's storage options gone): the same run too
    cfg = run_config(run_dir, memory_pairs, {})
    del cfg["data"]["data_options"]
    cfg_file.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli("train", cfg_file)
    assert rc == 0, err[-3000:]
    # anything else changed is another run, refused without touching it
    cfg_file.write_text(yaml.safe_dump(run_config(run_dir, memory_pairs, secrets("rotated"), seed=1)))
    rc, _, err = run_cli("train", cfg_file)
    changed = err.split("differs in: ")[1].split(";")[0].rstrip(")").split(", ")
    assert rc == 2 and changed == ["data.loader.seed", "seed"], err


def test_store_repr_masks_credentials():
    s = repr(Store(secrets("repr")))
    assert not [v for v in secret_values(secrets("repr")) if v in s] and SECRET_MASK in s


S3_JOB = """
import sys
from mmlit.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_mmlit_train_on_s3_keeps_the_secret_out(tmp_path):
    "`mmlit train` in a fresh process on the loopback S3 server, credentials in storage_options only."
    pytest.importorskip("moto"); pytest.importorskip("s3fs")
    from s3_server import make_bucket, moto_s3
    d = tmp_path / "pairs"
    train_p, val_p = split_by_group(build_demo_parquet(d / "demo.parquet", n=96, image_size=32)[0], "digit_index", 0.25, d / "split")
    key, secret = "AKIAS3JOBKEYID", f"s3-secret-{uuid.uuid4().hex}"
    with moto_s3() as endpoint:
        make_bucket(endpoint, "pairs", {"train/part-0.parquet": train_p, "val.parquet": val_p})
        opts = {"endpoint_url": endpoint, "key": key, "secret": secret, "client_kwargs": {"region_name": "us-east-1"}}
        run_dir = tmp_path / "run"
        cfg = run_config(run_dir, "s3://pairs", opts)
        cfg["data"]["loader"]["num_workers"] = 1                 # the store, credentials and all, goes to a worker
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}   # no credentials but the config's
        p = subprocess.run([sys.executable, "-c", S3_JOB, str(tmp_path / "run.yaml")], capture_output=True, text=True,
                           timeout=600, env={**env, "AWS_EC2_METADATA_DISABLED": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "report.html").is_file() and json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert files_holding(run_dir, [key, secret]) == {} and key not in p.stdout + p.stderr and secret not in p.stdout + p.stderr
    assert json.loads((run_dir / "data.json").read_text())["data"]["data"] == "s3://pairs/train/*.parquet"
