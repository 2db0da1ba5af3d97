"""`mmlit inspect` end to end on real files written here: clean and corrupt Parquet (one file, shards,
glob, directory), JSONL with every kind of bad line, text corpora, usage errors, exit codes, the demo."""
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_helpers import inspect_json, run_cli
from ds_files import write_parquet
from mmlit.cli import main
from mmlit.demo import build_demo_corpus, build_demo_jsonl, build_demo_parquet, demo_row, encode_image

ROOT = Path(__file__).resolve().parents[1]


def bad_pairs(r: dict) -> list[tuple[int, str]]:
    return [(b["index"], b["reason"]) for b in r["bad"]]


def png(i: int) -> bytes: return encode_image(demo_row(i)["image"], "png")
def jpeg(i: int) -> bytes: return encode_image(demo_row(i)["image"], "jpeg")


# ---------------------------------------------------------------- Parquet
def test_clean_parquet(tmp_path):
    f = build_demo_parquet(tmp_path / "clean.parquet", n=50, row_group_size=16)[0]
    r = inspect_json(f)
    assert (r["kind"], r["rows"], r["good"], r["bad"]) == ("parquet", 50, 50, [])
    assert r["files"] == [str(f)]
    assert r["images"] == {"count": 50, "width": {"min": 64, "mean": 64.0, "max": 64},
                           "height": {"min": 64, "mean": 64.0, "max": 64}, "modes": {"RGB": 50}, "formats": {"PNG": 50}}
    caps = pq.read_table(f, columns=["caption"])["caption"].to_pylist()
    chars, words = [len(c) for c in caps], [len(c.split()) for c in caps]
    assert r["captions"]["count"] == 50 and r["captions"]["empty"] == 0
    assert r["captions"]["chars"] == {"min": min(chars), "mean": round(sum(chars) / 50, 3), "max": max(chars)}
    assert r["captions"]["words"] == {"min": min(words), "mean": round(sum(words) / 50, 3), "max": max(words)}


