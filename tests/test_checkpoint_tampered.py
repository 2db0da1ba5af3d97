"""Tampered checkpoints, written for real by the trainer and then altered the way someone who can rewrite files can (the
manifest's checksums updated to match): each is a `CheckpointError` naming the reason, never a crash, a hang or code
run; no message advises an unrestricted `torch.load`; a resume skips the tampered newest checkpoint with a warning and
continues from the one before it exactly as an uninterrupted run does."""
import hashlib, io, json, logging, os, sys, traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_job import build, losses  # noqa: E402

from mmlit.checkpoint import (MANIFEST, MAX_MANIFEST_BYTES, STATE, WEIGHTS, CheckpointManager, load_checkpoint,  # noqa: E402
                              read_manifest)
from mmlit.core import CheckpointError  # noqa: E402

ROOT = Path(__file__).parent.parent
NO_EVAL = {"eval": {"every": None}}


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _replace(d: Path, name: str, data: bytes) -> None:
    "Replace file `name` and rewrite its manifest entry to match, as whoever tampers can."
    (d / name).write_bytes(data)
    m = _manifest(d)
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / MANIFEST).write_text(json.dumps(m))


def _edit_manifest(d: Path, edit) -> None:
    m = _manifest(d)
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _entry(f: Path) -> dict:
    return {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}


def _with_header(d: Path, edit) -> None:
    "Rewrite the weights' safetensors header through `edit(raw header bytes) -> bytes`, keeping the tensor data."
    w = (d / WEIGHTS).read_bytes()
    n = int.from_bytes(w[:8], "little")
    head = edit(w[8:8 + n])
    _replace(d, WEIGHTS, len(head).to_bytes(8, "little") + head + w[8 + n:])


class Payload:
    "Unpickling it would create the directory named in MMLIT_TEST_PAYLOAD: a stand-in for any code a pickle can run."
    def __reduce__(self): return (os.mkdir, (os.environ["MMLIT_TEST_PAYLOAD"],))


def _pickled(obj) -> bytes:
    buf = io.BytesIO(); torch.save(obj, buf); return buf.getvalue()


def _offsets_beyond(raw: bytes) -> bytes:
    h = json.loads(raw)
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"] = [0, 10**9]
    return json.dumps(h).encode()


def _other_shapes(d: Path) -> None:
    from safetensors.torch import save_model
    save_model(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(), torch.nn.Linear(32, 1)), str(d / "w"))
    _replace(d, WEIGHTS, (d / "w").read_bytes()); (d / "w").unlink()


def _escape(d: Path) -> None:
    outside = d.parent / "step-00000002" / STATE                    # a real file, listed with its right checksum
    _edit_manifest(d, lambda m: m["files"].update({f"../step-00000002/{STATE}": _entry(outside)}))


def _subdir(d: Path) -> None:
    (d / "sub").mkdir(); (d / "sub" / STATE).write_bytes((d / STATE).read_bytes())
    _edit_manifest(d, lambda m: m["files"].update({f"sub/{STATE}": _entry(d / "sub" / STATE)}))


def _symlinked_state(d: Path) -> None:
    target = d.parent / "step-00000002" / STATE
    (d / STATE).unlink(); (d / STATE).symlink_to(target)
    _edit_manifest(d, lambda m: m["files"].update({STATE: _entry(target)}))


