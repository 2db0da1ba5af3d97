"""`mmlit` run in-process, as the CLI tests call it: its exit status and output, or `mmlit inspect --json`'s object."""
import contextlib
import io
import json

from mmlit.cli import main


def run_cli(*argv) -> tuple[int, str, str]:
    "`mmlit ARGV` in this process: exit status, stdout, stderr."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def inspect_json(*argv) -> dict:
    "`mmlit inspect ARGV --json`, which must exit 0 without a traceback and print one line: the JSON object returned."
    rc, out, err = run_cli("inspect", *argv, "--json")
    assert rc == 0 and "Traceback" not in err, err
    assert out.count("\n") == 1, "--json prints exactly one line: one JSON object"
    return json.loads(out)