def test_parquet_with_bad_rows(tmp_path):
    good, blob = png(0), png(1)
    rows = [(good, "a good one"),                       # 0
            (blob[: len(blob) // 2], "truncated png"),  # 1
            (b"", "empty blob"),                         # 2
            (jpeg(2), "a jpeg"),                         # 3
            (b"this is not an image", "text bytes"),     # 4
            (None, "null image"),                        # 5
            (good, None),                                # 6: no caption
            (jpeg(3)[:-200], "truncated jpeg"),          # 7
            (good, "the last good one")]                 # 8
    images, captions = zip(*rows)
    f = write_parquet(tmp_path / "bad.parquet", captions, images)
    r = inspect_json(f)
    assert (r["rows"], r["good"]) == (9, 3)
    assert [i for i, _ in bad_pairs(r)] == [1, 2, 4, 5, 6, 7]
    reasons = dict(bad_pairs(r))
    assert reasons[1].startswith("cannot decode image, truncated or corrupt (")
    assert reasons[2] == "empty image blob"
    assert reasons[4].startswith("not a readable image (UnidentifiedImageError")
    assert reasons[5] == "image column 'image' is null"
    assert reasons[6] == "missing required field 'caption'"
    assert reasons[7].startswith("cannot decode image, truncated or corrupt (")
    assert {b["file"] for b in r["bad"]} == {str(f)} and {b["unit"] for b in r["bad"]} == {"row"}
    assert r["images"]["formats"] == {"JPEG": 1, "PNG": 2}
    # the text report lists the same records, one line each
    rc, out, _ = run_cli("inspect", f)
    assert rc == 0 and "bad       6" in out and f"{f} row 7: cannot decode image" in out


def test_parquet_shards_dir_and_glob(tmp_path):
    d = tmp_path / "shards"; d.mkdir()
    write_parquet(d / "part-0.parquet", [f"c{i}" for i in range(5)], [png(i) for i in range(5)])
    second = write_parquet(d / "part-1.parquet", ["c5", "c6", "empty", "c7"], [png(5), png(6), b"", png(7)])
    by_dir, by_glob = inspect_json(d), inspect_json(d / "part-*.parquet")
    for r in by_dir, by_glob:
        assert (r["rows"], r["good"], len(r["files"])) == (9, 8, 2)
        assert r["bad"] == [{"index": 2, "reason": "empty image blob", "file": str(second), "unit": "row"}]  # row in its file
    assert by_dir["images"] == by_glob["images"]


def test_max_bad_fraction_sets_exit_status(tmp_path):
    f = write_parquet(tmp_path / "b.parquet", ["ok", "bad", "ok", "ok"], [png(0), b"", png(1), png(2)])
    assert run_cli("inspect", f, "--max-bad-fraction", "0.25")[0] == 0
    rc, out, err = run_cli("inspect", f, "--max-bad-fraction", "0.2", "--json")
    assert rc == 1 and json.loads(out)["bad"][0]["index"] == 1   # the report is still printed
    assert "1 of 4 records are bad" in err


# ---------------------------------------------------------------- JSONL
def test_jsonl_with_bad_lines(tmp_path):
    jl = build_demo_jsonl(tmp_path / "pairs", n=8)
    lines = jl.read_text().splitlines()
    lines[1] = '{"text": "no closing brace"'                        # invalid JSON
    lines[2] = json.dumps({"image": "images/000002.png"})          # no text
    (jl.parent / "images/000003.png").unlink()                     # image file gone
    lines[5] = json.dumps({"text": 5, "image": "images/000005.png"})  # wrong type
    lines[6] = "[1, 2]"                                             # not an object
    lines.insert(4, "")                                             # a blank line: not a record, lines keep their numbers
    jl.write_text("\n".join(lines) + "\n")
    r = inspect_json(jl)
    assert (r["kind"], r["rows"], r["good"]) == ("jsonl", 8, 3)
    pairs = bad_pairs(r)
    assert [i for i, _ in pairs] == [1, 2, 3, 6, 7]                # 0-based line numbers in the file
    assert pairs[0][1].startswith("invalid JSON (")
    assert pairs[1][1] == "missing required field 'text' or 'query'"
    assert pairs[2][1] == f"image file not found: {jl.parent / 'images/000003.png'}"
    assert pairs[3][1] == "field 'text' must be str, got int"
    assert pairs[4][1] == "expected a JSON object, got list"
    assert {b["unit"] for b in r["bad"]} == {"line"}


def test_jsonl_image_root(tmp_path):
    jl = build_demo_jsonl(tmp_path / "a", n=3)
    moved = tmp_path / "elsewhere"
    shutil.move(str(jl.parent / "images"), moved / "images")
    assert inspect_json(jl)["good"] == 0
    assert inspect_json(jl, "--image-root", moved)["good"] == 3


# ---------------------------------------------------------------- text corpora
def test_text_corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"first doc\nstill first\n\n\nsecond doc here\n\nbad \xff\xfe bytes\n\nlast one\n")
    r = inspect_json(f)
    assert (r["kind"], r["rows"], r["good"]) == ("text", 4, 3)
    assert [i for i, _ in bad_pairs(r)] == [6] and r["bad"][0]["reason"].startswith("not valid UTF-8")
    assert r["captions"]["words"] == {"min": 2, "mean": 3.0, "max": 4}   # 4, 3 and 2 words
    assert r["images"]["count"] == 0
    by_line = inspect_json(f, "--split", "line")
    assert (by_line["rows"], by_line["good"], [b["index"] for b in by_line["bad"]]) == (5, 4, [6])


def test_text_corpus_jsonl_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "one two"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    r = inspect_json(f, "--kind", "text", "--field", "body")
    assert (r["rows"], r["good"], bad_pairs(r)) == (2, 1, [(1, "missing required field 'body'")])


def test_demo_corpus(tmp_path):
    r = inspect_json(build_demo_corpus(tmp_path / "c.txt"))
    assert r["rows"] == r["good"] > 50 and r["bad"] == [] and r["captions"]["chars"]["mean"] > 1000


# ---------------------------------------------------------------- usage errors
@pytest.mark.parametrize("make,msg", [
    (lambda p: p / "missing.parquet", "no such file or directory"),
    (lambda p: p / "none-*.parquet", "no files match"),
    (lambda p: (p / "x.csv").write_text("a,b\n") and p / "x.csv", "cannot tell the format"),
    (lambda p: (p / "x.parquet").write_bytes(b"PAR1 nope") and p / "x.parquet", "x.parquet"),
])
def test_usage_errors_exit_2_without_traceback(tmp_path, make, msg):
    rc, out, err = run_cli("inspect", make(tmp_path))
    assert rc == 2 and out == "" and msg in err and "Traceback" not in err
    assert err.startswith("mmlit inspect: error: ") and err.count("\n") == 1


def test_argument_errors(tmp_path):
    assert run_cli("inspect")[0] == 2                                   # neither PATH nor --demo
    assert run_cli()[0] == 2                                            # no command: help, status 2
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        main(["inspect", "x.parquet", "--kind", "csv"])             # argparse's own errors exit 2
    assert e.value.code == 2


# ---------------------------------------------------------------- progress bar, subprocess, demo
def test_progress_bar_on_stderr(tmp_path):
    f = build_demo_parquet(tmp_path / "p.parquet", n=20)[0]
    rc, out, err = run_cli("inspect", f, "--json", "--progress")
    assert rc == 0 and json.loads(out)["rows"] == 20 and "rec" in err
    assert run_cli("inspect", f, "--json")[2] == ""                     # tiny source, not a tty: no bar


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MMLIT_CACHE": str(tmp_path / "cache")}


def test_python_dash_m_matches_main(tmp_path):
    f = write_parquet(tmp_path / "b.parquet", ["ok", "bad", "ok"], [png(0), b"", png(1)])
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "inspect", str(f), "--json"],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == inspect_json(f)
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "inspect", str(tmp_path / "nope.txt")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(shutil.which("mmlit") is None, reason="console script not installed")
def test_console_script(tmp_path):
    p = subprocess.run(["mmlit", "inspect", "--help"], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 0 and "--max-bad-fraction" in p.stdout


def test_inspect_demo(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mmlit.cli", "inspect", "--demo", "--json"],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert [s["kind"] for s in r["sources"]] == ["parquet", "jsonl", "text"]
    assert r["bad"] == [] and r["sources"][0]["rows"] == 3000 and r["rows"] == r["good"] == sum(s["rows"] for s in r["sources"])
    assert r["sources"][0]["images"]["modes"] == {"RGB": 3000}
    assert Path(r["path"]).is_relative_to(tmp_path / "cache")      # built in the cache, never in the repo
    again = subprocess.run([sys.executable, "-m", "mmlit.cli", "inspect", "--demo", "--json"],
                           capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert json.loads(again.stdout) == r                            # cached and deterministic


def test_damaged_parquet_pages_are_reported_row_by_row(tmp_path):
    "A row group whose pages are overwritten: each of its rows is a bad record, the other groups read fine."
    f = build_demo_parquet(tmp_path / "d.parquet", n=600, row_group_size=256)[0]
    b = bytearray(f.read_bytes())
    off = pq.ParquetFile(f).metadata.row_group(1).column(0).data_page_offset
    b[off + 10: off + 4000] = b"\x55" * 3990
    f.write_bytes(bytes(b))
    rc, out, err = run_cli("inspect", f, "--json")
    rep = json.loads(out)
    assert rc == 0 and "Traceback" not in err
    assert (rep["rows"], rep["good"]) == (600, 600 - 256)
    assert [x["index"] for x in rep["bad"]] == list(range(256, 512))
    assert all(x["reason"].startswith("row group 1 is unreadable") for x in rep["bad"])


def test_train_checks_uri_data_through_the_storage_layer(tmp_path):
    "`mmlit train` on memory:// data: a URI that matches nothing is an error naming the key, and nothing is written."
    import fsspec, uuid, yaml
    root = f"memory://train-uris-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("memory").pipe(f"{root[len('memory://'):]}/train.parquet",
                                     build_demo_parquet(tmp_path / "d.parquet", n=8)[0].read_bytes())
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"data": f"{root}/train.parquet", "val_data": f"{root}/val-*.parquet",
                                                       "tokenizer": {"train": {"vocab_size": 263}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli("train", tmp_path / "run.yaml")
    assert rc == 2 and f"data.val_data: no files match {root}/val-*.parquet" in err and "Traceback" not in err, err
    cfg["data"]["val_data"] = f"{root}/val.parquet"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli("train", tmp_path / "run.yaml")
    assert rc == 2 and f"data.val_data: {root}/val.parquet does not exist" in err, err
    assert not (tmp_path / "run").exists()