TAMPER = {   # how the newest checkpoint is altered -> what the error says
    "huge safetensors header": (lambda d: _replace(d, WEIGHTS, (2**62).to_bytes(8, "little") + (d / WEIGHTS).read_bytes()[8:]),
                                "announces a 4611686018427387904-byte safetensors header"),
    "header larger than the file": (lambda d: _replace(d, WEIGHTS, (10**6).to_bytes(8, "little") + b"{}"), "announces a 1000000-byte"),
    "header not JSON": (lambda d: _with_header(d, lambda raw: b"{" * len(raw)), "header is not JSON"),
    "header nested too deep": (lambda d: _with_header(d, lambda raw: b"[" * 200_000), "header is not JSON"),
    "tensor beyond the file": (lambda d: _with_header(d, _offsets_beyond), "malformed header entry"),
    "weights of another shape": (_other_shapes, "do not fit Regress"),
    "disallowed pickle global": (lambda d: _replace(d, STATE, _pickled({"trainer": {}, "x": Payload()})), "GLOBAL posix.mkdir"),
    "disallowed pickled class": (lambda d: _replace(d, STATE, _pickled({"x": Path("/")})), "Unsupported global"),
    "state not a torch file": (lambda d: _replace(d, STATE, b"PK\x03\x04 not a zip"), "not loaded by torch's restricted loader"),
    "state not a dict": (lambda d: _replace(d, STATE, _pickled([1, 2])), "holds a list"),
    "empty manifest": (lambda d: (d / MANIFEST).write_text(""), "unreadable"),
    "malformed manifest": (lambda d: (d / MANIFEST).write_text('{"format": 1, "files": {'), "unreadable"),
    "manifest a list": (lambda d: (d / MANIFEST).write_text("[]"), "not a checkpoint manifest"),
    "manifest without files": (lambda d: (d / MANIFEST).write_text('{"format": 1, "step": 4}'), "no 'files' table"),
    "manifest too large": (lambda d: (d / MANIFEST).write_text(" " * (MAX_MANIFEST_BYTES + 1)), "more than the"),
    "unknown manifest format": (lambda d: _edit_manifest(d, lambda m: m.update(format=7)), "format 7"),
    "manifest lists nothing": (lambda d: _edit_manifest(d, lambda m: m.update(files={})), f"does not list {WEIGHTS} and {STATE}"),
    "manifest omits the weights": (lambda d: _edit_manifest(d, lambda m: m["files"].pop(WEIGHTS)), f"does not list {WEIGHTS}"),
    "manifest omits the state": (lambda d: _edit_manifest(d, lambda m: m["files"].pop(STATE)), f"does not list {STATE}"),
    "file name with ..": (_escape, "is not a plain name"),
    "file name with /": (_subdir, "is not a plain name"),
    "file name ..": (lambda d: _edit_manifest(d, lambda m: m["files"].update({"..": _entry(d / STATE)})), "'..' is not a plain name"),
    "malformed file entry": (lambda d: _edit_manifest(d, lambda m: m["files"].update({STATE: {"bytes": "12"}})), "is not {'sha256'"),
    "state a symlink": (_symlinked_state, "not a regular file"),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    "A run's checkpoints at steps 2 and 4, written by the trainer; the weights the model had at each."
    d = tmp_path_factory.mktemp("written") / "run"
    t = build(d, NO_EVAL)
    t.fit(steps=2); w2 = _weights(t.model)
    t = build(d, NO_EVAL)
    t.fit(steps=2); w4 = _weights(t.model)
    assert [p.name for p in CheckpointManager(d / "checkpoints").steps()] == ["step-00000002", "step-00000004"]
    return d, w2, w4


def _copy(written, tmp_path) -> Path:
    import shutil
    d = tmp_path / "run"
    shutil.copytree(written[0], d)
    return d


def _no_unsafe_advice(e: BaseException) -> None:
    text = "".join(traceback.format_exception(e))
    assert "weights_only=False" not in text and "set to `False`" not in text and "weights_only` argument" not in text, text


@pytest.mark.parametrize("kind", list(TAMPER))
def test_tampered_checkpoint_is_a_checkpoint_error(written, tmp_path, monkeypatch, kind):
    tamper, why = TAMPER[kind]
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("MMLIT_TEST_PAYLOAD", str(marker))
    d = _copy(written, tmp_path)
    newest = d / "checkpoints" / "step-00000004"
    tamper(newest)
    model = build(tmp_path / "other", NO_EVAL).model
    before = _weights(model)
    with pytest.raises(CheckpointError, match=None) as e:
        load_checkpoint(newest, model)
    assert why in str(e.value), str(e.value)
    _no_unsafe_advice(e.value)
    assert _same(_weights(model), before)                           # a refused checkpoint writes no weight
    assert not marker.exists()                                      # nothing in the state file ran


@pytest.mark.parametrize("kind", list(TAMPER))
def test_resume_falls_back_past_a_tampered_checkpoint(written, tmp_path, monkeypatch, caplog, kind):
    tamper, why = TAMPER[kind]
    monkeypatch.setenv("MMLIT_TEST_PAYLOAD", str(tmp_path / "payload-ran"))
    d = _copy(written, tmp_path)
    tamper(d / "checkpoints" / "step-00000004")
    model = build(tmp_path / "other", NO_EVAL).model
    with caplog.at_level(logging.WARNING, logger="mmlit.checkpoint"):
        path, manifest, state = CheckpointManager(d / "checkpoints").load_latest(model)
    assert path.name == "step-00000002" and manifest["step"] == 2 and state["trainer"]["step"] == 2
    assert _same(_weights(model), written[1])
    skipped = [r.getMessage() for r in caplog.records if r.name == "mmlit.checkpoint"]
    assert len(skipped) == 1 and skipped[0].startswith("skipping checkpoint step-00000004") and why in skipped[0], skipped


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The uninterrupted run to step 6: its weights and logged losses."
    d = tmp_path_factory.mktemp("ref") / "run"
    t = build(d, NO_EVAL)
    t.fit(steps=6)
    return _weights(t.model), losses(d)


RUN_KINDS = ["disallowed pickle global", "huge safetensors header", "empty manifest", "manifest omits the weights",
             "file name with ..", "weights of another shape"]


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_a_run_resumed_past_a_tampered_checkpoint_continues_exactly(written, reference, tmp_path, monkeypatch, caplog, kind):
    "Resumed from step 2 (step 4 tampered) and trained to step 6: the uninterrupted run's weights and losses."
    tamper, why = TAMPER[kind]
    monkeypatch.setenv("MMLIT_TEST_PAYLOAD", str(tmp_path / "payload-ran"))
    d = _copy(written, tmp_path)
    tamper(d / "checkpoints" / "step-00000004")
    t = build(d, NO_EVAL)
    with caplog.at_level(logging.WARNING, logger="mmlit.checkpoint"):
        r = t.fit(steps=4)
    assert r.resumed_from.endswith("step-00000002") and r.steps == 6
    assert any(m.startswith("skipping checkpoint step-00000004") and why in m for m in caplog.messages), caplog.messages
    assert _same(_weights(t.model), reference[0])
    assert losses(d) == reference[1]
    assert not (tmp_path / "payload-ran").exists()


def test_no_checkpoint_loads_is_an_error_not_a_fresh_start(written, tmp_path):
    d = _copy(written, tmp_path)
    for p in CheckpointManager(d / "checkpoints").steps(): (p / MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match="none of its 2 checkpoints loads") as e:
        build(d, NO_EVAL).fit(steps=1)
    assert "step-00000004" in str(e.value) and "step-00000002" in str(e.value)


def test_untampered_checkpoints_still_load(written, tmp_path):
    d = _copy(written, tmp_path)
    model = build(tmp_path / "other", NO_EVAL).model
    path, manifest, state = CheckpointManager(d / "checkpoints").load_latest(model)
    assert path.name == "step-00000004" and _same(_weights(model), written[2])
    assert sorted(read_manifest(path)["files"]) == [WEIGHTS, STATE]


def test_no_message_in_the_package_advises_an_unrestricted_load():
    for f in sorted((ROOT / "mmlit").glob("*.py")) + sorted((ROOT / "nbs").glob("*.ipynb")):
        text = f.read_text()
        assert "weights_only=False" not in text and "weights_only = False" not in text, f
